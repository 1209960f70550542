//! Raw sources: the guest disk is the file. Holes come from `SEEK_DATA`/`SEEK_HOLE`, so a sparse
//! file costs what its data costs, not its length.

use crate::format::input::{Input, RandomRead};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::WriteDriver;
use super::{BlockSource, Driver, Extent, ExtentKind, Format, Opened, ReadDriver};
use crate::error::{Code, Error, Result};

pub(crate) mod writer;

/// raw's registry entry: probed last, it takes any file.
pub(crate) const DRIVER: Driver = Driver {
    name: "raw",
    extension: "raw",
    read: Some(ReadDriver {
        format: Format::Raw,
        probe: |_| true,
        open,
        open_layer: |file, path, chain, _gate| {
            chain.note(path, Format::Raw)?;
            Ok(Box::new(RawSource::new(file, path)?))
        },
    }),
    write: Some(WriteDriver {
        options: &[],
        create: writer::create,
        disk_size: |size| size,
        compresses: false,
    }),
};

/// Opens a raw source; a raw file has no internal snapshots and no backing file.
pub(crate) fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    _gate: &super::gate::BackingGate,
) -> Result<Opened> {
    super::no_snapshot(path, snapshot, "a raw file")?;
    let src = RawSource::new(file, path)?;
    let size = src.virtual_size();
    Ok(Opened::single(Box::new(src), path, Format::Raw, size))
}

pub(crate) struct RawSource {
    file: Input,
    path: PathBuf,
    size: u64,
    /// False when the filesystem does not answer `SEEK_DATA` (then everything is data).
    seek_data: bool,
}

impl RawSource {
    pub(crate) fn new(file: Input, path: &Path) -> Result<Self> {
        let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
        // ENXIO at offset 0 means "no data at all": SEEK_DATA works, the file is one hole. An
        // object in a bucket has no holes to find: all of it is data.
        let seek_data = file.as_file().is_some_and(|f| {
            size == 0
                || match lseek(f, 0, libc::SEEK_DATA) {
                    Ok(_) => true,
                    Err(e) => e.raw_os_error() == Some(libc::ENXIO),
                }
        });
        Ok(RawSource {
            file,
            path: path.to_path_buf(),
            size,
            seek_data,
        })
    }
}

/// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE` (or any `whence`): the one wrapper kiln has.
pub(crate) fn lseek(file: &std::fs::File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a valid, owned file descriptor has no memory-safety requirements; the file
    // offset it moves is never used by kiln, which reads only with pread.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

impl BlockSource for RawSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let limit = crate::format::extent_limit(&self.path, self.size, offset, max_len)?;
        let Some(file) = self.file.as_file().filter(|_| self.seek_data) else {
            return Ok(Extent {
                start: offset,
                len: limit - offset,
                kind: ExtentKind::Data,
            });
        };
        let data = match lseek(file, offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // ENXIO: no data at or after offset: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.size,
            Err(e) => {
                return Err(Error::io(
                    &self.path,
                    &format!("SEEK_DATA at offset {offset}"),
                    e,
                ))
            }
        };
        if data > offset {
            return Ok(Extent {
                start: offset,
                len: data.min(limit) - offset,
                kind: ExtentKind::Unallocated,
            });
        }
        let hole = match lseek(file, offset, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.size,
            Err(e) => {
                return Err(Error::io(
                    &self.path,
                    &format!("SEEK_HOLE at offset {offset}"),
                    e,
                ))
            }
        };
        let end = hole.min(limit).max(offset + 1).min(limit);
        Ok(Extent {
            start: offset,
            len: end - offset,
            kind: ExtentKind::Data,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = super::read_full_at(&self.file, buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                &format!("reading {} bytes at offset {offset}", buf.len()),
                e,
            )
        })?;
        if n < buf.len() {
            return Err(Error::new(
                Code::SourceChanged,
                format!(
                    "{}: file ended at offset {} while reading at {offset}; it shrank while being copied",
                    self.path.display(),
                    offset + n as u64
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn holes_and_data_alternate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
        drop(f);
        let src = RawSource::new(std::sync::Arc::new(File::open(&p).unwrap()), &p).unwrap();
        assert_eq!(src.virtual_size(), 8 << 20);
        let e = src.extent(0, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Unallocated);
        assert_eq!(e.end(), 4 << 20);
        let e = src.extent(4 << 20, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
        assert_eq!(e.end(), 5 << 20);
        let e = src.extent(5 << 20, 1 << 20).unwrap();
        assert_eq!(
            e,
            Extent {
                start: 5 << 20,
                len: 1 << 20,
                kind: ExtentKind::Unallocated
            }
        );
        let mut buf = vec![0u8; 4096];
        src.read_at((5 << 20) - 2048, &mut buf).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 7) && buf[2048..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_file_without_data_is_one_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.raw");
        File::create(&p).unwrap().set_len(1 << 30).unwrap();
        let src = RawSource::new(std::sync::Arc::new(File::open(&p).unwrap()), &p).unwrap();
        let e = src.extent(0, u64::MAX).unwrap();
        assert_eq!(
            e,
            Extent {
                start: 0,
                len: 1 << 30,
                kind: ExtentKind::Unallocated
            }
        );
    }
}
