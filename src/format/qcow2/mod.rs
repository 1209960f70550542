//! qcow2, owned by kiln: a read-only reader (versions 2 and 3, every cluster size, refcount width,
//! zero-cluster form, zlib/zstd compression, backing chains, internal snapshots, extended L2) and a
//! writer for fresh images.
//!
//! Why not a crate: `qcow2-rs` returned wrong data without an error (overlay larger than its backing,
//! corrupt compressed clusters, encrypted images) and is not `Sync`; `imago` has no internal
//! snapshots, no zstd, no extended L2, cannot write compressed clusters and returns ciphertext for
//! encrypted images. kiln never edits an existing image, so it needs a reader and a fresh-image
//! writer only; laying the writer's tables out itself is what allows parallel compressed output.
//! Both crates' findings are in the create issue; `imago` and `qemu-img` stay as test oracles.

pub mod reader;
pub mod snapshot;
pub mod writer;

pub use reader::open;

use super::{Driver, ReadDriver, WriteDriver};

/// qcow2's registry entry.
pub const DRIVER: Driver = Driver {
    name: "qcow2",
    extension: "qcow2",
    read: Some(ReadDriver {
        format: super::Format::Qcow2,
        probe: |head| head.starts_with(&MAGIC.to_be_bytes()),
        open,
    }),
    write: Some(WRITE),
};

pub const WRITE: WriteDriver = WriteDriver {
    options: &[],
    create: writer::create,
    disk_size: writer::disk_size,
    compresses: true,
};

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;

/// L1/L2 entry: refcount is exactly one (informational for readers).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry (v3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of a standard L1/L2 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Smallest and largest cluster sizes qcow2 allows (512 B to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
