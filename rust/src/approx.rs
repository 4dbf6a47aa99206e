//! Approximate mode (docs/design.md §3.3): the cache of a worker that publishes no KV
//! events, predicted from the router's own decisions.
//!
//! When a request is routed to such a worker, its prompt's blocks are assumed stored
//! there. A block expires `ttl_s` after it was last routed, and the worker holds at most
//! its advertised capacity: past it, the least recently routed blocks go first. The
//! predicted blocks live in a [`PrefixIndex`] of their own (the scheduler's), so matching
//! is the same walk as for exact workers.

use std::collections::BTreeMap;

use hashbrown::HashMap;

use crate::index::PrefixIndex;
use crate::payload::Stored;
use crate::tier::Tier;

/// Blocks remembered per worker when it advertises no capacity: bounds the memory a worker
/// without a capacity report can take (TTL expiry still applies).
pub const UNBOUNDED_CAPACITY_BLOCKS: u64 = 1 << 20;

/// One approximate worker's predicted blocks, least recently routed first.
#[derive(Debug, Default, Clone)]
struct Lru {
    /// Router hash -> its position in `order`.
    stamp: HashMap<u64, u64>,
    /// Position -> (router hash, time last routed). Positions only grow, so the first
    /// entry is the least recently routed block.
    order: BTreeMap<u64, (u64, f64)>,
    next: u64,
}

impl Lru {
    fn touch(&mut self, hash: u64, now: f64) -> bool {
        let pos = self.next;
        self.next += 1;
        let fresh = match self.stamp.insert(hash, pos) {
            Some(old) => {
                self.order.remove(&old);
                false
            }
            None => true,
        };
        self.order.insert(pos, (hash, now));
        fresh
    }

    /// Drops the oldest block if `drop(time)` says so; returns its hash.
    fn pop_oldest_if(&mut self, drop: impl Fn(f64) -> bool) -> Option<u64> {
        let (&pos, &(hash, t)) = self.order.iter().next()?;
        if !drop(t) {
            return None;
        }
        self.order.remove(&pos);
        self.stamp.remove(&hash);
        Some(hash)
    }

    fn len(&self) -> u64 {
        self.stamp.len() as u64
    }
}

/// The predicted caches of a scheduler's approximate workers.
#[derive(Debug, Clone)]
pub struct ApproxCaches {
    pub ttl_s: f64,
    index: Option<PrefixIndex>,
    workers: HashMap<u64, Lru>,
}

impl ApproxCaches {
    pub fn new(ttl_s: f64) -> ApproxCaches {
        ApproxCaches {
            ttl_s,
            index: None,
            workers: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn contains(&self, worker: u64) -> bool {
        self.workers.contains_key(&worker)
    }

    /// Starts predicting `worker`'s cache (empty).
    pub fn add(&mut self, worker: u64) {
        self.workers.entry(worker).or_default();
    }

    /// Stops predicting `worker`'s cache and forgets it.
    pub fn remove(&mut self, worker: u64) {
        if self.workers.remove(&worker).is_some() {
            if let Some(idx) = self.index.as_mut() {
                idx.remove_worker(worker);
            }
        }
    }

    /// Predicted blocks of `worker`.
    pub fn blocks(&self, worker: u64) -> u64 {
        self.workers.get(&worker).map_or(0, Lru::len)
    }

    /// The index of predicted blocks, if any block was ever predicted.
    pub fn index(&self) -> Option<&PrefixIndex> {
        self.index.as_ref()
    }

    /// Records that the prompt `hashes` (its full router blocks) were routed to `worker`
    /// at `now`, then applies expiry and the capacity bound (0: none advertised).
    pub fn record(
        &mut self,
        worker: u64,
        hashes: &[u64],
        now: f64,
        capacity: u64,
        block_size: u32,
    ) {
        let Some(lru) = self.workers.get_mut(&worker) else {
            return;
        };
        let index = match self.index.as_mut() {
            Some(i) => i,
            None => match PrefixIndex::new(block_size) {
                Ok(i) => self.index.insert(i),
                Err(_) => return,
            },
        };
        // Touch the tail first: the prompt's first blocks become the most recent, so the
        // LRU bound drops a prompt's tail before the prefix other prompts share.
        let mut fresh = Vec::new();
        for &h in hashes.iter().rev() {
            if lru.touch(h, now) {
                fresh.push(h);
            }
        }
        if !fresh.is_empty() {
            fresh.reverse();
            index.apply_stored(
                worker,
                &Stored {
                    hashes: fresh.clone(),
                    router_hashes: Some(fresh),
                    block_size,
                    ..Stored::default()
                },
            );
        }
        Self::trim(lru, index, worker, now, self.ttl_s, capacity);
    }

    /// Drops every approximate worker's expired blocks.
    pub fn expire(&mut self, now: f64) {
        let Some(index) = self.index.as_mut() else {
            return;
        };
        for (&worker, lru) in self.workers.iter_mut() {
            Self::trim(lru, index, worker, now, self.ttl_s, 0);
        }
    }

    fn trim(lru: &mut Lru, index: &mut PrefixIndex, worker: u64, now: f64, ttl: f64, cap: u64) {
        let cap = if cap == 0 {
            UNBOUNDED_CAPACITY_BLOCKS
        } else {
            cap
        };
        let mut gone = Vec::new();
        while let Some(h) = lru.pop_oldest_if(|t| now - t >= ttl) {
            gone.push(h);
        }
        while lru.len() > cap {
            match lru.pop_oldest_if(|_| true) {
                Some(h) => gone.push(h),
                None => break,
            }
        }
        if !gone.is_empty() {
            index.apply_removed(worker, &gone, Tier::Gpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(c: &ApproxCaches, hashes: &[u64]) -> Vec<(u64, u32)> {
        c.index().map_or_else(Vec::new, |i| {
            i.find_matches(hashes)
                .into_iter()
                .map(|(w, o)| (w, o.gpu))
                .collect()
        })
    }

    #[test]
    fn routed_blocks_match_until_they_expire() {
        let mut c = ApproxCaches::new(10.0);
        c.add(1);
        c.record(1, &[11, 12, 13], 0.0, 0, 16);
        assert_eq!(matched(&c, &[11, 12, 99]), vec![(1, 2)]);
        c.record(1, &[11], 5.0, 0, 16);
        c.expire(12.0);
        // 12 and 13 expired at 10 s; 11 was routed again at 5 s.
        assert_eq!(matched(&c, &[11, 12]), vec![(1, 1)]);
        assert_eq!(c.blocks(1), 1);
        c.expire(15.0);
        assert!(matched(&c, &[11]).is_empty());
    }

    #[test]
    fn capacity_evicts_least_recent_tails_first() {
        let mut c = ApproxCaches::new(1e9);
        c.add(1);
        c.record(1, &[1, 2, 3], 0.0, 4, 16);
        c.record(1, &[7, 8], 1.0, 4, 16);
        // Capacity 4: the oldest block is the first prompt's tail (3).
        assert_eq!(c.blocks(1), 4);
        assert_eq!(matched(&c, &[1, 2, 3]), vec![(1, 2)]);
        assert_eq!(matched(&c, &[7, 8]), vec![(1, 2)]);
    }

    #[test]
    fn unknown_and_removed_workers_hold_nothing() {
        let mut c = ApproxCaches::new(10.0);
        c.record(5, &[1, 2], 0.0, 0, 16);
        assert!(c.index().is_none());
        c.add(5);
        c.record(5, &[1, 2], 0.0, 0, 16);
        c.remove(5);
        assert!(!c.contains(5));
        assert!(matched(&c, &[1, 2]).is_empty());
    }
}
