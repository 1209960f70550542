//! `kiln convert`: the output's SHA-256 line (qemu-img style) or JSON, and the copy summary.

use super::{summary, Rendered};
use crate::commands::convert::{ConvertOutcome, ConvertRequest};
use crate::copy::progress::ProgressMode;

pub fn convert(req: &ConvertRequest, out: &ConvertOutcome, json: bool) -> Rendered {
    let stdout = if json {
        let v = serde_json::json!({
            "Source": req.source, "Destination": req.destination, "VirtualSize": out.virtual_size,
            "Sha256": out.sha256, "CopyStats": out.stats, "ElapsedSeconds": out.elapsed.as_secs_f64(),
        });
        format!("{v}\n")
    } else if let Some(h) = &out.sha256 {
        format!("{h}  {}\n", req.destination.display())
    } else {
        String::new()
    };
    // The summary goes with the progress display (`-p`).
    let stderr = if req.progress == ProgressMode::Auto {
        format!("{}\n", summary(&out.stats, out.virtual_size, out.elapsed))
    } else {
        String::new()
    };
    Rendered { stdout, stderr }
}
