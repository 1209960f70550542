//! Opening files kiln did not create itself (store records, image files, checksum lists) without
//! following a symlink someone planted there, and without blocking on a FIFO or reading a device.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Code, Error, Result};

/// Opens `path` read-only with `O_NOFOLLOW` (a symlink as the last component fails with ELOOP) and
/// `O_NONBLOCK` (a FIFO does not block), then requires a regular file (else `InvalidInput`).
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// The whole of a regular file, opened as [`open_regular`] does.
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Refuses `path` when it is a symlink (or anything but a directory); a missing path is fine.
pub(crate) fn check_real_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => Err(Error::new(
            Code::UnsafePath,
            format!(
                "{} is a symlink; kiln does not follow symlinks inside its store. Remove it",
                path.display()
            ),
        )),
        Ok(_) => Err(Error::new(
            Code::UnsafePath,
            format!("{} is not a directory; remove it", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, "checking", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_fifos_and_devices_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"ok").unwrap();
        assert_eq!(read_regular(&f).unwrap(), b"ok");
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(read_regular(&l).is_err());
        let p = d.path().join("p");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_regular(&p).is_err());
        assert!(read_regular(Path::new("/dev/zero")).is_err());
        assert!(check_real_dir(d.path()).is_ok());
        assert!(check_real_dir(&d.path().join("none")).is_ok());
        let ld = d.path().join("ld");
        std::os::unix::fs::symlink(d.path(), &ld).unwrap();
        assert_eq!(check_real_dir(&ld).unwrap_err().code(), Code::UnsafePath);
        assert_eq!(check_real_dir(&f).unwrap_err().code(), Code::UnsafePath);
    }
}
