//! Huawei IMS 制作镜像 (`POST /v2/cloudimages/action`), each of its request forms:
//!
//! - an instance (`instance_id`, a libvirt domain XML path): a system-disk image of its boot disk;
//! - `data_images` (`volume_id`, a disk file) without `instance_id`: a data-disk image;
//! - an external file (`image_url` `"bucket:file"`, read from the directory named as the bucket
//!   beside the request file) with `min_disk`, and up to 3 `data_images` files;
//! - a data volume as the system disk (`volume_id`, with `os_version`, or the OS detected).
//!
//! IMS's rules: `description` at most 1024 characters without CR, LF, `<` or `>`; `tags`
//! (`"key.value"`) or `image_tags`, never both; `os_version` from IMS's value list, mapped to a
//! Platform; `architecture` `arm` makes the image UEFI. Errors are IMS-shaped
//! (`{"error":{"code","message"}}`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::fields::Fields;
use super::{request_id, request_target, resolve, Dialect, Loaded};
use crate::error::{Code, Error, Result, VendorCode};
use crate::image::attributes::{Architecture, BootMode, DialectRecord, Platform};
use crate::request::file::RequestFile;
use crate::request::plan::{DiskSpec, DiskType};
use crate::request::validate::is_cjk;

pub(crate) const KEYS: &[&str] = &[
    "name",
    "description",
    "instance_id",
    "data_images",
    "tags",
    "image_tags",
    "enterprise_project_id",
    "max_ram",
    "min_ram",
    "os_type",
    "os_version",
    "image_url",
    "min_disk",
    "is_config",
    "is_config_init",
    "cmk_id",
    "type",
    "is_quick_import",
    "architecture",
    "volume_id",
];
const DATA_KEYS: &[&str] = &[
    "name",
    "description",
    "volume_id",
    "tags",
    "image_tags",
    "image_url",
    "min_disk",
    "is_quick_import",
];
const TYPES: &[&str] = &["ECS", "BMS", "FusionCompute", "Ironic", "IsoImage"];
/// Data-disk files an external system-disk file may bring (IMS: at most 3).
const MAX_FILE_DATA_IMAGES: usize = 3;

/// kiln's codes in IMS's error shape. The reference points at IMS's code table without including
/// it, so the numbers are kiln's: IMG.0001 a malformed parameter, IMG.0002 a missing one,
/// IMG.0003 a conflict between parameters, IMG.0004 a source not found, IMG.0005 a name in use,
/// IMG.0006 a size out of range, IMG.0007 a parameter kiln cannot honour offline, IMG.0000 a
/// failure while running.
fn ims(code: Code, ims_code: &str, message: impl Into<String>) -> Error {
    let message = message.into();
    let http = if ims_code == "IMG.0004" { 404 } else { 400 };
    Error::new(code, message.clone()).with_vendor(VendorCode {
        dialect: Dialect::Huawei,
        code: ims_code.into(),
        http_status: http,
        message,
    })
}

fn invalid(message: impl Into<String>) -> Error {
    ims(Code::InvalidParameter, "IMG.0001", message)
}

fn conflict(message: impl Into<String>) -> Error {
    ims(Code::InvalidParameter, "IMG.0003", message)
}

/// kiln's error in IMS's shape.
pub(crate) fn label(e: Error) -> Error {
    let ims_code = match e.code() {
        Code::MissingParameter => "IMG.0002",
        Code::SnapshotNotFound | Code::InstanceNotFound | Code::InvalidImageIdNotFound => {
            "IMG.0004"
        }
        Code::InvalidImageNameDuplicated => "IMG.0005",
        Code::InvalidSize | Code::QuotaExceedDataDisk => "IMG.0006",
        Code::Unsupported => "IMG.0007",
        c if c.exit_status() == 1 => "IMG.0000",
        _ => "IMG.0001",
    };
    let http = match ims_code {
        "IMG.0004" => 404,
        "IMG.0000" => 500,
        _ => 400,
    };
    let message = e.full_message();
    e.with_vendor(VendorCode {
        dialect: Dialect::Huawei,
        code: ims_code.into(),
        http_status: http,
        message,
    })
}

fn invalid_text(m: String) -> Error {
    invalid(m)
}

/// `o`'s fields, at `at`, with IMS's errors.
fn fields<'a>(o: &'a Map<String, Value>, at: &'a str) -> Fields<'a> {
    Fields {
        o,
        at,
        invalid: invalid_text,
    }
}

const API: &str = "IMS CreateImage";

/// Reads an IMS CreateImage request.
pub(crate) fn parse(line: Option<&str>, v: &Value, base: &Path) -> Result<Loaded> {
    if let Some(l) = line {
        if !request_target(l).ends_with("/v2/cloudimages/action") {
            return Err(invalid(format!(
                "request line '{l}' is not POST .../v2/cloudimages/action"
            )));
        }
    }
    let o = v
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    let f = fields(o, "");
    f.check_keys(KEYS, API)?;
    let form = form(o)?;
    let mut parameters = Map::new();
    let mut file = RequestFile::default();
    let mut notes = Vec::new();
    common(&f, &mut file, &mut parameters)?;
    let (instance, data_image) = match form {
        Form::Instance => {
            let id = f.string("instance_id")?.unwrap_or_default();
            let mut inst = super::alibaba::instance(&id, "instance_id", base, None)?;
            let dropped = inst.specs.len() - 1;
            inst.specs.retain(|s| s.disk_type == Some(DiskType::System));
            inst.instance.targets.retain(|(d, _)| d.is_system());
            if dropped > 0 {
                notes.push(format!("{dropped} data disk(s) of instance {} left out: an IMS system-disk image holds the system disk (data_images makes data-disk images)", inst.instance.name));
            }
            parameters.insert("instance_id".into(), id.into());
            (Some(inst), false)
        }
        Form::DataVolume => {
            file.disks = Some(vec![data_volume(o, base, &mut file, &mut parameters)?]);
            (None, true)
        }
        Form::File => {
            file.disks = Some(external_files(&f, base, &mut parameters)?);
            (None, false)
        }
        Form::Volume => {
            let vol = f.string("volume_id")?.unwrap_or_default();
            file.disks = Some(vec![DiskSpec {
                snapshot: Some(resolve(base, &vol)),
                disk_type: Some(DiskType::System),
                ..DiskSpec::default()
            }]);
            parameters.insert("volume_id".into(), vol.into());
            (None, false)
        }
    };
    if !data_image && file.image_name.is_none() {
        return Err(ims(Code::MissingParameter, "IMG.0002", "name is required"));
    }
    os(&f, form, &mut file, &mut notes, &mut parameters)?;
    Ok(Loaded {
        dialect: Dialect::Huawei,
        file,
        instance,
        data_image,
        record: Some(DialectRecord {
            dialect: Dialect::Huawei.as_str().into(),
            parameters,
            job_id: Some(request_id()),
            ..DialectRecord::default()
        }),
        notes,
        ..Loaded::default()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Instance,
    DataVolume,
    File,
    Volume,
}

/// Which of IMS's forms the request is; two at once are refused.
fn form(o: &Map<String, Value>) -> Result<Form> {
    let has = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    let mut forms = Vec::new();
    if has("instance_id") {
        forms.push(("instance_id", Form::Instance));
    }
    if has("image_url") {
        forms.push(("image_url", Form::File));
    }
    if has("volume_id") {
        forms.push(("volume_id", Form::Volume));
    }
    match forms.as_slice() {
        [] if has("data_images") => Ok(Form::DataVolume),
        [] => Err(ims(
            Code::MissingParameter,
            "IMG.0002",
            "give instance_id (an instance), image_url with min_disk (an external file), volume_id with os_version (a data volume as the system disk), or data_images (data-disk images)",
        )),
        [(_, Form::Instance)] if has("data_images") => Err(conflict(
            "data_images with instance_id: a data-disk image is made from data_images alone, without instance_id",
        )),
        [(_, Form::Volume)] if has("data_images") => Err(conflict(
            "data_images with volume_id: a data volume as the system disk takes no data_images",
        )),
        [(_, f)] => Ok(*f),
        _ => Err(conflict(format!(
            "{} are different forms of the request; give one",
            forms.iter().map(|f| f.0).collect::<Vec<_>>().join(" and ")
        ))),
    }
}

/// name, description, tags, memory, enterprise project, cmk_id: shared by every form.
fn common(f: &Fields, file: &mut RequestFile, p: &mut Map<String, Value>) -> Result<()> {
    if let Some(n) = f.string("name")? {
        check_name(&n, "name")?;
        file.image_name = Some(n);
    }
    if let Some(d) = f.string("description")? {
        check_description(&d, "description")?;
        file.description = Some(d).filter(|d| !d.is_empty());
    }
    file.tags = tags(f)?;
    let min = f.integer("min_ram")?;
    let max = f.integer("max_ram")?;
    if let (Some(a), Some(b)) = (min, max) {
        if b > 0 && a > b {
            return Err(invalid(format!(
                "min_ram {a} MB is more than max_ram {b} MB"
            )));
        }
    }
    for (k, v) in [("min_ram", min), ("max_ram", max)] {
        if let Some(v) = v {
            p.insert(k.into(), v.into());
        }
    }
    if let Some(e) = f.string("enterprise_project_id")? {
        if !(e == "0" || is_uuid(&e)) {
            return Err(invalid(format!(
                "enterprise_project_id '{e}' is neither 0 (the default project) nor a UUID"
            )));
        }
        p.insert("enterprise_project_id".into(), e.into());
    }
    for k in ["is_config", "is_config_init", "is_quick_import"] {
        if let Some(b) = f.boolean(k)? {
            p.insert(k.into(), b.into());
        }
    }
    if f.string("cmk_id")?.is_some() {
        return Err(ims(
            Code::Unsupported,
            "IMG.0007",
            "cmk_id names a master key in Huawei's KMS, which an offline build cannot reach; drop cmk_id and encrypt the image with kiln's --encrypt and a --key-file (LUKS) instead",
        ));
    }
    Ok(())
}

/// IMS's name rule (its image attributes): 1 to 128 characters of CJK, letters, digits, spaces,
/// `_`, `-` and `.`, not starting or ending with a space.
pub(crate) fn check_name(n: &str, what: &str) -> Result<()> {
    let count = n.chars().count();
    let chars = n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || is_cjk(c) || matches!(c, ' ' | '_' | '-' | '.'));
    if (1..=128).contains(&count) && chars && n.trim() == n {
        return Ok(());
    }
    Err(invalid(format!(
        "{what} '{n}' is invalid: 1 to 128 characters of Chinese characters, letters, digits, spaces, '_', '-' and '.', not starting or ending with a space"
    )))
}

/// At most 1024 characters; no CR, LF, `<` or `>`.
pub(crate) fn check_description(d: &str, what: &str) -> Result<()> {
    let n = d.chars().count();
    if n > 1024 {
        return Err(invalid(format!("{what} is {n} characters; at most 1024")));
    }
    if let Some(c) = d.chars().find(|c| matches!(c, '\r' | '\n' | '<' | '>')) {
        return Err(invalid(format!(
            "{what} contains {c:?}; carriage returns, '<' and '>' are not allowed"
        )));
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `tags` (`"key.value"`) or `image_tags` (`{key, value}`), never both; checked later by the tag
/// rules kiln applies to every image (at most 20, keys 1 to 128 characters, each key once).
fn tags(f: &Fields) -> Result<Option<Vec<(String, String)>>> {
    let (old, new) = (f.o.get("tags"), f.o.get("image_tags"));
    if old.is_some() && new.is_some() {
        return Err(conflict(format!(
            "{0}tags and {0}image_tags are both given; use only one",
            f.at
        )));
    }
    let list = |v: &Value, k: &str| -> Result<Vec<Value>> {
        v.as_array()
            .filter(|a| a.len() <= 64)
            .cloned()
            .ok_or_else(|| invalid(format!("{}{k} must be a list of at most 64 tags", f.at)))
    };
    if let Some(v) = old {
        let mut out = Vec::new();
        for t in list(v, "tags")? {
            let s = t.as_str().ok_or_else(|| {
                invalid(format!("{}tags: each tag is a \"key.value\" string", f.at))
            })?;
            let (k, v) = s
                .split_once('.')
                .ok_or_else(|| invalid(format!("{}tags: '{s}' is not \"key.value\"", f.at)))?;
            out.push((k.to_string(), v.to_string()));
        }
        return Ok(Some(out));
    }
    if let Some(v) = new {
        let mut out = Vec::new();
        for t in list(v, "image_tags")? {
            let o = t.as_object().ok_or_else(|| {
                invalid(format!(
                    "{}image_tags: each tag is {{\"key\", \"value\"}}",
                    f.at
                ))
            })?;
            let at = format!("{}image_tags.", f.at);
            fields(o, &at).check_keys(&["key", "value"], API)?;
            let get = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
            let key = get("key")
                .ok_or_else(|| invalid(format!("{}image_tags: a tag without a key", f.at)))?;
            out.push((key, get("value").unwrap_or_default()));
        }
        return Ok(Some(out));
    }
    Ok(None)
}

/// The data-disk image form: one `data_images` entry with `volume_id` (its name, description and
/// tags are the image's).
fn data_volume(
    o: &Map<String, Value>,
    base: &Path,
    file: &mut RequestFile,
    p: &mut Map<String, Value>,
) -> Result<DiskSpec> {
    let list = o
        .get("data_images")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("data_images must be a list"))?;
    let [entry] = list.as_slice() else {
        return Err(invalid(format!(
            "data_images has {} entries; kiln makes one image per request, so give one data volume per request",
            list.len()
        )));
    };
    let eo = entry
        .as_object()
        .ok_or_else(|| invalid("data_images[1] must be an object"))?;
    let f = fields(eo, "data_images[1].");
    f.check_keys(DATA_KEYS, API)?;
    if eo.contains_key("image_url") || eo.contains_key("min_disk") {
        return Err(conflict("data_images[1]: image_url and min_disk belong to the external-file form (with a top-level image_url)"));
    }
    let name = f.string("name")?.ok_or_else(|| {
        ims(
            Code::MissingParameter,
            "IMG.0002",
            "data_images[1].name is required",
        )
    })?;
    check_name(&name, "data_images[1].name")?;
    let vol = f.string("volume_id")?.ok_or_else(|| {
        ims(
            Code::MissingParameter,
            "IMG.0002",
            "data_images[1].volume_id is required",
        )
    })?;
    file.image_name = Some(name);
    if let Some(d) = f.string("description")? {
        check_description(&d, "data_images[1].description")?;
        file.description = Some(d).filter(|d| !d.is_empty());
    }
    if let Some(t) = tags(&f)? {
        file.tags = Some(t);
    }
    p.insert("data_images[1].volume_id".into(), vol.clone().into());
    Ok(DiskSpec {
        snapshot: Some(resolve(base, &vol)),
        disk_type: Some(DiskType::Data),
        ..DiskSpec::default()
    })
}

/// `"bucket:file"` as a source: the object `s3://bucket/file` (OBS speaks the S3 protocol; the
/// endpoint and credentials are configured as for any `s3://` source), or, when a directory named
/// as the bucket lies beside the request file, `file` inside it (a bucket mirrored locally). The
/// bucket follows OBS's naming; the file stays inside.
pub(crate) fn bucket_path(url: &str, base: &Path, at: &str) -> Result<PathBuf> {
    let (bucket, object) = url
        .split_once(':')
        .ok_or_else(|| invalid(format!("{at}image_url '{url}' is not \"bucket:file\"")))?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(invalid(format!("{at}image_url '{url}': bucket '{bucket}' is not an OBS bucket name (3 to 63 lowercase letters, digits, '-' and '.')")));
    }
    let p = Path::new(object);
    let inside = !object.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !inside {
        return Err(invalid(format!(
            "{at}image_url '{url}': the file must be a name inside the bucket"
        )));
    }
    let local = base.join(bucket);
    if local.is_dir() {
        return Ok(local.join(p));
    }
    Ok(PathBuf::from(format!(
        "{}{bucket}/{object}",
        crate::remote::s3::SCHEME
    )))
}

/// The external-file form: the system disk from `image_url` grown to `min_disk` GiB (40 to 1024),
/// and up to 3 data disks from `data_images` (`min_disk` 1 to 2048).
fn external_files(f: &Fields, base: &Path, p: &mut Map<String, Value>) -> Result<Vec<DiskSpec>> {
    let url = f.string("image_url")?.unwrap_or_default();
    let min_disk = f.integer("min_disk")?.ok_or_else(|| {
        ims(
            Code::MissingParameter,
            "IMG.0002",
            "min_disk is required with image_url",
        )
    })?;
    if !(40..=1024).contains(&min_disk) {
        return Err(ims(
            Code::InvalidSize,
            "IMG.0006",
            format!("min_disk {min_disk}: 40 to 1024 GB"),
        ));
    }
    p.insert("image_url".into(), url.clone().into());
    p.insert("min_disk".into(), min_disk.into());
    let mut disks = vec![DiskSpec {
        snapshot: Some(bucket_path(&url, base, "")?),
        size: Some(min_disk << 30),
        disk_type: Some(DiskType::System),
        ..DiskSpec::default()
    }];
    let list = match f.o.get("data_images") {
        None | Some(Value::Null) => return Ok(disks),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("data_images must be a list")),
    };
    if list.len() > MAX_FILE_DATA_IMAGES {
        return Err(invalid(format!(
            "data_images has {} entries; an external file brings at most {MAX_FILE_DATA_IMAGES} data disks",
            list.len()
        )));
    }
    for (i, d) in list.iter().enumerate() {
        let at = format!("data_images[{}].", i + 1);
        let o = d
            .as_object()
            .ok_or_else(|| invalid(format!("{at} must be an object")))?;
        let df = fields(o, &at);
        df.check_keys(DATA_KEYS, API)?;
        if o.contains_key("volume_id") {
            return Err(conflict(format!("{at}volume_id belongs to the data-volume form; an external file's data disks are image_url files")));
        }
        if let Some(n) = df.string("name")? {
            check_name(&n, &format!("{at}name"))?;
        }
        if let Some(d) = df.string("description")? {
            check_description(&d, &format!("{at}description"))?;
        }
        tags(&df)?;
        let url = df.string("image_url")?.ok_or_else(|| {
            ims(
                Code::MissingParameter,
                "IMG.0002",
                format!("{at}image_url is required"),
            )
        })?;
        let gb = df.integer("min_disk")?.ok_or_else(|| {
            ims(
                Code::MissingParameter,
                "IMG.0002",
                format!("{at}min_disk is required"),
            )
        })?;
        if !(1..=2048).contains(&gb) {
            return Err(ims(
                Code::InvalidSize,
                "IMG.0006",
                format!("{at}min_disk {gb}: 1 to 2048 GB"),
            ));
        }
        disks.push(DiskSpec {
            snapshot: Some(bucket_path(&url, base, &at)?),
            size: Some(gb << 30),
            disk_type: Some(DiskType::Data),
            ..DiskSpec::default()
        });
    }
    Ok(disks)
}

/// os_type, os_version, type and architecture: the image's Platform, architecture and boot mode.
fn os(
    f: &Fields,
    form: Form,
    file: &mut RequestFile,
    notes: &mut Vec<String>,
    p: &mut Map<String, Value>,
) -> Result<()> {
    if let Some(t) = f.string("os_type")? {
        if !["Linux", "Windows", "Other"].contains(&t.as_str()) {
            return Err(invalid(format!("os_type '{t}': Linux, Windows or Other")));
        }
        p.insert("os_type".into(), t.into());
    }
    let image_type = f.string("type")?;
    if let Some(t) = &image_type {
        let allowed: &[&str] = if form == Form::File {
            TYPES
        } else {
            &TYPES[..4]
        };
        if !allowed.contains(&t.as_str()) {
            return Err(invalid(format!(
                "type '{t}': one of {}",
                allowed.join(", ")
            )));
        }
        p.insert("type".into(), t.clone().into());
    }
    let os_version = f.string("os_version")?;
    match &os_version {
        Some(v) => {
            let (platform, bits) = os_version_platform(v)?;
            file.platform = Some(platform.as_str().into());
            if bits == 32 {
                file.architecture = Some(Architecture::I386.as_str().into());
            }
            p.insert("os_version".into(), v.clone().into());
        }
        None if form == Form::Volume
            || image_type.as_deref() == Some("IsoImage")
            || (form == Form::File && f.boolean("is_quick_import")? == Some(true)) =>
        {
            if form != Form::Volume {
                return Err(ims(
                    Code::MissingParameter,
                    "IMG.0002",
                    "os_version is required for an ISO file or a quick import",
                ));
            }
            // The document: the OS found on the volume wins; os_version is needed only when none is.
            file.detect = Some(true);
            notes.push("os_version not given: the OS is detected on the volume (Others Linux when none is found)".into());
        }
        None => {}
    }
    if let Some(a) = f.string("architecture")? {
        match a.as_str() {
            "x86" => {}
            "arm" => {
                file.architecture = Some(Architecture::Arm64.as_str().into());
                file.boot_mode = Some(BootMode::Uefi.as_str().into());
            }
            _ => return Err(invalid(format!("architecture '{a}': x86 or arm"))),
        }
        p.insert("architecture".into(), a.into());
    }
    Ok(())
}

/// IMS's os_version values (`CentOS 7.0 64bit`, `Windows Server 2019 Standard 64bit`, `Other
/// Linux(64 bit)`) as a Platform and a word size. The value list itself is a page the reference
/// does not include; kiln knows its distributions and its `<distribution> <version> 32bit|64bit`
/// shape.
pub(crate) fn os_version_platform(v: &str) -> Result<(Platform, u32)> {
    const DISTROS: &[(&str, Platform)] = &[
        ("CentOS Stream", Platform::CentOsStream),
        ("CentOS", Platform::CentOs),
        ("Ubuntu", Platform::Ubuntu),
        ("Debian", Platform::Debian),
        ("openSUSE", Platform::OpenSuse),
        ("SUSE", Platform::Suse),
        ("Red Hat", Platform::RedHat),
        ("Fedora", Platform::Fedora),
        ("CoreOS", Platform::CoreOs),
        ("FreeBSD", Platform::FreeBsd),
        ("AlmaLinux", Platform::AlmaLinux),
        ("Rocky Linux", Platform::RockyLinux),
        ("Kylin", Platform::Kylin),
        ("UnionTech OS", Platform::Uos),
        ("Gentoo", Platform::Gentoo),
        ("Anolis", Platform::Anolis),
        ("EulerOS", Platform::CustomizedLinux),
        ("openEuler", Platform::CustomizedLinux),
        ("Huawei Cloud EulerOS", Platform::CustomizedLinux),
        ("Oracle Linux", Platform::CustomizedLinux),
        ("Windows Server 2022", Platform::WindowsServer2022),
        ("Windows Server 2019", Platform::WindowsServer2019),
        ("Windows Server 2016", Platform::WindowsServer2016),
        ("Windows Server 2012", Platform::WindowsServer2012),
        ("Windows Server 2008", Platform::WindowsServer2008),
        ("Other Linux", Platform::OthersLinux),
        ("Other", Platform::OthersLinux),
    ];
    let bits = if v.ends_with("64bit") || v.ends_with("(64 bit)") {
        64
    } else if v.ends_with("32bit") || v.ends_with("(32 bit)") {
        32
    } else {
        0
    };
    let platform = DISTROS
        .iter()
        .find(|(prefix, _)| v.starts_with(prefix))
        .map(|(_, p)| *p);
    match platform {
        Some(p) if bits != 0 && v.len() <= 128 => Ok((p, bits)),
        _ => Err(invalid(format!(
            "os_version '{v}' is not in IMS's value list: '<distribution> <version> 64bit' (or 32bit), e.g. 'CentOS 7.0 64bit', 'Ubuntu 22.04 server 64bit', 'Windows Server 2019 Standard 64bit', 'Other Linux(64 bit)'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_versions_map_to_platforms() {
        assert_eq!(
            os_version_platform("CentOS 7.0 64bit").unwrap(),
            (Platform::CentOs, 64)
        );
        assert_eq!(
            os_version_platform("Windows Server 2019 Standard 64bit")
                .unwrap()
                .0,
            Platform::WindowsServer2019
        );
        assert_eq!(
            os_version_platform("Other Linux(32 bit)").unwrap(),
            (Platform::OthersLinux, 32)
        );
        for bad in ["CentOS 7.0", "Plan9 4 64bit", ""] {
            assert_eq!(
                os_version_platform(bad).unwrap_err().vendor().unwrap().code,
                "IMG.0001"
            );
        }
    }

    #[test]
    fn buckets_are_objects_or_local_directories_and_files_stay_inside() {
        let b = Path::new("/nonexistent-req");
        assert_eq!(
            bucket_path("ims-image:os/centos70.qcow2", b, "").unwrap(),
            Path::new("s3://ims-image/os/centos70.qcow2")
        );
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("ims-image")).unwrap();
        assert_eq!(
            bucket_path("ims-image:centos70.qcow2", t.path(), "").unwrap(),
            t.path().join("ims-image/centos70.qcow2")
        );
        for bad in [
            "nocolon",
            "ab:x",
            "Bad:x",
            "ims-image:../x",
            "ims-image:/etc/x",
            "ims-image:",
        ] {
            assert!(bucket_path(bad, b, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_descriptions_follow_ims() {
        assert!(check_name("ims_test", "name").is_ok());
        assert!(check_name("镜像 1", "name").is_ok());
        assert!(check_name(" x", "name").is_err());
        assert!(check_name(&"a".repeat(129), "name").is_err());
        assert!(check_description(&"d".repeat(1024), "d").is_ok());
        assert!(check_description(&"d".repeat(1025), "d").is_err());
        for bad in ["a<b", "a>b", "a\rb"] {
            assert!(check_description(bad, "d").is_err(), "{bad:?}");
        }
    }
}
