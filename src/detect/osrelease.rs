//! `/etc/os-release` from an ext2/3/4 root filesystem (read with `ext4-view`), and the Platform
//! name CreateImage uses for it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::image::attributes::Platform;

use crate::format::BlockSource;

use super::fs::PartReader;

/// Largest os-release kiln reads (real ones are well under 1 KiB).
pub(crate) const MAX_LEN: u64 = 64 * 1024;

/// The os-release fields kiln records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OsRelease {
    #[serde(rename = "Id")]
    pub(crate) id: String,
    #[serde(rename = "Name")]
    pub(crate) name: String,
    #[serde(rename = "VersionId")]
    pub(crate) version_id: String,
    #[serde(rename = "PrettyName")]
    pub(crate) pretty_name: String,
    #[serde(rename = "IdLike", default, skip_serializing_if = "String::is_empty")]
    pub(crate) id_like: String,
    #[serde(
        rename = "VariantId",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) variant_id: String,
}

/// Parses os-release text: `KEY=value` lines, values optionally quoted, `#` comments.
pub(crate) fn parse(text: &str) -> OsRelease {
    let mut r = OsRelease::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = unquote(v.trim());
        match k.trim() {
            "ID" => r.id = v,
            "NAME" => r.name = v,
            "VERSION_ID" => r.version_id = v,
            "PRETTY_NAME" => r.pretty_name = v,
            "ID_LIKE" => r.id_like = v,
            "VARIANT_ID" => r.variant_id = v,
            _ => {}
        }
    }
    r
}

fn unquote(v: &str) -> String {
    let inner = match v.as_bytes() {
        [q @ (b'"' | b'\''), .., l] if q == l && v.len() >= 2 => &v[1..v.len() - 1],
        _ => v,
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The CreateImage Platform for an OS.
pub(crate) fn platform(os: &OsRelease) -> Platform {
    Platform::parse(platform_name(os)).unwrap_or_default()
}

/// The Platform's API spelling for an OS.
fn platform_name(os: &OsRelease) -> &'static str {
    let id = os.id.to_ascii_lowercase();
    let name = os.name.to_ascii_lowercase();
    let variant = os.variant_id.to_ascii_lowercase();
    let by_id = |id: &str| -> Option<&'static str> {
        Some(match id {
            "ubuntu" => "Ubuntu",
            "debian" => "Debian",
            "centos" if name.contains("stream") => "CentOS Stream",
            "centos" => "CentOS",
            "rhel" | "redhat" => "RedHat",
            "fedora" if variant == "coreos" || name.contains("coreos") => "Fedora CoreOS",
            "fedora" => "Fedora",
            "fedora-coreos" | "fcos" => "Fedora CoreOS",
            "almalinux" => "AlmaLinux",
            "rocky" => "Rocky Linux",
            "opensuse" | "opensuse-leap" | "opensuse-tumbleweed" | "opensuse-microos" => "OpenSUSE",
            "sles" | "sled" | "suse" | "sle-micro" => "SUSE",
            "alinux" | "aliyun" => "Aliyun",
            "anolis" => "Anolis",
            "kylin" => "Kylin",
            "uos" | "uniontech" | "deepin" => "UOS",
            "gentoo" => "Gentoo",
            "coreos" | "flatcar" => "CoreOS",
            "freebsd" => "FreeBSD",
            _ => return None,
        })
    };
    if let Some(p) = by_id(&id) {
        return p;
    }
    os.id_like
        .split_whitespace()
        .find_map(|l| by_id(&l.to_ascii_lowercase()))
        .unwrap_or("Others Linux")
}

/// Reads `/etc/os-release` (else `/usr/lib/os-release`) from the ext filesystem at bytes
/// `start..start + len`. Ok(None) when the filesystem has neither; Err says why it could not be read.
pub(crate) fn read(
    src: Arc<dyn BlockSource>,
    start: u64,
    len: u64,
) -> Result<Option<OsRelease>, String> {
    let reader = PartReader::new(src, start, len);
    let fs = ext4_view::Ext4::load(Box::new(reader))
        .map_err(|e| format!("not a readable ext2/3/4 filesystem: {e}"))?;
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        let meta = match fs.metadata(path) {
            Ok(m) => m,
            Err(ext4_view::Ext4Error::NotFound) => continue,
            Err(e) => return Err(format!("{path}: {e}")),
        };
        if meta.len() > MAX_LEN {
            return Err(format!(
                "{path} is {} bytes; an os-release is at most {MAX_LEN}",
                meta.len()
            ));
        }
        let bytes = fs.read(path).map_err(|e| format!("{path}: {e}"))?;
        return Ok(Some(parse(&String::from_utf8_lossy(&bytes))));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotes_and_comments() {
        let r = parse(
            "# comment\nNAME=\"Ubuntu\"\nVERSION_ID='22.04'\nID=ubuntu\nPRETTY_NAME=\"Ubuntu 22.04.4 LTS \\\"Jammy\\\"\"\nbroken line\nID_LIKE=debian\n",
        );
        assert_eq!(r.id, "ubuntu");
        assert_eq!(r.name, "Ubuntu");
        assert_eq!(r.version_id, "22.04");
        assert_eq!(r.pretty_name, "Ubuntu 22.04.4 LTS \"Jammy\"");
        assert_eq!(platform(&r), Platform::Ubuntu);
    }

    #[test]
    fn platforms_map_to_the_api_names() {
        let os = |id: &str, name: &str, like: &str| OsRelease {
            id: id.into(),
            name: name.into(),
            id_like: like.into(),
            ..OsRelease::default()
        };
        assert_eq!(
            platform_name(&os("centos", "CentOS Stream", "")),
            "CentOS Stream"
        );
        assert_eq!(platform_name(&os("centos", "CentOS Linux", "")), "CentOS");
        assert_eq!(
            platform_name(&os("rocky", "Rocky Linux", "")),
            "Rocky Linux"
        );
        assert_eq!(
            platform_name(&os("opensuse-leap", "openSUSE Leap", "")),
            "OpenSUSE"
        );
        assert_eq!(
            platform_name(&os("linuxmint", "Mint", "ubuntu debian")),
            "Ubuntu"
        );
        assert_eq!(platform_name(&os("nixos", "NixOS", "")), "Others Linux");
        for id in [
            "ubuntu",
            "debian",
            "rhel",
            "fedora",
            "almalinux",
            "sles",
            "alinux",
            "anolis",
        ] {
            let p = platform_name(&os(id, "", ""));
            assert!(Platform::parse(p).is_some(), "{id} → {p}");
        }
    }
}
