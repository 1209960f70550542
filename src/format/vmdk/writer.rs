//! A writer for fresh VMDK disks: streamOptimized (the default, what ESXi, ovftool and AWS import
//! take) and monolithicSparse (one hosted sparse extent, for labs).
//!
//! streamOptimized, as VMware's spec lays it out and ESXi accepts it: the header (version 3,
//! flags: newline test, compressed grains, markers; gdOffset GD_AT_END) and the embedded
//! descriptor, then every non-zero grain (64 KiB) in guest order as a grain marker (guest sector,
//! compressed size) followed by its zlib stream, padded to a sector; then each non-empty grain
//! table behind a GT marker, the grain directory behind a GD marker, the footer (a footer marker
//! and a copy of the header holding the real gdOffset) and the end-of-stream marker. Grains are
//! compressed in parallel by the engine's prepare step and placed in guest order by
//! `allocate_prepared`; zero grains are never written.
//!
//! monolithicSparse: the header (version 1), the descriptor, the grain directory and every grain
//! table right after it (as qemu and VMware place them), then the grains, stored as they are, in
//! guest order. Empty grain tables stay holes in the file.
//!
//! The CID is a CRC-32 of the disk's size and grain tables, so the same input gives the same bytes
//! whatever `-j`; nothing comes from the clock or a random source.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flate2::{Compress, FlushCompress, Status};

use super::descriptor::{self, Render};
use super::header::*;
use crate::error::{Code, Error, Result};
use crate::format::writer::{DiskWriter, Finished};
use crate::format::OutputSpec;

/// Grain size kiln writes: 128 sectors (64 KiB), as VMware and qemu do.
const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
const GTES: u64 = 512;
/// Sectors of one grain table (512 four-byte entries).
const GT_SECTORS: u64 = GTES * 4 / SECTOR;
/// The embedded descriptor: sectors 1 to 20, as VMware writes it.
const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// Largest disk kiln writes: grain offsets are 32-bit sector numbers, so a sparse extent file
/// cannot pass 2 TiB.
const MAX_VIRTUAL_SIZE: u64 = (1 << 41) - (1 << 30);
/// zlib level for streamOptimized grains: 1 (fastest) keeps compression well ahead of the disk on
/// two cores; ESXi reads any level.
const DEFLATE_LEVEL: u32 = 1;

/// The `-o subformat=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subformat {
    StreamOptimized,
    MonolithicSparse,
}

impl Subformat {
    fn name(self) -> &'static str {
        match self {
            Subformat::StreamOptimized => "streamOptimized",
            Subformat::MonolithicSparse => "monolithicSparse",
        }
    }
}

struct Alloc {
    /// Next free byte of the file (sector aligned).
    next: u64,
    /// Grain tables that received grains, by index.
    gts: BTreeMap<u64, Box<[u32]>>,
    /// streamOptimized: guest sector of each grain allocated but not yet written, by host offset.
    lbas: HashMap<u64, u64>,
}

pub(crate) struct VmdkWriter {
    file: File,
    path: PathBuf,
    sub: Subformat,
    virtual_size: u64,
    gd_entries: u64,
    /// monolithicSparse: the first grain table's sector (the GD precedes it).
    gt_start: u64,
    alloc: Mutex<Alloc>,
    /// Where the VMDK starts in `file`: 0, or its member's data offset inside an OVA.
    base: u64,
    /// The extent's file name in the descriptor.
    extent: String,
}

/// The registry's constructor: `-o subformat=streamOptimized|monolithicSparse`.
pub(crate) fn create(
    file: File,
    path: &Path,
    virtual_size: u64,
    spec: &OutputSpec,
) -> Result<Box<dyn DiskWriter>> {
    let sub = match spec.options.iter().find(|(k, _)| k == "subformat") {
        None => Subformat::StreamOptimized,
        Some((_, v)) if v.eq_ignore_ascii_case("streamOptimized") => Subformat::StreamOptimized,
        Some((_, v)) if v.eq_ignore_ascii_case("monolithicSparse") => Subformat::MonolithicSparse,
        Some((_, v)) => {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("-o subformat={v}: vmdk output is streamOptimized or monolithicSparse"),
            ))
        }
    };
    Ok(Box::new(VmdkWriter::create(
        file,
        path,
        virtual_size,
        sub,
        0,
        extent_name(path),
    )?))
}

/// A streamOptimized VMDK written into `file` from byte `base` on (an OVA member's data, which
/// the OVA writer places; `base` is a multiple of 512) and named `extent` in its descriptor. Its
/// grain offsets count from `base`, so the bytes from `base` on are the VMDK file as it would be
/// on its own.
pub(crate) fn stream_at(
    file: File,
    path: &Path,
    virtual_size: u64,
    base: u64,
    extent: &str,
) -> Result<VmdkWriter> {
    if !base.is_multiple_of(SECTOR) {
        return Err(Error::new(
            Code::Internal,
            format!(
                "{}: a VMDK placed at offset {base}, not a whole sector",
                path.display()
            ),
        ));
    }
    VmdkWriter::create(
        file,
        path,
        virtual_size,
        Subformat::StreamOptimized,
        base,
        extent.to_string(),
    )
}

/// VMDK sizes count 512-byte sectors, so sizes are rounded up to them.
pub(crate) fn disk_size(virtual_size: u64) -> u64 {
    virtual_size.next_multiple_of(SECTOR)
}

impl VmdkWriter {
    pub(crate) fn create(
        file: File,
        path: &Path,
        virtual_size: u64,
        sub: Subformat,
        base: u64,
        extent: String,
    ) -> Result<Self> {
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(SECTOR)
        {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: virtual size {virtual_size} is not a whole number of sectors from 512 bytes to 2 TiB - 1 GiB, what a VMDK sparse extent holds",
                    path.display()
                ),
            ));
        }
        let grains = virtual_size.div_ceil(GRAIN);
        let gd_entries = grains.div_ceil(GTES);
        let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
        let (gt_start, data_start) = match sub {
            // Grains start on a grain boundary after the header and descriptor.
            Subformat::StreamOptimized => (0, GRAIN_SECTORS),
            Subformat::MonolithicSparse => {
                let gd = DESC_OFFSET + DESC_SECTORS;
                let gts = gd + gd_sectors;
                (
                    gts,
                    (gts + gd_entries * GT_SECTORS).next_multiple_of(GRAIN_SECTORS),
                )
            }
        };
        Ok(VmdkWriter {
            file,
            path: path.to_path_buf(),
            sub,
            virtual_size,
            gd_entries,
            gt_start,
            alloc: Mutex::new(Alloc {
                next: data_start * SECTOR,
                gts: BTreeMap::new(),
                lbas: HashMap::new(),
            }),
            base,
            extent,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn internal(&self, what: String) -> Error {
        Error::new(Code::Internal, format!("{}: {what}", self.path.display()))
    }

    /// Points grain `gi` at host byte `host`; each grain is set once.
    fn set_gte(&self, a: &mut Alloc, gi: u64, host: u64) -> Result<()> {
        let sector = u32::try_from(host / SECTOR).map_err(|_| {
            Error::new(
                Code::InvalidSize,
                format!(
                    "{}: the VMDK file would pass 2 TiB at grain {gi}; VMDK grain offsets are 32-bit sector numbers",
                    self.path.display()
                ),
            )
        })?;
        let t = a
            .gts
            .entry(gi / GTES)
            .or_insert_with(|| vec![0u32; GTES as usize].into_boxed_slice());
        let slot = &mut t[(gi % GTES) as usize];
        if *slot != 0 {
            return Err(self.internal(format!("grain {gi} was allocated twice")));
        }
        *slot = sector;
        Ok(())
    }

    fn check_guest(&self, guest: u64, len: u64) -> Result<()> {
        let end = guest.saturating_add(len);
        if !guest.is_multiple_of(GRAIN) || len == 0 || end > self.virtual_size {
            return Err(self.internal(format!(
                "allocation of {len} bytes at guest offset {guest} is not grain aligned or passes the end"
            )));
        }
        Ok(())
    }

    /// Writes at VMDK offset `at` (the file's `base + at`).
    fn write(&self, at: u64, data: &[u8], what: &str) -> Result<()> {
        let at = self.base + at;
        self.file.write_all_at(data, at).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {what} ({} bytes) at offset {at}", data.len()),
                e,
            )
        })
    }

    /// The header, with `gd_offset` (sectors) and the overhead before the first grain.
    fn header(&self, gd_offset: u64) -> SparseHeader {
        let stream = self.sub == Subformat::StreamOptimized;
        SparseHeader {
            version: if stream { 3 } else { 1 },
            flags: FLAG_NL_DETECT
                | if stream {
                    FLAG_COMPRESSED | FLAG_MARKERS
                } else {
                    0
                },
            capacity: self.virtual_size / SECTOR,
            grain_size: GRAIN_SECTORS,
            descriptor_offset: DESC_OFFSET,
            descriptor_size: DESC_SECTORS,
            num_gtes_per_gt: GTES as u32,
            rgd_offset: 0,
            gd_offset,
            overhead: if stream {
                GRAIN_SECTORS
            } else {
                (self.gt_start + self.gd_entries * GT_SECTORS).next_multiple_of(GRAIN_SECTORS)
            },
            unclean_shutdown: 0,
            nl_chars: NL_CHARS,
            compress_algorithm: if stream {
                COMPRESS_DEFLATE
            } else {
                COMPRESS_NONE
            },
        }
    }

    /// The embedded descriptor sectors, with a CID derived from the disk's size and grain tables.
    fn descriptor(&self, a: &Alloc) -> Result<Vec<u8>> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.virtual_size.to_le_bytes());
        for (i, t) in &a.gts {
            crc.update(&i.to_le_bytes());
            for e in t.iter() {
                crc.update(&e.to_le_bytes());
            }
        }
        let mut cid = crc.finalize();
        if cid >= 0xffff_fffe {
            cid ^= 0x8000_0000;
        }
        let text = descriptor::render(&Render {
            cid,
            create_type: self.sub.name(),
            sectors: self.virtual_size / SECTOR,
            file_name: &self.extent,
        });
        let mut b = text.into_bytes();
        if b.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(self.internal("the descriptor does not fit its 20 sectors".into()));
        }
        b.resize((DESC_SECTORS * SECTOR) as usize, 0);
        Ok(b)
    }

    fn table_bytes(t: &[u32]) -> Vec<u8> {
        t.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    /// streamOptimized's tail: grain tables, the grain directory, footer and end-of-stream marker.
    fn finish_stream(&self, a: &Alloc) -> Result<u64> {
        let mut at = a.next;
        let mut gd = vec![0u32; self.gd_entries as usize];
        for (&i, t) in &a.gts {
            self.write(
                at,
                &encode_metadata_marker(GT_SECTORS, MARKER_GT),
                "a GT marker",
            )?;
            at += SECTOR;
            gd[i as usize] = self.sector32(at)?;
            self.write(at, &Self::table_bytes(t), "a grain table")?;
            at += GT_SECTORS * SECTOR;
        }
        let gd_sectors = (self.gd_entries * 4).div_ceil(SECTOR);
        self.write(
            at,
            &encode_metadata_marker(gd_sectors, MARKER_GD),
            "the GD marker",
        )?;
        at += SECTOR;
        let gd_offset = at / SECTOR;
        let mut gd_bytes = Self::table_bytes(&gd);
        gd_bytes.resize((gd_sectors * SECTOR) as usize, 0);
        self.write(at, &gd_bytes, "the grain directory")?;
        at += gd_sectors * SECTOR;
        self.write(
            at,
            &encode_metadata_marker(1, MARKER_FOOTER),
            "the footer marker",
        )?;
        at += SECTOR;
        self.write(at, &self.header(gd_offset).encode(), "the footer")?;
        at += SECTOR;
        self.write(at, &[0u8; 512], "the end-of-stream marker")?;
        at += SECTOR;
        self.write(0, &self.header(GD_AT_END).encode(), "the header")?;
        Ok(at)
    }

    /// monolithicSparse's metadata: the grain directory (every table placed) and the tables used.
    fn finish_sparse(&self, a: &Alloc) -> Result<u64> {
        let gd_offset = DESC_OFFSET + DESC_SECTORS;
        let gd: Vec<u32> = (0..self.gd_entries)
            .map(|i| self.sector32((self.gt_start + i * GT_SECTORS) * SECTOR))
            .collect::<Result<_>>()?;
        self.write(
            gd_offset * SECTOR,
            &Self::table_bytes(&gd),
            "the grain directory",
        )?;
        for (&i, t) in &a.gts {
            let at = (self.gt_start + i * GT_SECTORS) * SECTOR;
            self.write(at, &Self::table_bytes(t), "a grain table")?;
        }
        self.write(0, &self.header(gd_offset).encode(), "the header")?;
        Ok(a.next)
    }

    fn sector32(&self, at: u64) -> Result<u32> {
        u32::try_from(at / SECTOR).map_err(|_| {
            Error::new(
                Code::InvalidSize,
                format!("{}: the VMDK file would pass 2 TiB", self.path.display()),
            )
        })
    }
}

/// The name the descriptor gives the extent: the output file's name, without `convert`'s
/// temporary wrapping (`.NAME.kiln-PID.tmp`), so that it does not depend on the process; quotes and
/// control characters become `_`.
fn extent_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk.vmdk".into());
    let inner = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.rsplit_once(".kiln-"))
        .map_or(name.as_str(), |(n, _)| n);
    inner
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect()
}

thread_local! {
    static PADDED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
}

/// One grain's stored form: a grain marker (guest sector filled in at write time) and its zlib
/// stream, padded to whole sectors.
fn compress_grain(data: &[u8], out: &mut Vec<u8>) -> std::result::Result<(), String> {
    PADDED.with(|p| {
        let mut p = p.borrow_mut();
        let input: &[u8] = if data.len() as u64 == GRAIN {
            data
        } else {
            p.clear();
            p.extend_from_slice(data);
            p.resize(GRAIN as usize, 0);
            &p
        };
        DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            let z = c.get_or_insert_with(|| {
                Compress::new(flate2::Compression::new(DEFLATE_LEVEL), true)
            });
            z.reset();
            out.clear();
            out.resize(GRAIN_MARKER_BYTES, 0);
            out.reserve((GRAIN + GRAIN / 64 + 1024) as usize);
            match z.compress_vec(input, out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {}
                Ok(s) => return Err(format!("deflate stopped early ({s:?})")),
                Err(e) => return Err(e.to_string()),
            }
            let size = (out.len() - GRAIN_MARKER_BYTES) as u32;
            out[8..12].copy_from_slice(&size.to_le_bytes());
            out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
            Ok(())
        })
    })
}

impl DiskWriter for VmdkWriter {
    fn block_size(&self) -> u64 {
        GRAIN
    }

    fn prepare_unit(&self) -> Option<u64> {
        (self.sub == Subformat::StreamOptimized).then_some(GRAIN)
    }

    /// Every streamOptimized grain is stored compressed, even one that does not shrink.
    fn prepare(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        if data.len() as u64 > GRAIN {
            return Err(self.internal("a prepared piece larger than a grain".into()));
        }
        compress_grain(data, out)
            .map_err(|e| self.internal(format!("compressing a grain: {e}")))?;
        Ok(true)
    }

    fn in_guest_order(&self) -> bool {
        true
    }

    fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64> {
        if self.sub == Subformat::StreamOptimized {
            return Err(self.internal("a streamOptimized grain stored uncompressed".into()));
        }
        self.check_guest(guest_offset, len)?;
        let n = len.div_ceil(GRAIN);
        let mut a = self.lock();
        let host = a.next;
        for k in 0..n {
            self.set_gte(&mut a, guest_offset / GRAIN + k, host + k * GRAIN)?;
        }
        a.next = host + n * GRAIN;
        Ok(host)
    }

    fn allocate_prepared(&self, guest_offset: u64, stored_len: usize) -> Result<u64> {
        self.check_guest(
            guest_offset,
            (self.virtual_size - guest_offset.min(self.virtual_size)).min(GRAIN),
        )?;
        let mut a = self.lock();
        let host = a.next;
        self.set_gte(&mut a, guest_offset / GRAIN, host)?;
        a.next = host + stored_len as u64;
        a.lbas.insert(host, guest_offset / SECTOR);
        Ok(host)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        if self.sub == Subformat::StreamOptimized {
            let lba = self.lock().lbas.remove(&host_offset);
            let Some(lba) = lba.filter(|_| data.len() >= GRAIN_MARKER_BYTES) else {
                return Err(self.internal(format!(
                    "a grain written at {host_offset} was not allocated"
                )));
            };
            self.write(host_offset, &lba.to_le_bytes(), "a grain marker")?;
            return self.write(host_offset + 8, &data[8..], "a grain");
        }
        self.write(host_offset, data, "grains")
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn writeback_hints(&self) -> bool {
        self.sub == Subformat::MonolithicSparse
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        let a = std::mem::replace(
            &mut *self.lock(),
            Alloc {
                next: 0,
                gts: BTreeMap::new(),
                lbas: HashMap::new(),
            },
        );
        let end = match self.sub {
            Subformat::StreamOptimized => self.finish_stream(&a)?,
            Subformat::MonolithicSparse => self.finish_sparse(&a)?,
        };
        self.write(
            DESC_OFFSET * SECTOR,
            &self.descriptor(&a)?,
            "the descriptor",
        )?;
        self.file
            .set_len(self.base + end)
            .map_err(|e| Error::io(&self.path, "setting the final length", e))?;
        Ok(Finished { file: self.file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_names_drop_converts_temporary_wrapping() {
        assert_eq!(
            extent_name(Path::new("/x/.out.vmdk.kiln-123.tmp")),
            "out.vmdk"
        );
        assert_eq!(extent_name(Path::new("/x/xvda.vmdk")), "xvda.vmdk");
        assert_eq!(extent_name(Path::new("a\"b.vmdk")), "a_b.vmdk");
    }

    #[test]
    fn a_compressed_grain_has_its_size_in_the_marker() {
        let mut out = Vec::new();
        compress_grain(&[7u8; 1000], &mut out).unwrap();
        assert!(out.len().is_multiple_of(512));
        let (_, size) = grain_marker(&out);
        let mut z = flate2::Decompress::new(true);
        let mut g = vec![0u8; GRAIN as usize];
        z.decompress(
            &out[12..12 + size as usize],
            &mut g,
            flate2::FlushDecompress::Finish,
        )
        .unwrap();
        assert_eq!(z.total_out(), GRAIN);
        assert!(g[..1000].iter().all(|&b| b == 7) && g[1000..].iter().all(|&b| b == 0));
    }
}
