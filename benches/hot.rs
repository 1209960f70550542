//! Criterion benches for kiln's hot pieces: zero detection, hashing, extent mapping (raw and qcow2)
//! and qcow2 table layout. The side-by-side comparison with qemu-img is `benches/compare.sh`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::format::qcow2::writer::{Qcow2Writer, WriterOptions};
use kiln::format::{self, BlockSource, OpenOptions};

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_detection");
    let zeros = vec![0u8; 4 << 20];
    let mut late = zeros.clone();
    *late.last_mut().unwrap() = 1;
    g.throughput(Throughput::Bytes(zeros.len() as u64));
    g.bench_function("4MiB_all_zero", |b| {
        b.iter(|| kiln::copy::engine::is_zero(black_box(&zeros)))
    });
    g.bench_function("4MiB_last_byte_set", |b| {
        b.iter(|| kiln::copy::engine::is_zero(black_box(&late)))
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h");
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let data: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    f.write_all_at(&data, 0).unwrap();
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("hash_file_64MiB_cached", |b| {
        b.iter(|| kiln::copy::hash::hash_file(&f, &p).unwrap())
    });
    g.finish();
}

/// Walks every extent of a source, the way the copy's dispatcher does.
fn walk(src: &dyn BlockSource) -> u64 {
    let mut pos = 0;
    let mut n = 0;
    while pos < src.virtual_size() {
        let e = src.extent(pos, 4 << 20).unwrap();
        pos = e.end();
        n += 1;
    }
    n
}

fn extent_mapping(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("s.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(16 << 30).unwrap();
    for i in 0..256u64 {
        f.write_all_at(&[1u8; 65536], i * (64 << 20)).unwrap();
    }
    drop(f);
    let q = dir.path().join("s.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut g = c.benchmark_group("extent_mapping_16GiB_256_extents");
    g.sample_size(20);
    let open = |p: &Path| format::open(p, &OpenOptions::default()).unwrap().source;
    let rs = open(&raw);
    g.bench_function(BenchmarkId::new("raw", "seek_data"), |b| {
        b.iter(|| walk(rs.as_ref()))
    });
    if ok {
        let qs = open(&q);
        g.bench_function(BenchmarkId::new("qcow2", "l2_lookup"), |b| {
            b.iter(|| walk(qs.as_ref()))
        });
    }
    g.finish();
}

fn qcow2_layout(c: &mut Criterion) {
    let mut g = c.benchmark_group("qcow2_layout");
    g.sample_size(10);
    // 1 TiB virtual, one 64 KiB cluster every 16 MiB: 65536 clusters over 2048 L2 tables.
    g.bench_function("allocate_and_finish_65536_clusters_1TiB", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("o.qcow2");
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .unwrap();
            let opts = WriterOptions {
                cluster_bits: 16,
                compression: None,
            };
            let w = Qcow2Writer::create(f, &p, 1 << 40, &opts).unwrap();
            for i in 0..65536u64 {
                w.allocate(i * (16 << 20), 65536).unwrap();
            }
            w.finish().unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    zero_detection,
    hashing,
    extent_mapping,
    qcow2_layout
);
criterion_main!(benches);
