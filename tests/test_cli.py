"""The command line: its subcommand registry (a subcommand whose module fails to import is
an error naming the module and the cause, never a silently missing command) and the
process runner its long-running commands share (kvrouter.mainloop)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from kvrouter import cli


def test_every_listed_subcommand_imports_and_registers() -> None:
    for name, module in cli.EXTERNAL_COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "register", None)), (name, module)


def test_a_subcommand_whose_import_fails_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A module that exists but whose own import fails (a dependency that is not installed).
    (tmp_path / "kvr_broken_cmd.py").write_text("import kvr_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "broken", "kvr_broken_cmd")
    sys.modules.pop("kvr_broken_cmd", None)

    assert cli.main(["broken", "--flag"]) == 1
    err = capsys.readouterr().err
    assert "kvrouter broken" in err and "kvr_broken_cmd" in err
    assert "kvr_dependency_not_installed" in err

    # Other commands still work, and --help still lists the broken one.
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "broken" in capsys.readouterr().out


def test_a_subcommand_module_without_register_is_an_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "nothing", "kvrouter.counters")
    assert cli.main(["nothing"]) == 1
    assert "has no register()" in capsys.readouterr().err


def test_a_long_running_command_runs_with_its_import_heap_frozen() -> None:
    """run_command leaves what the imports built out of GC passes (mainloop.freeze_heap):
    in a fresh interpreter, the command's coroutine sees a frozen generation."""
    code = ("import gc\n"
            "from kvrouter.mainloop import run_command\n"
            "async def main():\n"
            "    print(gc.get_freeze_count())\n"
            "raise SystemExit(run_command('probe', main(), failures=()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert int(out.stdout.strip()) > 1000, out
