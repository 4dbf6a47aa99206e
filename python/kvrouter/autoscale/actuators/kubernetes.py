"""Kubernetes actuator: replicas of the prefill, decode and aggregated Deployments (deploy/k8s/).

The official `kubernetes` client (pip extra ``kubernetes``), called from a worker thread.
Engine pods carry ``app.kubernetes.io/name=kvrouter-engine``,
``app.kubernetes.io/instance=<instance>`` and ``app.kubernetes.io/component=<role>``
labels; the Deployment of a role is ``<instance>-<role>``, and each engine registers with
the router under its pod name (the downward API), so a pod name is a worker name.

* start(role): the role's Deployment scale + 1 (the pod's name is not known yet; it
  appears in `workers()` once created, as starting until the router sees it).
* stop(name): the pod gets ``controller.kubernetes.io/pod-deletion-cost: -1000`` so its
  ReplicaSet removes exactly that (drained) pod, then its Deployment scale - 1.
* set_role(name, role): stop(name) and start(role); on Kubernetes a role is a
  Deployment, so a flip moves one replica between them (the node and the image cache
  stay warm, which is what makes a flip cheaper than a fresh scale-up elsewhere).

API errors become `ActuatorError` with the status and reason; the planner loop retries
them with a timeout and re-reads the pods at its next tick.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from kvrouter.autoscale.actuators import ActuatorError, Launched
from kvrouter.registry import Role

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
ROLE_LABEL = "app.kubernetes.io/component"
ENGINE_NAME = "kvrouter-engine"


class KubernetesActuator:
    def __init__(self, namespace: str = "kvrouter", instance: str = "kvrouter", *,
                 api_client: Any = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        from kubernetes import client

        self._client = client
        if api_client is None:
            from kubernetes import config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace, self.instance = namespace, instance
        self.clock, self.wall = clock, wall

    def deployment(self, role: Role) -> str:
        return f"{self.instance}-{role.value}"

    async def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(fn)
        except ApiException as e:
            raise ActuatorError(f"kubernetes {what}: {e.status} {e.reason}") from e

    async def workers(self) -> list[Launched]:
        selector = f"{NAME_LABEL}={ENGINE_NAME},{INSTANCE_LABEL}={self.instance}"
        pods = await self._run("list pods", lambda: self.core.list_namespaced_pod(
            self.namespace, label_selector=selector))
        now_mono, now_wall = self.clock(), self.wall()
        out = []
        for pod in pods.items:
            md = pod.metadata
            if md.deletion_timestamp is not None:
                continue  # terminating: no longer ours to plan with
            try:
                role = Role((md.labels or {}).get(ROLE_LABEL, ""))
            except ValueError:
                continue
            created: dt.datetime | None = md.creation_timestamp
            age = now_wall - created.timestamp() if created is not None else 0.0
            out.append(Launched(md.name, role, now_mono - max(0.0, age)))
        return out

    async def _scale(self, role: Role, delta: int) -> int:
        name = self.deployment(role)
        scale = await self._run(f"read scale {name}", lambda: self.apps.read_namespaced_deployment_scale(
            name, self.namespace))
        replicas = max(0, int(scale.spec.replicas or 0) + delta)
        body = {"spec": {"replicas": replicas}}
        await self._run(f"scale {name} to {replicas}",
                        lambda: self.apps.patch_namespaced_deployment_scale(
                            name, self.namespace, body))
        return replicas

    async def start(self, role: Role) -> str:
        n = await self._scale(role, +1)
        return f"{self.deployment(role)}#{n}"

    async def _role_of(self, name: str) -> Role | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = await asyncio.to_thread(self.core.read_namespaced_pod, name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ActuatorError(f"kubernetes read pod {name}: {e.status} {e.reason}") from e
        labels = (pod.metadata.labels if pod.metadata is not None else None) or {}
        try:
            return Role(labels.get(ROLE_LABEL, ""))
        except ValueError:
            raise ActuatorError(f"pod {name} has no {ROLE_LABEL} role label") from None

    async def stop(self, name: str) -> None:
        role = await self._role_of(name)
        if role is None:
            return  # already gone
        body = {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
        await self._run(f"mark pod {name}", lambda: self.core.patch_namespaced_pod(
            name, self.namespace, body))
        await self._scale(role, -1)

    async def set_role(self, name: str, role: Role) -> None:
        await self.stop(name)
        await self.start(role)
