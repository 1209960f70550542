//! Alibaba's flattened query form, as the HTTP API takes CreateImage: `Key=Value` pairs joined by
//! `&` or one a line (or both, as the document's example prints them), with lists as
//! `DiskDeviceMapping.N.Field` and `Tag.N.Key`, and `Features.ImdsSupport`. It becomes the same
//! JSON object a JSON request file holds, so both forms go through one reader and give the same
//! image.
//!
//! A leading `https://host/?` is dropped; values are percent-decoded (`%2F`; `+` stays `+`, since
//! paths may hold it); a segment wholly in angle brackets (`<公共请求参数>`, the document's
//! placeholder for the common parameters) is skipped.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::bad;
use crate::error::Result;

/// Most `Key=Value` pairs read (17 disks × 5 fields, 20 tags × 2, and the rest fit many times).
const MAX_PAIRS: usize = 512;
/// Highest N of `DiskDeviceMapping.N` (1 system + 16 data disks) and of `Tag.N`.
const MAX_DISK_N: usize = 17;
const MAX_TAG_N: usize = 20;

/// Parameters that name a list entry: `(list, highest N)`.
const LISTS: &[(&str, usize)] = &[("DiskDeviceMapping", MAX_DISK_N), ("Tag", MAX_TAG_N)];

/// The query text as a JSON request object.
pub(crate) fn to_json(text: &str, path: &Path) -> Result<Value> {
    let mut top = Map::new();
    let mut lists: BTreeMap<&str, BTreeMap<usize, Map<String, Value>>> = BTreeMap::new();
    let mut features = Map::new();
    let mut n = 0;
    for seg in segments(text) {
        n += 1;
        if n > MAX_PAIRS {
            return Err(bad(path, format!("more than {MAX_PAIRS} parameters")));
        }
        let (k, v) = seg.split_once('=').ok_or_else(|| {
            bad(
                path,
                format!("'{seg}' is not Key=Value (the query form is Key=Value pairs joined by & or one a line)"),
            )
        })?;
        let key = decode(k.trim(), path)?;
        let value = decode(v.trim(), path)?;
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            [one] => insert(&mut top, one, value, path)?,
            ["Features", field] => insert(&mut features, field, value, path)?,
            [list, index, field] => {
                let Some((name, max)) = LISTS.iter().find(|(l, _)| l == list) else {
                    return Err(bad(
                        path,
                        format!(
                            "'{key}': only DiskDeviceMapping.N.Field and Tag.N.Key|Value are lists"
                        ),
                    ));
                };
                let i: usize = index
                    .parse()
                    .ok()
                    .filter(|i| (1..=*max).contains(i))
                    .ok_or_else(|| bad(path, format!("'{key}': N is 1 to {max}")))?;
                let entry = lists.entry(name).or_default().entry(i).or_default();
                insert(entry, field, value, path)?;
            }
            _ => {
                return Err(bad(
                    path,
                    format!("'{key}' is not a CreateImage parameter name"),
                ))
            }
        }
    }
    if !features.is_empty() {
        top.insert("Features".into(), Value::Object(features));
    }
    for (name, entries) in lists {
        let items = entries.into_values().map(Value::Object).collect();
        top.insert(name.to_string(), Value::Array(items));
    }
    Ok(Value::Object(top))
}

/// The `Key=Value` segments: split on lines and `&`, the URL before `?` and placeholders dropped.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .flat_map(|l| l.split('&'))
        .map(|s| match s.find("?") {
            Some(q) if s.trim_start().starts_with("http") => &s[q + 1..],
            _ => s,
        })
        .map(str::trim)
        .filter(|s| !s.is_empty() && !is_placeholder(s))
}

/// `<公共请求参数>`: a document's stand-in for the common parameters.
fn is_placeholder(s: &str) -> bool {
    s.starts_with('<') && s.ends_with('>')
}

/// Puts `key` once; booleans stay booleans (`DryRun=true`), everything else is text.
fn insert(map: &mut Map<String, Value>, key: &str, value: String, path: &Path) -> Result<()> {
    let v = match value.as_str() {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(value),
    };
    if map.insert(key.to_string(), v).is_some() {
        return Err(bad(path, format!("'{key}' is given twice")));
    }
    Ok(())
}

/// Percent-decoding (`%2F` → `/`); the result must be UTF-8.
fn decode(s: &str, path: &Path) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(path, format!("'{s}': a % not followed by two hex digits")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(path, format!("'{s}' does not decode to UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(text: &str) -> Result<Value> {
        to_json(text, Path::new("q.txt"))
    }

    #[test]
    fn the_documents_example_reads() {
        let v = q("https://ecs.aliyuncs.com/?Action=CreateImage\n&RegionId=cn-hangzhou\n&SnapshotId=s-snapshot1\n&ImageName=demo_image\n&<公共请求参数>\n").unwrap();
        assert_eq!(
            v,
            json!({"Action": "CreateImage", "RegionId": "cn-hangzhou", "SnapshotId": "s-snapshot1", "ImageName": "demo_image"})
        );
    }

    #[test]
    fn lists_follow_n_and_values_decode() {
        let v = q("ImageName=a&DiskDeviceMapping.2.Size=20&DiskDeviceMapping.1.SnapshotId=%2Ftmp%2Fs.raw&DiskDeviceMapping.1.DiskType=system&Tag.1.Key=k&Tag.1.Value=v&Features.ImdsSupport=v2&DryRun=true").unwrap();
        assert_eq!(
            v,
            json!({"ImageName": "a", "DryRun": true, "Features": {"ImdsSupport": "v2"},
                   "DiskDeviceMapping": [{"SnapshotId": "/tmp/s.raw", "DiskType": "system"}, {"Size": "20"}],
                   "Tag": [{"Key": "k", "Value": "v"}]})
        );
    }

    #[test]
    fn malformed_queries_are_refused() {
        for bad in [
            "ImageName",
            "DiskDeviceMapping.0.Size=1",
            "DiskDeviceMapping.18.Size=1",
            "Tag.x.Key=a",
            "Other.1.Key=a",
            "A.B.C.D=1",
            "ImageName=a&ImageName=b",
            "ImageName=%zz",
            "ImageName=%ff",
        ] {
            assert!(q(bad).is_err(), "{bad}");
        }
        assert!(q(&"A=1&".repeat(MAX_PAIRS + 1)).is_err());
    }
}
