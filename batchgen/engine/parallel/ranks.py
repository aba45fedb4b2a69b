"""Rank 0's side of a tensor-parallel engine: start ranks 1..N-1, forward the engine's state changes.

Every rank runs the same deterministic scheduler on the same calls, so rank 0 forwards only the calls
that change engine state, as small tuples over one pipe per worker, queued and sent as one pickled list
with each turn of the loop (one pipe write per step; benchmarks/tp_host.py measured this against
shipping the step's inputs through shared memory):
  ("accept", uid, prompt ids, params, position, owner key, push)   an accepted request (rejected ones stay here)
  ("advance",)                                                     one turn of the step loop
  ("drop", owner key, push)                                        an abandoned call's requests
  ("close",)
The sampled tokens agree without a broadcast: every rank samples the same all-gathered logits with the
same per-request streams. Workers are daemons and leave when rank 0's pipe closes (close(), rank 0's
exit, or its death); a worker that fails sends its error and exits, which breaks the collectives, and
rank 0 raises one TensorParallelError naming the rank (never a hang: the group's collectives time out).
"""
from __future__ import annotations

import functools
import multiprocessing
import threading
import time
from typing import Any

import torch

from .group import TensorParallelError, TPGroup, backend_for, free_port
from .shard import shard_model

_WORKER: TPGroup | None = None  # set in a worker process before it builds its Engine


class Ranks:
    """This process's part of a tensor-parallel engine. Rank 0 (lead=True) forwards and watches workers;
    a worker's instance only holds the group (its forwarding calls do nothing)."""

    def __init__(self, group: TPGroup, procs: list[Any] = (), conns: list[Any] = ()) -> None:
        self.group, self.procs, self.conns = group, list(procs), list(conns)
        self.lead = group.rank == 0
        self.pending: list[tuple] = []  # messages for the workers, sent with the next turn
        self.on_failure: Any = None  # called once a worker is found failed (the engine closes itself)

    @property
    def world(self) -> int:
        return self.group.world

    def local_device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.group.rank) if device.type == "cuda" else device

    def shard(self, model: Any) -> None:
        shard_model(model, self.group)

    def load(self, model_dir: Any, device: torch.device, dtype: Any) -> tuple[Any, dict]:
        """This rank's share of the checkpoint, read straight onto `device` (load.py)."""
        from .load import load_shard

        return load_shard(model_dir, device, dtype, self.group)

    def agree_blocks(self, n: int, device: torch.device) -> int:
        try:
            return self.group.min_int(n, device)
        except Exception as e:  # noqa: BLE001 - a worker died while loading
            raise (self.failure(e) or e) from e

    # -------------------------------------------------------------- forwarding (rank 0)
    def _send(self, msg: tuple) -> None:
        """Queue a message; the turn's ("advance",) sends the queue, in order, as one pickled list: a worker
        only needs the accepts and drops before it runs the next turn (one pipe write per step)."""
        if self.lead:
            self.pending.append(msg)

    def _flush(self) -> None:
        msgs, self.pending = self.pending, []
        for conn in self.conns:
            try:
                conn.send(msgs)
            except (OSError, EOFError) as e:
                raise (self.failure(e) or TensorParallelError(f"tensor_parallel: a worker is gone ({e})")) from e

    def accepted(self, group: Any, owner: Any, push: bool) -> None:
        self._send(("accept", group.uid, group.prompt_ids, group.params, None if push else group.position,
                    id(owner), push))

    def advance(self) -> None:
        if self.lead:
            self._send(("advance",))
            self._flush()

    def dropped(self, owner: Any, push: bool) -> None:
        self._send(("drop", id(owner), push))

    # -------------------------------------------------------------- health (rank 0)
    def ready(self) -> None:
        """Wait for every worker's ("ready",) after it built its engine; a failure raises TensorParallelError."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            deadline = time.monotonic() + 600
            while not conn.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise self.failure(None) or TensorParallelError(f"tensor_parallel: rank {rank} did not start")
            msg = conn.recv()
            if msg[0] != "ready":
                raise self.failure(None, {rank: msg}) or TensorParallelError(f"tensor_parallel: rank {rank}: {msg}")

    def failure(self, cause: BaseException | None, seen: dict | None = None) -> TensorParallelError | None:
        """After an error on rank 0: a TensorParallelError naming the worker that failed (its own message, or
        its exit code), or None when every worker is fine (the error was rank 0's own). Either way the
        workers are stopped: the group can't be trusted after a collective failed half way."""
        problems = []
        deadline = time.monotonic() + (1.0 if cause is not None else 0.0)  # a dying worker's exit code, briefly
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            msg = (seen or {}).get(rank) or _error_from(conn)
            if msg is None:
                proc.join(max(0.0, deadline - time.monotonic()))
            if msg is None and proc.exitcode is not None:
                msg = f"exited with code {proc.exitcode}"
            if msg is not None:
                problems.append(f"rank {rank} {msg if isinstance(msg, str) else msg[1]}")
        self.shutdown()
        if not problems:
            return None
        if self.on_failure is not None:
            self.on_failure()
        return TensorParallelError(f"tensor_parallel: {'; '.join(problems)}; the engine is closed")

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop the workers (the close message, then SIGKILL after `grace` seconds) and leave the group."""
        if self.lead:
            for conn in self.conns:
                try:
                    conn.send([("close",)])
                except (OSError, EOFError):
                    pass
                conn.close()
            for proc in self.procs:
                proc.join(grace)
                if proc.is_alive():  # workers ignore SIGTERM (see worker.py)
                    proc.kill()
                    proc.join()
            self.conns, self.procs = [], []
        self.group.close()


def stops_ranks_on_error(init: Any) -> Any:
    """Decorates Engine.__init__: a failure on rank 0 after its workers started stops them at once (they may
    be waiting in a collective for rank 0, which would otherwise last until the group's timeout)."""
    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "_tp", None) is not None:
                self._tp.shutdown()
            raise
    return wrapped


def _error_from(conn: Any) -> str | None:
    try:
        if conn.poll(0):
            msg = conn.recv()
            return f"failed: {msg[1]}" if msg and msg[0] == "error" else None
    except (OSError, EOFError):
        pass
    return None


def start(world: int, device: torch.device, model_dir: Any, kwargs: dict[str, Any]) -> Ranks:
    """Rank 0: spawn ranks 1..world-1 (each builds Engine(model_dir, **kwargs)) and join the group with them.
    In a worker: its group, joined already."""
    if _WORKER is not None:
        return Ranks(_WORKER)
    from .worker import worker_main

    backend = backend_for(device)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, world):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(rank, world, init_method, backend, model_dir, kwargs, theirs),
                           name=f"batchgen-tp-rank{rank}", daemon=True)
        proc.start()
        theirs.close()
        procs.append(proc)
        conns.append(ours)
    joined: list[Any] = []
    t = threading.Thread(target=lambda: joined.append(_join(world, init_method, backend)), daemon=True)
    t.start()
    ranks = Ranks(TPGroup(0, world, backend), procs, conns)
    while t.is_alive():
        t.join(0.2)
        if any(not p.is_alive() for p in procs):
            raise ranks.failure(None) or TensorParallelError("tensor_parallel: a worker died while starting")
    if not joined or isinstance(joined[0], BaseException):
        ranks.shutdown()
        raise TensorParallelError(f"tensor_parallel: could not join the process group: {joined and joined[0]}")
    return ranks


def _join(world: int, init_method: str, backend: str) -> TPGroup | BaseException:
    try:
        return TPGroup.join(0, world, init_method, backend)
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
        return e


def set_worker_group(group: TPGroup) -> None:
    global _WORKER
    _WORKER = group


def default_threads(world: int) -> int:
    """CPU ranks share the cores: each gets its part of them (at least one)."""
    from ..threads import cpu_threads

    return max(1, cpu_threads(None) // world)


