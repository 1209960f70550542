//! The primitives LUKS is built from, all from RustCrypto: AES-XTS with the `plain64` IV (the
//! 512-byte sector number, little endian), PBKDF2-HMAC and argon2 key derivation, and the
//! anti-forensic (AF) splitter that spreads a master key over 4000 stripes.

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use sha2::Digest;
use xts_mode::{get_tweak_default, Xts128};
use zeroize::Zeroizing;

use crate::error::{Code, Error, Result};

/// LUKS encrypts 512-byte sectors (the IV counts them).
pub(crate) const SECTOR: u64 = 512;

enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// `aes-xts-plain64` with one key: encrypts and decrypts whole 512-byte sectors in place.
pub(crate) struct SectorCipher(Xts);

impl SectorCipher {
    /// A cipher for a 32-byte (AES-128-XTS) or 64-byte (AES-256-XTS) key.
    pub(crate) fn new(key: &[u8]) -> Result<SectorCipher> {
        let half = key.len() / 2;
        let bad = || {
            Error::new(
                Code::Internal,
                format!("an XTS key of {} bytes (32 or 64 expected)", key.len()),
            )
        };
        let x = match key.len() {
            32 => Xts::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..half]).map_err(|_| bad())?,
                Aes128::new_from_slice(&key[half..]).map_err(|_| bad())?,
            ))),
            64 => Xts::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..half]).map_err(|_| bad())?,
                Aes256::new_from_slice(&key[half..]).map_err(|_| bad())?,
            ))),
            _ => return Err(bad()),
        };
        Ok(SectorCipher(x))
    }

    /// Encrypts `buf` (whole sectors) whose first sector has IV number `first_sector`.
    pub(crate) fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        let n = buf.len() - buf.len() % SECTOR as usize;
        let buf = &mut buf[..n];
        match &self.0 {
            Xts::Aes128(x) => x.encrypt_area(buf, 512, first_sector.into(), get_tweak_default),
            Xts::Aes256(x) => x.encrypt_area(buf, 512, first_sector.into(), get_tweak_default),
        }
    }

    /// Decrypts `buf` (whole sectors) whose first sector has IV number `first_sector`.
    pub(crate) fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        let n = buf.len() - buf.len() % SECTOR as usize;
        let buf = &mut buf[..n];
        match &self.0 {
            Xts::Aes128(x) => x.decrypt_area(buf, 512, first_sector.into(), get_tweak_default),
            Xts::Aes256(x) => x.decrypt_area(buf, 512, first_sector.into(), get_tweak_default),
        }
    }
}

/// The hashes LUKS headers name (for PBKDF2 and the AF splitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    /// The hash named in a header (`sha256`), in any case.
    pub(crate) fn parse(name: &str) -> Option<Hash> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Some(Hash::Sha1),
            "sha256" => Some(Hash::Sha256),
            "sha512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash into `out`.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        }
    }

    /// `hash(be32(iv) || data)`, cut to `out.len()` (at most the hash length).
    fn counter_hash(self, iv: u32, data: &[u8], out: &mut [u8]) {
        fn run<D: Digest>(iv: u32, data: &[u8], out: &mut [u8]) {
            let mut d = D::new();
            d.update(iv.to_be_bytes());
            d.update(data);
            let h = d.finalize();
            out.copy_from_slice(&h[..out.len()]);
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(iv, data, out),
            Hash::Sha256 => run::<sha2::Sha256>(iv, data, out),
            Hash::Sha512 => run::<sha2::Sha512>(iv, data, out),
        }
    }

    /// The AF splitter's diffusion: each hash-sized piece of `buf` replaced by the hash of its
    /// index and itself (the last piece may be shorter).
    fn diffuse(self, buf: &mut [u8]) {
        let hl = self.len();
        let mut tmp = Zeroizing::new(vec![0u8; hl]);
        for (i, piece) in buf.chunks_mut(hl).enumerate() {
            let out = &mut tmp[..piece.len()];
            self.counter_hash(i as u32, piece, out);
            piece.copy_from_slice(out);
        }
    }
}

/// AF-merges `stripes` blocks of `key_len` bytes into the key they hide.
pub(crate) fn af_merge(
    material: &[u8],
    key_len: usize,
    stripes: usize,
    hash: Hash,
) -> Zeroizing<Vec<u8>> {
    let mut block = Zeroizing::new(vec![0u8; key_len]);
    for s in material.chunks_exact(key_len).take(stripes - 1) {
        xor_into(&mut block, s);
        hash.diffuse(&mut block);
    }
    let last = &material[(stripes - 1) * key_len..stripes * key_len];
    xor_into(&mut block, last);
    block
}

/// AF-splits `key` into `stripes` blocks (all but the last random).
pub(crate) fn af_split(key: &[u8], stripes: usize, hash: Hash) -> Result<Zeroizing<Vec<u8>>> {
    let kl = key.len();
    let mut out = Zeroizing::new(vec![0u8; kl * stripes]);
    random(&mut out[..kl * (stripes - 1)])?;
    let mut block = Zeroizing::new(vec![0u8; kl]);
    for s in out[..kl * (stripes - 1)].chunks_exact(kl) {
        xor_into(&mut block, s);
        hash.diffuse(&mut block);
    }
    xor_into(&mut block, key);
    out[kl * (stripes - 1)..].copy_from_slice(&block);
    Ok(out)
}

fn xor_into(acc: &mut [u8], x: &[u8]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

/// Fills `buf` from the OS random source (keys, salts, AF stripes).
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf)
        .map_err(|e| Error::new(Code::Internal, format!("the OS random source failed: {e}")))
}

/// argon2i or argon2id (version 0x13) into `out`; memory in KiB.
pub(crate) fn argon2(
    id: bool,
    password: &[u8],
    salt: &[u8],
    time: u32,
    memory_kib: u32,
    lanes: u32,
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let alg = if id {
        argon2::Algorithm::Argon2id
    } else {
        argon2::Algorithm::Argon2i
    };
    let params =
        argon2::Params::new(memory_kib, time, lanes, Some(out.len())).map_err(|e| e.to_string())?;
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(password, salt, out)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_split_then_merge_gives_the_key_back() {
        let key: Vec<u8> = (0..64u8).collect();
        for h in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let m = af_split(&key, 4000, h).unwrap();
            assert_eq!(&af_merge(&m, 64, 4000, h)[..], &key[..]);
            let mut bad = m.clone();
            bad[10] ^= 1;
            assert_ne!(&af_merge(&bad, 64, 4000, h)[..], &key[..]);
        }
    }

    #[test]
    fn xts_round_trips_and_depends_on_the_sector_number() {
        let c = SectorCipher::new(&[7u8; 64]).unwrap();
        let plain = vec![0x5au8; 1024];
        let mut a = plain.clone();
        c.encrypt(&mut a, 3);
        assert_ne!(a, plain);
        assert_ne!(a[..512], a[512..], "each sector has its own IV");
        let mut b = plain.clone();
        c.encrypt(&mut b[512..], 4);
        assert_eq!(a[512..], b[512..]);
        c.decrypt(&mut a, 3);
        assert_eq!(a, plain);
        assert!(SectorCipher::new(&[0u8; 48]).is_err());
    }

    #[test]
    fn pbkdf2_matches_rfc_6070() {
        let mut out = [0u8; 20];
        Hash::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }
}
