//! Fuzzes kiln's VDI reader with whole files: the header (signature, version, type, offsets, sizes,
//! UUIDs) and the block map. The target opens the input as a VDI, and again with the format
//! detected, then walks its extents and reads guest bytes (`exercise.rs`), asserting the extent
//! contract.

#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln::format::Format;
use libfuzzer_sys::fuzz_target;

mod exercise;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| exercise::scratch_dir("vdi-", &[]))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("a.vdi");
    fs::write(&path, data).expect("write input");
    exercise::open_and_exercise(&path, Format::Vdi);
});
