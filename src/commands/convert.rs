//! `kiln convert`: one disk through the same engine as `create`, with qemu-img's option names, so the
//! two run side by side on the same files. Like qemu-img, an existing destination is replaced; unlike
//! it, the new file appears only once complete (written beside it, then renamed). The source is
//! prepared as `create` prepares its sources ([`crate::prepare::open_locked`]): locked the way QEMU
//! locks images while it is copied, and refused while a process writes to it unless
//! `--allow-running`. `-t` picks qemu-img's cache mode for the output ([`crate::format::CacheMode`]):
//! the default, `writeback`, fsyncs the file and its directory before and after the rename.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::copy::engine::{self, DiskJob};
use crate::copy::progress::{self, ProgressMode};
use crate::copy::stats::CopyStats;
use crate::error::{Code, Error, Result};
use crate::format::Format;
use crate::format::OutputSpec;
use crate::prepare::{self, CopySource};

#[derive(Debug, Clone)]
pub struct ConvertRequest {
    pub(crate) source: PathBuf,
    pub(crate) source_format: Option<Format>,
    pub(crate) destination: PathBuf,
    pub(crate) output: OutputSpec,
    pub(crate) threads: usize,
    pub(crate) progress: ProgressMode,
    /// Also compute the output's SHA-256.
    pub(crate) sha256: bool,
    /// Which qcow2 backing files may be followed (`--backing-dir`).
    pub(crate) gate: crate::format::gate::BackingGate,
    /// `--allow-running`: copy a source open for writing, with a warning.
    pub(crate) allow_running: bool,
}

#[derive(Debug, Clone)]
pub struct ConvertOutcome {
    pub(crate) virtual_size: u64,
    pub(crate) stats: CopyStats,
    pub(crate) sha256: Option<String>,
    pub(crate) elapsed: Duration,
}

/// Converts one disk; `warn` receives each warning (a writer let through by `--allow-running`).
pub fn convert(req: &ConvertRequest, warn: &mut dyn FnMut(&str)) -> Result<ConvertOutcome> {
    let started = Instant::now();
    let prepare::Locked {
        opened,
        locks,
        stamps,
    } = prepare::open_locked(
        &req.source,
        &CopySource {
            format: req.source_format,
            gate: &req.gate,
            busy_code: Code::SnapshotNotReady,
            allow_running: req.allow_running,
        },
        warn,
    )?;
    let virtual_size = opened.info.virtual_size;
    let dst = &req.destination;
    let name = dst.file_name().ok_or_else(|| {
        Error::new(
            Code::InvalidParameter,
            format!("destination {} has no file name", dst.display()),
        )
    })?;
    if dst.is_dir() {
        return Err(Error::new(
            Code::InvalidParameter,
            format!("destination {} is a directory; name a file", dst.display()),
        ));
    }
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = parent.join(format!(
        ".{}.kiln-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let guard = TempFile(Some(tmp.clone()));
    let job = DiskJob {
        name: dst.display().to_string(),
        source: Some(opened.source),
        virtual_size,
        out_path: tmp.clone(),
        hash: req.sha256,
        encryption: None,
        format: None,
        sealed: None,
    };
    let reporter = progress::reporter(req.progress, &[(job.name.clone(), virtual_size)]);
    let results = engine::copy_disks(vec![job], &req.output, req.threads, reporter.as_ref());
    stamps.check()?;
    let mut results = results?;
    drop(reporter);
    drop(locks);
    let r = results
        .pop()
        .ok_or_else(|| Error::new(Code::Internal, "the copy returned no result"))?;
    std::fs::rename(&tmp, dst)
        .map_err(|e| Error::io(dst, "renaming the finished file into place", e))?;
    guard.keep();
    if req.output.cache.flushes() {
        crate::image::publish::sync_dir(parent)?;
    }
    Ok(ConvertOutcome {
        virtual_size: r.virtual_size,
        stats: r.stats,
        sha256: r.sha256,
        elapsed: started.elapsed(),
    })
}

/// Removes a half-written file unless kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
