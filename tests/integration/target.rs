//! `--target`: each destination's format through the real binary, checked with qemu-img (and GNU
//! tar and gzip for GCP's archive); rules refused before anything is written; adjustments in the
//! manifest and the dry run; per-disk output formats.

use std::fs;
use std::io::Read;
use std::path::Path;

use crate::common::{self, kiln_in, qcow2_overlay, qemu_img, qemu_io, tool_in, MIB};

const GIB: u64 = 1 << 30;

/// A raw source: data at the start, a hole, and data at its odd-sized end (`size` bytes).
fn raw_source(d: &Path, name: &str, size: u64) {
    common::sparse_raw(&d.join(name), size);
    common::write_at(&d.join(name), 0, &common::noise(7, 2 * MIB as usize));
    common::write_at(&d.join(name), size - 1536, &common::noise(8, 1536));
}

/// A two-layer qcow2 chain.
fn qcow2_chain(d: &Path) {
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "40M"]);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 3M", "write -P 0x12 20M 1M"],
    );
    qcow2_overlay(d, "base.qcow2", "top.qcow2");
    qemu_io(d, "top.qcow2", &["write -P 0x21 1M 1M"]);
}

/// `kiln create --name target-test --output-dir OUT ARGS...`.
fn create(d: &Path, out: &str, args: &[&str]) -> common::Run {
    let mut a = vec!["create", "--name", "target-test", "--output-dir", out, "-q"];
    a.extend_from_slice(args);
    kiln_in(d, &a)
}

fn adjustments(m: &serde_json::Value) -> Vec<String> {
    m["Target"]["Adjustments"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Azure: a fixed VHD of a whole number of MiB, 512 bytes larger than its virtual size, whose
/// footer agrees with `qemu-img create -f vpc -o subformat=fixed,force_size=on`.
#[test]
fn azure_writes_a_fixed_vhd_grown_to_a_whole_mib() {
    let t = common::tmp();
    let d = t.path();
    raw_source(d, "r.raw", 48 * MIB + 1536);
    create(d, "out", &["--snapshot", "r.raw", "--target", "azure"]).ok();
    // qemu-img info shows exactly 49 MiB; the file is 512 bytes more; footer as qemu's.
    crate::vhd::check_output(d, "r.raw", "out/xvda.vhd", 49 * MIB, true);
    assert_eq!(
        fs::metadata(d.join("out/xvda.vhd")).unwrap().len(),
        49 * MIB + 512
    );
    let m = common::manifest(&d.join("out"));
    assert_eq!(m["Target"]["Name"], "azure");
    assert_eq!(m["DiskDeviceMappings"][0]["Format"], "vhd");
    let adj = adjustments(&m);
    assert_eq!(adj.len(), 1, "{adj:?}");
    assert!(adj[0].contains("whole number of MiB") && adj[0].contains(&(49 * MIB).to_string()));
    common::assert_sums(&d.join("out"));
    // A size already whole is not adjusted, and a qcow2 chain is copied as it reads.
    qcow2_chain(d);
    create(d, "out2", &["--snapshot", "top.qcow2", "--target", "azure"]).ok();
    crate::vhd::check_output(d, "top.qcow2", "out2/xvda.vhd", 40 * MIB, true);
    assert!(adjustments(&common::manifest(&d.join("out2"))).is_empty());
}

/// The dry run shows the target, its output and each adjustment, and writes nothing.
#[test]
fn a_dry_run_shows_the_target_and_its_adjustments() {
    let t = common::tmp();
    let d = t.path();
    raw_source(d, "r.raw", 30 * MIB + 512);
    let r = create(
        d,
        "out",
        &[
            "--snapshot",
            "r.raw",
            "--target",
            "gcp",
            "--dry-run",
            "--json",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let tp = &v["Plan"]["TargetProfile"];
    assert_eq!(tp["Name"], "gcp");
    assert!(tp["Output"].as_str().unwrap().contains("disk.raw"), "{tp}");
    let adj = tp["Adjustments"].as_array().unwrap();
    assert_eq!(adj.len(), 1);
    assert!(
        adj[0].as_str().unwrap().contains("1073741824 bytes"),
        "{adj:?}"
    );
    assert_eq!(v["Plan"]["Disks"][0]["VirtualSize"], GIB);
    let text = create(
        d,
        "out",
        &["--snapshot", "r.raw", "--target", "azure", "--dry-run"],
    )
    .ok()
    .stdout;
    assert!(
        text.contains("--target azure: vhd (subformat=fixed)"),
        "{text}"
    );
    assert!(text.contains("adjusted: /dev/xvda"), "{text}");
    assert!(!d.join("out").exists());
}

/// Rules and conflicts are refused before anything is written, naming the rule's document.
#[test]
fn broken_rules_and_conflicts_are_refused_before_anything_is_written() {
    let t = common::tmp();
    let d = t.path();
    raw_source(d, "r.raw", 16 * MIB);
    fs::write(d.join("key"), "a passphrase\n").unwrap();
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["--target", "azure"],
            "OperationDenied.TargetRule",
            "at least 20 MiB",
        ),
        (
            &["--target", "azure", "--format", "qcow2"],
            "InvalidParameter",
            "--format qcow2 conflicts",
        ),
        (
            &["--target", "azure", "--output-options", "subformat=dynamic"],
            "InvalidParameter",
            "subformat=fixed",
        ),
        (
            &["--target", "aws", "--arch", "arm64"],
            "OperationDenied.TargetRule",
            "API_ImportImage",
        ),
        (
            &["--target", "aws", "--boot-mode", "UEFI-Preferred"],
            "OperationDenied.TargetRule",
            "uefi-preferred",
        ),
        (
            &["--target", "openstack", "--encrypt", "--key-file", "key"],
            "OperationDenied.TargetRule",
            "plain disks",
        ),
        (
            &["--target", "vsphere", "--format", "qcow2"],
            "InvalidParameter",
            "--format qcow2 conflicts",
        ),
        (&["--target", "esx"], "InvalidParameter", "azure, aws, gcp"),
        (
            &["--target", "gcp", "-t", "none"],
            "InvalidParameter",
            "-t none",
        ),
        (
            &["--format", "vhd", "--encrypt", "--key-file", "key"],
            "InvalidParameter",
            "qcow2 or raw",
        ),
    ];
    for (args, code, says) in cases {
        let mut a = vec!["--snapshot", "r.raw", "--json"];
        a.extend_from_slice(args);
        let r = create(d, "out", &a);
        assert_eq!(r.status, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.code(), *code, "{args:?}: {}", r.stdout);
        assert!(r.stdout.contains(says), "{args:?}: {}", r.stdout);
        assert!(!d.join("out").exists(), "{args:?} wrote the output");
    }
    // Huawei: at most 3 data disks with an image file; a system disk of at most 1024 GB.
    let mut a = vec![
        "--disk",
        "snapshot=r.raw,device=/dev/xvda",
        "--target",
        "huawei",
        "--json",
    ];
    for _ in 0..4 {
        a.extend(["--disk", "size=1G"]);
    }
    let r = create(d, "out", &a);
    assert_eq!(r.code(), "OperationDenied.TargetRule", "{}", r.stdout);
    assert!(r.stdout.contains("at most 3 data disks"), "{}", r.stdout);
    common::sparse_raw(&d.join("big.raw"), 1025 * GIB);
    let r = create(
        d,
        "out",
        &[
            "--snapshot",
            "big.raw",
            "--target",
            "huawei",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(r.code(), "OperationDenied.TargetRule", "{}", r.stdout);
    assert!(r.stdout.contains("40 to 1024 GB"), "{}", r.stdout);
    // The same disks without the target are fine.
    create(
        d,
        "out",
        &[
            "--snapshot",
            "big.raw",
            "--target",
            "openstack",
            "--dry-run",
        ],
    )
    .ok();
    assert!(!d.join("out").exists());
}

/// The gzip stream of `path`, decompressed.
fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Checks a GCP archive: `gzip -t` passes; it holds one member `disk.raw` in oldgnu sparse form;
/// `tar -xzSf` gives a disk.raw of `size` bytes equal to `src`, and sparse on disk.
fn check_archive(d: &Path, archive: &str, src: &str, size: u64) {
    tool_in(d, "gzip", &["-t", archive]).ok();
    let tar_bytes = gunzip(&d.join(archive));
    // Old GNU magic ("ustar  \0") and the sparse type flag.
    assert_eq!(&tar_bytes[257..265], b"ustar  \0", "{archive}: not oldgnu");
    assert_eq!(tar_bytes[156], b'S', "{archive}: not a sparse member");
    let list = tool_in(d, "tar", &["-tzf", archive]).ok().stdout;
    assert_eq!(list, "disk.raw\n", "{archive}");
    let x = d.join(format!("{archive}.x"));
    fs::create_dir(&x).unwrap();
    tool_in(d, "tar", &["-C", &common::path_str(&x), "-xzSf", archive]).ok();
    let raw = x.join("disk.raw");
    assert_eq!(fs::metadata(&raw).unwrap().len(), size);
    common::assert_same(d, src, &common::path_str(&raw));
    let alloc = common::allocated(&raw);
    assert!(alloc < size / 16, "{archive}: disk.raw holds {alloc} bytes");
    fs::remove_dir_all(&x).unwrap();
}

/// GCP: one `DEVICE.tar.gz` per disk holding `disk.raw` (a whole GiB) in GNU tar's old sparse
/// form, the same bytes for any -j, covered by SHA256SUMS.
#[test]
fn gcp_writes_one_sparse_gzip_tar_per_disk() {
    let t = common::tmp();
    let d = t.path();
    raw_source(d, "r.raw", 100 * MIB + 1536);
    qcow2_chain(d);
    let args = |j: &'static str| {
        vec![
            "--disk",
            "snapshot=r.raw,device=/dev/xvda",
            "--disk",
            "snapshot=top.qcow2",
            "--disk",
            "size=2G",
            "--target",
            "gcp",
            "-j",
            j,
        ]
    };
    create(d, "one", &args("1")).ok();
    create(d, "three", &args("3")).ok();
    let mut files: Vec<String> = fs::read_dir(d.join("one"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "SHA256SUMS",
            "manifest.json",
            "xvda.tar.gz",
            "xvdb.tar.gz",
            "xvdc.tar.gz"
        ]
    );
    for f in ["xvda.tar.gz", "xvdb.tar.gz", "xvdc.tar.gz"] {
        assert_eq!(
            fs::read(d.join("one").join(f)).unwrap(),
            fs::read(d.join("three").join(f)).unwrap(),
            "{f}: -j 1 and -j 3 differ"
        );
    }
    check_archive(d, "one/xvda.tar.gz", "r.raw", GIB);
    check_archive(d, "one/xvdb.tar.gz", "top.qcow2", GIB);
    common::sparse_raw(&d.join("empty.raw"), 2 * GIB);
    check_archive(d, "one/xvdc.tar.gz", "empty.raw", 2 * GIB);
    common::assert_sums(&d.join("one"));
    let m = common::manifest(&d.join("one"));
    assert_eq!(m["Target"]["Name"], "gcp");
    assert_eq!(adjustments(&m).len(), 2, "{:?}", adjustments(&m));
    assert_eq!(m["DiskDeviceMappings"][0]["File"], "xvda.tar.gz");
    assert_eq!(m["DiskDeviceMappings"][0]["Format"], "raw");
    assert_eq!(m["DiskDeviceMappings"][0]["VirtualSize"], GIB);
    kiln_in(d, &["verify", "one"]).ok();
}

/// aws (streamOptimized VMDK), hyperv (VHDX), alibaba, huawei and openstack (qcow2): the format
/// each picks, clean under qemu-img check where it checks, and equal to the source.
#[test]
fn every_other_target_writes_its_format() {
    let t = common::tmp();
    let d = t.path();
    qcow2_chain(d);
    for (target, file, qemu_fmt) in [
        ("aws", "xvda.vmdk", "vmdk"),
        ("hyperv", "xvda.vhdx", "vhdx"),
        ("alibaba", "xvda.qcow2", "qcow2"),
        ("huawei", "xvda.qcow2", "qcow2"),
        ("openstack", "xvda.qcow2", "qcow2"),
    ] {
        let out = format!("out-{target}");
        create(d, &out, &["--snapshot", "top.qcow2", "--target", target]).ok();
        let f = format!("{out}/{file}");
        let info = common::info(d, &f);
        assert_eq!(info["format"], qemu_fmt, "{target}");
        common::assert_clean(d, &f);
        common::assert_same(d, "top.qcow2", &f);
        if target == "aws" {
            assert_eq!(
                info["format-specific"]["data"]["create-type"], "streamOptimized",
                "{info}"
            );
        }
        let m = common::manifest(&d.join(&out));
        assert_eq!(m["Target"]["Name"], target);
        common::assert_sums(&d.join(&out));
    }
}

/// `output-format=` (a request file's `OutputFormat`) mixes formats in one image.
#[test]
fn each_disk_can_have_its_own_output_format() {
    let t = common::tmp();
    let d = t.path();
    raw_source(d, "r.raw", 24 * MIB);
    qcow2_chain(d);
    create(
        d,
        "out",
        &[
            "--disk",
            "snapshot=r.raw,device=/dev/xvda",
            "--disk",
            "snapshot=top.qcow2,output-format=vhd",
            "--disk",
            "snapshot=r.raw,output-format=vmdk",
        ],
    )
    .ok();
    common::assert_clean(d, "out/xvda.qcow2");
    common::assert_same(d, "r.raw", "out/xvda.qcow2");
    crate::vhd::check_output(d, "top.qcow2", "out/xvdb.vhd", 40 * MIB, true);
    common::assert_clean(d, "out/xvdc.vmdk");
    common::assert_same(d, "r.raw", "out/xvdc.vmdk");
    let m = common::manifest(&d.join("out"));
    let formats: Vec<&str> = m["DiskDeviceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["Format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "vhd", "vmdk"]);
    // The request file's OutputFormat, and Target.
    fs::write(
        d.join("req.json"),
        r#"{"ImageName": "from-file", "Target": "hyperv",
            "DiskDeviceMapping": [{"SnapshotId": "r.raw", "Device": "/dev/xvda"},
                                  {"SnapshotId": "top.qcow2", "OutputFormat": "vhdx"}]}"#,
    )
    .unwrap();
    kiln_in(
        d,
        &["create", "--request", "req.json", "--output-dir", "f", "-q"],
    )
    .ok();
    common::assert_clean(d, "f/xvda.vhdx");
    common::assert_same(d, "top.qcow2", "f/xvdb.vhdx");
    // A disk format the target does not take is refused.
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "mixed",
            "--disk",
            "snapshot=r.raw,device=/dev/xvda",
            "--disk",
            "snapshot=top.qcow2,output-format=vhd",
            "--target",
            "hyperv",
            "--output-dir",
            "g",
            "--json",
        ],
    );
    assert_eq!(r.code(), "InvalidParameter", "{}", r.stdout);
    assert!(
        r.stdout.contains("output-format=vhd conflicts"),
        "{}",
        r.stdout
    );
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "mixed",
            "--disk",
            "snapshot=r.raw,device=/dev/xvda",
            "--disk",
            "snapshot=top.qcow2,output-format=qed",
            "--output-dir",
            "g",
            "--json",
        ],
    );
    assert_eq!(r.code(), "InvalidParameter", "{}", r.stdout);
    assert!(!d.join("g").exists());
}
