//! An object read by offset: the [`RandomRead`] behind `s3://` sources. Each read is one ranged
//! GET (from whichever copy thread asks), conditional on the ETag the object had when it was
//! opened, so an object rewritten during a copy fails the read with `InvalidSnapshot.Changed`
//! instead of mixing two versions. Small reads (format metadata: headers, tables, compressed
//! clusters) go through a small block cache, so a reader's many small reads cost few requests.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;

use super::{block_on, client, error, S3Url};
use crate::error::{Code, Error, Result};
use crate::format::input::RandomRead;

/// Reads of at most this many bytes go through the block cache.
const CACHED_READ: usize = 64 << 10;
/// The cache's block: one GET fetches this much around a small read.
const BLOCK: u64 = 256 << 10;
/// Blocks kept (16 MiB in all), least recently used dropped first.
const BLOCKS: usize = 64;
/// Tries of a read whose body broke off (the SDK retries failed requests itself, not a
/// response body that stops half-way).
const BODY_TRIES: u32 = 4;

/// Cached blocks by index, most recently used first.
type Blocks = VecDeque<(u64, Arc<[u8]>)>;

pub(crate) struct Object {
    url: S3Url,
    client: &'static Client,
    size: u64,
    /// The ETag when opened: every read is `If-Match` it.
    etag: Option<String>,
    cache: Mutex<Blocks>,
}

/// What an object is, as far as telling a change goes: its size and ETag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectStamp {
    pub(crate) size: u64,
    pub(crate) etag: Option<String>,
}

impl Object {
    /// Opens `url` for reading: one HEAD for its size and ETag. A missing bucket or key is
    /// `InvalidSnapshotId.NotFound`, saying which.
    pub(crate) fn open(url: &S3Url) -> Result<Object> {
        let stamp = head(url)?;
        Ok(Object {
            url: url.clone(),
            client: client()?,
            size: stamp.size,
            etag: stamp.etag,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// Its name, `s3://BUCKET/KEY`.
    pub(crate) fn name(&self) -> String {
        self.url.to_string()
    }

    /// Fills `buf` from `offset` with one ranged GET (retried when the body breaks off).
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            match block_on(self.get_range(offset, buf))? {
                Err(e) if e.code() == Code::StorageUnavailable && tries < BODY_TRIES => {
                    std::thread::sleep(Duration::from_millis(100 << tries));
                }
                other => return other,
            }
        }
    }

    async fn get_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let last = offset + buf.len() as u64 - 1;
        let what = format!("reading {} bytes at offset {offset}", buf.len());
        let out = self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(&self.url.key)
            .range(format!("bytes={offset}-{last}"))
            .set_if_match(self.etag.clone())
            .send()
            .await
            .map_err(|e| error(e, &what, &self.url, Code::SourceChanged))?;
        let mut body = out.body;
        let mut done = 0usize;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            Error::new(
                Code::StorageUnavailable,
                format!("{}: {what}: the answer broke off: {e}", self.url),
            )
        })? {
            let end = done + chunk.len();
            if end > buf.len() {
                return Err(self.short(&what, end));
            }
            buf[done..end].copy_from_slice(&chunk);
            done = end;
        }
        if done != buf.len() {
            return Err(self.short(&what, done));
        }
        Ok(())
    }

    fn short(&self, what: &str, got: usize) -> Error {
        Error::new(
            Code::SourceChanged,
            format!(
                "{}: {what}: the server sent {got} bytes; the object is no longer {} bytes long",
                self.url, self.size
            ),
        )
    }

    /// A small read, served from cached blocks.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / BLOCK;
            let block = self.block(index)?;
            let at = (pos - index * BLOCK) as usize;
            let n = (block.len() - at).min((end - pos) as usize);
            let dst = (pos - offset) as usize;
            buf[dst..dst + n].copy_from_slice(&block[at..at + n]);
            pos += n as u64;
        }
        Ok(())
    }

    fn lock_cache(&self) -> Result<std::sync::MutexGuard<'_, Blocks>> {
        self.cache
            .lock()
            .map_err(|_| Error::new(Code::Internal, "object cache lock poisoned"))
    }

    fn block(&self, index: u64) -> Result<Arc<[u8]>> {
        {
            let mut cache = self.lock_cache()?;
            if let Some(i) = cache.iter().position(|(k, _)| *k == index) {
                let hit = cache.remove(i).expect("index found above");
                let data = hit.1.clone();
                cache.push_front(hit);
                return Ok(data);
            }
        }
        let start = index * BLOCK;
        let len = BLOCK.min(self.size - start) as usize;
        let mut data = vec![0u8; len];
        self.fetch(start, &mut data)?;
        let data: Arc<[u8]> = data.into();
        let mut cache = self.lock_cache()?;
        cache.push_front((index, data.clone()));
        cache.truncate(BLOCKS);
        Ok(data)
    }
}

impl RandomRead for Object {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min((self.size - offset) as usize);
        let buf = &mut buf[..n];
        let r = if n <= CACHED_READ {
            self.read_cached(buf, offset)
        } else {
            self.fetch(offset, buf)
        };
        r.map(|()| n).map_err(io::Error::other)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// Removes `url`; a missing object is fine.
pub(crate) fn delete(url: &S3Url) -> Result<()> {
    let c = client()?;
    let r = block_on(c.delete_object().bucket(&url.bucket).key(&url.key).send())?;
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = error(e, "deleting", url, Code::InvalidImageIdNotFound);
            if e.code() == Code::InvalidImageIdNotFound && e.message().contains("no such object") {
                return Ok(());
            }
            Err(e)
        }
    }
}

/// An object's size and ETag (one HEAD); a 404 says whether the bucket or the key is missing.
pub(crate) fn head(url: &S3Url) -> Result<ObjectStamp> {
    let c = client()?;
    let r = block_on(c.head_object().bucket(&url.bucket).key(&url.key).send())?;
    let out = match r {
        Ok(out) => out,
        Err(e) => {
            let e = error(e, "reading its size", url, Code::SnapshotNotFound);
            if e.code() != Code::SnapshotNotFound {
                return Err(e);
            }
            let bucket = block_on(c.head_bucket().bucket(&url.bucket).send())?;
            let why = match bucket {
                Ok(_) => "no such object in the bucket",
                Err(_) => "the bucket does not exist (or is not visible with these credentials)",
            };
            return Err(Error::new(
                Code::SnapshotNotFound,
                format!("{url}: {why}; check the snapshot's name"),
            ));
        }
    };
    let size = out
        .content_length()
        .and_then(|l| u64::try_from(l).ok())
        .ok_or_else(|| {
            Error::new(
                Code::IoError,
                format!("{url}: the server gave no valid Content-Length"),
            )
        })?;
    Ok(ObjectStamp {
        size,
        etag: out.e_tag().map(str::to_string),
    })
}
