//! A writer for fresh VHDs: fixed (the default: the guest disk, then the footer) or dynamic
//! (`-o subformat=dynamic`: footer copy, dynamic header, BAT, then 2 MiB blocks each behind its
//! sector bitmap, then the footer).
//!
//! The footer says exactly the virtual size, as `qemu-img create -o force_size=on` writes it: the
//! largest CHS geometry (65535 x 16 x 255), which makes qemu (and Hyper-V, Azure) take
//! `current_size` rather than the geometry, whatever the creator application. The creator is
//! `kiln`; the timestamp comes from `SOURCE_DATE_EPOCH` (0, i.e. 2000-01-01, without it) and the
//! UUID from a hash of the output's file name (`xvdb.vhd`, convert's DST), size and subformat, so
//! the same request gives the same bytes and the disks of one image differ.
//!
//! Dynamic blocks are handed out in guest order (the engine's allocation turnstile), so the layout
//! depends on the input alone. An allocation returns the guest offset itself, which
//! [`DiskWriter::write_at`] maps through the BAT: a run of guest bytes may cross blocks, which are
//! not contiguous in the file (a bitmap sits between them).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::header::{
    DynHeader, Footer, BAT_UNUSED, DYN_HEADER_SIZE, FOOTER_SIZE, MAX_GEOMETRY, MAX_VIRTUAL_SIZE,
    NO_OFFSET, SECTOR, TYPE_DYNAMIC, TYPE_FIXED, VERSION_1_0, VHD_EPOCH,
};
use crate::error::{Code, Error, Result};
use crate::format::writer::{DiskWriter, Finished};
use crate::format::OutputSpec;

/// Zero-detection granularity (like raw output's): 4 KiB pieces that read as zeros are not written.
const WRITE_BLOCK: u64 = 4096;
/// The dynamic disk's block size: the spec's default, and qemu's.
const BLOCK_SIZE: u64 = 2 << 20;
/// The dynamic header follows the footer copy; the BAT follows the header.
const HEADER_AT: u64 = FOOTER_SIZE as u64;
const BAT_AT: u64 = HEADER_AT + DYN_HEADER_SIZE as u64;

/// The `-o` keys VHD output takes.
pub(crate) const OPTIONS: &[(&str, &str)] = &[(
    "subformat",
    "fixed (default: the data, then a 512-byte footer) or dynamic (sparse: BAT and sector bitmaps)",
)];

/// The registry's constructor.
pub(crate) fn create(
    file: File,
    path: &Path,
    virtual_size: u64,
    spec: &OutputSpec,
) -> Result<Box<dyn DiskWriter>> {
    let mut dynamic = false;
    for (k, v) in &spec.options {
        match (k.as_str(), v.as_str()) {
            ("subformat", "fixed") => dynamic = false,
            ("subformat", "dynamic") => dynamic = true,
            (k, v) => {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("-o {k}={v}: VHD output takes subformat=fixed or subformat=dynamic"),
                ))
            }
        }
    }
    if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(SECTOR)
    {
        return Err(Error::new(
            Code::InvalidSize,
            format!(
                "{}: a VHD holds whole sectors up to 2040 GiB, not {virtual_size} bytes",
                path.display()
            ),
        ));
    }
    let footer = footer(path, virtual_size, dynamic);
    if dynamic {
        Ok(Box::new(DynamicWriter::create(file, path, footer)?))
    } else {
        file.set_len(virtual_size + FOOTER_SIZE as u64)
            .map_err(|e| Error::io(path, "setting the length of", e))?;
        Ok(Box::new(FixedWriter {
            file,
            path: path.to_path_buf(),
            footer,
        }))
    }
}

/// The footer of a fresh disk; its timestamp and UUID depend on the request alone.
fn footer(path: &Path, virtual_size: u64, dynamic: bool) -> Footer {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(VHD_EPOCH);
    let timestamp = u32::try_from(epoch.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX);
    let mut h = Sha256::new();
    h.update(b"kiln vhd\0");
    h.update(stable_name(path).as_bytes());
    h.update(b"\0");
    h.update(virtual_size.to_be_bytes());
    h.update([u8::from(dynamic)]);
    let d = h.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&d[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    // Nothing else: a hash of the contents would cost a second pass over the data.
    let (cylinders, heads, sectors) = MAX_GEOMETRY;
    Footer {
        features: 2,
        version: VERSION_1_0,
        data_offset: if dynamic { HEADER_AT } else { NO_OFFSET },
        timestamp,
        creator_app: *b"kiln",
        creator_version: VERSION_1_0,
        creator_os: *b"Wi2k",
        original_size: virtual_size,
        current_size: virtual_size,
        cylinders,
        heads,
        sectors,
        disk_type: if dynamic { TYPE_DYNAMIC } else { TYPE_FIXED },
        uuid,
    }
}

/// The output's file name as the user will see it: `convert` writes `.NAME.kiln-PID.tmp` and
/// renames it at the end, so that wrapper (whose PID changes from run to run) is taken off.
fn stable_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.rsplit_once(".kiln-"))
        .filter(|(_, pid)| pid.bytes().all(|b| b.is_ascii_digit()))
        .map_or(name.clone(), |(n, _)| n.to_string())
}

fn write_all(file: &File, path: &Path, data: &[u8], at: u64) -> Result<()> {
    file.write_all_at(data, at).map_err(|e| {
        Error::io(
            path,
            &format!("writing {} bytes at offset {at}", data.len()),
            e,
        )
    })
}

/// A fixed VHD: guest offsets are file offsets; the footer goes after the data.
struct FixedWriter {
    file: File,
    path: PathBuf,
    footer: Footer,
}

impl DiskWriter for FixedWriter {
    fn block_size(&self) -> u64 {
        WRITE_BLOCK
    }

    fn in_guest_order(&self) -> bool {
        false
    }

    fn allocate(&self, guest_offset: u64, _len: u64) -> Result<u64> {
        Ok(guest_offset)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        write_all(&self.file, &self.path, data, host_offset)
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        let at = self.footer.current_size;
        write_all(&self.file, &self.path, &self.footer.encode(), at)?;
        Ok(Finished { file: self.file })
    }
}

struct DynState {
    /// BAT entries (sector of each block's bitmap), `BAT_UNUSED` where unallocated.
    bat: Vec<u32>,
    /// Where the next block's bitmap goes.
    next: u64,
}

/// A dynamic VHD being written.
struct DynamicWriter {
    file: File,
    path: PathBuf,
    footer: Footer,
    header: DynHeader,
    state: Mutex<DynState>,
}

impl DynamicWriter {
    fn create(file: File, path: &Path, footer: Footer) -> Result<DynamicWriter> {
        let entries = footer.current_size.div_ceil(BLOCK_SIZE);
        // At most 2040 GiB / 2 MiB = 1 Mi entries: the table is at most 4 MiB.
        let entries = u32::try_from(entries)
            .map_err(|_| Error::new(Code::Internal, "a VHD BAT over 2^32 entries"))?;
        let header = DynHeader {
            table_offset: BAT_AT,
            max_table_entries: entries,
            block_size: BLOCK_SIZE as u32,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: Vec::new(),
            locators: Vec::new(),
        };
        let next = BAT_AT + (u64::from(entries) * 4).next_multiple_of(SECTOR);
        Ok(DynamicWriter {
            file,
            path: path.to_path_buf(),
            footer,
            header,
            state: Mutex::new(DynState {
                bat: vec![BAT_UNUSED; entries as usize],
                next,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DynState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bad_range(&self, guest: u64, len: u64) -> Error {
        Error::new(
            Code::Internal,
            format!(
                "{}: {len} bytes at guest offset {guest} pass the disk's end or were never allocated",
                self.path.display()
            ),
        )
    }

    fn bitmap_size(&self) -> u64 {
        self.header.bitmap_size()
    }
}

impl DiskWriter for DynamicWriter {
    fn block_size(&self) -> u64 {
        WRITE_BLOCK
    }

    fn in_guest_order(&self) -> bool {
        true
    }

    /// Gives every block the range touches that has no place yet the next one in the file, and
    /// returns the guest offset: `write_at` maps it through the BAT.
    fn allocate(&self, guest_offset: u64, len: u64) -> Result<u64> {
        let end = guest_offset
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.footer.current_size)
            .ok_or_else(|| self.bad_range(guest_offset, len))?;
        let mut s = self.lock();
        for idx in guest_offset / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE) {
            if s.bat[idx as usize] == BAT_UNUSED {
                let sector = u32::try_from(s.next / SECTOR)
                    .map_err(|_| Error::new(Code::Internal, "a VHD block past 2 TiB of file"))?;
                s.bat[idx as usize] = sector;
                s.next += self.bitmap_size() + BLOCK_SIZE;
            }
        }
        Ok(guest_offset)
    }

    fn write_at(&self, host_offset: u64, data: &[u8]) -> Result<()> {
        let mut pos = host_offset;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = (pos / BLOCK_SIZE) as usize;
            let entry = self.lock().bat.get(idx).copied().unwrap_or(BAT_UNUSED);
            if entry == BAT_UNUSED {
                return Err(self.bad_range(pos, rest.len() as u64));
            }
            let in_block = pos % BLOCK_SIZE;
            let n = (BLOCK_SIZE - in_block).min(rest.len() as u64) as usize;
            let at = u64::from(entry) * SECTOR + self.bitmap_size() + in_block;
            write_all(&self.file, &self.path, &rest[..n], at)?;
            pos += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// Host offsets are guest offsets here, so the engine's writeback ranges would be wrong.
    fn writeback_hints(&self) -> bool {
        false
    }

    /// Writes each allocated block's bitmap (every sector present, as qemu writes them), the BAT,
    /// the header, and the footer at both ends.
    fn finish(self: Box<Self>) -> Result<Finished> {
        let s = std::mem::replace(
            &mut *self.lock(),
            DynState {
                bat: Vec::new(),
                next: 0,
            },
        );
        let bitmap = vec![0xffu8; self.bitmap_size() as usize];
        let mut table = vec![0xffu8; (s.bat.len() * 4).next_multiple_of(SECTOR as usize)];
        for (i, &e) in s.bat.iter().enumerate() {
            table[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
            if e != BAT_UNUSED {
                write_all(&self.file, &self.path, &bitmap, u64::from(e) * SECTOR)?;
            }
        }
        write_all(&self.file, &self.path, &table, BAT_AT)?;
        write_all(&self.file, &self.path, &self.header.encode(), HEADER_AT)?;
        let footer = self.footer.encode();
        write_all(&self.file, &self.path, &footer, 0)?;
        write_all(&self.file, &self.path, &footer, s.next)?;
        self.file
            .set_len(s.next + FOOTER_SIZE as u64)
            .map_err(|e| Error::io(&self.path, "setting the length of", e))?;
        Ok(Finished { file: self.file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uuid_ignores_converts_temporary_name() {
        assert_eq!(
            stable_name(Path::new("/d/.out.vhd.kiln-1234.tmp")),
            "out.vhd"
        );
        assert_eq!(stable_name(Path::new("/d/xvdb.vhd")), "xvdb.vhd");
        assert_eq!(stable_name(Path::new(".x.kiln-a.tmp")), ".x.kiln-a.tmp");
        let a = footer(Path::new("/a/.o.vhd.kiln-1.tmp"), 1 << 20, false);
        let b = footer(Path::new("/b/.o.vhd.kiln-2.tmp"), 1 << 20, false);
        assert_eq!(a.uuid, b.uuid);
        assert_ne!(a.uuid, footer(Path::new("/b/p.vhd"), 1 << 20, false).uuid);
    }
}
