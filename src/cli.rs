//! Command-line flags (clap derive) and their conversion into requests. Nothing below this module
//! knows about clap.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::convert::ConvertRequest;
use crate::copy::progress::ProgressMode;
use crate::error::{Code, Error, Result};
use crate::format::gate::BackingGate;
use crate::format::luks::Secret;
use crate::format::qcow2::writer::Compression;
use crate::format::qcow2::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::format::Format;
use crate::format::{CacheMode, Encryption, OutputFormat, OutputSpec};
use crate::image::store;
use crate::request::create::{self as create_request, CreateRequest, Destination};
use crate::request::dialect::{self, Dialect, LoadOptions, Loaded};
use crate::request::plan::DiskSpec;
use crate::request::validate;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake custom VM images from local raw and qcow2 disks"
)]
pub struct Cli {
    /// Print results, and errors as {"Code","Message"}, as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// The image store: a directory, or s3://BUCKET/PREFIX shared by many hosts (default:
    /// $KILN_STORE, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln).
    #[arg(long, global = true, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub store: Option<PathBuf>,
    /// Object storage (`s3://`) endpoint, e.g. http://127.0.0.1:3900 (default: $AWS_ENDPOINT_URL,
    /// the AWS profile's endpoint_url, else AWS S3 itself).
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// `s3://` requests path-style (http://host/BUCKET/KEY) or virtual-hosted
    /// (http://BUCKET.host/KEY); default: $KILN_S3_ADDRESSING_STYLE, else path with an endpoint
    /// URL, virtual without.
    #[arg(long = "s3-addressing", global = true, value_name = "STYLE")]
    pub s3_addressing: Option<crate::remote::s3::Addressing>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a custom image: one system disk and up to 16 data disks.
    Create(Box<CreateArgs>),
    /// Convert one disk, with qemu-img's option names.
    Convert(ConvertArgs),
    /// List images in the store (DescribeImages; with --family, DescribeImageFromFamily).
    Describe(DescribeArgs),
    /// Delete images from the store (DeleteImage).
    Delete(DeleteArgs),
    /// Recompute every checksum of an image (a directory, an ImageId, or s3://BUCKET/PREFIX/,
    /// streamed) and compare with SHA256SUMS and the manifest.
    Verify(VerifyArgs),
    /// Upload an image to object storage: s3://BUCKET/PREFIX/ (resumes an interrupted push).
    Push(PushArgs),
    /// Download an image from object storage into a new directory.
    Pull(PullArgs),
    /// Show a disk's format, sizes, backing chain, snapshots, writer and allocation map.
    Inspect(InspectArgs),
    /// Check an image's system disk (or any disk file): partition table, partitions, boot mode,
    /// architecture, OS. Exit 1 when an item fails.
    Check(CheckArgs),
    /// Print shell completions.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The disk file, `FILE@SNAP` for an internal snapshot.
    #[arg(value_name = "FILE[@SNAP]")]
    pub file: PathBuf,
    /// Also print the allocation map (like `qemu-img map`).
    #[arg(long)]
    pub(crate) map: bool,
    /// The format (detected when not given).
    #[arg(short = 'f', long = "format", value_name = "raw|qcow2")]
    pub(crate) format: Option<String>,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

impl InspectArgs {
    pub fn options(&self) -> Result<crate::commands::inspect::InspectOptions> {
        let format = source_format("--format", self.format.as_deref())?;
        Ok(crate::commands::inspect::InspectOptions {
            format,
            map: self.map,
            gate: self.keys.gate(&self.backing)?,
        })
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// An ImageId in the store, an image directory (its system disk is checked), or a disk file
    /// (`FILE@SNAP` for a qcow2 internal snapshot).
    #[arg(value_name = "IMAGE_ID|DIR|FILE")]
    pub(crate) target: String,
    /// The boot mode to check against (an image's own by default): BIOS, UEFI or UEFI-Preferred.
    #[arg(long)]
    pub(crate) boot_mode: Option<String>,
    /// The architecture to check against (an image's own by default): i386, x86_64 or arm64.
    #[arg(long = "arch")]
    pub(crate) architecture: Option<String>,
    /// The platform to check against (an image's own by default).
    #[arg(long)]
    pub(crate) platform: Option<String>,
    /// The disk file's format (detected when not given).
    #[arg(short = 'f', long = "format", value_name = "raw|qcow2")]
    pub(crate) format: Option<String>,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

impl CheckArgs {
    pub fn to_request(&self) -> Result<crate::commands::check::CheckRequest> {
        let format = source_format("--format", self.format.as_deref())?;
        Ok(crate::commands::check::CheckRequest {
            target: self.target.clone(),
            gate: self.keys.gate(&self.backing)?,
            format,
            boot_mode: self.boot_mode.clone(),
            architecture: self.architecture.clone(),
            platform: self.platform.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Image IDs (all images when none is given).
    #[arg(value_name = "IMAGE_ID")]
    pub(crate) ids: Vec<String>,
    /// Only images with this name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The newest Available image of this family.
    #[arg(long)]
    pub(crate) family: Option<String>,
    /// Only images in this status: Creating, Available or CreateFailed.
    #[arg(long)]
    pub(crate) status: Option<String>,
    /// Only images carrying this tag (KEY=VALUE, or KEY for any value; repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub(crate) tags: Vec<String>,
    /// Print the images in this vendor's DescribeImages shape (with --json).
    #[arg(long, value_enum)]
    pub(crate) dialect: Option<DialectArg>,
    /// The Huawei IMS job with this ID, as IMS's job query reports it.
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["ids", "name", "family", "status", "tags", "dialect"])]
    pub(crate) job: Option<String>,
}

impl DescribeArgs {
    pub fn to_request(&self) -> crate::commands::describe::DescribeRequest {
        crate::commands::describe::DescribeRequest {
            ids: self.ids.clone(),
            name: self.name.clone(),
            family: self.family.clone(),
            status: self.status.clone(),
            tags: tag_filters(&self.tags),
            job: self.job.clone(),
        }
    }

    /// The vendor shape to print in (`--dialect`; Huawei's job shape with `--job`).
    pub fn dialect(&self) -> Option<Dialect> {
        if self.job.is_some() {
            return Some(Dialect::Huawei);
        }
        self.dialect.map(DialectArg::dialect)
    }
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[arg(value_name = "IMAGE_ID", required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An ImageId in the store, an image directory, or s3://BUCKET/PREFIX/.
    #[arg(value_name = "IMAGE_ID|DIR|s3://BUCKET/PREFIX/")]
    pub(crate) target: String,
    /// No progress bar.
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// An ImageId in the store, or an image directory.
    #[arg(value_name = "IMAGE_ID|DIR")]
    pub(crate) image: String,
    /// Where: s3://BUCKET/PREFIX/ (the image's files go under PREFIX).
    #[arg(value_name = "s3://BUCKET/PREFIX/")]
    pub(crate) destination: String,
    /// Parts uploaded at once (default 8).
    #[arg(short = 'j', long = "threads", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) threads: Option<u16>,
    #[command(flatten)]
    pub(crate) progress: ProgressArgs,
}

impl PushArgs {
    pub fn to_request(&self, json: bool) -> crate::commands::push::PushRequest {
        crate::commands::push::PushRequest {
            image: self.image.clone(),
            destination: self.destination.clone(),
            progress: self.progress.mode(json),
            threads: self.threads.map(usize::from),
        }
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image: s3://BUCKET/PREFIX/.
    #[arg(value_name = "s3://BUCKET/PREFIX/")]
    pub(crate) source: String,
    /// A new directory to hold it.
    #[arg(value_name = "DIR")]
    pub(crate) directory: PathBuf,
    #[command(flatten)]
    pub(crate) progress: ProgressArgs,
}

impl PullArgs {
    pub fn to_request(&self, json: bool) -> crate::commands::push::PullRequest {
        crate::commands::push::PullRequest {
            source: self.source.clone(),
            directory: self.directory.clone(),
            progress: self.progress.mode(json),
        }
    }
}

/// How transfers show progress.
#[derive(Debug, Args)]
pub(crate) struct ProgressArgs {
    /// No progress bar.
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// Progress: bars on a terminal (auto), JSON lines on stderr (json), or none.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub(crate) progress: ProgressArg,
}

impl ProgressArgs {
    /// With the global `--json`, `auto` shows nothing (as `verify` does).
    fn mode(&self, json: bool) -> ProgressMode {
        match progress_mode(self.quiet, self.progress) {
            ProgressMode::Auto if json => ProgressMode::Off,
            m => m,
        }
    }
}

impl VerifyArgs {
    /// `json`: the global `--json`, which turns the progress bar off as `--quiet` does.
    pub fn to_request(&self, json: bool) -> crate::commands::verify::VerifyRequest {
        crate::commands::verify::VerifyRequest {
            target: self.target.clone(),
            progress: if self.quiet || json {
                ProgressMode::Off
            } else {
                ProgressMode::Auto
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub(crate) shell: ShellArg,
}

impl CompletionsArgs {
    pub fn shell(&self) -> clap_complete::Shell {
        use clap_complete::Shell;
        match self.shell {
            ShellArg::Bash => Shell::Bash,
            ShellArg::Zsh => Shell::Zsh,
            ShellArg::Fish => Shell::Fish,
        }
    }
}

/// `--tag` filters of describe: (key, Some(value)) or (key, None) for any value.
pub(crate) fn tag_filters(tags: &[String]) -> Vec<(String, Option<String>)> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (t.clone(), None),
        })
        .collect()
}

/// An output format flag's value (`--format`, `-O`): a name from the format registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutFormat(pub OutputFormat);

fn out_format() -> impl clap::builder::TypedValueParser<Value = OutFormat> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(crate::format::output_names()).try_map(|s: String| {
        OutputFormat::named(&s)
            .map(OutFormat)
            .ok_or("not an output format")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CompressArg {
    Zlib,
    Zstd,
}

/// qemu-img's cache modes for the output (`-t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CacheArg {
    /// Buffered; every output and its directory fsynced before the rename (the default).
    Writeback,
    /// Buffered and never flushed (qemu-img convert's default): fast, not durable.
    Unsafe,
    /// O_DIRECT writes (page cache bypassed), then fsynced.
    None,
}

impl CacheArg {
    fn mode(self) -> CacheMode {
        match self {
            CacheArg::Writeback => CacheMode::Writeback,
            CacheArg::Unsafe => CacheMode::Unsafe,
            CacheArg::None => CacheMode::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProgressArg {
    /// Bars when stderr is a terminal.
    Auto,
    /// JSON lines on stderr.
    Json,
    /// Nothing.
    None,
}

/// `--dialect`: a vendor's CreateImage shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DialectArg {
    Alibaba,
    Jdcloud,
    Huawei,
}

impl DialectArg {
    fn dialect(self) -> Dialect {
        match self {
            DialectArg::Alibaba => Dialect::Alibaba,
            DialectArg::Jdcloud => Dialect::JdCloud,
            DialectArg::Huawei => Dialect::Huawei,
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A request file: Alibaba CreateImage parameters (JSON, TOML by its .toml extension, or the
    /// query form), a JD Cloud createImage or a Huawei IMS request; flags override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) request: Option<PathBuf>,
    /// The request file's dialect (detected from its shape when not given); `--json` then answers
    /// in that vendor's response shape.
    #[arg(long, value_enum)]
    pub(crate) dialect: Option<DialectArg>,
    /// A libvirt URI: an Alibaba request's InstanceId is then a domain name, read with `virsh`.
    #[arg(long, value_name = "URI")]
    pub(crate) connect: Option<String>,
    /// The image name (2 to 128 characters, starting with a letter or a CJK character).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The image family (same rules as the name).
    #[arg(long)]
    pub(crate) family: Option<String>,
    /// The image version (1 to 40 characters).
    #[arg(long)]
    pub(crate) image_version: Option<String>,
    /// A description of the image (2 to 256 characters).
    #[arg(long)]
    pub(crate) description: Option<String>,
    /// The OS platform recorded in the manifest [default: Others Linux].
    #[arg(long)]
    pub(crate) platform: Option<String>,
    /// i386, x86_64 or arm64 [default: x86_64].
    #[arg(long = "arch")]
    pub(crate) architecture: Option<String>,
    /// BIOS, UEFI or UEFI-Preferred [default: BIOS].
    #[arg(long)]
    pub(crate) boot_mode: Option<String>,
    /// A tag KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub(crate) tags: Vec<String>,
    /// A disk: snapshot=FILE[@SNAP],device=/dev/xvdX,size=SIZE,type=system|data,format=raw|qcow2 (repeatable).
    #[arg(long = "disk", value_name = "SPEC")]
    pub(crate) disks: Vec<String>,
    /// The system disk's source, when no --disk is given.
    #[arg(long, value_name = "FILE[@SNAP]")]
    pub(crate) snapshot: Option<PathBuf>,
    /// A libvirt domain XML (`virsh dumpxml`), or `-` for stdin: the image takes the instance's
    /// disks; `--disk device=vdX,...` entries then grow or add disks.
    #[arg(long, value_name = "FILE|-")]
    pub(crate) instance: Option<PathBuf>,
    /// With --instance: leave out the disk with this target (repeatable), e.g. `vdc`.
    #[arg(long, value_name = "TARGET")]
    pub(crate) exclude: Vec<String>,
    /// Copy sources that a process has open for writing (the copy may be inconsistent).
    #[arg(long)]
    pub(crate) allow_running: bool,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    #[command(flatten)]
    pub(crate) keys: KeyArgs,
    #[command(flatten)]
    pub(crate) encrypt: EncryptArgs,
    /// An image of data disks only (no system disk): `--disk` entries become /dev/xvdb, ...
    #[arg(long)]
    pub(crate) data_image: bool,
    /// Where the image goes, outside the store: a directory that must not exist or be empty, or
    /// s3://BUCKET/PREFIX/ (built in $TMPDIR, then pushed).
    #[arg(long, visible_alias = "output", value_name = "DIR|s3://BUCKET/PREFIX/")]
    pub(crate) output_dir: Option<PathBuf>,
    /// Idempotency token: the same token and request return the same image (ASCII, up to 64).
    #[arg(long)]
    pub(crate) client_token: Option<String>,
    /// Check everything and print the plan; copy and write nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Check the system disk as written (DetectionStrategy Standard): partition table, partitions,
    /// boot mode and architecture, OS; the report goes into the manifest (Detection).
    #[arg(long)]
    pub(crate) detect: bool,
    /// When a disk with a GPT grows, move its backup header and entries to the new end (as
    /// `sgdisk -e` does), so the table stays valid.
    #[arg(long)]
    pub(crate) relocate_gpt: bool,
    /// The cloud or hypervisor the image is for: azure, aws, gcp, vsphere, hyperv, alibaba,
    /// huawei or openstack. It picks the output format and checks the destination's rules first.
    #[arg(long, value_name = "DEST")]
    pub(crate) target: Option<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output disk format (default qcow2, or the `--target`'s format).
    #[arg(long = "format", value_parser = out_format())]
    pub(crate) format: Option<OutFormat>,
    /// qcow2 cluster size (512 to 2M, a power of two).
    #[arg(long, default_value = "64K")]
    pub(crate) cluster_size: String,
    /// Write compressed qcow2 clusters.
    #[arg(long, value_enum)]
    pub(crate) compress: Option<CompressArg>,
    /// Format-specific output options, as qemu-img's `-o`: KEY=VALUE[,KEY=VALUE...].
    #[arg(long = "output-options", value_name = "OPTIONS", default_value = "")]
    pub(crate) output_options: String,
    /// Cache mode of the outputs, as qemu-img's `-t` (with --output-dir only; the store always
    /// uses writeback).
    #[arg(short = 't', long = "cache", value_enum, default_value_t = CacheArg::Writeback)]
    pub(crate) cache: CacheArg,
    /// Copy threads (default: all cores; at least 16 when a source is s3://).
    #[arg(short = 'j', long = "threads")]
    pub(crate) threads: Option<usize>,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub(crate) progress: ProgressArg,
    /// No progress and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (detected when not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', value_parser = out_format(), default_value = "raw")]
    pub(crate) output_format: OutFormat,
    /// Compress qcow2 output; `-c zstd` picks zstd (zlib otherwise).
    #[arg(short = 'c')]
    pub(crate) compress: bool,
    /// Format-specific output options: KEY=VALUE[,KEY=VALUE...] (as qemu-img's -o).
    #[arg(short = 'o', value_name = "OPTIONS", default_value = "")]
    pub(crate) options: String,
    /// Cache mode of the output, as qemu-img's `-t`.
    #[arg(short = 't', value_enum, default_value_t = CacheArg::Writeback)]
    pub(crate) cache: CacheArg,
    /// Copy threads (default: all cores).
    #[arg(short = 'j', long = "threads")]
    pub(crate) threads: Option<usize>,
    /// Show progress.
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// qcow2 cluster size.
    #[arg(long, default_value = "64K")]
    pub(crate) cluster_size: String,
    /// Print the output's SHA-256.
    #[arg(long)]
    pub(crate) sha256: bool,
    /// Copy a source that a process has open for writing (the copy may be inconsistent).
    #[arg(long)]
    pub(crate) allow_running: bool,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    #[command(flatten)]
    pub(crate) keys: KeyArgs,
    #[command(flatten)]
    pub(crate) encrypt: EncryptArgs,
    /// [zlib|zstd] SRC[@SNAP] DST
    #[arg(num_args = 1.., action = clap::ArgAction::Append, value_name = "ARGS", required = true)]
    pub(crate) args: Vec<String>,
}

/// `--backing-dir`, shared by every command that opens sources.
#[derive(Debug, Args)]
pub(crate) struct BackingArgs {
    /// Also follow backing files under DIR (repeatable), or under s3://BUCKET/PREFIX/ for
    /// sources in a bucket; by default only those inside the named image's directory tree (or
    /// key prefix) are followed.
    #[arg(long = "backing-dir", value_name = "DIR")]
    pub(crate) backing_dirs: Vec<PathBuf>,
}

impl BackingArgs {
    pub(crate) fn gate(&self) -> BackingGate {
        BackingGate::new(self.backing_dirs.clone())
    }
}

/// Where a key comes from: a file, a descriptor or the environment, never argv. The key opens
/// encrypted sources (those without their own `key-file=`) and, with `--encrypt`, the output.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The key is this file's bytes, exactly (a trailing newline is part of it, as with qemu's
    /// `--object secret,file=`).
    #[arg(long, value_name = "FILE")]
    pub(crate) key_file: Option<PathBuf>,
    /// The key is what can be read from this inherited file descriptor.
    #[arg(long, value_name = "N")]
    pub(crate) key_fd: Option<i32>,
    /// The key is the value of this environment variable.
    #[arg(long, value_name = "NAME")]
    pub(crate) key_env: Option<String>,
    /// Refused: a key on the command line is visible to every user (ps, /proc).
    #[arg(long = "key", alias = "passphrase", hide = true, value_name = "KEY")]
    pub(crate) key_argv: Option<String>,
}

impl KeyArgs {
    /// The key named by the flags, read now; None without one.
    pub(crate) fn secret(&self) -> Result<Option<Secret>> {
        if self.key_argv.is_some() {
            return Err(validate::key_on_argv("--key"));
        }
        let given = [
            self.key_file.is_some(),
            self.key_fd.is_some(),
            self.key_env.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(Error::new(
                Code::InvalidParameter,
                "give the key once: --key-file, --key-fd or --key-env",
            ));
        }
        if let Some(p) = &self.key_file {
            return Secret::from_file(p).map(Some);
        }
        if let Some(fd) = self.key_fd {
            return Secret::from_fd(fd).map(Some);
        }
        self.key_env.as_deref().map(Secret::from_env).transpose()
    }

    /// The gate with this key for encrypted sources.
    pub(crate) fn gate(&self, backing: &BackingArgs) -> Result<BackingGate> {
        let mut gate = backing.gate();
        gate.key = self.secret()?;
        Ok(gate)
    }
}

/// `--encrypt` and its LUKS version.
#[derive(Debug, Args)]
pub(crate) struct EncryptArgs {
    /// Encrypt the output with LUKS (qcow2: `encrypt.format=luks`, as qemu writes it; raw: a LUKS
    /// volume), with the key of --key-file, --key-fd or --key-env.
    #[arg(long)]
    pub(crate) encrypt: bool,
    /// LUKS version of an encrypted raw output: 1 (default; qemu and cryptsetup open it) or 2
    /// (cryptsetup).
    #[arg(long, value_name = "1|2")]
    pub(crate) luks_version: Option<u8>,
}

impl EncryptArgs {
    /// Sets `spec`'s encryption when asked (`also` is a request file's `Encrypted: true`).
    pub(crate) fn apply(
        &self,
        spec: &mut OutputSpec,
        key: Option<&Secret>,
        also: bool,
    ) -> Result<()> {
        if !(self.encrypt || also) {
            if self.luks_version.is_some() {
                return Err(Error::new(
                    Code::InvalidParameter,
                    "--luks-version needs --encrypt",
                ));
            }
            return Ok(());
        }
        spec.encryption = Some(Encryption::for_output(spec, key, self.luks_version)?);
        Ok(())
    }
}

/// A source format flag's value (`--format`, `-f`): raw or qcow2; None when not given.
fn source_format(flag: &str, value: Option<&str>) -> Result<Option<Format>> {
    value
        .map(|f| {
            Format::parse(f).ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("{flag} {f}: kiln reads raw and qcow2"),
                )
            })
        })
        .transpose()
}

/// Copy threads by default when a source is an object (`s3://`): each holds one ranged GET.
const REMOTE_THREADS: usize = 16;

/// Whether any source (a disk's snapshot, or `--snapshot`) is an object in a bucket.
fn remote_sources(disks: &[DiskSpec], snapshot: Option<&Path>) -> bool {
    disks
        .iter()
        .filter_map(|d| d.snapshot.as_deref())
        .chain(snapshot)
        .any(crate::remote::s3::is_remote)
}

fn threads(j: Option<usize>) -> Result<usize> {
    match j {
        Some(0) => Err(Error::new(
            Code::InvalidParameter,
            "-j 0: give at least one thread",
        )),
        Some(n) if n > 1024 => Err(Error::new(
            Code::InvalidParameter,
            format!("-j {n}: at most 1024 threads"),
        )),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
    }
}

/// `64K` → 16; a power of two between 512 B and 2 MiB. A bare number is bytes here, as in
/// qemu-img's `cluster_size`.
pub(crate) fn cluster_bits(text: &str) -> Result<u32> {
    let bytes = if !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()) {
        text.parse().map_err(|_| bad_cluster(text))?
    } else {
        crate::util::size::parse_size(text).map_err(|_| bad_cluster(text))?
    };
    cluster_bits_of(bytes, text)
}

fn cluster_bits_of(bytes: u64, text: &str) -> Result<u32> {
    if !bytes.is_power_of_two() {
        return Err(bad_cluster(text));
    }
    let bits = bytes.trailing_zeros();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(bad_cluster(text));
    }
    Ok(bits)
}

fn bad_cluster(text: &str) -> Error {
    Error::new(
        Code::InvalidParameter,
        format!("cluster size '{text}' is not a power of two between 512 and 2M"),
    )
}

fn compression(c: Option<CompressArg>) -> Option<Compression> {
    c.map(|c| match c {
        CompressArg::Zlib => Compression::Zlib,
        CompressArg::Zstd => Compression::Zstd,
    })
}

fn output_spec(
    format: OutFormat,
    cluster_size: &str,
    compress: Option<Compression>,
    options: &str,
    cache: CacheArg,
) -> Result<OutputSpec> {
    let format = format.0;
    if compress.is_some() && !format.compresses() {
        return Err(Error::new(
            Code::InvalidParameter,
            "compression needs qcow2 output: drop the compression flag or use qcow2",
        ));
    }
    if compress.is_some() && cache == CacheArg::None {
        return Err(Error::new(
            Code::InvalidParameter,
            "-t none writes aligned blocks with O_DIRECT and compressed clusters are packed byte by byte: use -t writeback (or unsafe) with compression",
        ));
    }
    let mut spec = OutputSpec::new(format, cluster_bits(cluster_size)?, compress, options)?;
    spec.cache = cache.mode();
    Ok(spec)
}

impl CreateArgs {
    pub(crate) fn progress_mode(&self) -> ProgressMode {
        progress_mode(self.out.quiet, self.out.progress)
    }

    /// The request: the request file (if any, in its dialect), then the flags over it. `store` is
    /// the global `--store`, used when there is no `--output-dir`. Errors are in the request's
    /// dialect.
    pub fn to_request(&self, store: Option<&Path>) -> Result<CreateRequest> {
        let loaded = match &self.request {
            Some(p) => dialect::load(
                p,
                &LoadOptions {
                    dialect: self.dialect.map(DialectArg::dialect),
                    connect: self.connect.clone(),
                    instance: self.instance.clone(),
                },
            )?,
            None => {
                if self.connect.is_some() {
                    return Err(Error::new(
                        Code::InvalidParameter,
                        "--connect names the libvirt behind a request file's InstanceId: give --request",
                    ));
                }
                Loaded {
                    dialect: self.dialect.map_or(Dialect::Alibaba, DialectArg::dialect),
                    explicit: self.dialect.is_some(),
                    ..Loaded::default()
                }
            }
        };
        let (d, names) = (loaded.dialect, loaded.device_names());
        self.with_file(loaded, store)
            .map_err(|e| crate::request::dialect::label(d, e, &names))
    }

    fn with_file(&self, loaded: Loaded, store: Option<&Path>) -> Result<CreateRequest> {
        let file = loaded.file;
        let name = create_request::required_name(self.name.clone().or(file.image_name))?;
        let tags = if self.tags.is_empty() {
            file.tags.unwrap_or_default()
        } else {
            flag_tags(&self.tags)?
        };
        let mut notes = loaded.notes;
        // JD Cloud's reader took --instance as its request's instanceId already.
        let instance_flag = self
            .instance
            .as_deref()
            .filter(|_| loaded.dialect != Dialect::JdCloud || self.request.is_none());
        let (disks, snapshot, instance) = self.disks(
            instance_flag,
            (file.disks, file.snapshot, loaded.instance),
            &mut notes,
        )?;
        let gate = self.keys.gate(&self.backing)?;
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
        let target = pick(&self.target, file.target)
            .as_deref()
            .map(crate::request::target::parse)
            .transpose()?;
        let (format, options) = match target {
            Some(t) => crate::target::profile(t)?
                .output(self.out.format.map(|f| f.0), &self.out.output_options)?,
            None => (
                self.out
                    .format
                    .map_or_else(|| OutputSpec::default().format, |f| f.0),
                self.out.output_options.clone(),
            ),
        };
        let mut output = output_spec(
            OutFormat(format),
            &self.out.cluster_size,
            compression(self.out.compress),
            &options,
            self.out.cache,
        )?;
        self.encrypt.apply(
            &mut output,
            gate.key.as_ref(),
            file.encrypted.unwrap_or(false),
        )?;
        let destination = match &self.output_dir {
            Some(d) if crate::remote::s3::is_remote(d) => {
                Destination::Bucket(d.to_string_lossy().into_owned())
            }
            Some(d) => Destination::Dir(d.clone()),
            None => Destination::Store(store::locate(store)?),
        };
        let remote = remote_sources(&disks, snapshot.as_deref());
        Ok(CreateRequest {
            name,
            family: self.family.clone().or(file.image_family),
            image_version: self.image_version.clone().or(file.image_version),
            description: self.description.clone().or(file.description),
            platform: pick(&self.platform, file.platform)
                .as_deref()
                .map(validate::platform)
                .transpose()?,
            architecture: pick(&self.architecture, file.architecture)
                .as_deref()
                .map(validate::architecture)
                .transpose()?,
            boot_mode: pick(&self.boot_mode, file.boot_mode)
                .as_deref()
                .map(validate::boot_mode)
                .transpose()?,
            tags,
            disks,
            snapshot,
            destination,
            client_token: self.client_token.clone().or(file.client_token),
            dry_run: self.dry_run || file.dry_run.unwrap_or(false),
            output,
            threads: match self.out.threads {
                // Copies from objects wait on request latency: more requests in flight than cores.
                None if remote => threads(None)?.max(REMOTE_THREADS),
                j => threads(j)?,
            },
            progress: self.progress_mode(),
            instance,
            allow_running: self.allow_running,
            gate,
            notes,
            data_image: self.data_image || loaded.data_image,
            detect: self.detect || file.detect.unwrap_or(false),
            relocate_gpt: self.relocate_gpt || file.relocate_gpt.unwrap_or(false),
            dialect: loaded.dialect,
            respond_in_dialect: loaded.explicit,
            dialect_record: loaded.record,
            target,
        })
    }

    /// The disks: `--instance` (adjusted by `--disk`), else `--disk`/`--snapshot`, else the request
    /// file's instance, else its disks. An instance wins over disk mappings and snapshots, with a
    /// note naming what was ignored.
    #[allow(clippy::type_complexity)]
    fn disks(
        &self,
        instance_flag: Option<&Path>,
        file: (
            Option<Vec<DiskSpec>>,
            Option<PathBuf>,
            Option<create_request::InstanceDisks>,
        ),
        notes: &mut Vec<String>,
    ) -> Result<(
        Vec<DiskSpec>,
        Option<PathBuf>,
        Option<create_request::InstanceSource>,
    )> {
        let (file_disks, file_snapshot, file_instance) = file;
        // --instance wins over --disk mappings, which then adjust it, and over --snapshot.
        if let Some(xml_path) = instance_flag {
            let from = create_request::instance_disks(xml_path, &self.exclude, &self.disks)?;
            if let Some(s) = &self.snapshot {
                notes.push(format!(
                    "--snapshot {} was ignored: --instance takes priority",
                    s.display()
                ));
            }
            notes.extend(from.skipped);
            return Ok((from.specs, None, Some(from.instance)));
        }
        if !self.exclude.is_empty() {
            return Err(Error::new(
                Code::InvalidParameter,
                "--exclude needs --instance",
            ));
        }
        // Disks on the command line (either form) replace the file's, its instance included.
        if !self.disks.is_empty() || self.snapshot.is_some() {
            let disks = self
                .disks
                .iter()
                .map(|d| DiskSpec::parse(d))
                .collect::<Result<Vec<_>>>()?;
            return Ok((disks, self.snapshot.clone(), None));
        }
        match file_instance {
            Some(from) => {
                notes.extend(from.skipped);
                Ok((from.specs, None, Some(from.instance)))
            }
            None => Ok((file_disks.unwrap_or_default(), file_snapshot, None)),
        }
    }
}

/// `--tag KEY=VALUE` flags.
fn flag_tags(flags: &[String]) -> Result<Vec<(String, String)>> {
    flags
        .iter()
        .map(|t| {
            let (k, v) = t.split_once('=').ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("--tag '{t}' is not KEY=VALUE"),
                )
            })?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn progress_mode(quiet: bool, p: ProgressArg) -> ProgressMode {
    match (quiet, p) {
        (true, _) | (_, ProgressArg::None) => ProgressMode::Off,
        (_, ProgressArg::Json) => ProgressMode::Json,
        (_, ProgressArg::Auto) => ProgressMode::Auto,
    }
}

impl ConvertArgs {
    pub fn to_request(&self) -> Result<ConvertRequest> {
        let (kind, src, dst) = match self.args.as_slice() {
            [s, d] => (None, s, d),
            [k, s, d] if self.compress => (Some(k.as_str()), s, d),
            _ => {
                return Err(Error::new(
                    Code::InvalidParameter,
                    "convert takes SRC DST (and `-c zlib|zstd` before them)",
                ))
            }
        };
        let compress = match (self.compress, kind) {
            (false, _) => None,
            (true, None) | (true, Some("zlib")) => Some(Compression::Zlib),
            (true, Some("zstd")) => Some(Compression::Zstd),
            (true, Some(k)) => {
                return Err(Error::new(
                    Code::InvalidParameter,
                    format!("-c {k}: compression is zlib or zstd"),
                ))
            }
        };
        let source_format = source_format("-f", self.source_format.as_deref())?;
        let gate = self.keys.gate(&self.backing)?;
        let mut output = output_spec(
            self.output_format,
            &self.cluster_size,
            compress,
            &self.options,
            self.cache,
        )?;
        self.encrypt.apply(&mut output, gate.key.as_ref(), false)?;
        Ok(ConvertRequest {
            source: PathBuf::from(src),
            source_format,
            destination: PathBuf::from(dst),
            output,
            threads: threads(self.threads)?,
            progress: if self.progress {
                ProgressMode::Auto
            } else {
                ProgressMode::Off
            },
            sha256: self.sha256,
            gate,
            allow_running: self.allow_running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sizes() {
        assert_eq!(cluster_bits("64K").unwrap(), 16);
        assert_eq!(cluster_bits("512").unwrap(), 9);
        assert_eq!(cluster_bits("2M").unwrap(), 21);
        for bad in ["4M", "256", "65535", "x", "0"] {
            assert!(cluster_bits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn convert_takes_an_optional_compression_word() {
        let c = Cli::try_parse_from(["kiln", "convert", "-O", "qcow2", "-c", "zstd", "a", "b"])
            .unwrap();
        let Command::Convert(a) = c.command else {
            panic!()
        };
        let r = a.to_request().unwrap();
        assert_eq!(r.output.compression, Some(Compression::Zstd));
        assert_eq!(r.source, PathBuf::from("a"));
        let c = Cli::try_parse_from(["kiln", "convert", "-O", "qcow2", "-c", "a", "b"]).unwrap();
        let Command::Convert(a) = c.command else {
            panic!()
        };
        assert_eq!(
            a.to_request().unwrap().output.compression,
            Some(Compression::Zlib)
        );
        let c = Cli::try_parse_from(["kiln", "convert", "-c", "a", "b"]).unwrap();
        let Command::Convert(a) = c.command else {
            panic!()
        };
        assert_eq!(a.to_request().unwrap_err().code(), Code::InvalidParameter);
    }
}
