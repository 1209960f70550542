//! VMDK, owned by kiln: a read-only reader (hosted sparse extents: monolithicSparse and
//! streamOptimized with compressed grains, markers and footer; text descriptors with FLAT, SPARSE
//! and ZERO extents: monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs; parents named by
//! `parentFileNameHint`) and a writer for fresh streamOptimized and monolithicSparse disks.
//!
//! Why not a crate: VMDK is one of kiln's core formats, and the crates that read it do not bound
//! sizes read from the file, do not open extent and parent files through a gate, and none writes
//! streamOptimized grains compressed in parallel by kiln's engine in guest order.
//!
//! | file | what it does |
//! |---|---|
//! | `header.rs` | the sparse extent header (decoded, then validated), markers |
//! | `descriptor.rs` | the text descriptor: parsed (extent lines, CIDs, parent) and rendered |
//! | `sparse.rs` | one sparse extent: footer, grain directory and tables, grains (zlib) |
//! | `reader.rs` | opening a disk, its extents and parents; the [`BlockSource`](super::BlockSource) |
//! | `writer.rs` | streamOptimized and monolithicSparse output |
//!
//! # Bounds
//!
//! Everything in the files is untrusted. Nothing read from them makes the reader allocate or loop
//! more than these (each also checked against the file's size first):
//!
//! | what | bound | checked in |
//! |---|---|---|
//! | descriptor (a file, or embedded) | `MAX_DESCRIPTOR_BYTES` = 1 MiB; lines at most 4 KiB | `reader::open_layer`, `header::SparseHeader::validate`, `descriptor::parse` |
//! | extent lines | `descriptor::MAX_EXTENTS` = 4096; sizes adding up to at most 2^40 sectors | `descriptor::parse` |
//! | grain size | a power of two, at most `MAX_GRAIN_SECTORS` = 2048 sectors (1 MiB) | `SparseHeader::validate` |
//! | grain table | at most `MAX_GTES_PER_GT` = 512 entries (2 KiB); 4096 cached (8 MiB) | `SparseHeader::validate`, `sparse::SparseExtent::table` |
//! | grain directory | at most `MAX_GD_ENTRIES` = 4 Mi entries (16 MiB), inside the file | `SparseHeader::validate` |
//! | compressed grain | marker size 1 to twice the grain + 1 KiB bytes (deflate grows incompressible data), inside the file; inflates into one grain | `sparse::SparseExtent::inflate` |
//! | chain | at most `MAX_CHAIN_DEPTH` layers; no file twice | `reader::open_layer` |
//!
//! A mapping call walks at most `sparse::MAX_WALK_STEPS` grain entries before returning a shorter
//! extent. A damaged file gives `InvalidSnapshot.Corrupt` naming the field, an unsupported feature
//! `InvalidSnapshot.Unsupported`.

mod descriptor;
mod header;
pub(crate) mod reader;
mod sparse;
pub(crate) mod writer;

pub use reader::open;

use super::{Driver, Probe, ReadDriver, WriteDriver};

/// VMDK's registry entry: the "KDMV" magic, or a text descriptor in the first 4 KiB.
pub(crate) const DRIVER: Driver = Driver {
    name: "vmdk",
    extension: "vmdk",
    read: Some(ReadDriver {
        format: super::Format::Vmdk,
        probe,
        open: reader::open,
        // As another format's backing file: opened whole (its extents and parents), each file it
        // read then recorded in the outer chain once (extents may share a file).
        open_layer: |file, path, chain, gate| {
            let o = reader::open(file, path, None, gate)?;
            let mut noted: Vec<&std::path::Path> = Vec::new();
            for c in &o.info.chain {
                if !noted.contains(&c.path.as_path()) {
                    chain.note(&c.path, c.format)?;
                    noted.push(&c.path);
                }
            }
            Ok(o.source)
        },
    }),
    write: Some(WriteDriver {
        options: &[(
            "subformat",
            "streamOptimized (default, compressed, for ESXi/AWS) or monolithicSparse",
        )],
        create: writer::create,
        disk_size: writer::disk_size,
        compresses: false,
    }),
};

fn probe(p: &Probe<'_>) -> bool {
    p.head.starts_with(b"KDMV") || descriptor::looks_like_descriptor(p.head)
}

/// The grain size of a sparse VMDK file (None for a descriptor file), for `inspect`.
pub(crate) fn grain_size(path: &std::path::Path) -> crate::error::Result<Option<u64>> {
    let file = super::input::open(path)?;
    let mut head = [0u8; 4];
    let n = super::read_full_at(&file, &mut head, 0)
        .map_err(|e| crate::error::Error::io(path, "reading the header of", e))?;
    if n < 4 || &head != b"KDMV" {
        return Ok(None);
    }
    Ok(Some(sparse::SparseExtent::open(file, path)?.grain))
}
