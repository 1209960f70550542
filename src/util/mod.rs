//! Small helpers with no knowledge of images: sizes, safe file opening, test checkpoints.

pub(crate) mod safe_fs;
pub(crate) mod size;
pub(crate) mod testhook;
