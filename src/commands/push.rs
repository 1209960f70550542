//! `kiln push IMAGE_ID|DIR s3://BUCKET/PREFIX/`, `kiln pull s3://BUCKET/PREFIX/ DIR`, and
//! `kiln verify s3://BUCKET/PREFIX/`: images in a bucket ([`crate::remote::s3`]).
//!
//! An image in a bucket is its directory's files under one prefix. The disks go first (parallel
//! multipart uploads, resumed when a push was interrupted), then `manifest.json`, then
//! `SHA256SUMS`: a prefix without `SHA256SUMS` is an incomplete image, and pull and verify refuse
//! it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::commands::target;
use crate::copy::progress::{self, ProgressMode};
use crate::error::{Code, Error, Result};
use crate::image::verify::{Listing, VerifyReport};
use crate::remote::s3::{download, upload, S3Url};

/// The files uploaded last, in this order.
const LAST: [&str; 2] = ["manifest.json", "SHA256SUMS"];

/// The files of an image other than [`LAST`], in listing order.
fn disk_files(listing: &Listing) -> Vec<&String> {
    listing
        .order
        .iter()
        .filter(|n| !LAST.contains(&n.as_str()))
        .collect()
}

/// The largest manifest or checksum list read from a bucket.
const MAX_LIST_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct PushRequest {
    /// An ImageId in the store, or an image directory.
    pub(crate) image: String,
    /// `s3://BUCKET/PREFIX/`.
    pub(crate) destination: String,
    pub(crate) progress: ProgressMode,
    /// Parts in flight at once (default [`upload::WORKERS`]).
    pub(crate) threads: Option<usize>,
}

/// What a push or pull moved, and how fast.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TransferOutcome {
    pub image_id: String,
    pub source: String,
    pub destination: String,
    pub files: Vec<upload::Uploaded>,
    /// Bytes of every file.
    pub bytes: u64,
    /// Bytes that went over the wire (less than `bytes` when a push resumed).
    pub bytes_transferred: u64,
    pub seconds: f64,
    /// `bytes_transferred / seconds`.
    pub bytes_per_second: u64,
}

/// The prefix of an image in a bucket: `s3://BUCKET/PREFIX/` parsed, the key ending in `/`.
pub(crate) fn image_prefix(s: &str) -> Result<S3Url> {
    let mut u = S3Url::parse(s, true)?.ok_or_else(|| {
        Error::new(
            Code::InvalidParameter,
            format!("'{s}' is not s3://BUCKET/PREFIX/"),
        )
    })?;
    if !u.key.is_empty() && !u.key.ends_with('/') {
        u.key.push('/');
    }
    Ok(u)
}

/// The image's listing at `prefix`: an error when it has no `SHA256SUMS` (never pushed, or
/// a push that did not finish) or no manifest.
fn remote_listing(prefix: &S3Url) -> Result<(Listing, Vec<u8>, Vec<u8>)> {
    let incomplete = |what: &str| {
        Error::new(
            Code::InvalidImageIdNotFound,
            format!("{prefix}: no {what}: not an image, or one whose push did not finish (run the push again)"),
        )
    };
    let sums = download::get_small(&prefix.child("SHA256SUMS"), MAX_LIST_BYTES)?
        .ok_or_else(|| incomplete("SHA256SUMS"))?;
    let manifest = download::get_small(&prefix.child("manifest.json"), MAX_LIST_BYTES)?
        .ok_or_else(|| incomplete("manifest.json"))?;
    let l = Listing::parse(
        &sums,
        &prefix.child("SHA256SUMS").to_string(),
        &manifest,
        &prefix.child("manifest.json").to_string(),
    )?;
    if let Some(bad) = l.order.iter().find(|n| !Listing::name_ok(n)) {
        return Err(Error::new(
            Code::ChecksumMismatch,
            format!("{prefix}: SHA256SUMS names '{bad}', outside the image"),
        ));
    }
    Ok((l, sums, manifest))
}

/// Refuses a prefix that holds an image (a manifest), unless it is image `id`'s.
fn check_empty_or(prefix: &S3Url, id: Option<&str>) -> Result<()> {
    if let Some(theirs) = download::get_small(&prefix.child("manifest.json"), MAX_LIST_BYTES)? {
        let same = crate::image::manifest::Manifest::from_json(&theirs)
            .is_ok_and(|m| Some(m.attributes.image_id.as_str()) == id);
        if !same {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("{prefix} holds another image; push to an empty prefix (or delete that image's objects first)"),
            ));
        }
    }
    Ok(())
}

/// Refuses a prefix that holds an image already.
pub(crate) fn check_empty(prefix: &S3Url) -> Result<()> {
    check_empty_or(prefix, None)
}

fn finish(
    image_id: String,
    source: String,
    destination: String,
    files: Vec<upload::Uploaded>,
    started: Instant,
) -> TransferOutcome {
    let bytes = files.iter().map(|f| f.bytes).sum();
    let sent: u64 = files.iter().map(|f| f.bytes_sent).sum();
    let seconds = started.elapsed().as_secs_f64();
    TransferOutcome {
        image_id,
        source,
        destination,
        files,
        bytes,
        bytes_transferred: sent,
        seconds,
        bytes_per_second: (sent as f64 / seconds.max(1e-6)) as u64,
    }
}

/// Pushes an image to a bucket. `store` is the global `--store`, used for an ImageId.
pub fn push(req: &PushRequest, store: Option<&Path>) -> Result<TransferOutcome> {
    let started = Instant::now();
    let prefix = image_prefix(&req.destination)?;
    let dir = target::image_dir(&req.image, store)?;
    let read = |name: &str| {
        let p = dir.join(name);
        crate::util::safe_fs::read_regular(&p).map_err(|e| Error::io(&p, "reading", e))
    };
    let (sums, manifest) = (read("SHA256SUMS")?, read("manifest.json")?);
    let listing = Listing::parse(&sums, "SHA256SUMS", &manifest, "manifest.json")?;
    let id = listing.manifest.attributes.image_id.clone();
    check_empty_or(&prefix, Some(&id))?;
    // manifest.json and SHA256SUMS go last, below.
    let disks = disk_files(&listing);
    let mut sizes = Vec::new();
    for name in &disks {
        let p = dir.join(name);
        let len = std::fs::metadata(&p)
            .map_err(|e| Error::io(&p, "reading metadata of", e))?
            .len();
        sizes.push(((*name).clone(), len));
    }
    let reporter = progress::reporter(req.progress, &sizes);
    let mut files = Vec::new();
    for (i, name) in disks.iter().enumerate() {
        let sha = listing
            .expected
            .get(name.as_str())
            .cloned()
            .unwrap_or_default();
        let up = upload::upload_file(
            &prefix.child(name),
            &dir.join(name),
            &sha,
            req.threads.unwrap_or(upload::WORKERS),
            &|n| reporter.advance(i, n),
        )?;
        reporter.disk_done(i, &crate::copy::stats::CopyStats::default());
        files.push(up);
    }
    drop(reporter);
    // Last, in this order: an image is complete once its SHA256SUMS is there.
    let c = crate::remote::s3::client()?;
    for (name, bytes) in LAST.into_iter().zip([manifest, sums]) {
        let sha = crate::copy::hash::hex(&crate::request::digest::sha256_of(&bytes));
        let len = bytes.len() as u64;
        upload::put_small(c, &prefix.child(name), bytes, &sha)?;
        files.push(upload::Uploaded {
            file: name.to_string(),
            bytes: len,
            parts: 1,
            parts_reused: 0,
            bytes_sent: len,
        });
    }
    Ok(finish(
        id,
        std::path::absolute(&dir)
            .unwrap_or(dir)
            .display()
            .to_string(),
        prefix.to_string(),
        files,
        started,
    ))
}

#[derive(Debug, Clone)]
pub struct PullRequest {
    pub(crate) source: String,
    /// A directory that does not exist yet.
    pub(crate) directory: PathBuf,
    pub(crate) progress: ProgressMode,
}

/// Downloads an image from a bucket into a new directory, checking every file's SHA-256 against
/// `SHA256SUMS` before the directory appears (it is built beside it and renamed into place).
pub fn pull(req: &PullRequest) -> Result<TransferOutcome> {
    let started = Instant::now();
    let prefix = image_prefix(&req.source)?;
    let (listing, sums, manifest) = remote_listing(&prefix)?;
    let dir = &req.directory;
    if dir.exists() {
        return Err(Error::new(
            Code::InvalidOutputDir,
            format!(
                "{} already exists; pull into a new directory",
                dir.display()
            ),
        ));
    }
    let name = dir.file_name().ok_or_else(|| {
        Error::new(
            Code::InvalidParameter,
            format!("{}: not a directory name", dir.display()),
        )
    })?;
    let staging = dir.with_file_name(format!(
        ".{}.kiln-pull-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, "creating", e))?;
    let r = pull_into(&prefix, &listing, &staging, req.progress).and_then(|mut files| {
        for (n, b) in LAST.into_iter().zip([&manifest, &sums]) {
            files.push(write_list(&prefix, &listing, &staging, n, b)?);
        }
        std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, "renaming into place", e))?;
        Ok(files)
    });
    let files = match r {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    Ok(finish(
        listing.manifest.attributes.image_id.clone(),
        prefix.to_string(),
        std::path::absolute(dir)
            .unwrap_or(dir.clone())
            .display()
            .to_string(),
        files,
        started,
    ))
}

/// Writes `manifest.json` or `SHA256SUMS` (`bytes`) into the pulled image, the manifest checked
/// against `SHA256SUMS` first.
fn write_list(
    prefix: &S3Url,
    listing: &Listing,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<upload::Uploaded> {
    let sha = crate::copy::hash::hex(&crate::request::digest::sha256_of(bytes));
    if name != "SHA256SUMS" && listing.expected.get(name) != Some(&sha) {
        return Err(Error::new(
            Code::ChecksumMismatch,
            format!(
                "{}: its SHA-256 {sha} is not the one SHA256SUMS lists; nothing was kept",
                prefix.child(name)
            ),
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, "writing", e))?;
    let len = bytes.len() as u64;
    Ok(upload::Uploaded {
        file: name.to_string(),
        bytes: len,
        parts: 1,
        parts_reused: 0,
        bytes_sent: len,
    })
}

fn pull_into(
    prefix: &S3Url,
    listing: &Listing,
    dir: &Path,
    mode: ProgressMode,
) -> Result<Vec<upload::Uploaded>> {
    let disks = disk_files(listing);
    let mut sizes = Vec::new();
    for name in &disks {
        let size = crate::remote::s3::head(&prefix.child(name))?.size;
        sizes.push(((*name).clone(), size));
    }
    let reporter = progress::reporter(mode, &sizes);
    let mut files = Vec::new();
    for (i, name) in disks.iter().enumerate() {
        let path = dir.join(name);
        let (len, got) =
            download::download_file(&prefix.child(name), &path, &|n| reporter.advance(i, n))?;
        if listing.expected.get(name.as_str()) != Some(&got) {
            return Err(Error::new(
                Code::ChecksumMismatch,
                format!(
                    "{}: its SHA-256 {got} is not the one SHA256SUMS lists; nothing was kept",
                    prefix.child(name)
                ),
            ));
        }
        reporter.disk_done(i, &crate::copy::stats::CopyStats::default());
        files.push(upload::Uploaded {
            file: name.to_string(),
            bytes: len,
            parts: len.div_ceil(download::CHUNK),
            parts_reused: 0,
            bytes_sent: len,
        });
    }
    Ok(files)
}

/// `kiln verify s3://BUCKET/PREFIX/`: every file hashed as it streams from the bucket.
pub(crate) fn verify_remote(source: &str, mode: ProgressMode) -> Result<VerifyReport> {
    let prefix = image_prefix(source)?;
    let (listing, _, _) = remote_listing(&prefix)?;
    let mut sizes = Vec::new();
    for name in &listing.order {
        let size = crate::remote::s3::head(&prefix.child(name)).map_or(0, |s| s.size);
        sizes.push((name.clone(), size));
    }
    Ok(
        listing.check(prefix.to_path(), &sizes, mode, &|i, name, reporter| {
            download::hash_object(&prefix.child(name), &|n| reporter.advance(i, n))
                .map_err(|e| e.message().to_string())
        }),
    )
}
