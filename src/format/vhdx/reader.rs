//! Opening a VHDX file and its parents, and reading it: the [`BlockSource`] of a chain.
//!
//! [`open`] checks the file type identifier, picks the current header, replays the log into an
//! overlay ([`super::log`]), reads the region table and metadata ([`super::header`],
//! [`super::metadata`]), reads and checks the BAT, then opens the parent of a differencing file
//! through the backing gate and checks that it is the file the child was made from.

use crate::format::input::Input;
use std::path::Path;

use super::file::VhdxFile;
use super::header::{check_identifier, overlaps, parse_regions, pick_header, Region};
use super::metadata::{self, Metadata};
use super::{guid_string, Guid, BAT_OFFSET_SHIFT, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT};
use super::{ALIGN, SB_PRESENT, SECTORS_PER_BITMAP, SECTOR_BITMAP_BLOCK};
use super::{PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_ZERO};
use crate::error::{Code, Error, Result};
use crate::format::chain::Chain;
use crate::format::gate::BackingGate;
use crate::format::{BlockSource, Extent, ExtentKind, Format, Opened};

/// Most blocks one extent merges before it returns (a bound on the work of one call).
const MAX_MERGED_BLOCKS: u64 = 4096;

/// Opens a VHDX source (and its parents) read-only. VHDX has no internal snapshots.
pub(crate) fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &BackingGate,
) -> Result<Opened> {
    crate::format::no_snapshot(path, snapshot, "a VHDX file")?;
    let mut chain = Chain::new();
    let src = open_layer(file, path, &mut chain, gate)?;
    let size = src.virtual_size;
    let chain = chain.into_files();
    Ok(Opened::whole(
        Box::new(src),
        path,
        Format::Vhdx,
        size,
        chain,
    ))
}

/// The payload block size of a VHDX file (what `kiln inspect` shows as its cluster size).
pub(crate) fn block_size(path: &Path) -> Result<u64> {
    let file = crate::format::input::open(path)?;
    Ok(read_layout(file, path)?.1.block_size)
}

/// The current header, the replayed file and the metadata of one file.
fn read_layout(file: Input, path: &Path) -> Result<(VhdxFile, Metadata, Region, Guid)> {
    let mut f = VhdxFile::new(file, path)?;
    check_identifier(&f)?;
    let h = pick_header(&f)?;
    let overlay = super::log::replay(&f, &h)?;
    f.set_overlay(overlay);
    let regions = parse_regions(&f, &h)?;
    let md = metadata::parse(&f, regions.metadata)?;
    Ok((f, md, regions.bat, h.data_write_guid))
}

pub(crate) fn open_layer(
    file: Input,
    path: &Path,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<VhdxSource> {
    chain.note(path, Format::Vhdx)?;
    let (f, md, bat_region, data_write_guid) = read_layout(file, path)?;
    let geo = Geometry::new(&md);
    let bat = read_bat(&f, &geo, bat_region, md.parent.is_some())?;
    let parent = match &md.parent {
        None => None,
        Some(kv) => Some(Box::new(open_parent(path, kv, chain, gate)?)),
    };
    Ok(VhdxSource {
        file: f,
        geo,
        bat,
        virtual_size: md.virtual_size,
        data_write_guid,
        parent,
    })
}

/// Block arithmetic of one file.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    block_size: u64,
    logical_sector: u64,
    /// Payload blocks per sector bitmap block.
    chunk_ratio: u64,
    data_blocks: u64,
}

impl Geometry {
    fn new(md: &Metadata) -> Geometry {
        Geometry {
            block_size: md.block_size,
            logical_sector: md.logical_sector,
            chunk_ratio: SECTORS_PER_BITMAP * md.logical_sector / md.block_size,
            data_blocks: md.virtual_size.div_ceil(md.block_size),
        }
    }

    /// BAT entries: payload entries with a sector bitmap entry after every `chunk_ratio` of them
    /// (a differencing file has room for every bitmap entry, the last one included).
    fn bat_entries(&self, has_parent: bool) -> u64 {
        let bitmaps = self.data_blocks.div_ceil(self.chunk_ratio);
        if has_parent {
            bitmaps * (self.chunk_ratio + 1)
        } else {
            self.data_blocks + (self.data_blocks - 1) / self.chunk_ratio
        }
    }

    fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    fn bitmap_index(&self, block: u64) -> usize {
        ((block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }
}

/// Reads the BAT and checks every entry: known states, and present blocks inside the file,
/// past the first MiB and clear of the metadata structures.
fn read_bat(f: &VhdxFile, geo: &Geometry, region: Region, has_parent: bool) -> Result<Vec<u64>> {
    let entries = geo.bat_entries(has_parent);
    let bytes = entries * 8;
    if bytes > region.length || bytes > f.disk_len {
        return Err(f.corrupt(format_args!(
            "the BAT needs {entries} entries ({bytes} bytes) for the disk, more than the BAT region's Length {} or the file's size",
            region.length
        )));
    }
    let raw = f.read_vec(region.offset, bytes as usize, "the BAT")?;
    let bat: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    for (i, &e) in bat.iter().enumerate() {
        let i = i as u64;
        let is_bitmap = i % (geo.chunk_ratio + 1) == geo.chunk_ratio;
        let state = e & 7;
        let (ok, len) = if is_bitmap {
            (
                state == PAYLOAD_NOT_PRESENT || state == SB_PRESENT,
                (state == SB_PRESENT).then_some(SECTOR_BITMAP_BLOCK),
            )
        } else {
            let present = state == PAYLOAD_FULLY_PRESENT || state == PAYLOAD_PARTIALLY_PRESENT;
            let known = matches!(
                state,
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED
            ) || state == PAYLOAD_FULLY_PRESENT
                || (state == PAYLOAD_PARTIALLY_PRESENT && has_parent);
            (known, present.then_some(geo.block_size))
        };
        if !ok {
            return Err(f.corrupt(format_args!(
                "BAT entry {i} has state {state}, not valid for a {} entry of a {} file",
                if is_bitmap {
                    "sector bitmap"
                } else {
                    "payload"
                },
                if has_parent {
                    "differencing"
                } else {
                    "non-differencing"
                }
            )));
        }
        let Some(len) = len else { continue };
        let at = Region {
            offset: (e >> BAT_OFFSET_SHIFT) * ALIGN,
            length: len,
        };
        let end = at.offset.checked_add(len);
        if at.offset < ALIGN || end.is_none_or(|e| e > f.len) || overlaps(at, region) {
            return Err(f.corrupt(format_args!(
                "BAT entry {i}: FileOffsetMB {} puts its {len}-byte block outside the file ({} bytes), in the first MiB or on the BAT",
                at.offset / ALIGN,
                f.len
            )));
        }
    }
    Ok(bat)
}

/// Opens the parent named by a differencing file's locator, through the gate, and checks that
/// its DataWriteGuid is the one the child was made from.
fn open_parent(
    child: &Path,
    kv: &[(String, String)],
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<VhdxSource> {
    let value = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let linkage = value("parent_linkage").unwrap_or_default();
    let linkage2 = value("parent_linkage2");
    let top = chain.top().unwrap_or(child).to_path_buf();
    let candidates = parent_candidates(&value);
    if candidates.is_empty() {
        return Err(Error::corrupt(
            child,
            "ParentLocator has no relative_path, absolute_win32_path or volume_path",
        ));
    }
    let mut tried = Vec::new();
    let mut opened = None;
    for name in &candidates {
        match gate.open(&top, child, name.as_bytes()) {
            Ok(o) => {
                opened = Some(o);
                break;
            }
            Err(e) if e.code() == Code::SnapshotNotFound => tried.push(name.clone()),
            Err(e) => return Err(e),
        }
    }
    let Some((ppath, pfile)) = opened else {
        return Err(Error::new(
            Code::SnapshotNotFound,
            format!(
                "{}: its parent cannot be found (tried {} beside it)",
                child.display(),
                tried.join(", ")
            ),
        ));
    };
    let mut head = [0u8; 8];
    let n = crate::format::read_full_at(&pfile, &mut head, 0)
        .map_err(|e| Error::io(&ppath, "reading the header of", e))?;
    if n < 8 || &head != super::SIGNATURE {
        return Err(Error::unsupported(
            child,
            format!(
                "its parent {} is not a VHDX file; a VHDX differencing file's parent must be one",
                ppath.display()
            ),
        ));
    }
    let parent = open_layer(pfile, &ppath, chain, gate)?;
    let data_guid = guid_string(&parent.data_write_guid);
    let matches = |l: &str| l.eq_ignore_ascii_case(&data_guid);
    if !matches(linkage) && !linkage2.is_some_and(matches) {
        return Err(Error::corrupt(
            child,
            format!(
                "parent_linkage {linkage} is not the DataWriteGuid {data_guid} of its parent {}: the parent changed after this file was made from it",
                ppath.display()
            ),
        ));
    }
    Ok(parent)
}

/// Names to try for the parent, in the specification's order: relative_path (with `\` read as
/// `/`), then the file names of absolute_win32_path and volume_path, looked up beside the child
/// (Windows drive and volume names mean nothing here; Hyper-V files are moved together).
fn parent_candidates<'a>(value: &impl Fn(&str) -> Option<&'a str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = value("relative_path") {
        let r = r.replace('\\', "/");
        out.push(r.strip_prefix("./").map(str::to_string).unwrap_or(r));
    }
    for k in ["absolute_win32_path", "volume_path"] {
        if let Some(p) = value(k) {
            let base = p.rsplit(['\\', '/']).next().unwrap_or("");
            if !base.is_empty() && !out.iter().any(|o| o == base) {
                out.push(base.to_string());
            }
        }
    }
    out
}

/// An opened VHDX file (one layer of a chain; its parent below it).
pub(crate) struct VhdxSource {
    file: VhdxFile,
    geo: Geometry,
    bat: Vec<u64>,
    virtual_size: u64,
    /// The current header's DataWriteGuid, which a child's parent_linkage names.
    data_write_guid: Guid,
    parent: Option<Box<VhdxSource>>,
}

/// What a run of a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// In this file at the host offset.
    Host(u64),
    Zero,
    /// Not in this file: the parent's, or zeros.
    Below,
}

impl VhdxSource {
    /// What is at guest `pos` (< virtual size), and up to where (at most `limit`, and the end of
    /// its block, or of its sector run in a partially present block).
    fn run(&self, pos: u64, limit: u64) -> Result<(Run, u64)> {
        let bs = self.geo.block_size;
        let block = pos / bs;
        let block_end = ((block + 1) * bs).min(limit);
        let e = self.bat[self.geo.payload_index(block)];
        let host = (e >> BAT_OFFSET_SHIFT) * ALIGN + pos % bs;
        match e & 7 {
            PAYLOAD_FULLY_PRESENT => Ok((Run::Host(host), block_end)),
            PAYLOAD_ZERO => Ok((Run::Zero, block_end)),
            PAYLOAD_PARTIALLY_PRESENT => {
                let (present, end) = self.bitmap_run(block, pos, block_end)?;
                Ok((if present { Run::Host(host) } else { Run::Below }, end))
            }
            _ => Ok((Run::Below, block_end)),
        }
    }

    /// In a partially present block: whether the sector at `pos` is in this file, and where the
    /// run of sectors like it ends (at most `end`).
    fn bitmap_run(&self, block: u64, pos: u64, end: u64) -> Result<(bool, u64)> {
        let ss = self.geo.logical_sector;
        let sb = self.bat[self.geo.bitmap_index(block)];
        if sb & 7 != SB_PRESENT {
            return Err(self.file.corrupt(format_args!(
                "payload block {block} is partially present but its sector bitmap block is not present"
            )));
        }
        let first_bit = (block % self.geo.chunk_ratio) * (self.geo.block_size / ss);
        let s0 = first_bit + (pos % self.geo.block_size) / ss;
        let s1 = first_bit + (end - 1) % self.geo.block_size / ss + 1;
        let (b0, b1) = (s0 / 8, s1.div_ceil(8));
        let at = (sb >> BAT_OFFSET_SHIFT) * ALIGN + b0;
        let bits = self
            .file
            .read_vec(at, (b1 - b0) as usize, "a sector bitmap")?;
        let bit = |s: u64| bits[((s / 8) - b0) as usize] >> (s % 8) & 1 == 1;
        let present = bit(s0);
        let mut s = s0 + 1;
        while s < s1 && bit(s) == present {
            s += 1;
        }
        let run_end = (pos - pos % ss) + (s - s0) * ss;
        Ok((present, run_end.min(end)))
    }

    /// The parent, as what lies below this file.
    fn below(&self) -> Option<&dyn BlockSource> {
        self.parent.as_deref().map(|p| p as &dyn BlockSource)
    }

    fn read_piece(&self, run: Run, pos: u64, buf: &mut [u8]) -> Result<()> {
        match run {
            Run::Host(h) => self.file.read_into(h, buf, "payload data"),
            Run::Zero => {
                buf.fill(0);
                Ok(())
            }
            Run::Below => crate::format::read_below(self.below(), pos, buf),
        }
    }
}

impl BlockSource for VhdxSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit =
            crate::format::extent_limit(&self.file.path, self.virtual_size, offset, max_len)?;
        let (first, mut end) = self.run(offset, limit)?;
        if first == Run::Below {
            return crate::format::extent_below(self.below(), offset, end);
        }
        let kind = match first {
            Run::Host(_) => ExtentKind::Data,
            _ => ExtentKind::Zero,
        };
        // Whole blocks of the same kind merge, a bounded number of them.
        let mut merged = 1;
        while end < limit && end.is_multiple_of(self.geo.block_size) && merged < MAX_MERGED_BLOCKS {
            let (next, next_end) = self.run(end, limit)?;
            let same = matches!(
                (first, next),
                (Run::Host(_), Run::Host(_)) | (Run::Zero, Run::Zero)
            );
            if !same {
                break;
            }
            end = next_end;
            merged += 1;
        }
        Ok(Extent {
            start: offset,
            len: end - offset,
            kind,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.virtual_size {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: read of {} bytes at {offset} passes the virtual size",
                    self.file.path.display(),
                    buf.len()
                ),
            ));
        }
        let mut pos = offset;
        while pos < end {
            let (run, run_end) = self.run(pos, end)?;
            let piece = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            self.read_piece(run, pos, piece)?;
            pos = run_end;
        }
        Ok(())
    }
}
