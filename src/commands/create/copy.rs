//! Create's copy: every prepared disk through the engine at once, then the sources checked for
//! changes, and each output disk described for the manifest.

use std::path::Path;
use std::sync::Arc;

use super::disks::PreparedDisk;
use crate::copy::engine::{self, DiskJob, DiskResult};
use crate::copy::progress::{self, Progress};
use crate::copy::stats::CopyStats;
use crate::detect::relocate::Relocated;
use crate::error::Result;
use crate::format::luks::VolumeInfo;
use crate::format::{self, BlockSource};
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
    /// What `--target`'s rules changed, for the manifest.
    pub(crate) adjustments: Vec<String>,
    /// `--detect` of a system disk written into an archive, checked on its source as the archive
    /// holds it (an archive cannot be checked in place).
    pub(crate) detection: Option<crate::detect::Report>,
}

/// Copies every disk into `dir`; a store create's record follows the progress, and `sealed` (if
/// any) is handed each disk file once it is final. The sources stay locked until the copy is done,
/// and a source that changed meanwhile fails the create.
pub(super) fn copy(
    req: &CreateRequest,
    prepared: Vec<PreparedDisk>,
    dir: &Path,
    creating: Option<&Creating>,
    sealed: Option<engine::Sealed>,
) -> Result<Copied> {
    let disk_names = disk_names(&prepared);
    let mut records = Vec::with_capacity(prepared.len());
    let mut jobs: Vec<DiskJob> = Vec::with_capacity(prepared.len());
    let mut locks = Vec::new();
    let mut stamps = format::SourceStamps::default();
    let mut adjustments = Vec::new();
    for mut p in prepared {
        adjustments.append(&mut p.adjustments);
        stamps.extend(p.stamps);
        jobs.push(DiskJob {
            name: p.planned.device.to_string(),
            source: p.opened.map(|o| o.source),
            virtual_size: p.virtual_size,
            out_path: dir.join(&p.file),
            hash: true,
            encryption: p.encryption.clone(),
            format: Some(p.format),
            sealed: sealed.clone(),
        });
        let format = p.format.extension();
        let enc = p.encryption.map(|e| e.describe(format));
        records.push((p.planned, p.file, p.source, (p.changes, enc, format)));
        locks.extend(p.locks);
    }
    let archives = req
        .target
        .map(crate::target::profile)
        .transpose()?
        .is_some_and(|p| p.packaging == crate::target::Packaging::GzipTar);
    let mut detection = None;
    let results = with_progress(req, &disk_names, creating, |progress| {
        if archives {
            detection = detect_before_archive(req, &mut jobs)?;
            let flush = req.output.cache.flushes();
            crate::archive::gcp::write_all(jobs, req.threads, flush, progress)
        } else {
            engine::copy_disks(jobs, &req.output, req.threads, progress)
        }
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
        adjustments,
        detection,
    };
    for ((d, file, source, (changes, enc, format)), r) in records.into_iter().zip(results) {
        copied.stats.add(&r.stats);
        copied
            .sums
            .push((r.sha256.clone().unwrap_or_default(), file.clone()));
        copied
            .disks
            .push(record(req, d, (file, format), source, changes, enc, r));
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

/// The manifest's record of a disk the engine wrote into `file`, in `format`.
pub(super) fn record(
    req: &CreateRequest,
    d: PlannedDisk,
    (file, format): (String, &str),
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
        format: format.to_string(),
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

/// `--detect` with an archive: the system disk's source, grown to the disk's size as the archive
/// holds it, is checked before it is written; the copy then reads the same (shared) source.
fn detect_before_archive(
    req: &CreateRequest,
    jobs: &mut [DiskJob],
) -> Result<Option<crate::detect::Report>> {
    let Some(job) = jobs
        .iter_mut()
        .filter(|_| req.detect)
        .find(|j| j.name == crate::request::plan::SYSTEM_DEVICE)
    else {
        return Ok(None);
    };
    let Some(source) = job.source.take() else {
        return Ok(None);
    };
    let shared: Arc<dyn BlockSource> = Arc::from(source);
    job.source = Some(Box::new(shared.clone()));
    let view: Arc<dyn BlockSource> = if shared.virtual_size() < job.virtual_size {
        Arc::new(Relocated::new(
            Box::new(shared),
            job.virtual_size,
            Vec::new(),
        )?)
    } else {
        shared
    };
    Ok(Some(crate::detect::detect(
        view,
        &super::publish::detect_options(req),
    )?))
}
