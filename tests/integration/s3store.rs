//! `--store s3://BUCKET/PREFIX`: one image store shared by many hosts, against the real servers
//! of `common::s3` (each test in a bucket of its own). s3s-fs honours `If-None-Match: *`: the
//! whole lifecycle, idempotency, the two-host race and a dead creator's lease run there. Garage
//! 2.5.0 ignores it: the probe must refuse the store there, and leave nothing behind (Garage's
//! test key may not create buckets: that test uses a prefix of the shared bucket).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::s3::{self, servers, Endpoint};
use crate::common::*;

/// A fresh bucket on `e` and the store in it.
fn store_in(e: &Endpoint, bucket: &str) -> String {
    s3::bucket(e, bucket);
    format!("s3://{bucket}/store")
}

/// `kiln --json --store STORE ARGS` as a client of `e`, with `env` on top.
fn kiln_store(e: &Endpoint, dir: &Path, store: &str, env: &[(&str, String)], args: &[&str]) -> Run {
    let mut all = vec!["--json", "--store", store];
    all.extend_from_slice(args);
    e.kiln_with(dir, env, &all)
}

/// `create --name NAME` of one system disk from `disk.raw`, with `extra` flags.
fn create_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "create",
        "--name",
        name,
        "--disk",
        "snapshot=disk.raw,device=/dev/xvda,type=system",
    ];
    v.extend_from_slice(extra);
    v
}

/// `kiln --json --store STORE create --name NAME ...` in `dir` with `env`, stopped at `point`.
fn stopped_create(
    dir: &Path,
    env: &[(&str, String)],
    store: &str,
    name: &str,
    point: &str,
) -> std::process::Child {
    let mut args = vec!["--json", "--store", store];
    args.extend(create_args(name, &[]));
    kiln_stopped_at_env(dir, env, &args, point)
}

/// Lets a stopped create go on and returns its `--json` error (it must fail).
fn failed_after_cont(child: std::process::Child) -> serde_json::Value {
    signal(&child, Signal::SIGCONT);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", r.stdout, r.stderr))
}

/// The error code of a failed `--json` run.
fn code(r: &Run) -> String {
    assert_ne!(r.status, 0, "{}{}", r.stdout, r.stderr);
    json(r)["Code"].as_str().unwrap_or_default().to_string()
}

fn describe(e: &Endpoint, dir: &Path, store: &str) -> Vec<serde_json::Value> {
    let r = kiln_store(e, dir, store, &[], &["describe"]);
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    json(&r).as_array().cloned().unwrap_or_default()
}

/// A 24 MiB raw disk with data at both ends, in `dir/disk.raw`.
fn make_disk(dir: &Path) {
    let raw = dir.join("disk.raw");
    sparse_raw(&raw, 24 << 20);
    write_at(&raw, 0, &noise(3, 2 << 20));
    write_at(&raw, (24 << 20) - 4096, &[9u8; 4096]);
}

#[test]
fn create_describe_verify_delete_round_trip_through_a_bucket_store() {
    let t = tmp();
    let d = t.path();
    make_disk(d);
    let e = &servers().s3s;
    let bucket = "store-round-trip";
    let store = store_in(e, bucket);
    let r = kiln_store(
        e,
        d,
        &store,
        &[],
        &create_args("web", &["--client-token", "tok-1"]),
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    let id = json(&r)["ImageId"].as_str().unwrap().to_string();
    let images = describe(e, d, &store);
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["Status"], "Available");
    // KILN_STORE names the same store.
    let by_env = e.kiln_with(d, &[("KILN_STORE", store.clone())], &["--json", "describe"]);
    assert_eq!(json(&by_env), serde_json::Value::Array(images.clone()));
    let prefix = format!("s3://{bucket}/store/images/{id}/");
    assert_eq!(images[0]["Directory"].as_str(), Some(prefix.as_str()));
    assert!(images[0].get("LeaseExpires").is_none(), "{}", images[0]);

    // The image in the bucket is the disk (qemu-img compare), and verify streams it.
    let pulled = e.kiln(d, &["pull", &prefix, "pulled"]);
    assert_eq!(pulled.status, 0, "{}", pulled.stderr);
    assert_same(d, "disk.raw", "pulled/xvda.qcow2");
    assert_sums(&d.join("pulled"));
    let v = kiln_store(e, d, &store, &[], &["verify", &id]);
    assert_eq!(v.status, 0, "{}{}", v.stdout, v.stderr);

    // The same request with the same token: that image, and nothing written.
    let before = e.keys(bucket);
    let again = kiln_store(
        e,
        d,
        &store,
        &[],
        &create_args("web", &["--client-token", "tok-1"]),
    );
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(json(&again)["ImageId"].as_str(), Some(id.as_str()));
    assert!(again.stderr.contains("nothing copied"), "{}", again.stderr);
    assert_eq!(e.keys(bucket), before);
    // The token with other parameters; the name again without a token.
    let other = kiln_store(
        e,
        d,
        &store,
        &[],
        &create_args("web2", &["--client-token", "tok-1"]),
    );
    assert_eq!(code(&other), "IdempotenceParamNotMatch");
    let dup = kiln_store(e, d, &store, &[], &create_args("web", &[]));
    assert_eq!(code(&dup), "InvalidImageName.Duplicated");
    assert!(json(&dup)["Message"].as_str().unwrap().contains(&id));
    // A dry run reads only.
    let dry = kiln_store(e, d, &store, &[], &create_args("web3", &["--dry-run"]));
    assert_eq!(dry.status, 0, "{}{}", dry.stdout, dry.stderr);
    assert_eq!(e.keys(bucket), before);

    let del = kiln_store(e, d, &store, &[], &["delete", &id]);
    assert_eq!(del.status, 0, "{}{}", del.stdout, del.stderr);
    assert!(describe(e, d, &store).is_empty());
    // What stays: the store's marker and the claims (never deleted: generations).
    let left = e.keys(bucket);
    assert!(
        left.iter()
            .all(|k| k == "store/kiln-store.json" || k.starts_with("store/claims/")),
        "{left:?}"
    );
    let gone = kiln_store(e, d, &store, &[], &["verify", &id]);
    assert_eq!(code(&gone), "InvalidImageId.NotFound");
    // The name and the token are free again (their next generation).
    let r = kiln_store(
        e,
        d,
        &store,
        &[],
        &create_args("web", &["--client-token", "tok-1"]),
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert_ne!(json(&r)["ImageId"].as_str(), Some(id.as_str()));
}

#[test]
fn two_hosts_creating_one_name_at_once_exactly_one_wins_every_time() {
    let t = tmp();
    let e = &servers().s3s;
    let store = store_in(e, "store-race");
    // Two "hosts": separate working directories, each with its own copy of the disk.
    let hosts = [t.path().join("a"), t.path().join("b")];
    for h in &hosts {
        std::fs::create_dir_all(h).unwrap();
        make_disk(h);
    }
    let env = e.env();
    for round in 0..20 {
        let name = format!("race-{round}");
        // Both stopped with their sources open, just before they claim; then let go together.
        let children: Vec<_> = hosts
            .iter()
            .map(|h| stopped_create(h, &env, &store, &name, "prepared"))
            .collect();
        for c in &children {
            signal(c, Signal::SIGCONT);
        }
        let runs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let won: Vec<_> = runs.iter().filter(|o| o.status.success()).collect();
        assert_eq!(won.len(), 1, "round {round}: {runs:?}");
        let lost = runs.iter().find(|o| !o.status.success()).unwrap();
        let err: serde_json::Value = serde_json::from_slice(&lost.stdout).unwrap();
        assert_eq!(
            err["Code"], "InvalidImageName.Duplicated",
            "round {round}: {err}"
        );
        let winner: serde_json::Value = serde_json::from_slice(&won[0].stdout).unwrap();
        let r = kiln_store(e, &hosts[0], &store, &[], &["describe", "--name", &name]);
        let images = json(&r);
        let images = images.as_array().unwrap();
        assert_eq!(images.len(), 1, "round {round}: {images:?}");
        assert_eq!(images[0]["ImageId"], winner["ImageId"]);
        assert_eq!(images[0]["Status"], "Available");
    }
}

#[test]
fn a_killed_creator_shows_create_failed_once_its_lease_ends_and_frees_the_name() {
    let t = tmp();
    let d = t.path();
    make_disk(d);
    let e = &servers().s3s;
    let bucket = "store-lease";
    let store = store_in(e, bucket);
    let lease = [("KILN_S3_LEASE_SECS", "4".to_string())];
    let mut env = e.env();
    env.extend(lease.iter().cloned());
    let child = stopped_create(d, &env, &store, "dies", "staging");
    let images = describe(e, d, &store);
    assert_eq!(images.len(), 1, "{images:?}");
    let id = images[0]["ImageId"].as_str().unwrap().to_string();
    assert_eq!(images[0]["Status"], "Creating", "{}", images[0]);
    assert!(images[0]["LeaseExpires"].is_string(), "{}", images[0]);
    let busy = kiln_store(e, d, &store, &[], &["delete", &id]);
    assert_eq!(code(&busy), "IncorrectImageStatus");
    let dup = kiln_store(e, d, &store, &[], &create_args("dies", &[]));
    assert_eq!(code(&dup), "InvalidImageName.Duplicated");
    signal(&child, Signal::SIGKILL);
    let _ = child.wait_with_output();
    // Within the lease it is still Creating (nobody can tell a dead host from a slow one); after
    // it, CreateFailed. Wait for that, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let images = describe(e, d, &store);
        if images[0]["Status"] == "CreateFailed" {
            break;
        }
        assert_eq!(images[0]["Status"], "Creating", "{}", images[0]);
        assert!(
            Instant::now() < deadline,
            "never CreateFailed: {}",
            images[0]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The name is free again; the failed image can be deleted.
    let r = kiln_store(e, d, &store, &lease, &create_args("dies", &[]));
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    let statuses: Vec<_> = describe(e, d, &store)
        .iter()
        .map(|i| i["Status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["Available", "CreateFailed"]);
    let del = kiln_store(e, d, &store, &[], &["delete", &id]);
    assert_eq!(del.status, 0, "{}{}", del.stdout, del.stderr);
    assert!(e
        .keys(bucket)
        .iter()
        .all(|k| !k.contains(&id) || k.contains("claims/")));
}

#[test]
fn garage_ignores_conditional_writes_so_the_probe_refuses_the_store() {
    let t = tmp();
    let d = t.path();
    make_disk(d);
    let e = &servers().garage[0];
    // Garage's test key may not create buckets: a prefix of the shared one.
    let store = format!("s3://{}/s3store-garage", s3::BUCKET);
    let left = || -> Vec<String> {
        e.keys(s3::BUCKET)
            .into_iter()
            .filter(|k| k.starts_with("s3store-garage"))
            .collect()
    };
    // The listing, given a bounded moment to become empty.
    let left_after_a_moment = || -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        left()
    };
    let r = kiln_store(e, d, &store, &[], &create_args("web", &[]));
    assert_eq!(code(&r), "OperationDenied.ConditionalWriteUnsupported");
    let msg = json(&r)["Message"].as_str().unwrap().to_string();
    assert!(msg.contains("accepted a second put"), "{msg}");
    assert!(msg.contains("If-None-Match: *"), "{msg}");
    assert!(msg.contains("could both claim one image name"), "{msg}");
    // Nothing is left: the probe object is removed, no record, no claim, no marker. (Once, under
    // the full suite's load, Garage listed the probe after its delete: kiln now deletes until a
    // HEAD misses it, and the listing gets a bounded moment to agree.)
    assert_eq!(left_after_a_moment(), Vec::<String>::new(), "{msg}");
    // Reading the store needs no probe: it is empty.
    assert!(describe(e, d, &store).is_empty());
    // Every attempt probes again (no marker was written) and is refused again.
    let again = kiln_store(e, d, &store, &[], &create_args("web", &[]));
    assert_eq!(code(&again), "OperationDenied.ConditionalWriteUnsupported");
    assert_eq!(left_after_a_moment(), Vec::<String>::new());
}

#[test]
fn a_create_whose_claim_was_taken_behind_its_back_fails_and_leaves_nothing() {
    // A server whose conditional put is a check-then-write (s3s-fs 0.14.1's is) can let two puts
    // of one claim both succeed, the later one replacing the earlier. Here the test plays the
    // later one: it replaces the claim while the create copies.
    let t = tmp();
    let d = t.path();
    make_disk(d);
    let e = &servers().s3s;
    let bucket = "store-stolen";
    let store = store_in(e, bucket);
    let child = stopped_create(d, &e.env(), &store, "taken", "staging");
    let claim = e
        .keys(bucket)
        .into_iter()
        .find(|k| k.starts_with("store/claims/name/"))
        .expect("the name's claim");
    let other = r#"{"ImageId":"m-zzzzzzzzzzzzzzzzzzzz"}"#;
    e.put_in(bucket, &claim, other.as_bytes().to_vec());
    let err = failed_after_cont(child);
    assert_eq!(err["Code"], "InvalidImageName.Duplicated", "{err}");
    // No record, no image objects: only the marker and the claim.
    assert_eq!(e.keys(bucket), [claim, "store/kiln-store.json".to_string()]);
}

#[test]
fn a_create_stopped_past_its_lease_is_not_made_available() {
    let t = tmp();
    let d = t.path();
    make_disk(d);
    let e = &servers().s3s;
    let bucket = "store-late";
    let store = store_in(e, bucket);
    let mut env = e.env();
    env.push(("KILN_S3_LEASE_SECS", "2".to_string()));
    let child = stopped_create(d, &env, &store, "late", "staging");
    // Wait (bounded) until other hosts see it CreateFailed, then let it go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while describe(e, d, &store)[0]["Status"] != "CreateFailed" {
        assert!(Instant::now() < deadline, "the lease never ended");
        std::thread::sleep(Duration::from_millis(300));
    }
    let err = failed_after_cont(child);
    assert_eq!(err["Code"], "IncorrectImageStatus", "{err}");
    assert!(err["Message"].as_str().unwrap().contains("lease"), "{err}");
    // Its record says why, and no image was uploaded.
    let images = describe(e, d, &store);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["Status"], "CreateFailed");
    assert_eq!(images[0]["ErrorCode"], "IncorrectImageStatus");
    let id = images[0]["ImageId"].as_str().unwrap();
    assert!(
        e.keys(bucket).iter().all(|k| !k.contains("images/")),
        "{id}"
    );
}
