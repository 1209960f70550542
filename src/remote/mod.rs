//! Storage that is not a local file system: object storage speaking the S3 protocol.

pub mod s3;
