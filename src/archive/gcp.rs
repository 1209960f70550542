//! GCP's archive of a disk, `DEVICE.tar.gz` holding `disk.raw` in GNU tar's old sparse form,
//! streamed from the source with no copy of the disk on local storage:
//!
//! 1. **map** (parallel): the source's extents, and every 4 KiB block of its data read and checked
//!    for zeros, in windows of 4 MiB; the non-zero runs become the member's segments;
//! 2. **write** (parallel): the tar stream (headers, the segments' bytes read again from the
//!    source, padding and end blocks) is cut into 1 MiB chunks at fixed offsets; each is read and
//!    compressed on its own ([`pgzip`]) and the chunks are appended in order to one gzip member,
//!    hashed as they are written.
//!
//! Windows, blocks and chunks sit at fixed offsets, so the archive is the same for any `-j`.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::pgzip;
use super::sparse_tar::{self, SparseMap};
use crate::copy::engine::{is_zero, DiskJob, DiskResult};
use crate::copy::progress::Progress;
use crate::copy::stats::CopyStats;
use crate::error::{Code, Error, Result};
use crate::format::{BlockSource, ExtentKind};

/// The map's unit of work.
const MAP_WINDOW: u64 = 4 << 20;
/// Zero-detection granularity of the map, like raw output's.
const ZERO_BLOCK: u64 = 4096;
/// Windows mapped per round: bounds the runs held at once.
const ROUND: u64 = 256;
/// The tar stream's compression unit (pigz uses 128 KiB; larger chunks lose less to the resets).
const STREAM_CHUNK: u64 = 1 << 20;
/// Most segments a member's map keeps (16 MiB of map, 24 MiB of tar headers). A disk whose data
/// is more scattered has its nearest segments merged, holes between them stored as zeros.
const MAX_SEGMENTS: usize = 1 << 20;

/// Writes each job as an archive, one after the other, each on `threads` threads; `flush` fsyncs
/// each archive once written.
pub(crate) fn write_all(
    jobs: Vec<DiskJob>,
    threads: usize,
    flush: bool,
    progress: &dyn Progress,
) -> Result<Vec<DiskResult>> {
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-archive-{i}"))
        .build()
        .map_err(|e| {
            Error::new(
                Code::Internal,
                format!("cannot start {threads} threads: {e}"),
            )
        })?;
    let mtime = source_date_epoch();
    jobs.into_iter()
        .enumerate()
        .map(|(i, job)| {
            let r = pool.install(|| write_one(&job, mtime, flush, &|n| progress.advance(i, n)))?;
            progress.disk_done(i, &r.stats);
            Ok(r)
        })
        .collect()
}

/// `SOURCE_DATE_EPOCH` for the member's mtime; 0 without it, so the same request gives the same
/// archive.
fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn write_one(job: &DiskJob, mtime: u64, flush: bool, advance: &dyn Fn(u64)) -> Result<DiskResult> {
    let source = job.source.as_deref();
    let (map, zeros) = map_source(source, job.virtual_size)?;
    let stored = map.stored();
    advance(job.virtual_size - stored);
    let stream = Stream::new(map, mtime)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&job.out_path)
        .map_err(|e| Error::io(&job.out_path, "creating", e))?;
    let io = |e| Error::io(&job.out_path, "writing", e);
    let out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
    };
    let mut member = pgzip::Member::start(out).map_err(io)?;
    let chunks = stream.len.div_ceil(STREAM_CHUNK);
    // Four chunks in flight per thread: enough to keep every thread busy, and a few MiB each.
    let per_round = 4 * rayon::current_num_threads() as u64;
    for round in (0..chunks).step_by(per_round as usize) {
        let done: Vec<pgzip::Chunk> = (round..chunks.min(round + per_round))
            .into_par_iter()
            .map(|k| {
                let start = k * STREAM_CHUNK;
                let mut buf = vec![0u8; (stream.len - start).min(STREAM_CHUNK) as usize];
                stream.fill(source, start, &mut buf)?;
                pgzip::compress(&buf, pgzip::LEVEL)
            })
            .collect::<Result<_>>()?;
        for (i, c) in done.iter().enumerate() {
            member.push(c).map_err(io)?;
            advance(stream.data_in(round + i as u64));
        }
    }
    let out = member.finish().map_err(io)?;
    let sha256 = crate::copy::hash::hex(&out.hash.finalize());
    let file = out.inner.into_inner().map_err(|e| io(e.into_error()))?;
    if flush {
        file.sync_all()
            .map_err(|e| Error::io(&job.out_path, "flushing (fsync)", e))?;
    }
    let meta = file
        .metadata()
        .map_err(|e| Error::io(&job.out_path, "reading metadata of", e))?;
    Ok(DiskResult {
        path: job.out_path.clone(),
        virtual_size: job.virtual_size,
        sha256: Some(sha256),
        file_size: meta.len(),
        allocated_bytes: meta.blocks() * 512,
        stats: CopyStats {
            copied: stored,
            zeros,
            holes: job.virtual_size.saturating_sub(stored + zeros),
        },
    })
}

/// A writer that hashes what it writes.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The tar stream of one member: headers, the segments' bytes, then zeros.
struct Stream {
    headers: Vec<u8>,
    map: SparseMap,
    /// Where each segment's bytes start in the data area.
    starts: Vec<u64>,
    stored: u64,
    len: u64,
}

impl Stream {
    fn new(map: SparseMap, mtime: u64) -> Result<Stream> {
        let headers = map.headers(mtime)?;
        let mut starts = Vec::with_capacity(map.segments.len());
        let mut at = 0;
        for s in &map.segments {
            starts.push(at);
            at += s.1;
        }
        let len = headers.len() as u64 + at + sparse_tar::trailer_len(at);
        Ok(Stream {
            headers,
            map,
            starts,
            stored: at,
            len,
        })
    }

    /// Data-area bytes in chunk `k` of the stream (for progress).
    fn data_in(&self, k: u64) -> u64 {
        let h = self.headers.len() as u64;
        let (start, end) = (k * STREAM_CHUNK, ((k + 1) * STREAM_CHUNK).min(self.len));
        end.min(h + self.stored).saturating_sub(start.max(h))
    }

    /// Fills `buf` with the stream's bytes at `pos`.
    fn fill(&self, source: Option<&dyn BlockSource>, pos: u64, buf: &mut [u8]) -> Result<()> {
        let h = self.headers.len() as u64;
        let mut at = pos;
        let mut filled = 0usize;
        while filled < buf.len() {
            let out = &mut buf[filled..];
            let n = if at < h {
                let n = out.len().min((h - at) as usize);
                out[..n].copy_from_slice(&self.headers[at as usize..at as usize + n]);
                n
            } else if at < h + self.stored {
                let rel = at - h;
                let i = self.starts.partition_point(|&s| s <= rel) - 1;
                let (guest, len) = self.map.segments[i];
                let skip = rel - self.starts[i];
                let n = out.len().min((len - skip) as usize);
                let src = source.ok_or_else(|| {
                    Error::new(Code::Internal, "an archive segment of an empty disk")
                })?;
                // The last segment may run past the source's end to a whole tar block: zeros.
                let at_source = src.virtual_size().saturating_sub(guest + skip);
                let readable = n.min(usize::try_from(at_source).unwrap_or(usize::MAX));
                src.read_at(guest + skip, &mut out[..readable])?;
                out[readable..n].fill(0);
                n
            } else {
                out.fill(0);
                out.len()
            };
            filled += n;
            at += n as u64;
        }
        Ok(())
    }
}

/// The source's data segments (the map pass), and the bytes of data found to be zeros.
fn map_source(source: Option<&dyn BlockSource>, size: u64) -> Result<(SparseMap, u64)> {
    let mut segs = Segments::default();
    let mut zeros = 0;
    if let Some(src) = source {
        let end = src.virtual_size().min(size);
        let windows = end.div_ceil(MAP_WINDOW);
        for round in (0..windows).step_by(ROUND as usize) {
            let mapped: Vec<(Vec<(u64, u64)>, u64)> = (round..windows.min(round + ROUND))
                .into_par_iter()
                .map(|w| map_window(src, w * MAP_WINDOW, ((w + 1) * MAP_WINDOW).min(end)))
                .collect::<Result<_>>()?;
            for (runs, z) in mapped {
                zeros += z;
                runs.into_iter().for_each(|r| segs.push(r));
            }
        }
    }
    // Segments are whole 4 KiB blocks but for one that ends where the source does: it runs on to
    // a whole tar block (zeros past the source), as tar readers want every segment but the last
    // aligned.
    let mut segments = segs.list;
    if let Some(last) = segments.last_mut() {
        let end = (last.0 + last.1)
            .next_multiple_of(sparse_tar::BLOCK)
            .min(size);
        last.1 = end - last.0;
    }
    Ok((SparseMap { segments, size }, zeros))
}

/// The non-zero runs of guest bytes `[start, end)`, in 4 KiB blocks at fixed offsets.
fn map_window(src: &dyn BlockSource, start: u64, end: u64) -> Result<(Vec<(u64, u64)>, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut zeros = 0;
    let mut buf = Vec::new();
    let mut pos = start;
    while pos < end {
        let e = src.extent(pos, end - pos)?;
        if e.len == 0 || e.start != pos {
            return Err(Error::new(
                Code::Internal,
                format!("the source's extent at {pos} is empty or elsewhere"),
            ));
        }
        let e_end = (pos + e.len).min(end);
        if e.kind == ExtentKind::Data {
            buf.resize((e_end - pos) as usize, 0);
            src.read_at(pos, &mut buf)?;
            let mut off = pos;
            while off < e_end {
                let b_end = ((off / ZERO_BLOCK + 1) * ZERO_BLOCK).min(e_end);
                if is_zero(&buf[(off - pos) as usize..(b_end - pos) as usize]) {
                    zeros += b_end - off;
                } else {
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += b_end - off,
                        _ => runs.push((off, b_end - off)),
                    }
                }
                off = b_end;
            }
        }
        pos = e_end;
    }
    Ok((runs, zeros))
}

/// Segments being gathered in guest order, merged when they touch; past [`MAX_SEGMENTS`], the
/// nearest are merged (holes up to a gap that doubles until the list fits in half the bound).
#[derive(Default)]
struct Segments {
    list: Vec<(u64, u64)>,
    /// Holes up to this long are stored as zeros instead of splitting a segment.
    gap: u64,
}

impl Segments {
    fn push(&mut self, (off, len): (u64, u64)) {
        match self.list.last_mut() {
            Some(last) if off - (last.0 + last.1) <= self.gap => last.1 = off + len - last.0,
            _ => self.list.push((off, len)),
        }
        while self.list.len() > MAX_SEGMENTS {
            self.gap = (self.gap * 2).max(2 * ZERO_BLOCK);
            let gap = self.gap;
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.list.len() / 2);
            for &(o, l) in &self.list {
                match merged.last_mut() {
                    Some(last) if o - (last.0 + last.1) <= gap => last.1 = o + l - last.0,
                    _ => merged.push((o, l)),
                }
            }
            self.list = merged;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::progress::NoProgress;
    use crate::format::testing::Mem;
    use std::io::Read;
    use std::path::Path;

    fn archive(disk: &[u8], size: u64, threads: usize, dir: &Path) -> (Vec<u8>, DiskResult) {
        let path = dir.join(format!("a{threads}.tar.gz"));
        let job = DiskJob {
            name: "/dev/xvda".into(),
            source: Some(Box::new(Mem(disk.to_vec()))),
            virtual_size: size,
            out_path: path.clone(),
            hash: true,
            encryption: None,
            format: None,
            sealed: None,
        };
        let r = write_all(vec![job], threads, false, &NoProgress)
            .unwrap()
            .remove(0);
        (std::fs::read(&path).unwrap(), r)
    }

    #[test]
    fn an_archive_extracts_to_the_disk_grown_with_zeros_whatever_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        // 9 MiB and 700 bytes of mostly zeros, data in odd places, the last byte non-zero.
        let mut disk = vec![0u8; (9 << 20) + 700];
        for (i, at) in [0usize, 5000, 4 << 20, (4 << 20) - 1, 8 << 20]
            .iter()
            .enumerate()
        {
            disk[*at..*at + 3000].fill(i as u8 + 1);
        }
        *disk.last_mut().unwrap() = 0x5a;
        let size = 16 << 20;
        let (one, r) = archive(&disk, size, 1, dir.path());
        let (three, _) = archive(&disk, size, 3, dir.path());
        assert_eq!(one, three);
        assert_eq!(
            r.sha256.unwrap(),
            crate::copy::hash::hex(&Sha256::digest(&one))
        );
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        let mut a = tar::Archive::new(&tar_bytes[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.header().entry_type(), tar::EntryType::GNUSparse);
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let mut want = disk.clone();
        want.resize(size as usize, 0);
        assert!(data == want, "the extracted disk differs");
        // Only the data's 4 KiB blocks are stored (six runs of at most two blocks, the last one
        // to a whole tar block).
        assert!(r.stats.copied <= 12 * 4096, "{:?}", r.stats);
        assert_eq!(r.stats.copied + r.stats.zeros + r.stats.holes, size);
    }

    #[test]
    fn an_empty_disk_is_an_archive_of_one_hole() {
        let dir = tempfile::tempdir().unwrap();
        let job = DiskJob {
            name: "/dev/xvdb".into(),
            source: None,
            virtual_size: 1 << 30,
            out_path: dir.path().join("e.tar.gz"),
            hash: true,
            encryption: None,
            format: None,
            sealed: None,
        };
        let r = write_all(vec![job], 2, false, &NoProgress).unwrap();
        assert_eq!(r[0].stats.copied, 0);
        assert!(r[0].file_size < 200, "{}", r[0].file_size);
    }

    #[test]
    fn a_scattered_map_is_bounded_by_merging_the_nearest_segments() {
        let mut s = Segments::default();
        let runs = MAX_SEGMENTS as u64 + 1000;
        for i in 0..runs {
            s.push((i * 3 * ZERO_BLOCK, ZERO_BLOCK));
        }
        assert!(s.list.len() <= MAX_SEGMENTS, "{}", s.list.len());
        // Every run is still covered, in order.
        assert_eq!(s.list[0].0, 0);
        let last = s.list.last().unwrap();
        assert_eq!(last.0 + last.1, (runs - 1) * 3 * ZERO_BLOCK + ZERO_BLOCK);
        assert!(s.list.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }
}
