//! QEMU's image locking, read and honoured. QEMU (`block/file-posix.c`) takes open-file-description
//! (OFD) locks on every image it opens: for each permission it holds, a shared lock on byte
//! `100 + bit`; for each permission it refuses to share, a shared lock on byte `200 + bit`. The bits
//! are consistent-read (0), write (1), write-unchanged (2), resize (3), graph-mod (4, no longer
//! locked). So a process with the image open for writing holds byte 101, and one that must not see
//! the image change under it holds byte 201.
//!
//! kiln asks whether a writer holds byte 101 ([`writer_holding`]) and, while copying, holds bytes 100
//! and 201 itself ([`SourceLock`]) so that a VM started meanwhile fails to get its write lock instead
//! of changing the disk under the copy. Sources stay open read-only: OFD read locks and `F_OFD_GETLK`
//! work on `O_RDONLY` descriptors.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Code, Error, Result};
use crate::format::{open_read_only, ChainEntry};

/// QEMU's lock byte for holding "consistent read" (`BLK_PERM_CONSISTENT_READ`, bit 0).
pub(crate) const PERM_CONSISTENT_READ_BYTE: i64 = 100;
/// QEMU's lock byte for holding "write" (`BLK_PERM_WRITE`, bit 1).
pub(crate) const PERM_WRITE_BYTE: i64 = 101;
/// QEMU's lock byte for refusing to share "consistent read" with others.
pub(crate) const SHARED_CONSISTENT_READ_BYTE: i64 = 200;
/// QEMU's lock byte for refusing to share "write" with others.
pub(crate) const SHARED_WRITE_BYTE: i64 = 201;

/// Most `/proc` entries looked at when finding a lock's holder (bounds the scan on busy hosts).
const MAX_PROC_ENTRIES: usize = 1 << 20;
/// Longest command line reported for a holder.
const MAX_COMMAND_LEN: usize = 256;

/// A process holding an image open for writing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Its process ID, when kiln could find it: the lock says who only for POSIX locks, so for
    /// QEMU's OFD locks kiln looks for a process with the file open (best effort: processes of
    /// other users are invisible without privileges).
    #[serde(rename = "pid", skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its command line (or `comm` when the command line is unreadable).
    #[serde(rename = "command", skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(cmd)) => write!(f, "process {pid} ({cmd})"),
            (Some(pid), None) => write!(f, "process {pid}"),
            _ => f.write_str(
                "a process kiln cannot see (no process it may inspect has the file open; try as root, or `lslocks`)",
            ),
        }
    }
}

fn flock(l_type: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct of integers (and padding on some targets); all-zero
    // bytes are a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Whose lock conflicts with `l_type` on byte `start`: `None` when nobody's, `Some(l_pid)` otherwise
/// (`-1` for OFD locks).
fn test_lock(file: &File, start: i64, l_type: libc::c_int) -> io::Result<Option<i32>> {
    let mut fl = flock(l_type, start);
    // SAFETY: `fd` is a valid open descriptor owned by `file` for the duration of the call, and `fl`
    // is a properly initialised `struct flock` that F_OFD_GETLK reads and overwrites in place.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        Ok(None)
    } else {
        Ok(Some(fl.l_pid))
    }
}

/// Who holds `path` (opened as `file`) open for writing, by QEMU's write lock (byte 101): `None` when
/// nobody does. A holder whose process cannot be identified is `Some` with `pid: None`.
pub fn writer_holding(file: &File, path: &Path) -> Result<Option<Holder>> {
    let pid = match test_lock(file, PERM_WRITE_BYTE, libc::F_WRLCK) {
        Ok(None) => return Ok(None),
        Ok(Some(pid)) => pid,
        // Filesystems without OFD locks (some network filesystems): nothing to learn.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOLCK)) => {
            return Ok(None)
        }
        Err(e) => {
            return Err(Error::io(
                path,
                "testing QEMU's write lock (byte 101) on",
                e,
            ))
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?;
    let pid = u32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .or_else(|| pid_from_proc_locks(meta.dev(), meta.ino()))
        .or_else(|| pid_with_file_open(meta.dev(), meta.ino()));
    Ok(Some(Holder {
        pid,
        command: pid.and_then(command_of),
    }))
}

/// The pid `/proc/locks` shows for a lock covering byte 101 of (dev, ino), when it shows one (OFD
/// locks show -1 on most kernels).
fn pid_from_proc_locks(dev: u64, ino: u64) -> Option<u32> {
    let text = fs::read_to_string("/proc/locks").ok()?;
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines()
        .take(MAX_PROC_ENTRIES)
        .filter_map(parse_lock_line)
        .find(|l| {
            l.id == want && l.start <= PERM_WRITE_BYTE as u64 && PERM_WRITE_BYTE as u64 <= l.end
        })
        .and_then(|l| u32::try_from(l.pid).ok().filter(|p| *p > 0))
}

#[derive(Debug, PartialEq, Eq)]
struct LockLine {
    pid: i64,
    id: String,
    start: u64,
    end: u64,
}

/// `1: OFDLCK ADVISORY  READ -1 fe:00:10010766 100 101` (waiters, marked `->`, are skipped).
fn parse_lock_line(line: &str) -> Option<LockLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 8 || f[1] == "->" {
        return None;
    }
    Some(LockLine {
        pid: f[4].parse().ok()?,
        id: f[5].to_string(),
        start: f[6].parse().ok()?,
        end: if f[7] == "EOF" {
            u64::MAX
        } else {
            f[7].parse().ok()?
        },
    })
}

/// A process with (dev, ino) open for writing, else one (not this one) with it open at all. Best
/// effort: only processes whose `/proc/PID/fd` this user may read are seen.
fn pid_with_file_open(dev: u64, ino: u64) -> Option<u32> {
    let me = std::process::id();
    let mut seen = 0usize;
    let mut reader = None;
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            seen += 1;
            if seen > MAX_PROC_ENTRIES {
                return reader;
            }
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            if m.dev() != dev || m.ino() != ino {
                continue;
            }
            if opened_for_writing(pid, &fd.file_name().to_string_lossy()) {
                return Some(pid);
            }
            if pid != me {
                reader.get_or_insert(pid);
            }
        }
    }
    reader
}

/// `flags:` in `/proc/PID/fdinfo/FD` is octal; the access mode is its low two bits.
fn opened_for_writing(pid: u32, fd: &str) -> bool {
    let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| i64::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|f| f & libc::O_ACCMODE as i64 != libc::O_RDONLY as i64)
}

fn command_of(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.is_empty() {
        cmd = fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_string();
    }
    if cmd.chars().count() > MAX_COMMAND_LEN {
        cmd = cmd.chars().take(MAX_COMMAND_LEN).collect::<String>() + "...";
    }
    Some(cmd).filter(|c| !c.is_empty())
}

/// Checks each file for a writer. `code` is `IncorrectInstanceStatus` for an instance's disks and
/// `SnapshotNotReady` for snapshots. With `allow_running` a writer is a warning (returned) instead
/// of an error.
pub fn check_not_written<P: AsRef<Path>>(
    paths: &[P],
    code: Code,
    allow_running: bool,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for path in paths {
        let path = path.as_ref();
        // An object in a bucket has no local writer to find (its ETag is checked instead).
        if crate::remote::s3::is_remote(path) {
            continue;
        }
        let file = open_read_only(path)?;
        let Some(holder) = writer_holding(&file, path)? else {
            continue;
        };
        if allow_running {
            warnings.push(format!(
                "{} is open for writing by {holder}; copying anyway (--allow-running): the image may be inconsistent",
                path.display()
            ));
        } else {
            let what = match code {
                Code::IncorrectInstanceStatus => "the instance looks running: shut it down",
                _ => "wait until it is closed",
            };
            return Err(Error::new(
                code,
                format!(
                    "{} is open for writing by {holder}; {what}, or pass --allow-running to copy it anyway (the copy may be inconsistent)",
                    path.display()
                ),
            ));
        }
    }
    Ok(warnings)
}

/// QEMU-compatible locks kiln holds on a source while copying it: a shared lock on byte 100 (kiln
/// reads it, consistently) and on byte 201 (kiln refuses to share write), so QEMU refuses to open the
/// image for writing until the lock is dropped. Dropping it closes the descriptor, which releases the
/// locks.
#[derive(Debug)]
pub struct SourceLock {
    file: File,
}

impl SourceLock {
    /// Opens `path` read-only and locks it.
    pub fn acquire(path: &Path) -> Result<SourceLock> {
        SourceLock::on_file(open_read_only(path)?, path)
    }

    /// Locks an already open descriptor (its own open file description: the locks go when it closes).
    pub(crate) fn on_file(file: File, path: &Path) -> Result<SourceLock> {
        // QEMU refuses to open an image whose consistent-read sharing someone refused (byte 200):
        // its contents are in flux (e.g. a block job is rewriting it).
        match test_lock(&file, SHARED_CONSISTENT_READ_BYTE, libc::F_WRLCK) {
            Ok(Some(_)) => {
                return Err(Error::new(
                    Code::SnapshotNotReady,
                    format!(
                        "{}: another process refuses to let it be read consistently (QEMU lock byte 200); wait until it is done",
                        path.display()
                    ),
                ))
            }
            Ok(None) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOLCK)) => {
                return Ok(SourceLock { file })
            }
            Err(e) => return Err(Error::io(path, "testing QEMU's lock bytes on", e)),
        }
        for byte in [PERM_CONSISTENT_READ_BYTE, SHARED_WRITE_BYTE] {
            let fl = flock(libc::F_RDLCK, byte);
            // SAFETY: `fd` is a valid descriptor owned by `file`; `fl` is an initialised `struct flock`
            // that F_OFD_SETLK only reads.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EACCES) => Error::new(
                        Code::SnapshotNotReady,
                        format!(
                            "{}: another process holds an exclusive lock on QEMU's lock byte {byte}; wait until it is closed",
                            path.display()
                        ),
                    ),
                    _ => Error::io(path, &format!("locking byte {byte} of"), e),
                });
            }
        }
        Ok(SourceLock { file })
    }

    /// The locked descriptor (read-only); usable for reading too.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Locks every file of a source's backing chain, as QEMU does for an image and its backing files.
/// Objects in a bucket are not locked (no one can lock them; their ETags are checked instead).
pub fn lock_chain(chain: &[ChainEntry]) -> Result<Vec<SourceLock>> {
    chain
        .iter()
        .filter(|c| !crate::remote::s3::is_remote(&c.path))
        .map(|c| SourceLock::acquire(&c.path))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_parse() {
        assert_eq!(
            parse_lock_line("4: OFDLCK ADVISORY  READ -1 fe:00:10010766 100 101"),
            Some(LockLine {
                pid: -1,
                id: "fe:00:10010766".into(),
                start: 100,
                end: 101
            })
        );
        let l = parse_lock_line("1: POSIX  ADVISORY  WRITE 812 00:2b:1234 0 EOF").unwrap();
        assert_eq!((l.pid, l.end), (812, u64::MAX));
        assert_eq!(
            parse_lock_line("1: -> POSIX  ADVISORY  WRITE 812 00:2b:1234 0 EOF"),
            None
        );
        assert_eq!(parse_lock_line("garbage"), None);
    }

    #[test]
    fn own_locks_are_seen_from_another_descriptor_and_go_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        let probe = File::open(&p).unwrap();
        assert_eq!(writer_holding(&probe, &p).unwrap(), None);
        let lock = SourceLock::acquire(&p).unwrap();
        // kiln's locks are shared: they do not look like a writer...
        assert_eq!(writer_holding(&probe, &p).unwrap(), None);
        // ...but refuse a write-lock on byte 201, which is how QEMU asks for write.
        assert!(test_lock(&probe, SHARED_WRITE_BYTE, libc::F_WRLCK)
            .unwrap()
            .is_some());
        assert!(test_lock(&probe, PERM_CONSISTENT_READ_BYTE, libc::F_WRLCK)
            .unwrap()
            .is_some());
        // Two kiln locks share.
        let second = SourceLock::acquire(&p).unwrap();
        drop(lock);
        drop(second);
        assert_eq!(
            test_lock(&probe, SHARED_WRITE_BYTE, libc::F_WRLCK).unwrap(),
            None
        );
    }

    #[test]
    fn a_qemu_style_writer_is_found_with_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        // What QEMU does when it opens an image for writing: O_RDWR, shared locks on 100 and 101.
        let writer = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        for byte in [PERM_CONSISTENT_READ_BYTE, PERM_WRITE_BYTE] {
            let fl = flock(libc::F_RDLCK, byte);
            // SAFETY: valid descriptor, initialised flock.
            let r = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            assert_eq!(r, 0);
        }
        let probe = File::open(&p).unwrap();
        let h = writer_holding(&probe, &p).unwrap().expect("a writer");
        assert_eq!(h.pid, Some(std::process::id()));
        assert!(h.command.is_some());
        let e = check_not_written(&[&p], Code::SnapshotNotReady, false).unwrap_err();
        assert_eq!(e.code(), Code::SnapshotNotReady);
        assert!(e.message().contains(&std::process::id().to_string()), "{e}");
        let w = check_not_written(&[&p], Code::IncorrectInstanceStatus, true).unwrap();
        assert!(w[0].contains("--allow-running"));
        drop(writer);
        assert_eq!(writer_holding(&probe, &p).unwrap(), None);
        assert!(check_not_written(&[&p], Code::SnapshotNotReady, false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn holder_messages() {
        let h = Holder {
            pid: Some(7),
            command: Some("qemu-system-x86_64 -name web1".into()),
        };
        assert_eq!(h.to_string(), "process 7 (qemu-system-x86_64 -name web1)");
        assert!(Holder {
            pid: None,
            command: None
        }
        .to_string()
        .contains("cannot see"));
    }
}
