//! `kiln create`: request → plan → copy → publish.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::{self, CopyStats, DiskJob, OutputSpec};
use crate::error::{Code, Error, Result};
use crate::format::{self, OpenOptions};
use crate::manifest::{self, DiskRecord, Manifest, SourceRecord, Tag};
use crate::plan::{self, DiskSpec};
use crate::progress::{self, ProgressMode};
use crate::publish::Staging;
use crate::size;

/// A validated `create` request; the CLI builds it, nothing here knows about flags.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub description: String,
    pub platform: String,
    pub architecture: String,
    pub boot_mode: String,
    pub tags: Vec<(String, String)>,
    /// `--disk` entries, in the order given.
    pub disks: Vec<DiskSpec>,
    /// `--snapshot`: the short form, a system disk only.
    pub snapshot: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub output: OutputSpec,
    /// Copy threads (at least 1).
    pub threads: usize,
    pub progress: ProgressMode,
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
}

/// Runs a create; `warn` receives each warning as soon as it is known.
pub fn create(req: &CreateRequest, warn: &mut dyn FnMut(&str)) -> Result<CreateOutcome> {
    let started = Instant::now();
    if req.name.trim().is_empty() {
        return Err(Error::new(
            Code::MissingParameter,
            "--name is required: the image needs a name",
        ));
    }
    let layout = plan::assign_devices(&req.disks, req.snapshot.as_ref())?;
    for w in &layout.warnings {
        warn(w);
    }

    // Open every source before writing anything, so bad input fails fast with nothing written.
    let mut jobs = Vec::with_capacity(layout.disks.len());
    let mut records = Vec::with_capacity(layout.disks.len());
    for d in &layout.disks {
        let opened = match &d.snapshot {
            Some(p) => Some(format::open(
                p,
                &OpenOptions {
                    format: d.format,
                    snapshot: None,
                },
            )?),
            None => None,
        };
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
        let source = opened.as_ref().map(|o| SourceRecord {
            path: absolute(&o.info.path),
            snapshot_name: o.info.snapshot.clone(),
            format: o.info.format.as_str().to_string(),
            virtual_size: o.info.virtual_size,
            files_read: o
                .info
                .chain
                .iter()
                .map(|c| format::ChainEntry {
                    path: absolute(&c.path),
                    format: c.format,
                })
                .collect(),
        });
        let file = format!("{}.{}", d.short_name(), req.output.format.extension());
        records.push((d.clone(), file.clone(), virtual_size, source));
        jobs.push((
            d.device.clone(),
            opened.map(|o| o.source),
            virtual_size,
            file,
        ));
    }

    let staging = Staging::new(&req.output_dir)?;
    let disk_names: Vec<(String, u64)> = jobs.iter().map(|j| (j.0.clone(), j.2)).collect();
    let jobs: Vec<DiskJob> = jobs
        .into_iter()
        .map(|(name, source, virtual_size, file)| DiskJob {
            name,
            source,
            virtual_size,
            out_path: staging.dir().join(file),
            hash: true,
        })
        .collect();
    let reporter = progress::reporter(req.progress, &disk_names);
    let results = engine::copy_disks(jobs, &req.output, req.threads, reporter.as_ref())?;
    drop(reporter);

    let mut disks = Vec::with_capacity(records.len());
    let mut stats = CopyStats::default();
    let mut sums = Vec::new();
    for ((d, file, virtual_size, source), r) in records.into_iter().zip(results) {
        stats.add(&r.stats);
        let sha256 = r.sha256.clone().unwrap_or_default();
        sums.push((sha256.clone(), file.clone()));
        disks.push(DiskRecord {
            device: d.device.clone(),
            disk_type: d.disk_type.as_str().to_string(),
            file,
            format: req.output.format.extension().to_string(),
            virtual_size,
            size_gib: size::gib_rounded_up(virtual_size),
            allocated_bytes: r.allocated_bytes,
            file_size: r.file_size,
            sha256,
            source,
            stats: r.stats,
        });
    }
    let virtual_bytes = disks.iter().map(|d| d.virtual_size).sum();
    let manifest = Manifest {
        image_id: manifest::new_image_id(),
        image_name: req.name.clone(),
        description: req.description.clone(),
        platform: req.platform.clone(),
        architecture: req.architecture.clone(),
        boot_mode: req.boot_mode.clone(),
        tags: req
            .tags
            .iter()
            .map(|(k, v)| Tag {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        creation_time: manifest::now_rfc3339(),
        status: "Available".into(),
        size_gib: disks.iter().map(|d| d.size_gib).sum(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        disks,
    };
    let json = manifest.to_json();
    staging.write_file("manifest.json", &json)?;
    sums.push((engine::hex(&sha256_of(&json)), "manifest.json".into()));
    staging.write_file("SHA256SUMS", manifest::sha256sums(&sums).as_bytes())?;
    let output_dir = staging.commit()?;
    Ok(CreateOutcome {
        manifest,
        output_dir,
        warnings: layout.warnings,
        stats,
        virtual_bytes,
        elapsed: started.elapsed(),
    })
}

fn sha256_of(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

/// The path made absolute against the current directory (without resolving symlinks).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
