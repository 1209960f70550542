//! Fuzzes kiln's qcow2 reader with whole image files: header, extensions, backing names, L1/L2
//! entries, compressed cluster descriptors, extended L2 bitmaps and the snapshot table.
//!
//! Each input is written as `a.qcow2` into a private tmpfs directory that also holds `b.raw` and
//! `b.qcow2` (a qcow2 on top of `b.raw`), so a backing name of "b.raw", "b.qcow2" or "a.qcow2"
//! (itself) resolves. The target opens the image (and each internal snapshot), walks its extents over
//! the virtual size and reads guest bytes. Work per input is capped (steps and bytes per step), so a
//! timeout means the reader itself loops. The extent contract of `BlockSource` is asserted.

#![no_main]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln::format::{qcow2, BlockSource, ExtentKind};
use libfuzzer_sys::fuzz_target;

/// Extents asked per opened image.
const MAX_STEPS: usize = 32;
/// Longest extent asked at once (the copy engine asks for more; this keeps each input fast).
const MAX_EXTENT: u64 = 16 << 20;
/// Most guest bytes read per extent.
const MAX_READ: u64 = 128 << 10;
/// Internal snapshots opened per input.
const MAX_SNAPSHOTS: usize = 4;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("kiln-fuzz-{}", std::process::id()));
        fs::create_dir_all(&d).expect("fuzz dir");
        fs::write(d.join("b.raw"), include_bytes!("../fixtures/b.raw")).expect("b.raw");
        fs::write(d.join("b.qcow2"), include_bytes!("../fixtures/b.qcow2")).expect("b.qcow2");
        d
    })
}

/// Walks the extents from 0 (and a few probes further on), checking the extent contract and reading
/// the start of each data extent.
fn exercise(src: &dyn BlockSource) {
    let size = src.virtual_size();
    let mut buf = vec![0u8; MAX_READ as usize];
    let mut at = 0u64;
    let mut probes = [
        size / 3,
        size / 2,
        size.saturating_sub(4096),
        size.saturating_sub(1),
    ]
    .into_iter();
    for _ in 0..MAX_STEPS {
        if at >= size {
            match probes.next() {
                Some(p) => at = p,
                None => break,
            }
            if at >= size {
                continue;
            }
        }
        let max = (size - at).min(MAX_EXTENT);
        let e = match src.extent(at, max) {
            Ok(e) => e,
            Err(_) => {
                // Skip the damaged range: try the next probe.
                at = size;
                continue;
            }
        };
        assert_eq!(e.start, at, "extent starts elsewhere");
        assert!(
            e.len > 0 && e.len <= max,
            "extent length {} (max {max})",
            e.len
        );
        assert!(e.end() <= size, "extent past the virtual size");
        let n = e.len.min(MAX_READ) as usize;
        let r = src.read_at(at, &mut buf[..n]);
        if r.is_ok() && e.kind != ExtentKind::Data {
            assert!(
                buf[..n].iter().all(|&b| b == 0),
                "{:?} extent reads data",
                e.kind
            );
        }
        at = e.end();
    }
    // A read that straddles clusters and extents at an odd offset.
    if size > 1 {
        let off = size / 2 - (size / 2).min(777);
        let n = (size - off).min(3000) as usize;
        let _ = src.read_at(off, &mut buf[..n]);
    }
}

fn open(path: &Path, snapshot: Option<&str>) -> Option<kiln::format::Opened> {
    let f = File::open(path).ok()?;
    qcow2::open(f, path, snapshot, &kiln::format::gate::BackingGate::default()).ok()
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("a.qcow2");
    fs::write(&path, data).expect("write input");
    if let Some(o) = open(&path, None) {
        exercise(o.source.as_ref());
    }
    // The snapshot table, both parsers: inspect's listing, and the reader's lookup (a name no
    // snapshot has makes it parse the whole table).
    if let Ok(snaps) = kiln::format::qcow2::snapshot::read_snapshot_table(&path) {
        for s in snaps.iter().take(MAX_SNAPSHOTS) {
            if let Some(o) = open(&path, Some(&s.id)) {
                exercise(o.source.as_ref());
            }
        }
    }
    let _ = open(&path, Some("\u{1}no such snapshot"));
});
