//! `kiln convert`: qemu-img's option names, the same engine; outputs checked with qemu-img.

use crate::common::*;

fn source(d: &std::path::Path) {
    let p = d.join("src.raw");
    sparse_raw(&p, 24 << 20);
    write_at(&p, 0, &vec![0x10u8; 1 << 20]);
    write_at(
        &p,
        5 << 20,
        &(0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<_>>(),
    );
    write_at(&p, 12 << 20, &vec![0u8; 1 << 20]);
    write_at(&p, (24 << 20) - 512, &[0xeeu8; 512]);
}

#[test]
fn raw_and_qcow2_both_ways() {
    let t = tmp();
    let d = t.path();
    source(d);
    kiln_in(d, &["convert", "-O", "qcow2", "src.raw", "a.qcow2"]).ok();
    assert_clean(d, "a.qcow2");
    assert_same(d, "src.raw", "a.qcow2");
    kiln_in(
        d,
        &[
            "convert", "-f", "qcow2", "-O", "raw", "-j", "2", "a.qcow2", "b.raw",
        ],
    )
    .ok();
    assert_same(d, "src.raw", "b.raw");
    assert_eq!(std::fs::metadata(d.join("b.raw")).unwrap().len(), 24 << 20);
    assert!(allocated(&d.join("b.raw")) < 6 << 20);
    kiln_in(d, &["convert", "-O", "qcow2", "a.qcow2", "c.qcow2"]).ok();
    assert_same(d, "src.raw", "c.qcow2");
    // An existing destination is replaced, as with qemu-img.
    kiln_in(d, &["convert", "-O", "raw", "src.raw", "b.raw"]).ok();
    assert_same(d, "src.raw", "b.raw");
    let r = kiln_in(
        d,
        &["convert", "--sha256", "-O", "qcow2", "src.raw", "s.qcow2"],
    )
    .ok();
    assert_eq!(
        r.stdout.split_whitespace().next().unwrap(),
        sha256_file(&d.join("s.qcow2"))
    );
}

#[test]
fn compressed_output_zlib_and_zstd() {
    let t = tmp();
    let d = t.path();
    source(d);
    for (args, ct) in [(vec!["-c"], "zlib"), (vec!["-c", "zstd"], "zstd")] {
        let out = format!("{ct}.qcow2");
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend(args);
        a.extend(["src.raw", out.as_str()]);
        kiln_in(d, &a).ok();
        assert_clean(d, &out);
        assert_same(d, "src.raw", &out);
        assert_eq!(
            info(d, &out)["format-specific"]["data"]["compression-type"],
            ct
        );
        let map = qemu_img(d, &["map", "--output=json", &out]);
        assert!(map.contains("\"compressed\": true"), "{map}");
    }
    // create --compress too.
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "img-c",
            "--snapshot",
            "src.raw",
            "--compress",
            "zstd",
            "--output-dir",
            "img",
        ],
    )
    .ok();
    assert_clean(d, "img/xvda.qcow2");
    assert_same(d, "src.raw", "img/xvda.qcow2");
    assert_sums(&d.join("img"));
}

#[test]
fn bad_arguments_are_refused() {
    let t = tmp();
    let d = t.path();
    source(d);
    let r = kiln_in(
        d,
        &["--json", "convert", "-O", "raw", "-c", "src.raw", "x.raw"],
    );
    assert_eq!(r.status, 2);
    assert_eq!(r.code(), "InvalidParameter");
    let r = kiln_in(d, &["--json", "convert", "missing.raw", "x.raw"]);
    assert_eq!(r.code(), "InvalidSnapshotId.NotFound");
    assert!(!d.join("x.raw").exists());
}
