//! Helpers for the integration tests: run the real `kiln` binary and `qemu-img`/`qemu-io` on real
//! files in a temporary directory.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod s3;

pub const MIB: u64 = 1 << 20;

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics with the output unless the command exited 0.
    pub fn ok(self) -> Run {
        assert_eq!(
            self.status, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The `Code` of a `--json` error.
    pub fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr));
        v["Code"].as_str().unwrap_or_default().to_string()
    }
}

pub fn kiln_in(dir: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run kiln"),
    )
}

pub fn tool_in(dir: &Path, tool: &str, args: &[&str]) -> Run {
    Run::from(
        Command::new(tool)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}")),
    )
}

/// `qemu-img ARGS` in `dir`, which must succeed.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    tool_in(dir, "qemu-img", args).ok().stdout
}

/// `qemu-img create -f qcow2 -b BASE -F qcow2 TOP` in `dir`: a qcow2 overlay `top` over the
/// qcow2 `base` (named relative to `top`, as qemu-img takes it), which must succeed.
pub fn qcow2_overlay(dir: &Path, base: &str, top: &str) {
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
        ],
    );
}

/// `qemu-io -c CMD...` on `file` (qcow2 or raw, probed), which must succeed.
pub fn qemu_io(dir: &Path, file: &str, cmds: &[&str]) {
    run_qemu_io(dir, &[], file, cmds);
}

/// `qemu-io -f FMT -c CMD...` on `file`, which must succeed.
pub fn qemu_io_f(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    run_qemu_io(dir, &["-f", fmt], file, cmds);
}

fn run_qemu_io(dir: &Path, opts: &[&str], file: &str, cmds: &[&str]) {
    let mut args = opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let r = tool_in(dir, "qemu-io", &args).ok();
    assert!(
        !r.stdout.contains("error") && !r.stdout.contains("failed"),
        "qemu-io: {}",
        r.stdout
    );
}

/// `qemu-img compare A B` exits 0 (identical; a larger B must read zeros past A's end).
pub fn assert_same(dir: &Path, a: &str, b: &str) {
    let r = tool_in(dir, "qemu-img", &["compare", a, b]);
    assert_eq!(
        r.status, 0,
        "qemu-img compare {a} {b}: {}{}",
        r.stdout, r.stderr
    );
}

/// `qemu-img check` reports a clean image (no errors, leaks or corruptions).
pub fn assert_clean(dir: &Path, file: &str) {
    let r = tool_in(dir, "qemu-img", &["check", "--output=json", file]);
    assert_eq!(
        r.status, 0,
        "qemu-img check {file}: {}{}",
        r.stdout, r.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("check json");
    for k in ["check-errors", "leaks", "corruptions"] {
        assert_eq!(v[k].as_u64().unwrap_or(0), 0, "{file}: {k} in {v}");
    }
}

pub fn info(dir: &Path, file: &str) -> serde_json::Value {
    serde_json::from_str(&qemu_img(dir, &["info", "--output=json", file])).expect("info json")
}

pub fn virtual_size(dir: &Path, file: &str) -> u64 {
    info(dir, file)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// `sha256sum -c SHA256SUMS` passes in `image_dir`.
pub fn assert_sums(image_dir: &Path) {
    let r = tool_in(image_dir, "sha256sum", &["-c", "--strict", "SHA256SUMS"]);
    assert_eq!(r.status, 0, "sha256sum -c: {}{}", r.stdout, r.stderr);
}

pub fn manifest(image_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(image_dir.join("manifest.json")).expect("manifest"))
        .expect("manifest json")
}

pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

pub fn sha256_file(path: &Path) -> String {
    let r = tool_in(
        Path::new("."),
        "sha256sum",
        &[path.to_str().expect("utf-8 path")],
    )
    .ok();
    r.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Writes `bytes` at `offset` of a (possibly new) file without truncating it.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, offset).expect("write");
}

/// A sparse raw file of `size` bytes.
pub fn sparse_raw(path: &Path, size: u64) {
    let f = fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-test-")
        .tempdir()
        .expect("tempdir")
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

pub fn out(dir: &Path) -> PathBuf {
    dir.join("out")
}

/// Deterministic non-zero, incompressible-looking bytes (xorshift), `len` long.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Starts `kiln ARGS` in `dir` with `KILN_TEST_STOP_AT=point` and waits until it has stopped itself
/// there (SIGSTOP). Panics if it exits first or takes longer than 60 s.
pub fn kiln_stopped_at(dir: &Path, args: &[&str], point: &str) -> std::process::Child {
    kiln_stopped_at_env(dir, &[], args, point)
}

/// [`kiln_stopped_at`] with `env` set in kiln's environment.
pub fn kiln_stopped_at_env(
    dir: &Path,
    env: &[(&str, String)],
    args: &[&str],
    point: &str,
) -> std::process::Child {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .env("KILN_TEST_STOP_AT", point)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "kiln exited ({st}) before reaching {point}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stat = fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
        // The state is the first field after the parenthesised command name.
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if state.starts_with('T') {
            return child;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kiln never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Sends `sig` to a child.
pub fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// `kiln convert FILE` gives the same bytes as `qemu-img convert -f QEMU_FORMAT -O raw FILE`;
/// returns `kiln inspect --json FILE`.
pub fn assert_reads_like_qemu(dir: &Path, qemu_format: &str, file: &str) -> serde_json::Value {
    let want = format!("{file}.qemu.raw");
    qemu_img(
        dir,
        &["convert", "-f", qemu_format, "-O", "raw", file, &want],
    );
    let got = format!("{file}.kiln.raw");
    kiln_in(dir, &["convert", file, &got]).ok();
    assert!(
        fs::read(dir.join(&want)).expect("qemu's") == fs::read(dir.join(&got)).expect("kiln's"),
        "{file}: kiln reads other bytes than qemu-img"
    );
    let r = kiln_in(dir, &["inspect", "--json", file]).ok();
    serde_json::from_str(&r.stdout).expect("inspect json")
}
