//! LUKS1 headers (the on-disk format of cryptsetup's `--type luks1` and of qemu's `luks` driver and
//! qcow2 encryption): decoded into named fields, then validated with every count, size and KDF
//! cost bounded before any key derivation runs; unlocked by trying each active key slot; and
//! created for kiln's encrypted outputs.
//!
//! ```text
//! 0    magic "LUKS\xba\xbe"      6    version (be16) = 1
//! 8    cipher name (32, "aes")   40   cipher mode (32, "xts-plain64")   72  hash spec (32)
//! 104  payload offset (sectors)  108  key bytes   112 master-key digest (20)
//! 132  digest salt (32)          164  digest iterations                 168 UUID (40)
//! 208  8 key slots of 48 bytes: active, iterations, salt (32), material offset (sectors), stripes
//! ```

use std::path::Path;

use zeroize::Zeroizing;

use super::crypto::{self, Hash, SectorCipher, SECTOR};
use super::{kdf_too_costly, Unlocked, VolumeInfo, MAX_PBKDF2_ITERATIONS};
use crate::error::{Code, Error, Result};

pub(crate) const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Bytes of the fixed header, key slots included.
pub(crate) const HEADER_LEN: usize = 592;
const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// The only stripe count cryptsetup and qemu write and accept.
pub(crate) const STRIPES: u32 = 4000;
/// The first key material starts at 4 KiB; each slot's area is aligned to 4 KiB (qemu's layout).
const KEY_MATERIAL_START: u32 = 8;
const ALIGN_SECTORS: u32 = 8;

/// A key slot as read.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    active: u32,
    iterations: u32,
    salt: [u8; 32],
    offset: u32,
    stripes: u32,
}

/// A LUKS1 header, decoded and validated.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) hash: Hash,
    pub(crate) payload_offset: u64,
    key_bytes: usize,
    digest: [u8; 20],
    digest_salt: [u8; 32],
    digest_iterations: u32,
    slots: Vec<Slot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// Sectors one key slot's material takes (`key_bytes * stripes`, rounded up to 4 KiB).
fn material_sectors(key_bytes: u32, stripes: u32) -> u32 {
    (key_bytes * stripes)
        .div_ceil(SECTOR as u32)
        .next_multiple_of(ALIGN_SECTORS)
}

/// Decodes and validates a LUKS1 header. `area` is how many bytes the header may span (the file's
/// size for a raw volume, the header extension's length inside a qcow2).
pub(crate) fn parse(b: &[u8], area: u64, path: &Path) -> Result<Header> {
    if b.len() < HEADER_LEN {
        return Err(Error::corrupt(
            path,
            format!(
                "the LUKS header is cut short ({} of {HEADER_LEN} bytes)",
                b.len()
            ),
        ));
    }
    let (cipher, mode, hash) = (text(&b[8..40]), text(&b[40..72]), text(&b[72..104]));
    if !cipher.eq_ignore_ascii_case("aes") || !mode.eq_ignore_ascii_case("xts-plain64") {
        return Err(Error::unsupported(
            path,
            format!("LUKS cipher '{cipher}-{mode}' is not supported (kiln reads aes-xts-plain64)"),
        ));
    }
    let hash = Hash::parse(&hash).ok_or_else(|| {
        Error::unsupported(
            path,
            format!("LUKS hash '{hash}' is not supported (sha1, sha256, sha512)"),
        )
    })?;
    let key_bytes = be32(b, 108);
    if key_bytes != 32 && key_bytes != 64 {
        return Err(Error::corrupt(
            path,
            format!("LUKS key_bytes is {key_bytes} (aes-xts takes 32 or 64)"),
        ));
    }
    let payload = be32(b, 104);
    let digest_iterations = be32(b, 164);
    if digest_iterations == 0 || digest_iterations > MAX_PBKDF2_ITERATIONS {
        return Err(kdf_too_costly(
            path,
            format!("master-key digest iterations {digest_iterations}"),
        ));
    }
    let mut slots = Vec::with_capacity(SLOTS);
    for i in 0..SLOTS {
        let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
        let slot = Slot {
            active: be32(s, 0),
            iterations: be32(s, 4),
            salt: s[8..40].try_into().unwrap_or([0; 32]),
            offset: be32(s, 40),
            stripes: be32(s, 44),
        };
        check_slot(i, &slot, key_bytes, payload, path)?;
        slots.push(slot);
    }
    if !slots.iter().any(|s| s.active == SLOT_ACTIVE) {
        return Err(Error::new(
            Code::KeyMismatch,
            format!(
                "{}: the LUKS header has no active key slot; no key opens it",
                path.display()
            ),
        ));
    }
    let payload_offset = u64::from(payload) * SECTOR;
    if payload_offset > area {
        return Err(Error::corrupt(
            path,
            format!("LUKS payload_offset {payload} sectors lies past the end ({area} bytes)"),
        ));
    }
    Ok(Header {
        hash,
        payload_offset,
        key_bytes: key_bytes as usize,
        digest: b[112..132].try_into().unwrap_or([0; 20]),
        digest_salt: b[132..164].try_into().unwrap_or([0; 32]),
        digest_iterations,
        slots,
    })
}

impl Header {
    /// What may be shown without a key: the key size and the key slots' KDF.
    pub(crate) fn info(&self) -> VolumeInfo {
        VolumeInfo {
            luks_version: 1,
            key_bits: self.key_bytes as u32 * 8,
            kdf: format!("pbkdf2-{}", self.hash.name()),
        }
    }
}

fn check_slot(i: usize, s: &Slot, key_bytes: u32, payload: u32, path: &Path) -> Result<()> {
    match s.active {
        SLOT_INACTIVE => return Ok(()),
        SLOT_ACTIVE => {}
        v => {
            return Err(Error::corrupt(
                path,
                format!("LUKS key slot {i}: active is 0x{v:08x} (neither enabled nor disabled)"),
            ))
        }
    }
    if s.stripes != STRIPES {
        return Err(Error::corrupt(
            path,
            format!(
                "LUKS key slot {i}: stripes is {} (must be {STRIPES})",
                s.stripes
            ),
        ));
    }
    if s.iterations == 0 || s.iterations > MAX_PBKDF2_ITERATIONS {
        return Err(kdf_too_costly(
            path,
            format!("key slot {i}: {} PBKDF2 iterations", s.iterations),
        ));
    }
    let end = u64::from(s.offset) + u64::from(material_sectors(key_bytes, s.stripes));
    if u64::from(s.offset) * SECTOR < HEADER_LEN as u64 || end > u64::from(payload) {
        return Err(Error::corrupt(
            path,
            format!(
                "LUKS key slot {i}: key material at sector {} (key_material_offset) overlaps the header or the payload at sector {payload}",
                s.offset
            ),
        ));
    }
    Ok(())
}

/// Tries each active slot with `key`; `read(offset, len)` reads the header area. A slot whose
/// material cannot be read is corrupt; a key that opens no slot is KeyMismatch.
pub(crate) fn unlock(
    h: &Header,
    key: &[u8],
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<Unlocked> {
    let kb = h.key_bytes;
    for s in h.slots.iter().filter(|s| s.active == SLOT_ACTIVE) {
        let mut derived = Zeroizing::new(vec![0u8; kb]);
        h.hash.pbkdf2(key, &s.salt, s.iterations, &mut derived);
        let len = material_sectors(kb as u32, s.stripes) as usize * SECTOR as usize;
        let mut material = Zeroizing::new(read(u64::from(s.offset) * SECTOR, len)?);
        SectorCipher::new(&derived)?.decrypt(&mut material, 0);
        let mk = crypto::af_merge(&material, kb, s.stripes as usize, h.hash);
        if digest_of(h, &mk) == h.digest {
            return Ok(Unlocked {
                cipher: SectorCipher::new(&mk)?,
                payload_offset: h.payload_offset,
            });
        }
    }
    Err(super::wrong_key(path))
}

fn digest_of(h: &Header, mk: &[u8]) -> [u8; 20] {
    let mut d = [0u8; 20];
    h.hash
        .pbkdf2(mk, &h.digest_salt, h.digest_iterations, &mut d);
    d
}

/// Key-slot PBKDF2-SHA256 iterations kiln writes (qemu and cryptsetup time theirs; kiln's are fixed
/// so a create costs the same everywhere).
pub(crate) const SLOT_ITERATIONS: u32 = 200_000;
/// Master-key digest iterations kiln writes.
pub(crate) const DIGEST_ITERATIONS: u32 = 20_000;

/// A new LUKS1 volume: its header area (header and key material, `payload_sectors * 512` bytes),
/// and the cipher of its fresh random master key.
pub(crate) struct Created {
    pub(crate) header: Vec<u8>,
    pub(crate) unlocked: Unlocked,
}

/// Creates a LUKS1 header for `aes-xts-plain64` with a 512-bit random master key and key slot 0
/// opened by `key` (PBKDF2-SHA256, [`SLOT_ITERATIONS`]). The payload starts at `payload_sectors`,
/// or right after the key material when None (qemu's layout inside a qcow2).
pub(crate) fn create(key: &[u8], payload_sectors: Option<u32>) -> Result<Created> {
    const KB: u32 = 64;
    let hash = Hash::Sha256;
    let per_slot = material_sectors(KB, STRIPES);
    let end = KEY_MATERIAL_START + SLOTS as u32 * per_slot;
    let payload = payload_sectors.unwrap_or(end).max(end);
    let mut mk = Zeroizing::new(vec![0u8; KB as usize]);
    crypto::random(&mut mk)?;
    let mut h = vec![0u8; payload as usize * SECTOR as usize];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, MAGIC);
    put(6, &1u16.to_be_bytes());
    put(8, b"aes");
    put(40, b"xts-plain64");
    put(72, b"sha256");
    put(104, &payload.to_be_bytes());
    put(108, &KB.to_be_bytes());
    let mut salt = [0u8; 32];
    crypto::random(&mut salt)?;
    let mut digest = [0u8; 20];
    hash.pbkdf2(&mk, &salt, DIGEST_ITERATIONS, &mut digest);
    put(112, &digest);
    put(132, &salt);
    put(164, &DIGEST_ITERATIONS.to_be_bytes());
    put(168, uuid()?.as_bytes());
    for i in 0..SLOTS {
        let at = 208 + 48 * i;
        let offset = KEY_MATERIAL_START + i as u32 * per_slot;
        let active = if i == 0 { SLOT_ACTIVE } else { SLOT_INACTIVE };
        put(at, &active.to_be_bytes());
        put(at + 40, &offset.to_be_bytes());
        put(at + 44, &STRIPES.to_be_bytes());
        if i == 0 {
            let mut slot_salt = [0u8; 32];
            crypto::random(&mut slot_salt)?;
            put(at + 4, &SLOT_ITERATIONS.to_be_bytes());
            put(at + 8, &slot_salt);
            let mut derived = Zeroizing::new(vec![0u8; KB as usize]);
            hash.pbkdf2(key, &slot_salt, SLOT_ITERATIONS, &mut derived);
            let mut material = crypto::af_split(&mk, STRIPES as usize, hash)?;
            material.resize(per_slot as usize * SECTOR as usize, 0);
            SectorCipher::new(&derived)?.encrypt(&mut material, 0);
            put(offset as usize * SECTOR as usize, &material);
        }
    }
    Ok(Created {
        header: h,
        unlocked: Unlocked {
            cipher: SectorCipher::new(&mk)?,
            payload_offset: u64::from(payload) * SECTOR,
        },
    })
}

/// A random (version 4) UUID in its text form.
pub(crate) fn uuid() -> Result<String> {
    let mut u = [0u8; 16];
    crypto::random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(h: &[u8]) -> impl Fn(u64, usize) -> Result<Vec<u8>> + '_ {
        move |off, len| Ok(h[off as usize..off as usize + len].to_vec())
    }

    #[test]
    fn a_created_header_unlocks_with_its_key_only() {
        let c = create(b"secret\n", None).unwrap();
        let p = Path::new("t");
        let h = parse(&c.header, c.header.len() as u64, p).unwrap();
        assert_eq!(h.payload_offset, c.header.len() as u64);
        let u = unlock(&h, b"secret\n", &reader(&c.header), p).unwrap();
        let mut a = vec![1u8; 512];
        let mut b = a.clone();
        u.cipher.encrypt(&mut a, 9);
        c.unlocked.cipher.encrypt(&mut b, 9);
        assert_eq!(a, b, "the unlocked master key is the one created");
        let e = unlock(&h, b"secret", &reader(&c.header), p).err().unwrap();
        assert_eq!(e.code(), Code::KeyMismatch);
    }

    #[test]
    fn damaged_fields_are_named_before_any_kdf_runs() {
        let c = create(b"k", Some(4096)).unwrap();
        let p = Path::new("t");
        let mut b = c.header.clone();
        b[208 + 44..208 + 48].copy_from_slice(&3999u32.to_be_bytes());
        assert!(parse(&b, 1 << 30, p)
            .unwrap_err()
            .message()
            .contains("stripes"));
        let mut b = c.header.clone();
        b[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = parse(&b, 1 << 30, p).unwrap_err();
        assert_eq!(e.code(), Code::SnapshotUnsupported);
        assert!(e.message().contains("iterations"), "{e}");
        let mut b = c.header.clone();
        b[208..212].copy_from_slice(&7u32.to_be_bytes());
        assert!(parse(&b, 1 << 30, p)
            .unwrap_err()
            .message()
            .contains("active"));
        let mut b = c.header.clone();
        b[208 + 40..208 + 44].copy_from_slice(&4090u32.to_be_bytes());
        assert!(parse(&b, 1 << 30, p)
            .unwrap_err()
            .message()
            .contains("key_material_offset"));
        assert!(parse(&c.header[..100], 1 << 30, p)
            .unwrap_err()
            .message()
            .contains("cut short"));
        let mut b = c.header.clone();
        b[108..112].copy_from_slice(&48u32.to_be_bytes());
        assert!(parse(&b, 1 << 30, p)
            .unwrap_err()
            .message()
            .contains("key_bytes"));
    }

    #[test]
    fn a_damaged_key_slot_does_not_open() {
        let c = create(b"k", None).unwrap();
        let p = Path::new("t");
        let h = parse(&c.header, c.header.len() as u64, p).unwrap();
        let mut b = c.header.clone();
        b[8 * 512 + 100] ^= 0xff;
        let e = unlock(&h, b"k", &reader(&b), p).err().unwrap();
        assert_eq!(e.code(), Code::KeyMismatch);
    }
}
