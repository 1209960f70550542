//! Fuzzes kiln's VMDK reader with whole files: the sparse extent header and footer, markers,
//! grain directory and tables, compressed grains, and text descriptors (extent lines, CIDs,
//! parentFileNameHint).
//!
//! Each input is written as `a.vmdk` into a private tmpfs directory that also holds `b.raw` (a
//! flat extent) and `b.vmdk` (a small monolithicSparse disk), so extent and parent names "b.raw",
//! "b.vmdk" and "a.vmdk" (itself) resolve through the backing gate. The target opens the disk,
//! walks its extents over the virtual size and reads guest bytes, with the work per input capped
//! as in the qcow2 target. The extent contract of `BlockSource` is asserted.

#![no_main]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln::format::vmdk;
use libfuzzer_sys::fuzz_target;

#[path = "exercise.rs"]
mod exercise;
use exercise::exercise;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        exercise::scratch_dir(
            "vmdk-",
            &[
                ("b.raw", &include_bytes!("../fixtures/b.raw")[..]),
                ("b.vmdk", &include_bytes!("../fixtures-vmdk/b.vmdk")[..]),
            ],
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("a.vmdk");
    fs::write(&path, data).expect("write input");
    let Ok(f) = File::open(&path) else { return };
    let gate = kiln::format::OpenOptions::default().gate;
    if let Ok(o) = vmdk::open(f, &path, None, &gate) {
        exercise(o.source.as_ref());
    }
});
