//! LUKS2 headers, read: the 4 KiB binary header (its SHA-256 checksum over the header and JSON
//! area), then the JSON metadata, whose key slots, digests and data segment are each checked and
//! bounded (KDF costs included) before any key derivation runs.
//!
//! ```text
//! 0    magic "LUKS\xba\xbe"  6 version (be16) = 2   8  hdr_size (be64, binary + JSON)
//! 72   checksum_alg (32, "sha256")                 448 checksum (64; zeroed while hashing)
//! 4096 JSON area (hdr_size - 4096 bytes, NUL-padded)
//! ```
//!
//! kiln reads the primary header only (cryptsetup repairs a damaged one from the secondary copy
//! with `cryptsetup repair`), key slots of type `luks2` with the `luks1` AF (4000 stripes), KDFs
//! `pbkdf2`, `argon2i` and `argon2id`, and one `crypt` segment in `aes-xts-plain64` with 512-byte
//! sectors.

use std::path::Path;

use serde_json::Value;
use sha2::Digest;
use zeroize::Zeroizing;

use super::crypto::{self, Hash, SectorCipher, SECTOR};
use super::luks1::STRIPES;
use super::{kdf_too_costly, Unlocked, VolumeInfo, MAX_PBKDF2_ITERATIONS};
use crate::error::{Error, Result};

/// The primary header's magic (the secondary's is `SKUL\xba\xbe`).
pub(crate) const MAGIC2: &[u8; 6] = b"LUKS\xba\xbe";
/// Largest JSON area read (cryptsetup's largest header is 4 MiB).
pub(crate) const MAX_JSON_BYTES: u64 = (4 << 20) - 4096;
/// Most argon2 memory a key slot may ask for: 4 GiB, cryptsetup's own limit.
pub(crate) const MAX_ARGON2_MEMORY_KIB: u32 = 4 << 20;
/// Most argon2 passes.
pub(crate) const MAX_ARGON2_TIME: u32 = 1000;
/// Most argon2 lanes.
pub(crate) const MAX_ARGON2_LANES: u32 = 64;
/// Most key slots read.
const MAX_SLOTS: usize = 32;

/// A key slot's key derivation, checked.
#[derive(Debug, Clone)]
enum Kdf {
    Pbkdf2 {
        hash: Hash,
        iterations: u32,
        salt: Vec<u8>,
    },
    Argon2 {
        id: bool,
        time: u32,
        memory: u32,
        lanes: u32,
        salt: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
struct Slot {
    name: String,
    key_size: usize,
    af_hash: Hash,
    area_offset: u64,
    area_key_size: usize,
    kdf: Kdf,
}

#[derive(Debug, Clone)]
struct Digest2 {
    slots: Vec<String>,
    hash: Hash,
    iterations: u32,
    salt: Vec<u8>,
    digest: Vec<u8>,
}

/// Reads, checks and unlocks a LUKS2 header.
pub(crate) fn unlock(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    area: u64,
    key: &[u8],
    path: &Path,
) -> Result<Unlocked> {
    let Parsed {
        payload_offset,
        digest,
        slots,
    } = parse(read, area, path)?;
    let bad = |field: &str| Error::corrupt(path, format!("LUKS2 metadata: {field}"));
    for s in slots.iter().filter(|s| digest.slots.contains(&s.name)) {
        let mut derived = Zeroizing::new(vec![0u8; s.area_key_size]);
        match &s.kdf {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => hash.pbkdf2(key, salt, *iterations, &mut derived),
            Kdf::Argon2 {
                id,
                time,
                memory,
                lanes,
                salt,
            } => crypto::argon2(*id, key, salt, *time, *memory, *lanes, &mut derived)
                .map_err(|e| bad(&format!("keyslots.{}.kdf: {e}", s.name)))?,
        }
        let len = (s.key_size * STRIPES as usize).next_multiple_of(SECTOR as usize);
        let mut material = Zeroizing::new(read(s.area_offset, len)?);
        SectorCipher::new(&derived)?.decrypt(&mut material, 0);
        let mk = crypto::af_merge(&material, s.key_size, STRIPES as usize, s.af_hash);
        let mut d = Zeroizing::new(vec![0u8; digest.digest.len()]);
        digest
            .hash
            .pbkdf2(&mk, &digest.salt, digest.iterations, &mut d);
        if d[..] == digest.digest[..] {
            return Ok(Unlocked {
                cipher: SectorCipher::new(&mk)?,
                payload_offset,
            });
        }
    }
    Err(super::wrong_key(path))
}

/// A LUKS2 header, checked: where the data starts, the master-key digest, the key slots.
pub(crate) struct Parsed {
    payload_offset: u64,
    digest: Digest2,
    slots: Vec<Slot>,
}

impl Parsed {
    /// Where the payload starts (bytes from the header).
    pub(crate) fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    /// What may be shown without a key: the key size and the KDF of the first key slot the
    /// master-key digest names.
    pub(crate) fn info(&self) -> VolumeInfo {
        let slot = self
            .slots
            .iter()
            .find(|s| self.digest.slots.contains(&s.name));
        VolumeInfo {
            luks_version: 2,
            key_bits: slot.map_or(0, |s| s.key_size as u32 * 8),
            kdf: match slot.map(|s| &s.kdf) {
                Some(Kdf::Pbkdf2 { hash, .. }) => format!("pbkdf2-{}", hash.name()),
                Some(Kdf::Argon2 { id: true, .. }) => "argon2id".into(),
                Some(Kdf::Argon2 { id: false, .. }) => "argon2i".into(),
                None => "none".into(),
            },
        }
    }
}

/// Reads and checks a LUKS2 header (binary header, checksum, JSON, segment, digest, key slots,
/// their KDF costs), deriving nothing.
pub(crate) fn parse(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    area: u64,
    path: &Path,
) -> Result<Parsed> {
    let json = read_json(read, area, path)?;
    let segment = json
        .pointer("/segments/0")
        .ok_or_else(|| Error::corrupt(path, "LUKS2 metadata: no segment 0 (segments.0)"))?;
    Ok(Parsed {
        payload_offset: segment_offset(segment, area, path)?,
        digest: parse_digest(&json, path)?,
        slots: parse_slots(&json, area, path)?,
    })
}

/// The binary header's checks, then the JSON area parsed.
fn read_json(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    area: u64,
    path: &Path,
) -> Result<Value> {
    let head = read(0, 4096)?;
    let hdr_size = u64::from_be_bytes(head[8..16].try_into().unwrap_or([0; 8]));
    if !(16384..=MAX_JSON_BYTES + 4096).contains(&hdr_size)
        || !hdr_size.is_power_of_two()
        || hdr_size > area
    {
        return Err(Error::corrupt(
            path,
            format!("LUKS2 hdr_size {hdr_size} is not a power of two from 16 KiB to 4 MiB inside the file"),
        ));
    }
    let alg = &head[72..104];
    if !alg.starts_with(b"sha256\0") {
        return Err(Error::unsupported(
            path,
            "LUKS2 header checksum_alg is not sha256",
        ));
    }
    let mut all = read(0, hdr_size as usize)?;
    let stored: Vec<u8> = all[448..480].to_vec();
    all[448..512].fill(0);
    if sha2::Sha256::digest(&all)[..] != stored[..] {
        return Err(Error::corrupt(
            path,
            "LUKS2 header checksum does not match (the primary header is damaged; `cryptsetup repair` may restore it from the secondary copy)",
        ));
    }
    let text = &all[4096..];
    let n = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    serde_json::from_slice(&text[..n])
        .map_err(|e| Error::corrupt(path, format!("LUKS2 JSON metadata does not parse: {e}")))
}

/// A JSON number given as a decimal string (LUKS2's u64 form).
fn u64_str(v: &Value, field: &str, path: &Path) -> Result<u64> {
    v.as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Error::corrupt(path, format!("LUKS2 metadata: {field} is not a number")))
}

fn u32_num(v: &Value, field: &str, path: &Path) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Error::corrupt(path, format!("LUKS2 metadata: {field} is not a number")))
}

fn str_of<'a>(v: &'a Value, field: &str, path: &Path) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| Error::corrupt(path, format!("LUKS2 metadata: {field} is missing")))
}

fn b64_field(v: &Value, field: &str, max: usize, path: &Path) -> Result<Vec<u8>> {
    let s = str_of(v, field, path)?;
    base64(s)
        .filter(|b| !b.is_empty() && b.len() <= max)
        .ok_or_else(|| {
            Error::corrupt(
                path,
                format!("LUKS2 metadata: {field} is not base64 of at most {max} bytes"),
            )
        })
}

fn hash_of(v: &Value, field: &str, path: &Path) -> Result<Hash> {
    let s = str_of(v, field, path)?;
    Hash::parse(s).ok_or_else(|| {
        Error::unsupported(
            path,
            format!("LUKS2 {field} '{s}' is not supported (sha1, sha256, sha512)"),
        )
    })
}

fn segment_offset(seg: &Value, area: u64, path: &Path) -> Result<u64> {
    let enc = str_of(&seg["encryption"], "segments.0.encryption", path)?;
    if seg["type"] != "crypt" || enc != "aes-xts-plain64" {
        return Err(Error::unsupported(
            path,
            format!(
                "LUKS2 segment 0 is '{}' '{enc}' (kiln reads crypt aes-xts-plain64)",
                seg["type"]
            ),
        ));
    }
    let sector = seg["sector_size"].as_u64().unwrap_or(0);
    if sector != SECTOR {
        return Err(Error::unsupported(
            path,
            format!("LUKS2 sector_size {sector} is not supported (kiln reads 512; use `cryptsetup luksFormat --sector-size 512`)"),
        ));
    }
    if seg["iv_tweak"] != "0" || seg["size"] != "dynamic" {
        return Err(Error::unsupported(
            path,
            "LUKS2 segment 0 has an iv_tweak or a fixed size (kiln reads dynamic segments from sector 0)",
        ));
    }
    let off = u64_str(&seg["offset"], "segments.0.offset", path)?;
    if off > area || !off.is_multiple_of(SECTOR) {
        return Err(Error::corrupt(
            path,
            format!("LUKS2 segments.0.offset {off} is past the end or not sector aligned"),
        ));
    }
    Ok(off)
}

fn parse_digest(json: &Value, path: &Path) -> Result<Digest2> {
    let d = json
        .pointer("/digests/0")
        .ok_or_else(|| Error::corrupt(path, "LUKS2 metadata: no digest 0 (digests.0)"))?;
    if d["type"] != "pbkdf2" {
        return Err(Error::unsupported(path, "LUKS2 digest type is not pbkdf2"));
    }
    let iterations = u32_num(&d["iterations"], "digests.0.iterations", path)?;
    if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
        return Err(kdf_too_costly(
            path,
            format!("digest iterations {iterations}"),
        ));
    }
    let slots = d["keyslots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .take(MAX_SLOTS)
                .collect()
        })
        .unwrap_or_default();
    Ok(Digest2 {
        slots,
        hash: hash_of(&d["hash"], "digests.0.hash", path)?,
        iterations,
        salt: b64_field(&d["salt"], "digests.0.salt", 256, path)?,
        digest: b64_field(&d["digest"], "digests.0.digest", 64, path)?,
    })
}

fn parse_slots(json: &Value, area: u64, path: &Path) -> Result<Vec<Slot>> {
    let map = json["keyslots"]
        .as_object()
        .ok_or_else(|| Error::corrupt(path, "LUKS2 metadata: keyslots is missing"))?;
    if map.len() > MAX_SLOTS {
        return Err(Error::corrupt(
            path,
            format!(
                "LUKS2 metadata: {} key slots (at most {MAX_SLOTS})",
                map.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for (name, s) in map {
        let f = |k: &str| format!("keyslots.{name}.{k}");
        if s["type"] != "luks2" || s["af"]["type"] != "luks1" || s["area"]["type"] != "raw" {
            return Err(Error::unsupported(
                path,
                format!(
                    "LUKS2 key slot {name} is not a luks2 slot with the luks1 AF and a raw area"
                ),
            ));
        }
        if s["af"]["stripes"].as_u64() != Some(u64::from(STRIPES)) {
            return Err(Error::corrupt(
                path,
                format!("LUKS2 metadata: {} is not {STRIPES}", f("af.stripes")),
            ));
        }
        let key_size = u32_num(&s["key_size"], &f("key_size"), path)? as usize;
        let area_key_size = u32_num(&s["area"]["key_size"], &f("area.key_size"), path)? as usize;
        if ![32, 64].contains(&key_size)
            || ![32, 64].contains(&area_key_size)
            || s["area"]["encryption"] != "aes-xts-plain64"
        {
            return Err(Error::unsupported(path, format!("LUKS2 key slot {name}: key sizes {key_size}/{area_key_size} or area cipher not aes-xts-plain64 (32 or 64 bytes)")));
        }
        let area_offset = u64_str(&s["area"]["offset"], &f("area.offset"), path)?;
        let area_size = u64_str(&s["area"]["size"], &f("area.size"), path)?;
        let need = (key_size * STRIPES as usize) as u64;
        if area_size < need || area_offset.checked_add(area_size).is_none_or(|e| e > area) {
            return Err(Error::corrupt(
                path,
                format!(
                    "LUKS2 metadata: {} {area_offset}+{area_size} is too small or past the end",
                    f("area.offset")
                ),
            ));
        }
        out.push(Slot {
            name: name.clone(),
            key_size,
            af_hash: hash_of(&s["af"]["hash"], &f("af.hash"), path)?,
            area_offset,
            area_key_size,
            kdf: parse_kdf(&s["kdf"], name, path)?,
        });
    }
    Ok(out)
}

fn parse_kdf(k: &Value, slot: &str, path: &Path) -> Result<Kdf> {
    let f = |x: &str| format!("keyslots.{slot}.kdf.{x}");
    let salt = b64_field(&k["salt"], &f("salt"), 256, path)?;
    match k["type"].as_str() {
        Some("pbkdf2") => {
            let iterations = u32_num(&k["iterations"], &f("iterations"), path)?;
            if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
                return Err(kdf_too_costly(
                    path,
                    format!("key slot {slot}: {iterations} PBKDF2 iterations"),
                ));
            }
            Ok(Kdf::Pbkdf2 {
                hash: hash_of(&k["hash"], &f("hash"), path)?,
                iterations,
                salt,
            })
        }
        Some(t @ ("argon2i" | "argon2id")) => {
            let time = u32_num(&k["time"], &f("time"), path)?;
            let memory = u32_num(&k["memory"], &f("memory"), path)?;
            let lanes = u32_num(&k["cpus"], &f("cpus"), path)?;
            if time == 0
                || time > MAX_ARGON2_TIME
                || memory > MAX_ARGON2_MEMORY_KIB
                || lanes == 0
                || lanes > MAX_ARGON2_LANES
            {
                return Err(kdf_too_costly(
                    path,
                    format!(
                        "key slot {slot}: argon2 time {time}, memory {memory} KiB, {lanes} lanes"
                    ),
                ));
            }
            Ok(Kdf::Argon2 {
                id: t == "argon2id",
                time,
                memory,
                lanes,
                salt,
            })
        }
        other => Err(Error::unsupported(
            path,
            format!(
                "LUKS2 key slot {slot}: KDF {other:?} is not supported (pbkdf2, argon2i, argon2id)"
            ),
        )),
    }
}

/// Argon2id cost of the key slot kiln writes: 4 passes over 128 MiB with 4 lanes (fixed, so a
/// create costs the same everywhere; cryptsetup times its own).
pub(crate) const WRITE_ARGON2: (u32, u32, u32) = (4, 128 * 1024, 4);
/// The layout kiln writes, as cryptsetup's defaults: 16 KiB headers (two copies), key material at
/// 32 KiB, data at 16 MiB.
const HDR_SIZE: usize = 16384;
const AREA_OFFSET: u64 = 32768;
const DATA_OFFSET: u64 = 16 << 20;

/// A new LUKS2 volume: both headers and key slot 0 (argon2id, [`WRITE_ARGON2`]) for a random
/// 512-bit master key; returns the header area (`DATA_OFFSET` bytes) and the master key's cipher.
pub(crate) fn create(key: &[u8]) -> Result<(Vec<u8>, Unlocked)> {
    const KB: usize = 64;
    let mut mk = Zeroizing::new(vec![0u8; KB]);
    crypto::random(&mut mk)?;
    let (time, memory, lanes) = WRITE_ARGON2;
    let mut salt = [0u8; 32];
    crypto::random(&mut salt)?;
    let mut derived = Zeroizing::new(vec![0u8; KB]);
    crypto::argon2(true, key, &salt, time, memory, lanes, &mut derived)
        .map_err(|e| Error::new(crate::error::Code::Internal, format!("argon2id: {e}")))?;
    let area_size = (KB * STRIPES as usize).next_multiple_of(4096);
    let mut material = crypto::af_split(&mk, STRIPES as usize, Hash::Sha256)?;
    material.resize(area_size, 0);
    SectorCipher::new(&derived)?.encrypt(&mut material, 0);
    let (mut dsalt, mut digest) = ([0u8; 32], [0u8; 32]);
    crypto::random(&mut dsalt)?;
    let iterations = super::luks1::DIGEST_ITERATIONS;
    Hash::Sha256.pbkdf2(&mk, &dsalt, iterations, &mut digest);
    let json = serde_json::json!({
        "keyslots": {"0": {"type": "luks2", "key_size": KB,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": "sha256"},
            "area": {"type": "raw", "offset": AREA_OFFSET.to_string(), "size": area_size.to_string(),
                     "encryption": "aes-xts-plain64", "key_size": KB},
            "kdf": {"type": "argon2id", "time": time, "memory": memory, "cpus": lanes,
                    "salt": base64_encode(&salt)}}},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": DATA_OFFSET.to_string(), "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64", "sector_size": SECTOR}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
                          "iterations": iterations, "salt": base64_encode(&dsalt),
                          "digest": base64_encode(&digest)}},
        "config": {"json_size": (HDR_SIZE - 4096).to_string(),
                   "keyslots_size": (DATA_OFFSET - 2 * HDR_SIZE as u64).to_string()}
    })
    .to_string();
    let mut out = vec![0u8; DATA_OFFSET as usize];
    let (mut hsalt, uuid) = ([0u8; 64], super::luks1::uuid()?);
    for (copy, magic) in [(0usize, MAGIC2), (1, b"SKUL\xba\xbe")] {
        crypto::random(&mut hsalt)?;
        let h = &mut out[copy * HDR_SIZE..(copy + 1) * HDR_SIZE];
        h[0..6].copy_from_slice(magic);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&(HDR_SIZE as u64).to_be_bytes());
        h[16..24].copy_from_slice(&1u64.to_be_bytes());
        h[72..78].copy_from_slice(b"sha256");
        h[104..168].copy_from_slice(&hsalt);
        h[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        h[256..264].copy_from_slice(&((copy * HDR_SIZE) as u64).to_be_bytes());
        h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = sha2::Sha256::digest(&*h);
        h[448..480].copy_from_slice(&sum);
    }
    out[AREA_OFFSET as usize..AREA_OFFSET as usize + area_size].copy_from_slice(&material);
    Ok((
        out,
        Unlocked {
            cipher: SectorCipher::new(&mk)?,
            payload_offset: DATA_OFFSET,
        },
    ))
}

fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Standard base64 (with padding) to bytes; None when malformed.
pub(crate) fn base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64("aGk=").unwrap(), b"hi");
        assert!(base64("a").is_none());
        assert!(base64("a*==").is_none());
        for n in 0..40u8 {
            let b: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64(&base64_encode(&b)).unwrap(), b);
        }
    }

    #[test]
    fn absurd_kdf_costs_are_refused_before_any_work() {
        let p = Path::new("t");
        let kdf = |memory: u64, time: u64, cpus: u64| {
            serde_json::json!({"type": "argon2id", "time": time, "memory": memory, "cpus": cpus,
                               "salt": "c2FsdHNhbHQ="})
        };
        assert!(parse_kdf(&kdf(1 << 20, 4, 4), "0", p).is_ok());
        for (m, t, c) in [
            (8 << 20, 4, 4),
            (1024, 100_000, 4),
            (1024, 4, 1000),
            (1024, 0, 4),
        ] {
            let e = parse_kdf(&kdf(m, t, c), "0", p).unwrap_err();
            assert_eq!(e.code(), crate::error::Code::SnapshotUnsupported, "{e}");
            assert!(e.message().contains("before any work"), "{e}");
        }
        let pb = serde_json::json!({"type": "pbkdf2", "hash": "sha256", "iterations": 4_000_000_000u64,
                                    "salt": "c2FsdA=="});
        assert!(parse_kdf(&pb, "0", p).is_err());
        let e = parse_kdf(
            &serde_json::json!({"type": "scrypt", "salt": "c2FsdA=="}),
            "1",
            p,
        );
        assert!(e.unwrap_err().message().contains("scrypt"));
    }

    #[test]
    fn a_created_header_unlocks_with_its_key_only() {
        let (h, u) = create(b"pw").unwrap();
        let p = Path::new("t");
        let read = |off: u64, len: usize| Ok(h[off as usize..off as usize + len].to_vec());
        let back = unlock(&read, h.len() as u64, b"pw", p).unwrap();
        assert_eq!(back.payload_offset, DATA_OFFSET);
        let (mut a, mut b) = (vec![3u8; 512], vec![3u8; 512]);
        u.cipher.encrypt(&mut a, 1);
        back.cipher.encrypt(&mut b, 1);
        assert_eq!(a, b);
        let e = unlock(&read, h.len() as u64, b"pw\n", p).err().unwrap();
        assert_eq!(e.code(), crate::error::Code::KeyMismatch);
        let mut bad = h.clone();
        bad[4096 + 20] ^= 1;
        let read = |off: u64, len: usize| Ok(bad[off as usize..off as usize + len].to_vec());
        let e = unlock(&read, h.len() as u64, b"pw", p).err().unwrap();
        assert!(e.message().contains("checksum"), "{e}");
    }
}
