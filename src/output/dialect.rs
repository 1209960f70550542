//! Responses in a vendor's shape: CreateImage's answer (Alibaba `{"ImageId","RequestId"}`, JD
//! Cloud `{"requestId","result":{"imageId"}}`, Huawei IMS `{"job_id"}`), DescribeImages' listing
//! in each vendor's field names, and IMS's job query (`kiln describe --job`).

use serde_json::{json, Value};

use super::pretty;
use crate::image::attributes::{ImageAttributes, Status};
use crate::image::store::Record;
use crate::request::dialect::{request_id, Dialect};

/// The create response for image `a` (its Huawei job ID is in its dialect record).
pub(crate) fn created(d: Dialect, a: &ImageAttributes) -> String {
    let v = match d {
        Dialect::Alibaba => json!({"ImageId": a.image_id, "RequestId": request_id()}),
        Dialect::JdCloud => json!({"requestId": request_id(), "result": {"imageId": a.image_id}}),
        Dialect::Huawei => json!({"job_id": job_id(a)}),
    };
    pretty(&v)
}

fn job_id(a: &ImageAttributes) -> Option<&str> {
    a.request_dialect.as_ref().and_then(|r| r.job_id.as_deref())
}

/// A vendor's own name for image device `device` (JD's `vdb`), else kiln's.
fn device_name(a: &ImageAttributes, device: &str) -> String {
    a.request_dialect
        .as_ref()
        .and_then(|r| r.device_names.get(device).cloned())
        .unwrap_or_else(|| device.to_string())
}

fn recorded<'a>(a: &'a ImageAttributes, key: &str) -> Option<&'a Value> {
    a.request_dialect
        .as_ref()
        .and_then(|r| r.parameters.get(key))
}

/// DescribeImages in `d`'s shape.
pub(crate) fn describe(d: Dialect, images: &[Record]) -> String {
    let v = match d {
        Dialect::Alibaba => json!({
            "RequestId": request_id(),
            "TotalCount": images.len(),
            "PageNumber": 1,
            "PageSize": images.len(),
            "Images": {"Image": images.iter().map(alibaba_image).collect::<Vec<_>>()},
        }),
        Dialect::JdCloud => json!({
            "requestId": request_id(),
            "result": {
                "images": images.iter().map(jd_image).collect::<Vec<_>>(),
                "totalCount": images.len(),
            },
        }),
        Dialect::Huawei => json!({"images": images.iter().map(huawei_image).collect::<Vec<_>>()}),
    };
    pretty(&v)
}

fn alibaba_image(r: &Record) -> Value {
    json!({
        "ImageId": r.image_id,
        "ImageName": r.image_name,
        "ImageFamily": r.image_family,
        "ImageVersion": r.image_version,
        "Description": r.description,
        "Status": r.status,
        "Progress": r.progress,
        "Size": r.size_gib,
        "Platform": r.platform,
        "Architecture": r.architecture,
        "BootMode": r.boot_mode,
        "ImageOwnerAlias": "self",
        "CreationTime": r.creation_time,
        "ResourceGroupId": recorded(r, "ResourceGroupId"),
        "ImdsSupport": recorded(r, "Features.ImdsSupport"),
        "DiskDeviceMappings": {"DiskDeviceMapping": r.disks.iter().map(|d| json!({
            "Device": d.device, "Size": d.size_gib.to_string(), "Type": d.disk_type.as_str(),
        })).collect::<Vec<_>>()},
        "Tags": {"Tag": r.tags.iter().map(|t| json!({"TagKey": t.key, "TagValue": t.value})).collect::<Vec<_>>()},
    })
}

fn jd_image(r: &Record) -> Value {
    let status = match r.status {
        Status::Creating => "pending",
        Status::Available => "ready",
        Status::CreateFailed => "error",
    };
    let system = r.disks.iter().find(|d| d.device.is_system());
    let data: Vec<Value> = r
        .disks
        .iter()
        .filter(|d| !d.device.is_system())
        .map(|d| {
            json!({
                "deviceName": device_name(r, &d.device),
                "diskCategory": "cloud",
                "cloudDiskSpec": {"diskSizeGB": d.size_gib},
            })
        })
        .collect();
    json!({
        "imageId": r.image_id,
        "name": r.image_name,
        "platform": r.platform,
        "architecture": r.architecture,
        "status": status,
        "createTime": r.creation_time,
        "desc": r.description,
        "imageSource": "private",
        "rootDeviceType": "cloudDisk",
        "systemDiskSizeGB": system.map(|d| d.size_gib),
        "sizeMB": r.disks.iter().map(|d| d.allocated_bytes).sum::<u64>() >> 20,
        "dataDisks": data,
    })
}

fn huawei_image(r: &Record) -> Value {
    let status = match r.status {
        Status::Creating => "saving",
        Status::Available => "active",
        Status::CreateFailed => "killed",
    };
    let system = r.disks.iter().find(|d| d.device.is_system());
    json!({
        "id": r.image_id,
        "name": r.image_name,
        "status": status,
        "visibility": "private",
        "__imagetype": "private",
        "__image_source_type": "uds",
        "__platform": r.platform,
        "__os_version": recorded(r, "os_version"),
        "__os_type": recorded(r, "os_type"),
        "__os_bit": if r.architecture.as_str() == "i386" { "32" } else { "64" },
        "__support_arm": if r.architecture.as_str() == "arm64" { "true" } else { "false" },
        "__description": r.description,
        "min_disk": system.map_or(0, |d| d.size_gib),
        "min_ram": recorded(r, "min_ram").cloned().unwrap_or(json!(0)),
        "max_ram": recorded(r, "max_ram"),
        "created_at": r.creation_time,
        "disk_format": r.disks.first().map(|d| d.format.clone()),
        "tags": r.tags.iter().map(|t| format!("{}.{}", t.key, t.value)).collect::<Vec<_>>(),
    })
}

/// IMS's job query (`GET /v1/{project_id}/jobs/{job_id}`) for the image `r` was made by.
pub(crate) fn job(r: &Record) -> String {
    let (status, end) = match r.status {
        Status::Creating => ("RUNNING", None),
        Status::Available => (
            "SUCCESS",
            r.directory.as_ref().map(|_| r.creation_time.clone()),
        ),
        Status::CreateFailed => ("FAIL", None),
    };
    let from_instance = recorded(r, "instance_id").is_some();
    let v = json!({
        "status": status,
        "entities": {"image_id": r.image_id},
        "job_id": job_id(r),
        "job_type": if from_instance { "createImageByInstance" } else { "createImage" },
        "begin_time": r.creation_time,
        "end_time": end,
        "error_code": r.error_code,
        "fail_reason": r.error_message,
    });
    pretty(&v)
}
