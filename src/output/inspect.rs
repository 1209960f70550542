//! `kiln inspect`: the report as text, in the spirit of `qemu-img info` (and `qemu-img map`); with
//! `--json` the report's own field names, as qemu-img's.

use std::fmt::Write as _;

use super::Rendered;
use crate::commands::inspect::InspectReport;
use crate::util::size::human;

pub fn inspect(r: &InspectReport, json: bool) -> Rendered {
    if json {
        let text = serde_json::to_string_pretty(r).unwrap_or_default();
        return Rendered::stdout(format!("{text}\n"));
    }
    Rendered::stdout(render_text(r))
}

/// The report as text, in the spirit of `qemu-img info` (and `qemu-img map` with the map).
pub fn render_text(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", r.filename.display());
    if let Some(snap) = &r.snapshot {
        let _ = writeln!(s, "snapshot: {snap}");
    }
    let _ = writeln!(s, "file format: {}", r.format.as_str());
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        human(r.virtual_size),
        r.virtual_size
    );
    let _ = writeln!(s, "disk size: {}", human(r.actual_size));
    if let Some(c) = r.cluster_size {
        let _ = writeln!(s, "cluster_size: {c}");
    }
    if let Some(e) = &r.encryption {
        let _ = writeln!(
            s,
            "encrypted: yes ({}, {}, {}-bit key, key slot KDF {}; {})",
            e.format,
            e.cipher,
            e.key_bits,
            e.key_slot_kdf,
            if e.unlocked {
                "the key given opens it"
            } else {
                "no key given: sizes and map only"
            }
        );
    }
    match &r.writer {
        Some(h) => {
            let _ = writeln!(s, "open for writing: yes, by {h}");
        }
        None => {
            let _ = writeln!(s, "open for writing: no");
        }
    }
    if !r.backing_chain.is_empty() {
        let _ = writeln!(s, "backing chain:");
        for (i, c) in r.backing_chain.iter().enumerate() {
            let _ = write!(
                s,
                "  {}: {} ({}, {} on disk",
                i + 1,
                c.filename.display(),
                c.format.as_str(),
                human(c.actual_size)
            );
            if let Some(h) = &c.writer {
                let _ = write!(s, ", open for writing by {h}");
            }
            let _ = writeln!(s, ")");
        }
    }
    if !r.snapshots.is_empty() {
        let _ = writeln!(s, "Snapshot list:");
        let _ = writeln!(
            s,
            "{:<6} {:<20} {:>10} {:>20} {:>16}",
            "ID", "TAG", "VM SIZE", "DATE (UTC)", "VM CLOCK"
        );
        for snap in &r.snapshots {
            let _ = writeln!(
                s,
                "{:<6} {:<20} {:>10} {:>20} {:>16}",
                snap.id,
                snap.name,
                human(snap.vm_state_size),
                utc_date(snap.date_sec),
                format!(
                    "{:02}:{:02}:{:02}.{:03}",
                    snap.vm_clock_sec / 3600,
                    snap.vm_clock_sec / 60 % 60,
                    snap.vm_clock_sec % 60,
                    snap.vm_clock_nsec / 1_000_000
                )
            );
        }
    }
    if let Some(map) = &r.map {
        let _ = writeln!(s, "map:");
        let _ = writeln!(
            s,
            "{:>18} {:>18}  {:<5} {:<5} present",
            "start", "length", "data", "zero"
        );
        for m in map {
            let _ = writeln!(
                s,
                "{:>#18x} {:>#18x}  {:<5} {:<5} {}",
                m.start, m.length, m.data, m.zero, m.present
            );
        }
    }
    s
}

/// `2023-11-14 22:13:20` for seconds since the epoch (civil-from-days, proleptic Gregorian).
fn utc_date(secs: u32) -> String {
    let days = i64::from(secs / 86_400);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
    }
}
