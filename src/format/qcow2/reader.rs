//! The qcow2 reader: versions 2 and 3, cluster sizes 512 B to 2 MiB, every refcount width, both
//! zero-cluster forms, zlib and zstd compressed clusters, extended L2 entries (subclusters), backing
//! chains (qcow2 or raw, flattened) and internal snapshots.
//!
//! Everything in the file is untrusted: every size and count is bounded before it is used to
//! allocate or loop, every offset is checked against the file, and arithmetic is checked. A damaged
//! image gives `InvalidSnapshot.Corrupt` naming what is wrong (and the guest offset, for mapping
//! errors); a feature kiln does not read gives `InvalidSnapshot.Unsupported`. Never garbage.
//!
//! Reads use `pread` only, so one [`Qcow2Source`] serves every copy thread; L2 tables are cached in a
//! bounded map keyed by their host offset.
//!
//! # Allocation bounds
//!
//! Nothing read from the file makes the reader allocate more than these, per file of the chain
//! (a chain has at most `MAX_CHAIN_DEPTH` files), and each table must also lie inside the file, so
//! no allocation is larger than the file itself plus one cluster. Bounds (the constants below):
//!
//! | what | bound | checked in |
//! |---|---|---|
//! | header cluster (header, extensions, backing name) | one cluster, at most 2 MiB (`cluster_bits` 9..=21) | `open_layer` |
//! | backing file name | `MAX_BACKING_NAME` = 1023 bytes (`backing_file_size`), inside the header cluster | `parse_header` |
//! | backing format name, feature table | inside the header cluster | `parse_header` |
//! | L1 table (active or a snapshot's) | `MAX_L1_ENTRIES` = 4 Mi entries (32 MiB, `l1_size`), plus a sorted copy of its offsets to refuse shared L2 tables | `check_l1`, `check_l2_tables_distinct` |
//! | refcount table | never read; `refcount_table_clusters` at most `MAX_REFCOUNT_TABLE` = 8 MiB | `parse_header` |
//! | snapshot table | `MAX_SNAPSHOTS` = 65536 entries (`nb_snapshots`), `MAX_SNAPSHOT_TABLE` = 64 MiB in all; extra data at most `MAX_SNAPSHOT_EXTRA` = 1 KiB, ID and name at most 64 KiB each (16-bit sizes), read one entry at a time | `snapshot::read_snapshots` |
//! | L2 tables | one cluster each; the cache holds at most `L2_CACHE_BYTES` = 64 MiB | `Qcow2Source::l2_table` |
//! | compressed cluster | its stored length is at most 2^(`cluster_bits` - 8) sectors (two clusters, 4 MiB), cut at the end of the file; it decompresses into one cluster | `Qcow2Source::decompress` |
//!
//! Work is bounded too: one mapping run looks at most at `MAX_WALK_STEPS` = 64 Ki L1/L2 entries,
//! and one extent merges at most `MAX_MERGED_RUNS` = 64 runs, before a shorter extent is returned;
//! mapping the whole disk takes one step per L1 entry (at most 4 Mi) and per L2 entry present in
//! the file (L2 tables are distinct); one step per snapshot table entry; a chain of at most 16
//! files with no loops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::snapshot::{read_snapshots, MAX_SNAPSHOTS, SNAPSHOT_FIXED};
use super::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, OFLAG_COMPRESSED,
    OFLAG_ZERO,
};
use crate::error::{Code, Error, Result};
use crate::format::{
    self, gate::BackingGate, raw::RawSource, BlockSource, ChainEntry, Extent, ExtentKind, Format,
    Opened, SourceInfo, MAX_CHAIN_DEPTH,
};

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Length of a version 2 header, and the least a version 3 header may declare.
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_MIN: u32 = 104;
/// At most 32 MiB of L1 entries.
const MAX_L1_ENTRIES: u64 = 4 << 20;
/// Largest refcount table accepted (qemu's limit too); never read.
const MAX_REFCOUNT_TABLE: u64 = 8 << 20;
const MAX_BACKING_NAME: u32 = 1023;
const MAX_VIRTUAL_SIZE: u64 = 1 << 63;
/// L1 and L2 entries one mapping run looks at before it ends (the extent is cut there). Small in
/// unit tests, so that small images show the cut.
const MAX_WALK_STEPS: u32 = if cfg!(test) { 1 << 8 } else { 1 << 16 };
/// Runs (each resolved through the backing file) merged into one extent.
const MAX_MERGED_RUNS: u32 = 64;
/// Bytes of L2 tables cached per image before the cache is emptied.
const L2_CACHE_BYTES: u64 = 64 << 20;
/// Bits of an L1 entry that must be zero (0-8, 56-62).
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero (1-8, 56-61).
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Zlib,
    Zstd,
}

/// What the header says (after validation).
#[derive(Debug)]
struct Header {
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    nb_snapshots: u32,
    snapshots_offset: u64,
    compression: Compression,
    extended_l2: bool,
    backing: Option<Vec<u8>>,
    backing_format: Option<String>,
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

fn be64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

fn align8(n: usize) -> Option<usize> {
    n.checked_add(7).map(|v| v & !7)
}

/// Entries per L2 table, as a power of two.
fn l2_bits(cluster_bits: u32, extended_l2: bool) -> u32 {
    cluster_bits - if extended_l2 { 4 } else { 3 }
}

/// Parses and validates the header from the start of the file (`first`: the first cluster, or the
/// whole file when shorter). `file_size` bounds every offset.
fn parse_header(first: &[u8], file_size: u64, path: &Path) -> Result<Header> {
    let short = || Error::corrupt(path, "the file is too short for a qcow2 header");
    if first.len() < V2_HEADER_LEN {
        return Err(short());
    }
    let f32 = |off: usize| be32(first, off).ok_or_else(short);
    let f64 = |off: usize| be64(first, off).ok_or_else(short);
    if f32(0)? != MAGIC {
        return Err(Error::corrupt(path, "not a qcow2 file (bad magic)"));
    }
    let version = f32(4)?;
    if version != 2 && version != 3 {
        return Err(Error::unsupported(
            path,
            format!("qcow2 version {version} is not supported (kiln reads versions 2 and 3)"),
        ));
    }
    let cluster_bits = f32(20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::unsupported(
            path,
            format!(
                "cluster_bits {cluster_bits} is not supported (qcow2 allows {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}: 512 B to 2 MiB clusters)"
            ),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let crypt_method = f32(32)?;
    if crypt_method != 0 {
        return Err(Error::unsupported(
            path,
            format!(
                "encrypted images are not supported (crypt_method {crypt_method}); decrypt it first, e.g. with `qemu-img convert --object secret,... --image-opts ... -O qcow2`"
            ),
        ));
    }

    let (incompatible, refcount_order, header_length) = if version == 3 {
        if first.len() < V3_HEADER_MIN as usize {
            return Err(short());
        }
        let hl = f32(100)?;
        if hl < V3_HEADER_MIN {
            return Err(Error::corrupt(
                path,
                format!(
                    "header_length {hl} is below the {V3_HEADER_MIN} bytes of a version 3 header"
                ),
            ));
        }
        if u64::from(hl) > cs {
            return Err(Error::corrupt(
                path,
                format!("header_length {hl} is larger than the {cs}-byte cluster"),
            ));
        }
        (f64(72)?, f32(96)?, hl as usize)
    } else {
        (0, 4, V2_HEADER_LEN)
    };
    if refcount_order > 6 {
        return Err(Error::corrupt(
            path,
            format!("refcount_order {refcount_order} is out of range (0 to 6)"),
        ));
    }

    // Backing file name: inside the first cluster, at most 1023 bytes.
    let backing_file_offset = f64(8)?;
    let backing_file_size = f32(16)?;
    let mut backing = None;
    if backing_file_offset != 0 {
        if backing_file_size > MAX_BACKING_NAME {
            return Err(Error::corrupt(
                path,
                format!(
                    "the backing file name is {backing_file_size} bytes long (backing_file_size; at most {MAX_BACKING_NAME})"
                ),
            ));
        }
        let end = backing_file_offset
            .checked_add(u64::from(backing_file_size))
            .filter(|&e| e <= cs && e <= first.len() as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!(
                        "the backing file name at byte {backing_file_offset} (backing_file_offset) lies outside the header cluster"
                    ),
                )
            })?;
        if backing_file_size > 0 {
            backing = Some(first[backing_file_offset as usize..end as usize].to_vec());
        }
    }

    // Header extensions: after the header, before the backing file name, inside the first cluster.
    let mut ext_end = (cs as usize).min(first.len());
    if backing_file_offset != 0 && (backing_file_offset as usize) < ext_end {
        ext_end = backing_file_offset as usize;
    }
    let Extensions {
        backing_format,
        feature_names,
    } = parse_extensions(first, header_length, ext_end, path)?;

    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Error::corrupt(
            path,
            "the image is marked corrupt (incompatible feature bit 1)",
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Error::unsupported(
            path,
            "images with an external data file (incompatible feature bit 2) are not supported",
        ));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        let name = feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
            .map(|(_, _, n)| format!(" ({n})"))
            .unwrap_or_default();
        return Err(Error::unsupported(
            path,
            format!(
                "unknown incompatible feature bit {bit}{name} is set; kiln cannot read this image"
            ),
        ));
    }
    let ctype = if header_length > V3_HEADER_MIN as usize {
        *first.get(104).ok_or_else(short)?
    } else {
        0
    };
    let compression = match ctype {
        0 => Compression::Zlib,
        1 => Compression::Zstd,
        t => {
            return Err(Error::unsupported(
                path,
                format!("compression type {t} is not supported (kiln reads zlib and zstd)"),
            ))
        }
    };
    if (ctype != 0) != (incompatible & INCOMPAT_COMPRESSION != 0) {
        return Err(Error::corrupt(
            path,
            format!("compression type {ctype} disagrees with incompatible feature bit 3"),
        ));
    }
    let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;

    let size = f64(24)?;
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(
            path,
            format!("size (the virtual size) {size} is larger than 2^63"),
        ));
    }
    let l1_size = f32(36)?;
    let l1_table_offset = f64(40)?;
    check_l1(
        path,
        "",
        l1_size,
        l1_table_offset,
        size,
        cluster_bits,
        extended_l2,
        file_size,
    )?;

    let nb_snapshots = f32(60)?;
    let snapshots_offset = f64(64)?;
    check_snapshot_table_place(nb_snapshots, snapshots_offset, cs, file_size, path)?;

    let refcount_table_offset = f64(48)?;
    let refcount_table_clusters = f32(56)?;
    check_refcount_table(
        refcount_table_offset,
        refcount_table_clusters,
        cluster_bits,
        file_size,
        path,
    )?;

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        nb_snapshots,
        snapshots_offset,
        compression,
        extended_l2,
        backing,
        backing_format,
    })
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    /// (feature type, bit, name) from the feature name table.
    feature_names: Vec<(u8, u8, String)>,
}

/// Decodes the header extensions in `first[header_length..ext_end]`, refusing those kiln does not
/// read (an external data file, encryption).
fn parse_extensions(
    first: &[u8],
    header_length: usize,
    ext_end: usize,
    path: &Path,
) -> Result<Extensions> {
    let mut x = Extensions::default();
    let mut pos = header_length;
    while pos.checked_add(8).is_some_and(|e| e <= ext_end) {
        let (Some(ty), Some(len)) = (be32(first, pos), be32(first, pos + 4)) else {
            break;
        };
        if ty == EXT_END {
            break;
        }
        let data_start = pos + 8;
        let data_end = data_start
            .checked_add(len as usize)
            .filter(|&e| e <= ext_end)
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!("header extension 0x{ty:08x} at byte {pos} ({len} bytes) runs past the header area"),
                )
            })?;
        let data = &first[data_start..data_end];
        match ty {
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_NAME {
                    return Err(Error::corrupt(
                        path,
                        format!("the backing format name is {len} bytes long"),
                    ));
                }
                let s = String::from_utf8_lossy(data);
                x.backing_format = Some(s.trim_end_matches('\0').to_string());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name = &e[2..];
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    x.feature_names
                        .push((e[0], e[1], String::from_utf8_lossy(&name[..n]).into()));
                }
            }
            EXT_DATA_FILE => {
                return Err(Error::unsupported(
                    path,
                    "images with an external data file are not supported",
                ));
            }
            EXT_CRYPTO => {
                return Err(Error::unsupported(
                    path,
                    "encrypted images are not supported (the image has a crypto header extension)",
                ));
            }
            EXT_BITMAPS => {}
            _ => {}
        }
        pos = match align8(len as usize).and_then(|l| data_start.checked_add(l)) {
            Some(p) => p,
            None => break,
        };
    }
    Ok(x)
}

/// Where the header puts the snapshot table: bounded in count, cluster aligned, past the header
/// cluster, and with room for every entry's fixed part before the end of the file.
fn check_snapshot_table_place(
    nb_snapshots: u32,
    snapshots_offset: u64,
    cs: u64,
    file_size: u64,
    path: &Path,
) -> Result<()> {
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            path,
            format!("nb_snapshots {nb_snapshots} is larger than {MAX_SNAPSHOTS}"),
        ));
    }
    if nb_snapshots > 0 {
        // Each entry takes at least its fixed part, so the whole table must fit in the file.
        let min_end = snapshots_offset.checked_add(u64::from(nb_snapshots) * SNAPSHOT_FIXED as u64);
        let why = if !snapshots_offset.is_multiple_of(cs) {
            Some("is not aligned to a cluster")
        } else if snapshots_offset == 0 {
            Some("is in the header cluster")
        } else if min_end.is_none_or(|e| e > file_size) {
            Some("leaves no room for the snapshot table before the end of the file")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::corrupt(
                path,
                format!("snapshots_offset {snapshots_offset} (nb_snapshots {nb_snapshots}) {why}"),
            ));
        }
    }
    Ok(())
}

/// The refcount table: kiln never reads refcounts, but a table that cannot exist means the header
/// is damaged (qemu refuses to open such an image too).
fn check_refcount_table(
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    cluster_bits: u32,
    file_size: u64,
    path: &Path,
) -> Result<()> {
    let cs = 1u64 << cluster_bits;
    let max_clusters = MAX_REFCOUNT_TABLE >> cluster_bits;
    let why = if refcount_table_clusters == 0 {
        Some("refcount_table_clusters is 0 (the image has no refcount table)".to_string())
    } else if u64::from(refcount_table_clusters) > max_clusters {
        Some(format!(
            "refcount_table_clusters {refcount_table_clusters} is larger than {max_clusters} ({MAX_REFCOUNT_TABLE} bytes)"
        ))
    } else if !refcount_table_offset.is_multiple_of(cs) {
        Some(format!(
            "refcount_table_offset {refcount_table_offset} is not aligned to a cluster"
        ))
    } else if refcount_table_offset == 0 {
        Some(format!(
            "refcount_table_offset {refcount_table_offset} is in the header cluster"
        ))
    } else if refcount_table_offset
        .checked_add(u64::from(refcount_table_clusters) << cluster_bits)
        .is_none_or(|e| e > file_size)
    {
        Some(format!(
            "refcount_table_offset {refcount_table_offset} (refcount_table_clusters {refcount_table_clusters}) runs past the end of the file"
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(Error::corrupt(path, why));
    }
    Ok(())
}

/// Checks that an L1 table covers `size`, is not too large, and lies aligned inside the file. `what`
/// prefixes the field names in messages ("" for the header's, "snapshot 'NAME': " for a snapshot's).
#[allow(clippy::too_many_arguments)]
fn check_l1(
    path: &Path,
    what: &str,
    l1_size: u32,
    l1_offset: u64,
    size: u64,
    cluster_bits: u32,
    extended_l2: bool,
    file_size: u64,
) -> Result<()> {
    let cs = 1u64 << cluster_bits;
    let n = u64::from(l1_size);
    if n > MAX_L1_ENTRIES {
        return Err(Error::corrupt(
            path,
            format!("{what}l1_size {n} is larger than {MAX_L1_ENTRIES} entries (32 MiB)"),
        ));
    }
    let shift = cluster_bits + l2_bits(cluster_bits, extended_l2);
    let needed = (size >> shift) + u64::from(size & ((1u64 << shift) - 1) != 0);
    if n < needed {
        return Err(Error::corrupt(
            path,
            format!(
                "{what}l1_size {n} is too small: the virtual size {size} needs {needed} entries"
            ),
        ));
    }
    if n > 0 {
        let why = if !l1_offset.is_multiple_of(cs) {
            "is not aligned to a cluster"
        } else if l1_offset == 0 {
            "is in the header cluster"
        } else if l1_offset.checked_add(n * 8).is_none_or(|e| e > file_size) {
            "runs past the end of the file"
        } else {
            return Ok(());
        };
        return Err(Error::corrupt(
            path,
            format!("{what}l1_table_offset {l1_offset} (l1_size {n}) {why}"),
        ));
    }
    Ok(())
}

fn file_size(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(path, "reading metadata of", e))
}

/// Reads exactly `len` bytes at `offset`; a short read means the file is truncated.
pub(super) fn read_exact(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = format::read_full_at(file, &mut buf, offset)
        .map_err(|e| Error::io(path, &format!("reading {what}"), e))?;
    if n < len {
        return Err(Error::corrupt(
            path,
            format!("{what} at offset {offset} runs past the end of the file"),
        ));
    }
    Ok(buf)
}

/// Refuses an L1 table in which two entries point at the same L2 table. qemu never writes one (an
/// L2 table is shared only between L1 tables, by snapshots); allowing it would let a small file
/// describe an exabyte of data clusters by repeating one table, and make mapping it take forever.
/// With distinct tables, walking the whole disk costs at most one step per L1 entry plus one per
/// L2 entry present in the file.
fn check_l2_tables_distinct(path: &Path, l1: &[u64], snapshot: Option<&str>) -> Result<()> {
    let mut offs: Vec<u64> = l1
        .iter()
        .map(|e| e & L1E_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    offs.sort_unstable();
    let Some(dup) = offs.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) else {
        return Ok(());
    };
    let mut at = l1
        .iter()
        .enumerate()
        .filter(|(_, e)| *e & L1E_OFFSET_MASK == dup)
        .map(|(i, _)| i);
    let (a, b) = (at.next().unwrap_or(0), at.next().unwrap_or(0));
    let table = match snapshot {
        Some(s) => format!("the L1 table of snapshot '{s}'"),
        None => "the L1 table".to_string(),
    };
    Err(Error::corrupt(
        path,
        format!("L1 entries {a} and {b} of {table} both point at the L2 table at {dup}"),
    ))
}

/// Records a file of the chain: refuses loops and chains deeper than [`MAX_CHAIN_DEPTH`].
fn note_file(
    path: &Path,
    format: Format,
    chain: &mut Vec<ChainEntry>,
    seen: &mut Vec<PathBuf>,
) -> Result<()> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if seen.contains(&canon) {
        return Err(Error::corrupt(
            path,
            format!(
                "backing chain loop: {} is reached again through its own backing chain",
                canon.display()
            ),
        ));
    }
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(
            path,
            format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} files (this file would be number {}); flatten it first with `qemu-img convert`",
                chain.len() + 1
            ),
        ));
    }
    seen.push(canon);
    chain.push(ChainEntry {
        path: path.to_path_buf(),
        format,
    });
    Ok(())
}

/// Opens a qcow2 source (and its backing chain) read-only; `snapshot` names an internal snapshot
/// by name or ID.
pub fn open(file: File, path: &Path, snapshot: Option<&str>, gate: &BackingGate) -> Result<Opened> {
    let mut chain = Vec::new();
    let mut seen = Vec::new();
    let (src, snap) = open_layer(file, path, snapshot, &mut chain, &mut seen, gate)?;
    let info = SourceInfo {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        snapshot: snap,
        virtual_size: src.virtual_size,
        chain,
    };
    Ok(Opened {
        source: Box::new(src),
        info,
    })
}

fn open_layer(
    file: File,
    path: &Path,
    snapshot: Option<&str>,
    chain: &mut Vec<ChainEntry>,
    seen: &mut Vec<PathBuf>,
    gate: &BackingGate,
) -> Result<(Qcow2Source, Option<String>)> {
    note_file(path, Format::Qcow2, chain, seen)?;
    let fsize = file_size(&file, path)?;
    // The header fixes the cluster size; then the whole first cluster holds extensions and names.
    let mut first = vec![0u8; 512.min(fsize) as usize];
    let n = format::read_full_at(&file, &mut first, 0)
        .map_err(|e| Error::io(path, "reading the header of", e))?;
    first.truncate(n);
    if let Some(cb) = be32(&first, 20) {
        if (MIN_CLUSTER_BITS + 1..=MAX_CLUSTER_BITS).contains(&cb) && be32(&first, 0) == Some(MAGIC)
        {
            let len = (1u64 << cb).min(fsize) as usize;
            first = vec![0u8; len];
            let n = format::read_full_at(&file, &mut first, 0)
                .map_err(|e| Error::io(path, "reading the header of", e))?;
            first.truncate(n);
        }
    }
    let h = parse_header(&first, fsize, path)?;
    drop(first);

    let (l1_offset, l1_size, virtual_size, snap_name) = match snapshot {
        None => (h.l1_table_offset, h.l1_size, h.size, None),
        Some(want) => {
            let snaps = read_snapshots(&file, path, h.nb_snapshots, h.snapshots_offset, fsize)?;
            let s = snaps
                .iter()
                .find(|s| s.name == want)
                .or_else(|| snaps.iter().find(|s| s.id == want))
                .ok_or_else(|| {
                    let list = if snaps.is_empty() {
                        "it has none".to_string()
                    } else {
                        let l: Vec<String> = snaps
                            .iter()
                            .map(|s| format!("'{}' (ID {})", s.name, s.id))
                            .collect();
                        format!("available: {}", l.join(", "))
                    };
                    Error::new(
                        Code::SnapshotNotFound,
                        format!(
                            "{}: no internal snapshot named or numbered '{want}'; {list}",
                            path.display()
                        ),
                    )
                })?;
            let size = s.disk_size.unwrap_or(h.size);
            if size > MAX_VIRTUAL_SIZE {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "snapshot '{}' has virtual size {size}, larger than 2^63",
                        s.name
                    ),
                ));
            }
            check_l1(
                path,
                &format!("snapshot '{}': ", s.name),
                s.l1_size,
                s.l1_offset,
                size,
                h.cluster_bits,
                h.extended_l2,
                fsize,
            )?;
            (s.l1_offset, s.l1_size, size, Some(s.name.clone()))
        }
    };
    let raw_l1 = read_exact(&file, path, l1_offset, l1_size as usize * 8, "the L1 table")?;
    let l1: Vec<u64> = raw_l1
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    drop(raw_l1);
    check_l2_tables_distinct(path, &l1, snap_name.as_deref())?;

    let backing = match &h.backing {
        None => None,
        Some(name) => Some(open_backing(
            path,
            name,
            h.backing_format.as_deref(),
            chain,
            seen,
            gate,
        )?),
    };

    Ok((
        Qcow2Source {
            file,
            path: path.to_path_buf(),
            file_size: fsize,
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2,
            zero_flag: h.version >= 3 && !h.extended_l2,
            compression: h.compression,
            virtual_size,
            l1,
            backing,
            l2_cache: RwLock::new(HashMap::new()),
        },
        snap_name,
    ))
}

fn open_backing(
    overlay: &Path,
    name: &[u8],
    backing_format: Option<&str>,
    chain: &mut Vec<ChainEntry>,
    seen: &mut Vec<PathBuf>,
    gate: &BackingGate,
) -> Result<Box<dyn BlockSource>> {
    let shown = String::from_utf8_lossy(name).into_owned();
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(
            overlay,
            format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} files (backing file '{shown}' would be number {}); flatten it first with `qemu-img convert`",
                chain.len() + 1
            ),
        ));
    }
    // Every backing file passes the gate: local, regular, inside an allowed directory.
    let top = chain.first().map_or(overlay, |c| c.path.as_path());
    let (bpath, file) = gate.open(top, overlay, name)?;
    let fmt = match backing_format {
        Some(f) => Format::parse(f).ok_or_else(|| {
            Error::unsupported(
                overlay,
                format!("backing file format '{f}' is not supported (kiln reads raw and qcow2)"),
            )
        })?,
        None => format::detect(&file, &bpath)?,
    };
    match fmt {
        Format::Raw => {
            note_file(&bpath, Format::Raw, chain, seen)?;
            Ok(Box::new(RawSource::new(file, &bpath)?))
        }
        Format::Qcow2 => {
            let (src, _) = open_layer(file, &bpath, None, chain, seen, gate)?;
            Ok(Box::new(src))
        }
    }
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    /// Stored at this host offset (for the run's first byte); contiguous in the file.
    Host(u64),
    /// One compressed cluster (its L2 entry).
    Compressed(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated in this file: read through the backing file.
    Unalloc,
}

impl Seg {
    fn class(self) -> u8 {
        match self {
            Seg::Host(_) | Seg::Compressed(_) => 0,
            Seg::Zero => 1,
            Seg::Unalloc => 2,
        }
    }
}

/// Grows the run started at `start` by `seg` found at `at`, if they go together: same class when
/// classifying extents; contiguous host bytes, zeros or unallocated when reading.
fn merge(first: &mut Option<Seg>, seg: Seg, start: u64, at: u64, extent_mode: bool) -> bool {
    match *first {
        None => {
            *first = Some(seg);
            true
        }
        Some(f) if extent_mode => f.class() == seg.class(),
        Some(Seg::Host(h0)) => match seg {
            Seg::Host(h) => h0.checked_add(at - start) == Some(h),
            _ => false,
        },
        Some(Seg::Zero) => seg == Seg::Zero,
        Some(Seg::Unalloc) => seg == Seg::Unalloc,
        Some(Seg::Compressed(_)) => false,
    }
}

thread_local! {
    static ZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
}

/// An opened qcow2 file (one layer of a chain; its backing file below it).
pub struct Qcow2Source {
    file: File,
    path: PathBuf,
    file_size: u64,
    cluster_bits: u32,
    extended_l2: bool,
    /// Version 3 without extended L2: bit 0 of an L2 entry means "reads as zeros".
    zero_flag: bool,
    compression: Compression,
    virtual_size: u64,
    /// The L1 table read (the active one, or the selected snapshot's).
    l1: Vec<u64>,
    backing: Option<Box<dyn BlockSource>>,
    l2_cache: RwLock<HashMap<u64, Arc<[u64]>>>,
}

impl Qcow2Source {
    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn corrupt_at(&self, guest: u64, what: impl std::fmt::Display) -> Error {
        Error::corrupt(&self.path, format!("guest offset {guest}: {what}"))
    }

    /// The L2 table at host offset `off` (as u64 entries; pairs for extended L2).
    fn l2_table(&self, off: u64, guest: u64) -> Result<Arc<[u64]>> {
        {
            let cache = self.l2_cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = cache.get(&off) {
                return Ok(t.clone());
            }
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(self.corrupt_at(
                guest,
                format!("its L1 entry's L2 table offset {off} is not aligned to a cluster"),
            ));
        }
        if off.checked_add(cs).is_none_or(|e| e > self.file_size) {
            return Err(self.corrupt_at(
                guest,
                format!("its L1 entry's L2 table offset {off} runs past the end of the file"),
            ));
        }
        let mut buf = vec![0u8; cs as usize];
        let n = format::read_full_at(&self.file, &mut buf, off)
            .map_err(|e| Error::io(&self.path, &format!("reading the L2 table at {off}"), e))?;
        if n < buf.len() {
            return Err(self.corrupt_at(
                guest,
                format!("its L2 table at {off} runs past the end of the file"),
            ));
        }
        let table: Arc<[u64]> = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut cache = self.l2_cache.write().unwrap_or_else(|e| e.into_inner());
        let max = (L2_CACHE_BYTES / cs).max(1) as usize;
        if cache.len() >= max {
            cache.clear();
        }
        cache.insert(off, table.clone());
        Ok(table)
    }

    fn check_host(&self, host: u64, guest: u64) -> Result<()> {
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(self.corrupt_at(
                guest,
                format!("its L2 entry has the unaligned host offset {host}"),
            ));
        }
        if host >= self.file_size {
            return Err(self.corrupt_at(
                guest,
                format!(
                    "its L2 entry points at host offset {host}, past the end of the file ({} bytes)",
                    self.file_size
                ),
            ));
        }
        Ok(())
    }

    /// Host offset and stored length of a compressed cluster.
    fn compressed_loc(&self, entry: u64, guest: u64) -> Result<(u64, u64)> {
        let x = 62 - (self.cluster_bits - 8);
        let off = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
        let len = (sectors + 1) * 512 - (off & 511);
        if off < self.cluster_size() {
            return Err(self.corrupt_at(
                guest,
                format!("its compressed cluster at host offset {off} lies in the header cluster"),
            ));
        }
        if off >= self.file_size {
            return Err(self.corrupt_at(
                guest,
                format!("its compressed cluster at host offset {off} is past the end of the file"),
            ));
        }
        Ok((off, len))
    }

    /// The longest run from `pos` (before `limit`) with one mapping in this file. In extent mode,
    /// runs of one class merge (all data, all zero, all unallocated); when reading, only
    /// host-contiguous data, zeros or unallocated ranges merge, and a compressed cluster stands alone.
    fn walk(&self, pos: u64, limit: u64, extent_mode: bool) -> Result<(Seg, u64)> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let l2b = l2_bits(cb, self.extended_l2);
        let l1_shift = cb + l2b;
        let n_l2 = 1usize << l2b;
        let mut first: Option<Seg> = None;
        let mut cur = pos;
        // L1 and L2 entries looked at: a run ends after MAX_WALK_STEPS of them (shorter extents are
        // always allowed), so one call's work is bounded whatever the table says.
        let mut steps = 0u32;
        'outer: while cur < limit {
            if steps >= MAX_WALK_STEPS && cur > pos {
                break;
            }
            steps += 1;
            let l1_idx = cur >> l1_shift;
            let l1e = usize::try_from(l1_idx)
                .ok()
                .and_then(|i| self.l1.get(i))
                .copied()
                .ok_or_else(|| self.corrupt_at(cur, "no L1 entry covers it"))?;
            if l1e & L1E_RESERVED != 0 {
                return Err(self.corrupt_at(
                    cur,
                    format!("its L1 entry 0x{l1e:016x} (L2 table offset) has reserved bits set"),
                ));
            }
            let l2_off = l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                if !merge(&mut first, Seg::Unalloc, pos, cur, extent_mode) {
                    break;
                }
                cur = ((l1_idx + 1) << l1_shift).min(limit);
                continue;
            }
            let l2 = self.l2_table(l2_off, cur)?;
            let mut idx = ((cur >> cb) as usize) & (n_l2 - 1);
            while cur < limit && idx < n_l2 {
                if steps >= MAX_WALK_STEPS && cur > pos {
                    break 'outer;
                }
                steps += 1;
                let cstart = cur & !(cs - 1);
                let cend = cstart.saturating_add(cs).min(limit);
                let (entry, bitmap) = if self.extended_l2 {
                    (l2[2 * idx], l2[2 * idx + 1])
                } else {
                    (l2[idx], 0)
                };
                if entry & OFLAG_COMPRESSED != 0 {
                    self.compressed_loc(entry, cur)?;
                    if !merge(&mut first, Seg::Compressed(entry), pos, cur, extent_mode) {
                        break 'outer;
                    }
                    cur = cend;
                    idx += 1;
                    continue;
                }
                if entry & L2E_RESERVED != 0 {
                    return Err(self.corrupt_at(
                        cur,
                        format!("its L2 entry 0x{entry:016x} has reserved bits set"),
                    ));
                }
                let host = entry & L2E_OFFSET_MASK;
                if !self.extended_l2 {
                    let seg = if self.zero_flag && entry & OFLAG_ZERO != 0 {
                        Seg::Zero
                    } else if host == 0 {
                        Seg::Unalloc
                    } else {
                        self.check_host(host, cur)?;
                        Seg::Host(host + (cur - cstart))
                    };
                    if !merge(&mut first, seg, pos, cur, extent_mode) {
                        break 'outer;
                    }
                    cur = cend;
                    idx += 1;
                    continue;
                }
                // Extended L2: 32 subclusters, allocation bits 0-31, zero bits 32-63.
                let sc_bits = cb - 5;
                while cur < cend {
                    let sc = (cur - cstart) >> sc_bits;
                    let alloc = (bitmap >> sc) & 1 != 0;
                    let zero = (bitmap >> (32 + sc)) & 1 != 0;
                    let seg = match (alloc, zero) {
                        (true, true) => {
                            return Err(self.corrupt_at(
                                cur,
                                "its subcluster is marked both allocated and zero",
                            ))
                        }
                        (false, true) => Seg::Zero,
                        (true, false) => {
                            if host == 0 {
                                return Err(self.corrupt_at(
                                    cur,
                                    "its subcluster is allocated but the cluster has no host offset",
                                ));
                            }
                            self.check_host(host, cur)?;
                            Seg::Host(host + (cur - cstart))
                        }
                        (false, false) => Seg::Unalloc,
                    };
                    if !merge(&mut first, seg, pos, cur, extent_mode) {
                        break 'outer;
                    }
                    cur = (cstart + ((sc + 1) << sc_bits)).min(cend);
                }
                idx += 1;
            }
        }
        match first {
            Some(s) if cur > pos => Ok((s, cur)),
            _ => Err(Error::new(
                Code::Internal,
                format!("{}: empty mapping run at {pos}", self.path.display()),
            )),
        }
    }

    /// One extent from `pos`: this file's run, resolved through the backing file where unallocated.
    fn extent_once(&self, pos: u64, limit: u64) -> Result<Extent> {
        let (seg, end) = self.walk(pos, limit, true)?;
        let kind = match seg {
            Seg::Host(_) | Seg::Compressed(_) => ExtentKind::Data,
            Seg::Zero => ExtentKind::Zero,
            Seg::Unalloc => match &self.backing {
                None => ExtentKind::Unallocated,
                Some(b) => {
                    let bsize = b.virtual_size();
                    if pos >= bsize {
                        ExtentKind::Zero
                    } else {
                        let e = b.extent(pos, end.min(bsize) - pos)?;
                        return Ok(Extent {
                            start: pos,
                            len: e.len.min(end - pos),
                            kind: e.kind,
                        });
                    }
                }
            },
        };
        Ok(Extent {
            start: pos,
            len: end - pos,
            kind,
        })
    }

    fn read_host(&self, host: u64, out: &mut [u8], guest: u64) -> Result<()> {
        let n = format::read_full_at(&self.file, out, host).map_err(|e| {
            Error::io(
                &self.path,
                &format!("reading {} bytes at host offset {host}", out.len()),
                e,
            )
        })?;
        if n == 0 && !out.is_empty() {
            return Err(self.corrupt_at(
                guest,
                format!("its data at host offset {host} is past the end of the file"),
            ));
        }
        // A last cluster cut short by the end of the file reads as zeros past it, as in qemu.
        out[n..].fill(0);
        Ok(())
    }

    fn read_backing(&self, pos: u64, out: &mut [u8]) -> Result<()> {
        match &self.backing {
            None => out.fill(0),
            Some(b) => {
                let bsize = b.virtual_size();
                let n = if pos >= bsize {
                    0
                } else {
                    (bsize - pos).min(out.len() as u64) as usize
                };
                if n > 0 {
                    b.read_at(pos, &mut out[..n])?;
                }
                out[n..].fill(0);
            }
        }
        Ok(())
    }

    /// Decompresses the cluster of `entry` (guest cluster at `guest`) into `out` (one cluster).
    fn decompress(&self, entry: u64, guest: u64, out: &mut [u8]) -> Result<()> {
        let (off, len) = self.compressed_loc(entry, guest)?;
        let avail = len.min(self.file_size - off) as usize;
        let mut input = vec![0u8; avail];
        let n = format::read_full_at(&self.file, &mut input, off).map_err(|e| {
            Error::io(
                &self.path,
                &format!("reading the compressed cluster at {off}"),
                e,
            )
        })?;
        input.truncate(n);
        let cap = out.len();
        let fail = |why: String| {
            self.corrupt_at(
                guest,
                format!(
                    "its compressed cluster (host offset {off}, {len} bytes) does not decompress to one {cap}-byte cluster: {why}"
                ),
            )
        };
        match self.compression {
            Compression::Zlib => {
                let mut d = flate2::Decompress::new(false);
                match d.decompress(&input, out, flate2::FlushDecompress::Finish) {
                    Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                    Ok(_) => Err(fail(format!(
                        "deflate data ended after {} bytes",
                        d.total_out()
                    ))),
                    Err(e) => Err(fail(format!("deflate error: {e}"))),
                }
            }
            Compression::Zstd => ZSTD.with(|cell| {
                use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(Decoder::new().map_err(|e| fail(format!("zstd: {e}")))?);
                }
                let Some(dec) = slot.as_mut() else {
                    return Err(fail("zstd decoder unavailable".into()));
                };
                dec.reinit().map_err(|e| fail(format!("zstd: {e}")))?;
                let mut inb = InBuffer::around(&input);
                let mut outb = OutBuffer::around(&mut *out);
                let mut hint = 1usize;
                while outb.pos() < cap {
                    let (li, lo) = (inb.pos(), outb.pos());
                    hint = match dec.run(&mut inb, &mut outb) {
                        Ok(h) => h,
                        Err(e) => {
                            // The decoder may hold a half-decoded frame: start afresh next time.
                            *slot = None;
                            return Err(fail(format!("zstd error: {e}")));
                        }
                    };
                    if inb.pos() <= li && outb.pos() <= lo {
                        let got = outb.pos();
                        return Err(fail(format!("zstd data ended after {got} bytes")));
                    }
                }
                if hint > 0 {
                    return Err(fail("the zstd frame is longer than one cluster".into()));
                }
                Ok(())
            }),
        }
    }
}

impl BlockSource for Qcow2Source {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit = self.virtual_size.min(offset.saturating_add(max_len));
        if offset >= limit {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: extent asked at {offset} past the end",
                    self.path.display()
                ),
            ));
        }
        let first = self.extent_once(offset, limit)?;
        let mut end = first.end();
        for _ in 1..MAX_MERGED_RUNS {
            if end >= limit {
                break;
            }
            let next = self.extent_once(end, limit)?;
            if next.kind != first.kind {
                break;
            }
            end = next.end();
        }
        Ok(Extent {
            start: offset,
            len: end - offset,
            kind: first.kind,
        })
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
        let cs = self.cluster_size();
        let mut cluster: Vec<u8> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (seg, seg_end) = self.walk(pos, end, false)?;
            let out = &mut buf[(pos - offset) as usize..(seg_end - offset) as usize];
            match seg {
                Seg::Host(h) => self.read_host(h, out, pos)?,
                Seg::Compressed(e) => {
                    cluster.resize(cs as usize, 0);
                    let cstart = pos & !(cs - 1);
                    self.decompress(e, cstart, &mut cluster)?;
                    let at = (pos - cstart) as usize;
                    out.copy_from_slice(&cluster[at..at + out.len()]);
                }
                Seg::Zero => out.fill(0),
                Seg::Unalloc => self.read_backing(pos, out)?,
            }
            pos = seg_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const CB: u32 = 16;
    const CS: usize = 1 << CB;

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// A valid empty 1 MiB image: header cluster, L1 cluster (one entry), a spare cluster for an
    /// L2 table and three for data.
    fn base(version: u32) -> Vec<u8> {
        let mut b = vec![0u8; 6 * CS];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, version);
        put32(&mut b, 20, CB);
        put64(&mut b, 24, 1 << 20);
        put32(&mut b, 36, 1);
        put64(&mut b, 40, CS as u64);
        put64(&mut b, 48, 5 * CS as u64);
        put32(&mut b, 56, 1);
        if version == 3 {
            put32(&mut b, 96, 4);
            put32(&mut b, 100, 112);
        }
        b
    }

    fn open_bytes(bytes: &[u8]) -> Result<Opened> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        let f = File::open(&p).unwrap();
        open(f, &p, None, &BackingGate::default())
    }

    fn err(bytes: &[u8]) -> Error {
        match open_bytes(bytes) {
            Ok(_) => panic!("opened"),
            Err(e) => e,
        }
    }

    fn read_all(o: &Opened) -> Result<Vec<u8>> {
        let mut v = vec![0u8; o.source.virtual_size() as usize];
        o.source.read_at(0, &mut v)?;
        Ok(v)
    }

    #[test]
    fn empty_v2_and_v3_images_read_zeros() {
        for v in [2, 3] {
            let o = open_bytes(&base(v)).unwrap();
            assert_eq!(o.info.virtual_size, 1 << 20);
            assert_eq!(o.info.format, Format::Qcow2);
            assert_eq!(o.info.chain.len(), 1);
            let e = o.source.extent(0, u64::MAX).unwrap();
            assert_eq!(e.kind, ExtentKind::Unallocated);
            assert_eq!(e.len, 1 << 20);
            assert!(read_all(&o).unwrap().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn bad_magic_is_corrupt() {
        let mut b = base(3);
        b[0] = b'X';
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
    }

    #[test]
    fn versions_1_and_4_are_unsupported() {
        for v in [1, 4] {
            let mut b = base(3);
            put32(&mut b, 4, v);
            let e = err(&b);
            assert_eq!(e.code(), Code::SnapshotUnsupported, "{e}");
            assert!(e.message().contains(&format!("version {v}")));
        }
    }

    #[test]
    fn cluster_bits_8_and_22_are_unsupported() {
        for cb in [8, 22] {
            let mut b = base(3);
            put32(&mut b, 20, cb);
            let e = err(&b);
            assert_eq!(e.code(), Code::SnapshotUnsupported, "{e}");
        }
    }

    #[test]
    fn huge_or_short_l1_is_corrupt() {
        let mut b = base(3);
        put32(&mut b, 36, u32::MAX);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put32(&mut b, 36, 0);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        // L1 past the end of the file.
        let mut b = base(3);
        put32(&mut b, 36, 100_000);
        put64(&mut b, 24, 1 << 40);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        // Unaligned L1.
        let mut b = base(3);
        put64(&mut b, 40, CS as u64 + 8);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        // Too large a virtual size for any L1.
        let mut b = base(3);
        put64(&mut b, 24, u64::MAX);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
    }

    #[test]
    fn incompatible_bits() {
        let mut b = base(3);
        put64(&mut b, 72, 1 << 5);
        let e = err(&b);
        assert_eq!(e.code(), Code::SnapshotUnsupported);
        assert!(e.message().contains("bit 5"), "{e}");
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_CORRUPT);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_DATA_FILE);
        assert_eq!(err(&b).code(), Code::SnapshotUnsupported);
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_DIRTY);
        assert!(open_bytes(&b).is_ok());
    }

    #[test]
    fn encryption_is_unsupported() {
        for m in [1, 2] {
            let mut b = base(3);
            put32(&mut b, 32, m);
            let e = err(&b);
            assert_eq!(e.code(), Code::SnapshotUnsupported);
            assert!(e.message().contains("encrypted"), "{e}");
        }
    }

    #[test]
    fn compression_type_is_checked() {
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_COMPRESSION);
        b[104] = 2;
        assert_eq!(err(&b).code(), Code::SnapshotUnsupported);
        // zstd without the feature bit.
        let mut b = base(3);
        b[104] = 1;
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_COMPRESSION);
        b[104] = 1;
        assert!(open_bytes(&b).is_ok());
    }

    #[test]
    fn header_length_and_refcount_order_are_checked() {
        let mut b = base(3);
        put32(&mut b, 100, 100);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put32(&mut b, 100, CS as u32 + 8);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put32(&mut b, 96, 7);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put32(&mut b, 96, 0);
        assert!(open_bytes(&b).is_ok());
    }

    #[test]
    fn snapshot_count_is_bounded() {
        let mut b = base(3);
        put32(&mut b, 60, MAX_SNAPSHOTS + 1);
        put64(&mut b, 64, 4 * CS as u64);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
    }

    #[test]
    fn header_extensions() {
        // An external data file extension.
        let mut b = base(3);
        put32(&mut b, 112, EXT_DATA_FILE);
        put32(&mut b, 116, 4);
        b[120..124].copy_from_slice(b"data");
        assert_eq!(err(&b).code(), Code::SnapshotUnsupported);
        // An unknown extension is skipped; one running past the cluster is corrupt.
        let mut b = base(3);
        put32(&mut b, 112, 0x1234_5678);
        put32(&mut b, 116, 5);
        assert!(open_bytes(&b).is_ok());
        put32(&mut b, 116, CS as u32);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        // Unknown incompatible bit named through the feature table.
        let mut b = base(3);
        put64(&mut b, 72, 1 << 9);
        put32(&mut b, 112, EXT_FEATURE_TABLE);
        put32(&mut b, 116, 48);
        b[120] = 0;
        b[121] = 9;
        b[122..129].copy_from_slice(b"frobbed");
        let e = err(&b);
        assert!(e.message().contains("bit 9 (frobbed)"), "{e}");
    }

    #[test]
    fn backing_names_are_checked() {
        let mut b = base(3);
        put64(&mut b, 8, 1024);
        put32(&mut b, 16, 2000);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        let mut b = base(3);
        put64(&mut b, 8, CS as u64 - 4);
        put32(&mut b, 16, 10);
        assert_eq!(err(&b).code(), Code::SnapshotCorrupt);
        for name in ["nbd:localhost:10809", "http://x/y.qcow2", "json:{}"] {
            let mut b = base(3);
            put64(&mut b, 8, 1024);
            put32(&mut b, 16, name.len() as u32);
            b[1024..1024 + name.len()].copy_from_slice(name.as_bytes());
            assert_eq!(err(&b).code(), Code::BackingDenied, "{name}");
        }
        let mut b = base(3);
        put64(&mut b, 8, 1024);
        put32(&mut b, 16, 11);
        b[1024..1035].copy_from_slice(b"missing.raw");
        let e = err(&b);
        assert_eq!(e.code(), Code::SnapshotNotFound);
        assert!(e.message().contains("t.qcow2"), "{e}");
    }

    /// An image whose first guest cluster maps through an L2 table at cluster 2.
    fn with_l2(version: u32, l2e0: u64) -> Vec<u8> {
        let mut b = base(version);
        put64(&mut b, CS, 2 * CS as u64);
        put64(&mut b, 2 * CS, l2e0);
        b
    }

    #[test]
    fn data_zero_and_bad_l2_entries() {
        let mut b = with_l2(3, 3 * CS as u64);
        b[3 * CS..4 * CS].fill(0xab);
        let o = open_bytes(&b).unwrap();
        let e = o.source.extent(0, u64::MAX).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, CS as u64));
        let v = read_all(&o).unwrap();
        assert!(v[..CS].iter().all(|&x| x == 0xab) && v[CS..].iter().all(|&x| x == 0));

        // v3 zero flag (with a preallocated cluster) reads zeros; in v2 bit 0 means nothing.
        let mut b = with_l2(3, (3 * CS as u64) | OFLAG_ZERO);
        b[3 * CS..4 * CS].fill(0xab);
        let o = open_bytes(&b).unwrap();
        assert_eq!(o.source.extent(0, 1 << 20).unwrap().kind, ExtentKind::Zero);
        assert!(read_all(&o).unwrap().iter().all(|&x| x == 0));
        let mut b = with_l2(2, (3 * CS as u64) | OFLAG_ZERO);
        b[3 * CS..4 * CS].fill(0xab);
        let o = open_bytes(&b).unwrap();
        assert_eq!(o.source.extent(0, 1 << 20).unwrap().kind, ExtentKind::Data);
        assert_eq!(read_all(&o).unwrap()[0], 0xab);

        // Past the end of the file, or unaligned.
        for bad in [100 * CS as u64, 3 * CS as u64 + 512] {
            let o = open_bytes(&with_l2(3, bad)).unwrap();
            let e = o.source.extent(0, 4096).unwrap_err();
            assert_eq!(e.code(), Code::SnapshotCorrupt);
            assert!(e.message().contains("guest offset 0"), "{e}");
            assert_eq!(read_all(&o).unwrap_err().code(), Code::SnapshotCorrupt);
        }
        // An L2 table in the wrong place.
        let mut b = base(3);
        put64(&mut b, CS, 100 * CS as u64);
        let o = open_bytes(&b).unwrap();
        assert_eq!(read_all(&o).unwrap_err().code(), Code::SnapshotCorrupt);
    }

    fn compressed_entry(off: u64, len: usize) -> u64 {
        let x = 62 - (CB - 8);
        let sectors = ((off + len as u64 - 1) >> 9) - (off >> 9);
        OFLAG_COMPRESSED | (sectors << x) | off
    }

    #[test]
    fn compressed_clusters() {
        let plain: Vec<u8> = (0..CS).map(|i| (i / 100) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut z = vec![0u8; 2 * CS];
        c.compress(&plain, &mut z, flate2::FlushCompress::Finish)
            .unwrap();
        let zlen = c.total_out() as usize;
        let off = 3 * CS as u64 + 1000;
        let mut b = with_l2(3, compressed_entry(off, zlen));
        b[off as usize..off as usize + zlen].copy_from_slice(&z[..zlen]);
        let o = open_bytes(&b).unwrap();
        assert_eq!(o.source.extent(0, 1 << 20).unwrap().kind, ExtentKind::Data);
        let v = read_all(&o).unwrap();
        assert_eq!(&v[..CS], &plain[..]);
        let mut part = vec![0u8; 3000];
        o.source.read_at(100, &mut part).unwrap();
        assert_eq!(&part[..], &plain[100..3100]);

        // Garbage instead: corrupt, never garbage data.
        b[off as usize..off as usize + zlen].fill(0xff);
        let o = open_bytes(&b).unwrap();
        let e = read_all(&o).unwrap_err();
        assert_eq!(e.code(), Code::SnapshotCorrupt);
        assert!(e.message().contains("guest offset 0"), "{e}");

        // Truncated stream (half the data): corrupt.
        let mut b = with_l2(3, compressed_entry(off, zlen / 2));
        b[off as usize..off as usize + zlen / 2].copy_from_slice(&z[..zlen / 2]);
        let o = open_bytes(&b).unwrap();
        assert_eq!(read_all(&o).unwrap_err().code(), Code::SnapshotCorrupt);

        // In the header cluster.
        let o = open_bytes(&with_l2(3, compressed_entry(100, 100))).unwrap();
        assert_eq!(
            o.source.extent(0, 4096).unwrap_err().code(),
            Code::SnapshotCorrupt
        );
    }

    #[test]
    fn zstd_clusters() {
        let plain: Vec<u8> = (0..CS).map(|i| (i / 7) as u8).collect();
        let z = zstd::bulk::compress(&plain, 3).unwrap();
        let off = 3 * CS as u64 + 512;
        let mut b = with_l2(3, compressed_entry(off, z.len()));
        put64(&mut b, 72, INCOMPAT_COMPRESSION);
        b[104] = 1;
        b[off as usize..off as usize + z.len()].copy_from_slice(&z);
        // Trailing bytes after the frame are ignored.
        b[off as usize + z.len()] = 0x55;
        let o = open_bytes(&b).unwrap();
        assert_eq!(&read_all(&o).unwrap()[..CS], &plain[..]);
        b[off as usize + 4..off as usize + z.len()].fill(0x33);
        let o = open_bytes(&b).unwrap();
        assert_eq!(read_all(&o).unwrap_err().code(), Code::SnapshotCorrupt);
        // A second read on the same thread still works after an error.
        b[off as usize..off as usize + z.len()].copy_from_slice(&z);
        let o = open_bytes(&b).unwrap();
        assert_eq!(&read_all(&o).unwrap()[..CS], &plain[..]);
    }

    /// 512-byte clusters, 1100 distinct L2 tables of 64 entries, every entry data (all in one host
    /// cluster): one extent may not walk all 70400 entries at once (in unit tests a run stops after
    /// 256 entries and an extent merges at most 64 runs).
    #[test]
    fn one_extent_walks_a_bounded_number_of_entries() {
        const C: usize = 512;
        let n_l1 = 1100usize;
        let l1_clusters = (n_l1 * 8).div_ceil(C);
        let l2_start = 1 + l1_clusters;
        let data = l2_start + n_l1;
        let mut b = vec![0u8; (data + 2) * C];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 9);
        let size = (n_l1 * 64 * C) as u64;
        put64(&mut b, 24, size);
        put32(&mut b, 36, n_l1 as u32);
        put64(&mut b, 40, C as u64);
        put64(&mut b, 48, ((data + 1) * C) as u64);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 104);
        for i in 0..n_l1 {
            let l2 = (l2_start + i) * C;
            put64(&mut b, C + 8 * i, l2 as u64);
            for j in 0..64 {
                put64(&mut b, l2 + 8 * j, (data * C) as u64);
            }
        }
        b[data * C..(data + 1) * C].fill(0x42);
        let o = open_bytes(&b).unwrap();
        let e = o.source.extent(0, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
        assert!(e.len < size, "one extent walked all {} entries", n_l1 * 64);
        let mut at = 0;
        while at < size {
            let e = o.source.extent(at, u64::MAX).unwrap();
            assert_eq!((e.start, e.kind), (at, ExtentKind::Data));
            at = e.end();
        }
        let mut buf = vec![0u8; 3 * C];
        o.source.read_at(size - 3 * C as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0x42));
    }

    #[test]
    fn extended_l2_subclusters() {
        let mut b = base(3);
        put64(&mut b, 72, INCOMPAT_EXTL2);
        put64(&mut b, CS, 2 * CS as u64);
        // Cluster 0: subcluster 0 allocated, 1 zero, 2 unallocated, 3..31 allocated.
        let alloc: u64 = 0xffff_fff9;
        let zero: u64 = 0b10;
        put64(&mut b, 2 * CS, 3 * CS as u64);
        put64(&mut b, 2 * CS + 8, alloc | (zero << 32));
        b[3 * CS..4 * CS].fill(7);
        let o = open_bytes(&b).unwrap();
        let sc = (CS / 32) as u64;
        let e = o.source.extent(0, u64::MAX).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, sc));
        let e = o.source.extent(sc, u64::MAX).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Zero, sc));
        let e = o.source.extent(2 * sc, u64::MAX).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, sc));
        let e = o.source.extent(3 * sc, u64::MAX).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, 29 * sc));
        let v = read_all(&o).unwrap();
        let s = sc as usize;
        assert!(v[..s].iter().all(|&x| x == 7));
        assert!(v[s..3 * s].iter().all(|&x| x == 0));
        assert!(v[3 * s..CS].iter().all(|&x| x == 7));
        // Allocated and zero at once: corrupt.
        put64(&mut b, 2 * CS + 8, 1 | (1 << 32));
        let o = open_bytes(&b).unwrap();
        assert_eq!(read_all(&o).unwrap_err().code(), Code::SnapshotCorrupt);
    }
}
