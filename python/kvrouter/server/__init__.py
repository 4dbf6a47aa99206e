"""The routing service (gRPC Router, health, reflection, metrics)."""

from kvrouter.server.app import RouterApp, build_registry, run, serve

__all__ = ["RouterApp", "build_registry", "run", "serve"]
