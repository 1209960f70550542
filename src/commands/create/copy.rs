//! Create's copy: every prepared disk through the engine at once, then the sources checked for
//! changes, and each output disk described for the manifest.

use std::path::Path;

use super::disks::PreparedDisk;
use crate::copy::engine::{self, DiskJob, DiskResult};
use crate::copy::progress::{self, Progress};
use crate::copy::stats::CopyStats;
use crate::error::Result;
use crate::format;
use crate::format::luks::VolumeInfo;
use crate::image::manifest::{DiskRecord, SourceRecord};
use crate::image::store::{Creating, RecordProgress};
use crate::request::create::CreateRequest;
use crate::request::plan::PlannedDisk;
use crate::util::size;

/// The copied disks.
pub(super) struct Copied {
    pub(crate) disks: Vec<DiskRecord>,
    /// All disks' numbers together.
    pub(crate) stats: CopyStats,
    /// (SHA-256, file name) of each disk, for `SHA256SUMS`.
    pub(crate) sums: Vec<(String, String)>,
}

/// Copies every disk into `dir`; a store create's record follows the progress. The sources stay
/// locked until the copy is done, and a source that changed meanwhile fails the create.
pub(super) fn copy(
    req: &CreateRequest,
    prepared: Vec<PreparedDisk>,
    dir: &Path,
    creating: Option<&Creating>,
) -> Result<Copied> {
    let disk_names = disk_names(&prepared);
    let mut records = Vec::with_capacity(prepared.len());
    let mut jobs = Vec::with_capacity(prepared.len());
    let mut locks = Vec::new();
    let mut stamps = format::SourceStamps::default();
    for p in prepared {
        stamps.extend(p.stamps);
        jobs.push(DiskJob {
            name: p.planned.device.to_string(),
            source: p.opened.map(|o| o.source),
            virtual_size: p.virtual_size,
            out_path: dir.join(&p.file),
            hash: true,
            encryption: p.encryption.clone(),
        });
        let enc = p
            .encryption
            .map(|e| e.describe(req.output.format.extension()));
        records.push((p.planned, p.file, p.source, (p.changes, enc)));
        locks.extend(p.locks);
    }
    let results = with_progress(req, &disk_names, creating, |progress| {
        engine::copy_disks(jobs, &req.output, req.threads, progress)
    });
    // A source that changed under the copy explains any error the copy met (a truncated qcow2
    // looks corrupt), and makes a copy that seemed to succeed worthless.
    stamps.check()?;
    let results = results?;
    drop(locks);

    let mut copied = Copied {
        disks: Vec::with_capacity(records.len()),
        stats: CopyStats::default(),
        sums: Vec::new(),
    };
    for ((d, file, source, (changes, enc)), r) in records.into_iter().zip(results) {
        copied.stats.add(&r.stats);
        copied
            .sums
            .push((r.sha256.clone().unwrap_or_default(), file.clone()));
        copied
            .disks
            .push(record(req, d, file, source, changes, enc, r));
    }
    Ok(copied)
}

/// Each disk's device name and virtual size, for progress.
pub(super) fn disk_names(prepared: &[PreparedDisk]) -> Vec<(String, u64)> {
    prepared
        .iter()
        .map(|p| (p.planned.device.to_string(), p.virtual_size))
        .collect()
}

/// Runs `f` with the copy's progress reporter (`disks`: name and size of each); with a store
/// create, the image's record follows the progress too.
pub(super) fn with_progress<T>(
    req: &CreateRequest,
    disks: &[(String, u64)],
    creating: Option<&Creating>,
    f: impl FnOnce(&dyn Progress) -> T,
) -> T {
    let reporter = progress::reporter(req.progress, disks);
    let total: u64 = disks.iter().map(|d| d.1).sum();
    let record_progress = creating.map(|c| RecordProgress::new(reporter.as_ref(), c, total));
    match &record_progress {
        Some(p) => f(p),
        None => f(reporter.as_ref()),
    }
}

/// The manifest's record of a disk the engine wrote into `file`.
pub(super) fn record(
    req: &CreateRequest,
    d: PlannedDisk,
    file: String,
    source: Option<SourceRecord>,
    changes: Vec<String>,
    enc: Option<VolumeInfo>,
    r: DiskResult,
) -> DiskRecord {
    DiskRecord {
        original_target: req
            .instance
            .as_ref()
            .and_then(|i| i.target_of(&d.device))
            .map(str::to_string),
        device: d.device,
        disk_type: d.disk_type,
        file,
        archive: None,
        format: req.output.format.extension().to_string(),
        // The engine's size: qcow2 output is rounded up to whole 512-byte sectors.
        virtual_size: r.virtual_size,
        size_gib: size::gib_rounded_up(r.virtual_size),
        allocated_bytes: r.allocated_bytes,
        file_size: r.file_size,
        sha256: r.sha256.unwrap_or_default(),
        source,
        stats: r.stats,
        encrypted: enc.is_some(),
        encryption: enc.map(Into::into),
        changes,
    }
}
