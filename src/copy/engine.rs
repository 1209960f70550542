//! The copy engine: every disk of an image at once, split into chunks, on a rayon pool.
//!
//! Holes and zero clusters are skipped without reading; data is read, checked for zeros block by
//! block (the writer's block size: 4 KiB for raw output, one cluster for qcow2) and only non-zero
//! blocks go to the output's [`DiskWriter`], in its steps: prepare (compression) in parallel,
//! allocate in guest order through a per-disk turnstile when the writer asks for it (so the same
//! input always gives the same bytes, and the same SHA-256), seal in place (qcow2 encryption,
//! whose IV is the host sector) in parallel, and write in parallel. The engine knows no format.
//! The worker that completes a disk's last chunk finishes its format (qcow2's tables) and hands the
//! file to a finishing thread, which hashes and fsyncs it while the workers go on copying the next
//! disks.
//!
//! The output's cache mode ([`CacheMode`], `-t`) decides the rest: `writeback` starts writeback of
//! each range as it is written (on a thread of its own: `sync_file_range` waits whenever the
//! device's queue is full, and the workers should not) and fsyncs each finished disk; `unsafe` does neither; `none` writes
//! every 4 KiB-aligned piece through a second, `O_DIRECT` descriptor of the output (chunk buffers
//! are 4 KiB-aligned for it), the rest through the writer, and fsyncs each finished disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::copy::aligned::{AlignedBuf, ALIGN};
use crate::copy::hash::hash_file;
use crate::copy::progress::Progress;
use crate::copy::stats::CopyStats;
use crate::error::{Code, Error, Result};
use crate::format::{BlockSource, CacheMode, DiskWriter, ExtentKind, OutputSpec};

/// Bytes a worker claims at a time: large enough to amortise syscalls, small enough that 16 workers
/// stay far below the 256 MiB memory goal. A multiple of every cluster size.
pub(crate) const CHUNK: u64 = 4 << 20;
/// One disk to produce.
pub(crate) struct DiskJob {
    /// The device name, for messages.
    pub(crate) name: String,
    /// None for an empty disk.
    pub(crate) source: Option<Box<dyn BlockSource>>,
    /// The output's virtual size (at least the source's).
    pub(crate) virtual_size: u64,
    /// The file to create; it must not exist.
    pub(crate) out_path: PathBuf,
    /// Compute the output file's SHA-256 once it is written.
    pub(crate) hash: bool,
    /// This disk's encryption, over the spec's (`encrypt=true` on one `--disk`).
    pub(crate) encryption: Option<crate::format::Encryption>,
    /// This disk's output format, over the spec's (`output-format=` on one `--disk`).
    pub(crate) format: Option<crate::format::OutputFormat>,
    /// Told once the output is final (hashed, flushed): `create --output-dir s3://` starts its
    /// upload there while the other disks still copy.
    pub(crate) sealed: Option<Sealed>,
}

/// Receives a finished output: its path, the open file, and its SHA-256 (hex) when hashed.
pub(crate) type Sealed = Arc<dyn Fn(&Path, &File, Option<&str>) + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskResult {
    pub(crate) path: PathBuf,
    /// The output's virtual size: the job's, rounded up to 512 bytes for qcow2 (qemu reads qcow2
    /// sizes in whole sectors).
    pub(crate) virtual_size: u64,
    /// Lowercase hex SHA-256 of the output file, when the job asked for it.
    pub(crate) sha256: Option<String>,
    pub(crate) file_size: u64,
    /// Bytes the filesystem allocated to the file.
    pub(crate) allocated_bytes: u64,
    pub(crate) stats: CopyStats,
}

type Sink = Arc<Box<dyn DiskWriter>>;

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
    sealed: Option<Sealed>,
    source: Option<Box<dyn BlockSource>>,
    source_size: u64,
    virtual_size: u64,
    /// The writer's zero-detection block size.
    block: u64,
    sink: Mutex<Option<Sink>>,
    /// The output opened again with `O_DIRECT` (`-t none`), for aligned pieces.
    direct: Option<File>,
    /// The output's descriptor for the writeback thread (`-t writeback`, where the writer takes
    /// hints).
    writeback_file: Option<Arc<File>>,
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
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    progress: &'a dyn Progress,
    cache: CacheMode,
    /// Disks whose format is finished, for the finishing threads to hash and fsync; closed (None)
    /// once every worker is done.
    finished: FinishedTx,
    /// Ranges just written, for the writeback thread to start writing back; closed (None) once
    /// every worker is done.
    writeback: WritebackTx,
}

/// Copies every job on `threads` workers. Output files are created here; on error they are left
/// for the caller (the publisher) to remove with its temporary directory.
pub(crate) fn copy_disks(
    jobs: Vec<DiskJob>,
    spec: &OutputSpec,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<DiskResult>> {
    let mut made = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        let mut own = spec.for_disk(job.format)?;
        if let Some(e) = job.encryption.take() {
            own.encryption = Some(e);
        }
        let spec = &own;
        job.virtual_size = spec.disk_size(job.virtual_size);
        let sink = create_sink(&job.out_path, job.virtual_size, spec)?;
        let direct = match spec.cache {
            CacheMode::None => Some(open_direct(&job.out_path, sink.as_ref(), spec)?),
            _ => None,
        };
        made.push((job, sink, direct));
    }
    run(made, spec.cache, threads, progress)
}

/// Copies each job into a writer the caller made, in a file the caller owns (an OVA's VMDK
/// members, written in place inside the archive). `job.virtual_size` is the writer's size and
/// `job.out_path` names the file in messages; nothing is created. No `O_DIRECT` (`-t none`): the
/// caller refuses it.
pub(crate) fn copy_into(
    jobs: Vec<(DiskJob, Box<dyn DiskWriter>)>,
    cache: CacheMode,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<DiskResult>> {
    let made = jobs.into_iter().map(|(j, s)| (j, s, None)).collect();
    run(made, cache, threads, progress)
}

/// The copy itself, once every output has its writer (and its `O_DIRECT` descriptor with `-t none`).
fn run(
    made: Vec<(DiskJob, Box<dyn DiskWriter>, Option<File>)>,
    cache: CacheMode,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<DiskResult>> {
    let mut disks = Vec::with_capacity(made.len());
    for (job, sink, direct) in made {
        let source_size = job.source.as_ref().map_or(0, |s| s.virtual_size());
        // A hint only: without a second descriptor the worker starts writeback itself.
        let writeback_file = (cache == CacheMode::Writeback && sink.writeback_hints())
            .then(|| sink.file().try_clone().ok().map(Arc::new))
            .flatten();
        disks.push(DiskState {
            name: job.name,
            path: job.out_path,
            hash: job.hash,
            sealed: job.sealed,
            source_size: source_size.min(job.virtual_size),
            source: job.source,
            virtual_size: job.virtual_size,
            block: sink.block_size(),
            sink: Mutex::new(Some(Arc::new(sink))),
            direct,
            writeback_file,
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
    let (tx, rx) = mpsc::channel();
    let rx = Mutex::new(rx);
    let (wtx, wrx) = mpsc::channel::<(Arc<File>, u64, u64)>();
    let shared = Shared {
        disks,
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        progress,
        cache,
        finished: Mutex::new(Some(tx)),
        writeback: Mutex::new(Some(wtx)),
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
    // As many finishing threads as workers, so that disks that end together are hashed together.
    std::thread::scope(|ts| {
        // Closes the channel when the workers are done, or unwind, so the finishing threads stop.
        let _close = CloseOnDrop(&shared.finished);
        let _close_writeback = CloseOnDrop(&shared.writeback);
        // sync_file_range can block while the device queue is full: a thread of its own waits
        // there, not the workers.
        let spawned = std::thread::Builder::new()
            .name("kiln-writeback".into())
            .spawn_scoped(ts, move || {
                while let Ok((file, lo, len)) = wrx.recv() {
                    start_writeback(&file, lo, len);
                }
            });
        if let Err(e) = spawned {
            fail(
                &shared,
                Error::new(
                    Code::Internal,
                    format!("cannot start the writeback thread: {e}"),
                ),
            );
        }
        for i in 0..threads {
            let (shared, rx) = (&shared, &rx);
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-finish-{i}"))
                .spawn_scoped(ts, move || finisher(shared, rx));
            if let Err(e) = spawned {
                let msg = format!("cannot start a finishing thread: {e}");
                fail(shared, Error::new(Code::Internal, msg));
            }
        }
        pool.scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| worker(&shared));
            }
        });
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

fn create_sink(path: &Path, virtual_size: u64, spec: &OutputSpec) -> Result<Box<dyn DiskWriter>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::io(path, "creating", e))?;
    spec.create(file, path, virtual_size)
}

/// The output at `path` opened a second time, for writing with `O_DIRECT` (`-t none`). Refused
/// for writers whose writes are not plain aligned stores, and on filesystems without `O_DIRECT`.
fn open_direct(path: &Path, sink: &dyn DiskWriter, spec: &OutputSpec) -> Result<File> {
    if !sink.direct_writes() {
        let why = if spec.compression.is_some() {
            "compressed clusters are packed byte by byte, not written in aligned blocks"
        } else {
            "this format's writes are not plain aligned blocks"
        };
        return Err(Error::new(
            Code::InvalidParameter,
            format!(
                "-t none cannot write {} output here: {why}; use -t writeback (or -t unsafe)",
                spec.format.extension()
            ),
        ));
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => Error::new(
                Code::InvalidParameter,
                format!(
                    "-t none: the filesystem of {} does not support O_DIRECT; use -t writeback",
                    path.display()
                ),
            ),
            _ => Error::io(path, "opening with O_DIRECT (-t none)", e),
        })
}

/// Per-worker buffers, reused across chunks.
struct Scratch {
    /// 4 KiB-aligned, so that aligned pieces of a chunk can be written with `O_DIRECT`.
    buf: AlignedBuf,
    touched: Vec<bool>,
    /// Prepared (compressed) pieces.
    prepared: Vec<Vec<u8>>,
}

fn worker(sh: &Shared<'_>) {
    let mut scratch = Scratch {
        buf: AlignedBuf::zeroed(CHUNK as usize),
        touched: Vec::new(),
        prepared: Vec::new(),
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
                    ext.end() - ext.end() % disk.block
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

fn sink_of(disk: &DiskState) -> Result<Sink> {
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
    let block = disk.block;
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
    store(
        sh,
        disk,
        sink.as_ref().as_ref(),
        start,
        &runs,
        buf,
        seq,
        &mut s.prepared,
    )?;
    drop(sink);
    disk.copied.fetch_add(copied, Ordering::Relaxed);
    disk.zeros.fetch_add(zeros, Ordering::Relaxed);
    disk.holes.fetch_add(holes, Ordering::Relaxed);
    sh.progress.advance(d, end - start);
    Ok(())
}

/// Stores a chunk's runs of non-zero blocks through the writer's steps: prepare each piece (this
/// worker's share of the parallel compression), allocate (in turn when the writer wants guest
/// order; every chunk takes its turn, even an empty one), seal each piece in place (qcow2
/// encryption, on this worker, outside every lock), then write under the disk's write lock and
/// start writeback of the range written.
#[allow(clippy::too_many_arguments)]
fn store(
    sh: &Shared<'_>,
    disk: &DiskState,
    w: &dyn DiskWriter,
    start: u64,
    runs: &[(usize, usize)],
    buf: &mut [u8],
    seq: u64,
    pool: &mut Vec<Vec<u8>>,
) -> Result<()> {
    // (offset in chunk, length, index into pool when prepared)
    let pieces = prepare(w, start, runs, buf, pool)?;
    let mut hosts = Vec::with_capacity(pieces.len());
    let mut allocate = || {
        for &(o, l, p) in &pieces {
            let guest = start + o as u64;
            hosts.push(match p {
                Some(i) => w.allocate_prepared(guest, pool[i].len())?,
                None => w.allocate(guest, l as u64)?,
            });
        }
        Ok(())
    };
    if w.in_guest_order() {
        take_turn(sh, disk, seq, allocate)?;
    } else {
        allocate()?;
    }
    // Sealed in place where they lie: the prepared buffer, or the chunk itself.
    for (&(o, l, p), &host) in pieces.iter().zip(&hosts) {
        match p {
            Some(i) => w.seal(host, &mut pool[i])?,
            None => w.seal(host, &mut buf[o..o + l])?,
        }
    }
    let buf = &*buf;
    let mut span: Option<(u64, u64)> = None;
    {
        let _w = lock(&disk.write_lock);
        for (&(o, l, p), host) in pieces.iter().zip(hosts) {
            let data = match p {
                Some(i) => &pool[i][..],
                None => &buf[o..o + l],
            };
            write_piece(disk, w, host, data)?;
            let (lo, hi) = span.unwrap_or((host, host));
            span = Some((lo.min(host), hi.max(host + data.len() as u64)));
        }
    }
    if let (Some((lo, hi)), CacheMode::Writeback, true) = (span, sh.cache, w.writeback_hints()) {
        let queued = disk.writeback_file.as_ref().is_some_and(|f| {
            lock(&sh.writeback)
                .as_ref()
                .is_some_and(|tx| tx.send((Arc::clone(f), lo, hi - lo)).is_ok())
        });
        if !queued {
            start_writeback(w.file(), lo, hi - lo);
        }
    }
    Ok(())
}

/// Writes one piece: with `-t none`, its 4 KiB-aligned head through the `O_DIRECT` descriptor and
/// any short tail (a disk's last block) through the writer; otherwise all through the writer.
fn write_piece(disk: &DiskState, w: &dyn DiskWriter, host: u64, data: &[u8]) -> Result<()> {
    let head = match &disk.direct {
        Some(_)
            if host.is_multiple_of(ALIGN as u64)
                && (data.as_ptr() as usize).is_multiple_of(ALIGN) =>
        {
            data.len() - data.len() % ALIGN
        }
        _ => 0,
    };
    if let (Some(f), true) = (&disk.direct, head > 0) {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data[..head], host).map_err(|e| {
            Error::io(
                &disk.path,
                &format!("writing {head} bytes at offset {host} (O_DIRECT)"),
                e,
            )
        })?;
    }
    if head < data.len() {
        w.write_at(host + head as u64, &data[head..])?;
    }
    Ok(())
}

/// Splits runs into pieces of the writer's prepare unit and prepares each one into `pool`; the
/// runs as they are when the writer has no prepare step.
fn prepare(
    w: &dyn DiskWriter,
    start: u64,
    runs: &[(usize, usize)],
    buf: &[u8],
    pool: &mut Vec<Vec<u8>>,
) -> Result<Vec<(usize, usize, Option<usize>)>> {
    let Some(unit) = w.prepare_unit() else {
        return Ok(runs.iter().map(|&(o, l)| (o, l, None)).collect());
    };
    let unit = unit as usize;
    let mut pieces = Vec::new();
    let mut used = 0;
    for &(off, l) in runs {
        let mut o = off;
        while o < off + l {
            let pl = unit.min(off + l - o);
            if pool.len() <= used {
                pool.push(Vec::with_capacity(unit));
            }
            if w.prepare_at(start + o as u64, &buf[o..o + pl], &mut pool[used])? {
                pieces.push((o, pl, Some(used)));
                used += 1;
            } else {
                pieces.push((o, pl, None));
            }
            o += pl;
        }
    }
    Ok(pieces)
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

/// The last chunk of disk `d` is written: finishes the format (qcow2's tables) on this worker and
/// hands the file to a finishing thread.
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
    let finished = sink.finish()?;
    let sent = lock(&sh.finished)
        .as_ref()
        .is_some_and(|tx| tx.send((d, finished)).is_ok());
    if !sent {
        return Err(Error::new(
            Code::Internal,
            format!("{}: no finishing thread took the disk", disk.name),
        ));
    }
    Ok(())
}

type FinishedTx = Mutex<Option<Sender<(usize, crate::format::Finished)>>>;
type WritebackTx = Mutex<Option<Sender<(Arc<File>, u64, u64)>>>;

/// Drops the sender it guards: once every worker is done (or one panicked), nothing more comes.
struct CloseOnDrop<'a, T>(&'a Mutex<Option<T>>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        lock(self.0).take();
    }
}

/// A finishing thread: hashes and fsyncs each disk handed over until the channel closes.
fn finisher(sh: &Shared<'_>, rx: &Mutex<Receiver<(usize, crate::format::Finished)>>) {
    loop {
        // The lock is held while waiting: whoever holds it takes the next disk.
        let next = lock(rx).recv();
        let Ok((d, finished)) = next else {
            return;
        };
        if sh.abort.load(Ordering::Acquire) {
            continue;
        }
        if let Err(e) = seal_disk(sh, d, finished) {
            fail(sh, e);
        }
    }
}

/// Hashes (when asked) and fsyncs (unless `-t unsafe`) a finished disk and records its result.
fn seal_disk(sh: &Shared<'_>, d: usize, finished: crate::format::Finished) -> Result<()> {
    let disk = &sh.disks[d];
    let crate::format::Finished { file } = finished;
    let sha256 = if disk.hash {
        Some(hash_file(&file, &disk.path)?)
    } else {
        None
    };
    if sh.cache.flushes() {
        file.sync_all()
            .map_err(|e| Error::io(&disk.path, "flushing (fsync)", e))?;
    }
    crate::util::testhook::checkpoint("disk-done");
    if let Some(f) = &disk.sealed {
        f(&disk.path, &file, sha256.as_deref());
    }
    let meta = file
        .metadata()
        .map_err(|e| Error::io(&disk.path, "reading metadata of", e))?;
    let stats = CopyStats {
        copied: disk.copied.load(Ordering::Relaxed),
        holes: disk.holes.load(Ordering::Relaxed),
        zeros: disk.zeros.load(Ordering::Relaxed),
    };
    *lock(&disk.result) = Some(DiskResult {
        path: disk.path.clone(),
        virtual_size: disk.virtual_size,
        sha256,
        file_size: meta.len(),
        allocated_bytes: meta.blocks() * 512,
        stats,
    });
    sh.progress.disk_done(d, &stats);
    Ok(())
}

/// Starts writeback of a range just written, without waiting for it. The data is fsynced when the
/// disk is finished anyway; starting the disk writes now overlaps them with the rest of the copy,
/// instead of leaving the whole output dirty in the page cache for one long fsync at the end (which
/// is where a copy of several GiB used to wait). A hint only: errors are ignored here and the
/// final fsync reports any.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
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
                encryption: None,
                format: None,
                sealed: None,
            });
        }
        let spec = OutputSpec {
            format: crate::format::OutputFormat::named("raw").unwrap(),
            ..OutputSpec::default()
        };
        let e = copy_disks(jobs, &spec, 2, &crate::copy::progress::NoProgress).unwrap_err();
        assert_eq!(e.message(), "injected read failure");
        // 19 more chunks would be read without the abort; one or two with it.
        let n = reads.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} chunks read after the failure");
    }
}
