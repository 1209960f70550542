//! Create's publish step: the image check of the written system disk (`--detect`), the manifest,
//! `SHA256SUMS`, the staging directory renamed into place; and the store's record of the image.

use std::time::Instant;

use super::copy::Copied;
use super::CreateOutcome;
use crate::detect;
use crate::error::Result;
use crate::format::gate::BackingGate;
use crate::format::Format;
use crate::image::attributes::Status;
use crate::image::manifest::{self, Manifest};
use crate::image::publish::Staging;
use crate::image::store::{Creating, Record};
use crate::request::create::CreateRequest;
use crate::request::digest::sha256_of;
use crate::request::plan;
use crate::util::testhook;

/// Writes the manifest and `SHA256SUMS` beside the copied disks and publishes the image.
pub(super) fn publish(
    req: &CreateRequest,
    copied: Copied,
    staging: Staging,
    image_id: &str,
    started: Instant,
) -> Result<CreateOutcome> {
    let Copied {
        disks,
        stats,
        mut sums,
        adjustments,
        detection,
    } = copied;
    let virtual_bytes = disks.iter().map(|d| d.virtual_size).sum();
    let system = disks.iter().find(|d| d.device == plan::SYSTEM_DEVICE);
    let detection = match system {
        // An archive's system disk was checked on its source, before it was written.
        _ if detection.is_some() => detection,
        Some(d) if d.file.ends_with(".tar.gz") => None,
        Some(d) if req.detect => Some(detect::detect_file(
            &staging.dir().join(&d.file),
            Format::parse(&d.format),
            &BackingGate::default(),
            &detect_options(req),
        )?),
        _ => None,
    };
    let platform = req
        .platform
        .or_else(|| detection.as_ref().and_then(|r| r.platform))
        .unwrap_or_default();
    let manifest = Manifest {
        attributes: req.attributes(image_id, platform),
        creation_time: manifest::now_rfc3339(),
        status: Status::Available,
        client_token: req.client_token.clone(),
        size_gib: disks.iter().map(|d| d.size_gib).sum(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        instance: req.instance.as_ref().map(|i| manifest::InstanceRecord {
            name: i.name.clone(),
            uuid: i.uuid.clone(),
        }),
        disks,
        detection,
        target: req
            .target
            .map(|name| manifest::TargetRecord { name, adjustments }),
    };
    let json = manifest.to_json();
    staging.write_file("manifest.json", &json)?;
    testhook::checkpoint("manifest");
    sums.push((
        crate::copy::hash::hex(&sha256_of(&json)),
        "manifest.json".into(),
    ));
    staging.write_file("SHA256SUMS", manifest::sha256sums(&sums).as_bytes())?;
    testhook::checkpoint("sums");
    let output_dir = staging.commit()?;
    testhook::checkpoint("renamed");
    Ok(CreateOutcome {
        manifest,
        output_dir,
        stats,
        virtual_bytes,
        elapsed: started.elapsed(),
        record: None,
    })
}

/// What `--detect` checks the system disk against: the request's (normalised) attributes.
pub(super) fn detect_options(req: &CreateRequest) -> detect::DetectOptions {
    detect::DetectOptions {
        boot_mode: req.boot_mode,
        architecture: req.architecture,
        platform: req.platform,
    }
}

/// The store's record of an image being created (status Creating).
pub(super) fn new_record(req: &CreateRequest, image_id: &str, digest: &str) -> Record {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Record {
        // The platform until the check of the system disk says otherwise (--detect without one).
        attributes: req.attributes(image_id, req.platform.unwrap_or_default()),
        status: Status::Creating,
        progress: "0%".into(),
        client_token: req.client_token.clone(),
        request_digest: digest.to_string(),
        creation_time: manifest::rfc3339(now.as_secs()),
        creation_nanos: now.as_nanos(),
        pid: std::process::id(),
        size_gib: 0,
        directory: None,
        disks: Vec::new(),
        detection: None,
        error_code: None,
        error_message: None,
        lease_expires: None,
    }
}

/// Marks the store's record Available with what the published image holds.
pub(super) fn finish_record(creating: Creating, out: &CreateOutcome) -> Result<Record> {
    creating.finish(|r| {
        r.size_gib = out.manifest.size_gib;
        r.directory = Some(out.output_dir.clone());
        r.disks = out.manifest.disks.clone();
        r.platform = out.manifest.platform;
        r.detection = out.manifest.detection.clone();
    })
}
