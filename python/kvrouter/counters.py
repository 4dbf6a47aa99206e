"""One pattern for a component's running counters.

A component (ingest, bridge, publisher, simulated engine, fleet simulator) keeps its
tallies in a dataclass that subclasses `Counters`: the fields are the counters,
declared once; `as_dict()` is what logs, status RPCs and tests read; `add()` folds
another tally in (per-call results into a total). Prometheus metrics stay separate
(they are process-wide and labelled); a component bumps both where it counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from kvrouter._core import ApplyResult


@dataclasses.dataclass
class Counters:
    """Base for dataclasses of counters (int fields, or dict[str, int] for keyed counts)."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = dict(v) if isinstance(v, dict) else v
        return out

    def add(self, other: Any) -> Self:
        """Adds `other`'s counters of the same names (a Counters, or any object with
        those attributes, such as a core ApplyResult); returns self."""
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            theirs = getattr(other, f.name, None)
            if theirs is None:
                continue
            if isinstance(mine, dict):
                for k, n in theirs.items():
                    mine[k] = mine.get(k, 0) + n
            else:
                setattr(self, f.name, mine + theirs)
        return self


class ApplyTotals(dict[str, int]):
    """Sums of the index's ApplyResults, keyed by the core's counter names
    (`ApplyResult.FIELDS`, declared once in rust/src/index.rs)."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(ApplyResult.FIELDS, 0))

    def add(self, r: ApplyResult) -> Self:
        for name in ApplyResult.FIELDS:
            self[name] += getattr(r, name)
        return self
