//! The master boot record: boot code, the four primary entries, and logical partitions in an
//! extended partition's chain (bounded: a loop in the chain stops at [`MAX_LOGICAL`]).

use crate::error::Result;
use crate::format::BlockSource;

use super::gpt::read_vec;

/// Bytes of boot code before the disk signature.
pub(crate) const BOOT_CODE_LEN: usize = 440;
/// Logical partitions kiln follows in an extended partition.
pub(crate) const MAX_LOGICAL: usize = 128;
pub(crate) const PROTECTIVE: u8 = 0xEE;
pub(crate) const ESP_TYPE: u8 = 0xEF;

/// One MBR partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MbrEntry {
    /// 1 to 4 for primaries, 5 on for logical partitions (as Linux numbers them).
    pub(crate) number: u32,
    pub(crate) bootable: bool,
    pub(crate) kind: u8,
    pub(crate) start_lba: u64,
    pub(crate) sectors: u64,
}

/// A boot sector with the 0x55AA signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mbr {
    /// Non-zero bytes among the first 440 (boot code).
    pub(crate) boot_code_bytes: usize,
    /// Used primary entries (type not 0).
    pub(crate) primaries: Vec<MbrEntry>,
}

impl Mbr {
    /// None without the 0x55AA signature.
    pub(crate) fn parse(sector: &[u8]) -> Option<Mbr> {
        if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
            return None;
        }
        Some(Mbr {
            boot_code_bytes: sector[..BOOT_CODE_LEN].iter().filter(|&&b| b != 0).count(),
            primaries: entries(sector, 1, 0),
        })
    }

    /// A protective (or hybrid) MBR: one entry of type 0xEE.
    pub(crate) fn is_protective(&self) -> bool {
        self.primaries.iter().any(|e| e.kind == PROTECTIVE)
    }
}

/// The used entries of the table in `sector`, numbered from `first`; start LBAs are relative to
/// `base`.
fn entries(sector: &[u8], first: u32, base: u64) -> Vec<MbrEntry> {
    (0..4)
        .filter_map(|i| {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            let kind = e[4];
            let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64;
            let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64;
            (kind != 0).then_some(MbrEntry {
                number: first + i as u32,
                bootable: e[0] == 0x80,
                kind,
                start_lba: base + start,
                sectors,
            })
        })
        .collect()
}

pub(crate) fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// The logical partitions inside `ext` (an extended partition), following the EBR chain. Stops at
/// [`MAX_LOGICAL`] entries, at an EBR outside the extended partition, or at one without the
/// signature; the second value says why it stopped early, if it did.
pub(crate) fn logical(
    src: &dyn BlockSource,
    ext: &MbrEntry,
) -> Result<(Vec<MbrEntry>, Option<String>)> {
    let disk_sectors = src.virtual_size() / 512;
    let ext_end = ext.start_lba.saturating_add(ext.sectors).min(disk_sectors);
    let mut out = Vec::new();
    let mut ebr = ext.start_lba;
    while out.len() < MAX_LOGICAL {
        if ebr < ext.start_lba || ebr >= ext_end {
            return Ok((
                out,
                Some(format!(
                    "an EBR at LBA {ebr} lies outside the extended partition"
                )),
            ));
        }
        let sector = read_vec(src, ebr * 512, 512)?;
        if sector[510] != 0x55 || sector[511] != 0xAA {
            return Ok((
                out,
                Some(format!("the EBR at LBA {ebr} has no 0x55AA signature")),
            ));
        }
        let list = entries(&sector, 0, 0);
        let mut next = None;
        for e in list {
            if is_extended(e.kind) {
                next = Some(ext.start_lba.saturating_add(e.start_lba));
            } else if out.len() < MAX_LOGICAL && e.sectors > 0 {
                out.push(MbrEntry {
                    number: 5 + out.len() as u32,
                    start_lba: ebr.saturating_add(e.start_lba),
                    ..e
                });
            }
        }
        match next {
            Some(n) if n > ebr => ebr = n,
            Some(n) => {
                return Ok((out, Some(format!("the EBR chain loops back to LBA {n}"))));
            }
            None => return Ok((out, None)),
        }
    }
    Ok((
        out,
        Some(format!("more than {MAX_LOGICAL} logical partitions")),
    ))
}

/// A short name for common MBR partition types.
pub(crate) fn type_name(kind: u8) -> &'static str {
    match kind {
        0x01 | 0x04 | 0x06 | 0x0B | 0x0C | 0x0E => "FAT",
        0x05 | 0x0F | 0x85 => "Extended",
        0x07 => "NTFS/exFAT",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xFD => "Linux RAID",
        PROTECTIVE => "GPT protective",
        ESP_TYPE => "EFI System",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector_with(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        for (i, &(boot, kind, start, len)) in entries.iter().enumerate() {
            let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
            e[0] = boot;
            e[4] = kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&len.to_le_bytes());
        }
        s
    }

    #[test]
    fn primaries_and_boot_code() {
        let mut s = sector_with(&[(0x80, 0x83, 2048, 4096), (0, 0, 0, 0), (0, 0xEF, 8192, 100)]);
        assert_eq!(Mbr::parse(&s).unwrap().boot_code_bytes, 0);
        s[0] = 0xEB;
        s[439] = 1;
        s[440] = 9; // the disk signature is not boot code
        let m = Mbr::parse(&s).unwrap();
        assert_eq!(m.boot_code_bytes, 2);
        assert_eq!(m.primaries.len(), 2);
        assert_eq!(m.primaries[1].number, 3);
        assert!(m.primaries[0].bootable);
        assert!(!m.is_protective());
    }

    #[test]
    fn no_signature_no_mbr() {
        let mut s = sector_with(&[]);
        s[511] = 0;
        assert_eq!(Mbr::parse(&s), None);
        assert_eq!(Mbr::parse(&[0u8; 100]), None);
    }

    use crate::format::testing::Mem;

    #[test]
    fn a_looping_ebr_chain_stops() {
        let mut disk = vec![0u8; 512 * 64];
        // EBR at LBA 10: one logical partition and a link back to itself.
        let ebr = sector_with(&[(0, 0x83, 2, 4), (0, 0x05, 0, 20)]);
        disk[10 * 512..11 * 512].copy_from_slice(&ebr);
        let ext = MbrEntry {
            number: 2,
            bootable: false,
            kind: 0x05,
            start_lba: 10,
            sectors: 40,
        };
        let (l, why) = logical(&Mem(disk), &ext).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].start_lba, 12);
        assert!(why.unwrap().contains("loops"));
    }
}
