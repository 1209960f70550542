//! Small helpers with no knowledge of images: sizes, safe file opening, test checkpoints.

pub mod safe_fs;
pub mod size;
pub mod testhook;
