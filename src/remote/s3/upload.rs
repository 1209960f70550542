//! Uploads of local files to a bucket: parallel multipart uploads whose part size grows with the
//! file so no upload needs more than [`MAX_PARTS`] parts, each part carrying its SHA-256
//! (`x-amz-checksum-sha256`, or `Content-MD5` on a server that refuses SHA-256 checksums). An
//! interrupted upload resumes: the upload still open for the key is found
//! (ListMultipartUploads), its parts listed (ListParts), and only the parts that are missing or
//! differ from the local bytes are sent again.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use base64::Engine as _;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::{block_on, client, error, S3Url};
use crate::error::{Code, Error, Result};

/// The smallest part (and the size below which a file goes in one PUT).
pub(crate) const MIN_PART: u64 = 8 << 20;
/// S3's limit on parts per upload.
pub(crate) const MAX_PARTS: u64 = 10_000;
/// Parts in flight at once unless told (`-j`); the AWS CLI's default `max_concurrent_requests`
/// is 10.
pub(crate) const WORKERS: usize = 8;
/// Parts in flight at once, at most, whatever `-j` says.
const MAX_WORKERS: usize = 64;
/// Memory the parts in flight may take together.
const IN_FLIGHT_BYTES: u64 = 512 << 20;
/// The code of an upload whose bucket is missing: the destination is a bad parameter.
const DEST_MISSING: Code = Code::InvalidParameter;
/// Metadata key recording the whole file's SHA-256 on the object (so a rerun skips it).
pub(crate) const SHA256_META: &str = "kiln-sha256";

/// The part size for a file of `len` bytes: [`MIN_PART`], grown in whole MiB until the file
/// fits in [`MAX_PARTS`] parts.
pub(crate) fn part_size(len: u64) -> u64 {
    let need = len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    need.max(MIN_PART)
}

/// What one file's upload did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Uploaded {
    pub file: String,
    pub bytes: u64,
    pub parts: u64,
    /// Parts found already uploaded (a resumed upload), or the whole file already there.
    pub parts_reused: u64,
    pub bytes_sent: u64,
}

/// How parts prove their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checksum {
    Sha256,
    Md5,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Uploads `path` to `url`, whose content has the SHA-256 `sha256` (hex), `workers` parts at a
/// time; `advance` is told of each part done (sent or reused). An object already at `url` with this SHA-256 is kept.
pub(crate) fn upload_file(
    url: &S3Url,
    path: &Path,
    sha256: &str,
    workers: usize,
    advance: &(dyn Fn(u64) + Sync),
) -> Result<Uploaded> {
    let file = crate::util::safe_fs::open_regular(path)
        .map_err(|e| Error::io(path, "opening to upload", e))?;
    upload_open(url, &file, path, sha256, workers, advance)
}

/// [`upload_file`] of a file already open (`path` names it in messages).
fn upload_open(
    url: &S3Url,
    file: &File,
    path: &Path,
    sha256: &str,
    workers: usize,
    advance: &(dyn Fn(u64) + Sync),
) -> Result<Uploaded> {
    let c = client()?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let mut done = Uploaded {
        file: url.key.rsplit('/').next().unwrap_or_default().to_string(),
        bytes: len,
        ..Uploaded::default()
    };
    if already_there(c, url, len, sha256)? {
        advance(len);
        done.parts = 1;
        done.parts_reused = 1;
        return Ok(done);
    }
    if len <= MIN_PART {
        let mut buf = vec![0u8; len as usize];
        read_part(file, path, 0, &mut buf)?;
        put_small(c, url, buf, sha256)?;
        advance(len);
        done.parts = 1;
        done.bytes_sent = len;
        return Ok(done);
    }
    multipart(c, url, file, path, len, sha256, workers, advance, done)
}

/// Runs `build` with a hook ([`crate::copy::engine::Sealed`]) that uploads each disk file into
/// `prefix` as soon as it is final, while the later ones still copy. When the build succeeds, waits
/// for those uploads (the first failure is the result); when it fails, removes what went up and
/// tells `warn` of anything it could not remove.
pub(crate) fn uploading_while<T>(
    prefix: S3Url,
    warn: &mut dyn FnMut(&str),
    build: impl FnOnce(crate::copy::engine::Sealed, &mut dyn FnMut(&str)) -> Result<T>,
) -> Result<T> {
    let early = Early::start(prefix);
    match build(early.hook(), &mut *warn) {
        Ok(built) => early.finish().map(|_| built),
        Err(e) => {
            for left in early.abandon() {
                warn(&format!("an uploaded disk could not be removed: {left}"));
            }
            Err(e)
        }
    }
}

/// Uploads of disk files as they become final, one file at a time (each in parallel parts) on a
/// thread of its own, into `prefix`. The first failure stops it; [`Early::finish`] returns it.
struct Early {
    prefix: S3Url,
    tx: Option<std::sync::mpsc::Sender<(String, File, PathBuf, String)>>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Uploaded>, Option<Error>)>,
}

impl Early {
    fn start(prefix: S3Url) -> Early {
        let (tx, rx) = std::sync::mpsc::channel::<(String, File, PathBuf, String)>();
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, into) = (cancel.clone(), prefix.clone());
        let thread = std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut failed = None;
            // Drains the channel even after a failure, so no sender ever waits.
            for (name, file, path, sha) in rx {
                if failed.is_some() || stop.load(Ordering::Relaxed) {
                    continue;
                }
                let url = into.child(&name);
                match upload_open(&url, &file, &path, &sha, WORKERS, &|_| {}) {
                    Ok(u) => {
                        done.push(u);
                        crate::util::testhook::checkpoint("uploaded");
                    }
                    Err(e) => failed = Some(e),
                }
            }
            (done, failed)
        });
        Early {
            prefix,
            tx: Some(tx),
            cancel,
            thread,
        }
    }

    /// The engine's hook: queues each hashed disk file (a second descriptor of it).
    fn hook(&self) -> crate::copy::engine::Sealed {
        let tx = self.tx.clone();
        std::sync::Arc::new(move |path: &Path, file: &File, sha: Option<&str>| {
            let (Some(tx), Some(name), Some(sha)) = (&tx, path.file_name(), sha) else {
                return;
            };
            // Not sent here, sent by the push after the build: nothing is lost.
            if let Ok(f) = file.try_clone() {
                let name = name.to_string_lossy().into_owned();
                let _ = tx.send((name, f, path.to_path_buf(), sha.to_string()));
            }
        })
    }

    /// Waits for every queued upload; the files sent, or the first error.
    fn finish(self) -> Result<Vec<Uploaded>> {
        match self.join() {
            (done, None) => Ok(done),
            (_, Some(e)) => Err(e),
        }
    }

    /// The build failed: sends nothing more, waits for the file on its way, and removes what was
    /// sent, so the prefix is empty again for the next try. Returns what could not be removed
    /// (left as a prefix without `SHA256SUMS`: an incomplete image), with the reason.
    fn abandon(self) -> Vec<String> {
        self.cancel.store(true, Ordering::Relaxed);
        let prefix = self.prefix.clone();
        let (done, _) = self.join();
        let mut left = Vec::new();
        for u in done {
            let url = prefix.child(&u.file);
            if let Err(e) = super::delete(&url) {
                left.push(format!("{url}: {}", e.full_message()));
            }
        }
        left
    }

    fn join(mut self) -> (Vec<Uploaded>, Option<Error>) {
        self.tx.take();
        self.thread.join().unwrap_or_else(|_| {
            let e = Error::new(Code::Internal, "the upload thread panicked");
            (Vec::new(), Some(e))
        })
    }
}

/// Whether `url` already holds this file (same size, same recorded SHA-256).
fn already_there(c: &Client, url: &S3Url, len: u64, sha256: &str) -> Result<bool> {
    let r = block_on(c.head_object().bucket(&url.bucket).key(&url.key).send())?;
    match r {
        Ok(h) => Ok(h.content_length() == Some(len as i64)
            && h.metadata()
                .and_then(|m| m.get(SHA256_META))
                .is_some_and(|v| v == sha256)),
        Err(e) => {
            let e = error(e, "checking", url, DEST_MISSING);
            // HEAD cannot tell a missing key from a missing bucket; the upload will.
            if e.code() == DEST_MISSING && e.message().contains("no such object") {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// One PUT of a small object, with its checksum.
pub(crate) fn put_small(c: &Client, url: &S3Url, buf: Vec<u8>, sha256: &str) -> Result<()> {
    let sum = b64(&Sha256::digest(&buf));
    let r = block_on(
        c.put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .checksum_sha256(sum)
            .metadata(SHA256_META, sha256)
            .body(ByteStream::from(buf.clone()))
            .send(),
    )?;
    match r {
        Ok(_) => Ok(()),
        Err(e) if refuses_checksum(&e) => {
            let md5 = b64(&Md5::digest(&buf));
            block_on(
                c.put_object()
                    .bucket(&url.bucket)
                    .key(&url.key)
                    .content_md5(md5)
                    .metadata(SHA256_META, sha256)
                    .body(ByteStream::from(buf))
                    .send(),
            )?
            .map(|_| ())
            .map_err(|e| error(e, "uploading", url, DEST_MISSING))
        }
        Err(e) => Err(error(e, "uploading", url, DEST_MISSING)),
    }
}

/// Whether a server refused a request for its SHA-256 checksum header (it does not know it).
fn refuses_checksum<E: ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    matches!(
        e.code(),
        Some("NotImplemented" | "InvalidArgument" | "InvalidRequest" | "BadDigest")
    )
}

fn read_part(file: &File, path: &Path, at: u64, buf: &mut [u8]) -> Result<()> {
    let n = crate::format::read_full_at(file, buf, at)
        .map_err(|e| Error::io(path, &format!("reading {} bytes at {at}", buf.len()), e))?;
    if n < buf.len() {
        return Err(Error::new(
            Code::SourceChanged,
            format!("{}: shrank while being uploaded", path.display()),
        ));
    }
    Ok(())
}

/// A part the server already holds.
#[derive(Debug, Clone)]
struct Held {
    size: u64,
    etag: String,
    sha256: Option<String>,
}

/// The open multipart upload of `url` (the newest), if any.
fn open_upload(c: &Client, url: &S3Url) -> Result<Option<String>> {
    let r = block_on(
        c.list_multipart_uploads()
            .bucket(&url.bucket)
            .prefix(&url.key)
            .send(),
    )?;
    let out = match r {
        Ok(o) => o,
        // A server without ListMultipartUploads: nothing to resume.
        Err(e) if e.code() == Some("NotImplemented") => return Ok(None),
        Err(e) => return Err(error(e, "listing open uploads", url, DEST_MISSING)),
    };
    Ok(out
        .uploads()
        .iter()
        .filter(|u| u.key() == Some(url.key.as_str()))
        .max_by_key(|u| u.initiated().map(|t| (t.secs(), t.subsec_nanos())))
        .and_then(|u| u.upload_id().map(str::to_string)))
}

/// The parts of upload `id` (at most [`MAX_PARTS`]).
fn held_parts(c: &Client, url: &S3Url, id: &str) -> Result<BTreeMap<i32, Held>> {
    let mut parts = BTreeMap::new();
    let mut marker: Option<String> = None;
    loop {
        let out = block_on(
            c.list_parts()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(id)
                .set_part_number_marker(marker.clone())
                .send(),
        )?
        .map_err(|e| error(e, "listing the parts uploaded", url, DEST_MISSING))?;
        for p in out.parts() {
            let (Some(n), Some(etag)) = (p.part_number(), p.e_tag()) else {
                continue;
            };
            parts.insert(
                n,
                Held {
                    size: p.size().unwrap_or(-1).max(0) as u64,
                    etag: etag.trim_matches('"').to_string(),
                    sha256: p.checksum_sha256().map(str::to_string),
                },
            );
        }
        let next = out.next_part_number_marker().map(str::to_string);
        if out.is_truncated() != Some(true) || next.is_none() || next == marker {
            break;
        }
        if parts.len() as u64 > MAX_PARTS {
            return Err(Error::new(
                Code::IoError,
                format!("{url}: the server lists more than {MAX_PARTS} parts"),
            ));
        }
        marker = next;
    }
    Ok(parts)
}

/// Starts a multipart upload, with SHA-256 part checksums where the server takes them.
fn start_upload(c: &Client, url: &S3Url, sha256: &str) -> Result<(String, Checksum)> {
    let create = |alg: Option<ChecksumAlgorithm>| {
        block_on(
            c.create_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .metadata(SHA256_META, sha256)
                .set_checksum_algorithm(alg)
                .send(),
        )
    };
    let (out, mode) = match create(Some(ChecksumAlgorithm::Sha256))? {
        Ok(o) => (o, Checksum::Sha256),
        Err(e) if refuses_checksum(&e) => (
            create(None)?.map_err(|e| error(e, "starting the upload", url, DEST_MISSING))?,
            Checksum::Md5,
        ),
        Err(e) => return Err(error(e, "starting the upload", url, DEST_MISSING)),
    };
    let id = out.upload_id().map(str::to_string).ok_or_else(|| {
        Error::new(
            Code::IoError,
            format!("{url}: the server gave no upload id"),
        )
    })?;
    Ok((id, mode))
}

/// One part's number and SHA-256 (base64).
struct Part {
    number: i32,
    sha256: String,
}

/// A part as it goes into CompleteMultipartUpload: number, ETag, SHA-256 (base64) where the
/// upload carries them, and whether it was reused from the server's listing rather than sent.
struct Done {
    number: i32,
    etag: String,
    sha256: Option<String>,
    reused: bool,
}

/// One file's multipart upload in progress.
struct Upload<'a> {
    c: &'a Client,
    url: &'a S3Url,
    id: String,
    mode: Checksum,
    file: &'a File,
    path: &'a Path,
    len: u64,
    part: u64,
    workers: usize,
}

impl Upload<'_> {
    /// Sends the parts numbered (from 0) in `which`, `workers` at a time, reusing those in `held`
    /// whose size and checksum match the local bytes. Returns the parts done and the bytes sent.
    fn send(
        &self,
        which: &[u64],
        held: &BTreeMap<i32, Held>,
        advance: &(dyn Fn(u64) + Sync),
    ) -> Result<(Vec<Done>, u64)> {
        let next = AtomicUsize::new(0);
        let sent = AtomicU64::new(0);
        let results: Mutex<Vec<Done>> = Mutex::new(Vec::new());
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.workers.min(which.len()).max(1) {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                            return;
                        }
                        let Some(&i) = which.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return;
                        };
                        let at = i * self.part;
                        let n = self.part.min(self.len - at) as usize;
                        buf.resize(n, 0);
                        let r = read_part(self.file, self.path, at, &mut buf).and_then(|()| {
                            let p = Part {
                                number: i as i32 + 1,
                                sha256: b64(&Sha256::digest(&buf)),
                            };
                            match held.get(&p.number) {
                                Some(h) if h.size == n as u64 && held_matches(h, &p, &buf) => {
                                    Ok(Done {
                                        number: p.number,
                                        etag: h.etag.clone(),
                                        sha256: h.sha256.clone(),
                                        reused: true,
                                    })
                                }
                                _ => {
                                    let etag =
                                        send_part(self.c, self.url, &self.id, &p, self.mode, &buf)?;
                                    sent.fetch_add(n as u64, Ordering::Relaxed);
                                    crate::util::testhook::checkpoint("part");
                                    Ok(Done {
                                        number: p.number,
                                        etag,
                                        sha256: (self.mode == Checksum::Sha256).then_some(p.sha256),
                                        reused: false,
                                    })
                                }
                            }
                        });
                        match r {
                            Ok(done) => {
                                advance(n as u64);
                                if let Ok(mut v) = results.lock() {
                                    v.push(done);
                                }
                            }
                            Err(e) => {
                                if let Ok(mut f) = failure.lock() {
                                    f.get_or_insert(e);
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        Ok((results.into_inner().unwrap_or_default(), sent.into_inner()))
    }
}

#[allow(clippy::too_many_arguments)]
fn multipart(
    c: &Client,
    url: &S3Url,
    file: &File,
    path: &Path,
    len: u64,
    sha256: &str,
    workers: usize,
    advance: &(dyn Fn(u64) + Sync),
    mut done: Uploaded,
) -> Result<Uploaded> {
    let part = part_size(len);
    let count = len.div_ceil(part);
    let resumed = open_upload(c, url)?;
    let (id, held, mode) = match resumed {
        Some(id) => {
            let held = held_parts(c, url, &id)?;
            let mode = if held.values().any(|h| h.sha256.is_none()) {
                Checksum::Md5
            } else {
                Checksum::Sha256
            };
            (id, held, mode)
        }
        None => {
            let (id, mode) = start_upload(c, url, sha256)?;
            (id, BTreeMap::new(), mode)
        }
    };
    let up = Upload {
        c,
        url,
        id,
        mode,
        file,
        path,
        len,
        part,
        workers: workers
            .clamp(1, MAX_WORKERS)
            .min((IN_FLIGHT_BYTES / part).max(1) as usize),
    };
    let all: Vec<u64> = (0..count).collect();
    let (mut parts, mut sent) = up.send(&all, &held, advance)?;
    parts.sort_by_key(|p| p.number);
    match complete(c, url, &up.id, &parts)? {
        Ok(()) => {}
        // Garage 2.5.0 lists a part as uploaded whose data it dropped when the client that sent
        // it was killed as the part finished; completing then fails with InvalidPart. The
        // listing cannot say which part, so every reused part is sent again.
        Err(e) if e.code() == Some("InvalidPart") && parts.iter().any(|p| p.reused) => {
            let again: Vec<u64> = parts
                .iter()
                .filter(|p| p.reused)
                .map(|p| p.number as u64 - 1)
                .collect();
            let (fresh, more) = up.send(&again, &BTreeMap::new(), &|_| {})?;
            sent += more;
            parts.retain(|p| !p.reused);
            parts.extend(fresh);
            parts.sort_by_key(|p| p.number);
            complete(c, url, &up.id, &parts)?
                .map_err(|e| error(e, "completing the upload", url, DEST_MISSING))?;
        }
        Err(e) => return Err(error(e, "completing the upload", url, DEST_MISSING)),
    }
    done.parts = count;
    done.parts_reused = parts.iter().filter(|p| p.reused).count() as u64;
    done.bytes_sent = sent;
    Ok(done)
}

/// Whether a held part has this part's bytes `buf` (its SHA-256, else its ETag as an MD5).
fn held_matches(h: &Held, p: &Part, buf: &[u8]) -> bool {
    match &h.sha256 {
        Some(s) => *s == p.sha256,
        None => h
            .etag
            .eq_ignore_ascii_case(&crate::copy::hash::hex(&Md5::digest(buf))),
    }
}

fn send_part(
    c: &Client,
    url: &S3Url,
    id: &str,
    p: &Part,
    mode: Checksum,
    buf: &[u8],
) -> Result<String> {
    let mut req = c
        .upload_part()
        .bucket(&url.bucket)
        .key(&url.key)
        .upload_id(id)
        .part_number(p.number)
        .body(ByteStream::from(buf.to_vec()));
    req = match mode {
        Checksum::Sha256 => req.checksum_sha256(p.sha256.clone()),
        Checksum::Md5 => req.content_md5(b64(&Md5::digest(buf))),
    };
    let what = format!("uploading part {}", p.number);
    let out = block_on(req.send())?.map_err(|e| error(e, &what, url, DEST_MISSING))?;
    out.e_tag()
        .map(|e| e.trim_matches('"').to_string())
        .ok_or_else(|| {
            Error::new(
                Code::IoError,
                format!("{url}: {what}: no ETag in the answer"),
            )
        })
}

/// Completes upload `id` from `parts` (sorted by number); the server's refusal is returned as is.
fn complete(
    c: &Client,
    url: &S3Url,
    id: &str,
    parts: &[Done],
) -> Result<
    std::result::Result<
        (),
        aws_sdk_s3::error::SdkError<
            aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadError,
            aws_sdk_s3::config::http::HttpResponse,
        >,
    >,
> {
    let parts: Vec<CompletedPart> = parts
        .iter()
        .map(|p| {
            CompletedPart::builder()
                .part_number(p.number)
                .e_tag(format!("\"{}\"", p.etag))
                .set_checksum_sha256(p.sha256.clone())
                .build()
        })
        .collect();
    Ok(block_on(
        c.complete_multipart_upload()
            .bucket(&url.bucket)
            .key(&url.key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send(),
    )?
    .map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_no_upload_needs_more_than_ten_thousand() {
        assert_eq!(part_size(1), MIN_PART);
        assert_eq!(part_size(MIN_PART * MAX_PARTS), MIN_PART);
        for len in [
            MIN_PART * MAX_PARTS + 1,
            1 << 40,
            5 << 40,
            (5 << 40) + 12345,
        ] {
            let p = part_size(len);
            assert!(len.div_ceil(p) <= MAX_PARTS, "{len}: {p}");
            assert_eq!(p % (1 << 20), 0);
        }
    }
}
