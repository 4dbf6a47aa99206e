//! The scheduler of one model: match, score, choose and reserve in one call.
//! The gRPC service, the fleet simulator and the benchmarks all route through here.

use std::time::Instant;

use crate::approx::ApproxCaches;
use crate::error::{Error, Result};
use crate::hashing::BlockHashes;
use crate::index::{Overlap, PrefixIndex};
use crate::load::{External, LoadTable, Report, Reservation, MAX_CAPACITY_BLOCKS};
use crate::pending::PendingPrefixes;
use crate::scoring::{
    choose, cost_all, CacheView, Candidate, LoadView, Policy, Rng, Scored, Weights,
};

#[derive(Debug, Clone)]
pub struct Decision {
    pub worker: u64,
    pub overlap: Overlap,
    pub prompt_blocks: u64,
    pub prompt_tokens: u64,
    pub policy: Policy,
    /// Every candidate's breakdown, when asked for.
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: Policy,
    pub weights: Weights,
    pub lease_s: f64,
    pub report_ttl_s: f64,
    /// Approximate mode: how long a block routed to an approximate worker is assumed held.
    pub approx_ttl_s: f64,
    /// In-flight prefixes (crate::pending): how long a routed request's prompt counts as
    /// pending on its exact worker at most, when its prefill end is never reported; 0: off.
    pub pending_ttl_s: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Kv,
            weights: Weights::default(),
            lease_s: 300.0,
            report_ttl_s: 5.0,
            approx_ttl_s: 120.0,
            pending_ttl_s: 60.0,
        }
    }
}

/// Load reports whose KV capacity was left out (or 0), or absurd (above
/// [`MAX_CAPACITY_BLOCKS`] or below the blocks the report says are used): the report's
/// load still counts, the cache-pressure term is off for the worker until a valid one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityCounts {
    pub missing: u64,
    pub absurd: u64,
}

/// A finite, non-negative setting (lease, TTL, weight override).
pub fn non_negative(v: f64, what: &str) -> Result<f64> {
    if !v.is_finite() || v < 0.0 {
        return Err(Error::invalid(format!(
            "{what} must be a finite number >= 0, got {v}"
        )));
    }
    Ok(v)
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        self.weights.validate()?;
        non_negative(self.lease_s, "lease_s")?;
        non_negative(self.report_ttl_s, "report_ttl_s")?;
        non_negative(self.approx_ttl_s, "approx_ttl_s")?;
        non_negative(self.pending_ttl_s, "pending_ttl_s")?;
        Ok(())
    }
}

/// The prompt to route: its block hashes, or its tokens (hashed lazily during the match).
#[derive(Clone, Copy)]
pub enum Prompt<'a> {
    Hashes(&'a [u64]),
    Tokens { tokens: &'a [u32], root: u64 },
}

pub struct RouteRequest<'a> {
    pub prompt: Prompt<'a>,
    pub prompt_tokens: u64,
    pub request_id: Option<&'a str>,
    pub expected_output_tokens: u64,
    pub candidates: Option<&'a [u64]>,
    pub policy: Option<Policy>,
    pub explain: bool,
    /// Overrides the prefill weight for this call only (e.g. KV transfer instead of compute).
    pub prefill_weight: Option<f64>,
    pub reserve: bool,
    pub now: f64,
}

pub struct Scheduler {
    pub config: Config,
    pub load: LoadTable,
    pub approx: ApproxCaches,
    pub pending: PendingPrefixes,
    pub capacity_reports: CapacityCounts,
    rng: Rng,
    rr: u64,
    epoch: Instant,
}

impl Scheduler {
    pub fn new(config: Config, seed: u64) -> Result<Scheduler> {
        config.validate()?;
        Ok(Scheduler {
            approx: ApproxCaches::new(config.approx_ttl_s),
            pending: PendingPrefixes::new(config.pending_ttl_s),
            capacity_reports: CapacityCounts::default(),
            config,
            load: LoadTable::default(),
            rng: Rng::new(seed),
            rr: 0,
            epoch: Instant::now(),
        })
    }

    /// Seconds on this scheduler's monotonic clock.
    pub fn clock(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub fn view(&self, worker: u64, now: f64) -> LoadView {
        self.load
            .workers
            .get(&worker)
            .map_or_else(LoadView::default, |w| w.view(now, self.config.report_ttl_s))
    }

    pub fn route(&mut self, index: &PrefixIndex, req: &RouteRequest<'_>) -> Result<Decision> {
        let policy = req.policy.unwrap_or(self.config.policy);
        let mut weights = self.config.weights;
        if let Some(p) = req.prefill_weight {
            weights.prefill = non_negative(p, "prefill_weight")?;
        }
        let block_size = index.block_size();
        let pool: Vec<u64> = match req.candidates {
            None => self.load.routable().to_vec(),
            Some(subset) => {
                let mut v: Vec<u64> = subset
                    .iter()
                    .copied()
                    .filter(|w| self.load.workers.get(w).is_some_and(|l| l.routable))
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            }
        };
        if pool.is_empty() {
            return Err(Error::NoRoutableWorker);
        }
        let mut overlaps = Vec::new();
        let skip_match = matches!(policy, Policy::RoundRobin | Policy::Random) && !req.explain;
        let bs = block_size as usize;
        // With approximate workers, or a reserved request whose prompt becomes pending, the
        // prompt's full hashes are needed (to match the predicted caches and to record the
        // decision), so they are computed once up front.
        let records_pending =
            self.pending.enabled() && req.reserve && req.request_id.is_some() && !skip_match;
        let owned_hashes: Vec<u64>;
        let prompt = match req.prompt {
            Prompt::Tokens { tokens, root } if !self.approx.is_empty() || records_pending => {
                owned_hashes = BlockHashes::new(tokens, bs, root).collect();
                Prompt::Hashes(&owned_hashes)
            }
            p => p,
        };
        let prompt_blocks = match prompt {
            Prompt::Hashes(h) => h.len() as u64,
            Prompt::Tokens { tokens, .. } => (tokens.len() / bs) as u64,
        };
        if !skip_match {
            match prompt {
                Prompt::Hashes(h) => index.find_matches_into(h, &mut overlaps),
                Prompt::Tokens { tokens, root } => {
                    index.find_matches_iter(BlockHashes::new(tokens, bs, root), &mut overlaps);
                }
            }
        }
        if !self.approx.is_empty() {
            self.approx.expire(req.now);
            // Approximate workers publish nothing: their overlap is the prediction alone.
            overlaps.retain(|(w, _)| !self.approx.contains(*w));
            if let (Some(ai), Prompt::Hashes(h), false) = (self.approx.index(), prompt, skip_match)
            {
                overlaps.extend(ai.find_matches(h));
            }
        }
        // In-flight prefixes of exact workers (none recorded for approximate ones). The kv
        // cost alone counts them: prefix_only has no load term, so it would herd every
        // request sharing a prefix onto the worker computing it; the baselines keep what
        // the index says.
        let mut pending = Vec::new();
        if !self.pending.is_empty() {
            self.pending.expire(req.now);
            if !skip_match && policy == Policy::Kv {
                pending = match prompt {
                    Prompt::Hashes(h) => self.pending.find_matches(h),
                    Prompt::Tokens { tokens, root } => self
                        .pending
                        .find_matches_iter(BlockHashes::new(tokens, bs, root)),
                };
            }
        }
        let ttl = self.config.report_ttl_s;
        let mut cands: Vec<Scored> = pool
            .iter()
            .map(|&w| {
                let (load, cache) = self
                    .load
                    .workers
                    .get(&w)
                    .map_or_else(Default::default, |st| {
                        let load = st.view(req.now, ttl);
                        let held = if st.approx {
                            self.approx.blocks(w)
                        } else {
                            index.worker_blocks(w)
                        };
                        let reported_cached = st
                            .report
                            .filter(|r| req.now - r.at <= ttl)
                            .map_or(0, |r| r.kv_cached_blocks);
                        let cache = CacheView {
                            capacity: st.capacity_blocks,
                            occupied: held.max(load.decode_blocks + reported_cached),
                            cached: held.max(reported_cached),
                            reuse: st.reuse.likelihood(),
                        };
                        (load, cache)
                    });
                Scored {
                    cand: Candidate {
                        worker: w,
                        ..Candidate::default()
                    },
                    load,
                    cache,
                }
            })
            .collect();
        for (w, ov) in overlaps {
            if let Ok(i) = pool.binary_search(&w) {
                cands[i].cand.overlap = ov;
            }
        }
        for (w, n) in pending {
            if let Ok(i) = pool.binary_search(&w) {
                let c = &mut cands[i].cand;
                c.pending_blocks = n;
                c.overlap = crate::pending::with_pending(c.overlap, n);
            }
        }
        cost_all(
            policy,
            &weights,
            req.prompt_tokens,
            req.expected_output_tokens,
            block_size,
            &mut cands,
        );
        let scored: Vec<Candidate> = cands.iter().map(|c| c.cand).collect();
        let pick = choose(
            policy,
            &weights,
            block_size,
            &scored,
            &mut self.rng,
            &mut self.rr,
        );
        let chosen = scored[pick];
        if req.reserve {
            if let Some(id) = req.request_id {
                let load_prefill = cands[pick].load.prefill_tokens;
                let bs = u64::from(block_size);
                self.load.reserve(
                    id,
                    Reservation {
                        worker: chosen.worker,
                        prefill_tokens: chosen.new_prefill_tokens - load_prefill,
                        decode_blocks: (req.prompt_tokens + req.expected_output_tokens)
                            .div_ceil(bs),
                        prefill_done: false,
                        expires_at: req.now + self.config.lease_s,
                    },
                )?;
            }
        }
        if req.reserve {
            if let Some(st) = self.load.workers.get_mut(&chosen.worker) {
                if st.capacity_blocks > 0 && weights.pressure > 0.0 {
                    // Blocks right after the cached prefix that the worker evicted lately:
                    // what its evictions cost (the pressure term's reuse estimate).
                    let ghosts = if st.approx {
                        self.approx.index().and_then(|i| i.ghosts(chosen.worker))
                    } else {
                        index.ghosts(chosen.worker)
                    };
                    if let Some(g) = ghosts {
                        st.reuse.observe_evictions(g.evicted_total);
                        let skip = chosen.overlap.gpu as usize;
                        let regret = match prompt {
                            Prompt::Hashes(h) => {
                                h.iter().skip(skip).take_while(|x| g.contains(**x)).count()
                            }
                            Prompt::Tokens { tokens, root } => BlockHashes::new(tokens, bs, root)
                                .skip(skip)
                                .take_while(|x| g.contains(*x))
                                .count(),
                        };
                        st.reuse.record_regret(regret as u64);
                    }
                }
                if st.approx {
                    if let Prompt::Hashes(h) = prompt {
                        let cap = st.capacity_blocks;
                        self.approx
                            .record(chosen.worker, h, req.now, cap, block_size);
                    }
                } else if let (true, Some(id), Prompt::Hashes(h)) =
                    (records_pending, req.request_id, prompt)
                {
                    self.pending.add(id, chosen.worker, h, req.now);
                }
            }
        }
        Ok(Decision {
            worker: chosen.worker,
            overlap: chosen.overlap,
            prompt_blocks,
            prompt_tokens: req.prompt_tokens,
            policy,
            candidates: if req.explain { scored } else { Vec::new() },
        })
    }

    pub fn reserve(
        &mut self,
        worker: u64,
        request_id: &str,
        prefill_tokens: u64,
        decode_blocks: u64,
        now: f64,
    ) -> Result<()> {
        self.load.reserve(
            request_id,
            Reservation {
                worker,
                prefill_tokens,
                decode_blocks,
                prefill_done: false,
                expires_at: now + self.config.lease_s,
            },
        )
    }

    pub fn mark_prefill_done(&mut self, request_id: &str, now: f64) -> bool {
        // Its blocks are in the engine's KV events from now on: no longer pending.
        self.pending.remove(request_id);
        let lease = self.config.lease_s;
        self.load.mark_prefill_done(request_id, now + lease)
    }

    /// Ends a request (finished, cancelled or failed): its reservation and pending prefix.
    pub fn release(&mut self, request_id: &str) -> bool {
        self.pending.remove(request_id);
        self.load.release(request_id)
    }

    /// Drops the reservations past their lease (and their pending prefixes); returns their ids.
    pub fn expire_leases(&mut self, now: f64) -> Vec<String> {
        let gone = self.load.expire(now);
        for id in &gone {
            self.pending.remove(id);
        }
        gone
    }

    pub fn report_load(&mut self, worker: u64, report: Report) -> Result<()> {
        let w = self.load.worker_mut(worker)?;
        let cap = report.kv_capacity_blocks;
        w.capacity_blocks = if cap == 0 {
            self.capacity_reports.missing += 1;
            0
        } else if cap > MAX_CAPACITY_BLOCKS || cap < report.kv_used_blocks {
            self.capacity_reports.absurd += 1;
            0
        } else {
            cap
        };
        // Remember what this router had reserved, so the report's drift can be separated out.
        w.report = Some(Report {
            reserved_prefill_tokens: w.reserved_prefill_tokens,
            reserved_decode_blocks: w.reserved_decode_blocks,
            waiting_requests: w.waiting_requests,
            ..report
        });
        Ok(())
    }

    /// Switches `worker` between exact mode (its index entries come from its KV events) and
    /// approximate mode (predicted from this scheduler's decisions); a switch starts empty.
    pub fn set_approx(&mut self, worker: u64, approx: bool) -> Result<()> {
        let st = self.load.worker_mut(worker)?;
        if st.approx != approx {
            st.approx = approx;
            if approx {
                self.pending.remove_worker(worker);
                self.approx.add(worker);
            } else {
                self.approx.remove(worker);
            }
        }
        Ok(())
    }

    /// Forgets a worker: its load, reservations and predicted cache; returns the dropped
    /// request ids.
    pub fn remove_worker(&mut self, worker: u64) -> Vec<String> {
        self.approx.remove(worker);
        self.pending.remove_worker(worker);
        self.load.remove_worker(worker)
    }

    pub fn set_external(&mut self, worker: u64, ext: External) -> Result<()> {
        self.load.worker_mut(worker)?.external = ext;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Stored;

    #[test]
    fn route_reserve_release() {
        let mut idx = PrefixIndex::new(1).unwrap();
        idx.apply_stored(
            2,
            &Stored {
                hashes: vec![1, 2],
                router_hashes: Some(vec![1, 2]),
                ..Stored::default()
            },
        );
        let mut s = Scheduler::new(Config::default(), 7).unwrap();
        s.load.add_worker(1);
        s.load.add_worker(2);
        let req = RouteRequest {
            prompt: Prompt::Hashes(&[1, 2, 3]),
            prompt_tokens: 3,
            request_id: Some("r1"),
            expected_output_tokens: 2,
            candidates: None,
            policy: None,
            explain: true,
            reserve: true,
            now: 0.0,
            prefill_weight: None,
        };
        let d = s.route(&idx, &req).unwrap();
        assert_eq!(d.worker, 2);
        assert_eq!(d.overlap.gpu, 2);
        assert_eq!(d.candidates.len(), 2);
        let v = s.view(2, 0.0);
        assert_eq!((v.prefill_tokens, v.decode_blocks, v.queue), (1, 5, 1));
        assert!(s.route(&idx, &req).is_err(), "duplicate request id");
        assert!(s.load.release("r1"));
        assert_eq!(s.view(2, 0.0), LoadView::default());
        s.load.set_routable(2, false).unwrap();
        let req2 = RouteRequest {
            request_id: None,
            ..req
        };
        assert_eq!(s.route(&idx, &req2).unwrap().worker, 1);
    }

    fn hashes_req<'a>(h: &'a [u64], id: Option<&'a str>, now: f64) -> RouteRequest<'a> {
        RouteRequest {
            prompt: Prompt::Hashes(h),
            prompt_tokens: h.len() as u64,
            request_id: id,
            expected_output_tokens: 0,
            candidates: None,
            policy: None,
            explain: true,
            reserve: id.is_some(),
            now,
            prefill_weight: None,
        }
    }

    fn report(cap: u64, used: u64) -> Report {
        Report {
            kv_capacity_blocks: cap,
            kv_used_blocks: used,
            ..Report::default()
        }
    }

    #[test]
    fn capacity_reports_turn_the_pressure_term_on_and_bad_ones_off() {
        let mut s = Scheduler::new(Config::default(), 1).unwrap();
        s.load.add_worker(1);
        s.report_load(1, report(100, 10)).unwrap();
        assert_eq!(s.load.workers[&1].capacity_blocks, 100);
        for (cap, used) in [(0, 0), (1 << 40, 0), (5, 10)] {
            s.report_load(1, report(cap, used)).unwrap();
            assert_eq!(
                s.load.workers[&1].capacity_blocks, 0,
                "cap {cap} used {used}"
            );
        }
        assert_eq!(
            s.capacity_reports,
            CapacityCounts {
                missing: 1,
                absurd: 2
            }
        );
    }

    #[test]
    fn pressure_moves_a_cold_prompt_off_a_full_worker() {
        // Worker 1 holds a 4-block prefix and a cache full of blocks it reuses; worker 2
        // is empty. A prompt sharing 1 block goes to worker 2 once capacity is known.
        let mut idx = PrefixIndex::new(1).unwrap();
        let held: Vec<u64> = (1..=4).collect();
        idx.apply_stored(
            1,
            &Stored {
                hashes: held.clone(),
                router_hashes: Some(held),
                ..Stored::default()
            },
        );
        let mut s = Scheduler::new(Config::default(), 3).unwrap();
        s.load.add_worker(1);
        s.load.add_worker(2);
        {
            let r = &mut s.load.workers.get_mut(&1).unwrap().reuse;
            r.observe_evictions(100);
            r.record_regret(95);
        }
        let prompt = [1, 50, 51, 52, 53];
        assert_eq!(
            s.route(&idx, &hashes_req(&prompt, None, 0.0))
                .unwrap()
                .worker,
            1
        );
        s.report_load(1, report(4, 0)).unwrap();
        s.report_load(2, report(4, 0)).unwrap();
        let d = s.route(&idx, &hashes_req(&prompt, None, 0.0)).unwrap();
        assert_eq!(d.worker, 2);
        let c1 = d.candidates.iter().find(|c| c.worker == 1).unwrap();
        assert_eq!(c1.evicted_blocks, 4);
        assert!(c1.pressure_cost > 3.0);
        // The whole prefix held: the hit outweighs the evictions.
        let d = s
            .route(&idx, &hashes_req(&[1, 2, 3, 4, 60], None, 0.0))
            .unwrap();
        assert_eq!(d.worker, 1);
    }

    #[test]
    fn evicted_blocks_asked_for_again_raise_the_reuse_estimate() {
        let mut idx = PrefixIndex::new(1).unwrap();
        let blocks: Vec<u64> = (1..=6).collect();
        idx.apply_stored(
            1,
            &Stored {
                hashes: blocks.clone(),
                router_hashes: Some(blocks),
                ..Stored::default()
            },
        );
        idx.apply_removed(1, &[5, 6], crate::tier::Tier::Gpu);
        let mut s = Scheduler::new(Config::default(), 1).unwrap();
        s.load.add_worker(1);
        let prior = s.load.workers[&1].reuse.likelihood();
        // No capacity known: the estimate is not maintained.
        s.route(&idx, &hashes_req(&[1, 2, 3, 4, 5, 6], Some("a"), 0.0))
            .unwrap();
        assert_eq!(s.load.workers[&1].reuse.likelihood(), prior);
        // Prefilled: "a"'s blocks are no longer in flight (else they would be no regret).
        assert!(s.mark_prefill_done("a", 0.0));
        s.report_load(1, report(6, 0)).unwrap();
        s.route(&idx, &hashes_req(&[1, 2, 3, 4, 5, 6], Some("b"), 0.0))
            .unwrap();
        // 2 evicted, both asked for again: (2 + 0.5) / (2 + 2).
        let r = s.load.workers[&1].reuse.likelihood();
        assert!((r - 0.625).abs() < 1e-9, "{r}");
        // A prompt that wants nothing evicted leaves the regret alone.
        s.route(&idx, &hashes_req(&[1, 2, 9], Some("c"), 0.0))
            .unwrap();
        assert!((s.load.workers[&1].reuse.likelihood() - 0.625).abs() < 1e-9);
    }

    #[test]
    fn a_routed_prompt_is_pending_on_its_worker_until_prefilled_or_released() {
        // Nothing indexed yet: the engines have not stored anything.
        let idx = PrefixIndex::new(1).unwrap();
        let mut s = Scheduler::new(Config::default(), 9).unwrap();
        for w in 1..=4 {
            s.load.add_worker(w);
        }
        let first = s
            .route(&idx, &hashes_req(&[1, 2, 3, 4, 5, 6, 7, 8], Some("a"), 0.0))
            .unwrap();
        assert_eq!(first.overlap.total(), 0);
        // A request sharing the prefix follows it, though the index is still empty (8
        // shared blocks: a checkpoint, so counted exactly; see crate::pending).
        let next = s
            .route(
                &idx,
                &hashes_req(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], Some("b"), 0.5),
            )
            .unwrap();
        assert_eq!((next.worker, next.overlap.gpu), (first.worker, 8));
        let c = next
            .candidates
            .iter()
            .find(|c| c.worker == first.worker)
            .unwrap();
        assert_eq!((c.pending_blocks, c.new_prefill_tokens), (8, 2 + 8));
        assert!(next
            .candidates
            .iter()
            .all(|c| c.worker == first.worker || c.pending_blocks == 0));
        // The baselines see the index only.
        let base = RouteRequest {
            policy: Some(Policy::PrefixOnly),
            ..hashes_req(&[1, 2, 3], None, 0.5)
        };
        assert_eq!(s.route(&idx, &base).unwrap().overlap.total(), 0);
        // Prefilled ("a") and released ("b"): nothing pending any more.
        assert!(s.mark_prefill_done("a", 1.0));
        assert!(s.release("b"));
        assert!(s.pending.is_empty());
        // Not reserved (no request id): nothing recorded.
        s.route(&idx, &hashes_req(&[1, 2], None, 2.0)).unwrap();
        assert!(s.pending.is_empty());
        // Expiry, worker removal.
        let d = s.route(&idx, &hashes_req(&[1, 2], Some("c"), 3.0)).unwrap();
        s.route(&idx, &hashes_req(&[5], Some("d"), 3.0)).unwrap();
        assert_eq!(s.pending.len(), 2);
        s.remove_worker(d.worker);
        let late = s.route(&idx, &hashes_req(&[5], None, 3.0 + 61.0)).unwrap();
        assert_eq!(late.overlap.total(), 0);
        assert!(s.pending.is_empty());
        // Token prompts (hashed here): recorded when reserved, matched when only explained.
        let toks: Vec<u32> = (100..132).collect();
        fn tok_req<'a>(tokens: &'a [u32], id: Option<&'a str>) -> RouteRequest<'a> {
            RouteRequest {
                prompt: Prompt::Tokens { tokens, root: 0 },
                prompt_tokens: tokens.len() as u64,
                ..hashes_req(&[], id, 70.0)
            }
        }
        let t = s.route(&idx, &tok_req(&toks, Some("t"))).unwrap();
        let again = s.route(&idx, &tok_req(&toks[..24], None)).unwrap();
        assert_eq!((again.worker, again.overlap.gpu), (t.worker, 24));
        // Off with a zero TTL.
        let mut off = Scheduler::new(
            Config {
                pending_ttl_s: 0.0,
                ..Config::default()
            },
            9,
        )
        .unwrap();
        off.load.add_worker(1);
        off.route(&idx, &hashes_req(&[1, 2], Some("a"), 0.0))
            .unwrap();
        assert!(off.pending.is_empty());
    }

    #[test]
    fn approximate_workers_are_predicted_from_decisions() {
        let idx = PrefixIndex::new(1).unwrap();
        let mut s = Scheduler::new(
            Config {
                approx_ttl_s: 10.0,
                ..Config::default()
            },
            5,
        )
        .unwrap();
        for w in [1, 2] {
            s.load.add_worker(w);
            s.set_approx(w, true).unwrap();
        }
        let first = s
            .route(&idx, &hashes_req(&[7, 8, 9], Some("a"), 0.0))
            .unwrap();
        assert_eq!(first.overlap.total(), 0);
        let w = first.worker;
        // The same prefix follows the prediction.
        let again = s
            .route(&idx, &hashes_req(&[7, 8, 10], Some("b"), 1.0))
            .unwrap();
        assert_eq!((again.worker, again.overlap.gpu), (w, 2));
        assert_eq!(s.approx.blocks(w), 4);
        // After the TTL nothing is predicted any more.
        let late = s.route(&idx, &hashes_req(&[7, 8], None, 30.0)).unwrap();
        assert_eq!(late.overlap.total(), 0);
        assert_eq!(s.approx.blocks(w), 0);
        // Back to exact mode: the prediction is forgotten, the index decides.
        s.route(&idx, &hashes_req(&[7], Some("c"), 31.0)).unwrap();
        s.set_approx(w, false).unwrap();
        assert_eq!(s.approx.blocks(w), 0);
        s.set_approx(w, true).unwrap();
        s.remove_worker(w);
        assert!(!s.approx.contains(w));
        assert!(s.set_approx(w, true).is_err(), "unknown worker");
    }
}
