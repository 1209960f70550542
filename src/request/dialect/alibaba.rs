//! Alibaba ECS CreateImage: kiln's own parameter names ([`crate::request::file`]), plus what only
//! a request file can say: `InstanceId` (a libvirt domain XML path, or a domain name read with
//! `virsh` when `--connect URI` is given), and the priority InstanceId > DiskDeviceMapping >
//! SnapshotId, with a note naming what was ignored.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{resolve, Dialect, LoadOptions, Loaded};
use crate::error::{Code, Error, Result};
use crate::image::attributes::DialectRecord;
use crate::request::create::{self, InstanceDisks};
use crate::request::file;
use crate::request::instance::MAX_XML_LEN;

/// Reads an Alibaba request (JSON, TOML, or the query form made JSON).
pub(crate) fn parse(v: &Value, path: &Path, base: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut f = file::parse(v, path, base)?;
    let mut notes = Vec::new();
    let instance = match f.instance_id.clone() {
        None => None,
        Some(id) => {
            if f.disks.take().is_some() {
                notes.push("DiskDeviceMapping was ignored: InstanceId takes priority".to_string());
            }
            if let Some(s) = f.snapshot.take() {
                notes.push(format!(
                    "SnapshotId {} was ignored: InstanceId takes priority",
                    s.display()
                ));
            }
            Some(instance(&id, "InstanceId", base, opts.connect.as_deref())?)
        }
    };
    let record = (!f.recorded.is_empty()).then(|| DialectRecord {
        dialect: Dialect::Alibaba.as_str().into(),
        parameters: f.recorded.clone(),
        ..DialectRecord::default()
    });
    Ok(Loaded {
        dialect: Dialect::Alibaba,
        file: f,
        instance,
        record,
        notes,
        ..Loaded::default()
    })
}

/// The instance `id` (the request's parameter `param`) names: a domain XML path (relative to the
/// request file), or with `connect` a libvirt domain dumped by `virsh`.
pub(crate) fn instance(
    id: &str,
    param: &str,
    base: &Path,
    connect: Option<&str>,
) -> Result<InstanceDisks> {
    match connect {
        Some(uri) => {
            let xml = virsh_dumpxml(uri, id)?;
            let cwd = std::env::current_dir().unwrap_or_default();
            create::instance_disks_from_xml(&xml, &cwd, &[], &[])
        }
        None => {
            let p = resolve(base, id);
            if !p.is_file() {
                return Err(Error::new(
                    Code::InstanceNotFound,
                    format!(
                        "{param} {id}: no domain XML at {} (give the path of `virsh dumpxml` output{})",
                        p.display(),
                        if param == "InstanceId" { ", or --connect URI to name a libvirt domain" } else { "" }
                    ),
                ));
            }
            create::instance_disks(&p, &[], &[])
        }
    }
}

/// `virsh --connect URI dumpxml --domain NAME`'s output, at most [`MAX_XML_LEN`] bytes.
fn virsh_dumpxml(uri: &str, name: &str) -> Result<String> {
    if name.starts_with('-') || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(Error::new(
            Code::InstanceNotFound,
            format!("InstanceId '{name}' is not a libvirt domain name"),
        ));
    }
    let out = Command::new("virsh")
        .args(["--connect", uri, "dumpxml", "--domain", name])
        .output()
        .map_err(|e| {
            Error::new(
                Code::InvalidParameter,
                format!("--connect {uri}: cannot run virsh ({e}); install libvirt-clients, or give InstanceId as a domain XML path without --connect"),
            )
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Error::new(
            Code::InstanceNotFound,
            format!(
                "InstanceId {name}: virsh --connect {uri} dumpxml failed: {}",
                why.trim()
            ),
        ));
    }
    if out.stdout.len() > MAX_XML_LEN {
        return Err(Error::new(
            Code::InvalidInstanceMalformed,
            format!("InstanceId {name}: virsh printed more than a domain XML can be"),
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| {
        Error::new(
            Code::InvalidInstanceMalformed,
            format!("InstanceId {name}: virsh printed text that is not UTF-8"),
        )
    })
}
