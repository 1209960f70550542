//! The image's typed values and the attributes that the manifest and the store's record share.
//!
//! Each enum is spelled on the wire exactly as the API spells it (`UEFI-Preferred`, `x86_64`,
//! `Others Linux`), and parsed from user input ignoring case.

use serde::{Deserialize, Serialize};

/// An enum whose every variant has one API spelling: `as_str`, `ALL`, a case-insensitive
/// `parse_loose`, an exact `parse`, `Display`, and serde as that string.
macro_rules! api_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl $name {
            /// Every value, in the API's order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The API's spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }

            /// The value spelled exactly `s`.
            pub fn parse(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }

            /// The value spelled `s` ignoring ASCII case and surrounding white space.
            // Every api_enum has the same API; those never typed by users (Status) do not use it.
            #[allow(dead_code)]
            pub fn parse_loose(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            }

            /// The API's spellings, comma-separated (for messages).
            pub fn list() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "'{s}' is not a {}: one of {}",
                        stringify!($name),
                        $name::list()
                    ))
                })
            }
        }
    };
}
pub(crate) use api_enum;

api_enum! {
    /// An image's status, as DescribeImages reports it.
    pub enum Status {
        Creating = "Creating",
        Available = "Available",
        CreateFailed = "CreateFailed",
    }
}

api_enum! {
    /// A system image, or data disks only (`--data-image`).
    pub enum ImageType {
        System = "System",
        DataDisk = "DataDisk",
    }
}

api_enum! {
    /// How the image boots.
    pub enum BootMode {
        Bios = "BIOS",
        Uefi = "UEFI",
        UefiPreferred = "UEFI-Preferred",
    }
}

api_enum! {
    /// The CPU architecture the image is for.
    pub enum Architecture {
        I386 = "i386",
        X86_64 = "x86_64",
        Arm64 = "arm64",
    }
}

api_enum! {
    /// The operating system platforms CreateImage accepts.
    pub enum Platform {
        Aliyun = "Aliyun",
        Anolis = "Anolis",
        CentOs = "CentOS",
        Ubuntu = "Ubuntu",
        CoreOs = "CoreOS",
        Suse = "SUSE",
        Debian = "Debian",
        OpenSuse = "OpenSUSE",
        FreeBsd = "FreeBSD",
        RedHat = "RedHat",
        Kylin = "Kylin",
        Uos = "UOS",
        Fedora = "Fedora",
        FedoraCoreOs = "Fedora CoreOS",
        CentOsStream = "CentOS Stream",
        AlmaLinux = "AlmaLinux",
        RockyLinux = "Rocky Linux",
        Gentoo = "Gentoo",
        CustomizedLinux = "Customized Linux",
        OthersLinux = "Others Linux",
        WindowsServer2022 = "Windows Server 2022",
        WindowsServer2019 = "Windows Server 2019",
        WindowsServer2016 = "Windows Server 2016",
        WindowsServer2012 = "Windows Server 2012",
        WindowsServer2008 = "Windows Server 2008",
        WindowsServer2003 = "Windows Server 2003",
    }
}

// The API's defaults: what an image is when the request does not say. Written out together here
// rather than derived inside each `api_enum!`, so they read as the API documents them.
#[allow(clippy::derivable_impls)]
impl Default for ImageType {
    fn default() -> Self {
        ImageType::System
    }
}

#[allow(clippy::derivable_impls)]
impl Default for BootMode {
    fn default() -> Self {
        BootMode::Bios
    }
}

#[allow(clippy::derivable_impls)]
impl Default for Architecture {
    fn default() -> Self {
        Architecture::X86_64
    }
}

#[allow(clippy::derivable_impls)]
impl Default for Platform {
    fn default() -> Self {
        Platform::OthersLinux
    }
}

/// Whose CreateImage a request is written for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Dialect {
    #[default]
    Alibaba,
    JdCloud,
    Huawei,
}

impl Dialect {
    pub const ALL: [Dialect; 3] = [Dialect::Alibaba, Dialect::JdCloud, Dialect::Huawei];

    /// The name `--dialect` takes and records carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Alibaba => "alibaba",
            Dialect::JdCloud => "jdcloud",
            Dialect::Huawei => "huawei",
        }
    }

    pub fn parse(s: &str) -> Option<Dialect> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// A tag (`Key`, `Value`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Tag {
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) value: String,
}

/// What the manifest and the store's record both say of an image, in the API's field names and
/// order (each embeds this first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageAttributes {
    pub(crate) image_id: String,
    pub(crate) image_name: String,
    #[serde(default)]
    pub(crate) image_type: ImageType,
    #[serde(default)]
    pub(crate) image_family: Option<String>,
    #[serde(default)]
    pub(crate) image_version: Option<String>,
    #[serde(default)]
    pub(crate) description: String,
    #[serde(default)]
    pub(crate) platform: Platform,
    #[serde(default)]
    pub(crate) architecture: Architecture,
    #[serde(default)]
    pub(crate) boot_mode: BootMode,
    #[serde(default)]
    pub(crate) tags: Vec<Tag>,
    /// The dialect of a request written in JD Cloud's or Huawei's shape, or in Alibaba's with
    /// parameters only recorded: absent otherwise, so older manifests and records read the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) request_dialect: Option<DialectRecord>,
}

/// What an image keeps of the vendor request it was made from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DialectRecord {
    /// `alibaba`, `jdcloud` or `huawei`.
    pub(crate) dialect: String,
    /// Parameters kiln records without acting on them offline (ResourceGroupId, min_ram, ...), in
    /// the vendor's names.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub(crate) parameters: serde_json::Map<String, serde_json::Value>,
    /// Each image device (`/dev/xvdb`) with the vendor's name for it (`vdb`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(crate) device_names: std::collections::BTreeMap<String, String>,
    /// Huawei's asynchronous job, which `kiln describe --job` reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) job_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_the_api_spelling() {
        assert_eq!(BootMode::UefiPreferred.as_str(), "UEFI-Preferred");
        assert_eq!(
            BootMode::parse_loose(" uefi-preferred "),
            Some(BootMode::UefiPreferred)
        );
        assert_eq!(BootMode::parse("uefi"), None);
        assert_eq!(
            Architecture::parse_loose("ARM64"),
            Some(Architecture::Arm64)
        );
        assert_eq!(
            Platform::parse_loose("others linux"),
            Some(Platform::OthersLinux)
        );
        assert_eq!(Platform::ALL.len(), 26);
        assert_eq!(Status::list(), "Creating, Available, CreateFailed");
        assert_eq!(
            serde_json::to_string(&Platform::WindowsServer2022).unwrap(),
            "\"Windows Server 2022\""
        );
        let e = serde_json::from_str::<Status>("\"Gone\"").unwrap_err();
        assert!(
            e.to_string().contains("Creating, Available, CreateFailed"),
            "{e}"
        );
    }

    #[test]
    fn attributes_default_as_the_api_does() {
        let a: ImageAttributes =
            serde_json::from_str(r#"{"ImageId":"m-1","ImageName":"n"}"#).unwrap();
        assert_eq!(a.image_type, ImageType::System);
        assert_eq!(a.platform, Platform::OthersLinux);
        assert_eq!(a.architecture, Architecture::X86_64);
        assert_eq!(a.boot_mode, BootMode::Bios);
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.starts_with(r#"{"ImageId":"m-1","ImageName":"n","ImageType":"System""#));
    }
}
