"""Redis ACL users per role for the event plane (docs/security.md, "Redis"), as the rule lists
of `ACL SETUSER` (Redis 7: %W~ / %RW~ key permissions). The key layout is
kvrouter.events.keys; the commands are the ones the publisher and the router's plane send.

    worker  append to its model's stream keys, write its own heartbeat hash (and the workers
            set), pop its own dump requests. It cannot read, trim or delete a stream, nor touch
            another worker's heartbeat or dump keys.
    router  read and trim the streams, read heartbeats; write its snapshots, reservations,
            dump requests, sessions and the entries / heartbeats of workers that reach it over
            gRPC (signed with their keys). No administrative or dangerous commands.

A worker's Redis user cannot stop it from appending an entry that names another worker, or
from trimming with XADD MAXLEN: that is what the entry signatures (signing.py) and the
router's gap repair are for.

    python -m kvrouter.security.redis_acl worker --model m --worker w0 --password-file F
prints the `ACL SETUSER` line for redis-cli or an ACL file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvrouter.protocol import check_name

# Commands redis-py sends when it connects (its CLIENT SETINFO may fail: redis-py ignores
# that, and the command does not exist before Redis 7.2, so it is not named here).
_CONNECT = ("+ping", "+select", "+hello")
WORKER_COMMANDS = ("+xadd", "+hset", "+hincrby", "+pexpire", "+sadd", "+blpop", "+lpop")
ROUTER_COMMANDS = (
    "+xread", "+xrange", "+xtrim", "+xadd", "+hset", "+hincrby", "+hget", "+hgetall",
    "+pexpire", "+sadd", "+srem", "+smembers", "+get", "+set", "+del", "+zadd", "+zrem",
    "+zrange", "+rpush", "+scan", "+exists", "+type",
)


def worker_rules(namespace: str, model: str, worker: str, password: str) -> list[str]:
    """ACL SETUSER rules of worker `worker` of `model` (its user name is the worker name)."""
    for what, name in (("namespace", namespace), ("model", model), ("worker", worker)):
        check_name(what, name)
    ns = namespace
    return [
        "reset", "on", f">{password}", "resetchannels", "-@all", *_CONNECT, *WORKER_COMMANDS,
        f"%W~{ns}:kv:{model}:*",  # append to the model's streams (never read, trim, delete)
        f"%W~{ns}:hb:{model}:{worker}",  # its own heartbeat hash
        f"%W~{ns}:workers:{model}",  # announce itself in the workers set
        f"%RW~{ns}:dump:{model}:{worker}",  # pop its own dump requests
    ]


def router_rules(namespace: str, password: str) -> list[str]:
    """ACL SETUSER rules of the router replicas' user: the namespace's keys only."""
    check_name("namespace", namespace)
    return ["reset", "on", f">{password}", "resetchannels", "-@all", *_CONNECT,
            *ROUTER_COMMANDS, f"~{namespace}:*"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrouter.security.redis_acl",
                                description="Print the ACL SETUSER line of a kvrouter role.")
    p.add_argument("role", choices=["worker", "router"])
    p.add_argument("--namespace", default="kvrouter")
    p.add_argument("--model", default="default")
    p.add_argument("--worker", help="the worker (role worker); also its Redis user name")
    p.add_argument("--user", default="kvrouter-router", help="user name of the router role")
    p.add_argument("--password-file", required=True)
    args = p.parse_args(argv)
    with open(args.password_file) as f:
        password = f.read().strip()
    if args.role == "worker":
        if not args.worker:
            p.error("--worker is required for the worker role")
        user, rules = args.worker, worker_rules(args.namespace, args.model, args.worker, password)
    else:
        user, rules = args.user, router_rules(args.namespace, password)
    print("ACL SETUSER", user, *rules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
