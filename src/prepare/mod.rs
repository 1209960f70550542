//! Preparing sources: every command that reads a disk opens it through here.
//!
//! - [`open`]: the format's reader through [`crate::format::open`], backing files only through the
//!   gate (`inspect`, `check`, and the two below);
//! - [`open_locked`]: that, plus what a copy needs (`create`, `convert`): every file of the chain
//!   stamped ([`SourceStamps`], checked again after the copy), locked the way QEMU locks images
//!   ([`qemu_lock::lock_chain`], so a VM cannot start writing it during the copy), and checked for a
//!   writer ([`qemu_lock::check_not_written`]: refused unless `allow_running`);
//! - [`relocate_gpt`]: `--relocate-gpt`'s view of a growing disk;
//! - [`data_bytes`]: what a copy will read.

pub mod qemu_lock;

use std::path::Path;

use crate::detect::relocate;
use crate::error::{Code, Result};
use crate::format::gate::BackingGate;
use crate::format::{self, BlockSource, ExtentKind, Format, OpenOptions, Opened, SourceStamps};

/// Opens a user-named source (`FILE@SNAP` for a qcow2 internal snapshot) read-only; `format` when
/// stated, detected otherwise.
pub(crate) fn open(path: &Path, format: Option<Format>, gate: &BackingGate) -> Result<Opened> {
    format::open(
        path,
        &OpenOptions {
            format,
            snapshot: None,
            gate: gate.clone(),
        },
    )
}

/// How a copy's source is opened.
#[derive(Debug, Clone)]
pub(crate) struct CopySource<'a> {
    pub(crate) format: Option<Format>,
    pub(crate) gate: &'a BackingGate,
    /// The error when a writer holds a file: `IncorrectInstanceStatus` for an instance's disks,
    /// `SnapshotNotReady` otherwise.
    pub(crate) busy_code: Code,
    /// `--allow-running`: a writer is a warning, not an error.
    pub(crate) allow_running: bool,
}

/// A source opened for a copy: keep it (and its locks) until the copy is done, then check `stamps`.
pub(crate) struct Locked {
    pub(crate) opened: Opened,
    /// QEMU-compatible locks on every file read.
    pub(crate) locks: Vec<qemu_lock::SourceLock>,
    /// Every file read, as it was when opened.
    pub(crate) stamps: SourceStamps,
}

/// Opens, stamps and locks a source, then checks it for writers; each warning (a writer allowed by
/// `allow_running`) goes to `warn`.
pub(crate) fn open_locked(
    path: &Path,
    how: &CopySource,
    warn: &mut dyn FnMut(&str),
) -> Result<Locked> {
    let opened = open(path, how.format, how.gate)?;
    let mut stamps = SourceStamps::default();
    stamps.add(&opened.info.chain)?;
    let locks = qemu_lock::lock_chain(&opened.info.chain)?;
    let paths: Vec<&Path> = opened.info.chain.iter().map(|c| c.path.as_path()).collect();
    for w in qemu_lock::check_not_written(&paths, how.busy_code, how.allow_running)? {
        warn(&w);
    }
    Ok(Locked {
        opened,
        locks,
        stamps,
    })
}

/// Wraps a source growing to `size` bytes so its GPT's backup ends up at the new end (see
/// [`crate::detect::relocate`]), with what changes in the guest's bytes; a disk without a valid GPT
/// is copied as it is, with a warning naming `device`.
pub(crate) fn relocate_gpt(
    o: Opened,
    size: u64,
    device: &str,
    warn: &mut dyn FnMut(&str),
) -> Result<(Opened, Vec<String>)> {
    match relocate::plan(o.source.as_ref(), size)? {
        Ok(Some(rel)) => {
            let source = Box::new(relocate::Relocated::new(o.source, size, rel.patches)?);
            Ok((
                Opened {
                    source,
                    info: o.info,
                },
                rel.changes,
            ))
        }
        Ok(None) => Ok((o, Vec::new())),
        Err(why) => {
            warn(&format!(
                "{device}: --relocate-gpt: {why}; the disk is copied as it is"
            ));
            Ok((o, Vec::new()))
        }
    }
}

/// Sum of a source's Data extents: the bytes a copy reads.
pub(crate) fn data_bytes(src: &dyn BlockSource) -> Result<u64> {
    let size = src.virtual_size();
    let (mut pos, mut data) = (0u64, 0u64);
    while pos < size {
        let e = src.extent(pos, size - pos)?;
        if e.len == 0 {
            break;
        }
        if e.kind == ExtentKind::Data {
            data += e.len;
        }
        pos = e.end();
    }
    Ok(data)
}
