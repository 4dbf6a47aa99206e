"""Paged ListWorkers (issue 13 finding 7: workers with large metadata made ListWorkers fail for
everyone) and the worker check of MarkPrefillDone, against a real router."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvrouter._proto.v1 import router_pb2
from kvrouter.client import RouterClient
from kvrouter.testing.processes import RouterProcess, start_router
from tests.conftest import run_cli

BIG = {f"k{i}": "v" * 4000 for i in range(4)}  # ~16 KB: the most metadata a worker may have


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    # A small message limit: 12 workers with the most metadata do not fit one 64 KiB reply.
    rp = start_router(tmp_path_factory.mktemp("paging"),
                      {"router": {"max_message_bytes": 64 << 10}})
    with RouterClient(rp.target) as c:
        for i in range(12):
            c.register_worker("default", f"w{i:02d}", address=f"127.0.0.1:{7000 + i}",
                              metadata=BIG)
    yield rp
    rp.stop()


def test_pages_cover_every_worker_once_in_order(router: RouterProcess) -> None:
    with RouterClient(router.target) as c:
        seen, token, pages = [], "", 0
        while True:
            resp = c.stub.ListWorkers(router_pb2.ListWorkersRequest(page_size=5, page_token=token))
            assert len(resp.workers) <= 5
            seen += [w.name for w in resp.workers]
            pages += 1
            token = resp.next_page_token
            if not token:
                break
        assert seen == [f"w{i:02d}" for i in range(12)] and pages >= 3
        # The client pages by itself; the size limit ends pages early (finding 7).
        assert [w.name for w in c.list_workers()] == seen
        first = c.stub.ListWorkers(router_pb2.ListWorkersRequest())
        assert first.next_page_token and len(first.workers) < 12
        assert first.ByteSize() < 64 << 10


def test_bad_page_arguments_are_invalid(router: RouterProcess) -> None:
    with RouterClient(router.target) as c:
        for req in (router_pb2.ListWorkersRequest(page_token="garbage!"),
                    router_pb2.ListWorkersRequest(page_size=-1)):
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ListWorkers(req)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_workers_command_lists_every_page(router: RouterProcess) -> None:
    out = run_cli("workers", "--target", router.target, "--json")
    assert out.returncode == 0, out.stderr
    assert [w["name"] for w in json.loads(out.stdout)] == [f"w{i:02d}" for i in range(12)]


def test_mark_prefill_done_checks_the_worker(tmp_path: Path) -> None:
    rp = start_router(tmp_path)
    try:
        with RouterClient(rp.target) as c:
            c.register_worker("default", "a")
            c.register_worker("default", "b")
            d = c.route(list(range(64)), request_id="r1", candidates=["a"])
            with pytest.raises(grpc.RpcError) as err:
                c.mark_prefill_done("r1", worker="b")
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "nothing marked" in (err.value.details() or "")
            (a,) = [w for w in c.list_workers() if w.name == "a"]
            assert a.reserved_prefill_tokens > 0  # unchanged by the refused call
            assert c.mark_prefill_done("r1", worker=d.worker) is True
            (a,) = [w for w in c.list_workers() if w.name == "a"]
            assert a.reserved_prefill_tokens == 0
    finally:
        rp.stop()
