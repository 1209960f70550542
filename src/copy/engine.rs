//! The copy engine: every disk of an image at once, split into chunks, on a rayon pool.
//!
//! Holes and zero clusters are skipped without reading; data is read, checked for zeros block by
//! block (4 KiB for raw output, one cluster for qcow2) and only non-zero blocks are written. For qcow2
//! output, host clusters are handed out in guest order through a per-disk turnstile, so the same
//! input always gives the same bytes (and the same SHA-256), while reading, zero detection and
//! compression run in parallel. A disk is finished, hashed and fsynced by the worker that completes
//! its last chunk, while the other workers go on with the next disks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::copy::progress::Progress;
use crate::error::{Code, Error, Result};
use crate::format::qcow2::writer::{Compression, Qcow2Writer, WriterOptions};
use crate::format::{BlockSource, ExtentKind};

/// Bytes a worker claims at a time: large enough to amortise syscalls, small enough that 16 workers
/// stay far below the 256 MiB memory goal. A multiple of every cluster size.
pub const CHUNK: u64 = 4 << 20;
/// Zero-detection granularity for raw output (like `qemu-img convert -S 4k`).
pub const RAW_BLOCK: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Raw,
    Qcow2,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
        }
    }
}

/// How output disks are written.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub format: OutputFormat,
    /// qcow2 cluster size as a power of two (16 = 64 KiB).
    pub cluster_bits: u32,
    /// qcow2 only: compress every cluster that shrinks.
    pub compression: Option<Compression>,
}

impl OutputSpec {
    /// The size a disk of `virtual_size` bytes gets in this output: qcow2 sizes are whole 512-byte
    /// sectors (qemu reads them in sectors), so they are rounded up; raw sizes are kept.
    pub fn disk_size(&self, virtual_size: u64) -> u64 {
        match self.format {
            OutputFormat::Qcow2 => virtual_size.next_multiple_of(512),
            OutputFormat::Raw => virtual_size,
        }
    }
}

impl Default for OutputSpec {
    fn default() -> Self {
        OutputSpec {
            format: OutputFormat::Qcow2,
            cluster_bits: 16,
            compression: None,
        }
    }
}

/// One disk to produce.
pub struct DiskJob {
    /// The device name, for messages.
    pub name: String,
    /// None for an empty disk.
    pub source: Option<Box<dyn BlockSource>>,
    /// The output's virtual size (at least the source's).
    pub virtual_size: u64,
    /// The file to create; it must not exist.
    pub out_path: PathBuf,
    /// Compute the output file's SHA-256 once it is written.
    pub hash: bool,
}

/// What the copy did, in bytes of guest data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyStats {
    /// Non-zero data written.
    #[serde(rename = "BytesCopied")]
    pub copied: u64,
    /// Ranges skipped without reading: holes, unallocated and zero clusters, growth.
    #[serde(rename = "HolesSkipped")]
    pub holes: u64,
    /// Data read and found to be all zeros (not written).
    #[serde(rename = "ZerosDetected")]
    pub zeros: u64,
}

impl CopyStats {
    pub fn add(&mut self, o: &CopyStats) {
        self.copied += o.copied;
        self.holes += o.holes;
        self.zeros += o.zeros;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskResult {
    pub path: PathBuf,
    /// The output's virtual size: the job's, rounded up to 512 bytes for qcow2 (qemu reads qcow2
    /// sizes in whole sectors).
    pub virtual_size: u64,
    /// Lowercase hex SHA-256 of the output file, when the job asked for it.
    pub sha256: Option<String>,
    pub file_size: u64,
    /// Bytes the filesystem allocated to the file.
    pub allocated_bytes: u64,
    pub stats: CopyStats,
}

enum Sink {
    Raw(File),
    Qcow2(Qcow2Writer),
}

#[derive(Default)]
struct Cursor {
    pos: u64,
    seq: u64,
    /// Every chunk has been handed out and the dispatcher's share of `outstanding` was returned.
    done: bool,
}

struct DiskState {
    name: String,
    path: PathBuf,
    hash: bool,
    source: Option<Box<dyn BlockSource>>,
    source_size: u64,
    virtual_size: u64,
    sink: Mutex<Option<Arc<Sink>>>,
    cursor: Mutex<Cursor>,
    /// Chunks in flight plus one for the dispatcher; whoever brings it to zero finishes the disk.
    outstanding: AtomicU64,
    /// Held around writes to the output file. The kernel serialises buffered writes to one file on
    /// its inode lock anyway, and spins there while waiting (16-18% of CPU in a profile with two
    /// workers on one file); a mutex here sleeps instead and leaves the CPU to reading, zero
    /// detection, compression and hashing.
    write_lock: Mutex<()>,
    /// Workers copying a chunk of this disk now.
    active: AtomicUsize,
    /// Every chunk has been handed out.
    dispatched: AtomicBool,
    /// The sequence number whose turn it is to allocate (qcow2 output).
    turn: Mutex<u64>,
    turn_cv: Condvar,
    copied: AtomicU64,
    holes: AtomicU64,
    zeros: AtomicU64,
    result: Mutex<Option<DiskResult>>,
}

struct Shared<'a> {
    disks: Vec<DiskState>,
    block: u64,
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    progress: &'a dyn Progress,
}

/// Copies every job on `threads` workers. Output files are created here; on error they are left
/// for the caller (the publisher) to remove with its temporary directory.
pub fn copy_disks(
    jobs: Vec<DiskJob>,
    spec: &OutputSpec,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<DiskResult>> {
    let block = match spec.format {
        OutputFormat::Raw => RAW_BLOCK,
        OutputFormat::Qcow2 => 1u64 << spec.cluster_bits,
    };
    let mut disks = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        job.virtual_size = spec.disk_size(job.virtual_size);
        let sink = create_sink(&job.out_path, job.virtual_size, spec)?;
        let source_size = job.source.as_ref().map_or(0, |s| s.virtual_size());
        disks.push(DiskState {
            name: job.name,
            path: job.out_path,
            hash: job.hash,
            source_size: source_size.min(job.virtual_size),
            source: job.source,
            virtual_size: job.virtual_size,
            sink: Mutex::new(Some(Arc::new(sink))),
            cursor: Mutex::new(Cursor::default()),
            outstanding: AtomicU64::new(1),
            write_lock: Mutex::new(()),
            active: AtomicUsize::new(0),
            dispatched: AtomicBool::new(false),
            turn: Mutex::new(0),
            turn_cv: Condvar::new(),
            copied: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            zeros: AtomicU64::new(0),
            result: Mutex::new(None),
        });
    }
    let shared = Shared {
        disks,
        block,
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        progress,
    };
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-copy-{i}"))
        .build()
        .map_err(|e| {
            Error::new(
                Code::Internal,
                format!("cannot start {threads} copy threads: {e}"),
            )
        })?;
    pool.scope(|s| {
        for _ in 0..threads {
            s.spawn(|_| worker(&shared));
        }
    });
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    let mut out = Vec::with_capacity(shared.disks.len());
    for d in &shared.disks {
        let r = lock(&d.result).take().ok_or_else(|| {
            Error::new(
                Code::Internal,
                format!("{}: the copy ended without finishing the disk", d.name),
            )
        })?;
        out.push(r);
    }
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked cannot leave these structures half-changed in a way later code trusts:
    // the error path aborts the whole copy anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn create_sink(path: &Path, virtual_size: u64, spec: &OutputSpec) -> Result<Sink> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::io(path, "creating", e))?;
    match spec.format {
        OutputFormat::Raw => {
            file.set_len(virtual_size).map_err(|e| {
                Error::io(
                    path,
                    &format!("setting the length to {virtual_size} bytes"),
                    e,
                )
            })?;
            Ok(Sink::Raw(file))
        }
        OutputFormat::Qcow2 => {
            let opts = WriterOptions {
                cluster_bits: spec.cluster_bits,
                compression: spec.compression,
            };
            Ok(Sink::Qcow2(Qcow2Writer::create(
                file,
                path,
                virtual_size,
                &opts,
            )?))
        }
    }
}

/// Per-worker buffers, reused across chunks.
struct Scratch {
    buf: Vec<u8>,
    touched: Vec<bool>,
    compressed: Vec<Vec<u8>>,
}

fn worker(sh: &Shared<'_>) {
    let mut scratch = Scratch {
        buf: vec![0u8; CHUNK as usize],
        touched: Vec::new(),
        compressed: Vec::new(),
    };
    while !sh.abort.load(Ordering::Relaxed) {
        let Some(d) = pick_disk(sh) else {
            break;
        };
        let r = match claim(sh, d) {
            Ok(Some((start, end, seq))) => {
                let r = copy_chunk(sh, d, start, end, seq, &mut scratch);
                crate::util::testhook::checkpoint("chunk");
                sh.disks[d].active.fetch_sub(1, Ordering::AcqRel);
                r.and_then(|()| release(sh, d))
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            fail(sh, e);
            break;
        }
    }
}

/// The disk with the fewest workers on it among those with chunks left to hand out (the first
/// such on a tie). Spreading workers over disks matters: buffered writes to one file serialise on
/// its inode lock (a profile showed 18% of CPU spinning there with two workers on one file).
fn pick_disk(sh: &Shared<'_>) -> Option<usize> {
    sh.disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.dispatched.load(Ordering::Acquire))
        .min_by_key(|(_, d)| d.active.load(Ordering::Acquire))
        .map(|(i, _)| i)
}

fn fail(sh: &Shared<'_>, e: Error) {
    let mut slot = lock(&sh.error);
    if slot.is_none() {
        *slot = Some(e);
    }
    sh.abort.store(true, Ordering::Release);
    for d in &sh.disks {
        d.turn_cv.notify_all();
    }
}

/// Hands out the next chunk of disk `d`, skipping whole holes on the way. None when the disk has
/// nothing left to hand out.
fn claim(sh: &Shared<'_>, d: usize) -> Result<Option<(u64, u64, u64)>> {
    let disk = &sh.disks[d];
    let mut c = lock(&disk.cursor);
    if c.done {
        return Ok(None);
    }
    loop {
        if c.pos >= disk.virtual_size {
            c.done = true;
            disk.dispatched.store(true, Ordering::Release);
            drop(c);
            release(sh, d)?;
            return Ok(None);
        }
        let skip_to = match &disk.source {
            Some(src) if c.pos < disk.source_size => {
                let ext = src.extent(c.pos, disk.source_size - c.pos)?;
                if ext.kind == ExtentKind::Data {
                    c.pos
                } else if ext.end() >= disk.source_size {
                    disk.virtual_size
                } else {
                    ext.end() - ext.end() % sh.block
                }
            }
            // Past the source (a grown disk) or no source at all: nothing to copy.
            _ => disk.virtual_size,
        };
        if skip_to > c.pos {
            let n = skip_to - c.pos;
            disk.holes.fetch_add(n, Ordering::Relaxed);
            sh.progress.advance(d, n);
            c.pos = skip_to;
            continue;
        }
        let start = c.pos;
        let end = (start - start % CHUNK + CHUNK).min(disk.virtual_size);
        let seq = c.seq;
        c.seq += 1;
        c.pos = end;
        disk.outstanding.fetch_add(1, Ordering::AcqRel);
        disk.active.fetch_add(1, Ordering::AcqRel);
        return Ok(Some((start, end, seq)));
    }
}

/// Drops one share of `outstanding`; the last one finishes the disk.
fn release(sh: &Shared<'_>, d: usize) -> Result<()> {
    if sh.disks[d].outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
        finish_disk(sh, d)?;
    }
    Ok(())
}

fn sink_of(disk: &DiskState) -> Result<Arc<Sink>> {
    lock(&disk.sink).as_ref().cloned().ok_or_else(|| {
        Error::new(
            Code::Internal,
            format!("{}: output already finished", disk.name),
        )
    })
}

fn copy_chunk(
    sh: &Shared<'_>,
    d: usize,
    start: u64,
    end: u64,
    seq: u64,
    s: &mut Scratch,
) -> Result<()> {
    let disk = &sh.disks[d];
    let block = sh.block;
    let len = (end - start) as usize;
    let nblocks = len.div_ceil(block as usize);
    s.touched.clear();
    s.touched.resize(nblocks, false);
    let buf = &mut s.buf[..len];

    // Read every data extent of the chunk; pad the blocks they touch with zeros.
    let src_end = end.min(disk.source_size);
    let mut holes = end - src_end.max(start);
    if let Some(src) = &disk.source {
        let mut pos = start;
        let mut filled_to = 0usize;
        while pos < src_end {
            let ext = src.extent(pos, src_end - pos)?;
            if ext.kind == ExtentKind::Data {
                let rs = (ext.start - start) as usize;
                let re = (ext.end() - start) as usize;
                let bs = rs - rs % block as usize;
                let be = (re.div_ceil(block as usize) * block as usize).min(len);
                if filled_to.max(bs) < rs {
                    buf[filled_to.max(bs)..rs].fill(0);
                }
                src.read_at(ext.start, &mut buf[rs..re])?;
                buf[re..be].fill(0);
                filled_to = be;
                for t in &mut s.touched[bs / block as usize..be.div_ceil(block as usize)] {
                    *t = true;
                }
            } else {
                holes += ext.len;
            }
            pos = ext.end();
        }
    }

    // Runs of non-zero blocks, as (offset in chunk, length).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut zeros = 0u64;
    for (i, t) in s.touched.iter().enumerate() {
        if !t {
            continue;
        }
        let bs = i * block as usize;
        let be = (bs + block as usize).min(len);
        if is_zero(&buf[bs..be]) {
            zeros += (be - bs) as u64;
        } else {
            match runs.last_mut() {
                Some((rs, rl)) if *rs + *rl == bs => *rl += be - bs,
                _ => runs.push((bs, be - bs)),
            }
        }
    }
    let copied: u64 = runs.iter().map(|r| r.1 as u64).sum();

    let sink = sink_of(disk)?;
    match &*sink {
        Sink::Raw(file) => {
            {
                let _w = lock(&disk.write_lock);
                for &(off, l) in &runs {
                    let at = start + off as u64;
                    file.write_all_at(&buf[off..off + l], at).map_err(|e| {
                        Error::io(&disk.path, &format!("writing {l} bytes at offset {at}"), e)
                    })?;
                }
            }
            if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
                let from = start + first.0 as u64;
                start_writeback(file, from, start + (last.0 + last.1) as u64 - from);
            }
        }
        Sink::Qcow2(w) => {
            if w.compression().is_some() {
                write_compressed(sh, disk, w, start, &runs, buf, seq, &mut s.compressed)?;
            } else {
                let mut hosts = Vec::with_capacity(runs.len());
                take_turn(sh, disk, seq, || {
                    for &(off, l) in &runs {
                        hosts.push(w.allocate(start + off as u64, l as u64)?);
                    }
                    Ok(())
                })?;
                let mut span: Option<(u64, u64)> = None;
                {
                    let _w = lock(&disk.write_lock);
                    for (&(off, l), host) in runs.iter().zip(hosts) {
                        w.write_at(host, &buf[off..off + l])?;
                        let (lo, hi) = span.unwrap_or((host, host));
                        span = Some((lo.min(host), hi.max(host + l as u64)));
                    }
                }
                if let Some((lo, hi)) = span {
                    start_writeback(w.file(), lo, hi - lo);
                }
            }
        }
    }
    drop(sink);
    disk.copied.fetch_add(copied, Ordering::Relaxed);
    disk.zeros.fetch_add(zeros, Ordering::Relaxed);
    disk.holes.fetch_add(holes, Ordering::Relaxed);
    sh.progress.advance(d, end - start);
    Ok(())
}

/// Compresses each non-zero cluster in parallel (this worker's share), then allocates in turn.
#[allow(clippy::too_many_arguments)]
fn write_compressed(
    sh: &Shared<'_>,
    disk: &DiskState,
    w: &Qcow2Writer,
    start: u64,
    runs: &[(usize, usize)],
    buf: &[u8],
    seq: u64,
    pool: &mut Vec<Vec<u8>>,
) -> Result<()> {
    let cs = w.cluster_size() as usize;
    // (offset in chunk, length, index into pool when compressed)
    let mut clusters: Vec<(usize, usize, Option<usize>)> = Vec::new();
    let mut used = 0;
    for &(off, l) in runs {
        let mut o = off;
        while o < off + l {
            let cl = cs.min(off + l - o);
            if pool.len() <= used {
                pool.push(Vec::with_capacity(cs));
            }
            if w.compress_cluster(&buf[o..o + cl], &mut pool[used])? {
                clusters.push((o, cl, Some(used)));
                used += 1;
            } else {
                clusters.push((o, cl, None));
            }
            o += cl;
        }
    }
    let mut hosts = Vec::with_capacity(clusters.len());
    take_turn(sh, disk, seq, || {
        for &(o, cl, c) in &clusters {
            let guest = start + o as u64;
            hosts.push(match c {
                Some(i) => w.allocate_compressed(guest, pool[i].len())?,
                None => w.allocate(guest, cl as u64)?,
            });
        }
        Ok(())
    })?;
    let _w = lock(&disk.write_lock);
    for (&(o, cl, c), host) in clusters.iter().zip(hosts) {
        match c {
            Some(i) => w.write_at(host, &pool[i])?,
            None => w.write_at(host, &buf[o..o + cl])?,
        }
    }
    Ok(())
}

/// Runs `f` when it is chunk `seq`'s turn on this disk, then passes the turn on.
fn take_turn(
    sh: &Shared<'_>,
    disk: &DiskState,
    seq: u64,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut turn = lock(&disk.turn);
    while *turn != seq {
        if sh.abort.load(Ordering::Acquire) {
            return Err(Error::new(Code::Internal, "copy aborted"));
        }
        turn = disk
            .turn_cv
            .wait_timeout(turn, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let r = f();
    *turn += 1;
    drop(turn);
    disk.turn_cv.notify_all();
    r
}

fn finish_disk(sh: &Shared<'_>, d: usize) -> Result<()> {
    let disk = &sh.disks[d];
    let arc = lock(&disk.sink)
        .take()
        .ok_or_else(|| Error::new(Code::Internal, format!("{}: finished twice", disk.name)))?;
    let sink = Arc::try_unwrap(arc).map_err(|_| {
        Error::new(
            Code::Internal,
            format!("{}: output still in use at finish", disk.name),
        )
    })?;
    crate::util::testhook::checkpoint("disk-copied");
    let (file, sparse) = match sink {
        Sink::Raw(f) => (f, true),
        Sink::Qcow2(w) => (w.finish()?, false),
    };
    let sha256 = if disk.hash {
        Some(hash_file(&file, &disk.path, sparse)?)
    } else {
        None
    };
    file.sync_all()
        .map_err(|e| Error::io(&disk.path, "flushing (fsync)", e))?;
    crate::util::testhook::checkpoint("disk-done");
    let meta = file
        .metadata()
        .map_err(|e| Error::io(&disk.path, "reading metadata of", e))?;
    *lock(&disk.result) = Some(DiskResult {
        path: disk.path.clone(),
        virtual_size: disk.virtual_size,
        sha256,
        file_size: meta.len(),
        allocated_bytes: meta.blocks() * 512,
        stats: CopyStats {
            copied: disk.copied.load(Ordering::Relaxed),
            holes: disk.holes.load(Ordering::Relaxed),
            zeros: disk.zeros.load(Ordering::Relaxed),
        },
    });
    let stats = lock(&disk.result)
        .as_ref()
        .map(|r| r.stats)
        .unwrap_or_default();
    sh.progress.disk_done(d, &stats);
    Ok(())
}

/// Starts writeback of a range just written, without waiting for it. The data is fsynced when the
/// disk is finished anyway; starting the disk writes now overlaps them with the rest of the copy,
/// instead of leaving the whole output dirty in the page cache for one long fsync at the end (which
/// is where a copy of several GiB used to wait). A hint only: errors are ignored here and the
/// final fsync reports any.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for the
    // duration of the call (borrowed from `file`).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// True when every byte is zero. Checks 4 KiB at a time with word-wide ORs the compiler vectorises,
/// returning at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|b| {
        let (words, tail) = b.split_at(b.len() - b.len() % 8);
        let acc = words.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        });
        acc == 0 && tail.iter().all(|&x| x == 0)
    })
}

/// SHA-256 of a whole file, lowercase hex. With `sparse`, holes found by `SEEK_DATA` are hashed as
/// zeros without reading them.
pub fn hash_file(file: &File, path: &Path, sparse: bool) -> Result<String> {
    const BUF: usize = 1 << 20;
    static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
    let size = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < size {
        let data_at = if sparse {
            next_data(file, pos).unwrap_or(pos).min(size)
        } else {
            pos
        };
        let mut z = data_at - pos;
        while z > 0 {
            let n = z.min(ZEROS.len() as u64);
            h.update(&ZEROS[..n as usize]);
            z -= n;
        }
        pos = data_at;
        if pos >= size {
            break;
        }
        let n = (size - pos).min(BUF as u64) as usize;
        let got = crate::format::read_full_at(file, &mut buf[..n], pos)
            .map_err(|e| Error::io(path, &format!("reading at offset {pos} to hash"), e))?;
        if got < n {
            return Err(Error::new(
                Code::IoError,
                format!(
                    "{}: shrank to {} bytes while being hashed",
                    path.display(),
                    pos + got as u64
                ),
            ));
        }
        h.update(&buf[..n]);
        pos += n as u64;
        crate::util::testhook::checkpoint("hashing");
    }
    Ok(hex(&h.finalize()))
}

/// Where data resumes at or after `pos` (the file's size when only a hole is left).
fn next_data(file: &File, pos: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(pos).ok()?;
    // SAFETY: lseek on an open descriptor has no memory-safety requirements; the file position it
    // moves is not used, since every read here is a pread at an explicit offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        Some(r as u64)
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        Some(u64::MAX)
    } else {
        None
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_a_single_byte_anywhere() {
        let mut b = vec![0u8; 3 * 4096 + 17];
        assert!(is_zero(&b));
        for at in [0, 7, 4095, 4096, 8191, b.len() - 1] {
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
            b[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn sparse_hash_equals_plain_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(&[9u8; 5000], 3 << 20).unwrap();
        let a = hash_file(&f, &p, true).unwrap();
        let b = hash_file(&f, &p, false).unwrap();
        assert_eq!(a, b);
        // sha256 of the empty string, a fixed point every implementation agrees on.
        let e = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            hash_file(e.as_file(), e.path(), true).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// A source whose first read fails at once when `fail` is set; every other read takes 30 ms
    /// and is counted.
    struct Slow {
        size: u64,
        fail: AtomicBool,
        reads: Arc<AtomicUsize>,
    }

    impl BlockSource for Slow {
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn extent(&self, offset: u64, max_len: u64) -> Result<crate::format::Extent> {
            Ok(crate::format::Extent {
                start: offset,
                len: max_len.min(self.size - offset),
                kind: ExtentKind::Data,
            })
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(Error::new(Code::IoError, "injected read failure"));
            }
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            buf.fill(0x5a);
            Ok(())
        }
    }

    /// The first failure stops every worker: the others finish the chunk in hand and take no more.
    #[test]
    fn a_failure_stops_every_worker() {
        let dir = tempfile::tempdir().unwrap();
        let reads = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for i in 0..5 {
            jobs.push(DiskJob {
                name: format!("d{i}"),
                source: Some(Box::new(Slow {
                    size: 4 * CHUNK,
                    fail: AtomicBool::new(i == 0),
                    reads: reads.clone(),
                })),
                virtual_size: 4 * CHUNK,
                out_path: dir.path().join(format!("d{i}.raw")),
                hash: true,
            });
        }
        let spec = OutputSpec {
            format: OutputFormat::Raw,
            ..OutputSpec::default()
        };
        let e = copy_disks(jobs, &spec, 2, &crate::copy::progress::NoProgress).unwrap_err();
        assert_eq!(e.message(), "injected read failure");
        // 19 more chunks would be read without the abort; one or two with it.
        let n = reads.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} chunks read after the failure");
    }
}
