//! `kiln inspect`: what kiln sees in a source file, in `qemu-img info` / `qemu-img map` terms and
//! with their JSON field names: format, sizes, cluster size, backing chain, internal snapshots,
//! whether a process holds it open for writing, and the allocation map.
//!
//! The guest view (sizes, chain, map) comes from [`crate::format::open`], the reader kiln copies
//! with, so the map shows exactly what a copy would read. The qcow2 header fields the reader does not
//! publish (the cluster size) is read here; the snapshot table comes from the qcow2 format's snapshot
//! module.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::input::{Input, RandomRead};
use crate::format::{self, qcow2, BlockSource, ExtentKind, Format, Opened};
use crate::prepare::qemu_lock::{self, Holder};

/// Largest extent asked of a source at once while mapping.
const MAP_STEP: u64 = 1 << 40;

/// One run of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub(crate) start: u64,
    pub(crate) length: u64,
    /// Which chain element holds the range (0: the file itself). Only given when it is exact: for a
    /// file without backing file. With a backing chain kiln's reader answers for the whole chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) depth: Option<u32>,
    /// Allocated somewhere (qemu-img: "present"); a raw file is present everywhere.
    pub(crate) present: bool,
    /// Reads as zeros without reading (a hole, a zero cluster, nothing allocated).
    pub(crate) zero: bool,
    /// Holds data that must be read.
    pub(crate) data: bool,
}

/// An internal qcow2 snapshot, as `qemu-img info --output=json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    #[serde(rename = "vm-state-size")]
    pub(crate) vm_state_size: u64,
    #[serde(rename = "date-sec")]
    pub date_sec: u32,
    #[serde(rename = "date-nsec")]
    pub(crate) date_nsec: u32,
    #[serde(rename = "vm-clock-sec")]
    pub(crate) vm_clock_sec: u64,
    #[serde(rename = "vm-clock-nsec")]
    pub(crate) vm_clock_nsec: u32,
}

/// A backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainFile {
    pub(crate) filename: PathBuf,
    pub(crate) format: Format,
    #[serde(rename = "actual-size")]
    pub(crate) actual_size: u64,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_size: Option<u64>,
    /// A process holding it open for writing (QEMU's write lock), if any.
    #[serde(rename = "writer", skip_serializing_if = "Option::is_none")]
    pub(crate) writer: Option<Holder>,
}

/// What `kiln inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectReport {
    pub(crate) filename: PathBuf,
    pub format: Format,
    /// The internal snapshot read (`FILE@SNAP`), by its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The backing file, resolved (qemu-img's `full-backing-filename`).
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename: Option<PathBuf>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<Format>,
    /// Every backing file, nearest first.
    #[serde(rename = "backing-chain", skip_serializing_if = "Vec::is_empty")]
    pub backing_chain: Vec<ChainFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// A process holding the file open for writing (QEMU's write lock), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) writer: Option<Holder>,
    /// The file's own data is encrypted (LUKS); shown without the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<Vec<MapEntry>>,
}

/// How an encrypted file is encrypted, from its LUKS header: never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EncryptionReport {
    /// `luks1` (a raw volume or inside a qcow2) or `luks2`.
    pub format: String,
    /// `aes-xts-plain64` (the only cipher kiln reads).
    pub cipher: String,
    #[serde(rename = "key-bits")]
    pub key_bits: u32,
    /// The KDF of the key slot that holds the key: `pbkdf2-sha256`, `argon2id`, ...
    #[serde(rename = "key-slot-kdf")]
    pub key_slot_kdf: String,
    /// Whether a key was given and opened it: the data could then be read. Without one, sizes and
    /// the allocation map are still shown (they are not encrypted).
    pub unlocked: bool,
}

/// What to inspect.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// The format, when stated; detected otherwise.
    pub format: Option<Format>,
    /// Also compute the allocation map.
    pub map: bool,
    /// Which qcow2 backing files may be followed (`--backing-dir`).
    pub gate: crate::format::gate::BackingGate,
}

/// Inspects `path` (`FILE` or `FILE@SNAP`), without the map.
pub fn inspect(path: &Path) -> Result<InspectReport> {
    inspect_with(path, &InspectOptions::default())
}

/// Opens `path` as the options say. An encrypted file opens without a key too (its header, sizes
/// and map are shown; its data is not read); a key given must open it.
pub fn inspect_with(path: &Path, opts: &InspectOptions) -> Result<InspectReport> {
    let gate = crate::format::gate::BackingGate {
        keyless: true,
        ..opts.gate.clone()
    };
    let opened = crate::prepare::open(path, opts.format, &gate)?;
    let info = &opened.info;
    // Opened once for what the reader does not publish (one HEAD for an object).
    let input = format::input::open(&info.path)?;
    let top = file_facts(&input, &info.path, info.format)?;
    let encryption = encryption(&input, &info.path, info.format, gate.key.is_some())?;
    let snapshots = match info.format {
        Format::Qcow2 => read_snapshot_table(&*input, &info.path)?,
        Format::Raw | Format::Vhdx | Format::Luks | Format::Vmdk | Format::Vhd | Format::Vdi => {
            Vec::new()
        }
    };
    // A VMDK's chain also lists its extent files; its backing chain is its parents only.
    let layers = match info.format {
        Format::Vmdk => format::vmdk::reader::layers(&info.path, &opts.gate)?,
        _ => info.chain.clone(),
    };
    let mut backing_chain = Vec::new();
    for c in layers.iter().skip(1) {
        let f = file_facts(&format::input::open(&c.path)?, &c.path, c.format)?;
        backing_chain.push(ChainFile {
            filename: c.path.clone(),
            format: c.format,
            actual_size: f.actual_size,
            cluster_size: f.cluster_size,
            writer: f.writer,
        });
    }
    let map = if opts.map {
        Some(map_opened(&opened)?)
    } else {
        None
    };
    Ok(InspectReport {
        filename: info.path.clone(),
        format: info.format,
        snapshot: info.snapshot.clone(),
        virtual_size: info.virtual_size,
        actual_size: top.actual_size,
        cluster_size: top.cluster_size,
        backing_filename: layers.get(1).map(|c| c.path.clone()),
        backing_filename_format: layers.get(1).map(|c| c.format),
        backing_chain,
        snapshots,
        writer: top.writer,
        encrypted: encryption.is_some(),
        encryption,
        map,
    })
}

/// The encryption of the file itself (a raw LUKS volume, or a qcow2 with `crypt_method` 2), read
/// from its headers without a key; `unlocked` when the open used a key (which then opened it).
fn encryption(
    file: &Input,
    path: &Path,
    format: Format,
    unlocked: bool,
) -> Result<Option<EncryptionReport>> {
    let info = match format {
        Format::Qcow2 => qcow2::reader::encryption(file.clone(), path)?,
        Format::Luks => {
            let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
            let read = format::luks::area_reader(&**file, 0, size, path);
            Some(format::luks::describe(&read, size, path)?.0)
        }
        Format::Raw | Format::Vhdx | Format::Vmdk | Format::Vhd | Format::Vdi => None,
    };
    Ok(info.map(|v| EncryptionReport {
        format: format!("luks{}", v.luks_version),
        cipher: "aes-xts-plain64".into(),
        key_bits: v.key_bits,
        key_slot_kdf: v.kdf,
        unlocked,
    }))
}

struct FileFacts {
    actual_size: u64,
    cluster_size: Option<u64>,
    writer: Option<Holder>,
}

/// What `qemu-img info` says of one file of the chain. An object in a bucket (`s3://`) takes no
/// lock and has no holes: its actual size is its length, and no writer is named.
fn file_facts(file: &Input, path: &Path, format: Format) -> Result<FileFacts> {
    let cluster_size = match format {
        Format::Qcow2 => {
            let h = qcow2::snapshot::read_listing(&**file, path, 20, 4, "the qcow2 header")?;
            let bits = be32(&h);
            if !(9..=21).contains(&bits) {
                return Err(Error::corrupt(
                    path,
                    format!("cluster_bits {bits} is outside 9..21"),
                ));
            }
            Some(1u64 << bits)
        }
        Format::Vhd => format::vhd::reader::block_size(&**file, path)?,
        Format::Vdi => Some(format::vdi::block_size(file.clone(), path)?),
        Format::Vhdx => Some(format::vhdx::reader::block_size(path)?),
        Format::Vmdk => format::vmdk::grain_size(path)?,
        Format::Raw | Format::Luks => None,
    };
    let (actual_size, writer) = match file.as_file() {
        Some(f) => {
            let meta = f
                .metadata()
                .map_err(|e| Error::io(path, "reading metadata of", e))?;
            (
                meta.blocks().saturating_mul(512),
                qemu_lock::writer_holding(f, path)?,
            )
        }
        None => (file.len().map_err(|e| Error::io(path, "sizing", e))?, None),
    };
    Ok(FileFacts {
        actual_size,
        cluster_size,
        writer,
    })
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
/// The qcow2 snapshot table of `file` (read from `path`) as `qemu-img info` lists it, read by the
/// qcow2 format's snapshot module.
pub(crate) fn read_snapshot_table(file: &dyn RandomRead, path: &Path) -> Result<Vec<SnapshotInfo>> {
    Ok(qcow2::snapshot::read_snapshot_table(file, path)?
        .into_iter()
        .map(|s| SnapshotInfo {
            id: s.id,
            name: s.name,
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: (s.vm_clock_nsec % 1_000_000_000) as u32,
        })
        .collect())
}

/// The map of an opened source, as `qemu-img map` gives it: `depth` for a file without backing, and
/// `present` for the holes of a raw file (QEMU counts a raw file as present everywhere).
pub(crate) fn map_opened(opened: &Opened) -> Result<Vec<MapEntry>> {
    let info = &opened.info;
    let depth = (info.chain.len() == 1).then_some(0);
    // QEMU counts every byte of a raw file as present: that of the bottom of the chain, up to its size.
    let present_below = match info.chain.last() {
        Some(c) if c.format == Format::Raw && info.chain.len() == 1 => info.virtual_size,
        Some(c) if c.format == Format::Raw => format::input::open(&c.path)
            .and_then(|f| f.len().map_err(|e| Error::io(&c.path, "sizing", e)))?,
        _ => 0,
    };
    map_inner(opened.source.as_ref(), depth, present_below)
}

fn map_inner(
    source: &dyn BlockSource,
    depth: Option<u32>,
    present_below: u64,
) -> Result<Vec<MapEntry>> {
    let size = source.virtual_size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let e = source.extent(offset, (size - offset).min(MAP_STEP))?;
        if e.len == 0 || e.start != offset {
            return Err(Error::new(
                crate::error::Code::Internal,
                format!("the reader returned an empty or misplaced extent at offset {offset}"),
            ));
        }
        let len = e.len.min(size - offset);
        // A run that crosses the end of a raw backing file splits there.
        let pieces: &[(u64, u64)] = &if e.kind == ExtentKind::Unallocated
            && offset < present_below
            && offset + len > present_below
        {
            vec![
                (offset, present_below - offset),
                (present_below, offset + len - present_below),
            ]
        } else {
            vec![(offset, len)]
        };
        for &(start, length) in pieces {
            let (data, zero, present) = match e.kind {
                ExtentKind::Data => (true, false, true),
                ExtentKind::Zero => (false, true, true),
                ExtentKind::Unallocated => (false, true, start < present_below),
            };
            let entry = MapEntry {
                start,
                length,
                depth,
                present,
                zero,
                data,
            };
            match out.last_mut() {
                Some(l)
                    if l.start + l.length == start
                        && (l.depth, l.present, l.zero, l.data) == (depth, present, zero, data) =>
                {
                    l.length += length
                }
                _ => out.push(entry),
            }
        }
        offset += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Extent;
    use std::fs;

    /// The snapshot table of the file at `p`.
    fn table(p: &Path) -> Result<Vec<SnapshotInfo>> {
        read_snapshot_table(&*format::input::open(p)?, p)
    }

    struct Fake(Vec<(u64, ExtentKind)>, u64);

    impl BlockSource for Fake {
        fn virtual_size(&self) -> u64 {
            self.1
        }
        fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
            let i = self.0.iter().rposition(|(s, _)| *s <= offset).unwrap();
            let end = self.0.get(i + 1).map_or(self.1, |n| n.0);
            Ok(Extent {
                start: offset,
                len: (end - offset).min(max_len),
                kind: self.0[i].1,
            })
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> Result<()> {
            unreachable!()
        }
    }

    #[test]
    fn map_classifies_like_qemu_img_and_merges_runs() {
        use ExtentKind::*;
        let src = Fake(
            vec![
                (0, Data),
                (10, Data),
                (20, Zero),
                (30, Unallocated),
                (40, Data),
            ],
            50,
        );
        let m = map_inner(&src, None, 0).unwrap();
        let got: Vec<_> = m
            .iter()
            .map(|e| (e.start, e.length, e.data, e.zero, e.present))
            .collect();
        assert_eq!(
            got,
            [
                (0, 20, true, false, true),
                (20, 10, false, true, true),
                (30, 10, false, true, false),
                (40, 10, true, false, true)
            ]
        );
        // A raw bottom makes holes present up to its end.
        let m = map_inner(&src, None, 35).unwrap();
        let got: Vec<_> = m.iter().map(|e| (e.start, e.length, e.present)).collect();
        assert_eq!(
            got,
            [
                (0, 20, true),
                (20, 15, true),
                (35, 5, false),
                (40, 10, true)
            ]
        );
        let json = serde_json::to_string(&m[0]).unwrap();
        assert_eq!(
            json,
            r#"{"start":0,"length":20,"present":true,"zero":false,"data":true}"#
        );
    }

    /// A qcow2 v3 header with two snapshots written by hand: byte-by-byte, as the spec lays them out.
    #[test]
    fn snapshot_table_is_parsed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.qcow2");
        let mut img = vec![0u8; 1024];
        img[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        img[60..64].copy_from_slice(&2u32.to_be_bytes()); // nb_snapshots
        img[64..72].copy_from_slice(&512u64.to_be_bytes()); // snapshots_offset
        let mut entry = |at: usize, id: &str, name: &str, extra: &[u8], date: u32| -> usize {
            img[at + 12..at + 14].copy_from_slice(&(id.len() as u16).to_be_bytes());
            img[at + 14..at + 16].copy_from_slice(&(name.len() as u16).to_be_bytes());
            img[at + 16..at + 20].copy_from_slice(&date.to_be_bytes());
            img[at + 24..at + 32].copy_from_slice(&3_500_000_000u64.to_be_bytes());
            img[at + 32..at + 36].copy_from_slice(&77u32.to_be_bytes());
            img[at + 36..at + 40].copy_from_slice(&(extra.len() as u32).to_be_bytes());
            let mut o = at + 40;
            for part in [extra, id.as_bytes(), name.as_bytes()] {
                img[o..o + part.len()].copy_from_slice(part);
                o += part.len();
            }
            (o - at).next_multiple_of(8) + at
        };
        let next = entry(512, "1", "clean", &[], 1_700_000_000);
        let mut extra = [0u8; 16];
        extra[0..8].copy_from_slice(&(5u64 << 32).to_be_bytes()); // vm_state_size_large
        let end = entry(next, "2", "with-ram", &extra, 1_700_000_100);
        img.truncate(end);
        fs::write(&p, &img).unwrap();
        let s = table(&p).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].id.as_str(), s[0].name.as_str(), s[0].vm_state_size),
            ("1", "clean", 77)
        );
        assert_eq!((s[0].vm_clock_sec, s[0].vm_clock_nsec), (3, 500_000_000));
        assert_eq!(
            (s[1].name.as_str(), s[1].vm_state_size, s[1].date_sec),
            ("with-ram", 5 << 32, 1_700_000_100)
        );

        // Too many snapshots, an entry past the end, oversized extra data: corrupt, not a panic.
        let mut bad = img.clone();
        bad[60..64].copy_from_slice(&(qcow2::snapshot::MAX_SNAPSHOTS + 1).to_be_bytes());
        fs::write(&p, &bad).unwrap();
        assert_eq!(
            table(&p).unwrap_err().code(),
            crate::error::Code::SnapshotCorrupt
        );
        let mut bad = img.clone();
        bad[60..64].copy_from_slice(&3u32.to_be_bytes());
        fs::write(&p, &bad).unwrap();
        assert_eq!(
            table(&p).unwrap_err().code(),
            crate::error::Code::SnapshotCorrupt
        );
        let mut bad = img.clone();
        bad[512 + 36..512 + 40].copy_from_slice(&u32::MAX.to_be_bytes());
        fs::write(&p, &bad).unwrap();
        assert_eq!(
            table(&p).unwrap_err().code(),
            crate::error::Code::SnapshotCorrupt
        );
    }

    #[test]
    fn a_sparse_raw_file_inspects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], 65536).unwrap();
        let r = inspect_with(
            &p,
            &InspectOptions {
                map: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.format, Format::Raw);
        assert_eq!(r.virtual_size, 1 << 20);
        assert_eq!(r.cluster_size, None);
        assert!(r.writer.is_none());
        let map = r.map.as_ref().unwrap();
        assert!(map.iter().all(|m| m.present && m.depth == Some(0)));
        assert!(map
            .iter()
            .any(|m| m.data && m.start <= 65536 && 65536 < m.start + m.length));
        let text = crate::output::inspect::render_text(&r);
        assert!(
            text.contains("file format: raw") && text.contains("map:"),
            "{text}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["virtual-size"], 1 << 20);
        assert!(v.get("snapshots").is_none());
    }
}
