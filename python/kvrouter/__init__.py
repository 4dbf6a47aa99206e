"""kvrouter: a KV-cache-aware router and load balancer for LLM inference fleets.

The Rust core (`kvrouter._core`) owns hashing, the prefix index, scoring and
load accounting; this package owns I/O, configuration and the network.
"""

# The package's public names are the core's: PyO3 lists them in `_core.__all__` as
# rust/src/python/mod.rs registers them, and stubtest holds _core.pyi to that list.
from kvrouter import _core
from kvrouter._core import *  # noqa: F403

__all__: list[str] = []
__all__ += _core.__all__

__version__ = "0.1.0"
