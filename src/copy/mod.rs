//! The copy stage: the parallel sparse engine, what it counts, its progress reporting and the
//! hashing of finished outputs.

pub(crate) mod aligned;
pub mod engine;
pub mod hash;
pub(crate) mod progress;
pub(crate) mod stats;
