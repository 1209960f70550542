//! `kiln verify IMAGE_ID|DIR`: recompute every file's SHA-256 (in parallel, one file per rayon
//! task) and compare with `SHA256SUMS` and with the manifest's per-disk `Sha256`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::copy::progress::{self, ProgressMode};
use crate::error::{Code, Error, Result};
use crate::image::manifest::Manifest;

/// One file's check.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FileCheck {
    #[serde(rename = "File")]
    pub(crate) file: String,
    /// From SHA256SUMS.
    #[serde(rename = "Expected")]
    pub(crate) expected: Option<String>,
    /// From the manifest (disks only).
    #[serde(rename = "ManifestSha256")]
    pub(crate) manifest: Option<String>,
    /// None when the file could not be read.
    #[serde(rename = "Actual")]
    pub(crate) actual: Option<String>,
    #[serde(rename = "Ok")]
    pub(crate) ok: bool,
    #[serde(rename = "Problem", skip_serializing_if = "Option::is_none")]
    pub(crate) problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct VerifyReport {
    #[serde(rename = "Directory")]
    pub(crate) directory: PathBuf,
    #[serde(rename = "Files")]
    pub(crate) files: Vec<FileCheck>,
    #[serde(rename = "Ok")]
    pub(crate) ok: bool,
}

impl VerifyReport {
    /// ChecksumMismatch naming each file that differs, when any does.
    pub(crate) fn to_error(&self) -> Option<Error> {
        let bad: Vec<String> = self
            .files
            .iter()
            .filter(|f| !f.ok)
            .map(|f| format!("{} ({})", f.file, f.problem.as_deref().unwrap_or("differs")))
            .collect();
        (!bad.is_empty()).then(|| {
            Error::new(
                Code::ChecksumMismatch,
                format!(
                    "{}: {} file(s) fail verification: {}",
                    self.directory.display(),
                    bad.len(),
                    bad.join("; ")
                ),
            )
        })
    }
}

/// Hashes file `name` (number `i`, reporting to the progress given): its hex SHA-256, or why it
/// cannot be read.
pub(crate) type HashFn<'a> =
    dyn Fn(usize, &str, &dyn progress::Progress) -> std::result::Result<String, String> + Sync + 'a;

/// What an image says its files hash to: `SHA256SUMS` and the manifest's per-disk `Sha256`.
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    /// Every file named, in SHA256SUMS order, then disks only the manifest names.
    pub(crate) order: Vec<String>,
    pub(crate) expected: BTreeMap<String, String>,
    pub(crate) from_manifest: BTreeMap<String, String>,
    /// Disks kept inside an archive (an OVA), `(archive, member, SHA-256 from the manifest)`: the
    /// archive is checked as a file (it is in `order`), each disk as a member of it.
    pub(crate) archived: Vec<(String, String, String)>,
    pub(crate) manifest: Manifest,
}

impl Listing {
    /// Parses `SHA256SUMS` (`sums`, read from `sums_at`) and `manifest.json` (`manifest`).
    pub(crate) fn parse(
        sums: &[u8],
        sums_at: &str,
        manifest: &[u8],
        manifest_at: &str,
    ) -> Result<Listing> {
        let sums_text = String::from_utf8_lossy(sums);
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        let mut order = Vec::new();
        for (i, line) in sums_text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (hash, name) = line.split_once("  ").ok_or_else(|| {
                Error::new(
                    Code::ChecksumMismatch,
                    format!("{sums_at} line {}: not 'HEX  NAME'", i + 1),
                )
            })?;
            if !order.contains(&name.to_string()) {
                order.push(name.to_string());
            }
            expected.insert(name.to_string(), hash.to_ascii_lowercase());
        }
        let manifest = Manifest::from_json(manifest).map_err(|e| {
            Error::new(
                Code::ChecksumMismatch,
                format!("{manifest_at}: not a kiln manifest ({e})"),
            )
        })?;
        let mut from_manifest: BTreeMap<String, String> = BTreeMap::new();
        let mut archived = Vec::new();
        for d in &manifest.disks {
            if let Some(a) = &d.archive {
                archived.push((a.clone(), d.file.clone(), d.sha256.to_ascii_lowercase()));
                if !order.contains(a) {
                    order.push(a.clone());
                }
                continue;
            }
            from_manifest.insert(d.file.clone(), d.sha256.to_ascii_lowercase());
            if !order.contains(&d.file) {
                order.push(d.file.clone());
            }
        }
        Ok(Listing {
            order,
            expected,
            from_manifest,
            archived,
            manifest,
        })
    }

    /// Whether `name` is a plain file name inside the image (no `/`, not `..`).
    pub(crate) fn name_ok(name: &str) -> bool {
        !(name.is_empty() || name.contains('/') || name.starts_with(".."))
    }

    /// Checks every file with `hash` (its hex SHA-256, or why it cannot be read), in parallel,
    /// reporting progress by the sizes given; `location` names the image in the report.
    pub(crate) fn check(
        &self,
        location: PathBuf,
        sizes: &[(String, u64)],
        mode: ProgressMode,
        hash: &HashFn<'_>,
    ) -> VerifyReport {
        let reporter = progress::reporter(mode, sizes);
        let files: Vec<FileCheck> = self
            .order
            .par_iter()
            .enumerate()
            .map(|(i, name)| {
                let actual = if Listing::name_ok(name) {
                    hash(i, name, reporter.as_ref())
                } else {
                    Err(format!("{name}: a name outside the image directory"))
                };
                reporter.disk_done(i, &crate::copy::stats::CopyStats::default());
                self.file_check(name, actual)
            })
            .collect();
        drop(reporter);
        let ok = files.iter().all(|f| f.ok);
        VerifyReport {
            directory: location,
            files,
            ok,
        }
    }

    fn file_check(&self, name: &str, actual: std::result::Result<String, String>) -> FileCheck {
        let exp = self.expected.get(name).cloned();
        let man = self.from_manifest.get(name).cloned();
        let (actual, problem) = match actual {
            Ok(h) => {
                let problem = if exp.is_none() {
                    Some("not listed in SHA256SUMS".to_string())
                } else if exp.as_deref() != Some(h.as_str()) {
                    Some("checksum differs from SHA256SUMS".to_string())
                } else if man.as_deref().is_some_and(|m| m != h) {
                    Some("checksum differs from manifest.json".to_string())
                } else {
                    None
                };
                (Some(h), problem)
            }
            Err(e) => (None, Some(format!("cannot be read: {e}"))),
        };
        FileCheck {
            file: name.to_string(),
            expected: exp,
            manifest: man,
            actual,
            ok: problem.is_none(),
            problem,
        }
    }
}

/// The check of each disk kept inside an archive, `(archive, member, SHA-256 from the manifest)`:
/// the member's bytes hashed where the archive's index puts them. Reported as `ARCHIVE/MEMBER`.
fn member_checks(dir: &Path, archived: &[(String, String, String)]) -> Vec<FileCheck> {
    let mut out = Vec::with_capacity(archived.len());
    let mut index: BTreeMap<&str, std::result::Result<_, String>> = BTreeMap::new();
    for (archive, member, expected) in archived {
        let members = index.entry(archive.as_str()).or_insert_with(|| {
            let path = dir.join(archive);
            if archive.contains('/') || archive.starts_with("..") {
                return Err(format!("{archive}: a name outside the image directory"));
            }
            let f = crate::util::safe_fs::open_regular(&path).map_err(|e| e.to_string())?;
            let m = crate::archive::ova::members(&f, &path).map_err(|e| e.full_message())?;
            Ok((f, path, m))
        });
        let actual = members
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|(f, path, m)| {
                let (_, at, len) = m
                    .iter()
                    .find(|(n, _, _)| n == member)
                    .ok_or_else(|| format!("no member {member} in {archive}"))?;
                crate::copy::hash::hash_range(f, path, *at, *len).map_err(|e| e.full_message())
            });
        let (actual, problem) = match actual {
            Ok(h) if h == *expected => (Some(h), None),
            Ok(h) => (
                Some(h),
                Some("checksum differs from manifest.json".to_string()),
            ),
            Err(e) => (None, Some(format!("cannot be read: {e}"))),
        };
        out.push(FileCheck {
            file: format!("{archive}/{member}"),
            expected: None,
            manifest: Some(expected.clone()),
            actual,
            ok: problem.is_none(),
            problem,
        });
    }
    out
}

/// Verifies the image directory `dir`.
pub(crate) fn verify_dir(dir: &Path, mode: ProgressMode) -> Result<VerifyReport> {
    let sums_path = dir.join("SHA256SUMS");
    let sums = crate::util::safe_fs::read_regular(&sums_path)
        .map_err(|e| Error::io(&sums_path, "reading the checksum list", e))?;
    let manifest_path = dir.join("manifest.json");
    let manifest = crate::util::safe_fs::read_regular(&manifest_path)
        .map_err(|e| Error::io(&manifest_path, "reading", e))?;
    let listing = Listing::parse(
        &sums,
        &sums_path.display().to_string(),
        &manifest,
        &manifest_path.display().to_string(),
    )?;
    let sizes: Vec<(String, u64)> = listing
        .order
        .iter()
        .map(|n| {
            let len = std::fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0);
            (n.clone(), len)
        })
        .collect();
    let location = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut report = listing.check(location, &sizes, mode, &|i, name, reporter| {
        let path = dir.join(name);
        let h = crate::util::safe_fs::open_regular(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| crate::copy::hash::hash_file(&f, &path).map_err(|e| e.full_message()));
        reporter.advance(i, sizes[i].1);
        h
    });
    report.files.extend(member_checks(dir, &listing.archived));
    report.ok = report.files.iter().all(|f| f.ok);
    Ok(report)
}
