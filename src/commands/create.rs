//! `kiln create`: request → validate → plan → (store admission) → copy → publish.
//!
//! With `--output-dir` the image goes to that directory (issue 2's behaviour); otherwise into the
//! image store ([`crate::image::store`]), where names and client tokens are checked under the store lock
//! and the image's status record follows the copy. `--dry-run` runs every check up to the copy and
//! writes nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::copy::engine::{self, CopyStats, DiskJob, OutputSpec};
use crate::copy::progress::{self, Progress, ProgressMode};
use crate::detect::{self, relocate};
use crate::error::{Code, Error, Result};
use crate::format::gate::BackingGate;
use crate::format::{self, BlockSource, ExtentKind, Format, OpenOptions, Opened};
use crate::image::attributes::{
    Architecture, BootMode, ImageAttributes, ImageType, Platform, Status, Tag,
};
use crate::image::manifest::{self, DiskRecord, FileRead, Manifest, SourceRecord};
use crate::image::publish::{self, Staging};
use crate::image::store::{Admission, Creating, Record, RecordProgress, Store};
use crate::prepare::qemu_lock;
use crate::request::instance;
use crate::request::plan::{self, Device, DiskLayout, DiskSpec, PlannedDisk};
use crate::request::validate;
use crate::util::size::{self, MIB};
use crate::util::testhook;

/// Where a create puts its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `--output-dir DIR`: must not exist or be empty.
    Dir(PathBuf),
    /// The image store at this root.
    Store(PathBuf),
}

/// A `create` request; the CLI (or a request file) builds it, nothing here knows about flags.
/// [`create`] checks every rule before anything is written.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub family: Option<String>,
    pub image_version: Option<String>,
    pub description: Option<String>,
    /// None: the API's default (Others Linux, x86_64, BIOS).
    pub platform: Option<Platform>,
    pub architecture: Option<Architecture>,
    pub boot_mode: Option<BootMode>,
    pub tags: Vec<(String, String)>,
    /// `--disk` entries, in the order given.
    pub disks: Vec<DiskSpec>,
    /// `--snapshot`: the short form, a system disk only.
    pub snapshot: Option<PathBuf>,
    pub destination: Destination,
    /// Idempotency token (store only).
    pub client_token: Option<String>,
    /// Check everything, copy nothing, write nothing.
    pub dry_run: bool,
    pub output: OutputSpec,
    /// Copy threads (at least 1).
    pub threads: usize,
    pub progress: ProgressMode,
    /// `--instance`: the libvirt domain the disks came from (its disks are in `disks` already).
    pub instance: Option<InstanceSource>,
    /// `--allow-running`: copy sources open for writing, with a warning.
    pub allow_running: bool,
    /// Which qcow2 backing files may be followed (`--backing-dir`).
    pub gate: BackingGate,
    /// Notes to show the user (skipped CD-ROMs, ignored flags).
    pub notes: Vec<String>,
    /// `--data-image`: an image of data disks only.
    pub data_image: bool,
    /// `--detect` (DetectionStrategy Standard): check the system disk as written and put the
    /// report in the manifest; without a platform, the one detected is recorded.
    pub detect: bool,
    /// `--relocate-gpt`: a disk with a GPT that grows gets its backup table moved to the new end.
    pub relocate_gpt: bool,
}

/// The instance an image is made from.
#[derive(Debug, Clone)]
pub struct InstanceSource {
    pub name: String,
    pub uuid: Option<String>,
    /// Each image device with the instance target it came from.
    pub targets: Vec<(Device, String)>,
    /// The domain's disks, for checking `<backingStore>` against what kiln reads.
    pub disks: Vec<crate::request::instance::InstanceDisk>,
}

/// What a finished create reports.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    pub manifest: Manifest,
    pub output_dir: PathBuf,
    pub warnings: Vec<String>,
    pub stats: CopyStats,
    /// Sum of the output disks' virtual sizes.
    pub virtual_bytes: u64,
    pub elapsed: Duration,
    /// The store's record (store creates only).
    pub record: Option<Record>,
}

/// One disk of a dry run's plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedDiskReport {
    #[serde(rename = "Device")]
    pub device: Device,
    #[serde(rename = "DiskType")]
    pub disk_type: String,
    /// None for an empty disk.
    #[serde(rename = "Source")]
    pub source: Option<PathBuf>,
    #[serde(rename = "SourceFormat")]
    pub source_format: Option<String>,
    #[serde(rename = "Format")]
    pub format: String,
    #[serde(rename = "VirtualSize")]
    pub virtual_size: u64,
    /// Allocated source data: what the copy reads (zeros among it are then not written).
    #[serde(rename = "BytesToCopy")]
    pub bytes_to_copy: u64,
}

/// The free-space check.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceCheck {
    /// The mount point (device, type) the image goes to.
    #[serde(rename = "Filesystem")]
    pub filesystem: String,
    #[serde(rename = "NeedBytes")]
    pub need: u64,
    #[serde(rename = "FreeBytes")]
    pub free: u64,
}

/// What `--dry-run` found: the real run would start.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    #[serde(rename = "ImageName")]
    pub image_name: String,
    /// The directory the image would be published to (the store's images directory for a store).
    #[serde(rename = "Target")]
    pub target: PathBuf,
    /// Set when the client token names an existing image that the real run would return.
    #[serde(rename = "ExistingImageId", skip_serializing_if = "Option::is_none")]
    pub existing_image_id: Option<String>,
    #[serde(rename = "Disks")]
    pub disks: Vec<PlannedDiskReport>,
    #[serde(rename = "Space")]
    pub space: SpaceCheck,
    #[serde(rename = "Warnings")]
    pub warnings: Vec<String>,
    /// `--detect`: the check of the system disk as it would be written.
    #[serde(rename = "Detection", skip_serializing_if = "Option::is_none")]
    pub detection: Option<detect::Report>,
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
    let req = &normalise(req)?;
    let layout = if req.data_image {
        if req.snapshot.is_some() || req.instance.is_some() {
            return Err(Error::new(
                Code::InvalidParameter,
                "--data-image takes --disk entries only (no --snapshot or --instance)",
            ));
        }
        plan::assign_data_devices(&req.disks)?
    } else {
        plan::assign_devices(&req.disks, req.snapshot.as_ref())?
    };
    for w in req.notes.iter().chain(&layout.warnings) {
        warn(w);
    }
    if req.detect && req.data_image {
        warn("--detect checks the system disk and a data-disk image has none: no check is made");
    }
    match &req.destination {
        Destination::Dir(dir) => {
            publish::check_target(dir)?;
            let mut prepared = prepare(req, &layout, warn)?;
            testhook::checkpoint("prepared");
            let space = check_space(&existing_ancestor(dir), &prepared)?;
            if req.dry_run {
                let mut report = dry_run_report(req, &layout, dir, None, &prepared, space);
                report.detection = dry_run_detection(req, &mut prepared)?;
                return Ok(CreateResult::DryRun(Box::new(report)));
            }
            let staging = Staging::new(dir)?;
            let out = build(
                req,
                &layout,
                prepared,
                staging,
                &manifest::new_image_id(),
                None,
                started,
            )?;
            Ok(CreateResult::Created(Box::new(out)))
        }
        Destination::Store(root) => {
            let store = Store::at(root);
            let digest = request_digest(req, &layout);
            let token = req.client_token.as_deref();
            if req.dry_run {
                // Read-only: no lock file, no directories; the answer may change before a real run.
                let existing = match store.admit(&req.name, token, &digest)? {
                    Admission::Existing(r) => Some(r.image_id.clone()),
                    Admission::New => None,
                };
                let mut prepared = prepare(req, &layout, warn)?;
                let space = check_space(&existing_ancestor(&store.images_dir()), &prepared)?;
                let mut report = dry_run_report(
                    req,
                    &layout,
                    &store.images_dir(),
                    existing,
                    &prepared,
                    space,
                );
                report.detection = dry_run_detection(req, &mut prepared)?;
                return Ok(CreateResult::DryRun(Box::new(report)));
            }
            let guard = store.lock()?;
            if let Admission::Existing(r) = store.admit(&req.name, token, &digest)? {
                return Ok(CreateResult::Existing(r));
            }
            let prepared = prepare(req, &layout, warn)?;
            testhook::checkpoint("prepared");
            check_space(&store.images_dir(), &prepared)?;
            let image_id = manifest::new_image_id();
            let creating = store.begin(new_record(req, &image_id, &digest))?;
            drop(guard);
            let built = Staging::new(&store.image_dir(&image_id)).and_then(|staging| {
                build(
                    req,
                    &layout,
                    prepared,
                    staging,
                    &image_id,
                    Some(&creating),
                    started,
                )
            });
            match built {
                Ok(mut out) => {
                    let rec = creating.finish(|r| {
                        r.size_gib = out.manifest.size_gib;
                        r.directory = Some(out.output_dir.clone());
                        r.disks = out.manifest.disks.clone();
                        r.platform = out.manifest.platform;
                        r.detection = out.manifest.detection.clone();
                    })?;
                    out.record = Some(rec);
                    testhook::checkpoint("available");
                    Ok(CreateResult::Created(Box::new(out)))
                }
                Err(e) => {
                    creating.fail(&e);
                    Err(e)
                }
            }
        }
    }
}

/// Applies CreateImage's parameter rules and the API's defaults.
fn normalise(req: &CreateRequest) -> Result<CreateRequest> {
    let mut r = req.clone();
    if r.name.trim().is_empty() {
        return Err(Error::new(
            Code::MissingParameter,
            "--name is required: the image needs a name",
        ));
    }
    validate::image_name(&r.name)?;
    if let Some(f) = &r.family {
        validate::image_family(f)?;
    }
    if let Some(v) = &r.image_version {
        validate::image_version(v)?;
    }
    if let Some(d) = &r.description {
        validate::description(d)?;
    }
    // With --detect and no platform, the platform is the one detected (the default otherwise), so
    // it stays None until the system disk has been checked.
    let detected_later = r.detect && !r.data_image;
    if r.platform.is_none() && !detected_later {
        r.platform = Some(Platform::default());
    }
    r.architecture = Some(r.architecture.unwrap_or_default());
    r.boot_mode = Some(r.boot_mode.unwrap_or_default());
    validate::tags(&r.tags)?;
    if let Some(t) = &r.client_token {
        validate::client_token(t)?;
    }
    Ok(r)
}

/// A disk with its source open and its output settled.
struct PreparedDisk {
    planned: PlannedDisk,
    opened: Option<Opened>,
    virtual_size: u64,
    file: String,
    source: Option<SourceRecord>,
    /// Allocated source bytes (the copy reads these).
    data_bytes: u64,
    /// QEMU-compatible locks on every file read, held until the copy is done.
    locks: Vec<qemu_lock::SourceLock>,
    /// Every file read, as it was when opened: checked again once the copy is done.
    stamps: format::SourceStamps,
    /// What kiln changes in the guest's bytes (`--relocate-gpt`), for the manifest.
    changes: Vec<String>,
}

/// Opens every source and sizes every disk, before anything is written. Every file read is locked
/// the way QEMU locks images (so a VM cannot start writing it during the copy), then checked for a
/// writer: one is refused unless `--allow-running`.
fn prepare(
    req: &CreateRequest,
    layout: &DiskLayout,
    warn: &mut dyn FnMut(&str),
) -> Result<Vec<PreparedDisk>> {
    let mut out = Vec::with_capacity(layout.disks.len());
    let busy_code = if req.instance.is_some() {
        Code::IncorrectInstanceStatus
    } else {
        Code::SnapshotNotReady
    };
    for d in &layout.disks {
        let mut opened = match &d.snapshot {
            Some(p) => Some(format::open(
                p,
                &OpenOptions {
                    format: d.format,
                    snapshot: None,
                    gate: req.gate.clone(),
                },
            )?),
            None => None,
        };
        let mut locks = Vec::new();
        let mut stamps = format::SourceStamps::default();
        if let Some(o) = &opened {
            stamps.add(&o.info.chain)?;
            locks = qemu_lock::lock_chain(&o.info.chain)?;
            let paths: Vec<&Path> = o.info.chain.iter().map(|c| c.path.as_path()).collect();
            for w in qemu_lock::check_not_written(&paths, busy_code, req.allow_running)? {
                warn(&w);
            }
            if let Some(inst) = &req.instance {
                let target = inst
                    .targets
                    .iter()
                    .find(|t| t.0 == d.device)
                    .map(|t| t.1.as_str());
                if let Some(disk) = inst
                    .disks
                    .iter()
                    .find(|x| Some(x.target_dev.as_str()) == target)
                {
                    instance::check_backing(disk, &o.info.chain)?;
                }
            }
        }
        let src_size = opened.as_ref().map(|o| o.info.virtual_size);
        if src_size == Some(0) {
            return Err(Error::new(
                Code::InvalidSize,
                format!(
                    "{}: the snapshot {} is empty (0 bytes)",
                    d.device,
                    d.snapshot.as_deref().unwrap_or(Path::new("")).display()
                ),
            ));
        }
        let virtual_size = plan::resolve_size(&d.device, d.size, src_size)?;
        let mut changes = Vec::new();
        if req.relocate_gpt {
            opened = match opened {
                Some(o) if o.info.virtual_size < virtual_size => {
                    let (o, c) = relocate_gpt(o, virtual_size, &req.output, &d.device, warn)?;
                    changes = c;
                    Some(o)
                }
                other => other,
            };
        }
        let source = opened.as_ref().map(|o| SourceRecord {
            path: absolute(&o.info.path),
            snapshot_name: o.info.snapshot.clone(),
            format: o.info.format.as_str().to_string(),
            virtual_size: o.info.virtual_size,
            files_read: o
                .info
                .chain
                .iter()
                .map(|c| FileRead {
                    path: absolute(&c.path),
                    format: c.format.as_str().to_string(),
                })
                .collect(),
        });
        let data_bytes = match &opened {
            Some(o) => data_bytes(o.source.as_ref())?,
            None => 0,
        };
        out.push(PreparedDisk {
            planned: d.clone(),
            opened,
            virtual_size,
            file: format!("{}.{}", d.short_name(), req.output.format.extension()),
            source,
            data_bytes,
            locks,
            stamps,
            changes,
        });
    }
    Ok(out)
}

/// Wraps a growing disk's source so its GPT's backup ends up at the new end (see
/// [`crate::detect::relocate`]); a disk without a valid GPT is copied as it is, with a warning.
fn relocate_gpt(
    o: Opened,
    virtual_size: u64,
    output: &OutputSpec,
    device: &str,
    warn: &mut dyn FnMut(&str),
) -> Result<(Opened, Vec<String>)> {
    let size = output.disk_size(virtual_size);
    match relocate::plan(o.source.as_ref(), size)? {
        Ok(Some(rel)) => {
            let source = Box::new(relocate::Relocated::new(o.source, size, rel.patches)?);
            Ok((
                Opened {
                    source,
                    info: o.info,
                },
                rel.changes,
            ))
        }
        Ok(None) => Ok((o, Vec::new())),
        Err(why) => {
            warn(&format!(
                "{device}: --relocate-gpt: {why}; the disk is copied as it is"
            ));
            Ok((o, Vec::new()))
        }
    }
}

/// Sum of a source's Data extents.
fn data_bytes(src: &dyn BlockSource) -> Result<u64> {
    let size = src.virtual_size();
    let (mut pos, mut data) = (0u64, 0u64);
    while pos < size {
        let e = src.extent(pos, size - pos)?;
        if e.len == 0 {
            break;
        }
        if e.kind == ExtentKind::Data {
            data += e.len;
        }
        pos = e.end();
    }
    Ok(data)
}

/// Copies, writes the manifest and `SHA256SUMS`, publishes.
fn build(
    req: &CreateRequest,
    layout: &DiskLayout,
    prepared: Vec<PreparedDisk>,
    staging: Staging,
    image_id: &str,
    creating: Option<&Creating>,
    started: Instant,
) -> Result<CreateOutcome> {
    testhook::checkpoint("staging");
    let disk_names: Vec<(String, u64)> = prepared
        .iter()
        .map(|p| (p.planned.device.to_string(), p.virtual_size))
        .collect();
    let mut records = Vec::with_capacity(prepared.len());
    let mut jobs = Vec::with_capacity(prepared.len());
    let mut locks = Vec::new();
    let mut stamps = format::SourceStamps::default();
    for p in prepared {
        stamps.extend(p.stamps);
        jobs.push(DiskJob {
            name: p.planned.device.to_string(),
            source: p.opened.map(|o| o.source),
            virtual_size: p.virtual_size,
            out_path: staging.dir().join(&p.file),
            hash: true,
        });
        records.push((p.planned, p.file, p.source, p.changes));
        locks.extend(p.locks);
    }
    let reporter = progress::reporter(req.progress, &disk_names);
    let total: u64 = disk_names.iter().map(|d| d.1).sum();
    let record_progress = creating.map(|c| RecordProgress::new(reporter.as_ref(), c, total));
    let progress: &dyn Progress = match &record_progress {
        Some(p) => p,
        None => reporter.as_ref(),
    };
    let results = engine::copy_disks(jobs, &req.output, req.threads, progress);
    // A source that changed under the copy explains any error the copy met (a truncated qcow2
    // looks corrupt), and makes a copy that seemed to succeed worthless.
    stamps.check()?;
    let results = results?;
    drop(reporter);
    drop(locks);

    let mut disks = Vec::with_capacity(records.len());
    let mut stats = CopyStats::default();
    let mut sums = Vec::new();
    for ((d, file, source, changes), r) in records.into_iter().zip(results) {
        // The engine's size: qcow2 output is rounded up to whole 512-byte sectors.
        let virtual_size = r.virtual_size;
        stats.add(&r.stats);
        let sha256 = r.sha256.clone().unwrap_or_default();
        sums.push((sha256.clone(), file.clone()));
        disks.push(DiskRecord {
            device: d.device.clone(),
            disk_type: d.disk_type,
            file,
            format: req.output.format.extension().to_string(),
            virtual_size,
            size_gib: size::gib_rounded_up(virtual_size),
            allocated_bytes: r.allocated_bytes,
            file_size: r.file_size,
            sha256,
            original_target: req
                .instance
                .as_ref()
                .and_then(|i| i.targets.iter().find(|t| t.0 == d.device))
                .map(|t| t.1.clone()),
            source,
            stats: r.stats,
            changes,
        });
    }
    let virtual_bytes = disks.iter().map(|d| d.virtual_size).sum();
    let detection = match disks.iter().find(|d| d.device == plan::SYSTEM_DEVICE) {
        Some(d) if req.detect => Some(detect::detect_file(
            &staging.dir().join(&d.file),
            Format::parse(&d.format),
            &BackingGate::default(),
            &detect_options(req),
        )?),
        _ => None,
    };
    let platform = req
        .platform
        .or_else(|| detection.as_ref().and_then(|r| r.platform))
        .unwrap_or_default();
    let manifest = Manifest {
        attributes: attributes(req, image_id, platform),
        creation_time: manifest::now_rfc3339(),
        status: Status::Available,
        client_token: req.client_token.clone(),
        size_gib: disks.iter().map(|d| d.size_gib).sum(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        instance: req.instance.as_ref().map(|i| manifest::InstanceRecord {
            name: i.name.clone(),
            uuid: i.uuid.clone(),
        }),
        disks,
        detection,
    };
    let json = manifest.to_json();
    staging.write_file("manifest.json", &json)?;
    testhook::checkpoint("manifest");
    sums.push((engine::hex(&sha256_of(&json)), "manifest.json".into()));
    staging.write_file("SHA256SUMS", manifest::sha256sums(&sums).as_bytes())?;
    testhook::checkpoint("sums");
    let output_dir = staging.commit()?;
    testhook::checkpoint("renamed");
    Ok(CreateOutcome {
        manifest,
        output_dir,
        warnings: layout.warnings.clone(),
        stats,
        virtual_bytes,
        elapsed: started.elapsed(),
        record: None,
    })
}

/// What the manifest and the record say of the image, from the request.
fn attributes(req: &CreateRequest, image_id: &str, platform: Platform) -> ImageAttributes {
    ImageAttributes {
        image_id: image_id.to_string(),
        image_name: req.name.clone(),
        image_type: if req.data_image {
            ImageType::DataDisk
        } else {
            ImageType::System
        },
        image_family: req.family.clone(),
        image_version: req.image_version.clone(),
        description: req.description.clone().unwrap_or_default(),
        platform,
        architecture: req.architecture.unwrap_or_default(),
        boot_mode: req.boot_mode.unwrap_or_default(),
        tags: req
            .tags
            .iter()
            .map(|(k, v)| Tag {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
    }
}

fn new_record(req: &CreateRequest, image_id: &str, digest: &str) -> Record {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Record {
        // The platform until the check of the system disk says otherwise (--detect without one).
        attributes: attributes(req, image_id, req.platform.unwrap_or_default()),
        status: Status::Creating,
        progress: "0%".into(),
        client_token: req.client_token.clone(),
        request_digest: digest.to_string(),
        creation_time: manifest::rfc3339(now.as_secs()),
        creation_nanos: now.as_nanos(),
        pid: std::process::id(),
        size_gib: 0,
        directory: None,
        disks: Vec::new(),
        detection: None,
        error_code: None,
        error_message: None,
    }
}

/// SHA-256 over the normalised request: every attribute, the disk layout, the output settings, and
/// each source by canonical path, size and modification time. Threads and progress do not count.
pub fn request_digest(req: &CreateRequest, layout: &DiskLayout) -> String {
    let mut tags = req.tags.clone();
    tags.sort();
    let disks: Vec<serde_json::Value> = layout
        .disks
        .iter()
        .map(|d| {
            serde_json::json!({
                "Device": d.device,
                "DiskType": d.disk_type.as_str(),
                "Size": d.size,
                "Format": d.format.map(|f| f.as_str()),
                "Source": d.snapshot.as_deref().map(source_identity),
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "ImageName": req.name,
        "ImageFamily": req.family,
        "ImageVersion": req.image_version,
        "Description": req.description.as_deref().unwrap_or(""),
        "Platform": req.platform,
        "Architecture": req.architecture,
        "BootMode": req.boot_mode,
        "Tags": tags,
        "Disks": disks,
        "OutputFormat": req.output.format.extension(),
        "ClusterBits": req.output.cluster_bits,
        "Compression": req.output.compression.map(|c| format!("{c:?}")),
    });
    // Only when set, so digests of requests made before these options existed do not change.
    if req.detect {
        v["DetectionStrategy"] = detect::STANDARD.into();
    }
    if req.relocate_gpt {
        v["RelocateGpt"] = true.into();
    }
    engine::hex(&sha256_of(v.to_string().as_bytes()))
}

/// A source as (canonical path[@snapshot], size, mtime in ns); the path as given when it cannot
/// be resolved.
fn source_identity(p: &Path) -> serde_json::Value {
    let (file, snap) = if p.exists() {
        (p.to_path_buf(), None)
    } else {
        let s = p.to_string_lossy();
        match s.rfind('@') {
            Some(i) if i > 0 => (PathBuf::from(&s[..i]), Some(s[i + 1..].to_string())),
            _ => (p.to_path_buf(), None),
        }
    };
    let canonical = std::fs::canonicalize(&file).unwrap_or_else(|_| absolute(&file));
    let meta = std::fs::metadata(&canonical).ok();
    serde_json::json!({
        "Path": canonical,
        "Snapshot": snap,
        "Size": meta.as_ref().map(|m| m.len()),
        "MtimeNanos": meta.as_ref().map(|m| m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128),
    })
}

/// Estimated bytes the image needs on disk: the data to copy, ~1% of it for metadata, and 1 MiB per
/// disk (headers, tables, manifest).
fn estimate(prepared: &[PreparedDisk]) -> u64 {
    let data: u64 = prepared.iter().map(|p| p.data_bytes).sum();
    data + data / 100 + MIB * prepared.len() as u64
}

/// Refuses with InsufficientSpace when `dir`'s filesystem has less free space than the estimate.
/// In debug builds (the tests' binary) `KILN_TEST_FREE_BYTES` replaces the free space measured;
/// release builds ignore it.
fn check_space(dir: &Path, prepared: &[PreparedDisk]) -> Result<SpaceCheck> {
    let need = estimate(prepared);
    let hook = if cfg!(debug_assertions) {
        std::env::var("KILN_TEST_FREE_BYTES").ok()
    } else {
        None
    };
    let free = match hook.and_then(|v| v.parse().ok()) {
        Some(v) => v,
        None => {
            let st = nix::sys::statvfs::statvfs(dir).map_err(|e| {
                Error::io(
                    dir,
                    "measuring free space (statvfs)",
                    std::io::Error::from_raw_os_error(e as i32),
                )
            })?;
            (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64)
        }
    };
    let filesystem = filesystem_of(dir);
    if need > free {
        return Err(Error::new(
            Code::InsufficientSpace,
            format!(
                "{filesystem}: the image needs about {} ({need} bytes) but only {} ({free} bytes) is free; \
                 free some space or build elsewhere (--store or --output-dir)",
                size::human(need),
                size::human(free)
            ),
        ));
    }
    Ok(SpaceCheck {
        filesystem,
        need,
        free,
    })
}

/// `MOUNTPOINT (DEVICE, TYPE)` of the filesystem holding `dir`, from /proc/self/mounts; the path
/// itself when that cannot be read.
fn filesystem_of(dir: &Path) -> String {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return canonical.display().to_string();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut best: Option<(PathBuf, String, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 3 {
            continue;
        }
        let mp = PathBuf::from(unescape(f[1]));
        if canonical.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() >= b.0.as_os_str().len())
        {
            best = Some((mp, unescape(f[0]), f[2].to_string()));
        }
    }
    match best {
        Some((mp, dev, ty)) => format!("{} ({dev}, {ty})", mp.display()),
        None => canonical.display().to_string(),
    }
}

/// The nearest existing directory at or above `p` (where a not-yet-created directory would live).
fn existing_ancestor(p: &Path) -> PathBuf {
    let abs = absolute(p);
    let mut cur: &Path = &abs;
    loop {
        if cur.is_dir() {
            return cur.to_path_buf();
        }
        match cur.parent() {
            Some(q) => cur = q,
            None => return PathBuf::from("/"),
        }
    }
}

fn dry_run_report(
    req: &CreateRequest,
    layout: &DiskLayout,
    target: &Path,
    existing_image_id: Option<String>,
    prepared: &[PreparedDisk],
    space: SpaceCheck,
) -> DryRunReport {
    DryRunReport {
        image_name: req.name.clone(),
        target: absolute(target),
        existing_image_id,
        disks: prepared
            .iter()
            .map(|p| PlannedDiskReport {
                device: p.planned.device.clone(),
                disk_type: p.planned.disk_type.as_str().into(),
                source: p.source.as_ref().map(|s| s.path.clone()),
                source_format: p.source.as_ref().map(|s| s.format.clone()),
                format: req.output.format.extension().into(),
                virtual_size: p.virtual_size,
                bytes_to_copy: p.data_bytes,
            })
            .collect(),
        space,
        warnings: layout.warnings.clone(),
        detection: None,
    }
}

/// `--dry-run --detect`: checks the system disk's source as the copy would present it (grown to
/// its size, with `--relocate-gpt`'s changes), without writing it. Takes the source out of
/// `prepared`, which a dry run no longer needs.
fn dry_run_detection(
    req: &CreateRequest,
    prepared: &mut [PreparedDisk],
) -> Result<Option<detect::Report>> {
    if !req.detect {
        return Ok(None);
    }
    let Some(p) = prepared
        .iter_mut()
        .find(|p| p.planned.device == plan::SYSTEM_DEVICE)
    else {
        return Ok(None);
    };
    let Some(o) = p.opened.take() else {
        return Ok(None);
    };
    let size = req.output.disk_size(p.virtual_size);
    // A source already wrapped by --relocate-gpt has this size; growing it again adds nothing.
    let source: Box<dyn BlockSource> = if o.source.virtual_size() < size {
        Box::new(relocate::Relocated::new(o.source, size, Vec::new())?)
    } else {
        o.source
    };
    Ok(Some(detect::detect(
        std::sync::Arc::from(source),
        &detect_options(req),
    )?))
}

/// What `--detect` checks the system disk against: the request's (normalised) attributes.
fn detect_options(req: &CreateRequest) -> detect::DetectOptions {
    detect::DetectOptions {
        boot_mode: req.boot_mode,
        architecture: req.architecture,
        platform: req.platform,
    }
}

fn sha256_of(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

/// The path made absolute against the current directory (without resolving symlinks).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
