//! Compressed clusters: where one lies ([`locate`], from its L2 entry) and its bytes
//! ([`decompress`], zlib's raw deflate or zstd). A compressed cluster's stored length is at most
//! 2^(`cluster_bits` - 8) sectors (two clusters, 4 MiB), cut at the end of the file, and it must
//! decompress into exactly one cluster; anything else is a damaged image, never garbage data.

use std::cell::RefCell;

use super::file::{GuestOffset, HostOffset, ImageFile};
use crate::error::{Error, Result};

/// The image's compression type (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    Zlib,
    Zstd,
}

thread_local! {
    static ZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
}

/// Host offset and stored length of the compressed cluster of L2 `entry` (for the guest cluster
/// at `guest`): past the header cluster, starting inside the file.
pub(super) fn locate(
    file: &ImageFile,
    cluster_bits: u32,
    entry: u64,
    guest: GuestOffset,
) -> Result<(HostOffset, u64)> {
    let x = 62 - (cluster_bits - 8);
    let off = entry & ((1u64 << x) - 1);
    let sectors = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    let len = (sectors + 1) * 512 - (off & 511);
    if off < 1u64 << cluster_bits {
        return Err(file.corrupt_at(
            guest,
            format!("its compressed cluster at host offset {off} lies in the header cluster"),
        ));
    }
    if off >= file.size {
        return Err(file.corrupt_at(
            guest,
            format!("its compressed cluster at host offset {off} is past the end of the file"),
        ));
    }
    Ok((HostOffset(off), len))
}

/// Decompresses the cluster of L2 `entry` (guest cluster at `guest`) into `out` (one cluster).
pub(super) fn decompress(
    file: &ImageFile,
    compression: Compression,
    cluster_bits: u32,
    entry: u64,
    guest: GuestOffset,
    out: &mut [u8],
) -> Result<()> {
    let (off, len) = locate(file, cluster_bits, entry, guest)?;
    let avail = len.min(file.size - off.0) as usize;
    let mut input = vec![0u8; avail];
    let n = file.read_at(off, &mut input).map_err(|e| {
        Error::io(
            &file.path,
            &format!("reading the compressed cluster at {off}"),
            e,
        )
    })?;
    input.truncate(n);
    let cap = out.len();
    let fail = |why: String| {
        file.corrupt_at(
            guest,
            format!(
                "its compressed cluster (host offset {off}, {len} bytes) does not decompress to one {cap}-byte cluster: {why}"
            ),
        )
    };
    match compression {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(&input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(fail(format!(
                    "deflate data ended after {} bytes",
                    d.total_out()
                ))),
                Err(e) => Err(fail(format!("deflate error: {e}"))),
            }
        }
        Compression::Zstd => unzstd(&input, out).map_err(fail),
    }
}

/// Decodes one zstd frame from `input` into all of `out`, with this thread's decoder; the error
/// says why not.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let cap = out.len();
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decoder::new().map_err(|e| format!("zstd: {e}"))?);
        }
        let Some(dec) = slot.as_mut() else {
            return Err("zstd decoder unavailable".into());
        };
        dec.reinit().map_err(|e| format!("zstd: {e}"))?;
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        let mut hint = 1usize;
        while outb.pos() < cap {
            let (li, lo) = (inb.pos(), outb.pos());
            hint = match dec.run(&mut inb, &mut outb) {
                Ok(h) => h,
                Err(e) => {
                    // The decoder may hold a half-decoded frame: start afresh next time.
                    *slot = None;
                    return Err(format!("zstd error: {e}"));
                }
            };
            if inb.pos() <= li && outb.pos() <= lo {
                let got = outb.pos();
                return Err(format!("zstd data ended after {got} bytes"));
            }
        }
        if hint > 0 {
            return Err("the zstd frame is longer than one cluster".into());
        }
        Ok(())
    })
}
