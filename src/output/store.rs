//! `kiln describe` (the image table) and `kiln delete` (the IDs deleted).

use std::fmt::Write as _;

use super::{pretty, Rendered};
use crate::commands::delete::DeleteOutcome;
use crate::commands::describe::DescribeOutcome;
use crate::image::attributes::Dialect;

/// The images as a table, or JSON. An empty list prints nothing, with a note on stderr when
/// `stdout_is_terminal` (so `kiln describe | wc -l` counts images).
///
/// With a dialect (`--dialect`), `--json` prints that vendor's DescribeImages shape; `--job` prints
/// IMS's job query, with or without `--json`.
pub fn describe(
    out: &DescribeOutcome,
    json: bool,
    stdout_is_terminal: bool,
    dialect: Option<Dialect>,
) -> Rendered {
    if let (true, [r]) = (out.job, out.images.as_slice()) {
        return Rendered::stdout(super::dialect::job(r));
    }
    if let (true, Some(d)) = (json, dialect) {
        return Rendered::stdout(super::dialect::describe(d, &out.images));
    }
    if json {
        return Rendered::stdout(pretty(&out.images));
    }
    if out.images.is_empty() {
        return if stdout_is_terminal {
            Rendered::stderr("kiln: no images\n".into())
        } else {
            Rendered::default()
        };
    }
    let mut s = format!(
        "{:<22}  {:<24}  {:<8}  {:<12}  {:>8}  {:>6}  {:<20}  FAMILY\n",
        "IMAGE ID", "NAME", "TYPE", "STATUS", "PROGRESS", "SIZE", "CREATED"
    );
    for r in &out.images {
        let _ = writeln!(
            s,
            "{:<22}  {:<24}  {:<8}  {:<12}  {:>8}  {:>5}G  {:<20}  {}",
            r.image_id,
            r.image_name,
            r.image_type,
            r.status,
            r.progress,
            r.size_gib,
            r.creation_time,
            r.image_family.as_deref().unwrap_or("-")
        );
    }
    Rendered::stdout(s)
}

/// One deleted ID a line, or `{"Deleted": [...]}`.
pub fn delete(out: &DeleteOutcome, json: bool) -> Rendered {
    if json {
        let ids: Vec<&str> = out.deleted.iter().map(|r| r.image_id.as_str()).collect();
        return Rendered::stdout(pretty(&serde_json::json!({ "Deleted": ids })));
    }
    Rendered::stdout(
        out.deleted
            .iter()
            .map(|r| format!("{}\n", r.image_id))
            .collect(),
    )
}
