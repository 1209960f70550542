//! The create request: what the CLI (or a request file) asks for, checked against CreateImage's
//! rules ([`CreateRequest::normalised`]); and the instance a request's disks come from, read from a
//! libvirt domain XML ([`instance_disks`]).

use std::path::{Path, PathBuf};

use crate::copy::progress::ProgressMode;
use crate::error::{Code, Error, Result};
use crate::format::gate::BackingGate;
use crate::format::OutputSpec;
use crate::image::attributes::Dialect;
use crate::image::attributes::{
    Architecture, BootMode, DialectRecord, ImageAttributes, ImageType, Platform, Tag,
};
use crate::request::instance::{self, InstanceDisk};
use crate::request::plan::{Device, DiskSpec};
use crate::request::target::Target;
use crate::request::validate;

/// Where a create puts its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// `--output-dir DIR`: must not exist or be empty.
    Dir(PathBuf),
    /// The image store at this root.
    Store(PathBuf),
    /// `--output-dir s3://BUCKET/PREFIX/`: built in local staging, then pushed there.
    Bucket(String),
}

/// A `create` request; the CLI (or a request file) builds it, nothing here knows about flags.
/// [`crate::commands::create::create`] checks every rule before anything is written.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub(crate) name: String,
    pub(crate) family: Option<String>,
    pub(crate) image_version: Option<String>,
    pub(crate) description: Option<String>,
    /// None: the API's default (Others Linux, x86_64, BIOS).
    pub(crate) platform: Option<Platform>,
    pub(crate) architecture: Option<Architecture>,
    pub(crate) boot_mode: Option<BootMode>,
    pub(crate) tags: Vec<(String, String)>,
    /// `--disk` entries, in the order given.
    pub(crate) disks: Vec<DiskSpec>,
    /// `--snapshot`: the short form, a system disk only.
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) destination: Destination,
    /// Idempotency token (store only).
    pub(crate) client_token: Option<String>,
    /// Check everything, copy nothing, write nothing.
    pub(crate) dry_run: bool,
    pub(crate) output: OutputSpec,
    /// Copy threads (at least 1).
    pub(crate) threads: usize,
    pub(crate) progress: ProgressMode,
    /// `--instance`: the libvirt domain the disks came from (its disks are in `disks` already).
    pub(crate) instance: Option<InstanceSource>,
    /// `--allow-running`: copy sources open for writing, with a warning.
    pub(crate) allow_running: bool,
    /// Which qcow2 backing files may be followed (`--backing-dir`).
    pub(crate) gate: BackingGate,
    /// Notes to show the user (skipped CD-ROMs, ignored flags).
    pub(crate) notes: Vec<String>,
    /// `--data-image`: an image of data disks only.
    pub(crate) data_image: bool,
    /// `--detect` (DetectionStrategy Standard): check the system disk as written and put the
    /// report in the manifest; without a platform, the one detected is recorded.
    pub(crate) detect: bool,
    /// `--relocate-gpt`: a disk with a GPT that grows gets its backup table moved to the new end.
    pub(crate) relocate_gpt: bool,
    /// The vendor shape the request was written in: its rules were checked when it was read, its
    /// codes answer errors, and with `respond_in_dialect` its response shape answers `--json`.
    pub(crate) dialect: Dialect,
    pub(crate) respond_in_dialect: bool,
    /// What the image records of the vendor request (recorded parameters, device names, job).
    pub(crate) dialect_record: Option<DialectRecord>,
    /// `--target` (`Target`): the destination whose format and rules apply.
    pub(crate) target: Option<Target>,
}

/// The instance an image is made from.
#[derive(Debug, Clone)]
pub(crate) struct InstanceSource {
    pub(crate) name: String,
    pub(crate) uuid: Option<String>,
    /// Each image device with the instance target it came from.
    pub(crate) targets: Vec<(Device, String)>,
    /// The domain's disks, for checking `<backingStore>` against what kiln reads.
    pub(crate) disks: Vec<InstanceDisk>,
}

impl InstanceSource {
    /// The instance target (`vda`) the image device `device` came from.
    pub(crate) fn target_of(&self, device: &str) -> Option<&str> {
        self.targets
            .iter()
            .find(|t| t.0.as_str() == device)
            .map(|t| t.1.as_str())
    }
}

/// The image name, required: from the flag, else the request file.
pub(crate) fn required_name(name: Option<String>) -> Result<String> {
    name.ok_or_else(missing_name)
}

fn missing_name() -> Error {
    Error::new(
        Code::MissingParameter,
        "--name is required: the image needs a name",
    )
}

impl CreateRequest {
    /// The request with CreateImage's parameter rules applied and the API's defaults filled in.
    pub(crate) fn normalised(&self) -> Result<CreateRequest> {
        let mut r = self.clone();
        // A name that is only blanks is as good as none.
        if r.name.trim().is_empty() {
            return Err(missing_name());
        }
        // JD Cloud's and Huawei's own name and description rules were applied when the request
        // was read; the family and version are Alibaba's parameters (or flags).
        if r.dialect == Dialect::Alibaba {
            validate::image_name(&r.name)?;
            if let Some(d) = &r.description {
                validate::description(d)?;
            }
        }
        if let Some(f) = &r.family {
            validate::image_family(f)?;
        }
        if let Some(v) = &r.image_version {
            validate::image_version(v)?;
        }
        // With --detect and no platform, the platform is the one detected (the default otherwise),
        // so it stays None until the system disk has been checked.
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

    /// What the manifest and the record say of the image, with the platform to record.
    pub(crate) fn attributes(&self, image_id: &str, platform: Platform) -> ImageAttributes {
        ImageAttributes {
            image_id: image_id.to_string(),
            image_name: self.name.clone(),
            image_type: if self.data_image {
                ImageType::DataDisk
            } else {
                ImageType::System
            },
            image_family: self.family.clone(),
            image_version: self.image_version.clone(),
            description: self.description.clone().unwrap_or_default(),
            platform,
            architecture: self.architecture.unwrap_or_default(),
            boot_mode: self.boot_mode.unwrap_or_default(),
            tags: self
                .tags
                .iter()
                .map(|(k, v)| Tag {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            request_dialect: self.dialect_record.clone(),
        }
    }

    /// The dialect the request was written in.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether `--json` answers in the dialect's response shape (the dialect was given, or the
    /// file is not plain Alibaba JSON/TOML).
    pub fn respond_in_dialect(&self) -> bool {
        self.respond_in_dialect
    }

    /// Image device → the dialect's name for it (JD's `vdb`).
    pub fn device_names(&self) -> std::collections::BTreeMap<String, String> {
        self.dialect_record
            .as_ref()
            .map(|r| r.device_names.clone())
            .unwrap_or_default()
    }
}

/// An instance's disks as create requests them.
pub(crate) struct InstanceDisks {
    pub(crate) instance: InstanceSource,
    pub(crate) specs: Vec<DiskSpec>,
    /// Disks left out (CD-ROMs, floppies), for the user.
    pub(crate) skipped: Vec<String>,
}

/// Reads the domain XML at `xml_path` (`-` for stdin) and turns its disks, adjusted by `exclude`
/// (targets to leave out) and `entries` (`--disk device=vdX,...` texts), into disk specs.
pub(crate) fn instance_disks(
    xml_path: &Path,
    exclude: &[String],
    entries: &[String],
) -> Result<InstanceDisks> {
    let (xml, dir) = read_domain_xml(xml_path)?;
    instance_disks_from_xml(&xml, &dir, exclude, entries)
}

/// As [`instance_disks`], for a domain XML already read; relative paths resolve against `dir`.
pub(crate) fn instance_disks_from_xml(
    xml: &str,
    dir: &Path,
    exclude: &[String],
    entries: &[String],
) -> Result<InstanceDisks> {
    let inst = instance::parse_domain(xml, dir)?;
    let adj = instance::Adjustments {
        exclude: exclude.to_vec(),
        entries: entries
            .iter()
            .map(|d| instance::Adjustment::parse(d))
            .collect::<Result<_>>()?,
    };
    let (mapped, skipped) = instance::to_disk_specs(&inst, &adj)?;
    let targets = mapped
        .iter()
        .filter_map(|m| Some((m.spec.device.clone()?, m.original_target.clone()?)))
        .collect();
    let specs = mapped.into_iter().map(|m| m.spec).collect();
    Ok(InstanceDisks {
        instance: InstanceSource {
            name: inst.name.clone(),
            uuid: inst.uuid.clone(),
            targets,
            disks: inst.disks,
        },
        specs,
        skipped,
    })
}

/// The XML's text, and the directory its relative disk paths are relative to (the current one for
/// stdin). At most [`instance::MAX_XML_LEN`] bytes are read.
pub(crate) fn read_domain_xml(xml_path: &Path) -> Result<(String, PathBuf)> {
    if xml_path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(std::io::stdin(), instance::MAX_XML_LEN as u64 + 1),
            &mut text,
        )
        .map_err(|e| Error::io(xml_path, "reading the instance XML from", e))?;
        return Ok((text, std::env::current_dir().unwrap_or_default()));
    }
    let meta = std::fs::metadata(xml_path).map_err(|e| Error::io(xml_path, "reading", e))?;
    if meta.len() > instance::MAX_XML_LEN as u64 {
        return Err(Error::new(
            Code::InvalidInstanceMalformed,
            format!("{}: larger than a domain XML can be", xml_path.display()),
        ));
    }
    let text = std::fs::read_to_string(xml_path).map_err(|e| Error::io(xml_path, "reading", e))?;
    let dir = xml_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((text, dir.to_path_buf()))
}
