//! Load accounting (docs/design.md §2 load path): what the router reserved itself, what
//! engines report, and what other router replicas reserved.
//!
//! The load a scorer sees is the router's own live reservations plus the drift the
//! engine's last fresh report showed (what the engine carried beyond what this
//! router had reserved when the report was taken: traffic the router never saw),
//! plus other replicas' in-flight load. Reservations lead reports in time, so a
//! request released after a report stops counting at once.

use hashbrown::HashMap;

use crate::error::{Error, Result};
use crate::scoring::LoadView;

#[derive(Debug, Clone)]
pub struct Reservation {
    pub worker: u64,
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
    pub prefill_done: bool,
    pub expires_at: f64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub running: u64,
    pub queued: u64,
    pub kv_used_blocks: u64,
    pub kv_free_blocks: u64,
    pub queued_prefill_tokens: u64,
    /// GPU KV capacity in blocks (0: not reported).
    pub kv_capacity_blocks: u64,
    /// Blocks holding reusable prefix cache no running request uses (0: not reported).
    pub kv_cached_blocks: u64,
    pub at: f64,
    /// This router's reservations on the worker when the report arrived.
    pub reserved_prefill_tokens: u64,
    pub reserved_decode_blocks: u64,
    pub waiting_requests: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct External {
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
    pub requests: u64,
}

/// Largest KV capacity a report may carry (2^36 blocks: far beyond any GPU); above it the
/// report's capacity is absurd and ignored.
pub const MAX_CAPACITY_BLOCKS: u64 = 1 << 36;

/// How many evictions the reuse estimate remembers (exponential decay per evicted block).
const REUSE_HORIZON_BLOCKS: f64 = 4096.0;

/// A worker's reuse estimate for the cache-pressure term: of the GPU blocks it evicted
/// lately, the share a prompt routed to it asked for again (decayed counts). A large cache
/// evicts blocks nobody comes back for (the term fades); a thrashing one evicts blocks that
/// are asked for again (the term bites).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reuse {
    regret_blocks: f64,
    evicted_blocks: f64,
    /// The index's eviction total for the worker when last observed.
    seen_evicted: u64,
}

impl Reuse {
    /// Takes in the worker's eviction total (the index's running count).
    pub fn observe_evictions(&mut self, total: u64) {
        // A total below the last one: the worker's index state was reset (cleared).
        let delta = total.checked_sub(self.seen_evicted).unwrap_or(total);
        self.seen_evicted = total;
        if delta == 0 {
            return;
        }
        let keep = (1.0 - 1.0 / REUSE_HORIZON_BLOCKS).powf(delta as f64);
        self.regret_blocks *= keep;
        self.evicted_blocks = self.evicted_blocks * keep + delta as f64;
    }

    /// Records `blocks` evicted blocks a prompt routed to the worker asked for again.
    pub fn record_regret(&mut self, blocks: u64) {
        self.regret_blocks += blocks as f64;
    }

    /// Likelihood that an evicted block would have been reused, in [0, 1]; 1/4 before any
    /// eviction (a pseudo-count, so the first evictions move it gradually).
    pub fn likelihood(&self) -> f64 {
        ((self.regret_blocks + 0.5) / (self.evicted_blocks + 2.0)).min(1.0)
    }
}

#[derive(Debug, Clone, Default)]
/// One worker's accounting state.
pub struct LoadState {
    pub routable: bool,
    /// GPU KV capacity in blocks from the last report that carried a valid one (0: unknown,
    /// the cache-pressure term is off for this worker).
    pub capacity_blocks: u64,
    /// The router predicts this worker's cache from its own decisions (approximate mode).
    pub approx: bool,
    pub reuse: Reuse,
    pub reserved_prefill_tokens: u64,
    pub reserved_decode_blocks: u64,
    pub reserved_requests: u64,
    /// Reservations still waiting for prefill.
    pub waiting_requests: u64,
    pub report: Option<Report>,
    pub external: External,
}

impl LoadState {
    pub fn view(&self, now: f64, report_ttl_s: f64) -> LoadView {
        let fresh = self.report.filter(|r| now - r.at <= report_ttl_s);
        let (d_prefill, d_decode, d_queue) = fresh.map_or((0, 0, 0), |r| {
            (
                r.queued_prefill_tokens
                    .saturating_sub(r.reserved_prefill_tokens),
                r.kv_used_blocks.saturating_sub(r.reserved_decode_blocks),
                r.queued.saturating_sub(r.waiting_requests),
            )
        });
        LoadView {
            prefill_tokens: self.reserved_prefill_tokens + d_prefill + self.external.prefill_tokens,
            decode_blocks: self.reserved_decode_blocks + d_decode + self.external.decode_blocks,
            queue: self.waiting_requests + d_queue + self.external.requests,
        }
    }
}

/// What a worker's load looks like at one instant: its state flattened, plus the
/// view the scorer uses. The Python `WorkerLoad` class is this struct.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(module = "kvrouter._core", frozen, get_all)
)]
pub struct WorkerLoad {
    pub worker: u64,
    pub routable: bool,
    pub reserved_prefill_tokens: u64,
    pub reserved_decode_blocks: u64,
    pub reserved_requests: u64,
    pub waiting_requests: u64,
    pub reported_running: u64,
    pub reported_queued: u64,
    pub reported_kv_used_blocks: u64,
    pub reported_kv_free_blocks: u64,
    pub reported_kv_cached_blocks: u64,
    /// The capacity the cache-pressure term uses (0: off for this worker).
    pub kv_capacity_blocks: u64,
    /// Approximate mode: the router predicts the cache from its own routing decisions.
    pub approx: bool,
    /// Reuse likelihood of the worker's cached blocks (see [`Reuse`]).
    pub reuse: f64,
    pub external_prefill_tokens: u64,
    pub external_decode_blocks: u64,
    pub external_requests: u64,
    /// The scorer's view (reservations + fresh report drift + external load).
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
    pub queue: u64,
}

impl LoadState {
    pub fn summary(&self, worker: u64, now: f64, report_ttl_s: f64) -> WorkerLoad {
        let v = self.view(now, report_ttl_s);
        let r = self.report.unwrap_or_default();
        WorkerLoad {
            worker,
            routable: self.routable,
            reserved_prefill_tokens: self.reserved_prefill_tokens,
            reserved_decode_blocks: self.reserved_decode_blocks,
            reserved_requests: self.reserved_requests,
            waiting_requests: self.waiting_requests,
            reported_running: r.running,
            reported_queued: r.queued,
            reported_kv_used_blocks: r.kv_used_blocks,
            reported_kv_free_blocks: r.kv_free_blocks,
            reported_kv_cached_blocks: r.kv_cached_blocks,
            kv_capacity_blocks: self.capacity_blocks,
            approx: self.approx,
            reuse: self.reuse.likelihood(),
            external_prefill_tokens: self.external.prefill_tokens,
            external_decode_blocks: self.external.decode_blocks,
            external_requests: self.external.requests,
            prefill_tokens: v.prefill_tokens,
            decode_blocks: v.decode_blocks,
            queue: v.queue,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadTable {
    pub workers: HashMap<u64, LoadState>,
    /// Sorted routable worker ids, kept for deterministic candidate order.
    routable: Vec<u64>,
    reservations: HashMap<String, Reservation>,
}

impl LoadTable {
    pub fn add_worker(&mut self, worker: u64) {
        self.workers.entry(worker).or_insert_with(|| LoadState {
            routable: true,
            ..LoadState::default()
        });
        self.refresh_routable();
    }

    /// Forgets a worker and its reservations; returns the dropped request ids.
    pub fn remove_worker(&mut self, worker: u64) -> Vec<String> {
        self.workers.remove(&worker);
        let dropped: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.worker == worker)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &dropped {
            self.reservations.remove(id);
        }
        self.refresh_routable();
        dropped
    }

    /// The load state of `worker`, which must have been added.
    pub fn worker_mut(&mut self, worker: u64) -> Result<&mut LoadState> {
        self.workers
            .get_mut(&worker)
            .ok_or(Error::UnknownWorker(worker))
    }

    pub fn set_routable(&mut self, worker: u64, routable: bool) -> Result<()> {
        self.worker_mut(worker)?.routable = routable;
        self.refresh_routable();
        Ok(())
    }

    fn refresh_routable(&mut self) {
        self.routable = self
            .workers
            .iter()
            .filter(|(_, w)| w.routable)
            .map(|(id, _)| *id)
            .collect();
        self.routable.sort_unstable();
    }

    pub fn routable(&self) -> &[u64] {
        &self.routable
    }

    pub fn reserve(&mut self, request_id: &str, res: Reservation) -> Result<()> {
        if self.reservations.contains_key(request_id) {
            return Err(Error::DuplicateRequest(request_id.to_owned()));
        }
        let w = self.worker_mut(res.worker)?;
        w.reserved_prefill_tokens += res.prefill_tokens;
        w.reserved_decode_blocks += res.decode_blocks;
        w.reserved_requests += 1;
        w.waiting_requests += 1;
        self.reservations.insert(request_id.to_owned(), res);
        Ok(())
    }

    pub fn mark_prefill_done(&mut self, request_id: &str, new_expiry: f64) -> bool {
        let Some(r) = self.reservations.get_mut(request_id) else {
            return false;
        };
        r.expires_at = r.expires_at.max(new_expiry);
        if r.prefill_done {
            return true;
        }
        r.prefill_done = true;
        if let Some(w) = self.workers.get_mut(&r.worker) {
            crate::decrement(&mut w.reserved_prefill_tokens, r.prefill_tokens);
            crate::decrement(&mut w.waiting_requests, 1);
        }
        true
    }

    pub fn release(&mut self, request_id: &str) -> bool {
        let Some(r) = self.reservations.remove(request_id) else {
            return false;
        };
        if let Some(w) = self.workers.get_mut(&r.worker) {
            if !r.prefill_done {
                crate::decrement(&mut w.reserved_prefill_tokens, r.prefill_tokens);
                crate::decrement(&mut w.waiting_requests, 1);
            }
            crate::decrement(&mut w.reserved_decode_blocks, r.decode_blocks);
            crate::decrement(&mut w.reserved_requests, 1);
        }
        true
    }

    pub fn has(&self, request_id: &str) -> bool {
        self.reservations.contains_key(request_id)
    }

    /// The worker a live reservation is on (None: no such reservation).
    pub fn holder(&self, request_id: &str) -> Option<u64> {
        self.reservations.get(request_id).map(|r| r.worker)
    }

    /// Releases every reservation whose lease ran out; returns their ids.
    pub fn expire(&mut self, now: f64) -> Vec<String> {
        let ids: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &ids {
            self.release(id);
        }
        ids
    }

    pub fn summary(&self, worker: u64, now: f64, report_ttl_s: f64) -> Result<WorkerLoad> {
        self.workers
            .get(&worker)
            .map(|w| w.summary(worker, now, report_ttl_s))
            .ok_or(Error::UnknownWorker(worker))
    }

    /// Every worker's summary, by id.
    pub fn summaries(&self, now: f64, report_ttl_s: f64) -> Vec<WorkerLoad> {
        let mut v: Vec<WorkerLoad> = self
            .workers
            .iter()
            .map(|(id, w)| w.summary(*id, now, report_ttl_s))
            .collect();
        v.sort_unstable_by_key(|w| w.worker);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(worker: u64) -> Reservation {
        Reservation {
            worker,
            prefill_tokens: 100,
            decode_blocks: 10,
            prefill_done: false,
            expires_at: 10.0,
        }
    }

    #[test]
    fn reserve_done_release() {
        let mut t = LoadTable::default();
        t.add_worker(1);
        t.reserve("a", res(1)).unwrap();
        assert!(t.reserve("a", res(1)).is_err());
        let v = t.workers[&1].view(0.0, 5.0);
        assert_eq!((v.prefill_tokens, v.decode_blocks, v.queue), (100, 10, 1));
        assert!(t.mark_prefill_done("a", 20.0));
        let v = t.workers[&1].view(0.0, 5.0);
        assert_eq!((v.prefill_tokens, v.decode_blocks, v.queue), (0, 10, 0));
        assert!(t.release("a"));
        assert!(!t.release("a"));
        let v = t.workers[&1].view(0.0, 5.0);
        assert_eq!(v, LoadView::default());
    }

    #[test]
    fn expiry_and_reports() {
        let mut t = LoadTable::default();
        t.add_worker(1);
        t.reserve("a", res(1)).unwrap();
        assert!(t.expire(5.0).is_empty());
        assert_eq!(t.expire(10.0), vec!["a".to_string()]);
        let w = t.workers.get_mut(&1).unwrap();
        w.report = Some(Report {
            queued: 3,
            kv_used_blocks: 50,
            at: 1.0,
            ..Report::default()
        });
        assert_eq!(w.view(2.0, 5.0).decode_blocks, 50);
        assert_eq!(w.view(7.0, 5.0).decode_blocks, 0, "stale report ignored");
    }

    #[test]
    fn reuse_is_the_share_of_evictions_asked_for_again() {
        let mut r = Reuse::default();
        assert!((r.likelihood() - 0.25).abs() < 1e-12);
        r.observe_evictions(1000);
        assert!(r.likelihood() < 0.01);
        for i in 1..=20 {
            r.observe_evictions(1000 + i * 1000);
            r.record_regret(900);
        }
        assert!((r.likelihood() - 0.9).abs() < 0.05, "{}", r.likelihood());
        r.record_regret(1 << 20);
        assert!(r.likelihood() <= 1.0);
        // A reset index (total back to 0) starts counting again.
        r.observe_evictions(10);
        assert_eq!(r.seen_evicted, 10);
    }

    #[test]
    fn released_requests_stop_counting_before_the_next_report() {
        let mut t = LoadTable::default();
        t.add_worker(1);
        t.reserve("a", res(1)).unwrap();
        t.mark_prefill_done("a", 20.0);
        // The engine reports the 10 blocks of "a" plus 5 from traffic this router never saw.
        let w = t.workers.get_mut(&1).unwrap();
        w.report = Some(Report {
            kv_used_blocks: 15,
            at: 1.0,
            reserved_decode_blocks: 10,
            ..Report::default()
        });
        assert_eq!(w.view(1.0, 5.0).decode_blocks, 15);
        t.release("a");
        assert_eq!(t.workers[&1].view(1.5, 5.0).decode_blocks, 5);
    }
}
