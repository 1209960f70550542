//! kiln: bakes custom VM images (one system disk, up to 16 data disks) from local disk files.
//!
//! Data flows one way, and the folders follow it:
//! - [`request`]: flags, request files and instances become one validated request and a disk plan;
//! - [`prepare`]: each source is opened read-only, stamped, locked against writers and gated;
//! - [`copy`]: the engine copies every disk at once, sparse-aware, and reports progress;
//! - [`image`]: the manifest, `SHA256SUMS`, publishing, the image store and verification.
//!
//! [`format`] holds one folder per disk format (reading and writing), [`detect`] the image check,
//! [`commands`] one library function per command, and [`output`] every command's text and JSON.

pub mod archive;
pub mod commands;
pub mod copy;
pub mod detect;
pub mod error;
pub mod format;
pub mod image;
pub mod output;
pub mod prepare;
pub mod remote;
pub mod request;
pub mod target;
pub mod util;

pub mod cli;
