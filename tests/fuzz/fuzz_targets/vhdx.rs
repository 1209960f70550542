//! Fuzzes kiln's VHDX reader: file type identifier, both headers, region tables, the log (its
//! replay), metadata items (parent locator included), BAT entries, sector bitmaps and parents.
//!
//! A VHDX file is at least 4 MiB with its structures on fixed MiB boundaries, far too large to
//! mutate whole. So an input is a list of 4 KiB pages that the target lays at the offsets in
//! [`PAGES`] (where the structures and the first payload blocks of a 1 MiB-block file are, in kiln's layout
//! and in qemu-img's), in a
//! sparse file whose length in MiB is the input's last byte; everything else reads as zeros.
//! `make-vhdx-seeds.sh` packs qemu-img's and kiln's files into this form. The directory also holds
//! `p.vhdx` (a parent for differencing inputs whose locator names it). The target opens the file,
//! walks its extents and reads guest bytes, asserting the `BlockSource` extent contract.

#![no_main]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln::format::{BlockSource, ExtentKind, Format};
use libfuzzer_sys::fuzz_target;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
/// Where each 4 KiB page of an input goes.
const PAGES: [u64; 23] = [
    0,
    64 * KIB,
    128 * KIB,
    192 * KIB,
    256 * KIB,
    MIB,
    MIB + 4 * KIB,
    2 * MIB,
    2 * MIB + 32 * KIB,
    2 * MIB + 64 * KIB,
    2 * MIB + 128 * KIB,
    3 * MIB,
    3 * MIB + 32 * KIB,
    3 * MIB + 64 * KIB,
    3 * MIB + 128 * KIB,
    4 * MIB,
    5 * MIB,
    6 * MIB,
    7 * MIB,
    8 * MIB,
    9 * MIB,
    10 * MIB,
    11 * MIB,
];
const MAX_STEPS: usize = 32;
const MAX_EXTENT: u64 = 16 << 20;
const MAX_READ: u64 = 128 << 10;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("kiln-fuzz-vhdx-{}", std::process::id()));
        fs::create_dir_all(&d).expect("fuzz dir");
        unpack(&d.join("p.vhdx"), include_bytes!("../fixtures/p.vhdx.pages"));
        d
    })
}

/// Writes `data` (pages, then the length byte) as the sparse file `path`.
fn unpack(path: &Path, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open input");
    let mib = data.last().map_or(8, |&b| u64::from(b % 33).max(1));
    f.set_len(mib * MIB).expect("size input");
    let body = &data[..data.len().saturating_sub(1)];
    for (page, &at) in body.chunks(PAGE).zip(PAGES.iter()) {
        f.write_all_at(page, at).expect("write page");
    }
}

/// Walks extents from 0 (and a few probes), checking the extent contract and reading each.
fn exercise(src: &dyn BlockSource) {
    let size = src.virtual_size();
    let mut buf = vec![0u8; MAX_READ as usize];
    let mut at = 0u64;
    let mut probes = [size / 3, size / 2, size.saturating_sub(4096)].into_iter();
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
        let Ok(e) = src.extent(at, max) else {
            at = size;
            continue;
        };
        assert_eq!(e.start, at, "extent starts elsewhere");
        assert!(e.len > 0 && e.len <= max, "extent length {} (max {max})", e.len);
        assert!(e.end() <= size, "extent past the virtual size");
        let n = e.len.min(MAX_READ) as usize;
        if src.read_at(at, &mut buf[..n]).is_ok() && e.kind != ExtentKind::Data {
            assert!(buf[..n].iter().all(|&b| b == 0), "{:?} extent reads data", e.kind);
        }
        at = e.end();
    }
    if size > 1 {
        let off = size / 2 - (size / 2).min(777);
        let n = (size - off).min(3000) as usize;
        let _ = src.read_at(off, &mut buf[..n]);
    }
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("a.vhdx");
    unpack(&path, data);
    let opts = kiln::format::OpenOptions {
        format: Some(Format::Vhdx),
        ..Default::default()
    };
    if let Ok(o) = kiln::format::open(&path, &opts) {
        exercise(o.source.as_ref());
    }
});
