//! VHD (Microsoft's Virtual Hard Disk, qemu's `vpc`), owned by kiln: a read-only reader of fixed,
//! dynamic and differencing disks, and a writer of fixed and dynamic ones.
//!
//! Why not a crate: the VHD crates on crates.io read fixed and dynamic disks at best, without
//! differencing chains, sector bitmaps or bounds on what the file claims, and none writes through
//! a parallel, guest-ordered allocator; a disk format is kiln's core, so it is written here, from
//! Microsoft's VHD specification, with qemu's `block/vpc.c` as the model for sizes and as the test
//! oracle.
//!
//! | file | what it does |
//! |---|---|
//! | `header.rs` | the footer and the dynamic disk header: decoded, validated, encoded; checksums |
//! | `reader.rs` | opening a file and its parent chain; the [`BlockSource`](super::BlockSource) |
//! | `writer.rs` | fixed and dynamic output |
//!
//! Detection: a dynamic or differencing disk starts with `conectix` (its footer copy); a fixed disk
//! has nothing at its start, only a valid footer (cookie, checksum, disk type 2) in its last 512
//! bytes. qemu probes only the first form (it takes a fixed VHD for raw unless told `-f vpc`).
//!
//! # Bounds
//!
//! Everything in the file is untrusted; nothing it says makes the reader allocate or loop more than:
//!
//! | what | bound | checked in |
//! |---|---|---|
//! | footer, dynamic header | 512 and 1024 bytes, inside the file | `reader::read_footer`, `reader::open_layer` |
//! | virtual size | 2040 GiB (qemu's `VHD_MAX_SECTORS`); a fixed disk's inside the file | `header::Footer::validate`, `reader::open_layer` |
//! | block size | a power of two, 512 B to 256 MiB; its bitmap at most 64 KiB | `header::DynHeader::parse` |
//! | BAT | `max_table_entries` covers the disk, at most 2040 GiB of blocks and 16 Mi entries (64 MiB), inside the file; every entry's block inside the file | `header::DynHeader::parse`, `reader::read_bat` |
//! | parent locators | 8 entries, each at most 64 KiB, inside the file | `reader::parent_names` |
//! | chain | `MAX_CHAIN_DEPTH` files, no loops, every parent through the backing gate; a VHD parent's UUID is the child's `parent_uuid` | `reader::open_parent` |
//!
//! One extent call looks at most at 64 Ki BAT entries and one block's bitmap.
//!
//! Sizes follow qemu 10: the guest size is the CHS geometry's unless the creator application is
//! one that sizes by `current_size` (Hyper-V, qemu's `force_size`, Disk2vhd, XenServer) or the
//! geometry is the largest; qemu ignores sector bitmaps, kiln reads a sector its bitmap leaves unset
//! as zeros (dynamic) or from the parent (differencing), as the specification says.

mod header;
pub(crate) mod reader;
mod writer;

pub(crate) use reader::open;

use super::{Driver, Format, Probe, ReadDriver, WriteDriver};

/// VHD's registry entry.
pub(crate) const DRIVER: Driver = Driver {
    name: "vhd",
    extension: "vhd",
    read: Some(ReadDriver {
        format: Format::Vhd,
        probe,
        open,
        open_layer: |file, path, chain, gate| {
            Ok(Box::new(reader::open_layer(file, path, chain, gate)?.0))
        },
    }),
    write: Some(WriteDriver {
        options: writer::OPTIONS,
        create: writer::create,
        // qemu rounds a VHD's size up to whole sectors, as a qcow2's: so does kiln.
        disk_size: super::qcow2::writer::disk_size,
        compresses: false,
    }),
};

/// A dynamic or differencing disk starts with its footer's cookie; a fixed disk ends with a valid
/// fixed footer.
fn probe(p: &Probe<'_>) -> bool {
    p.head.starts_with(header::FOOTER_COOKIE)
        || (p.size >= header::FOOTER_SIZE as u64
            && header::is_footer(p.tail, Some(header::TYPE_FIXED)))
}
