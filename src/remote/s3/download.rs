//! Reads of whole objects: small ones (manifests, checksum lists) into memory, disk files into
//! local files with parallel ranged GETs (holes left where the object holds zeros), or through
//! SHA-256 without a local copy. Every ranged read is `If-Match` the ETag seen first
//! ([`Object`]), so an object replaced half-way fails instead of mixing two versions.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{block_on, client, error, Object, S3Url};
use crate::error::{Code, Error, Result};
use crate::format::input::RandomRead;

/// Bytes per ranged GET.
const CHUNK: u64 = 16 << 20;
/// GETs in flight at once.
const WORKERS: u64 = 8;

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

/// Runs `each(chunk index, bytes)` over every [`CHUNK`] of `obj` on [`WORKERS`] threads;
/// `failed` is set as soon as one fails (the others stop taking chunks).
fn chunks(
    obj: &Object,
    failed: &AtomicBool,
    each: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
) -> Result<()> {
    let len = obj
        .len()
        .map_err(|e| Error::new(Code::IoError, e.to_string()))?;
    let count = len.div_ceil(CHUNK);
    let next = AtomicU64::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(count.max(1)) {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let at = i * CHUNK;
                    buf.resize(CHUNK.min(len - at) as usize, 0);
                    let r = obj
                        .read_at(&mut buf, at)
                        .map_err(|e| Error::io(Path::new(&obj.name()), "reading", e))
                        .and_then(|_| each(i, &buf));
                    if let Err(e) = r {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    match failure.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Downloads `url` into the new file `dest` (holes where the object holds zeros); `advance` is
/// told of each chunk. Returns the length.
pub(crate) fn download_file(
    url: &S3Url,
    dest: &Path,
    advance: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
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
    chunks(&obj, &AtomicBool::new(false), &|i, buf| {
        if buf.iter().any(|&b| b != 0) {
            file.write_all_at(buf, i * CHUNK)
                .map_err(|e| Error::io(dest, "writing", e))?;
        }
        advance(buf.len() as u64);
        Ok(())
    })?;
    file.sync_all()
        .map_err(|e| Error::io(dest, "flushing", e))?;
    Ok(len)
}

/// The SHA-256 (hex) of object `url`, streamed: chunks are fetched in parallel and hashed in
/// order, never written anywhere.
pub(crate) fn hash_object(url: &S3Url, advance: &(dyn Fn(u64) + Sync)) -> Result<String> {
    let obj = Object::open(url)?;
    let state = Mutex::new((Sha256::new(), 0u64, std::collections::BTreeMap::new()));
    let ready = std::sync::Condvar::new();
    let failed = AtomicBool::new(false);
    chunks(&obj, &failed, &|i, buf| {
        let mut g = state
            .lock()
            .map_err(|_| Error::new(Code::Internal, "hash lock poisoned"))?;
        // Hold at most WORKERS chunks out of order: wait for this one's turn otherwise.
        while i >= g.1 + WORKERS {
            if failed.load(Ordering::Relaxed) {
                return Err(Error::new(Code::IoError, "another read failed"));
            }
            g = ready
                .wait_timeout(g, std::time::Duration::from_millis(100))
                .map_err(|_| Error::new(Code::Internal, "hash lock poisoned"))?
                .0;
        }
        g.2.insert(i, buf.to_vec());
        loop {
            let turn = g.1;
            let Some(b) = g.2.remove(&turn) else {
                break;
            };
            g.0.update(&b);
            g.1 += 1;
        }
        ready.notify_all();
        advance(buf.len() as u64);
        Ok(())
    })?;
    let (h, _, rest) = state
        .into_inner()
        .map_err(|_| Error::new(Code::Internal, "hash lock poisoned"))?;
    if !rest.is_empty() {
        return Err(Error::new(
            Code::Internal,
            format!("{url}: chunks left unhashed"),
        ));
    }
    Ok(crate::copy::hash::hex(&h.finalize()))
}
