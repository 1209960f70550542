//! The request stage: flags, request files and libvirt instances become one request, checked
//! against the API's rules, with a device plan for its disks.

pub(crate) mod create;
pub mod dialect;
pub(crate) mod digest;
pub(crate) mod file;
pub mod instance;
pub mod plan;
pub mod target;
pub(crate) mod validate;
