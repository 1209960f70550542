//! The `kiln` binary: parse flags, call one library function per command, write what
//! [`kiln::output`] renders of its outcome. Exit 0 on success (and for DryRunOperation), 2 for a
//! request kiln refuses, 1 for a failure while running (and for `check` when an item fails).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::commands;
use kiln::error::Error;
use kiln::output::{self, Rendered};

fn main() -> ExitCode {
    // A write past RLIMIT_FSIZE must fail with EFBIG (reported with the file and offset, partial
    // output removed), not kill the process with SIGXFSZ and leave a half-built image behind.
    // SAFETY: installing SIG_IGN runs no handler code, and happens before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    kiln::remote::s3::configure(kiln::remote::s3::Settings {
        endpoint_url: cli.endpoint_url.clone(),
        addressing: cli.s3_addressing,
    });
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            emit(&output::error(&e, json));
            ExitCode::from(e.code().exit_status())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    let (json, store) = (cli.json, cli.store.as_deref());
    match cli.command {
        Command::Create(args) => {
            let req = args.to_request(store)?;
            let result = commands::create::create(&req, &mut warn).map_err(|e| {
                kiln::request::dialect::label(req.dialect(), e, &req.device_names())
            })?;
            let respond = req.respond_in_dialect().then(|| req.dialect());
            emit(&output::create::create(
                &result,
                json,
                args.out.quiet,
                respond,
            ));
        }
        Command::Convert(args) => {
            let req = args.to_request()?;
            let out = commands::convert::convert(&req, &mut warn)?;
            emit(&output::convert::convert(&req, &out, json));
        }
        Command::Describe(args) => {
            let dialect = args.dialect();
            let out =
                commands::describe::describe(&args.to_request(), store).map_err(
                    |e| match dialect {
                        Some(d) => kiln::request::dialect::label(d, e, &Default::default()),
                        None => e,
                    },
                )?;
            let tty = std::io::stdout().is_terminal();
            emit(&output::store::describe(&out, json, tty, dialect));
        }
        Command::Delete(args) => {
            let out = commands::delete::delete(&args.ids, store)?;
            emit(&output::store::delete(&out, json));
        }
        Command::Verify(args) => {
            let out = commands::verify::verify(&args.to_request(json), store)?;
            emit(&output::verify::verify(&out, json));
            out.result()?;
        }
        Command::Push(args) => {
            let out = commands::push::push(&args.to_request(json), store)?;
            emit(&output::transfer::transfer(&out, "pushed", json));
        }
        Command::Pull(args) => {
            let out = commands::push::pull(&args.to_request(json))?;
            emit(&output::transfer::transfer(&out, "pulled", json));
        }
        Command::Inspect(args) => {
            let report = commands::inspect::inspect_with(&args.file, &args.options()?)?;
            emit(&output::inspect::inspect(&report, json));
        }
        Command::Check(args) => {
            let out = commands::check::check(&args.to_request()?, store)?;
            emit(&output::check::check(&out, json));
            return Ok(ExitCode::from(out.exit_status()));
        }
        Command::Completions(args) => {
            let script = commands::completions::completions(args.shell());
            emit(&output::completions(&script));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A warning, on stderr as soon as it is known.
fn warn(w: &str) {
    eprint!("{}", output::warning(w));
}

/// Writes stdout, then stderr. A closed stdout (`kiln ... | head`) is not an error.
fn emit(r: &Rendered) {
    if !r.stdout.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out
            .write_all(r.stdout.as_bytes())
            .and_then(|()| out.flush());
    }
    if !r.stderr.is_empty() {
        eprint!("{}", r.stderr);
    }
}
