//! The image stage: the manifest and `SHA256SUMS`, publishing a finished directory, the image
//! store, and verification of what was published.

pub mod attributes;
pub mod manifest;
pub mod publish;
pub mod store;
pub mod verify;
