//! A disk as one member of a tar in GNU tar's old sparse form (`tar --format=oldgnu -S`, what
//! GCP's import documents): a header of type `S` holding the member's real size and the first
//! four (offset, length) data segments, then extension headers of 21 segments each, then the
//! segments' bytes one after the other. Holes take no room. As GNU tar does, a disk that ends in a
//! hole gets a last, empty segment at its end, which makes the extractor set the file's length.
//!
//! The headers are built with the `tar` crate's GNU header types; kiln only decides the fields.

use crate::error::{Code, Error, Result};

/// The member's name, as GCP requires it.
pub(crate) const MEMBER: &str = "disk.raw";
/// Tar's block size: headers, and the data padded to it.
pub(crate) const BLOCK: u64 = 512;
/// Segments a tar header holds, and an extension header.
const IN_HEADER: usize = 4;
const IN_EXTENSION: usize = 21;

/// The disk's data segments, (guest offset, length), sorted, apart and non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseMap {
    pub(crate) segments: Vec<(u64, u64)>,
    /// The disk's size (the extracted file's length).
    pub(crate) size: u64,
}

impl SparseMap {
    /// Bytes stored in the archive: every segment's length.
    pub(crate) fn stored(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// The map as the headers list it: the segments, and an empty one at the end when the disk
    /// ends in a hole (or has no data at all).
    fn entries(&self) -> Vec<(u64, u64)> {
        let mut e = self.segments.clone();
        if e.last().is_none_or(|l| l.0 + l.1 < self.size) {
            e.push((self.size, 0));
        }
        e
    }

    /// The header blocks of the member: the GNU header, then its extension headers.
    pub(crate) fn headers(&self, mtime: u64) -> Result<Vec<u8>> {
        let entries = self.entries();
        let mut h = tar::Header::new_gnu();
        h.set_path(MEMBER)
            .map_err(|e| Error::new(Code::Internal, format!("tar header name: {e}")))?;
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(self.stored());
        let gnu = h
            .as_gnu_mut()
            .ok_or_else(|| Error::new(Code::Internal, "a GNU tar header is not GNU"))?;
        gnu.set_real_size(self.size);
        for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(&entries) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        let rest = entries.get(IN_HEADER..).unwrap_or(&[]);
        gnu.set_is_extended(!rest.is_empty());
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        let count = rest.len().div_ceil(IN_EXTENSION);
        for (i, group) in rest.chunks(IN_EXTENSION).enumerate() {
            let mut ext = tar::GnuExtSparseHeader::new();
            for (slot, &(offset, len)) in ext.sparse_mut().iter_mut().zip(group) {
                slot.set_offset(offset);
                slot.set_length(len);
            }
            ext.set_is_extended(i + 1 < count);
            out.extend_from_slice(ext.as_bytes());
        }
        Ok(out)
    }
}

/// The end of an archive: the data padded to a whole block, then two zero blocks.
pub(crate) fn trailer_len(stored: u64) -> u64 {
    stored.next_multiple_of(BLOCK) - stored + 2 * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The archive of a disk whose bytes are `disk`, with the given map.
    fn archive(disk: &[u8], map: &SparseMap) -> Vec<u8> {
        let mut out = map.headers(1_700_000_000).unwrap();
        for &(o, l) in &map.segments {
            out.extend_from_slice(&disk[o as usize..(o + l) as usize]);
        }
        out.extend(std::iter::repeat_n(0, trailer_len(map.stored()) as usize));
        out
    }

    fn extract(tar_bytes: &[u8]) -> (String, Vec<u8>) {
        let mut a = tar::Archive::new(tar_bytes);
        let mut entries = a.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        assert!(entries.next().is_none());
        (name, data)
    }

    #[test]
    fn a_sparse_member_reads_back_with_its_holes() {
        let size = 1 << 20;
        let mut disk = vec![0u8; size];
        // Ten segments: the header's four and an extension header's six.
        let segments: Vec<(u64, u64)> = (0..10)
            .map(|i| (i * 65536 + 4096, 4096 + 512 * i))
            .collect();
        for &(o, l) in &segments {
            for b in &mut disk[o as usize..(o + l) as usize] {
                *b = 0xa5;
            }
        }
        let map = SparseMap {
            segments,
            size: size as u64,
        };
        let (name, data) = extract(&archive(&disk, &map));
        assert_eq!(name, MEMBER);
        assert_eq!(data, disk);
    }

    #[test]
    fn many_segments_take_several_extension_headers() {
        let segments: Vec<(u64, u64)> = (0..100).map(|i| (i * 8192, 4096)).collect();
        let map = SparseMap {
            segments,
            size: 100 * 8192,
        };
        // 101 entries (the last empty one): 4 in the header, 97 in 5 extension headers.
        assert_eq!(map.headers(0).unwrap().len(), 6 * 512);
        let disk: Vec<u8> = (0..100 * 8192)
            .map(|i| {
                if i % 8192 < 4096 {
                    (i % 7 + 1) as u8
                } else {
                    0
                }
            })
            .collect();
        assert_eq!(extract(&archive(&disk, &map)).1, disk);
    }

    #[test]
    fn an_empty_disk_is_one_empty_segment_at_its_end() {
        let map = SparseMap {
            segments: Vec::new(),
            size: 1 << 30,
        };
        assert_eq!(map.entries(), vec![(1 << 30, 0)]);
        let h = map.headers(0).unwrap();
        assert_eq!(h.len(), 512);
        assert_eq!(h[156], b'S');
        let full = SparseMap {
            segments: vec![(0, 4096)],
            size: 4096,
        };
        assert_eq!(full.entries(), vec![(0, 4096)]);
    }
}
