//! GUID Partition Table: headers, entries, CRCs, where the backup lives.
//!
//! Parsed by hand rather than with a GPT crate: the crates available (`gpt`, `gptman`) want a
//! `Read + Write + Seek` device and are built for editing a table, and they stop at the first
//! problem. kiln reads through a read-only [`BlockSource`] and wants every problem named (a bad
//! primary CRC with a good backup, a backup that is not at the end of a grown disk), so it reads
//! the 92-byte header and the entry array itself, CRC32 via `crc32fast`.
//!
//! Everything here is read from an untrusted disk: the entry count and size are bounded before
//! anything is allocated, and every LBA is checked against the disk before it is read.

use std::fmt;

use crate::error::{Code, Error, Result};
use crate::format::BlockSource;

pub(crate) const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest header the UEFI specification allows (revision 1.0).
pub(crate) const MIN_HEADER_SIZE: u32 = 92;
/// Largest entry array kiln reads (the usual one is 128 × 128 = 16 KiB).
pub(crate) const MAX_ARRAY_BYTES: u64 = 1 << 20;
/// Largest partition entry kiln reads (the specification's are 128 × 2^n).
pub(crate) const MAX_ENTRY_SIZE: u32 = 4096;

pub(crate) const ESP: Guid = Guid::from_str_const("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
pub(crate) const BIOS_BOOT: Guid = Guid::from_str_const("21686148-6449-6E6F-744E-656564454649");

/// A GUID as stored on disk (the first three fields little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the canonical text form at compile time; a malformed constant fails the build.
    const fn from_str_const(s: &str) -> Guid {
        let t = s.as_bytes();
        // Byte order on disk: the text's hex pairs for fields 1-3 reversed, 4-5 as written.
        const ORDER: [usize; 16] = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
        let mut text_bytes = [0u8; 16];
        let mut i = 0;
        let mut n = 0;
        while i < t.len() {
            if t[i] == b'-' {
                i += 1;
                continue;
            }
            text_bytes[n] = hexval(t[i]) << 4 | hexval(t[i + 1]);
            n += 1;
            i += 2;
        }
        assert!(n == 16, "a GUID has 16 bytes");
        let mut out = [0u8; 16];
        let mut k = 0;
        while k < 16 {
            out[k] = text_bytes[ORDER[k]];
            k += 1;
        }
        Guid(out)
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

/// A well-known partition type's name.
pub(crate) fn type_name(t: &Guid) -> Option<&'static str> {
    const NAMES: &[(&str, &str)] = &[
        ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EFI System"),
        ("21686148-6449-6E6F-744E-656564454649", "BIOS boot"),
        ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "Linux filesystem"),
        (
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            "Linux root (x86-64)",
        ),
        ("B921B045-1DF0-41C3-AF44-4C6F280D3FAE", "Linux root (ARM64)"),
        ("44479540-F297-41B2-9AF7-D131D5F0458A", "Linux root (x86)"),
        (
            "BC13C2FF-59E6-4262-A352-B275FD6F7172",
            "Linux extended boot",
        ),
        ("933AC7E1-2EB4-4F13-B844-0E14E2AEF915", "Linux home"),
        ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "Linux swap"),
        ("E6D6D379-F507-44C2-A23C-238F2A3DF928", "Linux LVM"),
        ("A19D880F-05FC-4D3B-A006-743F0F84911E", "Linux RAID"),
        (
            "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            "Microsoft basic data",
        ),
        ("E3C9E316-0B5C-4DB8-817D-F92DF00215AE", "Microsoft reserved"),
        ("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC", "Windows recovery"),
    ];
    let text = t.to_string();
    NAMES.iter().find(|(g, _)| *g == text).map(|(_, n)| *n)
}

/// A GPT header, as read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// The whole sector the header was read from (the bytes past `header_size` are kept as they are).
    pub(crate) sector: Vec<u8>,
    pub(crate) header_size: u32,
    pub(crate) my_lba: u64,
    pub(crate) alternate_lba: u64,
    pub(crate) first_usable_lba: u64,
    pub(crate) last_usable_lba: u64,
    pub(crate) disk_guid: Guid,
    pub(crate) entries_lba: u64,
    pub(crate) entry_count: u32,
    pub(crate) entry_size: u32,
    pub(crate) entries_crc: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// CRC32 of a header's first `header_size` bytes with its CRC field taken as zero.
pub(crate) fn header_crc(sector: &[u8], header_size: u32) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&sector[..16]);
    h.update(&[0; 4]);
    h.update(&sector[20..header_size as usize]);
    h.finalize()
}

impl Header {
    /// Parses and checks the header in `sector`, read from LBA `at` of a disk of `disk_sectors`
    /// sectors. The error says what is wrong, for a report item.
    pub(crate) fn parse(sector: &[u8], at: u64, disk_sectors: u64) -> Result<Header, String> {
        let ss = sector.len() as u64;
        if sector.len() < MIN_HEADER_SIZE as usize || &sector[..8] != SIGNATURE {
            return Err(format!("no GPT signature at LBA {at}"));
        }
        let header_size = u32_at(sector, 12);
        if header_size < MIN_HEADER_SIZE || header_size as u64 > ss {
            return Err(format!(
                "header at LBA {at}: header size {header_size} is outside 92..={ss}"
            ));
        }
        let stored = u32_at(sector, 16);
        let crc = header_crc(sector, header_size);
        if stored != crc {
            return Err(format!(
                "header at LBA {at}: CRC32 {stored:#010x} stored, {crc:#010x} computed"
            ));
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(&sector[56..72]);
        let h = Header {
            sector: sector.to_vec(),
            header_size,
            my_lba: u64_at(sector, 24),
            alternate_lba: u64_at(sector, 32),
            first_usable_lba: u64_at(sector, 40),
            last_usable_lba: u64_at(sector, 48),
            disk_guid: Guid(g),
            entries_lba: u64_at(sector, 72),
            entry_count: u32_at(sector, 80),
            entry_size: u32_at(sector, 84),
            entries_crc: u32_at(sector, 88),
        };
        if h.my_lba != at {
            return Err(format!(
                "header at LBA {at} says it lives at LBA {}",
                h.my_lba
            ));
        }
        if h.entry_size < 128 || h.entry_size > MAX_ENTRY_SIZE || !h.entry_size.is_multiple_of(128)
        {
            return Err(format!(
                "header at LBA {at}: partition entry size {} is not a multiple of 128 up to {MAX_ENTRY_SIZE}",
                h.entry_size
            ));
        }
        if h.array_bytes() > MAX_ARRAY_BYTES {
            return Err(format!(
                "header at LBA {at}: {} entries of {} bytes is more than the {MAX_ARRAY_BYTES} bytes kiln reads",
                h.entry_count, h.entry_size
            ));
        }
        let array_end = h.entries_lba.saturating_add(h.array_sectors(ss));
        if h.entries_lba < 1 || array_end > disk_sectors {
            return Err(format!(
                "header at LBA {at}: the entry array (LBA {} and {} sectors) does not fit the disk's {disk_sectors} sectors",
                h.entries_lba,
                h.array_sectors(ss)
            ));
        }
        if h.first_usable_lba > h.last_usable_lba.saturating_add(1)
            || h.last_usable_lba >= disk_sectors
        {
            return Err(format!(
                "header at LBA {at}: usable LBAs {}..={} do not fit the disk's {disk_sectors} sectors",
                h.first_usable_lba, h.last_usable_lba
            ));
        }
        Ok(h)
    }

    /// Bytes of the entry array (bounded by [`MAX_ARRAY_BYTES`] once parsed).
    pub(crate) fn array_bytes(&self) -> u64 {
        self.entry_count as u64 * self.entry_size as u64
    }

    /// Whole sectors the entry array takes.
    pub(crate) fn array_sectors(&self, ss: u64) -> u64 {
        self.array_bytes().div_ceil(ss)
    }
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// 1-based, as `sgdisk` numbers them.
    pub(crate) number: u32,
    pub(crate) type_guid: Guid,
    pub(crate) unique_guid: Guid,
    pub(crate) first_lba: u64,
    pub(crate) last_lba: u64,
    pub(crate) attributes: u64,
    pub(crate) name: String,
}

/// The used entries of an entry array (type GUID not zero).
pub(crate) fn parse_entries(array: &[u8], entry_size: u32) -> Vec<Entry> {
    let size = entry_size.max(128) as usize;
    array
        .chunks_exact(size)
        .enumerate()
        .filter_map(|(i, e)| {
            let mut t = [0u8; 16];
            t.copy_from_slice(&e[..16]);
            let type_guid = Guid(t);
            if type_guid.is_zero() {
                return None;
            }
            let mut u = [0u8; 16];
            u.copy_from_slice(&e[16..32]);
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            Some(Entry {
                number: i as u32 + 1,
                type_guid,
                unique_guid: Guid(u),
                first_lba: u64_at(e, 32),
                last_lba: u64_at(e, 40),
                attributes: u64_at(e, 48),
                name: String::from_utf16_lossy(&units),
            })
        })
        .collect()
}

/// A header with its entry array, when both check out.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) header: Header,
    /// The entry array as read: whole sectors.
    pub(crate) array: Vec<u8>,
}

/// What was found of a GPT on a disk.
#[derive(Debug, Clone)]
pub(crate) struct Gpt {
    pub(crate) sector_size: u64,
    pub(crate) disk_sectors: u64,
    /// The primary header and entries (LBA 1), or what is wrong with them.
    pub(crate) primary: std::result::Result<Table, String>,
    /// The backup header and entries, or what is wrong with them.
    pub(crate) backup: std::result::Result<Table, String>,
    /// The used entries, from the primary when it is sound, else from the backup.
    pub(crate) entries: Vec<Entry>,
}

impl Gpt {
    pub(crate) fn last_lba(&self) -> u64 {
        self.disk_sectors.saturating_sub(1)
    }

    /// The header kiln trusts: the primary, else the backup.
    pub(crate) fn header(&self) -> Option<&Header> {
        match (&self.primary, &self.backup) {
            (Ok(t), _) | (Err(_), Ok(t)) => Some(&t.header),
            _ => None,
        }
    }
}

/// Reads `len` bytes at `offset`, refusing a range past the disk's end.
pub(crate) fn read_vec(src: &dyn BlockSource, offset: u64, len: u64) -> Result<Vec<u8>> {
    let end = offset.saturating_add(len);
    if end > src.virtual_size() {
        return Err(Error::new(
            Code::SnapshotCorrupt,
            format!(
                "{len} bytes at offset {offset} run past the disk's end ({} bytes)",
                src.virtual_size()
            ),
        ));
    }
    let len = usize::try_from(len)
        .map_err(|_| Error::new(Code::SnapshotCorrupt, format!("{len} bytes is too large")))?;
    let mut buf = vec![0u8; len];
    src.read_at(offset, &mut buf)?;
    Ok(buf)
}

fn read_table(
    src: &dyn BlockSource,
    ss: u64,
    lba: u64,
    disk_sectors: u64,
) -> Result<std::result::Result<Table, String>> {
    if lba >= disk_sectors {
        return Ok(Err(format!(
            "LBA {lba} is past the disk's last LBA {}",
            disk_sectors.saturating_sub(1)
        )));
    }
    let sector = read_vec(src, lba * ss, ss)?;
    let header = match Header::parse(&sector, lba, disk_sectors) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let array = read_vec(src, header.entries_lba * ss, header.array_sectors(ss) * ss)?;
    let crc = crc32fast::hash(&array[..header.array_bytes() as usize]);
    if crc != header.entries_crc {
        return Ok(Err(format!(
            "entry array at LBA {}: CRC32 {:#010x} stored, {crc:#010x} computed",
            header.entries_lba, header.entries_crc
        )));
    }
    Ok(Ok(Table { header, array }))
}

/// Looks for a GPT with 512-byte, then 4096-byte sectors. None when neither LBA 1 nor the last LBA
/// carries the GPT signature.
pub(crate) fn read(src: &dyn BlockSource) -> Result<Option<Gpt>> {
    let size = src.virtual_size();
    for ss in [512u64, 4096] {
        let disk_sectors = size / ss;
        if disk_sectors < 3 {
            continue;
        }
        let has_sig =
            |lba: u64| -> Result<bool> { Ok(read_vec(src, lba * ss, 8)?.as_slice() == SIGNATURE) };
        let at_start = has_sig(1)?;
        if !at_start && !has_sig(disk_sectors - 1)? {
            continue;
        }
        let primary = read_table(src, ss, 1, disk_sectors)?;
        let backup_lba = match &primary {
            Ok(t) => t.header.alternate_lba,
            Err(_) => disk_sectors - 1,
        };
        let mut backup = read_table(src, ss, backup_lba, disk_sectors)?;
        if let (Ok(p), Ok(b)) = (&primary, &backup) {
            if p.header.disk_guid != b.header.disk_guid || p.header.alternate_lba != b.header.my_lba
            {
                backup = Err(format!(
                    "backup header at LBA {backup_lba} belongs to another table (disk GUID {})",
                    b.header.disk_guid
                ));
            } else if p.array[..p.header.array_bytes() as usize]
                != b.array[..b.header.array_bytes() as usize]
            {
                backup = Err(format!(
                    "backup entry array at LBA {} differs from the primary",
                    b.header.entries_lba
                ));
            }
        }
        let entries = match (&primary, &backup) {
            (Ok(t), _) | (Err(_), Ok(t)) => parse_entries(
                &t.array[..t.header.array_bytes() as usize],
                t.header.entry_size,
            ),
            _ => Vec::new(),
        };
        return Ok(Some(Gpt {
            sector_size: ss,
            disk_sectors,
            primary,
            backup,
            entries,
        }));
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid header sector for a disk of `disk_sectors` 512-byte sectors, with the given
    /// entry array CRC, AlternateLBA at the last LBA.
    pub(crate) fn header(
        disk_sectors: u64,
        my_lba: u64,
        entries_lba: u64,
        array_crc: u32,
    ) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        s[..8].copy_from_slice(SIGNATURE);
        s[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        s[12..16].copy_from_slice(&92u32.to_le_bytes());
        let alt = if my_lba == 1 { disk_sectors - 1 } else { 1 };
        s[24..32].copy_from_slice(&my_lba.to_le_bytes());
        s[32..40].copy_from_slice(&alt.to_le_bytes());
        s[40..48].copy_from_slice(&34u64.to_le_bytes());
        s[48..56].copy_from_slice(&(disk_sectors - 34).to_le_bytes());
        s[56..72].copy_from_slice(&[7u8; 16]);
        s[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        s[80..84].copy_from_slice(&128u32.to_le_bytes());
        s[84..88].copy_from_slice(&128u32.to_le_bytes());
        s[88..92].copy_from_slice(&array_crc.to_le_bytes());
        fix_crc(&mut s);
        s
    }

    pub(crate) fn fix_crc(s: &mut [u8]) {
        let c = header_crc(s, u32_at(s, 12));
        s[16..20].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn guids_print_mixed_endian() {
        assert_eq!(ESP.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(ESP.0[..4], [0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(type_name(&BIOS_BOOT), Some("BIOS boot"));
    }

    #[test]
    fn linux_filesystem_data_is_named() {
        // 0FC63DAF-8483-4772-8E79-3D69D8477DE4 (sgdisk's 8300) as it lies on disk.
        let on_disk = Guid([
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ]);
        assert_eq!(type_name(&on_disk), Some("Linux filesystem"));
    }

    #[test]
    fn a_valid_header_parses() {
        let s = header(2048, 1, 2, 0);
        let h = Header::parse(&s, 1, 2048).unwrap();
        assert_eq!(h.alternate_lba, 2047);
        assert_eq!(h.array_sectors(512), 32);
    }

    #[test]
    fn a_bad_crc_is_named() {
        let mut s = header(2048, 1, 2, 0);
        s[40] ^= 1;
        let e = Header::parse(&s, 1, 2048).unwrap_err();
        assert!(e.contains("CRC32"), "{e}");
    }

    #[test]
    fn bad_entry_sizes_and_counts_are_refused_before_reading() {
        for (count, size, want) in [
            (128u32, 100u32, "multiple of 128"),
            (128, 0, "multiple of 128"),
            (128, 8192, "multiple of 128"),
            (u32::MAX, 128, "more than"),
            (100_000, 4096, "more than"),
        ] {
            let mut s = header(2048, 1, 2, 0);
            s[80..84].copy_from_slice(&count.to_le_bytes());
            s[84..88].copy_from_slice(&size.to_le_bytes());
            fix_crc(&mut s);
            let e = Header::parse(&s, 1, 2048).unwrap_err();
            assert!(e.contains(want), "{count}x{size}: {e}");
        }
    }

    #[test]
    fn out_of_disk_lbas_are_refused() {
        // The entry array past the end.
        let mut s = header(2048, 1, 2040, 0);
        fix_crc(&mut s);
        assert!(Header::parse(&s, 1, 2048)
            .unwrap_err()
            .contains("does not fit"));
        // A header that says it lives elsewhere.
        let s = header(2048, 1, 2, 0);
        assert!(Header::parse(&s, 5, 2048).unwrap_err().contains("lives at"));
        // Header size larger than the sector.
        let mut s = header(2048, 1, 2, 0);
        s[12..16].copy_from_slice(&600u32.to_le_bytes());
        assert!(Header::parse(&s, 1, 2048)
            .unwrap_err()
            .contains("header size"));
        // Last usable past the end (CRC fixed so the range check is what fails).
        let mut s = header(2048, 1, 2, 0);
        s[48..56].copy_from_slice(&5000u64.to_le_bytes());
        fix_crc(&mut s);
        assert!(Header::parse(&s, 1, 2048).unwrap_err().contains("usable"));
    }

    #[test]
    fn entries_skip_unused_slots_and_read_names() {
        let mut a = vec![0u8; 4 * 128];
        a[128..144].copy_from_slice(&ESP.0);
        a[128 + 32..128 + 40].copy_from_slice(&2048u64.to_le_bytes());
        a[128 + 40..128 + 48].copy_from_slice(&4095u64.to_le_bytes());
        for (i, c) in "EFI".encode_utf16().enumerate() {
            a[128 + 56 + 2 * i..128 + 58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let e = parse_entries(&a, 128);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].number, 2);
        assert_eq!(e[0].name, "EFI");
        assert_eq!((e[0].first_lba, e[0].last_lba), (2048, 4095));
    }
}
