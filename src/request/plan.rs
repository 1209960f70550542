//! The image request and its rules, with no I/O: which entry is the system disk, which device each
//! data disk gets, how big each disk ends up. Everything here is the cloud API's rules, unit-tested.

use std::path::PathBuf;

use crate::error::{Code, Error, Result};
use crate::format::{Format, OutputFormat};
use crate::util::size::{self, GIB};

/// Data disks an image may carry besides its system disk.
pub(crate) const MAX_DATA_DISKS: usize = 16;
/// Size of a disk given without a snapshot or a size (the API's default).
pub(crate) const DEFAULT_EMPTY_DISK_SIZE: u64 = 5 * GIB;
pub(crate) const SYSTEM_DEVICE: &str = "/dev/xvda";

crate::image::attributes::api_enum! {
    /// The system disk, or a data disk.
    pub enum DiskType {
        System = "system",
        Data = "data",
    }
}

/// One `--disk` entry as the user typed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSpec {
    pub snapshot: Option<PathBuf>,
    pub device: Option<Device>,
    pub size: Option<u64>,
    pub(crate) disk_type: Option<DiskType>,
    pub format: Option<Format>,
    /// This disk's encryption settings (`key-file=`, `encrypt=true`).
    pub(crate) crypt: DiskCrypt,
    /// `output-format=` (a request file's `OutputFormat`): this disk's output format, over the
    /// image's `--format`.
    pub(crate) output_format: Option<OutputFormat>,
}

/// One disk's own encryption settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCrypt {
    /// `key-file=FILE` (a request file's `KeyFile`): the key of this disk's encrypted source, and
    /// of its output when encrypted without a command-line key.
    pub(crate) key_file: Option<PathBuf>,
    /// `encrypt=true` (a request file's `Encrypted`): encrypt this disk's output.
    pub(crate) encrypt: bool,
}

impl DiskSpec {
    /// Parses `snapshot=base.qcow2,device=/dev/xvda,type=system,size=40G,format=qcow2`.
    pub(crate) fn parse(text: &str) -> Result<DiskSpec> {
        let mut spec = DiskSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("--disk '{text}': '{part}' is not KEY=VALUE (keys: snapshot, device, size, type, format, output-format, key-file, encrypt)"),
                )
            })?;
            let value = value.trim();
            match key.trim().to_ascii_lowercase().as_str() {
                "snapshot" | "snapshotid" | "snapshot_id" | "file" => {
                    if value.is_empty() {
                        return Err(Error::new(Code::MissingParameter, format!("--disk '{text}': snapshot= is empty")));
                    }
                    spec.snapshot = Some(PathBuf::from(value));
                }
                "device" => spec.device = Some(Device::parse(value)?),
                "key-file" | "key_file" | "keyfile" => {
                    spec.crypt.key_file = Some(PathBuf::from(value))
                }
                "key" | "passphrase" => {
                    return Err(crate::request::validate::key_on_argv(&format!("--disk {key}=")))
                }
                "encrypt" | "encrypted" => {
                    spec.crypt.encrypt = match value.to_ascii_lowercase().as_str() {
                        "true" | "yes" | "1" | "on" => true,
                        "false" | "no" | "0" | "off" => false,
                        _ => {
                            return Err(Error::new(
                                Code::InvalidParameter,
                                format!("--disk '{text}': encrypt='{value}' is neither true nor false"),
                            ))
                        }
                    }
                }
                "size" => spec.size = Some(size::parse_size(value)?),
                "type" | "disktype" | "disk_type" => {
                    spec.disk_type = Some(DiskType::parse_loose(value).ok_or_else(|| {
                        Error::new(
                            Code::InvalidParameter,
                            format!("--disk '{text}': type '{value}' is neither 'system' nor 'data'"),
                        )
                    })?)
                }
                "output-format" | "output_format" | "outputformat" => {
                    spec.output_format = Some(OutputFormat::named(value).ok_or_else(|| {
                        Error::new(
                            Code::InvalidParameter,
                            format!(
                                "--disk '{text}': output-format '{value}' is not one kiln writes ({})",
                                crate::format::output_names().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?)
                }
                "format" => {
                    spec.format = Some(Format::parse(value).ok_or_else(|| {
                        Error::new(
                            Code::InvalidParameter,
                            format!("--disk '{text}': format '{value}' is neither 'raw' nor 'qcow2'"),
                        )
                    })?)
                }
                other => {
                    return Err(Error::new(
                        Code::InvalidParameter,
                        format!("--disk '{text}': unknown key '{other}' (keys: snapshot, device, size, type, format, output-format, key-file, encrypt)"),
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// A device name as the API spells it: `/dev/xvda` (the system disk) to `/dev/xvdz`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Device(String);

impl Device {
    /// `xvdb` → `/dev/xvdb`; anything but `/dev/xvd[a-z]` is malformed.
    pub(crate) fn parse(text: &str) -> Result<Device> {
        let name = text.strip_prefix("/dev/").unwrap_or(text);
        let ok =
            name.len() == 4 && name.starts_with("xvd") && name.as_bytes()[3].is_ascii_lowercase();
        if !ok {
            return Err(Error::new(
                Code::InvalidDeviceMalformed,
                format!("device '{text}' is not valid: the system disk is /dev/xvda and data disks are /dev/xvdb to /dev/xvdz"),
            ));
        }
        Ok(Device(format!("/dev/{name}")))
    }

    /// The system disk's device.
    pub(crate) fn system() -> Device {
        Device(SYSTEM_DEVICE.to_string())
    }

    /// The `i`-th data device: `/dev/xvdb` for 1 ... `/dev/xvdz` for 25.
    pub(crate) fn data(i: usize) -> Device {
        debug_assert!((1..=25).contains(&i));
        Device(format!("/dev/xvd{}", (b'a' + i as u8) as char))
    }

    /// The first data device (`/dev/xvdb` on) that `used` does not hold.
    pub(crate) fn first_free(used: impl Fn(&Device) -> bool) -> Option<Device> {
        (1..=25).map(Device::data).find(|d| !used(d))
    }

    pub(crate) fn is_system(&self) -> bool {
        self.0 == SYSTEM_DEVICE
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// `xvdb` for `/dev/xvdb`: the output file's stem.
    pub(crate) fn short_name(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }
}

impl std::ops::Deref for Device {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for Device {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A disk with its device settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    pub(crate) device: Device,
    pub(crate) disk_type: DiskType,
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) format: Option<Format>,
    pub(crate) size: Option<u64>,
    pub(crate) crypt: DiskCrypt,
    /// This disk's own output format (`output-format=`), over the image's.
    pub(crate) output_format: Option<OutputFormat>,
}

impl PlannedDisk {
    /// `xvdb` for `/dev/xvdb`: the output file's stem.
    pub(crate) fn short_name(&self) -> &str {
        self.device.short_name()
    }
}

/// What `assign_devices` decided, with warnings for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// The system disk first, then data disks by device name.
    pub disks: Vec<PlannedDisk>,
    pub(crate) warnings: Vec<String>,
}

/// Applies the API's device rules: `--disk` mappings win over `--snapshot` (with a warning), exactly one
/// system disk on /dev/xvda, at most 16 data disks on /dev/xvdb../dev/xvdz, no device twice, and data
/// entries without a device take the next free names in order.
pub fn assign_devices(disks: &[DiskSpec], snapshot: Option<&PathBuf>) -> Result<DiskLayout> {
    let mut warnings = Vec::new();
    let specs: Vec<DiskSpec> = if !disks.is_empty() {
        if let Some(s) = snapshot {
            warnings.push(format!(
                "--snapshot {} was ignored: --disk mappings take priority",
                s.display()
            ));
        }
        disks.to_vec()
    } else if let Some(s) = snapshot {
        vec![DiskSpec {
            snapshot: Some(s.clone()),
            disk_type: Some(DiskType::System),
            ..DiskSpec::default()
        }]
    } else {
        return Err(Error::new(
            Code::MissingParameter,
            "no disks given: name the system disk with --snapshot FILE or --disk snapshot=FILE,device=/dev/xvda",
        ));
    };

    // Which entry is the system disk.
    let mut system_idx = None;
    for (i, s) in specs.iter().enumerate() {
        let by_device = s.device.as_ref().is_some_and(Device::is_system);
        let is_system = match s.disk_type {
            Some(DiskType::System) => {
                if let Some(d) = s.device.as_ref().filter(|d| !d.is_system()) {
                    return Err(Error::new(
                        Code::InvalidDeviceMalformed,
                        format!("the system disk must be {SYSTEM_DEVICE}, not {d}; drop device= or type=system"),
                    ));
                }
                true
            }
            Some(DiskType::Data) if by_device => {
                return Err(Error::new(
                    Code::InvalidDeviceMalformed,
                    format!(
                        "{SYSTEM_DEVICE} is the system disk's device; a data disk cannot use it"
                    ),
                ))
            }
            _ => by_device,
        };
        if is_system {
            if let Some(prev) = system_idx {
                return Err(Error::new(
                    Code::MultipleSystemDisks,
                    format!("disk entries {} and {} both claim the system disk; an image has exactly one", prev + 1, i + 1),
                ));
            }
            system_idx = Some(i);
        }
    }
    let system_idx = system_idx.ok_or_else(|| {
        Error::new(
            Code::NoSystemDisk,
            "no system disk: mark one entry with type=system or device=/dev/xvda",
        )
    })?;
    if specs[system_idx].snapshot.is_none() {
        return Err(Error::new(
            Code::MissingParameter,
            "the system disk has no snapshot: add snapshot=FILE to its --disk entry",
        ));
    }
    let data_count = specs.len() - 1;
    if data_count > MAX_DATA_DISKS {
        return Err(Error::new(
            Code::QuotaExceedDataDisk,
            format!("{data_count} data disks given; an image holds at most {MAX_DATA_DISKS}"),
        ));
    }

    // Explicit devices first, then the free names in order.
    let mut used = vec![Device::system()];
    for (i, s) in specs.iter().enumerate() {
        if i == system_idx {
            continue;
        }
        if let Some(d) = &s.device {
            if used.contains(d) {
                return Err(Error::new(
                    Code::InvalidDeviceInUse,
                    format!("device {d} is given to two disks; each device may appear once"),
                ));
            }
            used.push(d.clone());
        }
    }
    let mut out = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let (device, disk_type) = if i == system_idx {
            (Device::system(), DiskType::System)
        } else {
            (next_device(s, &mut used)?, DiskType::Data)
        };
        out.push(PlannedDisk {
            device,
            disk_type,
            snapshot: s.snapshot.clone(),
            format: s.format,
            size: s.size,
            crypt: s.crypt.clone(),
            output_format: s.output_format,
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(DiskLayout {
        disks: out,
        warnings,
    })
}

/// A data-disk image (Huawei's data_images): only data disks, on /dev/xvdb../dev/xvdz in the order
/// given unless `device=` says otherwise; no system disk.
pub(crate) fn assign_data_devices(disks: &[DiskSpec]) -> Result<DiskLayout> {
    if disks.is_empty() {
        return Err(Error::new(
            Code::MissingParameter,
            "a data-disk image needs at least one --disk snapshot=FILE",
        ));
    }
    if let Some(s) = disks.iter().find(|s| {
        s.disk_type == Some(DiskType::System) || s.device.as_ref().is_some_and(Device::is_system)
    }) {
        return Err(Error::new(
            Code::InvalidParameter,
            format!(
                "--data-image makes an image of data disks only; drop type=system / device={SYSTEM_DEVICE} from the entry for {}",
                s.snapshot.as_deref().map_or("an empty disk".into(), |p| p.display().to_string())
            ),
        ));
    }
    if disks.len() > MAX_DATA_DISKS {
        return Err(Error::new(
            Code::QuotaExceedDataDisk,
            format!(
                "{} data disks given; an image holds at most {MAX_DATA_DISKS}",
                disks.len()
            ),
        ));
    }
    let mut used: Vec<Device> = Vec::new();
    for d in disks.iter().filter_map(|s| s.device.clone()) {
        if used.contains(&d) {
            return Err(Error::new(
                Code::InvalidDeviceInUse,
                format!("device {d} is given to two disks; each device may appear once"),
            ));
        }
        used.push(d);
    }
    let mut out = Vec::with_capacity(disks.len());
    for s in disks {
        let device = next_device(s, &mut used)?;
        out.push(PlannedDisk {
            device,
            disk_type: DiskType::Data,
            snapshot: s.snapshot.clone(),
            format: s.format,
            size: s.size,
            crypt: s.crypt.clone(),
            output_format: s.output_format,
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(DiskLayout {
        disks: out,
        warnings: Vec::new(),
    })
}

/// The entry's own device, or the first data device that is neither explicit elsewhere nor taken
/// (`used` holds every explicit device; a device handed out here joins it).
fn next_device(s: &DiskSpec, used: &mut Vec<Device>) -> Result<Device> {
    if let Some(d) = &s.device {
        return Ok(d.clone());
    }
    let d = Device::first_free(|d| used.contains(d)).ok_or_else(|| {
        Error::new(
            Code::QuotaExceedDataDisk,
            "no free data-disk device left (/dev/xvdb to /dev/xvdz)",
        )
    })?;
    used.push(d.clone());
    Ok(d)
}

/// The output disk's virtual size: the source's, or `requested` when that is larger. A disk only grows.
pub fn resolve_size(device: &str, requested: Option<u64>, source_size: Option<u64>) -> Result<u64> {
    match (requested, source_size) {
        (None, Some(src)) => Ok(src),
        (None, None) => Ok(DEFAULT_EMPTY_DISK_SIZE),
        (Some(req), None) => Ok(req),
        (Some(req), Some(src)) if req >= src => Ok(req),
        (Some(req), Some(src)) => Err(Error::new(
            Code::InvalidSize,
            format!(
                "{device}: size {req} bytes is smaller than its snapshot ({src} bytes); a disk can only grow, so give size={} or more",
                src.div_ceil(GIB)
            ),
        )
        .on_device(device)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> DiskSpec {
        DiskSpec::parse(s).unwrap()
    }

    fn code(r: Result<DiskLayout>) -> Code {
        r.unwrap_err().code()
    }

    #[test]
    fn parses_every_key() {
        let s = spec("snapshot=a.qcow2, device=xvdb ,size=40G,type=data,format=qcow2");
        assert_eq!(s.snapshot, Some(PathBuf::from("a.qcow2")));
        assert_eq!(s.device.as_deref(), Some("/dev/xvdb"));
        assert_eq!(s.size, Some(40 * GIB));
        assert_eq!(s.disk_type, Some(DiskType::Data));
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(
            DiskSpec::parse("colour=red").unwrap_err().code(),
            Code::InvalidParameter
        );
        assert_eq!(
            DiskSpec::parse("device=sda").unwrap_err().code(),
            Code::InvalidDeviceMalformed
        );
        assert_eq!(
            DiskSpec::parse("size=-3").unwrap_err().code(),
            Code::InvalidSize
        );
    }

    #[test]
    fn devices_are_normalized_and_checked() {
        assert_eq!(Device::parse("xvdc").unwrap(), "/dev/xvdc");
        assert_eq!(Device::parse("/dev/xvdz").unwrap(), "/dev/xvdz");
        for bad in ["/dev/sda", "xvd", "xvdA", "/dev/xvdaa", "vdb", "/dev/xvd1"] {
            assert_eq!(
                Device::parse(bad).unwrap_err().code(),
                Code::InvalidDeviceMalformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_issue_example_lays_out_three_disks() {
        let l = assign_devices(
            &[
                spec("snapshot=base.qcow2,device=/dev/xvda,type=system"),
                spec("snapshot=data.raw,device=/dev/xvdb,size=40G"),
                spec("device=/dev/xvdc,size=10G"),
            ],
            None,
        )
        .unwrap();
        let devs: Vec<_> = l.disks.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(devs, ["/dev/xvda", "/dev/xvdb", "/dev/xvdc"]);
        assert_eq!(l.disks[0].disk_type, DiskType::System);
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn data_entries_without_device_take_the_next_free_names() {
        let l = assign_devices(
            &[
                spec("snapshot=d1"),
                spec("snapshot=s,type=system"),
                spec("device=xvdb"),
                spec("size=1G"),
            ],
            None,
        )
        .unwrap();
        let got: Vec<_> = l
            .disks
            .iter()
            .map(|d| (d.device.as_str(), d.snapshot.clone()))
            .collect();
        assert_eq!(got[0], ("/dev/xvda", Some(PathBuf::from("s"))));
        assert_eq!(got[1], ("/dev/xvdb", None));
        assert_eq!(got[2], ("/dev/xvdc", Some(PathBuf::from("d1"))));
        assert_eq!(got[3].0, "/dev/xvdd");
    }

    #[test]
    fn snapshot_alone_is_the_system_disk_and_disk_wins_with_a_warning() {
        let p = PathBuf::from("base.qcow2");
        let l = assign_devices(&[], Some(&p)).unwrap();
        assert_eq!(l.disks.len(), 1);
        assert_eq!(l.disks[0].device, SYSTEM_DEVICE);
        let l = assign_devices(&[spec("snapshot=x,type=system")], Some(&p)).unwrap();
        assert_eq!(l.disks[0].snapshot, Some(PathBuf::from("x")));
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("base.qcow2"));
    }

    #[test]
    fn the_rules_have_their_codes() {
        assert_eq!(code(assign_devices(&[], None)), Code::MissingParameter);
        assert_eq!(
            code(assign_devices(&[spec("snapshot=a")], None)),
            Code::NoSystemDisk
        );
        assert_eq!(
            code(assign_devices(
                &[
                    spec("snapshot=a,type=system"),
                    spec("snapshot=b,device=xvda")
                ],
                None
            )),
            Code::MultipleSystemDisks
        );
        assert_eq!(
            code(assign_devices(
                &[
                    spec("snapshot=a,type=system"),
                    spec("device=xvdb"),
                    spec("device=xvdb")
                ],
                None
            )),
            Code::InvalidDeviceInUse
        );
        assert_eq!(
            code(assign_devices(
                &[spec("snapshot=a,type=system,device=xvdc")],
                None
            )),
            Code::InvalidDeviceMalformed
        );
        assert_eq!(
            code(assign_devices(&[spec("size=1G,type=system")], None)),
            Code::MissingParameter
        );
        let mut many = vec![spec("snapshot=s,type=system")];
        many.extend((0..16).map(|_| spec("size=1G")));
        assert!(assign_devices(&many, None).is_ok());
        many.push(spec("size=1G"));
        assert_eq!(code(assign_devices(&many, None)), Code::QuotaExceedDataDisk);
    }

    #[test]
    fn data_images_have_no_system_disk() {
        let l = assign_data_devices(&[
            spec("snapshot=v"),
            spec("size=1G,device=xvdc"),
            spec("size=2G"),
        ])
        .unwrap();
        let got: Vec<_> = l
            .disks
            .iter()
            .map(|d| (d.device.as_str(), d.disk_type))
            .collect();
        assert_eq!(
            got,
            [
                ("/dev/xvdb", DiskType::Data),
                ("/dev/xvdc", DiskType::Data),
                ("/dev/xvdd", DiskType::Data)
            ]
        );
        assert_eq!(
            assign_data_devices(&[]).unwrap_err().code(),
            Code::MissingParameter
        );
        assert_eq!(
            assign_data_devices(&[spec("snapshot=v,type=system")])
                .unwrap_err()
                .code(),
            Code::InvalidParameter
        );
        assert_eq!(
            assign_data_devices(&[spec("snapshot=v,device=xvda")])
                .unwrap_err()
                .code(),
            Code::InvalidParameter
        );
        let many: Vec<_> = (0..17).map(|_| spec("size=1G")).collect();
        assert_eq!(
            assign_data_devices(&many).unwrap_err().code(),
            Code::QuotaExceedDataDisk
        );
    }

    #[test]
    fn disks_only_grow() {
        assert_eq!(resolve_size("x", None, Some(100)).unwrap(), 100);
        assert_eq!(resolve_size("x", Some(200), Some(100)).unwrap(), 200);
        assert_eq!(
            resolve_size("x", None, None).unwrap(),
            DEFAULT_EMPTY_DISK_SIZE
        );
        assert_eq!(resolve_size("x", Some(GIB), None).unwrap(), GIB);
        assert_eq!(
            resolve_size("x", Some(50), Some(100)).unwrap_err().code(),
            Code::InvalidSize
        );
    }
}
