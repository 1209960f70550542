//! The L1/L2 mapping: what is at a guest offset in one file of the chain, and for how long.
//!
//! [`Mapping::walk`] follows the L1 table (read whole when the file is opened) and the L2 tables
//! (read one cluster at a time, cached by host offset) from a guest offset, and returns the longest
//! run with one mapping ([`Seg`]): host bytes, one compressed cluster, zeros, or unallocated here.
//! [`merge_runs`] grows runs into an extent. Each call's work is capped: a run looks at most at
//! [`MAX_WALK_STEPS`] L1/L2 entries, an extent merges at most [`MAX_MERGED_RUNS`] runs; a shorter
//! extent is always allowed. The cache holds at most [`L2_CACHE_BYTES`] of tables.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::decompress;
use super::file::{read_exact, GuestOffset, HostOffset, ImageFile};
use super::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::error::{Code, Error, Result};
use crate::format::Extent;

/// L1 and L2 entries one mapping run looks at before it ends (the extent is cut there). Small in
/// unit tests, so that small images show the cut.
pub(super) const MAX_WALK_STEPS: u32 = if cfg!(test) { 1 << 8 } else { 1 << 16 };
/// Runs (each resolved through the backing file) merged into one extent.
pub(super) const MAX_MERGED_RUNS: u32 = 64;
/// Bytes of L2 tables cached per image before the cache is emptied.
pub(super) const L2_CACHE_BYTES: u64 = 64 << 20;
/// Bits of an L1 entry that must be zero (0-8, 56-62).
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero (1-8, 56-61).
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Entries per L2 table, as a power of two.
pub(super) fn l2_bits(cluster_bits: u32, extended_l2: bool) -> u32 {
    cluster_bits - if extended_l2 { 4 } else { 3 }
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seg {
    /// Stored at this host offset (for the run's first byte); contiguous in the file.
    Host(HostOffset),
    /// One compressed cluster (its L2 entry).
    Compressed(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated in this file: read through the backing file.
    Unalloc,
}

impl Seg {
    fn class(self) -> u8 {
        match self {
            Seg::Host(_) | Seg::Compressed(_) => 0,
            Seg::Zero => 1,
            Seg::Unalloc => 2,
        }
    }
}

/// What a run is for, which decides what merges into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Classifying extents: runs of one class merge (all data, all zero, all unallocated).
    Extent,
    /// Reading: only host-contiguous data, zeros or unallocated ranges merge, and a compressed
    /// cluster stands alone.
    Read,
}

/// Grows the run started at `start` by `seg` found at `at`, if they go together.
fn merge(first: &mut Option<Seg>, seg: Seg, start: u64, at: u64, mode: Mode) -> bool {
    match *first {
        None => {
            *first = Some(seg);
            true
        }
        Some(f) if mode == Mode::Extent => f.class() == seg.class(),
        Some(Seg::Host(h0)) => match seg {
            Seg::Host(h) => h0.0.checked_add(at - start) == Some(h.0),
            _ => false,
        },
        Some(Seg::Zero) => seg == Seg::Zero,
        Some(Seg::Unalloc) => seg == Seg::Unalloc,
        Some(Seg::Compressed(_)) => false,
    }
}

/// A run being walked: from guest offset `pos` to `cur` so far.
struct Run {
    pos: u64,
    cur: u64,
    first: Option<Seg>,
    /// L1 and L2 entries looked at: a run ends after [`MAX_WALK_STEPS`] of them (shorter extents
    /// are always allowed), so one call's work is bounded whatever the table says.
    steps: u32,
    mode: Mode,
}

impl Run {
    /// Counts one more entry looked at; false when the run must end before it.
    fn step(&mut self) -> bool {
        if self.steps >= MAX_WALK_STEPS && self.cur > self.pos {
            return false;
        }
        self.steps += 1;
        true
    }

    /// Adds `seg`, found at `cur`, to the run; false when it does not go with it.
    fn push(&mut self, seg: Seg) -> bool {
        merge(&mut self.first, seg, self.pos, self.cur, self.mode)
    }
}

/// Cluster size and L2 entry format of a file.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(crate) cluster_bits: u32,
    pub(crate) extended_l2: bool,
    /// Version 3 without extended L2: bit 0 of an L2 entry means "reads as zeros".
    pub(crate) zero_flag: bool,
}

/// One file's mapping: its L1 table and a cache of its L2 tables.
pub(super) struct Mapping {
    pub(crate) geo: Geometry,
    /// The L1 table read (the active one, or the selected snapshot's).
    l1: Vec<u64>,
    l2_cache: RwLock<HashMap<HostOffset, Arc<[u64]>>>,
}

impl Mapping {
    /// Reads the L1 table of `l1_size` entries at `l1_offset` (placed by `header::check_l1`) and
    /// refuses one that shares L2 tables; `snapshot` names the snapshot whose table it is.
    pub(crate) fn load(
        file: &ImageFile,
        geo: Geometry,
        l1_offset: u64,
        l1_size: u32,
        snapshot: Option<&str>,
    ) -> Result<Mapping> {
        let raw_l1 = read_exact(
            &file.file,
            &file.path,
            l1_offset,
            l1_size as usize * 8,
            "the L1 table",
        )?;
        let l1: Vec<u64> = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(raw_l1);
        check_l2_tables_distinct(&file.path, &l1, snapshot)?;
        Ok(Mapping {
            geo,
            l1,
            l2_cache: RwLock::new(HashMap::new()),
        })
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.geo.cluster_bits
    }

    /// The L2 table at host offset `off` (as u64 entries; pairs for extended L2).
    fn l2_table(
        &self,
        file: &ImageFile,
        off: HostOffset,
        guest: GuestOffset,
    ) -> Result<Arc<[u64]>> {
        {
            let cache = self.l2_cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = cache.get(&off) {
                return Ok(t.clone());
            }
        }
        let cs = self.cluster_size();
        if !off.0.is_multiple_of(cs) {
            return Err(file.corrupt_at(
                guest,
                format!("its L1 entry's L2 table offset {off} is not aligned to a cluster"),
            ));
        }
        if off.0.checked_add(cs).is_none_or(|e| e > file.size) {
            return Err(file.corrupt_at(
                guest,
                format!("its L1 entry's L2 table offset {off} runs past the end of the file"),
            ));
        }
        let mut buf = vec![0u8; cs as usize];
        let n = file
            .read_at(off, &mut buf)
            .map_err(|e| Error::io(&file.path, &format!("reading the L2 table at {off}"), e))?;
        if n < buf.len() {
            return Err(file.corrupt_at(
                guest,
                format!("its L2 table at {off} runs past the end of the file"),
            ));
        }
        let table: Arc<[u64]> = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut cache = self.l2_cache.write().unwrap_or_else(|e| e.into_inner());
        let max = (L2_CACHE_BYTES / cs).max(1) as usize;
        if cache.len() >= max {
            cache.clear();
        }
        cache.insert(off, table.clone());
        Ok(table)
    }

    /// A data cluster's host offset: aligned, and inside the file.
    fn check_host(&self, file: &ImageFile, host: HostOffset, guest: GuestOffset) -> Result<()> {
        if !host.0.is_multiple_of(self.cluster_size()) {
            return Err(file.corrupt_at(
                guest,
                format!("its L2 entry has the unaligned host offset {host}"),
            ));
        }
        if host.0 >= file.size {
            return Err(file.corrupt_at(
                guest,
                format!(
                    "its L2 entry points at host offset {host}, past the end of the file ({} bytes)",
                    file.size
                ),
            ));
        }
        Ok(())
    }

    /// The longest run from `pos` (before `limit`) with one mapping in this file, and where it
    /// ends; what merges depends on `mode`.
    pub(crate) fn walk(
        &self,
        file: &ImageFile,
        pos: GuestOffset,
        limit: GuestOffset,
        mode: Mode,
    ) -> Result<(Seg, GuestOffset)> {
        let l1_shift = self.geo.cluster_bits + l2_bits(self.geo.cluster_bits, self.geo.extended_l2);
        let limit = limit.0;
        let mut run = Run {
            pos: pos.0,
            cur: pos.0,
            first: None,
            steps: 0,
            mode,
        };
        while run.cur < limit {
            if !run.step() {
                break;
            }
            let l1_idx = run.cur >> l1_shift;
            let guest = GuestOffset(run.cur);
            let l1e = usize::try_from(l1_idx)
                .ok()
                .and_then(|i| self.l1.get(i))
                .copied()
                .ok_or_else(|| file.corrupt_at(guest, "no L1 entry covers it"))?;
            if l1e & L1E_RESERVED != 0 {
                return Err(file.corrupt_at(
                    guest,
                    format!("its L1 entry 0x{l1e:016x} (L2 table offset) has reserved bits set"),
                ));
            }
            let l2_off = l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                if !run.push(Seg::Unalloc) {
                    break;
                }
                run.cur = ((l1_idx + 1) << l1_shift).min(limit);
                continue;
            }
            let l2 = self.l2_table(file, HostOffset(l2_off), guest)?;
            if !self.walk_l2(file, &l2, limit, &mut run)? {
                break;
            }
        }
        match run.first {
            Some(s) if run.cur > run.pos => Ok((s, GuestOffset(run.cur))),
            _ => Err(Error::new(
                Code::Internal,
                format!("{}: empty mapping run at {}", file.path.display(), run.pos),
            )),
        }
    }

    /// Walks the entries of one L2 table from `run.cur`, to its end or `limit`; false when the
    /// run ended inside it.
    fn walk_l2(&self, file: &ImageFile, l2: &[u64], limit: u64, run: &mut Run) -> Result<bool> {
        let cb = self.geo.cluster_bits;
        let n_l2 = 1usize << l2_bits(cb, self.geo.extended_l2);
        let mut idx = ((run.cur >> cb) as usize) & (n_l2 - 1);
        while run.cur < limit && idx < n_l2 {
            if !run.step() {
                return Ok(false);
            }
            let (entry, bitmap) = if self.geo.extended_l2 {
                (l2[2 * idx], l2[2 * idx + 1])
            } else {
                (l2[idx], 0)
            };
            if !self.walk_entry(file, entry, bitmap, limit, run)? {
                return Ok(false);
            }
            idx += 1;
        }
        Ok(true)
    }

    /// Adds the cluster of `run.cur` (up to `limit`), described by L2 `entry` (and its subcluster
    /// `bitmap` in extended L2), to the run; false when the run ended inside it.
    fn walk_entry(
        &self,
        file: &ImageFile,
        entry: u64,
        bitmap: u64,
        limit: u64,
        run: &mut Run,
    ) -> Result<bool> {
        let cs = self.cluster_size();
        let cur = run.cur;
        let guest = GuestOffset(cur);
        let cstart = cur & !(cs - 1);
        let cend = cstart.saturating_add(cs).min(limit);
        if entry & OFLAG_COMPRESSED != 0 {
            decompress::locate(file, self.geo.cluster_bits, entry, guest)?;
            if !run.push(Seg::Compressed(entry)) {
                return Ok(false);
            }
            run.cur = cend;
            return Ok(true);
        }
        if entry & L2E_RESERVED != 0 {
            return Err(file.corrupt_at(
                guest,
                format!("its L2 entry 0x{entry:016x} has reserved bits set"),
            ));
        }
        let host = entry & L2E_OFFSET_MASK;
        if self.geo.extended_l2 {
            return self.walk_subclusters(file, host, bitmap, cstart, cend, run);
        }
        let seg = if self.geo.zero_flag && entry & OFLAG_ZERO != 0 {
            Seg::Zero
        } else if host == 0 {
            Seg::Unalloc
        } else {
            self.check_host(file, HostOffset(host), guest)?;
            Seg::Host(HostOffset(host + (cur - cstart)))
        };
        if !run.push(seg) {
            return Ok(false);
        }
        run.cur = cend;
        Ok(true)
    }

    /// Extended L2: the cluster at `cstart` (host offset `host`) has 32 subclusters, allocation
    /// bits 0-31 and zero bits 32-63 of `bitmap`; adds those from `run.cur` to `cend` to the run.
    fn walk_subclusters(
        &self,
        file: &ImageFile,
        host: u64,
        bitmap: u64,
        cstart: u64,
        cend: u64,
        run: &mut Run,
    ) -> Result<bool> {
        let sc_bits = self.geo.cluster_bits - 5;
        while run.cur < cend {
            let cur = run.cur;
            let guest = GuestOffset(cur);
            let sc = (cur - cstart) >> sc_bits;
            let alloc = (bitmap >> sc) & 1 != 0;
            let zero = (bitmap >> (32 + sc)) & 1 != 0;
            let seg = match (alloc, zero) {
                (true, true) => {
                    return Err(
                        file.corrupt_at(guest, "its subcluster is marked both allocated and zero")
                    )
                }
                (false, true) => Seg::Zero,
                (true, false) => {
                    if host == 0 {
                        return Err(file.corrupt_at(
                            guest,
                            "its subcluster is allocated but the cluster has no host offset",
                        ));
                    }
                    self.check_host(file, HostOffset(host), guest)?;
                    Seg::Host(HostOffset(host + (cur - cstart)))
                }
                (false, false) => Seg::Unalloc,
            };
            if !run.push(seg) {
                return Ok(false);
            }
            run.cur = (cstart + ((sc + 1) << sc_bits)).min(cend);
        }
        Ok(true)
    }
}

/// The extent from `offset` (before `limit`): the run `run_at(offset)` finds, grown by the runs
/// that follow while they have its kind, at most [`MAX_MERGED_RUNS`] runs in all.
pub(super) fn merge_runs(
    offset: u64,
    limit: u64,
    mut run_at: impl FnMut(u64) -> Result<Extent>,
) -> Result<Extent> {
    let first = run_at(offset)?;
    let mut end = first.end();
    for _ in 1..MAX_MERGED_RUNS {
        if end >= limit {
            break;
        }
        let next = run_at(end)?;
        if next.kind != first.kind {
            break;
        }
        end = next.end();
    }
    Ok(Extent {
        start: offset,
        len: end - offset,
        kind: first.kind,
    })
}

/// Refuses an L1 table in which two entries point at the same L2 table. qemu never writes one (an
/// L2 table is shared only between L1 tables, by snapshots); allowing it would let a small file
/// describe an exabyte of data clusters by repeating one table, and make mapping it take forever.
/// With distinct tables, walking the whole disk costs at most one step per L1 entry plus one per
/// L2 entry present in the file.
fn check_l2_tables_distinct(
    path: &std::path::Path,
    l1: &[u64],
    snapshot: Option<&str>,
) -> Result<()> {
    let mut offs: Vec<u64> = l1
        .iter()
        .map(|e| e & L1E_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    offs.sort_unstable();
    let Some(dup) = offs.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) else {
        return Ok(());
    };
    let mut at = l1
        .iter()
        .enumerate()
        .filter(|(_, e)| *e & L1E_OFFSET_MASK == dup)
        .map(|(i, _)| i);
    let (a, b) = (at.next().unwrap_or(0), at.next().unwrap_or(0));
    let table = match snapshot {
        Some(s) => format!("the L1 table of snapshot '{s}'"),
        None => "the L1 table".to_string(),
    };
    Err(Error::corrupt(
        path,
        format!("L1 entries {a} and {b} of {table} both point at the L2 table at {dup}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ExtentKind;

    fn one_byte(at: u64, kind: ExtentKind) -> Result<Extent> {
        Ok(Extent {
            start: at,
            len: 1,
            kind,
        })
    }

    #[test]
    fn an_extent_merges_at_most_max_merged_runs() {
        let e = merge_runs(10, 1000, |at| one_byte(at, ExtentKind::Data)).unwrap();
        assert_eq!((e.start, e.len), (10, u64::from(MAX_MERGED_RUNS)));
    }

    #[test]
    fn an_extent_stops_at_a_run_of_another_kind_or_the_limit() {
        let kind = |at| {
            if at < 13 {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            }
        };
        let e = merge_runs(10, 1000, |at| one_byte(at, kind(at))).unwrap();
        assert_eq!((e.len, e.kind), (3, ExtentKind::Zero));
        let e = merge_runs(10, 12, |at| one_byte(at, ExtentKind::Data)).unwrap();
        assert_eq!(e.len, 2);
    }

    #[test]
    fn merging_follows_the_mode() {
        let h = |o| Seg::Host(HostOffset(o));
        let mut first = None;
        assert!(merge(&mut first, h(4096), 0, 0, Mode::Read));
        assert!(merge(&mut first, h(8192), 0, 4096, Mode::Read));
        assert!(!merge(&mut first, h(4096), 0, 4096, Mode::Read));
        assert!(!merge(&mut first, Seg::Compressed(0), 0, 4096, Mode::Read));
        assert!(merge(&mut first, Seg::Compressed(0), 0, 4096, Mode::Extent));
        assert!(!merge(&mut first, Seg::Zero, 0, 4096, Mode::Extent));
    }
}
