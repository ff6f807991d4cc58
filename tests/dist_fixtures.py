"""Run a plain Python function on N real ranks (gloo), in spawned processes — a distributed test is
a function, not a worker script with its own argument parser (OLMo-core's `run_distributed_test`).

    def check(x: int) -> float:           # module level in a test module; runs on every rank
        ...                               # torch.distributed (via DeepSpeed) is initialised
        return value                      # anything picklable comes back, one per rank

    results = run_distributed_test(check, world_size=2, func_args=(3,))

Each rank is a fresh `spawn` process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set as the
deepspeed launcher and torchrun set them, DS_ACCELERATOR=cpu and one thread, then DeepSpeed's
`init_distributed` (gloo). The function is found again in the child by its file and qualified
name, so it may live in the test module itself (pytest imports test modules under names a child
could not import). A rank that raises fails the test with that rank's traceback; the others are
stopped.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import multiprocessing as mp
import os
import queue
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch_fixtures import free_port

TESTS = Path(__file__).resolve().parent


def _load(file: str, qualname: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"_dist_{Path(file).stem}", file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rank_main(rank: int, world_size: int, port: int, backend: str, file: str, qualname: str,
               args: tuple, kwargs: dict, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    sys.path.insert(0, str(TESTS))
    try:
        import torch

        torch.set_num_threads(1)
        from moma.pipeline.training.engine import init_distributed

        init_distributed(backend)
        value = _load(file, qualname)(*args, **kwargs)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        # as bytes: torch's multiprocessing pickler would share tensors by file descriptor, and those
        # vanish with this process before the parent reads them
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: B036 — everything goes back to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_distributed_test(func: Callable[..., Any], world_size: int = 2, backend: str = "gloo",
                         func_args: tuple = (), func_kwargs: dict | None = None, timeout: float = 600) -> list[Any]:
    """`func(*func_args, **func_kwargs)` on `world_size` ranks; its return values, by rank."""
    file, qualname = inspect.getfile(func), func.__qualname__
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, file, qualname, func_args,
                                                  func_kwargs or {}, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{qualname}: no answer from ranks {sorted(set(range(world_size)) - set(out))} "
                                     f"within {timeout} s") from None
            if status == "error":
                raise AssertionError(f"{qualname} failed on rank {rank} of {world_size}:\n{value}")
            out[rank] = _torch_load(value)
    finally:
        for p in procs:
            p.join(timeout=30 if len(out) == world_size else 1)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def _torch_load(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)  # our own test results
