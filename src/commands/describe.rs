//! `kiln describe`: DescribeImages, and with a family DescribeImageFromFamily.

use std::path::Path;

use crate::error::{Code, Error, Result};
use crate::image::attributes::Status;
use crate::image::store::{self, Record};

/// Which images to list; every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct DescribeRequest {
    /// Image IDs (all images when empty).
    pub(crate) ids: Vec<String>,
    pub(crate) name: Option<String>,
    /// The newest Available image of this family (DescribeImageFromFamily).
    pub(crate) family: Option<String>,
    /// Creating, Available or CreateFailed.
    pub(crate) status: Option<String>,
    /// (key, Some(value)) or (key, None) for any value.
    pub(crate) tags: Vec<(String, Option<String>)>,
    /// `--job`: the image whose Huawei IMS job has this ID.
    pub(crate) job: Option<String>,
}

/// The images found, newest first.
#[derive(Debug, Clone)]
pub struct DescribeOutcome {
    pub(crate) images: Vec<Record>,
    /// `--job`: `images` is the one image the job made.
    pub(crate) job: bool,
}

/// Lists the store's images that match `req`. `store` is the global `--store`.
pub fn describe(req: &DescribeRequest, store: Option<&Path>) -> Result<DescribeOutcome> {
    let store = store::open(store)?;
    let status = match &req.status {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            Error::new(
                Code::InvalidParameter,
                format!("--status '{s}' is not one of: {}", Status::list()),
            )
        })?),
    };
    if let Some(job) = &req.job {
        let found = store.list()?.into_iter().find(|r| {
            r.request_dialect.as_ref().and_then(|d| d.job_id.as_deref()) == Some(job.as_str())
        });
        return match found {
            Some(r) => Ok(DescribeOutcome {
                images: vec![r],
                job: true,
            }),
            None => Err(Error::new(
                Code::InvalidImageIdNotFound,
                format!("job {job}: no image in the store was made by this job"),
            )),
        };
    }
    let mut images: Vec<Record> = store
        .list()?
        .into_iter()
        .filter(|r| matches(req, status, r))
        .collect();
    if let Some(f) = &req.family {
        images = newest_of_family(images, f).into_iter().collect();
    }
    images.reverse(); // newest first
    Ok(DescribeOutcome { images, job: false })
}

/// Whether `r` passes the ID, name, status and tag filters.
fn matches(req: &DescribeRequest, status: Option<Status>, r: &Record) -> bool {
    (req.ids.is_empty() || req.ids.contains(&r.image_id))
        && req.name.as_ref().is_none_or(|n| &r.image_name == n)
        && status.is_none_or(|s| r.status == s)
        && req.tags.iter().all(|(k, v)| {
            r.tags
                .iter()
                .any(|t| &t.key == k && v.as_ref().is_none_or(|v| &t.value == v))
        })
}

/// DescribeImageFromFamily: the newest Available image of `family` (`images` are oldest first).
fn newest_of_family(images: Vec<Record>, family: &str) -> Option<Record> {
    images
        .into_iter()
        .rfind(|r| r.image_family.as_deref() == Some(family) && r.status == Status::Available)
}
