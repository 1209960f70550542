//! LUKS encryption: raw LUKS volumes (`format=luks`, found by the `LUKS\xba\xbe` magic) as sources
//! and outputs, and the LUKS header inside an encrypted qcow2 (`crypt_method` 2).
//!
//! - [`luks1`] and [`luks2`]: header parsing (every field bounded, KDF cost refused before any
//!   work), key-slot unlock, and (LUKS1) creation;
//! - [`crypto`]: AES-XTS sectors with the `plain64` IV, PBKDF2/argon2, the AF splitter;
//! - [`secret`]: passphrases, from a file, a descriptor or the environment, never argv;
//! - [`writer`]: raw output as a LUKS volume.
//!
//! A raw LUKS volume's guest disk is its payload: the bytes from the payload offset to the end of
//! the file, decrypted sector by sector (IV = the sector's number inside the payload). The whole
//! payload is data (a hole in ciphertext does not read as zeros), so reading one costs its size.
//!
//! | bound | value |
//! |---|---|
//! | PBKDF2 iterations (key slot or digest) | [`MAX_PBKDF2_ITERATIONS`] |
//! | argon2 memory / time / lanes | [`luks2::MAX_ARGON2_MEMORY_KIB`], [`luks2::MAX_ARGON2_TIME`], [`luks2::MAX_ARGON2_LANES`] |
//! | LUKS2 JSON area | [`luks2::MAX_JSON_BYTES`] |
//! | stripes | exactly 4000 |

pub(crate) mod crypto;
pub(crate) mod luks1;
pub(crate) mod luks2;
pub(crate) mod secret;
pub(crate) mod writer;

use crate::format::input::{Input, RandomRead};
use std::path::{Path, PathBuf};

pub(crate) use secret::Secret;

use super::read_full_at;
use super::{BlockSource, Driver, Extent, ExtentKind, Format, Opened, ReadDriver};
use crate::error::{Code, Error, Result};
use crypto::{SectorCipher, SECTOR};

/// Most PBKDF2 iterations a key slot or digest may ask for (qemu's and cryptsetup's 2-second
/// calibrations give a few million on fast machines); more is refused before any work.
pub(crate) const MAX_PBKDF2_ITERATIONS: u32 = 20_000_000;
/// Bytes read at the start of a header to tell LUKS1 from LUKS2.
const HEAD_BYTES: usize = 4096;

/// raw LUKS's registry entry: probed before raw. Encrypted raw output is raw with `--encrypt`.
pub(crate) const DRIVER: Driver = Driver {
    name: "luks",
    extension: "luks",
    read: Some(ReadDriver {
        format: Format::Luks,
        probe: |p| p.head.starts_with(luks1::MAGIC),
        open,
        open_layer: |_file, path, _chain, _gate| {
            Err(crate::error::Error::unsupported(
                path,
                "a LUKS volume as a backing file is not supported; kiln reads encrypted qcow2 layers and LUKS volumes named directly",
            ))
        },
    }),
    write: None,
};

/// What a manifest may say of a volume: never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeInfo {
    /// 1 or 2.
    pub(crate) luks_version: u8,
    /// 256 (AES-128-XTS) or 512 (AES-256-XTS).
    pub(crate) key_bits: u32,
    /// The key slot's KDF: `pbkdf2-sha256`, `argon2id`, ...
    pub(crate) kdf: String,
}

/// An opened volume: the master key's cipher and where the payload starts.
pub(crate) struct Unlocked {
    pub(crate) cipher: SectorCipher,
    /// Bytes from the start of the header to the payload.
    pub(crate) payload_offset: u64,
}

pub(crate) fn kdf_too_costly(path: &Path, what: String) -> Error {
    Error::unsupported(
        path,
        format!(
            "the LUKS header asks for {what}, more than kiln allows (PBKDF2 at most {MAX_PBKDF2_ITERATIONS} iterations, argon2 at most {} MiB and {} passes); refused before any work",
            luks2::MAX_ARGON2_MEMORY_KIB / 1024,
            luks2::MAX_ARGON2_TIME
        ),
    )
}

pub(crate) fn wrong_key(path: &Path) -> Error {
    Error::new(
        Code::KeyMismatch,
        format!(
            "{}: the key given does not open the volume (no LUKS key slot accepts it); check the key file (its bytes are the passphrase, a trailing newline included)",
            path.display()
        ),
    )
}

/// The error for an encrypted source opened without a key.
pub(crate) fn key_needed(path: &Path) -> Error {
    Error::new(
        Code::MissingParameter,
        format!(
            "{} is encrypted (LUKS): give its key with key-file=FILE in --disk, a request file's KeyFile, or --key-file/--key-fd/--key-env",
            path.display()
        ),
    )
}

/// The LUKS version of the header that starts with `head`, checked to be one kiln reads.
fn version(head: &[u8], path: &Path) -> Result<u16> {
    if !head.starts_with(luks1::MAGIC) && !head.starts_with(luks2::MAGIC2) {
        return Err(Error::corrupt(path, "the LUKS header has no LUKS magic"));
    }
    match head.get(6..8).map(|v| u16::from_be_bytes([v[0], v[1]])) {
        Some(v @ (1 | 2)) => Ok(v),
        Some(v) => Err(Error::unsupported(
            path,
            format!("LUKS version {v} is not supported (kiln reads 1 and 2)"),
        )),
        None => Err(Error::corrupt(path, "the LUKS header is cut short")),
    }
}

/// Opens the LUKS header at the start of an area of `area` bytes, read through `read(offset, len)`
/// (offsets inside the area), with `key`.
pub(crate) fn unlock(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    area: u64,
    key: &Secret,
    path: &Path,
) -> Result<Unlocked> {
    let head = read(0, HEAD_BYTES.min(area as usize))?;
    if version(&head, path)? == 1 {
        let h = luks1::parse(&head, area, path)?;
        luks1::unlock(&h, key.bytes(), read, path)
    } else {
        luks2::unlock(read, area, key.bytes(), path)
    }
}

/// What the LUKS header at the start of an area says without a key (version, key size, key-slot
/// KDF), every field checked as for an unlock, and where its payload starts. Derives no key.
pub(crate) fn describe(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    area: u64,
    path: &Path,
) -> Result<(VolumeInfo, u64)> {
    let head = read(0, HEAD_BYTES.min(area as usize))?;
    if version(&head, path)? == 1 {
        let h = luks1::parse(&head, area, path)?;
        Ok((h.info(), h.payload_offset))
    } else {
        let p = luks2::parse(read, area, path)?;
        Ok((p.info(), p.payload_offset()))
    }
}

/// Decodes and checks a LUKS1 or LUKS2 header held in memory (`bytes`: the header area), with
/// every bound applied, and derives no key: what the fuzz target exercises. Returns the payload
/// offset (LUKS1) or 0 (LUKS2).
pub fn check_header(bytes: &[u8]) -> Result<u64> {
    let path = Path::new("<memory>");
    let area = bytes.len() as u64;
    let read = |off: u64, len: usize| {
        let end = off.checked_add(len as u64).filter(|&e| e <= area);
        match end {
            Some(e) => Ok(bytes[off as usize..e as usize].to_vec()),
            None => Err(Error::corrupt(
                path,
                format!("LUKS data at {off}..+{len} is past the end"),
            )),
        }
    };
    match bytes.get(6..8).map(|v| u16::from_be_bytes([v[0], v[1]])) {
        _ if !bytes.starts_with(luks1::MAGIC) => Err(Error::corrupt(path, "no LUKS magic")),
        Some(1) => luks1::parse(bytes, area, path).map(|h| h.payload_offset),
        Some(2) => luks2::parse(&read, area, path).map(|_| 0),
        _ => Err(Error::unsupported(path, "not LUKS version 1 or 2")),
    }
}

/// A reader of `file` at `base + offset` that refuses to read past `base + area`.
pub(crate) fn area_reader<'a>(
    file: &'a dyn RandomRead,
    base: u64,
    area: u64,
    path: &'a Path,
) -> impl Fn(u64, usize) -> Result<Vec<u8>> + 'a {
    move |off, len| {
        let end = off.checked_add(len as u64).filter(|&e| e <= area);
        if end.is_none() {
            return Err(Error::corrupt(
                path,
                format!(
                    "LUKS data at bytes {off}..+{len} lies past the header area ({area} bytes)"
                ),
            ));
        }
        let mut buf = vec![0u8; len];
        let n = read_full_at(file, &mut buf, base + off)
            .map_err(|e| Error::io(path, &format!("reading the LUKS header at {off}"), e))?;
        if n < len {
            return Err(Error::corrupt(
                path,
                format!(
                    "the LUKS header is cut short at byte {}",
                    base + off + n as u64
                ),
            ));
        }
        Ok(buf)
    }
}

/// Opens a raw LUKS volume with the key the gate carries (a keyless gate: for its map only).
pub(crate) fn open(
    file: Input,
    path: &Path,
    snapshot: Option<&str>,
    gate: &super::gate::BackingGate,
) -> Result<Opened> {
    super::no_snapshot(path, snapshot, "a LUKS volume")?;
    let size = file.len().map_err(|e| Error::io(path, "sizing", e))?;
    let read = area_reader(&file, 0, size, path);
    let (payload, cipher) = match &gate.key {
        Some(key) => {
            let u = unlock(&read, size, key, path)?;
            (u.payload_offset, Some(u.cipher))
        }
        None if gate.keyless => (describe(&read, size, path)?.1, None),
        None => return Err(key_needed(path)),
    };
    drop(read);
    let virtual_size = (size - payload) / SECTOR * SECTOR;
    let src = LuksSource {
        file,
        path: path.to_path_buf(),
        payload,
        virtual_size,
        cipher,
    };
    Ok(Opened::single(
        Box::new(src),
        path,
        Format::Luks,
        virtual_size,
    ))
}

/// A raw LUKS volume's guest disk: its payload, decrypted.
pub(crate) struct LuksSource {
    file: Input,
    path: PathBuf,
    payload: u64,
    virtual_size: u64,
    /// None when opened without a key (inspect): the payload is mapped, never read.
    cipher: Option<SectorCipher>,
}

impl BlockSource for LuksSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Every byte of the payload is data: ciphertext has no holes that read as zeros.
    fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        Ok(Extent {
            start: offset,
            len: max_len.min(self.virtual_size.saturating_sub(offset)),
            kind: ExtentKind::Data,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = super::read_end(&self.path, offset, buf.len(), self.virtual_size)?;
        let cipher = self.cipher.as_ref().ok_or_else(|| key_needed(&self.path))?;
        read_decrypted(
            cipher,
            (offset, end),
            buf,
            |at| at / SECTOR,
            |at, out| {
                let n = read_full_at(&self.file, out, self.payload + at).map_err(|e| {
                    Error::io(&self.path, &format!("reading the payload at {at}"), e)
                })?;
                out[n..].fill(0);
                Ok(())
            },
        )
    }
}

/// Fills `buf` with the plaintext of guest bytes `[offset, end)`: reads whole sectors (through
/// `read(sector-aligned offset, out)`), decrypts them with their IVs (`iv(sector-aligned offset)`
/// is the first sector's IV number), keeps the part asked.
pub(crate) fn read_decrypted(
    cipher: &SectorCipher,
    (offset, end): (u64, u64),
    buf: &mut [u8],
    iv: impl Fn(u64) -> u64,
    read: impl Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let start = offset / SECTOR * SECTOR;
    let stop = end.next_multiple_of(SECTOR);
    if start == offset && stop == end {
        read(start, buf)?;
        cipher.decrypt(buf, iv(start));
        return Ok(());
    }
    let mut tmp = vec![0u8; (stop - start) as usize];
    read(start, &mut tmp)?;
    cipher.decrypt(&mut tmp, iv(start));
    let at = (offset - start) as usize;
    buf.copy_from_slice(&tmp[at..at + buf.len()]);
    Ok(())
}
