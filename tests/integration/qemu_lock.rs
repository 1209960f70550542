//! QEMU's image locks, for real: `qemu-io` holding an image open for writing is found (with its pid),
//! and kiln's `SourceLock` makes `qemu-io` fail to open the image for writing until it is dropped.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, qcow2_overlay, qemu_img, tmp};
use kiln::error::Code;
use kiln::prepare::qemu_lock::{self, SourceLock};

/// `qemu-io -f qcow2 FILE` reading commands from a pipe: it holds the image open for writing (and
/// QEMU's write lock) until its stdin closes.
fn hold_for_writing(dir: &Path, file: &str) -> Child {
    Command::new("qemu-io")
        .args(["-f", "qcow2", file])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io")
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_qemu_writer_is_found_and_named_until_it_exits() {
    let t = tmp();
    let dir = t.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "vm.qcow2", "16M"]);
    let path = dir.join("vm.qcow2");
    let probe = File::open(&path).unwrap();
    assert_eq!(qemu_lock::writer_holding(&probe, &path).unwrap(), None);

    let mut child = hold_for_writing(dir, "vm.qcow2");
    wait_for(|| qemu_lock::writer_holding(&probe, &path).unwrap().is_some());
    let h = qemu_lock::writer_holding(&probe, &path).unwrap().unwrap();
    assert_eq!(h.pid, Some(child.id()), "{h:?}");
    assert!(h.command.as_deref().unwrap().contains("qemu-io"), "{h:?}");

    let e =
        qemu_lock::check_not_written(&[&path], Code::IncorrectInstanceStatus, false).unwrap_err();
    assert_eq!(e.code(), Code::IncorrectInstanceStatus);
    assert!(
        e.message().contains(&child.id().to_string()) && e.message().contains("qemu-io"),
        "{e}"
    );
    let e = qemu_lock::check_not_written(&[&path], Code::SnapshotNotReady, false).unwrap_err();
    assert_eq!(e.code().as_str(), "InvalidSnapshotId.NotReady");
    let warnings =
        qemu_lock::check_not_written(&[&path], Code::IncorrectInstanceStatus, true).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("inconsistent"));

    drop(child.stdin.take()); // qemu-io exits at end of input
    child.wait().unwrap();
    assert_eq!(qemu_lock::writer_holding(&probe, &path).unwrap(), None);
    assert!(
        qemu_lock::check_not_written(&[&path], Code::IncorrectInstanceStatus, false)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_read_only_qemu_user_is_not_a_writer() {
    let t = tmp();
    let dir = t.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "ro.qcow2", "16M"]);
    let path = dir.join("ro.qcow2");
    let mut child = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "ro.qcow2"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let probe = File::open(&path).unwrap();
    assert_eq!(qemu_lock::writer_holding(&probe, &path).unwrap(), None);
    drop(child.stdin.take());
    child.wait().unwrap();
}

fn qemu_io_write(dir: &Path, file: &str) -> (bool, String) {
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 512", file])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && !text.contains("Failed"), text)
}

#[test]
fn source_lock_keeps_qemu_from_writing_until_dropped() {
    let t = tmp();
    let dir = t.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"]);
    let path = dir.join("src.qcow2");

    let lock = SourceLock::acquire(&path).unwrap();
    let (ok, text) = qemu_io_write(dir, "src.qcow2");
    assert!(!ok, "qemu-io wrote while kiln held the source: {text}");
    assert!(text.contains("lock"), "{text}");
    // Read-only users are still welcome.
    let r = Command::new("qemu-img")
        .args(["info", "src.qcow2"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // kiln's own locks do not look like a writer.
    assert_eq!(qemu_lock::writer_holding(lock.file(), &path).unwrap(), None);

    drop(lock);
    let (ok, text) = qemu_io_write(dir, "src.qcow2");
    assert!(
        ok,
        "qemu-io could not write after the lock was dropped: {text}"
    );
}

#[test]
fn source_lock_on_a_chain_covers_the_backing_file() {
    let t = tmp();
    let dir = t.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    qcow2_overlay(dir, "base.qcow2", "top.qcow2");
    let o = kiln::format::open(&dir.join("top.qcow2"), &Default::default()).unwrap();
    let locks = qemu_lock::lock_chain(&o.info.chain).unwrap();
    assert_eq!(locks.len(), 2);
    let (ok, text) = qemu_io_write(dir, "base.qcow2");
    assert!(!ok, "{text}");
    drop(locks);
    let (ok, text) = qemu_io_write(dir, "base.qcow2");
    assert!(ok, "{text}");
}

/// `kiln create` on a disk a QEMU process has open for writing: refused, naming the process;
/// `--allow-running` copies it with a warning; once the holder exits, create succeeds.
#[test]
fn create_refuses_a_disk_open_for_writing() {
    let t = tmp();
    let d = t.path();
    common::qemu_img(d, &["create", "-q", "-f", "qcow2", "vm.qcow2", "8M"]);
    common::qemu_io(d, "vm.qcow2", &["write -P 0x5 0 1M"]);
    let mut child = hold_for_writing(d, "vm.qcow2");
    let pid = child.id().to_string();
    let path = d.join("vm.qcow2");
    wait_for(|| {
        qemu_lock::writer_holding(&File::open(&path).unwrap(), &path)
            .unwrap()
            .is_some()
    });
    let r = common::kiln_in(
        d,
        &[
            "--json",
            "create",
            "--name",
            "busy",
            "--snapshot",
            "vm.qcow2",
            "--output-dir",
            "o1",
        ],
    );
    assert_eq!(r.status, 2, "{}", r.stdout);
    assert_eq!(r.code(), "InvalidSnapshotId.NotReady");
    assert!(
        r.stdout.contains(&pid) && r.stdout.contains("--allow-running"),
        "{}",
        r.stdout
    );
    assert!(!d.join("o1").exists());
    let ok = common::kiln_in(
        d,
        &[
            "create",
            "--name",
            "busy",
            "--snapshot",
            "vm.qcow2",
            "--allow-running",
            "--output-dir",
            "o2",
        ],
    )
    .ok();
    assert!(ok.stderr.contains("inconsistent"), "{}", ok.stderr);
    drop(child.stdin.take());
    child.wait().unwrap();
    common::kiln_in(
        d,
        &[
            "create",
            "--name",
            "busy",
            "--snapshot",
            "vm.qcow2",
            "--output-dir",
            "o3",
        ],
    )
    .ok();
    common::assert_same(d, "vm.qcow2", "o3/xvda.qcow2");
}

/// `kiln convert` prepares its source as create does: a disk a QEMU process has open for writing
/// is refused the same way (same code, the process named), `--allow-running` converts it with a
/// warning, and once the holder exits the convert succeeds.
#[test]
fn convert_refuses_a_disk_open_for_writing() {
    let t = tmp();
    let d = t.path();
    common::qemu_img(d, &["create", "-q", "-f", "qcow2", "vm.qcow2", "8M"]);
    common::qemu_io(d, "vm.qcow2", &["write -P 0x5 0 1M"]);
    let mut child = hold_for_writing(d, "vm.qcow2");
    let pid = child.id().to_string();
    let path = d.join("vm.qcow2");
    wait_for(|| {
        qemu_lock::writer_holding(&File::open(&path).unwrap(), &path)
            .unwrap()
            .is_some()
    });
    let r = common::kiln_in(d, &["--json", "convert", "vm.qcow2", "o1.raw"]);
    assert_eq!(r.status, 2, "{}", r.stdout);
    assert_eq!(r.code(), "InvalidSnapshotId.NotReady");
    assert!(
        r.stdout.contains(&pid) && r.stdout.contains("--allow-running"),
        "{}",
        r.stdout
    );
    assert!(!d.join("o1.raw").exists());
    let ok = common::kiln_in(d, &["convert", "--allow-running", "vm.qcow2", "o2.raw"]).ok();
    assert!(ok.stderr.contains("inconsistent"), "{}", ok.stderr);
    drop(child.stdin.take());
    child.wait().unwrap();
    common::kiln_in(d, &["convert", "vm.qcow2", "o3.raw"]).ok();
    common::assert_same(d, "vm.qcow2", "o3.raw");
}

/// While `kiln convert` copies, it holds QEMU's locks on the source (and its backing file): QEMU
/// cannot open them for writing until the convert is done.
#[test]
fn convert_holds_the_source_locked_while_copying() {
    let t = tmp();
    let d = t.path();
    common::qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    common::qemu_io(d, "base.qcow2", &["write -P 0x5 0 1M"]);
    common::qcow2_overlay(d, "base.qcow2", "top.qcow2");
    let child = common::kiln_stopped_at(d, &["convert", "top.qcow2", "out.raw"], "chunk");
    for file in ["top.qcow2", "base.qcow2"] {
        let (ok, text) = qemu_io_write(d, file);
        assert!(!ok, "qemu-io wrote {file} during the convert: {text}");
    }
    common::signal(&child, nix::sys::signal::Signal::SIGCONT);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_same(d, "top.qcow2", "out.raw");
    let (ok, text) = qemu_io_write(d, "top.qcow2");
    assert!(ok, "the lock outlived the convert: {text}");
}
