//! The OVF descriptor of a vSphere OVA (DMTF DSP0243, OVF 1.x envelope, with VMware's `vmw:`
//! extensions as ovftool and VMware's open-vmdk templates write them):
//!
//! - `References`: one `File` per VMDK member (`ovf:href`, `ovf:size` in bytes);
//! - `DiskSection`: one `Disk` per VMDK (`ovf:capacity` in bytes with
//!   `ovf:capacityAllocationUnits="byte"`, `ovf:populatedSize`: the guest bytes the VMDK holds,
//!   `ovf:format`: VMware's streamOptimized URI);
//! - `VirtualSystem`: `OperatingSystemSection` (CIM OS type and `vmw:osType` from Architecture),
//!   `VirtualHardwareSection` with the hardware family (`vmx-NN`), one vCPU and 1 GiB of memory
//!   (the deployer's defaults, changed at import), the disk controllers, every disk attached in
//!   order (the system disk first, on unit 0 of the first controller), and `vmw:Config
//!   firmware=efi|bios` from BootMode.
//!
//! Rendering is plain text: the document is small and fixed in shape, and every value put in it
//! is escaped. The tests parse it back with roxmltree.

use crate::image::attributes::{Architecture, BootMode};

/// OVF's format URI for a streamOptimized VMDK (what ovftool writes, and ESXi expects).
pub(crate) const STREAM_OPTIMIZED_URI: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// One disk of the OVF, in attach order (the system disk first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OvfDisk {
    /// The member's name in the OVA (`ovf:href`).
    pub(crate) href: String,
    /// The VMDK member's size in bytes (`ovf:size`).
    pub(crate) file_size: u64,
    /// The disk's virtual size in bytes (`ovf:capacity`).
    pub(crate) capacity: u64,
    /// Guest bytes stored in the VMDK (`ovf:populatedSize`).
    pub(crate) populated: u64,
}

/// What the OVF describes.
#[derive(Debug, Clone)]
pub(crate) struct Ovf {
    /// The virtual system's name (the image name).
    pub(crate) name: String,
    pub(crate) boot_mode: BootMode,
    pub(crate) architecture: Architecture,
    pub(crate) disks: Vec<OvfDisk>,
}

/// The virtual hardware an architecture gets: CIM OS type, VMware guest id, hardware version and
/// the disk controller.
struct Hardware {
    /// CIM_OperatingSystem.OsType (`OperatingSystemSection ovf:id`).
    cim_os: u32,
    vmw_os: &'static str,
    /// `vmx-NN`: 14 is ESXi 6.7 (UEFI Secure Boot, the oldest release VMware still documents
    /// OVA import for); ESXi on Arm starts at 18.
    family: &'static str,
    controller: Controller,
}

struct Controller {
    /// RASD ResourceType: 6 parallel SCSI HBA, 20 other storage device (SATA).
    resource_type: u32,
    sub_type: &'static str,
    description: &'static str,
    /// Unit numbers a disk may take (SCSI unit 7 is the controller's own).
    units: &'static [u32],
}

const SCSI_UNITS: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15];
const SATA_UNITS: &[u32] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29,
];

fn hardware(a: Architecture) -> Hardware {
    // LSI Logic matches the VMDK descriptor's ddb.adapterType; ESXi on Arm has no LSI Logic
    // emulation, so arm64 disks go on AHCI SATA, which every arm64 Linux kernel drives.
    let lsilogic = Controller {
        resource_type: 6,
        sub_type: "lsilogic",
        description: "SCSI Controller",
        units: SCSI_UNITS,
    };
    match a {
        Architecture::X86_64 => Hardware {
            cim_os: 101,
            vmw_os: "otherLinux64Guest",
            family: "vmx-14",
            controller: lsilogic,
        },
        Architecture::I386 => Hardware {
            cim_os: 36,
            vmw_os: "otherLinuxGuest",
            family: "vmx-14",
            controller: lsilogic,
        },
        Architecture::Arm64 => Hardware {
            cim_os: 101,
            vmw_os: "otherLinux64Guest",
            family: "vmx-18",
            controller: Controller {
                resource_type: 20,
                sub_type: "vmware.sata.ahci",
                description: "SATA Controller",
                units: SATA_UNITS,
            },
        },
    }
}

/// `efi` for UEFI and UEFI-Preferred (vSphere then boots the UEFI way), `bios` for BIOS.
pub(crate) fn firmware(b: BootMode) -> &'static str {
    match b {
        BootMode::Bios => "bios",
        BootMode::Uefi | BootMode::UefiPreferred => "efi",
    }
}

/// XML text and attribute escaping.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// The OVF document.
pub(crate) fn render(o: &Ovf) -> String {
    use std::fmt::Write;
    let hw = hardware(o.architecture);
    let name = esc(&o.name);
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    s.push_str(
        "<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" \
         xmlns:vmw=\"http://www.vmware.com/schema/ovf\" \
         xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n",
    );
    s.push_str("  <References>\n");
    for (i, d) in o.disks.iter().enumerate() {
        let _ = writeln!(
            s,
            "    <File ovf:href=\"{}\" ovf:id=\"file{}\" ovf:size=\"{}\"/>",
            esc(&d.href),
            i + 1,
            d.file_size
        );
    }
    s.push_str("  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n");
    for (i, d) in o.disks.iter().enumerate() {
        let _ = writeln!(
            s,
            "    <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"vmdisk{n}\" \
             ovf:fileRef=\"file{n}\" ovf:format=\"{STREAM_OPTIMIZED_URI}\" ovf:populatedSize=\"{}\"/>",
            d.capacity,
            d.populated,
            n = i + 1
        );
    }
    s.push_str("  </DiskSection>\n");
    let _ = write!(
        s,
        "  <VirtualSystem ovf:id=\"{name}\">\n    <Info>A virtual machine</Info>\n    <Name>{name}</Name>\n    \
         <OperatingSystemSection ovf:id=\"{}\" vmw:osType=\"{}\">\n      \
         <Info>The kind of installed guest operating system</Info>\n    </OperatingSystemSection>\n",
        hw.cim_os, hw.vmw_os
    );
    let _ = write!(
        s,
        "    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n      <System>\n        \
         <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        <vssd:InstanceID>0</vssd:InstanceID>\n        \
         <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n        \
         <vssd:VirtualSystemType>{}</vssd:VirtualSystemType>\n      </System>\n",
        hw.family
    );
    s.push_str(&items(&hw, o.disks.len()));
    let _ = write!(
        s,
        "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"{}\"/>\n    \
         </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n",
        firmware(o.boot_mode)
    );
    s
}

/// The RASD items: CPU, memory, the controllers (as many as the disks need) and the disks.
fn items(hw: &Hardware, disks: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let item = |s: &mut String, body: &str| {
        let _ = write!(s, "      <Item>\n{body}      </Item>\n");
    };
    item(
        &mut s,
        "        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>\n        \
         <rasd:Description>Number of Virtual CPUs</rasd:Description>\n        \
         <rasd:ElementName>1 virtual CPU(s)</rasd:ElementName>\n        <rasd:InstanceID>1</rasd:InstanceID>\n        \
         <rasd:ResourceType>3</rasd:ResourceType>\n        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>\n",
    );
    item(
        &mut s,
        "        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n        \
         <rasd:Description>Memory Size</rasd:Description>\n        \
         <rasd:ElementName>1024MB of memory</rasd:ElementName>\n        <rasd:InstanceID>2</rasd:InstanceID>\n        \
         <rasd:ResourceType>4</rasd:ResourceType>\n        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>\n",
    );
    let c = &hw.controller;
    let per = c.units.len();
    let controllers = disks.div_ceil(per).max(1);
    // Instance IDs: 1 CPU, 2 memory, 3.. controllers, then the disks.
    for k in 0..controllers {
        item(
            &mut s,
            &format!(
                "        <rasd:Address>{k}</rasd:Address>\n        <rasd:Description>{d}</rasd:Description>\n        \
                 <rasd:ElementName>{d} {k}</rasd:ElementName>\n        <rasd:InstanceID>{}</rasd:InstanceID>\n        \
                 <rasd:ResourceSubType>{}</rasd:ResourceSubType>\n        <rasd:ResourceType>{}</rasd:ResourceType>\n",
                3 + k,
                c.sub_type,
                c.resource_type,
                d = c.description,
            ),
        );
    }
    for i in 0..disks {
        item(
            &mut s,
            &format!(
                "        <rasd:AddressOnParent>{}</rasd:AddressOnParent>\n        \
                 <rasd:ElementName>Hard Disk {n}</rasd:ElementName>\n        \
                 <rasd:HostResource>ovf:/disk/vmdisk{n}</rasd:HostResource>\n        \
                 <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>{}</rasd:Parent>\n        \
                 <rasd:ResourceType>17</rasd:ResourceType>\n",
                c.units[i % per],
                3 + controllers + i,
                3 + i / per,
                n = i + 1,
            ),
        );
    }
    s
}

/// Bytes to reserve for the `.ovf` member before the disks are written: the OVF rendered with the
/// largest file and populated sizes there can be (20 digits each), rounded up to a tar block. The
/// real OVF is never longer, and is padded to exactly this length by [`pad`].
pub(crate) fn reserve(o: &Ovf) -> u64 {
    let mut widest = o.clone();
    for d in &mut widest.disks {
        d.file_size = u64::MAX;
        d.populated = u64::MAX;
    }
    (render(&widest).len() as u64).next_multiple_of(512)
}

/// The OVF padded to `len` bytes with trailing whitespace (XML allows white space after the root
/// element), so that it fills the space reserved for it exactly; None if it does not fit.
pub(crate) fn pad(text: String, len: u64) -> Option<Vec<u8>> {
    let mut b = text.into_bytes();
    let len = usize::try_from(len).ok()?;
    if b.len() > len {
        return None;
    }
    b.resize(len, b' ');
    if let Some(last) = b.last_mut().filter(|_| len > 0) {
        *last = b'\n';
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, arch: Architecture, boot: BootMode) -> Ovf {
        Ovf {
            name: "web-1".into(),
            boot_mode: boot,
            architecture: arch,
            disks: (0..n)
                .map(|i| OvfDisk {
                    href: format!("web-1-disk{}.vmdk", i + 1),
                    file_size: 1000 + i as u64,
                    capacity: (i as u64 + 1) << 30,
                    populated: 65536 * (i as u64 + 1),
                })
                .collect(),
        }
    }

    fn attr<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> &'a str {
        n.attributes()
            .find(|a| a.name() == name)
            .map(|a| a.value())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn the_ovf_parses_and_lists_every_disk_in_order() {
        let text = render(&sample(3, Architecture::X86_64, BootMode::Uefi));
        let doc = roxmltree::Document::parse(&text).unwrap();
        let files: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("File"))
            .collect();
        assert_eq!(files.len(), 3);
        assert_eq!(attr(files[0], "href"), "web-1-disk1.vmdk");
        assert_eq!(attr(files[2], "size"), "1002");
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("Disk"))
            .collect();
        assert_eq!(attr(disks[1], "capacity"), (2u64 << 30).to_string());
        assert_eq!(attr(disks[1], "populatedSize"), "131072");
        assert_eq!(attr(disks[0], "format"), STREAM_OPTIMIZED_URI);
        assert!(text.contains("vmw:key=\"firmware\" vmw:value=\"efi\""));
        assert!(text.contains("vmw:osType=\"otherLinux64Guest\""));
    }

    #[test]
    fn seventeen_disks_take_two_scsi_controllers_and_skip_unit_7() {
        let text = render(&sample(17, Architecture::X86_64, BootMode::Bios));
        let doc = roxmltree::Document::parse(&text).unwrap();
        let child = |n: roxmltree::Node, tag: &str| {
            n.children()
                .find(|c| c.has_tag_name(tag))
                .and_then(|c| c.text())
                .map(str::to_string)
        };
        let items: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("Item"))
            .collect();
        let ctrls: Vec<_> = items
            .iter()
            .filter(|n| child(**n, "ResourceType").as_deref() == Some("6"))
            .collect();
        assert_eq!(ctrls.len(), 2);
        let disks: Vec<_> = items
            .iter()
            .filter(|n| child(**n, "ResourceType").as_deref() == Some("17"))
            .map(|n| {
                (
                    child(*n, "Parent").unwrap(),
                    child(*n, "AddressOnParent").unwrap(),
                )
            })
            .collect();
        assert_eq!(disks[0], ("3".into(), "0".into()));
        assert_eq!(disks[7], ("3".into(), "8".into()));
        assert_eq!(disks[15], ("4".into(), "0".into()));
        assert!(text.contains("vmw:value=\"bios\""));
    }

    #[test]
    fn arm64_gets_sata_and_i386_a_32_bit_guest() {
        let arm = render(&sample(1, Architecture::Arm64, BootMode::Uefi));
        assert!(arm.contains("vmware.sata.ahci") && arm.contains("vmx-18"));
        let x86 = render(&sample(1, Architecture::I386, BootMode::Bios));
        assert!(x86.contains("vmw:osType=\"otherLinuxGuest\"") && x86.contains("ovf:id=\"36\""));
    }

    #[test]
    fn the_reserve_fits_any_sizes_and_padding_fills_it_exactly() {
        let o = sample(2, Architecture::X86_64, BootMode::Bios);
        let r = reserve(&o);
        assert!(r.is_multiple_of(512));
        let padded = pad(render(&o), r).unwrap();
        assert_eq!(padded.len() as u64, r);
        assert_eq!(*padded.last().unwrap(), b'\n');
        roxmltree::Document::parse(std::str::from_utf8(&padded).unwrap()).unwrap();
        assert!(pad("x".repeat(600), 512).is_none());
    }

    #[test]
    fn names_are_escaped() {
        let mut o = sample(1, Architecture::X86_64, BootMode::Bios);
        o.name = "a<b&\"c".into();
        let text = render(&o);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let name = doc.descendants().find(|n| n.has_tag_name("Name")).unwrap();
        assert_eq!(name.text(), Some("a<b&\"c"));
    }
}
