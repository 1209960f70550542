//! Passphrases. A key never comes from argv: it is read from a file (`--key-file`, `key-file=`), an
//! inherited descriptor (`--key-fd`) or an environment variable (`--key-env`). Its bytes are the
//! passphrase exactly as qemu's `--object secret,file=` reads them: nothing is trimmed, so a
//! trailing newline is part of it.
//!
//! A [`Secret`] is zeroed when its last clone is dropped, prints as `Secret(..)`, and, once one is
//! loaded, the process stops being dumpable (no core dump, no ptrace by other users).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::error::{Code, Error, Result};

/// Longest passphrase read (qemu's secrets are small too; a key file this large is a mistake).
pub(crate) const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// A passphrase, zeroed on drop. Clones share one copy.
#[derive(Clone)]
pub(crate) struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// A secret holding `bytes` (refused when empty).
    pub(crate) fn new(bytes: Zeroizing<Vec<u8>>, from: &str) -> Result<Secret> {
        if bytes.is_empty() {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("{from} is empty: a key needs at least one byte"),
            ));
        }
        protect_process();
        Ok(Secret(Arc::new(bytes)))
    }

    /// The passphrase's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Reads a key file's bytes exactly (no trimming).
    pub(crate) fn from_file(path: &Path) -> Result<Secret> {
        let f = File::open(path).map_err(|e| Error::io(path, "opening the key file", e))?;
        let from = format!("key file {}", path.display());
        read_bounded(f, &from).and_then(|b| Secret::new(b, &from))
    }

    /// Reads descriptor `fd` (inherited from the caller) to its end.
    pub(crate) fn from_fd(fd: i32) -> Result<Secret> {
        if fd < 0
            || nix::fcntl::fcntl(
                // SAFETY: the descriptor is only inspected here; fcntl(F_GETFD) on a closed or
                // invalid number fails with EBADF and touches nothing.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::fcntl::FcntlArg::F_GETFD,
            )
            .is_err()
        {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("--key-fd {fd}: no such open file descriptor"),
            ));
        }
        // SAFETY: `fd` is open (checked above) and was handed to kiln for this one read; the File
        // takes it over and closes it when done, and nothing else in kiln uses that number.
        let f = unsafe { File::from_raw_fd(fd) };
        let from = format!("key descriptor {fd}");
        read_bounded(f, &from).and_then(|b| Secret::new(b, &from))
    }

    /// The value of environment variable `name`, as bytes.
    pub(crate) fn from_env(name: &str) -> Result<Secret> {
        use std::os::unix::ffi::OsStringExt;
        let v = std::env::var_os(name).ok_or_else(|| {
            Error::new(
                Code::InvalidParameter,
                format!("--key-env {name}: the environment variable is not set"),
            )
        })?;
        Secret::new(
            Zeroizing::new(v.into_vec()),
            &format!("environment variable {name}"),
        )
    }
}

fn read_bounded(f: File, from: &str) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    f.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::new(Code::IoError, format!("reading {from}: {e}")))?;
    if buf.len() as u64 > MAX_SECRET_BYTES {
        return Err(Error::new(
            Code::InvalidParameter,
            format!("{from} is over {MAX_SECRET_BYTES} bytes; a key file holds a passphrase"),
        ));
    }
    Ok(buf)
}

/// Keeps key material out of core dumps: the process is made non-dumpable while it holds a key
/// (and stays so; kiln exits when its command is done).
fn protect_process() {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and changes only this process's flag.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_read_exactly_with_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"pass\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().bytes(), b"pass\n");
        assert_eq!(
            format!("{:?}", Secret::from_file(&p).unwrap()),
            "Secret(..)"
        );
        std::fs::write(&p, b"").unwrap();
        let e = Secret::from_file(&p).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        std::fs::write(&p, vec![b'x'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert!(Secret::from_file(&p)
            .unwrap_err()
            .message()
            .contains("over"));
    }

    #[test]
    fn a_closed_descriptor_is_refused() {
        let e = Secret::from_fd(987_654).unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
    }
}
