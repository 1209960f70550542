//! `kiln create`, in stages, one file each:
//!
//! 1. request: [`crate::request::create`] (the request, its rules and defaults) and
//!    [`crate::request::plan`] (devices and sizes);
//! 2. [`disks`]: every source opened, locked, checked and sized ([`crate::prepare`]);
//!    [`space`]: the free-space check; [`dry_run`] stops here;
//! 3. [`copy`]: every disk through the engine at once;
//! 4. [`publish`]: the manifest, `SHA256SUMS`, the image renamed into place, the store's record.
//!
//! With `--output-dir` the image goes to that directory; otherwise into the image store
//! ([`crate::image::store`]), where names and client tokens are checked under the store lock and the
//! image's status record follows the copy.

mod copy;
mod disks;
mod dry_run;
mod ova;
mod publish;
pub(crate) mod space;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::copy::stats::CopyStats;
use crate::error::{Code, Error, Result};
use crate::format::CacheMode;
use crate::image::manifest::{self, Manifest};
use crate::image::publish::{self as staging, Staging};
use crate::image::store::{Admission, Creating, Record, Store};
use crate::remote::s3::store::{Begun, BucketStore};
use crate::request::digest::request_digest;
use crate::request::plan::{self, DiskLayout};
use crate::request::target::Target;
use crate::util::testhook;

pub use self::dry_run::DryRunReport;
use crate::request::create::{CreateRequest, Destination};

/// What a finished create reports.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    pub(crate) manifest: Manifest,
    pub(crate) output_dir: PathBuf,
    pub(crate) stats: CopyStats,
    /// Sum of the output disks' virtual sizes.
    pub(crate) virtual_bytes: u64,
    pub(crate) elapsed: Duration,
    /// The store's record (store creates only).
    pub(crate) record: Option<Record>,
}

/// How a create ended.
#[derive(Debug, Clone)]
pub enum CreateResult {
    Created(Box<CreateOutcome>),
    /// The client token and request match an image already in the store: nothing was done.
    Existing(Box<Record>),
    DryRun(Box<DryRunReport>),
}

/// Runs a create; `warn` receives each warning as soon as it is known.
pub fn create(req: &CreateRequest, warn: &mut dyn FnMut(&str)) -> Result<CreateResult> {
    let started = Instant::now();
    let req = &req.normalised()?;
    let layout = layout(req)?;
    check_target(req, &layout)?;
    for w in req.notes.iter().chain(&layout.warnings) {
        warn(w);
    }
    if req.target == Some(Target::Vsphere) {
        ova::check(req)?;
    }
    if req.detect && req.data_image {
        warn("--detect checks the system disk and a data-disk image has none: no check is made");
    }
    match &req.destination {
        Destination::Dir(dir) => to_dir(req, &layout, dir, started, warn),
        Destination::Store(root) => match BucketStore::from_path(root)? {
            Some(bucket) => to_bucket_store(req, &layout, &bucket, started, warn),
            None => to_store(req, &layout, &Store::at(root), started, warn),
        },
        Destination::Bucket(prefix) => to_bucket(req, &layout, prefix, started, warn),
    }
}

/// `--output-dir s3://BUCKET/PREFIX/`: built as `--output-dir` builds it, in a directory under
/// `$TMPDIR`, then pushed ([`crate::commands::push`]: disks first, the manifest and `SHA256SUMS`
/// last) and the local copy removed. Each disk file starts uploading as soon as it is final, while
/// the later disks still copy; the push then finds it there and sends only what is missing. (An
/// archive, OVA or GCP, is one file made at the end: it uploads after the build.)
fn to_bucket(
    req: &CreateRequest,
    layout: &DiskLayout,
    prefix: &str,
    started: Instant,
    warn: &mut dyn FnMut(&str),
) -> Result<CreateResult> {
    let url = crate::commands::push::image_prefix(prefix)?;
    crate::commands::push::check_empty(&url)?;
    let local = std::env::temp_dir().join(format!(
        "kiln-upload-{}-{}",
        std::process::id(),
        manifest::new_image_id()
    ));
    let built = crate::remote::s3::upload::uploading_while(url.clone(), warn, |hook, warn| {
        to_dir_sealing(req, layout, &local, started, warn, Some(hook))
    });
    let pushed = match built {
        Ok(CreateResult::Created(mut out)) => {
            let push = crate::commands::push::PushRequest {
                image: local.to_string_lossy().into_owned(),
                destination: url.to_string(),
                progress: req.progress,
                threads: None,
            };
            crate::commands::push::push(&push, None).map(|_| {
                out.output_dir = url.to_path();
                out.elapsed = started.elapsed();
                CreateResult::Created(out)
            })
        }
        other => other,
    };
    if local.exists() {
        let _ = std::fs::remove_dir_all(&local);
    }
    pushed
}

/// The request's disks on devices: the system disk on /dev/xvda, or with `--data-image` data disks
/// only.
fn layout(req: &CreateRequest) -> Result<DiskLayout> {
    if !req.data_image {
        return plan::assign_devices(&req.disks, req.snapshot.as_ref());
    }
    if req.snapshot.is_some() || req.instance.is_some() {
        return Err(Error::new(
            Code::InvalidParameter,
            "--data-image takes --disk entries only (no --snapshot or --instance)",
        ));
    }
    plan::assign_data_devices(&req.disks)
}

/// `--target`: the destination's rules that the request alone decides (data disk count,
/// architecture, boot mode, encryption), before any source is opened.
fn check_target(req: &CreateRequest, layout: &DiskLayout) -> Result<()> {
    let Some(t) = req.target else {
        return Ok(());
    };
    let data = layout
        .disks
        .iter()
        .filter(|d| d.disk_type == plan::DiskType::Data)
        .count();
    let encrypted = req.output.encryption.is_some() || layout.disks.iter().any(|d| d.crypt.encrypt);
    let profile = crate::target::profile(t)?;
    if profile.packaging == crate::target::Packaging::GzipTar && req.output.cache == CacheMode::None
    {
        return Err(Error::new(
            Code::InvalidParameter,
            format!("-t none: --target {t} writes a compressed archive as a stream, through the page cache; use -t writeback (or unsafe)"),
        ));
    }
    let format = profile.output_format()?;
    let other = layout.disks.iter().find_map(|d| {
        d.output_format
            .filter(|f| *f != format)
            .map(|f| (&d.device, f))
    });
    if let Some((device, f)) = other {
        return Err(Error::new(
            Code::InvalidParameter,
            format!(
                "--target {t} writes {}; {device}'s output-format={} conflicts: drop it or --target",
                profile.describe(),
                f.extension()
            ),
        ));
    }
    crate::target::check_request(
        profile,
        data,
        req.architecture.unwrap_or_default(),
        req.boot_mode.unwrap_or_default(),
        encrypted,
    )
}

/// `--output-dir DIR`: the image is published as `DIR`.
fn to_dir(
    req: &CreateRequest,
    layout: &DiskLayout,
    dir: &Path,
    started: Instant,
    warn: &mut dyn FnMut(&str),
) -> Result<CreateResult> {
    to_dir_sealing(req, layout, dir, started, warn, None)
}

/// [`to_dir`], handing each disk file to `sealed` once it is final.
fn to_dir_sealing(
    req: &CreateRequest,
    layout: &DiskLayout,
    dir: &Path,
    started: Instant,
    warn: &mut dyn FnMut(&str),
    sealed: Option<crate::copy::engine::Sealed>,
) -> Result<CreateResult> {
    staging::check_target(dir)?;
    if req.dry_run {
        let report = dry_run::dry_run(req, layout, dir, None, warn)?;
        return Ok(CreateResult::DryRun(Box::new(report)));
    }
    let prepared = prepare_with_room(req, layout, warn, &space::existing_ancestor(dir))?;
    let staging = Staging::new(dir)?;
    let staging = if req.output.cache.flushes() {
        staging
    } else {
        staging.without_flush()
    };
    let out = build(
        req,
        prepared,
        staging,
        &manifest::new_image_id(),
        None,
        started,
        sealed,
    )?;
    Ok(CreateResult::Created(Box::new(out)))
}

/// Into the store: admitted under the store lock (name and client token), then built with a record
/// that says Creating until it is Available (or CreateFailed).
fn to_store(
    req: &CreateRequest,
    layout: &DiskLayout,
    store: &Store,
    started: Instant,
    warn: &mut dyn FnMut(&str),
) -> Result<CreateResult> {
    check_store_cache(req)?;
    let digest = request_digest(req, layout);
    let token = req.client_token.as_deref();
    if req.dry_run {
        // Read-only: no lock file, no directories; the answer may change before a real run.
        let existing = match store.admit(&req.name, token, &digest)? {
            Admission::Existing(r) => Some(r.image_id.clone()),
            Admission::New => None,
        };
        let report = dry_run::dry_run(req, layout, &store.images_dir(), existing, warn)?;
        return Ok(CreateResult::DryRun(Box::new(report)));
    }
    let guard = store.lock()?;
    if let Admission::Existing(r) = store.admit(&req.name, token, &digest)? {
        return Ok(CreateResult::Existing(r));
    }
    let prepared = prepare_with_room(req, layout, warn, &store.images_dir())?;
    let image_id = manifest::new_image_id();
    let creating = store.begin(publish::new_record(req, &image_id, &digest))?;
    drop(guard);
    let built = Staging::new(&store.image_dir(&image_id)).and_then(|staging| {
        build(
            req,
            prepared,
            staging,
            &image_id,
            Some(&creating),
            started,
            None,
        )
    });
    conclude(creating, built)
}

/// A store's image is always written back: `-t` is for `--output-dir`.
fn check_store_cache(req: &CreateRequest) -> Result<()> {
    if req.output.cache != CacheMode::Writeback {
        return Err(Error::new(
            Code::InvalidParameter,
            "-t applies to --output-dir only: an image in the store is always written back and fsynced before it is Available; drop -t or give --output-dir",
        ));
    }
    Ok(())
}

/// The end of a store's create: the record Available with what was built, or CreateFailed.
fn conclude(creating: Creating, built: Result<CreateOutcome>) -> Result<CreateResult> {
    match built {
        Ok(mut out) => {
            out.record = Some(publish::finish_record(creating, &out)?);
            testhook::checkpoint("available");
            Ok(CreateResult::Created(Box::new(out)))
        }
        Err(e) => {
            creating.fail(&e);
            Err(e)
        }
    }
}

/// Into a bucket store ([`crate::remote::s3::store`]): the early read-only answer on the token and
/// name, the sources opened, then the claims (conditional writes) and the Creating record; built
/// in local staging under `$TMPDIR` as `--output-dir s3://` builds it, pushed to
/// `images/<ImageId>/`, and the record made Available.
fn to_bucket_store(
    req: &CreateRequest,
    layout: &DiskLayout,
    store: &BucketStore,
    started: Instant,
    warn: &mut dyn FnMut(&str),
) -> Result<CreateResult> {
    check_store_cache(req)?;
    let digest = request_digest(req, layout);
    let token = req.client_token.as_deref();
    let local_root = std::env::temp_dir();
    // Read-only: the real answer comes from the claims below.
    let existing = match store.admit(&req.name, token, &digest)? {
        Admission::Existing(r) if !req.dry_run => return Ok(CreateResult::Existing(r)),
        Admission::Existing(r) => Some(r.image_id.clone()),
        Admission::New => None,
    };
    if req.dry_run {
        // The space checked is the local staging's; the image would go to the bucket.
        let mut report = dry_run::dry_run(req, layout, &local_root, existing, warn)?;
        report.target = store.images_url().to_path();
        return Ok(CreateResult::DryRun(Box::new(report)));
    }
    let prepared = prepare_with_room(req, layout, warn, &local_root)?;
    let image_id = manifest::new_image_id();
    let creating = match store.begin(publish::new_record(req, &image_id, &digest))? {
        Begun::Existing(r) => return Ok(CreateResult::Existing(r)),
        Begun::Creating(c) => c,
    };
    let local = local_root.join(format!("kiln-store-{image_id}-{}", std::process::id()));
    // As with --output-dir s3://, each disk starts uploading once it is final, while later ones
    // still copy (the claims are already this create's; one that loses them removes what went
    // up, in Creating::fail).
    let prefix = creating
        .bucket_prefix()
        .ok_or_else(|| Error::new(Code::Internal, "a bucket store's create without its prefix"))?;
    let built = crate::remote::s3::upload::uploading_while(prefix.clone(), warn, |hook, _| {
        let staging = Staging::new(&local)?;
        build(
            req,
            prepared,
            staging,
            &image_id,
            Some(&creating),
            started,
            Some(hook),
        )
    })
    .and_then(|out| push_to_store(req, &creating, &prefix, out, started));
    if local.exists() {
        let _ = std::fs::remove_dir_all(&local);
    }
    conclude(creating, built)
}

/// Uploads the image built locally at `out.output_dir` to `prefix`, the bucket store's prefix for
/// it (what the early uploads sent is found there), once the create's claims and lease are
/// confirmed.
fn push_to_store(
    req: &CreateRequest,
    creating: &Creating,
    prefix: &crate::remote::s3::S3Url,
    mut out: CreateOutcome,
    started: Instant,
) -> Result<CreateOutcome> {
    creating.confirm()?;
    testhook::checkpoint("uploading");
    let push = crate::commands::push::PushRequest {
        image: out.output_dir.to_string_lossy().into_owned(),
        destination: prefix.to_string(),
        progress: req.progress,
        threads: None,
    };
    crate::commands::push::push(&push, None)?;
    out.output_dir = prefix.to_path();
    out.elapsed = started.elapsed();
    Ok(out)
}

/// Copies into `staging`, then publishes.
fn build(
    req: &CreateRequest,
    prepared: Vec<disks::PreparedDisk>,
    staging: Staging,
    image_id: &str,
    creating: Option<&Creating>,
    started: Instant,
    sealed: Option<crate::copy::engine::Sealed>,
) -> Result<CreateOutcome> {
    testhook::checkpoint("staging");
    let copied = match req.target {
        Some(Target::Vsphere) => ova::copy(req, prepared, staging.dir(), creating)?,
        _ => copy::copy(req, prepared, staging.dir(), creating, sealed)?,
    };
    publish::publish(req, copied, staging, image_id, started)
}

/// What the prepared disks need on disk.
/// The disks prepared (sources opened and checked), then room for their outputs checked on the
/// filesystem of `root`: the start of every create that builds.
fn prepare_with_room(
    req: &CreateRequest,
    layout: &DiskLayout,
    warn: &mut dyn FnMut(&str),
    root: &Path,
) -> Result<Vec<disks::PreparedDisk>> {
    let prepared = disks::prepare(req, layout, warn)?;
    testhook::checkpoint("prepared");
    space::check(root, estimate(&prepared))?;
    Ok(prepared)
}

fn estimate(prepared: &[disks::PreparedDisk]) -> u64 {
    space::estimate(prepared.iter().map(|p| p.data_bytes).sum(), prepared.len())
}

/// The path made absolute against the current directory (without resolving symlinks).
fn absolute(p: &Path) -> PathBuf {
    if crate::remote::s3::is_remote(p) {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
