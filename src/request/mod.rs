//! The request stage: flags, request files and libvirt instances become one request, checked
//! against the API's rules, with a device plan for its disks.

pub mod create;
pub mod digest;
pub mod file;
pub mod instance;
pub mod plan;
pub mod validate;
