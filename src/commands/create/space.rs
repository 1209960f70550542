//! The free-space check: refuse before copying when the image cannot fit.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Code, Error, Result};
use crate::util::size::{self, MIB};

/// The free-space check.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SpaceCheck {
    /// The mount point (device, type) the image goes to.
    #[serde(rename = "Filesystem")]
    pub(crate) filesystem: String,
    #[serde(rename = "NeedBytes")]
    pub(crate) need: u64,
    #[serde(rename = "FreeBytes")]
    pub(crate) free: u64,
}

/// Estimated bytes an image needs on disk: `data` bytes to copy over `disks` disks, ~1% of the data
/// for metadata, and 1 MiB per disk (headers, tables, manifest).
pub(crate) fn estimate(data: u64, disks: usize) -> u64 {
    data + data / 100 + MIB * disks as u64
}

/// Refuses with InsufficientSpace when `dir`'s filesystem has less free space than `need`. In
/// debug builds (the tests' binary) `KILN_TEST_FREE_BYTES` replaces the free space measured;
/// release builds ignore it.
pub(crate) fn check(dir: &Path, need: u64) -> Result<SpaceCheck> {
    let hook = if cfg!(debug_assertions) {
        std::env::var("KILN_TEST_FREE_BYTES").ok()
    } else {
        None
    };
    let free = match hook.and_then(|v| v.parse().ok()) {
        Some(v) => v,
        None => {
            let st = nix::sys::statvfs::statvfs(dir).map_err(|e| {
                Error::io(
                    dir,
                    "measuring free space (statvfs)",
                    std::io::Error::from_raw_os_error(e as i32),
                )
            })?;
            (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64)
        }
    };
    let filesystem = filesystem_of(dir);
    if need > free {
        return Err(Error::new(
            Code::InsufficientSpace,
            format!(
                "{filesystem}: the image needs about {} ({need} bytes) but only {} ({free} bytes) is free; \
                 free some space or build elsewhere (--store or --output-dir)",
                size::human(need),
                size::human(free)
            ),
        ));
    }
    Ok(SpaceCheck {
        filesystem,
        need,
        free,
    })
}

/// `MOUNTPOINT (DEVICE, TYPE)` of the filesystem holding `dir`, from /proc/self/mounts; the path
/// itself when that cannot be read.
fn filesystem_of(dir: &Path) -> String {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return canonical.display().to_string();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut best: Option<(PathBuf, String, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 3 {
            continue;
        }
        let mp = PathBuf::from(unescape(f[1]));
        if canonical.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() >= b.0.as_os_str().len())
        {
            best = Some((mp, unescape(f[0]), f[2].to_string()));
        }
    }
    match best {
        Some((mp, dev, ty)) => format!("{} ({dev}, {ty})", mp.display()),
        None => canonical.display().to_string(),
    }
}

/// The nearest existing directory at or above `p` (where a not-yet-created directory would live).
pub(crate) fn existing_ancestor(p: &Path) -> PathBuf {
    let abs = super::absolute(p);
    let mut cur: &Path = &abs;
    loop {
        if cur.is_dir() {
            return cur.to_path_buf();
        }
        match cur.parent() {
            Some(q) => cur = q,
            None => return PathBuf::from("/"),
        }
    }
}
