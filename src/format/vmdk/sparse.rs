//! One hosted sparse extent (monolithicSparse, streamOptimized, or one file of a
//! twoGbMaxExtentSparse disk): the header (the footer's copy for a streamOptimized file whose
//! header says [`GD_AT_END`]), the grain directory (read whole on open, bounded), grain tables (read
//! on demand into a bounded cache) and grains, stored as they are or zlib-compressed behind a
//! grain marker.

use crate::format::input::{Input, RandomRead};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress, Status};

use super::descriptor::{self, Descriptor};
use super::header::*;
use crate::error::{Error, Result};
use crate::format::{self, ExtentKind};

/// Grain tables kept in the cache (each at most 2 KiB: 8 MiB in all).
const MAX_CACHED_GTS: usize = 4096;
/// Grain-table steps one call to [`SparseExtent::run`] takes before returning a shorter run.
const MAX_WALK_STEPS: usize = 1 << 16;
/// A grain table entry that means "this grain reads as zeros" (with [`FLAG_ZERO_GRAIN`]).
const GTE_ZEROED: u32 = 1;

pub(crate) struct SparseExtent {
    file: Input,
    path: PathBuf,
    file_size: u64,
    pub(crate) header: SparseHeader,
    /// Grain size in bytes.
    pub(crate) grain: u64,
    /// Guest bytes this extent holds.
    pub(crate) capacity: u64,
    gd: Vec<u32>,
    gts: Mutex<HashMap<u32, Arc<[u32]>>>,
    /// The embedded descriptor, when the header points at one.
    pub(crate) descriptor: Option<Descriptor>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl SparseExtent {
    /// Reads and checks the header (and footer), the embedded descriptor and the grain directory.
    pub(crate) fn open(file: Input, path: &Path) -> Result<SparseExtent> {
        let file_size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
        let head = read_sector(&file, path, 0, "the sparse extent header")?;
        let (magic, mut header) = SparseHeader::decode(&head);
        header.validate(magic, path, file_size)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(&file, path, file_size)?;
        }
        let descriptor = if header.descriptor_offset != 0 {
            let text = read_exact(
                &file,
                path,
                header.descriptor_offset * SECTOR,
                (header.descriptor_size * SECTOR) as usize,
                "the embedded descriptor",
            )?;
            Some(descriptor::parse(&text, path)?)
        } else {
            None
        };
        let entries = header.gd_entries() as usize;
        let raw = read_exact(
            &file,
            path,
            header.gd_offset * SECTOR,
            entries * 4,
            "the grain directory (gdOffset)",
        )?;
        let gd = (0..entries).map(|i| le32(&raw, i * 4)).collect();
        Ok(SparseExtent {
            file,
            path: path.to_path_buf(),
            file_size,
            grain: header.grain_size * SECTOR,
            capacity: header.capacity * SECTOR,
            header,
            gd,
            gts: Mutex::new(HashMap::new()),
            descriptor,
        })
    }

    fn gtes(&self) -> u64 {
        u64::from(self.header.num_gtes_per_gt)
    }

    /// The grain table at GD index `gdi` (its GD entry non-zero), from the cache or the file.
    fn table(&self, gdi: usize, sector: u32) -> Result<Arc<[u32]>> {
        let mut cache = self.gts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&sector) {
            return Ok(t.clone());
        }
        let n = self.gtes() as usize;
        let raw = read_exact(
            &self.file,
            &self.path,
            u64::from(sector) * SECTOR,
            n * 4,
            &format!("grain table {gdi} (grain directory entry {sector})"),
        )?;
        let t: Arc<[u32]> = (0..n).map(|i| le32(&raw, i * 4)).collect();
        if cache.len() >= MAX_CACHED_GTS {
            cache.clear();
        }
        cache.insert(sector, t.clone());
        Ok(t)
    }

    /// The grain table entry of grain `gi`; None when its whole grain table is absent.
    fn entry(&self, gi: u64) -> Result<Option<u32>> {
        let gdi = (gi / self.gtes()) as usize;
        let Some(&sector) = self.gd.get(gdi) else {
            return Err(Error::corrupt(
                &self.path,
                format!("grain {gi} is past the grain directory"),
            ));
        };
        if sector == 0 {
            return Ok(None);
        }
        let t = self.table(gdi, sector)?;
        Ok(Some(t[(gi % self.gtes()) as usize]))
    }

    fn classify(&self, gi: u64, entry: u32) -> Result<ExtentKind> {
        if entry == 0 {
            return Ok(ExtentKind::Unallocated);
        }
        if entry == GTE_ZEROED && self.header.flags & FLAG_ZERO_GRAIN != 0 {
            return Ok(ExtentKind::Zero);
        }
        if u64::from(entry) * SECTOR >= self.file_size {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "grain table entry of grain {gi} (guest offset {}) points at sector {entry}, past the end of the file",
                    gi * self.grain
                ),
            ));
        }
        Ok(ExtentKind::Data)
    }

    /// The kind of the run at `offset` (< capacity) and its length, at most `max_len`.
    pub(crate) fn run(&self, offset: u64, max_len: u64) -> Result<(ExtentKind, u64)> {
        let limit = self.capacity.min(offset.saturating_add(max_len));
        let mut pos = offset;
        let mut kind = None;
        for _ in 0..MAX_WALK_STEPS {
            if pos >= limit {
                break;
            }
            let gi = pos / self.grain;
            let (k, end) = match self.entry(gi)? {
                None => (
                    ExtentKind::Unallocated,
                    (gi / self.gtes() + 1) * self.gtes() * self.grain,
                ),
                Some(e) => (self.classify(gi, e)?, (gi + 1) * self.grain),
            };
            match kind {
                None => kind = Some(k),
                Some(x) if x != k => break,
                _ => {}
            }
            pos = end.min(limit);
        }
        Ok((kind.unwrap_or(ExtentKind::Unallocated), pos - offset))
    }

    /// Reads guest bytes at `offset` of this extent; every grain touched must be allocated data
    /// (as [`SparseExtent::run`] said).
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        let mut grain_buf = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let gi = pos / self.grain;
            let within = pos % self.grain;
            let n = ((self.grain - within) as usize).min(buf.len() - done);
            let entry = self.entry(gi)?.unwrap_or(0);
            if self.classify(gi, entry)? != ExtentKind::Data {
                buf[done..done + n].fill(0);
            } else if self.header.markers() {
                self.inflate(gi, entry, &mut grain_buf)?;
                buf[done..done + n]
                    .copy_from_slice(&grain_buf[within as usize..within as usize + n]);
            } else {
                let at = u64::from(entry) * SECTOR + within;
                let got = format::read_full_at(&self.file, &mut buf[done..done + n], at).map_err(
                    |e| Error::io(&self.path, &format!("reading a grain at offset {at}"), e),
                )?;
                if got < n {
                    return Err(Error::corrupt(
                        &self.path,
                        format!("grain {gi} at sector {entry} runs past the end of the file"),
                    ));
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads the compressed grain `gi` at sector `entry` into `out` (one grain, zero-padded).
    fn inflate(&self, gi: u64, entry: u32, out: &mut Vec<u8>) -> Result<()> {
        let at = u64::from(entry) * SECTOR;
        let m = read_exact(
            &self.file,
            &self.path,
            at,
            GRAIN_MARKER_BYTES,
            "a grain marker",
        )?;
        let (lba, size) = grain_marker(&m);
        let corrupt = |what: String| {
            Error::corrupt(&self.path, format!("grain {gi} at sector {entry}: {what}"))
        };
        if lba != gi * self.header.grain_size {
            return Err(corrupt(format!(
                "its grain marker's lba {lba} is not the grain's sector {}",
                gi * self.header.grain_size
            )));
        }
        // Deflate can grow incompressible data (zlib's level 1 by up to ~6% with its static
        // trees, which kiln's own writer uses); qemu reads a compressed grain into a buffer of
        // twice the grain, so that is the bound here too.
        let max = 2 * self.grain + 1024;
        if size == 0 || u64::from(size) > max {
            return Err(corrupt(format!(
                "its grain marker's size {size} is not between 1 and {max} bytes"
            )));
        }
        let data = read_exact(
            &self.file,
            &self.path,
            at + GRAIN_MARKER_BYTES as u64,
            size as usize,
            "compressed grain data (grain marker size)",
        )?;
        out.clear();
        out.resize(self.grain as usize, 0);
        let mut z = Decompress::new(true);
        let status = z.decompress(&data, out, FlushDecompress::Finish);
        let produced = z.total_out();
        let needed = self.grain.min(self.capacity - gi * self.grain);
        match status {
            Ok(Status::StreamEnd) if produced >= needed => Ok(()),
            Ok(_) => Err(corrupt(format!(
                "its compressed data inflates to {produced} bytes or more than a grain ({} bytes)",
                self.grain
            ))),
            Err(e) => Err(corrupt(format!(
                "its compressed data is not a zlib stream ({e})"
            ))),
        }
    }
}

/// The footer of a streamOptimized file: a footer marker, a copy of the header with the real
/// gdOffset, and the end-of-stream marker, in its last three sectors.
fn read_footer(file: &dyn RandomRead, path: &Path, file_size: u64) -> Result<SparseHeader> {
    if file_size < 4 * SECTOR {
        return Err(Error::corrupt(
            path,
            "gdOffset says the grain directory is in the footer, but the file is too short for one",
        ));
    }
    let at = file_size / SECTOR * SECTOR - 3 * SECTOR;
    let b = read_exact(file, path, at, 3 * SECTOR as usize, "the footer")?;
    if metadata_marker(&b[0..512]).is_none_or(|(_, t)| t != MARKER_FOOTER) {
        return Err(Error::corrupt(
            path,
            format!("no footer marker at offset {at} (gdOffset is GD_AT_END)"),
        ));
    }
    if metadata_marker(&b[1024..1536]) != Some((0, MARKER_EOS)) {
        return Err(Error::corrupt(
            path,
            format!("no end-of-stream marker at offset {}", at + 1024),
        ));
    }
    let (magic, footer) =
        SparseHeader::decode(&read_sector(file, path, at + SECTOR, "the footer")?);
    if footer.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            path,
            "the footer's gdOffset is GD_AT_END too",
        ));
    }
    footer
        .validate(magic, path, file_size)
        .map_err(|e| Error::new(e.code(), format!("{} (in the footer)", e.message())))?;
    Ok(footer)
}

/// Reads exactly `len` bytes at `offset`; a short read means the file is truncated.
pub(crate) fn read_exact(
    file: &dyn RandomRead,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = format::read_full_at(file, &mut buf, offset)
        .map_err(|e| Error::io(path, &format!("reading {what}"), e))?;
    if n < len {
        return Err(Error::corrupt(
            path,
            format!("{what} at offset {offset} runs past the end of the file"),
        ));
    }
    Ok(buf)
}

/// One sector (a header) at `offset`.
fn read_sector(
    file: &dyn RandomRead,
    path: &Path,
    offset: u64,
    what: &str,
) -> Result<[u8; HEADER_SIZE]> {
    let mut b = [0u8; HEADER_SIZE];
    let n = format::read_full_at(file, &mut b, offset)
        .map_err(|e| Error::io(path, &format!("reading {what}"), e))?;
    if n < HEADER_SIZE {
        return Err(Error::corrupt(
            path,
            format!("{what} at offset {offset} runs past the end of the file"),
        ));
    }
    Ok(b)
}
