//! Reliability and safety, through the real binary: creates killed at 20 moments, sources that
//! change while being read, a target that fills up, the backing-file gate, symlinks planted in the
//! store, and sources that stay byte-for-byte unchanged on every create path.
//!
//! Moments are reached with the debug-build hook `KILN_TEST_STOP_AT=NAME[#N]` (src/testhook.rs):
//! kiln stops itself there and the test kills it, or changes a file and lets it go on.

use std::fs;
use std::path::Path;

use crate::common::*;
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
/// worker (that part is pinned by the engine's unit test `a_failure_stops_every_worker`), removes
/// the partial output and reports the file and offset.
#[test]
fn a_failing_write_stops_the_copy_removes_partial_output_and_names_file_and_offset() {
    let t = tmp();
    let d = t.path();
    fs::write(d.join("big.raw"), noise(10, 48 << 20)).unwrap();
    let mut args: Vec<String> = [
        "--json",
        "create",
        "--name",
        "too-big",
        "--output-dir",
        "out",
        "-j",
        "2",
        "--progress",
        "json",
        "--disk",
        "snapshot=big.raw,device=/dev/xvda",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..4u64 {
        fs::write(d.join(format!("s{i}.raw")), noise(11 + i, 256 << 10)).unwrap();
        args.push("--disk".into());
        args.push(format!("snapshot=s{i}.raw"));
    }
    // qcow2 output (the default): a raw output sets its full length first, which RLIMIT_FSIZE
    // refuses at once (naming the file); the filling filesystem below covers raw.
    let out = std::process::Command::new("prlimit")
        .arg("--fsize=2097152")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .current_dir(d)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    let err: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(err["Code"], "IoError", "{err}");
    let msg = err["Message"].as_str().unwrap();
    assert!(
        msg.contains(".kiln-") && msg.contains("xvda.qcow2") && msg.contains("at offset"),
        "{msg}"
    );
    assert!(!d.join("out").exists());
    assert!(staging_leftovers(d).is_empty(), "partial output left");
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

/// A qcow2 output has holes (the rest of its header cluster). On tmpfs, reading a hole through a
/// mapping allocates a page, so hashing a finished disk that was mapped whole died of SIGBUS when
/// the filesystem was full (a flake of the test above, then reproduced here every time). The
/// output is built on a tmpfs left with room for its written pages and 8 more, fewer than its
/// holes: the create succeeds, and the image is whole.
#[test]
fn a_nearly_full_tmpfs_does_not_crash_the_hash_of_a_qcow2_with_holes() {
    let t = tmp();
    let d = t.path();
    let p = d.join("src.raw");
    sparse_raw(&p, 8 << 20);
    write_at(&p, 0, &noise(31, 3 << 20));
    fs::create_dir(d.join("fs")).unwrap();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let create = format!(
        "{kiln} --json create -j 1 --name holes --disk snapshot=src.raw,device=/dev/xvda --output-dir"
    );
    // The same qcow2, written by `convert` (which hashes nothing) on the same tmpfs, gives the
    // pages the output takes there.
    let script = format!(
        r#"set -e
mount -t tmpfs -o size=8m kiln-test fs
{kiln} convert -O qcow2 -j 1 src.raw fs/ref.qcow2
pages=$(( $(stat -c %b fs/ref.qcow2) / 8 ))
holes=$(( ($(stat -c %s fs/ref.qcow2) + 4095) / 4096 - pages ))
echo "pages=$pages holes=$holes"
rm fs/ref.qcow2
KILN_TEST_STOP_AT=staging {create} fs/img > out.json &
pid=$!
while ! grep -q '^[^)]*) T' /proc/$pid/stat; do sleep 0.01; done
free=$(df -B4096 --output=avail fs | tail -1)
dd if=/dev/zero of=fs/filler bs=4096 count=$((free - pages - 8)) status=none
kill -CONT $pid
rc=0; wait $pid || rc=$?
echo "rc=$rc"
cp -r fs/img img
"#
    );
    let r = tool_in(d, "unshare", &["-Urm", "sh", "-c", &script]);
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let holes: u64 = r
        .stdout
        .split_once("holes=")
        .and_then(|(_, rest)| rest.lines().next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        holes > 8,
        "the output has {holes} pages of holes: the test needs more than 8"
    );
    assert!(r.stdout.contains("rc=0\n"), "{} {}", r.stdout, r.stderr);
    assert_sums(&d.join("img"));
    assert_same(d, "src.raw", "img/xvda.qcow2");
}

/// A qcow2 may name any file as its backing file. kiln follows one only inside the named image's
/// directory tree or under `--backing-dir`, regular files only, no protocols; the refusal names the
/// path and the flag, on every command that opens sources.
#[test]
fn backing_files_pass_a_gate() {
    let t = tmp();
    let d = t.path();
    fs::create_dir_all(d.join("secret")).unwrap();
    fs::create_dir_all(d.join("img")).unwrap();
    let mut key = b"-----BEGIN OPENSSH PRIVATE KEY-----\n".to_vec();
    key.resize(1 << 20, b'k');
    fs::write(d.join("secret/id_rsa"), &key).unwrap();
    let secret = fs::canonicalize(d.join("secret/id_rsa")).unwrap();
    let secret_s = path_str(&secret);
    qemu_img(
        &d.join("img"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &secret_s,
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let denied = |args: &[&str], what: &str| {
        let r = kiln_in(d, args);
        assert_eq!(r.status, 2, "{what}: {} {}", r.stdout, r.stderr);
        assert_eq!(
            r.code(),
            "InvalidSnapshot.BackingDenied",
            "{what}: {}",
            r.stdout
        );
        r.stdout
    };
    let msg = denied(
        &[
            "--json",
            "create",
            "--name",
            "gate",
            "--snapshot",
            "img/top.qcow2",
            "--output-dir",
            "out",
        ],
        "create",
    );
    assert!(msg.contains(&secret_s), "names the path: {msg}");
    assert!(msg.contains("--backing-dir"), "names the flag: {msg}");
    assert!(!d.join("out").exists());
    denied(&["--json", "convert", "img/top.qcow2", "c.raw"], "convert");
    assert!(!d.join("c.raw").exists());
    denied(&["--json", "inspect", "img/top.qcow2"], "inspect");

    // Allowed with --backing-dir; the manifest lists every file read.
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "gate",
            "--snapshot",
            "img/top.qcow2",
            "--output-dir",
            "out",
            "--backing-dir",
            "secret",
            "-q",
        ],
    )
    .ok();
    let m = manifest(&d.join("out"));
    let files: Vec<String> = m["DiskDeviceMappings"][0]["Source"]["FilesRead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["Path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files[0].ends_with("img/top.qcow2") && files[1] == secret_s,
        "{files:?}"
    );

    // A symlink inside the tree that leads out of it is judged by where it leads.
    std::os::unix::fs::symlink("../secret/id_rsa", d.join("img/base.raw")).unwrap();
    qemu_img(
        &d.join("img"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "link.qcow2",
        ],
    );
    denied(&["--json", "inspect", "img/link.qcow2"], "symlink");
    // A regular file inside the tree is followed without flags.
    fs::write(d.join("img/plain.raw"), vec![7u8; 1 << 20]).unwrap();
    qemu_img(
        &d.join("img"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "plain.raw",
            "-F",
            "raw",
            "ok.qcow2",
        ],
    );
    kiln_in(d, &["inspect", "img/ok.qcow2"]).ok();
    // Protocols, FIFOs and devices are refused (and nothing blocks on the FIFO).
    nix::unistd::mkfifo(&d.join("img/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    for (name, backing) in [
        ("nbd.qcow2", "nbd://localhost:10809/x"),
        (
            "json.qcow2",
            "json:{\"file.driver\":\"file\",\"file.filename\":\"/etc/passwd\"}",
        ),
        ("fifo.qcow2", "fifo"),
        ("dev.qcow2", "/dev/zero"),
    ] {
        qemu_img(
            &d.join("img"),
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", name, "1M",
            ],
        );
        let file = format!("img/{name}");
        denied(&["--json", "inspect", &file, "--backing-dir", "/dev"], name);
    }
}

/// Symlinks planted under the store are never followed: not for the store's own directories, not
/// for an image directory, not for a record; and names, tags and descriptions never reach a path.
#[test]
fn planted_symlinks_in_the_store_are_refused_and_names_never_become_paths() {
    let t = tmp();
    let d = t.path();
    fs::write(d.join("s.raw"), noise(5, 1 << 20)).unwrap();
    let create = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            name,
            "--snapshot",
            "s.raw",
            "-q",
        ];
        a.extend_from_slice(extra);
        kiln_in(d, &a)
    };
    let r = create(
        "paths-test",
        &["--description", "../../../etc/x", "--tag", "k=/etc/passwd"],
    );
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let id = serde_json::from_str::<Value>(&r.stdout).unwrap()["ImageId"]
        .as_str()
        .unwrap()
        .to_string();
    // Every path in the store comes from the generated id only.
    let mut names = Vec::new();
    for sub in ["images", "records", "locks"] {
        for e in fs::read_dir(d.join("st").join(sub)).unwrap() {
            names.push(e.unwrap().file_name().into_string().unwrap());
        }
    }
    assert!(names.iter().all(|n| n.starts_with(&id)), "{names:?}");
    for bad in ["../escape", "a/b", "..", "x\ny"] {
        let r = create(bad, &[]);
        assert_eq!(r.status, 2, "{bad}");
        assert_eq!(r.code(), "InvalidImageName.Malformed", "{bad}");
    }

    // An image directory swapped for a symlink to a forged copy: verify refuses it.
    let img = d.join("st/images").join(&id);
    fs::rename(&img, d.join("forged")).unwrap();
    std::os::unix::fs::symlink(d.join("forged"), &img).unwrap();
    let r = kiln_in(d, &["--json", "--store", "st", "verify", &id]);
    assert_eq!(r.code(), "InvalidStore.UnsafePath", "{}", r.stdout);
    fs::remove_file(&img).unwrap();
    fs::rename(d.join("forged"), &img).unwrap();
    kiln_in(d, &["--store", "st", "verify", &id, "-q"]).ok();

    // A disk file inside the image swapped for a symlink to another file: not read.
    let disk = img.join("xvda.qcow2");
    fs::copy(&disk, d.join("copy.qcow2")).unwrap();
    fs::remove_file(&disk).unwrap();
    std::os::unix::fs::symlink(d.join("copy.qcow2"), &disk).unwrap();
    let r = kiln_in(d, &["--json", "--store", "st", "verify", &id]);
    assert_eq!(r.status, 1, "{}", r.stdout);
    fs::remove_file(&disk).unwrap();
    fs::rename(d.join("copy.qcow2"), &disk).unwrap();

    // A record swapped for a symlink: describe does not read through it.
    let rec = d.join("st/records").join(format!("{id}.json"));
    fs::rename(&rec, d.join("rec.json")).unwrap();
    std::os::unix::fs::symlink(d.join("rec.json"), &rec).unwrap();
    let r = kiln_in(d, &["--json", "--store", "st", "describe"]);
    assert_ne!(r.status, 0, "{}", r.stdout);
    fs::remove_file(&rec).unwrap();
    fs::rename(d.join("rec.json"), &rec).unwrap();

    // The store's own directories swapped for symlinks: every command refuses.
    let elsewhere = d.join("elsewhere");
    fs::rename(d.join("st/records"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, d.join("st/records")).unwrap();
    let r = kiln_in(d, &["--json", "--store", "st", "describe"]);
    assert_eq!(r.code(), "InvalidStore.UnsafePath", "{}", r.stdout);
    let r = create("another", &[]);
    assert_eq!(r.code(), "InvalidStore.UnsafePath", "{}", r.stdout);
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        1,
        "nothing written through it"
    );
}

/// Every file in `dir` (not below it) with its SHA-256 and mtime.
fn fingerprint(dir: &Path) -> Vec<(String, String, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let m = fs::metadata(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_file(&p),
                m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Sources are opened read-only and never changed: every source file is hashed (and its mtime
/// read) before and after each create path: raw, qcow2, a backing chain, an internal snapshot, an
/// instance, a data image, a grown disk, compressed output, a dry run, and convert and inspect.
#[test]
fn no_create_path_changes_a_source() {
    let t = tmp();
    let d = t.path();
    let src = d.join("src");
    fs::create_dir(&src).unwrap();
    let raw = src.join("disk.raw");
    sparse_raw(&raw, 24 << 20);
    write_at(&raw, 1 << 20, &noise(7, 3 << 20));
    qemu_img(&src, &["convert", "-O", "qcow2", "disk.raw", "disk.qcow2"]);
    qcow2_overlay(&src, "disk.qcow2", "top.qcow2");
    qemu_io(&src, "top.qcow2", &["write -P 0x33 8m 1m"]);
    qemu_img(&src, &["snapshot", "-c", "before", "top.qcow2"]);
    qemu_io(&src, "top.qcow2", &["write -P 0x44 9m 1m"]);
    let xml = format!(
        "<domain type='kvm'><name>lab-vm</name><uuid>6f1d7c5e-0b1a-4c53-9d2e-2a4b6c8d0e1f</uuid>\
         <memory unit='KiB'>524288</memory><os><type arch='x86_64'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk></devices></domain>",
        path_str(&src.join("top.qcow2")),
        path_str(&raw)
    );
    fs::write(d.join("vm.xml"), xml).unwrap();
    let before = fingerprint(&src);
    assert_eq!(before.len(), 3);
    let runs: Vec<Vec<&str>> = vec![
        vec!["create", "--snapshot", "src/disk.raw"],
        vec!["create", "--snapshot", "src/disk.qcow2", "--format", "raw"],
        vec!["create", "--snapshot", "src/top.qcow2"],
        vec!["create", "--snapshot", "src/top.qcow2@before"],
        vec!["create", "--instance", "vm.xml"],
        vec!["create", "--data-image", "--disk", "snapshot=src/disk.raw"],
        vec![
            "create",
            "--disk",
            "snapshot=src/top.qcow2,device=/dev/xvda,size=1",
            "--compress",
            "zstd",
        ],
        vec!["create", "--snapshot", "src/disk.raw", "--dry-run"],
    ];
    for (i, run) in runs.iter().enumerate() {
        let out = format!("out{i}");
        let mut args = run.clone();
        args.extend_from_slice(&["--name", "untouched", "--output-dir", &out, "-q"]);
        let r = kiln_in(d, &args);
        assert_eq!(r.status, 0, "{run:?}: {}", r.stderr);
        assert_eq!(fingerprint(&src), before, "{run:?} changed a source");
    }
    kiln_in(d, &["convert", "-O", "qcow2", "src/top.qcow2", "c.qcow2"]).ok();
    kiln_in(d, &["inspect", "--map", "src/top.qcow2@before"]).ok();
    assert_eq!(
        fingerprint(&src),
        before,
        "convert or inspect changed a source"
    );

    // Never even opened for writing: the same creates with the sources on a read-only bind mount
    // (in a user and mount namespace), where any open for writing fails with EROFS.
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let mut script = String::from("set -e\nmount --bind src src\nmount -o remount,bind,ro src\n");
    script.push_str("if touch src/probe 2>/dev/null; then echo not-read-only; exit 1; fi\n");
    for (i, run) in runs.iter().enumerate() {
        script.push_str(&format!(
            "{kiln} {} --name untouched --output-dir ro{i} -q\n",
            run.join(" ")
        ));
    }
    let r = tool_in(d, "unshare", &["-Urm", "sh", "-c", &script]);
    assert_eq!(r.status, 0, "read-only sources: {} {}", r.stdout, r.stderr);
}

/// `describe` run over and over while several creates write their records always parses, and
/// shows only known statuses; a delete of an image still being created is refused.
#[test]
fn describe_during_concurrent_creates_always_parses() {
    let t = tmp();
    let d = t.path();
    let p = d.join("s.raw");
    sparse_raw(&p, 256 << 20);
    for i in 0..24u64 {
        write_at(&p, i * (10 << 20), &noise(40 + i, 1 << 20));
    }
    let mut children: Vec<std::process::Child> = (0..3)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["--store", "st", "create", "--name", &format!("busy-{i}")])
                .args(["--snapshot", "s.raw", "-j", "1", "-q"])
                .current_dir(d)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut polls = 0;
    let mut refused_delete = false;
    let mut deleted = 0;
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        for img in describe_all(d) {
            let status = img["Status"].as_str().unwrap();
            assert!(["Creating", "Available"].contains(&status), "{img}");
            if status == "Creating" && !refused_delete {
                let id = img["ImageId"].as_str().unwrap();
                let r = kiln_in(d, &["--json", "--store", "st", "delete", id]);
                if r.status != 0 {
                    assert_eq!(r.code(), "IncorrectImageStatus");
                    refused_delete = true;
                } else {
                    // It finished between describe and delete: then deleting it is right.
                    deleted += 1;
                }
            }
        }
        polls += 1;
    }
    for c in &mut children {
        assert!(c.wait().unwrap().success());
    }
    assert!(polls > 3, "creates ended before describe could watch them");
    assert!(refused_delete || deleted > 0);
    let all = describe_all(d);
    assert_eq!(all.len(), 3 - deleted);
    assert!(all.iter().all(|i| i["Status"] == "Available"), "{all:?}");
}
