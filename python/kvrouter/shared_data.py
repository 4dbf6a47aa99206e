"""Where the team's shared data (traces, calibration, engine captures) lives.

It is read, never copied into the repo: from $KVROUTER_SHARED if set, else from
the `shared/` folder beside the checkout (../shared from the repo root).
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    env = os.environ.get("KVROUTER_SHARED")
    if env:
        return Path(env)
    return _REPO.parent / "shared"
