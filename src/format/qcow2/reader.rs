//! Opening a qcow2 file and its backing chain, and reading it: the [`BlockSource`] of a chain.
//!
//! [`open`] reads the header cluster, decodes and validates the header ([`super::header`]), picks
//! the L1 table (the active one, or an internal snapshot's, [`super::snapshot`]), reads it
//! ([`super::map`]), then opens the backing file through the gate. [`Qcow2Source`] answers
//! "what is at this guest offset" from the mapping, resolving unallocated runs through the backing
//! file, and reads guest bytes (host data, [`super::decompress`]ed clusters, zeros, backing).
//!
//! The order of the checks on open is fixed (tests pin which error a damaged file gives): the
//! chain (loop, depth), the header (all of it, in [`super::header`]'s order), then the selected
//! snapshot's table entries and L1 placement, then the L1 table's contents, then the backing file.
//! Those later steps stay after the header checks because each needs a read that the header
//! validated first: the snapshot table is read only once `nb_snapshots` and `snapshots_offset` are
//! checked, the L1 table only once its place is, the backing file only once this file is sound.

use crate::format::input::Input;
use std::path::Path;

use super::decompress::{self, Compression};
use super::file::{GuestOffset, HostOffset, ImageFile};
use super::header::{check_l1, parse_header, Header, MAX_VIRTUAL_SIZE};
use super::map::{merge_runs, Geometry, Mapping, Mode, Seg};
use super::snapshot::{read_snapshots, Snapshot};
use super::{MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::error::{Code, Error, Result};
use crate::format::chain::{self, Chain};
use crate::format::luks::{self, crypto::SectorCipher, crypto::SECTOR};
use crate::format::{
    gate::BackingGate, BlockSource, Extent, ExtentKind, Format, Opened, SourceInfo,
};

/// Opens a qcow2 source (and its backing chain) read-only; `snapshot` names an internal snapshot
/// by name or ID.
pub fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &BackingGate,
) -> Result<Opened> {
    let mut chain = Chain::new();
    let (src, snap) = open_layer(file, path, snapshot, &mut chain, gate)?;
    let info = SourceInfo {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        snapshot: snap,
        virtual_size: src.virtual_size,
        chain: chain.into_files(),
    };
    Ok(Opened {
        source: Box::new(src),
        info,
    })
}

/// How the qcow2 file `input` (read from `path`) encrypts its own data, from its header and LUKS
/// header alone (no key): None when it does not. Every field is checked as for an open.
pub(crate) fn encryption(input: Input, path: &Path) -> Result<Option<luks::VolumeInfo>> {
    let file = ImageFile::new(input, path)?;
    let h = parse_header(&read_header_cluster(&file)?, file.size, path)?;
    let Some((offset, len)) = h.crypto else {
        return Ok(None);
    };
    let read = luks::area_reader(&file.file, offset, len, path);
    Ok(Some(luks::describe(&read, len, path)?.0))
}

/// The header cluster (at most 2 MiB): the first 512 bytes, then, when they name a larger valid
/// cluster size, the whole first cluster; cut at the end of the file. The look at the magic and
/// `cluster_bits` here only sizes the read: the header checks then run on what was read, and a
/// header that fails them fails before anything past the first 512 bytes matters.
fn read_header_cluster(file: &ImageFile) -> Result<Vec<u8>> {
    let read = |len: u64| {
        let mut buf = vec![0u8; len.min(file.size) as usize];
        let n = file
            .read_at(HostOffset(0), &mut buf)
            .map_err(|e| Error::io(&file.path, "reading the header of", e))?;
        buf.truncate(n);
        Ok::<_, Error>(buf)
    };
    let first = read(512)?;
    let be32 = |off: usize| {
        first
            .get(off..off + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    match be32(20) {
        Some(cb)
            if (MIN_CLUSTER_BITS + 1..=MAX_CLUSTER_BITS).contains(&cb)
                && be32(0) == Some(MAGIC) =>
        {
            read(1u64 << cb)
        }
        _ => Ok(first),
    }
}

/// The L1 table to read: the active one, or a snapshot's.
struct Table {
    l1_offset: u64,
    l1_size: u32,
    virtual_size: u64,
    snapshot: Option<String>,
}

pub(crate) fn open_layer(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    chain: &mut Chain,
    gate: &BackingGate,
) -> Result<(Qcow2Source, Option<String>)> {
    chain.note(path, Format::Qcow2)?;
    let file = ImageFile::new(file, path)?;
    let h = parse_header(&read_header_cluster(&file)?, file.size, path)?;
    // Reads the header has made safe, each followed by its own checks (the module docs say why
    // these stay after the header's): the snapshot table, the L1 table, the backing file.
    let table = match snapshot {
        None => Table {
            l1_offset: h.l1_table_offset,
            l1_size: h.l1_size,
            virtual_size: h.size,
            snapshot: None,
        },
        Some(want) => select_snapshot(&file, &h, want)?,
    };
    let geo = Geometry {
        cluster_bits: h.cluster_bits,
        extended_l2: h.extended_l2,
        zero_flag: h.version >= 3 && !h.extended_l2,
    };
    let map = Mapping::load(
        &file,
        geo,
        table.l1_offset,
        table.l1_size,
        table.snapshot.as_deref(),
    )?;
    let backing = match &h.backing {
        None => None,
        Some(name) => Some(chain::open_backing(
            path,
            name,
            h.backing_format.as_deref(),
            chain,
            gate,
        )?),
    };
    let crypt = match (h.crypto, &gate.key) {
        (None, _) => Crypt::None,
        (Some((offset, len)), Some(key)) => {
            let read = luks::area_reader(&file.file, offset, len, path);
            Crypt::Key(luks::unlock(&read, len, key, path)?.cipher)
        }
        (Some((offset, len)), None) if gate.keyless => {
            luks::describe(&luks::area_reader(&file.file, offset, len, path), len, path)?;
            Crypt::Locked
        }
        (Some(_), None) => return Err(luks::key_needed(path)),
    };
    let src = Qcow2Source {
        file,
        map,
        crypt,
        compression: h.compression,
        virtual_size: table.virtual_size,
        backing,
    };
    Ok((src, table.snapshot))
}

/// Reads the snapshot table and picks the snapshot named `want` (by name first, then by ID); its
/// virtual size and L1 table are checked like the header's.
fn select_snapshot(file: &ImageFile, h: &Header, want: &str) -> Result<Table> {
    let path = file.path.as_path();
    let snaps = read_snapshots(
        &file.file,
        path,
        h.nb_snapshots,
        h.snapshots_offset,
        file.size,
    )?;
    let s = snaps
        .iter()
        .find(|s| s.name == want)
        .or_else(|| snaps.iter().find(|s| s.id == want))
        .ok_or_else(|| snapshot_not_found(path, want, &snaps))?;
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
        file.size,
    )?;
    Ok(Table {
        l1_offset: s.l1_offset,
        l1_size: s.l1_size,
        virtual_size: size,
        snapshot: Some(s.name.clone()),
    })
}

fn snapshot_not_found(path: &Path, want: &str, snaps: &[Snapshot]) -> Error {
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
}

/// Whether a layer's data clusters are encrypted, and how they are read.
enum Crypt {
    None,
    /// LUKS, unlocked with the key given.
    Key(SectorCipher),
    /// LUKS, opened without a key (`kiln inspect`): its header checked, its clusters mapped, and
    /// every read of their data refused for want of the key.
    Locked,
}

/// An opened qcow2 file (one layer of a chain; its backing file below it).
pub(crate) struct Qcow2Source {
    file: ImageFile,
    map: Mapping,
    /// LUKS (`crypt_method` 2): data clusters are encrypted, the IV being the host sector.
    crypt: Crypt,
    compression: Compression,
    virtual_size: u64,
    backing: Option<Box<dyn BlockSource>>,
}

impl Qcow2Source {
    /// One extent from `pos`: this file's run, resolved through the backing file where unallocated.
    fn extent_once(&self, pos: u64, limit: u64) -> Result<Extent> {
        let (seg, end) = self.map.walk(
            &self.file,
            GuestOffset(pos),
            GuestOffset(limit),
            Mode::Extent,
        )?;
        let end = end.0;
        let kind = match seg {
            Seg::Host(_) | Seg::Compressed(_) => ExtentKind::Data,
            Seg::Zero => ExtentKind::Zero,
            Seg::Unalloc => return crate::format::extent_below(self.backing.as_deref(), pos, end),
        };
        Ok(Extent {
            start: pos,
            len: end - pos,
            kind,
        })
    }

    fn read_host(&self, host: HostOffset, out: &mut [u8], guest: GuestOffset) -> Result<()> {
        let n = self.file.read_at(host, out).map_err(|e| {
            Error::io(
                &self.file.path,
                &format!("reading {} bytes at host offset {host}", out.len()),
                e,
            )
        })?;
        if n == 0 && !out.is_empty() {
            return Err(self.file.corrupt_at(
                guest,
                format!("its data at host offset {host} is past the end of the file"),
            ));
        }
        // A last cluster cut short by the end of the file reads as zeros past it, as in qemu.
        out[n..].fill(0);
        Ok(())
    }
}

impl BlockSource for Qcow2Source {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit =
            crate::format::extent_limit(&self.file.path, self.virtual_size, offset, max_len)?;
        merge_runs(offset, limit, |at| self.extent_once(at, limit))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = crate::format::read_end(&self.file.path, offset, buf.len(), self.virtual_size)?;
        let cs = self.map.cluster_size();
        let mut cluster: Vec<u8> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (seg, seg_end) =
                self.map
                    .walk(&self.file, GuestOffset(pos), GuestOffset(end), Mode::Read)?;
            let seg_end = seg_end.0;
            let out = &mut buf[(pos - offset) as usize..(seg_end - offset) as usize];
            match seg {
                Seg::Host(h) => match &self.crypt {
                    Crypt::None => self.read_host(h, out, GuestOffset(pos))?,
                    Crypt::Locked => return Err(luks::key_needed(&self.file.path)),
                    // qemu's LUKS IV in a qcow2 is the host sector (crypt_physical_offset).
                    Crypt::Key(c) => luks::read_decrypted(
                        c,
                        (pos, seg_end),
                        out,
                        |at| (h.0 - (pos - at)) / SECTOR,
                        |at, o| self.read_host(HostOffset(h.0 - (pos - at)), o, GuestOffset(at)),
                    )?,
                },
                Seg::Compressed(_) if !matches!(self.crypt, Crypt::None) => {
                    return Err(self.file.corrupt_at(
                        GuestOffset(pos),
                        "a compressed cluster in an encrypted image (qemu writes none)",
                    ));
                }
                Seg::Compressed(e) => {
                    cluster.resize(cs as usize, 0);
                    let cstart = pos & !(cs - 1);
                    decompress::decompress(
                        &self.file,
                        self.compression,
                        self.map.geo.cluster_bits,
                        e,
                        GuestOffset(cstart),
                        &mut cluster,
                    )?;
                    let at = (pos - cstart) as usize;
                    out.copy_from_slice(&cluster[at..at + out.len()]);
                }
                Seg::Zero => out.fill(0),
                Seg::Unalloc => crate::format::read_below(self.backing.as_deref(), pos, out)?,
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

    use super::super::header::{
        EXT_DATA_FILE, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT,
        INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
    };
    use super::super::snapshot::MAX_SNAPSHOTS;
    use super::super::{OFLAG_COMPRESSED, OFLAG_ZERO};

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
        let f = std::sync::Arc::new(std::fs::File::open(&p).unwrap());
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
    fn old_aes_is_refused_and_luks_needs_its_extension() {
        let mut b = base(3);
        put32(&mut b, 32, 1);
        let e = err(&b);
        assert_eq!(e.code(), Code::SnapshotUnsupported);
        assert!(e.message().contains("insecure"), "{e}");
        assert!(e.message().contains("encrypt.format=luks"), "{e}");
        let mut b = base(3);
        put32(&mut b, 32, 2);
        let e = err(&b);
        assert_eq!(e.code(), Code::SnapshotCorrupt);
        assert!(e.message().contains("extension is missing"), "{e}");
        put32(&mut b, 112, super::super::header::EXT_CRYPTO);
        put32(&mut b, 116, 16);
        put64(&mut b, 120, 1 << 40);
        put64(&mut b, 128, 4096);
        assert!(err(&b).message().contains("LUKS header at offset"));
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
