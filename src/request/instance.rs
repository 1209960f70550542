//! Images from instances: a libvirt domain XML (as `virsh dumpxml` prints it) turned into disk
//! entries, with the caller's adjustments (exclude, grow, add) applied the way JD Cloud's
//! CreateImage `dataDisks` does. No I/O besides what the caller hands in: the XML text, and the
//! backing chain kiln read from each disk for [`check_backing`].
//!
//! The mapping: the boot disk (`<boot order='N'/>` with the lowest N on a disk, else the first disk,
//! which is what `<os><boot dev='hd'/>` boots) becomes `/dev/xvda`; the other disks become data disks
//! in target order (`vda` < `vdb` < ... < `vdz` < `vdaa`), each on the next free `/dev/xvdX`.
//! CD-ROMs and floppies are skipped with a note; network and pool-volume disks are refused.

use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};
use crate::format::{ChainEntry, Format};
use crate::request::plan::{Device, DiskSpec, DiskType, MAX_DATA_DISKS, SYSTEM_DEVICE};

/// Largest domain XML accepted (libvirt's own limit for a domain definition is 10 MiB).
pub(crate) const MAX_XML_LEN: usize = 16 << 20;
/// Most `<disk>` elements read from one domain (libvirt domains rarely carry more than a few dozen).
const MAX_DISKS: usize = 1024;
/// XML nodes parsed at most (bounds memory on hostile input).
const MAX_NODES: u32 = 1_000_000;

/// A libvirt domain, reduced to what an image needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub uuid: Option<String>,
    /// The instance's disks (`device='disk'` or `'lun'`), in document order.
    pub disks: Vec<InstanceDisk>,
    /// Index into `disks` of the boot disk (`/dev/xvda`).
    pub boot: usize,
    /// Notes for devices left out (CD-ROMs, floppies).
    pub skipped: Vec<String>,
}

/// `<backingStore>` entries, outermost first: each backing file and its stated format.
pub(crate) type BackingStore = Vec<(PathBuf, Option<Format>)>;

/// Whether a disk's source is a file or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Block,
}

/// One disk of the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDisk {
    /// `<source file=...>` or `<source dev=...>`, made absolute against the XML's directory.
    pub source: PathBuf,
    pub kind: SourceKind,
    /// `<driver type=...>`: the format, stated (no probing then) or `None` (detected from content).
    pub format: Option<Format>,
    /// `<target dev=...>`, e.g. `vda`.
    pub target_dev: String,
    /// `<target bus=...>`, e.g. `virtio`.
    pub(crate) bus: Option<String>,
    /// `<boot order=...>` on this disk.
    pub boot_order: Option<u32>,
    /// `<backingStore>` elements, outermost first: each backing file and its stated format.
    pub backing_store: BackingStore,
    /// True when the XML's chain ends with an empty `<backingStore/>`: it claims to list every
    /// backing file. False when it says nothing past its last entry (libvirt has not looked).
    pub backing_complete: bool,
}

fn malformed(what: impl std::fmt::Display) -> Error {
    Error::new(
        Code::InvalidInstanceMalformed,
        format!("instance XML: {what}; give the output of `virsh dumpxml DOMAIN`"),
    )
}

/// Parses a domain XML. Relative paths in `<source>` resolve against `xml_dir` (the XML file's
/// directory, or the working directory for stdin).
pub fn parse_domain(xml: &str, xml_dir: &Path) -> Result<Instance> {
    if xml.len() > MAX_XML_LEN {
        return Err(malformed(format!(
            "{} bytes is larger than the {} bytes a domain XML may have",
            xml.len(),
            MAX_XML_LEN
        )));
    }
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, opts)
        .map_err(|e| malformed(format!("not well-formed XML ({e})")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(malformed(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let name = child(root, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| malformed("<domain> has no <name>"))?
        .to_string();
    let uuid = child(root, "uuid")
        .and_then(|n| n.text())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    let devices = child(root, "devices");
    for disk in devices.into_iter().flat_map(|d| children(d, "disk")) {
        if disks.len() + skipped.len() >= MAX_DISKS {
            return Err(malformed(format!("more than {MAX_DISKS} <disk> elements")));
        }
        let device = disk.attribute("device").unwrap_or("disk");
        let target = child(disk, "target").and_then(|t| t.attribute("dev"));
        let label = target.unwrap_or("(no target)");
        match device {
            "disk" | "lun" => {}
            "cdrom" | "floppy" => {
                let src = source_text(disk)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                skipped.push(format!(
                    "{device} {label}{src} skipped: an image carries disks only"
                ));
                continue;
            }
            other => {
                return Err(malformed(format!(
                    "disk {label} has device='{other}' (expected disk, lun, cdrom or floppy)"
                )))
            }
        }
        let target = target
            .filter(|t| valid_target(t))
            .ok_or_else(|| {
                malformed(format!(
                    "a disk has no usable <target dev=...> ({label}); targets look like vda or sdb"
                ))
            })?
            .to_string();
        if disks.iter().any(|d: &InstanceDisk| d.target_dev == target) {
            return Err(malformed(format!("two disks have target {target}")));
        }
        let (source, kind) = disk_source(disk, &target, xml_dir)?;
        let format = match child(disk, "driver").and_then(|d| d.attribute("type")) {
            None => None,
            Some(t) => Some(driver_format(t, &target, &source)?),
        };
        let boot_order = match child(disk, "boot").and_then(|b| b.attribute("order")) {
            None => None,
            Some(o) => Some(o.trim().parse::<u32>().map_err(|_| {
                malformed(format!("disk {target}: boot order '{o}' is not a number"))
            })?),
        };
        let (backing_store, backing_complete) = backing_chain(disk, &target, xml_dir)?;
        disks.push(InstanceDisk {
            source,
            kind,
            format,
            target_dev: target,
            bus: child(disk, "target")
                .and_then(|t| t.attribute("bus"))
                .map(str::to_string),
            boot_order,
            backing_store,
            backing_complete,
        });
    }
    if disks.is_empty() {
        return Err(Error::new(
            Code::NoSystemDisk,
            format!("instance {name} has no disk (device='disk'); an image needs a system disk"),
        ));
    }
    // The boot disk: the lowest boot order on a disk; else the first disk, which is both what
    // `<os><boot dev='hd'/>` boots (libvirt keeps disks sorted by bus and target) and the choice
    // when nothing is said.
    let boot = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
        .min()
        .map(|(_, i)| i)
        .unwrap_or(0);
    Ok(Instance {
        name,
        uuid,
        disks,
        boot,
        skipped,
    })
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

fn children<'a, 'i: 'a>(
    node: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |n| n.is_element() && n.tag_name().name() == name)
}

/// libvirt target names: lowercase letters then optionally digits (`vda`, `sdaa`, `hdc`, `nvme0n1`
/// is not a disk target but `xvda` is). Letters and digits only, at most 32 characters.
fn valid_target(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 32
        && t.as_bytes()[0].is_ascii_lowercase()
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn source_text(disk: roxmltree::Node) -> Option<String> {
    let s = child(disk, "source")?;
    s.attribute("file")
        .or_else(|| s.attribute("dev"))
        .or_else(|| s.attribute("name"))
        .map(str::to_string)
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// The source of a `<disk>` or `<backingStore>`: a file or a block device.
fn disk_source(node: roxmltree::Node, target: &str, dir: &Path) -> Result<(PathBuf, SourceKind)> {
    let ty = node.attribute("type").unwrap_or("file");
    let source = child(node, "source");
    let (attr, kind) = match ty {
        "file" => ("file", SourceKind::File),
        "block" => ("dev", SourceKind::Block),
        "network" => {
            let what = source
                .map(|s| {
                    let proto = s.attribute("protocol").unwrap_or("?");
                    let name = s.attribute("name").unwrap_or("?");
                    format!(" ({proto}: {name})")
                })
                .unwrap_or_default();
            return Err(Error::new(
                Code::InstanceDiskUnsupported,
                format!(
                    "disk {target} is a network disk{what}; kiln copies local files and block devices only: \
                     export it to a file (qemu-img convert) and add it with --disk device={target},snapshot=FILE after --exclude {target}"
                ),
            ));
        }
        other => {
            return Err(Error::new(
                Code::InstanceDiskUnsupported,
                format!(
                "disk {target} has type='{other}'; kiln reads type='file' and type='block' disks \
                     (for a pool volume, `virsh vol-path` names its file)"
            ),
            ))
        }
    };
    let path = source
        .and_then(|s| s.attribute(attr))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| malformed(format!("disk {target} has no <source {attr}=...>")))?;
    Ok((resolve(dir, path), kind))
}

fn driver_format(t: &str, target: &str, source: &Path) -> Result<Format> {
    Format::parse(t).ok_or_else(|| {
        Error::new(
            Code::InstanceDiskUnsupported,
            format!(
                "disk {target} ({}) has driver type '{t}'; kiln reads raw and qcow2 \
                 (convert it with `qemu-img convert -O qcow2`)",
                source.display()
            ),
        )
    })
}

/// The nested `<backingStore>` chain, outermost first, and whether it ends with an empty element.
fn backing_chain(disk: roxmltree::Node, target: &str, dir: &Path) -> Result<(BackingStore, bool)> {
    let mut out = Vec::new();
    let mut node = disk;
    loop {
        let Some(b) = child(node, "backingStore") else {
            return Ok((out, false));
        };
        if b.attribute("type").is_none() && child(b, "source").is_none() {
            return Ok((out, true));
        }
        if out.len() >= crate::format::MAX_CHAIN_DEPTH {
            return Err(malformed(format!(
                "disk {target}: <backingStore> nests deeper than {} files",
                crate::format::MAX_CHAIN_DEPTH
            )));
        }
        let (path, _) = disk_source(b, target, dir)?;
        let format = match child(b, "format").and_then(|f| f.attribute("type")) {
            None => None,
            Some(t) => Some(driver_format(t, target, &path)?),
        };
        out.push((path, format));
        node = b;
    }
}

/// Libvirt target order: shorter names first (`vdz` < `vdaa`), then by name.
fn target_key(t: &str) -> (usize, &str) {
    (t.len(), t)
}

/// One `--disk` entry given with `--instance`: its `device=` is an instance target (`vdb`), an
/// image device (`xvdc`, `/dev/xvdc`), or a new name; the rest is as in [`DiskSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adjustment {
    pub(crate) device: Option<String>,
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) size: Option<u64>,
    pub(crate) format: Option<Format>,
}

impl Adjustment {
    /// Parses `device=vdb,size=100G` or `device=vdx,snapshot=extra.qcow2`. `type=` is refused: the
    /// instance decides which disk is the system disk.
    pub fn parse(text: &str) -> Result<Adjustment> {
        let mut device = None;
        let mut rest = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("device") => {
                    let v = v.trim();
                    let name = v.strip_prefix("/dev/").unwrap_or(v);
                    if !valid_target(name) {
                        return Err(Error::new(
                            Code::InvalidDeviceMalformed,
                            format!(
                                "--disk '{text}': device '{v}' is neither an instance target (vdb) nor an image device (/dev/xvdb)"
                            ),
                        ));
                    }
                    device = Some(name.to_string());
                }
                _ => rest.push(part),
            }
        }
        let spec = DiskSpec::parse(&rest.join(","))?;
        if spec.disk_type.is_some() {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("--disk '{text}': type= does not apply with --instance; the instance's boot disk is the system disk"),
            ));
        }
        Ok(Adjustment {
            device,
            snapshot: spec.snapshot,
            size: spec.size,
            format: spec.format,
        })
    }
}

/// What the caller changes about the instance's disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adjustments {
    /// `--exclude vdc`: instance targets to leave out.
    pub exclude: Vec<String>,
    /// `--disk` entries: grow an instance disk, or add one.
    pub entries: Vec<Adjustment>,
}

/// A disk entry for the planner, with the instance target it came from (for the manifest's
/// `OriginalTarget`; `None` for a disk the caller added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedDisk {
    /// `device` (`/dev/xvdX`) and `disk_type` are always set.
    pub spec: DiskSpec,
    pub original_target: Option<String>,
}

/// The instance's disks as `DiskSpec`s (system first, then data disks by device), adjusted, plus
/// notes for the user (skipped CD-ROMs and floppies). Sizes are carried as requested: the "only
/// grows" rule is `plan::resolve_size`'s once the sources are open.
pub fn to_disk_specs(inst: &Instance, adj: &Adjustments) -> Result<(Vec<MappedDisk>, Vec<String>)> {
    let warnings = inst.skipped.clone();
    let boot_target = inst
        .disks
        .get(inst.boot)
        .map(|d| d.target_dev.as_str())
        .ok_or_else(|| Error::new(Code::Internal, "instance boot disk index out of range"))?;
    check_excludes(inst, adj, boot_target)?;
    let excluded = |t: &str| adj.exclude.iter().any(|e| e.trim() == t);

    // System disk, then the kept data disks in target order, each on the next device.
    let mut data: Vec<&InstanceDisk> = inst
        .disks
        .iter()
        .enumerate()
        .filter(|(i, d)| *i != inst.boot && !excluded(&d.target_dev))
        .map(|(_, d)| d)
        .collect();
    data.sort_by(|a, b| target_key(&a.target_dev).cmp(&target_key(&b.target_dev)));
    let boot = &inst.disks[inst.boot];
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(instance_entry(boot, Device::system(), DiskType::System));
    for (i, d) in data.iter().enumerate() {
        if i >= MAX_DATA_DISKS {
            return Err(too_many(inst, data.len(), adj));
        }
        out.push(instance_entry(d, Device::data(i + 1), DiskType::Data));
    }

    let added = adjust(inst, adj, &mut out)?;
    place_added(inst, adj, &mut out, added)?;
    out[1..].sort_by(|a, b| a.spec.device.cmp(&b.spec.device));
    Ok((out, warnings))
}

/// Every `--exclude` names a disk of the instance, and not its boot disk.
fn check_excludes(inst: &Instance, adj: &Adjustments, boot_target: &str) -> Result<()> {
    let known: Vec<&str> = inst.disks.iter().map(|d| d.target_dev.as_str()).collect();
    for ex in &adj.exclude {
        let ex = ex.trim();
        if !known.contains(&ex) {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "--exclude {ex}: instance {} has no disk {ex} (its disks: {})",
                    inst.name,
                    known.join(", ")
                ),
            ));
        }
        if ex == boot_target {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("--exclude {ex}: {ex} is the instance's boot disk, which becomes the system disk; it cannot be left out"),
            ));
        }
    }
    Ok(())
}

/// Applies `--disk device=...` entries: a disk of the instance grows; any other entry is a new
/// disk, returned to be placed.
fn adjust(inst: &Instance, adj: &Adjustments, out: &mut [MappedDisk]) -> Result<Vec<MappedDisk>> {
    let excluded = |t: &str| adj.exclude.iter().any(|e| e.trim() == t);
    let mut added = Vec::new();
    for (n, a) in adj.entries.iter().enumerate() {
        let label = a.device.as_deref().unwrap_or("(no device)");
        let hit = a.device.as_deref().and_then(|dev| {
            out.iter().position(|m| {
                m.original_target.as_deref() == Some(dev)
                    || m.spec
                        .device
                        .as_ref()
                        .is_some_and(|d| d.short_name() == dev)
            })
        });
        if let Some(dev) = a.device.as_deref().filter(|d| excluded(d)) {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("--disk device={dev}: {dev} is excluded; drop one of --exclude {dev} and this --disk"),
            ));
        }
        match hit {
            Some(i) => {
                if a.snapshot.is_some() || a.format.is_some() {
                    return Err(Error::new(
                        Code::InvalidParameter,
                        format!(
                            "--disk entry {}: {label} is already a disk of instance {}; only size= may change it \
                             (to replace it, --exclude it and add the new disk under another device)",
                            n + 1,
                            inst.name
                        ),
                    ));
                }
                let size = a.size.ok_or_else(|| {
                    Error::new(
                        Code::MissingParameter,
                        format!("--disk entry {}: {label} is a disk of the instance; give size= to grow it", n + 1),
                    )
                })?;
                if out[i].spec.size.is_some() {
                    return Err(Error::new(
                        Code::InvalidDeviceInUse,
                        format!("--disk entry {}: {label} is adjusted twice", n + 1),
                    ));
                }
                out[i].spec.size = Some(size);
            }
            None => {
                if a.snapshot.is_none() && a.size.is_none() {
                    return Err(Error::new(
                        Code::MissingParameter,
                        format!(
                            "--disk entry {}: a new disk {label} needs snapshot= or size=",
                            n + 1
                        ),
                    ));
                }
                // An explicit image device keeps its name; anything else takes the next free one.
                let device = a
                    .device
                    .as_deref()
                    .filter(|d| d.starts_with("xvd"))
                    .map(Device::parse)
                    .transpose()?;
                if device.as_ref().is_some_and(Device::is_system) {
                    return Err(Error::new(
                        Code::InvalidDeviceMalformed,
                        format!(
                            "--disk entry {}: {SYSTEM_DEVICE} is the instance's boot disk",
                            n + 1
                        ),
                    ));
                }
                added.push(MappedDisk {
                    spec: DiskSpec {
                        snapshot: a.snapshot.clone(),
                        device,
                        size: a.size,
                        disk_type: Some(DiskType::Data),
                        format: a.format,
                        crypt: Default::default(),
                        output_format: None,
                    },
                    original_target: None,
                });
            }
        }
    }
    Ok(added)
}

/// Puts the added disks on devices: explicit devices must be free; the rest take the next free
/// names.
fn place_added(
    inst: &Instance,
    adj: &Adjustments,
    out: &mut Vec<MappedDisk>,
    added: Vec<MappedDisk>,
) -> Result<()> {
    if out.len() - 1 + added.len() > MAX_DATA_DISKS {
        return Err(too_many(inst, out.len() - 1 + added.len(), adj));
    }
    // Added disks: explicit devices must be free; the rest take the next free names.
    for a in &added {
        if let Some(d) = &a.spec.device {
            if out.iter().any(|m| m.spec.device.as_ref() == Some(d)) {
                return Err(Error::new(
                    Code::InvalidDeviceInUse,
                    format!("{d} is given to two disks; each device may appear once"),
                ));
            }
            out.push(a.clone());
        }
    }
    for mut a in added.into_iter().filter(|a| a.spec.device.is_none()) {
        let free = Device::first_free(|d| out.iter().any(|m| m.spec.device.as_ref() == Some(d)))
            .ok_or_else(|| too_many(inst, MAX_DATA_DISKS + 1, adj))?;
        a.spec.device = Some(free);
        out.push(a);
    }
    Ok(())
}

fn too_many(inst: &Instance, n: usize, adj: &Adjustments) -> Error {
    let hint = if adj.exclude.is_empty() {
        " (leave some out with --exclude TARGET)"
    } else {
        ""
    };
    Error::new(
        Code::QuotaExceedDataDisk,
        format!(
            "instance {} would give {n} data disks; an image holds at most {MAX_DATA_DISKS}{hint}",
            inst.name
        ),
    )
}

fn instance_entry(d: &InstanceDisk, device: Device, disk_type: DiskType) -> MappedDisk {
    MappedDisk {
        spec: DiskSpec {
            snapshot: Some(d.source.clone()),
            device: Some(device),
            size: None,
            disk_type: Some(disk_type),
            format: d.format,
            crypt: Default::default(),
            output_format: None,
        },
        original_target: Some(d.target_dev.clone()),
    }
}

/// Checks the XML's `<backingStore>` against the chain kiln read from the file (`SourceInfo.chain`,
/// the disk itself first). A backing file the XML lists but the file does not name, a different file
/// or format, or (when the XML's chain is complete) a backing file the XML omits, is an error.
pub fn check_backing(disk: &InstanceDisk, chain: &[ChainEntry]) -> Result<()> {
    let actual = chain.get(1..).unwrap_or_default();
    let mismatch = |detail: String| {
        Error::new(
            Code::InstanceBackingMismatch,
            format!(
                "disk {} ({}): {detail}; the domain XML is stale or names other files: \
                 refresh it with `virsh dumpxml`, or check the image with `qemu-img info --backing-chain`",
                disk.target_dev,
                disk.source.display()
            ),
        )
    };
    for (i, (path, format)) in disk.backing_store.iter().enumerate() {
        let Some(entry) = actual.get(i) else {
            let what = match i {
                0 => "the file has no backing file".to_string(),
                _ => format!("the file's chain ends at {}", actual[i - 1].path.display()),
            };
            return Err(mismatch(format!(
                "the XML lists backing file {} at depth {}, but {what}",
                path.display(),
                i + 1
            )));
        };
        if !same_file(path, &entry.path) {
            return Err(mismatch(format!(
                "backing file {} is {} in the XML but {} in the image",
                i + 1,
                path.display(),
                entry.path.display()
            )));
        }
        if let Some(f) = format.filter(|f| *f != entry.format) {
            return Err(mismatch(format!(
                "backing file {} ({}) is {} in the XML but kiln reads it as {}",
                i + 1,
                entry.path.display(),
                f.as_str(),
                entry.format.as_str()
            )));
        }
    }
    if disk.backing_complete && actual.len() > disk.backing_store.len() {
        let extra = &actual[disk.backing_store.len()];
        return Err(mismatch(format!(
            "the image has backing file {} which the XML's <backingStore> does not list",
            extra.path.display()
        )));
    }
    Ok(())
}

/// Same file: same path, or the same inode when both exist.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn dom(devices: &str, os: &str) -> String {
        format!(
            "<domain type='kvm'><name>web1</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>\
             <os><type>hvm</type>{os}</os><devices>{devices}</devices></domain>"
        )
    }

    fn file_disk(target: &str, file: &str, extra: &str) -> String {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{file}'/><target dev='{target}' bus='virtio'/>{extra}</disk>"
        )
    }

    fn parse(xml: &str) -> Instance {
        parse_domain(xml, Path::new("/vm")).unwrap()
    }

    fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
        r.unwrap_err().code()
    }

    fn three() -> Instance {
        parse(&dom(
            &[
                file_disk("vda", "/vm/a.qcow2", ""),
                file_disk("vdb", "/vm/b.qcow2", ""),
                file_disk("vdc", "/vm/c.qcow2", ""),
            ]
            .concat(),
            "",
        ))
    }

    fn layout(m: &[MappedDisk]) -> Vec<(String, Option<String>, Option<u64>)> {
        m.iter()
            .map(|d| {
                (
                    d.spec.device.as_ref().unwrap().to_string(),
                    d.original_target.clone(),
                    d.spec.size,
                )
            })
            .collect()
    }

    fn adj(exclude: &[&str], entries: &[&str]) -> Adjustments {
        Adjustments {
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            entries: entries
                .iter()
                .map(|e| Adjustment::parse(e).unwrap())
                .collect(),
        }
    }

    #[test]
    fn boot_order_on_the_second_disk_makes_it_the_system_disk() {
        let inst = parse(&dom(
            &[
                file_disk("vda", "a.qcow2", ""),
                file_disk("vdb", "b.qcow2", "<boot order='1'/>"),
            ]
            .concat(),
            "",
        ));
        assert_eq!(inst.name, "web1");
        assert_eq!(
            inst.uuid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(inst.boot, 1);
        assert_eq!(inst.disks[0].source, Path::new("/vm/a.qcow2"));
        let (m, w) = to_disk_specs(&inst, &Adjustments::default()).unwrap();
        assert!(w.is_empty());
        assert_eq!(
            layout(&m),
            [
                ("/dev/xvda".into(), Some("vdb".into()), None),
                ("/dev/xvdb".into(), Some("vda".into()), None)
            ]
        );
        assert_eq!(m[0].spec.disk_type, Some(DiskType::System));
        assert_eq!(m[0].spec.snapshot, Some(PathBuf::from("/vm/b.qcow2")));
        assert_eq!(m[0].spec.format, Some(Format::Qcow2));
        // The planner accepts what comes out.
        let specs: Vec<DiskSpec> = m.iter().map(|d| d.spec.clone()).collect();
        let l = crate::request::plan::assign_devices(&specs, None).unwrap();
        assert_eq!(l.disks[0].snapshot, Some(PathBuf::from("/vm/b.qcow2")));
    }

    #[test]
    fn lowest_boot_order_wins_and_os_boot_hd_means_the_first_disk() {
        let inst = parse(&dom(
            &[
                file_disk("vda", "a", "<boot order='3'/>"),
                file_disk("vdb", "b", ""),
                file_disk("vdc", "c", "<boot order='2'/>"),
            ]
            .concat(),
            "",
        ));
        assert_eq!(inst.boot, 2);
        let inst = parse(&dom(
            &[file_disk("vdb", "b", ""), file_disk("vda", "a", "")].concat(),
            "<boot dev='hd'/>",
        ));
        assert_eq!(inst.boot, 0);
        assert_eq!(inst.disks[0].target_dev, "vdb");
        let bad = dom(&file_disk("vda", "a", "<boot order='x'/>"), "");
        assert_eq!(
            code(parse_domain(&bad, Path::new("/"))),
            Code::InvalidInstanceMalformed
        );
    }

    #[test]
    fn cdrom_and_floppy_are_skipped_with_a_note() {
        let inst = parse(&dom(
            &[
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
                 <source file='/iso/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>",
                "<disk type='file' device='floppy'><target dev='fda'/></disk>",
                &file_disk("vda", "a", ""),
            ]
            .concat(),
            "",
        ));
        assert_eq!(inst.disks.len(), 1);
        assert_eq!(inst.skipped.len(), 2);
        assert!(inst.skipped[0].contains("cdrom sda") && inst.skipped[0].contains("install.iso"));
        let (_, w) = to_disk_specs(&inst, &Adjustments::default()).unwrap();
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn network_disks_and_other_drivers_are_refused_by_name() {
        let net = dom(
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <source protocol='rbd' name='pool/vol1'/><target dev='vdb' bus='virtio'/></disk>",
            "",
        );
        let e = parse_domain(&net, Path::new("/")).unwrap_err();
        assert_eq!(e.code(), Code::InstanceDiskUnsupported);
        assert!(
            e.message().contains("vdb") && e.message().contains("pool/vol1"),
            "{e}"
        );
        let qed = dom(
            "<disk type='file' device='disk'><driver name='qemu' type='qed'/>\
             <source file='/x.qed'/><target dev='vda'/></disk>",
            "",
        );
        let e = parse_domain(&qed, Path::new("/")).unwrap_err();
        assert_eq!(e.code(), Code::InstanceDiskUnsupported);
        assert!(e.message().contains("qed"));
        let vol = dom(
            "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vda'/></disk>",
            "",
        );
        assert_eq!(
            code(parse_domain(&vol, Path::new("/"))),
            Code::InstanceDiskUnsupported
        );
    }

    #[test]
    fn block_disks_raw_driver_and_no_driver() {
        let inst = parse(&dom(
            "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>\
             <source dev='/dev/vg0/root'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='file' device='disk'><source file='rel/d.img'/><target dev='sdb' bus='scsi'/></disk>",
            "",
        ));
        assert_eq!(inst.disks[0].kind, SourceKind::Block);
        assert_eq!(inst.disks[0].source, Path::new("/dev/vg0/root"));
        assert_eq!(inst.disks[0].format, Some(Format::Raw));
        assert_eq!(inst.disks[1].format, None);
        assert_eq!(inst.disks[1].source, Path::new("/vm/rel/d.img"));
        assert_eq!(inst.disks[1].bus.as_deref(), Some("scsi"));
    }

    #[test]
    fn malformed_xml_has_its_code() {
        for bad in [
            "not xml",
            "<network><name>x</name></network>",
            "<domain><devices/></domain>",
            &dom(
                "<disk type='file' device='disk'><target dev='vda'/></disk>",
                "",
            ),
            &dom(
                "<disk type='file' device='disk'><source file='a'/></disk>",
                "",
            ),
            &dom(
                &[file_disk("vda", "a", ""), file_disk("vda", "b", "")].concat(),
                "",
            ),
            "<!DOCTYPE d [<!ENTITY a 'x'>]><domain><name>&a;</name></domain>",
        ] {
            assert_eq!(
                code(parse_domain(bad, Path::new("/"))),
                Code::InvalidInstanceMalformed,
                "{bad}"
            );
        }
        assert_eq!(
            code(parse_domain(&dom("", ""), Path::new("/"))),
            Code::NoSystemDisk
        );
    }

    #[test]
    fn backing_store_is_read_outermost_first() {
        let inst = parse(&dom(
            &file_disk(
                "vda",
                "/vm/top.qcow2",
                "<backingStore type='file'><format type='qcow2'/><source file='mid.qcow2'/>\
                 <backingStore type='block'><format type='raw'/><source dev='/dev/sdz'/>\
                 <backingStore/></backingStore></backingStore>",
            ),
            "",
        ));
        let d = &inst.disks[0];
        assert_eq!(
            d.backing_store,
            [
                (PathBuf::from("/vm/mid.qcow2"), Some(Format::Qcow2)),
                (PathBuf::from("/dev/sdz"), Some(Format::Raw))
            ]
        );
        assert!(d.backing_complete);
        let chain = |paths: &[(&str, Format)]| -> Vec<ChainEntry> {
            paths
                .iter()
                .map(|(p, f)| ChainEntry {
                    path: PathBuf::from(p),
                    format: *f,
                })
                .collect()
        };
        let good = chain(&[
            ("/vm/top.qcow2", Format::Qcow2),
            ("/vm/mid.qcow2", Format::Qcow2),
            ("/dev/sdz", Format::Raw),
        ]);
        check_backing(d, &good).unwrap();
        let short = chain(&[
            ("/vm/top.qcow2", Format::Qcow2),
            ("/vm/mid.qcow2", Format::Qcow2),
        ]);
        let e = check_backing(d, &short).unwrap_err();
        assert_eq!(e.code(), Code::InstanceBackingMismatch);
        assert!(e.message().contains("/dev/sdz"), "{e}");
        let other = chain(&[
            ("/vm/top.qcow2", Format::Qcow2),
            ("/vm/other.qcow2", Format::Qcow2),
            ("/dev/sdz", Format::Raw),
        ]);
        assert!(check_backing(d, &other)
            .unwrap_err()
            .message()
            .contains("other.qcow2"));
        let fmt = chain(&[
            ("/vm/top.qcow2", Format::Qcow2),
            ("/vm/mid.qcow2", Format::Raw),
            ("/dev/sdz", Format::Raw),
        ]);
        assert_eq!(code(check_backing(d, &fmt)), Code::InstanceBackingMismatch);
        let mut longer = good.clone();
        longer.push(ChainEntry {
            path: "/vm/base".into(),
            format: Format::Raw,
        });
        assert!(check_backing(d, &longer)
            .unwrap_err()
            .message()
            .contains("/vm/base"));
        // An XML that does not end its chain says nothing past its last entry.
        let mut partial = d.clone();
        partial.backing_complete = false;
        check_backing(&partial, &longer).unwrap();
        partial.backing_store.clear();
        check_backing(&partial, &longer).unwrap();
    }

    #[test]
    fn exclude_leaves_a_disk_out_and_the_rest_move_up() {
        let (m, _) = to_disk_specs(&three(), &adj(&["vdb"], &[])).unwrap();
        assert_eq!(
            layout(&m),
            [
                ("/dev/xvda".into(), Some("vda".into()), None),
                ("/dev/xvdb".into(), Some("vdc".into()), None)
            ]
        );
        assert_eq!(
            code(to_disk_specs(&three(), &adj(&["vdq"], &[]))),
            Code::InvalidParameter
        );
        assert_eq!(
            code(to_disk_specs(&three(), &adj(&["vda"], &[]))),
            Code::InvalidParameter
        );
    }

    #[test]
    fn grow_sets_the_size_of_that_disk() {
        let (m, _) = to_disk_specs(&three(), &adj(&[], &["device=vdc,size=100G"])).unwrap();
        assert_eq!(m[2].original_target.as_deref(), Some("vdc"));
        assert_eq!(m[2].spec.size, Some(100 * GIB));
        // By image device too.
        let (m, _) = to_disk_specs(&three(), &adj(&[], &["device=/dev/xvdb,size=7G"])).unwrap();
        assert_eq!(m[1].spec.size, Some(7 * GIB));
        // The "only grows" rule is the planner's, on the carried size.
        assert_eq!(
            crate::request::plan::resolve_size("/dev/xvdc", m[1].spec.size, Some(10 * GIB))
                .unwrap_err()
                .code(),
            Code::InvalidSize
        );
        for (bad, c) in [
            ("device=vdb,snapshot=x.qcow2", Code::InvalidParameter),
            ("device=vdb", Code::MissingParameter),
        ] {
            assert_eq!(code(to_disk_specs(&three(), &adj(&[], &[bad]))), c, "{bad}");
        }
        assert_eq!(
            code(to_disk_specs(
                &three(),
                &adj(&[], &["device=vdb,size=5G", "device=xvdb,size=6G"])
            )),
            Code::InvalidDeviceInUse
        );
        assert_eq!(
            code(to_disk_specs(
                &three(),
                &adj(&["vdb"], &["device=vdb,size=5G"])
            )),
            Code::InvalidParameter
        );
    }

    #[test]
    fn unknown_targets_add_disks() {
        let (m, _) = to_disk_specs(
            &three(),
            &adj(
                &[],
                &[
                    "device=vdx,snapshot=extra.qcow2",
                    "device=vdy,size=20G",
                    "device=xvdk,size=1G",
                ],
            ),
        )
        .unwrap();
        assert_eq!(
            layout(&m),
            [
                ("/dev/xvda".into(), Some("vda".into()), None),
                ("/dev/xvdb".into(), Some("vdb".into()), None),
                ("/dev/xvdc".into(), Some("vdc".into()), None),
                ("/dev/xvdd".into(), None, None),
                ("/dev/xvde".into(), None, Some(20 * GIB)),
                ("/dev/xvdk".into(), None, Some(GIB)),
            ]
        );
        assert_eq!(m[3].spec.snapshot, Some(PathBuf::from("extra.qcow2")));
        assert_eq!(m[3].spec.disk_type, Some(DiskType::Data));
        assert_eq!(
            code(to_disk_specs(&three(), &adj(&[], &["device=vdx"]))),
            Code::MissingParameter
        );
        // xvda names the boot disk: it may grow, not be replaced.
        let (m, _) = to_disk_specs(&three(), &adj(&[], &["device=xvda,size=99G"])).unwrap();
        assert_eq!(m[0].spec.size, Some(99 * GIB));
        assert_eq!(
            code(to_disk_specs(
                &three(),
                &adj(&[], &["device=xvda,snapshot=x"])
            )),
            Code::InvalidParameter
        );
    }

    #[test]
    fn the_total_stays_within_sixteen_data_disks() {
        let adds: Vec<String> = (0..14).map(|i| format!("device=vdz{i},size=1G")).collect();
        let adds: Vec<&str> = adds.iter().map(String::as_str).collect();
        assert!(to_disk_specs(&three(), &adj(&[], &adds)).is_ok());
        let mut more = adds.clone();
        more.push("size=1G");
        assert_eq!(
            code(to_disk_specs(&three(), &adj(&[], &more))),
            Code::QuotaExceedDataDisk
        );
        assert!(to_disk_specs(&three(), &adj(&["vdc"], &more)).is_ok());
        let many: String = (0..18)
            .map(|i| file_disk(&format!("vd{}", (b'a' + i) as char), "f", ""))
            .collect();
        let inst = parse(&dom(&many, ""));
        assert_eq!(
            code(to_disk_specs(&inst, &Adjustments::default())),
            Code::QuotaExceedDataDisk
        );
        assert!(to_disk_specs(&inst, &adj(&["vdb"], &[])).is_ok());
    }

    #[test]
    fn adjustments_parse() {
        let a = Adjustment::parse("device=vdb,size=100G").unwrap();
        assert_eq!(a.device.as_deref(), Some("vdb"));
        assert_eq!(a.size, Some(100 * GIB));
        assert_eq!(
            Adjustment::parse("device=/dev/xvdc")
                .unwrap()
                .device
                .as_deref(),
            Some("xvdc")
        );
        assert_eq!(
            Adjustment::parse("device=VD B").unwrap_err().code(),
            Code::InvalidDeviceMalformed
        );
        assert_eq!(
            Adjustment::parse("type=system,size=1G").unwrap_err().code(),
            Code::InvalidParameter
        );
        assert_eq!(
            Adjustment::parse("size=0").unwrap_err().code(),
            Code::InvalidSize
        );
    }

    #[test]
    fn data_disks_follow_target_order() {
        let inst = parse(&dom(
            &[
                file_disk("vdaa", "aa", ""),
                file_disk("vdc", "c", ""),
                file_disk("vda", "a", ""),
                file_disk("vdb", "b", ""),
            ]
            .concat(),
            "",
        ));
        let (m, _) = to_disk_specs(&inst, &Adjustments::default()).unwrap();
        let t: Vec<_> = m
            .iter()
            .map(|d| d.original_target.clone().unwrap())
            .collect();
        assert_eq!(t, ["vdaa", "vda", "vdb", "vdc"]);
    }
}
