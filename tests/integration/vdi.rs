//! VDI (VirtualBox) input through the real binary, with qemu-img as the oracle: static and dynamic
//! images read as `qemu-img convert -O raw` reads them, and malformed VDIs (one header field or
//! block map entry changed each) are refused naming the field.

use crate::common::{self, kiln_in, qemu_img, qemu_io_f};
use crate::malformed::{assert_refused, FieldCase};

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Makes `name` with qemu-img (`opts` as `-o`) and writes a few patterns into it.
fn make(dir: &std::path::Path, name: &str, opts: &str, size: &str) {
    qemu_img(dir, &["create", "-q", "-f", "vdi", "-o", opts, name, size]);
    qemu_io_f(
        dir,
        "vdi",
        name,
        &[
            "write -P 0x61 0 3M",
            "write -P 0x62 7M 512",
            "write -z 12M 1M",
        ],
    );
}

#[test]
fn static_and_dynamic_vdis_read_like_qemu() {
    let t = common::tmp();
    let d = t.path();
    for (name, opts, size) in [
        ("dyn.vdi", "static=off", "20M"),
        ("static.vdi", "static=on", "20M"),
        ("odd.vdi", "static=off", "15000K"),
    ] {
        make(d, name, opts, size);
        let v = common::assert_reads_like_qemu(d, "vdi", name);
        assert_eq!(v["format"], "vdi");
        assert_eq!(v["cluster-size"].as_u64(), Some(1 << 20), "{v}");
        // Straight to a VHD as well.
        let vhd = format!("{name}.vhd");
        kiln_in(
            d,
            &[
                "convert",
                "-O",
                "vhd",
                "-o",
                "subformat=dynamic",
                name,
                &vhd,
            ],
        )
        .ok();
        let r = common::tool_in(d, "qemu-img", &["compare", "-F", "vpc", name, &vhd]);
        assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    }
}

const CORRUPT: &str = "InvalidSnapshot.Corrupt";
const UNSUPPORTED: &str = "InvalidSnapshot.Unsupported";

/// Header offsets (qemu's `VdiHeader`).
const VERSION: usize = 0x44;
const IMAGE_TYPE: usize = 0x4c;
const OFFSET_BMAP: usize = 0x154;
const OFFSET_DATA: usize = 0x158;
const SECTOR_SIZE: usize = 0x168;
const DISK_SIZE: usize = 0x170;
const BLOCK_SIZE: usize = 0x178;
const BLOCK_EXTRA: usize = 0x17c;
const BLOCKS_IN_IMAGE: usize = 0x180;
const UUID_LINK: usize = 0x1a8;
const UUID_PARENT: usize = 0x1b8;

fn cases() -> Vec<FieldCase> {
    macro_rules! case {
        ($name:expr, $base:expr, $code:expr, $field:expr, $patch:expr) => {
            FieldCase {
                name: $name,
                base: $base,
                code: $code,
                field: $field,
                patch: $patch,
            }
        };
    }
    vec![
        case!("signature", "dyn.vdi", CORRUPT, "signature", |b| b[0x40] ^=
            1),
        case!(
            "short",
            "dyn.vdi",
            CORRUPT,
            "shorter than the header",
            |b| b.truncate(300)
        ),
        case!("version", "dyn.vdi", UNSUPPORTED, "version 2.0", |b| put32(
            b,
            VERSION,
            0x0002_0000
        )),
        case!("image-type", "dyn.vdi", UNSUPPORTED, "image_type", |b| {
            put32(b, IMAGE_TYPE, 4)
        }),
        case!(
            "offset-bmap-unaligned",
            "dyn.vdi",
            UNSUPPORTED,
            "offset_bmap",
            |b| {
                let v = get32(b, OFFSET_BMAP);
                put32(b, OFFSET_BMAP, v + 1)
            }
        ),
        case!(
            "offset-data-unaligned",
            "dyn.vdi",
            UNSUPPORTED,
            "offset_data",
            |b| {
                let v = get32(b, OFFSET_DATA);
                put32(b, OFFSET_DATA, v + 8)
            }
        ),
        case!("sector-size", "dyn.vdi", UNSUPPORTED, "sector_size", |b| {
            put32(b, SECTOR_SIZE, 4096)
        }),
        case!("block-size-odd", "dyn.vdi", CORRUPT, "block_size", |b| {
            put32(b, BLOCK_SIZE, 3 << 20)
        }),
        case!("block-size-huge", "dyn.vdi", CORRUPT, "block_size", |b| {
            put32(b, BLOCK_SIZE, 1 << 30)
        }),
        case!("block-extra", "dyn.vdi", UNSUPPORTED, "block_extra", |b| {
            put32(b, BLOCK_EXTRA, 512)
        }),
        case!(
            "blocks-huge",
            "dyn.vdi",
            UNSUPPORTED,
            "blocks_in_image",
            |b| put32(b, BLOCKS_IN_IMAGE, u32::MAX)
        ),
        case!("disk-size", "dyn.vdi", CORRUPT, "disk_size", |b| b
            [DISK_SIZE..DISK_SIZE + 8]
            .copy_from_slice(&(1u64 << 40).to_le_bytes())),
        case!("uuid-link", "dyn.vdi", UNSUPPORTED, "uuid_link", |b| b
            [UUID_LINK] =
            1),
        case!("uuid-parent", "dyn.vdi", UNSUPPORTED, "uuid_parent", |b| {
            b[UUID_PARENT] = 1
        }),
        case!("bmap-past-end", "dyn.vdi", CORRUPT, "offset_bmap", |b| {
            put32(b, OFFSET_BMAP, 0x7fff_fe00)
        }),
        case!(
            "entry-too-large",
            "dyn.vdi",
            CORRUPT,
            "block map entry 0",
            |b| {
                let at = get32(b, OFFSET_BMAP) as usize;
                put32(b, at, 1000)
            }
        ),
        case!(
            "entry-past-file",
            "dyn.vdi",
            CORRUPT,
            "block map entry 0",
            |b| {
                let at = get32(b, OFFSET_BMAP) as usize;
                put32(b, at, 19)
            }
        ),
        case!("static-hole", "static.vdi", CORRUPT, "static VDI", |b| {
            let at = get32(b, OFFSET_BMAP) as usize;
            put32(b, at + 4, u32::MAX)
        }),
    ]
}

#[test]
fn malformed_vdis_are_refused_naming_the_field() {
    let t = common::tmp();
    let d = t.path();
    make(d, "dyn.vdi", "static=off", "20M");
    make(d, "static.vdi", "static=on", "20M");
    assert_refused(d, "vdi", &["dyn.vdi", "static.vdi"], &cases());
}
