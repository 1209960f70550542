//! The EFI System Partition: which removable-media loaders (`\EFI\BOOT\BOOT*.EFI`) its FAT
//! filesystem holds, read with `fatfs` through a read-only [`PartReader`].

use std::io::Read;
use std::sync::Arc;

use crate::format::BlockSource;

use super::fs::PartReader;

/// Directory entries kiln looks at in one FAT directory (a damaged one may seem endless).
pub(crate) const MAX_DIR_ENTRIES: usize = 4096;

/// The removable-media loader names and the architecture each boots.
pub(crate) const LOADERS: &[(&str, &str)] = &[
    ("BOOTX64.EFI", "x86_64"),
    ("BOOTAA64.EFI", "arm64"),
    ("BOOTIA32.EFI", "i386"),
];

/// A loader found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loader {
    /// `\EFI\BOOT\BOOTX64.EFI`, in the canonical spelling whatever the case on disk.
    pub(crate) path: String,
    /// The architecture its name implies.
    pub(crate) arch: &'static str,
    pub(crate) size: u64,
    /// The PE header's machine, when the file starts with a PE image (0x8664 x86_64, 0xAA64 arm64,
    /// 0x014C i386).
    pub(crate) pe_machine: Option<u16>,
}

/// The architecture a PE machine field names.
pub(crate) fn pe_arch(machine: u16) -> Option<&'static str> {
    match machine {
        0x8664 => Some("x86_64"),
        0xAA64 => Some("arm64"),
        0x014C => Some("i386"),
        _ => None,
    }
}

/// The loaders in `\EFI\BOOT` of the FAT filesystem at bytes `start..start + len` of `src`. The
/// error says why the filesystem could not be read.
pub(crate) fn loaders(
    src: Arc<dyn BlockSource>,
    start: u64,
    len: u64,
) -> Result<Vec<Loader>, String> {
    let disk = PartReader::new(src, start, len);
    let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new())
        .map_err(|e| format!("not a readable FAT filesystem: {e}"))?;
    let root = fs.root_dir();
    let Some(efi) = find(&root, "EFI", true)? else {
        return Ok(Vec::new());
    };
    let efi = efi.to_dir();
    let Some(boot) = find(&efi, "BOOT", true)? else {
        return Ok(Vec::new());
    };
    let boot = boot.to_dir();
    let mut out = Vec::new();
    for (name, arch) in LOADERS {
        if let Some(e) = find(&boot, name, false)? {
            let mut head = [0u8; 512];
            let mut f = e.to_file();
            let n = read_up_to(&mut f, &mut head).unwrap_or(0);
            out.push(Loader {
                path: format!("\\EFI\\BOOT\\{name}"),
                arch,
                size: e.len(),
                pe_machine: pe_machine(&head[..n]),
            });
        }
    }
    Ok(out)
}

type Dir<'a> = fatfs::Dir<'a, PartReader>;
type DirEntry<'a> = fatfs::DirEntry<'a, PartReader>;

/// The entry called `name` (ignoring case) in `dir`, a directory when `want_dir`, a file otherwise.
fn find<'a>(dir: &Dir<'a>, name: &str, want_dir: bool) -> Result<Option<DirEntry<'a>>, String> {
    for e in dir.iter().take(MAX_DIR_ENTRIES) {
        let e = e.map_err(|e| format!("reading a directory: {e}"))?;
        if e.file_name().eq_ignore_ascii_case(name) && e.is_dir() == want_dir {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The machine field of a PE image whose headers are in `head` (`MZ`, then `PE\0\0` at e_lfanew).
pub(crate) fn pe_machine(head: &[u8]) -> Option<u16> {
    if head.len() < 0x40 || &head[..2] != b"MZ" {
        return None;
    }
    let pe = u32::from_le_bytes([head[0x3C], head[0x3D], head[0x3E], head[0x3F]]) as usize;
    let sig = head.get(pe..pe.checked_add(6)?)?;
    if &sig[..4] != b"PE\0\0" {
        return None;
    }
    Some(u16::from_le_bytes([sig[4], sig[5]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_headers() {
        let mut h = vec![0u8; 512];
        assert_eq!(pe_machine(&h), None);
        h[..2].copy_from_slice(b"MZ");
        h[0x3C] = 0x80;
        h[0x80..0x84].copy_from_slice(b"PE\0\0");
        h[0x84..0x86].copy_from_slice(&0xAA64u16.to_le_bytes());
        assert_eq!(pe_machine(&h), Some(0xAA64));
        assert_eq!(pe_arch(0xAA64), Some("arm64"));
        // e_lfanew past the buffer, or overflowing.
        h[0x3C..0x40].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(pe_machine(&h), None);
        assert_eq!(pe_machine(&h[..10]), None);
    }
}
