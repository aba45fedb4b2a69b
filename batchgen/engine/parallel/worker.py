"""Ranks 1..N-1 of a tensor-parallel engine: join the group, build the same Engine, replay rank 0's calls.

A worker never returns outputs: its owners' finished groups are dropped after each turn. It leaves on
("close",), when rank 0's pipe closes (EOF) or on any error, which it first sends to rank 0. It ignores
SIGINT / SIGTERM / SIGUSR1 (a terminal's Ctrl-C or Slurm's signal reaches every process): rank 0 handles
them (its grace period still needs the other ranks) and then closes the workers.
"""
from __future__ import annotations

import itertools
import signal
import sys
from typing import Any

from .group import TPGroup


def worker_main(rank: int, world: int, init_method: str, backend: str, model_dir: Any, kwargs: dict[str, Any],
                conn: Any) -> None:
    from . import ranks

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # rank 0 decides when the run stops (grace
        signal.signal(sig, signal.SIG_IGN)  # periods, Slurm requeue); a worker leaves when rank 0 tells it or dies
    try:
        group = TPGroup.join(rank, world, init_method, backend)
        ranks.set_worker_group(group)
        from ..engine import Engine

        engine = Engine(model_dir, **kwargs)
        conn.send(("ready",))
        serve(engine, conn)
        engine.close()
    except EOFError:
        pass  # rank 0 is gone
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process ends
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (OSError, EOFError):
            pass
        sys.exit(1)


def serve(engine: Any, conn: Any) -> None:
    """Replay rank 0's state changes until ("close",)."""
    from ..engine import _Owner

    owners: dict[int, Any] = {}

    def owner(key: int, push: bool) -> Any:
        return engine._push if push else owners.setdefault(key, _Owner())

    while True:
        for msg in conn.recv():
            if _replay(engine, msg, owner, owners):
                return


def _replay(engine: Any, msg: tuple, owner: Any, owners: dict[int, Any]) -> bool:
    """Apply one of rank 0's messages; True for ("close",)."""
    from ..request import GenerationRequest

    kind = msg[0]
    if kind == "accept":
        _, uid, ids, params, position, key, push = msg
        engine._arrivals = itertools.count(uid)  # the same arrival: the same derived seeds
        engine._accept(GenerationRequest(ids, params), None, position, owner(key, push))
    elif kind == "advance":
        engine._advance()
        engine._push.ready.clear()  # outputs are rank 0's to return
        for key in [k for k, o in owners.items() if not o.unfinished]:
            del owners[key]
        for o in owners.values():
            o.ready.clear()
    elif kind == "drop":
        _, key, push = msg
        engine._drop(owner(key, push))
        owners.pop(key, None)
    return kind == "close"
