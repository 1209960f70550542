//! Making an image visible atomically: it is built in a hidden staging directory beside the target,
//! every file fsynced, then renamed into place. A failed or killed create leaves at most a hidden
//! `.kiln-*.tmp` directory, never something that looks finished.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};

/// A staging directory; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    /// Checks that `target` does not exist or is an empty directory, and creates the staging
    /// directory beside it.
    pub fn new(target: &Path) -> Result<Staging> {
        check_target(target)?;
        let parent = parent_of(target);
        let base = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let tag = &crate::manifest::new_image_id()[2..10];
        let dir = parent.join(format!(".kiln-{base}-{}-{tag}.tmp", std::process::id()));
        fs::create_dir(&dir).map_err(|e| Error::io(&dir, "creating the staging directory", e))?;
        Ok(Staging {
            dir,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `name` in the staging directory (new file, fsynced).
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Error::io(&path, "creating", e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io(&path, "writing", e))?;
        f.sync_all()
            .map_err(|e| Error::io(&path, "flushing (fsync)", e))
    }

    /// Renames the staging directory to the target and makes the rename durable.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.dir)?;
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
        sync_dir(&parent_of(&self.target))?;
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

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `--output-dir` must not exist, or be an empty directory; its parent must exist.
pub fn check_target(target: &Path) -> Result<()> {
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

pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io(dir, "opening the directory to flush it", e))?;
    f.sync_all()
        .map_err(|e| Error::io(dir, "flushing the directory (fsync)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
