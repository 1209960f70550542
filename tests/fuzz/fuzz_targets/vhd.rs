//! Fuzzes kiln's VHD reader with whole files: the footer (at the start and at the end), the dynamic
//! header, the BAT, sector bitmaps, parent locators and the parent chain.
//!
//! Each input is written as `a.vhd` into a private tmpfs directory that also holds `parent.vhd` (a
//! small dynamic VHD), `b.raw` and `b.qcow2`, so a parent locator naming any of them (or "a.vhd"
//! itself) resolves. The target opens the input as a VHD, and again with the format detected, then
//! walks its extents and reads guest bytes (`exercise.rs`), asserting the extent contract.

#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln::format::Format;
use libfuzzer_sys::fuzz_target;

mod exercise;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        exercise::scratch_dir(
            "vhd-",
            &[
                ("b.raw", &include_bytes!("../fixtures/b.raw")[..]),
                ("b.qcow2", &include_bytes!("../fixtures/b.qcow2")[..]),
                ("parent.vhd", &include_bytes!("../fixtures/parent.vhd")[..]),
            ],
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("a.vhd");
    fs::write(&path, data).expect("write input");
    exercise::open_and_exercise(&path, Format::Vhd);
});
