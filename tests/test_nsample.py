"""Router-side n samples (server/nsample.py) against simulated engines and reference scorers
running as processes over gRPC: one prefill for co-located samples, spreading over prefix
holders, vote with early stop (cancelled at the engine), best_logprob, the scorer and its
fallbacks, and bad input."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import httpx
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.processes import ChildProcess, free_port
from kvrouter.testing.scorer import mean_token_score
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import (
    BS,
    Engines,
    Reply,
    engine_stats,
    router_config,
    wait_no_reservations,
    wait_routable,
)

VOCAB = 100  # engines' generated token ids are < VOCAB
MAX_N = 8


def _scorer(workdir: Path, name: str, *args: str) -> tuple[ChildProcess, str]:
    import sys

    ready = workdir / f"{name}.ready"
    proc = ChildProcess(name=name, cmd=[sys.executable, "-m", "kvrouter.testing.scorer",
                                        "--ready-file", str(ready), *args],
                        log_path=workdir / f"{name}.log").start()
    addr = wait_until(lambda: ready.read_text().strip() if ready.exists() else "", 30,
                      what=f"scorer {name} serving", procs=[proc])
    return proc, addr


@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Engines]]:
    """Two aggregated engines in real time (vocabulary VOCAB); scorers: good, slow (3 s
    against a 0.5 s timeout), broken (one score short), down (nothing listens)."""
    work = tmp_path_factory.mktemp("nsample")
    good, good_addr = _scorer(work, "good")
    slow, slow_addr = _scorer(work, "slow", "--delay-s", "3")
    broken, broken_addr = _scorer(work, "broken", "--broken")
    cfg = router_config()
    cfg["router"]["http"] = f"127.0.0.1:{free_port()}"  # the OpenAI-compatible front too
    cfg["models"][0]["nsample"] = {
        "max_n": MAX_N, "scorer_timeout_s": 0.5, "scorer": "good",
        "scorers": {"good": good_addr, "slow": slow_addr, "broken": broken_addr,
                    "down": f"127.0.0.1:{free_port()}"}}
    router = module_router_server(cfg)
    engines = Engines(work / "engines", router.target)
    engines.workdir.mkdir(parents=True, exist_ok=True)
    try:
        for name in ("e1", "e2"):
            engines.start("aggregated", "--time-scale", "1.0", "--vocab-size", str(VOCAB),
                          name=name)
        wait_routable(router.target, {"e1", "e2"})
        yield router, engines
    finally:
        engines.stop_all()
        for p in (good, slow, broken):
            p.stop()


def _call(target: str, tokens: list[int], sampling: common_pb2.SamplingParams,
          **kw: Any) -> Reply:
    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        call = stub.Generate(router_pb2.RouterGenerateRequest(
            token_ids=tokens, request_id=uuid.uuid4().hex, sampling=sampling, **kw), timeout=60)
        out: list[engine_pb2.GenerateResponse] = []
        code, details = grpc.StatusCode.OK, ""
        try:
            out.extend(call)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        md = {k: unquote(v) for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
    return Reply([t for r in out for t in r.token_ids], out, md, code, details)


def call(router: Any, tokens: list[int], max_tokens: int, n: int, *,
         stop: tuple[int, ...] = (), seed: int | None = None, **kw: Any) -> Reply:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, n=n, stop_token_ids=stop)
    if seed is not None:
        sampling.seed = seed
    return _call(router.target, tokens, sampling, **kw)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def running(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return int(engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(),
                                                       timeout=10).load.running)


def placement(rep: Reply) -> dict[str, int]:
    return {w: int(k) for w, k in (p.split(":") for p in rep.metadata["kvrouter-placement"]
                                   .split(","))}


def by_sample(rep: Reply) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in rep.responses:
        out.setdefault(r.sample_index, []).extend(r.token_ids)
    return out


def test_n4_colocated_share_one_prefill(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    toks = prompt(101, 16 * BS)
    before = {n: engine_stats(e.address) for n, e in engines.procs.items()}
    rep = call(router, toks, 12, 4)
    assert rep.code == grpc.StatusCode.OK, rep.details
    finals = [r for r in rep.responses if r.finished]
    assert sorted(r.sample_index for r in finals) == [0, 1, 2, 3]
    assert all(len(t) == 12 for t in by_sample(rep).values())
    assert rep.metadata["kvrouter-samples"] == "n=4,finished=4,cancelled=0,failed=0"
    assert rep.metadata["kvrouter-aggregator"] == "all"
    (worker, k), = placement(rep).items()  # one worker: nobody held the prefix
    assert k == 4
    after = engine_stats(engines.procs[worker].address)
    computed = after["prefill_tokens"] - before[worker]["prefill_tokens"]
    # one prefill of the prompt; each forked sample recomputes at most its last block
    assert len(toks) <= computed <= len(toks) + 3 * BS
    wait_no_reservations(router.target)


def test_samples_spread_over_prefix_holders(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    toks = prompt(202, 16 * BS)
    for e in engines.procs.values():  # both engines compute (and report) the prefix
        with grpc.insecure_channel(e.address) as ch:
            list(engine_pb2_grpc.EngineStub(ch).Generate(engine_pb2.GenerateRequest(
                request_id=uuid.uuid4().hex, token_ids=toks,
                sampling=common_pb2.SamplingParams(max_tokens=1)), timeout=30))

    def holders() -> int:
        with RouterClient(router.target) as rc:
            ex = rc.explain(toks)
        return sum(1 for c in ex.candidates if c.gpu_blocks >= 15)

    wait_until(lambda: holders() == 2, 20, what="both engines hold the prefix")
    # 8 samples of 96 tokens: each one co-located adds its decode blocks to the holder's
    # load, until the other holder (which only lacks the prompt's last block) is cheaper
    rep = call(router, toks, 96, MAX_N, seed=9)
    assert rep.code == grpc.StatusCode.OK, rep.details
    pl = placement(rep)
    assert set(pl) == {"e1", "e2"} and sum(pl.values()) == MAX_N, pl
    assert sorted(r.sample_index for r in rep.responses if r.finished) == list(range(MAX_N))
    # a seeded request's calls get their own seeds: no two samples repeat each other
    assert len({tuple(t) for t in by_sample(rep).values()}) == MAX_N
    wait_no_reservations(router.target)


def _lengths(seed: int, n: int, stop: set[int], max_tokens: int) -> list[int]:
    """Sample lengths the simulated engine produces for `seed` (its per-sample token
    stream is random.Random(seed * 1000003 + i).randrange(vocabulary); a stop token ends
    the sample and is not returned)."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1000003 + i)
        k = 0
        while k < max_tokens and rng.randrange(VOCAB) not in stop:
            k += 1
        out.append(k)
    return out


def test_vote_early_stop_cancels_outstanding_samples(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    stop, max_tokens = set(range(5)), 300
    # a seed whose samples mostly end within 12 tokens while one runs for 150 or more
    def fits(ls: list[int]) -> bool:
        return sum(x <= 12 for x in ls) >= 5 and max(ls) >= 150

    seed = next(s for s in range(1, 100000) if fits(_lengths(s, MAX_N, stop, max_tokens)))
    lengths = _lengths(seed, MAX_N, stop, max_tokens)
    toks = prompt(303, 16 * BS)
    before = {n: engine_stats(e.address) for n, e in engines.procs.items()}
    # "()" gives every sample the same (empty) answer: the vote is decided after 5 of 8
    rep = call(router, toks, max_tokens, MAX_N, stop=tuple(stop), seed=seed,
               aggregator="vote", answer_regex="()")
    assert rep.code == grpc.StatusCode.OK, rep.details
    md = rep.metadata
    assert md["kvrouter-samples"] == f"n={MAX_N},finished=5,cancelled=3,failed=0", md
    assert md["kvrouter-early-stop"] == "after=5/8"
    assert md.get("kvrouter-answer", "") == "" and md["kvrouter-votes"] == "5/5"  # empty: not sent
    assert len(rep.responses) == 1 and rep.final.finished
    chosen = int(md["kvrouter-chosen-sample"])
    assert rep.final.sample_index == chosen and len(rep.tokens) == lengths[chosen]
    (worker, _), = placement(rep).items()
    wait_no_reservations(router.target)

    # the engine stopped the long sample(s): far fewer tokens decoded than all 8 would take
    def decoded() -> float:
        return engine_stats(engines.procs[worker].address)["decode_tokens"] - \
            before[worker]["decode_tokens"]

    wait_until(lambda: running(engines.procs[worker].address) == 0, 10, what="engine idle")
    assert decoded() < sum(lengths) - 30, (decoded(), lengths)


def test_vote_answer_is_the_majority_of_the_last_number(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    rep = call(router, prompt(404, 8 * BS), 3, 6, seed=11, aggregator="vote")
    assert rep.code == grpc.StatusCode.OK, rep.details
    md = rep.metadata
    assert md["kvrouter-samples"].startswith("n=6,finished=")
    assert md["kvrouter-answer"] == str(rep.tokens[-1])  # the chosen sample's last number
    votes, finished = map(int, md["kvrouter-votes"].split("/"))
    assert 1 <= votes <= finished <= 6
    wait_no_reservations(router.target)


def test_best_logprob_picks_the_highest_mean(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    toks = prompt(505, 8 * BS)
    every = call(router, toks, 8, 4, seed=5)  # the same samples, all of them
    assert every.code == grpc.StatusCode.OK, every.details
    means = {}
    for i in range(4):
        lps = [lp for r in every.responses if r.sample_index == i for lp in r.logprobs]
        means[i] = sum(lps) / len(lps)
    best = call(router, toks, 8, 4, seed=5, aggregator="best_logprob")
    assert best.code == grpc.StatusCode.OK, best.details
    want = max(means, key=lambda i: means[i])
    assert int(best.metadata["kvrouter-chosen-sample"]) == want == best.final.sample_index
    assert best.tokens == by_sample(every)[want]
    assert best.final.usage.completion_tokens == 4 * 8  # every sample's tokens
    wait_no_reservations(router.target)


def test_scorer_chooses_the_best_scored_sample(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    rep = call(router, prompt(606, 8 * BS), 6, 4, aggregator="scorer")  # default: good
    assert rep.code == grpc.StatusCode.OK, rep.details
    md = rep.metadata
    assert "kvrouter-fallback" not in md
    scores = {int(k): float(v) for k, v in (p.split("=") for p in md["kvrouter-scores"]
                                           .split(","))}
    assert len(scores) == 4
    chosen = int(md["kvrouter-chosen-sample"])
    assert scores[chosen] == max(scores.values())
    assert mean_token_score(rep.tokens) == pytest.approx(scores[chosen], rel=1e-5)
    wait_no_reservations(router.target)


@pytest.mark.parametrize(("scorer", "why"), [("down", "UNAVAILABLE"),
                                             ("slow", "DEADLINE_EXCEEDED"),
                                             ("broken", "returned 3 scores for 4")])
def test_scorer_failure_falls_back_to_vote(fleet: tuple[Any, Engines], scorer: str,
                                           why: str) -> None:
    router, _ = fleet
    rep = call(router, prompt(707, 8 * BS), 4, 4, aggregator="scorer", scorer=scorer)
    assert rep.code == grpc.StatusCode.OK, rep.details
    md = rep.metadata
    assert why in md["kvrouter-fallback"] and md["kvrouter-fallback"].endswith(": vote")
    assert "kvrouter-scores" not in md
    assert md["kvrouter-answer"] == str(rep.tokens[-1])
    wait_no_reservations(router.target)


@pytest.mark.parametrize(("n", "kw", "message"), [
    (MAX_N + 1, {}, f"sampling.n must be 0..{MAX_N}"),
    (4, {"aggregator": "median"}, "unknown aggregator 'median'"),
    (4, {"aggregator": "vote", "answer_regex": "(\\d+"}, "answer_regex does not compile"),
    (4, {"aggregator": "scorer", "scorer": "oracle"}, "unknown scorer 'oracle'"),
    (4, {"aggregator": "vote", "scorer": "good"}, "only used with aggregator 'scorer'"),
])
def test_bad_sample_requests_are_refused_before_anything_runs(
        fleet: tuple[Any, Engines], n: int, kw: dict[str, Any], message: str) -> None:
    router, engines = fleet
    before = {name: engine_stats(e.address)["requests"] for name, e in engines.procs.items()}
    rep = call(router, prompt(808, 4 * BS), 4, n, **kw)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT, (rep.code, rep.details)
    assert message in rep.details
    assert not rep.responses
    assert {name: engine_stats(e.address)["requests"]
            for name, e in engines.procs.items()} == before
    wait_no_reservations(router.target)


def test_http_front_aggregates_n_samples_into_one_choice(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    base = _http_base(router)
    body = {"model": "default", "prompt": prompt(909, 8 * BS), "max_tokens": 4, "n": 4,
            "seed": 3, "aggregator": "vote", "return_token_ids": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == 1 and len(out["choices"][0]["token_ids"]) == 4
    rep = out["kvrouter"]
    assert rep["samples"] == "n=4,finished=4,cancelled=0,failed=0"
    assert rep["aggregator"] == "vote" and rep["answer"] == str(out["choices"][0]["token_ids"][-1])
    bad = httpx.post(f"{base}/v1/completions", json={**body, "aggregator": "median"}, timeout=60)
    assert bad.status_code == 400 and "unknown aggregator 'median'" in bad.text
    wait_no_reservations(router.target)


def _http_base(router: Any) -> str:
    import yaml

    cfg = yaml.safe_load(Path(router.config_path).read_text())
    return f"http://{cfg['router']['http']}"


def test_client_cancel_stops_the_samples_and_frees_everything(
        fleet: tuple[Any, Engines]) -> None:
    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    router, engines = fleet
    with grpc.insecure_channel(router.target) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.RouterGenerateRequest(
            token_ids=prompt(1001, 8 * BS), request_id=uuid.uuid4().hex,
            sampling=common_pb2.SamplingParams(max_tokens=2000, n=4)), timeout=60)
        first = next(call)  # the samples are decoding
        assert not first.finished
        call.cancel()
    wait_no_reservations(router.target)
    # the engines aborted the samples: nothing keeps decoding its 2000 tokens
    for e in engines.procs.values():
        wait_until(lambda e=e: running(e.address) == 0, 10, what=f"{e.name} idle")
