//! The log: metadata writes that a crash left unapplied. The specification says a reader must
//! replay them before trusting the BAT or the metadata; kiln never writes a source, so it replays
//! them into an in-memory [`Overlay`] that every later read goes through.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header (`loge`), descriptor
//! sectors (`desc` for a 4 KiB data sector, `zero` for a zeroed range) and data sectors (`data`),
//! with a CRC-32C over the whole entry. An entry is valid when its signature, length, log GUID,
//! descriptors (signatures, sequence numbers, alignment) and checksum are; a sequence is a run of
//! valid entries whose sequence numbers go up by one. As qemu's `vhdx_log_search` does, kiln scans
//! the whole buffer and replays the sequence whose last entry has the highest sequence number.
//! Work is linear in the log's size: an entry that fails is skipped by its length.

use super::file::{Overlay, VhdxFile, LOG_SECTOR};
use super::header::Header;
use super::{crc32c_with_zero_field, guid_at, le32, le64};
use crate::error::Result;

/// Largest log kiln reads (qemu and Hyper-V write 1 MiB).
pub(super) const MAX_LOG: u64 = 64 << 20;
/// Highest file offset a log entry may write (256 TiB, well past a 64 TiB disk's file).
const MAX_FILE_OFFSET: u64 = 1 << 48;
const SECTOR: usize = LOG_SECTOR as usize;

/// A valid entry, where it starts in the buffer (in sectors) and how many sectors it has.
struct Entry {
    start: usize,
    sectors: usize,
    sequence: u64,
    flushed_file_offset: u64,
    /// The entry's bytes (header, descriptors, data sectors), unwrapped.
    bytes: Vec<u8>,
    descriptors: usize,
}

/// Replays the current header's log into an overlay (empty when the log is empty or holds no
/// valid entry).
pub(super) fn replay(f: &VhdxFile, h: &Header) -> Result<Overlay> {
    if h.log_guid == [0; 16] || h.log_length == 0 {
        return Ok(Overlay::default());
    }
    let which = h.which;
    let len = u64::from(h.log_length);
    if len > MAX_LOG {
        return Err(f.unsupported(format_args!(
            "header {which}: LogLength {len} is over the {MAX_LOG} bytes kiln replays"
        )));
    }
    if h.log_offset.checked_add(len).is_none_or(|e| e > f.disk_len) {
        return Err(f.corrupt(format_args!(
            "header {which}: the log ({len} bytes at LogOffset {}) runs past the end of the file ({} bytes)",
            h.log_offset, f.disk_len
        )));
    }
    let log = f.read_vec(h.log_offset, len as usize, "the log")?;
    let mut overlay = Overlay::default();
    for e in search(&log, &h.log_guid) {
        apply(f, &e, &mut overlay)?;
    }
    Ok(overlay)
}

/// The active sequence: the valid run with the highest final sequence number.
fn search(log: &[u8], guid: &[u8; 16]) -> Vec<Entry> {
    let n = log.len() / SECTOR;
    let mut best: Vec<Entry> = Vec::new();
    let mut p = 0;
    while p < n {
        let first = match parse_entry(log, p, guid, None) {
            Ok(e) => e,
            Err(skip) => {
                p += skip;
                continue;
            }
        };
        let mut q = p + first.sectors;
        let mut run = vec![first];
        while q - p < n {
            let next = run.last().map_or(0, |e| e.sequence.wrapping_add(1));
            match parse_entry(log, q % n, guid, Some(next)) {
                Ok(e) if q - p + e.sectors <= n => {
                    q += e.sectors;
                    run.push(e);
                }
                _ => break,
            }
        }
        let last = |r: &[Entry]| r.last().map(|e| e.sequence);
        if best.is_empty() || last(&run) > last(&best) {
            best = run;
        }
        p = q;
    }
    best
}

/// The `count` sectors from sector `start` on, wrapping at the end of the buffer.
fn sectors(log: &[u8], start: usize, count: usize) -> Vec<u8> {
    let n = log.len() / SECTOR;
    let mut out = Vec::with_capacity(count * SECTOR);
    for i in 0..count {
        let s = (start + i) % n;
        out.extend_from_slice(&log[s * SECTOR..(s + 1) * SECTOR]);
    }
    out
}

/// The entry at sector `start`, or how many sectors to skip when there is no valid one.
fn parse_entry(
    log: &[u8],
    start: usize,
    guid: &[u8; 16],
    expect: Option<u64>,
) -> std::result::Result<Entry, usize> {
    let h = &log[start * SECTOR..(start + 1) * SECTOR];
    let length = le32(h, 8) as usize;
    let sequence = le64(h, 16);
    let descriptors = le32(h, 24) as usize;
    let header_ok = &h[0..4] == b"loge"
        && length > 0
        && length.is_multiple_of(SECTOR)
        && length <= log.len()
        && sequence != 0
        && expect.is_none_or(|s| s == sequence)
        && guid_at(h, 32) == *guid
        && descriptors.saturating_mul(32) <= length;
    if !header_ok {
        return Err(1);
    }
    let count = length / SECTOR;
    let desc_sectors = (descriptors + 2).div_ceil(128);
    if desc_sectors > count {
        return Err(1);
    }
    let bytes = sectors(log, start, count);
    let mut data = 0;
    for i in 0..descriptors {
        let d = &bytes[64 + 32 * i..96 + 32 * i];
        let ok = le64(d, 24) == sequence
            && le64(d, 16).is_multiple_of(LOG_SECTOR)
            && match &d[0..4] {
                b"zero" => le64(d, 8).is_multiple_of(LOG_SECTOR),
                b"desc" => {
                    data += 1;
                    true
                }
                _ => false,
            };
        if !ok {
            return Err(count);
        }
    }
    if desc_sectors + data > count || le32(&bytes, 4) != crc32c_with_zero_field(&bytes, 4) {
        return Err(count);
    }
    Ok(Entry {
        start,
        sectors: count,
        sequence,
        flushed_file_offset: le64(h, 48),
        bytes,
        descriptors,
    })
}

/// Applies one entry's descriptors to the overlay, in order.
fn apply(f: &VhdxFile, e: &Entry, overlay: &mut Overlay) -> Result<()> {
    let seq = e.sequence;
    if e.flushed_file_offset > f.disk_len {
        return Err(f.corrupt(format_args!(
            "log entry {seq} (log sector {}): FlushedFileOffset {} is past the end of the file ({} bytes); the file was truncated",
            e.start, e.flushed_file_offset, f.disk_len
        )));
    }
    let mut data_at = (e.descriptors + 2).div_ceil(128) * SECTOR;
    for i in 0..e.descriptors {
        let d = &e.bytes[64 + 32 * i..96 + 32 * i];
        let offset = le64(d, 16);
        let len = if &d[0..4] == b"zero" {
            le64(d, 8)
        } else {
            LOG_SECTOR
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > MAX_FILE_OFFSET)
        {
            return Err(f.corrupt(format_args!(
                "log entry {seq}: descriptor {i} writes {len} bytes at FileOffset {offset}, past 2^48"
            )));
        }
        if &d[0..4] == b"zero" {
            overlay.zero(offset, len);
            continue;
        }
        let s = &e.bytes[data_at..data_at + SECTOR];
        let s_seq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, SECTOR - 4));
        if &s[0..4] != b"data" || s_seq != seq {
            return Err(f.corrupt(format_args!(
                "log entry {seq}: the data sector of descriptor {i} has signature {:?} and sequence number {s_seq}, not \"data\" and {seq}",
                String::from_utf8_lossy(&s[0..4])
            )));
        }
        let mut sector = vec![0u8; SECTOR];
        sector[0..8].copy_from_slice(&d[8..16]);
        sector[8..SECTOR - 4].copy_from_slice(&s[8..SECTOR - 4]);
        sector[SECTOR - 4..].copy_from_slice(&d[4..8]);
        overlay.put(offset, sector.into());
        data_at += SECTOR;
    }
    Ok(())
}
