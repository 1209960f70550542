//! The qcow2 reader through the library, checked against qemu: every image is built by `qemu-img` /
//! `qemu-io`, read whole through `kiln::format::open` and compared byte for byte with
//! `qemu-img convert -O raw`; extents are checked against the data and against `qemu-img map`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::{qcow2_overlay, qemu_img, qemu_io_f, MIB};
use kiln::error::Code;
use kiln::format::{self, ExtentKind, Format, OpenOptions, Opened};

fn img(dir: &Path, args: &[&str]) {
    qemu_img(dir, args);
}

/// Runs qemu-io commands on a qcow2 image.
fn io(dir: &Path, file: &str, cmds: &[&str]) {
    qemu_io_f(dir, "qcow2", file, cmds);
}

fn open(dir: &Path, name: &str, snapshot: Option<&str>) -> kiln::error::Result<Opened> {
    format::open(
        &dir.join(name),
        &OpenOptions {
            snapshot: snapshot.map(String::from),
            ..Default::default()
        },
    )
}

/// qemu's view of the guest disk.
fn reference(dir: &Path, name: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = format!("{name}.{}.ref.raw", snapshot.unwrap_or("active"));
    let sn = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut a = vec!["convert", "-O", "raw"];
    if let Some(s) = &sn {
        a.push("-l");
        a.push(s);
    }
    a.push(name);
    a.push(&out);
    img(dir, &a);
    let v = fs::read(dir.join(&out)).unwrap();
    fs::remove_file(dir.join(&out)).unwrap();
    v
}

/// Reads the whole disk through kiln (in one call, in odd chunks, and extent by extent) and compares
/// it with qemu's; returns the opened source.
fn check(dir: &Path, name: &str, snapshot: Option<&str>) -> Opened {
    let want = reference(dir, name, snapshot);
    let o = open(dir, name, snapshot).unwrap_or_else(|e| panic!("{name}: {e}"));
    let src = &o.source;
    assert_eq!(src.virtual_size(), want.len() as u64, "{name}: size");
    assert_eq!(o.info.virtual_size, want.len() as u64);
    assert_eq!(o.info.format, Format::Qcow2);

    let mut got = vec![0xeeu8; want.len()];
    src.read_at(0, &mut got).unwrap();
    assert!(got == want, "{name}: whole-disk read differs from qemu");

    got.fill(0xee);
    let mut pos = 0usize;
    while pos < got.len() {
        let n = 777_777.min(got.len() - pos);
        src.read_at(pos as u64, &mut got[pos..pos + n]).unwrap();
        pos += n;
    }
    assert!(got == want, "{name}: chunked read differs from qemu");

    // Extents: whole-disk asks and 3 MiB windows both tile the disk; holes read as zeros.
    for max in [u64::MAX, 3 * MIB] {
        let mut at = 0u64;
        let mut n = 0;
        while at < want.len() as u64 {
            let e = src.extent(at, max).unwrap();
            assert_eq!(e.start, at);
            assert!(e.len > 0 && e.len <= max && e.end() <= want.len() as u64);
            if e.kind != ExtentKind::Data {
                let r = &want[e.start as usize..e.end() as usize];
                assert!(
                    r.iter().all(|&b| b == 0),
                    "{name}: {:?} extent at {} holds data",
                    e.kind,
                    e.start
                );
            }
            at = e.end();
            n += 1;
        }
        assert!(n > 0);
    }
    o
}

/// Compares kiln's Data/not-Data classification with `qemu-img map` every `unit` bytes.
fn compare_map(dir: &Path, name: &str, unit: u64) {
    let out = qemu_img(dir, &["map", "--output=json", name]);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    let o = open(dir, name, None).unwrap();
    let size = o.source.virtual_size();
    let mut qemu = vec![false; (size / unit) as usize];
    for r in map.as_array().unwrap() {
        let start = r["start"].as_u64().unwrap();
        let len = r["length"].as_u64().unwrap();
        let data = r["data"].as_bool().unwrap();
        for u in start / unit..(start + len) / unit {
            qemu[u as usize] = data;
        }
    }
    let mut at = 0;
    let mut kiln = vec![false; qemu.len()];
    while at < size {
        let e = o.source.extent(at, u64::MAX).unwrap();
        for u in e.start / unit..e.end() / unit {
            kiln[u as usize] = e.kind == ExtentKind::Data;
        }
        at = e.end();
    }
    for (i, (k, q)) in kiln.iter().zip(&qemu).enumerate() {
        assert_eq!(
            k,
            q,
            "{name}: data at {} (kiln {k}, qemu {q})",
            i as u64 * unit
        );
    }
}

/// Data of every kind: incompressible, compressible, zero, repeating.
fn write_raw(path: &Path, size: u64) {
    let mut v = vec![0u8; size as usize];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for (i, b) in v.iter_mut().enumerate() {
        let region = (i as u64 * 8 / size) as u8;
        *b = match region {
            0 | 5 => {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            }
            1 | 6 => b"the quick brown fox jumps over the lazy dog "[i % 44],
            2 => 0,
            3 => (i / 1000) as u8,
            _ => {
                if (i / 65536) % 3 == 0 {
                    0
                } else {
                    (i % 251) as u8
                }
            }
        };
    }
    fs::write(path, v).unwrap();
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3k",
    "write -P 0x33 1m 512k",
    "write -P 0x44 3m 4k",
    "write -P 0x55 4194303 1",
];

#[test]
fn compat_0_10_version_2() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "a.qcow2",
            "5M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    let o = check(p, "a.qcow2", None);
    assert_eq!(o.info.chain.len(), 1);
    assert_eq!(o.info.snapshot, None);
    assert_eq!(o.source.extent(0, u64::MAX).unwrap().kind, ExtentKind::Data);
}

#[test]
fn version_3_with_concurrent_reads() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            "a.qcow2",
            "6M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    io(p, "a.qcow2", &["write -P 0x66 5m 1m"]);
    check(p, "a.qcow2", None);
    let want = reference(p, "a.qcow2", None);
    let o = open(p, "a.qcow2", None).unwrap();
    let src = &o.source;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let want = &want;
            s.spawn(move || {
                let chunk = 96 * 1024;
                let mut at = t * chunk;
                let mut buf = vec![0u8; chunk as usize];
                while at < want.len() as u64 {
                    let n = (chunk as usize).min(want.len() - at as usize);
                    src.read_at(at, &mut buf[..n]).unwrap();
                    assert_eq!(&buf[..n], &want[at as usize..at as usize + n]);
                    at += 4 * chunk;
                }
            });
        }
    });
}

#[test]
fn cluster_size_512() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "a.qcow2",
            "5M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    io(p, "a.qcow2", &["write -P 0x77 2m 700k"]);
    check(p, "a.qcow2", None);
}

#[test]
fn cluster_size_2m() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "a.qcow2",
            "9M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    io(p, "a.qcow2", &["write -P 0x77 8m 4k"]);
    let o = check(p, "a.qcow2", None);
    let e = o.source.extent(4 * MIB, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, 4 * MIB));
}

#[test]
fn refcount_bits_1() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            "a.qcow2",
            "5M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    check(p, "a.qcow2", None);
}

#[test]
fn refcount_bits_64() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            "a.qcow2",
            "5M",
        ],
    );
    io(p, "a.qcow2", WRITES);
    check(p, "a.qcow2", None);
}

#[test]
fn zero_clusters_v3() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    io(
        p,
        "a.qcow2",
        &[
            "write -P 0x11 0 2m",
            "write -z 64k 128k",
            "write -z -u 1m 256k",
            "write -z 3m 64k",
        ],
    );
    let o = check(p, "a.qcow2", None);
    let e = o.source.extent(64 * 1024, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Zero, 128 * 1024));
    assert_eq!(o.source.extent(MIB, 1).unwrap().kind, ExtentKind::Zero);
    compare_map(p, "a.qcow2", 4096);
}

#[test]
fn zero_clusters_over_backing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(p, "base.qcow2", &["write -P 0x33 0 4m"]);
    qcow2_overlay(p, "base.qcow2", "top.qcow2");
    io(
        p,
        "top.qcow2",
        &["write -z 1m 512k", "write -P 0x44 2m 64k"],
    );
    let o = check(p, "top.qcow2", None);
    let e = o.source.extent(MIB, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Zero, 512 * 1024));
    // Overlay data and backing data merge into one extent.
    let e = o.source.extent(MIB + 512 * 1024, u64::MAX).unwrap();
    assert_eq!((e.kind, e.end()), (ExtentKind::Data, 4 * MIB));
    assert_eq!(o.info.chain.len(), 2);
    compare_map(p, "top.qcow2", 4096);
}

#[test]
fn compressed_zlib() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write_raw(&p.join("src.raw"), 4 * MIB);
    img(p, &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"]);
    check(p, "c.qcow2", None);
    let o = open(p, "c.qcow2", None).unwrap();
    let mut got = vec![0u8; 4 * MIB as usize];
    o.source.read_at(0, &mut got).unwrap();
    assert!(got == fs::read(p.join("src.raw")).unwrap());
}

#[test]
fn compressed_zstd() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write_raw(&p.join("src.raw"), 4 * MIB);
    img(
        p,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "src.raw",
            "z.qcow2",
        ],
    );
    check(p, "z.qcow2", None);
    // Small clusters too.
    img(
        p,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,cluster_size=4k",
            "src.raw",
            "z4k.qcow2",
        ],
    );
    check(p, "z4k.qcow2", None);
}

#[test]
fn chain_of_three_with_relative_names() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::create_dir(p.join("b")).unwrap();
    fs::create_dir(p.join("m")).unwrap();
    img(p, &["create", "-q", "-f", "qcow2", "b/base.qcow2", "4M"]);
    io(p, "b/base.qcow2", &["write -P 0x11 0 4m"]);
    qcow2_overlay(&p.join("m"), "../b/base.qcow2", "mid.qcow2");
    io(
        p,
        "m/mid.qcow2",
        &["write -P 0x22 1m 1m", "write -z 3m 64k"],
    );
    qcow2_overlay(p, "m/mid.qcow2", "top.qcow2");
    io(
        p,
        "top.qcow2",
        &["write -P 0x33 1536k 1m", "write -P 0x44 5000 3000"],
    );
    let o = check(p, "top.qcow2", None);
    let chain: Vec<_> = o
        .info
        .chain
        .iter()
        .map(|c| (c.path.clone(), c.format))
        .collect();
    assert_eq!(chain.len(), 3);
    assert!(chain.iter().all(|c| c.1 == Format::Qcow2));
    assert!(chain[2].0.ends_with("base.qcow2"), "{chain:?}");
    compare_map(p, "top.qcow2", 4096);
}

#[test]
fn raw_backing_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write_raw(&p.join("base.raw"), 4 * MIB);
    img(
        p,
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
    io(p, "top.qcow2", WRITES);
    let o = check(p, "top.qcow2", None);
    assert_eq!(o.info.chain.len(), 2);
    assert_eq!(o.info.chain[1].format, Format::Raw);
    // Without the backing format extension the format is detected.
    // (qemu-img insists on one, so rename the extension to an unknown type, which readers skip.)
    let mut head = fs::read(p.join("top.qcow2")).unwrap();
    let at = (104..4096)
        .step_by(8)
        .find(|&i| head[i..i + 4] == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    head[at..at + 4].copy_from_slice(&[0x0b, 0xad, 0xf0, 0x0d]);
    fs::write(p.join("top.qcow2"), head).unwrap();
    let o = check(p, "top.qcow2", None);
    assert_eq!(o.info.chain[1].format, Format::Raw);
}

#[test]
fn overlay_larger_than_backing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"]);
    io(p, "base.qcow2", &["write -P 0x11 0 2m"]);
    img(
        p,
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
            "6M",
        ],
    );
    io(
        p,
        "top.qcow2",
        &["write -P 0x22 5m 64k", "write -P 0x33 1m 4k"],
    );
    let o = check(p, "top.qcow2", None);
    let e = o.source.extent(2 * MIB, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Zero, 3 * MIB));
    let e = o.source.extent(2 * MIB - 4096, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 4096));
    // A read across the backing file's end.
    let mut buf = vec![0xeeu8; 8192];
    o.source.read_at(2 * MIB - 4096, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x11) && buf[4096..].iter().all(|&b| b == 0));
}

#[test]
fn internal_snapshots_by_name_and_id() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    io(p, "a.qcow2", &["write -P 0x11 0 2m"]);
    img(p, &["snapshot", "-c", "first", "a.qcow2"]);
    io(p, "a.qcow2", &["write -P 0x22 1m 2m", "write -z 0 64k"]);
    img(p, &["snapshot", "-c", "second", "a.qcow2"]);
    io(p, "a.qcow2", &["write -P 0x33 512k 3m"]);
    check(p, "a.qcow2", None);
    let o = check(p, "a.qcow2", Some("first"));
    assert_eq!(o.info.snapshot.as_deref(), Some("first"));
    let o = check(p, "a.qcow2", Some("second"));
    assert_eq!(o.info.snapshot.as_deref(), Some("second"));
    // By ID: the first snapshot has ID 1.
    let o = open(p, "a.qcow2", Some("1")).unwrap();
    assert_eq!(o.info.snapshot.as_deref(), Some("first"));
    let want = reference(p, "a.qcow2", Some("first"));
    let mut got = vec![0u8; want.len()];
    o.source.read_at(0, &mut got).unwrap();
    assert!(got == want);
    // Through the `file@snap` form.
    let o = format::open(&p.join("a.qcow2@second"), &OpenOptions::default()).unwrap();
    assert_eq!(o.info.snapshot.as_deref(), Some("second"));
    let e = open(p, "a.qcow2", Some("third")).err().unwrap();
    assert_eq!(e.code(), Code::SnapshotNotFound);
    assert!(
        e.message().contains("first") && e.message().contains("second"),
        "{e}"
    );
}

#[test]
fn snapshot_of_an_overlay_reads_through_backing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(p, "base.qcow2", &["write -P 0x11 0 4m"]);
    qcow2_overlay(p, "base.qcow2", "top.qcow2");
    io(p, "top.qcow2", &["write -P 0x22 1m 64k"]);
    img(p, &["snapshot", "-c", "s", "top.qcow2"]);
    io(p, "top.qcow2", &["write -P 0x33 2m 64k"]);
    check(p, "top.qcow2", Some("s"));
    check(p, "top.qcow2", None);
}

#[test]
fn extended_l2_subclusters() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "a.qcow2",
            "4M",
        ],
    );
    io(
        p,
        "a.qcow2",
        &[
            "write -P 0x11 0 2k",
            "write -P 0x22 6k 2k",
            "write -P 0x33 64k 64k",
            "write -z 70k 4k",
            "write -P 0x44 1m 1k",
        ],
    );
    let o = check(p, "a.qcow2", None);
    let e = o.source.extent(0, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 2048));
    compare_map(p, "a.qcow2", 1024);

    // Over a backing file: unallocated subclusters read through it.
    img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(p, "base.qcow2", &["write -P 0x55 0 4m"]);
    img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(
        p,
        "top.qcow2",
        &[
            "write -P 0x66 2k 2k",
            "write -z 10k 2k",
            "write -P 0x77 200k 6k",
        ],
    );
    check(p, "top.qcow2", None);
    compare_map(p, "top.qcow2", 1024);
}

#[test]
fn encrypted_images_need_their_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(
        p,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "-f",
            "qcow2",
            "e.qcow2",
            "4M",
        ],
    );
    let e = open(p, "e.qcow2", None).err().unwrap();
    assert_eq!(e.code(), Code::MissingParameter);
    assert!(e.message().contains("encrypted"), "{e}");
}

#[test]
fn missing_backing_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qcow2_overlay(p, "base.qcow2", "top.qcow2");
    fs::remove_file(p.join("base.qcow2")).unwrap();
    let e = open(p, "top.qcow2", None).err().unwrap();
    assert_eq!(e.code(), Code::SnapshotNotFound);
    assert!(
        e.message().contains("top.qcow2") && e.message().contains("base.qcow2"),
        "{e}"
    );
}

#[test]
fn backing_loops_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "self.qcow2", "4M"]);
    img(
        p,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    let e = open(p, "self.qcow2", None).err().unwrap();
    assert!(
        matches!(e.code(), Code::SnapshotCorrupt | Code::SnapshotUnsupported),
        "{e}"
    );
    assert!(e.message().contains("self.qcow2"), "{e}");

    img(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qcow2_overlay(p, "a.qcow2", "b.qcow2");
    img(
        p,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    let e = open(p, "b.qcow2", None).err().unwrap();
    assert!(
        matches!(e.code(), Code::SnapshotCorrupt | Code::SnapshotUnsupported),
        "{e}"
    );
    assert!(e.message().contains("loop"), "{e}");
}

#[test]
fn chains_deeper_than_16_are_unsupported() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]);
    for i in 1..=16 {
        let (b, t) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        qcow2_overlay(p, &b, &t);
    }
    // 16 files: fine.
    let o = open(p, "l15.qcow2", None).unwrap();
    assert_eq!(o.info.chain.len(), 16);
    let e = open(p, "l16.qcow2", None).err().unwrap();
    assert_eq!(e.code(), Code::SnapshotUnsupported);
    assert!(e.message().contains("16"), "{e}");
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn corrupt_compressed_cluster() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write_raw(&p.join("src.raw"), 4 * MIB);
    img(p, &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"]);
    // Find the first compressed cluster through L1[0] and its L2 table.
    let path = p.join("c.qcow2");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let cb = u32::from_be_bytes(h[20..24].try_into().unwrap());
    let cs = 1usize << cb;
    let l1 = be64(&h, 40);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1).unwrap();
    let l2_off = be64(&e, 0) & 0x00ff_ffff_ffff_fe00;
    let mut l2 = vec![0u8; cs];
    f.read_exact_at(&mut l2, l2_off).unwrap();
    let (idx, entry) = (0..cs / 8)
        .map(|i| (i, be64(&l2, i * 8)))
        .find(|(_, e)| e & (1 << 62) != 0)
        .expect("a compressed cluster");
    let x = 62 - (cb - 8);
    let host = entry & ((1u64 << x) - 1);
    f.write_all_at(&[0xff; 64], host).unwrap();
    drop(f);

    let o = open(p, "c.qcow2", None).unwrap();
    let guest = (idx * cs) as u64;
    let mut buf = vec![0u8; cs];
    let e = o.source.read_at(guest, &mut buf).err().unwrap();
    assert_eq!(e.code(), Code::SnapshotCorrupt);
    assert!(
        e.message().contains(&format!("guest offset {guest}")),
        "{e}"
    );
    let mut all = vec![0u8; 4 * MIB as usize];
    assert_eq!(
        o.source.read_at(0, &mut all).err().unwrap().code(),
        Code::SnapshotCorrupt
    );
}

#[test]
fn imago_agrees() {
    use imago::qcow2::Qcow2;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    io(p, "a.qcow2", WRITES);
    let q = Qcow2::<imago::file::File>::open_path(p.join("a.qcow2"), false).unwrap();
    let q = imago::FormatAccess::new(q);
    let mut want = vec![0u8; 4 * MIB as usize];
    q.read(&mut want[..], 0).unwrap();
    let o = open(p, "a.qcow2", None).unwrap();
    let mut got = vec![0u8; want.len()];
    o.source.read_at(0, &mut got).unwrap();
    assert!(got == want);
}

#[test]
fn large_sparse_disk_has_few_extents() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    img(p, &["create", "-q", "-f", "qcow2", "big.qcow2", "1T"]);
    io(
        p,
        "big.qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 500g 128k",
            "write -P 3 1048575m 1m",
        ],
    );
    qcow2_overlay(p, "big.qcow2", "top.qcow2");
    io(p, "top.qcow2", &["write -P 4 64k 64k", "write -z 200g 1m"]);
    let o = open(p, "top.qcow2", None).unwrap();
    let t = std::time::Instant::now();
    let mut at = 0;
    let mut kinds = Vec::new();
    while at < o.source.virtual_size() {
        let e = o.source.extent(at, u64::MAX).unwrap();
        kinds.push((e.start, e.len, e.kind));
        at = e.end();
    }
    let g = 1u64 << 30;
    use ExtentKind::*;
    assert_eq!(
        kinds,
        vec![
            (0, 128 * 1024, Data),
            (128 * 1024, 200 * g - 128 * 1024, Unallocated),
            (200 * g, MIB, Zero),
            (200 * g + MIB, 300 * g - MIB, Unallocated),
            (500 * g, 128 * 1024, Data),
            (
                500 * g + 128 * 1024,
                524 * g - 128 * 1024 - MIB,
                Unallocated
            ),
            (1024 * g - MIB, MIB, Data),
        ]
    );
    assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    let mut buf = vec![0u8; 256 * 1024];
    o.source.read_at(0, &mut buf).unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 1));
    assert!(buf[65536..131072].iter().all(|&b| b == 4));
    assert!(buf[131072..].iter().all(|&b| b == 0));
}
