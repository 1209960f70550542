//! The `kiln` binary: parse flags, run, print the result or the error. Exit 0 on success (and for
//! DryRunOperation), 2 for a request kiln refuses, 1 for a failure while running.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::commands::create::{CreateResult, DryRunReport};
use kiln::error::{Code, Error};
use kiln::image::attributes::Status;
use kiln::image::store::{self, Record, Store};
use kiln::util::size::human;

fn main() -> ExitCode {
    // A write past RLIMIT_FSIZE must fail with EFBIG (reported with the file and offset, partial
    // output removed), not kill the process with SIGXFSZ and leave a half-built image behind.
    // SAFETY: installing SIG_IGN runs no handler code, and happens before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if json {
                let v = serde_json::json!({"Code": e.code().as_str(), "Message": e.full_message()});
                let _ = writeln!(std::io::stdout(), "{v}");
            } else {
                eprintln!("kiln: error: {e}");
            }
            ExitCode::from(e.code().exit_status())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Create(args) => {
            let req = args.to_request(cli.store.as_deref())?;
            let quiet = args.out.quiet;
            match kiln::commands::create::create(&req, &mut |w| eprintln!("kiln: warning: {w}"))? {
                CreateResult::Created(out) => {
                    if cli.json {
                        match &out.record {
                            Some(r) => print_json(r),
                            None => print_stdout(&String::from_utf8_lossy(&out.manifest.to_json())),
                        }
                    } else {
                        print_stdout(&format!("{}\n", out.manifest.image_id));
                    }
                    if !quiet {
                        eprintln!(
                            "kiln: created {} ({}) in {}: {} disk(s)",
                            out.manifest.image_name,
                            out.manifest.image_id,
                            out.output_dir.display(),
                            out.manifest.disks.len()
                        );
                        eprintln!("{}", summary(&out.stats, out.virtual_bytes, out.elapsed));
                    }
                    if let (Some(d), false, false) = (&out.manifest.detection, cli.json, quiet) {
                        eprint!("kiln: image check of /dev/xvda:\n{}", d.render_text());
                    }
                }
                CreateResult::Existing(r) => {
                    if cli.json {
                        print_json(&*r);
                    } else {
                        print_stdout(&format!("{}\n", r.image_id));
                    }
                    if !quiet {
                        eprintln!(
                            "kiln: client token already used for {} ({}, {}) with the same request; nothing copied",
                            r.image_id, r.image_name, r.status
                        );
                    }
                }
                CreateResult::DryRun(report) => print_dry_run(&report, cli.json),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert(args) => {
            let req = args.to_request()?;
            let out = kiln::commands::convert::convert(&req)?;
            if cli.json {
                let v = serde_json::json!({
                    "Source": req.source, "Destination": req.destination, "VirtualSize": out.virtual_size,
                    "Sha256": out.sha256, "CopyStats": out.stats, "ElapsedSeconds": out.elapsed.as_secs_f64(),
                });
                print_stdout(&format!("{v}\n"));
            } else if let Some(h) = &out.sha256 {
                print_stdout(&format!("{h}  {}\n", req.destination.display()));
            }
            if req.progress == kiln::copy::progress::ProgressMode::Auto {
                eprintln!("{}", summary(&out.stats, out.virtual_size, out.elapsed));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe(args) => {
            let store = Store::at(store::locate(cli.store.as_deref())?);
            let status = match &args.status {
                None => None,
                Some(s) => Some(Status::parse(s).ok_or_else(|| {
                    Error::new(
                        Code::InvalidParameter,
                        format!("--status '{s}' is not one of: {}", Status::list()),
                    )
                })?),
            };
            let filters = kiln::cli::tag_filters(&args.tags);
            let mut images: Vec<Record> = store
                .list()?
                .into_iter()
                .filter(|r| args.ids.is_empty() || args.ids.contains(&r.image_id))
                .filter(|r| args.name.as_ref().is_none_or(|n| &r.image_name == n))
                .filter(|r| status.is_none_or(|s| r.status == s))
                .filter(|r| {
                    filters.iter().all(|(k, v)| {
                        r.tags
                            .iter()
                            .any(|t| &t.key == k && v.as_ref().is_none_or(|v| &t.value == v))
                    })
                })
                .collect();
            if let Some(f) = &args.family {
                // DescribeImageFromFamily: the newest Available image of the family.
                images = images
                    .into_iter()
                    .rfind(|r| r.image_family.as_ref() == Some(f) && r.status == Status::Available)
                    .into_iter()
                    .collect();
            }
            images.reverse(); // newest first
            if cli.json {
                print_json(&images);
            } else {
                print_table(&images);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete(args) => {
            let store = Store::at(store::locate(cli.store.as_deref())?);
            for id in &args.ids {
                if !store::is_image_id(id) {
                    return Err(store::not_found(id));
                }
            }
            let deleted = store.delete(&args.ids)?;
            if cli.json {
                let ids: Vec<&str> = deleted.iter().map(|r| r.image_id.as_str()).collect();
                print_json(&serde_json::json!({ "Deleted": ids }));
            } else {
                for r in &deleted {
                    print_stdout(&format!("{}\n", r.image_id));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let target = std::path::Path::new(&args.target);
            let dir = if target.is_dir() {
                target.to_path_buf()
            } else if store::is_image_id(&args.target) {
                let store = Store::at(store::locate(cli.store.as_deref())?);
                let r = store
                    .get(&args.target)?
                    .ok_or_else(|| store::not_found(&args.target))?;
                if r.status != Status::Available {
                    return Err(Error::new(
                        Code::IncorrectImageStatus,
                        format!(
                            "{} is {}; only Available images can be verified",
                            r.image_id, r.status
                        ),
                    ));
                }
                store.checked_image_dir(&r.image_id)?
            } else {
                return Err(Error::new(
                    Code::InvalidImageIdNotFound,
                    format!(
                        "{}: neither an image directory nor an ImageId (m-...)",
                        args.target
                    ),
                ));
            };
            let mode = if args.quiet || cli.json {
                kiln::copy::progress::ProgressMode::Off
            } else {
                kiln::copy::progress::ProgressMode::Auto
            };
            let report = kiln::image::verify::verify_dir(&dir, mode)?;
            if let Some(e) = report.to_error() {
                if !cli.json {
                    for f in report.files.iter().filter(|f| !f.ok) {
                        eprintln!(
                            "kiln: {}: {}",
                            f.file,
                            f.problem.as_deref().unwrap_or("differs")
                        );
                    }
                }
                return Err(e);
            }
            if cli.json {
                print_json(&report);
            } else {
                for f in &report.files {
                    print_stdout(&format!("{}: OK\n", f.file));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(args) => {
            let report = kiln::commands::inspect::inspect_with(&args.file, &args.options()?)?;
            if cli.json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                print_stdout(&format!("{text}\n"));
            } else {
                print_stdout(&kiln::commands::inspect::render_text(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let out = kiln::commands::check::check(&args.to_request()?, cli.store.as_deref())?;
            if cli.json {
                print_json(&out.report);
            } else {
                print_stdout(&format!(
                    "{}:\n{}",
                    out.disk.display(),
                    out.report.render_text()
                ));
            }
            // 1 when any item fails, as `verify` exits 1 when a file differs.
            Ok(if out.report.has_fail() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Completions(args) => {
            let mut out = Vec::new();
            kiln::cli::completions(args.shell, &mut out);
            print_stdout(&String::from_utf8_lossy(&out));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_dry_run(r: &DryRunReport, json: bool) {
    let code = Code::DryRunOperation;
    let message = match &r.existing_image_id {
        Some(id) => format!(
            "the request is valid; the client token names {id}, which a real run would return; nothing was written (--dry-run)"
        ),
        None => "the request is valid and the create would start; nothing was written (--dry-run)".to_string(),
    };
    if json {
        let v = serde_json::json!({"Code": code.as_str(), "Message": message, "Plan": r});
        print_stdout(&format!("{v}\n"));
        return;
    }
    let mut s = format!(
        "{:<10} {:<7} {:<7} {:>12} {:>12}  SOURCE\n",
        "DEVICE", "TYPE", "FORMAT", "VIRTUAL", "TO COPY"
    );
    for d in &r.disks {
        let source = match (&d.source, &d.source_format) {
            (Some(p), Some(f)) => format!("{} ({f})", p.display()),
            _ => "(empty disk)".into(),
        };
        s.push_str(&format!(
            "{:<10} {:<7} {:<7} {:>12} {:>12}  {source}\n",
            d.device,
            d.disk_type,
            d.format,
            human(d.virtual_size),
            human(d.bytes_to_copy)
        ));
    }
    if let Some(d) = &r.detection {
        s.push_str(&format!(
            "image check of /dev/xvda as it would be written:\n{}",
            d.render_text()
        ));
    }
    s.push_str(&format!(
        "target {} on {}: needs about {}, {} free\n{}: {}\n",
        r.target.display(),
        r.space.filesystem,
        human(r.space.need),
        human(r.space.free),
        code.as_str(),
        message
    ));
    print_stdout(&s);
}

fn print_table(images: &[Record]) {
    if images.is_empty() {
        if std::io::stdout().is_terminal() {
            eprintln!("kiln: no images");
        }
        return;
    }
    let mut s = format!(
        "{:<22}  {:<24}  {:<8}  {:<12}  {:>8}  {:>6}  {:<20}  FAMILY\n",
        "IMAGE ID", "NAME", "TYPE", "STATUS", "PROGRESS", "SIZE", "CREATED"
    );
    for r in images {
        s.push_str(&format!(
            "{:<22}  {:<24}  {:<8}  {:<12}  {:>8}  {:>5}G  {:<20}  {}\n",
            r.image_id,
            r.image_name,
            r.image_type,
            r.status,
            r.progress,
            r.size_gib,
            r.creation_time,
            r.image_family.as_deref().unwrap_or("-")
        ));
    }
    print_stdout(&s);
}

fn print_json<T: serde::Serialize + ?Sized>(v: &T) {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    print_stdout(&s);
}

/// The end-of-run numbers users benchmark with.
fn summary(
    s: &kiln::copy::engine::CopyStats,
    virtual_bytes: u64,
    elapsed: std::time::Duration,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!(
        "kiln: {} copied, {} holes skipped, {} zeros detected in {:.2} s: {}/s data, {}/s virtual",
        human(s.copied),
        human(s.holes),
        human(s.zeros),
        secs,
        human((s.copied as f64 / secs) as u64),
        human((virtual_bytes as f64 / secs) as u64),
    )
}

/// Prints to stdout; a closed pipe (`kiln ... | head`) is not an error.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes()).and_then(|()| out.flush());
}
