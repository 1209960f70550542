//! VMDK in and out: kiln's streamOptimized and monolithicSparse outputs checked with `qemu-img`
//! (check, compare, info), every VMDK variant qemu-img writes read back like `qemu-img convert -O
//! raw`, byte-identical output whatever `-j`, extent files through the backing gate, and malformed
//! files (one field changed each) refused naming the field.

use std::fs;
use std::path::Path;

use crate::common::*;

const SUBFORMATS: [&str; 2] = ["streamOptimized", "monolithicSparse"];

/// `qemu-img` with a command line split at spaces, which must succeed.
fn q(d: &Path, cmd: &str) -> String {
    qemu_img(d, &cmd.split_whitespace().collect::<Vec<_>>())
}

/// `kiln` with a command line split at spaces.
fn k(d: &Path, cmd: &str) -> Run {
    kiln_in(d, &cmd.split_whitespace().collect::<Vec<_>>())
}

/// A 24 MiB raw disk: a run of one byte, pseudo-random data, a zero-filled MiB, a last sector.
fn source(d: &Path) {
    let p = d.join("src.raw");
    sparse_raw(&p, 24 * MIB);
    write_at(&p, 0, &vec![0x10u8; MIB as usize]);
    write_at(&p, 5 * MIB, &noise(7, 3_000_000));
    write_at(&p, 12 * MIB, &vec![0u8; MIB as usize]);
    write_at(&p, 24 * MIB - 512, &[0xeeu8; 512]);
}

/// `base.qcow2` (the raw source's bytes) under `top.qcow2`, which changes a few ranges.
fn qcow2_chain(d: &Path) {
    q(d, "convert -O qcow2 src.raw base.qcow2");
    q(d, "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0x77 64k 200k",
            "write -z 5M 64k",
            "write -P 0x99 20M 1M",
        ],
    );
}

fn check_vmdk(d: &Path, file: &str, source: &str, size: u64, sub: &str) {
    assert_clean(d, file);
    assert_same(d, source, file);
    let i = info(d, file);
    assert_eq!(i["format"], "vmdk", "{i}");
    assert_eq!(i["virtual-size"].as_u64(), Some(size), "{i}");
    assert_eq!(i["format-specific"]["data"]["create-type"], sub, "{i}");
}

#[test]
fn outputs_pass_qemu_check_and_compare_from_every_kind_of_source() {
    let t = tmp();
    let d = t.path();
    source(d);
    qcow2_chain(d);
    // A sparse disk: 64 MiB with two small islands of data.
    let sp = d.join("sparse.raw");
    sparse_raw(&sp, 64 * MIB);
    write_at(&sp, 3 * MIB + 4096, b"island");
    write_at(&sp, 60 * MIB, &noise(3, 70_000));
    for sub in SUBFORMATS {
        let opt = format!("subformat={sub}");
        for (src, size) in [
            ("src.raw", 24 * MIB),
            ("top.qcow2", 24 * MIB),
            ("sparse.raw", 64 * MIB),
        ] {
            let out = format!("{src}.{sub}.vmdk");
            k(d, &format!("convert -O vmdk -o {opt} {src} {out}")).ok();
            check_vmdk(d, &out, src, size, sub);
        }
        // A grown disk through create: the source's 24 MiB, then zeros up to 40 MiB.
        let dir = format!("img-{sub}");
        k(
            d,
            &format!("create --name vm --format vmdk --output-options {opt} --disk snapshot=src.raw,size=40M,type=system --output-dir {dir} -q"),
        )
        .ok();
        let disk = format!("{dir}/xvda.vmdk");
        check_vmdk(d, &disk, "src.raw", 40 * MIB, sub);
        assert_sums(&d.join(&dir));
        k(d, &format!("verify {dir}")).ok();
    }
    // Only the non-zero grains are stored: the sparse disk's streamOptimized file is small.
    let n = fs::metadata(d.join("sparse.raw.streamOptimized.vmdk"))
        .unwrap()
        .len();
    assert!(n < 200_000, "{n} bytes");
}

#[test]
fn stream_optimized_says_what_esxi_needs() {
    let t = tmp();
    let d = t.path();
    source(d);
    k(d, "convert -O vmdk src.raw s.vmdk").ok();
    let b = fs::read(d.join("s.vmdk")).unwrap();
    assert_eq!(&b[0..4], b"KDMV");
    // Sparse header version 3, flags: newline test, compressed grains, markers.
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x30001);
    assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), u64::MAX);
    let desc = String::from_utf8_lossy(&b[512..512 * 21]);
    for line in [
        "# Disk DescriptorFile",
        "version=1",
        "createType=\"streamOptimized\"",
        "RW 49152 SPARSE \"s.vmdk\"",
        "ddb.toolsVersion = \"",
        "ddb.virtualHWVersion = \"",
        "ddb.adapterType = \"lsilogic\"",
        "ddb.geometry.sectors = \"63\"",
    ] {
        assert!(desc.contains(line), "{line} missing from\n{desc}");
    }
    // The footer (a copy of the header with the grain directory's place) and end-of-stream marker.
    let n = b.len();
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV");
    assert_ne!(
        u64::from_le_bytes(b[n - 1024 + 56..n - 1024 + 64].try_into().unwrap()),
        u64::MAX
    );
    assert!(b[n - 512..].iter().all(|&x| x == 0));
    let i = info(d, "s.vmdk");
    assert_eq!(
        i["format-specific"]["data"]["extents"][0]["compressed"], true,
        "{i}"
    );
    k(d, "inspect s.vmdk").ok();
}

#[test]
fn output_is_the_same_whatever_j() {
    let t = tmp();
    let d = t.path();
    source(d);
    qcow2_chain(d);
    for sub in SUBFORMATS {
        let opt = format!("subformat={sub}");
        let mut sums = Vec::new();
        for j in ["1", "3"] {
            // The same output name: the descriptor names the file.
            fs::create_dir_all(d.join(format!("j{j}-{sub}"))).unwrap();
            let out = format!("j{j}-{sub}/out.vmdk");
            k(
                d,
                &format!("convert -O vmdk -o {opt} -j {j} top.qcow2 {out}"),
            )
            .ok();
            sums.push(sha256_file(&d.join(&out)));
        }
        assert_eq!(sums[0], sums[1], "{sub}");
    }
}

/// kiln reads `file` like `qemu-img convert -O raw` does, and inspects it.
fn reads_like_qemu(d: &Path, file: &str) {
    q(d, &format!("convert -O raw {file} q.raw"));
    k(d, &format!("convert -O raw {file} k.raw")).ok();
    assert!(
        fs::read(d.join("q.raw")).unwrap() == fs::read(d.join("k.raw")).unwrap(),
        "{file}"
    );
    let r = k(d, &format!("inspect --json --map {file}")).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["format"], "vmdk", "{file}: {v}");
    assert_eq!(v["virtual-size"].as_u64(), Some(virtual_size(d, file)));
}

#[test]
fn every_variant_qemu_writes_reads_like_qemu() {
    let t = tmp();
    let d = t.path();
    source(d);
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let f = format!("q-{sub}.vmdk");
        q(
            d,
            &format!("convert -O vmdk -o subformat={sub} src.raw {f}"),
        );
        reads_like_qemu(d, &f);
    }
    // Zeroed-grain entries, and a snapshot child (-b) over a monolithicSparse parent.
    q(d, "create -q -f vmdk -o zeroed_grain=on z.vmdk 8M");
    qemu_io_f(
        d,
        "vmdk",
        "z.vmdk",
        &["write -P 0x31 0 1M", "write -z 256k 128k"],
    );
    reads_like_qemu(d, "z.vmdk");
    q(
        d,
        "create -q -f vmdk -b q-monolithicSparse.vmdk -F vmdk child.vmdk",
    );
    qemu_io_f(
        d,
        "vmdk",
        "child.vmdk",
        &["write -P 0x42 1M 200k", "write -P 0x43 23M 64k"],
    );
    reads_like_qemu(d, "child.vmdk");
    let r = k(d, "inspect --json child.vmdk").ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        v["full-backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("q-monolithicSparse.vmdk"),
        "{v}"
    );
    // A parent written to after the child was made has a new CID: the child is refused.
    q(
        d,
        "convert -O vmdk -o subformat=monolithicSparse src.raw p2.vmdk",
    );
    q(d, "create -q -f vmdk -b p2.vmdk -F vmdk c2.vmdk");
    qemu_io_f(d, "vmdk", "p2.vmdk", &["write -P 0x61 0 64k"]);
    let r = k(d, "convert --json -O raw c2.vmdk c2.raw");
    assert_eq!(r.code(), "InvalidSnapshot.Corrupt", "{}", r.stdout);
    assert!(r.stdout.contains("parentCID"), "{}", r.stdout);
    // 20 extent files (more than the 16 layers a chain may have): extents are not layers.
    q(
        d,
        "create -q -f vmdk -o subformat=twoGbMaxExtentSparse big.vmdk 40G",
    );
    qemu_io_f(
        d,
        "vmdk",
        "big.vmdk",
        &["write -P 0x51 0 64k", "write -P 0x52 39G 1M"],
    );
    k(d, "convert -O raw big.vmdk big.raw").ok();
    assert_same(d, "big.vmdk", "big.raw");
    // A twoGbMaxExtent disk whose extents are listed in the descriptor's directory.
    let desc = fs::read_to_string(d.join("q-twoGbMaxExtentFlat.vmdk")).unwrap();
    assert!(
        desc.contains("FLAT \"q-twoGbMaxExtentFlat-f001.vmdk\""),
        "{desc}"
    );
}

#[test]
fn an_extent_outside_the_image_directory_is_denied() {
    let t = tmp();
    let d = t.path();
    fs::create_dir_all(d.join("img")).unwrap();
    fs::create_dir_all(d.join("other")).unwrap();
    sparse_raw(&d.join("other/secret.raw"), MIB);
    write_at(&d.join("other/secret.raw"), 0, b"secret");
    fs::write(
        d.join("img/d.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"../other/secret.raw\" 0\n",
    )
    .unwrap();
    let r = k(d, "convert --json -O raw img/d.vmdk out.raw");
    assert_eq!(r.code(), "InvalidSnapshot.BackingDenied", "{}", r.stdout);
    assert!(r.stdout.contains("--backing-dir"), "{}", r.stdout);
    assert!(!d.join("out.raw").exists());
    // Allowed with --backing-dir.
    k(d, "convert --backing-dir other -O raw img/d.vmdk out.raw").ok();
    assert_same(d, "other/secret.raw", "out.raw");
}

/// One malformed file: a valid base with one field changed.
struct Case {
    name: &'static str,
    base: &'static str,
    change: fn(&mut Vec<u8>),
    /// The command after `kiln --json`-style arguments; the file goes last but one.
    code: &'static str,
    field: &'static str,
}

const CORRUPT: &str = "InvalidSnapshot.Corrupt";
const UNSUPPORTED: &str = "InvalidSnapshot.Unsupported";

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}
/// Byte offset of the first grain table of a sparse file with its GD in place.
fn first_gt(b: &[u8]) -> usize {
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    get32(b, gd) * 512
}
/// Byte offset of kiln's streamOptimized footer header.
fn footer(b: &[u8]) -> usize {
    b.len() - 1024
}
/// kiln's streamOptimized files put the first grain at 64 KiB.
const FIRST_GRAIN: usize = 65536;

/// Replaces the first `from` in `b` (which may be binary) with `to`.
fn replace(b: &mut Vec<u8>, from: &str, to: &str) {
    let at = b
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not found"));
    b.splice(at..at + from.len(), to.bytes());
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "magic",
            base: "ms.vmdk",
            change: |b| b[0] = b'X',
            code: CORRUPT,
            field: "magicNumber",
        },
        Case {
            name: "version",
            base: "ms.vmdk",
            change: |b| put32(b, 4, 9),
            code: UNSUPPORTED,
            field: "version 9",
        },
        Case {
            name: "flags",
            base: "ms.vmdk",
            change: |b| put32(b, 8, 1 | 1 << 9),
            code: UNSUPPORTED,
            field: "flags",
        },
        Case {
            name: "capacity",
            base: "ms.vmdk",
            change: |b| put64(b, 12, 1 << 50),
            code: CORRUPT,
            field: "capacity",
        },
        Case {
            name: "grainSize",
            base: "ms.vmdk",
            change: |b| put64(b, 20, 100),
            code: CORRUPT,
            field: "grainSize",
        },
        Case {
            name: "descriptorSize",
            base: "ms.vmdk",
            change: |b| put64(b, 36, 1 << 30),
            code: CORRUPT,
            field: "descriptorSize",
        },
        Case {
            name: "numGTEsPerGT",
            base: "ms.vmdk",
            change: |b| put32(b, 44, 4096),
            code: CORRUPT,
            field: "numGTEsPerGT",
        },
        Case {
            name: "gdOffset",
            base: "ms.vmdk",
            change: |b| put64(b, 56, 1 << 40),
            code: CORRUPT,
            field: "gdOffset",
        },
        Case {
            name: "newline chars",
            base: "ms.vmdk",
            change: |b| b[75] = b'\n',
            code: CORRUPT,
            field: "newline detection",
        },
        Case {
            name: "compressAlgorithm",
            base: "ms.vmdk",
            change: |b| b[77] = 5,
            code: UNSUPPORTED,
            field: "compressAlgorithm 5",
        },
        Case {
            name: "GD entry",
            base: "ms.vmdk",
            change: |b| {
                let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
                put32(b, gd, 0x7fff_fff0)
            },
            code: CORRUPT,
            field: "grain table 0",
        },
        Case {
            name: "GT entry",
            base: "ms.vmdk",
            change: |b| {
                let gt = first_gt(b);
                put32(b, gt, 0x7fff_fff0)
            },
            code: CORRUPT,
            field: "grain table entry of grain 0",
        },
        Case {
            name: "embedded CID",
            base: "ms.vmdk",
            change: |b| replace(b, "parentCID=ffffffff", "parentCID=ffffzzff"),
            code: CORRUPT,
            field: "parentCID",
        },
        Case {
            name: "footer marker",
            base: "so.vmdk",
            change: |b| {
                let f = footer(b);
                put32(b, f - 512 + 12, 7)
            },
            code: CORRUPT,
            field: "footer marker",
        },
        Case {
            name: "end-of-stream marker",
            base: "so.vmdk",
            change: |b| {
                let n = b.len();
                b[n - 512] = 1
            },
            code: CORRUPT,
            field: "end-of-stream marker",
        },
        Case {
            name: "footer gdOffset",
            base: "so.vmdk",
            change: |b| {
                let f = footer(b);
                put64(b, f + 56, u64::MAX)
            },
            code: CORRUPT,
            field: "footer's gdOffset",
        },
        Case {
            name: "footer grainSize",
            base: "so.vmdk",
            change: |b| {
                let f = footer(b);
                put64(b, f + 20, 3)
            },
            code: CORRUPT,
            field: "grainSize 3",
        },
        Case {
            name: "grain marker lba",
            base: "so.vmdk",
            change: |b| put64(b, FIRST_GRAIN, 12345),
            code: CORRUPT,
            field: "lba 12345",
        },
        Case {
            name: "grain marker size",
            base: "so.vmdk",
            change: |b| put32(b, FIRST_GRAIN + 8, 0x7fff_ffff),
            code: CORRUPT,
            field: "grain marker's size",
        },
        Case {
            name: "compressed data",
            base: "so.vmdk",
            change: |b| b[FIRST_GRAIN + 12] = 0xff,
            code: CORRUPT,
            field: "not a zlib stream",
        },
        Case {
            name: "flat extent size",
            base: "mf.vmdk",
            change: |b| replace(b, "RW 49152 FLAT", "RW 99999 FLAT"),
            code: CORRUPT,
            field: "pass the end of its file",
        },
        Case {
            name: "createType",
            base: "mf.vmdk",
            change: |b| replace(b, "monolithicFlat", "vmfsSparse"),
            code: UNSUPPORTED,
            field: "createType \\\"vmfsSparse\\\"",
        },
        Case {
            name: "extent type",
            base: "mf.vmdk",
            change: |b| replace(b, " FLAT ", " COWD "),
            code: UNSUPPORTED,
            field: "extent type COWD",
        },
        Case {
            name: "extent quote",
            base: "mf.vmdk",
            change: |b| replace(b, "-flat.vmdk\"", "-flat.vmdk"),
            code: CORRUPT,
            field: "closing quote",
        },
        Case {
            name: "extent size",
            base: "mf.vmdk",
            change: |b| replace(b, "RW 49152", "RW 4x152"),
            code: CORRUPT,
            field: "not a number of sectors",
        },
    ]
}

#[test]
fn malformed_files_are_refused_naming_the_field() {
    let t = tmp();
    let d = t.path();
    source(d);
    q(
        d,
        "convert -O vmdk -o subformat=monolithicSparse src.raw ms.vmdk",
    );
    q(
        d,
        "convert -O vmdk -o subformat=monolithicFlat src.raw mf.vmdk",
    );
    k(d, "convert -O vmdk src.raw so.vmdk").ok();
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for c in &cases {
        let mut b = fs::read(d.join(c.base)).unwrap();
        (c.change)(&mut b);
        let bad = format!("bad-{}", c.base);
        fs::write(d.join(&bad), &b).unwrap();
        // convert reads every grain; -f vmdk so that a broken magic is still read as VMDK.
        let r = k(d, &format!("convert --json -f vmdk -O raw {bad} out.raw"));
        let ok = r.status != 0
            && r.status != 101
            && !r.stderr.contains("panicked")
            && r.code() == c.code
            && r.stdout.contains(c.field);
        if !ok {
            failures.push(format!(
                "{}: status {} {} {}",
                c.name, r.status, r.stdout, r.stderr
            ));
        }
        let _ = fs::remove_file(d.join("out.raw"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_libvirt_vmdk_disk_is_an_instance_disk() {
    let t = tmp();
    let d = t.path();
    source(d);
    q(
        d,
        "convert -O vmdk -o subformat=monolithicSparse src.raw vm.vmdk",
    );
    let xml = format!(
        "<domain type='kvm'><name>vm</name><memory unit='MiB'>512</memory><os><type arch='x86_64'>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='vmdk'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        d.join("vm.vmdk").display()
    );
    fs::write(d.join("vm.xml"), xml).unwrap();
    k(
        d,
        "create --name vm --instance vm.xml --format vmdk --output-dir out -q",
    )
    .ok();
    check_vmdk(d, "out/xvda.vmdk", "src.raw", 24 * MIB, "streamOptimized");
    let m = manifest(&d.join("out"));
    assert!(m.to_string().contains("vm.vmdk"), "{m}");
}

#[test]
fn check_reads_a_vmdk_system_disk_like_its_source() {
    let t = tmp();
    let d = t.path();
    let sys = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/system.qcow2");
    let sys = sys.to_str().unwrap();
    for sub in SUBFORMATS {
        k(
            d,
            &format!("convert -O vmdk -o subformat={sub} {sys} {sub}.vmdk"),
        )
        .ok();
        let a = k(d, &format!("check --json {sub}.vmdk")).ok().stdout;
        let b = k(d, &format!("check --json {sys}")).ok().stdout;
        assert_eq!(a, b, "{sub}");
        assert!(a.contains("\"Result\": \"Pass\""), "{a}");
    }
}

/// Incompressible grains grow under deflate (zlib's level 1 by up to ~6%): kiln must read back
/// the streamOptimized file it wrote from random data, grain for grain.
#[test]
fn kiln_reads_back_its_own_stream_optimized_noise() {
    let t = tmp();
    let d = t.path();
    let src = d.join("noise.raw");
    sparse_raw(&src, 4 * MIB);
    write_at(&src, 0, &noise(11, 4 * MIB as usize));
    k(d, "convert -O vmdk noise.raw noise.vmdk").ok();
    k(d, "convert -f vmdk -O raw noise.vmdk back.raw").ok();
    assert!(fs::read(d.join("back.raw")).unwrap() == fs::read(&src).unwrap());
    q(d, "compare -f raw -F vmdk noise.raw noise.vmdk");
}
