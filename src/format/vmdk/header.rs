//! The sparse extent header (VMware's `SparseExtentHeader`, "hosted sparse extent", 512 bytes,
//! little-endian), decoded into named fields, then validated separately; and grain/metadata
//! markers of streamOptimized files. Also the encoder the writer uses, so both sides share the
//! field offsets below.
//!
//! ```text
//! offset size field
//!      0    4 magicNumber        "KDMV"
//!      4    4 version            1, 2 (zeroed-grain GTEs) or 3 (streamOptimized)
//!      8    4 flags              bit 0 newline test valid, 1 redundant GD, 2 zeroed-grain GTEs,
//!                                16 compressed grains, 17 markers
//!     12    8 capacity           sectors of guest data in this extent
//!     20    8 grainSize          sectors per grain (a power of two)
//!     28    8 descriptorOffset   sector of the embedded descriptor (0: none)
//!     36    8 descriptorSize     its sectors
//!     44    4 numGTEsPerGT       grain table entries per grain table (512)
//!     48    8 rgdOffset          sector of the redundant grain directory
//!     56    8 gdOffset           sector of the grain directory (GD_AT_END: see the footer)
//!     64    8 overHead           sectors before the first grain
//!     72    1 uncleanShutdown
//!     73    4 '\n' ' ' '\r' '\n'  newline detection characters
//!     77    2 compressAlgorithm  0 none, 1 deflate (zlib streams, RFC 1950)
//! ```

use std::path::Path;

use crate::error::{Error, Result};

/// "KDMV" as a little-endian u32.
pub(crate) const MAGIC: u32 = 0x564d_444b;
pub(crate) const SECTOR: u64 = 512;
/// Header bytes (one sector).
pub(crate) const HEADER_SIZE: usize = 512;

pub(crate) const FLAG_NL_DETECT: u32 = 1;
pub(crate) const FLAG_RGD: u32 = 1 << 1;
pub(crate) const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub(crate) const FLAG_COMPRESSED: u32 = 1 << 16;
pub(crate) const FLAG_MARKERS: u32 = 1 << 17;
const KNOWN_FLAGS: u32 =
    FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;

pub(crate) const COMPRESS_NONE: u16 = 0;
pub(crate) const COMPRESS_DEFLATE: u16 = 1;

/// gdOffset of a streamOptimized header whose grain directory is found through the footer.
pub(crate) const GD_AT_END: u64 = u64::MAX;
/// The newline detection characters, as written by a binary-safe transfer.
pub(crate) const NL_CHARS: [u8; 4] = *b"\n \r\n";

/// Marker types (the u32 at offset 12 of a metadata marker).
pub(crate) const MARKER_EOS: u32 = 0;
pub(crate) const MARKER_GT: u32 = 1;
pub(crate) const MARKER_GD: u32 = 2;
pub(crate) const MARKER_FOOTER: u32 = 3;

/// Largest grain kiln reads: 2048 sectors (1 MiB); VMware writes 128 (64 KiB).
pub(crate) const MAX_GRAIN_SECTORS: u64 = 2048;
/// Most entries per grain table (VMware and qemu use 512; qemu refuses more).
pub(crate) const MAX_GTES_PER_GT: u32 = 512;
/// Largest extent capacity: 2^40 sectors (512 TiB), far past what 32-bit grain offsets reach.
pub(crate) const MAX_CAPACITY_SECTORS: u64 = 1 << 40;
/// Largest grain directory: 4 Mi entries (16 MiB).
pub(crate) const MAX_GD_ENTRIES: u64 = 4 << 20;
/// Largest embedded or standalone descriptor (1 MiB).
pub(crate) const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// The header's fields, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    pub(crate) version: u32,
    pub(crate) flags: u32,
    pub(crate) capacity: u64,
    pub(crate) grain_size: u64,
    pub(crate) descriptor_offset: u64,
    pub(crate) descriptor_size: u64,
    pub(crate) num_gtes_per_gt: u32,
    pub(crate) rgd_offset: u64,
    pub(crate) gd_offset: u64,
    pub(crate) overhead: u64,
    pub(crate) unclean_shutdown: u8,
    pub(crate) nl_chars: [u8; 4],
    pub(crate) compress_algorithm: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl SparseHeader {
    /// Decodes a header sector into (magic, fields); the magic is checked by
    /// [`SparseHeader::validate`].
    pub(crate) fn decode(b: &[u8; HEADER_SIZE]) -> (u32, SparseHeader) {
        (
            le32(b, 0),
            SparseHeader {
                version: le32(b, 4),
                flags: le32(b, 8),
                capacity: le64(b, 12),
                grain_size: le64(b, 20),
                descriptor_offset: le64(b, 28),
                descriptor_size: le64(b, 36),
                num_gtes_per_gt: le32(b, 44),
                rgd_offset: le64(b, 48),
                gd_offset: le64(b, 56),
                overhead: le64(b, 64),
                unclean_shutdown: b[72],
                nl_chars: [b[73], b[74], b[75], b[76]],
                compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
            },
        )
    }

    /// The header sector, magic included.
    pub(crate) fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &MAGIC.to_le_bytes());
        put(4, &self.version.to_le_bytes());
        put(8, &self.flags.to_le_bytes());
        put(12, &self.capacity.to_le_bytes());
        put(20, &self.grain_size.to_le_bytes());
        put(28, &self.descriptor_offset.to_le_bytes());
        put(36, &self.descriptor_size.to_le_bytes());
        put(44, &self.num_gtes_per_gt.to_le_bytes());
        put(48, &self.rgd_offset.to_le_bytes());
        put(56, &self.gd_offset.to_le_bytes());
        put(64, &self.overhead.to_le_bytes());
        put(72, &[self.unclean_shutdown]);
        put(73, &self.nl_chars);
        put(77, &self.compress_algorithm.to_le_bytes());
        b
    }

    /// Whether grains are compressed and preceded by markers (streamOptimized).
    pub(crate) fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Grain directory entries the capacity needs.
    pub(crate) fn gd_entries(&self) -> u64 {
        let grains = self.capacity.div_ceil(self.grain_size);
        grains.div_ceil(u64::from(self.num_gtes_per_gt))
    }

    /// Checks every field against the spec and kiln's bounds; `file_size` bounds the offsets. The
    /// grain directory's offset is checked only when it is not [`GD_AT_END`] (a footer's is).
    pub(crate) fn validate(&self, magic: u32, path: &Path, file_size: u64) -> Result<()> {
        let corrupt = |what: String| Err(Error::corrupt(path, what));
        let unsupported = |what: String| Err(Error::unsupported(path, what));
        if magic != MAGIC {
            return corrupt(format!(
                "magicNumber {magic:#010x} is not a VMDK sparse extent's (\"KDMV\")"
            ));
        }
        if !(1..=3).contains(&self.version) {
            return unsupported(format!(
                "sparse extent version {} (kiln reads versions 1 to 3)",
                self.version
            ));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return unsupported(format!(
                "flags {:#x} has unknown bits {:#x}",
                self.flags,
                self.flags & !KNOWN_FLAGS
            ));
        }
        if self.flags & FLAG_NL_DETECT != 0 && self.nl_chars != NL_CHARS {
            return corrupt(format!(
                "newline detection characters are {:02x?}, not 0a 20 0d 0a (was the file transferred in text mode?)",
                self.nl_chars
            ));
        }
        if !self.grain_size.is_power_of_two() || self.grain_size > MAX_GRAIN_SECTORS {
            return corrupt(format!(
                "grainSize {} is not a power of two from 1 to {MAX_GRAIN_SECTORS} sectors",
                self.grain_size
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > MAX_GTES_PER_GT {
            return corrupt(format!(
                "numGTEsPerGT {} is not between 1 and {MAX_GTES_PER_GT}",
                self.num_gtes_per_gt
            ));
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return corrupt(format!(
                "capacity {} sectors is over 2^40 sectors",
                self.capacity
            ));
        }
        if self.gd_entries() > MAX_GD_ENTRIES {
            return corrupt(format!(
                "capacity {} sectors needs {} grain directory entries, over {MAX_GD_ENTRIES}",
                self.capacity,
                self.gd_entries()
            ));
        }
        match self.compress_algorithm {
            COMPRESS_NONE if self.flags & FLAG_COMPRESSED == 0 => {}
            COMPRESS_DEFLATE => {}
            COMPRESS_NONE => {
                return corrupt("flags say compressed grains but compressAlgorithm is 0".into())
            }
            a => return unsupported(format!("compressAlgorithm {a} (kiln reads deflate, 1)")),
        }
        if self.flags & FLAG_COMPRESSED != 0 && !self.markers() {
            return unsupported("compressed grains without markers".into());
        }
        let sectors = file_size.div_ceil(SECTOR);
        if self.descriptor_offset != 0 {
            let end = self.descriptor_offset.checked_add(self.descriptor_size);
            if self.descriptor_size > MAX_DESCRIPTOR_BYTES / SECTOR
                || end.is_none_or(|e| e > sectors)
            {
                return corrupt(format!(
                    "descriptorOffset {} and descriptorSize {} sectors do not fit in the file ({} sectors) or pass {MAX_DESCRIPTOR_BYTES} bytes",
                    self.descriptor_offset, self.descriptor_size, sectors
                ));
            }
        }
        if self.gd_offset != GD_AT_END {
            let gd_sectors = (self.gd_entries() * 4).div_ceil(SECTOR);
            if self.gd_offset == 0
                || self
                    .gd_offset
                    .checked_add(gd_sectors)
                    .is_none_or(|e| e > sectors)
            {
                return corrupt(format!(
                    "gdOffset {} (a {gd_sectors}-sector grain directory) is not inside the file ({sectors} sectors)",
                    self.gd_offset
                ));
            }
        } else if !self.markers() {
            return corrupt(
                "gdOffset says the grain directory is at the end, but the file has no markers"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A metadata marker sector: (value: sectors that follow, type); None unless its size field is 0.
pub(crate) fn metadata_marker(b: &[u8]) -> Option<(u64, u32)> {
    if b.len() < 16 || le32(b, 8) != 0 {
        return None;
    }
    Some((le64(b, 0), le32(b, 12)))
}

/// A metadata marker sector of `kind` announcing `sectors` sectors of metadata.
pub(crate) fn encode_metadata_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&sectors.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// A grain marker: (guest sector of the grain, bytes of compressed data that follow).
pub(crate) fn grain_marker(b: &[u8]) -> (u64, u32) {
    (le64(b, 0), le32(b, 8))
}

/// Bytes of a grain marker before the compressed data.
pub(crate) const GRAIN_MARKER_BYTES: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_header() -> SparseHeader {
        SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: 2048,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: 128,
            unclean_shutdown: 0,
            nl_chars: NL_CHARS,
            compress_algorithm: COMPRESS_DEFLATE,
        }
    }

    #[test]
    fn encode_then_decode_gives_the_same_header() {
        let h = stream_header();
        let b = h.encode();
        // "KDMV", then version 3 little-endian.
        assert_eq!(&b[0..8], b"KDMV\x03\x00\x00\x00");
        let (magic, d) = SparseHeader::decode(&b);
        assert_eq!((magic, &d), (MAGIC, &h));
        d.validate(magic, Path::new("x"), 1 << 20).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let p = Path::new("x");
        type Change = Box<dyn Fn(&mut SparseHeader)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|h| h.version = 4), "version"),
            (Box::new(|h| h.flags |= 1 << 5), "flags"),
            (Box::new(|h| h.grain_size = 100), "grainSize"),
            (Box::new(|h| h.grain_size = 4096), "grainSize"),
            (Box::new(|h| h.num_gtes_per_gt = 0), "numGTEsPerGT"),
            (Box::new(|h| h.capacity = u64::MAX), "capacity"),
            (Box::new(|h| h.compress_algorithm = 7), "compressAlgorithm"),
            (Box::new(|h| h.nl_chars = *b"\n \n\n"), "newline"),
            (Box::new(|h| h.descriptor_size = 1 << 40), "descriptorSize"),
            (Box::new(|h| h.gd_offset = 1 << 30), "gdOffset"),
        ];
        for (change, field) in cases {
            let mut h = stream_header();
            change(&mut h);
            let e = h.validate(MAGIC, p, 1 << 20).unwrap_err();
            assert!(e.message().contains(field), "{field}: {}", e.message());
        }
        let e = stream_header().validate(0, p, 1 << 20).unwrap_err();
        assert!(e.message().contains("magicNumber"), "{}", e.message());
    }
}
