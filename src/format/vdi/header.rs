//! The VDI header (VirtualBox's Virtual Disk Image, version 1.1): 512 bytes at offset 0,
//! little-endian, decoded into named fields, then validated.

use std::path::Path;

use crate::error::{Error, Result};

pub(crate) const HEADER_SIZE: usize = 512;
/// At offset 0x40.
pub(crate) const SIGNATURE: u32 = 0xbeda_107f;
pub(crate) const SIGNATURE_AT: usize = 0x40;
const VERSION_1_1: u32 = 0x0001_0001;
pub(crate) const TYPE_DYNAMIC: u32 = 1;
pub(crate) const TYPE_STATIC: u32 = 2;
const SECTOR: u64 = 512;
/// Block sizes kiln reads: powers of two from 512 B to 256 MiB (VirtualBox and qemu write 1 MiB).
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most block map entries kiln reads: 16 Mi (a 64 MiB map; 16 TiB of 1 MiB blocks).
pub(crate) const MAX_BLOCKS: u32 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) image_type: u32,
    pub(crate) offset_bmap: u32,
    pub(crate) offset_data: u32,
    /// Rounded up to whole sectors, as qemu does (`VBoxManage convertfromraw` writes odd sizes).
    pub(crate) disk_size: u64,
    pub(crate) block_size: u32,
    pub(crate) blocks_in_image: u32,
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

/// True when `head` carries the VDI signature.
pub(crate) fn is_vdi(head: &[u8]) -> bool {
    head.len() >= SIGNATURE_AT + 4 && le32(head, SIGNATURE_AT) == SIGNATURE
}

impl Header {
    /// Decodes and validates the header of a file of `file_size` bytes.
    pub(crate) fn parse(b: &[u8], path: &Path, file_size: u64) -> Result<Header> {
        let bad = |what: String| Error::corrupt(path, format!("VDI header: {what}"));
        let unsupported = |what: String| Error::unsupported(path, format!("VDI header: {what}"));
        if b.len() < HEADER_SIZE {
            return Err(bad(format!(
                "the file is {file_size} bytes, shorter than the header"
            )));
        }
        let signature = le32(b, SIGNATURE_AT);
        if signature != SIGNATURE {
            return Err(bad(format!(
                "signature {signature:#010x} is not 0xbeda107f"
            )));
        }
        let version = le32(b, 0x44);
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "version {}.{}; kiln reads 1.1",
                version >> 16,
                version & 0xffff
            )));
        }
        let image_type = le32(b, 0x4c);
        if image_type != TYPE_DYNAMIC && image_type != TYPE_STATIC {
            return Err(unsupported(format!(
                "image_type {image_type}; kiln reads dynamic (1) and static (2) images, not undo or differencing ones"
            )));
        }
        let size = le64(b, 0x170);
        let disk_size = size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| bad(format!("disk_size {size} is larger than 2^64 - 512")))?;
        let h = Header {
            image_type,
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            disk_size,
            block_size: le32(b, 0x178),
            blocks_in_image: le32(b, 0x180),
        };
        for (name, v) in [
            ("offset_bmap", h.offset_bmap),
            ("offset_data", h.offset_data),
        ] {
            if u64::from(v) % SECTOR != 0 {
                return Err(unsupported(format!("{name} {v:#x} is not sector aligned")));
            }
        }
        let sector_size = le32(b, 0x168);
        if u64::from(sector_size) != SECTOR {
            return Err(unsupported(format!("sector_size {sector_size} is not 512")));
        }
        let bs = h.block_size;
        if !bs.is_power_of_two() || !(SECTOR as u32..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(bad(format!(
                "block_size {bs} is not a power of two from 512 B to 256 MiB"
            )));
        }
        let extra = le32(b, 0x17c);
        if extra != 0 {
            return Err(unsupported(format!("block_extra {extra} is not 0")));
        }
        let n = h.blocks_in_image;
        if n > MAX_BLOCKS {
            return Err(unsupported(format!(
                "blocks_in_image {n} is over {MAX_BLOCKS} (a 64 MiB block map)"
            )));
        }
        if h.disk_size > u64::from(n) * u64::from(bs) {
            return Err(bad(format!(
                "disk_size {} is more than blocks_in_image {n} blocks of {bs} bytes hold",
                h.disk_size
            )));
        }
        for (name, at) in [("uuid_link", 0x1a8), ("uuid_parent", 0x1b8)] {
            if b[at..at + 16].iter().any(|&x| x != 0) {
                return Err(unsupported(format!(
                    "{name} is set: a differencing image (its parent is named by UUID only); merge it in VirtualBox first"
                )));
            }
        }
        if u64::from(h.offset_bmap) + u64::from(n) * 4 > file_size {
            return Err(bad(format!(
                "offset_bmap {:#x} with {n} entries runs past the end of the file ({file_size} bytes)",
                h.offset_bmap
            )));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header qemu-img would write for a 1 MiB dynamic image (one block).
    fn header() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        let mut put = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(SIGNATURE_AT, SIGNATURE);
        put(0x44, VERSION_1_1);
        put(0x4c, TYPE_DYNAMIC);
        put(0x154, 512);
        put(0x158, 1024);
        put(0x168, 512);
        put(0x170, 1 << 20);
        put(0x178, 1 << 20);
        put(0x180, 1);
        b
    }

    #[test]
    fn a_valid_header_parses() {
        let h = Header::parse(&header(), Path::new("x"), 1024).unwrap();
        assert_eq!((h.disk_size, h.blocks_in_image), (1 << 20, 1));
    }

    /// Found by the fuzz target: rounding a disk_size near 2^64 up to a sector overflowed.
    #[test]
    fn a_disk_size_near_the_top_of_u64_is_refused() {
        let mut b = header();
        b[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Header::parse(&b, Path::new("x"), 1024).unwrap_err();
        assert!(e.message().contains("disk_size"), "{e}");
    }
}
