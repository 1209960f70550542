//! `kiln create --request FILE`: JSON and TOML request files with CreateImage's parameter names.

use std::fs;
use std::path::Path;

use crate::common::*;

fn sources(d: &Path) {
    let p = d.join("sys.raw");
    sparse_raw(&p, 32 << 20);
    write_at(&p, 0, b"system disk");
    write_at(&p, 9 << 20, &vec![0x11u8; 100_000]);
    let p = d.join("data.raw");
    sparse_raw(&p, 8 << 20);
    write_at(&p, 4096, b"data disk");
}

const JSON: &str = r#"{
  "ImageName": "golden-web",
  "ImageFamily": "web",
  "ImageVersion": "2024.06",
  "Description": "web servers",
  "Platform": "Ubuntu",
  "Architecture": "x86_64",
  "BootMode": "UEFI",
  "DiskDeviceMapping": [
    {"SnapshotId": "sys.raw", "DiskType": "system"},
    {"SnapshotId": "data.raw", "Device": "/dev/xvdb", "Size": "64M"},
    {"Device": "/dev/xvdc", "Size": "48M"}
  ],
  "Tag": [{"Key": "team", "Value": "web"}, {"Key": "env", "Value": "prod"}],
  "ClientToken": "golden-web-2024-06"
}
"#;

const TOML: &str = r#"
ImageName = "golden-web"
ImageFamily = "web"
ImageVersion = "2024.06"
Description = "web servers"
Platform = "Ubuntu"
Architecture = "x86_64"
BootMode = "UEFI"
ClientToken = "golden-web-2024-06"

[[DiskDeviceMapping]]
SnapshotId = "sys.raw"
DiskType = "system"

[[DiskDeviceMapping]]
SnapshotId = "data.raw"
Device = "/dev/xvdb"
Size = "64M"

[[DiskDeviceMapping]]
Device = "/dev/xvdc"
Size = "48MiB"

[[Tag]]
Key = "team"
Value = "web"

[[Tag]]
Key = "env"
Value = "prod"
"#;

/// The manifest without what differs between two runs of the same request.
fn comparable(dir: &Path) -> serde_json::Value {
    let mut m = manifest(dir);
    let o = m.as_object_mut().unwrap();
    o.remove("ImageId");
    o.remove("CreationTime");
    m
}

#[test]
fn json_toml_and_flags_give_the_same_manifest() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::write(d.join("image.json"), JSON).unwrap();
    fs::write(d.join("image.toml"), TOML).unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "image.json",
            "--format",
            "raw",
            "--output-dir",
            "from-json",
        ],
    )
    .ok();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "image.toml",
            "--format",
            "raw",
            "--output-dir",
            "from-toml",
        ],
    )
    .ok();
    kiln_in(
        d,
        &[
            "create",
            "--name",
            "golden-web",
            "--family",
            "web",
            "--image-version",
            "2024.06",
            "--description",
            "web servers",
            "--platform",
            "Ubuntu",
            "--arch",
            "x86_64",
            "--boot-mode",
            "UEFI",
            "--disk",
            "snapshot=sys.raw,type=system",
            "--disk",
            "snapshot=data.raw,device=/dev/xvdb,size=64M",
            "--disk",
            "device=/dev/xvdc,size=48M",
            "--tag",
            "team=web",
            "--tag",
            "env=prod",
            "--client-token",
            "golden-web-2024-06",
            "--format",
            "raw",
            "--output-dir",
            "from-flags",
        ],
    )
    .ok();
    let flags = comparable(&d.join("from-flags"));
    assert_eq!(comparable(&d.join("from-json")), flags);
    assert_eq!(comparable(&d.join("from-toml")), flags);
    assert_eq!(flags["ImageFamily"], "web");
    assert_eq!(flags["BootMode"], "UEFI");
    assert_eq!(flags["DiskDeviceMappings"][2]["VirtualSize"], 48u64 << 20);
    for dir in ["from-json", "from-toml", "from-flags"] {
        assert_sums(&d.join(dir));
    }
}

#[test]
fn a_request_file_into_the_store_is_idempotent_by_its_client_token() {
    let t = tmp();
    let d = t.path();
    sources(d);
    // Snapshot paths are relative to the file, whatever the current directory.
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("image.json"), JSON).unwrap();
    let sub = d.join("sub");
    let a = kiln_in(
        &sub,
        &[
            "--store",
            "../st",
            "create",
            "--request",
            "../image.json",
            "--format",
            "raw",
            "-q",
        ],
    )
    .ok();
    let b = kiln_in(
        d,
        &[
            "--store",
            "st",
            "create",
            "--request",
            "image.json",
            "--format",
            "raw",
            "-q",
        ],
    )
    .ok();
    assert_eq!(a.stdout.trim(), b.stdout.trim());
    assert_eq!(fs::read_dir(d.join("st/images")).unwrap().count(), 1);
}

#[test]
fn flags_override_the_file() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::write(d.join("image.json"), JSON).unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "image.json",
            "--name",
            "other-name",
            "--platform",
            "Debian",
            "--snapshot",
            "sys.raw",
            "--tag",
            "only=me",
            "--format",
            "raw",
            "--output-dir",
            "o",
        ],
    )
    .ok();
    let m = manifest(&d.join("o"));
    assert_eq!(m["ImageName"], "other-name");
    assert_eq!(m["Platform"], "Debian");
    assert_eq!(m["ImageFamily"], "web");
    assert_eq!(m["DiskDeviceMappings"].as_array().unwrap().len(), 1);
    assert_eq!(
        m["Tags"],
        serde_json::json!([{"Key": "only", "Value": "me"}])
    );
}

#[test]
fn an_unknown_key_names_the_nearest_known_one() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::write(
        d.join("typo.json"),
        r#"{"ImageNmae": "x", "SnapshotId": "sys.raw"}"#,
    )
    .unwrap();
    fs::write(
        d.join("typo.toml"),
        "ImageName = \"web-1\"\n[[DiskDeviceMapping]]\nSnapshotID = \"sys.raw\"\n",
    )
    .unwrap();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "typo.json",
            "--output-dir",
            "o",
        ],
    );
    assert_eq!((r.status, r.code().as_str()), (2, "InvalidParameter"));
    assert!(
        r.stdout.contains("ImageNmae") && r.stdout.contains("did you mean 'ImageName'"),
        "{}",
        r.stdout
    );
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "typo.toml",
            "--output-dir",
            "o",
        ],
    );
    assert_eq!((r.status, r.code().as_str()), (2, "InvalidParameter"));
    assert!(
        r.stdout.contains("DiskDeviceMapping[1].SnapshotId"),
        "{}",
        r.stdout
    );
    assert!(!d.join("o").exists());
}

#[test]
fn an_instance_id_that_names_no_domain_xml_is_not_found() {
    let t = tmp();
    let d = t.path();
    fs::write(
        d.join("i.json"),
        r#"{"ImageName": "from-vm", "InstanceId": "i-123"}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &["--json", "--store", "st", "create", "--request", "i.json"],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidInstanceId.NotFound")
    );
    assert!(r.stdout.contains("domain XML"), "{}", r.stdout);
    assert!(!d.join("st").exists());
}

#[test]
fn dry_run_in_the_file_writes_nothing() {
    let t = tmp();
    let d = t.path();
    sources(d);
    fs::write(
        d.join("dry.toml"),
        "ImageName = \"dry-one\"\nSnapshotId = \"sys.raw\"\nDryRun = true\n",
    )
    .unwrap();
    let r = kiln_in(
        d,
        &["--json", "--store", "st", "create", "--request", "dry.toml"],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (0, "DryRunOperation"),
        "{}",
        r.stdout
    );
    assert!(!d.join("st").exists());
}
