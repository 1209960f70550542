//! `--store s3://BUCKET/PREFIX`: the image store in a bucket that many build hosts share.
//!
//! The local store ([`crate::image::store`]) gets name and client-token uniqueness from `flock`.
//! Here conditional writes replace it: a name (or token) is claimed by writing a claim object that
//! the server must refuse when it exists (`If-None-Match: *`, AWS S3, MinIO, R2, Ceph RGW, s3s-fs;
//! and `x-oss-forbid-overwrite: true`, Alibaba OSS's spelling, sent too: other servers ignore it).
//! The records are the local store's [`Record`] JSON, and the commands reach this module through
//! [`crate::image::store::open`] (a `Located::Bucket`) and [`crate::image::store::Creating`].
//!
//! Layout under `s3://BUCKET/PREFIX/`:
//!
//! ```text
//! kiln-store.json                    written once the probe passed (below)
//! records/<ImageId>.json             the status record, as in a local store, plus LeaseExpires
//!                                    while Creating
//! claims/name/<sha256 of name>/<n>   generation n of the name's claim: {"ImageId": ...}
//! claims/token/<sha256 of token>/<n> the same for a client token, with its RequestDigest
//! images/<ImageId>/                  the image as `kiln push` writes it (disks, then
//!                                    manifest.json, then SHA256SUMS)
//! ```
//!
//! Claims are never deleted or overwritten. The current claim is the highest generation `n`
//! (20 decimal digits, so listing order is numeric order). A name is held while its current
//! claim's image has a record that is not CreateFailed; a name whose image was deleted or failed
//! is claimed again at `n+1`, with `If-None-Match: *` again, so two hosts retrying at once still
//! cannot both win. A create writes its Creating record first and claims second, so a claim
//! always points at a record that exists (or existed: deleted).
//!
//! The probe: when a writer first opens a store (no `kiln-store.json`), it puts one object twice
//! with the conditional headers; the second put must be refused. Garage 2.5.0 accepts it (it
//! ignores `If-None-Match` on PutObject), and the store is refused
//! (`OperationDenied.ConditionalWriteUnsupported`): kiln never races silently. The probe object
//! is removed either way.
//!
//! The lease: a Creating record carries `LeaseExpires`; a thread of the creator rewrites the
//! record every third of the lease (and with each progress step), renewing it. A Creating record
//! whose lease has ended reads as CreateFailed (its host died, or lost the store), the way a
//! local record reads CreateFailed once its creator's lock is free. The length is
//! `KILN_S3_LEASE_SECS` (default 60). Before it uploads the image and again before it writes
//! Available, the creator checks that its lease still holds and that its claims are still its
//! own (a server whose check-then-write is not atomic, such as s3s-fs 0.14.1, can let two puts
//! of one claim both succeed; the read-back finds the one that lost). Hosts' clocks must agree
//! to well within a lease.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};

use super::{block_on, client, download, error, upload, S3Url};
use crate::error::{Code, Error, Result};
use crate::image::attributes::Status;
use crate::image::manifest;
use crate::image::store::{self, is_image_id, lock, Admission, Creating, Record};

/// Written once the probe passed.
const MARKER: &str = "kiln-store.json";
/// Generations of one name's (or token's) claim, at most: each is a create of that name that
/// failed or was deleted.
const MAX_GENERATIONS: usize = 10_000;
/// Records listed, at most.
const MAX_RECORDS: usize = 100_000;
/// Objects of one image, at most (its disks, manifest and SHA256SUMS: far fewer).
const MAX_IMAGE_OBJECTS: usize = 1_000;
/// Records read at once by `describe`.
const READERS: usize = 8;
/// The largest record or claim read.
const MAX_RECORD_BYTES: u64 = 4 << 20;
/// Tries at a token claim whose generation another create took at the same moment.
const CLAIM_TRIES: usize = 3;
/// `KILN_S3_LEASE_SECS` unless set.
const DEFAULT_LEASE_SECS: u64 = 60;

/// The lease length: `KILN_S3_LEASE_SECS` (2 to 86400), else 60 s. Leases are written in whole
/// seconds, so one of N seconds holds for N-1 to N: at least 2.
pub(crate) fn lease_secs() -> Result<u64> {
    parse_lease(std::env::var("KILN_S3_LEASE_SECS").ok().as_deref())
}

fn parse_lease(v: Option<&str>) -> Result<u64> {
    match v {
        None | Some("") => Ok(DEFAULT_LEASE_SECS),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|s| (2..=86_400).contains(s))
            .ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("KILN_S3_LEASE_SECS={v}: give whole seconds, 2 to 86400"),
                )
            }),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the epoch of an RFC 3339 time (the SDK's parser); None when it is not one.
fn parse_time(s: &str) -> Option<u64> {
    use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
    let t = DateTime::from_str(s, DateTimeFormat::DateTime).ok()?;
    u64::try_from(t.secs()).ok()
}

/// The status a record really has at `now`: a Creating record whose lease ended (or that has no
/// lease a reader can parse) belongs to a creator that is gone.
fn derive_status(r: &mut Record, now: u64) {
    if r.status != Status::Creating {
        return;
    }
    let live = r
        .lease_expires
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|until| now < until);
    if !live {
        r.status = Status::CreateFailed;
    }
}

/// A claim object's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Claim {
    image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_digest: Option<String>,
}

/// What a name or a token is claimed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Name,
    Token,
}

impl Kind {
    fn dir(self, value: &str) -> String {
        let kind = match self {
            Kind::Name => "name",
            Kind::Token => "token",
        };
        let h = crate::copy::hash::hex(&crate::request::digest::sha256_of(value.as_bytes()));
        format!("claims/{kind}/{h}/")
    }
}

/// The key of generation `n` in a claim directory.
fn generation_key(dir: &str, n: u64) -> String {
    format!("{dir}{n:020}")
}

/// The highest generation among `keys` (full keys under `root_dir`); keys that are not
/// generations are ignored (the listing is the server's, untrusted).
fn top_generation<'a>(keys: impl IntoIterator<Item = &'a str>, root_dir: &str) -> Option<u64> {
    keys.into_iter()
        .filter_map(|k| k.strip_prefix(root_dir))
        .filter(|g| g.len() == 20 && g.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|g| g.parse::<u64>().ok())
        .max()
}

/// Who holds a name or token.
#[derive(Debug)]
enum Holder {
    /// Nobody: claim this generation.
    Free(u64),
    /// The image of the current claim, which is not CreateFailed.
    Held(Box<Record>),
}

/// The current claim's generation `top` (None: never claimed) and its image's record, judged.
fn judge(top: Option<u64>, held: Option<Record>) -> Result<Holder> {
    let Some(top) = top else {
        return Ok(Holder::Free(0));
    };
    match held {
        Some(r) if r.status != Status::CreateFailed => Ok(Holder::Held(Box::new(r))),
        _ => top.checked_add(1).map(Holder::Free).ok_or_else(|| {
            Error::new(
                Code::Internal,
                "a claim's generation number is at its limit",
            )
        }),
    }
}

/// The token rule: the same request → that image (returned); another →
/// IdempotenceParamNotMatch.
fn judge_token(token: &str, digest: &str, r: Box<Record>) -> Result<Box<Record>> {
    if r.request_digest == digest {
        return Ok(r);
    }
    Err(Error::new(
        Code::IdempotenceParamNotMatch,
        format!(
            "client token '{token}' was used for image {} with different parameters; \
             use a new token, or repeat the original request exactly",
            r.image_id
        ),
    ))
}

fn duplicated(name: &str, r: &Record) -> Error {
    Error::new(
        Code::InvalidImageNameDuplicated,
        format!(
            "an image named '{name}' already exists ({}, {}); pick another name or `kiln delete {}`",
            r.image_id, r.status, r.image_id
        ),
    )
}

fn lost_name(name: &str) -> Error {
    Error::new(
        Code::InvalidImageNameDuplicated,
        format!("another create claimed the name '{name}' at the same moment; pick another name, or `kiln describe --name {name}`"),
    )
}

/// A claim this create holds.
#[derive(Debug, Clone)]
struct ClaimRef {
    kind: Kind,
    value: String,
    dir: String,
    generation: u64,
}

/// The store at `s3://BUCKET/PREFIX/`.
#[derive(Debug, Clone)]
pub(crate) struct BucketStore {
    /// The prefix, its key empty or ending in `/`.
    root: S3Url,
}

impl BucketStore {
    /// The store `root` names when it is `s3://BUCKET[/PREFIX]`; None for a local path.
    pub(crate) fn from_path(root: &std::path::Path) -> Result<Option<BucketStore>> {
        let Some(s) = root.to_str().filter(|s| s.starts_with(super::SCHEME)) else {
            return Ok(None);
        };
        let Some(mut u) = S3Url::parse(s, true)? else {
            return Ok(None);
        };
        if !u.key.is_empty() && !u.key.ends_with('/') {
            u.key.push('/');
        }
        Ok(Some(BucketStore { root: u }))
    }

    fn url(&self, rel: &str) -> S3Url {
        self.root.child(rel)
    }

    fn record_url(&self, id: &str) -> S3Url {
        self.url(&format!("records/{id}.json"))
    }

    /// Where the images are: `s3://BUCKET/PREFIX/images/`.
    pub(crate) fn images_url(&self) -> S3Url {
        self.url("images/")
    }

    /// Where image `id`'s objects are: `s3://BUCKET/PREFIX/images/<id>/`.
    pub(crate) fn image_prefix(&self, id: &str) -> S3Url {
        self.url(&format!("images/{id}/"))
    }

    /// The full keys under `rel`, at most `limit` of them (more is an error: the listing is
    /// the server's answer, bounded before it is used).
    fn list_keys(&self, rel: &str, limit: usize) -> Result<Vec<String>> {
        let c = client()?;
        let url = self.url(rel);
        let mut keys = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = block_on(
                c.list_objects_v2()
                    .bucket(&url.bucket)
                    .prefix(&url.key)
                    .set_continuation_token(next.take())
                    .send(),
            )?
            .map_err(|e| error(e, "listing the store", &url, Code::InvalidParameter))?;
            let before = keys.len();
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(String::from),
            );
            if keys.len() > limit {
                return Err(Error::new(
                    Code::IoError,
                    format!("{url}: more than {limit} objects; not a store kiln keeps"),
                ));
            }
            match (out.is_truncated(), out.next_continuation_token()) {
                // A page without keys that says there is more would loop for ever.
                (Some(true), Some(t)) if keys.len() > before => next = Some(t.to_string()),
                (Some(true), _) => {
                    return Err(Error::new(
                        Code::IoError,
                        format!("{url}: the server's listing went on without keys"),
                    ))
                }
                _ => return Ok(keys),
            }
        }
    }

    /// Every record with its real status (a Creating record whose lease ended reads
    /// CreateFailed), oldest first. A store that was never written is empty. The records are
    /// read [`READERS`] at a time: each is a round trip.
    pub(crate) fn list(&self) -> Result<Vec<Record>> {
        let dir = self.url("records/").key;
        let keys = self.list_keys("records/", MAX_RECORDS)?;
        let ids: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&dir)?.strip_suffix(".json"))
            .filter(|id| is_image_id(id))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let found: Mutex<Vec<Result<Option<Record>>>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..READERS.min(ids.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else {
                        return;
                    };
                    let r = self.get(id);
                    found.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                });
            }
        });
        let found = found.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut out = found
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| (a.creation_nanos, &a.image_id).cmp(&(b.creation_nanos, &b.image_id)));
        Ok(out)
    }

    /// One record with its real status; None when there is no such image.
    pub(crate) fn get(&self, id: &str) -> Result<Option<Record>> {
        if !is_image_id(id) {
            return Ok(None);
        }
        let url = self.record_url(id);
        let Some(bytes) = download::get_small(&url, MAX_RECORD_BYTES)? else {
            return Ok(None);
        };
        let mut r: Record = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                Code::IoError,
                format!(
                    "{url}: not a kiln image record ({e}); delete the object to drop the image"
                ),
            )
        })?;
        if r.image_id != id {
            return Err(Error::new(
                Code::IoError,
                format!("{url}: the record is image {}'s, not {id}'s", r.image_id),
            ));
        }
        derive_status(&mut r, now_secs());
        Ok(Some(r))
    }

    fn put_record(&self, r: &Record) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(r)
            .map_err(|e| Error::new(Code::Internal, format!("serialising a record: {e}")))?;
        bytes.push(b'\n');
        let sha = crate::copy::hash::hex(&crate::request::digest::sha256_of(&bytes));
        upload::put_small(client()?, &self.record_url(&r.image_id), bytes, &sha)
    }

    /// Puts `bytes` at `url` only if no object is there: true when written, false when the
    /// server refused because one is (412 PreconditionFailed, 409 ConditionalRequestConflict or
    /// OSS's FileAlreadyExists).
    fn put_if_absent(&self, url: &S3Url, bytes: Vec<u8>) -> Result<bool> {
        let c = client()?;
        let r = block_on(
            c.put_object()
                .bucket(&url.bucket)
                .key(&url.key)
                .if_none_match("*")
                .body(ByteStream::from(bytes))
                .customize()
                .mutate_request(|req| {
                    req.headers_mut().insert("x-oss-forbid-overwrite", "true");
                })
                .send(),
        )?;
        match r {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_response().map(|r| r.status().as_u16()),
                    Some(409 | 412)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(error(e, "writing a claim", url, Code::InvalidParameter)),
        }
    }

    /// Checks, once per store, that the server refuses to overwrite an object put with
    /// `If-None-Match: *` ([the module doc](self)); writers call this first.
    pub(crate) fn ensure_ready(&self) -> Result<()> {
        let marker = self.url(MARKER);
        if download::get_small(&marker, MAX_RECORD_BYTES)?.is_some() {
            return Ok(());
        }
        self.probe()?;
        let body = serde_json::json!({
            "Kiln": env!("CARGO_PKG_VERSION"),
            "ConditionalWrites": "probed",
            "ProbedAt": manifest::now_rfc3339(),
        });
        // Refused: another host wrote it first, after its own probe.
        self.put_if_absent(&marker, body.to_string().into_bytes())?;
        Ok(())
    }

    fn probe(&self) -> Result<()> {
        let url = self.url(&format!("kiln-probe-{}", manifest::new_image_id()));
        let first = self.put_if_absent(&url, b"kiln conditional-write probe 1\n".to_vec());
        let second = match first {
            Ok(true) => self.put_if_absent(&url, b"kiln conditional-write probe 2\n".to_vec()),
            _ => Ok(false),
        };
        let removed = self.remove_probe(&url);
        let (first, second) = (first?, second?);
        let left = match removed {
            Ok(()) => "the probe object was removed".to_string(),
            Err(e) => format!(
                "the probe object {url} could not be removed ({})",
                e.message()
            ),
        };
        if !first {
            return Err(Error::new(
                Code::ConditionalWriteUnsupported,
                format!("{}: the server refused a conditional put (If-None-Match: *) of a new object, {url}; kiln cannot claim names in this store ({left})", self.root),
            ));
        }
        if second {
            return Err(Error::new(
                Code::ConditionalWriteUnsupported,
                format!(
                    "{}: the server accepted a second put of {url} with `If-None-Match: *` (and `x-oss-forbid-overwrite: true`), an overwrite those headers forbid: it ignores conditional writes, so two hosts could both claim one image name. --store s3:// needs a server that honours them (AWS S3, MinIO, Ceph RGW, Alibaba OSS, s3s-fs; Garage 2.5.0 does not); {left}",
                    self.root
                ),
            ));
        }
        Ok(())
    }

    /// Deletes the probe object and checks that it is gone: Garage 2.5.0 was seen (under load)
    /// to list the object after a DELETE that succeeded, so the delete is repeated (bounded)
    /// until a HEAD no longer finds it.
    fn remove_probe(&self, url: &S3Url) -> Result<()> {
        let c = client()?;
        for attempt in 1..=5u64 {
            crate::remote::s3::delete(url)?;
            let r = block_on(c.head_object().bucket(&url.bucket).key(&url.key).send())?;
            match r {
                Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                    return Ok(())
                }
                Err(e) => return Err(error(e, "checking", url, Code::InvalidParameter)),
                Ok(_) => std::thread::sleep(Duration::from_millis(200 * attempt)),
            }
        }
        Err(Error::new(
            Code::IoError,
            format!("{url} is still there after 5 deletes"),
        ))
    }

    /// The current generation under a claim directory.
    fn top(&self, dir: &str) -> Result<Option<u64>> {
        let keys = self.list_keys(dir, MAX_GENERATIONS)?;
        let root_dir = self.url(dir).key;
        Ok(top_generation(keys.iter().map(String::as_str), &root_dir))
    }

    fn read_claim(&self, dir: &str, n: u64) -> Result<Option<Claim>> {
        let url = self.url(&generation_key(dir, n));
        let Some(bytes) = download::get_small(&url, MAX_RECORD_BYTES)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::new(Code::IoError, format!("{url}: not a kiln claim ({e})")))
    }

    /// Who holds the name or token of claim directory `dir`.
    fn holder(&self, dir: &str) -> Result<Holder> {
        let top = self.top(dir)?;
        let held = match top {
            Some(n) => match self.read_claim(dir, n)? {
                Some(c) => self.get(&c.image_id)?,
                None => None,
            },
            None => None,
        };
        judge(top, held)
    }

    /// The idempotency and uniqueness rules of the local store's `admit`, read-only (a dry run,
    /// and the early answer before sources are opened; [`BucketStore::begin`] decides).
    pub(crate) fn admit(&self, name: &str, token: Option<&str>, digest: &str) -> Result<Admission> {
        if let Some(t) = token {
            if let Holder::Held(r) = self.holder(&Kind::Token.dir(t))? {
                return judge_token(t, digest, r).map(Admission::Existing);
            }
        }
        match self.holder(&Kind::Name.dir(name))? {
            Holder::Held(r) => Err(duplicated(name, &r)),
            Holder::Free(_) => Ok(Admission::New),
        }
    }

    /// Claims `value` (a name or a token) for `record`'s image.
    fn claim_one(&self, record: &Record, kind: Kind, value: &str) -> Result<Took> {
        let dir = kind.dir(value);
        let digest = (kind == Kind::Token).then(|| record.request_digest.clone());
        for _ in 0..CLAIM_TRIES {
            let n = match self.holder(&dir)? {
                Holder::Held(r) if kind == Kind::Name => return Err(duplicated(value, &r)),
                Holder::Held(r) => {
                    return judge_token(value, &record.request_digest, r).map(Took::Existing)
                }
                Holder::Free(n) => n,
            };
            let body = serde_json::to_vec(&Claim {
                image_id: record.image_id.clone(),
                request_digest: digest.clone(),
            })
            .map_err(|e| Error::new(Code::Internal, e.to_string()))?;
            if self.put_if_absent(&self.url(&generation_key(&dir, n)), body)? {
                return Ok(Took::Claim(ClaimRef {
                    kind,
                    value: value.to_string(),
                    dir,
                    generation: n,
                }));
            }
            // Refused: another create took generation n (412), or is taking it (AWS's 409
            // ConditionalRequestConflict, which may leave neither put done). Judge again: the
            // winner's record exists before its claim, so a name is then Held, and a token is
            // judged against the winner's request; a generation still free is tried again.
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(match kind {
            Kind::Name => lost_name(value),
            Kind::Token => Error::new(
                Code::IncorrectImageStatus,
                format!("client token '{value}': other creates keep claiming it at the same moment; try again"),
            ),
        })
    }

    /// Starts a create: writes `record` (Creating, leased), claims its token and name, and starts
    /// the lease's renewals. The token's image instead when the same request made one.
    pub(crate) fn begin(&self, record: Record) -> Result<Begun> {
        self.ensure_ready()?;
        let secs = lease_secs()?;
        let id = record.image_id.clone();
        let record = Arc::new(Mutex::new(record));
        let shared = LeaseShared {
            store: self.clone(),
            record: record.clone(),
            secs,
            held_until: AtomicU64::new(0),
            claims: Mutex::new(Vec::new()),
            lost: AtomicBool::new(false),
        };
        // The record first: a claim always points at a record that exists.
        shared.renew()?;
        let snapshot = lock(&record).clone();
        let mut claims = Vec::new();
        let mut kinds = Vec::new();
        if let Some(t) = &snapshot.client_token {
            kinds.push((Kind::Token, t.clone()));
        }
        kinds.push((Kind::Name, snapshot.image_name.clone()));
        for (kind, value) in kinds {
            match self.claim_one(&snapshot, kind, &value) {
                Ok(Took::Claim(c)) => claims.push(c),
                Ok(Took::Existing(r)) => {
                    let _ = crate::remote::s3::delete(&self.record_url(&id));
                    return Ok(Begun::Existing(r));
                }
                Err(e) => {
                    // Refused: no record stays behind, as in a local store. A token claim
                    // already made points at the missing record, which frees it.
                    let _ = crate::remote::s3::delete(&self.record_url(&id));
                    return Err(e);
                }
            }
        }
        *shared.claims.lock().unwrap_or_else(|p| p.into_inner()) = claims;
        Ok(Begun::Creating(Creating::in_bucket(
            record,
            Lease::start(shared),
        )))
    }

    /// Removes images: refuses an unknown id and one whose create holds a live lease. Every id is
    /// checked before anything is removed.
    pub(crate) fn delete(&self, ids: &[String]) -> Result<Vec<Record>> {
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let r = self.get(id)?.ok_or_else(|| store::not_found(id))?;
            if r.status == Status::Creating {
                return Err(Error::new(
                    Code::IncorrectImageStatus,
                    format!(
                        "{id} is still being created (its lease runs until {}); wait for it to finish, or stop that kiln first",
                        r.lease_expires.as_deref().unwrap_or("?")
                    ),
                ));
            }
            records.push(r);
        }
        for r in &records {
            self.remove(&r.image_id)?;
        }
        Ok(records)
    }

    /// Takes the image out of sight (its SHA256SUMS: an image without one is incomplete), then
    /// its record, then its other objects and any upload a dead create left open.
    fn remove(&self, id: &str) -> Result<()> {
        let prefix = self.image_prefix(id);
        crate::remote::s3::delete(&prefix.child("SHA256SUMS"))?;
        crate::remote::s3::delete(&self.record_url(id))?;
        self.remove_objects(id)
    }

    /// Every object under image `id`'s prefix, and its open multipart uploads.
    fn remove_objects(&self, id: &str) -> Result<()> {
        let rel = format!("images/{id}/");
        for k in self.list_keys(&rel, MAX_IMAGE_OBJECTS)? {
            crate::remote::s3::delete(&S3Url {
                bucket: self.root.bucket.clone(),
                key: k,
            })?;
        }
        self.abort_uploads(&self.url(&rel));
        Ok(())
    }

    /// Aborts the multipart uploads a dead create left open under `url`. Best effort: a server
    /// may not list uploads (s3s-fs 0.14.1 answers NotImplemented), and what stays open holds
    /// no visible object.
    fn abort_uploads(&self, url: &S3Url) {
        let Ok(c) = client() else {
            return;
        };
        let listed = block_on(
            c.list_multipart_uploads()
                .bucket(&url.bucket)
                .prefix(&url.key)
                .send(),
        );
        let Ok(Ok(out)) = listed else {
            return;
        };
        for u in out.uploads().iter().take(MAX_IMAGE_OBJECTS) {
            if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                let _ = block_on(
                    c.abort_multipart_upload()
                        .bucket(&url.bucket)
                        .key(k)
                        .upload_id(id)
                        .send(),
                );
            }
        }
    }
}

/// What claiming one name or token gave.
enum Took {
    Claim(ClaimRef),
    /// The token's image: the same request made it.
    Existing(Box<Record>),
}

/// How [`BucketStore::begin`] ended.
pub(crate) enum Begun {
    Creating(Creating),
    /// The client token and request match this image: nothing to do.
    Existing(Box<Record>),
}

/// What the lease's thread and the create share.
struct LeaseShared {
    store: BucketStore,
    record: Arc<Mutex<Record>>,
    secs: u64,
    /// Until when (seconds since the epoch) the last record written holds the lease.
    held_until: AtomicU64,
    claims: Mutex<Vec<ClaimRef>>,
    /// A claim turned out to be another create's.
    lost: AtomicBool,
}

impl LeaseShared {
    /// Writes the record with the lease renewed; never once the lease has ended (other hosts may
    /// have seen CreateFailed, reclaimed the name or deleted the record: a lease is not revived).
    fn renew(&self) -> Result<()> {
        let now = now_secs();
        let held = self.held_until.load(Ordering::SeqCst);
        if held != 0 && now >= held {
            return Err(Error::new(
                Code::IncorrectImageStatus,
                "the create's lease has ended; it is not renewed",
            ));
        }
        // Counted from before the write: the lease this host believes in never outlasts the
        // one other hosts read.
        let until = now + self.secs;
        let mut r = lock(&self.record).clone();
        r.lease_expires = Some(manifest::rfc3339(until));
        self.store.put_record(&r)?;
        self.held_until.store(until, Ordering::SeqCst);
        Ok(())
    }
}

/// A create's hold on its record in a bucket store: a thread renews the lease every third of its
/// length and writes each progress step; [`Lease::stop`] ends it before the last write.
pub(crate) struct Lease {
    shared: Arc<LeaseShared>,
    wake: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Lease {
    fn start(shared: LeaseShared) -> Lease {
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel::<()>();
        let period = Duration::from_millis(shared.secs * 1000 / 3).max(Duration::from_millis(200));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-lease".into())
            .spawn(move || loop {
                match rx.recv_timeout(period) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {
                        // A failed renewal is retried at the next tick; if none succeeds before
                        // the lease ends, confirm() refuses to publish.
                        let _ = s.renew();
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })
            .ok();
        Lease {
            shared,
            wake: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Asks the thread to write the record now (progress changed).
    pub(crate) fn poke(&self) {
        if let Some(tx) = self.wake.lock().ok().as_ref().and_then(|g| g.as_ref()) {
            let _ = tx.send(());
        }
    }

    /// Ends the renewals (and waits for the thread).
    pub(crate) fn stop(&self) {
        if let Ok(mut g) = self.wake.lock() {
            g.take();
        }
        let t = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Where the image goes.
    pub(crate) fn image_prefix(&self) -> S3Url {
        let id = lock(&self.shared.record).image_id.clone();
        self.shared.store.image_prefix(&id)
    }

    /// The lease still holds and every claim is still this image's (the current generation, with
    /// this ImageId in it).
    pub(crate) fn confirm(&self) -> Result<()> {
        let s = &self.shared;
        let id = lock(&s.record).image_id.clone();
        let until = s.held_until.load(Ordering::SeqCst);
        if now_secs() >= until {
            return Err(Error::new(
                Code::IncorrectImageStatus,
                format!(
                    "{id}: the create's lease in {} ended at {} (the store could not be reached to renew it, or kiln was stopped for longer than KILN_S3_LEASE_SECS): other hosts see the image as CreateFailed, so it is not made Available",
                    s.store.root,
                    manifest::rfc3339(until)
                ),
            ));
        }
        let claims = s.claims.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for c in &claims {
            let ours = s.store.top(&c.dir)? == Some(c.generation)
                && s.store
                    .read_claim(&c.dir, c.generation)?
                    .is_some_and(|cl| cl.image_id == id);
            if !ours {
                s.lost.store(true, Ordering::SeqCst);
                return Err(match c.kind {
                    Kind::Name => lost_name(&c.value),
                    Kind::Token => Error::new(
                        Code::IdempotenceParamNotMatch,
                        format!("client token '{}' was claimed by another create at the same moment; `kiln describe` shows its image", c.value),
                    ),
                });
            }
        }
        Ok(())
    }

    /// The last write: Available (the lease stopped and confirmed by the caller).
    pub(crate) fn write_final(&self, r: &Record) -> Result<()> {
        self.shared.store.put_record(r)
    }

    /// The create failed: its uploaded objects go; the record says CreateFailed, unless the
    /// create lost a claim (then it leaves no record, as a refused create does) or its lease
    /// ended and the record is gone (deleted by another host meanwhile).
    pub(crate) fn fail(&self, r: &Record) {
        self.stop();
        let s = &self.shared;
        let _ = s.store.remove_objects(&r.image_id);
        let url = s.store.record_url(&r.image_id);
        if s.lost.load(Ordering::SeqCst) {
            let _ = crate::remote::s3::delete(&url);
            return;
        }
        let expired = now_secs() >= s.held_until.load(Ordering::SeqCst);
        if expired && !matches!(download::get_small(&url, MAX_RECORD_BYTES), Ok(Some(_))) {
            return;
        }
        let _ = s.store.put_record(r);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: Status, lease: Option<&str>) -> Record {
        let mut r = crate::image::store::tests::record("m-aaaaaaaaaaaaaaaaaaaa", "web", Some("t"));
        r.status = status;
        r.lease_expires = lease.map(String::from);
        r
    }

    #[test]
    fn a_creating_record_is_live_only_while_its_lease_runs() {
        let until = 1_800_000_000;
        let lease = manifest::rfc3339(until);
        assert_eq!(parse_time(&lease), Some(until));
        let status = |r: Record, now| {
            let mut r = r;
            derive_status(&mut r, now);
            r.status
        };
        let live = record(Status::Creating, Some(&lease));
        assert_eq!(status(live.clone(), until - 1), Status::Creating);
        assert_eq!(status(live.clone(), until), Status::CreateFailed);
        // No lease, or one nobody can read: its creator cannot be shown alive.
        assert_eq!(
            status(record(Status::Creating, None), 0),
            Status::CreateFailed
        );
        let garbled = record(Status::Creating, Some("tomorrow"));
        assert_eq!(status(garbled, 0), Status::CreateFailed);
        // Only Creating is derived.
        let done = record(Status::Available, Some(&lease));
        assert_eq!(status(done, until + 1), Status::Available);
    }

    #[test]
    fn the_current_claim_is_the_highest_generation_and_junk_is_ignored() {
        let dir = Kind::Name.dir("web");
        assert!(dir.starts_with("claims/name/") && dir.ends_with('/'));
        assert_eq!(dir.len(), "claims/name/".len() + 64 + 1);
        assert_ne!(dir, Kind::Token.dir("web"));
        let root = format!("p/{dir}");
        let keys = [
            format!("p/{}", generation_key(&dir, 0)),
            format!("p/{}", generation_key(&dir, 10)),
            format!("p/{}", generation_key(&dir, 9)),
            format!("{root}99999999999999999999999"),
            format!("{root}0000000000000000000x"),
            format!("{root}sub/00000000000000000042"),
            format!("p/other/{}", generation_key(&dir, 77)),
        ];
        assert_eq!(
            top_generation(keys.iter().map(String::as_str), &root),
            Some(10)
        );
        assert_eq!(top_generation([].into_iter(), &root), None);
        // Generation keys sort as their numbers do.
        assert!(generation_key(&dir, 9) < generation_key(&dir, 10));
    }

    #[test]
    fn a_name_is_held_by_its_current_image_unless_that_failed_or_went() {
        assert!(matches!(judge(None, None).unwrap(), Holder::Free(0)));
        // The claimed image was deleted (no record), or failed: the next generation is free.
        assert!(matches!(judge(Some(4), None).unwrap(), Holder::Free(5)));
        let failed = record(Status::CreateFailed, None);
        assert!(matches!(
            judge(Some(4), Some(failed)).unwrap(),
            Holder::Free(5)
        ));
        for s in [Status::Creating, Status::Available] {
            let held = judge(Some(4), Some(record(s, None))).unwrap();
            assert!(matches!(held, Holder::Held(r) if r.status == s));
        }
        assert!(judge(Some(u64::MAX), None).is_err());
    }

    #[test]
    fn a_token_gives_its_image_back_only_for_the_same_request() {
        let r = Box::new(record(Status::Available, None));
        assert_eq!(
            judge_token("t", "d1", r.clone()).unwrap().image_id,
            r.image_id
        );
        let e = judge_token("t", "d2", r).unwrap_err();
        assert_eq!(e.code(), Code::IdempotenceParamNotMatch);
    }

    #[test]
    fn the_lease_length_is_bounded() {
        assert_eq!(parse_lease(None).unwrap(), DEFAULT_LEASE_SECS);
        assert_eq!(parse_lease(Some("")).unwrap(), DEFAULT_LEASE_SECS);
        assert_eq!(parse_lease(Some("5")).unwrap(), 5);
        for bad in ["0", "1", "86401", "-1", "1.5", "soon"] {
            assert_eq!(
                parse_lease(Some(bad)).unwrap_err().code(),
                Code::InvalidParameter,
                "{bad}"
            );
        }
    }

    #[test]
    fn store_urls_name_a_prefix() {
        let p = |s: &str| BucketStore::from_path(std::path::Path::new(s)).unwrap();
        assert!(p("/var/lib/kiln").is_none());
        let b = p("s3://bucket/team/store").unwrap();
        assert_eq!(
            b.image_prefix("m-aaaaaaaaaaaaaaaaaaaa").to_string(),
            "s3://bucket/team/store/images/m-aaaaaaaaaaaaaaaaaaaa/"
        );
        assert_eq!(p("s3://bucket").unwrap().url(MARKER).key, MARKER);
        assert_eq!(
            p("s3://bucket/x/").unwrap().url(MARKER).key,
            "x/kiln-store.json"
        );
        assert!(BucketStore::from_path(std::path::Path::new("s3://Bad_Bucket/x")).is_err());
    }
}
