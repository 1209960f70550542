//! The `kiln` binary: parse flags, run, print the result or the error. Exit 0 on success, 2 for a
//! request kiln refuses, 1 for a failure while running.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::error::Error;
use kiln::size::human;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Create(args) => {
            let req = args.to_request()?;
            let quiet = args.out.quiet;
            let out = kiln::create::create(&req, &mut |w| eprintln!("kiln: warning: {w}"))?;
            if cli.json {
                print_stdout(&String::from_utf8_lossy(&out.manifest.to_json()));
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
            Ok(())
        }
        Command::Convert(args) => {
            let req = args.to_request()?;
            let out = kiln::convert::convert(&req)?;
            if cli.json {
                let v = serde_json::json!({
                    "Source": req.source, "Destination": req.destination, "VirtualSize": out.virtual_size,
                    "Sha256": out.sha256, "CopyStats": out.stats, "ElapsedSeconds": out.elapsed.as_secs_f64(),
                });
                print_stdout(&format!("{v}\n"));
            } else if let Some(h) = &out.sha256 {
                print_stdout(&format!("{h}  {}\n", req.destination.display()));
            }
            if req.progress == kiln::progress::ProgressMode::Auto {
                eprintln!("{}", summary(&out.stats, out.virtual_size, out.elapsed));
            }
            Ok(())
        }
    }
}

/// The end-of-run numbers users benchmark with.
fn summary(
    s: &kiln::engine::CopyStats,
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
