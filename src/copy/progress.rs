//! Progress reporting. The engine only calls the [`Progress`] trait; what users see (bars on a
//! terminal, JSON lines, nothing) is chosen here.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::copy::stats::CopyStats;

/// Receives progress from the copy threads; must be cheap and never block for long.
pub(crate) trait Progress: Sync {
    /// `bytes` more of disk `disk`'s virtual size are done (copied or skipped).
    fn advance(&self, disk: usize, bytes: u64);
    /// Disk `disk` is written, hashed and flushed; `stats` says what its copy did.
    fn disk_done(&self, disk: usize, stats: &CopyStats);
}

/// Reports nothing.
pub(crate) struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _: usize, _: u64) {}
    fn disk_done(&self, _: usize, _: &CopyStats) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProgressMode {
    /// Bars when stderr is a terminal, nothing otherwise.
    Auto,
    /// JSON lines on stderr.
    Json,
    /// Nothing (`--quiet`).
    Off,
}

/// The reporter for `mode`, given each disk's name and virtual size.
pub(crate) fn reporter(mode: ProgressMode, disks: &[(String, u64)]) -> Box<dyn Progress> {
    match mode {
        ProgressMode::Off => Box::new(NoProgress),
        ProgressMode::Json => Box::new(JsonProgress::new(disks)),
        ProgressMode::Auto if std::io::stderr().is_terminal() => Box::new(Bars::new(disks)),
        ProgressMode::Auto => Box::new(NoProgress),
    }
}

/// indicatif bars: one per disk and a total with throughput and ETA.
pub(crate) struct Bars {
    _multi: MultiProgress,
    disks: Vec<ProgressBar>,
    total: ProgressBar,
}

impl Bars {
    pub(crate) fn new(disks: &[(String, u64)]) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let style = ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = disks
            .iter()
            .map(|(name, size)| {
                let b = multi.add(ProgressBar::new(*size));
                b.set_style(style.clone());
                b.set_prefix(name.trim_start_matches("/dev/").to_string());
                b
            })
            .collect();
        let total = multi.add(ProgressBar::new(disks.iter().map(|d| d.1).sum()));
        total.set_style(style);
        total.set_prefix("total");
        Bars {
            _multi: multi,
            disks: bars,
            total,
        }
    }
}

impl Progress for Bars {
    fn advance(&self, disk: usize, bytes: u64) {
        if let Some(b) = self.disks.get(disk) {
            b.inc(bytes);
        }
        self.total.inc(bytes);
    }

    fn disk_done(&self, disk: usize, _: &CopyStats) {
        if let Some(b) = self.disks.get(disk) {
            b.finish();
        }
        if self.disks.iter().all(|b| b.is_finished()) {
            self.total.finish();
        }
    }
}

/// JSON lines on stderr: `{"Device":..,"Done":..,"Total":..,"Elapsed":..,"Finished":..}`, at most
/// ~4 a second per disk, plus a last line when each disk is finished. Keys are PascalCase, like
/// every other JSON kiln prints.
pub(crate) struct JsonProgress {
    start: Instant,
    names: Vec<String>,
    totals: Vec<u64>,
    done: Vec<AtomicU64>,
    last: Mutex<Vec<Instant>>,
}

impl JsonProgress {
    pub(crate) fn new(disks: &[(String, u64)]) -> Self {
        let start = Instant::now();
        JsonProgress {
            start,
            names: disks.iter().map(|d| d.0.clone()).collect(),
            totals: disks.iter().map(|d| d.1).collect(),
            done: disks.iter().map(|_| AtomicU64::new(0)).collect(),
            last: Mutex::new(vec![start; disks.len()]),
        }
    }

    /// One line; the last one of a disk (`finished`) carries its copy statistics and throughput.
    fn emit(&self, disk: usize, finished: Option<&CopyStats>) {
        let done = self.done[disk]
            .load(Ordering::Relaxed)
            .min(self.totals[disk]);
        let elapsed = self.start.elapsed().as_secs_f64();
        let mut line = serde_json::json!({
            "Device": self.names[disk],
            "Done": if finished.is_some() { self.totals[disk] } else { done },
            "Total": self.totals[disk],
            "Elapsed": (elapsed * 1000.0).round() / 1000.0,
            "Finished": finished.is_some(),
        });
        if let (Some(s), Some(obj)) = (finished, line.as_object_mut()) {
            let secs = elapsed.max(1e-6);
            obj.insert("BytesCopied".into(), s.copied.into());
            obj.insert("HolesSkipped".into(), s.holes.into());
            obj.insert("ZerosDetected".into(), s.zeros.into());
            obj.insert(
                "DataBytesPerSec".into(),
                ((s.copied as f64 / secs) as u64).into(),
            );
            obj.insert(
                "VirtualBytesPerSec".into(),
                ((self.totals[disk] as f64 / secs) as u64).into(),
            );
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

impl Progress for JsonProgress {
    fn advance(&self, disk: usize, bytes: u64) {
        if disk >= self.done.len() {
            return;
        }
        self.done[disk].fetch_add(bytes, Ordering::Relaxed);
        let now = Instant::now();
        let due = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(last[disk]) >= Duration::from_millis(250) {
                last[disk] = now;
                true
            } else {
                false
            }
        };
        if due {
            self.emit(disk, None);
        }
    }

    fn disk_done(&self, disk: usize, stats: &CopyStats) {
        if disk < self.done.len() {
            self.emit(disk, Some(stats));
        }
    }
}
