//! Instances from real libvirt XML: `virsh -c test:///default` (libvirt's in-process test driver)
//! defines a domain from a file and dumps it back, as `virsh dumpxml` prints it for a real VM; kiln
//! parses that, maps its disks and checks each `<backingStore>` against the chain it reads.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, qcow2_overlay, qemu_img, tmp};
use kiln::error::Code;
use kiln::format::{self, Format, OpenOptions};
use kiln::request::instance::{self, Adjustment, Adjustments};

/// `virsh define FILE; dumpxml NAME` in one process, returning the dumped XML.
fn virsh_roundtrip(dir: &Path, xml: &str, name: &str) -> String {
    let def = dir.join("define.xml");
    fs::write(&def, xml).unwrap();
    let script = format!("define {}; dumpxml {name}", def.display());
    let o = Command::new("virsh")
        .args(["-q", "-c", "test:///default", &script])
        .output()
        .expect("run virsh (install libvirt-clients; .ci/run does)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "virsh: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let start = out.find("<domain").expect("dumpxml printed a domain");
    out[start..].to_string()
}

fn disk_xml(
    kind: &str,
    device: &str,
    driver: &str,
    source: &str,
    target: &str,
    extra: &str,
) -> String {
    format!(
        "<disk type='{kind}' device='{device}'><driver name='qemu' type='{driver}'/>{source}\
         <target dev='{target}' bus='{}'/>{extra}</disk>",
        if target.starts_with("sd") {
            "sata"
        } else {
            "virtio"
        }
    )
}

/// `os_boot`: e.g. `<boot dev='hd'/>` (libvirt refuses it together with per-disk boot orders).
fn domain(name: &str, os_boot: &str, disks: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>6f1d7c5e-0b1a-4c53-9d2e-2a4b6c8d0e1f</uuid>\
         <memory unit='MiB'>512</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type>{os_boot}</os>\
         <devices>{disks}</devices></domain>"
    )
}

struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

/// base.qcow2 <- root.qcow2 (the boot disk, second in the XML), data.raw, a CD-ROM.
fn lab() -> Lab {
    let t = tmp();
    let dir = t.path().to_path_buf();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qcow2_overlay(&dir, "base.qcow2", "root.qcow2");
    qemu_img(&dir, &["create", "-q", "-f", "raw", "data.raw", "32M"]);
    fs::write(dir.join("install.iso"), b"iso").unwrap();
    Lab { _tmp: t, dir }
}

fn lab_xml(l: &Lab, name: &str, backing: &str) -> String {
    let d = l.dir.display();
    domain(
        name,
        "",
        &[
            disk_xml(
                "file",
                "disk",
                "raw",
                &format!("<source file='{d}/data.raw'/>"),
                "vda",
                "",
            ),
            disk_xml(
                "file",
                "disk",
                "qcow2",
                &format!("<source file='{d}/root.qcow2'/>"),
                "vdb",
                &format!("{backing}<boot order='1'/>"),
            ),
            disk_xml(
                "file",
                "cdrom",
                "raw",
                &format!("<source file='{d}/install.iso'/>"),
                "sda",
                "<readonly/>",
            ),
        ]
        .concat(),
    )
}

#[test]
fn dumped_xml_maps_boot_disk_data_disk_and_skips_the_cdrom() {
    let l = lab();
    let backing = format!(
        "<backingStore type='file'><format type='qcow2'/><source file='{}/base.qcow2'/><backingStore/></backingStore>",
        l.dir.display()
    );
    let xml = virsh_roundtrip(&l.dir, &lab_xml(&l, "web1", &backing), "web1");
    let inst = instance::parse_domain(&xml, &l.dir).unwrap();
    assert_eq!(inst.name, "web1");
    assert_eq!(
        inst.uuid.as_deref(),
        Some("6f1d7c5e-0b1a-4c53-9d2e-2a4b6c8d0e1f")
    );
    assert_eq!(inst.disks.len(), 2);
    assert_eq!(inst.skipped.len(), 1, "{:?}", inst.skipped);
    assert!(inst.skipped[0].contains("cdrom sda"));
    let boot = &inst.disks[inst.boot];
    assert_eq!(boot.target_dev, "vdb");
    assert_eq!(boot.boot_order, Some(1));
    assert_eq!(boot.format, Some(Format::Qcow2));
    assert_eq!(
        boot.backing_store,
        [(l.dir.join("base.qcow2"), Some(Format::Qcow2))]
    );
    assert!(boot.backing_complete);

    let (mapped, notes) = instance::to_disk_specs(&inst, &Adjustments::default()).unwrap();
    assert_eq!(notes.len(), 1);
    let got: Vec<_> = mapped
        .iter()
        .map(|m| {
            (
                m.spec.device.as_ref().unwrap().to_string(),
                m.original_target.clone().unwrap(),
                m.spec.snapshot.clone().unwrap(),
                m.spec.format,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "/dev/xvda".into(),
                "vdb".into(),
                l.dir.join("root.qcow2"),
                Some(Format::Qcow2)
            ),
            (
                "/dev/xvdb".into(),
                "vda".into(),
                l.dir.join("data.raw"),
                Some(Format::Raw)
            ),
        ]
    );

    // Each disk's <backingStore> agrees with what kiln reads from the file.
    for d in &inst.disks {
        let o = format::open(
            &d.source,
            &OpenOptions {
                format: d.format,
                snapshot: None,
                ..Default::default()
            },
        )
        .unwrap();
        instance::check_backing(d, &o.info.chain).unwrap();
    }

    // The planner takes the result as it is.
    let specs: Vec<_> = mapped.iter().map(|m| m.spec.clone()).collect();
    let layout = kiln::request::plan::assign_devices(&specs, None).unwrap();
    assert_eq!(layout.disks.len(), 2);
}

#[test]
fn stale_backing_store_is_explained() {
    let l = lab();
    qemu_img(
        &l.dir,
        &["create", "-q", "-f", "qcow2", "old-base.qcow2", "64M"],
    );
    let backing = format!(
        "<backingStore type='file'><format type='qcow2'/><source file='{}/old-base.qcow2'/><backingStore/></backingStore>",
        l.dir.display()
    );
    let xml = virsh_roundtrip(&l.dir, &lab_xml(&l, "stale", &backing), "stale");
    let inst = instance::parse_domain(&xml, &l.dir).unwrap();
    let boot = &inst.disks[inst.boot];
    let o = format::open(
        &boot.source,
        &OpenOptions {
            format: boot.format,
            snapshot: None,
            ..Default::default()
        },
    )
    .unwrap();
    let e = instance::check_backing(boot, &o.info.chain).unwrap_err();
    assert_eq!(e.code(), Code::InstanceBackingMismatch);
    assert!(
        e.message().contains("old-base.qcow2") && e.message().contains("base.qcow2"),
        "{e}"
    );

    // Without a <backingStore> the XML claims nothing, and the check passes.
    let xml = virsh_roundtrip(&l.dir, &lab_xml(&l, "nochain", ""), "nochain");
    let inst = instance::parse_domain(&xml, &l.dir).unwrap();
    let boot = &inst.disks[inst.boot];
    instance::check_backing(boot, &o.info.chain).unwrap();
}

#[test]
fn adjustments_over_dumped_xml() {
    let l = lab();
    let d = l.dir.display();
    let mut disks = lab_xml(&l, "x", "");
    // Add a third disk, vdc, to exclude.
    qemu_img(
        &l.dir,
        &["create", "-q", "-f", "qcow2", "scratch.qcow2", "16M"],
    );
    let extra = disk_xml(
        "file",
        "disk",
        "qcow2",
        &format!("<source file='{d}/scratch.qcow2'/>"),
        "vdc",
        "",
    );
    disks = disks.replace("</devices>", &format!("{extra}</devices>"));
    let xml = virsh_roundtrip(&l.dir, &disks, "x");
    let inst = instance::parse_domain(&xml, &l.dir).unwrap();
    assert_eq!(inst.disks.len(), 3);
    let adj = Adjustments {
        exclude: vec!["vdc".into()],
        entries: vec![
            Adjustment::parse("device=vda,size=64M").unwrap(),
            Adjustment::parse("device=vdx,size=1G").unwrap(),
        ],
    };
    let (m, _) = instance::to_disk_specs(&inst, &adj).unwrap();
    let got: Vec<_> = m
        .iter()
        .map(|m| {
            (
                m.spec.device.as_ref().unwrap().to_string(),
                m.original_target.clone(),
                m.spec.size,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/dev/xvda".into(), Some("vdb".into()), None),
            ("/dev/xvdb".into(), Some("vda".into()), Some(64 << 20)),
            ("/dev/xvdc".into(), None, Some(1 << 30)),
        ]
    );
    // Growing vda (32 MiB) to 64 MiB passes the planner's rule; shrinking it fails there.
    let src = format::open(&l.dir.join("data.raw"), &OpenOptions::default()).unwrap();
    assert_eq!(
        kiln::request::plan::resolve_size("/dev/xvdb", Some(64 << 20), Some(src.info.virtual_size))
            .unwrap(),
        64 << 20
    );
    assert_eq!(
        kiln::request::plan::resolve_size("/dev/xvdb", Some(16 << 20), Some(src.info.virtual_size))
            .unwrap_err()
            .code(),
        Code::InvalidSize
    );
}

#[test]
fn a_network_disk_is_named_in_the_error() {
    let t = tmp();
    let xml = domain(
        "net1",
        "",
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='export1'><host name='10.0.0.5' port='10809'/></source>\
         <target dev='vda' bus='virtio'/></disk>",
    );
    let dumped = virsh_roundtrip(t.path(), &xml, "net1");
    let e = instance::parse_domain(&dumped, t.path()).unwrap_err();
    assert_eq!(e.code(), Code::InstanceDiskUnsupported);
    assert!(
        e.message().contains("vda") && e.message().contains("export1"),
        "{e}"
    );
}

#[test]
fn os_boot_hd_boots_the_first_disk() {
    let l = lab();
    let d = l.dir.display();
    let xml = domain(
        "hd1",
        "<boot dev='cdrom'/><boot dev='hd'/>",
        &[
            disk_xml(
                "file",
                "disk",
                "qcow2",
                &format!("<source file='{d}/root.qcow2'/>"),
                "vdb",
                "",
            ),
            disk_xml(
                "file",
                "disk",
                "raw",
                &format!("<source file='{d}/data.raw'/>"),
                "vdc",
                "",
            ),
            disk_xml(
                "block",
                "disk",
                "raw",
                "<source dev='/dev/null'/>",
                "vdd",
                "",
            ),
        ]
        .concat(),
    );
    let dumped = virsh_roundtrip(&l.dir, &xml, "hd1");
    let inst = instance::parse_domain(&dumped, &l.dir).unwrap();
    assert_eq!(inst.disks[inst.boot].target_dev, "vdb");
    assert_eq!(inst.disks[2].kind, instance::SourceKind::Block);
    let (m, _) = instance::to_disk_specs(&inst, &Adjustments::default()).unwrap();
    let t: Vec<_> = m
        .iter()
        .map(|m| m.original_target.clone().unwrap())
        .collect();
    assert_eq!(t, ["vdb", "vdc", "vdd"]);
}

/// `kiln create --instance` through the real binary: the boot disk (second in the XML) becomes
/// /dev/xvda, the CD-ROM is skipped, and exclude, grow and add adjust the instance.
#[test]
fn create_from_an_instance_with_exclude_grow_and_add() {
    let t = tmp();
    let d = t.path();
    common::qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"]);
    common::qemu_io(d, "base.qcow2", &["write -P 0x21 0 4M"]);
    common::qcow2_overlay(d, "base.qcow2", "root.qcow2");
    common::qemu_io(d, "root.qcow2", &["write -P 0x22 1M 1M"]);
    common::sparse_raw(&d.join("data.raw"), 8 << 20);
    common::write_at(&d.join("data.raw"), 4096, b"data disk");
    common::sparse_raw(&d.join("logs.raw"), 4 << 20);
    let src = |f: &str| format!("<source file='{}'/>", d.join(f).display());
    let disks = [
        disk_xml("file", "disk", "raw", &src("data.raw"), "vda", ""),
        disk_xml(
            "file",
            "disk",
            "qcow2",
            &src("root.qcow2"),
            "vdb",
            "<boot order='1'/>",
        ),
        disk_xml("file", "disk", "raw", &src("logs.raw"), "vdc", ""),
        disk_xml("file", "cdrom", "raw", "", "sda", ""),
    ]
    .concat();
    let xml = virsh_roundtrip(d, &domain("web1", "", &disks), "web1");
    fs::write(d.join("web1.xml"), &xml).unwrap();
    let r = common::kiln_in(
        d,
        &[
            "create",
            "--name",
            "from-vm",
            "--instance",
            "web1.xml",
            "--exclude",
            "vdc",
            "--disk",
            "device=vda,size=32M",
            "--disk",
            "device=vdx,size=16M",
            "--output-dir",
            "out",
        ],
    )
    .ok();
    assert!(
        r.stderr.contains("sda"),
        "the CD-ROM is noted: {}",
        r.stderr
    );
    let o = d.join("out");
    common::assert_same(d, "root.qcow2", "out/xvda.qcow2");
    common::assert_same(d, "data.raw", "out/xvdb.qcow2");
    assert_eq!(common::virtual_size(&o, "xvdb.qcow2"), 32 << 20);
    assert_eq!(common::virtual_size(&o, "xvdc.qcow2"), 16 << 20);
    assert!(!o.join("xvdd.qcow2").exists());
    let m = common::manifest(&o);
    assert_eq!(m["Instance"]["Name"], "web1");
    assert_eq!(m["DiskDeviceMappings"][0]["OriginalTarget"], "vdb");
    assert_eq!(m["DiskDeviceMappings"][1]["OriginalTarget"], "vda");
    assert!(m["DiskDeviceMappings"][2]["OriginalTarget"].is_null());
    assert_eq!(
        m["DiskDeviceMappings"][0]["Source"]["FilesRead"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Shrinking an instance disk is refused.
    let r = common::kiln_in(
        d,
        &[
            "--json",
            "create",
            "--name",
            "from-vm",
            "--instance",
            "web1.xml",
            "--disk",
            "device=vda,size=1M",
            "--output-dir",
            "o2",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidSize.ValueNotSupported")
    );
}
