//! The qcow2 reader: read-only, every value from the file bounded before it is used.
//!
//! A guest offset is classified unit by unit (a cluster, or a subcluster with extended L2) as data
//! at a host offset, compressed, zero, or unallocated; unallocated units read through the backing
//! file, if any. `extent` merges runs of one kind so the copier sees few, long extents.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::{OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::error::{Code, Error, Result};
use crate::format::raw::RawSource;
use crate::format::{
    detect, open_read_only, read_full_at, BlockSource, ChainEntry, Extent, ExtentKind, Format,
    Opened, SourceInfo, MAX_CHAIN_DEPTH,
};

/// Largest L1 table read (qemu's QCOW_MAX_L1_SIZE, 32 MiB).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Most internal snapshots (qemu's QCOW_MAX_SNAPSHOTS).
const MAX_SNAPSHOTS: u64 = 65536;
/// Largest snapshot extra data (qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA).
const MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// Longest backing file name (as qemu).
const MAX_BACKING_NAME: u64 = 1023;
/// Largest virtual size accepted (2^61: far beyond any real disk, far from overflow).
const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// L2 tables cached per image before the cache is emptied.
const L2_CACHE_BYTES: usize = 64 << 20;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1_size: u64,
    l1_offset: u64,
    nb_snapshots: u64,
    snapshots_offset: u64,
    zstd: bool,
    extended_l2: bool,
    backing: Option<String>,
    backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses and checks the header (and its extensions) from the first cluster's bytes.
fn parse_header(first: &[u8], path: &Path, file_len: u64) -> Result<Header> {
    let corrupt = |w: String| Error::corrupt(path, w);
    if first.len() < 72 || be32(first, 0) != MAGIC {
        return Err(corrupt("no qcow2 magic at offset 0".into()));
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(
            path,
            format!("qcow2 version {version} is not supported (only 2 and 3)"),
        ));
    }
    let cluster_bits = be32(first, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "header field cluster_bits is {cluster_bits}, outside 9..21"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let size = be64(first, 24);
    if size > MAX_VIRTUAL_SIZE {
        return Err(corrupt(format!(
            "header field size ({size}) is beyond any disk"
        )));
    }
    if be32(first, 32) != 0 {
        return Err(Error::unsupported(
            path,
            "encrypted qcow2 images are not supported (crypt_method is set); decrypt it first with `qemu-img convert --object secret,... --image-opts`",
        ));
    }
    let l1_size = u64::from(be32(first, 36));
    let l1_offset = be64(first, 40);
    let nb_snapshots = u64::from(be32(first, 60));
    let snapshots_offset = be64(first, 64);
    let (mut incompat, header_length, mut compression) = (0u64, 72u64, 0u8);
    let mut header_length = header_length;
    if version == 3 {
        if first.len() < 104 {
            return Err(corrupt("the v3 header is cut short".into()));
        }
        incompat = be64(first, 72);
        let refcount_order = be32(first, 96);
        if refcount_order > 6 {
            return Err(corrupt(format!(
                "header field refcount_order is {refcount_order}, above 6"
            )));
        }
        header_length = u64::from(be32(first, 100));
        if header_length < 104 || header_length > cs.min(first.len() as u64) {
            return Err(corrupt(format!(
                "header field header_length is {header_length}"
            )));
        }
        if header_length > 104 {
            compression = first[104];
        }
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt(
            "the image is marked corrupt (incompatible feature bit 1)".into(),
        ));
    }
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(Error::unsupported(
            path,
            "qcow2 images with an external data file are not supported",
        ));
    }
    let known = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;
    if incompat & !known != 0 {
        let bit = (incompat & !known).trailing_zeros();
        return Err(Error::unsupported(
            path,
            format!("unknown incompatible qcow2 feature bit {bit}"),
        ));
    }
    let zstd = match (incompat & INCOMPAT_COMPRESSION != 0, compression) {
        (false, 0) => false,
        (true, 1) => true,
        (true, 0) => false,
        (_, t) => {
            return Err(Error::unsupported(
                path,
                format!("compression type {t} is not zlib (0) or zstd (1)"),
            ))
        }
    };
    let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(corrupt(format!(
            "extended L2 needs clusters of 16 KiB or more, not {cs}"
        )));
    }
    // L1 table: bounded, large enough for the disk, inside the file.
    let per_l2 = cs / if extended_l2 { 16 } else { 8 };
    let needed = size.div_ceil(cs * per_l2);
    if l1_size > MAX_L1_ENTRIES || l1_size < needed {
        return Err(corrupt(format!("header field l1_size ({l1_size}) does not fit a {size}-byte disk (needs {needed}, at most {MAX_L1_ENTRIES})")));
    }
    if l1_size > 0
        && (!l1_offset.is_multiple_of(cs)
            || l1_offset < cs
            || l1_offset.saturating_add(l1_size * 8) > file_len)
    {
        return Err(corrupt(format!(
            "header field l1_table_offset ({l1_offset}) is unaligned or outside the file"
        )));
    }
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(corrupt(format!(
            "header field nb_snapshots ({nb_snapshots}) is above {MAX_SNAPSHOTS}"
        )));
    }
    if nb_snapshots > 0 && (!snapshots_offset.is_multiple_of(8) || snapshots_offset >= file_len) {
        return Err(corrupt(format!(
            "header field snapshots_offset ({snapshots_offset}) is unaligned or outside the file"
        )));
    }
    // Backing file name.
    let bf_offset = be64(first, 8);
    let bf_size = u64::from(be32(first, 16));
    let backing = if bf_offset == 0 {
        None
    } else {
        if bf_size > MAX_BACKING_NAME
            || bf_offset.saturating_add(bf_size) > cs.min(first.len() as u64)
        {
            return Err(corrupt(format!("the backing file name ({bf_size} bytes at {bf_offset}) is too long or outside the first cluster")));
        }
        let raw = &first[bf_offset as usize..(bf_offset + bf_size) as usize];
        Some(
            String::from_utf8(raw.to_vec())
                .map_err(|_| corrupt("the backing file name is not UTF-8".into()))?,
        )
    };
    // Header extensions, within the first cluster (and before the backing name when it is there).
    let ext_end = if bf_offset != 0 {
        bf_offset.min(cs)
    } else {
        cs
    }
    .min(first.len() as u64);
    let mut at = header_length;
    let mut backing_format = None;
    while at + 8 <= ext_end {
        let t = be32(first, at as usize);
        let len = u64::from(be32(first, at as usize + 4));
        if t == EXT_END {
            break;
        }
        let data = at + 8;
        if data + len > ext_end {
            return Err(corrupt(format!(
                "header extension {t:#x} at {at} runs past the first cluster"
            )));
        }
        match t {
            EXT_BACKING_FORMAT => {
                let raw = &first[data as usize..(data + len) as usize];
                backing_format = Some(String::from_utf8_lossy(raw).into_owned());
            }
            EXT_DATA_FILE => {
                return Err(Error::unsupported(
                    path,
                    "qcow2 images with an external data file are not supported",
                ));
            }
            _ => {}
        }
        at = data + len.next_multiple_of(8);
    }
    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        nb_snapshots,
        snapshots_offset,
        zstd,
        extended_l2,
        backing,
        backing_format,
    })
}

/// One internal snapshot's table entry.
#[derive(Debug, Clone)]
struct Snapshot {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u64,
    disk_size: Option<u64>,
}

fn read_snapshots(file: &File, path: &Path, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        let n = read_full_at(file, &mut fixed, at)
            .map_err(|e| Error::io(path, "reading the snapshot table", e))?;
        if n < 40 {
            return Err(Error::corrupt(
                path,
                format!("snapshot table entry {i} runs past the end of the file"),
            ));
        }
        let extra = u64::from(be32(&fixed, 36));
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(Error::corrupt(
                path,
                format!("snapshot {i}: extra data of {extra} bytes"),
            ));
        }
        let var = extra + id_len + name_len;
        let mut rest = vec![0u8; var as usize];
        let n = read_full_at(file, &mut rest, at + 40)
            .map_err(|e| Error::io(path, "reading the snapshot table", e))?;
        if (n as u64) < var {
            return Err(Error::corrupt(
                path,
                format!("snapshot table entry {i} runs past the end of the file"),
            ));
        }
        let disk_size = (extra >= 16).then(|| be64(&rest, 8));
        let id =
            String::from_utf8_lossy(&rest[extra as usize..(extra + id_len) as usize]).into_owned();
        let name =
            String::from_utf8_lossy(&rest[(extra + id_len) as usize..var as usize]).into_owned();
        let l1_offset = be64(&fixed, 0);
        let l1_size = u64::from(be32(&fixed, 8));
        out.push(Snapshot {
            id,
            name,
            l1_offset,
            l1_size,
            disk_size,
        });
        // Entries are 8-byte aligned; the last one's padding may be missing at the end of the file.
        at = (at + 40 + var).next_multiple_of(8);
        if at > file_len.next_multiple_of(8) {
            return Err(Error::corrupt(
                path,
                "the snapshot table runs past the end of the file",
            ));
        }
    }
    Ok(out)
}

/// What one unit (cluster, or subcluster with extended L2) holds in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Unallocated,
    Zero,
    Data(u64),
    Compressed(u64),
}

pub struct Qcow2Source {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    /// log2 of the unit: the cluster, or the subcluster with extended L2.
    unit_bits: u32,
    extended_l2: bool,
    zstd: bool,
    size: u64,
    file_len: u64,
    l1: Vec<u64>,
    backing: Option<Box<dyn BlockSource>>,
    backing_size: u64,
    cache: RwLock<HashMap<u64, Arc<[u64]>>>,
    cached: AtomicUsize,
}

/// Opens a qcow2 source (and its backing chain) read-only; `snapshot` names an internal snapshot
/// by name or ID.
pub fn open(file: File, path: &Path, snapshot: Option<&str>) -> Result<Opened> {
    let mut seen = HashSet::new();
    let (src, chain, name) = open_layer(file, path, snapshot, 1, &mut seen)?;
    let info = SourceInfo {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        snapshot: name,
        virtual_size: src.virtual_size(),
        chain,
    };
    Ok(Opened { source: src, info })
}

type Layer = (Box<dyn BlockSource>, Vec<ChainEntry>, Option<String>);

fn open_layer(
    file: File,
    path: &Path,
    snapshot: Option<&str>,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Layer> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !seen.insert(canon) {
        return Err(Error::corrupt(
            path,
            "the backing chain loops back to this file",
        ));
    }
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let mut first = vec![0u8; (1usize << MAX_CLUSTER_BITS).min(file_len as usize).max(72)];
    let n = read_full_at(&file, &mut first, 0)
        .map_err(|e| Error::io(path, "reading the header of", e))?;
    first.truncate(n);
    let h = parse_header(&first, path, file_len)?;
    let cs = 1u64 << h.cluster_bits;
    first.truncate(cs.min(n as u64) as usize);

    let (mut l1_offset, mut l1_size, mut size, mut snap_name) =
        (h.l1_offset, h.l1_size, h.size, None);
    if let Some(want) = snapshot {
        let snaps = read_snapshots(&file, path, &h, file_len)?;
        let s = snaps
            .iter()
            .find(|s| s.name == want)
            .or_else(|| snaps.iter().find(|s| s.id == want))
            .ok_or_else(|| {
                let list: Vec<String> = snaps
                    .iter()
                    .map(|s| format!("{} (ID {})", s.name, s.id))
                    .collect();
                Error::new(
                    Code::SnapshotNotFound,
                    format!(
                        "{}: no internal snapshot named or numbered '{want}'; it has {}",
                        path.display(),
                        if list.is_empty() {
                            "none".to_string()
                        } else {
                            list.join(", ")
                        }
                    ),
                )
            })?;
        size = s.disk_size.unwrap_or(h.size);
        let per_l2 = cs / if h.extended_l2 { 16 } else { 8 };
        if size > MAX_VIRTUAL_SIZE
            || s.l1_size > MAX_L1_ENTRIES
            || s.l1_size < size.div_ceil(cs * per_l2)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "snapshot '{}': L1 size {} does not fit its {size}-byte disk",
                    s.name, s.l1_size
                ),
            ));
        }
        if s.l1_size > 0
            && (!s.l1_offset.is_multiple_of(cs)
                || s.l1_offset < cs
                || s.l1_offset.saturating_add(s.l1_size * 8) > file_len)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "snapshot '{}': L1 table offset {} is unaligned or outside the file",
                    s.name, s.l1_offset
                ),
            ));
        }
        l1_offset = s.l1_offset;
        l1_size = s.l1_size;
        snap_name = Some(s.name.clone());
    }
    let mut raw_l1 = vec![0u8; (l1_size * 8) as usize];
    read_full_at(&file, &mut raw_l1, l1_offset)
        .map_err(|e| Error::io(path, "reading the L1 table of", e))?;
    let l1: Vec<u64> = raw_l1.chunks_exact(8).map(|c| be64(c, 0)).collect();

    let mut chain = vec![ChainEntry {
        path: path.to_path_buf(),
        format: Format::Qcow2,
    }];
    let (backing, backing_size) = match &h.backing {
        None => (None, 0),
        Some(name) => {
            if depth >= MAX_CHAIN_DEPTH {
                return Err(Error::unsupported(
                    path,
                    format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} files"),
                ));
            }
            if name.contains("://") || name.starts_with("nbd:") || name.starts_with("json:") {
                return Err(Error::unsupported(
                    path,
                    format!("backing file '{name}' is a protocol name, not a local file"),
                ));
            }
            let bpath = match Path::new(name) {
                p if p.is_absolute() => p.to_path_buf(),
                p => path.parent().unwrap_or(Path::new(".")).join(p),
            };
            let bfile = open_read_only(&bpath).map_err(|e| {
                if e.code() == Code::SnapshotNotFound {
                    Error::new(
                        Code::SnapshotNotFound,
                        format!(
                            "{}: its backing file {} does not exist",
                            path.display(),
                            bpath.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
            let bformat = match h.backing_format.as_deref().and_then(Format::parse) {
                Some(f) => f,
                None => detect(&bfile, &bpath)?,
            };
            let (src, sub): (Box<dyn BlockSource>, Vec<ChainEntry>) = match bformat {
                Format::Raw => {
                    let canon = std::fs::canonicalize(&bpath).unwrap_or_else(|_| bpath.clone());
                    if !seen.insert(canon) {
                        return Err(Error::corrupt(
                            &bpath,
                            "the backing chain loops back to this file",
                        ));
                    }
                    (
                        Box::new(RawSource::new(bfile, &bpath)?),
                        vec![ChainEntry {
                            path: bpath.clone(),
                            format: Format::Raw,
                        }],
                    )
                }
                Format::Qcow2 => {
                    let (s, c, _) = open_layer(bfile, &bpath, None, depth + 1, seen)?;
                    (s, c)
                }
            };
            chain.extend(sub);
            let bs = src.virtual_size();
            (Some(src), bs)
        }
    };
    let unit_bits = if h.extended_l2 {
        h.cluster_bits - 5
    } else {
        h.cluster_bits
    };
    let src = Qcow2Source {
        file,
        path: path.to_path_buf(),
        cluster_bits: h.cluster_bits,
        unit_bits,
        extended_l2: h.extended_l2,
        zstd: h.zstd,
        size,
        file_len,
        l1,
        backing,
        backing_size,
        cache: RwLock::new(HashMap::new()),
        cached: AtomicUsize::new(0),
    };
    Ok((Box::new(src), chain, snap_name))
}

impl Qcow2Source {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest units one L2 table covers.
    fn l2_span_units(&self) -> u64 {
        let entries = self.cs() / if self.extended_l2 { 16 } else { 8 };
        entries << (self.cluster_bits - self.unit_bits)
    }

    fn l2_table(&self, l2_offset: u64, guest: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&l2_offset)
        {
            return Ok(t.clone());
        }
        let cs = self.cs();
        if !l2_offset.is_multiple_of(cs)
            || l2_offset < cs
            || l2_offset.saturating_add(cs) > self.file_len
        {
            return Err(Error::corrupt(&self.path, format!("the L1 entry for guest offset {guest} points to {l2_offset}, unaligned or outside the file")));
        }
        let mut raw = vec![0u8; cs as usize];
        read_full_at(&self.file, &mut raw, l2_offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("reading the L2 table at {l2_offset}"),
                e,
            )
        })?;
        let t: Arc<[u64]> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if self.cached.fetch_add(cs as usize, Ordering::Relaxed) > L2_CACHE_BYTES {
            cache.clear();
            self.cached.store(cs as usize, Ordering::Relaxed);
        }
        cache.insert(l2_offset, t.clone());
        Ok(t)
    }

    /// The unit holding guest offset `pos` and how many following units (in the same L2 table) the
    /// answer is known to hold for when the L1 entry is empty.
    fn unit(&self, pos: u64) -> Result<(Unit, u64)> {
        let ui = pos >> self.unit_bits;
        let span = self.l2_span_units();
        let l1i = (ui / span) as usize;
        let l1e = self.l1.get(l1i).copied().unwrap_or(0);
        let l2_offset = l1e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Unit::Unallocated, span - ui % span));
        }
        let t = self.l2_table(l2_offset, pos)?;
        let in_table = ui % span;
        let per_cluster_units = 1u64 << (self.cluster_bits - self.unit_bits);
        let ci = (in_table / per_cluster_units) as usize;
        let cs = self.cs();
        let (entry, bitmap) = if self.extended_l2 {
            (t[2 * ci], t[2 * ci + 1])
        } else {
            (t[ci], 0)
        };
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok((Unit::Compressed(entry & !OFLAG_COMPRESSED), 1));
        }
        let host = entry & L2E_OFFSET_MASK;
        let check = |h: u64| -> Result<u64> {
            if h < cs || h >= self.file_len || !h.is_multiple_of(cs) && !self.extended_l2 {
                Err(Error::corrupt(&self.path, format!("the L2 entry for guest offset {pos} points to host offset {h}, outside the file's data")))
            } else {
                Ok(h)
            }
        };
        if self.extended_l2 {
            let sub = in_table % per_cluster_units;
            let u = if bitmap >> (32 + sub) & 1 == 1 {
                Unit::Zero
            } else if bitmap >> sub & 1 == 1 {
                Unit::Data(check(host)? + (sub << self.unit_bits))
            } else {
                Unit::Unallocated
            };
            return Ok((u, 1));
        }
        let u = if entry & OFLAG_ZERO != 0 {
            Unit::Zero
        } else if host != 0 {
            Unit::Data(check(host)?)
        } else {
            Unit::Unallocated
        };
        Ok((u, 1))
    }

    /// Kind of `[pos, limit)` for an unallocated unit: through the backing file, if any.
    fn below(&self, pos: u64, limit: u64) -> Result<(ExtentKind, u64)> {
        match &self.backing {
            Some(b) if pos < self.backing_size => {
                let e = b.extent(pos, limit.min(self.backing_size) - pos)?;
                Ok((e.kind, e.end()))
            }
            // Past a shorter backing file: zeros (qemu reads them as such).
            Some(_) => Ok((ExtentKind::Zero, limit)),
            None => Ok((ExtentKind::Unallocated, limit)),
        }
    }

    fn decompress(&self, desc: u64, pos: u64, out: &mut [u8]) -> Result<()> {
        let cb = self.cluster_bits;
        let x = 62 - (cb - 8);
        let coff = desc & ((1u64 << x) - 1);
        let sectors = ((desc >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
        let csize = (sectors * 512 - (coff & 511)).min(self.file_len.saturating_sub(coff));
        if coff < self.cs() || coff >= self.file_len || csize == 0 {
            return Err(Error::corrupt(&self.path, format!("the compressed cluster for guest offset {pos} points to {coff}, outside the file")));
        }
        let mut input = vec![0u8; csize as usize];
        let n = read_full_at(&self.file, &mut input, coff)
            .map_err(|e| Error::io(&self.path, &format!("reading compressed data at {coff}"), e))?;
        input.truncate(n);
        let bad = |why: String| {
            Error::corrupt(
                &self.path,
                format!("the compressed cluster for guest offset {pos} does not decompress: {why}"),
            )
        };
        if self.zstd {
            let frame = zstd::zstd_safe::find_frame_compressed_size(&input)
                .map_err(|c| bad(zstd::zstd_safe::get_error_name(c).to_string()))?;
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| bad(e.to_string()))?;
            let got = d
                .decompress_to_buffer(&input[..frame.min(input.len())], out)
                .map_err(|e| bad(e.to_string()))?;
            if got != out.len() {
                return Err(bad(format!("{got} bytes instead of {}", out.len())));
            }
        } else {
            let mut z = flate2::Decompress::new(false);
            let st = z
                .decompress(&input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(e.to_string()))?;
            if z.total_out() != out.len() as u64 {
                return Err(bad(format!(
                    "{} bytes instead of {} ({st:?})",
                    z.total_out(),
                    out.len()
                )));
            }
        }
        Ok(())
    }
}

impl BlockSource for Qcow2Source {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = self.size.min(offset.saturating_add(max_len));
        if offset >= end {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: extent asked at {offset} past the end",
                    self.path.display()
                ),
            ));
        }
        let mut pos = offset;
        let mut kind = None;
        while pos < end {
            let unit = 1u64 << self.unit_bits;
            let (u, units) = self.unit(pos)?;
            let unit_end = ((pos >> self.unit_bits) + units)
                .saturating_mul(unit)
                .min(end);
            let (k, k_end) = match u {
                Unit::Data(_) | Unit::Compressed(_) => (ExtentKind::Data, unit_end),
                Unit::Zero => (ExtentKind::Zero, unit_end),
                Unit::Unallocated => self.below(pos, unit_end)?,
            };
            match kind {
                None => kind = Some(k),
                Some(prev) if prev != k => break,
                _ => {}
            }
            pos = k_end;
            if k_end < unit_end {
                break;
            }
        }
        let kind = kind.unwrap_or(ExtentKind::Unallocated);
        Ok(Extent {
            start: offset,
            len: pos.min(end) - offset,
            kind,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::new(
                    Code::Internal,
                    format!("{}: read at {offset} past the end", self.path.display()),
                )
            })?;
        let unit = 1u64 << self.unit_bits;
        let mut pos = offset;
        let mut cluster_buf: Vec<u8> = Vec::new();
        while pos < end {
            let (u, units) = self.unit(pos)?;
            let mut seg_end = ((pos >> self.unit_bits) + units)
                .saturating_mul(unit)
                .min(end);
            let at = (pos - offset) as usize;
            match u {
                Unit::Data(host) => {
                    // Coalesce following units that are contiguous on the host.
                    let mut host_end = host + (seg_end - (pos & !(unit - 1)));
                    while seg_end < end {
                        match self.unit(seg_end)? {
                            (Unit::Data(h), _) if h == host_end => {
                                let next = (seg_end + unit).min(end);
                                host_end += next - seg_end;
                                seg_end = next;
                            }
                            _ => break,
                        }
                    }
                    let from = host + (pos & (unit - 1));
                    let dst = &mut buf[at..(seg_end - offset) as usize];
                    let n = read_full_at(&self.file, dst, from).map_err(|e| {
                        Error::io(
                            &self.path,
                            &format!("reading {} bytes at host offset {from}", dst.len()),
                            e,
                        )
                    })?;
                    // qemu reads a cluster cut short by the end of the file as zeros.
                    dst[n..].fill(0);
                }
                Unit::Compressed(desc) => {
                    cluster_buf.resize(self.cs() as usize, 0);
                    self.decompress(desc, pos, &mut cluster_buf)?;
                    let in_c = (pos & (self.cs() - 1)) as usize;
                    seg_end = (pos - in_c as u64 + self.cs()).min(end);
                    let len = (seg_end - pos) as usize;
                    buf[at..at + len].copy_from_slice(&cluster_buf[in_c..in_c + len]);
                }
                Unit::Zero => buf[at..(seg_end - offset) as usize].fill(0),
                Unit::Unallocated => {
                    let dst = &mut buf[at..(seg_end - offset) as usize];
                    match &self.backing {
                        Some(b) if pos < self.backing_size => {
                            let split = (seg_end.min(self.backing_size) - pos) as usize;
                            b.read_at(pos, &mut dst[..split])?;
                            dst[split..].fill(0);
                        }
                        _ => dst.fill(0),
                    }
                }
            }
            pos = seg_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header: 64 KiB clusters, 1 GiB, L1 of 2 entries at cluster 3.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn parse(h: &[u8]) -> Result<Header> {
        parse_header(h, Path::new("t.qcow2"), 1 << 20)
    }

    fn code(h: &[u8]) -> Code {
        parse(h).unwrap_err().code()
    }

    #[test]
    fn a_valid_header_parses() {
        let h = parse(&header()).unwrap();
        assert_eq!(
            (h.version, h.cluster_bits, h.size, h.l1_size),
            (3, 16, 1 << 30, 2)
        );
        assert!(!h.zstd && !h.extended_l2 && h.backing.is_none());
    }

    #[test]
    fn each_bad_field_is_named() {
        let set = |at: usize, bytes: &[u8]| {
            let mut h = header();
            h[at..at + bytes.len()].copy_from_slice(bytes);
            h
        };
        assert_eq!(code(&set(0, b"QFI\0")), Code::SnapshotCorrupt);
        assert_eq!(
            code(&set(4, &1u32.to_be_bytes())),
            Code::SnapshotUnsupported
        );
        assert_eq!(
            code(&set(4, &4u32.to_be_bytes())),
            Code::SnapshotUnsupported
        );
        assert_eq!(code(&set(20, &8u32.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(code(&set(20, &22u32.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(
            code(&set(32, &1u32.to_be_bytes())),
            Code::SnapshotUnsupported
        );
        assert_eq!(
            code(&set(36, &u32::MAX.to_be_bytes())),
            Code::SnapshotCorrupt
        );
        assert_eq!(code(&set(36, &1u32.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(code(&set(40, &100u64.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(
            code(&set(40, &(1u64 << 40).to_be_bytes())),
            Code::SnapshotCorrupt
        );
        assert_eq!(
            code(&set(72, &(1u64 << 1).to_be_bytes())),
            Code::SnapshotCorrupt
        );
        assert_eq!(
            code(&set(72, &(1u64 << 2).to_be_bytes())),
            Code::SnapshotUnsupported
        );
        assert_eq!(
            code(&set(72, &(1u64 << 9).to_be_bytes())),
            Code::SnapshotUnsupported
        );
        assert_eq!(code(&set(96, &7u32.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(code(&set(100, &50u32.to_be_bytes())), Code::SnapshotCorrupt);
        assert_eq!(code(&set(104, &[2])), Code::SnapshotUnsupported);
        assert_eq!(
            code(&set(60, &100_000u32.to_be_bytes())),
            Code::SnapshotCorrupt
        );
        // A backing name of 2000 bytes.
        let mut h = set(8, &512u64.to_be_bytes());
        h[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert!(parse(&h)
            .unwrap_err()
            .message()
            .contains("backing file name"));
        assert!(parse(&set(24, &u64::MAX.to_be_bytes()))
            .unwrap_err()
            .message()
            .contains("size"));
    }

    #[test]
    fn extensions_give_the_backing_format_and_refuse_data_files() {
        let mut h = header();
        h[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[116..120].copy_from_slice(&3u32.to_be_bytes());
        h[120..123].copy_from_slice(b"raw");
        assert_eq!(parse(&h).unwrap().backing_format.as_deref(), Some("raw"));
        h[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        assert_eq!(code(&h), Code::SnapshotUnsupported);
        // An extension that claims to run past the cluster.
        h[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        h[116..120].copy_from_slice(&70_000u32.to_be_bytes());
        assert_eq!(code(&h), Code::SnapshotCorrupt);
    }
}
