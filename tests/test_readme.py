"""The README's in-process example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_in_process_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "from kvrouter import PrefixIndex" in b)
    exec(compile(example, "README.md", "exec"), {})


def test_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    commands = [line for line in first.group(1).splitlines() if line and not line.startswith("#")]
    assert commands == ["bash scripts/setup.sh && .venv/bin/kvrouter demo",
                        "bash scripts/ensure_redis.sh && bash scripts/test.sh"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/ensure_redis.sh" in ci and "scripts/test.sh" in ci
