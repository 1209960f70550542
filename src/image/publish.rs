//! Making an image visible atomically: it is built in a hidden staging directory beside the target,
//! every file fsynced, then renamed into place. A failed or killed create leaves at most a hidden
//! `.kiln-*.tmp` directory, never something that looks finished. With `-t unsafe`
//! ([`Staging::without_flush`]) nothing is fsynced, but the image still appears by the one rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Code, Error, Result};

/// A staging directory; removed on drop unless committed. Its creator holds an flock on it, so a
/// later create can tell a dead creator's leftovers from a live one's work.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
    /// Fsync files and directories (false only for `-t unsafe`).
    flush: bool,
    _lock: Flock<File>,
}

impl Staging {
    /// Checks that `target` does not exist or is an empty directory, and creates the staging
    /// directory beside it.
    pub(crate) fn new(target: &Path) -> Result<Staging> {
        check_target(target)?;
        let parent = parent_of(target);
        let base = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let tag = &crate::image::manifest::new_image_id()[2..10];
        sweep_stale(&parent);
        let dir = parent.join(format!(".kiln-{base}-{}-{tag}.tmp", std::process::id()));
        fs::create_dir(&dir).map_err(|e| Error::io(&dir, "creating the staging directory", e))?;
        let lock = File::open(&dir)
            .map_err(|e| Error::io(&dir, "opening the staging directory", e))
            .and_then(|f| {
                Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                    Error::io(&dir, "locking the staging directory", io::Error::from(e))
                })
            });
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Staging {
            dir,
            target: target.to_path_buf(),
            committed: false,
            flush: true,
            _lock: lock,
        })
    }

    /// A staging that never fsyncs (`-t unsafe`): the image still appears by one rename once
    /// complete, but a power loss soon after may lose or tear it.
    pub(crate) fn without_flush(mut self) -> Staging {
        self.flush = false;
        self
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `name` in the staging directory (new file, fsynced unless `without_flush`).
    pub(crate) fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Error::io(&path, "creating", e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io(&path, "writing", e))?;
        if self.flush {
            f.sync_all()
                .map_err(|e| Error::io(&path, "flushing (fsync)", e))?;
        }
        Ok(())
    }

    /// Renames the staging directory to the target and makes the rename durable.
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        if self.flush {
            sync_dir(&self.dir)?;
        }
        // rename(2) replaces an empty directory atomically and fails on a non-empty one.
        fs::rename(&self.dir, &self.target).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) | Some(libc::ENOTDIR) => Error::new(
                Code::InvalidOutputDir,
                format!(
                    "{} was filled by someone else while the image was being built; nothing was published",
                    self.target.display()
                ),
            ),
            _ => Error::io(&self.target, "renaming the finished image into place", e),
        })?;
        self.committed = true;
        if self.flush {
            sync_dir(&parent_of(&self.target))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes staging directories in `parent` left by creates that died (killed, crashed, power loss):
/// those whose creating process is gone and whose flock is free. Best effort: a leftover that
/// cannot be removed stays hidden, and never looks like a finished image.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = staging_pid(name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        // Only a real directory, never through a symlink.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        if let Ok(held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            let _ = fs::remove_dir_all(&path);
            drop(held);
        }
    }
}

/// The pid in a staging directory's name, `.kiln-<base>-<pid>-<tag>.tmp`.
fn staging_pid(name: &str) -> Option<u32> {
    let inner = name.strip_prefix(".kiln-")?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '-');
    let _tag = parts.next()?;
    parts.next()?.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `--output-dir` must not exist, or be an empty directory; its parent must exist.
pub(crate) fn check_target(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(target).map_err(|e| Error::io(target, "listing", e))?;
            if entries.next().is_some() {
                return Err(Error::new(
                    Code::InvalidOutputDir,
                    format!(
                        "--output-dir {} is not empty; give a new or empty directory",
                        target.display()
                    ),
                ));
            }
            Ok(())
        }
        Ok(_) => Err(Error::new(
            Code::InvalidOutputDir,
            format!(
                "--output-dir {} exists and is not a directory",
                target.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = parent_of(target);
            if !parent.is_dir() {
                return Err(Error::new(
                    Code::InvalidOutputDir,
                    format!(
                        "the parent of --output-dir, {}, does not exist; create it first",
                        parent.display()
                    ),
                ));
            }
            Ok(())
        }
        Err(e) => Err(Error::io(target, "checking", e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io(dir, "opening the directory to flush it", e))?;
    f.sync_all()
        .map_err(|e| Error::io(dir, "flushing the directory (fsync)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_creators_are_swept_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        // A pid that cannot be alive (above pid_max's largest value).
        let dead = d.path().join(".kiln-img-4194305-abcd1234.tmp");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("xvda.qcow2"), b"half").unwrap();
        let live = Staging::new(&d.path().join("one")).unwrap();
        assert!(!dead.exists(), "a dead creator's staging dir is removed");
        // A second create beside a live one leaves the live one's directory alone.
        let other = Staging::new(&d.path().join("two")).unwrap();
        assert!(live.dir().exists());
        drop(other);
        drop(live);
        assert_eq!(staging_pid(".kiln-a-b-77-x.tmp"), Some(77));
        assert_eq!(staging_pid(".kiln-a.tmp"), None);
    }

    #[test]
    fn a_dropped_staging_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("img");
        let s = Staging::new(&target).unwrap();
        s.write_file("a", b"x").unwrap();
        drop(s);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn commit_replaces_an_empty_dir_and_refuses_a_full_one() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("img");
        fs::create_dir(&target).unwrap();
        let s = Staging::new(&target).unwrap();
        s.write_file("a", b"x").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(target.join("a")).unwrap(), b"x");
        assert_eq!(
            Staging::new(&target).unwrap_err().code(),
            Code::InvalidOutputDir
        );
        let f = d.path().join("file");
        fs::write(&f, b"").unwrap();
        assert_eq!(Staging::new(&f).unwrap_err().code(), Code::InvalidOutputDir);
        assert_eq!(
            Staging::new(&d.path().join("no/such/dir"))
                .unwrap_err()
                .code(),
            Code::InvalidOutputDir
        );
    }
}
