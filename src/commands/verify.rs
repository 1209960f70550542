//! `kiln verify IMAGE_ID|DIR`: recompute every checksum of an image ([`crate::image::verify`]).

use std::path::Path;

use crate::commands::target;
use crate::copy::progress::ProgressMode;
use crate::error::{Code, Error, Result};
use crate::image::attributes::Status;
use crate::image::store;
use crate::image::verify::{self, VerifyReport};
use crate::remote::s3::store::BucketStore;

#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// An ImageId in the store, or an image directory.
    pub(crate) target: String,
    pub(crate) progress: ProgressMode,
}

/// Every file's check; [`VerifyOutcome::result`] says whether the image passed.
#[derive(Debug, Clone)]
pub struct VerifyOutcome {
    pub(crate) report: VerifyReport,
}

impl VerifyOutcome {
    /// ChecksumMismatch when any file differs.
    pub fn result(&self) -> Result<()> {
        self.report.to_error().map_or(Ok(()), Err)
    }
}

/// Resolves the target and checks it. `store` is the global `--store`, used for an ImageId.
pub fn verify(req: &VerifyRequest, store: Option<&Path>) -> Result<VerifyOutcome> {
    if req.target.starts_with(crate::remote::s3::SCHEME) {
        let report = crate::commands::push::verify_remote(&req.target, req.progress)?;
        return Ok(VerifyOutcome { report });
    }
    if store::is_image_id(&req.target) && !Path::new(&req.target).is_dir() {
        if let store::Located::Bucket(b) = store::open(store)? {
            let report = verify_in_bucket(&b, &req.target, req.progress)?;
            return Ok(VerifyOutcome { report });
        }
    }
    let dir = target::image_dir(&req.target, store)?;
    let report = verify::verify_dir(&dir, req.progress)?;
    Ok(VerifyOutcome { report })
}

/// `verify IMAGE_ID` in a bucket store: the Available image streamed from the bucket and hashed
/// (as `verify s3://...`).
fn verify_in_bucket(b: &BucketStore, id: &str, mode: ProgressMode) -> Result<VerifyReport> {
    let r = b.get(id)?.ok_or_else(|| store::not_found(id))?;
    if r.status != Status::Available {
        return Err(Error::new(
            Code::IncorrectImageStatus,
            format!(
                "{id} is {}; only Available images can be verified",
                r.status
            ),
        ));
    }
    crate::commands::push::verify_remote(&b.image_prefix(id).to_string(), mode)
}
