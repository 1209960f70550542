//! What a reader reads from: a local file or an object in a bucket. Every format reader takes an
//! [`Input`] and reads it only by offset ([`RandomRead::read_at`]), so the same reader serves a
//! file (`pread`) and an `s3://` object (ranged GETs, see [`crate::remote::s3`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

/// Bytes read by offset from something of a fixed length. Shared by every copy thread.
pub trait RandomRead: Send + Sync {
    /// Reads into `buf` at `offset`; returns the bytes read, fewer than asked only at the end
    /// (0 at or past it), like `pread`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether it is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The local file underneath, for what only a file has (holes found with `SEEK_DATA`).
    fn as_file(&self) -> Option<&File> {
        None
    }
}

impl std::fmt::Debug for dyn RandomRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.as_file().is_some() {
            "file"
        } else {
            "object"
        })
    }
}

/// An opened source file or object, shared by the layers and threads that read it.
pub type Input = Arc<dyn RandomRead>;

impl RandomRead for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    /// Seeking to the end also sizes block devices, whose metadata says 0.
    fn len(&self) -> io::Result<u64> {
        crate::format::raw::lseek(self, 0, libc::SEEK_END)
    }

    fn as_file(&self) -> Option<&File> {
        Some(self)
    }
}

impl<T: RandomRead + ?Sized> RandomRead for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn as_file(&self) -> Option<&File> {
        (**self).as_file()
    }
}

/// Opens a user-named source read-only: `s3://BUCKET/KEY` in a bucket, a local file otherwise.
pub(crate) fn open(path: &Path) -> Result<Input> {
    match crate::remote::s3::S3Url::from_path(path)? {
        Some(url) => Ok(Arc::new(crate::remote::s3::Object::open(&url)?)),
        None => Ok(Arc::new(super::open_read_only(path)?)),
    }
}
