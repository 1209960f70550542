//! `kiln create`: the image ID (or record), the created or existing line, the copy summary, the
//! image check; and the dry run's plan table.

use std::fmt::Write as _;

use super::{check, dialect, pretty, summary, Rendered};
use crate::commands::create::{CreateOutcome, CreateResult, DryRunReport};
use crate::error::Code;
use crate::image::attributes::Dialect;
use crate::image::store::Record;
use crate::util::size::human;

/// How a create ended. `quiet` (`-q`) leaves out the stderr lines. With `respond` (a request in a
/// vendor's dialect), `--json` prints that vendor's CreateImage response instead of the record.
pub fn create(
    result: &CreateResult,
    json: bool,
    quiet: bool,
    respond: Option<Dialect>,
) -> Rendered {
    let mut r = match result {
        CreateResult::Created(out) => created(out, json, quiet),
        CreateResult::Existing(r) => existing(r, json, quiet),
        CreateResult::DryRun(report) => return dry_run(report, json),
    };
    if let (true, Some(d)) = (json, respond) {
        r.stdout = match result {
            CreateResult::Created(out) => dialect::created(d, &out.manifest),
            CreateResult::Existing(rec) => dialect::created(d, rec),
            CreateResult::DryRun(_) => r.stdout,
        };
    }
    r
}

fn created(out: &CreateOutcome, json: bool, quiet: bool) -> Rendered {
    let m = &out.manifest;
    let stdout = match (json, &out.record) {
        (true, Some(r)) => pretty(r),
        (true, None) => String::from_utf8_lossy(&m.to_json()).into_owned(),
        (false, _) => format!("{}\n", m.image_id),
    };
    let mut stderr = String::new();
    if !quiet {
        let _ = writeln!(
            stderr,
            "kiln: created {} ({}) in {}: {} disk(s)",
            m.image_name,
            m.image_id,
            out.output_dir.display(),
            m.disks.len()
        );
        let _ = writeln!(
            stderr,
            "{}",
            summary(&out.stats, out.virtual_bytes, out.elapsed)
        );
        if let Some(job) = m.request_dialect.as_ref().and_then(|d| d.job_id.as_deref()) {
            let _ = writeln!(stderr, "kiln: IMS job {job} (kiln describe --job {job})");
        }
    }
    if let (Some(d), false, false) = (&m.detection, json, quiet) {
        let _ = write!(
            stderr,
            "kiln: image check of /dev/xvda:\n{}",
            check::report_text(d)
        );
    }
    Rendered { stdout, stderr }
}

fn existing(r: &Record, json: bool, quiet: bool) -> Rendered {
    let stdout = if json {
        pretty(r)
    } else {
        format!("{}\n", r.image_id)
    };
    let stderr = if quiet {
        String::new()
    } else {
        format!(
            "kiln: client token already used for {} ({}, {}) with the same request; nothing copied\n",
            r.image_id, r.image_name, r.status
        )
    };
    Rendered { stdout, stderr }
}

/// The plan: a table of disks, the image check, the space check, and DryRunOperation's line; with
/// `--json`, `{"Code","Message","Plan"}`.
pub(crate) fn dry_run(r: &DryRunReport, json: bool) -> Rendered {
    let code = Code::DryRunOperation;
    let message = match &r.existing_image_id {
        Some(id) => format!(
            "the request is valid; the client token names {id}, which a real run would return; nothing was written (--dry-run)"
        ),
        None => "the request is valid and the create would start; nothing was written (--dry-run)".to_string(),
    };
    if json {
        let v = serde_json::json!({"Code": code.as_str(), "Message": message, "Plan": r});
        return Rendered::stdout(format!("{v}\n"));
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
        let _ = writeln!(
            s,
            "{:<10} {:<7} {:<7} {:>12} {:>12}  {source}",
            d.device,
            d.disk_type,
            d.format,
            human(d.virtual_size),
            human(d.bytes_to_copy)
        );
    }
    for (d, e) in r
        .disks
        .iter()
        .filter_map(|d| d.encryption.as_ref().map(|e| (d, e)))
    {
        let _ = writeln!(
            s,
            "{} would be encrypted: {}, {}, {}-bit key, key slot KDF {}",
            d.device, e.format, e.cipher, e.key_bits, e.key_slot_kdf
        );
    }
    if let Some(t) = &r.target_profile {
        let _ = writeln!(s, "--target {}: {}", t.name, t.output);
        for a in &t.adjustments {
            let _ = writeln!(s, "  adjusted: {a}");
        }
    }
    if let Some(d) = &r.detection {
        let _ = write!(
            s,
            "image check of /dev/xvda as it would be written:\n{}",
            check::report_text(d)
        );
    }
    let _ = write!(
        s,
        "target {} on {}: needs about {}, {} free\n{}: {}\n",
        r.target.display(),
        r.space.filesystem,
        human(r.space.need),
        human(r.space.free),
        code.as_str(),
        message
    );
    Rendered::stdout(s)
}
