//! `--relocate-gpt`: a disk with a GPT that grows keeps a valid table, the way `sgdisk -e` leaves it.
//!
//! The copy engine is not touched: [`Relocated`] wraps a source and presents it grown to the new size
//! with a few sectors patched (the protective MBR, the primary header, and a backup entry array and
//! header at the new end). Its extents report the patched sectors as data, so the engine copies
//! them like any other data, for raw and qcow2 output alike.
//!
//! What changes, as `sgdisk -e` does it (checked against sgdisk 1.0.9):
//! - the primary header's AlternateLBA becomes the new last LBA and its LastUsableLBA the sector
//!   before the backup entry array; its CRC is recomputed;
//! - the backup entry array (a copy of the primary's) goes right before the new last LBA, and the
//!   backup header (the primary's with MyLBA, AlternateLBA and PartitionEntryLBA swapped) on it;
//! - a protective MBR whose 0xEE partition covered the old disk is made to cover the new one (its
//!   size and end CHS; a hybrid MBR is left alone);
//! - the old backup header and entries are left where they were, as `sgdisk -e` leaves them: they
//!   are unused sectors inside the disk now, and leaving them means no byte outside the table's
//!   structures changes.

use crate::error::{Code, Error, Result};
use crate::format::{BlockSource, Extent, ExtentKind};

use super::gpt::{self, header_crc, read_vec};
use super::mbr::{Mbr, PROTECTIVE};

/// Sectors to patch, and what was changed, in words for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relocation {
    /// (byte offset, bytes), sorted, not overlapping, whole sectors.
    pub(crate) patches: Vec<(u64, Vec<u8>)>,
    pub(crate) changes: Vec<String>,
}

/// Plans the relocation for `src` grown to `new_size` bytes. Ok(Err(why)) when the disk has no
/// valid primary GPT to relocate (the caller warns and copies the disk as it is); Ok(Ok(None))
/// when there is nothing to do (the disk does not grow by a whole sector, or the backup is already
/// at the new end).
pub(crate) fn plan(
    src: &dyn BlockSource,
    new_size: u64,
) -> Result<std::result::Result<Option<Relocation>, String>> {
    let Some(g) = gpt::read(src)? else {
        return Ok(Err("the disk has no GPT".into()));
    };
    let t = match &g.primary {
        Ok(t) => t,
        Err(e) => return Ok(Err(format!("its primary GPT is not valid ({e})"))),
    };
    let ss = g.sector_size;
    let h = &t.header;
    let new_sectors = new_size / ss;
    if new_sectors <= g.disk_sectors {
        return Ok(Ok(None));
    }
    let new_last = new_sectors - 1;
    if h.alternate_lba == new_last {
        return Ok(Ok(None));
    }
    let array_sectors = h.array_sectors(ss);
    let new_entries_lba = new_last - array_sectors;
    let new_last_usable = new_entries_lba - 1;
    if new_last_usable < h.last_usable_lba {
        return Ok(Err(format!(
            "the table's last usable LBA {} would shrink",
            h.last_usable_lba
        )));
    }

    let mut primary = h.sector.clone();
    primary[32..40].copy_from_slice(&new_last.to_le_bytes());
    primary[48..56].copy_from_slice(&new_last_usable.to_le_bytes());
    set_crc(&mut primary, h.header_size);

    let mut backup = primary.clone();
    backup[24..32].copy_from_slice(&new_last.to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[72..80].copy_from_slice(&new_entries_lba.to_le_bytes());
    set_crc(&mut backup, h.header_size);

    let mut patches = Vec::new();
    let mut changes = Vec::new();
    if let Some((sector0, words)) = protective_mbr(src, ss, g.disk_sectors, new_sectors)? {
        patches.push((0, sector0));
        changes.push(words);
    }
    patches.push((ss, primary));
    changes.push(format!(
        "GPT primary header (LBA 1): AlternateLBA {} -> {new_last}, LastUsableLBA {} -> {new_last_usable}, CRC recomputed",
        h.alternate_lba, h.last_usable_lba
    ));
    patches.push((new_entries_lba * ss, t.array.clone()));
    patches.push((new_last * ss, backup));
    changes.push(format!(
        "GPT backup header moved from LBA {} to LBA {new_last}, backup entries from LBA {} to LBA {new_entries_lba} (the old copy left in place, as sgdisk -e does)",
        h.alternate_lba,
        match &g.backup {
            Ok(b) => b.header.entries_lba.to_string(),
            Err(_) => "?".into(),
        }
    ));
    Ok(Ok(Some(Relocation { patches, changes })))
}

fn set_crc(sector: &mut [u8], header_size: u32) {
    let c = header_crc(sector, header_size);
    sector[16..20].copy_from_slice(&c.to_le_bytes());
}

/// Sector 0 with its protective partition resized to the new disk, when it is a pure protective
/// MBR (one 0xEE entry from LBA 1) that covered the old disk.
fn protective_mbr(
    src: &dyn BlockSource,
    ss: u64,
    old_sectors: u64,
    new_sectors: u64,
) -> Result<Option<(Vec<u8>, String)>> {
    let mut s = read_vec(src, 0, ss)?;
    let Some(m) = Mbr::parse(&s) else {
        return Ok(None);
    };
    let cap = |n: u64| n.saturating_sub(1).min(u32::MAX as u64);
    match m.primaries.as_slice() {
        [e] if e.kind == PROTECTIVE && e.start_lba == 1 && e.sectors == cap(old_sectors) => {
            let slot = 446 + 16 * (e.number as usize - 1);
            let size = cap(new_sectors);
            s[slot + 12..slot + 16].copy_from_slice(&(size as u32).to_le_bytes());
            s[slot + 5..slot + 8].copy_from_slice(&chs(size));
            Ok(Some((
                s,
                format!(
                    "protective MBR partition resized from {} to {size} sectors",
                    e.sectors
                ),
            )))
        }
        _ => Ok(None),
    }
}

/// CHS bytes of an LBA with 255 heads and 63 sectors per track (what gdisk writes); past the
/// CHS range, the 1023/254/63 marker.
fn chs(lba: u64) -> [u8; 3] {
    let c = lba / (255 * 63);
    if c > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let h = (lba / 63) % 255;
    let s = lba % 63 + 1;
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// A source grown to a new size with sectors patched; see the module's description.
pub(crate) struct Relocated {
    inner: Box<dyn BlockSource>,
    size: u64,
    patches: Vec<(u64, Vec<u8>)>,
}

impl Relocated {
    /// `patches` must lie inside `size`, be sorted and not overlap ([`plan`]'s do).
    pub(crate) fn new(
        inner: Box<dyn BlockSource>,
        size: u64,
        patches: Vec<(u64, Vec<u8>)>,
    ) -> Result<Relocated> {
        let mut end = 0;
        for (off, bytes) in &patches {
            let pend = off.saturating_add(bytes.len() as u64);
            if *off < end || pend > size || bytes.is_empty() {
                return Err(Error::new(
                    Code::Internal,
                    format!("GPT relocation: patch at offset {off} overlaps or runs past the disk"),
                ));
            }
            end = pend;
        }
        Ok(Relocated {
            inner,
            size,
            patches,
        })
    }
}

impl BlockSource for Relocated {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        // Inside a patch: data up to its end.
        for (off, bytes) in &self.patches {
            let end = off + bytes.len() as u64;
            if offset >= *off && offset < end {
                return Ok(Extent {
                    start: offset,
                    len: max_len.min(end - offset),
                    kind: ExtentKind::Data,
                });
            }
        }
        // Otherwise up to the next patch, from the source or past its end.
        let next = self
            .patches
            .iter()
            .map(|p| p.0)
            .find(|&o| o > offset)
            .unwrap_or(u64::MAX);
        let limit = max_len.min(next - offset);
        let inner_size = self.inner.virtual_size();
        if offset < inner_size {
            let e = self.inner.extent(offset, limit.min(inner_size - offset))?;
            Ok(Extent {
                start: offset,
                len: e.len.min(limit),
                kind: e.kind,
            })
        } else {
            Ok(Extent {
                start: offset,
                len: limit,
                kind: ExtentKind::Unallocated,
            })
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let inner_size = self.inner.virtual_size();
        let from_inner = end.min(inner_size).saturating_sub(offset) as usize;
        if from_inner > 0 {
            self.inner.read_at(offset, &mut buf[..from_inner])?;
        }
        buf[from_inner..].fill(0);
        for (off, bytes) in &self.patches {
            let pend = off + bytes.len() as u64;
            let s = (*off).max(offset);
            let e = pend.min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&bytes[(s - off) as usize..(e - off) as usize]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::gpt::tests::header;

    use crate::format::testing::Mem;

    /// A 1 MiB disk (2048 sectors) with an empty but valid GPT and a protective MBR.
    fn disk() -> Vec<u8> {
        let n = 2048u64;
        let mut d = vec![0u8; (n * 512) as usize];
        let crc = crc32fast::hash(&[0u8; 128 * 128]);
        d[512..1024].copy_from_slice(&header(n, 1, 2, crc));
        let last = (n - 1) as usize;
        d[last * 512..(last + 1) * 512].copy_from_slice(&header(n, n - 1, n - 33, crc));
        let e = &mut d[446..462];
        e[4] = PROTECTIVE;
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&((n - 1) as u32).to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn grown_disks_get_a_table_at_the_new_end() {
        let src = Mem(disk());
        let r = plan(&src, 4 << 20).unwrap().unwrap().unwrap();
        let grown = Relocated::new(Box::new(Mem(disk())), 4 << 20, r.patches).unwrap();
        let g = gpt::read(&grown).unwrap().unwrap();
        let p = g.primary.as_ref().unwrap();
        assert_eq!(p.header.alternate_lba, 8191);
        assert_eq!(p.header.last_usable_lba, 8191 - 33);
        let b = g.backup.as_ref().unwrap();
        assert_eq!(b.header.my_lba, 8191);
        assert_eq!(b.header.entries_lba, 8191 - 32);
        let mbr = Mbr::parse(&read_vec(&grown, 0, 512).unwrap()).unwrap();
        assert_eq!(mbr.primaries[0].sectors, 8191);
        // Patched sectors are data; the growth past the source is not.
        let e = grown.extent(2048 * 512, 1 << 30).unwrap();
        assert_eq!(e.kind, ExtentKind::Unallocated);
        assert_eq!(e.end(), 8159 * 512);
        assert_eq!(
            grown.extent(8159 * 512, 1 << 30).unwrap().kind,
            ExtentKind::Data
        );
        // Nothing to do when not grown, or when the backup is already at the end.
        assert_eq!(plan(&src, 1 << 20).unwrap(), Ok(None));
        assert_eq!(plan(&grown, 4 << 20).unwrap(), Ok(None));
    }

    #[test]
    fn no_gpt_is_refused_with_a_reason() {
        let src = Mem(vec![0u8; 1 << 20]);
        assert!(plan(&src, 2 << 20).unwrap().unwrap_err().contains("no GPT"));
        let mut d = disk();
        d[600] ^= 1; // breaks the primary's CRC
        let why = plan(&Mem(d), 2 << 20).unwrap().unwrap_err();
        assert!(why.contains("CRC32"), "{why}");
    }

    #[test]
    fn chs_matches_gdisk() {
        assert_eq!(chs(65535), [0x14, 0x10, 0x04]);
        assert_eq!(chs(131071), [0x28, 0x20, 0x08]);
        assert_eq!(chs(1 << 30), [0xFE, 0xFF, 0xFF]);
    }
}
