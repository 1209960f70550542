//! Image check (the clouds' DetectionStrategy, done offline on the bytes): partition table,
//! partitions and their filesystems, what boots the disk (BIOS boot code, an EFI System Partition's
//! removable-media loader), and the OS from `/etc/os-release`, each as a [`Item`] with Pass, Warn
//! or Fail, checked against the image's BootMode, Architecture and Platform.
//!
//! Everything is read through a [`BlockSource`], so it works on raw and qcow2 files, snapshots and
//! kiln's own output. The disk is untrusted: every size and count read from it is bounded, the FAT
//! and ext4 readers go through a read budget, and a damaged structure becomes a Fail (or Warn) item,
//! never an abort.

pub(crate) mod esp;
pub(crate) mod fs;
pub(crate) mod gpt;
pub(crate) mod mbr;
pub(crate) mod osrelease;
pub(crate) mod relocate;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::image::attributes::{Architecture, BootMode, Platform};

use crate::error::Result;
use crate::format::BlockSource;
use crate::util::size::human;

use fs::FsKind;
use osrelease::OsRelease;

/// The only strategy there is (the API's `DetectionStrategy: Standard`).
pub(crate) const STANDARD: &str = "Standard";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "Pass",
            Status::Warn => "Warn",
            Status::Fail => "Fail",
        }
    }
}

/// One check and what it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    #[serde(rename = "Check")]
    pub(crate) check: String,
    #[serde(rename = "Status")]
    pub(crate) status: Status,
    #[serde(rename = "Message")]
    pub(crate) message: String,
}

/// A partition as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Partition {
    /// 1-based as Linux numbers them; 0 for a filesystem on the whole disk.
    #[serde(rename = "Number")]
    pub(crate) number: u32,
    /// Byte offset on the disk.
    #[serde(rename = "Start")]
    pub(crate) start: u64,
    #[serde(rename = "Size")]
    pub(crate) size: u64,
    /// The type's name (`EFI System`, `Linux filesystem`, ...), or `other`.
    #[serde(rename = "Type")]
    pub(crate) type_name: String,
    /// The GPT type GUID, or the MBR type byte as `0x83`.
    #[serde(rename = "TypeId")]
    pub(crate) type_id: String,
    /// The GPT partition name.
    #[serde(rename = "Name", default, skip_serializing_if = "String::is_empty")]
    pub(crate) name: String,
    #[serde(rename = "Filesystem")]
    pub(crate) filesystem: Option<String>,
    #[serde(skip)]
    fs: Option<FsKind>,
    #[serde(skip)]
    esp: bool,
}

/// What the image is checked against (canonical spellings; None: not checked).
#[derive(Debug, Clone, Default)]
pub(crate) struct DetectOptions {
    pub(crate) boot_mode: Option<BootMode>,
    pub(crate) architecture: Option<Architecture>,
    pub(crate) platform: Option<Platform>,
}

/// The report: the manifest's `Detection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Report {
    #[serde(rename = "Strategy")]
    pub(crate) strategy: String,
    /// The worst item's status.
    #[serde(rename = "Result")]
    pub(crate) result: Status,
    /// GPT, MBR or None.
    #[serde(rename = "PartitionTable")]
    pub(crate) partition_table: String,
    #[serde(rename = "Partitions")]
    pub(crate) partitions: Vec<Partition>,
    /// The boot modes the disk supports: BIOS, UEFI, both, or none.
    #[serde(rename = "BootModes")]
    pub(crate) boot_modes: Vec<String>,
    /// The architectures the ESP's loaders are for.
    #[serde(rename = "Architectures")]
    pub(crate) architectures: Vec<String>,
    #[serde(rename = "Os")]
    pub(crate) os: Option<OsRelease>,
    /// The Platform the OS maps to (None when no os-release was found).
    #[serde(rename = "Platform")]
    pub(crate) platform: Option<Platform>,
    #[serde(rename = "Items")]
    pub(crate) items: Vec<Item>,
}

impl Report {
    pub(crate) fn has_fail(&self) -> bool {
        self.result == Status::Fail
    }

    fn push(&mut self, check: impl Into<String>, status: Status, message: impl Into<String>) {
        self.items.push(Item {
            check: check.into(),
            status,
            message: message.into(),
        });
    }
}

/// Runs every check on `src`. Only an I/O error reading the disk is an `Err`; anything wrong in
/// the disk's contents is an item.
pub(crate) fn detect(src: Arc<dyn BlockSource>, opts: &DetectOptions) -> Result<Report> {
    let mut r = Report {
        strategy: STANDARD.into(),
        result: Status::Pass,
        partition_table: "None".into(),
        partitions: Vec::new(),
        boot_modes: Vec::new(),
        architectures: Vec::new(),
        os: None,
        platform: None,
        items: Vec::new(),
    };
    let size = src.virtual_size();
    let disk = src.as_ref();
    let sector0 = if size >= 512 {
        Some(gpt::read_vec(disk, 0, 512)?)
    } else {
        None
    };
    let mbr = sector0.as_deref().and_then(mbr::Mbr::parse);
    let mut bios_boot_partition = None;
    if let Some(g) = gpt::read(disk)? {
        bios_boot_partition = gpt_partitions(&mut r, &g, mbr.as_ref(), disk)?;
    } else if let Some(m) = mbr.as_ref().filter(|m| plausible_mbr(m, size)) {
        mbr_partitions(&mut r, m, disk)?;
    } else {
        whole_disk(&mut r, disk, size)?;
    }

    boot_items(&mut r, &src, mbr.as_ref(), bios_boot_partition, opts);
    os_item(&mut r, &src, opts);
    r.result = r
        .items
        .iter()
        .map(|i| i.status)
        .max()
        .unwrap_or(Status::Pass);
    Ok(r)
}

/// The partitions of a GPT disk, each checked; the BIOS boot partition's number, if any.
fn gpt_partitions(
    r: &mut Report,
    g: &gpt::Gpt,
    mbr: Option<&mbr::Mbr>,
    disk: &dyn BlockSource,
) -> Result<Option<u32>> {
    let mut bios_boot_partition = None;
    r.partition_table = "GPT".into();
    gpt_items(r, g, mbr);
    let ss = g.sector_size;
    for e in &g.entries {
        let start = e.first_lba.saturating_mul(ss);
        let len = e
            .last_lba
            .saturating_sub(e.first_lba)
            .saturating_add(1)
            .saturating_mul(ss);
        let type_name = gpt::type_name(&e.type_guid).unwrap_or("other");
        if e.type_guid == gpt::BIOS_BOOT {
            bios_boot_partition = Some(e.number);
        }
        let mut p = Partition {
            number: e.number,
            start,
            size: len,
            type_name: type_name.into(),
            type_id: e.type_guid.to_string(),
            name: e.name.clone(),
            filesystem: None,
            fs: None,
            esp: e.type_guid == gpt::ESP,
        };
        let inside = g.header().is_none_or(|h| {
            e.first_lba >= h.first_usable_lba
                && e.last_lba <= h.last_usable_lba
                && e.first_lba <= e.last_lba
        });
        partition_item(r, &mut p, disk, inside)?;
        r.partitions.push(p);
    }
    Ok(bios_boot_partition)
}

/// The primary and logical partitions of an MBR disk, each checked.
fn mbr_partitions(r: &mut Report, m: &mbr::Mbr, disk: &dyn BlockSource) -> Result<()> {
    r.partition_table = "MBR".into();
    r.push(
        "PartitionTable",
        Status::Pass,
        format!("MBR with {} primary partition(s)", m.primaries.len()),
    );
    let mut list = m.primaries.clone();
    for e in &m.primaries {
        if mbr::is_extended(e.kind) {
            let (logical, stopped) = mbr::logical(disk, e)?;
            list.extend(logical);
            if let Some(why) = stopped {
                r.push(
                    format!("Partition {}", e.number),
                    Status::Warn,
                    format!("extended partition: {why}; later logical partitions were not read"),
                );
            }
        }
    }
    for e in list.iter().filter(|e| !mbr::is_extended(e.kind)) {
        let mut p = Partition {
            number: e.number,
            start: e.start_lba.saturating_mul(512),
            size: e.sectors.saturating_mul(512),
            type_name: mbr::type_name(e.kind).into(),
            type_id: format!("{:#04x}", e.kind),
            name: String::new(),
            filesystem: None,
            fs: None,
            esp: e.kind == mbr::ESP_TYPE,
        };
        let inside = e.start_lba >= 1 && e.sectors > 0;
        partition_item(r, &mut p, disk, inside)?;
        r.partitions.push(p);
    }
    Ok(())
}

/// A disk with no partition table: a filesystem on the whole disk, or nothing known.
fn whole_disk(r: &mut Report, disk: &dyn BlockSource, size: u64) -> Result<()> {
    let whole = fs::probe(disk, 0, size)?;
    r.push(
        "PartitionTable",
        Status::Warn,
        match whole {
            Some(k) => format!(
                "no partition table: a {} filesystem on the whole disk; firmware and most boot loaders expect a table",
                k.as_str()
            ),
            None => "no partition table and no filesystem signature".into(),
        },
    );
    if let Some(k) = whole {
        r.partitions.push(Partition {
            number: 0,
            start: 0,
            size,
            type_name: "whole disk".into(),
            type_id: String::new(),
            name: String::new(),
            filesystem: Some(k.as_str().into()),
            fs: Some(k),
            esp: false,
        });
    }
    Ok(())
}

/// An MBR whose used entries start inside the disk (a FAT boot sector on a whole disk has 0x55AA
/// too, with boot code where the table would be).
fn plausible_mbr(m: &mbr::Mbr, size: u64) -> bool {
    let sectors = size / 512;
    !m.primaries.is_empty()
        && m.primaries
            .iter()
            .all(|e| e.start_lba >= 1 && e.start_lba < sectors && e.sectors > 0)
}

fn gpt_items(r: &mut Report, g: &gpt::Gpt, mbr: Option<&mbr::Mbr>) {
    let last = g.last_lba();
    let ss = g.sector_size;
    match (&g.primary, &g.backup) {
        (Ok(p), _) => r.push(
            "PartitionTable",
            Status::Pass,
            format!(
                "GPT ({ss}-byte sectors), {} partition(s) in {} entries of {} bytes; primary header and entries valid (CRC32 checked)",
                g.entries.len(),
                p.header.entry_count,
                p.header.entry_size
            ),
        ),
        (Err(pe), Ok(b)) => r.push(
            "PartitionTable",
            Status::Fail,
            format!(
                "GPT primary header or entries damaged ({pe}); the backup at LBA {} is intact: repair with `sgdisk -v`/gdisk's recovery menu before using the image",
                b.header.my_lba
            ),
        ),
        (Err(pe), Err(be)) => r.push(
            "PartitionTable",
            Status::Fail,
            format!("GPT damaged: primary: {pe}; backup: {be}"),
        ),
    }
    match (&g.primary, &g.backup) {
        (Ok(_), Ok(b)) if b.header.my_lba == last => r.push(
            "GptBackup",
            Status::Pass,
            format!("backup header and entries valid, at the disk's last LBA {last}"),
        ),
        (Ok(_), Ok(b)) => r.push(
            "GptBackup",
            Status::Warn,
            format!(
                "the backup GPT header is at LBA {}, not at the disk's last LBA {last} (the disk grew); firmware and the kernel may call the table damaged: create with --relocate-gpt to move it to the end (as sgdisk -e does)",
                b.header.my_lba
            ),
        ),
        (Ok(_), Err(be)) => {
            let grown = g.primary.as_ref().is_ok_and(|p| p.header.alternate_lba != last);
            r.push(
                "GptBackup",
                Status::Fail,
                if grown {
                    format!("backup GPT damaged ({be}) and not at the disk's last LBA {last}")
                } else {
                    format!("backup GPT damaged: {be}")
                },
            )
        }
        (Err(_), Ok(b)) if b.header.my_lba != last => r.push(
            "GptBackup",
            Status::Warn,
            format!(
                "the backup GPT header is at LBA {}, not at the disk's last LBA {last}",
                b.header.my_lba
            ),
        ),
        _ => {}
    }
    match mbr {
        Some(m) if m.is_protective() && m.primaries.len() > 1 => r.push(
            "ProtectiveMbr",
            Status::Pass,
            format!(
                "hybrid MBR: a 0xEE entry and {} other partition(s)",
                m.primaries.len() - 1
            ),
        ),
        Some(m) if m.is_protective() => {
            r.push("ProtectiveMbr", Status::Pass, "protective MBR (0xEE)")
        }
        _ => r.push(
            "ProtectiveMbr",
            Status::Warn,
            "no protective MBR (an 0xEE partition in sector 0): MBR-only tools may see the disk as empty",
        ),
    }
}

/// Probes a partition's filesystem and pushes its item.
fn partition_item(
    r: &mut Report,
    p: &mut Partition,
    disk: &dyn BlockSource,
    inside: bool,
) -> Result<()> {
    let size = disk.virtual_size();
    let check = format!("Partition {}", p.number);
    let end = p.start.saturating_add(p.size);
    if !inside || end > size || p.size == 0 {
        r.push(
            check,
            Status::Fail,
            format!(
                "{}: bytes {}..{} lie outside the disk ({size} bytes) or its usable area",
                p.type_name, p.start, end
            ),
        );
        return Ok(());
    }
    p.fs = fs::probe(disk, p.start, p.size)?;
    p.filesystem = p.fs.map(|k| k.as_str().to_string());
    let named = if p.name.is_empty() {
        String::new()
    } else {
        format!(" '{}'", p.name)
    };
    r.push(
        check,
        Status::Pass,
        format!(
            "{}{named}, {} at byte {}, {}",
            p.type_name,
            human(p.size),
            p.start,
            match p.fs {
                Some(k) => format!("{} filesystem", k.as_str()),
                None => "no filesystem signature".into(),
            }
        ),
    );
    Ok(())
}

/// Runs a third-party reader on untrusted bytes; a panic in it becomes an error message.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the reader failed on damaged data".into()))
}

fn boot_items(
    r: &mut Report,
    src: &Arc<dyn BlockSource>,
    mbr: Option<&mbr::Mbr>,
    bios_boot_partition: Option<u32>,
    opts: &DetectOptions,
) {
    let bios = bios_item(r, mbr, bios_boot_partition);
    let loaders = uefi_items(r, src);
    let uefi = !loaders.is_empty();
    if bios {
        r.boot_modes.push("BIOS".into());
    }
    if uefi {
        r.boot_modes.push("UEFI".into());
    }
    for l in &loaders {
        if !r.architectures.iter().any(|a| a == l.arch) {
            r.architectures.push(l.arch.into());
        }
    }
    boot_mode_item(r, opts.boot_mode, bios, uefi);
    architecture_item(r, opts.architecture);
}

/// BiosBoot: whether BIOS can boot the disk.
fn bios_item(r: &mut Report, mbr: Option<&mbr::Mbr>, bios_boot_partition: Option<u32>) -> bool {
    // BIOS: boot code in sector 0 (a protective MBR's counts), or a BIOS boot partition for GRUB.
    let code = mbr.map_or(0, |m| m.boot_code_bytes);
    match (code, bios_boot_partition) {
        (0, None) => {
            r.push(
                "BiosBoot",
                Status::Pass,
                "no boot code in the MBR (bytes 0..440 are zero): BIOS cannot boot the disk",
            );
            false
        }
        (n, bbp) => {
            let mut parts = Vec::new();
            if n > 0 {
                parts.push(format!("MBR boot code ({n} non-zero bytes in 0..440)"));
            }
            if let Some(b) = bbp {
                parts.push(format!("BIOS boot partition {b}"));
            }
            r.push("BiosBoot", Status::Pass, parts.join(" and "));
            true
        }
    }
}

/// UefiBoot, one item per ESP: the removable-media loaders found.
fn uefi_items(r: &mut Report, src: &Arc<dyn BlockSource>) -> Vec<esp::Loader> {
    // UEFI: an ESP whose FAT holds \EFI\BOOT\BOOT<arch>.EFI.
    let esps: Vec<(u32, u64, u64)> = r
        .partitions
        .iter()
        .filter(|p| p.esp && p.size > 0)
        .map(|p| (p.number, p.start, p.size))
        .collect();
    let mut loaders = Vec::new();
    if esps.is_empty() {
        r.push(
            "UefiBoot",
            Status::Pass,
            "no EFI System Partition: UEFI cannot boot the disk",
        );
    }
    for (n, start, len) in esps {
        match guarded(|| esp::loaders(src.clone(), start, len)) {
            Ok(l) if l.is_empty() => r.push(
                "UefiBoot",
                Status::Warn,
                format!(
                    "EFI System Partition {n} has no \\EFI\\BOOT\\BOOTX64.EFI or BOOTAA64.EFI: a new VM's firmware (no NVRAM boot entries) will not find a loader"
                ),
            ),
            Ok(l) => {
                let names: Vec<String> = l
                    .iter()
                    .map(|x| format!("{} ({}, {} bytes)", x.path, x.arch, x.size))
                    .collect();
                r.push(
                    "UefiBoot",
                    Status::Pass,
                    format!("EFI System Partition {n} holds {}", names.join(", ")),
                );
                for x in &l {
                    if let Some(m) = x.pe_machine {
                        match esp::pe_arch(m) {
                            Some(a) if a == x.arch => {}
                            a => r.push(
                                "UefiBoot",
                                Status::Warn,
                                format!(
                                    "{} is a PE image for machine {m:#06x} ({}), not {}",
                                    x.path,
                                    a.unwrap_or("unknown"),
                                    x.arch
                                ),
                            ),
                        }
                    }
                }
                loaders.extend(l);
            }
            Err(e) => r.push(
                "UefiBoot",
                Status::Fail,
                format!("EFI System Partition {n}: {e}"),
            ),
        }
    }
    loaders
}

/// BootMode: whether the disk boots the way the image says it does.
fn boot_mode_item(r: &mut Report, boot_mode: Option<BootMode>, bios: bool, uefi: bool) {
    let found = match (bios, uefi) {
        (true, true) => "BIOS and UEFI (hybrid)",
        (true, false) => "BIOS only",
        (false, true) => "UEFI only",
        (false, false) => "neither BIOS nor UEFI",
    };
    use BootMode::{Bios, Uefi, UefiPreferred};
    let (status, message) = match (boot_mode, bios, uefi) {
        (_, false, false) => (
            Status::Fail,
            "nothing boots the disk: no MBR boot code or BIOS boot partition, and no ESP with a loader".to_string(),
        ),
        (None, _, _) => (Status::Pass, format!("the disk boots with {found}")),
        (Some(m @ Bios), true, _) | (Some(m @ Uefi), _, true) | (Some(m @ UefiPreferred), true, true) => (
            Status::Pass,
            format!("the disk boots with {found}; BootMode {m} fits"),
        ),
        (Some(Bios), false, true) => (
            Status::Fail,
            "the disk boots with UEFI only, but BootMode is BIOS: create with --boot-mode UEFI".into(),
        ),
        (Some(Uefi), true, false) => (
            Status::Fail,
            "the disk boots with BIOS only, but BootMode is UEFI: create with --boot-mode BIOS".into(),
        ),
        (Some(UefiPreferred), _, _) => (
            Status::Warn,
            format!("the disk boots with {found}; BootMode UEFI-Preferred needs both to boot on every instance type"),
        ),
    };
    r.push("BootMode", status, message);
}

/// Architecture: whether the ESP's loaders are for the image's architecture.
fn architecture_item(r: &mut Report, architecture: Option<Architecture>) {
    let (status, message) = match (
        architecture.map(Architecture::as_str),
        r.architectures.is_empty(),
    ) {
        (_, true) => (
            Status::Pass,
            "not determined: no EFI loader names an architecture".to_string(),
        ),
        (None, false) => (
            Status::Pass,
            format!("EFI loaders for {}", r.architectures.join(", ")),
        ),
        (Some(a), false) if r.architectures.iter().any(|x| x == a) => (
            Status::Pass,
            format!(
                "EFI loaders for {}; Architecture {a} fits",
                r.architectures.join(", ")
            ),
        ),
        (Some(a), false) => (
            Status::Fail,
            format!(
                "the ESP's loaders are for {}, but Architecture is {a}: create with --arch {}",
                r.architectures.join(", "),
                r.architectures[0]
            ),
        ),
    };
    r.push("Architecture", status, message);
}

fn os_item(r: &mut Report, src: &Arc<dyn BlockSource>, opts: &DetectOptions) {
    // Root-looking partitions first, then every other ext filesystem.
    let mut candidates: Vec<&Partition> = r
        .partitions
        .iter()
        .filter(|p| p.fs.is_some_and(FsKind::is_ext))
        .collect();
    candidates.sort_by_key(|p| !p.type_name.starts_with("Linux root"));
    let mut problems = Vec::new();
    let mut found = None;
    for p in candidates {
        match guarded(|| osrelease::read(src.clone(), p.start, p.size)) {
            Ok(Some(os)) => {
                found = Some((p.number, os));
                break;
            }
            Ok(None) => {}
            Err(e) => problems.push(format!("partition {}: {e}", p.number)),
        }
    }
    let Some((n, os)) = found else {
        let why = if problems.is_empty() {
            "no /etc/os-release on an ext2/3/4 filesystem".to_string()
        } else {
            problems.join("; ")
        };
        r.push(
            "OperatingSystem",
            Status::Warn,
            format!("{why}: the OS and its Platform could not be detected"),
        );
        return;
    };
    let platform = osrelease::platform(&os);
    let what = if os.pretty_name.is_empty() {
        format!("{} {}", os.name, os.version_id)
    } else {
        os.pretty_name.clone()
    };
    let where_ = if n == 0 {
        "the whole disk".to_string()
    } else {
        format!("partition {n}")
    };
    let (status, message) = match opts.platform {
        Some(p) if p != platform && platform != Platform::OthersLinux => (
            Status::Warn,
            format!(
                "{what} (ID={}, VERSION_ID={}) on {where_} is Platform {platform}, but Platform is {p}",
                os.id, os.version_id
            ),
        ),
        _ => (
            Status::Pass,
            format!(
                "{what} (ID={}, VERSION_ID={}) on {where_}: Platform {platform}",
                os.id, os.version_id
            ),
        ),
    };
    r.push("OperatingSystem", status, message);
    r.platform = Some(platform);
    r.os = Some(os);
}

/// Opens a disk file (`FILE@SNAP` for a qcow2 internal snapshot) read-only and checks it.
pub(crate) fn detect_file(
    path: &std::path::Path,
    format: Option<crate::format::Format>,
    gate: &crate::format::gate::BackingGate,
    opts: &DetectOptions,
) -> Result<Report> {
    let opened = crate::prepare::open(path, format, gate)?;
    detect(Arc::from(opened.source), opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::format::testing::Mem;

    /// xorshift64*: reproducible noise without a dependency.
    fn noise(seed: u64, buf: &mut [u8]) {
        let mut x = seed | 1;
        for b in buf {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            *b = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
    }

    fn run(disk: Vec<u8>) -> Report {
        detect(Arc::new(Mem(disk)), &DetectOptions::default()).expect("contents are never an error")
    }

    #[test]
    fn tiny_and_empty_disks() {
        for n in [0usize, 1, 511, 512, 1024, 1536] {
            let r = run(vec![0u8; n]);
            assert_eq!(r.partition_table, "None", "{n}");
            assert_eq!(r.result, Status::Fail, "{n}");
        }
    }

    #[test]
    fn noise_with_signatures_never_panics() {
        for seed in 0..200u64 {
            let mut d = vec![0u8; 256 * 1024];
            noise(seed, &mut d);
            // Make the structures look present so the parsers go past their first check.
            d[510] = 0x55;
            d[511] = 0xAA;
            if seed % 2 == 0 {
                d[512..520].copy_from_slice(gpt::SIGNATURE);
            }
            // An MBR entry for an ESP and one for an ext4 partition, over noise.
            let e = &mut d[446..462];
            e[4] = mbr::ESP_TYPE;
            e[8..12].copy_from_slice(&8u32.to_le_bytes());
            e[12..16].copy_from_slice(&200u32.to_le_bytes());
            let f = &mut d[462..478];
            f[4] = 0x83;
            f[8..12].copy_from_slice(&208u32.to_le_bytes());
            f[12..16].copy_from_slice(&200u32.to_le_bytes());
            // A FAT-ish boot sector and an ext4 magic inside them.
            d[8 * 512 + 510] = 0x55;
            d[8 * 512 + 511] = 0xAA;
            d[8 * 512 + 54..8 * 512 + 62].copy_from_slice(b"FAT16   ");
            d[208 * 512 + 1024 + 0x38..208 * 512 + 1024 + 0x3A]
                .copy_from_slice(&0xEF53u16.to_le_bytes());
            let r = run(d);
            assert!(!r.items.is_empty());
        }
    }

    #[test]
    fn a_gpt_with_an_absurd_entry_count_is_a_fail_item() {
        let mut d = vec![0u8; 1 << 20];
        let mut h = gpt::tests::header(2048, 1, 2, 0);
        h[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        gpt::tests::fix_crc(&mut h);
        d[512..1024].copy_from_slice(&h);
        let r = run(d);
        assert_eq!(r.partition_table, "GPT");
        assert_eq!(r.items[0].status, Status::Fail);
        assert!(
            r.items[0].message.contains("more than"),
            "{}",
            r.items[0].message
        );
    }
}
