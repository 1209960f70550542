//! The text descriptor: a standalone `.vmdk` descriptor file (monolithicFlat, twoGbMaxExtent*) or
//! the one embedded in a sparse extent. Parsed into what kiln uses (the create type, CIDs, the
//! parent hint and the extent lines; the `ddb.*` disk database is not needed to read a disk), and
//! rendered for the writer.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe
//! parentCID=ffffffff
//! createType="twoGbMaxExtentSparse"
//! parentFileNameHint="base.vmdk"        (a snapshot child only)
//!
//! # Extent description
//! RW 4192256 SPARSE "disk-s001.vmdk"     ACCESS SECTORS TYPE "FILE" [OFFSET in sectors, FLAT]
//! RW 2048 FLAT "disk-flat.vmdk" 0
//! RDONLY 2048 ZERO
//!
//! # The Disk Data Base
//! ddb.adapterType = "lsilogic"
//! ```

use std::path::Path;

use super::header::MAX_CAPACITY_SECTORS;
use crate::error::{Error, Result};

/// Most extent lines kiln reads (a 2 TiB twoGbMaxExtent disk has 1024).
pub(crate) const MAX_EXTENTS: usize = 4096;
/// Longest line kiln reads in a descriptor.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtentType {
    /// FLAT or VMFS: the guest bytes, as they are, at an offset in a file.
    Flat,
    /// SPARSE: a hosted sparse extent file with its own header.
    Sparse,
    /// ZERO: reads as zeros, no file.
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    pub(crate) sectors: u64,
    pub(crate) kind: ExtentType,
    /// The file, as written (relative to the descriptor's directory unless absolute).
    pub(crate) file: Option<String>,
    /// FLAT only: where the extent starts in its file, in sectors.
    pub(crate) offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) create_type: Option<String>,
    pub(crate) cid: Option<u32>,
    pub(crate) parent_cid: Option<u32>,
    pub(crate) parent_hint: Option<String>,
    pub(crate) extents: Vec<ExtentLine>,
}

/// The parentCID of a disk without a parent.
pub(crate) const NO_PARENT_CID: u32 = 0xffff_ffff;

impl Descriptor {
    /// The parent file name, when the descriptor names one and a parent CID.
    pub(crate) fn parent(&self) -> Option<&str> {
        match (&self.parent_hint, self.parent_cid) {
            (Some(h), Some(c)) if c != NO_PARENT_CID && !h.is_empty() => Some(h),
            _ => None,
        }
    }
}

/// Whether `head` (a file's first bytes) is a text descriptor.
pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    head[start..].starts_with(b"# Disk DescriptorFile")
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

/// Parses descriptor text (at most [`super::header::MAX_DESCRIPTOR_BYTES`], bounded by the
/// caller); `path` names the file for errors. Text after a NUL byte (the padding of an embedded
/// descriptor) is ignored.
pub(crate) fn parse(text: &[u8], path: &Path) -> Result<Descriptor> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = std::str::from_utf8(&text[..end])
        .map_err(|e| Error::corrupt(path, format!("the descriptor is not UTF-8 text ({e})")))?;
    let mut d = Descriptor::default();
    let mut total: u64 = 0;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.len() > MAX_LINE {
            return Err(Error::corrupt(
                path,
                format!("descriptor line {} is over {MAX_LINE} bytes", n + 1),
            ));
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            if d.extents.len() >= MAX_EXTENTS {
                return Err(Error::unsupported(
                    path,
                    format!("the descriptor has over {MAX_EXTENTS} extent lines"),
                ));
            }
            let e = parse_extent(line, path, n + 1)?;
            total = total.saturating_add(e.sectors);
            if total > MAX_CAPACITY_SECTORS {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "the extents' sizes add up to over 2^40 sectors (line {})",
                        n + 1
                    ),
                ));
            }
            d.extents.push(e);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::corrupt(
                path,
                format!(
                    "descriptor line {} is neither KEY=VALUE nor an extent: '{line}'",
                    n + 1
                ),
            ));
        };
        let hex = |what: &str| {
            u32::from_str_radix(unquote(v), 16).map_err(|_| {
                Error::corrupt(
                    path,
                    format!("{what} '{}' is not a 32-bit hex number", unquote(v)),
                )
            })
        };
        match k.trim() {
            "createType" => d.create_type = Some(unquote(v).to_string()),
            "CID" => d.cid = Some(hex("CID")?),
            "parentCID" => d.parent_cid = Some(hex("parentCID")?),
            "parentFileNameHint" => d.parent_hint = Some(unquote(v).to_string()),
            _ => {}
        }
    }
    Ok(d)
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
fn parse_extent(line: &str, path: &Path, n: usize) -> Result<ExtentLine> {
    let bad = |what: String| Error::corrupt(path, format!("extent line {n}: {what}"));
    let mut words = line
        .splitn(4, char::is_whitespace)
        .filter(|w| !w.is_empty());
    let access = words.next().unwrap_or("");
    if access == "NOACCESS" {
        return Err(Error::unsupported(
            path,
            format!("extent line {n} is NOACCESS; kiln cannot read the disk without it"),
        ));
    }
    let sectors_s = words.next().unwrap_or("");
    let sectors: u64 = sectors_s
        .parse()
        .map_err(|_| bad(format!("size '{sectors_s}' is not a number of sectors")))?;
    let type_s = words.next().unwrap_or("");
    let kind = match type_s {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "" => return Err(bad("no extent type".into())),
        other => {
            return Err(Error::unsupported(
                path,
                format!(
                    "extent line {n}: extent type {other} (kiln reads FLAT, VMFS, SPARSE and ZERO)"
                ),
            ))
        }
    };
    let rest = words.next().map(str::trim).unwrap_or("");
    if kind == ExtentType::Zero {
        return Ok(ExtentLine {
            sectors,
            kind,
            file: None,
            offset: 0,
        });
    }
    let Some(q) = rest.strip_prefix('"') else {
        return Err(bad("the file name is not quoted".into()));
    };
    let Some(close) = q.find('"') else {
        return Err(bad("the file name has no closing quote".into()));
    };
    let file = q[..close].to_string();
    if file.is_empty() {
        return Err(bad("the file name is empty".into()));
    }
    let tail = q[close + 1..].trim();
    let offset = match (kind, tail) {
        (_, "") => 0,
        (ExtentType::Flat, t) => t
            .parse()
            .map_err(|_| bad(format!("offset '{t}' is not a number of sectors")))?,
        (_, t) => return Err(bad(format!("unexpected text after the file name: '{t}'"))),
    };
    Ok(ExtentLine {
        sectors,
        kind,
        file: Some(file),
        offset,
    })
}

/// What the writer puts in its embedded descriptor.
pub(crate) struct Render<'a> {
    pub(crate) cid: u32,
    pub(crate) create_type: &'a str,
    pub(crate) sectors: u64,
    pub(crate) file_name: &'a str,
}

/// The embedded descriptor of a kiln-written sparse file. `version=1` is the descriptor format's
/// version (VMware's own streamOptimized writer, open-vmdk's `vmdk/sparse.c`, and qemu write 1;
/// VirtualBox refuses any other); what ESXi checks is the sparse header's version, 3 for
/// streamOptimized. `ddb.toolsVersion` is the line ESXi and ovftool need
/// (qemu's default value); geometry as VMware computes it for SCSI adapters (255 heads, 63
/// sectors, cylinders capped at 65535).
pub(crate) fn render(r: &Render<'_>) -> String {
    let cylinders = (r.sectors / (255 * 63)).clamp(1, 65535);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"{ct}\"\n\
         \n\
         # Extent description\n\
         RW {sectors} SPARSE \"{file}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.toolsVersion = \"2147483647\"\n",
        cid = r.cid,
        ct = r.create_type,
        sectors = r.sectors,
        file = r.file_name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_descriptor_parses() {
        let t = b"# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 4194304 FLAT \"my disk-f001.vmdk\" 0\nRDONLY 100 FLAT \"b.vmdk\" 7\nRW 8 ZERO\n\nddb.adapterType = \"ide\"\n";
        let d = parse(t, Path::new("d.vmdk")).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.cid, Some(0x1234_abcd));
        assert_eq!(d.parent(), None);
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-f001.vmdk"));
        assert_eq!((d.extents[1].sectors, d.extents[1].offset), (100, 7));
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
    }

    #[test]
    fn the_rendered_descriptor_parses_back() {
        let s = render(&Render {
            cid: 0xdead_beef,
            create_type: "streamOptimized",
            sectors: 2048,
            file_name: "x.vmdk",
        });
        assert!(looks_like_descriptor(s.as_bytes()));
        assert!(s.contains("ddb.toolsVersion"));
        let d = parse(s.as_bytes(), Path::new("x")).unwrap();
        assert_eq!(d.cid, Some(0xdead_beef));
        assert_eq!(d.extents[0].sectors, 2048);
    }

    #[test]
    fn bad_lines_are_named() {
        for (t, what) in [
            (&b"RW x FLAT \"a\"\n"[..], "size"),
            (b"RW 8 FLAT a\n", "quoted"),
            (b"RW 8 COWD \"a\"\n", "COWD"),
            (b"NOACCESS 8 FLAT \"a\"\n", "NOACCESS"),
            (b"CID=zz\n", "CID"),
            (b"garbage\n", "neither"),
            (b"RW 8 FLAT \"a\" q\n", "offset"),
        ] {
            let e = parse(t, Path::new("d")).unwrap_err();
            assert!(e.message().contains(what), "{what}: {}", e.message());
        }
    }
}
