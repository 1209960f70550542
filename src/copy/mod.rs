//! The copy stage: the parallel sparse engine and its progress reporting.

pub mod engine;
pub mod progress;
