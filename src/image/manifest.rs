//! The image manifest (`manifest.json`, in the API's field names so DescribeImages users recognise
//! them) and `SHA256SUMS` (exactly what `sha256sum -c` reads). Only serialization lives here; the
//! publisher writes the files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::copy::stats::CopyStats;
use crate::format::ChainEntry;
use crate::image::attributes::{ImageAttributes, Status};
use crate::request::plan::{Device, DiskType};

/// One file read while opening a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct FileRead {
    pub(crate) path: PathBuf,
    pub(crate) format: String,
}

impl From<&ChainEntry> for FileRead {
    fn from(c: &ChainEntry) -> Self {
        FileRead {
            path: c.path.clone(),
            format: c.format.as_str().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct SourceRecord {
    /// The file named by the user, made absolute.
    pub(crate) path: PathBuf,
    /// The internal snapshot read, if any.
    #[serde(default)]
    pub(crate) snapshot_name: Option<String>,
    pub(crate) format: String,
    pub(crate) virtual_size: u64,
    /// Every file read, overlay first.
    #[serde(default)]
    pub(crate) files_read: Vec<FileRead>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct InstanceRecord {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) uuid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DiskRecord {
    pub(crate) device: Device,
    /// The instance's target name for this disk (`vda`), with `--instance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) original_target: Option<String>,
    pub(crate) disk_type: DiskType,
    /// The disk file, relative to the image directory; with `archive`, its member name there.
    pub(crate) file: String,
    /// The archive in the image directory that holds the disk as its member `file` (a vSphere
    /// OVA); None when the disk is a file of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) archive: Option<String>,
    pub(crate) format: String,
    pub(crate) virtual_size: u64,
    /// GiB, rounded up (the API's Size).
    #[serde(rename = "Size")]
    pub(crate) size_gib: u64,
    pub(crate) allocated_bytes: u64,
    pub(crate) file_size: u64,
    pub(crate) sha256: String,
    /// None for an empty disk.
    #[serde(default)]
    pub(crate) source: Option<SourceRecord>,
    #[serde(rename = "CopyStats", default)]
    pub(crate) stats: CopyStats,
    /// Whether the disk file is encrypted (LUKS), and how: never key material.
    #[serde(default)]
    pub(crate) encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<EncryptionRecord>,
    /// What kiln changed in the guest's bytes (`--relocate-gpt`); empty when it copied them as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) changes: Vec<String>,
}

/// How an encrypted disk is encrypted (the manifest's `Encryption`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EncryptionRecord {
    /// `luks1` (inside qcow2, or a raw volume) or `luks2`.
    pub(crate) format: String,
    /// `aes-xts-plain64`.
    pub(crate) cipher: String,
    pub(crate) key_bits: u32,
    /// The key slot's KDF: `pbkdf2-sha256` or `argon2id`.
    pub(crate) key_slot_kdf: String,
}

impl From<crate::format::luks::VolumeInfo> for EncryptionRecord {
    fn from(v: crate::format::luks::VolumeInfo) -> Self {
        EncryptionRecord {
            format: format!("luks{}", v.luks_version),
            cipher: "aes-xts-plain64".into(),
            key_bits: v.key_bits,
            key_slot_kdf: v.kdf,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Manifest {
    /// ImageId, ImageName, ImageType, ..., Tags: what the store's record says too.
    #[serde(flatten)]
    pub(crate) attributes: ImageAttributes,
    pub(crate) creation_time: String,
    pub(crate) status: Status,
    /// The idempotency token the image was created with, if any.
    #[serde(default)]
    pub(crate) client_token: Option<String>,
    #[serde(rename = "Size")]
    pub(crate) size_gib: u64,
    #[serde(default)]
    pub(crate) kiln_version: String,
    /// The libvirt domain the image was made from, with `--instance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) instance: Option<InstanceRecord>,
    #[serde(rename = "DiskDeviceMappings")]
    pub(crate) disks: Vec<DiskRecord>,
    /// The image check of the system disk (`--detect`, DetectionStrategy Standard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) detection: Option<crate::detect::Report>,
    /// The destination the image was built for (`--target`), and what its rules changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<TargetRecord>,
}

/// The manifest's `Target`: the destination, and every adjustment its rules made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TargetRecord {
    pub(crate) name: crate::request::target::Target,
    /// What the destination's rules changed, in words (a size grown to a whole MiB, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) adjustments: Vec<String>,
}

/// The shared attributes read as the manifest's own fields (`manifest.image_id`), as they are in
/// its JSON.
impl std::ops::Deref for Manifest {
    type Target = ImageAttributes;
    fn deref(&self) -> &ImageAttributes {
        &self.attributes
    }
}

impl std::ops::DerefMut for Manifest {
    fn deref_mut(&mut self) -> &mut ImageAttributes {
        &mut self.attributes
    }
}

impl Manifest {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// A manifest as kiln wrote it (older kilns' manifests too: later fields default).
    pub(crate) fn from_json(bytes: &[u8]) -> serde_json::Result<Manifest> {
        serde_json::from_slice(bytes)
    }
}

/// `SHA256SUMS` text: one `HEX  NAME` line per file, in the order given. Names are kiln's own
/// (device names and `manifest.json`), so they never need sha256sum's escaping.
pub(crate) fn sha256sums(entries: &[(String, String)]) -> String {
    entries
        .iter()
        .map(|(hash, name)| format!("{hash}  {name}\n"))
        .collect()
}

/// `m-` and 20 lowercase letters and digits, from the kernel's random source.
pub(crate) fn new_image_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 20];
    let got = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    });
    if got.is_err() {
        // No /dev/urandom: fall back on time and pid, still unique enough for a local store.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ (std::process::id() as u128) << 64;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> ((i * 6) % 120)) as u8;
        }
    }
    // 36 symbols: rejection-free mapping; the bias (256 % 36) is irrelevant for an identifier.
    let s: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("m-{s}")
}

/// RFC 3339 UTC time (`2026-11-23T03:15:31Z`) for a Unix timestamp.
pub(crate) fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_403_731), "2026-11-23T03:15:31Z");
    }

    #[test]
    fn image_ids_have_the_api_shape() {
        let id = new_image_id();
        assert_eq!(id.len(), 22);
        assert!(id.starts_with("m-"));
        assert!(id[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(id, new_image_id());
    }

    #[test]
    fn sums_use_two_spaces() {
        let s = sha256sums(&[
            ("ab".into(), "xvda.qcow2".into()),
            ("cd".into(), "manifest.json".into()),
        ]);
        assert_eq!(s, "ab  xvda.qcow2\ncd  manifest.json\n");
    }
}
