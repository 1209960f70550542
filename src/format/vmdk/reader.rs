//! Opening a VMDK disk: a sparse extent file (monolithicSparse, streamOptimized) or a text
//! descriptor with FLAT, SPARSE and ZERO extents (monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs),
//! and its parent (`parentFileNameHint`) for snapshot chains. Every extent file and parent opens
//! through the backing gate, resolved against the descriptor's directory. [`VmdkSource`] answers
//! "what is at this guest offset" extent by extent, resolving unallocated grains through the parent.

use crate::format::input::{Input, RandomRead};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::descriptor::{self, Descriptor, ExtentType};
use super::header::{MAGIC, MAX_DESCRIPTOR_BYTES, SECTOR};
use super::sparse::{read_exact, SparseExtent};
use crate::error::{Code, Error, Result};
use crate::format::{
    self, gate::BackingGate, raw::RawSource, BlockSource, ChainEntry, Extent, ExtentKind, Format,
    Opened, MAX_CHAIN_DEPTH,
};

/// The create types kiln reads.
const CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
];

enum PartData {
    /// Guest bytes as they are, `offset` bytes into a file.
    Flat {
        raw: RawSource,
        offset: u64,
    },
    Sparse(Box<SparseExtent>),
    Zero,
}

/// One extent, at guest bytes `[start, start + len)`.
struct Part {
    start: u64,
    len: u64,
    data: PartData,
}

/// An opened VMDK disk (one layer of a chain; its parent below it).
pub(crate) struct VmdkSource {
    path: PathBuf,
    size: u64,
    parts: Vec<Part>,
    parent: Option<Box<dyn BlockSource>>,
    /// This file, then its parent's layers.
    layers: Vec<ChainEntry>,
    /// The descriptor's CID, which a child's parentCID must repeat.
    cid: Option<u32>,
}

/// Where a piece of the guest disk is read from.
enum Origin {
    Part(usize),
    Parent,
    Zeros,
}

/// Opens a VMDK source (and its extents and parents) read-only.
pub fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &BackingGate,
) -> Result<Opened> {
    crate::format::no_snapshot(path, snapshot, "a VMDK file")?;
    let mut files = Files::default();
    let src = open_layer(file, path, &mut files, gate)?;
    let size = src.size;
    Ok(Opened::whole(
        Box::new(src),
        path,
        Format::Vmdk,
        size,
        files.chain,
    ))
}

/// The layers of a VMDK chain (the file named, then each parent), without extent files: what
/// `inspect` lists as the backing chain.
pub(crate) fn layers(path: &Path, gate: &BackingGate) -> Result<Vec<ChainEntry>> {
    let file = format::input::open(path)?;
    Ok(open_layer(file, path, &mut Files::default(), gate)?.layers)
}

/// Every file read while opening a disk, in order (the source's chain, for stamps and the
/// manifest), and what the loop and depth checks need.
#[derive(Default)]
pub(crate) struct Files {
    chain: Vec<ChainEntry>,
    seen: HashSet<PathBuf>,
    layers: usize,
}

impl Files {
    fn canon(path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
    }

    /// Records a layer (the disk named, or a parent): refuses a loop and a chain too deep.
    fn layer(&mut self, path: &Path, format: Format) -> Result<()> {
        if self.layers >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(
                path,
                format!("the parent chain is deeper than {MAX_CHAIN_DEPTH} files; flatten it first with `qemu-img convert`"),
            ));
        }
        let canon = Self::canon(path);
        if !self.seen.insert(canon.clone()) {
            return Err(Error::corrupt(
                path,
                format!(
                    "parent loop: {} is reached again through its own chain",
                    canon.display()
                ),
            ));
        }
        self.layers += 1;
        self.chain.push(ChainEntry {
            path: path.to_path_buf(),
            format,
        });
        Ok(())
    }

    /// Records an extent file (several extents may share one file).
    fn extent(&mut self, path: &Path, format: Format) {
        if self.seen.insert(Self::canon(path)) {
            self.chain.push(ChainEntry {
                path: path.to_path_buf(),
                format,
            });
        }
    }
}

/// Opens one layer: the file itself, its extents, then its parent.
pub(crate) fn open_layer(
    file: Input,
    path: &Path,
    files: &mut Files,
    gate: &BackingGate,
) -> Result<VmdkSource> {
    files.layer(path, Format::Vmdk)?;
    let top = files
        .chain
        .first()
        .map_or(path, |c| c.path.as_path())
        .to_path_buf();
    let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
    let mut head = [0u8; 4];
    let n = format::read_full_at(&file, &mut head, 0)
        .map_err(|e| Error::io(path, "reading the header of", e))?;
    let (parts, desc) = if n == 4 && u32::from_le_bytes(head) == MAGIC {
        let sparse = SparseExtent::open(file, path)?;
        let desc = sparse.descriptor.clone().unwrap_or_default();
        let len = sparse.capacity;
        (
            vec![Part {
                start: 0,
                len,
                data: PartData::Sparse(Box::new(sparse)),
            }],
            desc,
        )
    } else {
        let mut start = vec![0u8; format::PROBE_BYTES];
        let n = format::read_full_at(&file, &mut start, 0)
            .map_err(|e| Error::io(path, "reading the header of", e))?;
        if !descriptor::looks_like_descriptor(&start[..n]) {
            return Err(Error::corrupt(
                path,
                "magicNumber is not \"KDMV\" (a sparse extent) and the file does not start as a descriptor (\"# Disk DescriptorFile\")",
            ));
        }
        if size > MAX_DESCRIPTOR_BYTES {
            return Err(Error::corrupt(
                path,
                format!("a descriptor file of {size} bytes is over {MAX_DESCRIPTOR_BYTES} bytes"),
            ));
        }
        let text = read_exact(&file, path, 0, size as usize, "the descriptor")?;
        let desc = descriptor::parse(&text, path)?;
        check_create_type(&desc, path)?;
        (open_extents(&desc, path, &top, files, gate)?, desc)
    };
    let size = parts.last().map_or(0, |p| p.start + p.len);
    let mut layers = vec![ChainEntry {
        path: path.to_path_buf(),
        format: Format::Vmdk,
    }];
    let parent = match desc.parent() {
        Some(name) => {
            let (p, below) = open_parent(path, &top, name, desc.parent_cid, files, gate)?;
            layers.extend(below);
            Some(p)
        }
        None => None,
    };
    Ok(VmdkSource {
        path: path.to_path_buf(),
        size,
        parts,
        parent,
        layers,
        cid: desc.cid,
    })
}

fn check_create_type(desc: &Descriptor, path: &Path) -> Result<()> {
    match desc.create_type.as_deref() {
        Some(t) if CREATE_TYPES.contains(&t) => Ok(()),
        Some(t) => Err(Error::unsupported(
            path,
            format!(
                "createType \"{t}\" (kiln reads {})",
                CREATE_TYPES.join(", ")
            ),
        )),
        None => Err(Error::corrupt(path, "the descriptor has no createType")),
    }
}

/// Opens each extent line's file through the gate and checks it holds what the line says.
fn open_extents(
    desc: &Descriptor,
    path: &Path,
    top: &Path,
    files: &mut Files,
    gate: &BackingGate,
) -> Result<Vec<Part>> {
    if desc.extents.is_empty() {
        return Err(Error::corrupt(path, "the descriptor has no extent lines"));
    }
    let mut parts = Vec::with_capacity(desc.extents.len());
    let mut start = 0u64;
    for (i, e) in desc.extents.iter().enumerate() {
        let len = e.sectors * SECTOR;
        let data = match (e.kind, &e.file) {
            (ExtentType::Zero, _) | (_, None) => PartData::Zero,
            (kind, Some(name)) => {
                let (epath, file) = gate.open(top, path, name.as_bytes())?;
                let bad = |what: String| {
                    Error::corrupt(path, format!("extent {} ('{name}'): {what}", i + 1))
                };
                if kind == ExtentType::Flat {
                    files.extent(&epath, Format::Raw);
                    let raw = RawSource::new(file, &epath)?;
                    let offset = e.offset.saturating_mul(SECTOR);
                    if offset
                        .checked_add(len)
                        .is_none_or(|end| end > raw.virtual_size())
                    {
                        return Err(bad(format!(
                            "{} sectors at sector {} pass the end of its file ({} bytes)",
                            e.sectors,
                            e.offset,
                            raw.virtual_size()
                        )));
                    }
                    PartData::Flat { raw, offset }
                } else {
                    files.extent(&epath, Format::Vmdk);
                    let s = SparseExtent::open(file, &epath)?;
                    if s.capacity < len {
                        return Err(bad(format!(
                            "its capacity of {} sectors is smaller than the extent's {} sectors",
                            s.header.capacity, e.sectors
                        )));
                    }
                    PartData::Sparse(Box::new(s))
                }
            }
        };
        if len > 0 {
            parts.push(Part { start, len, data });
        }
        start += len;
    }
    Ok(parts)
}

/// Opens the parent named by `parentFileNameHint` through the gate: a VMDK as another layer, any
/// other format through its own reader.
fn open_parent(
    path: &Path,
    top: &Path,
    name: &str,
    parent_cid: Option<u32>,
    files: &mut Files,
    gate: &BackingGate,
) -> Result<(Box<dyn BlockSource>, Vec<ChainEntry>)> {
    let (ppath, file) = gate.open(top, path, name.as_bytes())?;
    match format::detect(&file, &ppath)? {
        Format::Vmdk => {
            let mut src = open_layer(file, &ppath, files, gate)?;
            // VMware's rule: a parent written to since the child was made has a new CID, and the
            // child's data no longer applies to it.
            if let (Some(want), Some(have)) = (parent_cid, src.cid) {
                if want != have {
                    return Err(Error::corrupt(
                        path,
                        format!(
                            "parentCID {want:08x} is not the CID {have:08x} of its parent {}; the parent was changed after this disk was made from it",
                            ppath.display()
                        ),
                    ));
                }
            }
            let layers = std::mem::take(&mut src.layers);
            Ok((Box::new(src), layers))
        }
        other => {
            let o = format::open_as(other, file, &ppath, None, gate)?;
            for c in &o.info.chain {
                files.layer(&c.path, c.format)?;
            }
            Ok((o.source, o.info.chain))
        }
    }
}

impl VmdkSource {
    fn part_at(&self, offset: u64) -> Result<usize> {
        let i = self.parts.partition_point(|p| p.start + p.len <= offset);
        if i < self.parts.len() {
            Ok(i)
        } else {
            Err(Error::new(
                Code::Internal,
                format!(
                    "{}: guest offset {offset} is past the disk",
                    self.path.display()
                ),
            ))
        }
    }

    /// The extent at `offset` and where its bytes come from.
    fn piece(&self, offset: u64, max_len: u64) -> Result<(Extent, Origin)> {
        let i = self.part_at(offset)?;
        let p = &self.parts[i];
        let rel = offset - p.start;
        let max = max_len.min(p.len - rel);
        let (kind, len) = match &p.data {
            PartData::Zero => (ExtentKind::Zero, max),
            PartData::Flat { raw, offset: fo } => {
                let e = raw.extent(fo + rel, max)?;
                // A hole in a flat extent is this layer's zeros, not the parent's bytes.
                let kind = match e.kind {
                    ExtentKind::Unallocated if self.parent.is_some() => ExtentKind::Zero,
                    k => k,
                };
                (kind, e.len)
            }
            PartData::Sparse(s) => s.run(rel, max)?,
        };
        let ext = |kind| Extent {
            start: offset,
            len,
            kind,
        };
        match (kind, &self.parent) {
            (ExtentKind::Unallocated, Some(parent)) => {
                let psize = parent.virtual_size();
                if offset >= psize {
                    return Ok((ext(ExtentKind::Unallocated), Origin::Zeros));
                }
                let e = parent.extent(offset, len.min(psize - offset))?;
                Ok((e, Origin::Parent))
            }
            (ExtentKind::Data, _) => Ok((ext(kind), Origin::Part(i))),
            _ => Ok((ext(kind), Origin::Zeros)),
        }
    }
}

impl BlockSource for VmdkSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        crate::format::extent_limit(&self.path, self.size, offset, max_len)?;
        Ok(self.piece(offset, max_len)?.0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (e, origin) = self.piece(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + e.len as usize];
            match origin {
                Origin::Zeros => out.fill(0),
                Origin::Parent => match &self.parent {
                    Some(p) => p.read_at(pos, out)?,
                    None => out.fill(0),
                },
                Origin::Part(i) => {
                    let p = &self.parts[i];
                    match &p.data {
                        PartData::Flat { raw, offset: fo } => {
                            raw.read_at(fo + pos - p.start, out)?
                        }
                        PartData::Sparse(s) => s.read(pos - p.start, out)?,
                        PartData::Zero => out.fill(0),
                    }
                }
            }
            done += e.len as usize;
        }
        Ok(())
    }
}
