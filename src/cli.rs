//! Command-line flags (clap derive) and their conversion into requests. Nothing below this module
//! knows about clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::convert::ConvertRequest;
use crate::create::CreateRequest;
use crate::engine::{OutputFormat, OutputSpec};
use crate::error::{Code, Error, Result};
use crate::format::qcow2::writer::Compression;
use crate::format::qcow2::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::format::Format;
use crate::plan::DiskSpec;
use crate::progress::ProgressMode;

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a custom image: one system disk and up to 16 data disks.
    Create(CreateArgs),
    /// Convert one disk, with qemu-img's option names.
    Convert(ConvertArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    Zlib,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// Bars when stderr is a terminal.
    Auto,
    /// JSON lines on stderr.
    Json,
    /// Nothing.
    None,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image name.
    #[arg(long)]
    pub name: Option<String>,
    /// A description of the image.
    #[arg(long, default_value = "")]
    pub description: String,
    /// The OS platform recorded in the manifest.
    #[arg(long, default_value = "Others Linux")]
    pub platform: String,
    /// i386, x86_64 or arm64.
    #[arg(long = "arch", default_value = "x86_64")]
    pub architecture: String,
    /// BIOS, UEFI or UEFI-Preferred.
    #[arg(long, default_value = "BIOS")]
    pub boot_mode: String,
    /// A tag KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// A disk: snapshot=FILE[@SNAP],device=/dev/xvdX,size=SIZE,type=system|data,format=raw|qcow2 (repeatable).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// The system disk's source, when no --disk is given.
    #[arg(long, value_name = "FILE[@SNAP]")]
    pub snapshot: Option<PathBuf>,
    /// Where the image goes; must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output disk format.
    #[arg(long = "format", value_enum, default_value_t = OutFormat::Qcow2)]
    pub format: OutFormat,
    /// qcow2 cluster size (512 to 2M, a power of two).
    #[arg(long, default_value = "64K")]
    pub cluster_size: String,
    /// Write compressed qcow2 clusters.
    #[arg(long, value_enum)]
    pub compress: Option<CompressArg>,
    /// Copy threads (default: all cores).
    #[arg(short = 'j', long = "threads")]
    pub threads: Option<usize>,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
    /// No progress and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (detected when not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', value_enum, default_value_t = OutFormat::Raw)]
    pub output_format: OutFormat,
    /// Compress qcow2 output; `-c zstd` picks zstd (zlib otherwise).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Copy threads (default: all cores).
    #[arg(short = 'j', long = "threads")]
    pub threads: Option<usize>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// qcow2 cluster size.
    #[arg(long, default_value = "64K")]
    pub cluster_size: String,
    /// Print the output's SHA-256.
    #[arg(long)]
    pub sha256: bool,
    /// [zlib|zstd] SRC[@SNAP] DST
    #[arg(num_args = 2..=3, value_name = "ARGS", required = true)]
    pub args: Vec<String>,
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
pub fn cluster_bits(text: &str) -> Result<u32> {
    let bytes = if !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()) {
        text.parse().map_err(|_| bad_cluster(text))?
    } else {
        crate::size::parse_size(text).map_err(|_| bad_cluster(text))?
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
) -> Result<OutputSpec> {
    let format = match format {
        OutFormat::Qcow2 => OutputFormat::Qcow2,
        OutFormat::Raw => OutputFormat::Raw,
    };
    if compress.is_some() && format != OutputFormat::Qcow2 {
        return Err(Error::new(
            Code::InvalidParameter,
            "compression needs qcow2 output: drop the compression flag or use qcow2",
        ));
    }
    Ok(OutputSpec {
        format,
        cluster_bits: cluster_bits(cluster_size)?,
        compression: compress,
    })
}

impl CreateArgs {
    pub fn progress_mode(&self) -> ProgressMode {
        progress_mode(self.out.quiet, self.out.progress)
    }

    pub fn to_request(&self) -> Result<CreateRequest> {
        let name = self.name.clone().ok_or_else(|| {
            Error::new(
                Code::MissingParameter,
                "--name is required: the image needs a name",
            )
        })?;
        let output_dir = self.output_dir.clone().ok_or_else(|| {
            Error::new(
                Code::MissingParameter,
                "--output-dir is required: where should the image go?",
            )
        })?;
        let mut tags = Vec::new();
        for t in &self.tags {
            let (k, v) = t.split_once('=').ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("--tag '{t}' is not KEY=VALUE"),
                )
            })?;
            tags.push((k.to_string(), v.to_string()));
        }
        let disks = self
            .disks
            .iter()
            .map(|d| DiskSpec::parse(d))
            .collect::<Result<Vec<_>>>()?;
        Ok(CreateRequest {
            name,
            description: self.description.clone(),
            platform: self.platform.clone(),
            architecture: self.architecture.clone(),
            boot_mode: self.boot_mode.clone(),
            tags,
            disks,
            snapshot: self.snapshot.clone(),
            output_dir,
            output: output_spec(
                self.out.format,
                &self.out.cluster_size,
                compression(self.out.compress),
            )?,
            threads: threads(self.out.threads)?,
            progress: self.progress_mode(),
        })
    }
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
        let source_format = match &self.source_format {
            None => None,
            Some(f) => Some(Format::parse(f).ok_or_else(|| {
                Error::new(
                    Code::InvalidParameter,
                    format!("-f {f}: kiln reads raw and qcow2"),
                )
            })?),
        };
        Ok(ConvertRequest {
            source: PathBuf::from(src),
            source_format,
            destination: PathBuf::from(dst),
            output: output_spec(self.output_format, &self.cluster_size, compress)?,
            threads: threads(self.threads)?,
            progress: if self.progress {
                ProgressMode::Auto
            } else {
                ProgressMode::Off
            },
            sha256: self.sha256,
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
