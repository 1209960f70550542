//! VDI (VirtualBox's Virtual Disk Image), read-only: static and dynamic images, version 1.1.
//!
//! Why not a crate: none on crates.io reads VDI with bounds on what the file claims; a disk format is
//! kiln's core, so it is written here from the layout qemu's `block/vdi.c` documents (qemu is the
//! test oracle). Undo and differencing images (parents named by UUID only) are refused.
//!
//! Layout: a 512-byte header at offset 0 (signature 0xbeda107f at 0x40), a block map of
//! `blocks_in_image` little-endian u32 entries at `offset_bmap`, blocks of `block_size` bytes at
//! `offset_data + entry * block_size`. An entry 0xffffffff is a block never written (reads as
//! zeros), 0xfffffffe a discarded one (zeros).
//!
//! # Bounds
//!
//! | what | bound | checked in |
//! |---|---|---|
//! | header | 512 bytes at 0, inside the file | `header::Header::parse` |
//! | block size | a power of two, 512 B to 256 MiB | `header::Header::parse` |
//! | block map | `blocks_in_image` at most 16 Mi entries (64 MiB), inside the file, covering `disk_size` | `header::Header::parse` |
//! | blocks | every entry below `blocks_in_image`, its block inside the file | [`VdiSource::new`] |
//!
//! One extent call looks at most at 64 Ki map entries.

mod header;

use crate::format::input::{Input, RandomRead};
use std::path::{Path, PathBuf};

use header::Header;

use super::gate::BackingGate;
use super::{BlockSource, Driver, Extent, ExtentKind, Format, Opened, ReadDriver};
use crate::error::{Code, Error, Result};
use crate::format::qcow2::file::read_exact;

/// VDI's registry entry (read only).
pub(crate) const DRIVER: Driver = Driver {
    name: "vdi",
    extension: "vdi",
    read: Some(ReadDriver {
        format: Format::Vdi,
        probe: |p| header::is_vdi(p.head),
        open,
        open_layer: |file, path, chain, _gate| {
            chain.note(path, Format::Vdi)?;
            Ok(Box::new(VdiSource::new(file, path)?))
        },
    }),
    write: None,
};

const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;
/// Most map entries one extent call looks at.
const MAX_BLOCKS_PER_EXTENT: u64 = 64 << 10;

/// Opens a VDI read-only; VDIs have no internal snapshots kiln reads, nor backing files.
pub(crate) fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    _gate: &BackingGate,
) -> Result<Opened> {
    if let Some(s) = snapshot {
        return Err(Error::unsupported(
            path,
            format!("kiln reads no internal snapshot '{s}' of a VDI; only of qcow2 files"),
        ));
    }
    let src = VdiSource::new(file, path)?;
    let size = src.virtual_size;
    Ok(Opened::single(Box::new(src), path, Format::Vdi, size))
}

/// A VDI's block size (what `qemu-img info` calls its cluster size).
pub(crate) fn block_size(file: Input, path: &Path) -> Result<u64> {
    Ok(VdiSource::new(file, path)?.block_size)
}

/// An opened VDI.
pub(crate) struct VdiSource {
    file: Input,
    path: PathBuf,
    virtual_size: u64,
    block_size: u64,
    offset_data: u64,
    map: Vec<u32>,
}

impl VdiSource {
    /// Reads and checks the header and the block map.
    pub(crate) fn new(file: Input, path: &Path) -> Result<VdiSource> {
        let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
        let mut hb = vec![0u8; header::HEADER_SIZE];
        let n = super::read_full_at(&file, &mut hb, 0)
            .map_err(|e| Error::io(path, "reading the header of", e))?;
        hb.truncate(n);
        let h = Header::parse(&hb, path, size)?;
        let raw = read_exact(
            &file,
            path,
            u64::from(h.offset_bmap),
            h.blocks_in_image as usize * 4,
            "the block map",
        )?;
        let map: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bs = u64::from(h.block_size);
        for (i, &e) in map.iter().enumerate() {
            if e >= DISCARDED {
                continue;
            }
            let end = u64::from(h.offset_data) + (u64::from(e) + 1) * bs;
            if e >= h.blocks_in_image || end > size {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "VDI block map entry {i} ({e}) is not below blocks_in_image {} or puts its block past the end of the file ({size} bytes)",
                        h.blocks_in_image
                    ),
                ));
            }
        }
        if h.image_type == header::TYPE_STATIC && map.iter().any(|&e| e >= DISCARDED) {
            return Err(Error::corrupt(
                path,
                "a static VDI (image_type 2) with unallocated blocks in its block map",
            ));
        }
        Ok(VdiSource {
            file,
            path: path.to_path_buf(),
            virtual_size: h.disk_size,
            block_size: bs,
            offset_data: u64::from(h.offset_data),
            map,
        })
    }

    fn entry(&self, idx: u64) -> u32 {
        self.map.get(idx as usize).copied().unwrap_or(UNALLOCATED)
    }

    fn kind(e: u32) -> ExtentKind {
        match e {
            UNALLOCATED => ExtentKind::Unallocated,
            DISCARDED => ExtentKind::Zero,
            _ => ExtentKind::Data,
        }
    }

    fn past_end(&self, offset: u64, len: u64) -> Error {
        Error::new(
            Code::Internal,
            format!(
                "{}: {len} bytes at {offset} pass the virtual size {}",
                self.path.display(),
                self.virtual_size
            ),
        )
    }
}

impl BlockSource for VdiSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Runs of blocks of one kind (bounded work per call).
    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit = self.virtual_size.min(offset.saturating_add(max_len));
        if offset >= limit {
            return Err(self.past_end(offset, max_len));
        }
        let first = offset / self.block_size;
        let kind = Self::kind(self.entry(first));
        let mut idx = first + 1;
        while idx * self.block_size < limit
            && idx - first < MAX_BLOCKS_PER_EXTENT
            && Self::kind(self.entry(idx)) == kind
        {
            idx += 1;
        }
        Ok(Extent {
            start: offset,
            len: (idx * self.block_size).min(limit) - offset,
            kind,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size)
            .ok_or_else(|| self.past_end(offset, buf.len() as u64))?;
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.block_size;
            let in_block = pos % self.block_size;
            let n = (self.block_size - in_block).min(end - pos);
            let out = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            let e = self.entry(idx);
            if e >= DISCARDED {
                out.fill(0);
            } else {
                let at = self.offset_data + u64::from(e) * self.block_size + in_block;
                let got = super::read_full_at(&self.file, out, at).map_err(|err| {
                    Error::io(&self.path, &format!("reading at offset {at}"), err)
                })?;
                if got < out.len() {
                    return Err(Error::new(
                        Code::SourceChanged,
                        format!(
                            "{}: file ended at offset {} while reading; it shrank while being copied",
                            self.path.display(),
                            at + got as u64
                        ),
                    ));
                }
            }
            pos += n;
        }
        Ok(())
    }
}
