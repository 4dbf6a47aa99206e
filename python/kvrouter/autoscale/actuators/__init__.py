"""Actuators: what starts, stops and re-roles workers for the autoscaling planner.

One interface (`Actuator`), two implementations: `local.LocalActuator` (engine processes
on this machine from a command template) and `kubernetes.KubernetesActuator` (replicas of
the prefill, decode and aggregated Deployments). The router side of a scale-down (drain, deregister)
is the planner loop's, not the actuator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvrouter.registry import Role


class ActuatorError(RuntimeError):
    """An actuator call failed (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class Launched:
    """A worker the actuator runs (or has asked for)."""

    name: str
    role: Role
    started_at: float  # planner clock (time.monotonic) of the start request


class Actuator(Protocol):
    async def workers(self) -> list[Launched]:
        """What runs now: the source of truth for the planner's view of the fleet."""
        ...

    async def start(self, role: Role) -> str:
        """Ask for one more worker of `role`; returns its name."""
        ...

    async def stop(self, name: str) -> None:
        """Stop a worker (drained or never ready); stopping a gone worker is not an error."""
        ...

    async def set_role(self, name: str, role: Role) -> None:
        """Give an idle, drained worker another role."""
        ...


__all__ = ["Actuator", "ActuatorError", "Launched"]
