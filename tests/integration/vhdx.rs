//! VHDX in and out: kiln's output checked with `qemu-img check`/`compare`/`info`; every variant
//! qemu-img writes read back identically to `qemu-img convert -O raw`; a differencing child and a
//! log that needs replaying, both built here byte by byte from the specification (qemu-img makes
//! neither: it has no differencing VHDX support and replays logs itself); malformed files.

use std::fs;
use std::path::Path;

use crate::common::*;
use crate::malformed::kiln_limited;

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Sets the CRC-32C at `at + 4` of the `len` bytes at `at` (headers, region tables, log entries).
fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    put32(b, at + 4, 0);
    let c = CRC32C.checksum(&b[at..at + len]);
    put32(b, at + 4, c);
}

const H1: usize = 64 << 10;
const H2: usize = 128 << 10;
const RT1: usize = 192 << 10;
const RT2: usize = 256 << 10;

/// The current header's offset (the higher sequence number; qemu-img writes header 2 last).
fn current_header(b: &[u8]) -> usize {
    if le64(b, H2 + 8) >= le64(b, H1 + 8) {
        H2
    } else {
        H1
    }
}

/// (BAT offset, metadata offset) from region table 1.
fn regions(b: &[u8]) -> (usize, usize) {
    let (mut bat, mut md) = (0, 0);
    for i in 0..le32(b, RT1 + 8) as usize {
        let e = RT1 + 16 + 32 * i;
        match b[e] {
            0x66 => bat = le64(b, e + 16) as usize,
            0x06 => md = le64(b, e + 16) as usize,
            _ => {}
        }
    }
    (bat, md)
}

/// The offset of the metadata item whose GUID starts with `first` (its first stored byte).
fn item(b: &[u8], first: u8) -> usize {
    let (_, md) = regions(b);
    let n = u16::from_le_bytes([b[md + 10], b[md + 11]]) as usize;
    (0..n)
        .map(|i| md + 32 + 32 * i)
        .find(|&e| b[e] == first)
        .map(|e| md + le32(b, e + 16) as usize)
        .expect("metadata item")
}

/// A GUID as parent locators write it.
fn guid_string(g: &[u8]) -> String {
    let tail: String = g[10..].iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{tail}}}",
        le32(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9]
    )
}

/// A raw disk with data, a hole, zeros written as data, and data at the very end.
fn source_raw(d: &Path, name: &str, size: u64) {
    let p = d.join(name);
    sparse_raw(&p, size);
    write_at(&p, 0, &noise(1, 1 << 20));
    write_at(&p, 9 << 20, &noise(2, 3 << 20));
    write_at(&p, 20 << 20, &vec![0u8; 1 << 20]);
    write_at(&p, size - 4096, &[0x5au8; 4096]);
}

/// kiln's VHDX output of `src` is clean, equal to it, and has the expected virtual size.
fn assert_good_output(d: &Path, src: &str, out: &str, size: u64) {
    assert_clean(d, out);
    assert_same(d, src, out);
    let i = info(d, out);
    assert_eq!(i["format"], "vhdx", "{i}");
    assert_eq!(i["virtual-size"].as_u64(), Some(size), "{i}");
}

#[test]
fn output_from_raw_qcow2_chain_and_sparse_sources() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 40 << 20);
    kiln_in(d, &["convert", "-O", "vhdx", "src.raw", "a.vhdx"]).ok();
    assert_good_output(d, "src.raw", "a.vhdx", 40 << 20);
    // A block size of its own, and kiln reads its own output back.
    kiln_in(
        d,
        &[
            "convert",
            "-O",
            "vhdx",
            "-o",
            "block_size=1M",
            "src.raw",
            "b.vhdx",
        ],
    )
    .ok();
    assert_good_output(d, "src.raw", "b.vhdx", 40 << 20);
    kiln_in(d, &["convert", "-O", "raw", "b.vhdx", "back.raw"]).ok();
    assert_same(d, "src.raw", "back.raw");
    // A qcow2 chain: base and an overlay that changes part of it.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"]);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 4M", "write -P 0x22 20M 2M"],
    );
    qcow2_overlay(d, "base.qcow2", "top.qcow2");
    qemu_io(d, "top.qcow2", &["write -P 0x33 1M 1M", "write -z 20M 1M"]);
    kiln_in(d, &["convert", "-O", "vhdx", "top.qcow2", "chain.vhdx"]).ok();
    assert_good_output(d, "top.qcow2", "chain.vhdx", 32 << 20);
    // A sparse disk: 1 GiB with 64 KiB of data; only that block is allocated.
    let p = d.join("sparse.raw");
    sparse_raw(&p, 1 << 30);
    write_at(&p, 700 << 20, &noise(3, 64 << 10));
    kiln_in(d, &["convert", "-O", "vhdx", "sparse.raw", "sparse.vhdx"]).ok();
    assert_good_output(d, "sparse.raw", "sparse.vhdx", 1 << 30);
    let len = fs::metadata(d.join("sparse.vhdx")).unwrap().len();
    assert_eq!(len, (4 + 8) << 20, "header MiBs, then one 8 MiB block");
    assert!(allocated(&d.join("sparse.vhdx")) < 2 << 20);
    // Unknown options and bad block sizes are refused before anything is written.
    for o in ["block_size=3M", "block_size=512M", "subformat=fixed"] {
        let r = kiln_in(
            d,
            &[
                "convert", "--json", "-O", "vhdx", "-o", o, "src.raw", "x.vhdx",
            ],
        );
        assert_eq!(r.code(), "InvalidParameter", "{o}: {}", r.stdout);
        assert!(!d.join("x.vhdx").exists());
    }
}

#[test]
fn grown_disk_from_create_and_same_bytes_whatever_j() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 24 << 20);
    let mut sums = Vec::new();
    for j in ["1", "3"] {
        let dir = format!("img{j}");
        kiln_in(
            d,
            &[
                "create",
                "--name",
                "vhdx-img",
                "--format",
                "vhdx",
                "--disk",
                "snapshot=src.raw,size=100M,type=system",
                "--disk",
                "size=64M",
                "-j",
                j,
                "-q",
                "--output-dir",
                &dir,
            ],
        )
        .ok();
        let img = d.join(&dir);
        assert_sums(&img);
        kiln_in(&img, &["verify", "."]).ok();
        assert_good_output(&img, "../src.raw", "xvda.vhdx", 100 << 20);
        assert_clean(&img, "xvdb.vhdx");
        assert_eq!(virtual_size(&img, "xvdb.vhdx"), 64 << 20);
        sums.push(sha256_file(&img.join("xvda.vhdx")));
        // convert with -j too.
        let out = format!("conv{j}.vhdx");
        kiln_in(d, &["convert", "-j", j, "-O", "vhdx", "src.raw", &out]).ok();
        sums.push(sha256_file(&d.join(&out)));
    }
    assert_eq!(sums[0], sums[2], "create -j 1 and -j 3 differ");
    assert_eq!(sums[1], sums[3], "convert -j 1 and -j 3 differ");
    // Different contents give different GUIDs (they are derived from the data).
    let a = fs::read(d.join("conv1.vhdx")).unwrap();
    let b = fs::read(d.join("img1/xvda.vhdx")).unwrap();
    assert_ne!(a[H2 + 32..H2 + 48], b[H2 + 32..H2 + 48]);
}

#[test]
fn every_qemu_img_variant_reads_like_qemu_img() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 48 << 20);
    let variants = [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "subformat=dynamic,block_state_zero=off",
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=256M",
        "subformat=dynamic,log_size=8M",
    ];
    for (i, o) in variants.iter().enumerate() {
        let v = format!("v{i}.vhdx");
        qemu_img(d, &["convert", "-O", "vhdx", "-o", o, "src.raw", &v]);
        let expect = format!("v{i}.qemu.raw");
        qemu_img(d, &["convert", "-O", "raw", &v, &expect]);
        let got = format!("v{i}.kiln.raw");
        kiln_in(d, &["convert", "-O", "raw", &v, &got]).ok();
        assert_eq!(
            fs::read(d.join(&got)).unwrap(),
            fs::read(d.join(&expect)).unwrap(),
            "{o}"
        );
        // inspect (with the map) and a forced format work on it.
        let r = kiln_in(d, &["inspect", "--json", "--map", "-f", "vhdx", &v]).ok();
        let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(j["format"], "vhdx");
        assert_eq!(j["virtual-size"].as_u64(), Some(48 << 20));
        assert!(j["cluster-size"].as_u64().unwrap() >= 1 << 20, "{j}");
    }
    // An empty qemu-img file, and one with 4 KiB logical sectors is not something qemu-img
    // writes: the empty one reads as zeros.
    qemu_img(d, &["create", "-q", "-f", "vhdx", "empty.vhdx", "8M"]);
    kiln_in(d, &["convert", "empty.vhdx", "empty.raw"]).ok();
    assert_eq!(fs::read(d.join("empty.raw")).unwrap(), vec![0u8; 8 << 20]);
    // kiln check reads it through the same reader (no partition table: a report, not an error).
    let r = kiln_in(d, &["check", "--json", "v0.vhdx"]);
    assert!(r.status == 0 || r.status == 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("PartitionTable"), "{}", r.stdout);
}

/// Builds a differencing child of `parent` (a 1 MiB-block VHDX) by hand, returns the bytes the
/// child must read as, given the parent's.
fn make_child(d: &Path, parent: &str, child: &str, linkage: Option<&str>) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    let p = fs::read(d.join(parent)).unwrap();
    let ph = current_header(&p);
    let vsize = le64(&p, item(&p, 0x24)) as usize;
    let mut expect = fs::read(d.join("parent.qemu.raw")).unwrap();
    assert_eq!(expect.len(), vsize);
    let mut b = vec![0u8; 7 * MIB];
    b[0..8].copy_from_slice(b"vhdxfile");
    for (i, at) in [H1, H2].into_iter().enumerate() {
        b[at..at + 4].copy_from_slice(b"head");
        put64(&mut b, at + 8, i as u64 + 1);
        b[at + 16] = 0xf1;
        b[at + 32] = 0xd1;
        put16(&mut b, at + 66, 1);
        put32(&mut b, at + 68, MIB as u32);
        put64(&mut b, at + 72, MIB as u64);
        fix_crc(&mut b, at, 4096);
    }
    // Region table: BAT at 3 MiB, metadata at 2 MiB; the GUIDs copied from the parent's table.
    for at in [RT1, RT2] {
        b[at..at + 4].copy_from_slice(b"regi");
        put32(&mut b, at + 8, 2);
        for i in 0..2 {
            let e = at + 16 + 32 * i;
            let pe = RT1 + 16 + 32 * i;
            b[e..e + 16].copy_from_slice(&p[pe..pe + 16]);
            let off = if p[pe] == 0x66 { 3 * MIB } else { 2 * MIB };
            put64(&mut b, e + 16, off as u64);
            put32(&mut b, e + 24, MIB as u32);
            put32(&mut b, e + 28, 1);
        }
        fix_crc(&mut b, at, 64 << 10);
    }
    // Metadata: the parent's table and items, with HasParent set and a parent locator added.
    let (_, pmd) = regions(&p);
    let md = 2 * MIB;
    b[md..md + (64 << 10) + 64].copy_from_slice(&p[pmd..pmd + (64 << 10) + 64]);
    let params = md + (item(&p, 0x37) - pmd);
    assert_eq!(le32(&b, params), MIB as u32, "parent has 1 MiB blocks");
    put32(&mut b, params + 4, 2);
    let n = u16::from_le_bytes([b[md + 10], b[md + 11]]) as usize;
    put16(&mut b, md + 10, n as u16 + 1);
    let e = md + 32 + 32 * n;
    // Parent locator item GUID A8D35F2D-B30B-454D-ABF7-D3D84834AB0C, locator type
    // B04AEFB7-D19E-4A81-B789-25B8E9445913.
    let loc_id = [
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ];
    let loc_type = [
        0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59,
        0x13,
    ];
    let data_guid = guid_string(&p[ph + 32..ph + 48]);
    let link = linkage.map_or(data_guid, str::to_string);
    let kv = [
        ("parent_linkage", link.as_str()),
        ("relative_path", ".\\parent.vhdx"),
        ("absolute_win32_path", "C:\\vms\\parent.vhdx"),
    ];
    let mut loc = vec![0u8; 20 + 12 * kv.len()];
    loc[0..16].copy_from_slice(&loc_type);
    put16(&mut loc, 18, kv.len() as u16);
    for (i, (k, v)) in kv.iter().enumerate() {
        let ko = loc.len();
        loc.extend(k.encode_utf16().flat_map(u16::to_le_bytes));
        let vo = loc.len();
        loc.extend(v.encode_utf16().flat_map(u16::to_le_bytes));
        let at = 20 + 12 * i;
        put32(&mut loc, at, ko as u32);
        put32(&mut loc, at + 4, vo as u32);
        put16(&mut loc, at + 8, (vo - ko) as u16);
        let vlen = (loc.len() - vo) as u16;
        put16(&mut loc, at + 10, vlen);
    }
    let loc_at = 128 << 10;
    b[e..e + 16].copy_from_slice(&loc_id);
    put32(&mut b, e + 16, loc_at as u32);
    put32(&mut b, e + 20, loc.len() as u32);
    put32(&mut b, e + 24, 4);
    b[md + loc_at..md + loc_at + loc.len()].copy_from_slice(&loc);
    // BAT (chunk ratio 4096 with 512-byte sectors and 1 MiB blocks; the bitmap entry is 4096).
    let bat = 3 * MIB;
    put64(&mut b, bat + 8, 6 | (4 << 20)); // block 1: fully present at 4 MiB
    put64(&mut b, bat + 3 * 8, 7 | (5 << 20)); // block 3: partially present at 5 MiB
    put64(&mut b, bat + 5 * 8, 2); // block 5: zero
    put64(&mut b, bat + 4096 * 8, 6 | (6 << 20)); // sector bitmap at 6 MiB
    b[4 * MIB..5 * MIB].fill(0xa1);
    b[5 * MIB..6 * MIB].fill(0xee); // sectors not marked present: never read
    b[5 * MIB..5 * MIB + 4096].fill(0xb2);
    b[5 * MIB + 100 * 512..5 * MIB + 101 * 512].fill(0xc3);
    let first_bit = 3 * 2048;
    b[6 * MIB + first_bit / 8] = 0xff; // sectors 0..8 of block 3
    b[6 * MIB + (first_bit + 100) / 8] |= 1 << ((first_bit + 100) % 8);
    fs::write(d.join(child), &b).unwrap();
    expect[MIB..2 * MIB].fill(0xa1);
    expect[3 * MIB..3 * MIB + 4096].fill(0xb2);
    expect[3 * MIB + 100 * 512..3 * MIB + 101 * 512].fill(0xc3);
    expect[5 * MIB..6 * MIB].fill(0);
    expect
}

#[test]
fn differencing_child_reads_through_its_parent() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 8 << 20);
    qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vhdx",
            "-o",
            "block_size=1M",
            "src.raw",
            "parent.vhdx",
        ],
    );
    qemu_img(
        d,
        &["convert", "-O", "raw", "parent.vhdx", "parent.qemu.raw"],
    );
    let expect = make_child(d, "parent.vhdx", "child.vhdx", None);
    kiln_in(d, &["convert", "child.vhdx", "child.raw"]).ok();
    assert_eq!(fs::read(d.join("child.raw")).unwrap(), expect);
    let r = kiln_in(d, &["inspect", "--json", "--map", "child.vhdx"]).ok();
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        j["full-backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("parent.vhdx"),
        "{j}"
    );
    // Moved under another name: the relative path fails, absolute_win32_path's name does not
    // exist either.
    fs::rename(d.join("parent.vhdx"), d.join("moved.vhdx")).unwrap();
    let r = kiln_in(d, &["convert", "--json", "child.vhdx", "x.raw"]);
    assert_eq!(r.code(), "InvalidSnapshotId.NotFound", "{}", r.stdout);
    fs::rename(d.join("moved.vhdx"), d.join("parent.vhdx")).unwrap();
    // A parent that is not the one the child was made from.
    make_child(
        d,
        "parent.vhdx",
        "stale.vhdx",
        Some("{00000000-0000-0000-0000-000000000001}"),
    );
    let r = kiln_in(d, &["convert", "--json", "stale.vhdx", "x.raw"]);
    assert_eq!(r.code(), "InvalidSnapshot.Corrupt", "{}", r.stdout);
    assert!(r.stdout.contains("parent_linkage"), "{}", r.stdout);
    // A parent outside the child's tree is refused by the gate.
    let sub = d.join("sub");
    fs::create_dir(&sub).unwrap();
    fs::copy(d.join("child.vhdx"), sub.join("child.vhdx")).unwrap();
    let mut b = fs::read(sub.join("child.vhdx")).unwrap();
    let at = (2 << 20) + (128 << 10);
    let text: Vec<u8> = ".\\parent.vhdx"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let pos = b[at..at + 4096]
        .windows(text.len())
        .position(|w| w == text)
        .unwrap();
    // ".\\parent.vhdx" becomes "..\\parent.vhdx" (one character longer: the length grows by 2).
    let up: Vec<u8> = "..\\parent.vhdx"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    b[at + pos..at + pos + up.len()].copy_from_slice(&up);
    let entry = at + 20 + 12;
    let vlen = u16::from_le_bytes([b[entry + 10], b[entry + 11]]);
    put16(&mut b, entry + 10, vlen + 2);
    fs::write(sub.join("child.vhdx"), &b).unwrap();
    let r = kiln_in(&sub, &["convert", "--json", "child.vhdx", "x.raw"]);
    assert_eq!(r.code(), "InvalidSnapshot.BackingDenied", "{}", r.stdout);
}

/// Adds to `file` (a qemu-img VHDX whose first block holds data) a log entry that writes one
/// 4 KiB sector and zeroes 8 KiB of guest block 0, and points the current header at it.
fn add_log_entry(d: &Path, file: &str) {
    let mut b = fs::read(d.join(file)).unwrap();
    let h = current_header(&b);
    let log_off = le64(&b, h + 72) as usize;
    let (bat, _) = regions(&b);
    let block0 = ((le64(&b, bat) >> 20) << 20) as usize;
    assert_ne!(block0, 0, "block 0 allocated");
    let guid: [u8; 16] = *b"kiln-log-guid-01";
    let seq = 7u64;
    let mut e = vec![0u8; 8192];
    e[0..4].copy_from_slice(b"loge");
    put32(&mut e, 8, 8192);
    put64(&mut e, 16, seq);
    put32(&mut e, 24, 2);
    e[32..48].copy_from_slice(&guid);
    put64(&mut e, 48, b.len() as u64);
    put64(&mut e, 56, b.len() as u64);
    let mut sector = vec![0x77u8; 4096];
    sector[0..8].copy_from_slice(b"LEADING!");
    sector[4092..].copy_from_slice(b"TAIL");
    // Data descriptor: guest offset 12 KiB of block 0.
    e[64..68].copy_from_slice(b"desc");
    e[68..72].copy_from_slice(&sector[4092..]);
    e[72..80].copy_from_slice(&sector[0..8]);
    put64(&mut e, 80, (block0 + 12288) as u64);
    put64(&mut e, 88, seq);
    // Zero descriptor: 8 KiB at guest offset 64 KiB.
    e[96..100].copy_from_slice(b"zero");
    put64(&mut e, 104, 8192);
    put64(&mut e, 112, (block0 + 65536) as u64);
    put64(&mut e, 120, seq);
    e[4096..4100].copy_from_slice(b"data");
    put32(&mut e, 4100, (seq >> 32) as u32);
    e[4104..8188].copy_from_slice(&sector[8..4092]);
    put32(&mut e, 8188, seq as u32);
    fix_crc(&mut e, 0, 8192);
    b[log_off..log_off + 8192].copy_from_slice(&e);
    b[h + 48..h + 64].copy_from_slice(&guid);
    fix_crc(&mut b, h, 4096);
    fs::write(d.join(file), &b).unwrap();
}

#[test]
fn a_log_that_needs_replaying_is_replayed_in_memory() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 16 << 20);
    qemu_img(d, &["convert", "-O", "vhdx", "src.raw", "dirty.vhdx"]);
    add_log_entry(d, "dirty.vhdx");
    let before = sha256_file(&d.join("dirty.vhdx"));
    // qemu-img refuses to read it without writing; its replay (`check -r all`, on a copy) is the
    // oracle.
    let r = tool_in(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "dirty.vhdx", "x.raw"],
    );
    assert_ne!(r.status, 0, "qemu-img read a dirty log read-only");
    fs::copy(d.join("dirty.vhdx"), d.join("replayed.vhdx")).unwrap();
    qemu_img(d, &["check", "-r", "all", "replayed.vhdx"]);
    qemu_img(d, &["convert", "-O", "raw", "replayed.vhdx", "expect.raw"]);
    let expect = fs::read(d.join("expect.raw")).unwrap();
    assert_ne!(
        expect,
        fs::read(d.join("src.raw")).unwrap(),
        "the log changes data"
    );
    assert_eq!(&expect[12288..12296], b"LEADING!");
    kiln_in(d, &["convert", "dirty.vhdx", "got.raw"]).ok();
    assert_eq!(fs::read(d.join("got.raw")).unwrap(), expect);
    kiln_in(d, &["inspect", "--map", "dirty.vhdx"]).ok();
    assert_eq!(sha256_file(&d.join("dirty.vhdx")), before, "source written");
    // An entry whose checksum fails is not valid: nothing is replayed.
    let mut b = fs::read(d.join("dirty.vhdx")).unwrap();
    let h = current_header(&b);
    let log_off = le64(&b, h + 72) as usize;
    b[log_off + 5000] ^= 1;
    fs::write(d.join("badcrc.vhdx"), &b).unwrap();
    kiln_in(d, &["convert", "badcrc.vhdx", "nolog.raw"]).ok();
    assert_same(d, "src.raw", "nolog.raw");
}

/// One malformed file: the change, and what kiln must say.
struct Case {
    name: &'static str,
    patch: fn(&mut Vec<u8>),
    code: &'static str,
    field: &'static str,
}

const CORRUPT: &str = "InvalidSnapshot.Corrupt";
const UNSUPPORTED: &str = "InvalidSnapshot.Unsupported";

/// Changes the current header with `f` and fixes its checksum.
fn in_header(b: &mut [u8], f: impl Fn(&mut [u8], usize)) {
    let h = current_header(b);
    f(b, h);
    fix_crc(b, h, 4096);
}

/// Changes both region tables with `f` and fixes their checksums.
fn in_regions(b: &mut [u8], f: impl Fn(&mut [u8], usize)) {
    for at in [RT1, RT2] {
        f(b, at);
        fix_crc(b, at, 64 << 10);
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "identifier",
            patch: |b| b[0..8].copy_from_slice(b"vhdxfilX"),
            code: CORRUPT,
            field: "file type identifier",
        },
        Case {
            name: "both_header_checksums",
            patch: |b| {
                b[H1 + 100] ^= 1;
                b[H2 + 100] ^= 1;
            },
            code: CORRUPT,
            field: "neither header is valid",
        },
        Case {
            name: "header_version",
            patch: |b| in_header(b, |b, h| put16(b, h + 66, 2)),
            code: UNSUPPORTED,
            field: "Version is 2",
        },
        Case {
            name: "header_log_version",
            patch: |b| in_header(b, |b, h| put16(b, h + 64, 1)),
            code: UNSUPPORTED,
            field: "LogVersion",
        },
        Case {
            name: "header_log_offset",
            patch: |b| in_header(b, |b, h| put64(b, h + 72, 4096)),
            code: CORRUPT,
            field: "LogOffset",
        },
        Case {
            name: "header_log_past_eof",
            patch: |b| {
                in_header(b, |b, h| {
                    b[h + 48] = 1;
                    put32(b, h + 68, 32 << 20);
                })
            },
            code: CORRUPT,
            field: "the log",
        },
        Case {
            name: "region_checksums",
            patch: |b| {
                b[RT1 + 200] ^= 1;
                b[RT2 + 200] ^= 1;
            },
            code: CORRUPT,
            field: "neither region table is valid",
        },
        Case {
            name: "region_entry_count",
            patch: |b| in_regions(b, |b, at| put32(b, at + 8, 5000)),
            code: CORRUPT,
            field: "EntryCount 5000",
        },
        Case {
            name: "region_bat_offset_unaligned",
            patch: |b| in_regions(b, |b, at| put64(b, at + 16 + 16, (2 << 20) + 4096)),
            code: CORRUPT,
            field: "FileOffset",
        },
        Case {
            name: "region_past_eof",
            patch: |b| in_regions(b, |b, at| put64(b, at + 16 + 16, 1 << 40)),
            code: CORRUPT,
            field: "runs past the end of the file",
        },
        Case {
            name: "region_unknown_required",
            patch: |b| {
                in_regions(b, |b, at| {
                    b[at + 16] ^= 0xff;
                    put32(b, at + 16 + 28, 1);
                })
            },
            code: UNSUPPORTED,
            field: "required region",
        },
        Case {
            name: "metadata_signature",
            patch: |b| {
                let (_, md) = regions(b);
                b[md] = b'M';
            },
            code: CORRUPT,
            field: "metadata table signature",
        },
        Case {
            name: "block_size",
            patch: |b| {
                let at = item(b, 0x37);
                put32(b, at, 3 << 20);
            },
            code: CORRUPT,
            field: "BlockSize",
        },
        Case {
            name: "virtual_size",
            patch: |b| {
                let at = item(b, 0x24);
                put64(b, at, 1000);
            },
            code: CORRUPT,
            field: "VirtualDiskSize 1000",
        },
        Case {
            name: "logical_sector_size",
            patch: |b| {
                let at = item(b, 0x1d);
                put32(b, at, 1024);
            },
            code: CORRUPT,
            field: "LogicalSectorSize 1024",
        },
        Case {
            name: "has_parent_without_locator",
            patch: |b| {
                let at = item(b, 0x37);
                put32(b, at + 4, 2);
            },
            code: CORRUPT,
            field: "ParentLocator is missing",
        },
        Case {
            name: "bat_entry_state",
            patch: |b| {
                let (bat, _) = regions(b);
                put64(b, bat, 4);
            },
            code: CORRUPT,
            field: "BAT entry 0 has state 4",
        },
        Case {
            name: "bat_entry_partial_without_parent",
            patch: |b| {
                let (bat, _) = regions(b);
                let v = le64(b, bat);
                put64(b, bat, (v & !7) | 7);
            },
            code: CORRUPT,
            field: "BAT entry 0 has state 7",
        },
        Case {
            name: "bat_entry_past_eof",
            patch: |b| {
                let (bat, _) = regions(b);
                put64(b, bat, 6 | (1 << 40));
            },
            code: CORRUPT,
            field: "BAT entry 0: FileOffsetMB",
        },
        Case {
            // Found by the fuzz target: the offset plus the block overflowed 64 bits.
            name: "bat_entry_offset_at_the_top",
            patch: |b| {
                let (bat, _) = regions(b);
                put64(b, bat, 6 | (u64::MAX << 20));
            },
            code: CORRUPT,
            field: "BAT entry 0: FileOffsetMB 17592186044415",
        },
        Case {
            name: "bat_entry_in_first_mib",
            patch: |b| {
                let (bat, _) = regions(b);
                put64(b, bat, 6);
            },
            code: CORRUPT,
            field: "BAT entry 0: FileOffsetMB 0",
        },
    ]
}

#[test]
fn malformed_files_are_refused_naming_the_field() {
    let t = tmp();
    let d = t.path();
    source_raw(d, "src.raw", 16 << 20);
    qemu_img(d, &["convert", "-O", "vhdx", "src.raw", "base.vhdx"]);
    let base = fs::read(d.join("base.vhdx")).unwrap();
    let cases = cases();
    assert!(cases.len() >= 15);
    for c in cases {
        let mut b = base.clone();
        (c.patch)(&mut b);
        let name = format!("{}.vhdx", c.name);
        fs::write(d.join(&name), &b).unwrap();
        for cmd in [
            vec!["inspect", "--json", "--map", "-f", "vhdx", &name],
            vec!["convert", "--json", "-f", "vhdx", &name, "out.raw"],
        ] {
            let args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            let r = kiln_limited(d, &args).unwrap_or_else(|| panic!("{}: timed out", c.name));
            assert_eq!(r.status, Some(2), "{}: {}{}", c.name, r.stdout, r.stderr);
            let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
                .unwrap_or_else(|_| panic!("{}: {}{}", c.name, r.stdout, r.stderr));
            assert_eq!(v["Code"], c.code, "{}: {v}", c.name);
            let msg = v["Message"].as_str().unwrap();
            assert!(msg.contains(c.field), "{}: {msg}", c.name);
        }
    }
}
