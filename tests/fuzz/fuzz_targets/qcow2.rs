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

use kiln::format::qcow2;
use libfuzzer_sys::fuzz_target;

mod exercise;
use exercise::exercise;

/// Internal snapshots opened per input.
const MAX_SNAPSHOTS: usize = 4;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        exercise::scratch_dir(
            "",
            &[
                ("b.raw", &include_bytes!("../fixtures/b.raw")[..]),
                ("b.qcow2", &include_bytes!("../fixtures/b.qcow2")[..]),
            ],
        )
    })
}

fn open(path: &Path, snapshot: Option<&str>) -> Option<kiln::format::Opened> {
    let f = File::open(path).ok()?;
    qcow2::open(
        f,
        path,
        snapshot,
        &kiln::format::gate::BackingGate::default(),
    )
    .ok()
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
