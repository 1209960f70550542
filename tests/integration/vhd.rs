//! VHD (qemu's `vpc`) through the real binary, with qemu-img as the oracle: kiln's fixed and
//! dynamic output from every kind of source, qemu-img's VHDs (and hand-made differencing disks,
//! which qemu-img cannot create) as input, and malformed VHDs (one field changed each).
//!
//! `qemu-img check` does not check vpc images ("This image format does not support checks"), so
//! outputs are checked with `qemu-img info` and `qemu-img compare`, and their footers byte by byte.

use std::fs;
use std::path::Path;

use crate::common::{self, kiln_in, qcow2_overlay, qemu_img, qemu_io, qemu_io_f, MIB};
use crate::malformed::{assert_refused, get32 as be32, get64 as be64, put32, put64, FieldCase};

const FOOTER: usize = 512;

/// The VHD checksum of `b` with the 4-byte field at `field` counted as zero.
fn checksum(b: &[u8], field: usize) -> u32 {
    let mut c = b.to_vec();
    c[field..field + 4].fill(0);
    !c.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)))
}

/// True when the footer's stored checksum is right.
fn footer_ok(f: &[u8]) -> bool {
    be32(f, 64) == checksum(f, 64)
}

/// Applies `f` to the footer (both copies of a dynamic disk) and fixes the checksums.
fn patch_footer(b: &mut [u8], f: impl Fn(&mut [u8])) {
    let n = b.len();
    let dynamic = b.starts_with(b"conectix");
    for at in [n - FOOTER].into_iter().chain(dynamic.then_some(0)) {
        let s = &mut b[at..at + FOOTER];
        f(s);
        let c = checksum(s, 64);
        put32(s, 64, c);
    }
}

/// Applies `f` to the dynamic disk header and fixes its checksum.
fn patch_header(b: &mut [u8], f: impl Fn(&mut [u8])) {
    let at = be64(b, 16) as usize;
    let s = &mut b[at..at + 1024];
    f(s);
    let c = checksum(s, 36);
    put32(s, 36, c);
}

/// `qemu-img create -f vpc -o OPTS NAME SIZE`.
fn qemu_vhd(dir: &Path, opts: &str, name: &str, size: &str) {
    qemu_img(dir, &["create", "-q", "-f", "vpc", "-o", opts, name, size]);
}

fn info_vpc(dir: &Path, file: &str) -> serde_json::Value {
    serde_json::from_str(&qemu_img(
        dir,
        &["info", "-f", "vpc", "--output=json", file],
    ))
    .unwrap()
}

/// `qemu-img compare` of a source against a VHD read as vpc.
fn assert_same_vpc(dir: &Path, src: &str, vhd: &str) {
    let r = common::tool_in(dir, "qemu-img", &["compare", "-F", "vpc", src, vhd]);
    assert_eq!(r.status, 0, "compare {src} {vhd}: {}{}", r.stdout, r.stderr);
}

/// Checks a kiln VHD: qemu-img reads exactly `size` bytes equal to `src`; a fixed file is 512
/// bytes larger; the footer is valid and has qemu's `force_size` geometry for that size.
pub(crate) fn check_output(dir: &Path, src: &str, vhd: &str, size: u64, fixed: bool) {
    assert_same_vpc(dir, src, vhd);
    assert_eq!(info_vpc(dir, vhd)["virtual-size"].as_u64(), Some(size));
    let b = fs::read(dir.join(vhd)).unwrap();
    if fixed {
        assert_eq!(b.len() as u64, size + FOOTER as u64, "{vhd}");
    } else {
        assert_eq!(
            b[..FOOTER],
            b[b.len() - FOOTER..],
            "{vhd}: footer copies differ"
        );
        let h = be64(&b, 16) as usize;
        assert_eq!(be32(&b[h..], 36), checksum(&b[h..h + 1024], 36));
    }
    let f = &b[b.len() - FOOTER..];
    assert!(footer_ok(f), "{vhd}: footer checksum");
    let q = format!("q-{size}-{fixed}.vhd");
    let sub = if fixed { "fixed" } else { "dynamic" };
    let opts = format!("subformat={sub},force_size=on");
    qemu_vhd(dir, &opts, &q, &size.to_string());
    let qb = fs::read(dir.join(&q)).unwrap();
    let qf = &qb[qb.len() - FOOTER..];
    assert!(footer_ok(qf));
    // Geometry, sizes, disk type and data offset as qemu-img writes them.
    for (what, r) in [
        ("data_offset", 16..24),
        ("sizes", 40..56),
        ("geometry", 56..60),
        ("disk_type", 60..64),
    ] {
        assert_eq!(f[r.clone()], qf[r], "{vhd}: {what} differs from qemu-img's");
    }
}

/// raw, qcow2 chain, sparse and grown sources, each to fixed and dynamic VHD.
#[test]
fn output_from_every_kind_of_source_matches_qemu() {
    let t = common::tmp();
    let d = t.path();
    // raw: data, a hole, data at the odd-sized end.
    common::sparse_raw(&d.join("r.raw"), 48 * MIB + 3 * 512);
    common::write_at(&d.join("r.raw"), 0, &common::noise(1, 3 * MIB as usize));
    common::write_at(&d.join("r.raw"), 48 * MIB, &common::noise(2, 1536));
    // qcow2 chain.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 8M", "write -P 0x12 30M 1M"],
    );
    qcow2_overlay(d, "base.qcow2", "top.qcow2");
    qemu_io(d, "top.qcow2", &["write -P 0x21 1M 2M", "write -z 4M 1M"]);
    // sparse: 1 GiB with 2 small pieces.
    common::sparse_raw(&d.join("s.raw"), 1 << 30);
    common::write_at(&d.join("s.raw"), 700 * MIB + 4096, b"kiln");
    common::write_at(&d.join("s.raw"), (1 << 30) - 512, &[7; 512]);

    for (sub, fixed) in [("fixed", true), ("dynamic", false)] {
        let o = format!("subformat={sub}");
        for (src, size) in [
            ("r.raw", 48 * MIB + 1536),
            ("top.qcow2", 64 * MIB),
            ("s.raw", 1 << 30),
        ] {
            let out = format!("{src}.{sub}.vhd");
            kiln_in(d, &["convert", "-O", "vhd", "-o", &o, src, &out]).ok();
            check_output(d, src, &out, size, fixed);
            // kiln reads its own output back.
            let back = format!("{out}.raw");
            kiln_in(d, &["convert", &out, &back]).ok();
            common::assert_same(d, src, &back);
        }
        // The sparse disk stays sparse on disk.
        let alloc = common::allocated(&d.join(format!("s.raw.{sub}.vhd")));
        assert!(alloc < 8 * MIB, "{sub}: {alloc} bytes allocated");
        // A grown disk, through create.
        let dir = d.join(format!("img-{sub}"));
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "vhd-test",
                "--format",
                "vhd",
                "--output-options",
                &o,
                "--disk",
                "snapshot=top.qcow2,size=100M,type=system",
                "--output-dir",
                &common::path_str(&dir),
                "-q",
            ],
        )
        .ok();
        common::assert_sums(&dir);
        let grown = format!("img-{sub}/xvda.vhd");
        check_output(d, "top.qcow2", &grown, 100 * MIB, fixed);
        kiln_in(d, &["verify", &common::path_str(&dir)]).ok();
    }
}

#[test]
fn output_is_the_same_whatever_the_thread_count() {
    let t = common::tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "96M"]);
    qemu_io(
        d,
        "a.qcow2",
        &[
            "write -P 0x5 0 9M",
            "write -P 0x6 20M 5M",
            "write -P 0x7 90M 6M",
        ],
    );
    for sub in ["fixed", "dynamic"] {
        let o = format!("subformat={sub}");
        let mut sums = Vec::new();
        for j in ["1", "3"] {
            fs::create_dir_all(d.join(j)).unwrap();
            let out = format!("{j}/{sub}.vhd");
            kiln_in(
                d,
                &["convert", "-j", j, "-O", "vhd", "-o", &o, "a.qcow2", &out],
            )
            .ok();
            sums.push(common::sha256_file(&d.join(out)));
        }
        assert_eq!(sums[0], sums[1], "{sub}");
    }
    // Options are checked.
    let r = kiln_in(
        d,
        &[
            "convert",
            "--json",
            "-O",
            "vhd",
            "-o",
            "subformat=sparse",
            "a.qcow2",
            "x.vhd",
        ],
    );
    assert_eq!(r.code(), "InvalidParameter", "{}", r.stdout);
}

/// Every VHD qemu-img writes reads as `qemu-img convert -O raw` reads it.
#[test]
fn every_qemu_variant_reads_like_qemu() {
    let t = common::tmp();
    let d = t.path();
    // Sizes that CHS geometry rounds (qemu then sizes by geometry) and exact ones (force_size).
    for (name, opts, size) in [
        ("fixed.vhd", "subformat=fixed", "100M"),
        ("fixed-exact.vhd", "subformat=fixed,force_size=on", "64M"),
        ("dyn.vhd", "subformat=dynamic", "100M"),
        (
            "dyn-exact.vhd",
            "subformat=dynamic,force_size=on",
            "67109376",
        ),
    ] {
        qemu_vhd(d, opts, name, size);
        qemu_io_f(
            d,
            "vpc",
            name,
            &[
                "write -P 0x41 0 3M",
                "write -P 0x42 5M 512",
                "write -P 0x43 60M 2M",
            ],
        );
        let v = common::assert_reads_like_qemu(d, "vpc", name);
        assert_eq!(v["format"], "vhd", "{name}");
        assert_eq!(
            v["virtual-size"].as_u64(),
            info_vpc(d, name)["virtual-size"].as_u64()
        );
    }
}

/// Turns the dynamic VHD `b` into a differencing disk of `parent` (a W2ru locator, stored before
/// the end footer) with parent UUID `uuid`.
fn make_differencing(b: &mut Vec<u8>, parent: &str, uuid: &[u8]) {
    let footer = b.split_off(b.len() - FOOTER);
    let at = b.len() as u64;
    let name: Vec<u8> = parent.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let len = name.len() as u32;
    b.extend_from_slice(&name);
    b.resize(b.len().next_multiple_of(512), 0);
    b.extend_from_slice(&footer);
    patch_footer(b, |f| put32(f, 60, 4));
    patch_header(b, |h| {
        h[40..56].copy_from_slice(uuid);
        h[576..580].copy_from_slice(b"W2ru");
        put32(h, 580, 1);
        put32(h, 584, len);
        put64(h, 592, at);
    });
}

/// What a differencing disk reads as: `child` where its bitmaps say so, `parent` elsewhere.
fn compose(vhd: &[u8], child: &[u8], parent: &[u8]) -> Vec<u8> {
    let h = be64(vhd, 16) as usize;
    let (bat, entries, bs) = (
        be64(vhd, h + 16) as usize,
        be32(vhd, h + 28) as usize,
        be32(vhd, h + 32) as usize,
    );
    let mut out = parent.to_vec();
    out.resize(child.len(), 0);
    for i in 0..entries {
        let e = be32(vhd, bat + 4 * i);
        if e == u32::MAX {
            continue;
        }
        let bitmap = &vhd[e as usize * 512..];
        for s in 0..bs / 512 {
            let at = i * bs + s * 512;
            if at < child.len() && bitmap[s / 8] >> (7 - s % 8) & 1 == 1 {
                out[at..at + 512].copy_from_slice(&child[at..at + 512]);
            }
        }
    }
    out
}

/// Differencing chains: a VHD parent (UUID checked) and a qcow2 parent, bitmaps honoured.
#[test]
fn differencing_disks_read_through_their_parents() {
    let t = common::tmp();
    let d = t.path();
    let exact = "subformat=dynamic,force_size=on";
    qemu_vhd(d, exact, "parent.vhd", "64M");
    qemu_io_f(
        d,
        "vpc",
        "parent.vhd",
        &["write -P 0x11 0 8M", "write -P 0x12 40M 1M"],
    );
    qemu_img(d, &["create", "-q", "-f", "qcow2", "parent.qcow2", "64M"]);
    qemu_io(d, "parent.qcow2", &["write -P 0x13 0 8M"]);
    qemu_vhd(d, exact, "child.vhd", "64M");
    qemu_io_f(
        d,
        "vpc",
        "child.vhd",
        &["write -P 0x22 1M 2M", "write -P 0x33 20M 1M"],
    );
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            "child.vhd",
            "child.raw",
        ],
    );
    let child_raw = fs::read(d.join("child.raw")).unwrap();
    let mut child = fs::read(d.join("child.vhd")).unwrap();
    // Sectors 0..4 and 2048..2056 of block 0 come from the parent.
    let h = be64(&child, 16) as usize;
    let e0 = be32(&child, be64(&child, h + 16) as usize) as usize * 512;
    child[e0] = 0x0f;
    child[e0 + 256] = 0x00;
    let puuid = fs::read(d.join("parent.vhd")).unwrap()[68..84].to_vec();

    for (parent, uuid) in [("parent.vhd", puuid.clone()), ("parent.qcow2", vec![0; 16])] {
        let mut b = child.clone();
        make_differencing(&mut b, parent, &uuid);
        let file = format!("diff-{parent}.vhd");
        fs::write(d.join(&file), &b).unwrap();
        let praw = format!("{parent}.raw");
        qemu_img(d, &["convert", "-O", "raw", parent, &praw]);
        let want = compose(&b, &child_raw, &fs::read(d.join(&praw)).unwrap());
        let got = format!("{file}.raw");
        kiln_in(d, &["convert", &file, &got]).ok();
        assert!(fs::read(d.join(&got)).unwrap() == want, "{file}");
        let r = kiln_in(d, &["inspect", "--json", &file]).ok();
        assert!(r.stdout.contains(parent), "{}", r.stdout);
        // Through an image of its own too.
        let o = common::path_str(&d.join(format!("img-{parent}")));
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "diff",
                "--disk",
                &format!("snapshot={file},type=system"),
                "--output-dir",
                &o,
                "-q",
            ],
        )
        .ok();
        common::assert_same(d, &got, &format!("img-{parent}/xvda.qcow2"));
    }

    // A parent outside the child's tree is refused by the gate.
    fs::create_dir(d.join("sub")).unwrap();
    let mut b = child.clone();
    make_differencing(&mut b, "../parent.vhd", &puuid);
    fs::write(d.join("sub/diff.vhd"), &b).unwrap();
    let r = kiln_in(d, &["inspect", "--json", "sub/diff.vhd"]);
    assert_eq!(r.code(), "InvalidSnapshot.BackingDenied", "{}", r.stdout);
    // A child that names itself is a loop.
    let mut b = child.clone();
    make_differencing(&mut b, "self.vhd", &puuid);
    fs::write(d.join("self.vhd"), &b).unwrap();
    let r = kiln_in(d, &["inspect", "--json", "self.vhd"]);
    assert_eq!(r.code(), "InvalidSnapshot.Corrupt", "{}", r.stdout);
    assert!(r.stdout.contains("loop"), "{}", r.stdout);
}

const CORRUPT: &str = "InvalidSnapshot.Corrupt";
const UNSUPPORTED: &str = "InvalidSnapshot.Unsupported";

fn cases() -> Vec<FieldCase> {
    fn c(
        name: &'static str,
        base: &'static str,
        code: &'static str,
        field: &'static str,
        patch: fn(&mut Vec<u8>),
    ) -> FieldCase {
        FieldCase {
            name,
            base,
            patch,
            code,
            field,
        }
    }
    vec![
        c("fixed-checksum", "fixed.vhd", CORRUPT, "checksum", |b| {
            let n = b.len();
            b[n - FOOTER + 64] ^= 1;
        }),
        c("fixed-type", "fixed.vhd", UNSUPPORTED, "disk_type", |b| {
            patch_footer(b, |f| put32(f, 60, 5))
        }),
        c(
            "fixed-version",
            "fixed.vhd",
            UNSUPPORTED,
            "file_format_version",
            |b| patch_footer(b, |f| put32(f, 12, 0x0002_0000)),
        ),
        c(
            "fixed-data-offset",
            "fixed.vhd",
            CORRUPT,
            "data_offset",
            |b| patch_footer(b, |f| put64(f, 16, 512)),
        ),
        c(
            "fixed-odd-size",
            "fixed.vhd",
            CORRUPT,
            "current_size",
            |b| patch_footer(b, |f| put64(f, 48, 64 * MIB + 1)),
        ),
        c(
            "fixed-size-past-data",
            "fixed.vhd",
            CORRUPT,
            "current_size",
            |b| patch_footer(b, |f| put64(f, 48, 65 * MIB)),
        ),
        c(
            "fixed-too-large",
            "fixed.vhd",
            UNSUPPORTED,
            "2040 GiB",
            |b| patch_footer(b, |f| put64(f, 48, 4 << 40)),
        ),
        c("dyn-footer-checksum", "dyn.vhd", CORRUPT, "checksum", |b| {
            b[64] ^= 1
        }),
        c("dyn-data-offset", "dyn.vhd", CORRUPT, "data_offset", |b| {
            patch_footer(b, |f| put64(f, 16, 1 << 40))
        }),
        c("dyn-missing-copy", "dyn.vhd", CORRUPT, "footer copy", |b| {
            b[0] = b'X'
        }),
        c("header-cookie", "dyn.vhd", CORRUPT, "cookie", |b| {
            patch_header(b, |h| h[0] = b'X')
        }),
        c(
            "header-checksum",
            "dyn.vhd",
            CORRUPT,
            "dynamic disk header at offset 512: checksum",
            |b| b[512 + 40] ^= 1,
        ),
        c(
            "header-version",
            "dyn.vhd",
            UNSUPPORTED,
            "dynamic disk header version",
            |b| patch_header(b, |h| put32(h, 24, 0x0002_0000)),
        ),
        c(
            "block-size-not-power",
            "dyn.vhd",
            CORRUPT,
            "block_size",
            |b| patch_header(b, |h| put32(h, 32, 3 << 20)),
        ),
        c("block-size-huge", "dyn.vhd", CORRUPT, "block_size", |b| {
            patch_header(b, |h| put32(h, 32, 1 << 31))
        }),
        c(
            "table-too-small",
            "dyn.vhd",
            CORRUPT,
            "max_table_entries",
            |b| patch_header(b, |h| put32(h, 28, 3)),
        ),
        c("table-huge", "dyn.vhd", CORRUPT, "max_table_entries", |b| {
            patch_header(b, |h| put32(h, 28, u32::MAX))
        }),
        c("table-offset", "dyn.vhd", CORRUPT, "table_offset", |b| {
            patch_header(b, |h| put64(h, 16, 1 << 40))
        }),
        c("bat-entry", "dyn.vhd", CORRUPT, "BAT entry 0", |b| {
            let h = be64(b, 16) as usize;
            let bat = be64(b, h + 16) as usize;
            put32(b, bat, 0x00ff_0000);
        }),
        c(
            "diff-no-locator",
            "dyn.vhd",
            CORRUPT,
            "parent locator",
            |b| patch_footer(b, |f| put32(f, 60, 4)),
        ),
        c("locator-length", "diff.vhd", CORRUPT, "data_length", |b| {
            patch_header(b, |h| put32(h, 584, 1 << 20))
        }),
        c("locator-offset", "diff.vhd", CORRUPT, "data_offset", |b| {
            patch_header(b, |h| put64(h, 592, 1 << 40))
        }),
        c("parent-uuid", "diff.vhd", CORRUPT, "parent_uuid", |b| {
            patch_header(b, |h| h[40] ^= 0xff)
        }),
    ]
}

/// Malformed VHDs (one field of a valid one changed each) are refused, naming the field, within
/// the time and memory limits of the qcow2 cases.
#[test]
fn malformed_vhds_are_refused_naming_the_field() {
    let t = common::tmp();
    let d = t.path();
    let exact = "force_size=on,subformat=";
    qemu_vhd(d, &format!("{exact}fixed"), "fixed.vhd", "64M");
    qemu_vhd(d, &format!("{exact}dynamic"), "dyn.vhd", "64M");
    qemu_io_f(
        d,
        "vpc",
        "dyn.vhd",
        &["write -P 0x1 0 1M", "write -P 0x2 9M 1M"],
    );
    qemu_io_f(d, "vpc", "fixed.vhd", &["write -P 0x1 0 1M"]);
    fs::copy(d.join("dyn.vhd"), d.join("parent.vhd")).unwrap();
    let mut b = fs::read(d.join("dyn.vhd")).unwrap();
    let uuid = b[68..84].to_vec();
    make_differencing(&mut b, "parent.vhd", &uuid);
    fs::write(d.join("diff.vhd"), &b).unwrap();
    assert_refused(d, "vhd", &["fixed.vhd", "dyn.vhd", "diff.vhd"], &cases());
}

/// A fixed disk whose guest data starts with `conectix` (but no valid footer) is still read by its
/// own footer at the end.
#[test]
fn a_fixed_disk_whose_data_starts_like_a_vhd_reads_as_fixed() {
    let t = common::tmp();
    let d = t.path();
    common::sparse_raw(&d.join("r.raw"), MIB);
    common::write_at(&d.join("r.raw"), 0, b"conectix\0\0\0\x02 not a footer");
    kiln_in(d, &["convert", "-O", "vhd", "-f", "raw", "r.raw", "f.vhd"]).ok();
    kiln_in(d, &["convert", "f.vhd", "back.raw"]).ok();
    assert!(fs::read(d.join("back.raw")).unwrap() == fs::read(d.join("r.raw")).unwrap());
}

/// `kiln check` reads a VHD (fixed and dynamic) as it reads the qcow2 it came from.
#[test]
fn check_reads_vhds_like_their_source() {
    let t = common::tmp();
    let d = t.path();
    let sys =
        common::path_str(&Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/system.qcow2"));
    let want = kiln_in(d, &["check", "--json", &sys]).ok().stdout;
    for sub in ["fixed", "dynamic"] {
        let out = format!("{sub}.vhd");
        let o = format!("subformat={sub}");
        kiln_in(d, &["convert", "-O", "vhd", "-o", &o, &sys, &out]).ok();
        assert_eq!(
            kiln_in(d, &["check", "--json", &out]).ok().stdout,
            want,
            "{sub}"
        );
    }
}
