//! The scheduler of one model: match, score, choose and reserve in one call.
//! The gRPC service, the fleet simulator and the benchmarks all route through here.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::hashing::BlockHashes;
use crate::index::{Overlap, PrefixIndex};
use crate::load::{External, LoadTable, Report, Reservation};
use crate::scoring::{choose, cost_all, Candidate, LoadView, Policy, Rng, Weights};

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Kv,
            weights: Weights::default(),
            lease_s: 300.0,
            report_ttl_s: 5.0,
        }
    }
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
    rng: Rng,
    rr: u64,
    epoch: Instant,
}

impl Scheduler {
    pub fn new(config: Config, seed: u64) -> Result<Scheduler> {
        config.validate()?;
        Ok(Scheduler {
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
        let prompt_blocks = if matches!(policy, Policy::RoundRobin | Policy::Random) && !req.explain
        {
            match req.prompt {
                Prompt::Hashes(h) => h.len() as u64,
                Prompt::Tokens { tokens, .. } => (tokens.len() / block_size as usize) as u64,
            }
        } else {
            match req.prompt {
                Prompt::Hashes(h) => {
                    index.find_matches_into(h, &mut overlaps);
                    h.len() as u64
                }
                Prompt::Tokens { tokens, root } => {
                    let bs = block_size as usize;
                    index.find_matches_iter(BlockHashes::new(tokens, bs, root), &mut overlaps);
                    (tokens.len() / bs) as u64
                }
            }
        };
        let mut cands: Vec<(Candidate, LoadView)> = pool
            .iter()
            .map(|&w| {
                (
                    Candidate {
                        worker: w,
                        ..Candidate::default()
                    },
                    self.view(w, req.now),
                )
            })
            .collect();
        for (w, ov) in overlaps {
            if let Ok(i) = pool.binary_search(&w) {
                cands[i].0.overlap = ov;
            }
        }
        cost_all(policy, &weights, req.prompt_tokens, block_size, &mut cands);
        let scored: Vec<Candidate> = cands.iter().map(|(c, _)| *c).collect();
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
                let load_prefill = cands[pick].1.prefill_tokens;
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
        let lease = self.config.lease_s;
        self.load.mark_prefill_done(request_id, now + lease)
    }

    pub fn report_load(&mut self, worker: u64, report: Report) -> Result<()> {
        let w = self.load.worker_mut(worker)?;
        // Remember what this router had reserved, so the report's drift can be separated out.
        w.report = Some(Report {
            reserved_prefill_tokens: w.reserved_prefill_tokens,
            reserved_decode_blocks: w.reserved_decode_blocks,
            waiting_requests: w.waiting_requests,
            ..report
        });
        Ok(())
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
}
