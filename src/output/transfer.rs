//! `kiln push` and `kiln pull`: the image ID on stdout, a summary with throughput on stderr; or
//! the whole outcome as JSON.

use super::{pretty, Rendered};
use crate::commands::push::TransferOutcome;
use crate::util::size::human;

/// `verb` is `pushed` or `pulled`.
pub fn transfer(out: &TransferOutcome, verb: &str, json: bool) -> Rendered {
    if json {
        return Rendered::stdout(pretty(out));
    }
    let reused = out.bytes.saturating_sub(out.bytes_transferred);
    let note = if reused > 0 {
        format!(" ({} already there)", human(reused))
    } else {
        String::new()
    };
    Rendered {
        stdout: format!("{}\n", out.image_id),
        stderr: format!(
            "kiln: {verb} {} from {} to {}: {} file(s), {} moved{note} in {:.1} s, {}/s\n",
            out.image_id,
            out.source,
            out.destination,
            out.files.len(),
            human(out.bytes_transferred),
            out.seconds,
            human(out.bytes_per_second),
        ),
    }
}
