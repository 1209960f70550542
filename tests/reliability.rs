//! Reliability and safety, through the real binary: creates killed at 20 moments, sources that
//! change while being read, a target that fills up, the backing-file gate, symlinks planted in the
//! store, and sources that stay byte-for-byte unchanged on every create path.
//!
//! Moments are reached with the debug-build hook `KILN_TEST_STOP_AT=NAME[#N]` (src/testhook.rs):
//! kiln stops itself there and the test kills it, or changes a file and lets it go on.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Two sources: a 20 MiB raw system disk full of noise (5 chunks) and a qcow2 data disk.
fn crash_sources(d: &Path) {
    fs::write(d.join("sys.raw"), noise(1, 20 << 20)).unwrap();
    let data = d.join("data.raw");
    sparse_raw(&data, 32 << 20);
    write_at(&data, 1 << 20, &noise(2, 6 << 20));
    write_at(&data, 24 << 20, &noise(3, 3 << 20));
    qemu_img(d, &["convert", "-O", "qcow2", "data.raw", "data.qcow2"]);
}

fn describe_all(d: &Path) -> Vec<Value> {
    let r = kiln_in(d, &["--json", "--store", "st", "describe"]);
    assert_eq!(r.status, 0, "describe failed after a kill: {}", r.stderr);
    serde_json::from_str::<Value>(&r.stdout)
        .unwrap_or_else(|e| panic!("describe is not JSON after a kill ({e}): {}", r.stdout))
        .as_array()
        .cloned()
        .unwrap()
}

fn staging_leftovers(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".kiln-"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

const MOMENTS: [&str; 20] = [
    "prepared",
    "staging",
    "chunk#1",
    "chunk#2",
    "chunk#3",
    "chunk#5",
    "chunk#7",
    "chunk#8",
    "disk-copied#1",
    "disk-copied#2",
    "hashing#1",
    "hashing#4",
    "hashing#12",
    "hashing#25",
    "disk-done#1",
    "disk-done#2",
    "manifest",
    "sums",
    "renamed",
    "available",
];

/// SIGKILL at 20 moments of a store create (early, mid-copy, during hashing, during publish):
/// never an Available image that fails `verify`, the store always readable, nothing Creating once
/// the creator is dead, and a new create with the same name and token then succeeds and sweeps
/// the dead one's staging directory.
#[test]
fn a_create_killed_at_any_of_20_moments_never_leaves_a_wrong_available_image() {
    let t = tmp();
    let d = t.path();
    crash_sources(d);
    for (i, moment) in MOMENTS.iter().enumerate() {
        let _ = fs::remove_dir_all(d.join("st"));
        let token = format!("tok-{i}");
        let args = [
            "--store",
            "st",
            "create",
            "--name",
            "crash-test",
            "--client-token",
            &token,
            "-j",
            "2",
            "-q",
            "--disk",
            "snapshot=sys.raw,device=/dev/xvda",
            "--disk",
            "snapshot=data.qcow2,device=/dev/xvdb",
        ];
        let mut child = kiln_stopped_at(d, &args, moment);
        signal(&child, Signal::SIGKILL);
        child.wait().unwrap();

        let images = describe_all(d);
        for img in &images {
            let id = img["ImageId"].as_str().unwrap();
            assert_ne!(
                img["Status"], "Creating",
                "{moment}: dead creator shows Creating"
            );
            if img["Status"] == "Available" {
                let v = kiln_in(d, &["--store", "st", "verify", id, "-q"]);
                assert_eq!(
                    v.status, 0,
                    "{moment}: Available image fails verify: {}",
                    v.stderr
                );
            }
        }
        // The same name and token go through now (or return the finished image).
        let again = kiln_in(d, &args);
        assert_eq!(again.status, 0, "{moment}: retry failed: {}", again.stderr);
        let id = again.stdout.trim().to_string();
        kiln_in(d, &["--store", "st", "verify", &id, "-q"]).ok();
        let available: Vec<_> = describe_all(d)
            .into_iter()
            .filter(|i| i["Status"] == "Available")
            .collect();
        assert_eq!(available.len(), 1, "{moment}: {available:?}");
        assert!(
            staging_leftovers(&d.join("st/images")).is_empty(),
            "{moment}: staging left behind: {:?}",
            staging_leftovers(&d.join("st/images"))
        );
    }
}

/// The same with `--output-dir`: a kill before the rename leaves no output directory (only a
/// hidden staging directory, swept by the next create); after it, a complete image.
#[test]
fn a_killed_create_into_an_output_dir_leaves_nothing_that_looks_finished() {
    let t = tmp();
    let d = t.path();
    crash_sources(d);
    for moment in [
        "staging",
        "chunk#3",
        "hashing#5",
        "disk-done#1",
        "sums",
        "renamed",
    ] {
        let _ = fs::remove_dir_all(d.join("out"));
        let args = [
            "create",
            "--name",
            "crash-dir",
            "--output-dir",
            "out",
            "-q",
            "--disk",
            "snapshot=sys.raw,device=/dev/xvda",
            "--disk",
            "snapshot=data.qcow2,device=/dev/xvdb",
        ];
        let mut child = kiln_stopped_at(d, &args, moment);
        signal(&child, Signal::SIGKILL);
        child.wait().unwrap();
        if d.join("out").exists() {
            assert_eq!(moment, "renamed", "output visible before the rename");
            kiln_in(d, &["verify", "out", "-q"]).ok();
            continue;
        }
        assert_eq!(staging_leftovers(d).len(), 1, "{moment}");
        kiln_in(d, &args).ok();
        kiln_in(d, &["verify", "out", "-q"]).ok();
        assert!(staging_leftovers(d).is_empty(), "{moment}: not swept");
    }
}

/// Starts a create of `sys.raw` + `data.qcow2` into `out`, stopped after its second chunk.
fn create_paused(d: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "--json",
        "create",
        "--name",
        "changing",
        "--output-dir",
        "out",
        "-j",
        "1",
        "--disk",
        "snapshot=sys.raw,device=/dev/xvda",
        "--disk",
        "snapshot=data.qcow2,device=/dev/xvdb",
    ];
    args.extend_from_slice(extra);
    kiln_stopped_at(d, &args, "chunk#2")
}

fn resume_and_expect_changed(d: &Path, child: std::process::Child, what: &str) {
    signal(&child, Signal::SIGCONT);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stdout} {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["Code"], "InvalidSnapshot.Changed", "{what}: {v}");
    assert!(v["Message"].as_str().unwrap().contains(what), "{v}");
    assert!(!d.join("out").exists(), "{what}: an image was published");
    assert!(staging_leftovers(d).is_empty(), "{what}: staging left");
}

/// Sources that shrink, are rewritten in place, or are replaced while being read are reported
/// (InvalidSnapshot.Changed, naming the file), and nothing is published: a truncated raw would
/// otherwise read as holes, and a truncated qcow2 as corrupt.
#[test]
fn sources_that_change_during_the_copy_are_reported_not_copied() {
    let t = tmp();
    let d = t.path();
    crash_sources(d);
    let original = fs::read(d.join("sys.raw")).unwrap();

    // A raw source truncated mid-copy.
    let child = create_paused(d, &[]);
    fs::OpenOptions::new()
        .write(true)
        .open(d.join("sys.raw"))
        .unwrap()
        .set_len(6 << 20)
        .unwrap();
    resume_and_expect_changed(
        d,
        child,
        "sys.raw changed size from 20971520 to 6291456 bytes",
    );
    fs::write(d.join("sys.raw"), &original).unwrap();

    // The same size, rewritten in place.
    let child = create_paused(d, &[]);
    write_at(&d.join("sys.raw"), 17 << 20, b"rewritten");
    resume_and_expect_changed(d, child, "sys.raw was written to");
    fs::write(d.join("sys.raw"), &original).unwrap();

    // A qcow2 source truncated mid-copy (its tables then point past the end).
    let qcow = fs::read(d.join("data.qcow2")).unwrap();
    let child = create_paused(d, &[]);
    fs::OpenOptions::new()
        .write(true)
        .open(d.join("data.qcow2"))
        .unwrap()
        .set_len(300_000)
        .unwrap();
    resume_and_expect_changed(d, child, "data.qcow2 changed size");
    fs::write(d.join("data.qcow2"), &qcow).unwrap();

    // Replaced by another file under the same name.
    let child = create_paused(d, &[]);
    fs::write(d.join("other.raw"), &original).unwrap();
    fs::rename(d.join("other.raw"), d.join("sys.raw")).unwrap();
    resume_and_expect_changed(d, child, "sys.raw was replaced");

    // Left alone, the same create succeeds.
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "changing",
            "--output-dir",
            "out",
            "-q",
            "--disk",
            "snapshot=sys.raw,device=/dev/xvda",
            "--disk",
            "snapshot=data.qcow2,device=/dev/xvdb",
        ],
    )
    .ok();
}

/// A write that fails (here: past RLIMIT_FSIZE, as on a filesystem that fills up) stops every
/// worker, removes the partial output and reports the file and offset.
#[test]
fn a_failing_write_stops_the_copy_removes_partial_output_and_names_file_and_offset() {
    let t = tmp();
    let d = t.path();
    for i in 0..3u64 {
        fs::write(d.join(format!("d{i}.raw")), noise(10 + i, 48 << 20)).unwrap();
    }
    // qcow2 output: a raw output sets its full length first, which RLIMIT_FSIZE refuses at once
    // (naming the file); the filling filesystem below covers raw.
    {
        let fmt = "qcow2";
        let out = std::process::Command::new("prlimit")
            .arg("--fsize=8388608")
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "--json",
                "create",
                "--name",
                "too-big",
                "--output-dir",
                "out",
                "--format",
                fmt,
                "-j",
                "2",
                "--progress",
                "json",
                "--disk",
                "snapshot=d0.raw,device=/dev/xvda",
                "--disk",
                "snapshot=d1.raw,device=/dev/xvdb",
                "--disk",
                "snapshot=d2.raw,device=/dev/xvdc",
            ])
            .current_dir(d)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{fmt}: {stdout} {stderr}");
        let err: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(
            ["IoError", "InsufficientSpace"].contains(&err["Code"].as_str().unwrap()),
            "{err}"
        );
        let msg = err["Message"].as_str().unwrap();
        assert!(
            msg.contains(".kiln-") && msg.contains("at offset"),
            "{fmt}: {msg}"
        );
        // Workers stopped: no disk ran to its end after the first failure.
        assert!(
            !stderr.contains("\"finished\":true"),
            "{fmt}: a disk finished: {stderr}"
        );
        assert!(!d.join("out").exists());
        assert!(
            staging_leftovers(d).is_empty(),
            "{fmt}: partial output left"
        );
    }
}

/// The target filesystem fills up during the copy (a 32 MiB tmpfs, mounted in a user and mount
/// namespace so no root is needed, filled by another file while kiln is paused after its space
/// check): InsufficientSpace naming the file and offset, nothing published, no staging left.
#[test]
fn a_filesystem_that_fills_up_mid_copy_gives_insufficient_space_and_leaves_nothing() {
    let t = tmp();
    let d = t.path();
    for i in 0..3u64 {
        let p = d.join(format!("d{i}.raw"));
        sparse_raw(&p, 64 << 20);
        write_at(&p, 0, &noise(20 + i, 4 << 20));
    }
    fs::create_dir(d.join("fs")).unwrap();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    for fmt in ["raw", "qcow2"] {
        let script = format!(
            r#"set -e
mount -t tmpfs -o size=32m kiln-test fs
KILN_TEST_STOP_AT=staging {kiln} --json create --name fills-up --output-dir fs/img --format {fmt} -j 2 \
  --disk snapshot=d0.raw,device=/dev/xvda --disk snapshot=d1.raw,device=/dev/xvdb \
  --disk snapshot=d2.raw,device=/dev/xvdc > err.json &
pid=$!
while ! grep -q '^[^)]*) T' /proc/$pid/stat; do sleep 0.01; done
dd if=/dev/zero of=fs/filler bs=1M count=26 status=none
kill -CONT $pid
rc=0; wait $pid || rc=$?
echo "rc=$rc"
echo "left=$(ls -A fs | grep -v '^filler$' | tr '\n' ' ')"
"#
        );
        let r = tool_in(d, "unshare", &["-Urm", "sh", "-c", &script]);
        assert_eq!(r.status, 0, "{fmt}: {} {}", r.stdout, r.stderr);
        assert!(r.stdout.contains("rc=1\n"), "{fmt}: {}", r.stdout);
        assert!(
            r.stdout.contains("left=\n"),
            "{fmt}: left behind: {}",
            r.stdout
        );
        let err: Value = serde_json::from_str(&fs::read_to_string(d.join("err.json")).unwrap())
            .unwrap_or_else(|e| panic!("{fmt}: {e}: {}", r.stderr));
        assert_eq!(err["Code"], "InsufficientSpace", "{fmt}: {err}");
        let msg = err["Message"].as_str().unwrap();
        assert!(
            msg.contains(".kiln-") && msg.contains("at offset"),
            "{fmt}: {msg}"
        );
    }
}
