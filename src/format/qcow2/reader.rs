//! PLACEHOLDER: replaced by the qcow2 reader (helper A). Signature only.
use std::fs::File;
use std::path::Path;

use crate::error::Result;
use crate::format::Opened;

/// Opens a qcow2 source (and its backing chain) read-only; `snapshot` names an internal snapshot
/// by name or ID.
pub fn open(_file: File, _path: &Path, _snapshot: Option<&str>) -> Result<Opened> {
    unimplemented!("qcow2 reader")
}
