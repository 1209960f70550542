//! The target of `verify` and `check`: an image directory, an ImageId in the store (which must be
//! Available), or, for `check` only, a disk file. One resolution for both commands.

use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};
use crate::image::attributes::Status;
use crate::image::store;

/// Which command resolves the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetUse {
    /// `verify`: an image only ([`image_dir`]); an ImageId is looked up even when a file of that
    /// name exists.
    Verify,
    /// `check`: an image, or any disk file. A file that exists is a file even when its name
    /// looks like an ImageId.
    Check,
}

impl TargetUse {
    /// The verb in "only Available images can be ...".
    fn verb(self) -> &'static str {
        match self {
            TargetUse::Verify => "verified",
            TargetUse::Check => "checked",
        }
    }
}

/// A resolved target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// An image directory (given, or the store's directory of an ImageId).
    ImageDir(PathBuf),
    /// A disk file (`check` only), `FILE@SNAP` as given.
    File(PathBuf),
}

/// Resolves `target`: a directory is an image directory, an ImageId is looked up in the store
/// (`store` is the global `--store`, located only then), anything else is a file.
pub(crate) fn resolve(target: &str, store: Option<&Path>, use_: TargetUse) -> Result<Target> {
    let path = Path::new(target);
    if path.is_dir() {
        return Ok(Target::ImageDir(path.to_path_buf()));
    }
    let file_wins = use_ == TargetUse::Check && path.exists();
    if !file_wins && store::is_image_id(target) {
        return store_image(target, store, use_).map(Target::ImageDir);
    }
    Ok(Target::File(path.to_path_buf()))
}

/// `verify`'s target: an image directory, or an ImageId's; anything else is
/// InvalidImageId.NotFound.
pub(crate) fn image_dir(target: &str, store: Option<&Path>) -> Result<PathBuf> {
    match resolve(target, store, TargetUse::Verify)? {
        Target::ImageDir(d) => Ok(d),
        Target::File(_) => Err(Error::new(
            Code::InvalidImageIdNotFound,
            format!("{target}: neither an image directory nor an ImageId (m-...)"),
        )),
    }
}

/// The directory of the Available image `id` in the store.
fn store_image(id: &str, store: Option<&Path>, use_: TargetUse) -> Result<PathBuf> {
    let store = match store::open(store)? {
        store::Located::Local(s) => s,
        store::Located::Bucket(b) => {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "{id} is in a bucket store: this command takes a local image; `kiln pull {} DIR` first",
                    b.image_prefix(id)
                ),
            ))
        }
    };
    let r = store.get(id)?.ok_or_else(|| store::not_found(id))?;
    if r.status != Status::Available {
        return Err(Error::new(
            Code::IncorrectImageStatus,
            format!(
                "{} is {}; only Available images can be {}",
                r.image_id,
                r.status,
                use_.verb()
            ),
        ));
    }
    store.checked_image_dir(&r.image_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "m-0123456789abcdefghij";

    #[test]
    fn a_directory_is_an_image_for_both_commands() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_str().unwrap();
        for use_ in [TargetUse::Verify, TargetUse::Check] {
            assert_eq!(
                resolve(dir, None, use_).unwrap(),
                Target::ImageDir(t.path().into())
            );
        }
    }

    #[test]
    fn an_image_id_is_looked_up_in_the_store() {
        let t = tempfile::tempdir().unwrap();
        let e = image_dir(ID, Some(&t.path().join("store"))).unwrap_err();
        assert_eq!(e.code(), Code::InvalidImageIdNotFound);
        assert!(e.message().contains("no image"), "{e}");
    }

    #[test]
    fn verify_refuses_what_is_neither_a_directory_nor_an_image_id() {
        let e = image_dir("/no/such/thing", None).unwrap_err();
        assert_eq!(e.code(), Code::InvalidImageIdNotFound);
        assert!(e.message().contains("neither an image directory"), "{e}");
        assert_eq!(
            resolve("/no/such/thing", None, TargetUse::Check).unwrap(),
            Target::File("/no/such/thing".into())
        );
    }
}
