//! `kiln check IMAGE_ID|DIR|FILE`: the image check ([`crate::detect`]) on an image's system disk or
//! on any disk file. An image is checked against its own BootMode, Architecture and Platform unless
//! flags say otherwise; a bare file only against the flags given.

use std::path::{Path, PathBuf};

use crate::commands::target::{self, Target, TargetUse};
use crate::detect::{self, DetectOptions, Report};
use crate::error::{Code, Error, Result};
use crate::format::Format;
use crate::image::manifest::Manifest;
use crate::request::plan::SYSTEM_DEVICE;
use crate::request::validate;

#[derive(Debug, Clone, Default)]
pub struct CheckRequest {
    /// An ImageId, an image directory, or a disk file (`FILE@SNAP`).
    pub(crate) target: String,
    /// Which qcow2 backing files may be followed (`--backing-dir`).
    pub(crate) gate: crate::format::gate::BackingGate,
    /// The file's format (detected otherwise); ignored for images, whose manifest says.
    pub(crate) format: Option<Format>,
    pub(crate) boot_mode: Option<String>,
    pub(crate) architecture: Option<String>,
    pub(crate) platform: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// The disk file checked.
    pub(crate) disk: PathBuf,
    pub(crate) report: Report,
}

impl CheckOutcome {
    /// 1 when any item fails, as `verify` exits 1 when a file differs.
    pub fn exit_status(&self) -> u8 {
        u8::from(self.report.has_fail())
    }
}

/// Resolves the target and checks it. `store` is the global `--store`, used for an ImageId.
pub fn check(req: &CheckRequest, store: Option<&Path>) -> Result<CheckOutcome> {
    let mut opts = DetectOptions {
        boot_mode: req
            .boot_mode
            .as_deref()
            .map(validate::boot_mode)
            .transpose()?,
        architecture: req
            .architecture
            .as_deref()
            .map(validate::architecture)
            .transpose()?,
        platform: req
            .platform
            .as_deref()
            .map(validate::platform)
            .transpose()?,
    };
    let (disk, format) = match target::resolve(&req.target, store, TargetUse::Check)? {
        Target::ImageDir(dir) => system_disk(&dir, &mut opts)?,
        Target::File(file) => (file, req.format),
    };
    let report = detect::detect_file(&disk, format, &req.gate, &opts)?;
    Ok(CheckOutcome { disk, report })
}

/// The system disk of the image in `dir`, and the image's attributes where `opts` has none.
fn system_disk(dir: &Path, opts: &mut DetectOptions) -> Result<(PathBuf, Option<Format>)> {
    let path = dir.join("manifest.json");
    let bytes = crate::util::safe_fs::read_regular(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::new(
            Code::InvalidImageIdNotFound,
            format!(
                "{}: no manifest.json; not an image directory",
                dir.display()
            ),
        ),
        _ => Error::io(&path, "reading", e),
    })?;
    let m = Manifest::from_json(&bytes).map_err(|e| {
        Error::new(
            Code::InvalidParameter,
            format!("{}: not a kiln manifest ({e})", path.display()),
        )
    })?;
    opts.boot_mode = opts.boot_mode.or(Some(m.boot_mode));
    opts.architecture = opts.architecture.or(Some(m.architecture));
    opts.platform = opts.platform.or(Some(m.platform));
    let disk = m
        .disks
        .iter()
        .find(|d| d.device == SYSTEM_DEVICE)
        .ok_or_else(|| {
            Error::new(
                Code::InvalidParameter,
                format!(
                    "{}: the image has no system disk ({SYSTEM_DEVICE}) to check; check a data disk by its file",
                    dir.display()
                ),
            )
        })?;
    let file = disk.file.as_str();
    if let Some(archive) = &disk.archive {
        return Err(Error::new(
            Code::InvalidParameter,
            format!(
                "{}: the system disk is the member {file} of {archive}; extract it (tar -xf {archive} {file}) and check that file",
                dir.display()
            ),
        ));
    }
    // The manifest names files inside the image directory; refuse anything that would leave it.
    if file.is_empty() || file.contains('/') || file == ".." {
        return Err(Error::new(
            Code::InvalidParameter,
            format!(
                "{}: the system disk's File '{file}' is not a file name",
                path.display()
            ),
        ));
    }
    Ok((dir.join(file), Format::parse(&disk.format)))
}
