//! Opening a VHD (and, for a differencing disk, its parent chain) and reading it: the
//! [`BlockSource`] of a fixed, dynamic or differencing disk.
//!
//! Order of the checks on open: the chain (loop, depth), the footer (the copy at offset 0 when the
//! file starts with `conectix`, else the last 512 bytes), the dynamic header, every BAT entry, then
//! the parent (locators, the gate, the parent's own checks, its UUID).

use crate::format::input::{Input, RandomRead};
use std::path::{Path, PathBuf};

use super::header::{
    be32, is_footer, DynHeader, Footer, BAT_UNUSED, DYN_HEADER_SIZE, FOOTER_COOKIE, FOOTER_SIZE,
    SECTOR, TYPE_DIFFERENCING, TYPE_FIXED,
};
use crate::error::{Code, Error, Result};
use crate::format::chain::{self, Chain};
use crate::format::qcow2::file::read_exact;
use crate::format::{
    self, gate::BackingGate, raw::RawSource, BlockSource, Extent, ExtentKind, Format, Opened,
    MAX_CHAIN_DEPTH,
};

/// Longest parent locator kiln reads: 64 KiB, a Windows path of 32 Ki UTF-16 units.
const MAX_LOCATOR: u32 = 64 << 10;
/// Most blocks one extent call looks at before returning a shorter extent.
const MAX_BLOCKS_PER_EXTENT: u64 = 64 << 10;

/// Opens a VHD (and its parent chain) read-only; VHDs have no internal snapshots.
pub(crate) fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &BackingGate,
) -> Result<Opened> {
    crate::format::no_snapshot(path, snapshot, "a VHD")?;
    let mut chain = Chain::new();
    let (src, _) = open_layer(file, path, &mut chain, gate)?;
    let size = src.virtual_size;
    let chain = chain.into_files();
    Ok(Opened::whole(Box::new(src), path, Format::Vhd, size, chain))
}

/// The footer that describes the file: the copy at offset 0 of a dynamic or differencing disk,
/// else the last 512 bytes (a fixed disk's only footer).
fn read_footer(file: &dyn RandomRead, path: &Path, size: u64) -> Result<Footer> {
    if size < FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            path,
            format!("the file is {size} bytes, shorter than a VHD footer"),
        ));
    }
    let head = read_exact(file, path, 0, FOOTER_SIZE, "the footer copy")?;
    let at = size - FOOTER_SIZE as u64;
    let tail = read_exact(file, path, at, FOOTER_SIZE, "the footer")?;
    if head.starts_with(FOOTER_COOKIE) && be32(&head, 60) != TYPE_FIXED {
        return match Footer::parse(&head, path, 0) {
            // A fixed disk whose guest data happens to start with `conectix` (a VHD stored in a
            // VHD) has its own valid footer at the end.
            Err(_) if is_footer(&tail, Some(TYPE_FIXED)) => Footer::parse(&tail, path, at),
            r => r,
        };
    }
    let f = Footer::parse(&tail, path, at)?;
    if f.disk_type != TYPE_FIXED {
        return Err(Error::corrupt(
            path,
            format!(
                "footer at offset {at}: disk_type {} needs the footer copy at offset 0, which is missing",
                f.disk_type
            ),
        ));
    }
    Ok(f)
}

/// A dynamic or differencing disk's block size (what `qemu-img info` calls its cluster size); None
/// for a fixed disk.
pub(crate) fn block_size(file: &dyn RandomRead, path: &Path) -> Result<Option<u64>> {
    let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
    let footer = read_footer(file, path, size)?;
    if footer.disk_type == TYPE_FIXED {
        return Ok(None);
    }
    let at = footer.data_offset;
    let hb = read_exact(file, path, at, DYN_HEADER_SIZE, "the dynamic disk header")?;
    let h = DynHeader::parse(&hb, path, at, footer.virtual_size(), size)?;
    Ok(Some(u64::from(h.block_size)))
}

/// Opens one VHD of a chain; returns it and its UUID (for the child's `parent_uuid` check).
pub(crate) fn open_layer(
    file: Input,
    path: &Path,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<(VhdSource, [u8; 16])> {
    chain.note(path, Format::Vhd)?;
    let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
    let footer = read_footer(&file, path, size)?;
    let virtual_size = footer.virtual_size();
    if footer.disk_type == TYPE_FIXED {
        let data = size - FOOTER_SIZE as u64;
        if virtual_size > data {
            return Err(Error::corrupt(
                path,
                format!("footer current_size {virtual_size} is larger than the {data} bytes of data before the footer"),
            ));
        }
        let src = VhdSource {
            path: path.to_path_buf(),
            virtual_size,
            layout: Layout::Fixed(RawSource::new(file, path)?),
        };
        return Ok((src, footer.uuid));
    }
    let at = footer.data_offset;
    if at
        .checked_add(DYN_HEADER_SIZE as u64)
        .is_none_or(|e| e > size)
    {
        return Err(Error::corrupt(
            path,
            format!("footer data_offset {at:#x} puts the dynamic disk header past the end of the file ({size} bytes)"),
        ));
    }
    let hb = read_exact(&file, path, at, DYN_HEADER_SIZE, "the dynamic disk header")?;
    let h = DynHeader::parse(&hb, path, at, virtual_size, size)?;
    let bat = read_bat(&file, path, &h, size)?;
    let parent = if footer.disk_type == TYPE_DIFFERENCING {
        Some(open_parent(&file, path, &h, size, chain, gate)?)
    } else {
        None
    };
    let src = VhdSource {
        path: path.to_path_buf(),
        virtual_size,
        layout: Layout::Dynamic(Dynamic {
            file,
            block_size: u64::from(h.block_size),
            bitmap_size: h.bitmap_size(),
            bat,
            parent,
        }),
    };
    Ok((src, footer.uuid))
}

/// Reads the BAT (bounded by the header's checks) and checks that every block lies in the file.
fn read_bat(file: &dyn RandomRead, path: &Path, h: &DynHeader, size: u64) -> Result<Vec<u32>> {
    let n = h.max_table_entries as usize;
    let raw = read_exact(file, path, h.table_offset, n * 4, "the BAT")?;
    let span = h.bitmap_size() + u64::from(h.block_size);
    let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
    for (i, &e) in bat.iter().enumerate() {
        if e != BAT_UNUSED && u64::from(e) * SECTOR + span > size {
            return Err(Error::corrupt(
                path,
                format!("BAT entry {i} (sector {e:#x}) puts its block past the end of the file ({size} bytes)"),
            ));
        }
    }
    Ok(bat)
}

/// The names a differencing disk gives its parent, best first: relative (`W2ru`), then absolute
/// (`W2ku`) locators, UTF-16LE Windows paths. A Windows absolute path (`C:\...`) cannot be opened
/// here; its file name is tried beside the child instead.
fn parent_names(
    file: &dyn RandomRead,
    path: &Path,
    h: &DynHeader,
    size: u64,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for want in [b"W2ru", b"W2ku"] {
        for (i, l) in h.locators.iter().enumerate() {
            if &l.platform != want {
                continue;
            }
            let bad = |what: &str| {
                Error::corrupt(
                    path,
                    format!(
                        "parent locator {i} ({}): {what}",
                        String::from_utf8_lossy(want)
                    ),
                )
            };
            let len = l.data_length;
            if len == 0 || len > MAX_LOCATOR || len % 2 != 0 {
                return Err(bad(&format!(
                    "data_length {len} is not an even length from 2 to 65536 bytes"
                )));
            }
            if l.data_offset
                .checked_add(u64::from(len))
                .is_none_or(|e| e > size)
            {
                return Err(bad(&format!(
                    "data_offset {:#x} runs past the end of the file",
                    l.data_offset
                )));
            }
            let b = read_exact(file, path, l.data_offset, len as usize, "a parent locator")?;
            let units: Vec<u16> = b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let s = String::from_utf16(&units).map_err(|_| bad("the path is not valid UTF-16"))?;
            let s = s.trim_end_matches('\0').replace('\\', "/");
            let s = match s.strip_prefix("./") {
                Some(rest) => rest.to_string(),
                None => s,
            };
            let windows_abs = s.len() > 2 && s.as_bytes()[1] == b':' && s.as_bytes()[2] == b'/';
            let name = if windows_abs {
                s.rsplit('/').next().unwrap_or_default().to_string()
            } else {
                s
            };
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// Opens a differencing disk's parent through the gate (any format kiln reads) and checks that it
/// is the disk the child was made from.
fn open_parent(
    file: &dyn RandomRead,
    path: &Path,
    h: &DynHeader,
    size: u64,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<Box<dyn BlockSource>> {
    let names = parent_names(file, path, h, size)?;
    if names.is_empty() {
        return Err(Error::corrupt(
            path,
            "a differencing disk without a W2ru or W2ku parent locator",
        ));
    }
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(
            path,
            format!("the parent chain is deeper than {MAX_CHAIN_DEPTH} files; flatten it first"),
        ));
    }
    let top = chain.top().unwrap_or(path).to_path_buf();
    let mut opened = None;
    for name in &names {
        match gate.open(&top, path, name.as_bytes()) {
            Ok(o) => {
                opened = Some(o);
                break;
            }
            Err(e) if e.code() == Code::SnapshotNotFound => continue,
            Err(e) => return Err(e),
        }
    }
    let Some((ppath, pfile)) = opened else {
        return Err(Error::new(
            Code::SnapshotNotFound,
            format!(
                "{}: its parent cannot be found; tried {}",
                path.display(),
                names.join(", ")
            ),
        ));
    };
    let fmt = format::detect(&pfile, &ppath)?;
    if fmt != Format::Vhd {
        return chain::open_layer_as(fmt, pfile, &ppath, chain, gate);
    }
    let (src, uuid) = open_layer(pfile, &ppath, chain, gate)?;
    if uuid != h.parent_uuid {
        return Err(Error::corrupt(
            path,
            format!(
                "dynamic disk header parent_uuid {} is not the UUID of its parent {} ({})",
                hex(&h.parent_uuid),
                ppath.display(),
                hex(&uuid)
            ),
        ));
    }
    Ok(Box::new(src))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An opened VHD (one layer of a chain).
pub(crate) struct VhdSource {
    path: PathBuf,
    virtual_size: u64,
    layout: Layout,
}

enum Layout {
    /// The guest disk is the file's first `virtual_size` bytes.
    Fixed(RawSource),
    Dynamic(Dynamic),
}

struct Dynamic {
    file: Input,
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<u32>,
    /// A differencing disk's parent: where sectors its bitmaps leave unset are read.
    parent: Option<Box<dyn BlockSource>>,
}

/// Where a run of guest bytes is.
enum Seg {
    /// At this offset in the file.
    Host(u64),
    /// Not in this file: the parent's, or zeros.
    Below,
}

impl Dynamic {
    /// The run at `pos` (< `limit`): its place and where it ends (at most the end of its block).
    fn seg(&self, path: &Path, pos: u64, limit: u64) -> Result<(Seg, u64)> {
        let idx = pos / self.block_size;
        let block_start = idx * self.block_size;
        let entry = self.bat.get(idx as usize).copied().unwrap_or(BAT_UNUSED);
        if entry == BAT_UNUSED {
            // Merge unallocated blocks that follow (bounded work per call).
            let mut end = (block_start + self.block_size).min(limit);
            let mut i = idx + 1;
            while end < limit
                && i - idx < MAX_BLOCKS_PER_EXTENT
                && self.bat.get(i as usize).is_none_or(|&e| e == BAT_UNUSED)
            {
                end = ((i + 1) * self.block_size).min(limit);
                i += 1;
            }
            return Ok((Seg::Below, end));
        }
        let block_end = (block_start + self.block_size).min(limit);
        let bitmap_at = u64::from(entry) * SECTOR;
        let bitmap = read_exact(
            &self.file,
            path,
            bitmap_at,
            self.bitmap_size as usize,
            "a sector bitmap",
        )?;
        // Bit 7 of byte 0 is the block's first sector.
        let bit = |s: u64| bitmap[(s / 8) as usize] >> (7 - s % 8) & 1 == 1;
        let first = (pos - block_start) / SECTOR;
        let set = bit(first);
        let mut s = first + 1;
        while block_start + s * SECTOR < block_end && bit(s) == set {
            s += 1;
        }
        let end = (block_start + s * SECTOR).min(block_end);
        if set {
            Ok((
                Seg::Host(bitmap_at + self.bitmap_size + (pos - block_start)),
                end,
            ))
        } else {
            Ok((Seg::Below, end))
        }
    }
}

impl BlockSource for VhdSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit = crate::format::extent_limit(&self.path, self.virtual_size, offset, max_len)?;
        let d = match &self.layout {
            Layout::Fixed(raw) => return raw.extent(offset, limit - offset),
            Layout::Dynamic(d) => d,
        };
        match d.seg(&self.path, offset, limit)? {
            (Seg::Host(_), end) => Ok(Extent {
                start: offset,
                len: end - offset,
                kind: ExtentKind::Data,
            }),
            (Seg::Below, end) => format::extent_below(d.parent.as_deref(), offset, end),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size)
            .ok_or_else(|| {
                Error::new(
                    Code::Internal,
                    format!(
                        "{}: read of {} bytes at {offset} passes the virtual size {}",
                        self.path.display(),
                        buf.len(),
                        self.virtual_size
                    ),
                )
            })?;
        let d = match &self.layout {
            Layout::Fixed(raw) => return raw.read_at(offset, buf),
            Layout::Dynamic(d) => d,
        };
        let mut pos = offset;
        while pos < end {
            let (seg, seg_end) = d.seg(&self.path, pos, end)?;
            let out = &mut buf[(pos - offset) as usize..(seg_end - offset) as usize];
            match (seg, &d.parent) {
                (Seg::Host(h), _) => {
                    let n = format::read_full_at(&d.file, out, h)
                        .map_err(|e| Error::io(&self.path, &format!("reading at offset {h}"), e))?;
                    // Every block was checked to lie in the file on open: it shrank since.
                    if n < out.len() {
                        return Err(Error::new(
                            Code::SourceChanged,
                            format!(
                                "{}: file ended at offset {} while reading at {h}; it shrank while being copied",
                                self.path.display(),
                                h + n as u64
                            ),
                        ));
                    }
                }
                (Seg::Below, p) => format::read_below(p.as_deref(), pos, out)?,
            }
            pos = seg_end;
        }
        Ok(())
    }
}
