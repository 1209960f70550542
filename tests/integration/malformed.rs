//! Malformed qcow2 images through the real binary. Each case takes a valid image made by `qemu-img`,
//! changes ONE field (a header field by its offset in the qcow2 spec, an L1/L2 entry, a snapshot
//! table entry, a backing file name), and runs `kiln inspect --json` on it under a time limit and an
//! address-space limit. Every case must exit non-zero without a panic, with `InvalidSnapshot.Corrupt`
//! or `InvalidSnapshot.Unsupported`, and a message that names the field.
//!
//! The fuzz target for the same reader is in `tests/fuzz/` (see its README).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, qcow2_overlay, qemu_img, qemu_io};

/// Wall-clock limit per run of kiln.
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// Address-space limit per run of kiln (RLIMIT_AS): a reader that believes a huge size allocates
/// more than this and fails the case.
const MEMORY_LIMIT: u64 = 1 << 30;

const CORRUPT: &str = "InvalidSnapshot.Corrupt";
const UNSUPPORTED: &str = "InvalidSnapshot.Unsupported";

// Header field offsets (docs/interop/qcow2.txt).
const MAGIC: usize = 0;
const VERSION: usize = 4;
const BACKING_FILE_OFFSET: usize = 8;
const BACKING_FILE_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT_METHOD: usize = 32;
const L1_SIZE: usize = 36;
const L1_TABLE_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS: usize = 56;
const NB_SNAPSHOTS: usize = 60;
const SNAPSHOTS_OFFSET: usize = 64;
const INCOMPATIBLE_FEATURES: usize = 72;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;
const COMPRESSION_TYPE: usize = 104;

const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;

pub(super) fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
pub(super) fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
pub(super) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub(super) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Where things are in a valid image, read from its header.
struct Layout {
    cluster_size: u64,
    file_size: u64,
    l1: usize,
    /// Host offset of the L2 table of guest cluster 0 (0 when none).
    l2: usize,
    /// First entry of the snapshot table (0 when none).
    snapshots: usize,
    header_length: usize,
}

impl Layout {
    fn of(b: &[u8]) -> Layout {
        let l1 = get64(b, L1_TABLE_OFFSET) as usize;
        let l2 = (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        Layout {
            cluster_size: 1 << get32(b, CLUSTER_BITS),
            file_size: b.len() as u64,
            l1,
            l2,
            snapshots: get64(b, SNAPSHOTS_OFFSET) as usize,
            header_length: if get32(b, VERSION) >= 3 {
                get32(b, HEADER_LENGTH) as usize
            } else {
                72
            },
        }
    }
}

/// One malformed image: which valid image, the one change, how to run kiln, what it must say.
struct Case {
    name: &'static str,
    base: &'static str,
    patch: fn(&mut Vec<u8>, &Layout),
    /// kiln's arguments; FILE stands for the malformed file.
    args: &'static [&'static str],
    /// Appended to the file name (`@SNAP`).
    suffix: &'static str,
    code: &'static str,
    /// What the message must say: the field, and what is wrong with it (each part, case-insensitive).
    field: &'static [&'static str],
}

// How to run kiln on the case's file (FILE).
const INSPECT: &[&str] = &["inspect", "--json", "FILE"];
const MAP: &[&str] = &["inspect", "--json", "--map", "FILE"];
const FORCED: &[&str] = &["inspect", "--json", "-f", "qcow2", "FILE"];
const CONVERT: &[&str] = &["convert", "--json", "FILE", "out.raw"];

/// The offset of the first L2 entry of `b` that holds a compressed cluster.
fn first_compressed(b: &[u8], lay: &Layout) -> usize {
    (0..lay.cluster_size as usize / 8)
        .map(|i| lay.l2 + 8 * i)
        .find(|&at| get64(b, at) & OFLAG_COMPRESSED != 0)
        .expect("a compressed cluster")
}

/// Replaces `from` by `to` (same length) in the backing file name of `b`.
fn rename_backing(b: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let off = get64(b, BACKING_FILE_OFFSET) as usize;
    let len = get32(b, BACKING_FILE_SIZE) as usize;
    assert_eq!(&b[off..off + len], from.as_bytes());
    b[off..off + len].copy_from_slice(to.as_bytes());
}

fn cases() -> Vec<Case> {
    vec![
        // --- The fixed header.
        Case {
            name: "bad_magic_forced_qcow2",
            base: "data.qcow2",
            patch: |b, _| b[MAGIC..MAGIC + 4].copy_from_slice(b"QFIX"),
            args: FORCED,
            suffix: "",
            code: CORRUPT,
            field: &["magic"],
        },
        Case {
            name: "version_1",
            base: "data.qcow2",
            patch: |b, _| put32(b, VERSION, 1),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["version 1"],
        },
        Case {
            name: "version_4",
            base: "data.qcow2",
            patch: |b, _| put32(b, VERSION, 4),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["version 4"],
        },
        Case {
            name: "cluster_bits_8",
            base: "data.qcow2",
            patch: |b, _| put32(b, CLUSTER_BITS, 8),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["cluster_bits 8"],
        },
        Case {
            name: "cluster_bits_22",
            base: "data.qcow2",
            patch: |b, _| put32(b, CLUSTER_BITS, 22),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["cluster_bits 22"],
        },
        Case {
            name: "cluster_bits_63",
            base: "data.qcow2",
            patch: |b, _| put32(b, CLUSTER_BITS, 63),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["cluster_bits 63"],
        },
        Case {
            name: "size_above_2_63",
            base: "data.qcow2",
            patch: |b, _| put64(b, SIZE, u64::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["size (the virtual size) 18446744073709551615"],
        },
        Case {
            name: "size_beyond_what_l1_covers",
            base: "data.qcow2",
            patch: |b, _| put64(b, SIZE, 1 << 50),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_size 1 is too small"],
        },
        Case {
            name: "crypt_method_aes",
            base: "data.qcow2",
            patch: |b, _| put32(b, CRYPT_METHOD, 1),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["crypt_method 1", "insecure", "encrypt.format=luks"],
        },
        Case {
            name: "crypt_method_luks",
            base: "data.qcow2",
            patch: |b, _| put32(b, CRYPT_METHOD, 2),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["crypt_method is 2", "extension is missing"],
        },
        Case {
            name: "crypt_method_unknown",
            base: "data.qcow2",
            patch: |b, _| put32(b, CRYPT_METHOD, 0x7fff_ffff),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["crypt_method 2147483647"],
        },
        // --- The L1 table.
        Case {
            name: "l1_size_huge",
            base: "data.qcow2",
            patch: |b, _| put32(b, L1_SIZE, u32::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_size 4294967295 is larger than"],
        },
        Case {
            name: "l1_size_just_above_bound",
            base: "data.qcow2",
            patch: |b, _| put32(b, L1_SIZE, (4 << 20) + 1),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_size 4194305 is larger than"],
        },
        Case {
            name: "l1_size_beyond_the_file",
            base: "data.qcow2",
            patch: |b, _| put32(b, L1_SIZE, 1 << 20),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &[
                "l1_table_offset",
                "(l1_size 1048576) runs past the end of the file",
            ],
        },
        Case {
            name: "l1_size_zero",
            base: "data.qcow2",
            patch: |b, _| put32(b, L1_SIZE, 0),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_size 0 is too small"],
        },
        Case {
            name: "l1_table_offset_unaligned",
            base: "data.qcow2",
            patch: |b, l| put64(b, L1_TABLE_OFFSET, l.l1 as u64 + 8),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_table_offset", "is not aligned"],
        },
        Case {
            name: "l1_table_offset_in_header",
            base: "data.qcow2",
            patch: |b, _| put64(b, L1_TABLE_OFFSET, 0),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_table_offset 0", "in the header cluster"],
        },
        Case {
            name: "l1_table_offset_past_eof",
            base: "data.qcow2",
            patch: |b, l| {
                put64(
                    b,
                    L1_TABLE_OFFSET,
                    l.file_size.next_multiple_of(l.cluster_size),
                )
            },
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["l1_table_offset", "runs past the end of the file"],
        },
        Case {
            name: "l1_table_offset_wraps",
            base: "data.qcow2",
            patch: |b, l| put64(b, L1_TABLE_OFFSET, u64::MAX - l.cluster_size + 1),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &[
                "l1_table_offset 18446744073709486080",
                "runs past the end of the file",
            ],
        },
        // --- The refcount structures.
        Case {
            name: "refcount_table_offset_unaligned",
            base: "data.qcow2",
            patch: |b, _| {
                let v = get64(b, REFCOUNT_TABLE_OFFSET);
                put64(b, REFCOUNT_TABLE_OFFSET, v + 512)
            },
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_table_offset", "is not aligned"],
        },
        Case {
            name: "refcount_table_offset_in_header",
            base: "data.qcow2",
            patch: |b, _| put64(b, REFCOUNT_TABLE_OFFSET, 0),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_table_offset 0 is in the header cluster"],
        },
        Case {
            name: "refcount_table_offset_past_eof",
            base: "data.qcow2",
            patch: |b, l| {
                let end = l.file_size.next_multiple_of(l.cluster_size);
                put64(b, REFCOUNT_TABLE_OFFSET, end + (1 << 30))
            },
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_table_offset", "runs past the end of the file"],
        },
        Case {
            name: "refcount_table_clusters_huge",
            base: "data.qcow2",
            patch: |b, _| put32(b, REFCOUNT_TABLE_CLUSTERS, u32::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_table_clusters 4294967295 is larger"],
        },
        Case {
            name: "refcount_table_clusters_zero",
            base: "data.qcow2",
            patch: |b, _| put32(b, REFCOUNT_TABLE_CLUSTERS, 0),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_table_clusters is 0"],
        },
        Case {
            name: "refcount_order_7",
            base: "data.qcow2",
            patch: |b, _| put32(b, REFCOUNT_ORDER, 7),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["refcount_order 7"],
        },
        // --- Version 3 fields and header extensions.
        Case {
            name: "incompatible_feature_unknown",
            base: "data.qcow2",
            patch: |b, _| put64(b, INCOMPATIBLE_FEATURES, 1 << 40),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["incompatible feature bit 40"],
        },
        Case {
            name: "incompatible_feature_corrupt",
            base: "data.qcow2",
            patch: |b, _| put64(b, INCOMPATIBLE_FEATURES, 1 << 1),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["incompatible feature bit 1"],
        },
        Case {
            name: "incompatible_feature_external_data_file",
            base: "data.qcow2",
            patch: |b, _| put64(b, INCOMPATIBLE_FEATURES, 1 << 2),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["external data file"],
        },
        Case {
            name: "header_length_too_small",
            base: "data.qcow2",
            patch: |b, _| put32(b, HEADER_LENGTH, 72),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["header_length 72"],
        },
        Case {
            name: "header_length_beyond_cluster",
            base: "data.qcow2",
            patch: |b, l| put32(b, HEADER_LENGTH, l.cluster_size as u32 + 8),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["header_length 65544 is larger than the 65536-byte cluster"],
        },
        Case {
            name: "header_length_huge",
            base: "data.qcow2",
            patch: |b, _| put32(b, HEADER_LENGTH, u32::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["header_length 4294967295 is larger"],
        },
        Case {
            name: "compression_type_unknown",
            base: "zstd.qcow2",
            patch: |b, _| b[COMPRESSION_TYPE] = 7,
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["compression type 7"],
        },
        Case {
            name: "extension_length_past_cluster",
            base: "overlay.qcow2",
            // The first extension (the backing format) claims the rest of the cluster and more.
            patch: |b, l| put32(b, l.header_length + 4, l.cluster_size as u32),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["header extension 0xe2792aca", "runs past the header area"],
        },
        Case {
            name: "extension_external_data_file",
            base: "overlay.qcow2",
            // The backing format extension's type becomes the data file extension's.
            patch: |b, l| put32(b, l.header_length, 0x4441_5441),
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["external data file are not supported"],
        },
        Case {
            name: "extension_crypto_header",
            base: "overlay.qcow2",
            // The backing format extension's type becomes the crypto header's.
            patch: |b, l| put32(b, l.header_length, 0x0537_be77),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["full-disk-encryption header extension is 5 bytes"],
        },
        // --- Backing files.
        Case {
            name: "backing_file_size_1mib",
            base: "overlay.qcow2",
            patch: |b, _| put32(b, BACKING_FILE_SIZE, 1 << 20),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &[
                "backing file name is 1048576 bytes long",
                "backing_file_size",
            ],
        },
        Case {
            name: "backing_file_offset_past_cluster",
            base: "overlay.qcow2",
            patch: |b, l| put64(b, BACKING_FILE_OFFSET, l.cluster_size - 2),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["backing file name at byte 65534", "backing_file_offset"],
        },
        Case {
            name: "backing_file_offset_huge",
            base: "overlay.qcow2",
            patch: |b, _| put64(b, BACKING_FILE_OFFSET, u64::MAX - 1),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &[
                "backing file name",
                "backing_file_offset",
                "outside the header cluster",
            ],
        },
        Case {
            name: "backing_format_unknown",
            base: "overlay.qcow2",
            // "qcow2" -> "qcowX" inside the backing format extension.
            patch: |b, l| b[l.header_length + 8 + 4] = b'X',
            args: INSPECT,
            suffix: "",
            code: UNSUPPORTED,
            field: &["backing file format 'qcowX'"],
        },
        Case {
            name: "selfloop",
            base: "selfloop-src.qcow2",
            patch: |b, _| rename_backing(b, "zzzzzzzz.qcow2", "selfloop.qcow2"),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["backing chain loop", "selfloop.qcow2 is reached again"],
        },
        Case {
            name: "loop2",
            base: "loop2-src.qcow2",
            // loop2 -> loopB -> loop2.
            patch: |b, _| rename_backing(b, "loopC.qcow2", "loopB.qcow2"),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["backing chain loop", "loop2.qcow2 is reached again"],
        },
        // --- L1 and L2 entries (found while mapping).
        Case {
            name: "l1_entry_unaligned",
            base: "data.qcow2",
            patch: |b, l| put64(b, l.l1, OFLAG_COPIED | (l.l2 as u64 + 512)),
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &["guest offset 0", "L2 table offset 262656", "not aligned"],
        },
        Case {
            name: "l1_entry_past_eof",
            base: "data.qcow2",
            patch: |b, _l| {
                let l = Layout::of(b);
                put64(b, l.l1, OFLAG_COPIED | (1 << 40))
            },
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &[
                "guest offset 0",
                "L2 table offset 1099511627776",
                "past the end of the file",
            ],
        },
        Case {
            name: "l1_entries_share_an_l2_table",
            base: "wide.qcow2",
            // Guest 2 MiB..4 MiB (unallocated) maps through the L2 table of 0..2 MiB.
            patch: |b, l| {
                let v = get64(b, l.l1);
                put64(b, l.l1 + 8, v)
            },
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &["L1 entries 0 and 1"],
        },
        Case {
            name: "l2_entry_past_eof",
            base: "data.qcow2",
            patch: |b, l| put64(b, l.l2, OFLAG_COPIED | (1 << 40)),
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &[
                "guest offset 0",
                "L2 entry",
                "host offset 1099511627776, past the end of the file",
            ],
        },
        Case {
            name: "l2_entry_unaligned_into_header",
            base: "data.qcow2",
            patch: |b, l| put64(b, l.l2, OFLAG_COPIED | 512),
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &["guest offset 0", "L2 entry", "unaligned host offset 512"],
        },
        Case {
            name: "l2_entry_reserved_bits",
            base: "data.qcow2",
            patch: |b, l| {
                let v = get64(b, l.l2);
                put64(b, l.l2, v | (1 << 56))
            },
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &["guest offset 0", "L2 entry 0x81", "reserved bits"],
        },
        Case {
            name: "compressed_descriptor_in_header",
            base: "zlib.qcow2",
            patch: |b, l| {
                let at = first_compressed(b, l);
                put64(b, at, OFLAG_COMPRESSED | 100)
            },
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &["compressed cluster at host offset 100 lies in the header cluster"],
        },
        Case {
            name: "compressed_descriptor_past_eof",
            base: "zlib.qcow2",
            patch: |b, l| {
                let at = first_compressed(b, l);
                put64(b, at, OFLAG_COMPRESSED | (l.file_size + 4096))
            },
            args: MAP,
            suffix: "",
            code: CORRUPT,
            field: &[
                "compressed cluster at host offset",
                "is past the end of the file",
            ],
        },
        Case {
            name: "compressed_length_past_eof",
            base: "zlib.qcow2",
            // All sector bits set (the longest descriptor), starting 100 bytes before the end.
            patch: |b, l| {
                let at = first_compressed(b, l);
                let x = 62 - (l.cluster_size.trailing_zeros() - 8);
                let off = l.file_size - 100;
                put64(
                    b,
                    at,
                    OFLAG_COMPRESSED | (((1u64 << (62 - x)) - 1) << x) | off,
                )
            },
            args: CONVERT,
            suffix: "",
            code: CORRUPT,
            field: &[
                "guest offset 0",
                "compressed cluster",
                "does not decompress",
            ],
        },
        // --- The snapshot table.
        Case {
            name: "nb_snapshots_huge",
            base: "snap.qcow2",
            patch: |b, _| put32(b, NB_SNAPSHOTS, u32::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["nb_snapshots 4294967295 is larger"],
        },
        Case {
            name: "nb_snapshots_beyond_the_file",
            base: "snap.qcow2",
            patch: |b, _| put32(b, NB_SNAPSHOTS, 60000),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["nb_snapshots 60000", "snapshot table", "end of the file"],
        },
        Case {
            name: "snapshots_offset_unaligned",
            base: "snap.qcow2",
            patch: |b, l| put64(b, SNAPSHOTS_OFFSET, l.snapshots as u64 + 8),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["snapshots_offset", "not aligned"],
        },
        Case {
            name: "snapshots_offset_loops_to_header",
            base: "snap.qcow2",
            patch: |b, _| put64(b, SNAPSHOTS_OFFSET, 0),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["snapshots_offset 0", "in the header cluster"],
        },
        Case {
            name: "snapshot_l1_offset_unaligned",
            base: "snap.qcow2",
            patch: |b, l| {
                let v = get64(b, l.snapshots);
                put64(b, l.snapshots, v + 8)
            },
            args: INSPECT,
            suffix: "@s1",
            code: CORRUPT,
            field: &["snapshot 's1': l1_table_offset", "not aligned"],
        },
        Case {
            name: "snapshot_l1_size_huge",
            base: "snap.qcow2",
            patch: |b, l| put32(b, l.snapshots + 8, u32::MAX),
            args: INSPECT,
            suffix: "@s1",
            code: CORRUPT,
            field: &["snapshot 's1': l1_size 4294967295 is larger"],
        },
        Case {
            name: "snapshot_extra_data_huge",
            base: "snap.qcow2",
            patch: |b, l| put32(b, l.snapshots + 36, u32::MAX),
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["4294967295 bytes of extra data"],
        },
        Case {
            name: "snapshot_extra_data_huge_selected",
            base: "snap.qcow2",
            patch: |b, l| put32(b, l.snapshots + 36, u32::MAX),
            args: INSPECT,
            suffix: "@s2",
            code: CORRUPT,
            field: &["snapshot table entry 0", "extra_data_size 4294967295"],
        },
        Case {
            name: "snapshot_id_past_eof_selected",
            base: "snap.qcow2",
            // The first entry's ID runs 64 KiB on, past the end of the file.
            patch: |b, l| put16(b, l.snapshots + 12, u16::MAX),
            args: INSPECT,
            suffix: "@s2",
            code: CORRUPT,
            field: &["snapshot table entry 0", "runs past the end of the file"],
        },
        Case {
            name: "snapshot_name_past_eof",
            base: "snap.qcow2",
            patch: |b, l| {
                // The last entry's name runs past the end of the file.
                let t = l.snapshots;
                let (id, name, extra) = (
                    u16::from_be_bytes([b[t + 12], b[t + 13]]) as usize,
                    u16::from_be_bytes([b[t + 14], b[t + 15]]) as usize,
                    get32(b, t + 36) as usize,
                );
                let second = t + (40 + extra + id + name).next_multiple_of(8);
                put16(b, second + 14, u16::MAX)
            },
            args: INSPECT,
            suffix: "",
            code: CORRUPT,
            field: &["snapshot table entry", "runs past the end of the file"],
        },
    ]
}

/// What one run of kiln gave.
pub(crate) struct Outcome {
    pub(crate) status: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `kiln ARGS` in `dir` with [`TIME_LIMIT`] and [`MEMORY_LIMIT`]; None when it ran out of time
/// (it is killed).
pub(crate) fn kiln_limited(dir: &Path, args: &[String]) -> Option<Outcome> {
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    // SAFETY: the closure runs in the child between fork and exec; it only calls setrlimit, which
    // is async-signal-safe, on a value on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: MEMORY_LIMIT,
                rlim_max: MEMORY_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn kiln");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Some(Outcome {
        status: status.code(),
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    })
}

/// The valid images the cases start from, all made by qemu-img/qemu-io in `dir`.
fn make_bases(dir: &Path) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "data.qcow2", "4M"]);
    qemu_io(
        dir,
        "data.qcow2",
        &["write -P 0xab 0 64k", "write -P 0xcd 1M 128k"],
    );
    // 4 KiB clusters: each L1 entry covers 2 MiB.
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "wide.qcow2",
            "64M",
        ],
    );
    qemu_io(
        dir,
        "wide.qcow2",
        &["write -P 0x99 0 8k", "write -P 0x98 8M 8k"],
    );
    qemu_img(dir, &["create", "-q", "-f", "raw", "pattern.raw", "1M"]);
    qemu_io(
        dir,
        "pattern.raw",
        &["write -P 0x41 0 256k", "write -P 0x42 512k 64k"],
    );
    qemu_img(
        dir,
        &["convert", "-c", "-O", "qcow2", "pattern.raw", "zlib.qcow2"],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "pattern.raw",
            "zstd.qcow2",
        ],
    );
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "snap.qcow2", "4M"]);
    qemu_io(dir, "snap.qcow2", &["write -P 1 0 64k"]);
    qemu_img(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_io(dir, "snap.qcow2", &["write -P 2 64k 64k"]);
    qemu_img(dir, &["snapshot", "-c", "s2", "snap.qcow2"]);
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qcow2_overlay(dir, "base.qcow2", "overlay.qcow2");
    // Backing loops, one name away: selfloop-src -> zzzzzzzz.qcow2 (to become itself), and
    // loop2-src -> loopC (to become loopB, whose backing file is loop2).
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "zzzzzzzz.qcow2", "4M"],
    );
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "loopC.qcow2", "4M"]);
    for (file, backing) in [
        ("selfloop-src.qcow2", "zzzzzzzz.qcow2"),
        ("loop2-src.qcow2", "loopC.qcow2"),
        ("loopB.qcow2", "loop2.qcow2"),
    ] {
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", file, "4M",
            ],
        );
    }
}

#[test]
fn malformed_images_are_refused_naming_the_field() {
    let tmp = common::tmp();
    let dir = tmp.path();
    make_bases(dir);

    // The bases themselves are fine (so each refusal comes from the one change).
    for base in [
        "data.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "snap.qcow2",
        "overlay.qcow2",
    ] {
        let r = kiln_limited(
            dir,
            &[
                "inspect".into(),
                "--map".into(),
                "--json".into(),
                base.into(),
            ],
        )
        .expect("base in time");
        assert_eq!(r.status, Some(0), "{base}: {}{}", r.stdout, r.stderr);
    }

    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in &cases {
        let mut b = fs::read(dir.join(c.base)).unwrap();
        let lay = Layout::of(&b);
        (c.patch)(&mut b, &lay);
        let file = format!("{}.qcow2", c.name);
        fs::write(dir.join(&file), &b).unwrap();
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| match *a {
                "FILE" => format!("{file}{}", c.suffix),
                a => a.to_string(),
            })
            .collect();
        let Some(r) = kiln_limited(dir, &args) else {
            failures.push(format!("{}: no answer within {TIME_LIMIT:?}", c.name));
            continue;
        };
        let what = format!(
            "{}: exit {:?}\nstdout: {}\nstderr: {}",
            c.name, r.status, r.stdout, r.stderr
        );
        if r.stderr.contains("panicked") || r.status.is_none() {
            failures.push(format!("{what}\n(panic or signal)"));
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(r.stdout.trim()) {
            Ok(v) => v,
            Err(_) => {
                failures.push(format!("{what}\n(no JSON error)"));
                continue;
            }
        };
        let code = v["Code"].as_str().unwrap_or_default();
        let msg = v["Message"].as_str().unwrap_or_default();
        if r.status == Some(0)
            || code != c.code
            || !c
                .field
                .iter()
                .all(|f| msg.to_lowercase().contains(&f.to_lowercase()))
        {
            failures.push(format!("{what}\n(want {} saying {:?})", c.code, c.field));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// One field of a valid file changed, and what kiln must answer (for the other readers' cases).
pub(super) struct FieldCase {
    pub(super) name: &'static str,
    /// The valid file (in the test's directory) the change is made to.
    pub(super) base: &'static str,
    pub(super) code: &'static str,
    /// Text the message must contain (the field's name).
    pub(super) field: &'static str,
    pub(super) patch: fn(&mut Vec<u8>),
}

/// Runs `kiln inspect -f FORMAT --map --json` on each base (which must pass) and on each case's
/// file under the time and memory limits; panics listing every case not refused as it should be.
/// `-f`: a damaged magic would otherwise make the file raw, which any file is.
pub(super) fn assert_refused(dir: &Path, format: &str, bases: &[&str], cases: &[FieldCase]) {
    let args = |f: &str| -> Vec<String> {
        ["inspect", "-f", format, "--map", "--json", f]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    for base in bases {
        let r = kiln_limited(dir, &args(base)).expect("base in time");
        assert_eq!(r.status, Some(0), "{base}: {}{}", r.stdout, r.stderr);
    }
    assert!(cases.len() >= 15, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let mut b = fs::read(dir.join(c.base)).unwrap();
        (c.patch)(&mut b);
        let file = format!("{}.{format}", c.name);
        fs::write(dir.join(&file), &b).unwrap();
        let Some(r) = kiln_limited(dir, &args(&file)) else {
            failures.push(format!("{}: no answer within {TIME_LIMIT:?}", c.name));
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap_or_default();
        let msg = v["Message"].as_str().unwrap_or_default();
        if r.stderr.contains("panicked")
            || r.status == Some(0)
            || v["Code"] != c.code
            || !msg.contains(c.field)
        {
            failures.push(format!(
                "{}: exit {:?}, want {} naming {:?}\n{}{}",
                c.name, r.status, c.code, c.field, r.stdout, r.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
