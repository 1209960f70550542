//! The backing-file gate. A qcow2 file may name any path as its backing file (`~/.ssh/id_rsa`,
//! `/dev/sda`, `nbd://host/export`), and copying the overlay would then put that file's bytes into
//! the image. kiln follows a backing file only when it is a regular local file inside the directory
//! tree of the overlay the user named (the top of the chain) or under a directory the user allowed
//! with `--backing-dir`; everything else is refused with InvalidSnapshot.BackingDenied before a byte
//! of it is read. The top's tree, rather than each layer's own directory, so that the common layout
//! `top.qcow2 -> snaps/mid.qcow2 -> ../base.qcow2` works without flags; a layer can never reach
//! outside the tree the user pointed at.
//!
//! Borrowed from imago's `format/gate.rs`: files named inside an image open only through a gate.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Code, Error, Result};
use crate::format::Input;
use crate::remote::s3::S3Url;
use crate::util::safe_fs;

/// Which backing files may be opened, besides those inside the named image's directory tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingGate {
    /// Extra trusted directories (`--backing-dir`), as the user gave them.
    pub(crate) dirs: Vec<PathBuf>,
    /// The key for the encrypted files of this source (a raw LUKS volume, or qcow2 layers with
    /// LUKS encryption), when one was given. It travels with the gate because it is the other
    /// thing a source may be opened with.
    pub(crate) key: Option<crate::format::luks::secret::Secret>,
    /// Encrypted files opened without a key are mapped but not read (`kiln inspect`): their
    /// headers and allocation are shown, and any read of their data is refused for want of a key.
    pub(crate) keyless: bool,
}

impl BackingGate {
    pub(crate) fn new(dirs: Vec<PathBuf>) -> BackingGate {
        BackingGate {
            dirs,
            key: None,
            keyless: false,
        }
    }

    /// Resolves the backing file `name` stored in `overlay` and opens it read-only, or refuses it.
    /// `top` is the file the user named (the chain's first). Returns the path as named (for messages
    /// and the manifest) and the open file.
    pub(crate) fn open(&self, top: &Path, overlay: &Path, name: &[u8]) -> Result<(PathBuf, Input)> {
        let shown = String::from_utf8_lossy(name).into_owned();
        if let Some(over) = S3Url::from_path(overlay)? {
            return self.open_remote(top, overlay, &over, &shown);
        }
        if let Some(proto) = protocol_prefix(name) {
            return Err(denied(
                overlay,
                format!(
                    "its backing file '{shown}' names the protocol '{proto}:'; kiln reads local files only (flatten the chain with `qemu-img convert` first)"
                ),
            ));
        }
        let rel = Path::new(OsStr::from_bytes(name));
        let path = if rel.is_absolute() {
            rel.to_path_buf()
        } else {
            dir_of(overlay).join(rel)
        };
        // Resolve symlinks and `..` first, so the check is made on the file that would be read.
        let canon = std::fs::canonicalize(&path).map_err(|e| {
            Error::new(
                Code::SnapshotNotFound,
                format!(
                    "{}: its backing file '{shown}' ({}) cannot be opened: {e}",
                    overlay.display(),
                    path.display()
                ),
            )
        })?;
        let top_dir = dir_of(top);
        let own_root = std::fs::canonicalize(&top_dir).unwrap_or(top_dir);
        let allowed = canon.starts_with(&own_root)
            || self
                .dirs
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .any(|d| canon.starts_with(d));
        if !allowed {
            let dir = canon.parent().unwrap_or(Path::new("/"));
            return Err(denied(
                overlay,
                format!(
                    "its backing file '{shown}' resolves to {}, outside {}, the directory of the image named; allow it with `--backing-dir {}`",
                    canon.display(),
                    own_root.display(),
                    dir.display()
                ),
            ));
        }
        // O_NOFOLLOW: the last component cannot have been swapped for a symlink since it was
        // resolved; O_NONBLOCK: a FIFO does not block; only a regular file is kept.
        let file = safe_fs::open_regular(&canon).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                denied(
                    overlay,
                    format!("its backing file {} became a symlink", canon.display()),
                )
            } else if e.kind() == io::ErrorKind::InvalidInput {
                denied(
                    overlay,
                    format!(
                        "its backing file '{shown}' ({}) is not a regular file; kiln follows regular files only",
                        canon.display()
                    ),
                )
            } else {
                Error::io(&canon, "opening the backing file", e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(&canon, "reading metadata of", e))?;
        // The file opened must be the one checked (nothing renamed in between).
        let now = std::fs::metadata(&canon).map_err(|e| Error::io(&canon, "checking", e))?;
        if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
            return Err(denied(
                overlay,
                format!(
                    "its backing file {} changed while it was being opened",
                    canon.display()
                ),
            ));
        }
        Ok((path, Arc::new(file)))
    }

    /// The backing file `name` of an object `overlay` in a bucket: a relative name, resolved
    /// against the overlay's prefix inside the same bucket, and allowed only under the prefix of
    /// `top` (the object the user named) or an `s3://` `--backing-dir` in the same bucket.
    fn open_remote(
        &self,
        top: &Path,
        overlay: &Path,
        over: &S3Url,
        shown: &str,
    ) -> Result<(PathBuf, Input)> {
        if shown.starts_with('/') || protocol_prefix(shown.as_bytes()).is_some() {
            return Err(denied(
                overlay,
                format!("its backing file '{shown}' is not a name relative to it; an object's backing files must be objects beside it in the same bucket"),
            ));
        }
        let key = join_key(over.prefix(), shown).ok_or_else(|| {
            denied(
                overlay,
                format!("its backing file '{shown}' climbs above the top of the bucket"),
            )
        })?;
        let url = S3Url {
            bucket: over.bucket.clone(),
            key,
        };
        let top_prefix = S3Url::from_path(top)?
            .filter(|t| t.bucket == url.bucket)
            .map(|t| t.prefix().to_string());
        let allowed = top_prefix.is_some_and(|p| url.key.starts_with(&p))
            || self.dirs.iter().any(|d| {
                d.to_str()
                    .and_then(|d| S3Url::parse(d, true).ok().flatten())
                    .is_some_and(|d| {
                        d.bucket == url.bucket && url.key.starts_with(&dir_prefix(&d.key))
                    })
            });
        if !allowed {
            let dir = format!("s3://{}/{}", url.bucket, url.prefix());
            return Err(denied(
                overlay,
                format!(
                    "its backing file '{shown}' resolves to {url}, outside the prefix of the object named; allow it with `--backing-dir {dir}`"
                ),
            ));
        }
        let object = crate::remote::s3::Object::open(&url)?;
        Ok((url.to_path(), Arc::new(object)))
    }
}

/// A key prefix as a directory: ending in `/` (or empty, the whole bucket).
fn dir_prefix(key: &str) -> String {
    if key.is_empty() || key.ends_with('/') {
        key.to_string()
    } else {
        format!("{key}/")
    }
}

/// `name` (relative, `/`-separated) resolved against the key prefix `dir` (empty or ending in
/// `/`): `.` and empty components dropped, `..` going up one; None when it climbs past the top.
fn join_key(dir: &str, name: &str) -> Option<String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/")).filter(|k| !k.is_empty())
}

/// The directory a file is in (`.` for a bare name).
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn denied(overlay: &Path, msg: String) -> Error {
    Error::new(Code::BackingDenied, format!("{}: {msg}", overlay.display()))
}

/// The protocol of a name the way QEMU reads one (`path_has_protocol`): text before a `:` that
/// comes before any `/`, such as `nbd:`, `http:`, `json:`, `file:`.
fn protocol_prefix(name: &[u8]) -> Option<String> {
    let colon = name.iter().position(|&b| b == b':')?;
    let slash = name.iter().position(|&b| b == b'/');
    if colon == 0 || slash.is_some_and(|s| s < colon) {
        return None;
    }
    Some(String::from_utf8_lossy(&name[..colon]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_recognised_like_qemu() {
        assert_eq!(protocol_prefix(b"nbd://h/x").as_deref(), Some("nbd"));
        assert_eq!(protocol_prefix(b"json:{}").as_deref(), Some("json"));
        assert_eq!(
            protocol_prefix(b"file:/etc/passwd").as_deref(),
            Some("file")
        );
        assert_eq!(protocol_prefix(b"a:b.qcow2").as_deref(), Some("a"));
        assert_eq!(protocol_prefix(b"./a:b.qcow2"), None);
        assert_eq!(protocol_prefix(b"/x/a:b"), None);
        assert_eq!(protocol_prefix(b"base.qcow2"), None);
    }

    #[test]
    fn backing_keys_resolve_inside_the_bucket() {
        assert_eq!(join_key("a/b/", "c.qcow2").as_deref(), Some("a/b/c.qcow2"));
        assert_eq!(join_key("a/b/", "../c").as_deref(), Some("a/c"));
        assert_eq!(join_key("", "./x//y").as_deref(), Some("x/y"));
        assert_eq!(join_key("a/", "../../c"), None);
        assert_eq!(join_key("a/", ".."), None);
    }

    #[test]
    fn remote_backing_files_stay_under_the_named_prefix() {
        let gate = BackingGate::default();
        let top = Path::new("s3://bucket/img/top.qcow2");
        for name in ["../other/base", "/etc/passwd", "http://x/y", "../../x"] {
            let e = gate.open(top, top, name.as_bytes()).err().unwrap();
            assert_eq!(e.code(), Code::BackingDenied, "{name}: {}", e.message());
        }
        let e = gate.open(top, top, b"../other/base").err().unwrap();
        assert!(
            e.message().contains("--backing-dir s3://bucket/other/"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn gate_allows_own_tree_and_backing_dirs_only() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("img");
        let other = t.path().join("other");
        std::fs::create_dir_all(img.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(img.join("sub/base.raw"), b"x").unwrap();
        std::fs::write(other.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(other.join("secret"), img.join("link")).unwrap();
        let top = img.join("top.qcow2");
        let gate = BackingGate::default();
        assert!(gate.open(&top, &top, b"sub/base.raw").is_ok());
        // A lower layer may reach anywhere in the top's tree, not outside it.
        let mid = img.join("sub/mid.qcow2");
        assert!(gate.open(&top, &mid, b"../sub/base.raw").is_ok());
        let e = gate.open(&top, &mid, b"../../other/secret").unwrap_err();
        assert_eq!(e.code(), Code::BackingDenied);
        for name in [
            &b"../other/secret"[..],
            b"link",
            b"/etc/hostname",
            b"http://x/y",
        ] {
            let e = gate.open(&top, &top, name).unwrap_err();
            assert_eq!(e.code(), Code::BackingDenied, "{}", e.message());
        }
        let e = gate.open(&top, &top, b"../other/secret").unwrap_err();
        assert!(e.message().contains("--backing-dir"), "{}", e.message());
        let gate = BackingGate::new(vec![other.clone()]);
        assert!(gate.open(&top, &top, b"../other/secret").is_ok());
        assert!(gate.open(&top, &top, b"link").is_ok());
        // Not a regular file, even inside the tree.
        let e = gate.open(&top, &top, b"sub").unwrap_err();
        assert_eq!(e.code(), Code::BackingDenied);
    }
}
