//! The qcow2 header, in two steps: [`QcowHeader::decode`] turns the header cluster's bytes into
//! named fields (version 2 fields, version 3 fields, the backing file name's bytes, the header
//! extensions) and judges nothing; [`validate`] checks those fields and gives the [`Header`] the
//! reader works with, or the first thing wrong with them.
//!
//! The checks run in one fixed order, which tests pin (one message per damaged image): the format
//! (magic, version, cluster size, encryption, header length, refcount width), the backing file
//! name, the extensions (in file order), the incompatible features and compression type, the
//! virtual size, the L1 table, the snapshot table's place and the refcount table's. None of them
//! reads the file: everything they look at is in the header cluster, read before.

use std::path::Path;

use super::decompress::Compression;
use super::map::l2_bits;
use super::snapshot::{MAX_SNAPSHOTS, SNAPSHOT_FIXED};
use super::{MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::error::{Error, Result};

pub(super) const EXT_END: u32 = 0;
pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(super) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(super) const EXT_BITMAPS: u32 = 0x2385_2875;
pub(super) const EXT_DATA_FILE: u32 = 0x4441_5441;
pub(super) const EXT_CRYPTO: u32 = 0x0537_be77;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Length of a version 2 header, and the least a version 3 header may declare.
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_MIN: u32 = 104;
/// At most 32 MiB of L1 entries.
pub(super) const MAX_L1_ENTRIES: u64 = 4 << 20;
/// Largest refcount table accepted (qemu's limit too); never read.
pub(super) const MAX_REFCOUNT_TABLE: u64 = 8 << 20;
pub(super) const MAX_BACKING_NAME: u32 = 1023;
pub(super) const MAX_VIRTUAL_SIZE: u64 = 1 << 63;

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

/// The header as stored, field by field (byte offsets in the comments). Nothing here is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QcowHeader<'a> {
    /// 0..4: "QFI\xfb".
    pub(crate) magic: u32,
    /// 4..8: 2 or 3.
    pub(crate) version: u32,
    /// 8..16: where the backing file name starts (0: no backing file).
    pub(crate) backing_file_offset: u64,
    /// 16..20: its length in bytes.
    pub(crate) backing_file_size: u32,
    /// 20..24: the cluster size, as a power of two.
    pub(crate) cluster_bits: u32,
    /// 24..32: the virtual size in bytes.
    pub(crate) size: u64,
    /// 32..36: 0 (none), 1 (AES), 2 (LUKS).
    pub(crate) crypt_method: u32,
    /// 36..40, 40..48: the active L1 table.
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    /// 48..56, 56..60: the refcount table.
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    /// 60..64, 64..72: the snapshot table.
    pub(crate) nb_snapshots: u32,
    pub(crate) snapshots_offset: u64,
    /// 72..104 (version 3 and later); `None` in version 2, or when the bytes are not there.
    pub(crate) v3: Option<V3Fields>,
    /// The backing file name's bytes, when `backing_file_offset` is set and the name lies inside
    /// the bytes decoded.
    pub(crate) backing_name: Option<&'a [u8]>,
    /// The header extensions, from the end of the header up to the backing file name (or the end
    /// of the cluster), in file order, up to the end marker.
    pub(crate) extensions: Vec<RawExtension<'a>>,
}

/// The version 3 part of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct V3Fields {
    /// 72..80, 80..88, 88..96.
    pub(crate) incompatible_features: u64,
    pub(crate) compatible_features: u64,
    pub(crate) autoclear_features: u64,
    /// 96..100: refcount width, as a power of two (bits).
    pub(crate) refcount_order: u32,
    /// 100..104: where the header ends and the extensions begin.
    pub(crate) header_length: u32,
    /// 104: 0 (zlib) or 1 (zstd); `None` when `header_length` leaves it out (or the bytes end).
    pub(crate) compression_type: Option<u8>,
}

/// One header extension: type, where it starts, declared length, and its data (`None` when the
/// length runs past the header area; decoding stops after such an extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawExtension<'a> {
    pub(crate) ty: u32,
    pub(crate) at: usize,
    pub(crate) len: u32,
    pub(crate) data: Option<&'a [u8]>,
}

impl<'a> QcowHeader<'a> {
    /// Decodes the header from `first` (the header cluster, or the whole file when shorter).
    /// `None` when `first` is shorter than a version 2 header.
    pub(crate) fn decode(first: &'a [u8]) -> Option<QcowHeader<'a>> {
        if first.len() < V2_HEADER_LEN {
            return None;
        }
        let f32 = |off| be32(first, off);
        let f64 = |off| be64(first, off);
        let version = f32(4)?;
        let v3 = if version >= 3 && first.len() >= V3_HEADER_MIN as usize {
            let header_length = f32(100)?;
            Some(V3Fields {
                incompatible_features: f64(72)?,
                compatible_features: f64(80)?,
                autoclear_features: f64(88)?,
                refcount_order: f32(96)?,
                header_length,
                compression_type: if header_length > V3_HEADER_MIN {
                    first.get(104).copied()
                } else {
                    None
                },
            })
        } else {
            None
        };
        let backing_file_offset = f64(8)?;
        let backing_file_size = f32(16)?;
        let cluster_bits = f32(20)?;
        let backing_name = if backing_file_offset == 0 {
            None
        } else {
            usize::try_from(backing_file_offset)
                .ok()
                .and_then(|s| Some(s..s.checked_add(backing_file_size as usize)?))
                .and_then(|r| first.get(r))
        };
        // Extensions: after the header, before the backing file name, inside the first cluster.
        let cs = 1u64.checked_shl(cluster_bits).unwrap_or(u64::MAX);
        let mut ext_end = usize::try_from(cs).unwrap_or(usize::MAX).min(first.len());
        if backing_file_offset != 0 && (backing_file_offset as usize) < ext_end {
            ext_end = backing_file_offset as usize;
        }
        let ext_start = v3.map_or(V2_HEADER_LEN, |v| v.header_length as usize);
        Some(QcowHeader {
            magic: f32(0)?,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size: f64(24)?,
            crypt_method: f32(32)?,
            l1_size: f32(36)?,
            l1_table_offset: f64(40)?,
            refcount_table_offset: f64(48)?,
            refcount_table_clusters: f32(56)?,
            nb_snapshots: f32(60)?,
            snapshots_offset: f64(64)?,
            v3,
            backing_name,
            extensions: decode_extensions(first, ext_start, ext_end),
        })
    }
}

/// The extensions in `first[start..end]`: (type, length, data padded to 8 bytes) until the end
/// marker, the end of the area, or one that runs past it (kept, without data, as the last).
fn decode_extensions(first: &[u8], start: usize, end: usize) -> Vec<RawExtension<'_>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos.checked_add(8).is_some_and(|e| e <= end) {
        let (Some(ty), Some(len)) = (be32(first, pos), be32(first, pos + 4)) else {
            break;
        };
        if ty == EXT_END {
            break;
        }
        let data_start = pos + 8;
        let data = data_start
            .checked_add(len as usize)
            .filter(|&e| e <= end)
            .map(|e| &first[data_start..e]);
        out.push(RawExtension {
            ty,
            at: pos,
            len,
            data,
        });
        if data.is_none() {
            break;
        }
        pos = match align8(len as usize).and_then(|l| data_start.checked_add(l)) {
            Some(p) => p,
            None => break,
        };
    }
    out
}

/// What the header says (after validation).
#[derive(Debug)]
pub(super) struct Header {
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) nb_snapshots: u32,
    pub(crate) snapshots_offset: u64,
    pub(crate) compression: Compression,
    pub(crate) extended_l2: bool,
    pub(crate) backing: Option<Vec<u8>>,
    pub(crate) backing_format: Option<String>,
    /// `crypt_method` 2: where the LUKS header lies (offset, length), from the full-disk-encryption
    /// header extension.
    pub(crate) crypto: Option<(u64, u64)>,
}

/// Largest LUKS header area inside a qcow2 (qemu's LUKS1 header with 8 slots is about 2 MiB).
pub(super) const MAX_CRYPTO_HEADER: u64 = 16 << 20;

fn too_short(path: &Path) -> Error {
    Error::corrupt(path, "the file is too short for a qcow2 header")
}

/// Decodes and validates the header from the start of the file (`first`: the first cluster, or
/// the whole file when shorter). `file_size` bounds every offset.
pub(super) fn parse_header(first: &[u8], file_size: u64, path: &Path) -> Result<Header> {
    let h = QcowHeader::decode(first).ok_or_else(|| too_short(path))?;
    validate(&h, file_size, path)
}

/// Checks a decoded header, in the order the module docs give; the first failure is returned.
pub(super) fn validate(h: &QcowHeader, file_size: u64, path: &Path) -> Result<Header> {
    let format = check_format(h, path)?;
    let backing = check_backing_name(h, path)?;
    let Extensions {
        backing_format,
        feature_names,
        crypto,
    } = check_extensions(h, path)?;
    let crypto = check_crypto(h.crypt_method, crypto, h.cluster_bits, file_size, path)?;
    check_incompatible(format.incompatible, &feature_names, path)?;
    let compression = check_compression(h, &format, path)?;
    let extended_l2 = format.incompatible & INCOMPAT_EXTL2 != 0;

    let size = h.size;
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(
            path,
            format!("size (the virtual size) {size} is larger than 2^63"),
        ));
    }
    check_l1(
        path,
        "",
        h.l1_size,
        h.l1_table_offset,
        size,
        h.cluster_bits,
        extended_l2,
        file_size,
    )?;
    let cs = 1u64 << h.cluster_bits;
    check_snapshot_table_place(h.nb_snapshots, h.snapshots_offset, cs, file_size, path)?;
    check_refcount_table(
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.cluster_bits,
        file_size,
        path,
    )?;

    Ok(Header {
        version: h.version,
        cluster_bits: h.cluster_bits,
        size,
        l1_size: h.l1_size,
        l1_table_offset: h.l1_table_offset,
        nb_snapshots: h.nb_snapshots,
        snapshots_offset: h.snapshots_offset,
        compression,
        extended_l2,
        backing,
        backing_format,
        crypto,
    })
}

/// `crypt_method` 2 and the full-disk-encryption extension go together; the LUKS header they
/// name is cluster aligned, past the header cluster, bounded and inside the file.
fn check_crypto(
    method: u32,
    ext: Option<(u64, u64)>,
    cluster_bits: u32,
    file_size: u64,
    path: &Path,
) -> Result<Option<(u64, u64)>> {
    let (offset, len) =
        match (method, ext) {
            (0, None) => return Ok(None),
            (2, Some(e)) => e,
            (2, None) => return Err(Error::corrupt(
                path,
                "crypt_method is 2 (LUKS) but the full-disk-encryption header extension is missing",
            )),
            _ => return Err(Error::corrupt(
                path,
                "the image has a full-disk-encryption header extension but crypt_method is not 2",
            )),
        };
    let cs = 1u64 << cluster_bits;
    let inside = offset.checked_add(len).is_some_and(|e| e <= file_size);
    if offset < cs || offset % cs != 0 || len == 0 || len > MAX_CRYPTO_HEADER || !inside {
        return Err(Error::corrupt(
            path,
            format!(
                "the LUKS header at offset {offset} ({len} bytes; full-disk-encryption extension) is not a cluster-aligned area of at most {MAX_CRYPTO_HEADER} bytes inside the file"
            ),
        ));
    }
    Ok(Some((offset, len)))
}

/// The version 3 fields the later checks need (a version 2 header's defaults).
struct Format {
    incompatible: u64,
    header_length: u32,
}

/// Magic, version, cluster size, encryption, then (version 3) the header length and refcount width.
fn check_format(h: &QcowHeader, path: &Path) -> Result<Format> {
    if h.magic != MAGIC {
        return Err(Error::corrupt(path, "not a qcow2 file (bad magic)"));
    }
    let version = h.version;
    if version != 2 && version != 3 {
        return Err(Error::unsupported(
            path,
            format!("qcow2 version {version} is not supported (kiln reads versions 2 and 3)"),
        ));
    }
    let cluster_bits = h.cluster_bits;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::unsupported(
            path,
            format!(
                "cluster_bits {cluster_bits} is not supported (qcow2 allows {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}: 512 B to 2 MiB clusters)"
            ),
        ));
    }
    let cs = 1u64 << cluster_bits;
    match h.crypt_method {
        0 | 2 => {}
        1 => {
            return Err(Error::unsupported(
                path,
                "it is encrypted with qcow2's old AES-CBC (crypt_method 1), which is insecure and which kiln does not read; convert it to LUKS with its old key first: `qemu-img convert --object secret,id=old,file=OLDKEY --object secret,id=new,file=NEWKEY --image-opts driver=qcow2,file.filename=IN,encrypt.key-secret=old -O qcow2 -o encrypt.format=luks,encrypt.key-secret=new OUT`",
            ));
        }
        m => {
            return Err(Error::unsupported(
                path,
                format!("crypt_method {m} is not supported (0: none, 2: LUKS)"),
            ));
        }
    }

    let (format, refcount_order) = if version == 3 {
        let v3 = h.v3.ok_or_else(|| too_short(path))?;
        let hl = v3.header_length;
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
        let format = Format {
            incompatible: v3.incompatible_features,
            header_length: hl,
        };
        (format, v3.refcount_order)
    } else {
        let format = Format {
            incompatible: 0,
            header_length: V2_HEADER_LEN as u32,
        };
        (format, 4)
    };
    if refcount_order > 6 {
        return Err(Error::corrupt(
            path,
            format!("refcount_order {refcount_order} is out of range (0 to 6)"),
        ));
    }
    Ok(format)
}

/// The backing file name: at most 1023 bytes, inside the header cluster. `None` without one (an
/// offset of 0, or a length of 0).
fn check_backing_name(h: &QcowHeader, path: &Path) -> Result<Option<Vec<u8>>> {
    let (offset, size) = (h.backing_file_offset, h.backing_file_size);
    if offset == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME {
        return Err(Error::corrupt(
            path,
            format!(
                "the backing file name is {size} bytes long (backing_file_size; at most {MAX_BACKING_NAME})"
            ),
        ));
    }
    let cs = 1u64 << h.cluster_bits;
    let inside = offset.checked_add(u64::from(size)).is_some_and(|e| e <= cs);
    let name = h.backing_name.filter(|_| inside).ok_or_else(|| {
        Error::corrupt(
            path,
            format!(
                "the backing file name at byte {offset} (backing_file_offset) lies outside the header cluster"
            ),
        )
    })?;
    Ok((size > 0).then(|| name.to_vec()))
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    /// (feature type, bit, name) from the feature name table.
    feature_names: Vec<(u8, u8, String)>,
    /// The full-disk-encryption extension: the LUKS header's offset and length.
    crypto: Option<(u64, u64)>,
}

/// Reads the header extensions in file order, refusing one that runs past the header area and
/// those kiln does not read (an external data file, encryption).
fn check_extensions(h: &QcowHeader, path: &Path) -> Result<Extensions> {
    let mut x = Extensions::default();
    for e in &h.extensions {
        let (ty, pos, len) = (e.ty, e.at, e.len);
        let Some(data) = e.data else {
            return Err(Error::corrupt(
                path,
                format!("header extension 0x{ty:08x} at byte {pos} ({len} bytes) runs past the header area"),
            ));
        };
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
                if data.len() != 16 {
                    return Err(Error::corrupt(
                        path,
                        format!("the full-disk-encryption header extension is {len} bytes (16 expected)"),
                    ));
                }
                let v = |at: usize| be64(data, at).unwrap_or(0);
                x.crypto = Some((v(0), v(8)));
            }
            EXT_BITMAPS => {}
            _ => {}
        }
    }
    Ok(x)
}

/// Incompatible feature bits: corrupt, external data file, then the lowest unknown bit (named from
/// the feature name table when it has the name).
fn check_incompatible(
    incompatible: u64,
    feature_names: &[(u8, u8, String)],
    path: &Path,
) -> Result<()> {
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
    Ok(())
}

/// The compression type (byte 104, when the header is longer than 104 bytes; zlib otherwise),
/// which must agree with incompatible feature bit 3.
fn check_compression(h: &QcowHeader, format: &Format, path: &Path) -> Result<Compression> {
    let ctype = if format.header_length > V3_HEADER_MIN {
        h.v3.and_then(|v| v.compression_type)
            .ok_or_else(|| too_short(path))?
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
    if (ctype != 0) != (format.incompatible & INCOMPAT_COMPRESSION != 0) {
        return Err(Error::corrupt(
            path,
            format!("compression type {ctype} disagrees with incompatible feature bit 3"),
        ));
    }
    Ok(compression)
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
pub(super) fn check_l1(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    /// A version 3 header of 112 bytes (zstd), 64 KiB clusters, a 1 MiB disk, then a backing
    /// format extension, the end marker and the backing file name.
    fn v3_zstd() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, b"QFI\xfb"); // magic
        put(4, &3u32.to_be_bytes()); // version
        put(8, &1024u64.to_be_bytes()); // backing_file_offset
        put(16, &5u32.to_be_bytes()); // backing_file_size
        put(20, &16u32.to_be_bytes()); // cluster_bits: 64 KiB
        put(24, &(1u64 << 20).to_be_bytes()); // size: 1 MiB
        put(32, &0u32.to_be_bytes()); // crypt_method: none
        put(36, &1u32.to_be_bytes()); // l1_size
        put(40, &0x1_0000u64.to_be_bytes()); // l1_table_offset: cluster 1
        put(48, &0x2_0000u64.to_be_bytes()); // refcount_table_offset: cluster 2
        put(56, &1u32.to_be_bytes()); // refcount_table_clusters
        put(60, &0u32.to_be_bytes()); // nb_snapshots
        put(64, &0u64.to_be_bytes()); // snapshots_offset
        put(72, &INCOMPAT_COMPRESSION.to_be_bytes()); // incompatible_features: zstd
        put(80, &1u64.to_be_bytes()); // compatible_features: lazy refcounts
        put(88, &0u64.to_be_bytes()); // autoclear_features
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit
        put(100, &112u32.to_be_bytes()); // header_length
        put(104, &[1]); // compression_type: zstd (then 7 bytes of padding)
        put(112, &EXT_BACKING_FORMAT.to_be_bytes()); // extension: backing format,
        put(116, &3u32.to_be_bytes()); // 3 bytes long,
        put(120, b"raw"); // padded to 8
        put(128, &EXT_END.to_be_bytes()); // end of the extensions
        put(1024, b"b.raw"); // the backing file name
        b
    }

    #[test]
    fn decode_names_every_field_and_judges_nothing() {
        let b = v3_zstd();
        let h = QcowHeader::decode(&b).unwrap();
        assert_eq!(h.magic, MAGIC);
        assert_eq!((h.version, h.cluster_bits, h.size), (3, 16, 1 << 20));
        assert_eq!((h.backing_file_offset, h.backing_file_size), (1024, 5));
        assert_eq!(h.backing_name, Some(&b"b.raw"[..]));
        assert_eq!((h.l1_size, h.l1_table_offset), (1, 0x1_0000));
        assert_eq!(
            (h.refcount_table_offset, h.refcount_table_clusters),
            (0x2_0000, 1)
        );
        let v3 = h.v3.unwrap();
        assert_eq!(v3.incompatible_features, INCOMPAT_COMPRESSION);
        assert_eq!(v3.compatible_features, 1);
        assert_eq!((v3.refcount_order, v3.header_length), (4, 112));
        assert_eq!(v3.compression_type, Some(1));
        assert_eq!(
            h.extensions,
            vec![RawExtension {
                ty: EXT_BACKING_FORMAT,
                at: 112,
                len: 3,
                data: Some(&b"raw"[..]),
            }]
        );

        // Nonsense decodes all the same; only validation refuses it.
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&200u32.to_be_bytes());
        bad[0] = b'X';
        let h = QcowHeader::decode(&bad).unwrap();
        assert_eq!((h.magic >> 24, h.cluster_bits), (u32::from(b'X'), 200));
        assert!(QcowHeader::decode(&b[..71]).is_none());
    }

    #[test]
    fn validate_gives_the_reader_its_header() {
        let h = parse_header(&v3_zstd(), 3 << 16, Path::new("t.qcow2")).unwrap();
        assert_eq!(h.compression, Compression::Zstd);
        assert_eq!(h.backing.as_deref(), Some(&b"b.raw"[..]));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert!(!h.extended_l2);
    }

    #[test]
    fn an_extension_running_past_the_area_ends_the_list_and_fails_in_its_turn() {
        let mut b = v3_zstd();
        // A data file extension first, then the backing format one runs past the name at 1024.
        b[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        b[128..132].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[132..136].copy_from_slice(&2000u32.to_be_bytes());
        let h = QcowHeader::decode(&b).unwrap();
        assert_eq!(h.extensions.len(), 2);
        assert_eq!(h.extensions[1].data, None);
        let e = validate(&h, 3 << 16, Path::new("t.qcow2")).unwrap_err();
        assert_eq!(e.code(), Code::SnapshotUnsupported, "{e}");
        assert!(e.message().contains("external data file"), "{e}");
    }

    #[test]
    fn checks_fire_in_order() {
        // Bad refcount order, an oversized backing name and an unknown feature bit at once: the
        // refcount order is checked first.
        let mut b = v3_zstd();
        b[96..100].copy_from_slice(&9u32.to_be_bytes());
        b[16..20].copy_from_slice(&2000u32.to_be_bytes());
        b[72..80].copy_from_slice(&(INCOMPAT_COMPRESSION | 1 << 40).to_be_bytes());
        let path = Path::new("t.qcow2");
        let msg = |b: &[u8]| {
            parse_header(b, 3 << 16, path)
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(msg(&b).contains("refcount_order 9"));
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        assert!(msg(&b).contains("backing file name is 2000 bytes"));
        b[16..20].copy_from_slice(&5u32.to_be_bytes());
        assert!(msg(&b).contains("feature bit 40"));
    }
}
