//! Disk sizes as users type them: binary K/M/G/T suffixes (`40G`, `40GiB`, `512M`), a bare number
//! meaning GiB as in the cloud APIs, and `B` for plain bytes.

use crate::error::{Code, Error, Result};

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const TIB: u64 = 1 << 40;

/// Largest disk kiln creates: 32 TiB, the clouds' data-disk limit (32768 GiB).
pub(crate) const MAX_DISK_SIZE: u64 = 32 * TIB;

pub(crate) fn parse_size(text: &str) -> Result<u64> {
    let bad = |why: &str| {
        Error::new(
            Code::InvalidSize,
            format!(
                "size '{text}' {why}; write a number of GiB (40) or a number with K, M, G or T (40G, 512MiB)"
            ),
        )
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad("does not start with a number"));
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| bad("is too large"))?;
    let unit = t[digits_end..].trim().to_ascii_lowercase();
    let multiplier = match unit.as_str() {
        "" | "g" | "gb" | "gib" => GIB,
        "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "t" | "tb" | "tib" => TIB,
        _ => return Err(bad("has an unknown unit")),
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| bad("is too large"))?;
    if bytes == 0 {
        return Err(bad("is zero"));
    }
    if bytes > MAX_DISK_SIZE {
        return Err(bad("is larger than 32 TiB, the largest disk kiln creates"));
    }
    Ok(bytes)
}

/// Whole GiB, rounded up (the API's `Size`).
pub(crate) fn gib_rounded_up(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// `1.5 GiB`-style text for messages and summaries.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_binary_and_bare_numbers_are_gib() {
        assert_eq!(parse_size("40").unwrap(), 40 * GIB);
        assert_eq!(parse_size("40G").unwrap(), 40 * GIB);
        assert_eq!(parse_size("40GiB").unwrap(), 40 * GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("64k").unwrap(), 64 * KIB);
        assert_eq!(parse_size("1T").unwrap(), TIB);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
    }

    #[test]
    fn nonsense_is_refused_with_the_size_code() {
        for s in [
            "",
            "G",
            "-1",
            "1.5G",
            "10X",
            "0",
            "33T",
            "99999999999999999999",
        ] {
            let e = parse_size(s).unwrap_err();
            assert_eq!(e.code(), Code::InvalidSize, "{s}");
        }
    }

    #[test]
    fn gib_rounds_up() {
        assert_eq!(gib_rounded_up(1), 1);
        assert_eq!(gib_rounded_up(GIB), 1);
        assert_eq!(gib_rounded_up(GIB + 1), 2);
        assert_eq!(human(1536 * MIB), "1.5 GiB");
    }
}
