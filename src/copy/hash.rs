//! Where output bytes get hashed: the SHA-256 of a finished disk file (and its hex form).

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Code, Error, Result};

/// SHA-256 of a whole file, lowercase hex. Holes found by `SEEK_DATA` are hashed as zeros
/// without reading them.
pub fn hash_file(file: &File, path: &Path) -> Result<String> {
    let size = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    hash_span(file, path, 0, size, WINDOW)
}

/// SHA-256 of bytes `[offset, offset + len)` of a file, lowercase hex (an OVA member); a file that
/// ends before is an error.
pub(crate) fn hash_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<String> {
    let size = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            Error::new(
                Code::IoError,
                format!(
                    "{}: {size} bytes, too short for {len} bytes at offset {offset}",
                    path.display()
                ),
            )
        })?;
    hash_span(file, path, offset, end, WINDOW)
}

/// The most bytes mapped at once.
const WINDOW: u64 = 64 << 20;

/// SHA-256 of bytes `[start, end)` of a file, mapping at most `window` bytes of data at a time and
/// hashing the holes `SEEK_DATA` finds as zeros. A hole is never mapped: on tmpfs, touching one
/// allocates a page, and on a full tmpfs that is SIGBUS instead of an error (a qcow2 output has
/// holes in the tails of its metadata clusters).
fn hash_span(file: &File, path: &Path, start: u64, end: u64, window: u64) -> Result<String> {
    static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
    let mut h = Sha256::new();
    let mut pos = start;
    while pos < end {
        let data_at = next_data(file, pos).unwrap_or(pos).min(end);
        let mut z = data_at - pos;
        while z > 0 {
            let n = z.min(ZEROS.len() as u64);
            h.update(&ZEROS[..n as usize]);
            z -= n;
        }
        pos = data_at;
        if pos >= end {
            break;
        }
        let run_end = next_hole(file, pos).unwrap_or(end).min(end);
        // A hole right here (the file changed between the two seeks) maps as zeros: take the rest.
        let run_end = if run_end > pos { run_end } else { end };
        let n = (run_end - pos).min(window);
        hash_mapped(file, path, &mut h, pos, n)?;
        pos += n;
    }
    Ok(hex(&h.finalize()))
}

/// Hashes `len` bytes of `file` at `pos` through a read-only mapping populated in one call, so the
/// bytes are hashed straight from the page cache without a copy into a buffer. The mapping starts
/// at the page below `pos` (`SEEK_DATA` answers in filesystem blocks, which may be smaller).
fn hash_mapped(file: &File, path: &Path, h: &mut Sha256, pos: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: sysconf only reads its integer argument.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let lead = pos % page;
    let (Ok(off), Ok(n), Ok(skip)) = (
        libc::off_t::try_from(pos - lead),
        usize::try_from(len + lead),
        usize::try_from(lead),
    ) else {
        return Err(Error::new(
            Code::Internal,
            format!("{}: offset {pos} out of range", path.display()),
        ));
    };
    // SAFETY: a fresh read-only shared mapping of `n` bytes of an open descriptor at a page-aligned
    // offset; nothing else is mapped at the address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::io(
            path,
            &format!("mapping {n} bytes at offset {pos} to hash"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the mapping is `n` readable bytes of data inside the file (pos + len <= its size,
    // and no hole: [`hash_span`] maps only what `SEEK_DATA` calls data). The file is kiln's own
    // output in its private staging directory, or an image `verify` reads; a file truncated while
    // it is hashed, or a page the disk fails to read, raises SIGBUS here, not an error.
    let bytes = unsafe { std::slice::from_raw_parts((p as *const u8).add(skip), n - skip) };
    // 1 MiB at a time, as the reads were before: tests stop kiln in the middle of a disk's hash.
    for piece in bytes.chunks(1 << 20) {
        h.update(piece);
        crate::util::testhook::checkpoint("hashing");
    }
    // SAFETY: unmaps exactly the mapping made above, no longer borrowed (`bytes` ends here).
    unsafe { libc::munmap(p, n) };
    Ok(())
}

/// Where the hole after `pos` starts (the file's size when none); None when the filesystem cannot say.
fn next_hole(file: &File, pos: u64) -> Option<u64> {
    crate::format::raw::lseek(file, pos, libc::SEEK_HOLE).ok()
}

/// Where data resumes at or after `pos` (`u64::MAX` when only a hole is left); None when the
/// filesystem cannot say.
fn next_data(file: &File, pos: u64) -> Option<u64> {
    match crate::format::raw::lseek(file, pos, libc::SEEK_DATA) {
        Ok(at) => Some(at),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    /// A new empty file, readable and writable, in a temporary directory kept alive by the caller.
    fn scratch() -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (dir, p, f)
    }

    #[test]
    fn sparse_hash_equals_plain_hash() {
        let (_dir, p, f) = scratch();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(&[9u8; 5000], 3 << 20).unwrap();
        let a = hash_file(&f, &p).unwrap();
        let whole = hex(&Sha256::digest(std::fs::read(&p).unwrap()));
        assert_eq!(a, whole);
        let mut whole = vec![0u8; 10 << 20];
        whole[3 << 20..(3 << 20) + 5000].fill(9);
        let range = &whole[(3 << 20) - 7..(5 << 20) + 3];
        assert_eq!(
            hash_range(&f, &p, (3 << 20) - 7, range.len() as u64).unwrap(),
            hex(&Sha256::digest(range))
        );
        assert!(hash_range(&f, &p, 10 << 20, 1).is_err());
        // sha256 of the empty string, a fixed point every implementation agrees on.
        let e = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            hash_file(e.as_file(), e.path()).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Windows smaller than the data runs, data that starts and ends off page boundaries, and
    /// windows (5000 bytes) that leave the next one starting off a page boundary:
    /// the mapped hash equals the hash of the bytes read whole.
    #[test]
    fn windows_and_unaligned_runs_hash_like_a_plain_read() {
        let (_dir, p, f) = scratch();
        f.set_len((1 << 20) + 12345).unwrap();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&data, 4096 * 3 + 100).unwrap();
        f.write_all_at(&data[..5000], (1 << 20) + 7000).unwrap();
        let whole = hex(&Sha256::digest(std::fs::read(&p).unwrap()));
        let size = f.metadata().unwrap().len();
        for window in [4096, 5000, 3 * 4096, 64 << 20] {
            assert_eq!(hash_span(&f, &p, 0, size, window).unwrap(), whole);
        }
    }
}
