//! A writer for fresh dynamic VHDX files (version 1, 512-byte sectors, no parent, an empty log).
//!
//! Layout, as qemu-img lays its files out: the file type identifier, two headers (64 and 128 KiB),
//! two region tables (192 and 256 KiB), a 1 MiB log at 1 MiB (empty: its GUID is zero), the
//! metadata region at 2 MiB, the BAT at 3 MiB, then payload blocks in the order they are
//! allocated. Callers allocate in guest order, so the layout depends on the input alone. Blocks
//! nothing is written to stay NOT_PRESENT (they read as zeros); inside an allocated block, the
//! 4 KiB pieces that are zeros are never written and stay holes of the file.
//!
//! The headers' GUIDs (FileWriteGuid, DataWriteGuid) and the VirtualDiskId are derived from the
//! virtual size, the block size and a fingerprint of every piece written (a CRC-32 per 4 KiB, keyed
//! by its place and summed, so the order the threads write in does not matter): the same input
//! gives the same bytes, and never a random GUID.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{crc32c_with_zero_field, Guid, ALIGN, BAT_OFFSET_SHIFT, BAT_REGION, FILE_PARAMETERS};
use super::{HEADER_OFFSETS, HEADER_SIZE, LOGICAL_SECTOR_SIZE, MAX_BLOCK, METADATA_REGION};
use super::{MAX_VIRTUAL_SIZE, VIRTUAL_DISK_SIZE};
use super::{MIB, MIN_BLOCK, PAYLOAD_FULLY_PRESENT, PHYSICAL_SECTOR_SIZE, REGION_OFFSETS};
use super::{REGION_TABLE_SIZE, SECTORS_PER_BITMAP, SIGNATURE, VIRTUAL_DISK_ID};
use crate::error::{Code, Error, Result};
use crate::format::writer::{DiskWriter, Finished};
use crate::format::OutputSpec;

/// Zero-detection granularity: zero 4 KiB pieces of a block are left as holes.
const PIECE: u64 = 4096;
const SECTOR: u64 = 512;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;

/// The disk size a virtual size gets: whole 512-byte logical sectors.
pub(crate) fn disk_size(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(SECTOR).saturating_mul(SECTOR)
}

/// qemu-img's block size for a disk of `size` bytes (`vhdx_create`): 8 MiB up to 1 GiB, 16 MiB up
/// to 100 GiB, 32 MiB up to 32 TiB, 64 MiB beyond.
fn default_block_size(size: u64) -> u64 {
    match size {
        s if s > 32 << 40 => 64 * MIB,
        s if s > 100 << 30 => 32 * MIB,
        s if s > 1 << 30 => 16 * MIB,
        _ => 8 * MIB,
    }
}

/// `-o block_size=`: a number of bytes, or a size with a unit (`32M`).
fn block_size_option(spec: &OutputSpec, virtual_size: u64) -> Result<u64> {
    let Some((_, v)) = spec.options.iter().find(|(k, _)| k == "block_size") else {
        return Ok(default_block_size(virtual_size));
    };
    let bytes = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse::<u64>().ok()
    } else {
        crate::util::size::parse_size(v).ok()
    };
    match bytes {
        Some(b) if b.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&b) => Ok(b),
        _ => Err(Error::new(
            Code::InvalidParameter,
            format!("-o block_size={v}: a VHDX block size is a power of two from 1M to 256M"),
        )),
    }
}

/// The registry's constructor.
pub(crate) fn create(
    file: File,
    path: &Path,
    virtual_size: u64,
    spec: &OutputSpec,
) -> Result<Box<dyn DiskWriter>> {
    let block_size = block_size_option(spec, virtual_size)?;
    Ok(Box::new(VhdxWriter::create(
        file,
        path,
        virtual_size,
        block_size,
    )?))
}

struct Alloc {
    /// Next free host offset (block aligned).
    next: u64,
    /// (guest block, host offset) of every allocated block, in guest order.
    blocks: Vec<(u64, u64)>,
}

pub(crate) struct VhdxWriter {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    block_size: u64,
    data_blocks: u64,
    chunk_ratio: u64,
    bat_length: u64,
    alloc: Mutex<Alloc>,
    /// Order-independent fingerprint of the pieces written (for the GUIDs).
    fingerprint: AtomicU64,
}

impl VhdxWriter {
    pub(crate) fn create(
        file: File,
        path: &Path,
        virtual_size: u64,
        block_size: u64,
    ) -> Result<VhdxWriter> {
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(SECTOR)
        {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: virtual size {virtual_size} is not a multiple of 512 bytes from 512 bytes to 64 TiB",
                    path.display()
                ),
            ));
        }
        let data_blocks = virtual_size.div_ceil(block_size);
        let chunk_ratio = SECTORS_PER_BITMAP * SECTOR / block_size;
        let entries = data_blocks + (data_blocks - 1) / chunk_ratio;
        let bat_length = (entries * 8).div_ceil(ALIGN) * ALIGN;
        Ok(VhdxWriter {
            file,
            path: path.to_path_buf(),
            virtual_size,
            block_size,
            data_blocks,
            chunk_ratio,
            bat_length,
            alloc: Mutex::new(Alloc {
                next: BAT_OFFSET + bat_length,
                blocks: Vec::new(),
            }),
            fingerprint: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn internal(&self, what: String) -> Error {
        Error::new(Code::Internal, format!("{}: {what}", self.path.display()))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {} bytes at offset {offset}", data.len()),
                e,
            )
        })
    }

    /// A GUID derived from the disk's size, block size and contents, distinct per `label`.
    fn derived_guid(&self, label: &str) -> Guid {
        let mut h = Sha256::new();
        h.update(b"kiln vhdx\0");
        h.update(label.as_bytes());
        h.update(self.virtual_size.to_le_bytes());
        h.update(self.block_size.to_le_bytes());
        h.update(self.fingerprint.load(Ordering::Relaxed).to_le_bytes());
        let d = h.finalize();
        let mut g = [0u8; 16];
        g.copy_from_slice(&d[..16]);
        // Version 5 (name-based, SHA), RFC 4122 variant; field 3 is stored little-endian.
        g[7] = (g[7] & 0x0f) | 0x50;
        g[8] = (g[8] & 0x3f) | 0x80;
        g
    }

    fn header(&self, sequence: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.derived_guid("file write"));
        b[32..48].copy_from_slice(&self.derived_guid("data write"));
        // LogGuid (48..64) zero: the log is empty. LogVersion 0, Version 1.
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&(LOG_LENGTH as u32).to_le_bytes());
        b[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
        let crc = crc32c_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn region_table(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let regions = [
            (BAT_REGION, BAT_OFFSET, self.bat_length),
            (METADATA_REGION, METADATA_OFFSET, METADATA_LENGTH),
        ];
        for (i, (id, offset, length)) in regions.iter().enumerate() {
            let e = 16 + 32 * i;
            b[e..e + 16].copy_from_slice(id);
            b[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&(*length as u32).to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        let crc = crc32c_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The metadata table and its items (flags as the specification gives them: IsRequired,
    /// plus IsVirtualDisk for the disk's own properties).
    fn metadata(&self) -> Vec<u8> {
        let mut params = (self.block_size as u32).to_le_bytes().to_vec();
        params.extend_from_slice(&0u32.to_le_bytes());
        let items: [(Guid, Vec<u8>, u32); 5] = [
            (FILE_PARAMETERS, params, 4),
            (
                VIRTUAL_DISK_SIZE,
                self.virtual_size.to_le_bytes().to_vec(),
                6,
            ),
            (VIRTUAL_DISK_ID, self.derived_guid("disk id").to_vec(), 6),
            (LOGICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec(), 6),
            (PHYSICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec(), 6),
        ];
        let mut b = vec![0u8; 64 * 1024 + 64];
        b[0..8].copy_from_slice(b"metadata");
        b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut at = 64 * 1024;
        for (i, (id, value, flags)) in items.iter().enumerate() {
            let e = 32 + 32 * i;
            b[e..e + 16].copy_from_slice(id);
            b[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
            b[e + 20..e + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
            b[at..at + value.len()].copy_from_slice(value);
            at += value.len();
        }
        b
    }

    /// Writes the BAT: FULLY_PRESENT for allocated blocks, NOT_PRESENT (zero) elsewhere, a
    /// megabyte of entries at a time.
    fn write_bat(&self, blocks: &[(u64, u64)]) -> Result<()> {
        const PER_WRITE: usize = (MIB / 8) as usize;
        let mut bat = vec![0u64; PER_WRITE];
        let mut it = blocks.iter().peekable();
        let entries = self.data_blocks + (self.data_blocks - 1) / self.chunk_ratio;
        let mut index = 0u64;
        while index < entries {
            let n = (entries - index).min(PER_WRITE as u64) as usize;
            bat[..n].fill(0);
            while let Some(&&(block, host)) = it.peek() {
                let i = block + block / self.chunk_ratio;
                if i >= index + n as u64 {
                    break;
                }
                bat[(i - index) as usize] =
                    PAYLOAD_FULLY_PRESENT | ((host / ALIGN) << BAT_OFFSET_SHIFT);
                it.next();
            }
            let bytes: Vec<u8> = bat[..n].iter().flat_map(|e| e.to_le_bytes()).collect();
            self.write(BAT_OFFSET + index * 8, &bytes)?;
            index += n as u64;
        }
        Ok(())
    }
}

impl DiskWriter for VhdxWriter {
    fn block_size(&self) -> u64 {
        PIECE
    }

    fn in_guest_order(&self) -> bool {
        true
    }

    /// Allocates the blocks `[guest_offset, guest_offset + len)` touches that have no place yet
    /// (in guest order, so a run's blocks are contiguous in the file).
    fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64> {
        let bs = self.block_size;
        let end = guest_offset
            .checked_add(len)
            .filter(|&e| e <= self.virtual_size);
        let Some(end) = end.filter(|_| len > 0) else {
            return Err(self.internal(format!(
                "allocation of {len} bytes at guest offset {guest_offset} passes the end"
            )));
        };
        let (b0, b1) = (guest_offset / bs, (end - 1) / bs);
        let mut a = self.lock();
        let mut first = None;
        for b in b0..=b1 {
            let host = match a.blocks.binary_search_by_key(&b, |&(g, _)| g) {
                Ok(i) => a.blocks[i].1,
                Err(i) if i == a.blocks.len() => {
                    let h = a.next;
                    a.next += bs;
                    a.blocks.push((b, h));
                    h
                }
                Err(_) => {
                    return Err(self.internal(format!("block {b} allocated out of guest order")))
                }
            };
            let want = *first.get_or_insert(host) + (b - b0) * bs;
            if host != want {
                return Err(
                    self.internal(format!("blocks {b0}..={b1} are not contiguous in the file"))
                );
            }
        }
        Ok(first.unwrap_or(0) + guest_offset % bs)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        self.write(host_offset, data)?;
        let mut sum = 0u64;
        for (i, piece) in data.chunks(PIECE as usize).enumerate() {
            let at = host_offset + i as u64 * PIECE;
            let key = (at << 8) ^ u64::from(crc32fast::hash(piece)).rotate_left(40);
            // splitmix64's finaliser: a well-mixed 64-bit value per piece.
            let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            sum = sum.wrapping_add(z ^ (z >> 31));
        }
        self.fingerprint.fetch_add(sum, Ordering::Relaxed);
        Ok(())
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        let (next, blocks) = {
            let mut a = self.lock();
            (a.next, std::mem::take(&mut a.blocks))
        };
        self.file.set_len(next).map_err(|e| {
            Error::io(
                &self.path,
                &format!("setting the length to {next} bytes"),
                e,
            )
        })?;
        let mut ident = SIGNATURE.to_vec();
        ident.extend("kiln".encode_utf16().flat_map(u16::to_le_bytes));
        self.write(0, &ident)?;
        for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
            self.write(off, &self.header(i as u64 + 1))?;
        }
        let table = self.region_table();
        for &off in &REGION_OFFSETS {
            self.write(off, &table)?;
        }
        self.write(METADATA_OFFSET, &self.metadata())?;
        self.write_bat(&blocks)?;
        Ok(Finished { file: self.file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_sizes_follow_qemu_img() {
        assert_eq!(default_block_size(512 << 20), 8 * MIB);
        assert_eq!(default_block_size(1 << 30), 8 * MIB);
        assert_eq!(default_block_size(2 << 30), 16 * MIB);
        assert_eq!(default_block_size(100 << 30), 16 * MIB);
        assert_eq!(default_block_size(101 << 30), 32 * MIB);
        assert_eq!(default_block_size(33 << 40), 64 * MIB);
    }

    #[test]
    fn runs_get_contiguous_blocks_in_guest_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.vhdx");
        let f = File::create(&p).unwrap();
        let w = VhdxWriter::create(f, &p, 16 * MIB, MIB).unwrap();
        let start = BAT_OFFSET + MIB;
        assert_eq!(w.allocate(MIB + 4096, 4096).unwrap(), start + 4096);
        // A run across blocks 1..=3: block 1 is placed, 2 and 3 follow it.
        assert_eq!(w.allocate(MIB + 8192, 2 * MIB).unwrap(), start + 8192);
        assert_eq!(w.allocate(3 * MIB, 4096).unwrap(), start + 2 * MIB);
        let e = w.allocate(0, 4096).unwrap_err();
        assert_eq!(e.code(), Code::Internal);
    }
}
