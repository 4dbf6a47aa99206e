//! Property test: random event sequences drive the index and a plain reference model
//! (the Rust twin of tests/test_index_property.py + tests/reference_index.py), so that
//! `cargo test` alone vets a change to the index. Every query must agree.

use std::collections::{BTreeMap, BTreeSet};

use kvrouter_core::hashing::{hash_blocks, HASH_SEED};
use kvrouter_core::index::{Overlap, PrefixIndex};
use kvrouter_core::payload::Stored;
use kvrouter_core::tier::Tier;
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const BS: u32 = 2;
const WORKERS: [u64; 3] = [1, 2, 3];
const NEVER_STORED: u64 = 999;

// ---- the reference model: docs/design.md §3.1 followed literally, plain maps and sets ----------

fn root(extra_key: Option<&[u8]>) -> u64 {
    match extra_key {
        Some(k) if !k.is_empty() => xxh3_64_with_seed(k, HASH_SEED ^ 0x6578_7472_616b_6579),
        _ => 0,
    }
}

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let local = xxh3_64_with_seed(&bytes, HASH_SEED);
    let mut buf = parent.to_le_bytes().to_vec();
    buf.extend_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&buf, HASH_SEED)
}

#[derive(Default, Clone)]
struct RefWorker {
    /// Engine hash -> its router hashes.
    engine: BTreeMap<u64, Vec<u64>>,
    /// Router hash -> tiers held.
    tiers: BTreeMap<u64, BTreeSet<Tier>>,
}

#[derive(PartialEq, Debug)]
enum Outcome {
    Ok,
    Orphan,
    Mismatch,
}

#[derive(Default)]
struct RefIndex {
    workers: BTreeMap<u64, RefWorker>,
}

impl RefIndex {
    fn stored(&mut self, worker: u64, ev: &Stored) -> Outcome {
        if !ev.block_size.is_multiple_of(BS) {
            return Outcome::Mismatch;
        }
        let mut prev = match ev.parent {
            None => root(ev.extra_key.as_deref()),
            Some(p) => match self.workers.get(&worker).and_then(|w| w.engine.get(&p)) {
                Some(group) => *group.last().unwrap(),
                None => return Outcome::Orphan,
            },
        };
        let w = self.workers.entry(worker).or_default();
        let k = (ev.block_size / BS) as usize;
        let tokens = ev.tokens.as_ref().unwrap();
        let bs = BS as usize;
        for (i, eh) in ev.hashes.iter().enumerate() {
            let mut group = Vec::new();
            for j in 0..k {
                let start = (i * k + j) * bs;
                prev = chain(prev, &tokens[start..start + bs]);
                group.push(prev);
            }
            if let Some(old) = w.engine.get(eh) {
                if old.last() != group.last() {
                    for r in old {
                        w.tiers.remove(r);
                    }
                }
            }
            for r in &group {
                w.tiers.entry(*r).or_default().insert(ev.tier);
            }
            w.engine.insert(*eh, group);
        }
        Outcome::Ok
    }

    fn removed(&mut self, worker: u64, hashes: &[u64], tier: Tier) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        for eh in hashes {
            let Some(group) = w.engine.get(eh).cloned() else {
                continue;
            };
            let mut gone = true;
            for r in group {
                let Some(held) = w.tiers.get_mut(&r) else {
                    continue;
                };
                held.remove(&tier);
                if held.is_empty() {
                    w.tiers.remove(&r);
                } else {
                    gone = false;
                }
            }
            if gone {
                w.engine.remove(eh);
            }
        }
    }

    fn cleared(&mut self, worker: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            *w = RefWorker::default();
        }
    }

    fn remove_worker(&mut self, worker: u64) {
        self.workers.remove(&worker);
    }

    fn find_matches(&self, hashes: &[u64]) -> Vec<(u64, Overlap)> {
        let mut out = Vec::new();
        for (id, w) in &self.workers {
            let mut o = Overlap::default();
            for h in hashes {
                let Some(best) = w.tiers.get(h).and_then(|t| t.first()) else {
                    break;
                };
                match best {
                    Tier::Gpu => o.gpu += 1,
                    Tier::Host => o.host += 1,
                    Tier::Disk => o.disk += 1,
                }
            }
            if o.total() > 0 {
                out.push((*id, o));
            }
        }
        out
    }

    fn router_hashes(&self, worker: u64) -> Vec<(u64, u8)> {
        self.workers.get(&worker).map_or_else(Vec::new, |w| {
            w.tiers
                .iter()
                .map(|(r, ts)| (*r, ts.iter().map(|t| t.bit()).sum()))
                .collect()
        })
    }
}

// ---- operations -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Store {
        worker: u64,
        /// 0: the chain root; 12: a parent never stored (an orphan); else an index into
        /// the engine hashes stored so far.
        parent: usize,
        blocks: usize,
        engine_block_size: u32,
        tier: Tier,
        lora: bool,
        tokens: Vec<u32>,
        engine_hashes: Vec<u64>,
    },
    Remove {
        worker: u64,
        hashes: Vec<u64>,
        tier: Tier,
    },
    Clear(u64),
    Drop(u64),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

fn worker() -> impl Strategy<Value = u64> {
    prop::sample::select(WORKERS.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            worker(),
            0usize..=12,
            1usize..=3,
            // 3 is not a multiple of BS: a mismatched event.
            prop::sample::select(vec![BS, 2 * BS, 3]),
            tier(),
            any::<bool>(),
            prop::collection::vec(0u32..4, 12),
            // Engine hashes from a small pool, so that they repeat (duplicates, re-stores).
            prop::collection::vec(1u64..=40, 3),
        )
            .prop_map(|(worker, parent, blocks, engine_block_size, tier, lora, tokens, engine_hashes)| Op::Store {
                worker,
                parent,
                blocks,
                engine_block_size,
                tier,
                lora,
                tokens,
                engine_hashes,
            }),
        1 => (worker(), prop::collection::vec(1u64..=45, 0..4), tier())
            .prop_map(|(worker, hashes, tier)| Op::Remove { worker, hashes, tier }),
        1 => worker().prop_map(Op::Clear),
        1 => worker().prop_map(Op::Drop),
    ]
}

fn sorted(mut v: Vec<(u64, Overlap)>) -> Vec<(u64, Overlap)> {
    v.sort_unstable_by_key(|x| x.0);
    v
}

proptest! {
    // About 1 s in a debug build.
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_reference(
        ops in prop::collection::vec(op(), 0..40),
        queries in prop::collection::vec(prop::collection::vec(0u32..4, 0..16), 0..12),
    ) {
        let mut idx = PrefixIndex::new(BS).unwrap();
        let mut reference = RefIndex::default();
        // Token sequences stored from the root (plain key) and each engine hash's prefix.
        let mut history: Vec<Vec<u32>> = Vec::new();
        let mut known: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for op in &ops {
            match op {
                Op::Store { worker, parent, blocks, engine_block_size, tier, lora, tokens, engine_hashes } => {
                    let ebs = *engine_block_size as usize;
                    if tokens.len() < blocks * ebs {
                        continue;
                    }
                    let toks = tokens[..blocks * ebs].to_vec();
                    let pool: Vec<u64> = known.keys().copied().collect();
                    let parent = match *parent {
                        12 => Some(NEVER_STORED),
                        0 => None,
                        _ if pool.is_empty() => None,
                        p => Some(pool[p % pool.len()]),
                    };
                    let ev = Stored {
                        hashes: engine_hashes[..*blocks].to_vec(),
                        parent,
                        tokens: Some(toks.clone()),
                        block_size: *engine_block_size,
                        router_hashes: None,
                        tier: *tier,
                        extra_key: lora.then(|| b"lora-a".to_vec()),
                    };
                    let outcome = reference.stored(*worker, &ev);
                    let res = idx.apply_stored(*worker, &ev);
                    prop_assert_eq!(res.orphan_events == 1, outcome == Outcome::Orphan);
                    prop_assert_eq!(res.mismatched_events == 1, outcome == Outcome::Mismatch);
                    if outcome == Outcome::Ok {
                        // Every router block is new, a new tier, or a duplicate.
                        let k = (*engine_block_size / BS) as usize;
                        prop_assert_eq!(res.stored_blocks + res.duplicate_blocks, (blocks * k) as u64);
                        let mut prefix = parent.and_then(|p| known.get(&p).cloned()).unwrap_or_default();
                        prefix.extend_from_slice(&toks);
                        if !lora {
                            history.push(prefix.clone());
                        }
                        for (i, eh) in ev.hashes.iter().enumerate() {
                            let mut p = parent.and_then(|p| known.get(&p).cloned()).unwrap_or_default();
                            p.extend_from_slice(&toks[..(i + 1) * ebs]);
                            known.insert(*eh, p);
                        }
                    }
                }
                Op::Remove { worker, hashes, tier } => {
                    reference.removed(*worker, hashes, *tier);
                    idx.apply_removed(*worker, hashes, *tier);
                }
                Op::Clear(w) => {
                    reference.cleared(*w);
                    idx.clear_worker(*w);
                }
                Op::Drop(w) => {
                    reference.remove_worker(*w);
                    idx.remove_worker(*w);
                }
            }
        }
        let mut candidates: Vec<Vec<u32>> = queries.clone();
        candidates.extend(history.iter().cloned());
        for h in &history {
            for q in queries.iter().take(2) {
                let mut c = h[..h.len() / 2].to_vec();
                c.extend_from_slice(q);
                candidates.push(c);
            }
        }
        for q in &candidates {
            let hashes = hash_blocks(q, BS as usize, None);
            prop_assert_eq!(sorted(idx.find_matches(&hashes)), reference.find_matches(&hashes), "query {:?}", q);
        }
        for w in WORKERS {
            let expected = reference.router_hashes(w);
            prop_assert_eq!(idx.worker_blocks(w), expected.len() as u64, "worker {}", w);
            prop_assert_eq!(idx.worker_router_hashes(w), expected, "worker {}", w);
        }
        // A snapshot round trip preserves every answer, byte for byte.
        let snap = idx.snapshot();
        let back = PrefixIndex::from_snapshot(&snap).unwrap();
        for q in &candidates {
            let hashes = hash_blocks(q, BS as usize, None);
            prop_assert_eq!(sorted(back.find_matches(&hashes)), sorted(idx.find_matches(&hashes)));
        }
        prop_assert_eq!(back.snapshot(), snap);
        prop_assert_eq!(back.num_entries(), idx.num_entries());
    }
}
