//! Raw output: the guest disk is the file. Blocks are written at their guest offsets in any
//! order, and the holes left between them are the disk's zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::writer::{DiskWriter, Finished};
use crate::format::OutputSpec;

use crate::format::writer::RAW_BLOCK;

pub(crate) struct RawWriter {
    file: File,
    path: PathBuf,
}

impl RawWriter {
    /// Sizes `file` (new, empty) to `virtual_size` bytes: one hole until data is written.
    pub(crate) fn create(file: File, path: &Path, virtual_size: u64) -> Result<Self> {
        file.set_len(virtual_size).map_err(|e| {
            Error::io(
                path,
                &format!("setting the length to {virtual_size} bytes"),
                e,
            )
        })?;
        Ok(RawWriter {
            file,
            path: path.to_path_buf(),
        })
    }
}

/// The registry's constructor.
pub(crate) fn create(
    file: File,
    path: &Path,
    virtual_size: u64,
    spec: &OutputSpec,
) -> Result<Box<dyn DiskWriter>> {
    if let Some(enc) = &spec.encryption {
        return Ok(Box::new(crate::format::luks::writer::LuksWriter::create(
            file,
            path,
            virtual_size,
            &enc.key,
            enc.luks_version,
        )?));
    }
    Ok(Box::new(RawWriter::create(file, path, virtual_size)?))
}

impl DiskWriter for RawWriter {
    fn block_size(&self) -> u64 {
        RAW_BLOCK
    }

    fn in_guest_order(&self) -> bool {
        false
    }

    /// Host and guest offsets are the same.
    fn allocate(&self, guest_offset: u64, _len: u64) -> Result<u64> {
        Ok(guest_offset)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, host_offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {} bytes at offset {host_offset}", data.len()),
                e,
            )
        })
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// `write_at` is a plain `pwrite` at the guest offset.
    fn direct_writes(&self) -> bool {
        true
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        Ok(Finished { file: self.file })
    }
}
