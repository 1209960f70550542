//! kiln: bakes custom VM images (one system disk, up to 16 data disks) from local raw and qcow2 files.
//!
//! Data flows one way: request ([`cli`] → [`create::CreateRequest`]) → plan ([`plan`]) → copy
//! ([`engine`]) → publish ([`publish`], [`manifest`]). Formats ([`format`]) answer "what is at this
//! offset" and read or write bytes, and know nothing of images.

pub mod check;
pub mod cli;
pub mod convert;
pub mod create;
pub mod detect;
pub mod engine;
pub mod error;
pub mod format;
pub mod inspect;
pub mod instance;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod publish;
pub mod qemu_lock;
pub mod request_file;
pub mod safe_fs;
pub mod size;
pub mod store;
pub mod testhook;
pub mod validate;
pub mod verify;
