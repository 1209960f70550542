//! The qcow2 snapshot table: `nb_snapshots` (header bytes 60..64) entries at `snapshots_offset`
//! (64..72), each a 40-byte fixed part, extra data, the ID and the name, padded to 8 bytes.
//!
//! One decoder ([`EntryHead`], [`Snapshot`]) and two walks over the table: the reader's
//! ([`read_snapshots`], when a snapshot is selected; its header checks ran before) and the listing
//! `kiln inspect` prints ([`read_snapshot_table`], on its own, so it checks count and alignment
//! itself). They keep their own messages, which tests pin.

use crate::format::input::RandomRead;
use std::path::Path;

use crate::error::{Error, Result};

/// QEMU's limits on the snapshot table (`QCOW_MAX_SNAPSHOTS`, `QCOW_MAX_SNAPSHOT_EXTRA_DATA`,
/// `QCOW_MAX_SNAPSHOTS_SIZE`).
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
pub(crate) const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Extra data kiln reads (QEMU's own limit, `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub(crate) const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// The fixed part of an entry.
pub(crate) const SNAPSHOT_FIXED: usize = 40;

/// The fixed part of a table entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryHead {
    pub(crate) l1_offset: u64,
    pub(crate) l1_size: u32,
    pub(crate) id_size: u16,
    pub(crate) name_size: u16,
    pub(crate) date_sec: u32,
    pub(crate) date_nsec: u32,
    /// Guest clock at the snapshot, in nanoseconds.
    pub(crate) vm_clock_nsec: u64,
    /// The 32-bit VM state size (the extra data's 64-bit one wins when present).
    pub(crate) vm_state_size32: u32,
    pub(crate) extra_size: u32,
}

impl EntryHead {
    pub(crate) fn decode(b: &[u8; SNAPSHOT_FIXED]) -> EntryHead {
        let u16_at = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o)) << 32) | u64::from(u32_at(o + 4));
        EntryHead {
            l1_offset: u64_at(0),
            l1_size: u32_at(8),
            id_size: u16_at(12),
            name_size: u16_at(14),
            date_sec: u32_at(16),
            date_nsec: u32_at(20),
            vm_clock_nsec: u64_at(24),
            vm_state_size32: u32_at(32),
            extra_size: u32_at(36),
        }
    }

    /// Bytes after the fixed part: extra data, ID and name.
    pub(crate) fn var_len(&self) -> u64 {
        u64::from(self.extra_size) + u64::from(self.id_size) + u64::from(self.name_size)
    }

    /// The whole entry, padded to 8 bytes.
    pub(crate) fn entry_len(&self) -> u64 {
        (SNAPSHOT_FIXED as u64 + self.var_len()).next_multiple_of(8)
    }
}

/// One internal snapshot, as the table describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub(crate) name: String,
    pub(crate) l1_offset: u64,
    pub(crate) l1_size: u32,
    /// The guest disk's size at the snapshot (extra data bytes 8..16), when recorded.
    pub(crate) disk_size: Option<u64>,
    pub(crate) vm_state_size: u64,
    pub(crate) date_sec: u32,
    pub(crate) date_nsec: u32,
    pub(crate) vm_clock_nsec: u64,
}

impl Snapshot {
    /// An entry from its fixed part and the `head.var_len()` bytes that follow it.
    pub(crate) fn decode(head: &EntryHead, var: &[u8]) -> Snapshot {
        let extra_len = head.extra_size as usize;
        let id_end = extra_len + head.id_size as usize;
        let extra = &var[..extra_len];
        let be64 = |b: &[u8]| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        Snapshot {
            id: String::from_utf8_lossy(&var[extra_len..id_end]).into_owned(),
            name: String::from_utf8_lossy(&var[id_end..id_end + head.name_size as usize])
                .into_owned(),
            l1_offset: head.l1_offset,
            l1_size: head.l1_size,
            disk_size: (extra.len() >= 16).then(|| be64(&extra[8..16])),
            vm_state_size: if extra.len() >= 8 {
                be64(&extra[0..8])
            } else {
                u64::from(head.vm_state_size32)
            },
            date_sec: head.date_sec,
            date_nsec: head.date_nsec,
            vm_clock_nsec: head.vm_clock_nsec,
        }
    }
}

fn head_at(fixed: &[u8]) -> EntryHead {
    let mut b = [0u8; SNAPSHOT_FIXED];
    b.copy_from_slice(&fixed[..SNAPSHOT_FIXED]);
    EntryHead::decode(&b)
}

/// The reader's walk: `count` entries at `offset` (both checked against the file by the header
/// validation), in a file of `fsize` bytes.
pub(super) fn read_snapshots(
    file: &dyn RandomRead,
    path: &Path,
    count: u32,
    offset: u64,
    fsize: u64,
) -> Result<Vec<Snapshot>> {
    let read_exact = super::file::read_exact;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = offset;
    let mut total: u64 = 0;
    for i in 0..count {
        let fixed = read_exact(file, path, pos, SNAPSHOT_FIXED, "a snapshot table entry")?;
        let bad = || Error::corrupt(path, format!("snapshot table entry {i} is truncated"));
        let head = head_at(&fixed);
        let extra_size = u64::from(head.extra_size);
        if head.extra_size > MAX_SNAPSHOT_EXTRA {
            return Err(Error::corrupt(
                path,
                format!(
                    "snapshot table entry {i}: extra_data_size {extra_size} is larger than {MAX_SNAPSHOT_EXTRA}"
                ),
            ));
        }
        let var = head.var_len();
        let entry = head.entry_len();
        total += entry;
        if total > MAX_SNAPSHOT_TABLE {
            return Err(Error::corrupt(
                path,
                format!("the snapshot table is larger than {MAX_SNAPSHOT_TABLE} bytes"),
            ));
        }
        // Checked before allocating: the entry's sizes come from the file.
        if pos
            .checked_add(SNAPSHOT_FIXED as u64 + var)
            .is_none_or(|e| e > fsize)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "snapshot table entry {i} at offset {pos} ({var} bytes of extra data, ID and name) runs past the end of the file"
                ),
            ));
        }
        let data = read_exact(
            file,
            path,
            pos.checked_add(SNAPSHOT_FIXED as u64).ok_or_else(bad)?,
            var as usize,
            "a snapshot table entry",
        )?;
        out.push(Snapshot::decode(&head, &data));
        pos = pos.checked_add(entry).ok_or_else(bad)?;
    }
    Ok(out)
}

/// The listing `kiln inspect` prints: the whole table of the qcow2 file (or object) `file`, read
/// from `path`.
pub fn read_snapshot_table(file: &dyn RandomRead, path: &Path) -> Result<Vec<Snapshot>> {
    let h = read_listing(file, path, 0, 72, "the qcow2 header")?;
    let count = u32::from_be_bytes([h[60], h[61], h[62], h[63]]);
    let mut offset = u64::from_be_bytes([h[64], h[65], h[66], h[67], h[68], h[69], h[70], h[71]]);
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            path,
            format!("{count} internal snapshots (QEMU allows at most {MAX_SNAPSHOTS})"),
        ));
    }
    if !offset.is_multiple_of(8) {
        return Err(Error::corrupt(
            path,
            format!("snapshot table offset {offset} is not 8-byte aligned"),
        ));
    }
    let start = offset;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let fixed = read_listing(file, path, offset, SNAPSHOT_FIXED, "a snapshot table entry")?;
        let head = head_at(&fixed);
        let extra_len = head.extra_size;
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(Error::corrupt(
                path,
                format!(
                    "snapshot {} has {extra_len} bytes of extra data (at most {MAX_SNAPSHOT_EXTRA})",
                    i + 1
                ),
            ));
        }
        let end = offset
            .checked_add(head.entry_len())
            .filter(|e| e - start <= MAX_SNAPSHOT_TABLE)
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!("the snapshot table is larger than {MAX_SNAPSHOT_TABLE} bytes"),
                )
            })?;
        // var_len is at most 1024 + 2 * 65535, so the cast is exact.
        let var = read_listing(
            file,
            path,
            offset + SNAPSHOT_FIXED as u64,
            head.var_len() as usize,
            "a snapshot table entry",
        )?;
        out.push(Snapshot::decode(&head, &var));
        offset = end;
    }
    Ok(out)
}

/// `len` bytes at `offset`, for the listing and `kiln inspect` (their I/O message names the offset).
pub(crate) fn read_listing(
    file: &dyn RandomRead,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let io_what = format!("reading {what} at offset {offset} of");
    super::file::read_exact_io(file, path, offset, len, what, &io_what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_decodes_field_by_field() {
        let mut b = [0u8; SNAPSHOT_FIXED];
        b[0..8].copy_from_slice(&0x3_0000u64.to_be_bytes()); // l1_table_offset
        b[8..12].copy_from_slice(&20u32.to_be_bytes()); // l1_size
        b[12..14].copy_from_slice(&1u16.to_be_bytes()); // id_str_size
        b[14..16].copy_from_slice(&2u16.to_be_bytes()); // name_size
        b[16..20].copy_from_slice(&7u32.to_be_bytes()); // date_sec
        b[20..24].copy_from_slice(&8u32.to_be_bytes()); // date_nsec
        b[24..32].copy_from_slice(&3_500_000_000u64.to_be_bytes()); // vm_clock_nsec
        b[32..36].copy_from_slice(&77u32.to_be_bytes()); // vm_state_size
        b[36..40].copy_from_slice(&16u32.to_be_bytes()); // extra_data_size
        let head = EntryHead::decode(&b);
        assert_eq!(head.var_len(), 19);
        assert_eq!(head.entry_len(), 64);
        let mut var = vec![0u8; 16];
        var[0..8].copy_from_slice(&(5u64 << 32).to_be_bytes()); // vm_state_size_large
        var[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes()); // disk_size
        var.extend_from_slice(b"1ab");
        let s = Snapshot::decode(&head, &var);
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "ab"));
        assert_eq!((s.l1_offset, s.l1_size), (0x3_0000, 20));
        assert_eq!((s.vm_state_size, s.disk_size), (5 << 32, Some(1 << 30)));
        assert_eq!(
            (s.date_sec, s.date_nsec, s.vm_clock_nsec),
            (7, 8, 3_500_000_000)
        );
        // Without extra data, the 32-bit VM state size and no disk size.
        b[36..40].copy_from_slice(&0u32.to_be_bytes());
        let head = EntryHead::decode(&b);
        let s = Snapshot::decode(&head, b"1ab");
        assert_eq!((s.vm_state_size, s.disk_size), (77, None));
    }
}
