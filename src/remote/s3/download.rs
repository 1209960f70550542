//! Reads of whole objects: small ones (manifests, checksum lists) into memory, disk files into
//! local files with parallel ranged GETs (holes left where the object holds zeros), or through
//! SHA-256 without a local copy. Every ranged read is `If-Match` the ETag seen first
//! ([`Object`]), so an object replaced half-way fails instead of mixing two versions.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use sha2::{Digest, Sha256};

use super::{block_on, client, error, Object, S3Url};
use crate::copy::aligned::{AlignedBuf, ALIGN};
use crate::error::{Code, Error, Result};
use crate::format::input::RandomRead;

/// Bytes per ranged GET.
pub(crate) const CHUNK: u64 = 8 << 20;
/// GETs in flight at once: a loopback server answers each in tens of milliseconds, so more
/// requests than cores keep both sides busy (measured in BENCHMARKS.md, "Session 6: the pull
/// rewritten").
const WORKERS: u64 = 16;
/// Chunks fetched but not yet hashed, at most (with [`CHUNK`], 192 MiB of buffers).
const AHEAD: u64 = 24;

/// The whole object `url` if it exists and is at most `limit` bytes; None when it does not exist.
pub(crate) fn get_small(url: &S3Url, limit: u64) -> Result<Option<Vec<u8>>> {
    let c = client()?;
    let r = block_on(c.get_object().bucket(&url.bucket).key(&url.key).send())?;
    let out = match r {
        Ok(o) => o,
        Err(e) => {
            let e = error(e, "reading", url, Code::InvalidImageIdNotFound);
            return match e.code() {
                Code::InvalidImageIdNotFound if e.message().contains("no such object") => Ok(None),
                _ => Err(e),
            };
        }
    };
    if out.content_length().unwrap_or(0) as u64 > limit {
        return Err(Error::new(
            Code::ChecksumMismatch,
            format!("{url}: larger than {limit} bytes; not a file kiln wrote"),
        ));
    }
    let bytes = block_on(out.body.collect())?.map_err(|e| {
        Error::new(
            Code::StorageUnavailable,
            format!("{url}: reading: the answer broke off: {e}"),
        )
    })?;
    Ok(Some(bytes.to_vec()))
}

/// The chunks fetched and not yet hashed, and the hash's progress: what the fetching threads and
/// the hashing thread share.
struct Pipeline {
    /// The next chunk to hash.
    hashed: u64,
    /// Chunks fetched out of order (buffer, length), waiting for their turn.
    ready: BTreeMap<u64, (AlignedBuf, usize)>,
    /// Buffers the hash is done with, for the next fetches.
    free: Vec<AlignedBuf>,
    /// The first failure; every thread stops taking chunks once it is set.
    failure: Option<Error>,
}

/// The error of a download whose shared state a panicking thread left behind.
fn poisoned<T>(_: T) -> Error {
    Error::new(Code::Internal, "download lock poisoned")
}

/// Fetches every [`CHUNK`] of `obj` with [`WORKERS`] ranged GETs in flight and hashes the object
/// (SHA-256, hex) in order on the calling thread as the chunks arrive. `each(index, bytes)` runs
/// on the fetching thread before the chunk is queued for the hash (the download writes it there;
/// `bytes` starts on an [`ALIGN`](crate::copy::aligned::ALIGN) boundary, for `O_DIRECT`);
/// `hashed(index, len)` runs on the hashing thread after the chunk is hashed. At most [`AHEAD`]
/// chunks are held, so a slow hash slows the fetches instead of filling memory.
fn fetch_hashed(
    obj: &Object,
    each: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
    hashed: &mut dyn FnMut(u64, u64),
) -> Result<String> {
    let len = obj
        .len()
        .map_err(|e| Error::new(Code::IoError, e.to_string()))?;
    let count = len.div_ceil(CHUNK);
    let next = AtomicU64::new(0);
    let state = Mutex::new(Pipeline {
        hashed: 0,
        ready: BTreeMap::new(),
        free: Vec::new(),
        failure: None,
    });
    let turn = Condvar::new();
    let lock = || state.lock().map_err(poisoned);
    let fail = |e: Error| {
        if let Ok(mut g) = state.lock() {
            g.failure.get_or_insert(e);
        }
        turn.notify_all();
    };
    let fetch = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return Ok(());
            }
            let mut buf = {
                let mut g = lock()?;
                while i >= g.hashed + AHEAD && g.failure.is_none() {
                    g = turn.wait(g).map_err(poisoned)?;
                }
                if g.failure.is_some() {
                    return Ok(());
                }
                g.free.pop()
            }
            .unwrap_or_else(|| AlignedBuf::zeroed(CHUNK as usize));
            let at = i * CHUNK;
            let n = CHUNK.min(len - at) as usize;
            obj.read_at(&mut buf[..n], at)
                .map_err(|e| Error::io(Path::new(&obj.name()), "reading", e))?;
            each(i, &buf[..n])?;
            lock()?.ready.insert(i, (buf, n));
            turn.notify_all();
        }
    };
    let mut sha = Sha256::new();
    let mut hash = || -> Result<()> {
        for i in 0..count {
            let (buf, n) = {
                let mut g = lock()?;
                loop {
                    if g.failure.is_some() {
                        return Ok(());
                    }
                    if let Some(b) = g.ready.remove(&i) {
                        break b;
                    }
                    g = turn.wait(g).map_err(poisoned)?;
                }
            };
            sha.update(&buf[..n]);
            hashed(i, n as u64);
            let mut g = lock()?;
            g.free.push(buf);
            g.hashed = i + 1;
            drop(g);
            turn.notify_all();
        }
        Ok(())
    };
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(count.max(1)) {
            s.spawn(|| {
                // A fetching thread that panicked would leave the hash waiting for its chunk.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(fetch)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail(e),
                    Err(_) => fail(Error::new(Code::Internal, "a download thread panicked")),
                }
            });
        }
        if let Err(e) = hash() {
            fail(e);
        }
    });
    let g = state.into_inner().map_err(poisoned)?;
    if let Some(e) = g.failure {
        return Err(e);
    }
    if g.hashed != count {
        return Err(Error::new(
            Code::Internal,
            format!("{}: chunks left unhashed", obj.name()),
        ));
    }
    Ok(crate::copy::hash::hex(&sha.finalize()))
}

/// Downloads `url` into the new file `dest` (holes where the object holds zeros), hashing it on
/// the way; `advance` is told of each chunk. Returns the length and the SHA-256 (hex) of what was
/// written.
///
/// Whole chunks are written with `O_DIRECT` where the filesystem allows it (the last, shorter one
/// through the page cache), as `qemu-img convert -t none` does: a buffered write costs far more
/// CPU than the copy itself on a host whose page cache is full (it must reclaim a page for every
/// page written; BENCHMARKS.md, "Session 6: the pull rewritten"), and the closing fsync then has
/// only the tail and the metadata to wait for. Without `O_DIRECT`, writeback of each chunk starts
/// once it is hashed.
pub(crate) fn download_file(
    url: &S3Url,
    dest: &Path,
    advance: &(dyn Fn(u64) + Sync),
) -> Result<(u64, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let obj = Object::open(url)?;
    let len = obj
        .len()
        .map_err(|e| Error::new(Code::IoError, e.to_string()))?;
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| Error::io(dest, "creating", e))?;
    file.set_len(len)
        .map_err(|e| Error::io(dest, "sizing", e))?;
    // A second descriptor on the same file; None where the filesystem refuses O_DIRECT.
    let direct = File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dest)
        .ok();
    let sha = fetch_hashed(
        &obj,
        &|i, buf| {
            if !crate::copy::engine::is_zero(buf) {
                let aligned = buf.len().is_multiple_of(ALIGN)
                    && (buf.as_ptr() as usize).is_multiple_of(ALIGN);
                let r = match &direct {
                    Some(d) if aligned => d.write_all_at(buf, i * CHUNK),
                    _ => file.write_all_at(buf, i * CHUNK),
                };
                // A filesystem may take O_DIRECT at open and refuse the write (EINVAL): write
                // through the page cache then.
                match r {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct.is_some() => {
                        file.write_all_at(buf, i * CHUNK)
                    }
                    r => r,
                }
                .map_err(|e| Error::io(dest, "writing", e))?;
            }
            advance(buf.len() as u64);
            Ok(())
        },
        // On the hashing thread, so that a full device queue stalls the hash, not the GETs.
        &mut |i, n| {
            if direct.is_none() {
                crate::copy::engine::start_writeback(&file, i * CHUNK, n);
            }
        },
    )?;
    file.sync_all()
        .map_err(|e| Error::io(dest, "flushing", e))?;
    Ok((len, sha))
}

/// The SHA-256 (hex) of object `url`, streamed: chunks are fetched in parallel and hashed in
/// order, never written anywhere.
pub(crate) fn hash_object(url: &S3Url, advance: &(dyn Fn(u64) + Sync)) -> Result<String> {
    let obj = Object::open(url)?;
    fetch_hashed(&obj, &|_, _| Ok(()), &mut |_, n| advance(n))
}
