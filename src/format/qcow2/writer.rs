//! A writer for fresh qcow2 images (version 3, 16-bit refcounts, no backing file, no snapshots).
//!
//! Layout: the header in cluster 0, the L1 table right after it, then data clusters in the order
//! they are allocated (callers allocate in guest order, so the layout, and the file's hash, depend
//! on the input alone), then, written by [`Qcow2Writer::finish`], the L2 tables, the refcount blocks
//! and the refcount table. Allocation takes a short lock; the data itself is written with `pwrite`
//! outside it, so many threads can fill one image at once. Compressed clusters are packed byte by
//! byte into host clusters as qemu's `qcow2_alloc_bytes` does, and may run into the next host
//! cluster when it is contiguous.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flate2::{Compress, FlushCompress, Status};

use super::{MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::{Code, Error, Result};
use crate::format::luks::crypto::SectorCipher;
use crate::format::luks::{luks1, Secret};
use crate::format::writer::{DiskWriter, Finished};
use crate::format::OutputSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// log2 of the cluster size, 9 (512 B) to 21 (2 MiB).
    pub cluster_bits: u32,
    pub compression: Option<Compression>,
}

/// Largest L1 table kiln writes, as qemu's QCOW_MAX_L1_SIZE (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest virtual size kiln writes (2^56 bytes: the host-offset field's reach).
const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// refcount_order 4: 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// Header bytes qemu writes for version 3 (up to and including the compression type, padded to 8).
const HEADER_LENGTH: u32 = 112;
/// Largest refcount table qemu opens (QCOW_MAX_REFTABLE_SIZE, 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must fit the 56-bit offset field of L1/L2 entries.
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Compressed-cluster descriptors count 512-byte sectors.
const SECTOR: u64 = 512;
/// qemu compresses with zlib level Z_DEFAULT_COMPRESSION and a 4 KiB window (-12): a larger
/// window would produce streams qemu's 4 KiB-window inflate cannot read.
const ZLIB_WINDOW_BITS: u8 = 12;
const ZLIB_LEVEL: u32 = 6;
/// zstd's default level, as qemu uses.
const ZSTD_LEVEL: i32 = 3;

struct Alloc {
    /// Next free host offset (cluster aligned).
    next: u64,
    /// Where the next compressed cluster may start inside a partly used host cluster.
    compressed_at: Option<u64>,
    /// L2 tables by L1 index; only slots that received data exist.
    l2: HashMap<u64, Box<[u64]>>,
    /// Refcounts of the data area, by host cluster index minus `data_start`.
    refs: Vec<u16>,
}

pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    cluster_bits: u32,
    compression: Option<Compression>,
    l1_size: u64,
    l1_clusters: u64,
    /// First data cluster index.
    data_start: u64,
    alloc: Mutex<Alloc>,
    /// LUKS encryption (`crypt_method` 2): the master key's cipher and where the LUKS header lies
    /// (offset, length), right after the L1 table.
    crypt: Option<(SectorCipher, u64, u64)>,
}

impl Qcow2Writer {
    /// Starts a fresh image in `file` (new, empty, open for reading and writing).
    pub fn create(
        file: File,
        path: &Path,
        virtual_size: u64,
        opts: &WriterOptions,
    ) -> Result<Self> {
        let cb = opts.cluster_bits;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("cluster size 2^{cb} is outside 512 B..2 MiB"),
            ));
        }
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: virtual size {virtual_size} is not between 1 byte and 2^56 bytes",
                    path.display()
                ),
            ));
        }
        // qemu reads a qcow2 disk's size in whole 512-byte sectors and would drop a partial one.
        if !virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: virtual size {virtual_size} is not a multiple of 512 bytes; round it up",
                    path.display()
                ),
            ));
        }
        let cs = 1u64 << cb;
        let per_l2 = cs / 8;
        let l1_size = virtual_size.div_ceil(cs * per_l2);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "{}: a {virtual_size}-byte disk needs an L1 table over 32 MiB with {cs}-byte clusters; use a larger --cluster-size",
                    path.display()
                ),
            ));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let data_start = 1 + l1_clusters;
        Ok(Qcow2Writer {
            file,
            path: path.to_path_buf(),
            virtual_size,
            cluster_bits: cb,
            compression: opts.compression,
            l1_size,
            l1_clusters,
            data_start,
            alloc: Mutex::new(Alloc {
                next: data_start * cs,
                compressed_at: None,
                l2: HashMap::new(),
                refs: Vec::new(),
            }),
            crypt: None,
        })
    }

    /// Makes the image encrypted as qemu's `encrypt.format=luks` does: a LUKS1 header
    /// (`aes-xts-plain64`, 512-bit key, key slot 0 opened by `key`) in its own clusters after the
    /// L1 table. Call before any allocation.
    pub(crate) fn encrypt(&mut self, key: &Secret) -> Result<()> {
        let c = luks1::create(key.bytes(), None)?;
        let cs = self.cluster_size();
        let at = self.data_start * cs;
        let len = c.header.len() as u64;
        self.write_at(at, &c.header)?;
        self.data_start += len.div_ceil(cs);
        self.lock().next = self.data_start * cs;
        self.crypt = Some((c.unlocked.cipher, at, len));
        Ok(())
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_guest(&self, guest_offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let end = guest_offset.checked_add(len);
        let ok = guest_offset.is_multiple_of(cs)
            && len > 0
            && end.is_some_and(|e| {
                e <= self.virtual_size && (e.is_multiple_of(cs) || e == self.virtual_size)
            });
        if ok {
            Ok(())
        } else {
            Err(Error::new(
                Code::Internal,
                format!(
                    "{}: allocation of {len} bytes at guest offset {guest_offset} is not cluster aligned or passes the end",
                    self.path.display()
                ),
            ))
        }
    }

    /// `host + len`, refused when it passes what an L2 entry can address.
    fn host_end(&self, host: u64, len: u64) -> Result<u64> {
        host.checked_add(len)
            .filter(|&e| e <= MAX_HOST_OFFSET)
            .ok_or_else(|| {
                Error::new(
                    Code::Internal,
                    format!(
                        "{}: the image would grow past 2^56 bytes at offset {host}",
                        self.path.display()
                    ),
                )
            })
    }

    /// Fails when guest cluster `guest_cluster` already has data.
    fn check_free(&self, a: &Alloc, guest_cluster: u64) -> Result<()> {
        let per_l2 = self.cluster_size() / 8;
        let taken =
            a.l2.get(&(guest_cluster / per_l2))
                .is_some_and(|t| t[(guest_cluster % per_l2) as usize] != 0);
        if taken {
            return Err(self.twice(guest_cluster));
        }
        Ok(())
    }

    fn twice(&self, guest_cluster: u64) -> Error {
        Error::new(
            Code::Internal,
            format!(
                "{}: guest offset {} was allocated twice",
                self.path.display(),
                guest_cluster << self.cluster_bits
            ),
        )
    }

    /// Points guest cluster `guest_cluster` at `entry`; each guest cluster is set once.
    fn set_l2(&self, a: &mut Alloc, guest_cluster: u64, entry: u64) -> Result<()> {
        let per_l2 = self.cluster_size() / 8;
        let table =
            a.l2.entry(guest_cluster / per_l2)
                .or_insert_with(|| vec![0u64; per_l2 as usize].into_boxed_slice());
        let slot = &mut table[(guest_cluster % per_l2) as usize];
        if *slot != 0 {
            return Err(self.twice(guest_cluster));
        }
        *slot = entry;
        Ok(())
    }

    /// Adds one reference to each host cluster in `[first, first + count)`.
    fn add_refs(&self, a: &mut Alloc, first: u64, count: u64) -> Result<()> {
        let lo = (first - self.data_start) as usize;
        let hi = lo + count as usize;
        if a.refs.len() < hi {
            a.refs.resize(hi, 0);
        }
        for r in &mut a.refs[lo..hi] {
            *r = r.checked_add(1).ok_or_else(|| {
                Error::new(
                    Code::Internal,
                    format!("{}: refcount overflow", self.path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// Reserves contiguous host clusters for guest bytes `[guest_offset, guest_offset + len)` and
    /// returns the host offset where they go. Host space is handed out in call order.
    pub fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64> {
        self.check_guest(guest_offset, len)?;
        let cs = self.cluster_size();
        let n = len.div_ceil(cs);
        let first = guest_offset >> self.cluster_bits;
        let mut a = self.lock();
        let host = a.next;
        let end = self.host_end(host, n * cs)?;
        // Check every slot before changing any, so a refused call leaves the tables as they were.
        for i in 0..n {
            self.check_free(&a, first + i)?;
        }
        for i in 0..n {
            self.set_l2(&mut a, first + i, (host + i * cs) | OFLAG_COPIED)?;
        }
        a.next = end;
        self.add_refs(&mut a, host / cs, n)?;
        Ok(host)
    }

    /// Writes bytes at a host offset returned by an allocation.
    pub fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, host_offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {} bytes at offset {host_offset}", data.len()),
                e,
            )
        })
    }

    /// Compresses one cluster of guest data (a short last cluster counts as zero-padded) into `out`.
    /// Returns false when that would not save space: the caller then writes the cluster as it is.
    pub fn compress_cluster(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let cs = self.cluster_size() as usize;
        if data.len() > cs {
            return Err(Error::new(
                Code::Internal,
                "compress_cluster given more than a cluster",
            ));
        }
        let Some(kind) = self.compression else {
            return Ok(false);
        };
        PADDED
            .with(|p| {
                let mut p = p.borrow_mut();
                let input: &[u8] = if data.len() == cs {
                    data
                } else {
                    p.clear();
                    p.extend_from_slice(data);
                    p.resize(cs, 0);
                    &p
                };
                out.clear();
                match kind {
                    Compression::Zlib => deflate_raw(input, out),
                    Compression::Zstd => zstd_frame(input, out),
                }
            })
            .map_err(|e| {
                Error::new(
                    Code::Internal,
                    format!("{}: compressing a cluster: {e}", self.path.display()),
                )
            })
            .map(|fits| fits && out.len() < cs)
    }

    /// Reserves `len` bytes (at most a cluster) for a compressed cluster of guest data and records
    /// its descriptor; returns the host byte offset.
    pub fn allocate_compressed(&self, guest_offset: u64, len: usize) -> Result<u64> {
        let cs = self.cluster_size();
        let last = guest_offset
            .checked_add(cs)
            .map_or(self.virtual_size, |e| e.min(self.virtual_size));
        // Past the end: a zero length, which check_guest refuses.
        self.check_guest(guest_offset, last.saturating_sub(guest_offset))?;
        let len = len as u64;
        if len == 0 || len > cs {
            return Err(Error::new(
                Code::Internal,
                format!("compressed cluster of {len} bytes"),
            ));
        }
        let guest_cluster = guest_offset >> self.cluster_bits;
        let mut a = self.lock();
        self.check_free(&a, guest_cluster)?;
        let start = match a.compressed_at {
            Some(at)
                if at + len <= at.next_multiple_of(cs) || at.next_multiple_of(cs) == a.next =>
            {
                at
            }
            _ => a.next,
        };
        let x = 62 - (self.cluster_bits - 8);
        let end = start + len;
        let first = start / cs;
        let last_cluster = (end - 1) / cs;
        // New clusters this range takes from the free area.
        let new_end = self.host_end(last_cluster * cs, cs)?;
        if new_end > 1 << x {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: compressed data at offset {start} is past what a descriptor can address",
                    self.path.display()
                ),
            ));
        }
        if new_end > a.next {
            a.next = new_end;
        }
        a.compressed_at = if end.is_multiple_of(cs) {
            None
        } else {
            Some(end)
        };
        self.add_refs(&mut a, first, last_cluster - first + 1)?;
        self.set_l2(
            &mut a,
            guest_cluster,
            compressed_entry(self.cluster_bits, start, len),
        )?;
        Ok(start)
    }

    /// Writes the L2 tables, refcount blocks and table, the L1 table and the header, and sets the
    /// file's length. Does not fsync.
    pub fn finish(self) -> Result<File> {
        let cs = self.cluster_size();
        let a = std::mem::replace(
            &mut *self.lock(),
            Alloc {
                next: 0,
                compressed_at: None,
                l2: HashMap::new(),
                refs: Vec::new(),
            },
        );
        let data_end = a.next / cs;
        let mut l1_indexes: Vec<u64> = a.l2.keys().copied().collect();
        l1_indexes.sort_unstable();
        let l2_start = data_end;
        let n_l2 = l1_indexes.len() as u64;
        let (refblock_start, n_refblocks, reftable_start, n_reftable) =
            refcount_layout(cs, l2_start + n_l2);
        let total = reftable_start + n_reftable;
        if n_reftable * cs > MAX_REFTABLE_BYTES {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "{}: {} bytes of image need a refcount table over 8 MiB, which qemu does not open; use a larger --cluster-size",
                    self.path.display(),
                    total * cs
                ),
            ));
        }
        let io = |what: &str, at: u64, e| {
            Error::io(&self.path, &format!("writing {what} at offset {at}"), e)
        };

        // L2 tables.
        let mut l1 = vec![0u64; self.l1_size as usize];
        let mut buf = vec![0u8; cs as usize];
        for (k, idx) in l1_indexes.iter().enumerate() {
            let host = (l2_start + k as u64) * cs;
            for (i, e) in a.l2[idx].iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.file
                .write_all_at(&buf, host)
                .map_err(|e| io("an L2 table", host, e))?;
            l1[*idx as usize] = host | OFLAG_COPIED;
        }

        // Refcount blocks: one reference for every used cluster; data clusters as counted.
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let refcount = |c: u64| -> u16 {
            if c < self.data_start || (c >= l2_start && c < total) {
                1
            } else {
                a.refs
                    .get((c - self.data_start) as usize)
                    .copied()
                    .unwrap_or(0)
            }
        };
        for b in 0..n_refblocks {
            buf.fill(0);
            for i in 0..per_block {
                let c = b * per_block + i;
                if c >= total {
                    break;
                }
                buf[(i * 2) as usize..(i * 2 + 2) as usize]
                    .copy_from_slice(&refcount(c).to_be_bytes());
            }
            let host = (refblock_start + b) * cs;
            self.file
                .write_all_at(&buf, host)
                .map_err(|e| io("a refcount block", host, e))?;
        }
        let mut table = vec![0u8; (n_reftable * cs) as usize];
        for b in 0..n_refblocks {
            let off = (refblock_start + b) * cs;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        let host = reftable_start * cs;
        self.file
            .write_all_at(&table, host)
            .map_err(|e| io("the refcount table", host, e))?;

        // L1 table, then the header last.
        let mut l1_bytes = vec![0u8; (self.l1_clusters * cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            l1_bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file
            .write_all_at(&l1_bytes, cs)
            .map_err(|e| io("the L1 table", cs, e))?;
        let header = self.header(reftable_start * cs, n_reftable);
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| io("the header", 0, e))?;
        self.file
            .set_len(total * cs)
            .map_err(|e| Error::io(&self.path, "setting the final length", e))?;
        Ok(self.file)
    }

    /// Header cluster 0 (only the used bytes; the rest of the cluster stays zero).
    fn header(&self, reftable_offset: u64, reftable_clusters: u64) -> Vec<u8> {
        let ext = if self.crypt.is_some() { 24 } else { 0 };
        let mut h = vec![0u8; HEADER_LENGTH as usize + ext + 8];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &MAGIC.to_be_bytes());
        put(4, &3u32.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(self.l1_size as u32).to_be_bytes());
        put(40, &self.cluster_size().to_be_bytes());
        put(48, &reftable_offset.to_be_bytes());
        put(56, &(reftable_clusters as u32).to_be_bytes());
        let zstd = self.compression == Some(Compression::Zstd);
        // Incompatible feature bit 3: the compression type field is not zlib.
        put(72, &(if zstd { 1u64 << 3 } else { 0 }).to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        put(104, &[u8::from(zstd)]);
        if let Some((_, at, len)) = &self.crypt {
            // crypt_method 2 (LUKS) and the full-disk-encryption header extension.
            put(32, &2u32.to_be_bytes());
            put(112, &0x0537_be77u32.to_be_bytes());
            put(116, &16u32.to_be_bytes());
            put(120, &at.to_be_bytes());
            put(128, &len.to_be_bytes());
        }
        // Then the end-of-extensions marker (type 0, length 0).
        h
    }
}

/// The L2 descriptor of `len` compressed bytes at host byte `start`: the offset in bits 0..x-1 and,
/// from bit x = 62 - (cluster_bits - 8), the number of 512-byte sectors the data reaches into past
/// the one holding `start`.
fn compressed_entry(cluster_bits: u32, start: u64, len: u64) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let extra_sectors = (start + len - 1) / SECTOR - start / SECTOR;
    OFLAG_COMPRESSED | (extra_sectors << x) | start
}

/// Places refcount blocks and the refcount table after `used` clusters so that they also count
/// themselves: returns (first block, blocks, first table cluster, table clusters).
fn refcount_layout(cs: u64, used: u64) -> (u64, u64, u64, u64) {
    let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    let mut blocks = 1;
    let mut table = 1;
    loop {
        let total = used + blocks + table;
        let nb = total.div_ceil(per_block);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            return (used, blocks, used + blocks, table);
        }
        blocks = nb;
        table = nt;
    }
}

/// The registry's constructor.
pub(crate) fn create(
    file: File,
    path: &Path,
    virtual_size: u64,
    spec: &OutputSpec,
) -> Result<Box<dyn DiskWriter>> {
    let opts = WriterOptions {
        cluster_bits: spec.cluster_bits,
        compression: spec.compression,
    };
    let mut w = Qcow2Writer::create(file, path, virtual_size, &opts)?;
    if let Some(enc) = &spec.encryption {
        if spec.compression.is_some() {
            return Err(Error::new(
                Code::InvalidParameter,
                "--compress and --encrypt do not go together (qemu writes no compressed clusters in an encrypted qcow2)",
            ));
        }
        w.encrypt(&enc.key)?;
    }
    Ok(Box::new(w))
}

/// qemu reads a qcow2 disk's size in whole 512-byte sectors, so sizes are rounded up to them.
pub(crate) fn disk_size(virtual_size: u64) -> u64 {
    virtual_size.next_multiple_of(SECTOR)
}

/// Zero detection works on whole clusters; host clusters are handed out in guest order (so the
/// same input gives the same bytes); with compression, each cluster is compressed in the prepare
/// step and packed at allocation.
impl DiskWriter for Qcow2Writer {
    fn block_size(&self) -> u64 {
        self.cluster_size()
    }

    fn prepare_unit(&self) -> Option<u64> {
        self.compression.is_some().then(|| self.cluster_size())
    }

    fn prepare(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.compress_cluster(data, out)
    }

    /// Encrypts a run of clusters in place once placed, in parallel on the copy threads: qemu's
    /// LUKS IV in a qcow2 is the host sector, and a run's clusters are placed one after another.
    fn seal(&self, host_offset: u64, data: &mut [u8]) -> Result<()> {
        if let Some((c, _, _)) = &self.crypt {
            c.encrypt(data, host_offset / SECTOR);
        }
        Ok(())
    }

    fn in_guest_order(&self) -> bool {
        true
    }

    fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64> {
        Qcow2Writer::allocate(self, guest_offset, len)
    }

    fn allocate_prepared(&self, guest_offset: u64, stored_len: usize) -> Result<u64> {
        self.allocate_compressed(guest_offset, stored_len)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        Qcow2Writer::write_at(self, host_offset, data)
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// Compressed clusters are packed byte by byte; kiln has not given them writeback hints.
    fn writeback_hints(&self) -> bool {
        self.compression.is_none()
    }

    /// Uncompressed clusters are written whole with a plain `pwrite` (the tables are written, buffered,
    /// by `finish`); compressed ones are packed byte by byte, never in aligned blocks.
    fn direct_writes(&self) -> bool {
        self.compression.is_none()
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        Ok(Finished {
            file: Qcow2Writer::finish(*self)?,
        })
    }
}

thread_local! {
    static PADDED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Raw deflate with a 4 KiB window into `out`; false when the result is not smaller than the input.
fn deflate_raw(input: &[u8], out: &mut Vec<u8>) -> std::result::Result<bool, String> {
    DEFLATE.with(|c| {
        let mut c = c.borrow_mut();
        let z = c.get_or_insert_with(|| {
            Compress::new_with_window_bits(
                flate2::Compression::new(ZLIB_LEVEL),
                false,
                ZLIB_WINDOW_BITS,
            )
        });
        z.reset();
        out.reserve(input.len());
        match z.compress_vec(input, out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => Ok(true),
            // Output space ran out: the data does not compress.
            Ok(_) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// One zstd frame into `out`; false when it would not fit in the input's size.
fn zstd_frame(input: &[u8], out: &mut Vec<u8>) -> std::result::Result<bool, String> {
    ZSTD.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| e.to_string())?);
        }
        let Some(z) = c.as_mut() else {
            return Err("zstd compressor unavailable".into());
        };
        out.resize(input.len(), 0);
        match z.compress_to_buffer(input, &mut out[..]) {
            Ok(n) => {
                out.truncate(n);
                Ok(true)
            }
            // "Destination buffer is too small": incompressible.
            Err(_) => {
                out.clear();
                Ok(false)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &Path, size: u64, cb: u32, c: Option<Compression>) -> Qcow2Writer {
        let p = dir.join("w.qcow2");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        Qcow2Writer::create(
            f,
            &p,
            size,
            &WriterOptions {
                cluster_bits: cb,
                compression: c,
            },
        )
        .unwrap()
    }

    #[test]
    fn refcount_layout_counts_itself() {
        // 64 KiB clusters: a block covers 32768 clusters.
        assert_eq!(refcount_layout(65536, 10), (10, 1, 11, 1));
        assert_eq!(refcount_layout(65536, 32766), (32766, 1, 32767, 1));
        // 32766 + 1 + 1 = 32768 fits one block exactly; one more needs a second block.
        assert_eq!(refcount_layout(65536, 32767), (32767, 2, 32769, 1));
        // 512-byte clusters: 256 per block, 64 block pointers per table cluster.
        let (_, nb, _, nt) = refcount_layout(512, 100_000);
        assert!(nb * 256 >= 100_000 + nb + nt && nt * 64 >= nb);
    }

    #[test]
    fn refcount_layout_is_the_smallest_fixpoint() {
        for cb in [9u32, 12, 16, 21] {
            let cs = 1u64 << cb;
            let per_block = cs / 2;
            for used in (1..3 * per_block + 5).step_by((per_block / 7).max(1) as usize) {
                let (rb, nb, rt, nt) = refcount_layout(cs, used);
                assert_eq!((rb, rt), (used, used + nb), "cb {cb} used {used}");
                // The blocks cover everything, themselves and the table included...
                assert!(nb * per_block >= used + nb + nt, "cb {cb} used {used}");
                // ...the table points at every block...
                assert!(nt * cs / 8 >= nb, "cb {cb} used {used}");
                // ...and neither is larger than needed.
                assert!((nb - 1) * per_block < used + nb + nt, "cb {cb} used {used}");
                assert!((nt - 1) * cs / 8 < nb, "cb {cb} used {used}");
            }
        }
    }

    #[test]
    fn l1_size_covers_the_disk_with_one_entry_per_l2_table() {
        let d = tempfile::tempdir().unwrap();
        // (virtual size, cluster bits, L1 entries, L1 clusters)
        let cases = [
            (512, 16, 1, 1),
            (512 << 20, 16, 1, 1),
            ((512 << 20) + 512, 16, 2, 1),
            (1 << 40, 16, 2048, 1),
            (1 << 50, 16, 2 << 20, 256),
            // 512-byte clusters: an L2 table maps 32 KiB, an L1 cluster 64 entries.
            (32 << 10, 9, 1, 1),
            ((32 << 10) * 64 + 512, 9, 65, 2),
            // 2 MiB clusters: an L2 table maps 512 GiB.
            (1 << 56, 21, 1 << 17, 1),
        ];
        for (i, (size, cb, l1, l1c)) in cases.into_iter().enumerate() {
            let w = writer(&d.path().join(i.to_string()).tap_mkdir(), size, cb, None);
            assert_eq!(
                (w.l1_size, w.l1_clusters),
                (l1, l1c),
                "{size} bytes, cb {cb}"
            );
            assert_eq!(w.data_start, 1 + l1c);
        }
    }

    #[test]
    fn bad_arguments_are_refused_with_clear_codes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        let try_create = |size: u64, cb: u32| {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            let opts = WriterOptions {
                cluster_bits: cb,
                compression: None,
            };
            Qcow2Writer::create(f, &p, size, &opts).map(|_| ())
        };
        assert_eq!(
            try_create(1 << 20, 8).unwrap_err().code(),
            Code::InvalidParameter
        );
        assert_eq!(
            try_create(1 << 20, 22).unwrap_err().code(),
            Code::InvalidParameter
        );
        assert_eq!(try_create(0, 16).unwrap_err().code(), Code::InvalidSize);
        assert_eq!(
            try_create((1 << 56) + 512, 21).unwrap_err().code(),
            Code::InvalidSize
        );
        let odd = try_create(1000, 16).unwrap_err();
        assert_eq!(odd.code(), Code::InvalidSize);
        assert!(odd.message().contains("512"), "{}", odd.message());
        // 2^56 bytes in 64 KiB clusters needs a 64 MiB L1 table.
        let big = try_create(1 << 56, 16).unwrap_err();
        assert_eq!(big.code(), Code::InvalidParameter);
        assert!(big.message().contains("cluster-size"), "{}", big.message());
        try_create(1 << 56, 21).unwrap();
        try_create(512, 9).unwrap();
    }

    #[test]
    fn compressed_entry_encodes_offset_and_extra_sectors() {
        // 64 KiB clusters: x = 54, 8 bits of sector count.
        assert_eq!(
            compressed_entry(16, 0x30000, 100),
            OFLAG_COMPRESSED | 0x30000
        );
        assert_eq!(
            compressed_entry(16, 0x30000, 512),
            OFLAG_COMPRESSED | 0x30000
        );
        assert_eq!(
            compressed_entry(16, 0x30000, 513),
            OFLAG_COMPRESSED | (1 << 54) | 0x30000
        );
        // Starting at byte 500 of a sector, 13 bytes reach into the next one.
        assert_eq!(
            compressed_entry(16, 0x301f4, 13),
            OFLAG_COMPRESSED | (1 << 54) | 0x301f4
        );
        // The largest case: a whole cluster less one byte starting one byte before a sector end
        // spans cs/512 extra sectors, which must still fit the field (cluster_bits - 8 bits).
        for cb in 9..=21u32 {
            let cs = 1u64 << cb;
            let x = 62 - (cb - 8);
            let start = 5 * cs + 511;
            let e = compressed_entry(cb, start, cs - 1);
            assert_eq!(e & ((1 << x) - 1), start, "cb {cb}");
            let sectors = (e & !OFLAG_COMPRESSED) >> x;
            assert_eq!(sectors, cs / 512, "cb {cb}");
            assert!(sectors < 1 << (cb - 8), "cb {cb}");
        }
        // 512-byte clusters: x = 61, one bit of count.
        assert_eq!(
            compressed_entry(9, 1024 + 10, 510),
            OFLAG_COMPRESSED | (1 << 61) | 1034
        );
    }

    #[test]
    fn zlib_header_has_no_compression_feature_and_ends_with_the_marker() {
        let d = tempfile::tempdir().unwrap();
        let w = writer(d.path(), 1 << 30, 12, Some(Compression::Zlib));
        let h = w.header(7 * 4096, 2);
        assert_eq!(h.len(), 120);
        // No backing file, no snapshots, no encryption.
        assert!(h[8..20].iter().all(|&b| b == 0));
        assert_eq!(u64::from_be_bytes(h[48..56].try_into().unwrap()), 7 * 4096);
        assert_eq!(u32::from_be_bytes(h[56..60].try_into().unwrap()), 2);
        assert!(h[60..72].iter().all(|&b| b == 0));
        // Incompatible, compatible and autoclear features all clear.
        assert!(h[72..96].iter().all(|&b| b == 0));
        assert_eq!(u32::from_be_bytes(h[100..104].try_into().unwrap()), 112);
        // Compression type zlib, padding, then the end-of-extensions marker.
        assert!(h[104..120].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_refused_allocation_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let w = writer(d.path(), (1 << 20) + 512, 16, Some(Compression::Zstd));
        let base = w.data_start * 65536;
        assert_eq!(w.allocate(65536, 65536).unwrap(), base);
        // Overlapping an allocated cluster: nothing is reserved, not even the free first cluster.
        assert_eq!(w.allocate(0, 2 * 65536).unwrap_err().code(), Code::Internal);
        assert_eq!(
            w.allocate_compressed(65536, 100).unwrap_err().code(),
            Code::Internal
        );
        {
            let a = w.lock();
            assert_eq!(a.next, base + 65536);
            assert_eq!(a.refs, [1]);
            assert_eq!(a.l2[&0][0], 0);
        }
        // Past the end, or an unaligned start: refused, no panic.
        assert!(w.allocate_compressed(2 << 20, 100).is_err());
        assert!(w.allocate_compressed(100, 100).is_err());
        assert!(w.allocate_compressed(0, 0).is_err());
        assert!(w.allocate_compressed(0, 65537).is_err());
        // The short last cluster (512 bytes) takes a whole one, or a compressed slice.
        assert_eq!(w.allocate(1 << 20, 512).unwrap(), base + 65536);
        assert!(w.allocate(1 << 20, 65536).is_err());
        assert_eq!(w.allocate_compressed(0, 40).unwrap(), base + 2 * 65536);
    }

    #[test]
    fn header_fields_are_where_the_spec_puts_them() {
        let d = tempfile::tempdir().unwrap();
        let w = writer(d.path(), 10 << 30, 16, Some(Compression::Zstd));
        let h = w.header(5 * 65536, 1);
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_be_bytes(h[20..24].try_into().unwrap()), 16);
        assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 10 << 30);
        // 10 GiB / (64 KiB * 8192) = 20 L1 entries.
        assert_eq!(u32::from_be_bytes(h[36..40].try_into().unwrap()), 20);
        assert_eq!(u64::from_be_bytes(h[40..48].try_into().unwrap()), 65536);
        assert_eq!(u64::from_be_bytes(h[72..80].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(h[96..100].try_into().unwrap()), 4);
        assert_eq!(u32::from_be_bytes(h[100..104].try_into().unwrap()), 112);
        assert_eq!(h[104], 1);
    }

    #[test]
    fn compressed_descriptors_pack_and_span_clusters() {
        let d = tempfile::tempdir().unwrap();
        let w = writer(d.path(), 1 << 20, 16, Some(Compression::Zlib));
        let base = w.data_start * 65536;
        assert_eq!(w.allocate_compressed(0, 1000).unwrap(), base);
        assert_eq!(w.allocate_compressed(65536, 65000).unwrap(), base + 1000);
        // A normal allocation after a spanning compressed cluster takes the next free cluster.
        assert_eq!(w.allocate(3 * 65536, 65536).unwrap(), base + 2 * 65536);
        // What fits in the partly used cluster goes there.
        assert_eq!(w.allocate_compressed(4 * 65536, 400).unwrap(), base + 66000);
        // What does not, now that the cluster's successor is taken, starts a fresh cluster.
        assert_eq!(
            w.allocate_compressed(5 * 65536, 65_000).unwrap(),
            base + 3 * 65536
        );
        let a = w.lock();
        let e = a.l2[&0][1];
        assert_eq!(e & OFLAG_COMPRESSED, OFLAG_COMPRESSED);
        let x = 62 - 8;
        assert_eq!(e & ((1 << x) - 1), base + 1000);
        // Bytes base+1000 .. base+66000: sectors (base+1000)/512 to (base+65999)/512.
        assert_eq!((e >> x) & 0xff, (base + 65999) / 512 - (base + 1000) / 512);
        assert_eq!(a.refs[..4], [2, 2, 1, 1]);
    }

    #[test]
    fn misuse_is_an_error_not_a_corrupt_image() {
        let d = tempfile::tempdir().unwrap();
        let w = writer(d.path(), 1 << 20, 16, None);
        w.allocate(0, 65536).unwrap();
        assert_eq!(w.allocate(0, 65536).unwrap_err().code(), Code::Internal);
        assert!(w.allocate(100, 65536).is_err());
        assert!(w.allocate(1 << 20, 65536).is_err());
        let p = d.path().join("x");
        let f = File::create(&p).unwrap();
        let big = WriterOptions {
            cluster_bits: 9,
            compression: None,
        };
        assert!(Qcow2Writer::create(f, &p, 1 << 45, &big).is_err());
    }

    #[test]
    fn incompressible_clusters_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for c in [Compression::Zlib, Compression::Zstd] {
            let w = writer(
                &d.path().join(format!("{c:?}")).tap_mkdir(),
                1 << 20,
                16,
                Some(c),
            );
            let mut out = Vec::new();
            assert!(!w.compress_cluster(&noise, &mut out).unwrap());
            assert!(w.compress_cluster(&[7u8; 65536], &mut out).unwrap());
            assert!(out.len() < 1000);
            // A short last cluster is compressed as if zero-padded.
            assert!(w.compress_cluster(&[7u8; 100], &mut out).unwrap());
        }
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> PathBuf;
    }

    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> PathBuf {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
