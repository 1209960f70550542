//! `kiln inspect` against qemu-img: the allocation map agrees with `qemu-img map --output=json` on
//! the data/zero classification of every byte, and the report with `qemu-img info --output=json`.

use std::path::Path;

use crate::common::{self, qemu_img, qemu_io_f, tmp, MIB};
use kiln::commands::inspect::{self, InspectOptions};
use kiln::format::Format;
use serde_json::Value;

/// (start, length, data, zero) runs from a qemu-img-style JSON map.
pub(crate) fn runs(v: &Value) -> Vec<(u64, u64, bool, bool)> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn class_at(r: &[(u64, u64, bool, bool)], off: u64) -> Option<(bool, bool)> {
    r.iter()
        .find(|(s, l, _, _)| *s <= off && off < s + l)
        .map(|&(_, _, d, z)| (d, z))
}

/// kiln's `--map --json` entries and qemu-img's agree at every boundary either of them has, so they
/// classify every byte alike whatever their extent boundaries; both cover the whole disk.
fn compare_map(dir: &Path, file: &str) -> Vec<(u64, u64, bool, bool)> {
    let qemu: Value =
        serde_json::from_str(&qemu_img(dir, &["map", "--output=json", file])).unwrap();
    let qemu = runs(&qemu);
    let report = inspect::inspect_with(
        &dir.join(file),
        &InspectOptions {
            map: true,
            ..Default::default()
        },
    )
    .unwrap();
    let kiln = runs(&serde_json::to_value(report.map.as_ref().unwrap()).unwrap());
    let end = |r: &[(u64, u64, bool, bool)]| r.last().map_or(0, |&(s, l, _, _)| s + l);
    assert_eq!(
        end(&kiln),
        report.virtual_size,
        "{file}: kiln's map covers the disk"
    );
    assert_eq!(
        end(&qemu),
        end(&kiln),
        "{file}: both maps end at the virtual size"
    );
    assert_same_classes(&kiln, &qemu, file);
    kiln
}

/// Both maps classify every byte alike: checked at every boundary either of them has.
pub(crate) fn assert_same_classes(
    kiln: &[(u64, u64, bool, bool)],
    qemu: &[(u64, u64, bool, bool)],
    file: &str,
) {
    let mut points: Vec<u64> = kiln.iter().chain(qemu).map(|r| r.0).collect();
    points.sort_unstable();
    points.dedup();
    for p in points {
        assert_eq!(
            class_at(kiln, p),
            class_at(qemu, p),
            "{file} at offset {p}: (data, zero) differ\nkiln: {kiln:?}\nqemu: {qemu:?}"
        );
    }
}

#[test]
fn raw_sparse_and_data() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "d.raw", "8M"]);
    qemu_io_f(
        d,
        "raw",
        "d.raw",
        &[
            "write -P 1 64k 64k",
            "write -P 0 1M 128k",
            "write -P 2 8188k 4k",
        ],
    );
    let m = compare_map(d, "d.raw");
    assert!(m.iter().any(|r| r.2) && m.iter().any(|r| r.3));
    // Fully allocated, and entirely sparse (not even qemu-img's first block).
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "full.raw",
            "2M",
        ],
    );
    compare_map(d, "full.raw");
}

/// Known difference: `RawSource::new` reads ENXIO from `SEEK_DATA` at offset 0 (a file with no data
/// at all) as "this filesystem has no SEEK_DATA" and maps the whole file as data; qemu-img maps it
/// as one zero run. Un-ignore once `src/format/raw.rs` treats ENXIO as "all hole".
#[test]
fn raw_without_any_data() {
    let t = tmp();
    let d = t.path();
    common::sparse_raw(&d.join("hole.raw"), 3 * MIB);
    compare_map(d, "hole.raw");
}

#[test]
fn qcow2_plain_and_zero_clusters() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "p.qcow2", "16M"]);
    qemu_io_f(
        d,
        "qcow2",
        "p.qcow2",
        &[
            "write -P 1 0 192k",
            "write -P 3 4M 64k",
            "write -z 128k 64k",
            "write -z 8M 1M",
            "write -P 4 15M 1M",
        ],
    );
    let m = compare_map(d, "p.qcow2");
    assert!(m.iter().any(|r| !r.2 && r.3));
    let r = inspect::inspect(&d.join("p.qcow2")).unwrap();
    let info = common::info(d, "p.qcow2");
    assert_eq!(r.format, Format::Qcow2);
    assert_eq!(r.virtual_size, info["virtual-size"].as_u64().unwrap());
    assert_eq!(r.cluster_size, info["cluster-size"].as_u64());
    assert_eq!(r.actual_size, info["actual-size"].as_u64().unwrap());
}

#[test]
fn qcow2_with_backing_files() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io_f(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 4M 1M"],
    );
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
            "12M",
        ],
    );
    qemu_io_f(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 5 512k 1M",
            "write -z 4M 256k",
            "write -P 6 10M 64k",
        ],
    );
    compare_map(d, "top.qcow2");
    let r = inspect::inspect(&d.join("top.qcow2")).unwrap();
    assert_eq!(
        r.backing_filename.as_deref(),
        Some(d.join("base.qcow2").as_path())
    );
    assert_eq!(r.backing_filename_format, Some(Format::Qcow2));
    assert_eq!(r.backing_chain.len(), 1);

    // A raw backing file: its holes are present in qemu-img's eyes, and still zero.
    qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_io_f(d, "raw", "base.raw", &["write -P 9 1M 64k"]);
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
            "over.qcow2",
            "6M",
        ],
    );
    qemu_io_f(d, "qcow2", "over.qcow2", &["write -P 8 2M 64k"]);
    compare_map(d, "over.qcow2");
}

#[test]
fn qcow2_compressed() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "src.raw", "4M"]);
    qemu_io_f(
        d,
        "raw",
        "src.raw",
        &["write -P 3 0 1M", "write -P 4 2M 512k"],
    );
    qemu_img(
        d,
        &["convert", "-q", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    );
    let m = compare_map(d, "c.qcow2");
    assert!(m.iter().any(|r| r.2));
}

#[test]
fn qcow2_internal_snapshots_are_listed_like_qemu_img() {
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"]);
    qemu_io_f(d, "qcow2", "s.qcow2", &["write -P 1 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "first", "s.qcow2"]);
    qemu_io_f(d, "qcow2", "s.qcow2", &["write -P 2 2M 1M"]);
    qemu_img(d, &["snapshot", "-c", "second", "s.qcow2"]);
    let r = inspect::inspect(&d.join("s.qcow2")).unwrap();
    let info = common::info(d, "s.qcow2");
    let want: Vec<(String, String, u64)> = info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["name"].as_str().unwrap().to_string(),
                s["date-sec"].as_u64().unwrap(),
            )
        })
        .collect();
    let got: Vec<(String, String, u64)> = r
        .snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone(), u64::from(s.date_sec)))
        .collect();
    assert_eq!(got, want);
    // FILE@SNAP maps the snapshot's view: the second write is not in "first".
    let snap = inspect::inspect_with(
        &d.join("s.qcow2@first"),
        &InspectOptions {
            map: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(snap.snapshot.as_deref(), Some("first"));
    let map = runs(&serde_json::to_value(snap.map.unwrap()).unwrap());
    assert_eq!(class_at(&map, 0), Some((true, false)));
    assert_eq!(class_at(&map, 2 * MIB), Some((false, true)));
    let text = kiln::output::inspect::render_text(&r);
    assert!(
        text.contains("second") && text.contains("cluster_size: 65536"),
        "{text}"
    );
}

/// `kiln inspect --map --json`, the real binary, agrees with `qemu-img map` on the sample disks.
#[test]
fn the_cli_map_agrees_with_qemu_img_map() {
    // Copies without holes in the host file: a checkout may store the sample disks sparsely, and
    // qemu-img map then reports holes inside allocated qcow2 clusters as zero (it asks the host
    // file too), which kiln's map does not (a known difference, noted in the README).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let t = common::tmp();
    let dir = t.path().to_path_buf();
    for file in ["system.qcow2", "data.raw"] {
        let r = common::tool_in(
            &dir,
            "cp",
            &["--sparse=never", &common::path_str(&src.join(file)), file],
        );
        assert_eq!(r.status, 0, "{}", r.stderr);
    }
    for file in ["system.qcow2", "data.raw"] {
        let out = common::kiln_in(&dir, &["--json", "inspect", "--map", file]).ok();
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["filename"], file);
        let kiln = runs(&v["map"]);
        let qemu: Value =
            serde_json::from_str(&qemu_img(&dir, &["map", "--output=json", file])).unwrap();
        let qemu = runs(&qemu);
        assert_same_classes(&kiln, &qemu, file);
        let text = common::kiln_in(&dir, &["inspect", file]).ok();
        assert!(text.stdout.contains("virtual size"), "{}", text.stdout);
    }
}
