"""Tensor parallel, the issue's host-time question: does every rank running the same scheduler cost rank 0
less host time than rank 0 sending each step's inputs to the other ranks through shared memory?

Measured per decode step with N running requests (tiny llama on the CPU, forward skipped where it is not
needed), in microseconds, median of --steps:
  replicated  what rank 0 adds per step when every rank schedules for itself: one ("advance",) message
              to each worker (pickled tuple over a multiprocessing Pipe, read by a live worker process)
  schedule+prepare  what each rank spends on its own (rank 0 spends it in both designs; with
              replication the workers spend it too, in parallel, on their own cores)
  broadcast   what rank 0 adds per step when it ships the step instead: the step's input arrays
              (ids, positions, slot mapping, block tables, sampling rows and params) pickled with
              protocol 5 into a multiprocessing.shared_memory buffer (+ a one-byte doorbell per worker),
              and what a worker then spends reading them back (unpickle + copy out), on the step's path

    PYTHONPATH=. python benchmarks/tp_host.py [--requests 256] [--steps 100]
"""
from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np


def _echo(conn) -> None:  # a worker that only reads rank 0's messages
    while conn.recv_bytes() != b"close":
        pass


def _us(samples: list[float]) -> float:
    return 1e6 * statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import build_checkpoint

    from batchgen import Engine, SamplingParams

    ck = build_checkpoint("llama", Path(tempfile.mkdtemp()) / "llama")
    engine = Engine(ck, device="cpu", dtype="float32", threads=1, max_num_seqs=args.requests,
                    kv_cache_tokens=args.requests * 512)
    engine.add([[5 + i % 50, 6, 7, 8] for i in range(args.requests)],
               SamplingParams(max_new_tokens=args.steps + 50, ignore_eos=True))
    while len(engine.scheduler.running) < args.requests or engine.scheduler.waiting:
        engine.step()  # prefill everything: then each step decodes every request
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    worker = ctx.Process(target=_echo, args=(theirs,), daemon=True)
    worker.start()
    shm = shared_memory.SharedMemory(create=True, size=1 << 22)
    sched, send, pack, unpack = [], [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        step = engine.runner.prepare(batch)
        t1 = time.perf_counter()
        ours.send(("advance",))
        t2 = time.perf_counter()
        arrays = {k: v.numpy() for k, v in vars(step.inputs).items() if v is not None and hasattr(v, "numpy")}
        blob = pickle.dumps((arrays, [s.slot for s in batch.admitted]), protocol=5)
        shm.buf[: len(blob)] = blob
        ours.send_bytes(b"\x01")  # the doorbell
        t3 = time.perf_counter()
        got, _ = pickle.loads(shm.buf[: len(blob)])
        _ = {k: np.array(v) for k, v in got.items()}
        t4 = time.perf_counter()
        engine._process(engine.runner.execute(step))
        sched.append(t1 - t0)
        send.append(t2 - t1)
        pack.append(t3 - t2)
        unpack.append(t4 - t3)
    ours.send_bytes(b"close")
    worker.join()
    shm.close()
    shm.unlink()
    engine.close()
    print(f"{args.requests} decoding requests, {args.steps} steps, median us per step:")
    print(f"  schedule+prepare (every rank, both designs): {_us(sched):8.1f}")
    print(f"  replicated: rank 0 sends one message:        {_us(send):8.1f}")
    print(f"  broadcast: rank 0 packs into shm + doorbell: {_us(pack):8.1f}")
    print(f"  broadcast: a worker unpacks (on the path):   {_us(unpack):8.1f}")


if __name__ == "__main__":
    main()
