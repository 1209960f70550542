//! `--dry-run`: every check a real create makes up to the copy (sources opened, locked and sized,
//! free space, `--detect` on the system disk as it would be written); nothing is written.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::disks::{self, PreparedDisk};
use super::publish::detect_options;
use super::space::{self, SpaceCheck};
use crate::detect::{self, relocate};
use crate::error::Result;
use crate::format::BlockSource;
use crate::image::manifest::EncryptionRecord;
use crate::request::create::CreateRequest;
use crate::request::plan::{self, DiskLayout};
use crate::request::target::Target;
use crate::util::testhook;

/// One disk of a dry run's plan.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PlannedDiskReport {
    #[serde(rename = "Device")]
    pub(crate) device: String,
    #[serde(rename = "DiskType")]
    pub(crate) disk_type: String,
    /// None for an empty disk.
    #[serde(rename = "Source")]
    pub(crate) source: Option<PathBuf>,
    #[serde(rename = "SourceFormat")]
    pub(crate) source_format: Option<String>,
    #[serde(rename = "Format")]
    pub(crate) format: String,
    #[serde(rename = "VirtualSize")]
    pub(crate) virtual_size: u64,
    /// Allocated source data: what the copy reads (zeros among it are then not written).
    #[serde(rename = "BytesToCopy")]
    pub(crate) bytes_to_copy: u64,
    /// Whether the disk would be written encrypted, and how (what the manifest would record):
    /// never key material.
    #[serde(rename = "Encrypted")]
    pub(crate) encrypted: bool,
    #[serde(rename = "Encryption", skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<EncryptionRecord>,
}

/// What `--dry-run` found: the real run would start.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    #[serde(rename = "ImageName")]
    pub(crate) image_name: String,
    /// The directory the image would be published to (the store's images directory for a store).
    #[serde(rename = "Target")]
    pub(crate) target: PathBuf,
    /// Set when the client token names an existing image that the real run would return.
    #[serde(rename = "ExistingImageId", skip_serializing_if = "Option::is_none")]
    pub(crate) existing_image_id: Option<String>,
    #[serde(rename = "Disks")]
    pub(crate) disks: Vec<PlannedDiskReport>,
    #[serde(rename = "Space")]
    pub(crate) space: SpaceCheck,
    #[serde(rename = "Warnings")]
    pub(crate) warnings: Vec<String>,
    /// `--target`: the destination, the output it picked and what its rules changed.
    #[serde(rename = "TargetProfile", skip_serializing_if = "Option::is_none")]
    pub(crate) target_profile: Option<TargetPlan>,
    /// `--detect`: the check of the system disk as it would be written.
    #[serde(rename = "Detection", skip_serializing_if = "Option::is_none")]
    pub(crate) detection: Option<detect::Report>,
}

/// What `--target` decided, for a dry run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TargetPlan {
    #[serde(rename = "Name")]
    pub(crate) name: Target,
    /// The output, in words (`vhd (subformat=fixed)`).
    #[serde(rename = "Output")]
    pub(crate) output: String,
    #[serde(rename = "Adjustments")]
    pub(crate) adjustments: Vec<String>,
}

/// The dry run of a create publishing to `target` (an output directory, or the store's images
/// directory); `existing_image_id` when the client token names an image a real run would return.
pub(super) fn dry_run(
    req: &CreateRequest,
    layout: &DiskLayout,
    target: &Path,
    existing_image_id: Option<String>,
    warn: &mut dyn FnMut(&str),
) -> Result<DryRunReport> {
    let mut prepared = disks::prepare(req, layout, warn)?;
    testhook::checkpoint("prepared");
    let space = space::check(
        &space::existing_ancestor(target),
        super::estimate(&prepared),
    )?;
    let detection = detection(req, &mut prepared)?;
    let target_profile = match req.target {
        Some(t) => Some(TargetPlan {
            name: t,
            output: crate::target::profile(t)?.describe(),
            adjustments: prepared
                .iter()
                .flat_map(|p| p.adjustments.clone())
                .collect(),
        }),
        None => None,
    };
    Ok(DryRunReport {
        image_name: req.name.clone(),
        target: super::absolute(target),
        existing_image_id,
        disks: prepared
            .iter()
            .map(|p| PlannedDiskReport {
                device: p.planned.device.to_string(),
                disk_type: p.planned.disk_type.as_str().into(),
                source: p.source.as_ref().map(|s| s.path.clone()),
                source_format: p.source.as_ref().map(|s| s.format.clone()),
                format: p.format.extension().into(),
                virtual_size: p.virtual_size,
                bytes_to_copy: p.data_bytes,
                encrypted: p.encryption.is_some(),
                encryption: p
                    .encryption
                    .as_ref()
                    .map(|e| e.describe(req.output.format.extension()).into()),
            })
            .collect(),
        space,
        warnings: layout.warnings.clone(),
        target_profile,
        detection,
    })
}

/// `--dry-run --detect`: checks the system disk's source as the copy would present it (grown to
/// its size, with `--relocate-gpt`'s changes), without writing it. Takes the source out of
/// `prepared`, which a dry run no longer needs.
fn detection(req: &CreateRequest, prepared: &mut [PreparedDisk]) -> Result<Option<detect::Report>> {
    if !req.detect {
        return Ok(None);
    }
    let Some(p) = prepared
        .iter_mut()
        .find(|p| p.planned.device == plan::SYSTEM_DEVICE)
    else {
        return Ok(None);
    };
    let Some(o) = p.opened.take() else {
        return Ok(None);
    };
    let size = req.output.disk_size(p.virtual_size);
    // A source already wrapped by --relocate-gpt has this size; growing it again adds nothing.
    let source: Box<dyn BlockSource> = if o.source.virtual_size() < size {
        Box::new(relocate::Relocated::new(o.source, size, Vec::new())?)
    } else {
        o.source
    };
    Ok(Some(detect::detect(
        std::sync::Arc::from(source),
        &detect_options(req),
    )?))
}
