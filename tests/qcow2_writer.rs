//! The fresh-image qcow2 writer through the library, checked by qemu-img: `check` clean, `compare`
//! identical to a raw reference written alongside, `info` sizes.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use kiln::format::qcow2::writer::{Compression, Qcow2Writer, WriterOptions};

/// Writes `clusters` (guest cluster index, fill byte) into a new qcow2 and into a raw reference.
fn build(d: &Path, size: u64, cb: u32, comp: Option<Compression>, clusters: &[(u64, u8)]) {
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
    for &(c, b) in clusters {
        let at = c * cs;
        let len = cs.min(size - at) as usize;
        // Half-compressible content: a ramp seeded by the fill byte.
        let data: Vec<u8> = (0..len)
            .map(|i| {
                if b % 2 == 0 {
                    b
                } else {
                    (i as u8).wrapping_mul(b) ^ (i >> 9) as u8
                }
            })
            .collect();
        reference.write_all_at(&data, at).unwrap();
        if comp.is_some() && w.compress_cluster(&data, &mut out).unwrap() {
            let host = w.allocate_compressed(at, out.len()).unwrap();
            w.write_at(host, &out).unwrap();
        } else {
            let host = w.allocate(at, len as u64).unwrap();
            w.write_at(host, &data).unwrap();
        }
    }
    w.finish().unwrap();
    assert_clean(d, "w.qcow2");
    assert_eq!(virtual_size(d, "w.qcow2"), size);
    assert_same(d, "ref.raw", "w.qcow2");
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
        build(t.path(), 97 * 4096 + 512, 12, Some(c), &clusters);
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
