"""n samples, in process: the simulated core's shared prefill and cancel, the cost-function
placement with the real Rust Scheduler, the vote and its early-stop rule, and request
validation (the end-to-end behaviour is tests/test_nsample.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from kvrouter._core import PrefixIndex, Scheduler
from kvrouter._proto.v1 import common_pb2
from kvrouter.backends.base import EngineCall, EngineChunk, EngineFailure, FailureKind
from kvrouter.backends.dispatch import Backends
from kvrouter.config import ModelConfig, NSampleConfig
from kvrouter.engines.sim.engine import EngineConfig, SimEngine, SimRequest
from kvrouter.engines.sim.profile import EngineProfile
from kvrouter.planner import Planner, Pool, Prompt
from kvrouter.registry import ModelState, WorkerInfo
from kvrouter.server.nsample import (
    Sample,
    SampleError,
    SampleSpec,
    answer_of,
    best_by_logprob,
    place_samples,
    run_samples,
    vote,
    vote_decided,
)

BS = 16
PROMPT = 32 * BS + 5  # 32 full blocks and a partial one


def _engine() -> SimEngine:
    return SimEngine(EngineProfile.load(), EngineConfig(block_size=BS, num_blocks=4096))


def _samples(engine: SimEngine, n: int, fork: bool) -> list[SimRequest]:
    hashes = list(range(1, PROMPT // BS + 1))
    out: list[SimRequest] = []
    for i in range(n):
        r = SimRequest(f"r{i}", hashes, PROMPT, 32, fork_of=out[0] if fork and out else None)
        out.append(r)
        engine.submit(r, 0.0)
    return out


def test_forked_samples_share_one_prefill() -> None:
    shared, alone = _engine(), _engine()
    a = _samples(shared, 4, fork=True)
    b = _samples(alone, 4, fork=False)
    shared.run_until(float("inf"))
    alone.run_until(float("inf"))
    # one prompt, plus the partial last block per forked sample (recomputed, not shared)
    assert shared.stats.prefill_tokens == PROMPT + 3 * (PROMPT - 32 * BS)
    assert alone.stats.prefill_tokens == 4 * PROMPT
    assert all(r.generated == 32 for r in a + b)
    # the samples start decoding once the one prefill is done, not after four
    assert max(r.first_token_time or 0 for r in a) < max(r.first_token_time or 0 for r in b)


def test_cancel_frees_blocks_and_releases_waiting_forks() -> None:
    e = _engine()
    parent, child = _samples(e, 2, fork=True)
    e.run_until(1e-4)  # the parent is prefilling; the fork waits for it
    assert e.cache.used_blocks == parent.held_blocks > 0
    assert e.cancel(parent, 1e-4)
    assert e.cache.used_blocks == 0  # its blocks are free at once
    assert not e.cancel(parent, 1e-4)  # already ended
    e.run_until(float("inf"))
    assert child.generated == 32  # prefilled itself once its parent went away
    assert e.stats.cancelled == 1 and e.cache.used_blocks == 0


def _planner(holders: list[int]) -> tuple[Planner, Prompt, list[int]]:
    index = PrefixIndex(BS)
    sched = Scheduler(index, seed=1)
    for w in (1, 2):
        sched.add_worker(w)
    tokens = list(range(100, 100 + 16 * BS))
    for w in holders:
        index.apply_stored(w, list(range(1, 17)), token_ids=tokens)
    return Planner(sched, block_size=BS), Prompt.from_tokens(tokens), [1, 2]


def test_placement_keeps_samples_on_the_only_prefix_holder() -> None:
    planner, prompt, cands = _planner([2])
    pl = place_samples(planner, prompt, "q", 8, 64, cands, ModelConfig(name="m"))
    assert pl.groups == {2: list(range(8))}
    load = planner.scheduler.load(2)
    # sample 0: prompt and output blocks; each other sample: its own output blocks only
    assert load.reserved_decode_blocks == (16 * BS + 64) // BS + 7 * (64 // BS)
    assert load.reserved_requests == 8
    for res in pl.reservations.values():
        assert planner.scheduler.release(res)
    assert planner.scheduler.load(2).reserved_requests == 0


def test_placement_spreads_over_holders_as_decode_load_grows() -> None:
    planner, prompt, cands = _planner([1, 2])
    pl = place_samples(planner, prompt, "q", 8, 256, cands, ModelConfig(name="m"))
    assert set(pl.groups) == {1, 2} and sum(map(len, pl.groups.values())) == 8
    assert sorted(pl.reservations) == list(range(8))


def _done(i: int, tokens: list[int], order: int) -> Sample:
    return Sample(i, tokens=tokens, state="done", order=order)


def test_vote_takes_the_majority_answer_and_its_first_sample() -> None:
    last = re.compile(NSampleConfig().answer_regex)
    s = [_done(0, [1, 7], 2), _done(1, [3, 9], 0), _done(2, [5, 7], 1), Sample(3)]
    assert answer_of(s[0], last) == "7"
    v = vote(s, last)
    assert (v.answer, v.votes, v.chosen) == ("7", 2, s[2])  # s[2] finished before s[0]
    # 2 for "7", 1 for "9", 1 outstanding: "9" could still tie
    assert not vote_decided(s, last)
    s[3] = _done(3, [7], 3)
    assert vote_decided(s, last)


def test_vote_is_decided_once_the_leader_cannot_be_caught() -> None:
    first = re.compile(r"^(\d+)")
    s = [_done(i, [4], i) for i in range(3)] + [Sample(i) for i in range(3, 5)]
    assert vote_decided(s, first)  # 3 > 0 + 2 outstanding
    s = [_done(i, [4], i) for i in range(2)] + [Sample(i) for i in range(2, 5)]
    assert not vote_decided(s, first)


def test_best_logprob_ignores_samples_without_logprobs() -> None:
    a = Sample(0, tokens=[1, 2], logprobs=[-1.0, -1.0], state="done")
    b = Sample(1, tokens=[1, 2], logprobs=[-0.1, -0.3], state="done")
    c = Sample(2, tokens=[1, 2], logprobs=[], state="done")
    assert best_by_logprob([a, b, c]) is b
    assert best_by_logprob([c]) is None


@pytest.mark.parametrize(("n", "agg", "regex", "scorer", "message"), [
    (17, "", "", "", "sampling.n must be 0..16"),
    (2, "mean", "", "", "unknown aggregator"),
    (2, "vote", "[", "", "does not compile"),
    (2, "scorer", "", "", "needs a scorer"),
    (2, "scorer", "", "x", "unknown scorer 'x'"),
    (2, "all", "", "x", "only used with aggregator 'scorer'"),
])
def test_bad_options_are_invalid_argument(n: int, agg: str, regex: str, scorer: str,
                                          message: str) -> None:
    with pytest.raises(SampleError) as e:
        SampleSpec.parse(n, agg, regex, scorer, NSampleConfig())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.message


def test_good_options_resolve_the_scorer() -> None:
    cfg = NSampleConfig(scorers={"rm": "127.0.0.1:1"}, scorer="rm")
    spec = SampleSpec.parse(4, "scorer", "", "", cfg)
    assert (spec.aggregator, spec.scorer, spec.scorer_address) == ("scorer", "rm", "127.0.0.1:1")
    assert SampleSpec.parse(4, "", "", "", cfg).aggregator == "all"


class _PerSampleBackend:
    """A backend without n (like the OpenAI client): logs when each call starts and when
    its first output goes out, and yields 3 tokens per call."""

    supports_disaggregation = False

    def __init__(self, tokens: tuple[int, int, int] = (1, 2, 3)) -> None:
        self.log: list[str] = []
        self.tokens = tokens

    async def generate(self, worker: Any, model: str, call: EngineCall,
                       ) -> AsyncIterator[EngineChunk]:
        assert call.sampling.n == 1
        self.log.append(f"start {call.request_id}")
        await asyncio.sleep(0.01)
        self.log.append(f"output {call.request_id}")
        yield EngineChunk(list(self.tokens[:2]))
        await asyncio.sleep(0.01)
        yield EngineChunk([self.tokens[2]], finished=True, finish_reason="length")

    async def close(self) -> None:
        pass


@dataclass
class _Trace:
    path: str = ""
    pool: str = ""
    request_class: str = ""
    reason: str = ""
    worker: str = ""
    samples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Req:
    rid: str
    model: ModelState
    cfg: ModelConfig
    prompt: np.ndarray
    max_tokens: int = 3
    expected_output: int = 3
    sampling: common_pb2.SamplingParams = field(
        default_factory=lambda: common_pb2.SamplingParams(n=3))
    extra_key: bytes = b""
    lora_name: str = ""
    session_id: str = ""


@pytest.mark.parametrize("stagger", [False, True])
def test_backend_without_n_gets_one_call_per_sample(stagger: bool) -> None:
    """All at once by default (the engine shares a prompt among calls it schedules
    together); with nsample.stagger_calls the others start after the first output."""
    planner, prompt, _ = _planner([])
    state = ModelState("m", BS, PrefixIndex(BS), planner.scheduler)
    for w in (1, 2):
        state.workers[f"w{w}"] = WorkerInfo(f"w{w}", w, "m", metadata={"backend": "plain"})
    fake = _PerSampleBackend()
    cfg = ModelConfig(name="m", nsample=NSampleConfig(stagger_calls=stagger))
    r = _Req("q", state, cfg, np.asarray(prompt.tokens, dtype=np.uint32))
    spec = SampleSpec.parse(3, "all", "", "", cfg.nsample)
    trace = _Trace()

    async def run() -> list[Any]:
        gen = run_samples(r, spec, planner, {"aggregated": Pool("aggregated", (1, 2))},
                          Backends({"plain": fake}), trace, lambda _i, _s: None)
        return [resp async for resp in gen]

    out = asyncio.run(run())
    assert sorted(x.sample_index for x in out if x.finished) == [0, 1, 2]
    starts = {"start q.s0", "start q.s1", "start q.s2"}
    if stagger:
        assert fake.log[:2] == ["start q.s0", "output q.s0"]
        assert starts - {"start q.s0"} <= set(fake.log[2:])
    else:
        assert set(fake.log[:3]) == starts  # every call started before any output
    assert dict(trace.samples)["kvrouter-samples"] == "n=3,finished=3,cancelled=0,failed=0"
    assert planner.scheduler.load(1).reserved_requests == 0
    assert planner.scheduler.load(2).reserved_requests == 0


def test_vote_runs_on_text_when_the_model_has_a_tokenizer(tmp_path: Any) -> None:
    from kvrouter.http.tokenizer import ModelTokenizer, build_sim_tokenizer

    path = build_sim_tokenizer(tmp_path / "tok", 1000)
    cfg = ModelConfig(name="m", tokenizer=str(path))
    text = ModelTokenizer.load(path).decode([301, 402, 503])
    want = re.findall(r"(\w+)\W*$", text)[-1]
    planner, prompt, _ = _planner([])
    state = ModelState("m", BS, PrefixIndex(BS), planner.scheduler)
    state.workers["w1"] = WorkerInfo("w1", 1, "m", metadata={"backend": "plain"})
    r = _Req("v", state, cfg, np.asarray(prompt.tokens, dtype=np.uint32))
    spec = SampleSpec.parse(3, "vote", r"(\w+)\W*$", "", cfg.nsample)
    trace = _Trace()

    async def run() -> list[Any]:
        gen = run_samples(r, spec, planner, {"aggregated": Pool("aggregated", (1,))},
                          Backends({"plain": _PerSampleBackend((301, 402, 503))}), trace, lambda _i, _s: None)
        return [resp async for resp in gen]

    out = asyncio.run(run())
    assert len(out) == 1 and list(out[0].token_ids) == [301, 402, 503]
    md = dict(trace.samples)
    assert md["kvrouter-answer"] == want != "503"
    # 2 of 3 agree: decided, the third is cancelled
    assert md["kvrouter-votes"] == "2/2" and md["kvrouter-early-stop"] == "after=2/3"
    assert planner.scheduler.load(1).reserved_requests == 0


class _FailingBackend(_PerSampleBackend):
    """Calls whose request id is in `fail` die after their first output (worker lost)."""

    supports_n = True

    def __init__(self, fail: set[str]) -> None:
        super().__init__()
        self.fail = fail

    async def generate(self, worker: Any, model: str, call: EngineCall,
                       ) -> AsyncIterator[EngineChunk]:
        for i in range(call.sampling.n):
            yield EngineChunk([7], sample_index=i)
        if call.request_id in self.fail:
            raise EngineFailure(FailureKind.WORKER, worker.name, "connection reset")
        for i in range(call.sampling.n):
            yield EngineChunk([8], finished=True, finish_reason="length", sample_index=i)


def test_a_failed_worker_loses_its_samples_only() -> None:
    planner, prompt, _ = _planner([1, 2])  # both hold the prefix: the samples spread
    state = ModelState("m", BS, PrefixIndex(BS), planner.scheduler)
    for w in (1, 2):
        state.workers[f"w{w}"] = WorkerInfo(f"w{w}", w, "m", metadata={"backend": "plain"})
    r = _Req("f", state, ModelConfig(name="m"), np.asarray(prompt.tokens, dtype=np.uint32),
             max_tokens=256, expected_output=256,
             sampling=common_pb2.SamplingParams(n=8))
    spec = SampleSpec.parse(8, "vote", "", "", NSampleConfig(early_stop=False))
    trace = _Trace()
    suspects: list[str] = []
    pl = place_samples(planner, Prompt.from_tokens(r.prompt), "probe", 8, 256, [1, 2],
                       r.cfg)
    for res in pl.reservations.values():
        planner.scheduler.release(res)
    first_call = {w: f"f.s{idxs[0]}" for w, idxs in pl.groups.items()}
    assert len(first_call) == 2  # the same placement as the run below (same loads)
    backend = _FailingBackend({first_call[2]})

    async def run() -> list[Any]:
        gen = run_samples(r, spec, planner, {"aggregated": Pool("aggregated", (1, 2))},
                          Backends({"plain": backend}), trace,
                          lambda info, _s: suspects.append(info.name))
        return [resp async for resp in gen]

    out = asyncio.run(run())
    md = dict(trace.samples)
    lost = len(pl.groups[2])
    assert md["kvrouter-samples"] == f"n=8,finished={8 - lost},cancelled=0,failed={lost}"
    assert suspects == ["w2"]
    assert len(out) == 1 and list(out[0].token_ids) == [7, 8]
    assert all(planner.scheduler.load(w).reserved_requests == 0 for w in (1, 2))
