//! `--target vsphere`: the image as one OVA, `NAME.ova` ([`crate::archive::ova`]): the `.ovf`,
//! the `.mf`, then one streamOptimized VMDK per disk, the system disk first. Disks are copied one
//! after another, each with every copy thread, straight into the archive at its member's offset:
//! no disk is ever written anywhere else first. `SHA256SUMS` then covers the OVA and the manifest;
//! the manifest's disks name their members and the archive.

use super::copy::{disk_names, record, with_progress, Copied};
use super::disks::PreparedDisk;
use crate::archive::ova::{self, Layout, OvaWriter};
use crate::archive::ovf::{self, Ovf, OvfDisk};
use crate::copy::engine::{self, DiskJob};
use crate::copy::progress::Progress;
use crate::copy::stats::CopyStats;
use crate::error::{Code, Error, Result};
use crate::format::{self, CacheMode, OutputFormat, OutputSpec};
use crate::image::attributes::{Architecture, BootMode};
use crate::image::store::Creating;
use crate::request::create::CreateRequest;
use std::path::Path;

/// vSphere's rules a request must meet, checked before anything is opened or copied (encryption
/// was refused before, as for every target).
pub(super) fn check(req: &CreateRequest) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::new(
            Code::InvalidParameter,
            format!("--target vsphere: {why}"),
        ))
    };
    if req.output.cache == CacheMode::None {
        return refuse("-t none writes aligned blocks with O_DIRECT, and an OVA's compressed VMDK grains are packed byte by byte; use -t writeback (or -t unsafe)");
    }
    if req.detect {
        return refuse("--detect checks a disk file, and an OVA holds its disks inside the archive; check the source with `kiln check` first, or build without --target and check the image");
    }
    if req.architecture == Some(Architecture::Arm64) && req.boot_mode == Some(BootMode::Bios) {
        return refuse(
            "ESXi on Arm boots UEFI firmware only; an arm64 image needs --boot-mode UEFI",
        );
    }
    Ok(())
}

/// The streamOptimized VMDK output every OVA disk is written in.
fn vmdk_spec(req: &CreateRequest) -> Result<OutputSpec> {
    let vmdk = OutputFormat::named("vmdk")
        .ok_or_else(|| Error::new(Code::Internal, "kiln was built without a VMDK writer"))?;
    let mut spec = OutputSpec::new(vmdk, 16, None, "subformat=streamOptimized")?;
    spec.cache = req.output.cache;
    Ok(spec)
}

/// Progress of one disk copied on its own, reported as disk `index` of the image.
struct Shifted<'a> {
    inner: &'a dyn Progress,
    index: usize,
}

impl Progress for Shifted<'_> {
    fn advance(&self, _: usize, bytes: u64) {
        self.inner.advance(self.index, bytes);
    }
    fn disk_done(&self, _: usize, stats: &CopyStats) {
        self.inner.disk_done(self.index, stats);
    }
}

/// Writes `NAME.ova` into `dir` from every prepared disk. The sources stay locked until the last
/// disk is copied, and a source that changed meanwhile fails the create.
pub(super) fn copy(
    req: &CreateRequest,
    prepared: Vec<PreparedDisk>,
    dir: &Path,
    creating: Option<&Creating>,
) -> Result<Copied> {
    let spec = vmdk_spec(req)?;
    let stem = ova::stem(&req.name);
    let sizes: Vec<u64> = prepared
        .iter()
        .map(|p| spec.disk_size(p.virtual_size))
        .collect();
    let names = Layout::new(&stem, prepared.len(), 0).disk_names;
    let mut ovf = Ovf {
        name: req.name.clone(),
        boot_mode: req.boot_mode.unwrap_or_default(),
        architecture: req.architecture.unwrap_or_default(),
        disks: names
            .iter()
            .zip(&sizes)
            .map(|(n, &capacity)| OvfDisk {
                href: n.clone(),
                file_size: 0,
                capacity,
                populated: 0,
            })
            .collect(),
    };
    let archive = format!("{stem}.ova");
    let mut w = OvaWriter::create(
        &dir.join(&archive),
        Layout::new(&stem, prepared.len(), ovf::reserve(&ovf)),
    )?;

    let disk_names = disk_names(&prepared);
    let mut copied = with_progress(req, &disk_names, creating, |progress| {
        copy_disks(req, &spec, prepared, &mut w, &mut ovf, &archive, progress)
    })?;
    let sha256 = w.finish(&ovf, req.output.cache.flushes())?;
    copied.sums.push((sha256, archive));
    Ok(copied)
}

/// Copies each disk in turn into the archive, each with every thread, and records it.
fn copy_disks(
    req: &CreateRequest,
    spec: &OutputSpec,
    prepared: Vec<PreparedDisk>,
    w: &mut OvaWriter,
    ovf: &mut Ovf,
    archive: &str,
    progress: &dyn Progress,
) -> Result<Copied> {
    let mut stamps = format::SourceStamps::default();
    let mut locks = Vec::new();
    let mut copied = Copied {
        disks: Vec::with_capacity(prepared.len()),
        stats: CopyStats::default(),
        sums: Vec::new(),
        adjustments: Vec::new(),
        // The OVA refuses --detect (its disks are not checked in place).
        detection: None,
    };
    for (index, mut p) in prepared.into_iter().enumerate() {
        copied.adjustments.append(&mut p.adjustments);
        let size = ovf.disks[index].capacity;
        stamps.extend(p.stamps);
        locks.extend(p.locks);
        let (name, base, file) = w
            .next_disk()?
            .ok_or_else(|| Error::new(Code::Internal, "more disks than the OVA's layout"))?;
        let writer = format::vmdk::writer::stream_at(file, w.path(), size, base, &name)?;
        let job = DiskJob {
            name: p.planned.device.to_string(),
            source: p.opened.map(|o| o.source),
            virtual_size: size,
            out_path: w.path().to_path_buf(),
            hash: false,
            encryption: None,
            format: None,
            sealed: None,
        };
        let shifted = Shifted {
            inner: progress,
            index,
        };
        let result = engine::copy_into(
            vec![(job, Box::new(writer))],
            spec.cache,
            req.threads,
            &shifted,
        );
        // A source that changed under the copy explains any error the copy met.
        stamps.check()?;
        let r = result?
            .pop()
            .ok_or_else(|| Error::new(Code::Internal, "the copy returned no disk"))?;
        let m = w.disk_written()?;
        ovf.disks[index].file_size = m.size;
        ovf.disks[index].populated = r.stats.copied;
        copied.stats.add(&r.stats);
        let mut rec = record(
            req,
            p.planned,
            (m.name, "vmdk"),
            p.source,
            p.changes,
            None,
            r,
        );
        rec.archive = Some(archive.to_string());
        (rec.file_size, rec.allocated_bytes, rec.sha256) = (m.size, m.size, m.sha256);
        copied.disks.push(rec);
    }
    drop(locks);
    Ok(copied)
}
