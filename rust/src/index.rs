//! The prefix index: which workers hold which blocks of one model (docs/design.md §2, §3.1).
//!
//! Router sequence hashes chain over their parents, so a prefix match is a walk
//! down the prompt's hashes: `nodes` maps each router hash to the sorted list of
//! workers holding it (with a tier mask per worker). This is a radix tree whose
//! edges are implied by the hash chain, so no child pointers are stored.
//!
//! Engines name blocks by their own hashes; each worker keeps an engine-hash ->
//! router-hash map used only to resolve parents of stored events and to apply
//! removals (engine hashes are never trusted for matching).

use hashbrown::HashMap;
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::hashing::{chain_root, hash_blocks_from};
use crate::payload::{Event, Stored};
use crate::tier::Tier;

/// Hasher of the node table. Its keys are router hashes, xxh3 outputs already spread
/// evenly over 64 bits, so they are used as they are instead of being hashed again.
/// Measured against hashbrown's default hasher (rust/tests/timing.rs, two runs on a
/// loaded 2-core machine), 1 M keys: lookup hit 25-38 -> 20-22 ns, miss 9-16 -> 7-8 ns,
/// insert 102-127 -> 94-97 ns; a 16-block find_matches on 1 M entries ~8% faster (best
/// of 3: 1160 -> 1071 ns). Keys that are not xxh3 outputs stay correct, only slower.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyIsHash;

#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl std::hash::BuildHasher for KeyIsHash {
    type Hasher = PassThrough;
    #[inline]
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

impl std::hash::Hasher for PassThrough {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    /// Only u64 keys reach this hasher; other input is folded in so it still works.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
}

type NodeTable = HashMap<u64, Holders, KeyIsHash>;

/// One holder of a block: worker slot in the high bits, tier mask in the low 3.
type Holder = u32;
/// Up to 4 holders inline: the same 24 bytes as 2 inline (the spilled form's pointer and
/// length take 16), so blocks held by 3-4 workers need no second cache miss.
type Holders = SmallVec<[Holder; 4]>;

const TIER_BITS: u32 = 3;
const TIER_MASK: u32 = 0b111;
/// Slots are dense per index; this bounds workers per model to 2^29.
const MAX_SLOT: u32 = u32::MAX >> TIER_BITS;

/// Hints the CPU to start loading the cache line at `p` (a no-op off x86_64).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is a hint that never
        // faults or reads memory into the program, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline]
fn holder_slot(h: Holder) -> u32 {
    h >> TIER_BITS
}
#[inline]
fn holder_mask(h: Holder) -> u8 {
    (h & TIER_MASK) as u8
}

/// Declares the apply counters once: the struct fields, their names (exported to
/// Python as `ApplyResult.FIELDS`), adding and the fixed order snapshots store them in.
macro_rules! apply_result {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// Outcome counters of one apply call; also accumulated into [`Stats`].
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[cfg_attr(
            feature = "python",
            pyo3::pyclass(module = "kvrouter._core", frozen, get_all)
        )]
        pub struct ApplyResult {
            $($(#[$doc])* pub $field: u64,)*
            /// Why a payload was rejected (then `malformed` is 1), if it was.
            pub error: Option<String>,
        }

        impl ApplyResult {
            /// The counter names, in declaration (and snapshot) order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field),)*];

            pub fn add(&mut self, o: &ApplyResult) {
                $(self.$field += o.$field;)*
            }

            /// The counters' values in [`Self::FIELDS`] order.
            pub fn counters(&self) -> Vec<u64> {
                vec![$(self.$field,)*]
            }

            /// The inverse of [`Self::counters`]; `None` if the length differs.
            pub fn from_counters(values: &[u64]) -> Option<ApplyResult> {
                let mut it = values.iter().copied();
                let r = ApplyResult {
                    $($field: it.next()?,)*
                    error: None,
                };
                it.next().is_none().then_some(r)
            }
        }
    };
}

apply_result! {
    stored_blocks,
    duplicate_blocks,
    removed_blocks,
    unknown_removals,
    orphan_events,
    cleared_blocks,
    malformed,
    /// Stored events whose engine block size is not a multiple of the index's.
    mismatched_events,
}

/// Per-worker prefix match: blocks of the contiguous matched prefix, split by the
/// best tier holding each block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(module = "kvrouter._core", frozen, get_all)
)]
pub struct Overlap {
    pub gpu: u32,
    pub host: u32,
    pub disk: u32,
}

impl Overlap {
    #[inline]
    pub fn total(&self) -> u32 {
        self.gpu + self.host + self.disk
    }
    #[inline]
    fn bump(&mut self, mask: u8) {
        match Tier::best(mask) {
            Some(Tier::Gpu) => self.gpu += 1,
            Some(Tier::Host) => self.host += 1,
            Some(Tier::Disk) => self.disk += 1,
            None => {}
        }
    }
}

/// Router blocks a worker evicted from GPU lately, remembered per worker: a prompt that
/// asks for one again shows what evicting cost (the reuse estimate of the cost's
/// cache-pressure term, docs/design.md §3.3). Bounded: the oldest are forgotten.
#[derive(Debug, Default, Clone)]
pub struct Ghosts {
    /// Router hash -> sequence number of its latest eviction.
    at: HashMap<u64, u64>,
    /// (router hash, sequence number), oldest first; stale pairs are skipped on pop.
    order: std::collections::VecDeque<(u64, u64)>,
    seq: u64,
    /// GPU evictions ever recorded for the worker.
    pub evicted_total: u64,
}

/// Evicted blocks remembered per worker.
pub const GHOSTS_PER_WORKER: usize = 1024;

impl Ghosts {
    fn push(&mut self, hash: u64) {
        self.seq += 1;
        self.evicted_total += 1;
        self.at.insert(hash, self.seq);
        self.order.push_back((hash, self.seq));
        while self.at.len() > GHOSTS_PER_WORKER {
            let Some((h, q)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&h) == Some(&q) {
                self.at.remove(&h);
            }
        }
        // Stale pairs (re-evicted hashes) can pile up; drop them once they dominate.
        if self.order.len() > 2 * GHOSTS_PER_WORKER {
            let at = &self.at;
            self.order.retain(|(h, q)| at.get(h) == Some(q));
        }
    }

    fn forget(&mut self, hash: u64) {
        self.at.remove(&hash);
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.at.contains_key(&hash)
    }
}

#[derive(Debug, Default, Clone)]
struct WorkerState {
    slot: u32,
    /// Engine hash -> router hash of the engine block's last router block.
    blocks: HashMap<u64, u64>,
    /// Engine hash -> leading router hashes, only for engine blocks that span
    /// several router blocks (engine block size a multiple of the router's).
    split: HashMap<u64, Vec<u64>>,
    /// (router block, worker) pairs held.
    held: u64,
    ghosts: Ghosts,
}

impl WorkerState {
    fn router_hashes_of(&self, engine: u64) -> Option<SmallVec<[u64; 4]>> {
        let last = *self.blocks.get(&engine)?;
        let mut v: SmallVec<[u64; 4]> = SmallVec::new();
        if let Some(lead) = self.split.get(&engine) {
            v.extend_from_slice(lead);
        }
        v.push(last);
        Some(v)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub events: u64,
    pub totals: ApplyResult,
}

#[derive(Debug, Clone)]
pub struct PrefixIndex {
    block_size: u32,
    nodes: NodeTable,
    workers: HashMap<u64, WorkerState>,
    slots: Vec<Option<u64>>,
    free_slots: Vec<u32>,
    stats: Stats,
}

enum AddOutcome {
    New,
    NewTier,
    Duplicate,
}

impl PrefixIndex {
    pub fn new(block_size: u32) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::invalid("block_size must be > 0"));
        }
        Ok(PrefixIndex {
            block_size,
            nodes: NodeTable::default(),
            workers: HashMap::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            stats: Stats::default(),
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn worker_mut(&mut self, worker: u64) -> Result<&mut WorkerState> {
        match self.workers.entry(worker) {
            hashbrown::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            hashbrown::hash_map::Entry::Vacant(e) => {
                let slot = match self.free_slots.pop() {
                    Some(s) => s,
                    None => {
                        let s = self.slots.len() as u32;
                        if s > MAX_SLOT {
                            return Err(Error::invalid("too many workers for one index"));
                        }
                        self.slots.push(None);
                        s
                    }
                };
                self.slots[slot as usize] = Some(worker);
                Ok(e.insert(WorkerState {
                    slot,
                    ..WorkerState::default()
                }))
            }
        }
    }

    fn node_add(nodes: &mut NodeTable, hash: u64, slot: u32, bit: u8) -> AddOutcome {
        let holders = nodes.entry(hash).or_default();
        match holders.binary_search_by_key(&slot, |h| holder_slot(*h)) {
            Ok(i) => {
                let h = holders[i];
                if holder_mask(h) & bit != 0 {
                    AddOutcome::Duplicate
                } else {
                    holders[i] = h | u32::from(bit);
                    AddOutcome::NewTier
                }
            }
            Err(i) => {
                holders.insert(i, (slot << TIER_BITS) | u32::from(bit));
                AddOutcome::New
            }
        }
    }

    /// Clears `bits` of a holder; returns the mask it had (0: not held).
    fn node_remove(nodes: &mut NodeTable, hash: u64, slot: u32, bits: u8) -> u8 {
        let Some(holders) = nodes.get_mut(&hash) else {
            return 0;
        };
        let Ok(i) = holders.binary_search_by_key(&slot, |h| holder_slot(*h)) else {
            return 0;
        };
        let h = holders[i];
        let old = holder_mask(h);
        let new = old & !bits;
        if new == 0 {
            holders.remove(i);
            if holders.is_empty() {
                nodes.remove(&hash);
            } else if holders.spilled() && holders.len() <= 2 {
                holders.shrink_to_fit();
            }
        } else {
            holders[i] = (h & !TIER_MASK) | u32::from(new);
        }
        old
    }

    /// Applies a stored event. An unknown parent is an orphan: nothing changes.
    pub fn apply_stored(&mut self, worker: u64, ev: &Stored) -> ApplyResult {
        let mut res = ApplyResult::default();
        if let Err(_e) = ev.validate() {
            res.malformed = 1;
            return self.account(res);
        }
        // A block-size mismatch is a configuration problem: report it before anything else.
        if ev.router_hashes.is_none() && !ev.block_size.is_multiple_of(self.block_size) {
            res.mismatched_events = 1;
            return self.account(res);
        }
        // Resolve the chain start before touching anything.
        let parent_router = match ev.parent {
            None => chain_root(ev.extra_key.as_deref()),
            Some(p) => match self.workers.get(&worker).and_then(|w| w.blocks.get(&p)) {
                Some(r) => *r,
                None => {
                    res.orphan_events = 1;
                    return self.account(res);
                }
            },
        };
        // Router hashes grouped per engine block.
        let per_engine: usize;
        let router: Vec<u64> = match (&ev.router_hashes, &ev.tokens) {
            (Some(r), _) => {
                per_engine = 1;
                r.clone()
            }
            (None, Some(tokens)) => {
                per_engine = (ev.block_size / self.block_size) as usize;
                let mut out = Vec::with_capacity(ev.hashes.len() * per_engine);
                hash_blocks_from(tokens, self.block_size as usize, parent_router, &mut out);
                out
            }
            (None, None) => unreachable!("validated"),
        };
        let bit = ev.tier.bit();
        if self.worker_mut(worker).is_err() {
            res.malformed = 1;
            return self.account(res);
        }
        // Borrow the worker and the node table as disjoint fields.
        let Some(ws) = self.workers.get_mut(&worker) else {
            unreachable!("worker_mut created it")
        };
        let slot = ws.slot;
        for (engine, group) in ev.hashes.iter().zip(router.chunks_exact(per_engine)) {
            // chunks_exact(per_engine >= 1) yields non-empty groups.
            let Some(&last) = group.last() else { continue };
            // An engine hash re-stored under another router hash: drop the stale mapping.
            if let Some(old) = ws.blocks.get(engine).copied() {
                if old != last {
                    let stale = ws.router_hashes_of(*engine).unwrap_or_default();
                    for r in stale {
                        if Self::node_remove(&mut self.nodes, r, slot, TIER_MASK as u8) != 0 {
                            crate::decrement(&mut ws.held, 1);
                        }
                    }
                    ws.split.remove(engine);
                }
            }
            for r in group {
                if bit == Tier::Gpu.bit() {
                    ws.ghosts.forget(*r);
                }
                match Self::node_add(&mut self.nodes, *r, slot, bit) {
                    AddOutcome::New => {
                        ws.held += 1;
                        res.stored_blocks += 1;
                    }
                    AddOutcome::NewTier => res.stored_blocks += 1,
                    AddOutcome::Duplicate => res.duplicate_blocks += 1,
                }
            }
            ws.blocks.insert(*engine, last);
            if per_engine > 1 {
                ws.split.insert(*engine, group[..per_engine - 1].to_vec());
            }
        }
        self.account(res)
    }

    pub fn apply_removed(&mut self, worker: u64, hashes: &[u64], tier: Tier) -> ApplyResult {
        let mut res = ApplyResult::default();
        let Some(ws) = self.workers.get_mut(&worker) else {
            res.unknown_removals = hashes.len() as u64;
            return self.account(res);
        };
        let slot = ws.slot;
        let bit = tier.bit();
        for engine in hashes {
            let Some(group) = ws.router_hashes_of(*engine) else {
                res.unknown_removals += 1;
                continue;
            };
            let mut gone = true;
            let mut any = false;
            for r in group {
                let old = Self::node_remove(&mut self.nodes, r, slot, bit);
                if old & bit != 0 {
                    any = true;
                    res.removed_blocks += 1;
                    if bit == Tier::Gpu.bit() {
                        ws.ghosts.push(r);
                    }
                }
                if old & !bit != 0 {
                    gone = false;
                } else if old != 0 {
                    crate::decrement(&mut ws.held, 1);
                }
            }
            if !any {
                res.unknown_removals += 1;
            }
            if gone {
                ws.blocks.remove(engine);
                ws.split.remove(engine);
            }
        }
        self.account(res)
    }

    pub fn clear_worker(&mut self, worker: u64) -> ApplyResult {
        let mut res = ApplyResult::default();
        let Some(ws) = self.workers.get_mut(&worker) else {
            return self.account(res);
        };
        let slot = ws.slot;
        for (engine, last) in ws.blocks.drain() {
            if let Some(lead) = ws.split.get(&engine) {
                for r in lead {
                    if Self::node_remove(&mut self.nodes, *r, slot, TIER_MASK as u8) != 0 {
                        res.cleared_blocks += 1;
                    }
                }
            }
            if Self::node_remove(&mut self.nodes, last, slot, TIER_MASK as u8) != 0 {
                res.cleared_blocks += 1;
            }
        }
        ws.split.clear();
        ws.held = 0;
        ws.ghosts = Ghosts::default();
        ws.blocks.shrink_to_fit();
        ws.split.shrink_to_fit();
        self.account(res)
    }

    /// Forgets a worker entirely; returns the blocks it held.
    pub fn remove_worker(&mut self, worker: u64) -> u64 {
        let cleared = self.clear_worker(worker).cleared_blocks;
        if let Some(ws) = self.workers.remove(&worker) {
            self.slots[ws.slot as usize] = None;
            self.free_slots.push(ws.slot);
        }
        cleared
    }

    pub fn apply_event(&mut self, worker: u64, ev: &Event) -> ApplyResult {
        match ev {
            Event::Stored(s) => self.apply_stored(worker, s),
            Event::Removed { hashes, tier } => self.apply_removed(worker, hashes, *tier),
            Event::Cleared => self.clear_worker(worker),
        }
    }

    /// Records an apply in the lifetime counters and passes it through.
    fn account(&mut self, res: ApplyResult) -> ApplyResult {
        self.stats.events += 1;
        self.stats.totals.add(&res);
        res
    }

    pub fn note_malformed(&mut self) -> ApplyResult {
        let res = ApplyResult {
            malformed: 1,
            ..ApplyResult::default()
        };
        self.stats.totals.add(&res);
        res
    }

    /// Per worker (by id): the matched prefix of `hashes`, by tier.
    pub fn find_matches(&self, hashes: &[u64]) -> Vec<(u64, Overlap)> {
        let mut out = Vec::new();
        self.find_matches_into(hashes, &mut out);
        out
    }

    pub fn find_matches_into(&self, hashes: &[u64], out: &mut Vec<(u64, Overlap)>) {
        self.find_matches_iter(hashes.iter().copied(), out);
    }

    /// The match walk over hashes produced on demand (see `hashing::BlockHashes`):
    /// it stops at the first block no candidate worker holds.
    pub fn find_matches_iter(
        &self,
        mut hashes: impl Iterator<Item = u64>,
        out: &mut Vec<(u64, Overlap)>,
    ) {
        out.clear();
        let Some(first) = hashes.next() else {
            return;
        };
        let Some(holders) = self.nodes.get(&first) else {
            return;
        };
        // Active workers, sorted by slot like every holder list.
        let mut active: Vec<(u32, Overlap)> = holders
            .iter()
            .map(|h| {
                let mut o = Overlap::default();
                o.bump(holder_mask(*h));
                (holder_slot(*h), o)
            })
            .collect();
        let mut finished: Vec<(u32, Overlap)> = Vec::new();
        // Look blocks up a group at a time: the lookups of a group are independent, so
        // their cache misses overlap instead of being paid one after another (the walk
        // is memory-latency bound on large indexes). The first group is 8 blocks, the
        // next ones 16 (a walk that got past 8 blocks is likely to go on; 16 at a time was
        // 2.5 us faster at p50 on 512 matched blocks, docs/scaling.md); at most a group
        // minus one lookups (and hashes) are wasted past the match.
        const LOOKAHEAD: usize = 16;
        let mut width = 8;
        // A group's hashes are computed before any of its lookups: interleaved with the
        // hashing, fewer lookups were in flight at once (see the table in docs/scaling.md).
        let mut keys = [0u64; LOOKAHEAD];
        let mut group: [Option<&Holders>; LOOKAHEAD] = [None; LOOKAHEAD];
        'walk: loop {
            let mut n = 0;
            for hash in hashes.by_ref().take(width) {
                keys[n] = hash;
                n += 1;
            }
            if n == 0 {
                break;
            }
            for (g, k) in group.iter_mut().zip(&keys[..n]) {
                *g = self.nodes.get(k);
                // A spilled holder list is one more miss: start it with the others.
                if let Some(h) = g.filter(|h| h.spilled()) {
                    prefetch(h.as_ptr());
                }
            }
            for found in &group[..n] {
                let Some(holders) = found else {
                    break 'walk;
                };
                // Merge-intersect the two sorted lists in place.
                let mut keep = 0;
                let mut j = 0;
                for i in 0..active.len() {
                    let (slot, mut ov) = active[i];
                    while j < holders.len() && holder_slot(holders[j]) < slot {
                        j += 1;
                    }
                    if j < holders.len() && holder_slot(holders[j]) == slot {
                        ov.bump(holder_mask(holders[j]));
                        active[keep] = (slot, ov);
                        keep += 1;
                    } else {
                        finished.push((slot, ov));
                    }
                }
                active.truncate(keep);
                if active.is_empty() {
                    break 'walk;
                }
            }
            if n < width {
                break;
            }
            width = LOOKAHEAD;
        }
        finished.extend(active);
        out.extend(
            finished
                .into_iter()
                .filter_map(|(slot, ov)| self.slots[slot as usize].map(|w| (w, ov))),
        );
    }

    pub fn workers(&self) -> Vec<u64> {
        let mut w: Vec<u64> = self.workers.keys().copied().collect();
        w.sort_unstable();
        w
    }

    pub fn worker_blocks(&self, worker: u64) -> u64 {
        self.workers.get(&worker).map_or(0, |w| w.held)
    }

    /// The worker's recently evicted GPU blocks (none for an unknown worker).
    pub fn ghosts(&self, worker: u64) -> Option<&Ghosts> {
        self.workers.get(&worker).map(|w| &w.ghosts)
    }

    /// (router hash, tier mask) of every block a worker holds, sorted.
    pub fn worker_router_hashes(&self, worker: u64) -> Vec<(u64, u8)> {
        let Some(ws) = self.workers.get(&worker) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, u8)> = Vec::with_capacity(ws.held as usize);
        let mut push = |r: u64| {
            if let Some(holders) = self.nodes.get(&r) {
                if let Ok(i) = holders.binary_search_by_key(&ws.slot, |h| holder_slot(*h)) {
                    out.push((r, holder_mask(holders[i])));
                }
            }
        };
        for (engine, last) in &ws.blocks {
            if let Some(lead) = ws.split.get(engine) {
                lead.iter().for_each(|r| push(*r));
            }
            push(*last);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn worker_engine_hashes(&self, worker: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .workers
            .get(&worker)
            .map(|w| w.blocks.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    pub fn num_entries(&self) -> u64 {
        self.workers.values().map(|w| w.held).sum()
    }

    /// Heap bytes held by the index (tables at their capacity plus spilled lists).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        let table = |cap: usize, entry: usize| cap * (entry + 1);
        let mut total = table(self.nodes.capacity(), size_of::<(u64, Holders)>());
        total += self
            .nodes
            .values()
            .filter(|h| h.spilled())
            .map(|h| h.capacity() * size_of::<Holder>())
            .sum::<usize>();
        total += table(self.workers.capacity(), size_of::<(u64, WorkerState)>());
        for w in self.workers.values() {
            total += table(w.blocks.capacity(), size_of::<(u64, u64)>());
            total += table(w.split.capacity(), size_of::<(u64, Vec<u64>)>());
            total += w.split.values().map(|v| v.capacity() * 8).sum::<usize>();
        }
        total + self.slots.capacity() * size_of::<Option<u64>>() + self.free_slots.capacity() * 4
    }

    /// Renames workers (a snapshot's ids belong to the writer's registry). Every
    /// worker must be mapped and the new ids must be distinct; else nothing changes.
    pub fn remap_workers(&mut self, map: &std::collections::HashMap<u64, u64>) -> Result<()> {
        let mut seen = hashbrown::HashSet::new();
        for id in self.workers.keys() {
            let Some(new) = map.get(id) else {
                return Err(snap_err(format!(
                    "snapshot worker {id} has no entry in the worker map"
                )));
            };
            if !seen.insert(*new) {
                return Err(snap_err(format!("worker map sends two workers to {new}")));
            }
        }
        // Holders refer to slots, so only the id <-> slot tables change.
        let old = std::mem::take(&mut self.workers);
        for (id, ws) in old {
            // Every id was checked to be mapped above.
            let new = map.get(&id).copied().unwrap_or(id);
            self.slots[ws.slot as usize] = Some(new);
            self.workers.insert(new, ws);
        }
        Ok(())
    }

    // ---- snapshots -----------------------------------------------------------

    /// The whole index as bytes: header, per-worker block maps with tier masks,
    /// lifetime counters and a trailing xxh3 checksum.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.num_entries() as usize * 25);
        out.extend_from_slice(SNAP_MAGIC);
        out.extend_from_slice(&SNAP_VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        let mut ids = self.workers();
        ids.sort_unstable();
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            let ws = &self.workers[&id];
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(ws.blocks.len() as u64).to_le_bytes());
            // Sorted so that equal indexes give equal bytes (replicas can be compared).
            let mut blocks: Vec<(&u64, &u64)> = ws.blocks.iter().collect();
            blocks.sort_unstable();
            for (engine, last) in blocks {
                let lead: &[u64] = ws.split.get(engine).map_or(&[], |v| v.as_slice());
                out.extend_from_slice(&engine.to_le_bytes());
                out.extend_from_slice(&((lead.len() + 1) as u32).to_le_bytes());
                for r in lead.iter().chain(std::iter::once(last)) {
                    let mask = self
                        .nodes
                        .get(r)
                        .and_then(|h| {
                            h.binary_search_by_key(&ws.slot, |x| holder_slot(*x))
                                .ok()
                                .map(|i| holder_mask(h[i]))
                        })
                        .unwrap_or(0);
                    out.extend_from_slice(&r.to_le_bytes());
                    out.push(mask);
                }
            }
        }
        out.extend_from_slice(&self.stats.events.to_le_bytes());
        for v in self.stats.totals.counters() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn from_snapshot(data: &[u8]) -> Result<PrefixIndex> {
        if data.len() < SNAP_MAGIC.len() + 8 + 8 + 8 {
            return Err(snap_err("snapshot too short"));
        }
        let (body, sum) = data.split_at(data.len() - 8);
        let expected = Cursor { buf: sum, pos: 0 }.u64()?;
        if &body[..SNAP_MAGIC.len()] != SNAP_MAGIC {
            return Err(snap_err("not a kvrouter index snapshot (bad magic)"));
        }
        if xxhash_rust::xxh3::xxh3_64(body) != expected {
            return Err(snap_err(
                "snapshot checksum mismatch (truncated or corrupted)",
            ));
        }
        let mut c = Cursor {
            buf: body,
            pos: SNAP_MAGIC.len(),
        };
        let version = c.u32()?;
        if version != SNAP_VERSION {
            return Err(snap_err(format!(
                "unsupported snapshot version {version} (expected {SNAP_VERSION})"
            )));
        }
        let mut idx = PrefixIndex::new(c.u32()?).map_err(|e| snap_err(e.to_string()))?;
        let n_workers = c.u64()?;
        for _ in 0..n_workers {
            let id = c.u64()?;
            if idx.workers.contains_key(&id) {
                return Err(snap_err(format!("snapshot lists worker {id} twice")));
            }
            let n_blocks = c.u64()?;
            // Each entry takes at least 21 bytes: bound the reservation by what is left.
            let fits = ((c.buf.len() - c.pos) / 21) as u64;
            if n_blocks > fits {
                return Err(snap_err(format!(
                    "snapshot declares {n_blocks} blocks for worker {id} but holds at most {fits}"
                )));
            }
            // Size the tables once instead of growing them step by step.
            idx.nodes.reserve(n_blocks as usize);
            let slot = idx
                .worker_mut(id)
                .map_err(|e| snap_err(e.to_string()))?
                .slot;
            let mut blocks: HashMap<u64, u64> = HashMap::with_capacity(n_blocks as usize);
            let mut split: HashMap<u64, Vec<u64>> = HashMap::new();
            let mut held = 0u64;
            for _ in 0..n_blocks {
                let engine = c.u64()?;
                let k = c.u32()? as usize;
                if k == 0 || k > 1 << 16 {
                    return Err(snap_err(format!(
                        "snapshot block group of {k} router blocks"
                    )));
                }
                let mut group = Vec::with_capacity(k);
                for _ in 0..k {
                    let r = c.u64()?;
                    let mask = c.u8()?;
                    if mask > 0b111 {
                        return Err(snap_err(format!(
                            "snapshot tier mask {mask:#b} out of range"
                        )));
                    }
                    for t in Tier::ALL {
                        if mask & t.bit() != 0 {
                            if let AddOutcome::New =
                                Self::node_add(&mut idx.nodes, r, slot, t.bit())
                            {
                                held += 1;
                            }
                        }
                    }
                    group.push(r);
                }
                // k >= 1, so the group has a last block.
                if let Some(last) = group.pop() {
                    blocks.insert(engine, last);
                }
                if !group.is_empty() {
                    split.insert(engine, group);
                }
            }
            let ws = idx.worker_mut(id).map_err(|e| snap_err(e.to_string()))?;
            ws.blocks = blocks;
            ws.split = split;
            ws.held = held;
        }
        idx.stats.events = c.u64()?;
        let mut counters = Vec::with_capacity(ApplyResult::FIELDS.len());
        for _ in ApplyResult::FIELDS {
            counters.push(c.u64()?);
        }
        if c.pos != body.len() {
            return Err(snap_err(format!(
                "{} unexpected bytes at the end of the snapshot",
                body.len() - c.pos
            )));
        }
        idx.stats.totals = ApplyResult::from_counters(&counters)
            .ok_or_else(|| snap_err("snapshot counters do not match ApplyResult::FIELDS"))?;
        Ok(idx)
    }
}

const SNAP_MAGIC: &[u8; 8] = b"KVRSNAP\x01";
const SNAP_VERSION: u32 = 1;
// Snapshots store the apply counters in ApplyResult::FIELDS order: a new counter
// changes the format, so it must come with a new SNAP_VERSION.
const _: () = assert!(ApplyResult::FIELDS.len() == 8 && SNAP_VERSION == 1);

fn snap_err(msg: impl Into<String>) -> Error {
    Error::Snapshot(msg.into())
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or_else(|| snap_err("snapshot truncated"))?;
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::hash_blocks;

    fn tiers(gpu: u32, host: u32, disk: u32) -> Overlap {
        Overlap { gpu, host, disk }
    }

    fn stored_tokens(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> Stored {
        Stored {
            hashes,
            parent,
            tokens: Some(tokens),
            block_size: bs,
            ..Stored::default()
        }
    }

    #[test]
    fn store_and_match() {
        let mut idx = PrefixIndex::new(4).unwrap();
        let toks: Vec<u32> = (0..16).collect();
        let r = idx.apply_stored(7, &stored_tokens(vec![1, 2, 3, 4], None, toks.clone(), 4));
        assert_eq!(r.stored_blocks, 4);
        let q = hash_blocks(&toks, 4, None);
        assert_eq!(idx.find_matches(&q), vec![(7, tiers(4, 0, 0))]);
        // Continue the chain from a parent.
        let more: Vec<u32> = (16..24).collect();
        let r = idx.apply_stored(7, &stored_tokens(vec![5, 6], Some(4), more, 4));
        assert_eq!(r.stored_blocks, 2);
        let all: Vec<u32> = (0..24).collect();
        assert_eq!(idx.find_matches(&hash_blocks(&all, 4, None))[0].1.gpu, 6);
    }

    #[test]
    fn orphan_changes_nothing() {
        let mut idx = PrefixIndex::new(4).unwrap();
        let r = idx.apply_stored(1, &stored_tokens(vec![9], Some(42), vec![1, 2, 3, 4], 4));
        assert_eq!(r.orphan_events, 1);
        assert_eq!(idx.num_nodes(), 0);
        assert!(idx.workers().is_empty());
    }

    #[test]
    fn removal_and_tiers() {
        let mut idx = PrefixIndex::new(2).unwrap();
        let toks: Vec<u32> = (0..6).collect();
        idx.apply_stored(1, &stored_tokens(vec![10, 11, 12], None, toks.clone(), 2));
        let mut host = stored_tokens(vec![10, 11, 12], None, toks.clone(), 2);
        host.tier = Tier::Host;
        idx.apply_stored(1, &host);
        let q = hash_blocks(&toks, 2, None);
        let r = idx.apply_removed(1, &[11], Tier::Gpu);
        assert_eq!(r.removed_blocks, 1);
        assert_eq!(idx.find_matches(&q), vec![(1, tiers(2, 1, 0))]);
        let r = idx.apply_removed(1, &[11], Tier::Host);
        assert_eq!(r.removed_blocks, 1);
        assert_eq!(idx.find_matches(&q), vec![(1, tiers(1, 0, 0))]);
        let r = idx.apply_removed(1, &[11, 99], Tier::Gpu);
        assert_eq!(r.unknown_removals, 2);
        assert_eq!(idx.worker_blocks(1), 2);
    }

    #[test]
    fn several_workers_diverge() {
        let mut idx = PrefixIndex::new(1).unwrap();
        idx.apply_stored(
            1,
            &Stored {
                hashes: vec![1, 2, 3],
                router_hashes: Some(vec![1, 2, 3]),
                ..Stored::default()
            },
        );
        idx.apply_stored(
            2,
            &Stored {
                hashes: vec![1, 2],
                router_hashes: Some(vec![1, 2]),
                ..Stored::default()
            },
        );
        idx.apply_stored(
            3,
            &Stored {
                hashes: vec![1],
                router_hashes: Some(vec![1]),
                ..Stored::default()
            },
        );
        let mut m = idx.find_matches(&[1, 2, 3, 4]);
        m.sort_by_key(|x| x.0);
        let depths: Vec<(u64, u32)> = m.iter().map(|(w, o)| (*w, o.total())).collect();
        assert_eq!(depths, vec![(1, 3), (2, 2), (3, 1)]);
    }

    #[test]
    fn split_engine_blocks() {
        let mut idx = PrefixIndex::new(16).unwrap();
        let toks: Vec<u32> = (0..64).collect();
        let r = idx.apply_stored(1, &stored_tokens(vec![100, 200], None, toks.clone(), 32));
        assert_eq!(r.stored_blocks, 4);
        assert_eq!(idx.find_matches(&hash_blocks(&toks, 16, None))[0].1.gpu, 4);
        let r = idx.apply_removed(1, &[200], Tier::Gpu);
        assert_eq!(r.removed_blocks, 2);
        assert_eq!(idx.find_matches(&hash_blocks(&toks, 16, None))[0].1.gpu, 2);
        let r = idx.apply_stored(1, &stored_tokens(vec![5], None, vec![0; 24], 24));
        assert_eq!(r.mismatched_events, 1);
    }

    #[test]
    fn clear_and_remove_worker_and_snapshot() {
        let mut idx = PrefixIndex::new(4).unwrap();
        let toks: Vec<u32> = (0..32).collect();
        idx.apply_stored(1, &stored_tokens((1..=8).collect(), None, toks.clone(), 4));
        idx.apply_stored(
            2,
            &stored_tokens((1..=4).collect(), None, toks[..16].to_vec(), 4),
        );
        let snap = idx.snapshot();
        let back = PrefixIndex::from_snapshot(&snap).unwrap();
        let q = hash_blocks(&toks, 4, None);
        let mut a = idx.find_matches(&q);
        let mut b = back.find_matches(&q);
        a.sort_by_key(|x| x.0);
        b.sort_by_key(|x| x.0);
        assert_eq!(a, b);
        assert_eq!(back.snapshot(), snap);
        let mut bad = snap.clone();
        bad[20] ^= 1;
        assert!(PrefixIndex::from_snapshot(&bad).is_err());
        assert!(PrefixIndex::from_snapshot(&snap[..snap.len() - 1]).is_err());
        let mut renamed = back.clone();
        let map: std::collections::HashMap<u64, u64> = [(1, 10), (2, 20)].into_iter().collect();
        renamed.remap_workers(&map).unwrap();
        let mut r = renamed.find_matches(&q);
        r.sort_by_key(|x| x.0);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10, 20]);
        assert!(renamed
            .remap_workers(&[(10, 1)].into_iter().collect())
            .is_err());
        assert_eq!(idx.clear_worker(1).cleared_blocks, 8);
        assert_eq!(idx.find_matches(&q), vec![(2, tiers(4, 0, 0))]);
        assert_eq!(idx.remove_worker(2), 4);
        assert_eq!(idx.num_nodes(), 0);
    }
}
