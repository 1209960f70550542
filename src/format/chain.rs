//! Backing chains: the files one source reads, overlay first, whatever their formats. Every format
//! that names a backing (parent) file opens it through [`open_backing`], so loops, depth and the
//! backing gate are checked in one place and any format may back any other.

use crate::format::input::Input;
use std::path::{Path, PathBuf};

use super::gate::BackingGate;
use super::{BlockSource, ChainEntry, Format, MAX_CHAIN_DEPTH};
use crate::error::{Error, Result};

/// The files of a chain opened so far.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    files: Vec<ChainEntry>,
    /// Canonical paths, to refuse loops.
    seen: Vec<PathBuf>,
}

impl Chain {
    pub(crate) fn new() -> Chain {
        Chain::default()
    }

    /// Records a file of the chain: refuses loops and chains deeper than [`MAX_CHAIN_DEPTH`].
    pub(crate) fn note(&mut self, path: &Path, format: Format) -> Result<()> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if self.seen.contains(&canon) {
            return Err(Error::corrupt(
                path,
                format!(
                    "backing chain loop: {} is reached again through its own backing chain",
                    canon.display()
                ),
            ));
        }
        if self.files.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(
                path,
                format!(
                    "the backing chain is deeper than {MAX_CHAIN_DEPTH} files (this file would be number {}); flatten it first with `qemu-img convert`",
                    self.files.len() + 1
                ),
            ));
        }
        self.seen.push(canon);
        self.files.push(ChainEntry {
            path: path.to_path_buf(),
            format,
        });
        Ok(())
    }

    /// The file the user named (the chain's first), once recorded: backing names resolve
    /// against its directory tree in the gate.
    pub(crate) fn top(&self) -> Option<&Path> {
        self.files.first().map(|c| c.path.as_path())
    }

    /// Files recorded so far.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// Every file read, overlay first.
    pub(crate) fn into_files(self) -> Vec<ChainEntry> {
        self.files
    }
}

/// Opens the backing file `name` that `overlay` names (in `format` when the overlay says, detected
/// from content otherwise): through the gate (local, regular, inside an allowed directory), then as
/// one more layer of `chain` by its format's driver.
pub(crate) fn open_backing(
    overlay: &Path,
    name: &[u8],
    format: Option<&str>,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<Box<dyn BlockSource>> {
    let shown = String::from_utf8_lossy(name).into_owned();
    if chain.files.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(
            overlay,
            format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} files (backing file '{shown}' would be number {}); flatten it first with `qemu-img convert`",
                chain.files.len() + 1
            ),
        ));
    }
    let top = chain.top().unwrap_or(overlay);
    let (bpath, file) = gate.open(top, overlay, name)?;
    let fmt = match format {
        Some(f) => Format::parse(f).ok_or_else(|| {
            Error::unsupported(
                overlay,
                format!(
                    "backing file format '{f}' is not supported (kiln reads {})",
                    super::readable_list()
                ),
            )
        })?,
        None => super::detect(&file, &bpath)?,
    };
    open_layer_as(fmt, file, &bpath, chain, gate)
}

/// Opens `file` (already through the gate) as one layer of `chain` in `format`, through the
/// registry.
pub(crate) fn open_layer_as(
    format: Format,
    file: Input,
    path: &Path,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<Box<dyn BlockSource>> {
    let read = format.reader()?;
    (read.open_layer)(file, path, chain, gate)
}
