//! `--target` profiles: for each destination kiln builds for, the output format it takes, how the
//! disks are packaged, and its documented rules, each with the document it comes from. The rules
//! are checked before anything is written ([`check_request`] before the sources are opened,
//! [`align`] and [`check_sizes`] once every disk's size is known); a size that must grow to an
//! alignment grows, and the change is recorded for the manifest's `Target.Adjustments`.
//!
//! vSphere's OVA is written by [`crate::archive::ova`] (from `commands::create::ova`), which also
//! checks the OVA's own constraints (no encryption, no `-t none`, arm64 boots UEFI).

use crate::error::{Code, Error, Result};
use crate::format::OutputFormat;
use crate::image::attributes::{Architecture, BootMode};
use crate::request::target::Target;
use crate::util::size::{self, GIB, MIB, TIB};

/// A public document a rule or format comes from.
#[derive(Debug)]
pub(crate) struct Doc {
    pub(crate) title: &'static str,
    pub(crate) url: &'static str,
}

/// How a destination takes an image's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packaging {
    /// One disk file per disk, in the output format.
    Files,
    /// One gzip-compressed tar per disk holding `disk.raw` in GNU tar's old sparse form (GCP).
    GzipTar,
    /// One OVA for the whole image: the `.ovf`, the `.mf`, then one VMDK per disk (vSphere).
    Ova,
}

/// What a rule checks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Check {
    /// At most this many data disks.
    MaxDataDisks(usize),
    /// Every disk's virtual size is a whole multiple of this; a size that is not grows to the next.
    Align(u64),
    /// Every disk is at least this large.
    MinSize(u64),
    /// Every disk is at most this large.
    MaxSize(u64),
    /// The system disk is at most this large.
    MaxSystemSize(u64),
    /// A data disk is at most this large.
    MaxDataSize(u64),
    /// The image's architecture is one of these.
    Architectures(&'static [Architecture]),
    /// The image's boot mode is one of these.
    BootModes(&'static [BootMode]),
}

/// One documented rule of a destination.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) check: Check,
    /// The rule as the document says it.
    pub(crate) says: &'static str,
    pub(crate) doc: &'static Doc,
}

/// A destination's profile.
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) target: Target,
    /// The output format (a registry name).
    pub(crate) format: &'static str,
    /// The `-o` options the destination needs (subformats), forced over the defaults.
    pub(crate) options: &'static [(&'static str, &'static str)],
    pub(crate) packaging: Packaging,
    /// Where the format (and packaging) comes from.
    pub(crate) format_doc: &'static Doc,
    pub(crate) rules: &'static [Rule],
}

const AZURE_VHD: Doc = Doc {
    title: "Microsoft Learn, Add-AzVhd: the VHD must be a .vhd file of N MiB + 512 bytes (a fixed VHD); dynamic VHDs are converted to fixed",
    url: "https://learn.microsoft.com/powershell/module/az.compute/add-azvhd",
};
const AZURE_UPLOAD_SIZE: Doc = Doc {
    title: "Microsoft Learn, DiskCreationData.UploadSizeBytes: between 20 MiB + 512 bytes and 32 TiB + 512 bytes",
    url: "https://learn.microsoft.com/dotnet/api/azure.resourcemanager.compute.models.diskcreationdata.uploadsizebytes",
};
const AWS_FORMATS: Doc = Doc {
    title: "Amazon EC2 API Reference, ImageDiskContainer: Format OVA | VHD | VHDX | VMDK | RAW",
    url: "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ImageDiskContainer.html",
};
const AWS_IMPORT_IMAGE: Doc = Doc {
    title: "Amazon EC2 API Reference, ImportImage: Architecture i386 | x86_64; the uefi-preferred boot mode isn't supported for importing images",
    url: "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ImportImage.html",
};
const GCP_IMPORT: Doc = Doc {
    title: "Google Cloud, Manually import boot disks: one file named disk.raw, archived with tar --format=oldgnu -Sczf; the disk size a whole number of GB",
    url: "https://cloud.google.com/compute/docs/import/import-existing-image",
};
const HYPERV_VHDX: Doc = Doc {
    title: "Microsoft, [MS-VHDX] Virtual Hard Disk v2 (VHDX) File Format",
    url: "https://learn.microsoft.com/openspecs/windows_protocols/ms-vhdx/83e061f8-f6e2-4de1-91bd-5d518a43d477",
};
const ALIBABA_IMPORT: Doc = Doc {
    title: "Alibaba Cloud ECS API, ImportImage: DiskDeviceMapping.N.Format QCOW2 | RAW | VHD",
    url: "https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-importimage",
};
const ALIBABA_CREATE: Doc = Doc {
    title: "Alibaba Cloud ECS API, CreateImage: up to 16 data disk snapshots (../shared/reference/alibaba-ecs-createimage.en.txt)",
    url: "https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-createimage",
};
const HUAWEI_FORMATS: Doc = Doc {
    title: "Huawei Cloud IMS, Registering an External Image File as a Private Image: VHD, ZVHD, VMDK, QCOW2, RAW, ZVHD2, VHDX, QCOW, VDI, QED, ISO",
    url: "https://support.huaweicloud.com/intl/en-us/usermanual-ims/ims_01_0209.html",
};
const HUAWEI_CREATE: Doc = Doc {
    title: "Huawei Cloud IMS API, CreateImage (镜像文件制作): at most 3 data disks with an external image file; system disk min_disk 40-1024 GB; data disk min_disk 1-2048 GB (../shared/reference/huawei-ims-createimage.zh-cn.md)",
    url: "https://support.huaweicloud.com/api-ims/ims_03_0602.html",
};
const VSPHERE_OVF: Doc = Doc {
    title: "DMTF DSP0243, Open Virtualization Format Specification: an OVA is a tar whose first file is the OVF descriptor, then the manifest, then the files in References order; VMDK disks are streamOptimized",
    url: "https://www.dmtf.org/sites/default/files/standards/documents/DSP0243_2.1.0.pdf",
};
const OPENSTACK_FORMATS: Doc = Doc {
    title: "OpenStack Glance, Disk and container formats: raw, qcow2, vhd, vhdx, vmdk, vdi, ...",
    url: "https://docs.openstack.org/glance/latest/user/formats.html",
};

/// Every destination kiln builds for, in `Target` order.
pub(crate) static PROFILES: &[Profile] = &[
    Profile {
        target: Target::Azure,
        format: "vhd",
        options: &[("subformat", "fixed")],
        packaging: Packaging::Files,
        format_doc: &AZURE_VHD,
        rules: &[
            Rule {
                check: Check::Align(MIB),
                says: "the virtual size is a whole number of MiB",
                doc: &AZURE_VHD,
            },
            Rule {
                check: Check::MinSize(20 * MIB),
                says: "an uploaded disk holds at least 20 MiB",
                doc: &AZURE_UPLOAD_SIZE,
            },
            Rule {
                check: Check::MaxSize(32 * TIB),
                says: "an uploaded disk holds at most 32 TiB",
                doc: &AZURE_UPLOAD_SIZE,
            },
        ],
    },
    Profile {
        target: Target::Aws,
        format: "vmdk",
        options: &[("subformat", "streamOptimized")],
        packaging: Packaging::Files,
        format_doc: &AWS_FORMATS,
        rules: &[
            Rule {
                check: Check::Architectures(&[Architecture::I386, Architecture::X86_64]),
                says: "ImportImage's Architecture is i386 or x86_64",
                doc: &AWS_IMPORT_IMAGE,
            },
            Rule {
                check: Check::BootModes(&[BootMode::Bios, BootMode::Uefi]),
                says: "the uefi-preferred boot mode isn't supported for importing images",
                doc: &AWS_IMPORT_IMAGE,
            },
        ],
    },
    Profile {
        target: Target::Gcp,
        format: "raw",
        options: &[],
        packaging: Packaging::GzipTar,
        format_doc: &GCP_IMPORT,
        rules: &[Rule {
            check: Check::Align(GIB),
            says: "the disk size is a whole number of GB",
            doc: &GCP_IMPORT,
        }],
    },
    Profile {
        target: Target::Vsphere,
        format: "vmdk",
        options: &[("subformat", "streamOptimized")],
        packaging: Packaging::Ova,
        format_doc: &VSPHERE_OVF,
        rules: &[],
    },
    Profile {
        target: Target::Hyperv,
        format: "vhdx",
        options: &[],
        packaging: Packaging::Files,
        format_doc: &HYPERV_VHDX,
        rules: &[],
    },
    Profile {
        target: Target::Alibaba,
        format: "qcow2",
        options: &[],
        packaging: Packaging::Files,
        format_doc: &ALIBABA_IMPORT,
        rules: &[Rule {
            check: Check::MaxDataDisks(16),
            says: "an image holds up to 16 data disks",
            doc: &ALIBABA_CREATE,
        }],
    },
    Profile {
        target: Target::Huawei,
        format: "qcow2",
        options: &[],
        packaging: Packaging::Files,
        format_doc: &HUAWEI_FORMATS,
        rules: &[
            Rule {
                check: Check::MaxDataDisks(3),
                says: "an external image file carries at most 3 data disks",
                doc: &HUAWEI_CREATE,
            },
            Rule {
                check: Check::MaxSystemSize(1024 * GIB),
                says: "a system disk image's min_disk is 40 to 1024 GB",
                doc: &HUAWEI_CREATE,
            },
            Rule {
                check: Check::MaxDataSize(2048 * GIB),
                says: "a data disk image's min_disk is 1 to 2048 GB",
                doc: &HUAWEI_CREATE,
            },
        ],
    },
    Profile {
        target: Target::Openstack,
        format: "qcow2",
        options: &[],
        packaging: Packaging::Files,
        format_doc: &OPENSTACK_FORMATS,
        rules: &[],
    },
];

/// The profile of `target`.
pub(crate) fn profile(target: Target) -> Result<&'static Profile> {
    PROFILES
        .iter()
        .find(|p| p.target == target)
        .ok_or_else(|| Error::new(Code::Internal, format!("no profile for target {target}")))
}

impl Profile {
    /// The output format.
    pub(crate) fn output_format(&self) -> Result<OutputFormat> {
        OutputFormat::named(self.format).ok_or_else(|| {
            Error::new(
                Code::Internal,
                format!("{}: kiln does not write {}", self.target, self.format),
            )
        })
    }

    /// What the output is, in words: `vhd (subformat=fixed)`, `raw in a gzip tar (disk.raw)`.
    pub(crate) fn describe(&self) -> String {
        let opts: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut s = self.format.to_string();
        if !opts.is_empty() {
            s.push_str(&format!(" ({})", opts.join(",")));
        }
        match self.packaging {
            Packaging::GzipTar => {
                s.push_str(" as disk.raw in a gzip tar (GNU oldgnu sparse), one per disk")
            }
            Packaging::Ova => s.push_str(", every disk in one OVA"),
            Packaging::Files => {}
        }
        s
    }

    /// The output format and `-o` text for a create with this target: `explicit` is `--format`
    /// when given, `options` the `-o` text given. A different format, or an option the destination
    /// sets to another value, is refused.
    pub(crate) fn output(
        &self,
        explicit: Option<OutputFormat>,
        options: &str,
    ) -> Result<(OutputFormat, String)> {
        let format = self.output_format()?;
        if let Some(f) = explicit.filter(|f| *f != format) {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "--target {} writes {} ({}); --format {} conflicts: drop --format or give --format {}",
                    self.target,
                    self.describe(),
                    self.format_doc.url,
                    f.extension(),
                    self.format
                ),
            ));
        }
        let mut parts: Vec<String> = options
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        for (k, v) in self.options {
            let given = parts.iter().find_map(|p| {
                let (pk, pv) = p.split_once('=')?;
                pk.trim().eq_ignore_ascii_case(k).then(|| pv.trim())
            });
            match given {
                Some(g) if !g.eq_ignore_ascii_case(v) => {
                    return Err(Error::new(
                        Code::InvalidParameter,
                        format!(
                            "--target {} needs -o {k}={v} ({}); {k}={g} conflicts",
                            self.target, self.format_doc.url
                        ),
                    ))
                }
                Some(_) => {}
                None => parts.push(format!("{k}={v}")),
            }
        }
        Ok((format, parts.join(",")))
    }
}

/// The request's side of the rules, checked before any source is opened: data disk count,
/// architecture, boot mode, and no encryption (destinations import plain disks).
pub(crate) fn check_request(
    p: &Profile,
    data_disks: usize,
    architecture: Architecture,
    boot_mode: BootMode,
    encrypted: bool,
) -> Result<()> {
    if encrypted {
        return Err(Error::new(
            Code::TargetRule,
            format!(
                "--target {}: the destination imports plain disks, and kiln's LUKS encryption is for kiln and qemu; drop --encrypt (encrypt=) or --target",
                p.target
            ),
        ));
    }
    for r in p.rules {
        let broken = match r.check {
            Check::MaxDataDisks(n) if data_disks > n => Some(format!("{data_disks} data disks")),
            Check::Architectures(list) if !list.contains(&architecture) => {
                Some(format!("architecture {architecture}"))
            }
            Check::BootModes(list) if !list.contains(&boot_mode) => {
                Some(format!("boot mode {boot_mode}"))
            }
            _ => None,
        };
        if let Some(what) = broken {
            return Err(refused(p, r, &what));
        }
    }
    Ok(())
}

/// `size` grown to the profile's alignment, with the adjustment in words when it grew.
pub(crate) fn align(p: &Profile, device: &str, size: u64) -> (u64, Option<String>) {
    let mut out = size;
    let mut note = None;
    for r in p.rules {
        if let Check::Align(a) = r.check {
            let grown = out.next_multiple_of(a);
            if grown != out {
                note = Some(format!(
                    "{device}: virtual size {out} bytes grown to {grown} bytes ({}), because {}: {}",
                    size::human(grown),
                    r.says,
                    r.doc.url
                ));
                out = grown;
            }
        }
    }
    (out, note)
}

/// The size rules, on a disk's final virtual size.
pub(crate) fn check_size(p: &Profile, device: &str, system: bool, virtual_size: u64) -> Result<()> {
    for r in p.rules {
        let broken = match r.check {
            Check::Align(a) => !virtual_size.is_multiple_of(a),
            Check::MinSize(m) => virtual_size < m,
            Check::MaxSize(m) => virtual_size > m,
            Check::MaxSystemSize(m) => system && virtual_size > m,
            Check::MaxDataSize(m) => !system && virtual_size > m,
            _ => false,
        };
        if broken {
            let what = format!(
                "{device}: virtual size {virtual_size} bytes ({})",
                size::human(virtual_size)
            );
            return Err(refused(p, r, &what).on_device(device));
        }
    }
    Ok(())
}

fn refused(p: &Profile, r: &Rule, what: &str) -> Error {
    Error::new(
        Code::TargetRule,
        format!(
            "--target {}: {what} breaks the rule \"{}\" ({}, {})",
            p.target, r.says, r.doc.title, r.doc.url
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(name: &str) -> OutputFormat {
        OutputFormat::named(name).unwrap()
    }

    #[test]
    fn every_target_has_a_profile_whose_format_kiln_writes() {
        for &t in Target::ALL {
            let p = profile(t).unwrap();
            assert_eq!(p.target, t);
            p.output_format().unwrap();
        }
        assert_eq!(profile(Target::Vsphere).unwrap().packaging, Packaging::Ova);
    }

    #[test]
    fn a_target_picks_its_format_and_options_and_refuses_a_different_one() {
        let azure = profile(Target::Azure).unwrap();
        let (f, o) = azure.output(None, "").unwrap();
        assert_eq!(f, format("vhd"));
        assert_eq!(o, "subformat=fixed");
        assert_eq!(azure.output(Some(format("vhd")), "").unwrap().0, f);
        let e = azure.output(Some(format("qcow2")), "").unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(e.to_string().contains("--format qcow2 conflicts"), "{e}");
        let e = azure.output(None, "subformat=dynamic").unwrap_err();
        assert!(e.to_string().contains("subformat=fixed"), "{e}");
        let aws = profile(Target::Aws).unwrap();
        assert_eq!(
            aws.output(None, "").unwrap(),
            (format("vmdk"), "subformat=streamOptimized".into())
        );
        let hv = profile(Target::Hyperv).unwrap();
        assert_eq!(
            hv.output(None, "block_size=1M").unwrap(),
            (format("vhdx"), "block_size=1M".into())
        );
    }

    #[test]
    fn alignment_grows_and_says_why() {
        let azure = profile(Target::Azure).unwrap();
        assert_eq!(align(azure, "/dev/xvda", 64 * MIB), (64 * MIB, None));
        let (s, note) = align(azure, "/dev/xvda", 64 * MIB + 512);
        assert_eq!(s, 65 * MIB);
        let note = note.unwrap();
        assert!(
            note.contains("whole number of MiB") && note.contains("add-azvhd"),
            "{note}"
        );
        let gcp = profile(Target::Gcp).unwrap();
        assert_eq!(align(gcp, "/dev/xvdb", 1).0, GIB);
        assert_eq!(align(gcp, "/dev/xvdb", 3 * GIB).0, 3 * GIB);
    }

    #[test]
    fn broken_rules_are_refused_naming_the_rule_and_its_document() {
        let huawei = profile(Target::Huawei).unwrap();
        check_request(huawei, 3, Architecture::X86_64, BootMode::Bios, false).unwrap();
        let e = check_request(huawei, 4, Architecture::X86_64, BootMode::Bios, false).unwrap_err();
        assert_eq!(e.code(), Code::TargetRule);
        assert!(e.to_string().contains("at most 3 data disks"), "{e}");
        check_size(huawei, "/dev/xvda", true, 1024 * GIB).unwrap();
        let e = check_size(huawei, "/dev/xvda", true, 1025 * GIB).unwrap_err();
        assert!(e.to_string().contains("40 to 1024 GB"), "{e}");
        check_size(huawei, "/dev/xvdb", false, 1025 * GIB).unwrap();
        let aws = profile(Target::Aws).unwrap();
        let e = check_request(aws, 0, Architecture::Arm64, BootMode::Uefi, false).unwrap_err();
        assert!(e.to_string().contains("API_ImportImage"), "{e}");
        let e = check_request(aws, 0, Architecture::X86_64, BootMode::UefiPreferred, false)
            .unwrap_err();
        assert!(e.to_string().contains("uefi-preferred"), "{e}");
        let azure = profile(Target::Azure).unwrap();
        let e = check_size(azure, "/dev/xvda", true, 19 * MIB).unwrap_err();
        assert!(e.to_string().contains("at least 20 MiB"), "{e}");
        let e = check_request(azure, 0, Architecture::X86_64, BootMode::Bios, true).unwrap_err();
        assert_eq!(e.code(), Code::TargetRule);
    }

    #[test]
    fn the_readme_cites_every_document_a_profile_uses() {
        let readme = include_str!("../../README.md");
        for p in PROFILES {
            let docs = std::iter::once(p.format_doc).chain(p.rules.iter().map(|r| r.doc));
            for d in docs {
                assert!(
                    readme.contains(d.url),
                    "README lacks {} ({})",
                    d.url,
                    p.target
                );
            }
        }
    }
}
