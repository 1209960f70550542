//! Request files in three vendors' shapes ("dialects"): Alibaba ECS CreateImage (kiln's own
//! parameter names, as JSON, TOML or the HTTP API's flattened query form), JD Cloud createImage and
//! Huawei IMS 制作镜像. The dialect is detected from the file's shape unless `--dialect` says;
//! each dialect's reader turns the file into one [`Loaded`] request for the rest of kiln, and its
//! errors are answered in that vendor's codes ([`Dialect::label`]).
//!
//! A file may start with the request line the vendors' documents print above the body (`POST
//! https://{Endpoint}/v2/cloudimages/action`, `/v1/regions/cn-north-1/instances/ID:createImage`),
//! so the documents' examples run as written.

pub(crate) mod alibaba;
pub(crate) mod fields;
pub(crate) mod huawei;
pub(crate) mod jdcloud;
pub(crate) mod query;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Code, Error, Result};
use crate::image::attributes::DialectRecord;
use crate::request::create::InstanceDisks;
use crate::request::file::RequestFile;

/// Largest request file read (the vendors' own request bodies are far smaller).
pub(crate) const MAX_REQUEST_LEN: u64 = 1 << 20;

pub(crate) use crate::image::attributes::Dialect;

/// `e` in `dialect`'s codes and wording; `names` maps image devices to the dialect's names. An
/// error already labelled is returned as it is; Alibaba's codes are kiln's own.
pub fn label(dialect: Dialect, e: Error, names: &BTreeMap<String, String>) -> Error {
    if e.vendor().is_some() {
        return e;
    }
    match dialect {
        Dialect::Alibaba => e,
        Dialect::JdCloud => jdcloud::label(e, names),
        Dialect::Huawei => huawei::label(e),
    }
}

/// What `--dialect`, `--connect` and `--instance` say about reading a request file.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoadOptions {
    /// `--dialect`: no detection.
    pub(crate) dialect: Option<Dialect>,
    /// `--connect URI`: an Alibaba `InstanceId` is a libvirt domain name, read with `virsh`.
    pub(crate) connect: Option<String>,
    /// `--instance FILE`: JD Cloud's instance when the file has no request line naming one.
    pub(crate) instance: Option<PathBuf>,
}

/// A request file read in its dialect: the CreateImage parameters, plus what only some dialects
/// give (an instance's disks, a data-disk image, recorded parameters, notes for the user).
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) dialect: Dialect,
    /// True when the dialect was given or the file's shape is not plain Alibaba JSON/TOML: the
    /// response is then the dialect's (`{"ImageId","RequestId"}` for Alibaba).
    pub(crate) explicit: bool,
    pub(crate) file: RequestFile,
    pub(crate) instance: Option<InstanceDisks>,
    pub(crate) data_image: bool,
    pub(crate) record: Option<DialectRecord>,
    pub(crate) notes: Vec<String>,
}

impl Loaded {
    /// Image device → the dialect's name for it.
    pub(crate) fn device_names(&self) -> BTreeMap<String, String> {
        self.record
            .as_ref()
            .map(|r| r.device_names.clone())
            .unwrap_or_default()
    }
}

/// Reads the request file at `path` in its dialect. Errors are the dialect's: the one given, or
/// the one detected once the file could be read.
pub(crate) fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let no_names = BTreeMap::new();
    read(path, opts).map_err(|e| match opts.dialect {
        Some(d) => label(d, e, &no_names),
        None => e,
    })
}

fn read(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let text = read_bounded(path)?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let is_toml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    let (line, body) = split_request_line(&text);
    let value = if is_toml {
        let t: toml::Table =
            toml::from_str(&text).map_err(|e| bad(path, format!("not valid TOML: {e}")))?;
        serde_json::to_value(t).map_err(|e| bad(path, format!("cannot read its TOML: {e}")))?
    } else if body.trim_start().starts_with('{') {
        serde_json::from_str(body).map_err(|e| {
            // A request line still says whose body it is.
            label(
                detect(line, &Value::Null),
                bad(path, format!("not valid JSON: {e}")),
                &BTreeMap::new(),
            )
        })?
    } else {
        // Not JSON: Alibaba's flattened query form (the HTTP API's own shape).
        if let Some(d) = opts.dialect.filter(|d| *d != Dialect::Alibaba) {
            return Err(bad(
                path,
                format!("not JSON; a {} request is a JSON body", d.as_str()),
            ));
        }
        let mut loaded = alibaba::parse(&query::to_json(&text, path)?, path, base, opts)?;
        loaded.explicit = true;
        return Ok(loaded);
    };
    let detected = detect(line, &value);
    let dialect = opts.dialect.unwrap_or(detected);
    let loaded = match dialect {
        Dialect::Alibaba => {
            if let Some(l) = line {
                return Err(bad(path, format!("'{l}': an Alibaba request file is JSON or TOML parameters, or the query form")));
            }
            alibaba::parse(&value, path, base, opts)
        }
        Dialect::JdCloud => jdcloud::parse(line, &value, base, opts),
        Dialect::Huawei => huawei::parse(line, &value, base),
    };
    let mut loaded = loaded.map_err(|e| label(dialect, e, &BTreeMap::new()))?;
    loaded.explicit = opts.dialect.is_some() || dialect != Dialect::Alibaba;
    Ok(loaded)
}

fn read_bounded(path: &Path) -> Result<String> {
    let not_found = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Error::new(
            Code::InvalidParameter,
            format!("--request {}: no such file", path.display()),
        ),
        _ => Error::io(path, "reading the request file", e),
    };
    let meta = std::fs::metadata(path).map_err(not_found)?;
    if meta.len() > MAX_REQUEST_LEN {
        return Err(bad(
            path,
            format!(
                "{} bytes; a request file is at most {MAX_REQUEST_LEN} bytes",
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(not_found)
}

pub(crate) fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        Code::InvalidParameter,
        format!("request file {}: {why}", path.display()),
    )
}

/// The request line above a JSON body (`POST https://...`, `/v1/regions/...:createImage`), if the
/// text has one, and the rest. Text with no `{` is returned whole (the query form).
pub(crate) fn split_request_line(text: &str) -> (Option<&str>, &str) {
    // The body is the first line that starts with `{` (a request line may hold `{Endpoint}`).
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('{') {
            let head = text[..offset].trim();
            let body = &text[offset..];
            return ((!head.is_empty()).then_some(head), body);
        }
        offset += line.len();
    }
    (None, text)
}

/// The request line's target without `POST` and blanks (`/v1/regions/r/instances/ID:createImage`).
pub(crate) fn request_target(line: &str) -> &str {
    let t = line.trim();
    let t = t.strip_prefix("POST").map(str::trim_start).unwrap_or(t);
    t.trim()
}

/// The dialect a JSON (or TOML) request's shape says: JD Cloud's `dataDisks` or request line,
/// Huawei's snake_case keys, else Alibaba's PascalCase parameters.
pub(crate) fn detect(line: Option<&str>, v: &Value) -> Dialect {
    if let Some(l) = line {
        if l.contains(":createImage") {
            return Dialect::JdCloud;
        }
        if l.contains("/cloudimages/action") {
            return Dialect::Huawei;
        }
    }
    let Some(obj) = v.as_object() else {
        return Dialect::Alibaba;
    };
    let has = |keys: &[&str], k: &str| keys.contains(&k);
    // Huawei's own keys first (it shares `name` and `description` with JD); a key neither knows is
    // Alibaba's, so an Alibaba typo (`imageName`) is answered with its nearest Alibaba key.
    if obj
        .keys()
        .any(|k| has(huawei::KEYS, k) && !has(jdcloud::KEYS, k))
    {
        return Dialect::Huawei;
    }
    if obj.keys().any(|k| has(jdcloud::KEYS, k)) {
        return Dialect::JdCloud;
    }
    Dialect::Alibaba
}

/// A fresh request ID: 32 lowercase hex digits from the kernel's random source.
pub(crate) fn request_id() -> String {
    let mut bytes = [0u8; 16];
    let got = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    });
    if got.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id()) << 96;
        bytes = t.to_le_bytes();
    }
    crate::copy::hash::hex(&bytes)
}

/// `text` as a path relative to `base` unless absolute or an object (`s3://BUCKET/KEY`).
pub(crate) fn resolve(base: &Path, s: &str) -> PathBuf {
    let p = PathBuf::from(s);
    if p.is_absolute() || crate::remote::s3::is_remote(&p) {
        p
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_name_their_dialect() {
        assert_eq!(detect(None, &json!({"ImageName": "a"})), Dialect::Alibaba);
        assert_eq!(
            detect(None, &json!({"name": "a", "dataDisks": []})),
            Dialect::JdCloud
        );
        assert_eq!(
            detect(None, &json!({"name": "a", "instance_id": "x"})),
            Dialect::Huawei
        );
        assert_eq!(
            detect(None, &json!({"data_images": [{"volume_id": "x"}]})),
            Dialect::Huawei
        );
        assert_eq!(detect(None, &json!({"imageName": "a"})), Dialect::Alibaba);
        assert_eq!(
            detect(None, &json!({"name": "a", "type": "ECS"})),
            Dialect::Huawei
        );
        assert_eq!(
            detect(Some("/v1/regions/r/instances/i:createImage"), &json!({})),
            Dialect::JdCloud
        );
        assert_eq!(
            detect(
                Some("POST https://{Endpoint}/v2/cloudimages/action"),
                &json!({"name": "x"})
            ),
            Dialect::Huawei
        );
    }

    #[test]
    fn request_lines_are_split_off() {
        let (l, b) = split_request_line("POST https://e/v2/cloudimages/action\n\n{\"a\":1}");
        assert_eq!(l, Some("POST https://e/v2/cloudimages/action"));
        assert_eq!(b, "{\"a\":1}");
        assert_eq!(split_request_line("  {\"a\":1}").0, None);
        assert_eq!(split_request_line("A=1&B=2").1, "A=1&B=2");
        let (l, b) = split_request_line("POST https://{Endpoint}/v2/cloudimages/action\n{}");
        assert_eq!((l.unwrap().len(), b), (45, "{}"));
        assert_eq!(request_target("POST  /v1/x "), "/v1/x");
    }

    #[test]
    fn dialect_names() {
        assert_eq!(Dialect::parse("JDCloud"), Some(Dialect::JdCloud));
        assert_eq!(Dialect::parse("aws"), None);
        assert_eq!(request_id().len(), 32);
    }
}
