//! The image check (`kiln check`, `kiln create --detect`) and `--relocate-gpt`, on real disks built
//! without root: partition images made with mkfs.vfat/mtools and mkfs.ext4 -d, tables written with
//! sgdisk/sfdisk onto sparse files, partitions copied into place. sgdisk -v and qemu-img compare
//! are the oracles for growth.

use std::fs;
use std::path::Path;

use crate::common::*;
use serde_json::Value;

/// A 512-byte stand-in for an EFI loader: a PE header for `machine`.
fn fake_pe(machine: u16) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..2].copy_from_slice(b"MZ");
    b[0x3C] = 0x80;
    b[0x80..0x84].copy_from_slice(b"PE\0\0");
    b[0x84..0x86].copy_from_slice(&machine.to_le_bytes());
    b
}

/// An 8 MiB FAT partition image with `\EFI\BOOT\<loader>` (none when `loader` is empty).
fn esp_image(dir: &Path, name: &str, loader: &str, machine: u16) -> String {
    tool_in(dir, "mkfs.vfat", &["-C", name, "8192"]).ok();
    tool_in(dir, "mmd", &["-i", name, "::/EFI", "::/EFI/BOOT"]).ok();
    if !loader.is_empty() {
        let pe = format!("{name}.pe");
        fs::write(dir.join(&pe), fake_pe(machine)).unwrap();
        let target = format!("::/EFI/BOOT/{loader}");
        tool_in(dir, "mcopy", &["-i", name, &pe, &target]).ok();
    }
    name.to_string()
}

/// A 12 MiB ext4 image whose root holds `etc/os-release` with `os_release`.
fn ext4_root(dir: &Path, name: &str, os_release: &str) -> String {
    let root = dir.join(format!("{name}.d"));
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/os-release"), os_release).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("usr/bin/true"), b"not really").unwrap();
    let root = path_str(&root);
    tool_in(dir, "mkfs.ext4", &["-q", "-F", "-d", &root, name, "12M"]).ok();
    name.to_string()
}

/// Copies the partition image `part` into `disk` at LBA `lba` (what `dd conv=notrunc seek=` does).
fn place(dir: &Path, disk: &str, part: &str, lba: u64) {
    let bytes = fs::read(dir.join(part)).unwrap();
    write_at(&dir.join(disk), lba * 512, &bytes);
}

/// `sgdisk ARGS DISK` on a new sparse file of `size` bytes.
fn gpt_disk(dir: &Path, disk: &str, size: u64, args: &[&str]) {
    sparse_raw(&dir.join(disk), size);
    let mut a: Vec<&str> = args.to_vec();
    a.push(disk);
    tool_in(dir, "sgdisk", &a).ok();
}

/// `sfdisk DISK` with `script` on stdin, on a new sparse file of `size` bytes.
fn mbr_disk(dir: &Path, disk: &str, size: u64, script: &str) {
    use std::io::Write;
    sparse_raw(&dir.join(disk), size);
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", disk])
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Some non-zero bytes where BIOS boot code lives (a jump and a few instructions).
fn boot_code(dir: &Path, disk: &str) {
    write_at(
        &dir.join(disk),
        0,
        &[0xEB, 0x63, 0x90, 0x10, 0x8E, 0xD0, 0xBC, 0x00],
    );
}

/// `kiln check --json ARGS`: (exit status, report).
fn check(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["check", "--json"];
    a.extend_from_slice(args);
    let r = kiln_in(dir, &a);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", r.stdout, r.stderr));
    (r.status, v)
}

/// The report's items as (check, status, message).
fn items(report: &Value) -> Vec<(String, String, String)> {
    report["Items"]
        .as_array()
        .expect("Items")
        .iter()
        .map(|i| {
            (
                i["Check"].as_str().unwrap().to_string(),
                i["Status"].as_str().unwrap().to_string(),
                i["Message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Asserts the items, in order: each check's name, status, and words its message contains.
fn assert_items(report: &Value, want: &[(&str, &str, &[&str])]) {
    let got = items(report);
    let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|w| w.0).collect();
    assert_eq!(names, want_names, "{report:#}");
    for ((check, status, msg), (_, wstatus, words)) in got.iter().zip(want) {
        assert_eq!(status, wstatus, "{check}: {msg}");
        for w in *words {
            assert!(msg.contains(w), "{check}: '{msg}' lacks '{w}'");
        }
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// GPT: an 8 MiB ESP at LBA 2048, a 12 MiB Linux partition after it, on 32 MiB.
fn uefi_disk(dir: &Path, disk: &str, loader: &str, machine: u16, os: Option<&str>) {
    gpt_disk(
        dir,
        disk,
        32 * MIB,
        &[
            "-n1:2048:+8M",
            "-t1:ef00",
            "-c1:EFI",
            "-n2:0:+12M",
            "-t2:8304",
            "-c2:root",
        ],
    );
    let esp = esp_image(dir, &format!("{disk}.esp"), loader, machine);
    place(dir, disk, &esp, 2048);
    if let Some(text) = os {
        let root = ext4_root(dir, &format!("{disk}.root"), text);
        place(dir, disk, &root, 2048 + 16384);
    }
}

#[test]
fn gpt_with_an_esp_boots_uefi_on_x86_64() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "uefi.raw", "BOOTX64.EFI", 0x8664, None);
    let (status, r) = check(d, &["uefi.raw"]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(r["PartitionTable"], "GPT");
    assert_eq!(r["Result"], "Warn");
    assert_eq!(strs(&r["BootModes"]), ["UEFI"]);
    assert_eq!(strs(&r["Architectures"]), ["x86_64"]);
    let p = r["Partitions"].as_array().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0]["Type"], "EFI System");
    assert_eq!(p[0]["Name"], "EFI");
    assert_eq!(p[0]["Start"], 2048 * 512);
    assert_eq!(p[0]["Size"], 8 * MIB);
    assert_eq!(p[0]["Filesystem"], "fat12");
    assert_eq!(p[1]["Type"], "Linux root (x86-64)");
    assert_eq!(p[1]["Filesystem"], Value::Null);
    assert_items(
        &r,
        &[
            (
                "PartitionTable",
                "Pass",
                &["GPT", "2 partition(s)", "128 entries"],
            ),
            ("GptBackup", "Pass", &["last LBA 65535"]),
            ("ProtectiveMbr", "Pass", &["protective MBR"]),
            (
                "Partition 1",
                "Pass",
                &["EFI System", "'EFI'", "8.0 MiB", "fat12"],
            ),
            (
                "Partition 2",
                "Pass",
                &["Linux root (x86-64)", "no filesystem signature"],
            ),
            ("BiosBoot", "Pass", &["no boot code"]),
            (
                "UefiBoot",
                "Pass",
                &["\\EFI\\BOOT\\BOOTX64.EFI (x86_64, 512 bytes)"],
            ),
            ("BootMode", "Pass", &["UEFI only"]),
            ("Architecture", "Pass", &["x86_64"]),
            ("OperatingSystem", "Warn", &["no /etc/os-release"]),
        ],
    );

    // Checked against a boot mode and an architecture: BIOS does not fit, x86_64 does.
    let (status, r) = check(d, &["--boot-mode", "bios", "--arch", "x86_64", "uefi.raw"]);
    assert_eq!(status, 1);
    assert_eq!(r["Result"], "Fail");
    let it = items(&r);
    let boot = it.iter().find(|i| i.0 == "BootMode").unwrap();
    assert_eq!(boot.1, "Fail");
    assert!(boot.2.contains("--boot-mode UEFI"), "{}", boot.2);
    let arch = it.iter().find(|i| i.0 == "Architecture").unwrap();
    assert_eq!((arch.1.as_str(), arch.2.contains("fits")), ("Pass", true));

    // The same disk as qcow2 gives the same report; the text form has one line per item.
    qemu_img(d, &["convert", "-O", "qcow2", "uefi.raw", "uefi.qcow2"]);
    let (_, q) = check(d, &["uefi.qcow2"]);
    let (_, raw) = check(d, &["uefi.raw"]);
    assert_eq!(q, raw);
    let text = kiln_in(d, &["check", "uefi.qcow2"]).ok().stdout;
    assert!(
        text.contains("UefiBoot") && text.contains("Result: Warn"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 13, "{text}");
}

#[test]
fn mbr_with_boot_code_boots_bios() {
    let t = tmp();
    let d = t.path();
    mbr_disk(
        d,
        "bios.raw",
        32 * MIB,
        "label: dos\nstart=2048, size=24576, type=83, bootable\n",
    );
    boot_code(d, "bios.raw");
    let root = ext4_root(d, "root.img", "ID=debian\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n");
    place(d, "bios.raw", &root, 2048);
    let (status, r) = check(
        d,
        &["--boot-mode", "BIOS", "--platform", "debian", "bios.raw"],
    );
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(r["PartitionTable"], "MBR");
    assert_eq!(r["Result"], "Pass");
    assert_eq!(strs(&r["BootModes"]), ["BIOS"]);
    assert_eq!(r["Partitions"][0]["TypeId"], "0x83");
    assert_eq!(r["Partitions"][0]["Filesystem"], "ext4");
    assert_eq!(r["Platform"], "Debian");
    assert_items(
        &r,
        &[
            ("PartitionTable", "Pass", &["MBR with 1 primary"]),
            ("Partition 1", "Pass", &["Linux", "12.0 MiB", "ext4"]),
            ("BiosBoot", "Pass", &["MBR boot code (7 non-zero bytes"]),
            ("UefiBoot", "Pass", &["no EFI System Partition"]),
            ("BootMode", "Pass", &["BIOS only", "BootMode BIOS fits"]),
            ("Architecture", "Pass", &["not determined"]),
            (
                "OperatingSystem",
                "Pass",
                &[
                    "Debian GNU/Linux 12 (bookworm)",
                    "partition 1",
                    "Platform Debian",
                ],
            ),
        ],
    );
    // UEFI does not fit a BIOS-only disk.
    let (status, r) = check(d, &["--boot-mode", "UEFI", "bios.raw"]);
    assert_eq!(status, 1);
    let boot = items(&r).into_iter().find(|i| i.0 == "BootMode").unwrap();
    assert_eq!(boot.1, "Fail");
    assert!(boot.2.contains("--boot-mode BIOS"), "{}", boot.2);
}

/// The most common Linux partition type (sgdisk 8300, Linux filesystem data) is named, not
/// `other`, and an ext4 on it is still read for the OS.
#[test]
fn a_linux_filesystem_partition_is_named() {
    let t = tmp();
    let d = t.path();
    let args = [
        "-n1:2048:+1M",
        "-t1:ef02",
        "-n2:0:+12M",
        "-t2:8300",
        "-c2:data",
    ];
    gpt_disk(d, "linux.raw", 32 * MIB, &args);
    boot_code(d, "linux.raw");
    let fs = ext4_root(d, "linux.ext4", UBUNTU);
    place(d, "linux.raw", &fs, 4096);
    let (status, r) = check(d, &["linux.raw"]);
    assert_eq!(status, 0, "{r:#}");
    let part = &r["Partitions"][1];
    assert_eq!(part["Type"], "Linux filesystem", "{r:#}");
    assert_eq!(part["TypeId"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    let item = items(&r)
        .into_iter()
        .find(|i| i.0 == "Partition 2")
        .unwrap();
    assert!(item.2.starts_with("Linux filesystem 'data'"), "{}", item.2);
    assert_eq!(r["Platform"], "Ubuntu", "{r:#}");
}

#[test]
fn hybrid_gpt_boots_both() {
    let t = tmp();
    let d = t.path();
    gpt_disk(
        d,
        "hybrid.raw",
        32 * MIB,
        &["-n1:2048:+1M", "-t1:ef02", "-n2:0:+8M", "-t2:ef00"],
    );
    boot_code(d, "hybrid.raw");
    let esp = esp_image(d, "esp.img", "BOOTX64.EFI", 0x8664);
    place(d, "hybrid.raw", &esp, 4096);
    let (status, r) = check(d, &["--boot-mode", "UEFI-Preferred", "hybrid.raw"]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(strs(&r["BootModes"]), ["BIOS", "UEFI"]);
    assert_items(
        &r,
        &[
            ("PartitionTable", "Pass", &["GPT", "2 partition(s)"]),
            ("GptBackup", "Pass", &[]),
            ("ProtectiveMbr", "Pass", &[]),
            ("Partition 1", "Pass", &["BIOS boot", "1.0 MiB"]),
            ("Partition 2", "Pass", &["EFI System", "fat12"]),
            (
                "BiosBoot",
                "Pass",
                &["MBR boot code", "BIOS boot partition 1"],
            ),
            (
                "UefiBoot",
                "Pass",
                &["EFI System Partition 2 holds \\EFI\\BOOT\\BOOTX64.EFI"],
            ),
            (
                "BootMode",
                "Pass",
                &["BIOS and UEFI (hybrid)", "UEFI-Preferred fits"],
            ),
            ("Architecture", "Pass", &["x86_64"]),
            ("OperatingSystem", "Warn", &[]),
        ],
    );
    // Either single mode fits a hybrid disk.
    for mode in ["BIOS", "UEFI"] {
        let (_, r) = check(d, &["--boot-mode", mode, "hybrid.raw"]);
        let boot = items(&r).into_iter().find(|i| i.0 == "BootMode").unwrap();
        assert_eq!(boot.1, "Pass", "{mode}: {}", boot.2);
    }
}

#[test]
fn no_table_nothing_boots() {
    let t = tmp();
    let d = t.path();
    sparse_raw(&d.join("blank.raw"), 16 * MIB);
    let (status, r) = check(d, &["blank.raw"]);
    assert_eq!(status, 1, "{r:#}");
    assert_eq!(r["PartitionTable"], "None");
    assert_eq!(r["Result"], "Fail");
    assert_eq!(strs(&r["BootModes"]), Vec::<String>::new());
    assert_items(
        &r,
        &[
            (
                "PartitionTable",
                "Warn",
                &["no partition table and no filesystem signature"],
            ),
            ("BiosBoot", "Pass", &["no boot code"]),
            ("UefiBoot", "Pass", &["no EFI System Partition"]),
            ("BootMode", "Fail", &["nothing boots the disk"]),
            ("Architecture", "Pass", &["not determined"]),
            ("OperatingSystem", "Warn", &[]),
        ],
    );

    // A filesystem on the whole disk is found, and its os-release read.
    let root = ext4_root(
        d,
        "whole.raw",
        "ID=fedora\nNAME=Fedora Linux\nVERSION_ID=40\n",
    );
    let (_, r) = check(d, &[&root]);
    assert_eq!(r["Partitions"][0]["Number"], 0);
    assert_eq!(r["Partitions"][0]["Filesystem"], "ext4");
    assert_eq!(r["Platform"], "Fedora");
    let it = items(&r);
    assert!(
        it[0].2.contains("ext4 filesystem on the whole disk"),
        "{:?}",
        it[0]
    );
    let os = it.iter().find(|i| i.0 == "OperatingSystem").unwrap();
    assert_eq!(os.1, "Pass");
    assert!(
        os.2.contains("Fedora Linux 40") && os.2.contains("the whole disk"),
        "{}",
        os.2
    );
}

#[test]
fn arm64_esp_is_checked_against_the_architecture() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "arm.raw", "BOOTAA64.EFI", 0xAA64, None);
    let (status, r) = check(d, &["--arch", "arm64", "--boot-mode", "UEFI", "arm.raw"]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(strs(&r["Architectures"]), ["arm64"]);
    assert_items(
        &r,
        &[
            ("PartitionTable", "Pass", &[]),
            ("GptBackup", "Pass", &[]),
            ("ProtectiveMbr", "Pass", &[]),
            ("Partition 1", "Pass", &["EFI System"]),
            ("Partition 2", "Pass", &[]),
            ("BiosBoot", "Pass", &[]),
            ("UefiBoot", "Pass", &["\\EFI\\BOOT\\BOOTAA64.EFI (arm64"]),
            ("BootMode", "Pass", &["UEFI only", "BootMode UEFI fits"]),
            ("Architecture", "Pass", &["arm64", "fits"]),
            ("OperatingSystem", "Warn", &[]),
        ],
    );
    let (status, r) = check(d, &["--arch", "x86_64", "arm.raw"]);
    assert_eq!(status, 1);
    let arch = items(&r)
        .into_iter()
        .find(|i| i.0 == "Architecture")
        .unwrap();
    assert_eq!(arch.1, "Fail");
    assert!(arch.2.contains("--arch arm64"), "{}", arch.2);

    // A loader whose PE machine disagrees with its name is a warning.
    uefi_disk(d, "liar.raw", "BOOTAA64.EFI", 0x8664, None);
    let (_, r) = check(d, &["liar.raw"]);
    let warn: Vec<_> = items(&r)
        .into_iter()
        .filter(|i| i.0 == "UefiBoot" && i.1 == "Warn")
        .collect();
    assert_eq!(warn.len(), 1, "{r:#}");
    assert!(
        warn[0].2.contains("0x8664 (x86_64), not arm64"),
        "{}",
        warn[0].2
    );
}

const UBUNTU: &str = "PRETTY_NAME=\"Ubuntu 22.04.4 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nID_LIKE=debian\n";

#[test]
fn ext4_root_gives_the_platform_and_create_detect_records_it() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "sys.raw", "BOOTX64.EFI", 0x8664, Some(UBUNTU));
    let (status, r) = check(d, &["sys.raw"]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(r["Result"], "Pass");
    assert_eq!(r["Platform"], "Ubuntu");
    assert_eq!(r["Os"]["Id"], "ubuntu");
    assert_eq!(r["Os"]["Name"], "Ubuntu");
    assert_eq!(r["Os"]["VersionId"], "22.04");
    assert_eq!(r["Os"]["PrettyName"], "Ubuntu 22.04.4 LTS");
    assert_eq!(r["Partitions"][1]["Filesystem"], "ext4");
    let os = items(&r)
        .into_iter()
        .find(|i| i.0 == "OperatingSystem")
        .unwrap();
    assert_eq!(os.1, "Pass");
    assert!(
        os.2.contains(
            "Ubuntu 22.04.4 LTS (ID=ubuntu, VERSION_ID=22.04) on partition 2: Platform Ubuntu"
        ),
        "{}",
        os.2
    );

    // create --detect without --platform records the detected one, and the report.
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "det",
            "--snapshot",
            "sys.raw",
            "--boot-mode",
            "UEFI",
            "--detect",
            "--output-dir",
            "img",
        ],
    )
    .ok();
    assert!(
        r.stderr.contains("image check of /dev/xvda"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("OperatingSystem  Pass"), "{}", r.stderr);
    let m = manifest(&d.join("img"));
    assert_eq!(m["Platform"], "Ubuntu");
    assert_eq!(m["Detection"]["Strategy"], "Standard");
    assert_eq!(m["Detection"]["Result"], "Pass");
    assert_eq!(m["Detection"]["Platform"], "Ubuntu");
    assert_eq!(m["Detection"]["Items"].as_array().unwrap().len(), 10);
    assert_sums(&d.join("img"));

    // An explicit platform wins, and the report warns that it differs.
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "det2",
            "--snapshot",
            "sys.raw",
            "--platform",
            "CentOS",
            "--boot-mode",
            "UEFI",
            "--detect",
            "--output-dir",
            "img2",
            "--json",
        ],
    )
    .ok();
    let m: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["Platform"], "CentOS");
    assert_eq!(m["Detection"]["Result"], "Warn");
    let os = items(&m["Detection"])
        .into_iter()
        .find(|i| i.0 == "OperatingSystem")
        .unwrap();
    assert_eq!(os.1, "Warn");
    assert!(
        os.2.contains("is Platform Ubuntu, but Platform is CentOS"),
        "{}",
        os.2
    );

    // Without --detect nothing is checked and the default platform stays.
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "plain",
            "--snapshot",
            "sys.raw",
            "--output-dir",
            "img3",
            "-q",
        ],
    )
    .ok();
    let m = manifest(&d.join("img3"));
    assert_eq!(m["Platform"], "Others Linux");
    assert!(m.get("Detection").is_none());

    // kiln check DIR uses the image's own attributes: img was made UEFI, img3 BIOS (the default).
    let (status, r) = check(d, &["img"]);
    assert_eq!((status, r["Result"].as_str()), (0, Some("Pass")));
    let (status, r) = check(d, &["img3"]);
    assert_eq!(status, 1);
    let boot = items(&r).into_iter().find(|i| i.0 == "BootMode").unwrap();
    assert!(boot.2.contains("BootMode is BIOS"), "{}", boot.2);
}

#[test]
fn check_by_image_id_and_request_file_detection_strategy() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "sys.raw", "BOOTX64.EFI", 0x8664, Some(UBUNTU));
    let store = path_str(&d.join("store"));
    fs::write(
        d.join("req.json"),
        r#"{"ImageName": "from-file", "SnapshotId": "sys.raw", "BootMode": "UEFI", "DetectionStrategy": "Standard"}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &[
            "--store",
            &store,
            "create",
            "--request",
            "req.json",
            "-q",
            "--json",
        ],
    )
    .ok();
    let rec: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rec["Platform"], "Ubuntu");
    assert_eq!(rec["Detection"]["Result"], "Pass");
    let id = rec["ImageId"].as_str().unwrap();
    let (status, r) = check(d, &["--store", &store, id]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(r["Platform"], "Ubuntu");
    // describe shows the detected platform.
    let desc = kiln_in(d, &["--store", &store, "describe", "--json", id]).ok();
    let v: Value = serde_json::from_str(&desc.stdout).unwrap();
    assert_eq!(v[0]["Platform"], "Ubuntu");

    fs::write(
        d.join("bad.json"),
        r#"{"ImageName": "x1", "SnapshotId": "sys.raw", "DetectionStrategy": "Deep"}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &[
            "--store",
            &store,
            "create",
            "--request",
            "bad.json",
            "--json",
        ],
    );
    assert_eq!(r.status, 2);
    assert_eq!(r.code(), "InvalidParameter");

    // An ImageId that is not in the store.
    let r = kiln_in(
        d,
        &[
            "--store",
            &store,
            "check",
            "--json",
            "m-aaaaaaaaaaaaaaaaaaaa",
        ],
    );
    assert_eq!(r.code(), "InvalidImageId.NotFound");
}

#[test]
fn a_damaged_gpt_is_a_fail_item_not_an_error() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "bad.raw", "BOOTX64.EFI", 0x8664, None);
    // One bit of the primary header's LastUsableLBA: its CRC no longer matches.
    let mut b = [0u8; 1];
    use std::os::unix::fs::FileExt;
    fs::File::open(d.join("bad.raw"))
        .unwrap()
        .read_exact_at(&mut b, 512 + 48)
        .unwrap();
    write_at(&d.join("bad.raw"), 512 + 48, &[b[0] ^ 1]);
    let (status, r) = check(d, &["bad.raw"]);
    assert_eq!(status, 1, "{r:#}");
    let it = items(&r);
    assert_eq!(it[0].0, "PartitionTable");
    assert_eq!(it[0].1, "Fail");
    assert!(
        it[0].2.contains("CRC32") && it[0].2.contains("backup at LBA 65535 is intact"),
        "{}",
        it[0].2
    );
    // The partitions still come from the intact backup.
    assert_eq!(r["Partitions"].as_array().unwrap().len(), 2);
}

/// A copy of raw `file` with the byte ranges `zero` set to zeros.
fn zeroed(dir: &Path, file: &str, name: &str, zero: &[(u64, u64)]) -> String {
    fs::copy(dir.join(file), dir.join(name)).unwrap();
    for &(at, len) in zero {
        write_at(&dir.join(name), at, &vec![0u8; len as usize]);
    }
    name.to_string()
}

fn sgdisk_verify(dir: &Path, file: &str) -> String {
    let r = tool_in(dir, "sgdisk", &["-v", file]);
    format!("{}{}", r.stdout, r.stderr)
}

#[test]
fn relocate_gpt_keeps_a_grown_disk_valid() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "sys.raw", "BOOTX64.EFI", 0x8664, Some(UBUNTU));
    let new_sectors = 64 * MIB / 512;
    for format in ["qcow2", "raw"] {
        let out = format!("img-{format}");
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "grown",
                "--disk",
                "snapshot=sys.raw,type=system,size=64M",
                "--relocate-gpt",
                "--detect",
                "--boot-mode",
                "UEFI",
                "--format",
                format,
                "--output-dir",
                &out,
                "-q",
            ],
        )
        .ok();
        let m = manifest(&d.join(&out));
        let file = format!("{out}/xvda.{format}");
        let raw = format!("{out}.raw");
        qemu_img(d, &["convert", "-O", "raw", &file, &raw]);
        assert_clean_if_qcow2(d, &file, format);

        // sgdisk finds no problem in the grown table.
        let v = sgdisk_verify(d, &raw);
        assert!(v.contains("No problems found"), "{format}: {v}");

        // The manifest says what changed; the check passes.
        let changes = strs(&m["DiskDeviceMappings"][0]["Changes"]);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes[0].contains("protective MBR partition resized from 65535 to 131071"));
        assert!(changes[1].contains("AlternateLBA 65535 -> 131071"));
        assert!(changes[2].contains("backup header moved from LBA 65535 to LBA 131071"));
        assert_eq!(m["Detection"]["Result"], "Pass", "{:#}", m["Detection"]);

        // Every byte outside the GPT structures is the source's: zero the protective MBR, the
        // primary header and the new backup (entries and header) in the output, and the MBR and
        // primary header in the source; the rest compares equal (past the source, zeros).
        let backup = (new_sectors - 33) * 512;
        let a = zeroed(d, "sys.raw", &format!("{out}.src0"), &[(0, 1024)]);
        let b = zeroed(
            d,
            &raw,
            &format!("{out}.out0"),
            &[(0, 1024), (backup, 33 * 512)],
        );
        assert_same(d, &a, &b);
        // And the structures themselves are exactly what sgdisk -e writes.
        let e = format!("{out}.sgdisk");
        fs::copy(d.join("sys.raw"), d.join(&e)).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(d.join(&e))
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        tool_in(d, "sgdisk", &["-e", &e]).ok();
        assert_same(d, &e, &raw);
    }
}

fn assert_clean_if_qcow2(dir: &Path, file: &str, format: &str) {
    if format == "qcow2" {
        assert_clean(dir, file);
    }
}

#[test]
fn without_relocate_gpt_detect_warns_and_names_the_flag() {
    let t = tmp();
    let d = t.path();
    uefi_disk(d, "sys.raw", "BOOTX64.EFI", 0x8664, None);
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "asis",
            "--disk",
            "snapshot=sys.raw,type=system,size=64M",
            "--detect",
            "--boot-mode",
            "UEFI",
            "--output-dir",
            "img",
            "-q",
        ],
    )
    .ok();
    let m = manifest(&d.join("img"));
    assert!(m["DiskDeviceMappings"][0].get("Changes").is_none());
    let backup = items(&m["Detection"])
        .into_iter()
        .find(|i| i.0 == "GptBackup")
        .unwrap();
    assert_eq!(backup.1, "Warn");
    assert!(
        backup
            .2
            .contains("LBA 65535, not at the disk's last LBA 131071"),
        "{}",
        backup.2
    );
    assert!(backup.2.contains("--relocate-gpt"), "{}", backup.2);
    // A dry run checks the disk as it would be written, and writes nothing.
    for (flag, want) in [("-q", "Warn"), ("--relocate-gpt", "Pass")] {
        let r = kiln_in(
            d,
            &[
                "create",
                "--name",
                "dry",
                "--disk",
                "snapshot=sys.raw,type=system,size=64M",
                "--detect",
                flag,
                "--boot-mode",
                "UEFI",
                "--output-dir",
                "dry",
                "--dry-run",
                "--json",
            ],
        )
        .ok();
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["Code"], "DryRunOperation");
        let backup = items(&v["Plan"]["Detection"])
            .into_iter()
            .find(|i| i.0 == "GptBackup")
            .unwrap();
        assert_eq!(backup.1, want, "{flag}: {}", backup.2);
        assert!(!d.join("dry").exists());
    }
    // The guest bytes are the source's, and sgdisk agrees there is a problem.
    assert_same(d, "sys.raw", "img/xvda.qcow2");
    qemu_img(d, &["convert", "-O", "raw", "img/xvda.qcow2", "out.raw"]);
    assert!(sgdisk_verify(d, "out.raw").contains("Problem"));

    // --relocate-gpt on a disk without a GPT warns and copies it as it is.
    mbr_disk(d, "mbr.raw", 16 * MIB, "label: dos\nstart=2048, type=83\n");
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "mbr",
            "--disk",
            "snapshot=mbr.raw,type=system,size=32M",
            "--relocate-gpt",
            "--output-dir",
            "img2",
            "-q",
        ],
    )
    .ok();
    assert!(
        r.stderr
            .contains("--relocate-gpt: the disk has no GPT; the disk is copied as it is"),
        "{}",
        r.stderr
    );
    assert_same(d, "mbr.raw", "img2/xvda.qcow2");
}

#[test]
fn an_mbr_esp_counts_for_uefi() {
    let t = tmp();
    let d = t.path();
    mbr_disk(
        d,
        "mbresp.raw",
        32 * MIB,
        "label: dos\nstart=2048, size=16384, type=ef\nstart=18432, type=83\n",
    );
    let esp = esp_image(d, "esp.img", "BOOTX64.EFI", 0x8664);
    place(d, "mbresp.raw", &esp, 2048);
    let (status, r) = check(d, &["--boot-mode", "UEFI", "mbresp.raw"]);
    assert_eq!(status, 0, "{r:#}");
    assert_eq!(r["PartitionTable"], "MBR");
    assert_eq!(r["Partitions"][0]["TypeId"], "0xef");
    assert_eq!(strs(&r["BootModes"]), ["UEFI"]);
    assert_items(
        &r,
        &[
            ("PartitionTable", "Pass", &["MBR with 2 primary"]),
            ("Partition 1", "Pass", &["EFI System", "fat12"]),
            ("Partition 2", "Pass", &["Linux", "no filesystem signature"]),
            ("BiosBoot", "Pass", &["no boot code"]),
            (
                "UefiBoot",
                "Pass",
                &["EFI System Partition 1 holds \\EFI\\BOOT\\BOOTX64.EFI"],
            ),
            ("BootMode", "Pass", &["UEFI only", "BootMode UEFI fits"]),
            ("Architecture", "Pass", &["x86_64"]),
            ("OperatingSystem", "Warn", &[]),
        ],
    );

    // An ESP without a loader is a warning (and then nothing boots the disk).
    mbr_disk(
        d,
        "empty-esp.raw",
        32 * MIB,
        "label: dos\nstart=2048, size=16384, type=ef\n",
    );
    let esp = esp_image(d, "esp2.img", "", 0);
    place(d, "empty-esp.raw", &esp, 2048);
    let (status, r) = check(d, &["empty-esp.raw"]);
    assert_eq!(status, 1);
    let uefi = items(&r).into_iter().find(|i| i.0 == "UefiBoot").unwrap();
    assert_eq!(uefi.1, "Warn");
    assert!(
        uefi.2.contains("has no \\EFI\\BOOT\\BOOTX64.EFI"),
        "{}",
        uefi.2
    );
}
