//! `--target vsphere`: the OVA, through the real binary. `tar` lists and extracts it, `sha256sum`
//! checks every `.mf` line against the extracted members, `qemu-img` checks and compares each
//! extracted VMDK with its source, roxmltree parses the OVF (sizes checked against the extracted
//! files and `qemu-img map`), `-j 1` and `-j 3` give the same bytes, a killed create leaves
//! nothing that looks finished, and the output directory never holds a second copy of a disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::*;

/// `sys.raw` (20 MiB of noise, with a zero MiB inside), `data.qcow2` (a base and an overlay over
/// a 48 MiB disk, mostly holes) and `small.raw` (1 MiB + 512 bytes, grown to 8 MiB by the create).
fn sources(d: &Path) {
    let sys = d.join("sys.raw");
    fs::write(&sys, noise(11, 20 << 20)).unwrap();
    write_at(&sys, 6 << 20, &vec![0u8; 1 << 20]);
    let data = d.join("data.raw");
    sparse_raw(&data, 48 << 20);
    write_at(&data, 3 << 20, &noise(12, 5 << 20));
    write_at(&data, (48 << 20) - 4096, &[0x5au8; 4096]);
    qemu_img(d, &["convert", "-O", "qcow2", "data.raw", "base.qcow2"]);
    qcow2_overlay(d, "base.qcow2", "data.qcow2");
    qemu_io(
        d,
        "data.qcow2",
        &["write -P 0x77 30M 300k", "write -z 4M 64k"],
    );
    fs::write(d.join("small.raw"), noise(13, (1 << 20) + 512)).unwrap();
}

const DISKS: [&str; 6] = [
    "--disk",
    "snapshot=sys.raw,device=/dev/xvda",
    "--disk",
    "snapshot=data.qcow2,device=/dev/xvdb",
    "--disk",
    "snapshot=small.raw,device=/dev/xvdc,size=8M",
];

fn create(d: &Path, out: &str, extra: &[&str]) {
    let mut args = vec![
        "create",
        "--name",
        "web:1",
        "--output-dir",
        out,
        "--target",
        "vsphere",
        "-q",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&DISKS);
    kiln_in(d, &args).ok();
}

/// `tar -tf` of an archive, one name a line.
fn listing(d: &Path, ova: &str) -> Vec<String> {
    let r = tool_in(d, "tar", &["-tf", ova]).ok();
    r.stdout.lines().map(str::to_string).collect()
}

fn attr<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> &'a str {
    n.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
        .unwrap_or_else(|| panic!("{:?} has no {name}", n.tag_name()))
}

/// Guest bytes `qemu-img map` says a file holds.
fn mapped_bytes(d: &Path, file: &str) -> u64 {
    let m: serde_json::Value =
        serde_json::from_str(&qemu_img(d, &["map", "--output=json", file])).unwrap();
    m.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn an_ova_holds_the_ovf_then_the_mf_then_each_disk_and_every_line_verifies() {
    let t = tmp();
    let d = t.path();
    sources(d);
    create(d, "out", &[]);
    let img = d.join("out");
    let ova = "out/web_1.ova";
    assert_eq!(
        listing(d, ova),
        [
            "web_1.ovf",
            "web_1.mf",
            "web_1-disk1.vmdk",
            "web_1-disk2.vmdk",
            "web_1-disk3.vmdk"
        ]
    );
    // SHA256SUMS covers the OVA and the manifest; kiln verify checks the members inside too.
    assert_sums(&img);
    let sums = fs::read_to_string(img.join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains("  web_1.ova\n") && sums.contains("  manifest.json\n"),
        "{sums}"
    );
    let v = kiln_in(d, &["verify", "out"]).ok();
    assert!(
        v.stdout.contains("web_1.ova/web_1-disk3.vmdk: OK"),
        "{}",
        v.stdout
    );
    fs::create_dir(d.join("x")).unwrap();
    tool_in(&d.join("x"), "tar", &["-xf", "../out/web_1.ova"]).ok();
    let x = d.join("x");
    // Every .mf line, as `sha256sum -c` reads it.
    let mf = fs::read_to_string(x.join("web_1.mf")).unwrap();
    assert_eq!(mf.lines().count(), 4, "{mf}");
    let mut check = String::new();
    for line in mf.lines() {
        let (name, hash) = line
            .strip_prefix("SHA256(")
            .and_then(|l| l.split_once(")= "))
            .unwrap_or_else(|| panic!("not an ovftool SHA256 line: {line}"));
        assert_eq!(hash.len(), 64);
        check.push_str(&format!("{hash}  {name}\n"));
    }
    assert!(check.contains("  web_1.ovf\n"));
    fs::write(x.join("check"), check).unwrap();
    tool_in(&x, "sha256sum", &["-c", "--strict", "check"]).ok();
    for (vmdk, src) in [
        ("x/web_1-disk1.vmdk", "sys.raw"),
        ("x/web_1-disk2.vmdk", "data.qcow2"),
        ("x/web_1-disk3.vmdk", "small.raw"),
    ] {
        assert_clean(d, vmdk);
        assert_same(d, src, vmdk);
        let i = info(d, vmdk);
        assert_eq!(
            i["format-specific"]["data"]["create-type"],
            "streamOptimized"
        );
        // The sparse header says version 3 (what ESXi checks); the descriptor has the tools line.
        let bytes = fs::read(d.join(vmdk)).unwrap();
        assert_eq!(&bytes[..4], b"KDMV");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        let desc = String::from_utf8_lossy(&bytes[512..512 * 21]);
        assert!(desc.contains("ddb.toolsVersion = \"2147483647\""), "{desc}");
        let member = vmdk.trim_start_matches("x/");
        assert!(desc.contains(&format!("SPARSE \"{member}\"")), "{desc}");
    }
    assert_eq!(virtual_size(d, "x/web_1-disk3.vmdk"), 8 << 20);
    let m = manifest(&img);
    let disks = m["DiskDeviceMappings"].as_array().unwrap();
    assert_eq!(disks[0]["Device"], "/dev/xvda");
    assert_eq!(disks[0]["File"], "web_1-disk1.vmdk");
    assert_eq!(disks[0]["Archive"], "web_1.ova");
    assert_eq!(disks[1]["Format"], "vmdk");
    assert_eq!(
        disks[2]["Sha256"].as_str().unwrap(),
        sha256_file(&x.join("web_1-disk3.vmdk"))
    );
    assert_eq!(m["Target"]["Name"], "vsphere");

    // A byte changed inside the second VMDK (where `tar -R` puts its data): verify names the
    // archive and the member.
    let blocks = tool_in(d, "tar", &["-tRf", ova]).ok().stdout;
    let line = blocks
        .lines()
        .find(|l| l.ends_with("web_1-disk2.vmdk"))
        .unwrap();
    let block: u64 = line
        .trim_start_matches("block ")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    write_at(&d.join(ova), (block + 1) * 512 + 70_000, b"\xff\x00\xff");
    let r = kiln_in(d, &["verify", "out"]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr
            .contains("web_1.ova/web_1-disk2.vmdk (checksum differs"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("web_1.ova (checksum differs"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("disk1.vmdk (checksum"), "{}", r.stderr);
}

#[test]
fn the_ovf_gives_each_disk_its_sizes_in_order_and_the_firmware_of_the_boot_mode() {
    let t = tmp();
    let d = t.path();
    sources(d);
    for (out, boot, firmware) in [("uefi", "UEFI", "efi"), ("bios", "BIOS", "bios")] {
        create(d, out, &["--boot-mode", boot]);
        let x = d.join(format!("{out}-x"));
        fs::create_dir(&x).unwrap();
        tool_in(&x, "tar", &["-xf", &format!("../{out}/web_1.ova")]).ok();
        let text = fs::read_to_string(x.join("web_1.ovf")).unwrap();
        // The reserved space is filled exactly: white space after the root element.
        assert!(text.len().is_multiple_of(512) && text.ends_with('\n'));
        let doc = roxmltree::Document::parse(&text).expect("the OVF is XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "Envelope");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://schemas.dmtf.org/ovf/envelope/1")
        );
        let files: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("File"))
            .collect();
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("Disk"))
            .collect();
        assert_eq!((files.len(), disks.len()), (3, 3));
        let sources = [
            ("sys.raw", 20u64 << 20),
            ("data.qcow2", 48 << 20),
            ("small.raw", 8 << 20),
        ];
        for (i, (src, capacity)) in sources.iter().enumerate() {
            let href = attr(files[i], "href");
            assert_eq!(href, format!("web_1-disk{}.vmdk", i + 1));
            let member = format!("{out}-x/{href}");
            assert_eq!(
                attr(files[i], "size").parse::<u64>().unwrap(),
                fs::metadata(d.join(&member)).unwrap().len()
            );
            assert_eq!(attr(disks[i], "fileRef"), attr(files[i], "id"));
            assert_eq!(
                attr(disks[i], "capacity").parse::<u64>().unwrap(),
                *capacity
            );
            assert_eq!(attr(disks[i], "capacityAllocationUnits"), "byte");
            assert_eq!(
                attr(disks[i], "populatedSize").parse::<u64>().unwrap(),
                mapped_bytes(d, &member),
                "{member}"
            );
            assert!(attr(disks[i], "format").ends_with("vmdk.html#streamOptimized"));
            // Disk i is the i-th source: the system disk first.
            assert_same(d, src, &member);
        }
        let host: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("HostResource"))
            .filter_map(|n| n.text())
            .collect();
        assert_eq!(
            host,
            [
                "ovf:/disk/vmdisk1",
                "ovf:/disk/vmdisk2",
                "ovf:/disk/vmdisk3"
            ]
        );
        let fw = doc
            .descendants()
            .find(|n| n.has_tag_name("Config") && attr(*n, "key") == "firmware")
            .expect("a firmware Config");
        assert_eq!(attr(fw, "value"), firmware);
        let os = doc
            .descendants()
            .find(|n| n.has_tag_name("OperatingSystemSection"))
            .unwrap();
        assert_eq!(attr(os, "osType"), "otherLinux64Guest");
    }
}

#[test]
fn one_and_three_threads_give_the_same_ova_and_arm64_gets_its_hardware() {
    let t = tmp();
    let d = t.path();
    sources(d);
    create(d, "j1", &["-j", "1"]);
    create(d, "j3", &["-j", "3"]);
    let (a, b) = (d.join("j1/web_1.ova"), d.join("j3/web_1.ova"));
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "-j 1 and -j 3 differ"
    );
    create(d, "arm", &["--arch", "arm64", "--boot-mode", "UEFI"]);
    let r = tool_in(d, "tar", &["-xOf", "arm/web_1.ova", "web_1.ovf"]).ok();
    assert!(r.stdout.contains("vmware.sata.ahci"), "{}", r.stdout);
    assert!(r.stdout.contains("vmx-18"), "{}", r.stdout);
}

#[test]
fn rules_vsphere_cannot_meet_are_refused_before_anything_is_written() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::write(d.join("k"), "secret-key-material").unwrap();
    // Encryption is refused before the target's rules: kiln encrypts qcow2 and raw only.
    for (extra, code, says) in [
        (
            vec!["--encrypt", "--key-file", "k"],
            "InvalidParameter",
            "qcow2 or raw",
        ),
        (vec!["-t", "none"], "InvalidParameter", "--target vsphere"),
        (vec!["--detect"], "InvalidParameter", "--target vsphere"),
        (
            vec!["--arch", "arm64", "--boot-mode", "BIOS"],
            "InvalidParameter",
            "--target vsphere",
        ),
    ] {
        let mut args = vec![
            "--json",
            "create",
            "--name",
            "no",
            "--output-dir",
            "no",
            "--target",
            "vsphere",
        ];
        args.extend_from_slice(&extra);
        args.extend_from_slice(&DISKS[..2]);
        let r = kiln_in(d, &args);
        assert_ne!(r.status, 0, "{extra:?}");
        assert_eq!(r.code(), code, "{extra:?}: {}", r.stdout);
        assert!(r.stdout.contains(says), "{}", r.stdout);
        assert!(!d.join("no").exists());
        let staged = fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".kiln-")
            })
            .count();
        assert_eq!(staged, 0, "{extra:?}");
    }
}

/// Every `.ova` under `dir`, staging directories included.
fn ovas_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "ova") {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found
}

/// SIGKILL while the disks are copied, hashed, or the image published: the OVA is only ever in a
/// staging directory until the rename, and the next create succeeds and verifies.
#[test]
fn a_killed_ova_create_leaves_nothing_that_looks_finished() {
    let t = tmp();
    let d = t.path();
    sources(d);
    let mut args = vec![
        "create",
        "--name",
        "crash",
        "--output-dir",
        "out",
        "--target",
        "vsphere",
        "-q",
    ];
    args.extend_from_slice(&DISKS);
    for moment in [
        "staging",
        "chunk#2",
        "disk-done#1",
        "chunk#9",
        "hashing#2",
        "disk-done#3",
        "hashing#30",
        "manifest",
        "sums",
    ] {
        let mut child = kiln_stopped_at(d, &args, moment);
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        child.wait().unwrap();
        assert!(
            !d.join("out").exists(),
            "{moment}: output visible before the rename"
        );
        for ova in ovas_under(d) {
            assert!(ova.starts_with(".kiln-"), "{moment}: {ova} outside staging");
        }
    }
    kiln_in(d, &args).ok();
    kiln_in(d, &["verify", "out", "-q"]).ok();
    assert_eq!(ovas_under(d), ["out/crash.ova"]);
}

/// Bytes allocated to every file under `dir`.
fn allocated_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = fs::read_dir(&p) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// No extra copy of a disk: while kiln writes the OVA, the allocated bytes under the output's
/// parent directory (staging included) are sampled every 2 ms, and the peak never passes the
/// finished directory's by more than 1 MiB. A VMDK written elsewhere first and then copied in
/// would at least double the ~21 MiB of the system disk's member at some point.
#[test]
fn the_ova_is_written_with_no_extra_copy_of_any_disk() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::create_dir(d.join("parent")).unwrap();
    let parent = d.join("parent");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (parent, done) = (parent.clone(), done.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            let mut samples = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(allocated_under(&parent));
                samples += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (peak, samples)
        })
    };
    create(d, "parent/out", &["-j", "2"]);
    done.store(true, std::sync::atomic::Ordering::Release);
    let (peak, samples) = sampler.join().unwrap();
    let finished = allocated_under(&parent);
    let ova = fs::metadata(parent.join("out/web_1.ova")).unwrap().len();
    assert!(samples > 3, "the create ended before it could be sampled");
    // A VMDK leaves sectors 21-127 (between its descriptor and first grain) unwritten, so the
    // OVA may take a little less than its size.
    let bound = finished.max(ova) + MIB;
    assert!(
        peak <= bound,
        "peak {peak} bytes allocated while writing; finished image {finished}, OVA {ova} bytes"
    );
    eprintln!("peak {peak} bytes, finished {finished}, OVA {ova} bytes, {samples} samples");
}
