//! The file type identifier, the two headers and the region table: decoded into named fields,
//! then validated.

use super::file::VhdxFile;
use super::{crc32c_with_zero_field, guid_at, le16, le32, le64, Guid};
use super::{ALIGN, BAT_REGION, HEADER_OFFSETS, HEADER_SIZE, MAX_TABLE_ENTRIES, METADATA_REGION};
use super::{REGION_OFFSETS, REGION_TABLE_SIZE, SIGNATURE};
use crate::error::Result;

/// A header (`head`), as decoded.
#[derive(Debug, Clone)]
pub(super) struct Header {
    /// Which of the two (1 or 2), for messages.
    pub(super) which: u8,
    pub(super) sequence: u64,
    pub(super) data_write_guid: Guid,
    pub(super) log_guid: Guid,
    pub(super) log_version: u16,
    pub(super) version: u16,
    pub(super) log_length: u32,
    pub(super) log_offset: u64,
}

/// Fails unless the file starts with `vhdxfile`.
pub(super) fn check_identifier(f: &VhdxFile) -> Result<()> {
    let id = f.read_vec(0, 8, "the file type identifier")?;
    if id != SIGNATURE {
        return Err(f.corrupt(format_args!(
            "file type identifier signature is {:?}, not \"vhdxfile\"",
            String::from_utf8_lossy(&id)
        )));
    }
    Ok(())
}

/// Decodes one header; Err says why it is not valid (signature, checksum).
fn decode_header(b: &[u8], which: u8) -> std::result::Result<Header, String> {
    if &b[0..4] != b"head" {
        return Err(format!("header {which}: signature is not \"head\""));
    }
    let stored = le32(b, 4);
    let computed = crc32c_with_zero_field(b, 4);
    if stored != computed {
        return Err(format!(
            "header {which}: checksum {stored:#010x} does not match its contents ({computed:#010x})"
        ));
    }
    Ok(Header {
        which,
        sequence: le64(b, 8),
        data_write_guid: guid_at(b, 32),
        log_guid: guid_at(b, 48),
        log_version: le16(b, 64),
        version: le16(b, 66),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// Reads both headers and returns the current one: the valid one with the higher sequence
/// number. Its fields are then checked.
pub(super) fn pick_header(f: &VhdxFile) -> Result<Header> {
    let mut valid: Vec<Header> = Vec::new();
    let mut why = Vec::new();
    for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
        let which = i as u8 + 1;
        let b = f.read_vec(off, HEADER_SIZE, &format!("header {which}"))?;
        match decode_header(&b, which) {
            Ok(h) => valid.push(h),
            Err(e) => why.push(e),
        }
    }
    let Some(h) = valid.into_iter().max_by_key(|h| h.sequence) else {
        return Err(f.corrupt(format_args!("neither header is valid ({})", why.join("; "))));
    };
    check_header(f, &h)?;
    Ok(h)
}

fn check_header(f: &VhdxFile, h: &Header) -> Result<()> {
    let which = h.which;
    if h.version != 1 {
        return Err(f.unsupported(format_args!(
            "header {which}: Version is {}; kiln reads VHDX version 1",
            h.version
        )));
    }
    if h.log_version != 0 {
        return Err(f.unsupported(format_args!(
            "header {which}: LogVersion is {}; kiln reads log version 0",
            h.log_version
        )));
    }
    if h.log_offset < ALIGN || !h.log_offset.is_multiple_of(ALIGN) {
        return Err(f.corrupt(format_args!(
            "header {which}: LogOffset {} is not a multiple of 1 MiB past the first MiB",
            h.log_offset
        )));
    }
    if !u64::from(h.log_length).is_multiple_of(ALIGN) {
        return Err(f.corrupt(format_args!(
            "header {which}: LogLength {} is not a multiple of 1 MiB",
            h.log_length
        )));
    }
    Ok(())
}

/// A region table entry kiln uses.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub(super) offset: u64,
    pub(super) length: u64,
}

/// The BAT and metadata regions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Regions {
    pub(super) bat: Region,
    pub(super) metadata: Region,
}

/// Reads the region table (the first copy, or the second when the first is not valid) and checks
/// its entries: both required regions once each, aligned, inside the file, not overlapping each
/// other, the first MiB or the log.
pub(super) fn parse_regions(f: &VhdxFile, h: &Header) -> Result<Regions> {
    let mut why = Vec::new();
    let mut table = None;
    for (i, &off) in REGION_OFFSETS.iter().enumerate() {
        let b = f.read_vec(off, REGION_TABLE_SIZE, &format!("region table {}", i + 1))?;
        if &b[0..4] != b"regi" {
            why.push(format!("region table {}: signature is not \"regi\"", i + 1));
        } else if le32(&b, 4) != crc32c_with_zero_field(&b, 4) {
            why.push(format!(
                "region table {}: checksum does not match its contents",
                i + 1
            ));
        } else {
            table = Some((i + 1, b));
            break;
        }
    }
    let Some((which, b)) = table else {
        return Err(f.corrupt(format_args!(
            "neither region table is valid ({})",
            why.join("; ")
        )));
    };
    let count = le32(&b, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(f.corrupt(format_args!(
            "region table {which}: EntryCount {count} is over {MAX_TABLE_ENTRIES}"
        )));
    }
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count as usize {
        let e = &b[16 + 32 * i..48 + 32 * i];
        let id = guid_at(e, 0);
        let region = Region {
            offset: le64(e, 16),
            length: u64::from(le32(e, 24)),
        };
        let required = le32(e, 28) & 1 != 0;
        let slot = if id == BAT_REGION {
            &mut bat
        } else if id == METADATA_REGION {
            &mut metadata
        } else if required {
            return Err(f.unsupported(format_args!(
                "region table {which}: entry {i} is a required region kiln does not know ({})",
                super::guid_string(&id)
            )));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(f.corrupt(format_args!(
                "region table {which}: entry {i} repeats the {} region",
                region_name(&id)
            )));
        }
        check_region(f, which, &id, region)?;
        *slot = Some(region);
    }
    let (Some(bat), Some(metadata)) = (bat, metadata) else {
        return Err(f.corrupt(format_args!(
            "region table {which}: the {} region is missing",
            if bat.is_none() { "BAT" } else { "metadata" }
        )));
    };
    let log = Region {
        offset: h.log_offset,
        length: u64::from(h.log_length),
    };
    if overlaps(bat, metadata) || overlaps(bat, log) || overlaps(metadata, log) {
        return Err(f.corrupt(format_args!(
            "region table {which}: the BAT, metadata and log regions overlap"
        )));
    }
    Ok(Regions { bat, metadata })
}

fn region_name(id: &Guid) -> &'static str {
    if *id == BAT_REGION {
        "BAT"
    } else {
        "metadata"
    }
}

fn check_region(f: &VhdxFile, which: usize, id: &Guid, r: Region) -> Result<()> {
    let name = region_name(id);
    if r.offset < ALIGN || !r.offset.is_multiple_of(ALIGN) {
        return Err(f.corrupt(format_args!(
            "region table {which}: the {name} region's FileOffset {} is not a multiple of 1 MiB past the first MiB",
            r.offset
        )));
    }
    if r.length == 0 || !r.length.is_multiple_of(ALIGN) {
        return Err(f.corrupt(format_args!(
            "region table {which}: the {name} region's Length {} is not a non-zero multiple of 1 MiB",
            r.length
        )));
    }
    if r.offset.checked_add(r.length).is_none_or(|e| e > f.len) {
        return Err(f.corrupt(format_args!(
            "region table {which}: the {name} region ({} bytes at offset {}) runs past the end of the file ({} bytes)",
            r.length, r.offset, f.len
        )));
    }
    Ok(())
}

/// Whether two byte ranges share a byte.
pub(super) fn overlaps(a: Region, b: Region) -> bool {
    a.offset < b.offset.saturating_add(b.length) && b.offset < a.offset.saturating_add(a.length)
}
