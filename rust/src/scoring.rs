//! Scoring (docs/design.md §3.3): which worker should take a request. Lowest cost wins.
//!
//! ```text
//! cost(w) = a * new_prefill_tokens(w) / block_size + b * decode_blocks(w) + c * queue(w)
//!         + p * evicted_blocks(w) * reuse(w)
//! ```
//!
//! The last term is cache pressure: on a worker whose cache is full, the request's new
//! blocks (uncached prompt plus expected output) push cached blocks out; each costs the
//! likelihood it would have been reused (`reuse`, the share of recently routed prompt blocks
//! the worker already held) times a block of prefill. It is off (0) for a worker without a
//! valid reported capacity.
//!
//! new_prefill_tokens = prompt tokens - cached overlap on w (host and disk hits
//! earn partial credit) + tokens already queued for prefill on w; the queued part
//! carries its own weight (`queued_prefill`, below `prefill` by default). Ties break by
//! least load, then at random (seedable). A temperature > 0 samples from a
//! softmax over normalised costs instead of taking the minimum.

use crate::error::{Error, Result};
use crate::index::Overlap;

/// Declares the policies once: the enum, its names in order, and the name <-> variant maps.
macro_rules! policies {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Policy {
            $($(#[$doc])* $variant,)*
        }

        impl Policy {
            /// Every policy, in declaration order (exported to Python as `POLICIES`).
            pub const ALL: &'static [Policy] = &[$(Policy::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Policy::$variant => $name,)*
                }
            }
        }
    };
}

policies! {
    /// Cost model of docs/design.md §3.3: uncached prefill, decode load, queue.
    Kv => "kv",
    /// Longest cached prefix, load ignored.
    PrefixOnly => "prefix_only",
    LeastLoaded => "least_loaded",
    RoundRobin => "round_robin",
    Random => "random",
}

impl Policy {
    pub fn names() -> Vec<&'static str> {
        Policy::ALL.iter().map(|p| p.name()).collect()
    }

    pub fn parse(name: &str) -> Result<Policy> {
        Policy::ALL
            .iter()
            .copied()
            .find(|p| p.name() == name)
            .ok_or_else(|| Error::UnknownPolicy(name.to_owned()))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub prefill: f64,
    /// Weight of tokens already queued for prefill on the worker (others' work),
    /// apart from the request's own uncached tokens: below `prefill`, cache reuse
    /// counts for more than queue balance.
    pub queued_prefill: f64,
    pub decode: f64,
    pub queue: f64,
    /// Weight of a cached block the request would evict, per unit of reuse likelihood.
    pub pressure: f64,
    pub temperature: f64,
    pub host_credit: f64,
    pub disk_credit: f64,
}

impl Default for Weights {
    fn default() -> Self {
        // The one definition of the default weights: the Python shell reads them from the
        // core (`kvrouter._core.DEFAULT_WEIGHTS`), never re-types them. decode and
        // queued_prefill were tuned on the Mooncake synthetic trace (bench/tune_weights.py;
        // bench/results/tune_weights.json): a request's own cache reuse counts for more than
        // others' queued work and decode load (mean TTFT 0.93x of decode 0.25 / queued 1.0).
        Weights {
            prefill: 1.0,
            queued_prefill: 0.25,
            decode: 0.1,
            queue: 0.0,
            // Tuned on the synthetic trace like the others (bench/tune_weights.py --grid
            // pressure; bench/results/tune_pressure.json: mean TTFT 0.96x of weight 1.0, the
            // best of 0-4); reported on the conversation trace by bench/routing.py.
            pressure: 4.0,
            temperature: 0.0,
            host_credit: 0.5,
            disk_credit: 0.25,
        }
    }
}

impl Weights {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("prefill_weight", self.prefill),
            ("queued_prefill_weight", self.queued_prefill),
            ("decode_weight", self.decode),
            ("queue_weight", self.queue),
            ("pressure_weight", self.pressure),
            ("temperature", self.temperature),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(format!(
                    "{name} must be a finite number >= 0, got {v}"
                )));
            }
        }
        for (name, v) in [
            ("host_credit", self.host_credit),
            ("disk_credit", self.disk_credit),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid(format!(
                    "{name} must be within [0, 1], got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// The load a scorer sees for one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadView {
    pub prefill_tokens: u64,
    pub decode_blocks: u64,
    pub queue: u64,
}

/// What a scorer knows of one worker's cache for the pressure term.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheView {
    /// GPU capacity in blocks; 0 turns the term off.
    pub capacity: u64,
    /// Blocks in use or holding cache (free space is `capacity - occupied`).
    pub occupied: u64,
    /// Cached blocks that could be evicted.
    pub cached: u64,
    /// Likelihood an evicted block would have been reused, in [0, 1].
    pub reuse: f64,
}

impl CacheView {
    /// Cached blocks pushed out when `new_blocks` more are allocated.
    pub fn evicted(&self, new_blocks: u64) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        let free = self.capacity.saturating_sub(self.occupied);
        new_blocks.saturating_sub(free).min(self.cached)
    }
}

/// A candidate being scored: its breakdown (filled in by [`cost_all`]) and its inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scored {
    pub cand: Candidate,
    pub load: LoadView,
    pub cache: CacheView,
}

/// One scored worker; the per-candidate breakdown that Explain returns.
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(module = "kvrouter._core", frozen, get_all)
)]
pub struct Candidate {
    pub worker: u64,
    pub overlap: Overlap,
    /// Leading prompt blocks in flight to the worker (routed, not yet prefilled; counted
    /// in `overlap.gpu`, see crate::pending).
    pub pending_blocks: u32,
    pub new_prefill_tokens: u64,
    pub decode_blocks: u64,
    pub queue: u64,
    /// Cached blocks the request would evict on the worker (0: term off or room left).
    pub evicted_blocks: u64,
    /// What those evictions add to `cost` (pressure weight x evicted x reuse; kv policy only).
    pub pressure_cost: f64,
    pub cost: f64,
}

/// Small seedable generator (SplitMix64): deterministic tie-breaks and sampling.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Cached prompt tokens a worker contributes, with partial credit for slow tiers.
pub fn effective_cached_tokens(ov: &Overlap, block_size: u32, w: &Weights) -> f64 {
    let bs = f64::from(block_size);
    bs * (f64::from(ov.gpu)
        + w.host_credit * f64::from(ov.host)
        + w.disk_credit * f64::from(ov.disk))
}

/// Fills in each candidate's breakdown and cost. `output_tokens` is the request's expected
/// output (0: unknown), which allocates blocks too.
pub fn cost_all(
    policy: Policy,
    w: &Weights,
    prompt_tokens: u64,
    output_tokens: u64,
    block_size: u32,
    cands: &mut [Scored],
) {
    let bs = f64::from(block_size);
    let bs_u = u64::from(block_size);
    for Scored {
        cand: c,
        load,
        cache,
    } in cands.iter_mut()
    {
        let cached = effective_cached_tokens(&c.overlap, block_size, w).min(prompt_tokens as f64);
        let new_tokens = (prompt_tokens as f64 - cached).max(0.0).round() as u64;
        c.new_prefill_tokens = new_tokens + load.prefill_tokens;
        c.decode_blocks = load.decode_blocks;
        c.queue = load.queue;
        // Blocks the request allocates: its uncached prompt blocks (GPU hits are reused in
        // place; host/disk hits are loaded into new GPU blocks) and its output.
        let gpu_cached = u64::from(c.overlap.gpu) * bs_u;
        let new_blocks =
            prompt_tokens.saturating_sub(gpu_cached).div_ceil(bs_u) + output_tokens.div_ceil(bs_u);
        c.evicted_blocks = cache.evicted(new_blocks);
        c.pressure_cost = if policy == Policy::Kv {
            w.pressure * c.evicted_blocks as f64 * cache.reuse.clamp(0.0, 1.0)
        } else {
            0.0
        };
        c.cost = match policy {
            Policy::Kv => {
                w.prefill * new_tokens as f64 / bs
                    + w.queued_prefill * load.prefill_tokens as f64 / bs
                    + w.decode * c.decode_blocks as f64
                    + w.queue * c.queue as f64
                    + c.pressure_cost
            }
            Policy::PrefixOnly => -cached / bs,
            Policy::LeastLoaded => load_of(c, bs) + c.queue as f64,
            Policy::RoundRobin | Policy::Random => 0.0,
        };
    }
}

#[inline]
fn load_of(c: &Candidate, bs: f64) -> f64 {
    c.decode_blocks as f64 + (c.new_prefill_tokens as f64) / bs
}

/// Picks a candidate index. `rr` is the round-robin cursor, advanced on use.
pub fn choose(
    policy: Policy,
    w: &Weights,
    block_size: u32,
    cands: &[Candidate],
    rng: &mut Rng,
    rr: &mut u64,
) -> usize {
    debug_assert!(!cands.is_empty());
    let bs = f64::from(block_size);
    match policy {
        Policy::RoundRobin => {
            let i = (*rr % cands.len() as u64) as usize;
            *rr = rr.wrapping_add(1);
            i
        }
        Policy::Random => rng.below(cands.len()),
        _ if w.temperature > 0.0 => sample_softmax(cands, w.temperature, rng),
        _ => {
            let min = cands.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min);
            let tol = 1e-9 * min.abs().max(1.0);
            // Among the cheapest, least load; among those, uniformly at random.
            let mut best: Vec<usize> = Vec::new();
            let mut best_load = f64::INFINITY;
            for (i, c) in cands.iter().enumerate() {
                if c.cost > min + tol {
                    continue;
                }
                let l = load_of(c, bs);
                if l < best_load - 1e-9 {
                    best_load = l;
                    best.clear();
                    best.push(i);
                } else if (l - best_load).abs() <= 1e-9 {
                    best.push(i);
                }
            }
            if best.len() == 1 {
                best[0]
            } else {
                best[rng.below(best.len())]
            }
        }
    }
}

fn sample_softmax(cands: &[Candidate], temperature: f64, rng: &mut Rng) -> usize {
    let min = cands.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min);
    let max = cands
        .iter()
        .map(|c| c.cost)
        .fold(f64::NEG_INFINITY, f64::max);
    let span = (max - min).max(1e-12);
    // Costs normalised to [0, 1] so the temperature does not depend on units.
    let weights: Vec<f64> = cands
        .iter()
        .map(|c| (-(c.cost - min) / span / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.unit() * total;
    for (i, wt) in weights.iter().enumerate() {
        x -= wt;
        if x <= 0.0 {
            return i;
        }
    }
    cands.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(worker: u64, gpu: u32) -> Scored {
        Scored {
            cand: Candidate {
                worker,
                overlap: Overlap {
                    gpu,
                    host: 0,
                    disk: 0,
                },
                ..Candidate::default()
            },
            ..Scored::default()
        }
    }

    fn pick(w: &Weights, c: &[Scored]) -> usize {
        let cs: Vec<Candidate> = c.iter().map(|x| x.cand).collect();
        choose(Policy::Kv, w, 16, &cs, &mut Rng::new(1), &mut 0)
    }

    #[test]
    fn evictions_count_only_past_free_space_and_cached_blocks() {
        let full = CacheView {
            capacity: 100,
            occupied: 95,
            cached: 30,
            reuse: 0.5,
        };
        assert_eq!(full.evicted(3), 0);
        assert_eq!(full.evicted(10), 5);
        assert_eq!(full.evicted(1000), 30, "only cached blocks can be evicted");
        let off = CacheView {
            capacity: 0,
            ..full
        };
        assert_eq!(off.evicted(1000), 0);
    }

    #[test]
    fn a_full_cache_with_reused_blocks_loses_a_cold_request() {
        let w = Weights::default();
        // Worker 1 holds 4 of the 10 prompt blocks but its cache is full of reused blocks;
        // worker 2 holds nothing and has room.
        let mut c = vec![cand(1, 4), cand(2, 0)];
        c[0].cache = CacheView {
            capacity: 100,
            occupied: 100,
            cached: 100,
            reuse: 0.9,
        };
        c[1].cache = CacheView {
            capacity: 100,
            occupied: 10,
            cached: 10,
            reuse: 0.9,
        };
        cost_all(Policy::Kv, &w, 160, 64, 16, &mut c);
        assert_eq!(c[0].cand.evicted_blocks, 6 + 4);
        assert!((c[0].cand.pressure_cost - 4.0 * 9.0).abs() < 1e-9);
        assert_eq!(c[1].cand.evicted_blocks, 0);
        assert_eq!(pick(&w, &c), 1);
        // Without the term (no capacity reported) the cached prefix wins.
        c[0].cache.capacity = 0;
        cost_all(Policy::Kv, &w, 160, 64, 16, &mut c);
        assert_eq!(c[0].cand.pressure_cost, 0.0);
        assert_eq!(pick(&w, &c), 0);
        // Other policies report the evictions but do not pay for them.
        c[0].cache.capacity = 100;
        cost_all(Policy::PrefixOnly, &w, 160, 64, 16, &mut c);
        assert_eq!(
            (c[0].cand.evicted_blocks, c[0].cand.pressure_cost),
            (10, 0.0)
        );
    }

    #[test]
    fn longest_prefix_wins_at_equal_load() {
        let w = Weights::default();
        let mut c = vec![cand(1, 2), cand(2, 8), cand(3, 0)];
        cost_all(Policy::Kv, &w, 160, 0, 16, &mut c);
        assert_eq!(pick(&w, &c), 1);
        assert_eq!(c[1].cand.new_prefill_tokens, 160 - 128);
    }

    #[test]
    fn loaded_worker_loses() {
        let w = Weights::default();
        let mut c = vec![cand(1, 8), cand(2, 0)];
        c[0].load.decode_blocks = 1000;
        cost_all(Policy::Kv, &w, 160, 0, 16, &mut c);
        assert_eq!(pick(&w, &c), 1);
    }

    #[test]
    fn ties_are_seeded() {
        let w = Weights::default();
        let mut c = vec![cand(1, 0), cand(2, 0), cand(3, 0)];
        cost_all(Policy::Kv, &w, 64, 0, 16, &mut c);
        let cs: Vec<Candidate> = c.iter().map(|x| x.cand).collect();
        let pick = |seed| {
            (0..20)
                .map(|_| 0)
                .fold((Rng::new(seed), vec![]), |(mut r, mut v), _: i32| {
                    v.push(choose(Policy::Kv, &w, 16, &cs, &mut r, &mut 0));
                    (r, v)
                })
                .1
        };
        assert_eq!(pick(5), pick(5));
        assert!(pick(5).iter().any(|&i| i != pick(5)[0]));
    }

    #[test]
    fn round_robin_rotates() {
        let w = Weights::default();
        let c = vec![Candidate::default(); 3];
        let mut rr = 0;
        let picks: Vec<usize> = (0..4)
            .map(|_| choose(Policy::RoundRobin, &w, 16, &c, &mut Rng::new(0), &mut rr))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
    }
}
