//! Sources in a bucket (`s3://BUCKET/KEY`): the real binary against real S3 servers started on
//! loopback (a three-node Garage cluster and s3s-fs, see `common::s3`), with qemu-img as the
//! oracle: a disk built from an object equals the disk built from the same file on disk.

use std::path::Path;

use crate::common::s3::{servers, Endpoint, BUCKET};
use crate::common::*;

/// The servers a test writes through and reads through: Garage's node 0 and node 1 (one
/// cluster), and s3s-fs.
fn pairs() -> Vec<(&'static Endpoint, &'static Endpoint)> {
    let s = servers();
    vec![(&s.garage[0], &s.garage[1]), (&s.s3s, &s.s3s)]
}

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// `kiln --json create` of one system disk from `snapshot` into `dir/out`, as a client of `e`.
fn create(e: &Endpoint, dir: &Path, snapshot: &str, out: &str, extra: &[&str]) -> Run {
    let disk = format!("snapshot={snapshot},device=/dev/xvda,type=system");
    let mut args = vec![
        "--json",
        "create",
        "--name",
        out,
        "--disk",
        &disk,
        "--output-dir",
        out,
    ];
    args.extend_from_slice(extra);
    e.kiln(dir, &args)
}

/// A 16 MiB qcow2 with data at the start, the middle and the end, and a zeroed range.
fn make_qcow2(dir: &Path, name: &str) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "16M"]);
    qemu_io(
        dir,
        name,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x01 5M 64k",
            "write -z 6M 1M",
            "write -P 0xcd 15M 1M",
        ],
    );
}

#[test]
fn objects_of_every_kind_copy_like_the_same_files_on_disk() {
    let t = tmp();
    let d = t.path();
    let raw = d.join("disk.raw");
    sparse_raw(&raw, 24 << 20);
    write_at(&raw, 0, &noise(1, 3 << 20));
    write_at(&raw, (24 << 20) - 4096, &[7u8; 4096]);
    make_qcow2(d, "plain.qcow2");
    // Compressed clusters, and a VHD: formats whose reads are many small ones.
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "disk.raw",
            "packed.qcow2",
        ],
    );
    qemu_img(d, &["convert", "-q", "-O", "vpc", "plain.qcow2", "dyn.vhd"]);
    let files = ["disk.raw", "plain.qcow2", "packed.qcow2", "dyn.vhd"];
    for (writer, reader) in pairs() {
        let prefix = format!("kinds-{}", writer.name);
        for f in files {
            writer.put_file(&format!("{prefix}/{f}"), &d.join(f));
        }
        for f in files {
            let out = format!("{}-{}", writer.name, f.replace('.', "-"));
            let r = create(reader, d, &url(&format!("{prefix}/{f}")), &out, &[]);
            assert_eq!(
                r.status, 0,
                "{f} on {}: {}{}",
                reader.name, r.stdout, r.stderr
            );
            assert_clean(&d.join(&out), "xvda.qcow2");
            assert_same(d, f, &format!("{out}/xvda.qcow2"));
            let m = manifest(&d.join(&out));
            let src = &m["DiskDeviceMappings"][0]["Source"];
            assert_eq!(
                src["Path"].as_str(),
                Some(url(&format!("{prefix}/{f}")).as_str()),
                "{m}"
            );
        }
    }
}

#[test]
fn a_backing_chain_resolves_inside_the_bucket_through_the_gate() {
    let t = tmp();
    let d = t.path();
    std::fs::create_dir_all(d.join("chain")).unwrap();
    make_qcow2(d, "chain/base.qcow2");
    qcow2_overlay(d, "base.qcow2", "chain/top.qcow2");
    qemu_io(
        d,
        "chain/top.qcow2",
        &["write -P 0x77 2M 512k", "write -P 0x78 15M 4k"],
    );
    // The same overlay, its backing file one prefix up (outside the overlay's own prefix).
    std::fs::create_dir_all(d.join("far/img")).unwrap();
    std::fs::copy(d.join("chain/base.qcow2"), d.join("far/base.qcow2")).unwrap();
    qcow2_overlay(d, "../base.qcow2", "far/img/top.qcow2");
    for (writer, reader) in pairs() {
        let p = format!("chain-{}", writer.name);
        for f in [
            "chain/base.qcow2",
            "chain/top.qcow2",
            "far/base.qcow2",
            "far/img/top.qcow2",
        ] {
            writer.put_file(&format!("{p}/{f}"), &d.join(f));
        }
        let out = format!("chain-{}", reader.name);
        let r = create(reader, d, &url(&format!("{p}/chain/top.qcow2")), &out, &[]).ok();
        let _ = r;
        assert_same(d, "chain/top.qcow2", &format!("{out}/xvda.qcow2"));
        let m = manifest(&d.join(&out));
        let read: Vec<&str> = m["DiskDeviceMappings"][0]["Source"]["FilesRead"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["Path"].as_str().unwrap())
            .collect();
        assert_eq!(
            read,
            [
                url(&format!("{p}/chain/top.qcow2")),
                url(&format!("{p}/chain/base.qcow2"))
            ],
            "{m}"
        );
        // Outside the named object's prefix: refused, unless --backing-dir allows it.
        let top = url(&format!("{p}/far/img/top.qcow2"));
        let r = create(reader, d, &top, "denied", &[]);
        assert_eq!(r.code(), "InvalidSnapshot.BackingDenied", "{}", r.stdout);
        assert!(r.stdout.contains("--backing-dir"), "{}", r.stdout);
        let dir = url(&format!("{p}/far/"));
        let out = format!("far-{}", reader.name);
        create(reader, d, &top, &out, &["--backing-dir", &dir]).ok();
        assert_same(d, "far/img/top.qcow2", &format!("{out}/xvda.qcow2"));
    }
}

#[test]
fn missing_objects_buckets_and_bad_credentials_have_clear_codes() {
    let t = tmp();
    let d = t.path();
    for (_, e) in pairs() {
        let r = create(e, d, &url("no/such/object.raw"), "aa", &[]);
        assert_eq!(r.code(), "InvalidSnapshotId.NotFound", "{}", r.stdout);
        assert!(r.stdout.contains("no such object"), "{}", r.stdout);
        let r = create(e, d, "s3://no-such-bucket-kiln/x.raw", "bb", &[]);
        assert_eq!(r.code(), "InvalidSnapshotId.NotFound", "{}", r.stdout);
        assert!(r.stdout.contains("bucket"), "{}", r.stdout);
        let bad = [("AWS_SECRET_ACCESS_KEY", "wrong-secret".to_string())];
        let disk = format!("snapshot={},device=/dev/xvda,type=system", url("x.raw"));
        let r = e.kiln_with(
            d,
            &bad,
            &[
                "--json",
                "create",
                "--name",
                "cc",
                "--disk",
                &disk,
                "--output-dir",
                "c",
            ],
        );
        assert_eq!(r.code(), "Forbidden.ObjectStorage", "{}", r.stdout);
        assert!(!d.join("c").exists());
    }
    // No server at all: a bounded failure, not a hang.
    let e = &servers().s3s;
    let gone = [("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string())];
    let disk = format!("snapshot={},device=/dev/xvda,type=system", url("x.raw"));
    let started = std::time::Instant::now();
    let r = e.kiln_with(
        d,
        &gone,
        &[
            "--json",
            "create",
            "--name",
            "gg",
            "--disk",
            &disk,
            "--output-dir",
            "g",
        ],
    );
    assert_eq!(r.code(), "ServiceUnavailable.ObjectStorage", "{}", r.stdout);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn an_object_rewritten_during_the_copy_is_refused() {
    let t = tmp();
    let d = t.path();
    let raw = d.join("v1.raw");
    std::fs::write(&raw, noise(3, 8 << 20)).unwrap();
    for (writer, reader) in pairs() {
        let key = format!("changed-{}/disk.raw", writer.name);
        writer.put_file(&key, &raw);
        let disk = format!("snapshot={},device=/dev/xvda,type=system", url(&key));
        let out = format!("changed-{}", reader.name);
        let args = [
            "--json",
            "create",
            "--name",
            &out,
            "--disk",
            &disk,
            "--output-dir",
            &out,
        ];
        let child = kiln_stopped_at_env(d, &reader.env(), &args, "prepared");
        // The same size, other bytes: only the ETag tells.
        writer.put(&key, noise(4, 8 << 20));
        signal(&child, nix::sys::signal::Signal::SIGCONT);
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("InvalidSnapshot.Changed"), "{stdout}");
        assert!(!d.join(&out).exists(), "nothing published");
    }
}

#[test]
fn credentials_come_from_an_aws_profile() {
    let t = tmp();
    let d = t.path();
    let e = &servers().s3s;
    e.put("profile/one.raw", noise(5, 1 << 20));
    std::fs::write(d.join("one.raw"), noise(5, 1 << 20)).unwrap();
    let creds = d.join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n[kiln]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            e.access_key, e.secret_key
        ),
    )
    .unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", String::new()),
        ("AWS_SECRET_ACCESS_KEY", String::new()),
        ("AWS_SHARED_CREDENTIALS_FILE", path_str(&creds)),
        ("AWS_PROFILE", "kiln".to_string()),
    ];
    let disk = format!(
        "snapshot={},device=/dev/xvda,type=system",
        url("profile/one.raw")
    );
    let r = e.kiln_with(
        d,
        &env,
        &[
            "--json",
            "create",
            "--name",
            "pp",
            "--disk",
            &disk,
            "--output-dir",
            "p",
        ],
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert_same(d, "one.raw", "p/xvda.qcow2");
}

/// A local image in `dir/name` whose system disk holds `mib` MiB of noise (so its file needs
/// several upload parts).
fn local_image(dir: &Path, name: &str, mib: usize) {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, noise(mib as u64, mib << 20)).unwrap();
    let disk = format!("snapshot={name}.raw,device=/dev/xvda,type=system");
    let data = format!("snapshot={name}.raw,device=/dev/xvdb");
    kiln_in(
        dir,
        &[
            "create",
            "--name",
            name,
            "--disk",
            &disk,
            "--disk",
            &data,
            "--output-dir",
            name,
        ],
    )
    .ok();
    std::fs::remove_file(raw).unwrap();
}

fn transfer_json(r: &Run) -> serde_json::Value {
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn push_then_pull_round_trips_and_verify_streams_the_bucket() {
    let t = tmp();
    let d = t.path();
    local_image(d, "img", 20);
    for (writer, reader) in pairs() {
        let dest = url(&format!("images/{}/", writer.name));
        let out = transfer_json(&writer.kiln(d, &["--json", "push", "img", &dest]));
        assert_eq!(out["Files"].as_array().unwrap().len(), 4, "{out}");
        assert!(out["BytesPerSecond"].as_u64().unwrap() > 0, "{out}");
        // Parts: a 20 MiB disk takes three 8 MiB parts.
        let disk = &out["Files"][0];
        assert!(disk["Parts"].as_u64().unwrap() >= 3, "{out}");
        let v = reader.kiln(d, &["--json", "verify", &dest]);
        assert_eq!(v.status, 0, "{}{}", v.stdout, v.stderr);
        let pulled = format!("pulled-{}", writer.name);
        let p = transfer_json(&reader.kiln(d, &["--json", "pull", &dest, &pulled]));
        assert_eq!(p["Bytes"], out["Bytes"], "{p}");
        assert_sums(&d.join(&pulled));
        for f in ["xvda.qcow2", "xvdb.qcow2"] {
            assert_same(d, &format!("img/{f}"), &format!("{pulled}/{f}"));
        }
        // Pushing the same image again sends no disk bytes.
        let again = transfer_json(&writer.kiln(d, &["--json", "push", "img", &dest]));
        assert_eq!(again["Files"][0]["BytesSent"], 0, "{again}");
        // A disk replaced in the bucket fails verify, and pull keeps nothing.
        writer.put(
            &format!("images/{}/xvdb.qcow2", writer.name),
            noise(9, 4096),
        );
        let v = reader.kiln(d, &["--json", "verify", &dest]);
        assert_eq!(v.status, 1, "{}{}", v.stdout, v.stderr);
        let bad = format!("bad-{}", writer.name);
        let r = reader.kiln(d, &["--json", "pull", &dest, &bad]);
        assert_eq!(r.code(), "InvalidImage.ChecksumMismatch", "{}", r.stdout);
        assert!(!d.join(&bad).exists());
    }
}

/// A pull writes whole chunks with O_DIRECT and the last, shorter one through the page cache,
/// and leaves a hole for a chunk of zeros: an Azure (fixed VHD) disk of 24 MiB of data, zeros and
/// data, plus its 512-byte footer, comes back equal, with the zeros unallocated.
#[test]
fn a_pull_keeps_holes_and_an_unaligned_tail() {
    let t = tmp();
    let d = t.path();
    let raw = d.join("disk.raw");
    sparse_raw(&raw, 24 << 20);
    write_at(&raw, 0, &noise(3, 8 << 20));
    write_at(&raw, 16 << 20, &noise(4, 8 << 20));
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "vhd",
            "--target",
            "azure",
            "--disk",
            "snapshot=disk.raw,type=system",
            "--output-dir",
            "vhd",
        ],
    )
    .ok();
    let disk: Vec<_> = std::fs::read_dir(d.join("vhd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vhd"))
        .collect();
    assert_eq!(disk.len(), 1, "{disk:?}");
    let name = disk[0].file_name().unwrap().to_str().unwrap().to_string();
    let size = std::fs::metadata(&disk[0]).unwrap().len();
    assert_eq!(size, (24 << 20) + 512);
    for (writer, reader) in pairs() {
        let dest = url(&format!("tail/{}/", writer.name));
        transfer_json(&writer.kiln(d, &["--json", "push", "vhd", &dest]));
        let pulled = format!("pulled-{}", writer.name);
        transfer_json(&reader.kiln(d, &["--json", "pull", &dest, &pulled]));
        assert_sums(&d.join(&pulled));
        let got = d.join(&pulled).join(&name);
        assert_eq!(std::fs::metadata(&got).unwrap().len(), size);
        assert!(std::fs::read(&got).unwrap() == std::fs::read(&disk[0]).unwrap());
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&got).unwrap().blocks() * 512;
        assert!(
            allocated <= (16 << 20) + (1 << 20),
            "{allocated} bytes allocated: the 8 MiB of zeros were written"
        );
    }
}

#[test]
fn a_prefix_without_its_checksum_list_is_not_an_image() {
    let t = tmp();
    let d = t.path();
    for (writer, reader) in pairs() {
        writer.put("half/manifest.json", b"{}".to_vec());
        for args in [
            vec!["--json", "pull", "s3://kiln-test/half/", "x"],
            vec!["--json", "verify", "s3://kiln-test/half/"],
        ] {
            let r = reader.kiln(d, &args);
            assert_eq!(
                r.code(),
                "InvalidImageId.NotFound",
                "{args:?}: {}",
                r.stdout
            );
            assert!(r.stdout.contains("SHA256SUMS"), "{}", r.stdout);
        }
        assert!(!d.join("x").exists());
    }
}

#[test]
fn a_push_killed_mid_upload_resumes_and_sends_fewer_bytes() {
    // Garage: the upload's parts are listed and reused; s3s-fs: the push completes.
    let t = tmp();
    let d = t.path();
    local_image(d, "big", 48);
    for (writer, reader) in pairs() {
        let dest = url(&format!("resume/{}/", writer.name));
        let args = ["--json", "push", "big", &dest];
        // One part at a time, so none is in flight when it is killed after its third. (With parts
        // in flight, Garage 2.5.0 can list one as uploaded whose data it then drops; kiln then
        // sends the reused parts again, which this test would count as a failure to resume.)
        let one = ["--json", "push", "-j", "1", "big", &dest];
        let mut child = kiln_stopped_at_env(d, &writer.env(), &one, "part#3");
        child.kill().unwrap();
        child.wait().unwrap();
        // Not an image yet: no checksum list.
        let r = reader.kiln(d, &["--json", "verify", &dest]);
        assert_eq!(r.code(), "InvalidImageId.NotFound", "{}", r.stdout);
        // Resumed through another node of the cluster.
        let out = transfer_json(&reader.kiln(d, &args));
        let (all, sent) = (
            out["Bytes"].as_u64().unwrap(),
            out["BytesTransferred"].as_u64().unwrap(),
        );
        // s3s-fs 0.14.1 has no ListMultipartUploads: there the push starts the file over.
        if writer.name == "garage" {
            assert_eq!(sent + (24 << 20), all, "{out}");
            assert_eq!(out["Files"][0]["PartsReused"], 3, "{out}");
        }
        let v = writer.kiln(d, &["--json", "verify", &dest]);
        assert_eq!(v.status, 0, "{}{}", v.stdout, v.stderr);

        // Killed with eight parts in flight: whatever the server kept of them, the resumed push
        // completes (on Garage, sometimes only by sending every part again) and verifies.
        let dest = url(&format!("resume-wide/{}/", writer.name));
        let args = ["--json", "push", "big", &dest];
        let mut child = kiln_stopped_at_env(d, &writer.env(), &args, "part#3");
        child.kill().unwrap();
        child.wait().unwrap();
        let out = transfer_json(&reader.kiln(d, &args));
        assert_eq!(out["Files"][0]["Parts"], 7, "{out}");
        let v = writer.kiln(d, &["--json", "verify", &dest]);
        assert_eq!(v.status, 0, "{}{}", v.stdout, v.stderr);
    }
}

#[test]
fn create_can_output_to_a_bucket() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("sys.raw"), noise(11, 12 << 20)).unwrap();
    for (writer, reader) in pairs() {
        let dest = url(&format!("created/{}/", writer.name));
        let r = writer.kiln(
            d,
            &[
                "--json",
                "create",
                "--name",
                "to-bucket",
                "--disk",
                "snapshot=sys.raw,type=system",
                "--output",
                &dest,
            ],
        );
        assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
        let pulled = format!("created-{}", writer.name);
        reader.kiln(d, &["pull", &dest, &pulled]).ok();
        assert_sums(&d.join(&pulled));
        assert_same(d, "sys.raw", &format!("{pulled}/xvda.qcow2"));
        // The prefix holds an image now: a second create there is refused before copying.
        let r = writer.kiln(
            d,
            &[
                "--json",
                "create",
                "--name",
                "again",
                "--disk",
                "snapshot=sys.raw,type=system",
                "--output",
                &dest,
            ],
        );
        assert_eq!(r.code(), "InvalidParameter", "{}", r.stdout);
    }
}

#[test]
fn a_server_that_goes_away_mid_push_fails_it_in_bounded_time_and_the_push_completes_later() {
    use crate::common::s3::{bucket, own_s3s, port};
    let t = tmp();
    let d = t.path();
    local_image(d, "gone", 40);
    let p = port();
    let (e, mut server) = own_s3s(d, p).unwrap();
    bucket(&e, BUCKET);
    let dest = url("gone/");
    let args = ["--json", "push", "gone", &dest];
    let child = kiln_stopped_at_env(d, &e.env(), &args, "part#2");
    server.kill().unwrap();
    server.wait().unwrap();
    let started = std::time::Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGCONT);
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("ServiceUnavailable.ObjectStorage"),
        "{stdout}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
    // Back on the same port and data: the push runs to the end, and the image verifies.
    let (e, mut server) = own_s3s(d, p).unwrap();
    let out = transfer_json(&e.kiln(d, &args));
    assert!(out["Bytes"].as_u64().unwrap() > 40 << 20, "{out}");
    let v = e.kiln(d, &["--json", "verify", &dest]);
    assert_eq!(v.status, 0, "{}{}", v.stdout, v.stderr);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Every file named `name` under `dir`, at any depth.
fn find_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(find_named(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            found.push(p);
        }
    }
    found
}

#[test]
fn create_to_a_bucket_uploads_each_disk_while_the_build_goes_on() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("sys.raw"), noise(21, 12 << 20)).unwrap();
    std::fs::write(d.join("data.raw"), noise(22, 12 << 20)).unwrap();
    for (writer, reader) in pairs() {
        let staging = d.join(format!("tmp-{}", writer.name));
        std::fs::create_dir_all(&staging).unwrap();
        let mut env = writer.env();
        env.push(("TMPDIR", staging.to_string_lossy().into_owned()));
        let create = |dest: &str| {
            vec![
                "--json".to_string(),
                "create".into(),
                "--name".into(),
                "early".into(),
                "--disk".into(),
                "snapshot=sys.raw,type=system".into(),
                "--disk".into(),
                "snapshot=data.raw".into(),
                "--output".into(),
                dest.to_string(),
            ]
        };

        let c = reader.client();
        let list = |prefix: &str| -> Vec<String> {
            let listed = crate::common::s3::rt()
                .block_on(c.list_objects_v2().bucket(BUCKET).prefix(prefix).send())
                .unwrap();
            listed
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string))
                .collect()
        };
        // Starts the create into `prefix`, its build held once its second disk is hashed and
        // flushed, and waits until the first disk is in the bucket: it went up while nothing that
        // marks the image complete was built (no manifest anywhere).
        let held = |prefix: &str, go: &Path| {
            let args = create(&url(prefix));
            let mut held = env.clone();
            held.push(("KILN_TEST_WAIT_AT", "disk-done#2".into()));
            held.push(("KILN_TEST_GO", go.to_string_lossy().into_owned()));
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(&args)
                .envs(held.iter().map(|(k, v)| (k, v)))
                .current_dir(d)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            let keys = loop {
                let keys = list(prefix);
                if !keys.is_empty() || started.elapsed() > std::time::Duration::from_secs(60) {
                    break keys;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            assert_eq!(keys.len(), 1, "{keys:?}");
            assert!(keys[0].ends_with(".qcow2"), "{keys:?}");
            assert!(find_named(&staging, "manifest.json").is_empty());
            child
        };

        let prefix = format!("early/{}/", writer.name);
        let go = d.join(format!("go-{}", writer.name));
        let child = held(&prefix, &go);
        std::fs::write(&go, b"").unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let pulled = d.join(format!("early-{}", writer.name));
        reader
            .kiln(d, &["pull", &url(&prefix), pulled.to_str().unwrap()])
            .ok();
        assert_sums(&pulled);
        assert_same(d, "data.raw", &format!("early-{}/xvdb.qcow2", writer.name));

        // A build that fails after a disk went up takes it back: the prefix is empty again, and
        // the same create there then succeeds.
        let prefix = format!("early-failed/{}/", writer.name);
        let go = d.join(format!("go-failed-{}", writer.name));
        let child = held(&prefix, &go);
        let data = std::fs::read(d.join("data.raw")).unwrap();
        std::fs::write(d.join("data.raw"), noise(23, 12 << 20)).unwrap();
        std::fs::write(&go, b"").unwrap();
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("InvalidSnapshot.Changed"), "{stdout}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        // Garage 2.5.0 has been seen listing an object for a moment after its DELETE succeeded.
        let started = std::time::Instant::now();
        while !list(&prefix).is_empty() && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(list(&prefix), Vec::<String>::new(), "{stdout}{stderr}");
        std::fs::write(d.join("data.raw"), data).unwrap();
        let args = create(&url(&prefix));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = writer.kiln(d, &args);
        assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
        assert!(
            find_named(&staging, "manifest.json").is_empty(),
            "staging left behind"
        );
    }
}

/// `kiln inspect` of an object says what it says of the same file on disk: format, sizes, cluster
/// size, backing chain (resolved in the bucket), internal snapshots, encryption and map. Only the
/// names differ, and the actual size, which for an object is its length.
#[test]
fn inspect_reads_objects_like_files() {
    let t = tmp();
    let d = t.path();
    make_qcow2(d, "base.qcow2");
    qemu_img(d, &["snapshot", "-c", "first", "base.qcow2"]);
    qcow2_overlay(d, "base.qcow2", "top.qcow2");
    qemu_io(d, "top.qcow2", &["write -P 0x22 2M 1M"]);
    qemu_img(d, &["convert", "-O", "vmdk", "base.qcow2", "disk.vmdk"]);
    qemu_img(d, &["convert", "-O", "vpc", "base.qcow2", "disk.vhd"]);
    qemu_img(d, &["convert", "-O", "vdi", "base.qcow2", "disk.vdi"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=inspect-pass",
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=10",
            "disk.luks",
            "8M",
        ],
    );
    let files = [
        "top.qcow2",
        "base.qcow2",
        "disk.vmdk",
        "disk.vhd",
        "disk.vdi",
        "disk.luks",
    ];
    let inspect = |r: Run| -> serde_json::Value {
        assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
        let mut v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        // What differs between a file and an object: names and allocated bytes.
        fn strip(v: &mut serde_json::Value) {
            if let Some(o) = v.as_object_mut() {
                for k in [
                    "filename",
                    "full-backing-filename",
                    "backing-filename",
                    "actual-size",
                ] {
                    o.remove(k);
                }
                for (_, x) in o.iter_mut() {
                    strip(x);
                }
            } else if let Some(a) = v.as_array_mut() {
                a.iter_mut().for_each(strip);
            }
        }
        strip(&mut v);
        v
    };
    for (writer, reader) in pairs() {
        for f in files {
            writer.put_file(&format!("inspect/{}/{f}", writer.name), &d.join(f));
        }
        for f in files {
            let local = inspect(kiln_in(d, &["--json", "inspect", "--map", f]));
            let object = url(&format!("inspect/{}/{f}", writer.name));
            let r = reader.kiln(d, &["--json", "inspect", "--map", &object]);
            assert_eq!(inspect(r), local, "{f} on {}", writer.name);
        }
        // The names and the sizes an object has.
        let top = url(&format!("inspect/{}/top.qcow2", writer.name));
        let r = reader.kiln(d, &["--json", "inspect", &top]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["filename"], top.as_str(), "{v}");
        let base = url(&format!("inspect/{}/base.qcow2", writer.name));
        assert_eq!(v["full-backing-filename"], base.as_str(), "{v}");
        let len = std::fs::metadata(d.join("top.qcow2")).unwrap().len();
        assert_eq!(v["actual-size"], len, "{v}");
        assert_eq!(v["snapshots"], serde_json::Value::Null, "{v}");
        let v = inspect(reader.kiln(d, &["--json", "inspect", &base]));
        assert_eq!(v["snapshots"][0]["name"], "first", "{v}");
        let v = inspect(reader.kiln(
            d,
            &[
                "--json",
                "inspect",
                &url(&format!("inspect/{}/disk.luks", writer.name)),
            ],
        ));
        assert_eq!(v["format"], "luks", "{v}");
        assert!(v["encrypted"].as_bool().unwrap(), "{v}");
    }
}
