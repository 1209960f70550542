//! Raw output with `--encrypt`: a LUKS volume. The header (LUKS1 by default, LUKS2 with
//! `--luks-version 2`) goes first, then the payload, every sector of it ciphertext: the engine's
//! non-zero blocks are encrypted in its parallel prepare step, and [`LuksWriter::finish`] encrypts
//! the zeros of every block it did not write, in parallel. So the cost follows the virtual size,
//! not the data, and the file is dense.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use super::crypto::{SectorCipher, SECTOR};
use super::{luks1, luks2, Secret, Unlocked};
use crate::error::{Code, Error, Result};
use crate::format::writer::RAW_BLOCK;
use crate::format::writer::{DiskWriter, Finished};

/// Bytes of the payload encrypted per piece (the prepare unit and the zero-fill batch).
const PIECE: u64 = 1 << 20;
/// The payload starts at 2 MiB in a LUKS1 volume kiln writes (cryptsetup's 1 MiB alignment, past
/// the 2 MiB of header and key material).
const LUKS1_PAYLOAD_SECTORS: u32 = 4096;

pub(crate) struct LuksWriter {
    file: File,
    path: PathBuf,
    payload: u64,
    virtual_size: u64,
    cipher: SectorCipher,
    /// Guest ranges written, as (start, end).
    written: Mutex<Vec<(u64, u64)>>,
}

/// A new LUKS volume's header area and master key: LUKS1 or LUKS2.
pub(crate) fn new_volume(key: &Secret, luks_version: u8) -> Result<(Vec<u8>, Unlocked)> {
    match luks_version {
        1 => {
            let c = luks1::create(key.bytes(), Some(LUKS1_PAYLOAD_SECTORS))?;
            Ok((c.header, c.unlocked))
        }
        2 => luks2::create(key.bytes()),
        v => Err(Error::new(
            Code::InvalidParameter,
            format!("--luks-version {v}: kiln writes LUKS versions 1 and 2"),
        )),
    }
}

impl LuksWriter {
    /// Writes the header of a new volume into `file` (new, empty) and sizes the payload to
    /// `virtual_size` bytes (a multiple of 512).
    pub(crate) fn create(
        file: File,
        path: &Path,
        virtual_size: u64,
        key: &Secret,
        luks_version: u8,
    ) -> Result<LuksWriter> {
        if !virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: an encrypted disk's size must be whole 512-byte sectors",
                    path.display()
                ),
            ));
        }
        let (header, u) = new_volume(key, luks_version)?;
        file.write_all_at(&header, 0)
            .map_err(|e| Error::io(path, "writing the LUKS header", e))?;
        let len = u.payload_offset + virtual_size;
        file.set_len(len)
            .map_err(|e| Error::io(path, &format!("setting the length to {len} bytes"), e))?;
        Ok(LuksWriter {
            file,
            path: path.to_path_buf(),
            payload: u.payload_offset,
            virtual_size,
            cipher: u.cipher,
            written: Mutex::new(Vec::new()),
        })
    }

    fn write(&self, host: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, host).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {} bytes at offset {host}", data.len()),
                e,
            )
        })
    }

    /// The guest ranges nobody wrote, in order.
    fn gaps(&self) -> Vec<(u64, u64)> {
        let mut w = std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()));
        w.sort_unstable();
        let mut gaps = Vec::new();
        let mut pos = 0;
        for (s, e) in w {
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(e);
        }
        if pos < self.virtual_size {
            gaps.push((pos, self.virtual_size));
        }
        gaps
    }
}

impl DiskWriter for LuksWriter {
    fn block_size(&self) -> u64 {
        RAW_BLOCK
    }

    fn prepare_unit(&self) -> Option<u64> {
        Some(PIECE)
    }

    fn prepare_at(&self, guest_offset: u64, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        out.clear();
        out.extend_from_slice(data);
        self.cipher.encrypt(out, guest_offset / SECTOR);
        Ok(true)
    }

    fn in_guest_order(&self) -> bool {
        false
    }

    /// Never called: every piece is prepared (encrypted).
    fn allocate(&self, guest_offset: u64, _len: u64) -> Result<u64> {
        Err(Error::new(
            Code::Internal,
            format!("unencrypted data at guest offset {guest_offset} for an encrypted output"),
        ))
    }

    fn allocate_prepared(&self, guest_offset: u64, stored_len: usize) -> Result<u64> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((guest_offset, guest_offset + stored_len as u64));
        Ok(self.payload + guest_offset)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        self.write(host_offset, data)
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// Encrypts the zeros of every range not written, in parallel.
    fn finish(self: Box<Self>) -> Result<Finished> {
        let pieces: Vec<(u64, u64)> = self
            .gaps()
            .into_iter()
            .flat_map(|(s, e)| {
                (s..e)
                    .step_by(PIECE as usize)
                    .map(move |p| (p, (p + PIECE).min(e)))
            })
            .collect();
        pieces.par_iter().try_for_each_init(
            || vec![0u8; PIECE as usize],
            |buf, &(s, e)| {
                let b = &mut buf[..(e - s) as usize];
                b.fill(0);
                self.cipher.encrypt(b, s / SECTOR);
                self.write(self.payload + s, b)
            },
        )?;
        Ok(Finished { file: self.file })
    }
}
