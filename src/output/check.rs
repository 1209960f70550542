//! `kiln check` and every other place the image check is shown (create's summary, the dry run).

use std::fmt::Write as _;

use super::{pretty, Rendered};
use crate::commands::check::CheckOutcome;
use crate::detect::Report;

/// `DISK:` and the report's table, or the report as JSON.
pub fn check(out: &CheckOutcome, json: bool) -> Rendered {
    if json {
        return Rendered::stdout(pretty(&out.report));
    }
    Rendered::stdout(format!(
        "{}:\n{}",
        out.disk.display(),
        report_text(&out.report)
    ))
}

/// A table for people: one line per item, then the result.
pub(crate) fn report_text(r: &Report) -> String {
    let w = r
        .items
        .iter()
        .map(|i| i.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!("{:<w$}  {:<6}  MESSAGE\n", "CHECK", "STATUS");
    for i in &r.items {
        let _ = writeln!(
            s,
            "{:<w$}  {:<6}  {}",
            i.check,
            i.status.as_str(),
            i.message
        );
    }
    let _ = writeln!(s, "Result: {}", r.result.as_str());
    s
}
