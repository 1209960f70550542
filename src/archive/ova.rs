//! An OVA (OVF 1.x, DSP0243 section 5.3): a POSIX ustar tar whose first member is the `.ovf`,
//! then the `.mf` manifest, then the files the OVF references in the order it lists them (here one
//! streamOptimized VMDK per disk, the system disk first).
//!
//! The archive is written in place, with no other copy of any disk: the `.ovf` and `.mf` members
//! (and their headers) get space reserved at the start; each VMDK is written by the copy engine
//! straight into the archive at its member's data offset ([`OvaWriter::next_disk`]), and its
//! header is written once its size is known ([`OvaWriter::disk_written`]); at the end the OVF,
//! padded with trailing white space to exactly the reserved size, and the manifest with the
//! SHA-256 of every member as written, go into the reserved space ([`OvaWriter::finish`]). Every
//! member starts on a 512-byte block, VMDKs are whole sectors long, so the tar is contiguous with
//! no padding members. Tar headers are the `tar` crate's ustar headers; mtime is
//! `SOURCE_DATE_EPOCH` (0 without it), owner root, mode 0644, so the same input gives the same
//! bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::ovf::{self, Ovf};
use crate::copy::hash;
use crate::error::{Code, Error, Result};

/// The tar block.
pub(crate) const BLOCK: u64 = 512;
/// Longest member stem, in bytes: a ustar name holds 100 bytes, and `-disk17.vmdk` takes 12.
const MAX_STEM: usize = 80;

/// The file name stem of an image's OVA and its members: the image name with every character but
/// letters, digits, `.`, `_` and `-` made `_` (a `:` would make an `ovf:href` read as a URI
/// scheme), cut to 80 bytes on a character boundary (ustar names hold 100 bytes).
pub(crate) fn stem(image_name: &str) -> String {
    let mut s = String::new();
    for c in image_name.chars() {
        let c = if c.is_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        };
        if s.len() + c.len_utf8() > MAX_STEM {
            break;
        }
        s.push(c);
    }
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

/// The archive's member names and where each goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) ovf_name: String,
    pub(crate) mf_name: String,
    pub(crate) disk_names: Vec<String>,
    /// The `.ovf` member's size: the space reserved for it (a multiple of [`BLOCK`]).
    pub(crate) ovf_len: u64,
    /// The `.mf` member's size (known up front: one fixed-length line per other member).
    pub(crate) mf_len: u64,
}

impl Layout {
    /// The layout for `disks` disks under `stem`, reserving `ovf_len` bytes for the OVF.
    pub(crate) fn new(stem: &str, disks: usize, ovf_len: u64) -> Layout {
        let disk_names: Vec<String> = (1..=disks)
            .map(|i| format!("{stem}-disk{i}.vmdk"))
            .collect();
        let ovf_name = format!("{stem}.ovf");
        let mf_len = std::iter::once(&ovf_name)
            .chain(&disk_names)
            .map(|n| mf_line(n, &"0".repeat(64)).len() as u64)
            .sum();
        Layout {
            mf_name: format!("{stem}.mf"),
            ovf_name,
            disk_names,
            ovf_len: ovf_len.next_multiple_of(BLOCK),
            mf_len,
        }
    }

    fn mf_header_at(&self) -> u64 {
        BLOCK + self.ovf_len
    }

    /// Where the first VMDK's header goes.
    pub(crate) fn first_disk_at(&self) -> u64 {
        (self.mf_header_at() + BLOCK + self.mf_len).next_multiple_of(BLOCK)
    }
}

/// One `.mf` line, as ovftool writes it.
fn mf_line(name: &str, sha256: &str) -> String {
    format!("SHA256({name})= {sha256}\n")
}

/// A ustar header for a regular file member.
pub(crate) fn header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| {
        Error::new(
            Code::Internal,
            format!("the OVA member name '{name}' does not fit a tar header: {e}"),
        )
    })?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// The members' mtime: `SOURCE_DATE_EPOCH`, or 0.
fn mtime() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// A member written into the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) name: String,
    /// Where its data starts in the OVA.
    pub(crate) offset: u64,
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

/// An OVA being written.
pub(crate) struct OvaWriter {
    file: File,
    path: PathBuf,
    layout: Layout,
    /// Where the next VMDK's header goes.
    next: u64,
    disks: Vec<Member>,
    mtime: u64,
}

impl OvaWriter {
    /// Creates the archive file (it must not exist).
    pub(crate) fn create(path: &Path, layout: Layout) -> Result<OvaWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::io(path, "creating", e))?;
        Ok(OvaWriter {
            file,
            path: path.to_path_buf(),
            next: layout.first_disk_at(),
            layout,
            disks: Vec::new(),
            mtime: mtime(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The next VMDK's member name and data offset (past its header), with the archive's file for
    /// its writer; None once every disk is written.
    pub(crate) fn next_disk(&self) -> Result<Option<(String, u64, File)>> {
        let Some(name) = self.layout.disk_names.get(self.disks.len()) else {
            return Ok(None);
        };
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, "opening again", e))?;
        Ok(Some((name.clone(), self.next + BLOCK, file)))
    }

    /// The VMDK handed out by [`OvaWriter::next_disk`] is finished (the file now ends where it
    /// does): hashes it and writes its header.
    pub(crate) fn disk_written(&mut self) -> Result<Member> {
        let name = self
            .layout
            .disk_names
            .get(self.disks.len())
            .cloned()
            .ok_or_else(|| Error::new(Code::Internal, "more disks written than the OVA holds"))?;
        let offset = self.next + BLOCK;
        let end = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "reading metadata of", e))?
            .len();
        if end < offset || !(end - offset).is_multiple_of(BLOCK) {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: the VMDK member {name} ends at {end}, not a whole number of blocks after {offset}",
                    self.path.display()
                ),
            ));
        }
        let size = end - offset;
        let sha256 = hash::hash_range(&self.file, &self.path, offset, size)?;
        self.write(self.next, &header(&name, size, self.mtime)?, &name)?;
        self.next = end;
        let m = Member {
            name,
            offset,
            size,
            sha256,
        };
        self.disks.push(m.clone());
        Ok(m)
    }

    fn write(&self, at: u64, data: &[u8], what: &str) -> Result<()> {
        self.file.write_all_at(data, at).map_err(|e| {
            Error::io(
                &self.path,
                &format!("writing {what} ({} bytes) at offset {at}", data.len()),
                e,
            )
        })
    }

    /// Writes the end-of-archive blocks, then the OVF (with the real sizes) and the manifest into
    /// their reserved space, flushes when `flush`, and returns the whole archive's SHA-256.
    pub(crate) fn finish(self, ovf: &Ovf, flush: bool) -> Result<String> {
        let l = &self.layout;
        if self.disks.len() != l.disk_names.len() {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "{}: {} of {} disks written",
                    self.path.display(),
                    self.disks.len(),
                    l.disk_names.len()
                ),
            ));
        }
        // Two zero blocks end a tar.
        let end = self.next + 2 * BLOCK;
        self.write(
            self.next,
            &[0u8; 2 * BLOCK as usize],
            "the end-of-archive blocks",
        )?;
        let text = ovf::pad(ovf::render(ovf), l.ovf_len).ok_or_else(|| {
            Error::new(
                Code::Internal,
                format!("the OVF outgrew the {} bytes reserved for it", l.ovf_len),
            )
        })?;
        self.write(BLOCK, &text, &l.ovf_name)?;
        self.write(
            0,
            &header(&l.ovf_name, l.ovf_len, self.mtime)?,
            "the OVF's header",
        )?;
        let ovf_sha256 = hash::hex(&<sha2::Sha256 as sha2::Digest>::digest(&text));
        let mut mf = mf_line(&l.ovf_name, &ovf_sha256);
        for d in &self.disks {
            mf.push_str(&mf_line(&d.name, &d.sha256));
        }
        if mf.len() as u64 != l.mf_len {
            return Err(Error::new(
                Code::Internal,
                format!(
                    "the manifest is {} bytes, not the {} reserved",
                    mf.len(),
                    l.mf_len
                ),
            ));
        }
        let mf_at = l.mf_header_at() + BLOCK;
        let mut mf_block = mf.into_bytes();
        mf_block.resize((l.first_disk_at() - mf_at) as usize, 0);
        self.write(mf_at, &mf_block, &l.mf_name)?;
        self.write(
            l.mf_header_at(),
            &header(&l.mf_name, l.mf_len, self.mtime)?,
            "the manifest's header",
        )?;
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.path, "setting the final length", e))?;
        if flush {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.path, "flushing (fsync)", e))?;
        }
        hash::hash_file(&self.file, &self.path)
    }
}

/// Most members kiln reads from an archive: an OVA holds an OVF, a manifest and at most 17 disks
/// (a certificate and a few more files in others').
const MAX_MEMBERS: usize = 64;

/// The members of a tar archive: (name, data offset, size), in order. Reads the headers only
/// (the `tar` crate seeks over the data); refuses a damaged archive or one with more than 64
/// members.
pub(crate) fn members(file: &File, path: &Path) -> Result<Vec<(String, u64, u64)>> {
    let corrupt = |what: String| {
        Error::new(
            Code::SnapshotCorrupt,
            format!("{}: not a readable tar archive: {what}", path.display()),
        )
    };
    let mut archive = tar::Archive::new(file);
    let mut out = Vec::new();
    let entries = archive
        .entries_with_seek()
        .map_err(|e| corrupt(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| corrupt(e.to_string()))?;
        if out.len() == MAX_MEMBERS {
            return Err(corrupt(format!("more than {MAX_MEMBERS} members")));
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        out.push((name, entry.raw_file_position(), entry.size()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_keep_safe_characters_and_fit_a_tar_name() {
        assert_eq!(stem("web-1.2_x"), "web-1.2_x");
        assert_eq!(stem("Web.v1:prod"), "Web.v1_prod");
        assert_eq!(stem("镜像-1"), "镜像-1");
        let long = stem(&"镜".repeat(128));
        assert!(long.len() <= MAX_STEM && long.chars().all(|c| c == '镜'));
        assert_eq!(stem(""), "_");
        for n in 1..=17 {
            header(&format!("{long}-disk{n}.vmdk"), 1, 0).unwrap();
        }
    }

    #[test]
    fn the_layout_reserves_whole_blocks_and_the_manifest_exactly() {
        let l = Layout::new("img", 2, 1000);
        assert_eq!(l.ovf_len, 1024);
        let line = "SHA256(img-disk1.vmdk)= ".len() + 64 + 1;
        assert_eq!(
            l.mf_len as usize,
            line * 2 + line - "-disk1.vmdk".len() + ".ovf".len()
        );
        assert_eq!(
            l.first_disk_at(),
            (512 + 1024 + 512 + l.mf_len).next_multiple_of(512)
        );
        assert_eq!(l.disk_names[1], "img-disk2.vmdk");
    }

    #[test]
    fn headers_are_ustar_with_the_size_and_a_valid_checksum() {
        let h = header("a.ovf", 1536, 7).unwrap();
        assert_eq!(&h[257..263], b"ustar\0");
        let parsed = tar::Header::from_byte_slice(&h);
        assert_eq!(parsed.size().unwrap(), 1536);
        assert_eq!(parsed.mtime().unwrap(), 7);
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u32
                }
            })
            .sum();
        assert_eq!(parsed.cksum().unwrap(), sum);
        // Past ustar's 11 octal digits (8 GiB) the size is written base-256, as GNU tar does.
        let big = header("b.vmdk", 9 << 30, 0).unwrap();
        assert_eq!(big[124] & 0x80, 0x80);
        assert_eq!(tar::Header::from_byte_slice(&big).size().unwrap(), 9 << 30);
    }
}
