//! Golden outputs: fixed inputs through `kiln convert` and `kiln create --output-dir`, and the
//! SHA-256 of every disk file written, pinned as constants.
//!
//! These constants pin that **the same input gives byte-identical outputs and the same SHA-256 as
//! before the reshape** ("One clear path through the code"): they were computed with the binary
//! of main at the reshape's start, and this test fails if any byte of any output disk changes.
//! A change here is a change of behaviour, never a refactoring: only update a constant together
//! with a deliberate, documented change of the output format.
//!
//! The inputs are the checked-in `testdata/system.qcow2` and `testdata/data.raw`, and a backing
//! chain and an internal snapshot built here. Those are made with `qemu-img`/`qemu-io`, whose
//! on-disk layout may differ between QEMU versions, but kiln's output depends only on the guest
//! bytes they hold (which this test writes, byte for byte), not on where qemu-img put them.

use crate::common::*;
use std::path::{Path, PathBuf};

fn testdata(name: &str) -> String {
    path_str(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name),
    )
}

/// The SHA-256 of `file` (relative to `dir`), checked against `want` with a message naming `what`.
fn assert_sha(dir: &Path, file: &str, what: &str, want: &str) {
    let got = sha256_file(&dir.join(file));
    assert_eq!(
        got, want,
        "{what}: {file} is no longer byte-identical to the golden output"
    );
}

/// The SHA256SUMS line kiln wrote for `file` in `image_dir`, and the file's SHA-256, agree.
fn assert_listed(image_dir: &Path, file: &str) {
    let sums = std::fs::read_to_string(image_dir.join("SHA256SUMS")).expect("SHA256SUMS");
    let listed = sums
        .lines()
        .find_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            (name == file).then(|| sum.to_string())
        })
        .unwrap_or_else(|| panic!("{file} not in SHA256SUMS:\n{sums}"));
    assert_eq!(
        listed,
        sha256_file(&image_dir.join(file)),
        "SHA256SUMS line for {file}"
    );
}

#[test]
fn convert_outputs_are_byte_identical_to_the_golden_ones() {
    let t = tmp();
    let d = t.path();
    let system = testdata("system.qcow2");
    let data = testdata("data.raw");
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["-O", "qcow2", &system],
            "a.qcow2",
            "426121171714c9424e19663ce79a424c299245ce859d30642a60fd8ac225329e",
        ),
        (
            &["-O", "qcow2", "-j", "1", &system],
            "a1.qcow2",
            "426121171714c9424e19663ce79a424c299245ce859d30642a60fd8ac225329e",
        ),
        (
            &["-O", "raw", &system],
            "b.raw",
            "8d6a1827021f1b48bb57cfa34d7400975763e3fbe31f6ba4c2b1c663a610b759",
        ),
        (
            &["-O", "qcow2", "-c", "zlib", &system],
            "c.qcow2",
            "eb963c5b490f276aed48e9d48976adcb14fa99567d93191f4c92419aede91259",
        ),
        (
            &["-O", "qcow2", "-j", "3", "-c", "zstd", &system],
            "d.qcow2",
            "c2b4f0b3f25b501a69b847f11c4cd809d4f45139cf7b1f322658aca51742997a",
        ),
        (
            &["-O", "qcow2", "--cluster-size", "4K", &data],
            "e.qcow2",
            "52404d48d9d47cbc587035cffc622f5fa0aad77dd3fa299642f3673e25a0a134",
        ),
        (
            &["-O", "qcow2", &data],
            "f.qcow2",
            "825b583f1c41f8a43944540f503463df8a1fffef33dc37c014bacd29ff200988",
        ),
    ];
    for (args, out, want) in cases {
        let mut all = vec!["convert", "--sha256"];
        all.extend_from_slice(args);
        all.push(out);
        let r = kiln_in(d, &all).ok();
        let what = format!("kiln {}", all.join(" "));
        assert_sha(d, out, &what, want);
        // `--sha256` prints the output's SHA-256: the same one.
        assert!(r.stdout.contains(want), "{what}: printed {}", r.stdout);
    }
}

/// Runs `kiln create ARGS --output-dir NAME` in `d`, checks every disk's SHA-256 against `want`
/// and against the SHA256SUMS line kiln wrote, and that SHA256SUMS lists nothing else but
/// `manifest.json`.
fn create_golden(d: &Path, name: &str, args: &[&str], want: &[(&str, &str)]) -> PathBuf {
    let mut all = vec!["create", "-q", "--output-dir", name];
    all.extend_from_slice(args);
    kiln_in(d, &all).ok();
    let dir = d.join(name);
    let what = format!("kiln {}", all.join(" "));
    for (file, sum) in want {
        assert_sha(&dir, file, &what, sum);
        assert_listed(&dir, file);
    }
    assert_listed(&dir, "manifest.json");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("SHA256SUMS");
    assert_eq!(sums.lines().count(), want.len() + 1, "{what}: {sums}");
    assert_sums(&dir);
    dir
}

#[test]
fn create_outputs_are_byte_identical_to_the_golden_ones() {
    let t = tmp();
    let d = t.path();
    let system = testdata("system.qcow2");
    let data = testdata("data.raw");
    // The README's main job: a grown GPT system disk (relocated), a grown data disk, an empty one.
    let sys = format!("snapshot={system},type=system,size=128M");
    let dat = format!("snapshot={data},size=64M");
    create_golden(
        d,
        "readme",
        &[
            "--name",
            "demo",
            "--boot-mode",
            "UEFI",
            "--detect",
            "--relocate-gpt",
            "--disk",
            &sys,
            "--disk",
            &dat,
            "--disk",
            "size=1G",
        ],
        &[
            (
                "xvda.qcow2",
                "34802aacbb7840f313c70d52fe3907469267e3d563449abbb8a6d43b3409d667",
            ),
            (
                "xvdb.qcow2",
                "b197096501cf5ecea328cea7d16f8a07b793b29be661ecc4235fc02b1e05e29f",
            ),
            (
                "xvdc.qcow2",
                "1596d0998445c57103d0e6860b0f6d2a67e036ffea71b64d1eb21cf2a66e6845",
            ),
        ],
    );
    // Raw output, a grown system disk left as it is (no --relocate-gpt), data disk as it is.
    let sys = format!("snapshot={system},type=system,size=96M");
    let dat = format!("snapshot={data}");
    create_golden(
        d,
        "raw",
        &[
            "--name", "raw", "--format", "raw", "--disk", &sys, "--disk", &dat,
        ],
        &[("xvda.raw", RAW_XVDA), ("xvdb.raw", RAW_XVDB)],
    );
    // Compressed (zstd) qcow2 with 128 KiB clusters, the system disk from `--snapshot`.
    create_golden(
        d,
        "zstd",
        &[
            "--name",
            "zstd",
            "--compress",
            "zstd",
            "--cluster-size",
            "128K",
            "--snapshot",
            &system,
        ],
        &[("xvda.qcow2", ZSTD_XVDA)],
    );
}

const RAW_XVDA: &str = "e9cfe25776f6dd78d5340310fd9abae31489cb8600cea3946221941064185b6a";
const RAW_XVDB: &str = "4ebb0fd83908f741dde8bc0d363c1fd19ff3dd8193c43a953aa9a63896569cff";
const ZSTD_XVDA: &str = "b536638d2c05bae146a6f0e58916be74cc522533cd9e865aba4a0334f136e048";

/// `qemu-img` with space-separated arguments.
fn img(dir: &Path, args: &str) {
    qemu_img(dir, &args.split(' ').collect::<Vec<_>>());
}

/// A three-deep chain (raw base, two qcow2 overlays) and a qcow2 with an internal snapshot, every
/// guest byte written by this test.
#[test]
fn chain_and_snapshot_outputs_are_byte_identical_to_the_golden_ones() {
    let t = tmp();
    let d = t.path();
    let base = d.join("base.raw");
    sparse_raw(&base, 24 << 20);
    write_at(&base, 0, &noise(1, 3 << 20));
    write_at(&base, 7 << 20, &noise(2, (2 << 20) + 4096));
    write_at(&base, 16 << 20, &vec![0u8; 1 << 20]);
    write_at(&base, (24 << 20) - 4096, &noise(3, 4096));
    img(d, "create -q -f qcow2 -b base.raw -F raw mid.qcow2");
    let mid = [
        "write -P 0x5a 1M 512k",
        "write -z 7M 64k",
        "write -P 0xa5 20M 1M",
    ];
    qemu_io(d, "mid.qcow2", &mid);
    img(
        d,
        "create -q -f qcow2 -o cluster_size=4096 -b mid.qcow2 -F qcow2 top.qcow2",
    );
    let top = [
        "write -P 0x33 2052k 8k",
        "write -z 0 4k",
        "write -P 0 20M 4k",
    ];
    qemu_io(d, "top.qcow2", &top);

    img(d, "create -q -f qcow2 snap.qcow2 16M");
    qemu_io(
        d,
        "snap.qcow2",
        &["write -P 0x44 0 2M", "write -P 0x45 9M 64k"],
    );
    img(d, "snapshot -c s1 snap.qcow2");
    qemu_io(d, "snap.qcow2", &["write -P 0x55 1M 2M", "write -z 9M 64k"]);

    // (arguments, output, golden SHA-256, what qemu-img must read as the same guest bytes)
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (
            &["-O", "qcow2", "top.qcow2"],
            "chain.qcow2",
            CHAIN_QCOW2,
            "top.qcow2",
        ),
        (
            &["-O", "raw", "top.qcow2"],
            "chain.raw",
            CHAIN_RAW,
            "top.qcow2",
        ),
        (
            &["-O", "qcow2", "-c", "zlib", "top.qcow2"],
            "chain.zlib.qcow2",
            CHAIN_ZLIB,
            "top.qcow2",
        ),
        (&["-O", "qcow2", "snap.qcow2@s1"], "s1.qcow2", SNAP_S1, ""),
        (
            &["-O", "qcow2", "snap.qcow2"],
            "now.qcow2",
            SNAP_NOW,
            "snap.qcow2",
        ),
    ];
    for (args, out, want, same_as) in cases {
        let mut all = vec!["convert"];
        all.extend_from_slice(args);
        all.push(out);
        kiln_in(d, &all).ok();
        assert_sha(d, out, &format!("kiln {}", all.join(" ")), want);
        if !same_as.is_empty() {
            assert_same(d, same_as, out);
        }
    }
}

const CHAIN_QCOW2: &str = "da5c9430047dd204582396eedd09928c0c0e2419090f07dd2c29eb379b8e082e";
const CHAIN_RAW: &str = "a51ac784a683284798df4d2747ef646f58c0019a949d523f76eb2419fbcc718b";
const CHAIN_ZLIB: &str = "be12cd0b794e15ab7ae1250636d9230f0ddaecc27c35682a8fe0d00d757c382d";
const SNAP_S1: &str = "bbbefb5398a85f1d644fef2c8ca556a09abd56918c730a78be78b911eeb77663";
const SNAP_NOW: &str = "f7f92c5db70114e3050d222297e42b3292772387ee423bc4dae8aae240091b37";
