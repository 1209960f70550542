//! Filesystem signatures (what `blkid` would call the partition), and a read-only window onto one
//! partition of a [`BlockSource`] for the FAT and ext4 readers, with a budget on the bytes they may
//! read so a damaged filesystem (a looping cluster chain, a huge directory) cannot keep kiln busy.

use std::io;
use std::sync::Arc;

use crate::error::Result;
use crate::format::BlockSource;

use super::gpt::read_vec;

/// Bytes one filesystem reader may read through a [`PartReader`].
pub(crate) const READ_BUDGET: u64 = 64 << 20;

/// Bytes read from a partition's start to recognise its filesystem (Btrfs's superblock is at 64 KiB).
const PROBE_LEN: u64 = 68 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    Exfat,
    Swap,
    Lvm,
}

impl FsKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Exfat => "exfat",
            FsKind::Swap => "swap",
            FsKind::Lvm => "LVM2_member",
        }
    }

    pub(crate) fn is_ext(self) -> bool {
        matches!(self, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4)
    }
}

/// Recognises the filesystem in `b`, the first bytes of a partition (up to 68 KiB; shorter for a
/// small partition).
pub(crate) fn identify(b: &[u8]) -> Option<FsKind> {
    let at = |off: usize, sig: &[u8]| b.len() >= off + sig.len() && &b[off..off + sig.len()] == sig;
    let le16 = |off: usize| u16::from_le_bytes([b[off], b[off + 1]]);
    let le32 = |off: usize| u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    if b.len() >= 2048 && le16(1024 + 0x38) == 0xEF53 {
        let compat = le32(1024 + 0x5C);
        let incompat = le32(1024 + 0x60);
        let ro_compat = le32(1024 + 0x64);
        // What blkid calls ext4: incompat features beyond ext3's (filetype, recover, meta_bg, journal
        // dev) or ro_compat beyond sparse_super, large_file, btree_dir.
        const EXT3_INCOMPAT: u32 = 0x0002 | 0x0004 | 0x0008 | 0x0010;
        const EXT3_RO_COMPAT: u32 = 0x0001 | 0x0002 | 0x0004;
        return Some(
            if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
                FsKind::Ext4
            } else if compat & 0x0004 != 0 {
                FsKind::Ext3
            } else {
                FsKind::Ext2
            },
        );
    }
    if at(0, b"XFSB") {
        return Some(FsKind::Xfs);
    }
    if at(65536 + 64, b"_BHRfS_M") {
        return Some(FsKind::Btrfs);
    }
    if at(3, b"NTFS    ") {
        return Some(FsKind::Ntfs);
    }
    if at(3, b"EXFAT   ") {
        return Some(FsKind::Exfat);
    }
    for i in 0..4 {
        if at(512 * i, b"LABELONE") && at(512 * i + 24, b"LVM2 001") {
            return Some(FsKind::Lvm);
        }
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE") {
            return Some(FsKind::Swap);
        }
    }
    if b.len() >= 512 && b[510] == 0x55 && b[511] == 0xAA {
        if at(82, b"FAT32   ") {
            return Some(FsKind::Fat32);
        }
        if at(54, b"FAT16   ") {
            return Some(FsKind::Fat16);
        }
        if at(54, b"FAT12   ") {
            return Some(FsKind::Fat12);
        }
    }
    None
}

/// Reads the start of the partition at `start` (bytes, `len` long) and recognises its filesystem.
pub(crate) fn probe(src: &dyn BlockSource, start: u64, len: u64) -> Result<Option<FsKind>> {
    let n = len
        .min(PROBE_LEN)
        .min(src.virtual_size().saturating_sub(start));
    if n == 0 {
        return Ok(None);
    }
    Ok(identify(&read_vec(src, start, n)?))
}

/// A read-only view of bytes `start..start + len` of a disk, as `Read + Seek` (FAT) and
/// `Ext4Read` (ext4). Writes fail. Reads past [`READ_BUDGET`] in total fail too.
pub(crate) struct PartReader {
    src: Arc<dyn BlockSource>,
    start: u64,
    len: u64,
    pos: u64,
    read: u64,
}

impl PartReader {
    /// The window is clipped to the disk.
    pub(crate) fn new(src: Arc<dyn BlockSource>, start: u64, len: u64) -> PartReader {
        let len = len.min(src.virtual_size().saturating_sub(start));
        PartReader {
            src,
            start,
            len,
            pos: 0,
            read: 0,
        }
    }

    fn read_exact_at(&mut self, off: u64, dst: &mut [u8]) -> io::Result<()> {
        let end = off.saturating_add(dst.len() as u64);
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {off} runs past the partition's {} bytes",
                    dst.len(),
                    self.len
                ),
            ));
        }
        self.read += dst.len() as u64;
        if self.read > READ_BUDGET {
            return Err(io::Error::other(format!(
                "read more than {READ_BUDGET} bytes of the filesystem; giving up (damaged?)"
            )));
        }
        self.src
            .read_at(self.start + off, dst)
            .map_err(|e| io::Error::other(e.full_message()))
    }
}

impl io::Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for PartReader {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let new = match to {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            io::SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the partition's start",
            )
        })?;
        Ok(self.pos)
    }
}

/// Writes fail: kiln never changes a disk it checks (fatfs wants a writable device type).
impl io::Write for PartReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "kiln reads filesystems read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(start_byte, dst).map_err(|e| e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of zeros that stores nothing.
    struct Zeros(u64);
    impl BlockSource for Zeros {
        fn virtual_size(&self) -> u64 {
            self.0
        }
        fn extent(&self, offset: u64, max_len: u64) -> Result<crate::format::Extent> {
            Ok(crate::format::Extent {
                start: offset,
                len: max_len.min(self.0 - offset),
                kind: crate::format::ExtentKind::Unallocated,
            })
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    #[test]
    fn the_read_budget_stops_an_endless_reader() {
        use std::io::{Read, Seek, SeekFrom};
        let mut r = PartReader::new(Arc::new(Zeros(1 << 40)), 4096, 1 << 39);
        let mut buf = vec![0u8; 1 << 20];
        let mut reads = 0u64;
        let err = loop {
            // Going round the same megabyte, as a looping cluster chain would.
            r.seek(SeekFrom::Start(0)).unwrap();
            match r.read(&mut buf) {
                Ok(n) => reads += n as u64,
                Err(e) => break e,
            }
        };
        assert_eq!(reads, READ_BUDGET);
        assert!(err.to_string().contains("giving up"), "{err}");
    }

    #[test]
    fn the_window_is_clipped_and_read_only() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut r = PartReader::new(Arc::new(Zeros(10_000)), 8_000, 1 << 30);
        assert_eq!(r.seek(SeekFrom::End(0)).unwrap(), 2_000);
        let mut buf = [1u8; 100];
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        assert!(r.seek(SeekFrom::Current(-3000)).is_err());
        assert!(r.write(b"x").is_err());
        let e = ext4_view::Ext4Read::read(&mut r, 1_950, &mut buf).unwrap_err();
        assert!(e.to_string().contains("past the partition"), "{e}");
    }

    #[test]
    fn ext_generations() {
        let mut b = vec![0u8; 2048];
        b[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(identify(&b), Some(FsKind::Ext2));
        b[1024 + 0x5C] = 0x04; // has_journal
        assert_eq!(identify(&b), Some(FsKind::Ext3));
        b[1024 + 0x60] = 0x40 | 0x02; // extents, filetype
        assert_eq!(identify(&b), Some(FsKind::Ext4));
    }

    #[test]
    fn other_signatures() {
        let mut b = vec![0u8; 70 * 1024];
        assert_eq!(identify(&b), None);
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(identify(&b), Some(FsKind::Xfs));
        b[..4].fill(0);
        b[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        assert_eq!(identify(&b), Some(FsKind::Btrfs));
        b[65536 + 64..65536 + 72].fill(0);
        b[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(identify(&b), Some(FsKind::Swap));
        b[4086..4096].fill(0);
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(identify(&b), Some(FsKind::Lvm));
        b[512..544].fill(0);
        b[510] = 0x55;
        b[511] = 0xAA;
        b[82..90].copy_from_slice(b"FAT32   ");
        assert_eq!(identify(&b), Some(FsKind::Fat32));
        b[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(identify(&b), Some(FsKind::Ntfs));
        // Short buffers never index out of bounds.
        for n in [0, 1, 100, 511, 1030, 2047] {
            let _ = identify(&b[..n]);
        }
    }
}
