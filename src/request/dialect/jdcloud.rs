//! JD Cloud createImage: `POST /v1/regions/{regionId}/instances/{instanceId}:createImage` with
//! `name`, `description` and `dataDisks`. The instance is the request line's `instanceId`, here a
//! libvirt domain XML path (or `--instance FILE` when the file is the body alone).
//!
//! JD's rules: the name is 2 to 32 characters of CJK, letters, digits, `_`, `-`, `.`; the
//! description at most 256 characters; the system disk is `vda` and data devices run `vdb` to
//! `vdbm`; `noDevice` leaves a disk out, a new `deviceName` adds one (from `snapshotId`, or empty
//! with `diskType` and `diskSizeGB`); `diskSizeGB` is 20 to 16000 GiB in steps of 10 and only
//! grows a disk. kiln keeps its own device plan (`/dev/xvdX`) and records JD's names beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::fields::Fields;
use super::{request_target, resolve, Dialect, LoadOptions, Loaded};
use crate::error::{Code, Error, Result, VendorCode};
use crate::image::attributes::DialectRecord;
use crate::request::create::{self, InstanceDisks, InstanceSource};
use crate::request::file::RequestFile;
use crate::request::instance::{self, Instance};
use crate::request::plan::{Device, DiskSpec, DiskType, MAX_DATA_DISKS};
use crate::request::validate::is_cjk;

pub(crate) const KEYS: &[&str] = &["name", "description", "dataDisks"];
const DISK_KEYS: &[&str] = &[
    "deviceName",
    "noDevice",
    "cloudDiskSpec",
    "diskCategory",
    "autoDelete",
];
const SPEC_KEYS: &[&str] = &[
    "snapshotId",
    "diskSizeGB",
    "encrypt",
    "diskType",
    "iops",
    "az",
    "name",
    "description",
    "policyId",
    "charge",
    "multiAttachable",
];
/// DiskSpec fields the document says need not and cannot be given ("此参数无须指定且指定无效").
const IGNORED_SPEC_KEYS: &[&str] = &[
    "az",
    "name",
    "description",
    "policyId",
    "charge",
    "multiAttachable",
];
const DISK_TYPES: &[&str] = &["ssd.gp1", "ssd.io1", "hdd.std1"];
/// Most `dataDisks` entries read (JD names 64 data devices, each may be excluded and re-added).
const MAX_ENTRIES: usize = 128;

/// A JD error: `status` (`INVALID_ARGUMENT`), HTTP code and JD's message.
fn jd(code: Code, status: &str, http: u16, message: impl Into<String>) -> Error {
    let message = message.into();
    Error::new(code, message.clone()).with_vendor(VendorCode {
        dialect: Dialect::JdCloud,
        code: status.into(),
        http_status: http,
        message,
    })
}

fn invalid(message: impl Into<String>) -> Error {
    jd(Code::InvalidParameter, "INVALID_ARGUMENT", 400, message)
}

/// One `dataDisks` entry, checked.
#[derive(Debug, Clone, Default)]
struct Entry {
    device: String,
    no_device: bool,
    snapshot: Option<PathBuf>,
    size_gib: Option<u64>,
    disk_type: Option<String>,
    recorded: Map<String, Value>,
}

/// Reads a JD createImage request; `line` is its request line, if it has one.
pub(crate) fn parse(
    line: Option<&str>,
    v: &Value,
    base: &Path,
    opts: &LoadOptions,
) -> Result<Loaded> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    let top = fields(obj, "");
    top.check_keys(KEYS, API)?;
    let (region, instance_path) = instance_of(line, base, opts)?;
    let name = top
        .string("name")?
        .ok_or_else(|| invalid("Parameter name missing"))?;
    check_name(&name)?;
    let description = top.string("description")?;
    if let Some(d) = &description {
        if d.chars().count() > 256 {
            return Err(invalid(format!(
                "Parameter description is {} characters; at most 256",
                d.chars().count()
            )));
        }
    }
    let mut notes = Vec::new();
    let entries = entries(obj.get("dataDisks"), base, &mut notes)?;
    let (xml, dir) = create::read_domain_xml(&instance_path).map_err(|e| match e.code() {
        Code::IoError => jd(
            Code::InstanceNotFound,
            "NOT_FOUND",
            404,
            format!("Instance '{}' not found.", instance_path.display()),
        ),
        _ => e,
    })?;
    let inst = instance::parse_domain(&xml, &dir)?;
    let (disks, names) = plan(&inst, &entries)?;
    notes.extend(inst.skipped.iter().cloned());
    let mut parameters = Map::new();
    parameters.insert(
        "instanceId".into(),
        instance_path.display().to_string().into(),
    );
    if let Some(r) = region {
        parameters.insert("regionId".into(), r.into());
    }
    for e in entries.iter().filter(|e| !e.recorded.is_empty()) {
        parameters.insert(format!("dataDisks.{}", e.device), e.recorded.clone().into());
    }
    Ok(Loaded {
        dialect: Dialect::JdCloud,
        file: RequestFile {
            image_name: Some(name),
            description,
            ..RequestFile::default()
        },
        instance: Some(disks),
        record: Some(DialectRecord {
            dialect: Dialect::JdCloud.as_str().into(),
            parameters,
            device_names: names,
            job_id: None,
        }),
        notes,
        ..Loaded::default()
    })
}

/// The region and instance the request line names (`/v1/regions/R/instances/I:createImage`), or
/// `--instance`.
fn instance_of(
    line: Option<&str>,
    base: &Path,
    opts: &LoadOptions,
) -> Result<(Option<String>, PathBuf)> {
    let Some(line) = line else {
        return opts
            .instance
            .clone()
            .map(|p| (None, p))
            .ok_or_else(|| invalid("Parameter instanceId missing: start the file with the request line /v1/regions/{regionId}/instances/{instanceId}:createImage (instanceId a domain XML path), or give --instance FILE"));
    };
    let t = request_target(line);
    let rest = t
        .find("/v1/regions/")
        .map(|i| &t[i + "/v1/regions/".len()..])
        .and_then(|r| r.split_once("/instances/"))
        .and_then(|(region, r)| Some((region, r.strip_suffix(":createImage")?)))
        .filter(|(r, i)| !r.is_empty() && !i.is_empty());
    let (region, id) = rest.ok_or_else(|| {
        invalid(format!(
            "request line '{line}' is not /v1/regions/{{regionId}}/instances/{{instanceId}}:createImage"
        ))
    })?;
    Ok((Some(region.to_string()), resolve(base, id)))
}

fn invalid_text(m: String) -> Error {
    invalid(format!("Parameter {m}"))
}

/// `o`'s fields, at `at`, with JD's errors.
fn fields<'a>(o: &'a Map<String, Value>, at: &'a str) -> Fields<'a> {
    Fields {
        o,
        at,
        invalid: invalid_text,
    }
}

const API: &str = "createImage";

/// JD's name rule: 2 to 32 characters of CJK, letters, digits, `_`, `-` and `.`.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || is_cjk(c) || matches!(c, '_' | '-' | '.'));
    if (2..=32).contains(&n) && ok_chars {
        return Ok(());
    }
    Err(invalid(format!(
        "Parameter name '{name}' is invalid: 2 to 32 characters of Chinese characters, letters, digits, '_', '-' and '.'"
    )))
}

/// JD's data devices: `vdb` to `vdz`, `vdaa` to `vdaz`, `vdba` to `vdbm` (libvirt's order).
pub(crate) fn valid_data_device(d: &str) -> bool {
    let Some(rest) = d.strip_prefix("vd") else {
        return false;
    };
    let b = rest.as_bytes();
    match b {
        [c] => (b'b'..=b'z').contains(c),
        [b'a', c] => c.is_ascii_lowercase(),
        [b'b', c] => (b'a'..=b'm').contains(c),
        _ => false,
    }
}

/// The `dataDisks` entries, each checked alone; a deviceName appears once, or twice as "exclude
/// the instance's disk and put a new one in its place".
fn entries(v: Option<&Value>, base: &Path, notes: &mut Vec<String>) -> Result<Vec<Entry>> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("Parameter dataDisks must be a list")),
    };
    if list.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "Parameter dataDisks has {} entries; at most {MAX_ENTRIES}",
            list.len()
        )));
    }
    let mut out: Vec<Entry> = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let e = entry(item, i + 1, base, notes)?;
        let twice = out.iter().filter(|o| o.device == e.device).count();
        let replaces = twice == 1
            && out
                .iter()
                .any(|o| o.device == e.device && o.no_device != e.no_device);
        if twice > 0 && !replaces {
            return Err(jd(
                Code::InvalidDeviceInUse,
                "DUPLICATE",
                400,
                "Duplicate deviceName",
            ));
        }
        out.push(e);
    }
    Ok(out)
}

fn entry(item: &Value, n: usize, base: &Path, notes: &mut Vec<String>) -> Result<Entry> {
    let at = format!("dataDisks[{n}].");
    let o = item
        .as_object()
        .ok_or_else(|| invalid(format!("Parameter dataDisks[{n}] must be an object")))?;
    // The document's own example spells it CloudDiskSpec; its table, cloudDiskSpec.
    let mut o = o.clone();
    if let Some(spec) = o.remove("CloudDiskSpec") {
        if o.insert("cloudDiskSpec".into(), spec).is_some() {
            return Err(invalid(format!(
                "Parameter {at}cloudDiskSpec is given twice (as cloudDiskSpec and CloudDiskSpec)"
            )));
        }
    }
    let f = fields(&o, &at);
    f.check_keys(DISK_KEYS, API)?;
    let device = f
        .string("deviceName")?
        .ok_or_else(|| invalid(format!("Parameter {at}deviceName missing")))?;
    if device == "vda" {
        return Err(invalid(format!(
            "Parameter {at}deviceName vda is the system disk; data disks are vdb to vdbm"
        )));
    }
    if !valid_data_device(&device) {
        return Err(invalid(format!(
            "Parameter {at}deviceName '{device}' is invalid: data disks are vdb to vdbm"
        )));
    }
    let mut e = Entry {
        device,
        no_device: f.boolean("noDevice")?.unwrap_or(false),
        ..Entry::default()
    };
    if let Some(c) = f.string("diskCategory")? {
        if c != "cloud" {
            return Err(invalid(format!(
                "Parameter {at}diskCategory '{c}' is invalid: data disks are cloud disks only"
            )));
        }
    }
    if let Some(a) = f.boolean("autoDelete")? {
        e.recorded.insert("autoDelete".into(), a.into());
    }
    let spec = match o.get("cloudDiskSpec") {
        None | Some(Value::Null) => None,
        Some(Value::Object(s)) => Some(s),
        Some(_) => {
            return Err(invalid(format!(
                "Parameter {at}cloudDiskSpec must be an object"
            )))
        }
    };
    if e.no_device && spec.is_some() {
        return Err(invalid(format!(
            "Parameter {at}: noDevice excludes {} and takes no cloudDiskSpec",
            e.device
        )));
    }
    if let Some(s) = spec {
        disk_spec(s, &format!("{at}cloudDiskSpec."), base, &mut e, notes)?;
    }
    Ok(e)
}

/// A `cloudDiskSpec`: what it changes (snapshot, size) and what is only recorded (type, IOPS).
fn disk_spec(
    s: &Map<String, Value>,
    at: &str,
    base: &Path,
    e: &mut Entry,
    notes: &mut Vec<String>,
) -> Result<()> {
    let f = fields(s, at);
    f.check_keys(SPEC_KEYS, API)?;
    for k in IGNORED_SPEC_KEYS.iter().filter(|k| s.contains_key(**k)) {
        notes.push(format!(
            "{at}{k} was ignored: JD Cloud ignores it when making an image"
        ));
    }
    e.snapshot = f.string("snapshotId")?.map(|p| resolve(base, &p));
    if let Some(g) = f.integer("diskSizeGB")? {
        if !(20..=16000).contains(&g) || g % 10 != 0 {
            return Err(jd(
                Code::InvalidSize,
                "OUT_OF_RANGE",
                400,
                format!("DataDisks.CloudDiskSpec.DiskSizeGB out of range ({g}: 20 to 16000 GiB in steps of 10)"),
            ));
        }
        e.size_gib = Some(g);
    }
    if let Some(t) = f.string("diskType")? {
        if !DISK_TYPES.contains(&t.as_str()) {
            return Err(invalid(format!(
                "Parameter {at}diskType '{t}' is invalid: one of {}",
                DISK_TYPES.join(", ")
            )));
        }
        e.recorded.insert("diskType".into(), t.clone().into());
        e.disk_type = Some(t);
    }
    if let Some(iops) = f.integer("iops")? {
        let max = e.size_gib.map_or(32000, |g| (g * 50).min(32000));
        if e.disk_type.as_deref() != Some("ssd.io1")
            || !(200..=max).contains(&iops)
            || iops % 10 != 0
        {
            return Err(jd(
                Code::InvalidParameter,
                "OUT_OF_RANGE",
                400,
                format!("DataDisks.CloudDiskSpec.Iops out of range. ({iops}: ssd.io1 only, 200 to {max} in steps of 10)"),
            ));
        }
        e.recorded.insert("iops".into(), iops.into());
    }
    if f.boolean("encrypt")? == Some(true) {
        return Err(jd(
            Code::Unsupported,
            "INVALID_ARGUMENT",
            400,
            format!("Parameter {at}encrypt: JD encrypts with keys its KMS holds, which an offline build cannot reach; drop encrypt and encrypt the image with kiln's --encrypt and a --key-file (LUKS) instead"),
        ));
    }
    Ok(())
}

/// The image's disks: the instance's boot disk as `vda`, its data disks less `noDevice` ones (grown
/// where `diskSizeGB` says), and the new ones, in JD's device order on `/dev/xvdb` on; with each
/// image device's JD name.
fn plan(inst: &Instance, entries: &[Entry]) -> Result<(InstanceDisks, BTreeMap<String, String>)> {
    let boot = inst.disks.get(inst.boot).ok_or_else(|| {
        jd(
            Code::NoSystemDisk,
            "FAILED_PRECONDITION",
            400,
            "System disk not found",
        )
    })?;
    // JD name (in libvirt's order) → the disk, and whether it is the instance's own.
    let mut data: BTreeMap<(usize, String), (DiskSpec, bool)> = BTreeMap::new();
    let others = inst
        .disks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != inst.boot);
    for (_, d) in others {
        let spec = DiskSpec {
            snapshot: Some(d.source.clone()),
            format: d.format,
            disk_type: Some(DiskType::Data),
            ..DiskSpec::default()
        };
        data.insert((d.target_dev.len(), d.target_dev.clone()), (spec, true));
    }
    let key = |d: &str| (d.len(), d.to_string());
    for e in entries.iter().filter(|e| e.no_device) {
        if data.remove(&key(&e.device)).is_none() {
            return Err(jd(
                Code::InvalidParameter,
                "NOT_FOUND",
                404,
                format!("Device '{}' not found in instance {}", e.device, inst.name),
            ));
        }
    }
    for e in entries.iter().filter(|e| !e.no_device) {
        let replaced = entries.iter().any(|o| o.no_device && o.device == e.device);
        match data.get_mut(&key(&e.device)) {
            Some((spec, _)) if !replaced => {
                if e.snapshot.is_some() {
                    return Err(invalid(format!("Parameter snapshotId: {} is a disk of the instance; exclude it with noDevice first to put a new disk in its place", e.device)));
                }
                spec.size = e.size_gib.map(|g| g << 30);
            }
            _ => {
                if e.snapshot.is_none() && e.disk_type.is_none() {
                    return Err(invalid(
                        "Parameter DataDisks.CloudDiskSpec.DiskType missing",
                    ));
                }
                if e.snapshot.is_none() && e.size_gib.is_none() {
                    return Err(jd(
                        Code::InvalidSize,
                        "OUT_OF_RANGE",
                        400,
                        "DataDisks.CloudDiskSpec.DiskSizeGB out of range",
                    ));
                }
                let spec = DiskSpec {
                    snapshot: e.snapshot.clone(),
                    size: e.size_gib.map(|g| g << 30),
                    disk_type: Some(DiskType::Data),
                    ..DiskSpec::default()
                };
                data.insert(key(&e.device), (spec, false));
            }
        }
    }
    if data.len() > MAX_DATA_DISKS {
        return Err(jd(
            Code::QuotaExceedDataDisk,
            "OUT_OF_RANGE",
            400,
            format!("the image would hold {} data disks; kiln's images hold at most {MAX_DATA_DISKS}: exclude some with noDevice", data.len()),
        ));
    }
    let mut names = BTreeMap::new();
    names.insert(Device::system().as_str().to_string(), "vda".to_string());
    let mut specs = vec![DiskSpec {
        snapshot: Some(boot.source.clone()),
        device: Some(Device::system()),
        disk_type: Some(DiskType::System),
        format: boot.format,
        size: None,
        crypt: Default::default(),
        output_format: None,
    }];
    // The instance's own disks keep their target as the manifest's OriginalTarget.
    let mut targets = vec![(Device::system(), boot.target_dev.clone())];
    for (i, ((_, name), (mut spec, own))) in data.into_iter().enumerate() {
        let dev = Device::data(i + 1);
        names.insert(dev.as_str().to_string(), name.clone());
        if own {
            targets.push((dev.clone(), name));
        }
        spec.device = Some(dev);
        specs.push(spec);
    }
    let instance = InstanceSource {
        name: inst.name.clone(),
        uuid: inst.uuid.clone(),
        targets,
        disks: inst.disks.clone(),
    };
    Ok((
        InstanceDisks {
            instance,
            specs,
            skipped: Vec::new(),
        },
        names,
    ))
}

/// kiln's error in JD's terms: a disk that would shrink is JD's `OUT_OF_RANGE` "Device 'vdb' size
/// can only be larger than the original size"; a device given twice is `DUPLICATE`; a missing
/// file `NOT_FOUND`; a failure while running `INTERNAL`; any other refusal `INVALID_ARGUMENT`.
pub(crate) fn label(e: Error, names: &BTreeMap<String, String>) -> Error {
    let name = e
        .device()
        .map(|d| names.get(d).cloned().unwrap_or_else(|| d.to_string()));
    let (status, http, message) = match (e.code(), name) {
        (Code::InvalidSize, Some(n)) => (
            "OUT_OF_RANGE",
            400,
            format!("Device '{n}' size can only be larger than the original size"),
        ),
        (Code::InvalidSize | Code::QuotaExceedDataDisk, None) => {
            ("OUT_OF_RANGE", 400, e.full_message())
        }
        (Code::InvalidDeviceInUse, _) => ("DUPLICATE", 400, "Duplicate deviceName".to_string()),
        (Code::SnapshotNotFound, _) => (
            "NOT_FOUND",
            404,
            format!("Snapshot not found: {}", e.full_message()),
        ),
        (Code::InstanceNotFound, _) => ("NOT_FOUND", 404, e.full_message()),
        (Code::NoSystemDisk, _) => (
            "FAILED_PRECONDITION",
            400,
            "System disk not found".to_string(),
        ),
        (Code::IncorrectInstanceStatus | Code::SnapshotNotReady, _) => (
            "FAILED_PRECONDITION",
            400,
            format!("Please stop the instance first: {}", e.full_message()),
        ),
        (c, _) if c.exit_status() == 1 => ("INTERNAL", 500, e.full_message()),
        _ => ("INVALID_ARGUMENT", 400, e.full_message()),
    };
    let v = VendorCode {
        dialect: Dialect::JdCloud,
        code: status.into(),
        http_status: http,
        message,
    };
    e.with_vendor(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_run_vdb_to_vdbm() {
        for ok in ["vdb", "vdz", "vdaa", "vdaz", "vdba", "vdbm"] {
            assert!(valid_data_device(ok), "{ok}");
        }
        for bad in ["vda", "vdbn", "vdca", "sdb", "vd", "vdB", "xvdb"] {
            assert!(!valid_data_device(bad), "{bad}");
        }
    }

    #[test]
    fn names_follow_jd_rules() {
        assert!(check_name("test").is_ok());
        assert!(check_name("1-镜像_a.b").is_ok());
        for bad in ["a", &"a".repeat(33), "a b", "a:b"] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.vendor().unwrap().code, "INVALID_ARGUMENT");
        }
    }

    #[test]
    fn shrinking_is_out_of_range_in_jd_words() {
        let e = crate::request::plan::resolve_size("/dev/xvdb", Some(1 << 30), Some(2 << 30))
            .unwrap_err();
        let mut names = BTreeMap::new();
        names.insert("/dev/xvdb".to_string(), "vde".to_string());
        let e = label(e, &names);
        let v = e.vendor().unwrap();
        assert_eq!(v.code, "OUT_OF_RANGE");
        assert_eq!(
            v.message,
            "Device 'vde' size can only be larger than the original size"
        );
        assert_eq!(e.code().exit_status(), 2);
    }
}
