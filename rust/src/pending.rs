//! In-flight prefixes (docs/design.md §3.3): blocks a request was routed with but whose
//! engine has not stored them yet.
//!
//! An exact worker's index entries come from its KV events, which an engine publishes
//! only as it computes the blocks: a request waiting in an engine's queue leaves no trace
//! in the index. Under load that window is seconds long, and every request sharing the
//! prefix that arrives meanwhile sees no hit anywhere and is spread for balance. So when
//! a request is routed (and reserved) to an exact worker, its prompt's blocks are
//! recorded as pending there; the match of a later prompt counts a pending prefix on a
//! worker like a cached one. A pending entry ends when its request's prefill is done (its
//! blocks are then in the engine's events), when the request is released (finished,
//! cancelled or failed), when its worker is removed, or `ttl_s` after it was routed
//! (a request whose end was never reported).
//!
//! Recording must stay cheap (it runs inside every reserved route), so only checkpoint
//! blocks are kept: the first, every [`STRIDE`]-th (4th, 8th, ... block) and the last
//! block of the prompt. Router hashes chain over their prefix, so a prompt whose block
//! `i` has the hash a record holds at `i` shares the record's blocks `0..=i`: a pending
//! match is exact at those checkpoints and rounded down to the last one in between (at
//! most `STRIDE - 1` blocks short). Measured on a loaded 2-core machine, 8K-token prompt
//! in 512 blocks, 64 requests in flight: recording and ending a request 21.4 us with
//! every block kept, 4.7-5.4 us with checkpoints; matching a fully pending prompt 7.0 ->
//! 2.5-3.9 us (hashing the prompt, needed to record it, 6.5-8.3 us).

use std::collections::VecDeque;

use hashbrown::HashMap;
use smallvec::SmallVec;

use crate::index::{KeyIsHash, Overlap};

/// `ov` (a worker's indexed overlap) with its first `pending` blocks counted as GPU hits:
/// the pending prefix is being computed there. The blocks past it keep their tiers.
pub fn with_pending(ov: Overlap, pending: u32) -> Overlap {
    if pending <= ov.gpu {
        return ov;
    }
    let rest = ov.total().saturating_sub(pending);
    let host = ov.host.min(rest);
    Overlap {
        gpu: pending,
        host,
        disk: rest - host,
    }
}

/// Every `STRIDE`-th block of a prompt is a checkpoint (besides its first and last).
pub const STRIDE: usize = 4;

/// Whether block `i` of an `n`-block prompt is a checkpoint.
#[inline]
fn checkpoint(i: usize, n: usize) -> bool {
    i == 0 || (i + 1).is_multiple_of(STRIDE) || i + 1 == n
}

/// One in-flight request's record: its checkpoint hashes.
#[derive(Debug, Clone)]
struct Entry {
    worker: u64,
    hashes: Vec<u64>,
    expires_at: f64,
}

/// Records kept at most (the oldest are dropped first): in-flight requests come from
/// clients, and one that routes with reservations and never releases must not grow the
/// router without bound. Far above a fleet's real concurrency (1,000 workers x 128 in
/// flight); at ~1 KiB per 8K-token record, ~128 MiB at the bound.
pub const MAX_ENTRIES: usize = 1 << 17;

/// (worker, in-flight requests holding the block there).
type Holders = SmallVec<[(u64, u32); 2]>;

/// The pending blocks of a scheduler's exact workers.
#[derive(Debug, Clone)]
pub struct PendingPrefixes {
    pub ttl_s: f64,
    /// [`MAX_ENTRIES`] unless a test sets it lower.
    pub max_entries: usize,
    entries: HashMap<String, Entry>,
    blocks: HashMap<u64, Holders, KeyIsHash>,
    /// (expiry, request id) in routing order: with one TTL and a clock that does not go
    /// back, the front expires first. A stale pair (entry gone or replaced) is skipped.
    order: VecDeque<(f64, String)>,
}

impl Default for PendingPrefixes {
    /// Off (TTL 0) until configured.
    fn default() -> PendingPrefixes {
        PendingPrefixes::new(0.0)
    }
}

impl PendingPrefixes {
    pub fn new(ttl_s: f64) -> PendingPrefixes {
        PendingPrefixes {
            ttl_s,
            max_entries: MAX_ENTRIES,
            entries: HashMap::new(),
            blocks: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// Off when the TTL is 0.
    pub fn enabled(&self) -> bool {
        self.ttl_s > 0.0
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// In-flight requests recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Distinct (block, worker) pairs pending.
    pub fn blocks(&self) -> usize {
        self.blocks.values().map(SmallVec::len).sum()
    }

    /// Records request `id`'s prompt `hashes` as pending on `worker` until `now + ttl_s`
    /// (an id already recorded is replaced).
    pub fn add(&mut self, id: &str, worker: u64, hashes: &[u64], now: f64) {
        if !self.enabled() || hashes.is_empty() {
            return;
        }
        self.remove(id);
        let n = hashes.len();
        let kept: Vec<u64> = hashes
            .iter()
            .enumerate()
            .filter(|&(i, _)| checkpoint(i, n))
            .map(|(_, &h)| h)
            .collect();
        for &h in &kept {
            let holders = self.blocks.entry(h).or_default();
            match holders.iter_mut().find(|(w, _)| *w == worker) {
                Some((_, n)) => *n += 1,
                None => holders.push((worker, 1)),
            }
        }
        let expires_at = now + self.ttl_s;
        self.entries.insert(
            id.to_owned(),
            Entry {
                worker,
                hashes: kept,
                expires_at,
            },
        );
        self.order.push_back((expires_at, id.to_owned()));
        self.bound();
    }

    /// Drops the oldest records past `max_entries`, and the stale (expiry, id) pairs once
    /// they outnumber the live ones (ended records leave theirs behind in `order`).
    fn bound(&mut self) {
        while self.entries.len() > self.max_entries {
            let Some((t, id)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&id).is_some_and(|e| e.expires_at == t) {
                self.remove(&id);
            }
        }
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order
                .retain(|(t, id)| entries.get(id).is_some_and(|e| e.expires_at == *t));
        }
    }

    /// Ends request `id`'s pending record; false if there was none.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(e) = self.entries.remove(id) else {
            return false;
        };
        self.forget(&e);
        true
    }

    fn forget(&mut self, e: &Entry) {
        for h in &e.hashes {
            let Some(holders) = self.blocks.get_mut(h) else {
                continue;
            };
            if let Some(i) = holders.iter().position(|(w, _)| *w == e.worker) {
                holders[i].1 -= 1;
                if holders[i].1 == 0 {
                    holders.swap_remove(i);
                }
            }
            if holders.is_empty() {
                self.blocks.remove(h);
            }
        }
    }

    /// Drops every record on `worker`.
    pub fn remove_worker(&mut self, worker: u64) {
        let ids: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.worker == worker)
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            self.remove(&id);
        }
    }

    /// Drops the records past their TTL at `now`.
    pub fn expire(&mut self, now: f64) {
        while let Some((t, _)) = self.order.front() {
            if *t > now {
                break;
            }
            let Some((t, id)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&id).is_some_and(|e| e.expires_at == t) {
                self.remove(&id);
            }
        }
        if self.entries.is_empty() {
            self.order.clear();
        }
    }

    /// Per worker, the leading blocks of `hashes` pending there, to the last checkpoint
    /// (workers with none left out).
    pub fn find_matches(&self, hashes: &[u64]) -> Vec<(u64, u32)> {
        self.find_matches_iter(hashes.iter().copied())
    }

    /// [`Self::find_matches`] over hashes computed lazily: stops at the first stride
    /// checkpoint pending nowhere, so a prompt is hashed only about as far as its pending
    /// prefix goes.
    pub fn find_matches_iter(&self, hashes: impl Iterator<Item = u64>) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        if self.blocks.is_empty() {
            return out;
        }
        for (i, h) in hashes.enumerate() {
            match self.blocks.get(&h) {
                // A hash at block i carries the whole prefix: blocks 0..=i match.
                Some(holders) => {
                    for &(w, _) in holders {
                        match out.iter_mut().find(|(x, _)| *x == w) {
                            Some(e) => e.1 = i as u32 + 1,
                            None => out.push((w, i as u32 + 1)),
                        }
                    }
                }
                // Every record holds block 0 and every STRIDE-th: none goes further.
                None if i == 0 || (i + 1).is_multiple_of(STRIDE) => break,
                None => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
        v.sort_unstable();
        v
    }

    #[test]
    fn records_are_bounded_oldest_first_and_stale_order_pairs_compacted() {
        let mut p = PendingPrefixes::new(60.0);
        p.max_entries = 100;
        for i in 0..250u64 {
            p.add(&format!("r{i}"), i % 4, &[i, i + 1000], i as f64 * 0.01);
        }
        assert_eq!(p.len(), 100);
        assert!(!p.remove("r149"), "the oldest records were dropped");
        assert!(p.remove("r150") && p.remove("r249"));
        assert_eq!(p.blocks(), 2 * 98);
        // Records that end normally leave (expiry, id) pairs behind; they are compacted.
        for i in 0..5000u64 {
            let id = format!("s{i}");
            p.add(&id, 1, &[7], 3.0);
            p.remove(&id);
        }
        assert!(p.order.len() <= 2 * p.len() + 1024 + 1);
        assert_eq!(p.len(), 98);
    }

    #[test]
    fn pending_prefixes_match_until_removed_or_expired() {
        let mut p = PendingPrefixes::new(10.0);
        p.add("a", 1, &[1, 2, 3], 0.0);
        p.add("b", 2, &[1, 2], 1.0);
        // Short prompts: every block is a checkpoint (first, 4th, last).
        assert_eq!(sorted(p.find_matches(&[1, 2, 3, 4])), vec![(1, 3), (2, 2)]);
        assert_eq!(sorted(p.find_matches(&[1, 9])), vec![(1, 1), (2, 1)]);
        assert!(p.find_matches(&[9, 1]).is_empty());
        // Two requests on one worker share blocks: ending one keeps the other's.
        p.add("c", 1, &[1, 2], 2.0);
        assert!(p.remove("a"));
        assert!(!p.remove("a"));
        assert_eq!(sorted(p.find_matches(&[1, 2, 3])), vec![(1, 2), (2, 2)]);
        p.expire(10.5); // "b" (routed at 1.0) is still live until 11.0
        assert_eq!(p.len(), 2);
        p.expire(11.0);
        assert_eq!(sorted(p.find_matches(&[1, 2, 3])), vec![(1, 2)]);
        p.remove_worker(1);
        assert!(p.is_empty());
        assert_eq!(p.blocks(), 0);
    }

    #[test]
    fn a_pending_match_is_exact_at_checkpoints_and_rounded_down_between() {
        let mut p = PendingPrefixes::new(10.0);
        let h: Vec<u64> = (1..=10).collect();
        p.add("a", 1, &h, 0.0); // checkpoints: blocks 0, 3, 7, 9 (1st, 4th, 8th, last)
        let q = |n: usize| -> Vec<u64> { h[..n].iter().copied().chain([99, 98]).collect() };
        for (shared, counted) in [(1, 1), (3, 1), (4, 4), (7, 4), (8, 8), (9, 8), (10, 10)] {
            assert_eq!(p.find_matches(&q(shared)), vec![(1, counted)], "{shared}");
        }
        assert_eq!(p.blocks(), 4);
    }

    #[test]
    fn a_replaced_record_is_not_expired_by_its_old_deadline() {
        let mut p = PendingPrefixes::new(5.0);
        p.add("a", 1, &[1], 0.0);
        p.add("a", 2, &[1], 4.0);
        p.expire(6.0);
        assert_eq!(p.find_matches(&[1]), vec![(2, 1)]);
        p.expire(9.0);
        assert!(p.is_empty());
    }

    #[test]
    fn a_pending_prefix_lifts_the_gpu_overlap_only_when_longer() {
        let ov = Overlap {
            gpu: 2,
            host: 3,
            disk: 1,
        };
        assert_eq!(with_pending(ov, 1), ov);
        let o = with_pending(ov, 4);
        assert_eq!((o.gpu, o.host, o.disk), (4, 2, 0));
        let o = with_pending(ov, 9);
        assert_eq!((o.gpu, o.host, o.disk), (9, 0, 0));
    }

    #[test]
    fn zero_ttl_records_nothing() {
        let mut p = PendingPrefixes::new(0.0);
        p.add("a", 1, &[1, 2], 0.0);
        assert!(p.is_empty() && p.find_matches(&[1]).is_empty());
    }

    /// Against a brute force over the live records: random adds, removals and expiries.
    #[test]
    fn matches_equal_a_brute_force_over_live_records() {
        let mut rng = crate::scoring::Rng::new(11);
        let mut p = PendingPrefixes::new(3.0);
        let mut live: std::collections::HashMap<String, (u64, Vec<u64>, f64)> =
            std::collections::HashMap::new();
        let mut now = 0.0;
        for step in 0..2000 {
            now += rng.unit() * 0.2;
            let id = format!("r{}", rng.below(40));
            match rng.below(4) {
                0 | 1 => {
                    // prompts over a small alphabet of chains: prefixes get shared
                    let root = rng.below(3) as u64;
                    let len = 1 + rng.below(12);
                    let h: Vec<u64> = (0..len).map(|i| root * 100 + i as u64).collect();
                    let w = rng.below(4) as u64;
                    p.add(&id, w, &h, now);
                    live.insert(id, (w, h, now + 3.0));
                }
                2 => {
                    assert_eq!(p.remove(&id), live.remove(&id).is_some());
                }
                _ => {
                    p.expire(now);
                    live.retain(|_, e| e.2 > now);
                }
            }
            let root = rng.below(3) as u64;
            let q: Vec<u64> = (0..12).map(|i| root * 100 + i).collect();
            let mut want: std::collections::BTreeMap<u64, u32> = Default::default();
            for (w, h, _) in live.values() {
                let n = h.iter().zip(&q).take_while(|(a, b)| a == b).count();
                // the shared prefix, down to the record's last checkpoint within it
                if let Some(i) = (0..n).rev().find(|&i| checkpoint(i, h.len())) {
                    let e = want.entry(*w).or_default();
                    *e = (*e).max(i as u32 + 1);
                }
            }
            let got: std::collections::BTreeMap<u64, u32> =
                p.find_matches(&q).into_iter().collect();
            assert_eq!(got, want, "step {step}");
        }
    }
}
