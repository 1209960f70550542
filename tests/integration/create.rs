//! `kiln create` end to end: the real binary on real files, qemu-img as the oracle.

use std::fs;
use std::path::Path;

use crate::common::*;

/// A 64 MiB qcow2 with data, a zero range and data at the very end.
fn make_base(dir: &Path, name: &str) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "64M"]);
    qemu_io(
        dir,
        name,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x01 5M 64k",
            "write -z 6M 1M",
            "write -P 0xcd 63M 1M",
        ],
    );
}

/// A 32 MiB sparse raw file with scattered data and a block of written zeros.
fn make_raw(dir: &Path, name: &str) {
    let p = dir.join(name);
    sparse_raw(&p, 32 << 20);
    write_at(&p, 4096, b"hello from a raw data disk");
    write_at(&p, 3 << 20, &vec![0u8; 1 << 20]);
    write_at(&p, (7 << 20) + 512, &vec![0x5au8; 300_000]);
    write_at(&p, (32 << 20) - 4096, &[1u8; 4096]);
}

#[test]
fn the_issue_example_builds_an_image_qemu_and_sha256sum_accept() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    make_raw(d, "data.raw");
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "golden-web",
            "--disk",
            "snapshot=base.qcow2,device=/dev/xvda,type=system",
            "--disk",
            "snapshot=data.raw,device=/dev/xvdb,size=64M",
            "--disk",
            "device=/dev/xvdc,size=10G",
            "--output-dir",
            "golden-web",
        ],
    )
    .ok();
    let image = d.join("golden-web");
    let id = r.stdout.trim();
    assert!(id.starts_with("m-") && id.len() == 22, "{id}");
    let mut names: Vec<_> = fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "manifest.json",
            "xvda.qcow2",
            "xvdb.qcow2",
            "xvdc.qcow2"
        ]
    );
    for f in ["xvda.qcow2", "xvdb.qcow2", "xvdc.qcow2"] {
        assert_clean(&image, f);
        assert_eq!(info(&image, f)["format"], "qcow2");
    }
    assert_same(d, "base.qcow2", "golden-web/xvda.qcow2");
    assert_same(d, "data.raw", "golden-web/xvdb.qcow2");
    assert_eq!(virtual_size(&image, "xvda.qcow2"), 64 << 20);
    assert_eq!(virtual_size(&image, "xvdb.qcow2"), 64 << 20);
    assert_eq!(virtual_size(&image, "xvdc.qcow2"), 10 << 30);
    // The empty disk allocates no data cluster.
    let map = qemu_img(&image, &["map", "--output=json", "xvdc.qcow2"]);
    assert!(!map.contains("\"data\": true"), "{map}");
    assert!(allocated(&image.join("xvdc.qcow2")) < 1 << 20);
    assert_sums(&image);

    let m = manifest(&image);
    assert_eq!(m["ImageId"], id);
    assert_eq!(m["ImageName"], "golden-web");
    let disks = m["DiskDeviceMappings"].as_array().unwrap();
    assert_eq!(disks.len(), 3);
    assert_eq!(disks[0]["Device"], "/dev/xvda");
    assert_eq!(disks[0]["DiskType"], "system");
    assert_eq!(disks[1]["DiskType"], "data");
    assert_eq!(disks[1]["Size"], 1);
    assert_eq!(disks[2]["Size"], 10);
    assert_eq!(disks[2]["VirtualSize"], 10u64 << 30);
    assert!(disks[2]["Source"].is_null());
    assert_eq!(disks[0]["Source"]["Format"], "qcow2");
    assert_eq!(disks[1]["Source"]["Format"], "raw");
    assert_eq!(disks[0]["Source"]["Path"], path_str(&d.join("base.qcow2")));
    for disk in disks {
        let f = image.join(disk["File"].as_str().unwrap());
        assert_eq!(disk["Sha256"].as_str().unwrap(), sha256_file(&f));
        assert_eq!(disk["AllocatedBytes"].as_u64().unwrap(), allocated(&f));
    }
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn raw_output_is_sparse_and_identical() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    make_raw(d, "data.raw");
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "raw-img",
            "--format",
            "raw",
            "--snapshot",
            "ignored.qcow2",
            "--disk",
            "snapshot=base.qcow2,type=system",
            "--disk",
            "snapshot=data.raw,size=1G",
            "--output-dir",
            "out",
        ],
    )
    .ok();
    let o = out(d);
    assert_same(d, "base.qcow2", "out/xvda.raw");
    assert_same(d, "data.raw", "out/xvdb.raw");
    assert_eq!(fs::metadata(o.join("xvdb.raw")).unwrap().len(), 1 << 30);
    // Only non-zero 4 KiB blocks are written: 3 MiB of data in a 64 MiB disk, ~300 KiB in 1 GiB.
    assert!(
        allocated(&o.join("xvda.raw")) <= 3 << 20,
        "{}",
        allocated(&o.join("xvda.raw"))
    );
    assert!(
        allocated(&o.join("xvdb.raw")) <= 400 << 10,
        "{}",
        allocated(&o.join("xvdb.raw"))
    );
    assert_eq!(info(&o, "xvda.raw")["format"], "raw");
    assert_sums(&o);
}

#[test]
fn snapshot_alone_is_the_short_form_and_disk_mappings_win_with_a_warning() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    make_raw(d, "data.raw");
    kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "base.qcow2",
            "--name",
            "golden",
            "--output-dir",
            "short",
        ],
    )
    .ok();
    assert_same(d, "base.qcow2", "short/xvda.qcow2");
    let m = manifest(&d.join("short"));
    assert_eq!(m["DiskDeviceMappings"].as_array().unwrap().len(), 1);

    let r = kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "base.qcow2",
            "--disk",
            "snapshot=data.raw,type=system",
            "--name",
            "g2",
            "--output-dir",
            "both",
        ],
    )
    .ok();
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("base.qcow2"),
        "{}",
        r.stderr
    );
    assert_same(d, "data.raw", "both/xvda.qcow2");
}

#[test]
fn a_grown_disk_has_the_asked_size_and_reads_zeros_past_its_source() {
    let t = tmp();
    let d = t.path();
    make_raw(d, "data.raw");
    fs::write(d.join("odd.raw"), vec![0x33u8; 100_000]).unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "grow",
            "--disk",
            "snapshot=data.raw,type=system,size=100M",
            "--disk",
            "snapshot=odd.raw,size=1M",
            "--output-dir",
            "out",
        ],
    )
    .ok();
    assert_eq!(virtual_size(&out(d), "xvda.qcow2"), 100 << 20);
    assert_eq!(virtual_size(&out(d), "xvdb.qcow2"), 1 << 20);
    // compare reads the larger image's extra area and fails unless it is zeros.
    assert_same(d, "data.raw", "out/xvda.qcow2");
    assert_same(d, "odd.raw", "out/xvdb.qcow2");
    assert_clean(&out(d), "xvdb.qcow2");
}

#[test]
fn cluster_size_and_threads_are_honoured() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    for (cs, j) in [("512", "1"), ("4K", "3"), ("2M", "8")] {
        let o = format!("out-{cs}");
        kiln_in(
            d,
            &[
                "create",
                "--snapshot",
                "base.qcow2",
                "--name",
                "img-c",
                "--cluster-size",
                cs,
                "-j",
                j,
                "--output-dir",
                &o,
            ],
        )
        .ok();
        let f = format!("{o}/xvda.qcow2");
        assert_clean(d, &f);
        assert_same(d, "base.qcow2", &f);
        let bytes = match cs {
            "512" => 512,
            "4K" => 4096,
            _ => 2 << 20,
        };
        assert_eq!(info(d, &f)["cluster-size"], bytes);
    }
}

#[test]
fn the_same_input_gives_the_same_bytes_whatever_the_thread_count() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    make_raw(d, "data.raw");
    for j in ["1", "4"] {
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "det",
                "-j",
                j,
                "--disk",
                "snapshot=base.qcow2,type=system",
                "--disk",
                "snapshot=data.raw",
                "--output-dir",
                &format!("o{j}"),
            ],
        )
        .ok();
    }
    for f in ["xvda.qcow2", "xvdb.qcow2"] {
        assert_eq!(
            sha256_file(&d.join("o1").join(f)),
            sha256_file(&d.join("o4").join(f)),
            "{f}"
        );
    }
}

#[test]
fn progress_json_reports_each_disk() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    let r = kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "base.qcow2",
            "--name",
            "img-p",
            "--progress",
            "json",
            "--output-dir",
            "out",
        ],
    )
    .ok();
    let lines: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().expect("a progress line");
    assert_eq!(last["Device"], "/dev/xvda");
    assert_eq!(last["Done"], 64u64 << 20);
    assert_eq!(last["Total"], 64u64 << 20);
    assert!(last["Elapsed"].as_f64().is_some());
    assert_eq!(last["Finished"], true);
    // The last line carries the numbers benchmarkers read: 1 MiB + 64 KiB + 1 MiB of data.
    assert_eq!(last["BytesCopied"], (2u64 << 20) + (64 << 10));
    assert!(last["HolesSkipped"].as_u64().unwrap() > 0);
    assert!(last["DataBytesPerSec"].as_u64().unwrap() > 0);
    assert!(
        r.stderr.contains("copied") && r.stderr.contains("holes skipped"),
        "{}",
        r.stderr
    );
    let q = kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "base.qcow2",
            "--name",
            "img-p",
            "--quiet",
            "--output-dir",
            "q",
        ],
    )
    .ok();
    assert_eq!(q.stderr, "");
}

#[test]
fn sources_are_never_changed() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    qcow2_overlay(d, "base.qcow2", "top.qcow2");
    qemu_io(d, "top.qcow2", &["write -P 0x77 2M 1M"]);
    qemu_img(d, &["snapshot", "-c", "s1", "base.qcow2"]);
    make_raw(d, "data.raw");
    let files = ["base.qcow2", "top.qcow2", "data.raw"];
    let before: Vec<_> = files
        .iter()
        .map(|f| {
            (
                sha256_file(&d.join(f)),
                fs::metadata(d.join(f)).unwrap().modified().unwrap(),
            )
        })
        .collect();
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "img-a",
            "--disk",
            "snapshot=top.qcow2,type=system",
            "--disk",
            "snapshot=data.raw",
            "--disk",
            "snapshot=base.qcow2@s1",
            "--output-dir",
            "o1",
        ],
    )
    .ok();
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "img-b",
            "--format",
            "raw",
            "--snapshot",
            "base.qcow2",
            "--output-dir",
            "o2",
        ],
    )
    .ok();
    let after: Vec<_> = files
        .iter()
        .map(|f| {
            (
                sha256_file(&d.join(f)),
                fs::metadata(d.join(f)).unwrap().modified().unwrap(),
            )
        })
        .collect();
    assert_eq!(before, after);
    let m = manifest(&d.join("o1"));
    let chain = &m["DiskDeviceMappings"][0]["Source"]["FilesRead"];
    assert_eq!(chain.as_array().unwrap().len(), 2, "{chain}");
    assert_eq!(chain[1]["Path"], path_str(&d.join("base.qcow2")));
    assert_eq!(m["DiskDeviceMappings"][2]["Source"]["SnapshotName"], "s1");
}

/// Each bad request: its code, exit status 2, and nothing left behind.
#[test]
fn bad_requests_have_stable_codes_and_write_nothing() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    make_raw(d, "data.raw");
    fs::write(d.join("garbage.qcow2"), {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 9; // version 9
        h
    })
    .unwrap();
    let mut seventeen = vec![
        "--disk".to_string(),
        "snapshot=base.qcow2,type=system".to_string(),
    ];
    for _ in 0..17 {
        seventeen.push("--disk".into());
        seventeen.push("size=1M".into());
    }
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("MissingParameter", vec![]),
        (
            "MissingParameter",
            vec!["--disk".into(), "size=1G,type=system".into()],
        ),
        (
            "InvalidDevice.Malformed",
            vec![
                "--disk".into(),
                "snapshot=base.qcow2,device=/dev/sda".into(),
            ],
        ),
        (
            "InvalidDevice.InUse",
            vec![
                "--snapshot".into(),
                "base.qcow2".into(),
                "--disk".into(),
                "snapshot=base.qcow2,type=system".into(),
                "--disk".into(),
                "device=xvdb".into(),
                "--disk".into(),
                "device=/dev/xvdb".into(),
            ],
        ),
        (
            "OperationDenied.NoSystemDisk",
            vec!["--disk".into(), "snapshot=base.qcow2,device=xvdb".into()],
        ),
        (
            "OperationDenied.MultipleSystemDisks",
            vec![
                "--disk".into(),
                "snapshot=base.qcow2,type=system".into(),
                "--disk".into(),
                "snapshot=data.raw,device=/dev/xvda".into(),
            ],
        ),
        ("QuotaExceed.DataDisk", seventeen),
        (
            "InvalidSize.ValueNotSupported",
            vec![
                "--disk".into(),
                "snapshot=base.qcow2,type=system,size=10M".into(),
            ],
        ),
        (
            "InvalidSize.ValueNotSupported",
            vec![
                "--disk".into(),
                "snapshot=base.qcow2,type=system,size=12Q".into(),
            ],
        ),
        (
            "InvalidSnapshotId.NotFound",
            vec!["--snapshot".into(), "missing.qcow2".into()],
        ),
        (
            "InvalidSnapshotId.NotFound",
            vec!["--snapshot".into(), "base.qcow2@nosuchsnap".into()],
        ),
        (
            "InvalidSnapshot.Unsupported",
            vec!["--snapshot".into(), "data.raw@snap".into()],
        ),
        (
            "InvalidSnapshot.Unsupported",
            vec!["--snapshot".into(), "garbage.qcow2".into()],
        ),
    ];
    for (want, args) in cases {
        let mut a: Vec<&str> = vec!["--json", "create", "--name", "bad", "--output-dir", "out"];
        a.extend(args.iter().map(|s| s.as_str()));
        let r = kiln_in(d, &a);
        assert_eq!(r.status, 2, "{want}: {a:?}\n{}{}", r.stdout, r.stderr);
        assert_eq!(r.code(), want, "{a:?}: {}", r.stdout);
        assert!(!d.join("out").exists(), "{want}: output left behind");
    }
    let names: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".kiln")), "{names:?}");
    // Without --json: a readable message on stderr, same exit status.
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "img-x",
            "--snapshot",
            "missing.qcow2",
            "--output-dir",
            "out",
        ],
    );
    assert_eq!(r.status, 2);
    assert!(
        r.stderr.contains("InvalidSnapshotId.NotFound") && r.stderr.contains("missing.qcow2"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_non_empty_output_dir_is_refused_and_an_empty_one_is_used() {
    let t = tmp();
    let d = t.path();
    make_base(d, "base.qcow2");
    fs::create_dir(d.join("full")).unwrap();
    fs::write(d.join("full/keep.txt"), b"mine").unwrap();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--snapshot",
            "base.qcow2",
            "--name",
            "img-n",
            "--output-dir",
            "full",
        ],
    );
    assert_eq!(r.status, 2);
    assert_eq!(r.code(), "InvalidOutputDir.NotEmpty");
    assert_eq!(fs::read(d.join("full/keep.txt")).unwrap(), b"mine");
    fs::create_dir(d.join("empty")).unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "base.qcow2",
            "--name",
            "img-n",
            "--output-dir",
            "empty",
        ],
    )
    .ok();
    assert_sums(&d.join("empty"));
}

/// A corrupt L2 entry found mid-copy: a clear error naming the offset, and no image left behind.
#[test]
fn a_failure_while_copying_leaves_nothing_that_looks_finished() {
    let t = tmp();
    let d = t.path();
    make_base(d, "bad.qcow2");
    let p = d.join("bad.qcow2");
    let bytes = fs::read(&p).unwrap();
    let be = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // Guest cluster 16 (1 MiB in, unallocated) now points far past the end of the file.
    write_at(
        &p,
        (l2 + 16 * 8) as u64,
        &(0x8000_0000_0000_0000u64 | (1u64 << 40)).to_be_bytes(),
    );
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--snapshot",
            "bad.qcow2",
            "--name",
            "img-n",
            "--output-dir",
            "out",
        ],
    );
    assert_ne!(r.status, 0);
    assert_eq!(r.code(), "InvalidSnapshot.Corrupt", "{}", r.stdout);
    assert!(!d.join("out").exists());
    let names: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["bad.qcow2"]);
}

/// `--data-image`: data disks only, from /dev/xvdb; the manifest and `describe` say so.
#[test]
fn a_data_disk_image_has_no_system_disk() {
    let t = tmp();
    let d = t.path();
    make_raw(d, "vol.raw");
    kiln_in(
        d,
        &[
            "create",
            "--data-image",
            "--name",
            "vol-img",
            "--disk",
            "snapshot=vol.raw",
            "--disk",
            "size=1G",
            "--output-dir",
            "out",
        ],
    )
    .ok();
    let m = manifest(&out(d));
    assert_eq!(m["ImageType"], "DataDisk");
    let disks = m["DiskDeviceMappings"].as_array().unwrap();
    assert_eq!(disks[0]["Device"], "/dev/xvdb");
    assert_eq!(disks[0]["DiskType"], "data");
    assert_eq!(disks[1]["Device"], "/dev/xvdc");
    assert_same(d, "vol.raw", "out/xvdb.qcow2");
    assert!(!out(d).join("xvda.qcow2").exists());
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--data-image",
            "--name",
            "vol-img",
            "--disk",
            "snapshot=vol.raw,type=system",
            "--output-dir",
            "o2",
        ],
    );
    assert_eq!((r.status, r.code().as_str()), (2, "InvalidParameter"));
    // In the store, describe shows the type.
    let store = path_str(&d.join("store"));
    kiln_in(
        d,
        &[
            "--store",
            &store,
            "create",
            "--data-image",
            "--name",
            "vol-img",
            "--disk",
            "snapshot=vol.raw",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(
        &kiln_in(d, &["--store", &store, "--json", "describe"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(v[0]["ImageType"], "DataDisk");
    assert!(kiln_in(d, &["--store", &store, "describe"])
        .ok()
        .stdout
        .contains("DataDisk"));
}
