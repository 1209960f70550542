//! Every qcow2 variant kiln reads, through the real binary: the image kiln builds from it must be
//! identical to the source (qemu-img compare) and clean (qemu-img check).

use std::path::Path;

use crate::common::*;

/// Builds the system disk with `src` (a file name, maybe with `@SNAP`) and checks it against `reference`,
/// a file qemu-img reads as the same guest disk.
fn roundtrip(d: &Path, src: &str, reference: &str) {
    for fmt in ["qcow2", "raw"] {
        let o = format!("out-{fmt}");
        kiln_in(
            d,
            &[
                "create",
                "--snapshot",
                src,
                "--name",
                "img-v",
                "--format",
                fmt,
                "--output-dir",
                &o,
            ],
        )
        .ok();
        let f = format!("{o}/xvda.{fmt}");
        assert_same(d, reference, &f);
        if fmt == "qcow2" {
            assert_clean(d, &f);
        }
        assert_sums(&d.join(&o));
    }
}

fn pattern(d: &Path, f: &str) {
    qemu_io(
        d,
        f,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 1M",
            "write -z 3M 512k",
            "write -P 0x33 5M 4k",
            "write -P 0x44 15M 1M",
        ],
    );
}

fn variant(opts: &str) {
    let t = tmp();
    let d = t.path();
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, "v.qcow2", "16M"],
    );
    pattern(d, "v.qcow2");
    roundtrip(d, "v.qcow2", "v.qcow2");
}

#[test]
fn version_2() {
    variant("compat=0.10");
}

#[test]
fn version_3() {
    variant("compat=1.1");
}

#[test]
fn cluster_512() {
    variant("cluster_size=512");
}

#[test]
fn cluster_2m() {
    variant("cluster_size=2M");
}

#[test]
fn refcount_bits_1() {
    variant("refcount_bits=1");
}

#[test]
fn refcount_bits_64() {
    variant("refcount_bits=64");
}

#[test]
fn extended_l2() {
    let t = tmp();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "v.qcow2",
            "16M",
        ],
    );
    // Subcluster (2 KiB) writes, zeroes and discards.
    qemu_io(
        d,
        "v.qcow2",
        &[
            "write -P 0x61 0 2k",
            "write -P 0x62 6k 4k",
            "write -P 0x63 1M 128k",
            "write -z 1040k 2k",
            "write -P 0x64 15M 2k",
        ],
    );
    roundtrip(d, "v.qcow2", "v.qcow2");
}

#[test]
fn zero_clusters_v2_and_v3() {
    for compat in ["0.10", "1.1"] {
        let t = tmp();
        let d = t.path();
        qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "8M"]);
        qemu_io(d, "base.raw", &["write -P 0x99 0 8M"]);
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-b",
                "base.raw",
                "-F",
                "raw",
                "v.qcow2",
            ],
        );
        // Zeroing over a backing file: a zero cluster in v3, written zeros in v2.
        qemu_io(d, "v.qcow2", &["write -z 1M 2M", "write -P 0x10 4M 64k"]);
        roundtrip(d, "v.qcow2", "v.qcow2");
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    for ct in ["zlib", "zstd"] {
        let t = tmp();
        let d = t.path();
        qemu_img(d, &["create", "-q", "-f", "raw", "plain.raw", "8M"]);
        qemu_io(
            d,
            "plain.raw",
            &["write -P 0x41 0 3M", "write -P 0x42 5M 100k"],
        );
        write_at(
            &d.join("plain.raw"),
            7 << 20,
            &(0..300_000u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<_>>(),
        );
        qemu_img(
            d,
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                "plain.raw",
                "v.qcow2",
            ],
        );
        assert_eq!(
            info(d, "v.qcow2")["format-specific"]["data"]["compression-type"],
            ct
        );
        roundtrip(d, "v.qcow2", "plain.raw");
    }
}

#[test]
fn a_chain_of_three_with_relative_names() {
    let t = tmp();
    let d = t.path();
    std::fs::create_dir(d.join("layers")).unwrap();
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "layers/base.qcow2", "16M"],
    );
    qemu_io(d, "layers/base.qcow2", &["write -P 0x01 0 8M"]);
    qcow2_overlay(d, "base.qcow2", "layers/mid.qcow2");
    qemu_io(
        d,
        "layers/mid.qcow2",
        &["write -P 0x02 2M 2M", "write -z 6M 1M"],
    );
    qcow2_overlay(d, "mid.qcow2", "layers/top.qcow2");
    qemu_io(
        d,
        "layers/top.qcow2",
        &["write -P 0x03 3M 64k", "write -P 0x04 12M 1M"],
    );
    roundtrip(d, "layers/top.qcow2", "layers/top.qcow2");
    let m = manifest(&d.join("out-qcow2"));
    let files = m["DiskDeviceMappings"][0]["Source"]["FilesRead"]
        .as_array()
        .unwrap()
        .clone();
    let names: Vec<_> = files
        .iter()
        .map(|f| {
            f["Path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["top.qcow2", "mid.qcow2", "base.qcow2"]);
}

#[test]
fn a_raw_backing_file() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "16M"]);
    qemu_io(d, "base.raw", &["write -P 0x55 0 16M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    qemu_io(d, "top.qcow2", &["write -P 0x66 4M 1M"]);
    roundtrip(d, "top.qcow2", "top.qcow2");
}

#[test]
fn an_overlay_larger_than_its_backing() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(d, "base.qcow2", &["write -P 0x71 0 4M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "16M",
        ],
    );
    qemu_io(d, "top.qcow2", &["write -P 0x72 10M 64k"]);
    roundtrip(d, "top.qcow2", "top.qcow2");
}

#[test]
fn an_internal_snapshot_reads_the_old_data() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "v.qcow2", "16M"]);
    qemu_io(d, "v.qcow2", &["write -P 0x01 0 4M"]);
    qemu_img(d, &["snapshot", "-c", "before", "v.qcow2"]);
    qemu_io(
        d,
        "v.qcow2",
        &["write -P 0x02 1M 1M", "write -P 0x03 8M 1M"],
    );
    qemu_img(
        d,
        &[
            "convert",
            "-l",
            "snapshot.name=before",
            "-O",
            "raw",
            "v.qcow2",
            "before.raw",
        ],
    );
    roundtrip(d, "v.qcow2@before", "before.raw");
    // By ID, too; the current state differs from the snapshot.
    let list = qemu_img(d, &["snapshot", "-l", "v.qcow2"]);
    assert!(list.contains("before"), "{list}");
    kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "v.qcow2@1",
            "--name",
            "img-v",
            "--output-dir",
            "by-id",
        ],
    )
    .ok();
    assert_same(d, "before.raw", "by-id/xvda.qcow2");
    kiln_in(
        d,
        &[
            "create",
            "--snapshot",
            "v.qcow2",
            "--name",
            "img-v",
            "--output-dir",
            "now",
        ],
    )
    .ok();
    assert_same(d, "v.qcow2", "now/xvda.qcow2");
    let r = tool_in(d, "qemu-img", &["compare", "before.raw", "now/xvda.qcow2"]);
    assert_eq!(
        r.status, 1,
        "the snapshot and the current state should differ"
    );
}

#[test]
fn an_encrypted_image_without_its_key_is_refused() {
    let t = tmp();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "enc.qcow2",
            "4M",
        ],
    );
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--snapshot",
            "enc.qcow2",
            "--name",
            "img-e",
            "--output-dir",
            "out",
        ],
    );
    assert_eq!(r.status, 2);
    assert_eq!(r.code(), "MissingParameter");
    assert!(r.stdout.contains("encrypted (LUKS)"), "{}", r.stdout);
    assert!(r.stdout.contains("key-file"), "{}", r.stdout);
    assert!(!d.join("out").exists());
}
