//! The VHD footer (512 bytes: at the end of every VHD, copied at offset 0 of a dynamic one) and the
//! dynamic disk header (1024 bytes), as the VHD specification lays them out (big-endian). Each is
//! decoded into named fields, then validated; the writer encodes them from the same structs.

use std::path::Path;

use crate::error::{Error, Result};

/// Footer and sector size.
pub(crate) const SECTOR: u64 = 512;
pub(crate) const FOOTER_SIZE: usize = 512;
pub(crate) const DYN_HEADER_SIZE: usize = 1024;
pub(crate) const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub(crate) const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// The one file format version (footer) and dynamic header version there is: 1.0.
pub(crate) const VERSION_1_0: u32 = 0x0001_0000;
/// Disk types.
pub(crate) const TYPE_FIXED: u32 = 2;
pub(crate) const TYPE_DYNAMIC: u32 = 3;
pub(crate) const TYPE_DIFFERENCING: u32 = 4;
/// A fixed disk's `data_offset`, and a dynamic header's.
pub(crate) const NO_OFFSET: u64 = u64::MAX;
/// An unallocated BAT entry.
pub(crate) const BAT_UNUSED: u32 = u32::MAX;
/// The largest disk qemu opens (`VHD_MAX_SECTORS`: 2040 GiB).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * SECTOR;
/// The largest CHS geometry (65535 x 16 x 255): qemu then takes `current_size` whatever the creator.
pub(crate) const MAX_GEOMETRY: (u16, u8, u8) = (65535, 16, 255);
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub(crate) const VHD_EPOCH: u64 = 946_684_800;

/// The hard disk footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Footer {
    pub(crate) features: u32,
    pub(crate) version: u32,
    pub(crate) data_offset: u64,
    pub(crate) timestamp: u32,
    pub(crate) creator_app: [u8; 4],
    pub(crate) creator_version: u32,
    pub(crate) creator_os: [u8; 4],
    pub(crate) original_size: u64,
    pub(crate) current_size: u64,
    pub(crate) cylinders: u16,
    pub(crate) heads: u8,
    pub(crate) sectors: u8,
    pub(crate) disk_type: u32,
    pub(crate) uuid: [u8; 16],
}

/// The dynamic disk header (dynamic and differencing disks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DynHeader {
    pub(crate) table_offset: u64,
    pub(crate) max_table_entries: u32,
    pub(crate) block_size: u32,
    pub(crate) parent_uuid: [u8; 16],
    pub(crate) parent_timestamp: u32,
    /// The parent's name, UTF-16BE, as stored (512 bytes).
    pub(crate) parent_name: Vec<u8>,
    pub(crate) locators: Vec<Locator>,
}

/// One of the 8 parent locator entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Locator {
    pub(crate) platform: [u8; 4],
    pub(crate) data_space: u32,
    pub(crate) data_length: u32,
    pub(crate) data_offset: u64,
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}
fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// The spec's checksum: the one's complement of the byte sum, with the checksum field counted as 0.
pub(crate) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// True when `b` (512 bytes) is a footer: the cookie, a good checksum and a known disk type. The
/// probe of a fixed VHD, whose only mark is its last 512 bytes.
pub(crate) fn is_footer(b: &[u8], disk_type: Option<u32>) -> bool {
    b.len() == FOOTER_SIZE
        && b.starts_with(FOOTER_COOKIE)
        && checksum(b, 64) == be32(b, 64)
        && disk_type.is_none_or(|t| be32(b, 60) == t)
}

impl Footer {
    /// Decodes and validates a footer read at `at` (0 or the end of the file).
    pub(crate) fn parse(b: &[u8], path: &Path, at: u64) -> Result<Footer> {
        let bad = |what: String| Error::corrupt(path, format!("footer at offset {at}: {what}"));
        if b.len() < FOOTER_SIZE || !b.starts_with(FOOTER_COOKIE) {
            return Err(bad("cookie is not 'conectix'".into()));
        }
        let stored = be32(b, 64);
        let computed = checksum(&b[..FOOTER_SIZE], 64);
        if stored != computed {
            return Err(bad(format!(
                "checksum is {stored:#010x}, the bytes give {computed:#010x}"
            )));
        }
        let f = Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: arr(b, 28),
            creator_version: be32(b, 32),
            creator_os: arr(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: be16(b, 56),
            heads: b[58],
            sectors: b[59],
            disk_type: be32(b, 60),
            uuid: arr(b, 68),
        };
        f.validate(path, at)?;
        Ok(f)
    }

    fn validate(&self, path: &Path, at: u64) -> Result<()> {
        let bad = |what: String| Error::corrupt(path, format!("footer at offset {at}: {what}"));
        let version = self.version;
        if version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                format!("footer file_format_version {version:#010x}; kiln reads VHD 1.x"),
            ));
        }
        match self.disk_type {
            TYPE_FIXED => {
                if self.data_offset != NO_OFFSET {
                    return Err(bad(format!(
                        "data_offset {:#x} of a fixed disk is not 0xffffffffffffffff",
                        self.data_offset
                    )));
                }
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                if self.data_offset == NO_OFFSET || self.data_offset < FOOTER_SIZE as u64 {
                    return Err(bad(format!(
                        "data_offset {:#x} does not point at a dynamic disk header",
                        self.data_offset
                    )));
                }
            }
            t => {
                return Err(Error::unsupported(
                    path,
                    format!("footer disk_type {t}; kiln reads fixed (2), dynamic (3) and differencing (4) disks"),
                ))
            }
        }
        if !self.current_size.is_multiple_of(SECTOR) {
            return Err(bad(format!(
                "current_size {} is not a multiple of 512",
                self.current_size
            )));
        }
        let size = self.virtual_size();
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(
                path,
                format!("virtual size {size} (current_size or geometry) is over 2040 GiB, the most a VHD holds"),
            ));
        }
        Ok(())
    }

    /// The guest size, decided as qemu 10 decides it (`vpc_open`): the CHS geometry for images
    /// whose creator sizes disks by geometry (Virtual PC, old qemu, anything unknown), unless the
    /// geometry is the largest one (65535 x 16 x 255); `current_size` for Hyper-V (`win `), qemu
    /// with `force_size` (`qem2`), Disk2vhd (`d2v `), XenServer (`tap\0`) and XenConverter (`CTXS`).
    pub(crate) fn virtual_size(&self) -> u64 {
        let chs = u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors);
        let by_size = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        let max = MAX_GEOMETRY;
        if by_size || chs == u64::from(max.0) * u64::from(max.1) * u64::from(max.2) {
            self.current_size
        } else {
            chs * SECTOR
        }
    }

    /// The 512 bytes of this footer, checksum included.
    pub(crate) fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }
}

/// Largest block a dynamic VHD may have (the spec's default is 2 MiB; Hyper-V also writes 512 KiB).
pub(crate) const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most BAT entries kiln reads: 16 Mi entries, a 64 MiB table (a 2040 GiB disk of 2 MiB blocks has
/// 1 Mi).
pub(crate) const MAX_BAT_ENTRIES: u32 = 16 << 20;
/// Parent locator entries in the dynamic header.
const LOCATORS: usize = 8;

impl DynHeader {
    /// Decodes and validates the dynamic header read at `at`, for a disk of `virtual_size` bytes in
    /// a file of `file_size` bytes.
    pub(crate) fn parse(
        b: &[u8],
        path: &Path,
        at: u64,
        virtual_size: u64,
        file_size: u64,
    ) -> Result<DynHeader> {
        let bad = |what: String| {
            Error::corrupt(path, format!("dynamic disk header at offset {at}: {what}"))
        };
        if b.len() < DYN_HEADER_SIZE || !b.starts_with(DYN_COOKIE) {
            return Err(bad("cookie is not 'cxsparse'".into()));
        }
        let stored = be32(b, 36);
        let computed = checksum(&b[..DYN_HEADER_SIZE], 36);
        if stored != computed {
            return Err(bad(format!(
                "checksum is {stored:#010x}, the bytes give {computed:#010x}"
            )));
        }
        let version = be32(b, 24);
        if version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                format!("dynamic disk header version {version:#010x}; kiln reads 1.x"),
            ));
        }
        let locators = (0..LOCATORS)
            .map(|i| {
                let o = 576 + 24 * i;
                Locator {
                    platform: arr(b, o),
                    data_space: be32(b, o + 4),
                    data_length: be32(b, o + 8),
                    data_offset: be64(b, o + 16),
                }
            })
            .collect();
        let h = DynHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_uuid: arr(b, 40),
            parent_timestamp: be32(b, 56),
            parent_name: b[64..576].to_vec(),
            locators,
        };
        let bs = h.block_size;
        if !bs.is_power_of_two() || !(SECTOR as u32..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(bad(format!(
                "block_size {bs} is not a power of two from 512 B to 256 MiB"
            )));
        }
        let n = h.max_table_entries;
        let need = virtual_size.div_ceil(u64::from(bs));
        if u64::from(n) < need {
            return Err(bad(format!(
                "max_table_entries {n} covers less than the virtual size {virtual_size} ({need} blocks of {bs} bytes)"
            )));
        }
        if u64::from(n) > MAX_VIRTUAL_SIZE / u64::from(bs) || n > MAX_BAT_ENTRIES {
            return Err(bad(format!(
                "max_table_entries {n} is more than a 2040 GiB disk of {bs}-byte blocks has (at most {} entries are read)",
                MAX_BAT_ENTRIES
            )));
        }
        let end = h.table_offset.checked_add(u64::from(n) * 4);
        if !h.table_offset.is_multiple_of(SECTOR) || end.is_none_or(|e| e > file_size) {
            return Err(bad(format!(
                "table_offset {:#x} with {n} entries is not sector aligned or runs past the end of the file ({file_size} bytes)",
                h.table_offset
            )));
        }
        Ok(h)
    }

    /// The sector bitmap in front of each block: one bit per sector, padded to whole sectors.
    pub(crate) fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / SECTOR)
            .div_ceil(8)
            .next_multiple_of(SECTOR)
    }

    /// The 1024 bytes of this header, checksum included.
    pub(crate) fn encode(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        // The spec says 0xFFFFFFFF; Microsoft's tools (and qemu) set all 64 bits.
        b[8..16].copy_from_slice(&NO_OFFSET.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&VERSION_1_0.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let n = self.parent_name.len().min(512);
        b[64..64 + n].copy_from_slice(&self.parent_name[..n]);
        for (i, l) in self.locators.iter().take(LOCATORS).enumerate() {
            let o = 576 + 24 * i;
            b[o..o + 4].copy_from_slice(&l.platform);
            b[o + 4..o + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.data_length.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer() -> Footer {
        Footer {
            features: 2,
            version: VERSION_1_0,
            data_offset: NO_OFFSET,
            timestamp: 7,
            creator_app: *b"kiln",
            creator_version: 1,
            creator_os: *b"Wi2k",
            original_size: 64 << 20,
            current_size: 64 << 20,
            cylinders: 65535,
            heads: 16,
            sectors: 255,
            disk_type: TYPE_FIXED,
            uuid: [9; 16],
        }
    }

    #[test]
    fn footer_round_trips_and_its_checksum_is_checked() {
        let f = footer();
        let b = f.encode();
        assert!(is_footer(&b, Some(TYPE_FIXED)));
        assert_eq!(Footer::parse(&b, Path::new("x"), 0).unwrap(), f);
        let mut bad = b;
        bad[100] = 1;
        let e = Footer::parse(&bad, Path::new("x"), 0).unwrap_err();
        assert!(e.message().contains("checksum"), "{e}");
    }

    #[test]
    fn size_follows_qemu_geometry_or_current_size() {
        let mut f = footer();
        assert_eq!(f.virtual_size(), 64 << 20);
        (f.cylinders, f.heads, f.sectors) = (963, 8, 17);
        assert_eq!(f.virtual_size(), 963 * 8 * 17 * 512);
        f.creator_app = *b"win ";
        assert_eq!(f.virtual_size(), 64 << 20);
    }

    #[test]
    fn dynamic_header_round_trips_and_bounds_the_table() {
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 32,
            block_size: 2 << 20,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: vec![0; 512],
            locators: vec![
                Locator {
                    platform: [0; 4],
                    data_space: 0,
                    data_length: 0,
                    data_offset: 0
                };
                8
            ],
        };
        let b = h.encode();
        let p = Path::new("x");
        assert_eq!(DynHeader::parse(&b, p, 512, 64 << 20, 4096).unwrap(), h);
        let e = DynHeader::parse(&b, p, 512, 65 << 20, 4096).unwrap_err();
        assert!(e.message().contains("max_table_entries"), "{e}");
        let e = DynHeader::parse(&b, p, 512, 64 << 20, 1600).unwrap_err();
        assert!(e.message().contains("table_offset"), "{e}");
        assert_eq!(h.bitmap_size(), 512);
    }
}
