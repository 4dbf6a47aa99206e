"""Per-worker keys and HMACs for what workers write to Redis (docs/security.md, "Signed
events"): every stream entry and every heartbeat field carries an HMAC-SHA256 (truncated to
16 bytes) under the worker's own key, which the router checks before it applies anything.

Keys: the router holds one secret; worker `w` of model `m` gets
`HMAC-SHA256(secret, "kvrouter-event-key/v1" | m | w)`, so the router derives every key
and a worker's key proves nothing about another worker's. Give a worker its key with

    python -m kvrouter.security.signing --secret-file SECRET --model m --worker w > w.key

and the worker reads it from `KVROUTER_EVENT_KEY_FILE` (or hex in `KVROUTER_EVENT_KEY`).
The router side: `event_plane: {signing_secret_file: PATH, require_signed: true}`.

What is signed is defined by kvrouter.events.wire (the fields, in order); this module only
knows keys and bytes: the MAC input is every part's length (big-endian u32 each), then
the parts, so that no two part lists share an input.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvrouter.security.metrics import EVENTS_REJECTED

ENV_EVENT_KEY = "KVROUTER_EVENT_KEY"
ENV_EVENT_KEY_FILE = "KVROUTER_EVENT_KEY_FILE"
SIG_LEN = 16  # 128-bit tags: forging one is 2^-128 per try
MIN_SECRET_LEN = 32
_DERIVE = b"kvrouter-event-key/v1"

UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"


class SigningError(ValueError):
    """A key or secret that cannot be used (missing, too short, unreadable)."""


class _Keyed:
    """HMAC-SHA256 under one key with the key's inner and outer pad states absorbed once
    (RFC 2104, the same tags as `hmac`): a message then costs two SHA-256 state copies
    and its bytes, not a key set-up."""

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self.inner = hashlib.sha256(bytes(k ^ 0x36 for k in key))
        self.outer = hashlib.sha256(bytes(k ^ 0x5C for k in key))

    def tag(self, parts: Sequence[bytes]) -> bytes:
        h = self.inner.copy()
        # Every part's length first (big-endian u32 each), then the parts: no two part
        # lists give the same input.
        h.update(_lengths(len(parts)).pack(*map(len, parts)))
        for p in parts:
            h.update(p)
        o = self.outer.copy()
        o.update(h.digest())
        return o.digest()[:SIG_LEN]


_LENGTHS: dict[int, struct.Struct] = {}


def _lengths(n: int) -> struct.Struct:
    st = _LENGTHS.get(n)
    if st is None:
        st = _LENGTHS[n] = struct.Struct(f">{n}I")
    return st


def derive_worker_key(secret: bytes, model: str, worker: str) -> bytes:
    return hmac.new(secret, b"\0".join((_DERIVE, model.encode(), worker.encode())),
                    hashlib.sha256).digest()


def _key_bytes(text: bytes, what: str, min_len: int) -> bytes:
    """Hex (the form `--worker` prints) or raw bytes, surrounding white space removed."""
    text = text.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = text
    if len(key) < min_len:
        raise SigningError(f"{what} is shorter than {min_len} bytes")
    return key


def read_secret(path: str | os.PathLike[str]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read event signing secret {path}: {e.strerror}") from None
    return _key_bytes(data, f"event signing secret {path}", MIN_SECRET_LEN)


class Signer:
    """One worker's key: tags what the worker writes."""

    __slots__ = ("_keyed", "key")

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_SECRET_LEN:
            raise SigningError(f"a worker event key has at least {MIN_SECRET_LEN} bytes")
        self.key = key
        self._keyed = _Keyed(key)

    def sign(self, parts: Sequence[bytes]) -> bytes:
        return self._keyed.tag(parts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Signer | None:
        """The worker key in KVROUTER_EVENT_KEY (hex) or KVROUTER_EVENT_KEY_FILE; None if unset."""
        env = os.environ if env is None else env
        if env.get(ENV_EVENT_KEY, "").strip():
            return cls(_key_bytes(env[ENV_EVENT_KEY].encode(), ENV_EVENT_KEY, MIN_SECRET_LEN))
        path = env.get(ENV_EVENT_KEY_FILE, "").strip()
        if path:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise SigningError(f"cannot read {ENV_EVENT_KEY_FILE} {path}: {e.strerror}") from None
            return cls(_key_bytes(data, f"event key file {path}", MIN_SECRET_LEN))
        return None


class WorkerKeys:
    """The router's side: every worker's key from the secret (cached), verification, and
    signing of what the router writes for workers it has authenticated over gRPC."""

    def __init__(self, secret: bytes, *, require: bool = True, max_cached: int = 65536) -> None:
        if len(secret) < MIN_SECRET_LEN:
            raise SigningError(f"the event signing secret has at least {MIN_SECRET_LEN} bytes")
        self.secret = secret
        self.require = require
        self._keys: dict[tuple[str, str], _Keyed] = {}
        self._max = max_cached
        self._rejected = {(kind, why): EVENTS_REJECTED.labels(kind, why)
                          for kind in ("entry", "heartbeat") for why in (UNSIGNED, BAD_SIGNATURE)}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, require: bool = True) -> WorkerKeys:
        return cls(read_secret(path), require=require)

    def key(self, model: str, worker: str) -> bytes:
        return derive_worker_key(self.secret, model, worker)

    def _state(self, model: str, worker: str) -> _Keyed:
        k = self._keys.get((model, worker))
        if k is None:
            if len(self._keys) >= self._max:  # names come from Redis: bound the cache
                self._keys.clear()
            k = self._keys[(model, worker)] = _Keyed(self.key(model, worker))
        return k

    def signer(self, model: str, worker: str) -> Signer:
        return Signer(self.key(model, worker))

    def sign(self, model: str, worker: str, parts: Sequence[bytes]) -> bytes:
        return self._state(model, worker).tag(parts)

    def check(self, kind: str, model: str, worker: str, parts: Sequence[bytes],
              sig: bytes | None) -> str | None:
        """None when `sig` is the worker's tag of `parts` (or unsigned data is allowed);
        else why it is rejected ("unsigned", "bad_signature"), counted."""
        if sig is None or not sig:
            if not self.require:
                return None
            why = UNSIGNED
        elif hmac.compare_digest(sig, self.sign(model, worker, parts)):
            return None
        else:
            why = BAD_SIGNATURE
        self._rejected[(kind, why)].inc()
        return why


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvrouter.security.signing",
        description="Print a worker's event key (hex) derived from the router's secret, or "
                    "a new secret with --new-secret.")
    p.add_argument("--secret-file", help="the router's event signing secret")
    p.add_argument("--model", default="default")
    p.add_argument("--worker")
    p.add_argument("--new-secret", action="store_true", help="print a new random secret (hex)")
    args = p.parse_args(argv)
    if args.new_secret:
        print(os.urandom(32).hex())
        return 0
    if not args.secret_file or not args.worker:
        p.error("--secret-file and --worker are required (or --new-secret)")
    try:
        secret = read_secret(args.secret_file)
    except SigningError as e:
        print(e, file=sys.stderr)
        return 2
    print(derive_worker_key(secret, args.model, args.worker).hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
