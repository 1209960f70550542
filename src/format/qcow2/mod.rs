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
//!
//! # The reader's parts
//!
//! | file | what it does |
//! |---|---|
//! | `reader.rs` | opening a file and its backing chain; the [`BlockSource`](super::BlockSource) |
//! | `header.rs` | the header: decoded into named fields, then validated (extensions too) |
//! | `snapshot.rs` | the internal snapshot table |
//! | `map.rs` | the L1/L2 mapping: what is at a guest offset, and for how long |
//! | `decompress.rs` | compressed clusters (zlib, zstd) |
//! | `file.rs` | one file of the chain: `pread`s at host offsets, guest/host offset types |
//!
//! Everything in the file is untrusted: every size and count is bounded before it is used to
//! allocate or loop, every offset is checked against the file, and arithmetic is checked. A damaged
//! image gives `InvalidSnapshot.Corrupt` naming what is wrong (and the guest offset, for mapping
//! errors); a feature kiln does not read gives `InvalidSnapshot.Unsupported`. Never garbage.
//!
//! Reads use `pread` only, so one [`reader::Qcow2Source`] serves every copy thread; L2 tables are
//! cached in a bounded map keyed by their host offset.
//!
//! # Allocation bounds
//!
//! Nothing read from the file makes the reader allocate more than these, per file of the chain
//! (a chain has at most `MAX_CHAIN_DEPTH` files), and each table must also lie inside the file, so
//! no allocation is larger than the file itself plus one cluster. Bounds (the constants named):
//!
//! | what | bound | checked in |
//! |---|---|---|
//! | header cluster (header, extensions, backing name) | one cluster, at most 2 MiB (`cluster_bits` 9..=21) | `reader::read_header_cluster`, `header::check_format` |
//! | backing file name | `header::MAX_BACKING_NAME` = 1023 bytes (`backing_file_size`), inside the header cluster | `header::check_backing_name` |
//! | backing format name, feature table | inside the header cluster (`header::MAX_BACKING_NAME` for the name) | `header::decode_extensions`, `header::check_extensions` |
//! | L1 table (active or a snapshot's) | `header::MAX_L1_ENTRIES` = 4 Mi entries (32 MiB, `l1_size`), plus a sorted copy of its offsets to refuse shared L2 tables | `header::check_l1`, `map::check_l2_tables_distinct` |
//! | refcount table | never read; `refcount_table_clusters` at most `header::MAX_REFCOUNT_TABLE` = 8 MiB | `header::check_refcount_table` |
//! | snapshot table | `MAX_SNAPSHOTS` = 65536 entries (`nb_snapshots`), `MAX_SNAPSHOT_TABLE` = 64 MiB in all; extra data at most `MAX_SNAPSHOT_EXTRA` = 1 KiB, ID and name at most 64 KiB each (16-bit sizes), read one entry at a time | `header::check_snapshot_table_place`, `snapshot::read_snapshots` |
//! | L2 tables | one cluster each; the cache holds at most `map::L2_CACHE_BYTES` = 64 MiB | `map::Mapping::l2_table` |
//! | compressed cluster | its stored length is at most 2^(`cluster_bits` - 8) sectors (two clusters, 4 MiB), cut at the end of the file; it decompresses into one cluster | `decompress::locate`, `decompress::decompress` |
//!
//! Work is bounded too: one mapping run looks at most at `map::MAX_WALK_STEPS` = 64 Ki L1/L2
//! entries, and one extent merges at most `map::MAX_MERGED_RUNS` = 64 runs, before a shorter
//! extent is returned; mapping the whole disk takes one step per L1 entry (at most 4 Mi) and per L2
//! entry present in the file (L2 tables are distinct); one step per snapshot table entry; a chain
//! of at most 16 files with no loops.

mod decompress;
pub(crate) mod file;
mod header;
mod map;
pub(crate) mod reader;
pub mod snapshot;
pub mod writer;

pub use reader::open;

use super::{Driver, ReadDriver, WriteDriver};

/// qcow2's registry entry.
pub(crate) const DRIVER: Driver = Driver {
    name: "qcow2",
    extension: "qcow2",
    read: Some(ReadDriver {
        format: super::Format::Qcow2,
        probe: |p| p.head.starts_with(&MAGIC.to_be_bytes()),
        open,
        open_layer: |file, path, chain, gate| {
            let (src, _) = reader::open_layer(file, path, None, chain, gate)?;
            Ok(Box::new(src))
        },
    }),
    write: Some(WRITE),
};

pub(crate) const WRITE: WriteDriver = WriteDriver {
    options: &[],
    create: writer::create,
    disk_size: writer::disk_size,
    compresses: true,
};

/// "QFI\xfb"
pub(crate) const MAGIC: u32 = 0x5146_49fb;

/// L1/L2 entry: refcount is exactly one (informational for readers).
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: the cluster is compressed.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry (v3): the cluster reads as zeros.
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Host offset bits of a standard L1/L2 entry.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Smallest and largest cluster sizes qcow2 allows (512 B to 2 MiB).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
