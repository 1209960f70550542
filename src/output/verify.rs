//! `kiln verify`: `FILE: OK` lines, or the report as JSON; when a file differs, one line per such
//! file on stderr (the error itself is rendered by [`super::error`]).

use std::fmt::Write as _;

use super::{pretty, Rendered};
use crate::commands::verify::VerifyOutcome;

pub fn verify(out: &VerifyOutcome, json: bool) -> Rendered {
    let report = &out.report;
    if out.result().is_err() {
        let mut stderr = String::new();
        if !json {
            for f in report.files.iter().filter(|f| !f.ok) {
                let _ = writeln!(
                    stderr,
                    "kiln: {}: {}",
                    f.file,
                    f.problem.as_deref().unwrap_or("differs")
                );
            }
        }
        return Rendered::stderr(stderr);
    }
    if json {
        return Rendered::stdout(pretty(report));
    }
    Rendered::stdout(
        report
            .files
            .iter()
            .map(|f| format!("{}: OK\n", f.file))
            .collect(),
    )
}
