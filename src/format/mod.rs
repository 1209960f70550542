//! Disk formats. A source answers one question, "what is at this guest offset, and for how long?",
//! and reads guest bytes; a [`DiskWriter`] writes a fresh disk. Neither knows anything of images,
//! manifests or copying.
//!
//! Every format is one folder here and one line in [`DRIVERS`]: its name, file extension, content
//! probe, how to open it for reading and how to create it for writing. Detection, the CLI's format
//! names and the copy engine all go through that table.

pub(crate) mod chain;
pub mod gate;
pub mod input;
pub mod luks;
pub mod qcow2;
pub(crate) mod raw;
pub(crate) mod vdi;
pub(crate) mod vhd;
pub(crate) mod vhdx;
pub mod vmdk;
pub(crate) mod writer;

pub(crate) use input::{Input, RandomRead};
pub(crate) use writer::{DiskWriter, Finished};

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};

/// Longest backing chain kiln follows (the overlay counts as one).
pub(crate) const MAX_CHAIN_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vhdx,
    Luks,
    Vmdk,
    Vhd,
    Vdi,
}

impl Format {
    /// Its registry name.
    pub(crate) fn as_str(self) -> &'static str {
        self.driver().map_or("unknown", |d| d.name)
    }

    /// A readable format by its registry name, in any case; qemu's name `vpc` (libvirt's
    /// `<driver type='vpc'>`, `qemu-img -f vpc`) is VHD.
    pub(crate) fn parse(s: &str) -> Option<Format> {
        let s = if s.eq_ignore_ascii_case("vpc") {
            "vhd"
        } else {
            s
        };
        driver_named(s)?.read.as_ref().map(|r| r.format)
    }

    fn driver(self) -> Option<&'static Driver> {
        DRIVERS
            .iter()
            .find(|d| d.read.as_ref().is_some_and(|r| r.format == self))
    }

    /// The format's read side in the registry.
    fn reader(self) -> Result<&'static ReadDriver> {
        self.driver().and_then(|d| d.read.as_ref()).ok_or_else(|| {
            Error::new(
                Code::Internal,
                format!("no reader for format {}", self.as_str()),
            )
        })
    }
}

/// One disk format: what kiln knows of it, and the functions that read and write it.
pub struct Driver {
    /// The name users type (`-f`, `-O`, `--format`) and manifests record.
    pub(crate) name: &'static str,
    /// The output file's extension.
    pub(crate) extension: &'static str,
    /// None when kiln only writes the format.
    pub(crate) read: Option<ReadDriver>,
    /// None when kiln only reads the format.
    pub(crate) write: Option<WriteDriver>,
}

pub(crate) struct ReadDriver {
    pub(crate) format: Format,
    /// True when the file is in this format, judged from its first and last bytes ([`Probe`]).
    /// Drivers are probed in table order; the last one (raw) takes anything.
    pub(crate) probe: fn(&Probe<'_>) -> bool,
    /// Opens a source (and its backing chain), at an internal snapshot when one is named.
    pub(crate) open: fn(Input, &Path, Option<&str>, &gate::BackingGate) -> Result<Opened>,
    /// Opens a file as one layer of a chain another file names as its backing file (recording it
    /// in the chain first, with [`chain::Chain::note`]).
    pub(crate) open_layer: OpenLayerFn,
}

/// A format's chain-layer opener: (file, its path, the chain so far, the gate).
pub(crate) type OpenLayerFn =
    fn(Input, &Path, &mut chain::Chain, &gate::BackingGate) -> Result<Box<dyn BlockSource>>;

/// A format's writer constructor: (new empty file, its path, virtual size, output options).
pub(crate) type CreateFn = fn(File, &Path, u64, &OutputSpec) -> Result<Box<dyn DiskWriter>>;

pub struct WriteDriver {
    /// The format-specific options it takes (`-o KEY=VALUE`, as qemu-img's `-o`), with what each
    /// means; any other key is refused before anything is written.
    pub(crate) options: &'static [(&'static str, &'static str)],
    /// Starts a fresh disk of `virtual_size` (already passed through `disk_size`) in a new,
    /// empty file open for reading and writing.
    pub(crate) create: CreateFn,
    /// The size a disk of the given virtual size gets in this format.
    pub(crate) disk_size: fn(u64) -> u64,
    /// Whether `--compress`/`-c` applies.
    pub(crate) compresses: bool,
}

/// Every format kiln knows, in probe order (qcow2's magic before raw, which takes anything); the
/// CLI lists output formats in this order too.
pub(crate) static DRIVERS: &[Driver] = &[
    qcow2::DRIVER,
    luks::DRIVER,
    vhdx::DRIVER,
    vmdk::DRIVER,
    vhd::DRIVER,
    vdi::DRIVER,
    raw::DRIVER,
];

/// Bytes read from the start of a file for the probes (magic numbers and text descriptors).
pub(crate) const PROBE_BYTES: usize = 4096;
/// Bytes read from the end of a file for the probes (a fixed VHD's footer is its last 512 bytes).
pub(crate) const PROBE_TAIL_BYTES: usize = 512;

/// What a format probe sees of a file.
pub(crate) struct Probe<'a> {
    /// The first [`PROBE_BYTES`] bytes (fewer for a short file).
    pub(crate) head: &'a [u8],
    /// The last [`PROBE_TAIL_BYTES`] bytes (fewer for a short file; overlaps `head` then).
    pub(crate) tail: &'a [u8],
    /// The file's size in bytes.
    pub(crate) size: u64,
}

/// The driver named `name`, in any case.
pub(crate) fn driver_named(name: &str) -> Option<&'static Driver> {
    DRIVERS.iter().find(|d| d.name.eq_ignore_ascii_case(name))
}

/// The names of the formats kiln writes, in table order.
pub(crate) fn output_names() -> impl Iterator<Item = &'static str> {
    DRIVERS.iter().filter(|d| d.write.is_some()).map(|d| d.name)
}

/// An output format: a registry entry that can write.
#[derive(Clone, Copy)]
pub(crate) struct OutputFormat(&'static Driver, &'static WriteDriver);

impl OutputFormat {
    /// The output format named `name` (any case); None when kiln does not write it.
    pub(crate) fn named(name: &str) -> Option<OutputFormat> {
        let d = driver_named(name)?;
        d.write.as_ref().map(|w| OutputFormat(d, w))
    }

    pub(crate) fn extension(self) -> &'static str {
        self.0.extension
    }

    /// Whether compressed output is possible.
    pub(crate) fn compresses(self) -> bool {
        self.1.compresses
    }
}

impl PartialEq for OutputFormat {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for OutputFormat {}

impl std::fmt::Debug for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

/// How output disks are written.
#[derive(Debug, Clone)]
pub(crate) struct OutputSpec {
    pub(crate) format: OutputFormat,
    /// qcow2 cluster size as a power of two (16 = 64 KiB).
    pub(crate) cluster_bits: u32,
    /// Compress every cluster that shrinks (formats that compress only).
    pub(crate) compression: Option<qcow2::writer::Compression>,
    /// Format-specific options (`-o subformat=dynamic`), in the order given; each key is one the
    /// format's [`WriteDriver::options`] lists (checked by [`OutputSpec::new`]).
    pub(crate) options: Vec<(String, String)>,
    /// How the output is written and flushed (`-t`, qemu-img's cache modes).
    pub(crate) cache: CacheMode,
    /// `--encrypt`: LUKS with this key (qcow2's `encrypt.format=luks`, or a raw LUKS volume).
    pub(crate) encryption: Option<Encryption>,
}

/// qemu-img's cache modes for the output (`-t`): what is flushed, and whether the page cache is
/// used. Every mode makes the output appear by one rename once it is complete; they differ in what
/// survives a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum CacheMode {
    /// Buffered writes; every output file and its directory are fsynced before the rename (kiln's
    /// default: a finished output survives a power loss).
    #[default]
    Writeback,
    /// Buffered writes and no flush at all (qemu-img convert's default): the kernel writes the
    /// data back when it likes, and a power loss shortly after can lose or tear the output.
    Unsafe,
    /// Data written with `O_DIRECT` (the page cache bypassed) where offset, length and memory are
    /// 4 KiB-aligned; the rest (a disk's short last block, qcow2's tables) buffered; then flushed
    /// as `writeback` does.
    None,
}

impl CacheMode {
    /// Whether outputs are fsynced (and their directories) before they are published.
    pub(crate) fn flushes(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// How an output disk is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encryption {
    /// The passphrase of key slot 0.
    pub(crate) key: luks::Secret,
    /// 1 or 2 (raw output; qcow2 always holds LUKS1, as qemu writes it).
    pub(crate) luks_version: u8,
}

impl Encryption {
    /// The encryption of an output in `spec`'s format with `key`.
    pub(crate) fn for_output(
        spec: &OutputSpec,
        key: Option<&luks::Secret>,
        version: Option<u8>,
    ) -> Result<Encryption> {
        let key = key.cloned().ok_or_else(|| {
            Error::new(
                Code::MissingParameter,
                "--encrypt needs a key: --key-file FILE, --key-fd N or --key-env NAME",
            )
        })?;
        let ext = spec.format.extension();
        if ext != "qcow2" && ext != "raw" {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("--encrypt (encrypt=) writes qcow2 or raw output, not {ext}"),
            ));
        }
        let qcow2 = ext == "qcow2";
        let luks_version = match (version, qcow2) {
            (None | Some(1), _) => 1,
            (Some(2), false) => 2,
            (Some(2), true) => return Err(Error::new(
                Code::InvalidParameter,
                "--luks-version 2 is for raw output; an encrypted qcow2 holds LUKS1, as qemu writes it",
            )),
            (Some(v), _) => {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("--luks-version {v}: kiln writes LUKS 1 and 2"),
                ))
            }
        };
        if spec.compression.is_some() {
            return Err(Error::new(
                Code::InvalidParameter,
                "--compress and --encrypt do not go together (qemu writes no compressed clusters in an encrypted qcow2)",
            ));
        }
        Ok(Encryption { key, luks_version })
    }

    /// What the manifest records for a disk written in `format`: never key material.
    pub(crate) fn describe(&self, format: &str) -> luks::VolumeInfo {
        let v = if format == "qcow2" {
            1
        } else {
            self.luks_version
        };
        luks::VolumeInfo {
            luks_version: v,
            key_bits: 512,
            kdf: if v == 1 { "pbkdf2-sha256" } else { "argon2id" }.into(),
        }
    }
}

impl OutputSpec {
    /// An output spec whose options the format takes; `options` is qemu-img's `-o` text
    /// (`KEY=VALUE[,KEY=VALUE...]`), empty for none.
    pub(crate) fn new(
        format: OutputFormat,
        cluster_bits: u32,
        compression: Option<qcow2::writer::Compression>,
        options: &str,
    ) -> Result<OutputSpec> {
        let mut parsed: Vec<(String, String)> = Vec::new();
        for part in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let known = format.1.options;
            let list = || {
                if known.is_empty() {
                    format!("{} output takes no -o options", format.0.name)
                } else {
                    let keys: Vec<String> = known
                        .iter()
                        .map(|(k, what)| format!("{k} ({what})"))
                        .collect();
                    format!("{} output takes: {}", format.0.name, keys.join("; "))
                }
            };
            let Some((k, v)) = part.split_once('=') else {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("-o '{part}' is not KEY=VALUE; {}", list()),
                ));
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if !known.iter().any(|(name, _)| *name == k) {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("-o {k}: unknown option; {}", list()),
                ));
            }
            if parsed.iter().any(|(p, _)| *p == k) {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("-o {k} is given twice"),
                ));
            }
            parsed.push((k, v));
        }
        Ok(OutputSpec {
            format,
            cluster_bits,
            compression,
            options: parsed,
            cache: CacheMode::default(),
            encryption: None,
        })
    }

    /// The spec of one disk written in `format` (`output-format=`) instead of this spec's: `-o`
    /// options go with the image's format only; compression and encryption must fit the format.
    pub(crate) fn for_disk(&self, format: Option<OutputFormat>) -> Result<OutputSpec> {
        let Some(format) = format.filter(|f| *f != self.format) else {
            return Ok(self.clone());
        };
        if self.compression.is_some() && !format.compresses() {
            return Err(Error::new(
                Code::InvalidParameter,
                format!(
                    "output-format={}: compression needs qcow2 output; drop the compression flag or this disk's output-format",
                    format.extension()
                ),
            ));
        }
        let mut spec = OutputSpec {
            format,
            options: Vec::new(),
            ..self.clone()
        };
        if let Some(e) = spec.encryption.take() {
            let version = Some(e.luks_version).filter(|&v| v != 1);
            spec.encryption = Some(Encryption::for_output(&spec, Some(&e.key), version)?);
        }
        Ok(spec)
    }

    /// The size a disk of `virtual_size` bytes gets in this output (qcow2 rounds up to whole
    /// 512-byte sectors; raw keeps it).
    pub(crate) fn disk_size(&self, virtual_size: u64) -> u64 {
        let size = (self.format.1.disk_size)(virtual_size);
        // LUKS encrypts whole 512-byte sectors.
        match self.encryption {
            Some(_) => size.next_multiple_of(luks::crypto::SECTOR),
            None => size,
        }
    }

    /// Starts a fresh disk of `virtual_size` bytes (as returned by `disk_size`) in `file`.
    pub(crate) fn create(
        &self,
        file: File,
        path: &Path,
        virtual_size: u64,
    ) -> Result<Box<dyn DiskWriter>> {
        (self.format.1.create)(file, path, virtual_size, self)
    }
}

impl Default for OutputSpec {
    fn default() -> Self {
        OutputSpec {
            format: OutputFormat(&qcow2::DRIVER, &qcow2::WRITE),
            cluster_bits: 16,
            compression: None,
            options: Vec::new(),
            cache: CacheMode::default(),
            encryption: None,
        }
    }
}

/// What a guest range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated somewhere in the chain: must be read (it may still turn out to be zeros).
    Data,
    /// Known to read as zeros (a qcow2 zero cluster): nothing to read.
    Zero,
    /// Allocated nowhere in the chain (a raw hole, an unallocated qcow2 cluster): reads as zeros.
    Unallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A readable guest disk. Implementations are shared by all copy threads, so every method takes `&self`.
pub trait BlockSource: Send + Sync {
    /// Guest size in bytes.
    fn virtual_size(&self) -> u64;

    /// The extent that starts at `offset` (< virtual size): its kind holds for `len` bytes,
    /// `0 < len <= max_len`, and it never runs past the virtual size.
    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// Fills `buf` with the guest bytes at `offset`; `offset + buf.len()` must not pass the virtual size.
    /// Zero and unallocated ranges read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A shared source reads as the source (the image check and an archive's copy read one source).
impl BlockSource for std::sync::Arc<dyn BlockSource> {
    fn virtual_size(&self) -> u64 {
        self.as_ref().virtual_size()
    }

    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.as_ref().extent(offset, max_len)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.as_ref().read_at(offset, buf)
    }
}

/// The end of a read of `len` bytes at `offset` from a source of `virtual_size` bytes (`path`),
/// or an internal error when it would pass the end.
pub(crate) fn read_end(path: &Path, offset: u64, len: usize, virtual_size: u64) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&e| e <= virtual_size)
        .ok_or_else(|| {
            Error::new(
                Code::Internal,
                format!(
                    "{}: read of {len} bytes at {offset} passes the virtual size {virtual_size}",
                    path.display()
                ),
            )
        })
}

/// One file read while opening a source (the source itself, then each backing file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainEntry {
    #[serde(rename = "Path")]
    pub path: PathBuf,
    #[serde(rename = "Format")]
    pub format: Format,
}

/// Describes an opened source for plans and the manifest.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub(crate) path: PathBuf,
    pub format: Format,
    /// The internal snapshot read (`file.qcow2@NAME`), by the name it has in the file.
    pub snapshot: Option<String>,
    pub virtual_size: u64,
    /// Every file read, overlay first.
    pub chain: Vec<ChainEntry>,
}

pub struct Opened {
    pub source: Box<dyn BlockSource>,
    pub info: SourceInfo,
}

impl Opened {
    /// `source`, read from `path` without an internal snapshot; `chain` is every file read, this
    /// one first.
    pub(crate) fn whole(
        source: Box<dyn BlockSource>,
        path: &Path,
        format: Format,
        virtual_size: u64,
        chain: Vec<ChainEntry>,
    ) -> Opened {
        let info = SourceInfo {
            path: path.to_path_buf(),
            format,
            snapshot: None,
            virtual_size,
            chain,
        };
        Opened { source, info }
    }

    /// [`Opened::whole`] of a format with no backing file: the chain is the file itself.
    pub(crate) fn single(
        source: Box<dyn BlockSource>,
        path: &Path,
        format: Format,
        virtual_size: u64,
    ) -> Opened {
        let chain = vec![ChainEntry {
            path: path.to_path_buf(),
            format,
        }];
        Opened::whole(source, path, format, virtual_size, chain)
    }
}

/// Refuses an internal snapshot name for a format that has none; `what` names the file
/// ("a VHD", "a raw file").
pub(crate) fn no_snapshot(path: &Path, snapshot: Option<&str>, what: &str) -> Result<()> {
    match snapshot {
        Some(s) => Err(Error::unsupported(
            path,
            format!("{what} has no internal snapshot '{s}'; only qcow2 files do"),
        )),
        None => Ok(()),
    }
}

/// How to open a source.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, when the user stated it; detected from content otherwise.
    pub format: Option<Format>,
    /// An internal snapshot, by name or ID (qcow2 only).
    pub snapshot: Option<String>,
    /// Which backing files may be followed.
    pub gate: gate::BackingGate,
}

/// Opens a user-named source read-only. `path` may carry `@SNAP` when `opts.snapshot` is unset and the
/// file `path` itself does not exist.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Opened> {
    let (path, snapshot) = split_snapshot(path, opts.snapshot.clone());
    let file = input::open(&path)?;
    let format = match opts.format {
        Some(f) => f,
        None => detect(&file, &path)?,
    };
    open_as(format, file, &path, snapshot.as_deref(), &opts.gate)
}

/// Opens `file` as `format` through the registry.
pub(crate) fn open_as(
    format: Format,
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &gate::BackingGate,
) -> Result<Opened> {
    (format.reader()?.open)(file, path, snapshot, gate)
}

/// The formats kiln reads, for messages: `qcow2 and raw`.
pub(crate) fn readable_list() -> String {
    let names: Vec<&str> = DRIVERS
        .iter()
        .filter(|d| d.read.is_some())
        .map(|d| d.name)
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The end of the range an `extent(offset, max_len)` call may describe: `offset + max_len` cut at
/// the disk's `size`. An empty range (a caller asking at or past the end, or for nothing) is a bug
/// in the caller, reported as Internal naming the file.
pub(crate) fn extent_limit(path: &Path, size: u64, offset: u64, max_len: u64) -> Result<u64> {
    let limit = size.min(offset.saturating_add(max_len));
    if offset >= limit {
        return Err(Error::new(
            Code::Internal,
            format!("{}: extent asked at {offset} past the end", path.display()),
        ));
    }
    Ok(limit)
}

/// What lies below a layer (its backing file or parent) at `pos`, for at most `end - pos` bytes:
/// the lower layer's extent, zeros past its end, unallocated when there is none.
pub(crate) fn extent_below(below: Option<&dyn BlockSource>, pos: u64, end: u64) -> Result<Extent> {
    let kind = match below {
        None => ExtentKind::Unallocated,
        Some(b) if pos >= b.virtual_size() => ExtentKind::Zero,
        Some(b) => {
            let e = b.extent(pos, end.min(b.virtual_size()) - pos)?;
            return Ok(Extent {
                start: pos,
                len: e.len.min(end - pos),
                kind: e.kind,
            });
        }
    };
    Ok(Extent {
        start: pos,
        len: end - pos,
        kind,
    })
}

/// Reads what lies below a layer at `pos` into `out`: zeros past the lower layer's end, or
/// without one.
pub(crate) fn read_below(below: Option<&dyn BlockSource>, pos: u64, out: &mut [u8]) -> Result<()> {
    let n = below.map_or(0, |b| {
        b.virtual_size().saturating_sub(pos).min(out.len() as u64) as usize
    });
    if let (Some(b), true) = (below, n > 0) {
        b.read_at(pos, &mut out[..n])?;
    }
    out[n..].fill(0);
    Ok(())
}

/// `disk.qcow2@snap` names the internal snapshot `snap`, unless a file of that whole name exists.
fn split_snapshot(path: &Path, snapshot: Option<String>) -> (PathBuf, Option<String>) {
    if snapshot.is_some() || path.exists() {
        return (path.to_path_buf(), snapshot);
    }
    let s = path.to_string_lossy();
    match s.rfind('@') {
        Some(i) if i > 0 && i + 1 < s.len() && !s[i + 1..].contains('/') => {
            (PathBuf::from(&s[..i]), Some(s[i + 1..].to_string()))
        }
        _ => (path.to_path_buf(), None),
    }
}

/// Opens a file read-only; sources are never opened for writing.
pub(crate) fn open_read_only(path: &Path) -> Result<File> {
    File::open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::new(
                Code::SnapshotNotFound,
                format!("{}: no such file; check the snapshot path", path.display()),
            ),
            _ => Error::io(path, "opening", e),
        })
        .and_then(|f| {
            let meta = f
                .metadata()
                .map_err(|e| Error::io(path, "reading metadata of", e))?;
            if meta.is_dir() {
                return Err(Error::new(
                    Code::SnapshotNotFound,
                    format!("{} is a directory, not a disk file", path.display()),
                ));
            }
            Ok(f)
        })
}

/// What a source file looked like when it was opened, to tell afterwards whether it changed while
/// it was copied (shrunk, grown, rewritten, replaced): the copy is then refused, not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stamp {
    Local {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// An object in a bucket: its size and ETag.
    Object(crate::remote::s3::ObjectStamp),
}

/// Stamps of every file of some chains, taken before a copy.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceStamps(Vec<(PathBuf, Stamp)>);

impl SourceStamps {
    /// Stamps each file of `chain`.
    pub(crate) fn add(&mut self, chain: &[ChainEntry]) -> Result<()> {
        for c in chain {
            let s = stamp(&c.path)?;
            self.0.push((c.path.clone(), s));
        }
        Ok(())
    }

    /// Takes over another set's stamps.
    pub(crate) fn extend(&mut self, other: SourceStamps) {
        self.0.extend(other.0);
    }

    /// Fails with InvalidSnapshot.Changed naming the first file that is not as it was.
    pub(crate) fn check(&self) -> Result<()> {
        for (path, before) in &self.0 {
            let now = stamp(path);
            if let Err(e) = &now {
                if matches!(
                    e.code(),
                    Code::StorageUnavailable | Code::StorageAccessDenied
                ) {
                    return now.map(|_| ());
                }
            }
            let now = now.ok();
            if now.as_ref() == Some(before) {
                continue;
            }
            let how = match (now, before) {
                (None, _) => "was removed".to_string(),
                (Some(Stamp::Object(n)), Stamp::Object(b)) if n.size != b.size => {
                    format!("changed size from {} to {} bytes", b.size, n.size)
                }
                (Some(Stamp::Object(_)), _) => "was rewritten (its ETag changed)".to_string(),
                (
                    Some(Stamp::Local { dev, ino, .. }),
                    Stamp::Local {
                        dev: d0, ino: i0, ..
                    },
                ) if (dev, ino) != (*d0, *i0) => "was replaced".to_string(),
                (Some(Stamp::Local { size, .. }), Stamp::Local { size: s0, .. }) if size != *s0 => {
                    format!("changed size from {s0} to {size} bytes")
                }
                (Some(_), _) => "was written to".to_string(),
            };
            return Err(Error::new(
                Code::SourceChanged,
                format!(
                    "{} {how} while it was being copied; nothing was published. Copy from a file no one writes to (a snapshot), then run again",
                    path.display()
                ),
            ));
        }
        Ok(())
    }
}

fn stamp(path: &Path) -> Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    if let Some(url) = crate::remote::s3::S3Url::from_path(path)? {
        return crate::remote::s3::head(&url).map(Stamp::Object);
    }
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, "reading metadata of", e))?;
    Ok(Stamp::Local {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Test helpers shared by the modules that read disks.
#[cfg(test)]
pub(crate) mod testing {
    use super::{BlockSource, Extent, ExtentKind};
    use crate::error::Result;

    /// A disk held in memory, all of it data.
    pub(crate) struct Mem(pub Vec<u8>);

    impl BlockSource for Mem {
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
            Ok(Extent {
                start: offset,
                len: max_len.min(self.virtual_size() - offset),
                kind: ExtentKind::Data,
            })
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }
}

/// The first readable format in [`DRIVERS`] whose probe accepts the file: qcow2 when the file
/// starts with the qcow2 magic, raw otherwise (what qemu-img does for these two).
pub(crate) fn detect(file: &dyn RandomRead, path: &Path) -> Result<Format> {
    let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
    let mut head = vec![0u8; PROBE_BYTES];
    let n = read_full_at(file, &mut head, 0)
        .map_err(|e| Error::io(path, "reading the header of", e))?;
    head.truncate(n);
    let tail_len = size.min(PROBE_TAIL_BYTES as u64) as usize;
    let mut tail = vec![0u8; tail_len];
    let n = read_full_at(file, &mut tail, size - tail_len as u64)
        .map_err(|e| Error::io(path, "reading the end of", e))?;
    tail.truncate(n);
    let probe = Probe {
        head: &head,
        tail: &tail,
        size,
    };
    Ok(DRIVERS
        .iter()
        .filter_map(|d| d.read.as_ref())
        .find(|r| (r.probe)(&probe))
        .map_or(Format::Raw, |r| r.format))
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub(crate) fn read_full_at(
    file: &dyn RandomRead,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_options_are_checked_against_the_format() {
        let raw = OutputFormat::named("raw").unwrap();
        let spec = OutputSpec::new(raw, 16, None, "").unwrap();
        assert!(spec.options.is_empty());
        let e = OutputSpec::new(raw, 16, None, "subformat=fixed").unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(
            e.message().contains("raw output takes no -o options"),
            "{e}"
        );
        let e = OutputSpec::new(raw, 16, None, "nonsense").unwrap_err();
        assert!(e.message().contains("not KEY=VALUE"), "{e}");
    }

    #[test]
    fn formats_parse_by_name_and_qemus_vpc() {
        assert_eq!(Format::parse("VHD"), Some(Format::Vhd));
        assert_eq!(Format::parse("vpc"), Some(Format::Vhd));
        assert_eq!(Format::parse("vdi"), Some(Format::Vdi));
        assert_eq!(Format::parse("vhdz"), None);
    }

    #[test]
    fn snapshot_suffix_is_split_only_when_the_file_is_missing() {
        let (p, s) = split_snapshot(Path::new("/nonexistent/base.qcow2@snap1"), None);
        assert_eq!(p, Path::new("/nonexistent/base.qcow2"));
        assert_eq!(s.as_deref(), Some("snap1"));
        let (p, s) = split_snapshot(Path::new("/nonexistent/a@b/c.qcow2"), None);
        assert_eq!(p, Path::new("/nonexistent/a@b/c.qcow2"));
        assert_eq!(s, None);
    }
}
