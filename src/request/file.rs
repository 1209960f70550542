//! `kiln create --request image.json|image.toml`: a CreateImage request as a file, with the API's
//! parameter names, so a golden-image build can live in git. Flags given on the command line
//! override the file. Relative snapshot paths are resolved against the file's directory.
//!
//! ```json
//! {"ImageName": "golden-web", "ImageFamily": "web", "Platform": "Ubuntu",
//!  "DiskDeviceMapping": [{"SnapshotId": "base.qcow2", "DiskType": "system"},
//!                        {"SnapshotId": "data.raw", "Device": "/dev/xvdb", "Size": 40},
//!                        {"Device": "/dev/xvdc", "Size": "10G"}],
//!  "Tag": [{"Key": "team", "Value": "web"}], "ClientToken": "golden-web-2024-06"}
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Code, Error, Result};
use crate::format::Format;
use crate::request::dialect::resolve;
use crate::request::plan::{Device, DiskSpec, DiskType};
use crate::util::size;

/// Top-level keys a request file may hold.
pub(crate) const KEYS: &[&str] = &[
    "ImageName",
    "ImageFamily",
    "ImageVersion",
    "Description",
    "Platform",
    "Architecture",
    "BootMode",
    "SnapshotId",
    "InstanceId",
    "DiskDeviceMapping",
    "Tag",
    "ClientToken",
    "DryRun",
    "DetectionStrategy",
    "RelocateGpt",
    "ResourceGroupId",
    "Features",
    "RegionId",
    "Action",
    "Encrypted",
    "Target",
];
/// Keys of `Features`.
pub(crate) const FEATURE_KEYS: &[&str] = &["ImdsSupport", "NvmeSupport"];
/// Keys of a DiskDeviceMapping entry (`Format` is kiln's: the source's format, detected otherwise).
/// `KeyFile` and `Encrypted` are kiln's too: the disk's key file and per-disk encryption.
pub(crate) const DISK_KEYS: &[&str] = &[
    "SnapshotId",
    "Device",
    "Size",
    "DiskType",
    "Format",
    "KeyFile",
    "Encrypted",
    "OutputFormat",
];
pub(crate) const TAG_KEYS: &[&str] = &["Key", "Value"];

/// What a request file says; None for each key it does not have.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RequestFile {
    pub(crate) image_name: Option<String>,
    pub(crate) image_family: Option<String>,
    pub(crate) image_version: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) platform: Option<String>,
    pub(crate) architecture: Option<String>,
    pub(crate) boot_mode: Option<String>,
    /// The short form: the system disk's snapshot.
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) disks: Option<Vec<DiskSpec>>,
    pub(crate) tags: Option<Vec<(String, String)>>,
    pub(crate) client_token: Option<String>,
    pub(crate) dry_run: Option<bool>,
    /// `DetectionStrategy: "Standard"`: check the system disk (`--detect`).
    pub(crate) detect: Option<bool>,
    /// kiln's `RelocateGpt: true` (`--relocate-gpt`).
    pub(crate) relocate_gpt: Option<bool>,
    /// `InstanceId`: a libvirt domain XML path (or a domain name with `--connect`).
    pub(crate) instance_id: Option<String>,
    /// Parameters recorded without an offline meaning (`ResourceGroupId`, `Features.*`,
    /// `RegionId`), validated, in the API's names.
    pub(crate) recorded: Map<String, Value>,
    /// `Encrypted: true` (`--encrypt`).
    pub(crate) encrypted: Option<bool>,
    /// kiln's `Target` (`--target`).
    pub(crate) target: Option<String>,
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        Code::InvalidParameter,
        format!("request file {}: {why}", path.display()),
    )
}

/// The file as serde reads it. Unknown keys are refused before (naming the nearest known one), so
/// this only checks types; [`parse`] then applies meaning (paths, devices, sizes).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Raw {
    image_name: Option<Text>,
    image_family: Option<Text>,
    image_version: Option<Text>,
    description: Option<Text>,
    platform: Option<Text>,
    architecture: Option<Text>,
    boot_mode: Option<Text>,
    snapshot_id: Option<Text>,
    instance_id: Option<Text>,
    disk_device_mapping: Option<Vec<RawDisk>>,
    tag: Option<Vec<RawTag>>,
    client_token: Option<Text>,
    dry_run: Option<bool>,
    detection_strategy: Option<Text>,
    relocate_gpt: Option<bool>,
    resource_group_id: Option<Text>,
    features: Option<RawFeatures>,
    region_id: Option<Text>,
    action: Option<Text>,
    encrypted: Option<bool>,
    target: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawFeatures {
    imds_support: Option<Text>,
    nvme_support: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawDisk {
    snapshot_id: Option<Text>,
    device: Option<Text>,
    size: Option<SizeValue>,
    disk_type: Option<Text>,
    format: Option<Text>,
    key_file: Option<Text>,
    encrypted: Option<bool>,
    output_format: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTag {
    key: Option<Text>,
    value: Option<Text>,
}

/// A string; a number is taken as its text (`"ImageVersion": 3`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string")]
enum Text {
    String(String),
    Number(serde_json::Number),
}

impl Text {
    fn into_string(self) -> String {
        match self {
            Text::String(s) => s,
            Text::Number(n) => n.to_string(),
        }
    }
}

/// A disk size: whole GiB as a number, or a string such as `"512M"`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a number of GiB or a string such as \"40G\""
)]
enum SizeValue {
    Gib(serde_json::Number),
    Text(String),
}

fn text(t: Option<Text>) -> Option<String> {
    t.map(Text::into_string)
}

/// Interprets a parsed request; `base` resolves relative snapshot paths.
pub(crate) fn parse(v: &Value, path: &Path, base: &Path) -> Result<RequestFile> {
    let obj = v.as_object().ok_or_else(|| {
        bad(
            path,
            "the top level must be an object of CreateImage parameters",
        )
    })?;
    check_keys(obj, KEYS, "", path)?;
    if let Some(f) = obj.get("Features").and_then(Value::as_object) {
        check_keys(f, FEATURE_KEYS, "Features.", path)?;
    }
    for (list, known, what) in [
        ("DiskDeviceMapping", DISK_KEYS, "DiskDeviceMapping"),
        ("Tag", TAG_KEYS, "Tag"),
    ] {
        if let Some(items) = obj.get(list).and_then(Value::as_array) {
            for (i, o) in items.iter().enumerate() {
                if let Some(o) = o.as_object() {
                    check_keys(o, known, &format!("{what}[{}].", i + 1), path)?;
                }
            }
        }
    }
    let raw: Raw = serde_path_to_error::deserialize(v).map_err(|e| {
        let at = field_path(e.path());
        bad(path, format!("{at}: {}", e.into_inner()))
    })?;
    if let Some(a) = text(raw.action).filter(|a| a != "CreateImage") {
        return Err(bad(
            path,
            format!("Action '{a}': kiln answers CreateImage only"),
        ));
    }
    let recorded = recorded(
        text(raw.region_id),
        text(raw.resource_group_id),
        raw.features,
    )?;
    let detect = match text(raw.detection_strategy) {
        None => None,
        Some(s) if s.eq_ignore_ascii_case(crate::detect::STANDARD) => Some(true),
        Some(s) => {
            return Err(bad(
                path,
                format!(
                    "DetectionStrategy '{s}' is not supported; the only strategy is 'Standard'"
                ),
            ))
        }
    };
    let disks = match raw.disk_device_mapping {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, d)| disk(d, &format!("DiskDeviceMapping[{}].", i + 1), path, base))
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let tags = match raw.tag {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let key = text(t.key).ok_or_else(|| {
                        Error::new(
                            Code::MissingParameter,
                            format!(
                                "request file {}: Tag[{}].Key is missing",
                                path.display(),
                                i + 1
                            ),
                        )
                    })?;
                    Ok((key, text(t.value).unwrap_or_default()))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    Ok(RequestFile {
        image_name: text(raw.image_name),
        image_family: text(raw.image_family),
        image_version: text(raw.image_version),
        description: text(raw.description),
        platform: text(raw.platform),
        architecture: text(raw.architecture),
        boot_mode: text(raw.boot_mode),
        snapshot: text(raw.snapshot_id).map(|s| resolve(base, &s)),
        disks,
        tags,
        client_token: text(raw.client_token),
        dry_run: raw.dry_run,
        detect,
        relocate_gpt: raw.relocate_gpt,
        instance_id: text(raw.instance_id).filter(|s| !s.trim().is_empty()),
        recorded,
        encrypted: raw.encrypted,
        target: text(raw.target),
    })
}

/// RegionId, ResourceGroupId and Features, checked as the API documents them, for the record.
fn recorded(
    region: Option<String>,
    group: Option<String>,
    features: Option<RawFeatures>,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    if let Some(r) = region {
        out.insert("RegionId".into(), r.into());
    }
    if let Some(g) = group {
        crate::request::validate::resource_group_id(&g)?;
        out.insert("ResourceGroupId".into(), g.into());
    }
    if let Some(f) = features {
        if let Some(v) = text(f.imds_support) {
            let v = crate::request::validate::imds_support(&v)?;
            out.insert("Features.ImdsSupport".into(), v.into());
        }
        if let Some(v) = text(f.nvme_support) {
            let v = crate::request::validate::nvme_support(&v)?;
            out.insert("Features.NvmeSupport".into(), v.into());
        }
    }
    Ok(out)
}

/// One DiskDeviceMapping entry; `where_` is `DiskDeviceMapping[N].` for messages.
fn disk(d: RawDisk, where_: &str, path: &Path, base: &Path) -> Result<DiskSpec> {
    let at = |k: &str| format!("{where_}{k}");
    let size = match d.size {
        None => None,
        Some(SizeValue::Gib(n)) => match n.as_u64() {
            Some(g) => Some(size::parse_size(&g.to_string())?),
            None => {
                return Err(Error::new(
                    Code::InvalidSize,
                    format!(
                        "request file {}: {} = {n}: give whole GiB or a string such as \"512M\"",
                        path.display(),
                        at("Size")
                    ),
                ))
            }
        },
        Some(SizeValue::Text(s)) => Some(size::parse_size(&s)?),
    };
    let disk_type = match text(d.disk_type) {
        None => None,
        Some(t) => Some(DiskType::parse_loose(&t).ok_or_else(|| {
            bad(
                path,
                format!("{} '{t}' is neither 'system' nor 'data'", at("DiskType")),
            )
        })?),
    };
    let format = match text(d.format) {
        None => None,
        Some(f) => Some(Format::parse(&f).ok_or_else(|| {
            bad(
                path,
                format!("{} '{f}' is neither 'raw' nor 'qcow2'", at("Format")),
            )
        })?),
    };
    let output_format = match text(d.output_format) {
        None => None,
        Some(f) => Some(crate::format::OutputFormat::named(&f).ok_or_else(|| {
            bad(
                path,
                format!(
                    "{} '{f}' is not one kiln writes ({})",
                    at("OutputFormat"),
                    crate::format::output_names().collect::<Vec<_>>().join(", ")
                ),
            )
        })?),
    };
    Ok(DiskSpec {
        snapshot: text(d.snapshot_id).map(|s| resolve(base, &s)),
        device: text(d.device).map(|d| Device::parse(&d)).transpose()?,
        size,
        disk_type,
        format,
        crypt: crate::request::plan::DiskCrypt {
            key_file: text(d.key_file).map(|s| resolve(base, &s)),
            encrypt: d.encrypted.unwrap_or(false),
        },
        output_format,
    })
}

/// `DiskDeviceMapping[1].Size`: where serde stopped, with entries counted from 1 as in every
/// other message about a request file.
fn field_path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{}]", index + 1)),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

/// Refuses any key not in `known`, naming the nearest known one.
fn check_keys(o: &Map<String, Value>, known: &[&str], prefix: &str, path: &Path) -> Result<()> {
    for k in o.keys() {
        if !known.contains(&k.as_str()) {
            let hint = nearest(k, known)
                .map(|n| format!("; did you mean '{prefix}{n}'?"))
                .unwrap_or_default();
            return Err(bad(
                path,
                format!(
                    "unknown key '{prefix}{k}'{hint} (known: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The known key closest to `k` (case-insensitive edit distance), if reasonably close.
pub(crate) fn nearest<'a>(k: &str, known: &[&'a str]) -> Option<&'a str> {
    let k = k.to_lowercase();
    known
        .iter()
        .map(|c| (edit_distance(&k, &c.to_lowercase()), *c))
        .min()
        .filter(|(d, c)| *d <= (c.len() / 2).max(2))
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: Value) -> Result<RequestFile> {
        parse(&v, Path::new("r.json"), Path::new("/base"))
    }

    #[test]
    fn reads_every_key() {
        let r = p(serde_json::json!({
            "ImageName": "web", "ImageFamily": "fam", "ImageVersion": 3, "Description": "dd",
            "Platform": "Ubuntu", "Architecture": "arm64", "BootMode": "UEFI", "ClientToken": "t",
            "DryRun": true, "SnapshotId": "s.raw",
            "DiskDeviceMapping": [{"SnapshotId": "a.raw", "DiskType": "system"},
                                  {"Device": "xvdc", "Size": 2}, {"Size": "512M", "Format": "raw"}],
            "Tag": [{"Key": "k", "Value": "v"}, {"Key": "e"}]
        }))
        .unwrap();
        assert_eq!(r.image_version.as_deref(), Some("3"));
        assert_eq!(r.snapshot, Some(PathBuf::from("/base/s.raw")));
        let d = r.disks.unwrap();
        assert_eq!(d[0].snapshot, Some(PathBuf::from("/base/a.raw")));
        assert_eq!(d[0].disk_type, Some(DiskType::System));
        assert_eq!(d[1].device.as_deref(), Some("/dev/xvdc"));
        assert_eq!(d[1].size, Some(2 << 30));
        assert_eq!(d[2].size, Some(512 << 20));
        assert_eq!(
            r.tags.unwrap(),
            [("k".into(), "v".into()), ("e".into(), String::new())]
        );
        assert_eq!(r.dry_run, Some(true));
        assert!(r.recorded.is_empty() && r.instance_id.is_none());
    }

    #[test]
    fn unknown_keys_name_the_nearest() {
        let e = p(serde_json::json!({"ImageNmae": "x"})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(
            e.message().contains("'ImageNmae'") && e.message().contains("'ImageName'"),
            "{e}"
        );
        let e = p(serde_json::json!({"DiskDeviceMapping": [{"Snapshot": "a"}]})).unwrap_err();
        assert!(e.message().contains("SnapshotId"), "{e}");
        let e = p(serde_json::json!({"Tag": [{"key": "a"}]})).unwrap_err();
        assert!(e.message().contains("'Tag[1].Key'"), "{e}");
    }

    #[test]
    fn type_errors_name_the_field_counting_from_one() {
        let e = p(serde_json::json!({"ImageName": {}})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(e.message().contains("ImageName: expected a string"), "{e}");
        let e = p(serde_json::json!({"DiskDeviceMapping": [{}, {"Size": [1]}]})).unwrap_err();
        assert!(e.message().contains("DiskDeviceMapping[2].Size"), "{e}");
        let e = p(serde_json::json!({"Tag": [{"Key": "a", "Value": true}]})).unwrap_err();
        assert!(e.message().contains("Tag[1].Value"), "{e}");
        let e = p(serde_json::json!({"DiskDeviceMapping": "a.raw"})).unwrap_err();
        assert!(
            e.message().contains("DiskDeviceMapping: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn detection_strategy_and_relocate_gpt() {
        let r =
            p(serde_json::json!({"DetectionStrategy": "Standard", "RelocateGpt": true})).unwrap();
        assert_eq!((r.detect, r.relocate_gpt), (Some(true), Some(true)));
        let e = p(serde_json::json!({"DetectionStrategy": "Deep"})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(e.message().contains("Standard"), "{e}");
        let e = p(serde_json::json!({"RelocateGpt": "yes"})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
    }

    #[test]
    fn instance_id_features_and_resource_group_are_read() {
        let r = p(serde_json::json!({"InstanceId": "vm.xml", "ResourceGroupId": "rg-bp67acfmxazb4p",
            "Features": {"ImdsSupport": "v2", "NvmeSupport": "supported"}, "RegionId": "cn-hangzhou"}))
        .unwrap();
        assert_eq!(r.instance_id.as_deref(), Some("vm.xml"));
        assert_eq!(r.recorded["ResourceGroupId"], "rg-bp67acfmxazb4p");
        assert_eq!(r.recorded["Features.ImdsSupport"], "v2");
        assert_eq!(r.recorded["Features.NvmeSupport"], "supported");
        let e = p(serde_json::json!({"Features": {"ImdsSupport": "v3"}})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidImdsSupport);
        let e = p(serde_json::json!({"Features": {"NvmSupport": "v3"}})).unwrap_err();
        assert!(e.message().contains("Features.NvmeSupport"), "{e}");
        let e = p(serde_json::json!({"ResourceGroupId": "group one"})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidResourceGroup);
        let e = p(serde_json::json!({"Action": "DeleteImage"})).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(nearest("platfrom", KEYS), Some("Platform"));
        assert_eq!(nearest("zzzzzzzzzzzzzzzzzzzz", KEYS), None);
    }
}
