//! Every command's text and JSON, in the spirit of hyperfine's exporters: each renderer turns an
//! outcome into the bytes for stdout and stderr and writes nothing itself; `main` writes them (a
//! closed stdout is not an error there).
//!
//! Text goes to people: results on stdout (one ID per line, tables), notes and summaries on stderr
//! with a `kiln: ` prefix. With `--json` results are JSON on stdout and the notes are left out.

pub mod check;
pub mod convert;
pub mod create;
pub(crate) mod dialect;
pub mod inspect;
pub mod store;
pub mod transfer;
pub mod verify;

use serde::Serialize;

use crate::copy::stats::CopyStats;
use crate::error::Error;
use crate::request::dialect::{self as request_dialect, Dialect};
use crate::util::size::human;

/// What a command prints: `stdout` first, then `stderr`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub stdout: String,
    pub stderr: String,
}

impl Rendered {
    fn stdout(s: String) -> Rendered {
        Rendered {
            stdout: s,
            stderr: String::new(),
        }
    }

    fn stderr(s: String) -> Rendered {
        Rendered {
            stdout: String::new(),
            stderr: s,
        }
    }
}

/// An error: `{"Code","Message"}` on stdout with `--json`, `kiln: error: ...` on stderr otherwise.
///
/// An error in a vendor's terms (a JD Cloud or Huawei request) is that vendor's: JD's
/// `{"requestId","error":{"code","status","message"}}`, IMS's `{"error":{"code","message"}}`.
pub fn error(e: &Error, json: bool) -> Rendered {
    if let Some(v) = e.vendor() {
        if !json {
            return Rendered::stderr(format!("kiln: error: {}: {}\n", v.code, v.message));
        }
        let body = match v.dialect {
            Dialect::JdCloud => serde_json::json!({
                "requestId": request_dialect::request_id(),
                "error": {"code": v.http_status, "status": v.code, "message": v.message},
            }),
            Dialect::Huawei => serde_json::json!({"error": {"code": v.code, "message": v.message}}),
            Dialect::Alibaba => serde_json::json!({"Code": v.code, "Message": v.message}),
        };
        return Rendered::stdout(format!("{body}\n"));
    }
    if json {
        let v = serde_json::json!({"Code": e.code().as_str(), "Message": e.full_message()});
        Rendered::stdout(format!("{v}\n"))
    } else {
        Rendered::stderr(format!("kiln: error: {e}\n"))
    }
}

/// A warning, shown on stderr as soon as it is known.
pub fn warning(w: &str) -> String {
    format!("kiln: warning: {w}\n")
}

/// `kiln completions`: the script as generated.
pub fn completions(script: &[u8]) -> Rendered {
    Rendered::stdout(String::from_utf8_lossy(script).into_owned())
}

/// `v` as pretty JSON with a final newline.
fn pretty<T: Serialize + ?Sized>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// The end-of-run numbers users benchmark with (no newline).
fn summary(s: &CopyStats, virtual_bytes: u64, elapsed: std::time::Duration) -> String {
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
