//! One qcow2 file of a chain: its handle, its path and size, reads at host offsets (`pread` only,
//! so one file serves every copy thread) and the errors that name it.

use crate::format::input::{Input, RandomRead};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format;

/// A byte offset in the guest disk (the disk the image describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct GuestOffset(pub u64);

/// A byte offset in the image file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct HostOffset(pub u64);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An opened image file.
pub(super) struct ImageFile {
    pub(crate) file: Input,
    pub(crate) path: PathBuf,
    /// Its length when opened; every host offset is checked against it.
    pub(crate) size: u64,
}

impl ImageFile {
    pub(crate) fn new(file: Input, path: &Path) -> Result<ImageFile> {
        let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// A damaged image, at a guest offset.
    pub(crate) fn corrupt_at(&self, guest: GuestOffset, what: impl fmt::Display) -> Error {
        Error::corrupt(&self.path, format!("guest offset {guest}: {what}"))
    }

    /// Reads as much of `buf` as the file has at `host` (short only at the end of the file).
    pub(crate) fn read_at(&self, host: HostOffset, buf: &mut [u8]) -> std::io::Result<usize> {
        format::read_full_at(&self.file, buf, host.0)
    }
}

/// Reads exactly `len` bytes at `offset`; a short read means the file is truncated.
pub(crate) fn read_exact(
    file: &dyn RandomRead,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    read_exact_io(file, path, offset, len, what, &format!("reading {what}"))
}

/// [`read_exact`], with `io_what` saying what failed when the read itself fails.
pub(super) fn read_exact_io(
    file: &dyn RandomRead,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
    io_what: &str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n =
        format::read_full_at(file, &mut buf, offset).map_err(|e| Error::io(path, io_what, e))?;
    if n < len {
        return Err(Error::corrupt(
            path,
            format!("{what} at offset {offset} runs past the end of the file"),
        ));
    }
    Ok(buf)
}
