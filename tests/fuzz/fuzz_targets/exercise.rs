//! What every reader's fuzz target does with an opened disk: walk its extents, check the
//! `BlockSource` extent contract, and read guest bytes. Work per input is capped (steps and bytes
//! per step), so a timeout means the reader itself loops.

// Each target uses a part of this module.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use kiln::format::{self, BlockSource, ExtentKind, Format, OpenOptions};

/// A private directory for the inputs (on tmpfs when there is one), holding `files`, the fixtures
/// an input's backing or parent names may reach.
pub fn scratch_dir(tag: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("kiln-fuzz-{tag}{}", std::process::id()));
    fs::create_dir_all(&d).expect("fuzz dir");
    for (name, bytes) in files {
        fs::write(d.join(name), bytes).expect("fixture");
    }
    d
}

/// Extents asked per opened image.
const MAX_STEPS: usize = 32;
/// Longest extent asked at once (the copy engine asks for more; this keeps each input fast).
const MAX_EXTENT: u64 = 16 << 20;
/// Most guest bytes read per extent.
const MAX_READ: u64 = 128 << 10;
/// Walks the extents from 0 (and a few probes further on), checking the extent contract and reading
/// the start of each data extent.
pub fn exercise(src: &dyn BlockSource) {
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

/// Opens `path` with `format` forced, then with the format detected, and exercises what opens.
pub fn open_and_exercise(path: &Path, format: Format) {
    for format in [Some(format), None] {
        let opts = OpenOptions {
            format,
            ..OpenOptions::default()
        };
        if let Ok(o) = format::open(path, &opts) {
            exercise(o.source.as_ref());
        }
    }
}
