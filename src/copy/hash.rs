//! Where output bytes get hashed: the SHA-256 of a finished disk file (and its hex form).

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Code, Error, Result};

/// SHA-256 of a whole file, lowercase hex. With `sparse`, holes found by `SEEK_DATA` are hashed as
/// zeros without reading them.
pub fn hash_file(file: &File, path: &Path, sparse: bool) -> Result<String> {
    const BUF: usize = 1 << 20;
    static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
    let size = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < size {
        let data_at = if sparse {
            next_data(file, pos).unwrap_or(pos).min(size)
        } else {
            pos
        };
        let mut z = data_at - pos;
        while z > 0 {
            let n = z.min(ZEROS.len() as u64);
            h.update(&ZEROS[..n as usize]);
            z -= n;
        }
        pos = data_at;
        if pos >= size {
            break;
        }
        let n = (size - pos).min(BUF as u64);
        update(&mut h, &mut buf, file, path, pos, n)?;
        pos += n;
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of bytes `[offset, offset + len)` of a file, lowercase hex (an OVA member).
pub(crate) fn hash_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (1u64 << 20).min(len) as usize];
    update(&mut h, &mut buf, file, path, offset, len)?;
    Ok(hex(&h.finalize()))
}

/// Feeds bytes `[offset, offset + len)` of the file to `h`, a buffer at a time; a file that ends
/// before is an error.
fn update(
    h: &mut Sha256,
    buf: &mut [u8],
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let at = offset + done;
        let got = crate::format::read_full_at(file, &mut buf[..n], at)
            .map_err(|e| Error::io(path, &format!("reading at offset {at} to hash"), e))?;
        if got < n {
            return Err(Error::new(
                Code::IoError,
                format!(
                    "{}: shrank to {} bytes while being hashed",
                    path.display(),
                    at + got as u64
                ),
            ));
        }
        h.update(&buf[..n]);
        done += n as u64;
        crate::util::testhook::checkpoint("hashing");
    }
    Ok(())
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

    #[test]
    fn sparse_hash_equals_plain_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(&[9u8; 5000], 3 << 20).unwrap();
        let a = hash_file(&f, &p, true).unwrap();
        let b = hash_file(&f, &p, false).unwrap();
        assert_eq!(a, b);
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
            hash_file(e.as_file(), e.path(), true).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
