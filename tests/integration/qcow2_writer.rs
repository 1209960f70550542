//! The fresh-image qcow2 writer through the library, checked by qemu-img: `check` clean, `compare`
//! identical to a raw reference written alongside, `info` sizes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;
use kiln::format::qcow2::writer::{Compression, Qcow2Writer, WriterOptions};

/// Guest content for cluster `c` seeded by `b`: a fill (b % 3 == 0), a ramp (1), or noise (2) that
/// neither zlib nor zstd can shrink.
fn content(c: u64, b: u8, len: usize) -> Vec<u8> {
    let mut x = (c << 8 | u64::from(b)) | 1;
    (0..len)
        .map(|i| match b % 3 {
            0 => b,
            1 => (i as u8).wrapping_mul(b) ^ (i >> 9) as u8,
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            }
        })
        .collect()
}

/// Writes `clusters` (guest cluster index, seed byte) into a new qcow2 and into a raw reference;
/// returns how many went in compressed and how many as they are.
fn build(
    d: &Path,
    size: u64,
    cb: u32,
    comp: Option<Compression>,
    clusters: &[(u64, u8)],
) -> (usize, usize) {
    let cs = 1u64 << cb;
    let q = d.join("w.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&q)
        .unwrap();
    let w = Qcow2Writer::create(
        f,
        &q,
        size,
        &WriterOptions {
            cluster_bits: cb,
            compression: comp,
        },
    )
    .unwrap();
    let reference = File::create(d.join("ref.raw")).unwrap();
    reference.set_len(size).unwrap();
    let mut out = Vec::new();
    let mut counts = (0, 0);
    let mut compressed_bytes = 0u64;
    for &(c, b) in clusters {
        let at = c * cs;
        let len = cs.min(size - at) as usize;
        let data = content(c, b, len);
        reference.write_all_at(&data, at).unwrap();
        if comp.is_some() && w.compress_cluster(&data, &mut out).unwrap() {
            counts.0 += 1;
            compressed_bytes += len as u64;
            let host = w.allocate_compressed(at, out.len()).unwrap();
            w.write_at(host, &out).unwrap();
        } else {
            counts.1 += 1;
            let host = w.allocate(at, len as u64).unwrap();
            w.write_at(host, &data).unwrap();
        }
    }
    w.finish().unwrap();
    assert_clean(d, "w.qcow2");
    assert_ends_at_last_cluster(d, "w.qcow2", cs);
    assert_eq!(virtual_size(d, "w.qcow2"), size);
    assert_same(d, "ref.raw", "w.qcow2");
    if comp.is_some() {
        let map = qemu_img(d, &["map", "--output=json", "w.qcow2"]);
        let v: serde_json::Value = serde_json::from_str(&map).expect("map json");
        let compressed: u64 = v
            .as_array()
            .expect("map array")
            .iter()
            .filter(|e| e["compressed"] == true)
            .map(|e| e["length"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(compressed, compressed_bytes, "{map}");
    }
    counts
}

/// The file ends exactly where qemu-img check says the image's last used cluster does.
fn assert_ends_at_last_cluster(d: &Path, file: &str, cs: u64) {
    let r = tool_in(d, "qemu-img", &["check", "--output=json", file]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("check json");
    let len = std::fs::metadata(d.join(file)).unwrap().len();
    assert_eq!(v["image-end-offset"].as_u64(), Some(len), "{v}");
    assert_eq!(len % cs, 0);
}

/// Every byte of `file` read through imago (a second, independent qcow2 reader) equals `reference`.
fn assert_imago_reads(d: &Path, file: &str, reference: &str) {
    use imago::qcow2::Qcow2;
    let q = Qcow2::<imago::file::File>::open_path(d.join(file), false).unwrap();
    let q = imago::FormatAccess::new(q);
    let want = std::fs::read(d.join(reference)).unwrap();
    let mut got = vec![0u8; want.len()];
    q.read(&mut got[..], 0).unwrap();
    assert!(got == want, "imago reads other bytes from {file}");
}

#[test]
fn an_empty_disk_is_valid_and_tiny() {
    let t = tmp();
    build(t.path(), 10 << 30, 16, None, &[]);
    assert!(allocated(&t.path().join("w.qcow2")) < 1 << 20);
}

#[test]
fn data_at_the_very_end_of_an_odd_sized_disk() {
    let t = tmp();
    // 5 MiB + 1536 bytes: the last cluster is short.
    let size = (5 << 20) + 1536;
    build(t.path(), size, 16, None, &[(0, 3), (size / 65536, 5)]);
}

#[test]
fn small_clusters_span_many_l2_tables_and_refcount_blocks() {
    let t = tmp();
    // 512-byte clusters: an L2 table covers 32 KiB, a refcount block 256 clusters.
    let clusters: Vec<(u64, u8)> = (0..3000u64).map(|i| (i * 7, (i % 200) as u8 + 1)).collect();
    build(t.path(), 16 << 20, 9, None, &clusters);
}

#[test]
fn two_megabyte_clusters() {
    let t = tmp();
    build(t.path(), 64 << 20, 21, None, &[(0, 1), (5, 2), (31, 3)]);
}

#[test]
fn a_terabyte_disk_with_a_little_data_stays_small() {
    let t = tmp();
    let clusters: Vec<(u64, u8)> = (0..64u64).map(|i| (i * 262_144 + 3, 9)).collect();
    let q = t.path().join("w.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&q)
        .unwrap();
    let w = Qcow2Writer::create(
        f,
        &q,
        1 << 40,
        &WriterOptions {
            cluster_bits: 16,
            compression: None,
        },
    )
    .unwrap();
    for &(c, b) in &clusters {
        let h = w.allocate(c * 65536, 65536).unwrap();
        w.write_at(h, &[b; 65536]).unwrap();
    }
    w.finish().unwrap();
    assert_clean(t.path(), "w.qcow2");
    assert_eq!(virtual_size(t.path(), "w.qcow2"), 1 << 40);
    let map = qemu_img(t.path(), &["map", "--output=json", "w.qcow2"]);
    assert_eq!(map.matches("\"data\": true").count(), 64, "{map}");
    // 64 data clusters and 64 L2 tables of 64 KiB, plus a few metadata clusters.
    assert!(allocated(&q) < 9 << 20, "{}", allocated(&q));
}

#[test]
fn compressed_zlib_and_zstd_mixed_with_plain_clusters() {
    for (c, name) in [(Compression::Zlib, "zlib"), (Compression::Zstd, "zstd")] {
        let t = tmp();
        let clusters: Vec<(u64, u8)> = (0..40u64)
            .map(|i| (i * 3 % 97, (i * 37 % 251) as u8))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let clusters: Vec<_> = clusters.into_iter().filter(|c| seen.insert(c.0)).collect();
        let (packed, plain) = build(t.path(), 97 * 4096 + 512, 12, Some(c), &clusters);
        assert!(packed > 10 && plain > 5, "{packed} compressed, {plain} not");
        assert_eq!(
            info(t.path(), "w.qcow2")["format-specific"]["data"]["compression-type"],
            name
        );
    }
}

#[test]
fn many_threads_write_one_image() {
    let t = tmp();
    let d = t.path();
    let q = d.join("w.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&q)
        .unwrap();
    let w = Qcow2Writer::create(
        f,
        &q,
        64 << 20,
        &WriterOptions {
            cluster_bits: 16,
            compression: Some(Compression::Zlib),
        },
    )
    .unwrap();
    let reference = File::create(d.join("ref.raw")).unwrap();
    reference.set_len(64 << 20).unwrap();
    std::thread::scope(|s| {
        for th in 0..8u64 {
            let (w, reference) = (&w, &reference);
            s.spawn(move || {
                let mut out = Vec::new();
                for c in (th..1024).step_by(8).filter(|c| c % 3 != 0) {
                    let data = vec![(c % 251) as u8 + 1; 65536];
                    reference.write_all_at(&data, c * 65536).unwrap();
                    if c % 2 == 0 && w.compress_cluster(&data, &mut out).unwrap() {
                        let h = w.allocate_compressed(c * 65536, out.len()).unwrap();
                        w.write_at(h, &out).unwrap();
                    } else {
                        let h = w.allocate(c * 65536, 65536).unwrap();
                        w.write_at(h, &data).unwrap();
                    }
                }
            });
        }
    });
    w.finish().unwrap();
    assert_clean(d, "w.qcow2");
    assert_same(d, "ref.raw", "w.qcow2");
}

#[test]
fn smallest_and_largest_clusters_compressed() {
    // 512-byte clusters: compressed clusters straddle sector and cluster edges constantly, and a
    // host cluster holds many of them; 2 MiB clusters: an L2 table maps 512 GiB.
    let clusters: Vec<(u64, u8)> = (0..600u64).map(|i| (i * 5, (i % 250) as u8 + 1)).collect();
    for (cb, size, c, clusters) in [
        (9, 4 << 20, Compression::Zlib, &clusters[..]),
        (9, 4 << 20, Compression::Zstd, &clusters[..]),
        (
            21,
            64 << 20,
            Compression::Zstd,
            &[(0, 2), (1, 3), (7, 4), (31, 5)][..],
        ),
        (
            21,
            64 << 20,
            Compression::Zlib,
            &[(0, 2), (1, 3), (7, 4), (31, 5)][..],
        ),
    ] {
        let t = tmp();
        let (packed, plain) = build(t.path(), size, cb, Some(c), clusters);
        assert!(packed > 0 && plain > 0, "{packed} compressed, {plain} not");
        let i = info(t.path(), "w.qcow2");
        assert_eq!(i["cluster-size"].as_u64(), Some(1 << cb));
    }
}

#[test]
fn imago_reads_plain_and_zlib_images_as_qemu_does() {
    // imago 0.2.6 reads zlib-compressed clusters but not zstd ones.
    let clusters: Vec<(u64, u8)> = (0..200u64)
        .map(|i| (i * 3, (i * 7 % 250) as u8 + 1))
        .collect();
    for (cb, c) in [
        (12, None),
        (12, Some(Compression::Zlib)),
        (16, Some(Compression::Zlib)),
    ] {
        let t = tmp();
        let size = (8 << 20) + 512;
        let fits: Vec<_> = clusters
            .iter()
            .copied()
            .filter(|&(i, _)| i << cb < size)
            .collect();
        build(t.path(), size, cb, c, &fits);
        assert_imago_reads(t.path(), "w.qcow2", "ref.raw");
    }
}

#[test]
fn the_same_input_gives_the_same_file() {
    let clusters: Vec<(u64, u8)> = (0..100u64).map(|i| (i * 2, i as u8)).collect();
    let (a, b) = (tmp(), tmp());
    build(a.path(), 16 << 20, 16, Some(Compression::Zstd), &clusters);
    build(b.path(), 16 << 20, 16, Some(Compression::Zstd), &clusters);
    assert!(
        std::fs::read(a.path().join("w.qcow2")).unwrap()
            == std::fs::read(b.path().join("w.qcow2")).unwrap()
    );
}

#[test]
fn qemu_can_keep_writing_to_the_image() {
    // Refcounts that are right let qemu allocate (and free, through discard) on top of ours.
    let t = tmp();
    let d = t.path();
    let clusters: Vec<(u64, u8)> = (0..20u64).map(|i| (i * 4, i as u8 + 1)).collect();
    build(d, 8 << 20, 16, Some(Compression::Zlib), &clusters);
    for cmd in [
        "write -P 0xaa 65536 65536",
        "write -P 0xbb 0 4096",
        "discard 262144 65536",
        "write -P 0xcc 7m 1m",
    ] {
        qemu_io(d, "w.qcow2", &[cmd]);
        qemu_io(d, "ref.raw", &[cmd.replace("discard", "write -z").as_str()]);
    }
    assert_clean(d, "w.qcow2");
    assert_same(d, "ref.raw", "w.qcow2");
}

#[test]
fn refused_arguments_leave_a_usable_error() {
    let t = tmp();
    let q = t.path().join("w.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&q)
        .unwrap();
    let opts = WriterOptions {
        cluster_bits: 16,
        compression: None,
    };
    let e = Qcow2Writer::create(f, &q, 1000, &opts).err().unwrap();
    assert_eq!(e.code(), kiln::error::Code::InvalidSize);
    assert!(e.message().contains("w.qcow2"), "{}", e.message());
}
