//! One VHDX file of a chain: `pread`s through the overlay of a replayed log, bounded reads of
//! structures, and the errors that name the file.

use crate::format::input::{Input, RandomRead};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};
use crate::format;

/// Log sectors are 4 KiB.
pub(super) const LOG_SECTOR: u64 = 4096;

/// What a replayed log changed: whole 4 KiB sectors and zeroed ranges, in memory only. A data
/// sector is always newer than a zero range that covers it (a later zero range removes it).
#[derive(Default)]
pub(super) struct Overlay {
    sectors: BTreeMap<u64, Box<[u8]>>,
    zeros: Vec<(u64, u64)>,
}

impl Overlay {
    pub(super) fn is_empty(&self) -> bool {
        self.sectors.is_empty() && self.zeros.is_empty()
    }

    /// A 4 KiB sector written at `offset` (4 KiB aligned).
    pub(super) fn put(&mut self, offset: u64, sector: Box<[u8]>) {
        self.sectors.insert(offset, sector);
    }

    /// `len` bytes zeroed at `offset` (both 4 KiB multiples).
    pub(super) fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let covered: Vec<u64> = self.sectors.range(offset..end).map(|(k, _)| *k).collect();
        for k in covered {
            self.sectors.remove(&k);
        }
        self.zeros.push((offset, end));
    }

    /// End of the last data sector (0 when none).
    pub(super) fn data_end(&self) -> u64 {
        self.sectors
            .keys()
            .next_back()
            .map_or(0, |k| k + LOG_SECTOR)
    }

    /// Applies the overlay to `buf`, which holds the file's bytes at `offset`.
    fn apply(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for &(zs, ze) in &self.zeros {
            let (s, e) = (zs.max(offset), ze.min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize].fill(0);
            }
        }
        let first = offset - offset % LOG_SECTOR;
        for (&at, sector) in self.sectors.range(first..end) {
            let (s, e) = (at.max(offset), (at + LOG_SECTOR).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&sector[(s - at) as usize..(e - at) as usize]);
            }
        }
    }
}

/// An opened VHDX file.
pub(super) struct VhdxFile {
    pub(super) file: Input,
    pub(super) path: PathBuf,
    /// The file's length on disk.
    pub(super) disk_len: u64,
    /// Its length once the log is replayed (never less than `disk_len`); every structure and
    /// payload block must lie below it.
    pub(super) len: u64,
    pub(super) overlay: Overlay,
}

impl VhdxFile {
    pub(super) fn new(file: Input, path: &Path) -> Result<VhdxFile> {
        let disk_len = file.len().map_err(|e| Error::io(path, "sizing", e))?;
        Ok(VhdxFile {
            file,
            path: path.to_path_buf(),
            disk_len,
            len: disk_len,
            overlay: Overlay::default(),
        })
    }

    /// Takes a replayed log's overlay; the file's length grows to cover its sectors.
    pub(super) fn set_overlay(&mut self, overlay: Overlay) {
        self.len = self.disk_len.max(overlay.data_end());
        self.overlay = overlay;
    }

    pub(super) fn corrupt(&self, what: impl fmt::Display) -> Error {
        Error::corrupt(&self.path, what)
    }

    pub(super) fn unsupported(&self, what: impl fmt::Display) -> Error {
        Error::unsupported(&self.path, what)
    }

    /// Fills `buf` from `offset` as the replayed file holds it. Past the end of the file on disk
    /// (a file the log grew) reads zeros; past [`VhdxFile::len`] is an error naming `what`.
    pub(super) fn read_into(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(self.corrupt(format_args!(
                "{what} ({} bytes at offset {offset}) runs past the end of the file ({} bytes)",
                buf.len(),
                self.len
            )));
        }
        let on_disk = self.disk_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let n = format::read_full_at(&self.file, &mut buf[..on_disk], offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("reading {what} ({} bytes at offset {offset})", buf.len()),
                e,
            )
        })?;
        if n < on_disk {
            return Err(Error::new(
                Code::SourceChanged,
                format!(
                    "{}: file ended at offset {} while reading at {offset}; it shrank while being read",
                    self.path.display(),
                    offset + n as u64
                ),
            ));
        }
        buf[on_disk..].fill(0);
        if !self.overlay.is_empty() {
            self.overlay.apply(offset, buf);
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (callers bound `len`).
    pub(super) fn read_vec(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf, what)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_zero_ranges_remove_earlier_sectors_and_later_sectors_win() {
        let mut o = Overlay::default();
        o.put(4096, vec![1u8; 4096].into());
        o.zero(0, 8192);
        o.put(0, vec![2u8; 4096].into());
        let mut buf = vec![9u8; 12288];
        o.apply(0, &mut buf);
        assert!(buf[..4096].iter().all(|&b| b == 2));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 9));
        let mut part = vec![9u8; 100];
        o.apply(4000, &mut part);
        assert!(part[..96].iter().all(|&b| b == 2));
        assert!(part[96..].iter().all(|&b| b == 0));
        assert_eq!(o.data_end(), 4096);
    }
}
