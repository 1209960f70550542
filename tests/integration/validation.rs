//! CreateImage's parameter rules through the real binary: one test per code, each asserting the
//! code, the exit status (2) and that nothing was written (the store is not even created).

use std::path::Path;

use crate::common::*;

/// Runs `kiln --json --store st create --snapshot small.raw --format raw ARGS` in a fresh directory
/// and checks the refusal.
fn refused(args: &[&str], code: &str) {
    let t = tmp();
    let d = t.path();
    small(d);
    let mut a = vec![
        "--json",
        "--store",
        "st",
        "create",
        "--snapshot",
        "small.raw",
        "--format",
        "raw",
    ];
    a.extend_from_slice(args);
    let r = kiln_in(d, &a);
    assert_eq!(r.status, 2, "{args:?}: {}{}", r.stdout, r.stderr);
    assert_eq!(r.code(), code, "{args:?}");
    assert!(!d.join("st").exists(), "{code}: the store was written");
}

fn small(d: &Path) {
    let p = d.join("small.raw");
    sparse_raw(&p, 4 << 20);
    write_at(&p, 0, b"boot");
}

fn tags(n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| ["--tag".to_string(), format!("k{i}=v")])
        .collect()
}

#[test]
fn image_name_malformed() {
    let long = format!("a{}", "b".repeat(128));
    for bad in [
        "a",
        "1abc",
        "-abc",
        "has space",
        "http://x",
        "a/b",
        long.as_str(),
    ] {
        refused(&[&format!("--name={bad}")], "InvalidImageName.Malformed");
    }
}

#[test]
fn image_name_rules_accept_the_edges() {
    let t = tmp();
    let d = t.path();
    small(d);
    let max = format!("a{}", "b".repeat(127));
    for (i, ok) in ["ab", "镜像", "Web.v1:prod_x-2", max.as_str()]
        .iter()
        .enumerate()
    {
        let r = kiln_in(
            d,
            &[
                "--store",
                "st",
                "create",
                "--name",
                ok,
                "--snapshot",
                "small.raw",
                "--format",
                "raw",
                "-q",
                "--tag",
                &format!("i={i}"),
            ],
        );
        assert_eq!(r.status, 0, "{ok}: {}", r.stderr);
    }
}

#[test]
fn image_name_duplicated() {
    let t = tmp();
    let d = t.path();
    small(d);
    kiln_in(
        d,
        &[
            "--store",
            "st",
            "create",
            "--name",
            "twice",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "-q",
        ],
    )
    .ok();
    let r = kiln_in(
        d,
        &[
            "--json",
            "--store",
            "st",
            "create",
            "--name",
            "twice",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidImageName.Duplicated")
    );
    assert_eq!(std::fs::read_dir(d.join("st/images")).unwrap().count(), 1);
}

#[test]
fn image_family_malformed() {
    refused(
        &["--name", "ok-name", "--family", "f"],
        "InvalidImageFamily.Malformed",
    );
    refused(
        &["--name", "ok-name", "--family", "9fam"],
        "InvalidImageFamily.Malformed",
    );
}

#[test]
fn image_version_malformed() {
    refused(
        &["--name", "ok-name", "--image-version", ""],
        "InvalidImageVersion.Malformed",
    );
    refused(
        &["--name", "ok-name", "--image-version", &"v".repeat(41)],
        "InvalidImageVersion.Malformed",
    );
}

#[test]
fn description_malformed() {
    refused(
        &["--name", "ok-name", "--description", "d"],
        "InvalidDescription.Malformed",
    );
    refused(
        &["--name", "ok-name", "--description", &"d".repeat(257)],
        "InvalidDescription.Malformed",
    );
    refused(
        &["--name", "ok-name", "--description", "https://example.com"],
        "InvalidDescription.Malformed",
    );
}

#[test]
fn platform_malformed() {
    refused(
        &["--name", "ok-name", "--platform", "Windows 11"],
        "InvalidPlatform.Malformed",
    );
}

#[test]
fn architecture_malformed() {
    refused(
        &["--name", "ok-name", "--arch", "aarch64"],
        "InvalidArchitecture.Malformed",
    );
}

#[test]
fn boot_mode_malformed() {
    refused(
        &["--name", "ok-name", "--boot-mode", "Legacy"],
        "InvalidBootMode.Malformed",
    );
}

#[test]
fn quota_exceed_tags() {
    let t = tags(21);
    let mut a = vec!["--name", "ok-name"];
    a.extend(t.iter().map(String::as_str));
    refused(&a, "QuotaExceed.Tags");
}

#[test]
fn tag_key_malformed() {
    refused(
        &["--name", "ok-name", "--tag", "=v"],
        "InvalidTagKey.Malformed",
    );
    refused(
        &[
            "--name",
            "ok-name",
            "--tag",
            &format!("{}=v", "k".repeat(129)),
        ],
        "InvalidTagKey.Malformed",
    );
    refused(
        &["--name", "ok-name", "--tag", "see-http://x=v"],
        "InvalidTagKey.Malformed",
    );
}

#[test]
fn tag_value_malformed() {
    refused(
        &[
            "--name",
            "ok-name",
            "--tag",
            &format!("k={}", "v".repeat(129)),
        ],
        "InvalidTagValue.Malformed",
    );
}

#[test]
fn duplicate_tag_key() {
    refused(
        &["--name", "ok-name", "--tag", "k=1", "--tag", "k=2"],
        "Duplicate.TagKey",
    );
}

#[test]
fn client_token_malformed() {
    refused(
        &["--name", "ok-name", "--client-token", &"t".repeat(65)],
        "InvalidClientToken.Malformed",
    );
    refused(
        &["--name", "ok-name", "--client-token", "jeton-à"],
        "InvalidClientToken.Malformed",
    );
}

#[test]
fn the_edges_that_pass() {
    let t = tmp();
    let d = t.path();
    small(d);
    let twenty = tags(20);
    let mut a = vec![
        "--json",
        "--store",
        "st",
        "create",
        "--dry-run",
        "--snapshot",
        "small.raw",
        "--name",
        "ok-name",
        "--family",
        "fam",
        "--image-version",
        "1",
        "--description",
        "ok",
        "--platform",
        "Windows Server 2022",
        "--arch",
        "arm64",
        "--boot-mode",
        "UEFI-Preferred",
    ];
    let token = "t".repeat(64);
    a.extend(["--client-token", token.as_str()]);
    a.extend(twenty.iter().map(String::as_str));
    let r = kiln_in(d, &a);
    assert_eq!(
        (r.status, r.code().as_str()),
        (0, "DryRunOperation"),
        "{}",
        r.stdout
    );
    assert!(!d.join("st").exists());
}

#[test]
fn output_dir_exports_follow_the_same_rules() {
    let t = tmp();
    let d = t.path();
    small(d);
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--name",
            "n",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "--output-dir",
            "o1",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidImageName.Malformed")
    );
    assert!(!d.join("o1").exists());
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--name",
            "ok-name",
            "--snapshot",
            "small.raw",
            "--format",
            "raw",
            "--output-dir",
            "o2",
            "--arch",
            "sparc",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidArchitecture.Malformed")
    );
    assert!(!d.join("o2").exists());
}
