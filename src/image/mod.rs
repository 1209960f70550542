//! The image stage: the manifest and `SHA256SUMS`, publishing a finished directory, the image
//! store, and verification of what was published.

pub(crate) mod attributes;
pub(crate) mod manifest;
pub(crate) mod publish;
pub(crate) mod store;
pub(crate) mod verify;
