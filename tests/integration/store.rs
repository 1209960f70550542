//! The image store end to end: create into the store, describe, delete, verify, the status
//! lifecycle seen from a second process, idempotency, dry runs that write nothing, locking.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A 16 MiB sparse raw file with a little data.
fn small_raw(dir: &Path, name: &str) {
    let p = dir.join(name);
    sparse_raw(&p, 16 << 20);
    write_at(&p, 4096, b"kiln store test");
    write_at(&p, 5 << 20, &vec![0x77u8; 200_000]);
}

/// A 1.5 GiB sparse raw file with 300 MiB of non-zero data: a create with `-j 1` takes seconds.
fn big_raw(dir: &Path, name: &str) {
    let p = dir.join(name);
    sparse_raw(&p, 1536 << 20);
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..300u64 {
        write_at(&p, i * (5 << 20), &chunk);
    }
}

fn store_args<'a>(store: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--store", store];
    a.extend_from_slice(args);
    a
}

fn describe(d: &Path, store: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["--json", "--store", store, "describe"];
    a.extend_from_slice(extra);
    let r = kiln_in(d, &a).ok();
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .unwrap_or_else(|e| panic!("describe json ({e}): {}", r.stdout))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn create_small(d: &Path, store: &str, name: &str, extra: &[&str]) -> String {
    let mut a = store_args(
        store,
        &[
            "create",
            "--name",
            name,
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "-q",
        ],
    );
    a.extend_from_slice(extra);
    kiln_in(d, &a).ok().stdout.trim().to_string()
}

fn spawn_kiln(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln")
}

/// Polls describe until an image shows `Creating`; returns its record.
fn wait_for_creating(d: &Path, store: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let images = describe(d, store, &[]);
        if let Some(i) = images.iter().find(|i| i["Status"] == "Creating") {
            return i.clone();
        }
        assert!(Instant::now() < deadline, "never saw Creating: {images:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every path under `root` with its bytes (directories as empty), to compare a tree before/after.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(p: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel.join(""), Vec::new());
                walk(&path, root, out);
            } else {
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

#[test]
fn create_writes_into_the_store_and_describe_filters() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    let a = create_small(
        d,
        "st",
        "web-a",
        &["--family", "web", "--tag", "team=blue", "--tag", "tier=1"],
    );
    let b = create_small(d, "st", "web-b", &["--family", "web", "--tag", "team=red"]);
    let c = create_small(d, "st", "db-c", &[]);
    for id in [&a, &b, &c] {
        assert!(id.starts_with("m-") && id.len() == 22, "{id}");
        assert_sums(&d.join("st/images").join(id));
        assert_eq!(
            manifest(&d.join("st/images").join(id))["ImageId"],
            id.as_str()
        );
    }
    let all = describe(d, "st", &[]);
    assert_eq!(all.len(), 3);
    assert!(all
        .iter()
        .all(|i| i["Status"] == "Available" && i["Progress"] == "100%"));
    // Newest first.
    assert_eq!(all[0]["ImageId"], c.as_str());
    assert_eq!(
        describe(d, "st", &["--name", "web-b"])[0]["ImageId"],
        b.as_str()
    );
    assert_eq!(describe(d, "st", &[&a])[0]["ImageName"], "web-a");
    assert_eq!(describe(d, "st", &["--tag", "team=blue"]).len(), 1);
    assert_eq!(describe(d, "st", &["--tag", "team"]).len(), 2);
    assert_eq!(describe(d, "st", &["--status", "CreateFailed"]).len(), 0);
    // DescribeImageFromFamily: the newest Available image of the family.
    let fam = describe(d, "st", &["--family", "web"]);
    assert_eq!(fam.len(), 1);
    assert_eq!(fam[0]["ImageId"], b.as_str());
    assert!(
        fam[0]["DiskDeviceMappings"][0]["Sha256"]
            .as_str()
            .unwrap()
            .len()
            == 64
    );
    // A table without --json.
    let table = kiln_in(d, &["--store", "st", "describe"]).ok().stdout;
    assert!(
        table.contains("IMAGE ID") && table.contains(&a) && table.contains("Available"),
        "{table}"
    );
    let bad = kiln_in(
        d,
        &["--json", "--store", "st", "describe", "--status", "Gone"],
    );
    assert_eq!((bad.status, bad.code().as_str()), (2, "InvalidParameter"));

    // Delete.
    let r = kiln_in(d, &["--store", "st", "delete", &b]).ok();
    assert_eq!(r.stdout.trim(), b);
    assert!(!d.join("st/images").join(&b).exists());
    assert_eq!(
        describe(d, "st", &["--family", "web"])[0]["ImageId"],
        a.as_str()
    );
    let r = kiln_in(d, &["--json", "--store", "st", "delete", &b]);
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidImageId.NotFound")
    );
    assert_eq!(describe(d, "st", &[]).len(), 2);
}

#[test]
fn the_store_location_comes_from_kiln_store_then_xdg_data_home() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    let run = |envs: &[(&str, &Path)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args([
            "create",
            "--name",
            "env-img",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "-q",
        ])
        .current_dir(d);
        c.env_remove("KILN_STORE").env_remove("XDG_DATA_HOME");
        for (k, v) in envs {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let id = run(&[
        ("KILN_STORE", &d.join("ks")),
        ("XDG_DATA_HOME", &d.join("xdg")),
    ]);
    assert!(d.join("ks/images").join(&id).join("manifest.json").exists());
    let id = run(&[("XDG_DATA_HOME", &d.join("xdg"))]);
    assert!(d
        .join("xdg/kiln/images")
        .join(&id)
        .join("manifest.json")
        .exists());
}

#[test]
fn a_running_create_is_creating_from_another_process_then_available() {
    let t = tmp();
    let d = t.path();
    big_raw(d, "big.raw");
    let child = spawn_kiln(
        d,
        &[
            "--store",
            "st",
            "create",
            "--name",
            "big",
            "-j",
            "1",
            "--snapshot",
            "big.raw",
            "--format",
            "raw",
            "-q",
        ],
    );
    let seen = wait_for_creating(d, "st");
    let id = seen["ImageId"].as_str().unwrap().to_string();
    assert!(seen["Progress"].as_str().unwrap().ends_with('%'), "{seen}");
    assert!(
        !d.join("st/images").join(&id).exists(),
        "visible before it is finished"
    );
    // Its name is taken while it runs, and it cannot be deleted.
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "big",
            "--snapshot",
            "big.raw",
            "--dry-run",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidImageName.Duplicated")
    );
    let r = kiln_in(d, &["--json", "--store", "st", "delete", &id]);
    assert_eq!((r.status, r.code().as_str()), (2, "IncorrectImageStatus"));
    // Progress moves while it runs (updated about twice a second).
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    let done = describe(d, "st", &[&id]);
    assert_eq!(done[0]["Status"], "Available");
    assert_eq!(done[0]["Progress"], "100%");
    kiln_in(d, &["--store", "st", "verify", &id, "-q"]).ok();
}

#[test]
fn a_killed_create_is_create_failed_its_token_and_name_reusable_and_delete_removes_it() {
    let t = tmp();
    let d = t.path();
    big_raw(d, "big.raw");
    small_raw(d, "small.raw");
    let mut child = spawn_kiln(
        d,
        &[
            "--store",
            "st",
            "create",
            "--name",
            "doomed",
            "--client-token",
            "tok-1",
            "-j",
            "1",
            "--snapshot",
            "big.raw",
            "--format",
            "raw",
            "-q",
        ],
    );
    let id = wait_for_creating(d, "st")["ImageId"]
        .as_str()
        .unwrap()
        .to_string();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let after = describe(d, "st", &[&id]);
    assert_eq!(after[0]["Status"], "CreateFailed", "{after:?}");
    assert_eq!(describe(d, "st", &["--status", "CreateFailed"]).len(), 1);
    // A CreateFailed image's token may be retried, and its name is free.
    let again = create_small(d, "st", "doomed", &["--client-token", "tok-1"]);
    assert_ne!(again, id);
    // Delete removes the failed image: record, lock and the staging directory it left.
    kiln_in(d, &["--store", "st", "delete", &id]).ok();
    assert!(describe(d, "st", &[&id]).is_empty());
    let left: Vec<String> = fs::read_dir(d.join("st/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, [again.as_str()]);
    let records: Vec<String> = fs::read_dir(d.join("st/records"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(records, [format!("{again}.json")]);
}

#[test]
fn the_same_token_and_request_return_the_same_image_and_a_different_request_is_refused() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    small_raw(d, "other.raw");
    let id = create_small(d, "st", "idem", &["--client-token", "abc", "--tag", "k=v"]);
    let disk = d.join("st/images").join(&id).join("xvda.raw");
    let mtime = fs::metadata(&disk).unwrap().modified().unwrap();
    // Same token, same request (thread count and progress do not count): same ImageId, nothing copied.
    let r = kiln_in(
        d,
        &[
            "--store",
            "st",
            "create",
            "--name",
            "idem",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "--client-token",
            "abc",
            "--tag",
            "k=v",
            "-j",
            "1",
        ],
    )
    .ok();
    assert_eq!(r.stdout.trim(), id);
    assert!(r.stderr.contains("nothing copied"), "{}", r.stderr);
    assert_eq!(fs::metadata(&disk).unwrap().modified().unwrap(), mtime);
    assert_eq!(describe(d, "st", &[]).len(), 1);
    // --json gives the full record.
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "idem",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "--client-token",
            "abc",
            "--tag",
            "k=v",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["ImageId"].as_str(), v["Status"].as_str()),
        (Some(id.as_str()), Some("Available"))
    );
    // Same token, another request: another attribute, another source, or the source changed.
    for extra in [
        vec!["--snapshot", "small.raw", "--tag", "k=v2"],
        vec!["--snapshot", "other.raw", "--tag", "k=v"],
        vec![
            "--snapshot",
            "small.raw",
            "--tag",
            "k=v",
            "--description",
            "changed",
        ],
    ] {
        let mut a = vec![
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "idem",
            "--format",
            "raw",
            "--client-token",
            "abc",
        ];
        a.extend(extra.iter());
        let r = kiln_in(d, &a);
        assert_eq!(
            (r.status, r.code().as_str()),
            (2, "IdempotenceParamNotMatch"),
            "{a:?}"
        );
    }
    write_at(&d.join("small.raw"), 0, b"touched");
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "idem",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "--client-token",
            "abc",
            "--tag",
            "k=v",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "IdempotenceParamNotMatch")
    );
    assert_eq!(describe(d, "st", &[]).len(), 1);
}

#[test]
fn a_dry_run_checks_everything_and_writes_nothing() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    create_small(d, "st", "existing", &["--client-token", "tok"]);
    let before = tree(&d.join("st"));
    assert!(!before.is_empty());
    let dry = |extra: &[&str], env: Option<(&str, &str)>| {
        let mut a = vec![
            "--json",
            "--store",
            "st",
            "create",
            "--dry-run",
            "--format",
            "raw",
        ];
        a.extend_from_slice(extra);
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(&a).current_dir(d);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        (o.status.code().unwrap_or(-1), v)
    };
    let (status, v) = dry(
        &[
            "--name",
            "new-one",
            "--disk",
            "snapshot=small.raw,type=system",
            "--disk",
            "size=2G",
        ],
        None,
    );
    assert_eq!(
        (status, v["Code"].as_str()),
        (0, Some("DryRunOperation")),
        "{v}"
    );
    let disks = v["Plan"]["Disks"].as_array().unwrap();
    assert_eq!(disks[0]["Device"], "/dev/xvda");
    assert_eq!(disks[0]["VirtualSize"], 16 << 20);
    let to_copy = disks[0]["BytesToCopy"].as_u64().unwrap();
    assert!((200_000..=(2 << 20)).contains(&to_copy), "{to_copy}");
    assert_eq!(
        (
            disks[1]["Device"].as_str(),
            disks[1]["VirtualSize"].as_u64()
        ),
        (Some("/dev/xvdb"), Some(2 << 30))
    );
    assert!(v["Plan"]["Space"]["FreeBytes"].as_u64().unwrap() > 0);
    // The same checks as a real run, with their codes.
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--name", "existing", "--snapshot", "small.raw"],
            2,
            "InvalidImageName.Duplicated",
        ),
        (
            vec!["--name", "x", "--snapshot", "small.raw"],
            2,
            "InvalidImageName.Malformed",
        ),
        (
            vec!["--name", "new-one", "--snapshot", "missing.raw"],
            2,
            "InvalidSnapshotId.NotFound",
        ),
        (
            vec![
                "--name",
                "new-one",
                "--snapshot",
                "small.raw",
                "--client-token",
                "tok",
            ],
            2,
            "IdempotenceParamNotMatch",
        ),
    ];
    for (extra, want_status, want) in cases {
        let (status, v) = dry(&extra, None);
        assert_eq!(
            (status, v["Code"].as_str()),
            (want_status, Some(want)),
            "{extra:?}"
        );
    }
    let (status, v) = dry(
        &["--name", "new-one", "--snapshot", "small.raw"],
        Some(("KILN_TEST_FREE_BYTES", "4096")),
    );
    assert_eq!((status, v["Code"].as_str()), (1, Some("InsufficientSpace")));
    // The text form prints the plan, then the code.
    let r = kiln_in(
        d,
        &[
            "--store",
            "st",
            "create",
            "--dry-run",
            "--name",
            "new-one",
            "--snapshot",
            "small.raw",
        ],
    )
    .ok();
    assert!(
        r.stdout.contains("/dev/xvda") && r.stdout.contains("DryRunOperation"),
        "{}",
        r.stdout
    );
    assert_eq!(tree(&d.join("st")), before, "a dry run changed the store");
    // A dry run against a store that does not exist yet creates nothing.
    let r = kiln_in(
        d,
        &[
            "--store",
            "fresh",
            "create",
            "--dry-run",
            "--name",
            "new-one",
            "--snapshot",
            "small.raw",
        ],
    )
    .ok();
    assert!(r.stdout.contains("DryRunOperation"));
    assert!(!d.join("fresh").exists());
}

#[test]
fn not_enough_free_space_is_refused_before_anything_is_written() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "big-one",
            "--snapshot",
            "small.raw",
        ])
        .env("KILN_TEST_FREE_BYTES", "1000")
        .current_dir(d)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (o.status.code(), v["Code"].as_str()),
        (Some(1), Some("InsufficientSpace"))
    );
    let msg = v["Message"].as_str().unwrap();
    assert!(msg.contains("1000 bytes") && msg.contains("needs"), "{msg}");
    assert!(describe(d, "st", &[]).is_empty());
    // The same with --output-dir.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "--json",
            "create",
            "--name",
            "big-one",
            "--snapshot",
            "small.raw",
            "--output-dir",
            "out",
        ])
        .env("KILN_TEST_FREE_BYTES", "1000")
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!d.join("out").exists());
}

#[test]
fn verify_recomputes_checksums_and_names_the_disk_that_differs() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    let id = create_small(
        d,
        "st",
        "checked",
        &[
            "--disk",
            "snapshot=small.raw,type=system",
            "--disk",
            "snapshot=small.raw",
        ],
    );
    let dir = d.join("st/images").join(&id);
    let r = kiln_in(d, &["--store", "st", "verify", &id]).ok();
    assert!(
        r.stdout.contains("xvda.raw: OK") && r.stdout.contains("xvdb.raw: OK"),
        "{}",
        r.stdout
    );
    kiln_in(d, &["verify", &path_str(&dir)]).ok();
    let r = kiln_in(d, &["--json", "verify", &path_str(&dir)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["Ok"], true);
    // Flip one byte of xvdb's data.
    let p = dir.join("xvdb.raw");
    let mut b = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut b, 5 << 20)
            .unwrap();
    }
    write_at(&p, 5 << 20, &[b[0] ^ 1]);
    let r = kiln_in(d, &["--json", "--store", "st", "verify", &id]);
    assert_eq!(
        (r.status, r.code().as_str()),
        (1, "InvalidImage.ChecksumMismatch")
    );
    assert!(
        r.stdout.contains("xvdb.raw") && !r.stdout.contains("xvda.raw"),
        "{}",
        r.stdout
    );
    let r = kiln_in(d, &["verify", &path_str(&dir)]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("xvdb.raw"), "{}", r.stderr);
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            "st",
            "verify",
            "m-00000000000000000000",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidImageId.NotFound")
    );
}

#[test]
fn concurrent_creates_with_one_name_never_both_pass() {
    let t = tmp();
    let d = t.path();
    small_raw(d, "small.raw");
    let args = [
        "--json",
        "--store",
        "st",
        "create",
        "--name",
        "race",
        "--snapshot",
        "small.raw",
        "--format",
        "raw",
        "-q",
    ];
    let children: Vec<Child> = (0..4).map(|_| spawn_kiln(d, &args)).collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{outs:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("InvalidImageName.Duplicated"),
            "{o:?}"
        );
    }
    let images = describe(d, "st", &[]);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["Status"], "Available");
}

#[test]
fn completions_are_printed_for_each_shell() {
    let t = tmp();
    for (shell, needle) in [
        ("bash", "_kiln()"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let r = kiln_in(t.path(), &["completions", shell]).ok();
        assert!(
            r.stdout.contains(needle),
            "{shell}: {}",
            &r.stdout[..r.stdout.len().min(200)]
        );
        assert!(r.stdout.contains("describe"), "{shell}");
    }
}

/// `verify` and `check` resolve their target the same way, but a file that exists under an
/// ImageId-shaped name is a disk file to `check` and still an ImageId to `verify`.
#[test]
fn verify_and_check_resolve_image_ids_and_files_alike() {
    let t = tmp();
    let d = t.path();
    let id = "m-0123456789abcdefghij";
    sparse_raw(&d.join(id), 1 << 20);
    let store = path_str(&d.join("store"));
    let r = kiln_in(d, &["--json", "--store", &store, "check", id]);
    assert_eq!(r.status, 1, "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["Result"], "Fail", "{}", r.stdout);
    let r = kiln_in(d, &["--json", "--store", &store, "verify", id]);
    assert_eq!(r.code(), "InvalidImageId.NotFound");
    assert!(r.stdout.contains("in the store"), "{}", r.stdout);
    let r = kiln_in(d, &["--json", "verify", "nothing-here"]);
    assert_eq!(r.code(), "InvalidImageId.NotFound");
    assert!(
        r.stdout.contains("neither an image directory"),
        "{}",
        r.stdout
    );
}
