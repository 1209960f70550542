//! VHDX (Hyper-V's disk format, Microsoft's "VHDX Format Specification" v1.0), owned by kiln: a
//! read-only reader (fixed, dynamic and differencing files, a log replayed in memory) and a writer
//! for fresh dynamic files.
//!
//! Why not a crate: no maintained Rust crate reads VHDX with differencing files and log replay,
//! or writes it; disk-format readers and writers are kiln's core, held to the same bounds as the
//! qcow2 reader. `qemu-img` stays the test oracle.
//!
//! # The file
//!
//! | offset | what | checked in |
//! |---|---|---|
//! | 0 | file type identifier `vhdxfile` | `header::check_identifier` |
//! | 64 KiB, 128 KiB | two headers (CRC-32C); the valid one with the higher sequence number is current | `header::pick_header` |
//! | 192 KiB, 256 KiB | two region tables (CRC-32C): where the BAT and the metadata region are | `header::parse_regions` |
//! | header's log offset | the log: entries not yet applied to the file, replayed into an overlay | `log::replay` |
//! | metadata region | file parameters, virtual size, sector sizes, parent locator | `metadata::parse` |
//! | BAT region | one entry per payload block (and per sector bitmap block) | `reader::read_bat` |
//!
//! # Bounds
//!
//! Everything in the file is untrusted. Nothing read from it makes the reader allocate more than:
//!
//! | what | bound |
//! |---|---|
//! | headers, region tables, metadata table | 4 KiB, 64 KiB, 64 KiB each (fixed sizes) |
//! | region table entries, metadata entries | 2047 each (`MAX_TABLE_ENTRIES`, the specification's limit) |
//! | parent locator | `metadata::MAX_LOCATOR` = 64 KiB, at most 256 key/value pairs |
//! | log | `log::MAX_LOG` = 64 MiB (`LogLength`), inside the file; the overlay holds at most one 4 KiB sector per log sector |
//! | BAT | what the virtual size (at most 64 TiB) and block size need, inside the BAT region and no larger than the file |
//! | sector bitmap reads | the bits of one payload block (at most 64 KiB), per call |
//!
//! A chain has at most `MAX_CHAIN_DEPTH` files, with no loops; parents open through the backing
//! gate. A damaged file gives `InvalidSnapshot.Corrupt` naming the field; a feature kiln does not
//! read gives `InvalidSnapshot.Unsupported`. The source file is never written, even when its log
//! needs replaying (qemu refuses such a file read-only; kiln replays it in memory).

mod file;
mod header;
mod log;
mod metadata;
pub(crate) mod reader;
pub(crate) mod writer;

use super::{Driver, ReadDriver, WriteDriver};

/// VHDX's registry entry.
pub(crate) const DRIVER: Driver = Driver {
    name: "vhdx",
    extension: "vhdx",
    read: Some(ReadDriver {
        format: super::Format::Vhdx,
        probe: |p| p.head.starts_with(SIGNATURE),
        open: reader::open,
        open_layer: |file, path, chain, gate| {
            Ok(Box::new(reader::open_layer(file, path, chain, gate)?))
        },
    }),
    write: Some(WriteDriver {
        options: &[(
            "block_size",
            "payload block size, a power of two from 1M to 256M; by default qemu-img's choice for the size",
        )],
        create: writer::create,
        disk_size: writer::disk_size,
        compresses: false,
    }),
};

/// The file type identifier's signature, at offset 0.
pub(crate) const SIGNATURE: &[u8; 8] = b"vhdxfile";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Where the two headers and the two region tables are.
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const HEADER_SIZE: usize = 4096;
const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Most entries a region table or the metadata table may have.
const MAX_TABLE_ENTRIES: u32 = 2047;
/// Objects (regions, the log, payload blocks) are placed on 1 MiB boundaries, after the first MiB.
const ALIGN: u64 = MIB;
/// Largest virtual size the specification allows.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Payload block sizes: powers of two from 1 MiB to 256 MiB.
const MIN_BLOCK: u64 = MIB;
const MAX_BLOCK: u64 = 256 * MIB;
/// Sector bitmap blocks are 1 MiB and cover 2^23 logical sectors.
const SECTOR_BITMAP_BLOCK: u64 = MIB;
const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// BAT entry states (low three bits).
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const SB_PRESENT: u64 = 6;
/// A BAT entry's file offset, in MiB, is its top 44 bits.
const BAT_OFFSET_SHIFT: u32 = 20;

/// A GUID as the file stores it: the first three fields little-endian, the rest as bytes.
type Guid = [u8; 16];

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`, as parent locators write GUIDs.
fn guid_string(g: &Guid) -> String {
    let le32 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let le16a = u16::from_le_bytes([g[4], g[5]]);
    let le16b = u16::from_le_bytes([g[6], g[7]]);
    let tail: String = g[10..].iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{{{le32:08X}-{le16a:04X}-{le16b:04X}-{:02X}{:02X}-{tail}}}",
        g[8], g[9]
    )
}

const BAT_REGION: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const VIRTUAL_DISK_ID: Guid = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: Guid = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The parent locator type of a VHDX parent.
const VHDX_LOCATOR_TYPE: Guid = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// CRC-32C (Castagnoli), the checksum of headers, region tables and log entries, computed with
/// the checksum field (4 bytes at `field`) taken as zero.
fn crc32c_with_zero_field(buf: &[u8], field: usize) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut d = CRC.digest();
    d.update(&buf[..field]);
    d.update(&[0; 4]);
    d.update(&buf[field + 4..]);
    d.finalize()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_with_their_first_fields_little_endian() {
        // The BAT region's GUID as qemu-img writes it.
        assert_eq!(
            BAT_REGION,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            guid_string(&BAT_REGION),
            "{2DC27766-F623-4200-9D64-115E9BFD4A08}"
        );
    }

    #[test]
    fn crc32c_matches_the_castagnoli_check_value() {
        // "123456789" with its last four bytes as the "field": check against a plain CRC of the
        // same bytes with zeros there.
        const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        assert_eq!(CRC.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(
            crc32c_with_zero_field(b"12345abcd", 5),
            CRC.checksum(b"12345\0\0\0\0")
        );
    }
}
