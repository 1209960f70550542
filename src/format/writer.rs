//! The writer side of a format: a fresh output disk that the copy engine fills.
//!
//! The engine reads a chunk, finds its non-zero blocks (of [`DiskWriter::block_size`] bytes) and
//! hands them to the writer in three steps, so that any format fits the same loop:
//!
//! 1. **prepare** (parallel, optional): when [`DiskWriter::prepare_unit`] is set, each non-zero
//!    piece of at most that many bytes goes through [`DiskWriter::prepare`] (qcow2 and
//!    streamOptimized VMDK compress a cluster or grain there);
//! 2. **allocate** (in guest order when [`DiskWriter::in_guest_order`]): each piece gets its host
//!    offset from [`DiskWriter::allocate`] or, when prepared, [`DiskWriter::allocate_prepared`].
//!    The engine calls these through a per-disk turnstile, chunk after chunk, so the layout (and
//!    the file's hash) depends on the input alone (qcow2, dynamic VHD/VHDX, VMDK);
//!    Prepared pieces then go through [`DiskWriter::seal`] with their host offset (parallel; qcow2
//!    encrypts there);
//! 3. **write** (parallel, under the disk's write lock): [`DiskWriter::write_at`] at those offsets.
//!
//! [`DiskWriter::finish`] then writes what a format keeps for the end (qcow2's tables, a fixed
//! VHD's footer) and hands the file back for hashing and fsync.

use std::fs::File;

use crate::error::{Code, Error, Result};

/// Zero-detection granularity of raw output (and of a raw LUKS volume's payload), like
/// `qemu-img convert -S 4k`.
pub(crate) const RAW_BLOCK: u64 = 4096;

/// A fresh output disk being written. Shared by every copy thread, so every method but `finish`
/// takes `&self`.
pub(crate) trait DiskWriter: Send + Sync {
    /// Zero-detection granularity: blocks of this size that read as zeros are not written (4 KiB
    /// for raw, like `qemu-img convert -S 4k`; one cluster for qcow2). Allocation offsets and
    /// lengths handed to the writer are multiples of it (bar the disk's last block).
    fn block_size(&self) -> u64;

    /// Largest piece [`DiskWriter::prepare`] takes; None when the writer has no prepare step (runs
    /// of non-zero blocks are then allocated and written whole).
    fn prepare_unit(&self) -> Option<u64> {
        None
    }

    /// Prepares one piece (at most `prepare_unit` bytes) into `out`, on the copying thread.
    /// Returns false when the piece is to be stored as it is.
    fn prepare(&self, _data: &[u8], _out: &mut Vec<u8>) -> Result<bool> {
        Ok(false)
    }

    /// [`DiskWriter::prepare`] for the piece at `guest_offset`: what the engine calls. Writers
    /// whose prepared form depends on where the piece is (encryption: the IV is the guest sector)
    /// override this one.
    fn prepare_at(&self, _guest_offset: u64, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.prepare(data, out)
    }

    /// Whether allocations must come in guest order. The engine then serialises them per disk.
    fn in_guest_order(&self) -> bool;

    /// Reserves room for guest bytes `[guest_offset, guest_offset + len)` stored as they are, and
    /// returns the host offset to write them at.
    fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64>;

    /// Reserves `stored_len` bytes for the prepared form of the piece at `guest_offset`.
    fn allocate_prepared(&self, guest_offset: u64, stored_len: usize) -> Result<u64> {
        let _ = stored_len;
        Err(Error::new(
            Code::Internal,
            format!("a prepared piece at guest offset {guest_offset} for a writer without a prepare step"),
        ))
    }

    /// Finishes a piece in place once its host offset is known, on the copying thread, outside
    /// every lock: a prepared piece in its buffer, or a piece stored as it is (a run of whole
    /// blocks placed one after another) in the engine's chunk buffer, which nothing reads again
    /// but the write. Encryption: qemu's LUKS IV in a qcow2 is the host sector.
    fn seal(&self, _host_offset: u64, _data: &mut [u8]) -> Result<()> {
        Ok(())
    }

    /// Writes bytes at a host offset returned by an allocation.
    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()>;

    /// The output file, for writeback hints: all writes go through the writer.
    fn file(&self) -> &File;

    /// Whether the engine starts writeback of each chunk's written range right away (a hint; the
    /// final fsync is what counts).
    fn writeback_hints(&self) -> bool {
        true
    }

    /// Whether [`DiskWriter::write_at`] does nothing but store `data` at `host_offset` in
    /// [`DiskWriter::file`]. The engine may then write pieces whose offset, length and memory are
    /// 4 KiB-aligned itself, through an `O_DIRECT` descriptor of the same file (`-t none`), and the
    /// rest through `write_at`. False by default, and `-t none` is then refused for the output.
    fn direct_writes(&self) -> bool {
        false
    }

    /// Writes what the format keeps for the end and hands the file back, not yet fsynced.
    fn finish(self: Box<Self>) -> Result<Finished>;
}

/// A finished output file.
pub(crate) struct Finished {
    pub(crate) file: File,
}
