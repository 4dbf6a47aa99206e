"""`kvrouter demo` end to end: a real router and real simulated engine processes, the
workload through gRPC, a results table per policy, and no process left behind."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path

from kvrouter.testing.processes import child_env, kvrouter_cmd
from kvrouter.testing.wait import wait_until
from tests.conftest import run_cli


def _table(stdout: str) -> dict[str, dict[str, str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["policy", "requests"])
    head = lines[start].split()
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(head):
            break
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{d.name}: {cmd}")
    return out


def test_demo_prints_a_row_per_policy_and_kv_beats_round_robin() -> None:
    # Four conversations on four engines with a pause between turns: the kv policy keeps
    # each conversation on the engine that holds its history; round robin scatters it.
    r = run_cli("demo", "--requests", "64", "--conversations", "4", "--think-ms", "150",
                "--policies", "kv,round_robin", "--quiet", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table(r.stdout)
    assert set(rows) == {"kv", "round_robin"}, r.stdout
    for row in rows.values():
        assert row["requests"] == "64" and row["errors"] == "0"
        assert 0.0 <= float(row["hit_rate"]) <= 1.0
        assert float(row["ttft_mean_ms"]) > 0
    assert float(rows["kv"]["hit_rate"]) > float(rows["round_robin"]["hit_rate"]), r.stdout
    # the hit rate is what the engines reported; the kv policy's prediction is shown beside it
    assert float(rows["kv"]["predicted"]) > 0
    assert rows["round_robin"]["predicted"] == "-"
    assert "Usage.cached_tokens" in r.stdout


def test_demo_rejects_unknown_policy_without_starting_anything() -> None:
    r = run_cli("demo", "--policies", "kv,nonsense", timeout=60)
    assert r.returncode == 2
    assert "nonsense" in r.stderr


def test_interrupted_demo_stops_its_children() -> None:
    proc = subprocess.Popen(
        kvrouter_cmd("demo", "--requests", "2000", "--policies", "kv"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    target = ""
    seen: list[str] = []

    def router_reported() -> str:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited ({proc.returncode}):\n" + "".join(seen))
        with contextlib.suppress(queue.Empty):
            while True:
                line = lines.get_nowait()
                seen.append(line)
                m = re.search(r"router (127\.0\.0\.1:\d+)", line)
                if m:
                    return m.group(1)
        return ""

    try:
        target = wait_until(router_reported, 120, interval=0.2, what="the demo to report its router")
        assert _processes_mentioning(target), "router and engines should be running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        # The demo waits for its children before it exits: nothing is left.
        assert _processes_mentioning(target) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for line in _processes_mentioning(target) if target else []:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
