//! The metadata region: its table, then the items kiln reads (file parameters, virtual disk
//! size, sector sizes, parent locator), each checked.

use super::file::VhdxFile;
use super::header::Region;
use super::{guid_at, guid_string, le16, le32, le64, Guid};
use super::{FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, MAX_TABLE_ENTRIES, METADATA_TABLE_SIZE};
use super::{MAX_BLOCK, MAX_VIRTUAL_SIZE, MIN_BLOCK, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE};
use super::{VHDX_LOCATOR_TYPE, VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE};
use crate::error::Result;

/// Largest parent locator item read.
pub(super) const MAX_LOCATOR: u32 = 64 * 1024;
/// Most key/value pairs a parent locator may have.
const MAX_LOCATOR_ENTRIES: u16 = 256;

/// What the metadata says about the disk.
#[derive(Debug, Clone)]
pub(super) struct Metadata {
    pub(super) block_size: u64,
    pub(super) virtual_size: u64,
    pub(super) logical_sector: u64,
    /// The parent locator's key/value pairs, for a differencing file.
    pub(super) parent: Option<Vec<(String, String)>>,
}

/// A metadata table entry.
struct Item {
    id: Guid,
    offset: u32,
    length: u32,
    required: bool,
}

/// Reads the metadata table and the items kiln needs.
pub(super) fn parse(f: &VhdxFile, region: Region) -> Result<Metadata> {
    let items = read_table(f, region)?;
    let get = |id: &Guid, name: &str, len: u32| -> Result<Option<Vec<u8>>> {
        let Some(it) = items.iter().find(|it| it.id == *id) else {
            return Ok(None);
        };
        if len != 0 && it.length != len {
            return Err(f.corrupt(format_args!(
                "metadata item {name} is {} bytes long, not {len}",
                it.length
            )));
        }
        let what = format!("metadata item {name}");
        f.read_vec(
            region.offset + u64::from(it.offset),
            it.length as usize,
            &what,
        )
        .map(Some)
    };
    let need = |v: Option<Vec<u8>>, name: &str| {
        v.ok_or_else(|| f.corrupt(format_args!("the required metadata item {name} is missing")))
    };
    let params = need(
        get(&FILE_PARAMETERS, "FileParameters", 8)?,
        "FileParameters",
    )?;
    let size = need(
        get(&VIRTUAL_DISK_SIZE, "VirtualDiskSize", 8)?,
        "VirtualDiskSize",
    )?;
    need(get(&VIRTUAL_DISK_ID, "VirtualDiskId", 16)?, "VirtualDiskId")?;
    let lss = need(
        get(&LOGICAL_SECTOR_SIZE, "LogicalSectorSize", 4)?,
        "LogicalSectorSize",
    )?;
    let pss = need(
        get(&PHYSICAL_SECTOR_SIZE, "PhysicalSectorSize", 4)?,
        "PhysicalSectorSize",
    )?;
    let block_size = u64::from(le32(&params, 0));
    let flags = le32(&params, 4);
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(f.corrupt(format_args!(
            "FileParameters BlockSize {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let logical_sector = u64::from(le32(&lss, 0));
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(f.corrupt(format_args!(
            "LogicalSectorSize {logical_sector} is neither 512 nor 4096"
        )));
    }
    let physical = le32(&pss, 0);
    if physical != 512 && physical != 4096 {
        return Err(f.corrupt(format_args!(
            "PhysicalSectorSize {physical} is neither 512 nor 4096"
        )));
    }
    let virtual_size = le64(&size, 0);
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(logical_sector)
    {
        return Err(f.corrupt(format_args!(
            "VirtualDiskSize {virtual_size} is not a multiple of the {logical_sector}-byte logical sector from 1 sector to 64 TiB"
        )));
    }
    // Bit 0, LeaveBlocksAllocated, only tells writers not to free blocks: nothing for a reader.
    let has_parent = flags & 2 != 0;
    let parent = if has_parent {
        let loc = get(&PARENT_LOCATOR, "ParentLocator", 0)?;
        Some(parse_locator(f, &need(loc, "ParentLocator")?)?)
    } else {
        None
    };
    Ok(Metadata {
        block_size,
        virtual_size,
        logical_sector,
        parent,
    })
}

fn read_table(f: &VhdxFile, region: Region) -> Result<Vec<Item>> {
    let b = f.read_vec(region.offset, METADATA_TABLE_SIZE, "the metadata table")?;
    if &b[0..8] != b"metadata" {
        return Err(f.corrupt("metadata table signature is not \"metadata\""));
    }
    let count = u32::from(le16(&b, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(f.corrupt(format_args!(
            "metadata table EntryCount {count} is over {MAX_TABLE_ENTRIES}"
        )));
    }
    let mut items: Vec<Item> = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let e = &b[32 + 32 * i..64 + 32 * i];
        let it = Item {
            id: guid_at(e, 0),
            offset: le32(e, 16),
            length: le32(e, 20),
            required: le32(e, 24) & 4 != 0,
        };
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ]
        .contains(&it.id);
        if !known && it.required {
            return Err(f.unsupported(format_args!(
                "metadata entry {i} is a required item kiln does not know ({})",
                guid_string(&it.id)
            )));
        }
        if items.iter().any(|o| o.id == it.id) {
            return Err(f.corrupt(format_args!(
                "metadata entry {i} repeats item {}",
                guid_string(&it.id)
            )));
        }
        let end = u64::from(it.offset) + u64::from(it.length);
        let placed =
            it.length == 0 || (it.offset as usize >= METADATA_TABLE_SIZE && end <= region.length);
        if !placed {
            return Err(f.corrupt(format_args!(
                "metadata entry {i}: Offset {} and Length {} do not lie inside the metadata region, past its table",
                it.offset, it.length
            )));
        }
        if it.id == PARENT_LOCATOR && it.length > MAX_LOCATOR {
            return Err(f.unsupported(format_args!(
                "the ParentLocator item is {} bytes; kiln reads at most {MAX_LOCATOR}",
                it.length
            )));
        }
        if known {
            items.push(it);
        }
    }
    Ok(items)
}

/// The parent locator's key/value pairs (UTF-16LE strings).
fn parse_locator(f: &VhdxFile, b: &[u8]) -> Result<Vec<(String, String)>> {
    if b.len() < 20 {
        return Err(f.corrupt("the ParentLocator item is shorter than its 20-byte header"));
    }
    if guid_at(b, 0) != VHDX_LOCATOR_TYPE {
        return Err(f.unsupported(format_args!(
            "ParentLocator LocatorType {} is not a VHDX parent",
            guid_string(&guid_at(b, 0))
        )));
    }
    let count = le16(b, 18);
    if count > MAX_LOCATOR_ENTRIES || 20 + 12 * usize::from(count) > b.len() {
        return Err(f.corrupt(format_args!(
            "ParentLocator KeyValueCount {count} does not fit the item ({} bytes)",
            b.len()
        )));
    }
    let mut out = Vec::with_capacity(count.into());
    for i in 0..usize::from(count) {
        let e = 20 + 12 * i;
        let text = |off: u32, len: u16, what: &str| -> Result<String> {
            let (off, len) = (off as usize, usize::from(len));
            let s = b.get(off..off.saturating_add(len)).filter(|_| len % 2 == 0);
            let Some(s) = s else {
                return Err(f.corrupt(format_args!(
                    "ParentLocator entry {i}: {what} ({len} bytes at {off}) does not lie inside the item"
                )));
            };
            let units: Vec<u16> = s
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| {
                f.corrupt(format_args!(
                    "ParentLocator entry {i}: {what} is not UTF-16"
                ))
            })
        };
        let key = text(le32(b, e), le16(b, e + 8), "the key")?;
        let value = text(le32(b, e + 4), le16(b, e + 10), "the value")?;
        out.push((key, value));
    }
    if !out.iter().any(|(k, _)| k == "parent_linkage") {
        return Err(f.corrupt("ParentLocator has no parent_linkage key"));
    }
    Ok(out)
}
