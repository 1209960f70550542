//! Request files in the three vendors' shapes (issue 15): the examples of the Alibaba, JD Cloud and
//! Huawei IMS documents run as written with instance and snapshot IDs replaced by local paths, each
//! result checked with `qemu-img compare` and `info`; invalid requests answered in each dialect's
//! codes with exit status 2 and nothing written; responses and DescribeImages in each shape.

use std::fs;
use std::path::Path;

use crate::common::{assert_same, kiln_in, manifest, qemu_img, qemu_io, qemu_io_f, tmp, Run};
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn json(r: &Run) -> Value {
    serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", r.stdout, r.stderr))
}

/// A qcow2 of `size` with 1 MiB of `pattern` at 0.
fn disk(d: &Path, name: &str, size: &str, pattern: u8) {
    qemu_img(d, &["create", "-q", "-f", "qcow2", name, size]);
    qemu_io(d, name, &[&format!("write -P {pattern} 0 1M")]);
}

fn domain(name: &str, disks: &[(&str, &str)]) -> String {
    let disks: String = disks
        .iter()
        .map(|(file, target)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{file}'/><target dev='{target}' bus='virtio'/></disk>"
            )
        })
        .collect();
    format!("<domain type='kvm'><name>{name}</name><devices>{disks}</devices></domain>")
}

/// vm.xml: vda (system), vdb, vdc, vdd, each a 64 MiB qcow2 with its own pattern; snap.raw, a
/// 32 MiB raw "snapshot" with 2 MiB of data.
fn jd_lab(d: &Path) {
    for (i, t) in ["vda", "vdb", "vdc", "vdd"].iter().enumerate() {
        disk(d, &format!("{t}.qcow2"), "64M", 0x11 + i as u8);
    }
    qemu_img(d, &["create", "-q", "-f", "raw", "snap.raw", "32M"]);
    qemu_io_f(d, "raw", "snap.raw", &["write -P 0x22 0 2M"]);
    let xml = domain(
        "web1",
        &[
            ("vda.qcow2", "vda"),
            ("vdb.qcow2", "vdb"),
            ("vdc.qcow2", "vdc"),
            ("vdd.qcow2", "vdd"),
        ],
    );
    fs::write(d.join("vm.xml"), xml).unwrap();
}

/// JD's document example, instanceId and snapshotId replaced by local paths.
const JD_EXAMPLE: &str = r#"/v1/regions/cn-north-1/instances/vm.xml:createImage
{
    "name":"test",
    "description":"test",
    "dataDisks":[
        {
            "deviceName":"vdc",
            "noDevice":true
        },
        {
            "deviceName":"vde",
            "autoDelete":true,
            "CloudDiskSpec":{
            	"snapshotId":"snap.raw",
                "diskType":"ssd.io1",
                "diskSizeGB":40,
                "iops":500
            }
        },
        {
            "deviceName":"vdh",
            "CloudDiskSpec":{
                "diskType":"ssd.gp1",
                "diskSizeGB":40
            }
        }
    ]
}
"#;

#[test]
fn jd_scenario_excludes_vdc_adds_vde_from_a_snapshot_and_an_empty_vdh() {
    let t = tmp();
    let d = t.path();
    jd_lab(d);
    fs::write(d.join("jd.json"), JD_EXAMPLE).unwrap();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "jd.json",
            "--output-dir",
            "out",
            "-q",
        ],
    )
    .ok();
    let v = json(&r);
    let id = v["result"]["imageId"].as_str().expect("result.imageId");
    assert!(
        v["requestId"].as_str().is_some_and(|s| s.len() == 32),
        "{v}"
    );
    let m = manifest(&d.join("out"));
    assert_eq!(m["ImageId"], id);
    assert_eq!(m["ImageName"], "test");
    let names = &m["RequestDialect"]["DeviceNames"];
    let want = [
        ("xvda", "vda", "vda.qcow2"),
        ("xvdb", "vdb", "vdb.qcow2"),
        ("xvdc", "vdd", "vdd.qcow2"),
        ("xvdd", "vde", "snap.raw"),
        ("xvde", "vdh", ""),
    ];
    let disks = m["DiskDeviceMappings"].as_array().unwrap();
    let targets: Vec<&str> = disks
        .iter()
        .map(|d| d["OriginalTarget"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(targets, ["vda", "vdb", "vdd", "-", "-"]);
    for (dev, jd, src) in want {
        assert_eq!(names[format!("/dev/{dev}")], jd, "{names}");
        let out = format!("out/{dev}.qcow2");
        if !src.is_empty() {
            assert_same(d, src, &out);
        }
    }
    // vdc is left out: no output disk holds its pattern.
    for dev in ["xvdb", "xvdc", "xvdd", "xvde"] {
        let r = crate::common::tool_in(
            d,
            "qemu-img",
            &["compare", "vdc.qcow2", &format!("out/{dev}.qcow2")],
        );
        assert_ne!(r.status, 0, "{dev} holds vdc");
    }
    for dev in ["xvdd", "xvde"] {
        assert_eq!(
            crate::common::virtual_size(d, &format!("out/{dev}.qcow2")),
            40 * GIB
        );
    }
    qemu_img(d, &["create", "-q", "-f", "raw", "empty.raw", "40G"]);
    assert_same(d, "empty.raw", "out/xvde.qcow2");
    assert_eq!(crate::common::info(d, "out/xvda.qcow2")["format"], "qcow2");
    crate::common::assert_sums(&d.join("out"));
}

/// `create --json --request bad.json --output-dir out` with `body` (and `extra` flags): exit 2,
/// nothing written; the JSON answer.
fn refused(d: &Path, body: &str, extra: &[&str]) -> Value {
    fs::write(d.join("bad.json"), body).unwrap();
    let mut args = vec![
        "--json",
        "create",
        "--request",
        "bad.json",
        "--output-dir",
        "out",
    ];
    args.extend_from_slice(extra);
    let r = kiln_in(d, &args);
    assert_eq!(r.status, 2, "{body}: {}", r.stdout);
    assert!(!d.join("out").exists(), "{body} wrote output");
    json(&r)
}

/// A JD request's error: JD's shape, and its `status`.
fn jd_refused(d: &Path, body: &str, status: &str) -> Value {
    let v = refused(d, body, &[]);
    assert_eq!(v["error"]["status"], status, "{body}: {v}");
    assert!(
        v["requestId"].is_string() && v["error"]["code"].is_u64(),
        "{v}"
    );
    v
}

#[test]
fn jd_shrinking_a_disk_is_refused_in_jd_words() {
    let t = tmp();
    let d = t.path();
    jd_lab(d);
    qemu_img(d, &["create", "-q", "-f", "qcow2", "big.qcow2", "30G"]);
    let xml = domain("big", &[("vda.qcow2", "vda"), ("big.qcow2", "vdb")]);
    fs::write(d.join("big.xml"), xml).unwrap();
    let v = jd_refused(
        d,
        r#"/v1/regions/cn-north-1/instances/big.xml:createImage
        {"name": "shrink", "dataDisks": [{"deviceName": "vdb", "cloudDiskSpec": {"diskSizeGB": 20}}]}"#,
        "OUT_OF_RANGE",
    );
    assert_eq!(
        v["error"]["message"],
        "Device 'vdb' size can only be larger than the original size"
    );
}

#[test]
fn jd_invalid_requests_are_refused_with_jd_codes() {
    let t = tmp();
    let d = t.path();
    jd_lab(d);
    let line = "/v1/regions/cn-north-1/instances/vm.xml:createImage\n";
    let cases: &[(&str, &str)] = &[
        (r#"{"name": "a"}"#, "INVALID_ARGUMENT"),
        (r#"{"name": "has space"}"#, "INVALID_ARGUMENT"),
        (
            r#"{"name": "abcdefghijklmnopqrstuvwxyzabcdefg"}"#,
            "INVALID_ARGUMENT",
        ),
        (r#"{"description": "no name"}"#, "INVALID_ARGUMENT"),
        (r#"{"name": "ok", "imageName": "x"}"#, "INVALID_ARGUMENT"),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vda", "noDevice": true}]}"#,
            "INVALID_ARGUMENT",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdbn", "noDevice": true}]}"#,
            "INVALID_ARGUMENT",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdb", "noDevice": true}, {"deviceName": "vdb", "noDevice": true}]}"#,
            "DUPLICATE",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "noDevice": true}]}"#,
            "NOT_FOUND",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskSizeGB": 40}}]}"#,
            "INVALID_ARGUMENT",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskType": "ssd.gp1"}}]}"#,
            "OUT_OF_RANGE",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskType": "ssd.gp1", "diskSizeGB": 45}}]}"#,
            "OUT_OF_RANGE",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskType": "ssd.gp1", "diskSizeGB": 10}}]}"#,
            "OUT_OF_RANGE",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskType": "ssd.gp1", "diskSizeGB": 40, "iops": 500}}]}"#,
            "OUT_OF_RANGE",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"diskType": "ssd.gp1", "diskSizeGB": 40, "encrypt": true}}]}"#,
            "INVALID_ARGUMENT",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"snapshotId": "nope.raw"}}]}"#,
            "NOT_FOUND",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdb", "cloudDiskSpec": {"snapshotId": "snap.raw"}}]}"#,
            "INVALID_ARGUMENT",
        ),
        (
            r#"{"name": "ok", "dataDisks": [{"deviceName": "vdb", "diskCategory": "local"}]}"#,
            "INVALID_ARGUMENT",
        ),
    ];
    for (body, status) in cases {
        jd_refused(d, &format!("{line}{body}"), status);
    }
    // The instance is the request line's: one that names no domain XML is NOT_FOUND.
    let v = jd_refused(
        d,
        "/v1/regions/cn-north-1/instances/gone.xml:createImage\n{\"name\": \"ok\"}",
        "NOT_FOUND",
    );
    assert_eq!(v["error"]["code"], 404);
    // A body that is not JSON under JD's request line is still answered in JD's terms.
    jd_refused(d, &format!("{line}{{\"name\": }}"), "INVALID_ARGUMENT");
    // Without a request line or --instance, the instanceId is missing.
    jd_refused(d, r#"{"name": "ok", "dataDisks": []}"#, "INVALID_ARGUMENT");
}

/// Huawei's examples' sources: an instance (system disk vda, data disk vdb), a data volume, a
/// volume with an OS, and the bucket directory `ims-image` holding `centos70.qcow2`.
fn huawei_lab(d: &Path) {
    disk(d, "sys.qcow2", "64M", 0x31);
    disk(d, "data.qcow2", "64M", 0x32);
    disk(d, "volume.qcow2", "96M", 0x33);
    fs::create_dir(d.join("ims-image")).unwrap();
    disk(d, "ims-image/centos70.qcow2", "1G", 0x34);
    let xml = domain("ecs1", &[("sys.qcow2", "vda"), ("data.qcow2", "vdb")]);
    fs::write(d.join("ecs.xml"), xml).unwrap();
}

/// The document's eight examples (request line and body), IDs replaced by local paths, with the
/// source each image's first disk must equal and its size.
fn huawei_examples() -> Vec<(&'static str, String, &'static str, u64)> {
    let line = "POST https://{Endpoint}/v2/cloudimages/action\n";
    let tags = r#""tags": ["aaa.111", "bbb.333", "ccc.444"]"#;
    let image_tags =
        r#""image_tags": [{"key": "key2", "value": "value2"}, {"key": "key1", "value": "value1"}]"#;
    let instance = |t: &str| {
        format!(
            r#"{{"name": "ims_test", "description": "云服务器制作系统盘镜像", "instance_id": "ecs.xml", {t}}}"#
        )
    };
    let data = |t: &str| {
        format!(
            r#"{{"data_images": [{{"name": "ims_data_image_test", "description": "云服务器数据卷制作数据盘镜像", "volume_id": "data.qcow2", {t}}}]}}"#
        )
    };
    let file = |t: &str, config: &str| {
        format!(
            r#"{{"name": "ims_test_file", "description": "OBS文件制作镜像", "image_url": "ims-image:centos70.qcow2", "os_version": "CentOS 7.0 64bit", "is_config_init": true, "min_disk": 40, {config} {t}}}"#
        )
    };
    let volume = |t: &str| {
        format!(
            r#"{{"name": "ims_test", "description": "数据卷制作系统盘镜像", "volume_id": "volume.qcow2", "type": "ECS", "os_version": "CentOS 7.0 64bit", {t}}}"#
        )
    };
    vec![
        (
            "instance-tags",
            format!("{line}{}", instance(tags)),
            "sys.qcow2",
            64 << 20,
        ),
        (
            "data-tags",
            format!("{line}{}", data(tags)),
            "data.qcow2",
            64 << 20,
        ),
        (
            "file-tags",
            format!("{line}{}", file(tags, r#""is_config": true,"#)),
            "ims-image/centos70.qcow2",
            40 * GIB,
        ),
        (
            "instance-image-tags",
            format!("{line}{}", instance(image_tags)),
            "sys.qcow2",
            64 << 20,
        ),
        (
            "data-image-tags",
            format!("POST /v2/cloudimages/action\n{}", data(image_tags)),
            "data.qcow2",
            64 << 20,
        ),
        (
            "file-image-tags",
            format!("{line}{}", file(image_tags, "")),
            "ims-image/centos70.qcow2",
            40 * GIB,
        ),
        (
            "volume-tags",
            format!("{line}{}", volume(tags)),
            "volume.qcow2",
            96 << 20,
        ),
        (
            "volume-image-tags",
            format!("{line}{}", volume(image_tags)),
            "volume.qcow2",
            96 << 20,
        ),
    ]
}

#[test]
fn huawei_examples_run_as_written_and_their_jobs_report_success() {
    let t = tmp();
    let d = t.path();
    huawei_lab(d);
    for (name, body, source, size) in huawei_examples() {
        let file = format!("{name}.json");
        fs::write(d.join(&file), &body).unwrap();
        let store = format!("st-{name}");
        let r = kiln_in(
            d,
            &[
                "--json",
                "--store",
                &store,
                "create",
                "--request",
                &file,
                "-q",
            ],
        )
        .ok();
        let job = json(&r)["job_id"].as_str().expect("job_id").to_string();
        let r = kiln_in(d, &["--store", &store, "describe", "--job", &job]).ok();
        let j = json(&r);
        assert_eq!(j["status"], "SUCCESS", "{name}: {j}");
        assert_eq!(j["job_id"], job.as_str());
        assert!(j["fail_reason"].is_null());
        let id = j["entities"]["image_id"].as_str().unwrap();
        let dir = d.join(&store).join("images").join(id);
        let m = manifest(&dir);
        let first = m["DiskDeviceMappings"][0]["File"]
            .as_str()
            .unwrap()
            .to_string();
        let out = dir.join(&first).display().to_string();
        assert_same(d, source, &out);
        assert_eq!(crate::common::virtual_size(d, &out), size, "{name}");
        let data_image = name.starts_with("data");
        assert_eq!(
            m["ImageType"],
            if data_image { "DataDisk" } else { "System" },
            "{name}"
        );
        let tags: Vec<&str> = m["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["Key"].as_str().unwrap())
            .collect();
        assert!(
            tags == ["aaa", "bbb", "ccc"] || tags == ["key2", "key1"],
            "{name}: {tags:?}"
        );
        if !data_image {
            assert_eq!(
                m["DiskDeviceMappings"].as_array().unwrap().len(),
                1,
                "{name}"
            );
        }
        if name.starts_with("file") || name.starts_with("volume") {
            assert_eq!(m["Platform"], "CentOS", "{name}");
        }
        if name == "file-tags" {
            let p = &m["RequestDialect"]["Parameters"];
            assert_eq!(
                (p["is_config"].clone(), p["is_config_init"].clone()),
                (Value::Bool(true), Value::Bool(true))
            );
        }
    }
}

/// A Huawei request's error: IMS's shape and code.
fn huawei_refused(d: &Path, body: &str, code: &str) {
    let v = refused(d, body, &["--dialect", "huawei"]);
    assert_eq!(v["error"]["code"], code, "{body}: {v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[test]
fn huawei_invalid_requests_are_refused_with_ims_errors() {
    let t = tmp();
    let d = t.path();
    huawei_lab(d);
    let cases: &[(&str, &str)] = &[
        // Not JSON, under --dialect huawei
        ("{not json", "IMG.0001"),
        // tags and image_tags together
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "tags": ["a.1"], "image_tags": [{"key": "a", "value": "1"}]}"#,
            "IMG.0003",
        ),
        (r#"{"name": "a"}"#, "IMG.0002"),
        (r#"{"instance_id": "ecs.xml"}"#, "IMG.0002"),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "image_url": "ims-image:centos70.qcow2", "min_disk": 40}"#,
            "IMG.0003",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "data_images": [{"name": "d", "volume_id": "data.qcow2"}]}"#,
            "IMG.0003",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "description": "a<b"}"#,
            "IMG.0001",
        ),
        (r#"{"name": " a", "instance_id": "ecs.xml"}"#, "IMG.0001"),
        (
            r#"{"name": "a", "image_url": "ims-image:centos70.qcow2", "min_disk": 39}"#,
            "IMG.0006",
        ),
        (
            r#"{"name": "a", "image_url": "ims-image:centos70.qcow2"}"#,
            "IMG.0002",
        ),
        (
            r#"{"name": "a", "image_url": "ims-image:../ecs.xml", "min_disk": 40}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "image_url": "ims-image:gone.qcow2", "min_disk": 40}"#,
            "IMG.0004",
        ),
        (
            r#"{"name": "a", "volume_id": "volume.qcow2", "os_version": "Plan9 4 64bit"}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "volume_id": "volume.qcow2", "os_version": "CentOS 7.0 64bit", "type": "IsoImage"}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "architecture": "mips"}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "min_ram": 4096, "max_ram": 1024}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "enterprise_project_id": "proj"}"#,
            "IMG.0001",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "cmk_id": "k-1"}"#,
            "IMG.0007",
        ),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "tags": ["nodot"]}"#,
            "IMG.0001",
        ),
        (r#"{"name": "a", "instance_id": "gone.xml"}"#, "IMG.0004"),
        (
            r#"{"name": "a", "instance_id": "ecs.xml", "instanceid": "x"}"#,
            "IMG.0001",
        ),
        (
            r#"{"data_images": [{"name": "d", "volume_id": "data.qcow2"}, {"name": "e", "volume_id": "data.qcow2"}]}"#,
            "IMG.0001",
        ),
    ];
    for (body, code) in cases {
        huawei_refused(d, body, code);
    }
}

#[test]
fn huawei_arm_images_boot_uefi() {
    let t = tmp();
    let d = t.path();
    huawei_lab(d);
    fs::write(
        d.join("arm.json"),
        r#"{"name": "arm_img", "instance_id": "ecs.xml", "architecture": "arm", "min_ram": 1024}"#,
    )
    .unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "arm.json",
            "--output-dir",
            "out",
            "-q",
        ],
    )
    .ok();
    let m = manifest(&d.join("out"));
    assert_eq!(
        (m["Architecture"].as_str(), m["BootMode"].as_str()),
        (Some("arm64"), Some("UEFI"))
    );
    assert_eq!(m["RequestDialect"]["Parameters"]["min_ram"], 1024);
}

/// sys.raw (system) and data.raw, as JSON and as the query form.
fn alibaba_lab(d: &Path) {
    for (f, p) in [("sys.raw", 0x41), ("data.raw", 0x42)] {
        qemu_img(d, &["create", "-q", "-f", "raw", f, "16M"]);
        qemu_io_f(d, "raw", f, &[&format!("write -P {p} 0 1M")]);
    }
}

#[test]
fn alibaba_query_form_gives_the_same_image_as_json() {
    let t = tmp();
    let d = t.path();
    alibaba_lab(d);
    fs::write(
        d.join("q.json"),
        r#"{"ImageName": "same", "Platform": "Ubuntu", "Description": "both forms",
            "DiskDeviceMapping": [{"SnapshotId": "sys.raw", "DiskType": "system"}, {"SnapshotId": "data.raw", "Size": 1}],
            "Tag": [{"Key": "k", "Value": "v"}], "ResourceGroupId": "rg-bp67acfmxazb4p", "Features": {"ImdsSupport": "v2"}}"#,
    )
    .unwrap();
    fs::write(
        d.join("q.txt"),
        "ImageName=same&Platform=Ubuntu&Description=both%20forms\n\
         DiskDeviceMapping.1.SnapshotId=sys.raw&DiskDeviceMapping.1.DiskType=system\n\
         DiskDeviceMapping.2.SnapshotId=data.raw&DiskDeviceMapping.2.Size=1\n\
         Tag.1.Key=k&Tag.1.Value=v&ResourceGroupId=rg-bp67acfmxazb4p&Features.ImdsSupport=v2\n",
    )
    .unwrap();
    kiln_in(
        d,
        &["create", "--request", "q.json", "--output-dir", "a", "-q"],
    )
    .ok();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "q.txt",
            "--output-dir",
            "b",
            "-q",
        ],
    )
    .ok();
    let v = json(&r);
    assert!(
        v["ImageId"].is_string() && v["RequestId"].is_string(),
        "{v}"
    );
    let (a, b) = (manifest(&d.join("a")), manifest(&d.join("b")));
    for k in [
        "ImageName",
        "Platform",
        "Description",
        "Tags",
        "RequestDialect",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
    let sums = |m: &Value| -> Vec<(String, String)> {
        m["DiskDeviceMappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["Device"].as_str().unwrap().into(),
                    d["Sha256"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(sums(&a), sums(&b));
    assert_eq!(
        a["RequestDialect"]["Parameters"]["ResourceGroupId"],
        "rg-bp67acfmxazb4p"
    );
    assert_same(d, "a/xvda.qcow2", "b/xvda.qcow2");
    assert_same(d, "sys.raw", "b/xvda.qcow2");
}

#[test]
fn alibaba_document_query_example_runs_as_written() {
    let t = tmp();
    let d = t.path();
    alibaba_lab(d);
    fs::write(
        d.join("doc.txt"),
        "https://ecs.aliyuncs.com/?Action=CreateImage\n&RegionId=cn-hangzhou\n&SnapshotId=sys.raw\n&ImageName=demo_image\n&<公共请求参数>\n",
    )
    .unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "doc.txt",
            "--output-dir",
            "out",
            "-q",
        ],
    )
    .ok();
    let m = manifest(&d.join("out"));
    assert_eq!(m["ImageName"], "demo_image");
    assert_eq!(m["RequestDialect"]["Parameters"]["RegionId"], "cn-hangzhou");
    assert_same(d, "sys.raw", "out/xvda.qcow2");
    assert_eq!(
        crate::common::info(d, "out/xvda.qcow2")["virtual-size"],
        16 << 20
    );
}

#[test]
fn alibaba_instance_id_wins_over_disk_mappings_with_a_warning() {
    let t = tmp();
    let d = t.path();
    alibaba_lab(d);
    jd_lab(d);
    fs::write(
        d.join("i.json"),
        r#"{"ImageName": "from-vm", "InstanceId": "vm.xml", "SnapshotId": "sys.raw",
            "DiskDeviceMapping": [{"SnapshotId": "sys.raw"}]}"#,
    )
    .unwrap();
    let r = kiln_in(d, &["create", "--request", "i.json", "--output-dir", "out"]).ok();
    assert!(
        r.stderr
            .contains("DiskDeviceMapping was ignored: InstanceId takes priority"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("SnapshotId"), "{}", r.stderr);
    let m = manifest(&d.join("out"));
    assert_eq!(m["Instance"]["Name"], "web1");
    for (i, src) in ["vda", "vdb", "vdc", "vdd"].iter().enumerate() {
        let dev = (b'a' + i as u8) as char;
        assert_same(d, &format!("{src}.qcow2"), &format!("out/xvd{dev}.qcow2"));
    }
}

#[test]
fn alibaba_instance_id_names_a_libvirt_domain_with_connect() {
    let t = tmp();
    let d = t.path();
    jd_lab(d);
    // libvirt's test driver, from a node file holding the domain.
    let abs = |f: &str| d.join(f).display().to_string();
    let node = format!(
        "<node>{}</node>",
        domain(
            "web2",
            &[(&abs("vda.qcow2"), "vda"), (&abs("vdb.qcow2"), "vdb")]
        )
        .replace("type='kvm'", "type='test'")
        .replace(
            "<devices>",
            "<memory>65536</memory><os><type>hvm</type></os><devices>"
        )
    );
    fs::write(d.join("node.xml"), node).unwrap();
    fs::write(
        d.join("c.json"),
        r#"{"ImageName": "from-libvirt", "InstanceId": "web2"}"#,
    )
    .unwrap();
    let uri = format!("test://{}", abs("node.xml"));
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "c.json",
            "--connect",
            &uri,
            "--output-dir",
            "out",
            "-q",
        ],
    )
    .ok();
    assert_same(d, "vda.qcow2", "out/xvda.qcow2");
    assert_same(d, "vdb.qcow2", "out/xvdb.qcow2");
    fs::write(
        d.join("c2.json"),
        r#"{"ImageName": "from-libvirt", "InstanceId": "nosuch"}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "c2.json",
            "--connect",
            &uri,
            "--output-dir",
            "out2",
        ],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (2, "InvalidInstanceId.NotFound")
    );
    assert!(!d.join("out2").exists());
}

#[test]
fn alibaba_invalid_requests_are_refused_with_alibaba_codes() {
    let t = tmp();
    let d = t.path();
    alibaba_lab(d);
    let cases: &[(&str, &str, &str)] = &[
        ("a.json", r#"{"ImageName": "x", "SnapshotId": "sys.raw"}"#, "InvalidImageName.Malformed"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "Description": "x"}"#, "InvalidDescription.Malformed"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "Features": {"ImdsSupport": "v3"}}"#, "InvalidParameter.FeaturesImdsSupport"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "Features": {"NvmeSupport": "maybe"}}"#, "InvalidParameter"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "ResourceGroupId": "default group"}"#, "InvalidResourceGroup.NotFound"),
        ("a.json", r#"{"ImageName": "ok-name", "InstanceId": "gone.xml"}"#, "InvalidInstanceId.NotFound"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "Action": "DeleteImage"}"#, "InvalidParameter"),
        ("a.json", r#"{"ImageName": "ok-name", "SnapshotId": "sys.raw", "Platform": "Plan9"}"#, "InvalidPlatform.Malformed"),
        // A lower-case typo of an Alibaba key stays Alibaba's (not JD's shape).
        ("a.json", r#"{"imageName": "ok-name", "SnapshotId": "sys.raw"}"#, "InvalidParameter"),
        ("a.txt", "ImageName=ok-name&DiskDeviceMapping.1.SnapshotId=sys.raw&DiskDeviceMapping.1.Device=/dev/sda", "InvalidDevice.Malformed"),
        ("a.txt", "ImageName=ok-name&DiskDeviceMapping.18.SnapshotId=sys.raw", "InvalidParameter"),
        ("a.txt", "ImageName=ok-name&SnapshotId=sys.raw&Tag.1.Value=v", "MissingParameter"),
        ("a.txt", "ImageName=ok-name&SnapshotId=sys.raw&Tag.1.Key=aliyun&Tag.1.Key=b", "InvalidParameter"),
        ("a.txt", "ImageName=ok-name&SnapshotId=gone.raw", "InvalidSnapshotId.NotFound"),
    ];
    for (file, body, code) in cases {
        fs::write(d.join(file), body).unwrap();
        let r = kiln_in(
            d,
            &["--json", "create", "--request", file, "--output-dir", "out"],
        );
        assert_eq!(
            (r.status, r.code()),
            (2, code.to_string()),
            "{body}: {}",
            r.stdout
        );
        assert!(!d.join("out").exists(), "{body} wrote output");
    }
    // A forced dialect that does not fit the file is refused in that dialect's terms.
    fs::write(d.join("a.txt"), "ImageName=ok-name&SnapshotId=sys.raw").unwrap();
    let r = kiln_in(
        d,
        &[
            "--json",
            "create",
            "--request",
            "a.txt",
            "--dialect",
            "jdcloud",
            "--output-dir",
            "o",
        ],
    );
    assert_eq!(
        (r.status, json(&r)["error"]["status"].as_str()),
        (2, Some("INVALID_ARGUMENT"))
    );
}

#[test]
fn describe_prints_each_vendors_shape() {
    let t = tmp();
    let d = t.path();
    alibaba_lab(d);
    fs::write(d.join("a.json"), r#"{"ImageName": "desc-one", "SnapshotId": "sys.raw", "Tag": [{"Key": "k", "Value": "v"}]}"#).unwrap();
    kiln_in(d, &["--store", "st", "create", "--request", "a.json", "-q"]).ok();
    let a = json(
        &kiln_in(
            d,
            &[
                "--json",
                "--store",
                "st",
                "describe",
                "--dialect",
                "alibaba",
            ],
        )
        .ok(),
    );
    assert_eq!(a["TotalCount"], 1);
    let img = &a["Images"]["Image"][0];
    assert_eq!(
        (img["ImageName"].as_str(), img["Status"].as_str()),
        (Some("desc-one"), Some("Available"))
    );
    assert_eq!(img["Tags"]["Tag"][0]["TagKey"], "k");
    let j = json(
        &kiln_in(
            d,
            &[
                "--json",
                "--store",
                "st",
                "describe",
                "--dialect",
                "jdcloud",
            ],
        )
        .ok(),
    );
    assert_eq!(j["result"]["totalCount"], 1);
    assert_eq!(j["result"]["images"][0]["status"], "ready");
    assert_eq!(j["result"]["images"][0]["name"], "desc-one");
    let h = json(
        &kiln_in(
            d,
            &["--json", "--store", "st", "describe", "--dialect", "huawei"],
        )
        .ok(),
    );
    assert_eq!(h["images"][0]["status"], "active");
    assert_eq!(h["images"][0]["tags"][0], "k.v");
    // Without --dialect, describe --json is kiln's record list, as before.
    let plain = json(&kiln_in(d, &["--json", "--store", "st", "describe"]).ok());
    assert_eq!(plain[0]["ImageName"], "desc-one");
    let r = kiln_in(d, &["--json", "--store", "st", "describe", "--job", "0123"]);
    assert_eq!(
        (r.status, json(&r)["error"]["code"].as_str()),
        (2, Some("IMG.0004"))
    );
}

#[test]
fn huawei_jobs_run_then_fail_when_their_create_dies() {
    let t = tmp();
    let d = t.path();
    huawei_lab(d);
    fs::write(
        d.join("v.json"),
        r#"{"name": "dies", "volume_id": "volume.qcow2", "os_version": "Ubuntu 22.04 server 64bit"}"#,
    )
    .unwrap();
    let args = ["--store", "st", "create", "--request", "v.json", "-q"];
    let mut child = crate::common::kiln_stopped_at(d, &args, "staging");
    let records = json(&kiln_in(d, &["--json", "--store", "st", "describe"]).ok());
    let job = records[0]["RequestDialect"]["JobId"]
        .as_str()
        .unwrap()
        .to_string();
    let running = json(&kiln_in(d, &["--store", "st", "describe", "--job", &job]).ok());
    assert_eq!(running["status"], "RUNNING", "{running}");
    assert!(running["end_time"].is_null());
    crate::common::signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let failed = json(&kiln_in(d, &["--store", "st", "describe", "--job", &job]).ok());
    assert_eq!(failed["status"], "FAIL", "{failed}");
    assert_eq!(failed["entities"]["image_id"], records[0]["ImageId"]);
}

#[test]
fn huawei_volume_without_os_version_detects_the_os() {
    let t = tmp();
    let d = t.path();
    huawei_lab(d);
    fs::write(
        d.join("v.json"),
        r#"{"name": "detected", "volume_id": "volume.qcow2"}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &["create", "--request", "v.json", "--output-dir", "out", "-q"],
    )
    .ok();
    assert!(r.stderr.contains("os_version not given"), "{}", r.stderr);
    let m = manifest(&d.join("out"));
    assert!(m["Detection"].is_object(), "{m}");
    // No OS on this volume: the platform recorded is the default.
    assert_eq!(m["Platform"], "Others Linux");
    assert_same(d, "volume.qcow2", "out/xvda.qcow2");
}

#[test]
fn jd_replaces_a_disk_excluded_and_added_under_its_name() {
    let t = tmp();
    let d = t.path();
    jd_lab(d);
    fs::write(
        d.join("r.json"),
        r#"/v1/regions/cn-north-1/instances/vm.xml:createImage
        {"name": "replace", "dataDisks": [{"deviceName": "vdb", "noDevice": true},
          {"deviceName": "vdb", "cloudDiskSpec": {"snapshotId": "snap.raw"}}]}"#,
    )
    .unwrap();
    kiln_in(
        d,
        &["create", "--request", "r.json", "--output-dir", "out", "-q"],
    )
    .ok();
    let m = manifest(&d.join("out"));
    assert_eq!(m["RequestDialect"]["DeviceNames"]["/dev/xvdb"], "vdb");
    assert!(m["DiskDeviceMappings"][1]["OriginalTarget"].is_null());
    assert_same(d, "snap.raw", "out/xvdb.qcow2");
    assert_same(d, "vdc.qcow2", "out/xvdc.qcow2");
    // In text mode the error is JD's code and words on stderr, still exit 2.
    fs::write(
        d.join("dup.json"),
        r#"/v1/regions/cn-north-1/instances/vm.xml:createImage
        {"name": "dup", "dataDisks": [{"deviceName": "vdx", "cloudDiskSpec": {"snapshotId": "snap.raw"}},
          {"deviceName": "vdx", "cloudDiskSpec": {"snapshotId": "snap.raw"}}]}"#,
    )
    .unwrap();
    let r = kiln_in(
        d,
        &["create", "--request", "dup.json", "--output-dir", "out2"],
    );
    assert_eq!(r.status, 2);
    assert_eq!(r.stderr, "kiln: error: DUPLICATE: Duplicate deviceName\n");
    assert!(!d.join("out2").exists());
}
