//! The image store: where `kiln create` puts images when no `--output-dir` is given, and what
//! `describe`, `delete` and `verify` read.
//!
//! Layout of a store `STORE` (`--store`, `$KILN_STORE`, `$XDG_DATA_HOME/kiln` or
//! `~/.local/share/kiln`):
//!
//! ```text
//! STORE/.lock                    store-wide lock: held (flock) around "check name and token, write
//!                                the Creating record", and around delete, so two creates never both
//!                                pass the uniqueness checks
//! STORE/records/<ImageId>.json   the status record (ImageId, ImageName, Status, Progress, ClientToken,
//!                                RequestDigest, ...), replaced atomically (write a temporary file,
//!                                rename)
//! STORE/locks/<ImageId>.lock     held (flock) by the creating process for its whole life
//! STORE/images/<ImageId>/        the published image (manifest.json, SHA256SUMS, disks), renamed into
//!                                place from a hidden STORE/images/.kiln-<ImageId>-*.tmp staging dir
//! ```
//!
//! A store may also be a prefix in a bucket shared by many hosts (`--store s3://BUCKET/PREFIX`):
//! [`open`] tells the two apart, and [`crate::remote::s3::store`] keeps that one, with the same
//! [`Record`]s, conditional-write claims in place of the locks and a lease in place of the
//! creator's lock; a create in either holds a [`Creating`].
//!
//! Status is derived, not trusted: a record saying `Creating` whose lock file can be locked belongs
//! to a creator that died (error, crash, kill -9, power loss), so it reads as `CreateFailed`. An
//! image is `Available` only once its directory was renamed into place and its record rewritten.
//! Reading the store (describe, dry runs) never writes to it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::detect::Report;
use crate::error::{Code, Error, Result};
use crate::image::attributes::{ImageAttributes, Status};
use crate::image::manifest::DiskRecord;
use crate::util::safe_fs;

/// One image's status record, in the API's field names (what `describe --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Record {
    /// ImageId, ImageName, ImageType, ..., Tags: what the manifest says too.
    #[serde(flatten)]
    pub(crate) attributes: ImageAttributes,
    pub(crate) status: Status,
    /// `"0%"` to `"100%"`, as the API spells it.
    pub(crate) progress: String,
    #[serde(default)]
    pub(crate) client_token: Option<String>,
    /// SHA-256 of the normalised request, for idempotency.
    pub(crate) request_digest: String,
    pub(crate) creation_time: String,
    /// Nanoseconds since the epoch at creation, to order images created in the same second.
    #[serde(rename = "CreationTimeNanos", default)]
    pub(crate) creation_nanos: u128,
    /// The creating process.
    #[serde(default)]
    pub(crate) pid: u32,
    /// Sum of the disks' sizes in GiB (known once Available).
    #[serde(rename = "Size", default)]
    pub(crate) size_gib: u64,
    /// The image directory, once Available.
    #[serde(default)]
    pub(crate) directory: Option<PathBuf>,
    /// The manifest's disks, once Available.
    #[serde(rename = "DiskDeviceMappings", default)]
    pub(crate) disks: Vec<DiskRecord>,
    /// The manifest's image check, once Available (`--detect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) detection: Option<Report>,
    /// Why a create failed, when kiln saw it fail (a killed create has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error_message: Option<String>,
    /// A Creating record in a bucket store ([`crate::remote::s3::store`]): when the creator's
    /// lease ends unless it renews it (RFC 3339). Local records have none (their creator holds a
    /// lock instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lease_expires: Option<String>,
}

/// The shared attributes read as the record's own fields (`record.image_name`), as they are in its
/// JSON.
impl std::ops::Deref for Record {
    type Target = ImageAttributes;
    fn deref(&self) -> &ImageAttributes {
        &self.attributes
    }
}

impl std::ops::DerefMut for Record {
    fn deref_mut(&mut self) -> &mut ImageAttributes {
        &mut self.attributes
    }
}

/// The store directory: `flag`, else `$KILN_STORE`, else `$XDG_DATA_HOME/kiln`, else
/// `~/.local/share/kiln`. An `s3://BUCKET/PREFIX` store is returned as given (see [`open`]).
pub(crate) fn locate(flag: Option<&Path>) -> Result<PathBuf> {
    locate_relative(flag).map(|p| {
        if crate::remote::s3::is_remote(&p) {
            return p;
        }
        std::path::absolute(&p).unwrap_or(p)
    })
}

/// A located store: a directory, or a prefix in a bucket shared by many hosts.
pub(crate) enum Located {
    Local(Store),
    Bucket(crate::remote::s3::store::BucketStore),
}

/// The store `flag` (or the environment) names, opened for reading: nothing is written.
pub(crate) fn open(flag: Option<&Path>) -> Result<Located> {
    let root = locate(flag)?;
    match crate::remote::s3::store::BucketStore::from_path(&root)? {
        Some(b) => Ok(Located::Bucket(b)),
        None => Ok(Located::Local(Store::at(root))),
    }
}

impl Located {
    /// Every record with its real status, oldest first.
    pub(crate) fn list(&self) -> Result<Vec<Record>> {
        match self {
            Located::Local(s) => s.list(),
            Located::Bucket(b) => b.list(),
        }
    }

    /// Removes images (see [`Store::delete`]).
    pub(crate) fn delete(&self, ids: &[String]) -> Result<Vec<Record>> {
        match self {
            Located::Local(s) => s.delete(ids),
            Located::Bucket(b) => b.delete(ids),
        }
    }
}

fn locate_relative(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("KILN_STORE") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = env("XDG_DATA_HOME") {
        return Ok(PathBuf::from(p).join("kiln"));
    }
    if let Some(h) = env("HOME") {
        return Ok(PathBuf::from(h).join(".local/share/kiln"));
    }
    Err(Error::new(
        Code::MissingParameter,
        "no image store: give --store DIR or set KILN_STORE (HOME is not set either)",
    ))
}

/// True for `m-` followed by 20 lowercase letters and digits.
pub(crate) fn is_image_id(s: &str) -> bool {
    s.len() == 22
        && s.starts_with("m-")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    root: PathBuf,
}

/// The store-wide lock, released on drop.
pub(crate) struct StoreLock {
    _lock: Option<Flock<File>>,
}

/// What the store says about a create request's token and name.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Go ahead.
    New,
    /// The same token and the same request: this image, nothing to do.
    Existing(Box<Record>),
}

impl Store {
    pub(crate) fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub(crate) fn image_dir(&self, id: &str) -> PathBuf {
        self.images_dir().join(id)
    }

    fn records_dir(&self) -> PathBuf {
        self.root.join("records")
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.records_dir().join(format!("{id}.json"))
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.locks_dir().join(format!("{id}.lock"))
    }

    /// Creates the store's directories (only writers call this).
    pub(crate) fn ensure(&self) -> Result<()> {
        self.check_layout()?;
        for d in [self.images_dir(), self.records_dir(), self.locks_dir()] {
            fs::create_dir_all(&d).map_err(|e| Error::io(&d, "creating the store directory", e))?;
        }
        Ok(())
    }

    /// Refuses a store whose own directories were replaced by symlinks (or files): every path kiln
    /// builds below the root goes through them. Files inside are opened with `O_NOFOLLOW` or
    /// created with `O_EXCL`; image ids are checked before they become part of a path.
    pub(crate) fn check_layout(&self) -> Result<()> {
        for d in [self.images_dir(), self.records_dir(), self.locks_dir()] {
            safe_fs::check_real_dir(&d)?;
        }
        Ok(())
    }

    /// The directory of an existing image, refused when it is a symlink.
    pub(crate) fn checked_image_dir(&self, id: &str) -> Result<PathBuf> {
        if !is_image_id(id) {
            return Err(not_found(id));
        }
        self.check_layout()?;
        let dir = self.image_dir(id);
        safe_fs::check_real_dir(&dir)?;
        Ok(dir)
    }

    /// Takes the store-wide lock, waiting for other kiln processes. Creates the lock file.
    pub(crate) fn lock(&self) -> Result<StoreLock> {
        self.ensure()?;
        let path = self.root.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::io(&path, "opening the store lock", e))?;
        let l = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| {
            Error::io(
                &path,
                "locking the store",
                io::Error::from_raw_os_error(e as i32),
            )
        })?;
        Ok(StoreLock { _lock: Some(l) })
    }

    /// Every record, with its status as it really is (a dead creator's Creating reads CreateFailed),
    /// oldest first. A store that does not exist is empty.
    pub(crate) fn list(&self) -> Result<Vec<Record>> {
        self.check_layout()?;
        let dir = self.records_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&dir, "listing the store", e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(&dir, "listing the store", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !is_image_id(id) {
                continue;
            }
            if let Some(r) = self.get(id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.creation_nanos, &a.image_id).cmp(&(b.creation_nanos, &b.image_id)));
        Ok(out)
    }

    /// One record with its real status; None when there is no such image.
    pub(crate) fn get(&self, id: &str) -> Result<Option<Record>> {
        let Some(mut r) = self.read_record(id)? else {
            return Ok(None);
        };
        if r.status == Status::Creating && !self.creator_alive(id)? {
            // The lock is free: either the creator died, or it just finished. Read again.
            match self.read_record(id)? {
                Some(again) if again.status != Status::Creating => r = again,
                Some(_) => r.status = Status::CreateFailed,
                None => return Ok(None),
            }
        }
        Ok(Some(r))
    }

    fn read_record(&self, id: &str) -> Result<Option<Record>> {
        if !is_image_id(id) {
            return Ok(None);
        }
        let path = self.record_path(id);
        let bytes = match safe_fs::read_regular(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "reading the image record", e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::new(
                Code::IoError,
                format!(
                    "{}: not a kiln image record ({e}); delete the file to drop the image",
                    path.display()
                ),
            )
        })
    }

    /// Whether a process holds the image's creation lock (read-only probe: never creates files).
    fn creator_alive(&self, id: &str) -> Result<bool> {
        let path = self.lock_path(id);
        let f = match safe_fs::open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(&path, "opening the image lock", e)),
        };
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(_released_on_drop) => Ok(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
            Err((_, e)) => Err(Error::io(
                &path,
                "probing the image lock",
                io::Error::from_raw_os_error(e as i32),
            )),
        }
    }

    /// The idempotency and uniqueness rules, read-only (callers hold the store lock to act on the
    /// answer): the same token and digest → Existing; the same token, another digest →
    /// IdempotenceParamNotMatch; a name used by an image that is not CreateFailed → Duplicated.
    /// A token whose image is CreateFailed may be used again.
    pub(crate) fn admit(&self, name: &str, token: Option<&str>, digest: &str) -> Result<Admission> {
        let records = self.list()?;
        if let Some(t) = token {
            if let Some(r) = records
                .iter()
                .rev()
                .find(|r| r.client_token.as_deref() == Some(t) && r.status != Status::CreateFailed)
            {
                if r.request_digest == digest {
                    return Ok(Admission::Existing(Box::new(r.clone())));
                }
                return Err(Error::new(
                    Code::IdempotenceParamNotMatch,
                    format!(
                        "client token '{t}' was used for image {} with different parameters; \
                         use a new token, or repeat the original request exactly",
                        r.image_id
                    ),
                ));
            }
        }
        if let Some(r) = records
            .iter()
            .find(|r| r.image_name == name && r.status != Status::CreateFailed)
        {
            return Err(Error::new(
                Code::InvalidImageNameDuplicated,
                format!(
                    "an image named '{name}' already exists ({}, {}); pick another name or `kiln delete {}`",
                    r.image_id, r.status, r.image_id
                ),
            ));
        }
        Ok(Admission::New)
    }

    /// Starts a create: takes the image's lock (held until the returned handle drops) and writes its
    /// Creating record. Call under the store lock, after [`Store::admit`].
    pub(crate) fn begin(&self, record: Record) -> Result<Creating> {
        let lock_path = self.lock_path(&record.image_id);
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o644)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "creating the image lock", e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            Error::io(
                &lock_path,
                "locking the image",
                io::Error::from_raw_os_error(e as i32),
            )
        })?;
        let c = Creating {
            record: std::sync::Arc::new(Mutex::new(record)),
            backend: Backend::Local {
                store: self.clone(),
                _lock: lock,
            },
        };
        c.write(true)?;
        Ok(c)
    }

    /// Writes `r` as the record, atomically (temporary file + rename).
    fn write_record(&self, r: &Record, durable: bool) -> Result<()> {
        let path = self.record_path(&r.image_id);
        let tmp = self
            .records_dir()
            .join(format!(".{}.{}.tmp", r.image_id, std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(r)
            .map_err(|e| Error::new(Code::Internal, format!("serialising a record: {e}")))?;
        bytes.push(b'\n');
        let write = || -> io::Result<()> {
            // A fresh file: O_EXCL never writes through a symlink planted under this name.
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            if durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(&path, "writing the image record", e)
        })?;
        if durable {
            crate::image::publish::sync_dir(&self.records_dir())?;
        }
        Ok(())
    }

    /// Removes images: refuses an unknown id (InvalidImageId.NotFound) and one whose create is still
    /// running (IncorrectImageStatus). Every id is checked before anything is removed.
    pub(crate) fn delete(&self, ids: &[String]) -> Result<Vec<Record>> {
        let _guard = self.lock()?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let r = self.get(id)?.ok_or_else(|| not_found(id))?;
            if r.status == Status::Creating {
                return Err(Error::new(
                    Code::IncorrectImageStatus,
                    format!("{id} is still being created (pid {}); wait for it to finish, or stop that kiln first", r.pid),
                ));
            }
            records.push(r);
        }
        for r in &records {
            self.remove(&r.image_id)?;
        }
        Ok(records)
    }

    fn remove(&self, id: &str) -> Result<()> {
        // Move the image out of sight first, then drop the record, then the bytes.
        let dir = self.image_dir(id);
        let trash = self
            .images_dir()
            .join(format!(".kiln-{id}-deleting-{}.tmp", std::process::id()));
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&dir, "moving the image away to delete it", e)),
        }
        let rec = self.record_path(id);
        match fs::remove_file(&rec) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&rec, "removing the image record", e)),
        }
        // The trash and any staging directory a dead create left behind.
        let prefix = format!(".kiln-{id}-");
        if let Ok(entries) = fs::read_dir(self.images_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let p = e.path();
                    fs::remove_dir_all(&p).map_err(|e| Error::io(&p, "removing", e))?;
                }
            }
        }
        let lock = self.lock_path(id);
        let _ = fs::remove_file(lock);
        Ok(())
    }
}

pub(crate) fn not_found(id: &str) -> Error {
    Error::new(
        Code::InvalidImageIdNotFound,
        format!("no image {id} in the store; `kiln describe` lists them"),
    )
}

/// A create in progress: owns its record, and holds the image's lock (a local store) or its lease
/// (a bucket store, renewed by a thread of its own).
pub(crate) struct Creating {
    record: std::sync::Arc<Mutex<Record>>,
    backend: Backend,
}

enum Backend {
    Local { store: Store, _lock: Flock<File> },
    Bucket(crate::remote::s3::store::Lease),
}

impl Creating {
    /// A create in a bucket store, its record shared with the lease that renews it.
    pub(crate) fn in_bucket(
        record: std::sync::Arc<Mutex<Record>>,
        lease: crate::remote::s3::store::Lease,
    ) -> Creating {
        Creating {
            record,
            backend: Backend::Bucket(lease),
        }
    }

    fn lock_record(&self) -> std::sync::MutexGuard<'_, Record> {
        lock(&self.record)
    }

    fn write(&self, durable: bool) -> Result<()> {
        let r = self.lock_record().clone();
        match &self.backend {
            Backend::Local { store, .. } => store.write_record(&r, durable),
            Backend::Bucket(lease) => lease.write_final(&r),
        }
    }

    /// The bucket store's checks before an image is uploaded and made Available: the lease is
    /// still held and the claims are still this image's. Nothing to check in a local store.
    pub(crate) fn confirm(&self) -> Result<()> {
        match &self.backend {
            Backend::Local { .. } => Ok(()),
            Backend::Bucket(lease) => lease.confirm(),
        }
    }

    /// Where the image goes: the bucket store's prefix for it (None for a local store).
    pub(crate) fn bucket_prefix(&self) -> Option<crate::remote::s3::S3Url> {
        match &self.backend {
            Backend::Local { .. } => None,
            Backend::Bucket(lease) => Some(lease.image_prefix()),
        }
    }

    /// Records progress (0 to 99: 100% is for Available). Best effort: an error is ignored, the
    /// copy matters more than the number.
    pub(crate) fn set_progress(&self, percent: u64) {
        {
            let mut r = self.lock_record();
            let p = format!("{}%", percent.min(99));
            if r.progress == p {
                return;
            }
            r.progress = p;
        }
        match &self.backend {
            Backend::Local { .. } => {
                let _ = self.write(false);
            }
            // The lease's thread writes it (with the lease renewed): a copy thread never waits
            // on the network for a progress number.
            Backend::Bucket(lease) => lease.poke(),
        }
    }

    /// The image is published: Available, 100%.
    pub(crate) fn finish(self, update: impl FnOnce(&mut Record)) -> Result<Record> {
        if let Backend::Bucket(lease) = &self.backend {
            lease.stop();
            if let Err(e) = lease.confirm() {
                self.fail(&e);
                return Err(e);
            }
        }
        {
            let mut r = self.lock_record();
            update(&mut r);
            r.status = Status::Available;
            r.progress = "100%".into();
            r.lease_expires = None;
        }
        self.write(true)?;
        Ok(self.lock_record().clone())
    }

    /// The create failed: CreateFailed, with the error (a bucket store's create that lost its
    /// claim leaves no record, as a refused create leaves none).
    pub(crate) fn fail(self, err: &Error) {
        {
            let mut r = self.lock_record();
            r.status = Status::CreateFailed;
            r.error_code = Some(err.code().as_str().into());
            r.error_message = Some(err.full_message());
            r.lease_expires = None;
        }
        match &self.backend {
            Backend::Local { .. } => {
                let _ = self.write(true);
            }
            Backend::Bucket(lease) => {
                // A copy, the lock released: the lease's thread, joined in fail(), takes it.
                let r = self.lock_record().clone();
                lease.fail(&r);
            }
        }
    }
}

/// The record behind a mutex, even one a panicking thread left poisoned.
pub(crate) fn lock(m: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Progress that forwards to `inner` and keeps the record's Progress up to date, at most twice a
/// second.
pub(crate) struct RecordProgress<'a> {
    inner: &'a dyn crate::copy::progress::Progress,
    creating: &'a Creating,
    total: u64,
    done: std::sync::atomic::AtomicU64,
    last: Mutex<std::time::Instant>,
}

impl<'a> RecordProgress<'a> {
    pub(crate) fn new(
        inner: &'a dyn crate::copy::progress::Progress,
        creating: &'a Creating,
        total: u64,
    ) -> Self {
        RecordProgress {
            inner,
            creating,
            total: total.max(1),
            done: std::sync::atomic::AtomicU64::new(0),
            last: Mutex::new(std::time::Instant::now()),
        }
    }
}

impl crate::copy::progress::Progress for RecordProgress<'_> {
    fn advance(&self, disk: usize, bytes: u64) {
        self.inner.advance(disk, bytes);
        let done = self
            .done
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
            + bytes;
        // try_lock: a copy thread never waits on another's record write.
        let due = match self.last.try_lock() {
            Ok(mut last) if last.elapsed() >= std::time::Duration::from_millis(500) => {
                *last = std::time::Instant::now();
                true
            }
            _ => false,
        };
        if due {
            let pct = (u128::from(done) * 100 / u128::from(self.total)) as u64;
            self.creating.set_progress(pct);
        }
    }

    fn disk_done(&self, disk: usize, stats: &crate::copy::stats::CopyStats) {
        self.inner.disk_done(disk, stats);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::attributes::{Architecture, BootMode, ImageType, Platform};

    /// A Creating record (also for the bucket store's tests).
    pub(crate) fn record(id: &str, name: &str, token: Option<&str>) -> Record {
        Record {
            attributes: ImageAttributes {
                image_id: id.into(),
                image_type: ImageType::System,
                image_name: name.into(),
                image_family: None,
                image_version: None,
                description: String::new(),
                platform: Platform::OthersLinux,
                architecture: Architecture::X86_64,
                boot_mode: BootMode::Bios,
                tags: vec![],
                request_dialect: None,
            },
            status: Status::Creating,
            progress: "0%".into(),
            client_token: token.map(Into::into),
            request_digest: "d1".into(),
            creation_time: crate::image::manifest::now_rfc3339(),
            creation_nanos: 1,
            pid: std::process::id(),
            size_gib: 0,
            directory: None,
            disks: vec![],
            detection: None,
            error_code: None,
            error_message: None,
            lease_expires: None,
        }
    }

    #[test]
    fn ids_have_the_api_shape() {
        assert!(is_image_id("m-abcdefghij0123456789"));
        assert!(!is_image_id("m-abcdefghij012345678"));
        assert!(!is_image_id("m-ABCDEFGHIJ0123456789"));
        assert!(!is_image_id("x-abcdefghij0123456789"));
    }

    #[test]
    fn a_dropped_creator_reads_as_create_failed_and_frees_its_name_and_token() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::at(d.path());
        let g = s.lock().unwrap();
        let id = "m-aaaaaaaaaaaaaaaaaaaa";
        let c = s.begin(record(id, "web", Some("t1"))).unwrap();
        drop(g);
        assert_eq!(s.get(id).unwrap().unwrap().status, Status::Creating);
        assert_eq!(
            s.admit("web", None, "x").unwrap_err().code(),
            Code::InvalidImageNameDuplicated
        );
        assert!(matches!(
            s.admit("other", Some("t1"), "d1").unwrap(),
            Admission::Existing(_)
        ));
        assert_eq!(
            s.admit("other", Some("t1"), "d2").unwrap_err().code(),
            Code::IdempotenceParamNotMatch
        );
        assert_eq!(
            s.delete(&[id.to_string()]).unwrap_err().code(),
            Code::IncorrectImageStatus
        );
        drop(c);
        assert_eq!(s.get(id).unwrap().unwrap().status, Status::CreateFailed);
        assert!(matches!(
            s.admit("web", Some("t1"), "d2").unwrap(),
            Admission::New
        ));
    }

    #[test]
    fn finished_images_are_available_and_deletable() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::at(d.path());
        let id = "m-bbbbbbbbbbbbbbbbbbbb";
        s.ensure().unwrap();
        let c = s.begin(record(id, "web", None)).unwrap();
        c.set_progress(42);
        assert_eq!(s.get(id).unwrap().unwrap().progress, "42%");
        fs::create_dir_all(s.image_dir(id)).unwrap();
        let r = c.finish(|r| r.size_gib = 3).unwrap();
        assert_eq!((r.status, r.size_gib), (Status::Available, 3));
        assert_eq!(s.get(id).unwrap().unwrap().status, Status::Available);
        assert_eq!(
            s.delete(&["m-cccccccccccccccccccc".into()])
                .unwrap_err()
                .code(),
            Code::InvalidImageIdNotFound
        );
        s.delete(&[id.to_string()]).unwrap();
        assert!(s.get(id).unwrap().is_none());
        assert!(!s.image_dir(id).exists());
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn a_missing_store_is_empty_and_not_created() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::at(d.path().join("nope"));
        assert!(s.list().unwrap().is_empty());
        assert!(!d.path().join("nope").exists());
    }
}
