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
    // Options may come between `-c zstd` and the files, as with any other option.
    for (args, ct) in [
        (vec!["-c"], "zlib"),
        (vec!["-c", "zstd"], "zstd"),
        (vec!["-c", "zstd", "-j", "3"], "zstd"),
    ] {
        let out = format!("{ct}-{}.qcow2", args.len());
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

/// qemu-img's cache modes (`-t`): `unsafe` (never flushed) and `none` (O_DIRECT) outputs equal
/// their source and pass `qemu-img check`, raw and qcow2 both ways, also where writes cannot all be
/// aligned: a disk whose last 4 KiB block is short, and 512-byte qcow2 clusters.
#[test]
fn cache_modes_unsafe_and_none_give_the_same_disks() {
    let t = tmp();
    let d = t.path();
    source(d);
    // Not a multiple of 4 KiB: the last block is 1536 bytes, with data in it.
    let odd = d.join("odd.raw");
    sparse_raw(&odd, (8 << 20) + 1536);
    write_at(&odd, 4096, &noise(3, 3 << 20));
    write_at(&odd, 8 << 20, &[0x77u8; 1536]);
    for mode in ["unsafe", "none"] {
        for src in ["src.raw", "odd.raw"] {
            let q = format!("{mode}-{src}.qcow2");
            let r = format!("{mode}-{src}.raw");
            kiln_in(d, &["convert", "-t", mode, "-O", "qcow2", src, &q]).ok();
            assert_clean(d, &q);
            assert_same(d, src, &q);
            kiln_in(d, &["convert", "-t", mode, "-O", "raw", &q, &r]).ok();
            assert_same(d, src, &r);
            assert_eq!(
                std::fs::metadata(d.join(&r)).unwrap().len(),
                std::fs::metadata(d.join(src)).unwrap().len()
            );
            let small = format!("{mode}-{src}-512.qcow2");
            let a = [
                "convert",
                "-t",
                mode,
                "-O",
                "qcow2",
                "--cluster-size",
                "512",
            ];
            kiln_in(d, &[&a[..], &[src, small.as_str()]].concat()).ok();
            assert_clean(d, &small);
            assert_same(d, src, &small);
        }
    }
    // The default is writeback, and every mode writes the same bytes.
    kiln_in(d, &["convert", "-O", "qcow2", "src.raw", "wb.qcow2"]).ok();
    let wb = sha256_file(&d.join("wb.qcow2"));
    assert_eq!(sha256_file(&d.join("none-src.raw.qcow2")), wb);
    assert_eq!(sha256_file(&d.join("unsafe-src.raw.qcow2")), wb);
}

/// `-t none` cannot write compressed clusters (packed byte by byte, never aligned blocks), and a
/// store create always flushes: both are refused before anything is written.
#[test]
fn cache_modes_that_cannot_hold_are_refused() {
    let t = tmp();
    let d = t.path();
    source(d);
    let r = kiln_in(
        d,
        &[
            "--json", "convert", "-t", "none", "-O", "qcow2", "-c", "src.raw", "x.qcow2",
        ],
    );
    assert_eq!(r.code(), "InvalidParameter");
    assert!(r.stdout.contains("-t none"), "{}", r.stdout);
    assert!(!d.join("x.qcow2").exists());
    let store = d.join("store");
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            store.to_str().unwrap(),
            "create",
            "--name",
            "store-img",
            "--snapshot",
            "src.raw",
            "-t",
            "unsafe",
        ],
    );
    assert_eq!(r.code(), "InvalidParameter");
    assert!(r.stdout.contains("--output-dir"), "{}", r.stdout);
    // An exported create takes every mode, and its sums still check.
    for mode in ["unsafe", "none"] {
        let dir = format!("img-{mode}");
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "cache-img",
                "--disk",
                "snapshot=src.raw,type=system",
                "--disk",
                "size=64M",
                "-t",
                mode,
                "--output-dir",
                &dir,
            ],
        )
        .ok();
        assert_clean(d, &format!("{dir}/xvda.qcow2"));
        assert_same(d, "src.raw", &format!("{dir}/xvda.qcow2"));
        assert_sums(&d.join(&dir));
    }
}
