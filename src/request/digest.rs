//! The request digest behind client tokens (idempotency): the same token with the same request
//! returns the image already made; with a different request it is refused.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::detect;
use crate::request::create::CreateRequest;
use crate::request::plan::DiskLayout;

/// SHA-256 over the normalised request: every attribute, the disk layout, the output settings, and
/// each source by canonical path, size and modification time. Threads and progress do not count.
pub(crate) fn request_digest(req: &CreateRequest, layout: &DiskLayout) -> String {
    let mut tags = req.tags.clone();
    tags.sort();
    let disks: Vec<serde_json::Value> = layout
        .disks
        .iter()
        .map(|d| {
            serde_json::json!({
                "Device": d.device,
                "DiskType": d.disk_type.as_str(),
                "Size": d.size,
                "Format": d.format.map(|f| f.as_str()),
                "OutputFormat": d.output_format.map(|f| f.extension()),
                "Source": d.snapshot.as_deref().map(source_identity),
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "ImageName": req.name,
        "ImageFamily": req.family,
        "ImageVersion": req.image_version,
        "Description": req.description.as_deref().unwrap_or(""),
        "Platform": req.platform,
        "Architecture": req.architecture,
        "BootMode": req.boot_mode,
        "Tags": tags,
        "Disks": disks,
        "OutputFormat": req.output.format.extension(),
        "ClusterBits": req.output.cluster_bits,
        "Compression": req.output.compression.map(|c| format!("{c:?}")),
    });
    // Only when set, so digests of requests made before these options existed do not change.
    if req.detect {
        v["DetectionStrategy"] = detect::STANDARD.into();
    }
    if req.relocate_gpt {
        v["RelocateGpt"] = true.into();
    }
    if let Some(t) = req.target {
        v["Target"] = t.as_str().into();
    }
    // A vendor request's recorded parameters and device names (never its random job ID).
    if let Some(d) = &req.dialect_record {
        v["Dialect"] = serde_json::json!({
            "Dialect": d.dialect,
            "Parameters": d.parameters,
            "DeviceNames": d.device_names,
        });
    }
    // Whether each disk is encrypted, and the LUKS version; never the key.
    let encrypted: Vec<&str> = layout
        .disks
        .iter()
        .filter(|d| d.crypt.encrypt || req.output.encryption.is_some())
        .map(|d| d.device.as_str())
        .collect();
    if !encrypted.is_empty() {
        v["Encrypted"] = encrypted.into();
        v["LuksVersion"] = req
            .output
            .encryption
            .as_ref()
            .map_or(1, |e| e.luks_version)
            .into();
    }
    if !req.output.options.is_empty() {
        let opts: Vec<String> = req
            .output
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        v["OutputOptions"] = opts.into();
    }
    crate::copy::hash::hex(&sha256_of(v.to_string().as_bytes()))
}

/// A source as (canonical path[@snapshot], size, mtime in ns); the path as given when it cannot
/// be resolved.
fn source_identity(p: &Path) -> serde_json::Value {
    if let Ok(Some(url)) = crate::remote::s3::S3Url::from_path(p) {
        // An object: its name and, when it can be read, its size and ETag.
        let stamp = crate::remote::s3::head(&url).ok();
        return serde_json::json!({
            "Path": url.to_string(),
            "Size": stamp.as_ref().map(|s| s.size),
            "ETag": stamp.and_then(|s| s.etag),
        });
    }
    let (file, snap) = if p.exists() {
        (p.to_path_buf(), None)
    } else {
        let s = p.to_string_lossy();
        match s.rfind('@') {
            Some(i) if i > 0 => (PathBuf::from(&s[..i]), Some(s[i + 1..].to_string())),
            _ => (p.to_path_buf(), None),
        }
    };
    let canonical =
        std::fs::canonicalize(&file).unwrap_or_else(|_| std::path::absolute(&file).unwrap_or(file));
    let meta = std::fs::metadata(&canonical).ok();
    serde_json::json!({
        "Path": canonical,
        "Snapshot": snap,
        "Size": meta.as_ref().map(|m| m.len()),
        "MtimeNanos": meta.as_ref().map(|m| m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128),
    })
}

pub(crate) fn sha256_of(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}
