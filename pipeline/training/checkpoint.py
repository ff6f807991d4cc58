"""Checkpoints: DeepSpeed's own (per-expert files, ZeRO partitions) plus our state, a `latest` that
only ever names a complete checkpoint, and an optional layout-free "universal" copy.

    ckpt/global_step200/            DeepSpeed's files: mp_rank_00_model_states.pt (+ the run's shared
                                    client state), layer_*_expert_*_mp_rank_00_model_states.pt,
                                    zero_pp_rank_*_optim_states.pt
    ckpt/global_step200/client/rank00003.pt   each rank's own loader state and RNG states (written by
                                    that rank: nothing is gathered; tensors, lists and ints only)
    ckpt/global_step200/universal/  rank*.safetensors: every parameter under its global
                                    name with fp32 value and Adam moments (see `checkpoint.universal`)
    ckpt/global_step200/complete    JSON (step, write time, layout, and every file's size and CRC-32),
                                    written after every rank's files are on disk (fsynced, with their
                                    directories)
    ckpt/latest                     the tag, written atomically after `complete`

* A tag is never reused: saving step 200 again after a rollback writes `global_step200-v2`; the
  checkpoints are ordered by write time, not by step, for keep-K and for `--resume auto`, and
  `latest`'s target is never deleted.
* `--resume auto` takes `latest`; when it is missing or names a checkpoint that is not complete, the
  newest complete checkpoint (by write time), with a warning naming what was wrong. `latest` naming
  anything but a directory of its own folder is refused, naming it.
* Integrity: every file's CRC-32 is computed at save (each rank a share, from the page cache) and
  recorded in `complete`; before a checkpoint is read every file is checked (`verify_files`; in
  `moma train` each rank checks a share). A damaged file (torch.load does not check its zip CRCs,
  so a flipped bit in a tensor would load silently) refuses that checkpoint, naming the file;
  `--resume auto` then falls back to the previous complete one, with a warning.
* Same world size and expert-parallel size: DeepSpeed's `load_checkpoint` (exact). Another layout:
  DeepSpeed's MoE path fails (its issue #5716; `ds_to_universal` fails for ep > 1), so a fresh engine
  is filled from the universal copy, each rank reading (memory-mapped) only the tensors it owns.
  The universal copy costs as much as the model's fp32 weights and moments again (~124 GB at 1.4b
  4t4i), so by default it is written only at the last save of a launch (end, stop_at_step,
  preemption, non-finite stop): the checkpoint a resized job resumes from. `checkpoint.universal:
  always` writes it every time, `never` not at all.
* Loading never unpickles arbitrary objects: every file goes through torch.load(weights_only=True),
  with the few DeepSpeed classes its optimizer files hold allow-listed (also for DeepSpeed's own
  load_checkpoint, through its checkpoint engine). A file holding anything else is refused, naming it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moma.pipeline.errors import MomaError
from moma.pipeline.training.expert_layout import ExpertLayout, is_expert_param
from moma.tokenizers.fileio import atomic_write, write_json_atomic

log = logging.getLogger("moma.checkpoint")

LATEST = "latest"
COMPLETE = "complete"
UNIVERSAL = "universal"
CLIENT = "client"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
UNIVERSAL_POLICIES = ("final", "always", "never")
CHECKSUM = "crc32"  # per file: detects every burst error up to 32 bits; ~1.5 GB/s per core (zlib)
_TAG = re.compile(r"^global_step(\d+)(?:-v(\d+))?$")


class CheckpointError(MomaError):
    pass


# --- loading without arbitrary unpickling ---------------------------------------------------------

def _safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 puts in its optimizer-state files (ZeRO 1/2, bf16)."""
    out: list[Any] = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True (tensors, containers, numbers, strings and the allow-listed
    DeepSpeed classes). Anything else is refused with the file's name."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: refusing to unpickle it: it holds objects outside the allow-list "
                              f"({' '.join(first[-3:])[:300]}). Only checkpoints written by `moma train` are "
                              f"read; convert others first") from None


def install_safe_loading(engine: Any) -> None:
    """Make DeepSpeed's own load_checkpoint read every file with `safe_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine


# --- RNG states as plain data (loadable with weights_only=True) ------------------------------------

def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- which checkpoints exist, and which one to resume ----------------------------------------------

def complete_info(tag_dir: Path) -> dict[str, Any] | None:
    """The `complete` marker's record, or None when the checkpoint is not complete."""
    try:
        text = (tag_dir / COMPLETE).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:  # the older plain "ok" marker: its directory's time orders it
        info = {}
    if not isinstance(info, dict):
        info = {}
    m = _TAG.match(tag_dir.name)
    info.setdefault("step", int(m.group(1)) if m else 0)
    info.setdefault("saved_at_ns", (tag_dir / COMPLETE).stat().st_mtime_ns)
    return info


def checkpoints(ckpt_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """Complete checkpoints, oldest write first."""
    found = []
    root = ckpt_dir.resolve()
    for p in ckpt_dir.glob("global_step*"):
        info = complete_info(p) if p.is_dir() and p.resolve().parent == root else None  # no links elsewhere
        if info is not None:
            found.append((p.name, info))
    return sorted(found, key=lambda t: (t[1]["saved_at_ns"], t[0]))


def tags(ckpt_dir: Path) -> list[str]:
    return [t for t, _ in checkpoints(ckpt_dir)]


def new_tag(ckpt_dir: Path, step: int) -> str:
    """A tag no checkpoint (complete or not) uses: global_step{step}, else global_step{step}-v{n}."""
    tag, n = f"global_step{step}", 1
    while (ckpt_dir / tag).exists():
        n += 1
        tag = f"global_step{step}-v{n}"
    return tag


Check = Callable[[Path], list[str]]


def find_checkpoint(resume: str | None, ckpt_dir: Path, flag: str = "--resume",
                    check: Check | None = None, verify: bool = True) -> tuple[Path, str] | None:
    """--resume auto: `latest` if it names a complete checkpoint, else (warning) the newest complete
    one, else None; --resume PATH: that checkpoint (a tag directory, or a directory with `latest`).
    `verify`: every file against its recorded checksum (`check`: how; default `verify_files` on this
    process); a damaged checkpoint is refused naming the file, or with auto (and a checkpoint
    directory) the previous complete one is taken, with a warning."""
    if resume is None:
        return None
    if resume == "auto":
        return _choose(ckpt_dir, required=False, check=(check or verify_files) if verify else None)
    path = Path(resume)
    if (path / COMPLETE).exists():
        if verify:
            problems = (check or verify_files)(path)
            if problems:
                raise CheckpointError(f"{flag} {resume}: refusing a damaged checkpoint: {problems[0]}")
        return path.parent, path.name
    if path.is_dir() and ((path / LATEST).exists() or checkpoints(path)):
        return _choose(path, required=True, check=(check or verify_files) if verify else None)
    raise CheckpointError(f"{flag} {resume}: no checkpoint there: neither a checkpoint directory with '{LATEST}' "
                          f"nor a complete checkpoint (a global_step* directory with '{COMPLETE}')")


def _warn(message: str) -> None:
    log.warning("%s", message)
    print(f"warning: {message}", flush=True)


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (None: no `latest`); refused when it is not a directory of `ckpt_dir`
    itself (a path, `..`, or a link leading elsewhere): a checkpoint folder only points into itself."""
    latest = ckpt_dir / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    inside = (bool(tag) and tag not in (".", "..") and "/" not in tag and "\\" not in tag
              and (ckpt_dir / tag).resolve().parent == ckpt_dir.resolve())
    if not inside:
        raise CheckpointError(f"{latest} names {tag!r}, which is not a checkpoint directory of {ckpt_dir} "
                              f"(it leads to {(ckpt_dir / tag).resolve()}): refusing it; point it at one of "
                              f"{ckpt_dir}'s own global_step* directories or remove it")
    return tag


def _choose(ckpt_dir: Path, required: bool, check: Check | None) -> tuple[Path, str] | None:
    """`latest`'s target, else the newest complete checkpoint; with `check`, the first intact one of
    those (then the older complete ones, newest first)."""
    latest = ckpt_dir / LATEST
    tag = read_latest(ckpt_dir)
    problem = None
    complete = checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    order = [t for t, _ in reversed(complete)]
    if tag is not None:
        if complete_info(ckpt_dir / tag) is not None:
            order = [tag, *(t for t in order if t != tag)]
        else:
            problem = (f"{latest} names {tag!r}, which is " +
                       ("not complete (a save that was cut short)" if (ckpt_dir / tag).exists() else "missing"))
    elif complete:
        problem = f"{latest} is missing"
    damaged = []
    for i, candidate in enumerate(order):
        problems = check(ckpt_dir / candidate) if check is not None else []
        if problems:
            damaged.append(problems[0])
            _warn(f"{ckpt_dir / candidate} is damaged ({problems[0]}); trying the previous complete checkpoint")
            continue
        if i > 0 or problem:
            what = "; ".join(filter(None, [problem, *damaged]))
            _warn(f"{what}; resuming from the newest {'intact ' if damaged else ''}complete checkpoint instead: "
                  f"{ckpt_dir / candidate}")
        return ckpt_dir, candidate
    if problem or required or damaged:
        what = "; ".join(filter(None, [problem, *damaged]))
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to resume from" + (f" ({what})" if what else ""))
    return None


# --- integrity: every file's size and CRC-32 in `complete` -------------------------------------------

def _file_list(tag_dir: Path) -> list[tuple[str, int]]:
    """Every file below a checkpoint directory but `complete` (relative path, bytes), sorted."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(tag_dir).as_posix()
            if rel != COMPLETE and not name.endswith(".tmp"):
                out.append((rel, path.stat().st_size))
    return sorted(out)


def _share(files: list[tuple[str, int]], rank: int, world: int) -> list[str]:
    """This rank's files: largest first, each to the least loaded rank (the same answer on every
    rank, which all see the same listing)."""
    load = [0] * world
    mine = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = load.index(min(load))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def crc32_file(path: Path, chunk: int = 16 << 20) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)  # releases the GIL: threads hash files in parallel
    return f"{crc:08x}"


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def file_checksums(tag_dir: Path, rank: int = 0, world: int = 1) -> dict[str, list[Any]]:
    """{relative path: [bytes, crc32]} of this rank's share of the checkpoint's files."""
    files = dict(_file_list(tag_dir))
    names = _share(list(files.items()), rank, world)
    with ThreadPoolExecutor(_threads()) as pool:
        crcs = list(pool.map(lambda n: crc32_file(tag_dir / n), names))
    return {n: [files[n], c] for n, c in zip(names, crcs)}


def gather_checksums(tag_dir: Path) -> dict[str, list[Any]]:
    """Collective (every rank, after every rank's files are written): every file's checksum, each
    rank hashing a share; rank 0 gets them all (others: {})."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = file_checksums(tag_dir, rank, world)
    if world == 1:
        return mine
    out: list[Any] = [None] * world
    dist.gather_object(mine, out if rank == 0 else None, dst=0)
    if rank != 0:
        return {}
    merged = {k: v for part in out for k, v in part.items()}
    for name, _ in _file_list(tag_dir):  # a file another node could not see: hash it here
        if name not in merged:
            merged[name] = [(tag_dir / name).stat().st_size, crc32_file(tag_dir / name)]
    return dict(sorted(merged.items()))


def verify_files(tag_dir: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of the checkpoint's files against `complete` (one line
    each, naming the file; [] when intact, or when it predates checksums)."""
    info = complete_info(tag_dir) or {}
    recorded = info.get("files")
    if not isinstance(recorded, dict):
        return []
    names = _share([(n, int(v[0])) for n, v in recorded.items()], rank, world)

    def check(name: str) -> str | None:
        path = tag_dir / name
        size, crc = recorded[name]
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{path}: {actual} bytes, {COMPLETE} records {size}"
            got = crc32_file(path)
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        return None if got == crc else f"{path}: {CHECKSUM} {got}, {COMPLETE} records {crc} (the file is damaged)"

    with ThreadPoolExecutor(_threads()) as pool:
        return [p for p in pool.map(check, names) if p]


def verify_files_collective(tag_dir: Path) -> list[str]:
    """Collective: every rank checks a share; every rank gets every problem (so all choose alike)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = verify_files(tag_dir, rank, world)
    if world == 1:
        return mine
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return sorted(p for part in out for p in part)


# --- the model-states file and each rank's own state ------------------------------------------------

def load_model_states(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's mp_rank_00_model_states.pt of a checkpoint, checked to hold our client state."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    states = safe_load(path)
    if "moma" not in states:
        raise CheckpointError(f"{path} holds no moma client state: not a checkpoint of `moma train`")
    return states


def write_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's loader and RNG states, by this rank (no gather)."""
    with atomic_write(tag_dir / CLIENT / f"rank{rank:05d}.pt") as f:
        torch.save(state, f)


def read_rank_states(tag_dir: Path, world_size: int, ranks: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """The saved per-rank states of `ranks` (default: all `world_size`)."""
    out = {}
    for r in range(world_size) if ranks is None else ranks:
        path = tag_dir / CLIENT / f"rank{r:05d}.pt"
        if not path.exists():
            raise CheckpointError(f"{tag_dir}: no saved state of rank {r} ({path})")
        out[r] = safe_load(path)
    return out


# --- durability --------------------------------------------------------------------------------------

def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, then the directories (so names survive a crash too)."""
    dirs = [directory]
    for root, subdirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs += [Path(root) / d for d in subdirs]
    for d in [*dirs, directory.parent]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mark_complete(ckpt_dir: Path, tag: str, info: dict[str, Any], keep: int) -> None:
    """Rank 0, after every rank's files are on disk: `complete`, then `latest`, then keep-K (by write
    order; never `latest`'s target), then the debris of saves that were cut short."""
    write_json_atomic(ckpt_dir / tag / COMPLETE, {**info, "tag": tag, "saved_at_ns": time.time_ns()})
    with atomic_write(ckpt_dir / LATEST, "w") as f:
        f.write(tag)
    done = checkpoints(ckpt_dir)
    if keep > 0:
        for old, _ in done[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    complete = {t for t, _ in done}
    for partial in ckpt_dir.glob("global_step*"):
        if partial.is_dir() and partial.name not in complete and partial.name != tag:
            shutil.rmtree(partial, ignore_errors=True)


# --- the universal copy -------------------------------------------------------------------------------

def _adam_states(engine: Any) -> list[dict[str, Any]]:
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return [s for s in base.state.values() if "step" in s]


def _link_zero_optimizer_state(engine: Any, create_at_step: int | None = None) -> None:
    """Point every parameter's hp mapping at the Adam moments of its flat fp32 partition.

    DeepSpeed links them once, right after stepping the *first* parameter group, when the other
    groups' moments do not exist yet; with several groups (decay / no decay / experts) their
    fragments stay empty. Relinking fixes that. With `create_at_step`, missing moments (a fresh
    engine being loaded into) are created first, as torch's AdamW would, at that step."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    base = zero.optimizer
    # DeepSpeedZeroOptimizer (ZeRO 1/2) and BF16_Optimizer (bf16 + ZeRO 1) name their groups differently
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
    lows = getattr(zero, "bit16_groups", None) or zero.bf16_groups
    for low, flat in zip(lows, flats):
        state = base.state[flat]
        if create_at_step is not None and not state:
            state.update(step=torch.tensor(float(create_at_step)), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        lazy_init_hp_params_optimizer_state(low, flat, base.state)


def save_universal(engine: Any, directory: Path, ep_rank: int, edp_rank: int) -> None:
    """Every rank takes part (the full-tensor getters are collectives); each tensor's owner writes it
    into its own safetensors file (the rank's name; a fresh directory: tags are never reused)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    module = engine.module
    names = ExpertLayout(ep_rank=ep_rank).global_names(module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    zero = hasattr(next(module.parameters()), "_hp_mapping")
    if zero:
        _link_zero_optimizer_state(engine)
    for name, p in module.named_parameters():
        if zero:
            fp32 = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}
        else:  # ZeRO stage 0: the torch optimizer keeps per-parameter state
            state = engine.optimizer.state.get(p, {})
            fp32, moments = p.detach().float(), {k: state.get(k) for k in ADAM_KEYS}
        owner = edp_rank == 0 if is_expert_param(name) else rank == 0
        if owner:
            out[f"{names[name]}/fp32"] = fp32.detach().cpu().contiguous()
            for k, v in moments.items():
                if v is not None:
                    out[f"{names[name]}/{k}"] = v.detach().cpu().contiguous()
    steps = [int(s["step"]) for s in _adam_states(engine)]
    step = max(steps) if steps else 0
    folder = directory / UNIVERSAL
    folder.mkdir(parents=True, exist_ok=True)
    file = f"rank{rank:05d}.safetensors"
    if out:
        tmp = folder / f".{file}.tmp"
        save_file(out, str(tmp), metadata={"step": str(step)})
        tmp.replace(folder / file)


def universal_index(directory: Path) -> dict[str, Any] | None:
    """{"step", "tensors": {name: file}} from the universal files' headers (safetensors headers
    are read without the data), or None when the checkpoint has no universal copy."""
    from safetensors import safe_open

    files = sorted((directory / UNIVERSAL).glob("rank*.safetensors"))
    if not files:
        return None
    tensors, step = {}, 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            step = max(step, int((f.metadata() or {}).get("step", 0)))
            tensors.update({k: file.name for k in f.keys()})
    return {"step": step, "tensors": tensors}


def read_universal(directory: Path, wanted: list[str] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """{global name: {"fp32", "exp_avg", "exp_avg_sq"}} for the `wanted` parameters (None: all),
    read memory-mapped from only the files that hold them; and the optimizer step."""
    from safetensors import safe_open

    index = universal_index(directory)
    if index is None:
        raise CheckpointError(f"{directory} has no {UNIVERSAL}/ copy, so it can only resume on the world size and "
                              f"expert-parallel size that wrote it (resume there, or from a checkpoint written at "
                              f"the end of a launch, or set checkpoint.universal: always)")
    tensors = index["tensors"]
    names = sorted({k.rsplit("/", 1)[0] for k in tensors}) if wanted is None else wanted
    missing = [n for n in names if f"{n}/fp32" not in tensors]
    if missing:
        raise CheckpointError(f"{directory}/{UNIVERSAL} lacks {len(missing)} parameters of this model, e.g. "
                              f"{missing[:3]}: it was written by another model")
    by_file: dict[str, list[str]] = {}
    for n in names:
        for k in ("fp32", *ADAM_KEYS):
            key = f"{n}/{k}"
            if key in tensors:
                by_file.setdefault(tensors[key], []).append(key)
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for file, keys in by_file.items():
        with safe_open(str(directory / UNIVERSAL / file), framework="pt") as f:
            for key in keys:
                name, kind = key.rsplit("/", 1)
                out[name][kind] = f.get_tensor(key)
    return out, int(index["step"])


def load_universal(engine: Any, directory: Path, ep_rank: int) -> None:
    """Set every local parameter and its Adam moments from the universal copy (any layout)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module = engine.module
    names = ExpertLayout(ep_rank=ep_rank).global_names(module)
    saved, step = read_universal(directory, [names[n] for n, _ in module.named_parameters()])
    zero = hasattr(next(module.parameters()), "_hp_mapping")
    if zero:
        _link_zero_optimizer_state(engine, create_at_step=step)
    for name, p in module.named_parameters():
        entry = saved[names[name]]
        if tuple(entry["fp32"].shape) != tuple(p.shape):
            raise CheckpointError(f"{names[name]}: saved shape {tuple(entry['fp32'].shape)} != {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(entry["fp32"].to(p.device, p.dtype))
        if zero:
            safe_set_full_fp32_param(p, entry["fp32"].to(p.device))
            for k in ADAM_KEYS:
                if k in entry:
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
        else:
            state = engine.optimizer.state.setdefault(p, {})
            for k in ADAM_KEYS:
                if k in entry:
                    state[k] = entry[k].to(p.device).clone()
            state["step"] = torch.tensor(float(step))
    for s in _adam_states(engine):
        s["step"] = torch.tensor(float(step)) if torch.is_tensor(s["step"]) else step
