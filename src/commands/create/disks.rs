//! Create's preparation: every planned disk with its source open, locked and checked
//! ([`crate::prepare`]), and its size and output file settled, before anything is written.

use std::path::Path;

use super::absolute;
use crate::error::{Code, Error, Result};
use crate::format::gate::BackingGate;
use crate::format::luks::Secret;
use crate::format::{self, Encryption, Opened, OutputFormat, OutputSpec};
use crate::image::manifest::{FileRead, SourceRecord};
use crate::prepare::{self, qemu_lock, CopySource};
use crate::request::create::CreateRequest;
use crate::request::instance;
use crate::request::plan::{self, DiskLayout, PlannedDisk};

/// A disk with its source open and its output settled.
pub(super) struct PreparedDisk {
    pub(crate) planned: PlannedDisk,
    pub(crate) opened: Option<Opened>,
    pub(crate) virtual_size: u64,
    pub(crate) file: String,
    pub(crate) source: Option<SourceRecord>,
    /// Allocated source bytes (the copy reads these).
    pub(crate) data_bytes: u64,
    /// QEMU-compatible locks on every file read, held until the copy is done.
    pub(crate) locks: Vec<qemu_lock::SourceLock>,
    /// Every file read, as it was when opened: checked again once the copy is done.
    pub(crate) stamps: format::SourceStamps,
    /// What kiln changes in the guest's bytes (`--relocate-gpt`), for the manifest.
    pub(crate) changes: Vec<String>,
    /// How the output is encrypted, if it is.
    pub(crate) encryption: Option<Encryption>,
    /// What `--target`'s rules changed (a size grown to the destination's alignment).
    pub(crate) adjustments: Vec<String>,
    /// The disk's output format (its own `output-format=`, else the image's).
    pub(crate) format: OutputFormat,
}

/// Opens every source and sizes every disk. A source another process writes to is refused unless
/// `--allow-running` (IncorrectInstanceStatus for an instance's disks, SnapshotNotReady otherwise).
pub(super) fn prepare(
    req: &CreateRequest,
    layout: &DiskLayout,
    warn: &mut dyn FnMut(&str),
) -> Result<Vec<PreparedDisk>> {
    let how = CopySource {
        format: None,
        gate: &req.gate,
        busy_code: if req.instance.is_some() {
            Code::IncorrectInstanceStatus
        } else {
            Code::SnapshotNotReady
        },
        allow_running: req.allow_running,
    };
    layout
        .disks
        .iter()
        .map(|d| prepare_disk(req, d, &how, warn))
        .collect()
}

fn prepare_disk(
    req: &CreateRequest,
    d: &PlannedDisk,
    how: &CopySource,
    warn: &mut dyn FnMut(&str),
) -> Result<PreparedDisk> {
    let disk_key = d
        .crypt
        .key_file
        .as_deref()
        .map(Secret::from_file)
        .transpose()?;
    let gate;
    let how = match &disk_key {
        Some(k) => {
            gate = BackingGate {
                key: Some(k.clone()),
                ..how.gate.clone()
            };
            CopySource {
                gate: &gate,
                ..how.clone()
            }
        }
        None => how.clone(),
    };
    // The disk's output encryption: the request's, or its own `encrypt=true` with the command
    // line's key (else its own key file's).
    let output = req.output.for_disk(d.output_format)?;
    let encryption = match (&output.encryption, d.crypt.encrypt) {
        (Some(e), _) => Some(e.clone()),
        (None, true) => Some(Encryption::for_output(
            &output,
            req.gate.key.as_ref().or(disk_key.as_ref()),
            None,
        )?),
        (None, false) => None,
    };
    let (mut opened, locks, stamps) = match &d.snapshot {
        Some(p) => {
            let how = CopySource {
                format: d.format,
                ..how.clone()
            };
            let l = prepare::open_locked(p, &how, warn)?;
            check_instance_backing(req, &d.device, &l.opened)?;
            (Some(l.opened), l.locks, l.stamps)
        }
        None => (None, Vec::new(), format::SourceStamps::default()),
    };
    let src_size = opened.as_ref().map(|o| o.info.virtual_size);
    if src_size == Some(0) {
        return Err(Error::new(
            Code::InvalidSize,
            format!(
                "{}: the snapshot {} is empty (0 bytes)",
                d.device,
                d.snapshot.as_deref().unwrap_or(Path::new("")).display()
            ),
        ));
    }
    let mut virtual_size = plan::resolve_size(&d.device, d.size, src_size)?;
    let mut adjustments = Vec::new();
    let profile = req.target.map(crate::target::profile).transpose()?;
    if let Some(p) = profile {
        // Before --relocate-gpt, which moves a backup GPT to the end of the grown disk.
        let (size, note) = crate::target::align(p, &d.device, virtual_size);
        virtual_size = size;
        adjustments.extend(note);
        let system = d.disk_type == plan::DiskType::System;
        crate::target::check_size(p, &d.device, system, output.disk_size(virtual_size))?;
    }
    let mut changes = Vec::new();
    if req.relocate_gpt {
        opened = match opened {
            Some(o) if o.info.virtual_size < virtual_size => {
                let size = output.disk_size(virtual_size);
                let (o, c) = prepare::relocate_gpt(o, size, &d.device, warn)?;
                changes = c;
                Some(o)
            }
            other => other,
        };
    }
    let data_bytes = match &opened {
        Some(o) => prepare::data_bytes(o.source.as_ref())?,
        None => 0,
    };
    Ok(PreparedDisk {
        planned: d.clone(),
        source: opened.as_ref().map(source_record),
        opened,
        virtual_size,
        file: format!("{}.{}", d.short_name(), file_extension(&output, profile)),
        data_bytes,
        locks,
        stamps,
        changes,
        encryption,
        adjustments,
        format: output.format,
    })
}

/// The output file's extension: the format's, or `tar.gz` for a destination's archive.
fn file_extension(output: &OutputSpec, profile: Option<&crate::target::Profile>) -> &'static str {
    match profile.map(|p| p.packaging) {
        Some(crate::target::Packaging::GzipTar) => "tar.gz",
        _ => output.format.extension(),
    }
}

/// With `--instance`: the chain kiln read must be the one the domain's `<backingStore>` names.
fn check_instance_backing(req: &CreateRequest, device: &str, o: &Opened) -> Result<()> {
    let Some(inst) = &req.instance else {
        return Ok(());
    };
    let target = inst.target_of(device);
    match inst
        .disks
        .iter()
        .find(|x| Some(x.target_dev.as_str()) == target)
    {
        Some(disk) => instance::check_backing(disk, &o.info.chain),
        None => Ok(()),
    }
}

/// The manifest's record of a source: where it is and every file read.
fn source_record(o: &Opened) -> SourceRecord {
    SourceRecord {
        path: absolute(&o.info.path),
        snapshot_name: o.info.snapshot.clone(),
        format: o.info.format.as_str().to_string(),
        virtual_size: o.info.virtual_size,
        files_read: o
            .info
            .chain
            .iter()
            .map(|c| FileRead {
                path: absolute(&c.path),
                format: c.format.as_str().to_string(),
            })
            .collect(),
    }
}
