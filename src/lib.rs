//! kiln: bakes custom VM images (one system disk, up to 16 data disks) from local raw and qcow2 files.
//!
//! Data flows one way: request ([`request`]) → plan ([`plan`]) → copy ([`engine`]) → publish
//! ([`publish`]). Formats ([`format`]) answer "what is at this offset" and read or write bytes.

pub mod error;
pub mod format;
