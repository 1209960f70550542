//! `kiln delete`: DeleteImage.

use std::path::Path;

use crate::error::Result;
use crate::image::store::{self, Record};

/// The images deleted, in the order named.
#[derive(Debug, Clone)]
pub struct DeleteOutcome {
    pub(crate) deleted: Vec<Record>,
}

/// Deletes images by ID; a malformed ID is reported as not found before anything is deleted.
pub fn delete(ids: &[String], store: Option<&Path>) -> Result<DeleteOutcome> {
    if let Some(bad) = ids.iter().find(|id| !store::is_image_id(id)) {
        return Err(store::not_found(bad));
    }
    let store = store::open(store)?;
    Ok(DeleteOutcome {
        deleted: store.delete(ids)?,
    })
}
