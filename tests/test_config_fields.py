"""Every numeric and choice setting of the run config: zero, negative, huge, non-finite or of the
wrong type, each value is either refused by `moma train --check` naming its key, or a short run
with it works (the real launcher, 2 gloo ranks).

    .venv/bin/python -m pytest tests/test_config_fields.py            # the property test (one process)
    .venv/bin/python -m pytest tests/test_config_fields.py -m slow    # and the real runs

The property test checks on one process what `--check` (plan_run) decides; a value it lets through
must belong to a (key, kind of value) that one of RUNS launches for real. Old code: checkpoint.every
0 passed --check, then every rank died at its first step (ZeroDivisionError: integer modulo by zero);
logging.every 0 the same; seed -1, data.num_workers -1, optim.lr -1, data.prefetch_factor 10^12 ...
passed --check too, and data.open_shards 10^12 passed it and then every rank ran out of memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from launch_fixtures import run_deepspeed
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.cli import main as cli_main
from moma.pipeline.training.config import TrainConfig

# settings that name files or sources (their checks: test_training_config.py), and fault injection
NOT_HERE = {"run_dir", "aux_routers_from", "init_from", "debug_nonfinite_at", "data.sources", "data.eval_sources",
            "tokenizers.text", "tokenizers.image", "tokenizers.text_pattern", "checkpoint.dir"}
HUGE_INT = 10**12


def leaves(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(key, kind) of every setting: int, float, bool or choice (str, Literal); model.overrides: every
    ModelConfig field a run may set."""
    from moma.pipeline.config_parsing import _resolve

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, key + ".")
        elif f.metadata.get("fields_of"):
            inner = leaves(_resolve(f.metadata["fields_of"]), key + ".")
            out += [(k, kind) for k, kind in inner if k.rsplit(".", 1)[1] not in f.metadata["exclude"]]
        elif key not in NOT_HERE:
            if typing.get_origin(tp) is typing.Literal:
                out.append((key, "choice"))
                continue
            base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            out.append((key, {int: "int", float: "float", bool: "bool", str: "choice"}[base[0]]))
    return out


FIELDS = leaves(TrainConfig)

# What passes --check runs for real, one value per key per run (stop_at_step=2 in each).
RUNS: list[dict[str, tuple[str, str]]] = [
    {"seed": ("zero", "0"), "max_steps": ("huge", str(HUGE_INT)), "max_nonfinite_in_a_row": ("zero", "0"),
     "data.shuffle_buffer": ("huge", str(HUGE_INT)), "data.num_workers": ("zero", "0"),
     "optim.lr": ("zero", "0"), "optim.eps": ("huge", "1.0e+30"),
     "optim.weight_decay": ("zero", "0"), "optim.grad_clip": ("zero", "0"), "schedule.warmup_steps": ("zero", "0"),
     "schedule.min_lr_ratio": ("zero", "0"), "checkpoint.every": ("zero", "0"), "checkpoint.keep": ("zero", "0"),
     "logging.peak_flops": ("huge", "1.0e+30"), "logging.progress_seconds": ("zero", "0"),
     "logging.no_expert_warn": ("zero", "0"), "eval.every": ("zero", "0"), "eval.batches": ("huge", str(HUGE_INT))},
    {"max_nonfinite_in_a_row": ("huge", str(HUGE_INT)), "optim.grad_clip": ("huge", "1.0e+30"),
     "schedule.warmup_steps": ("huge", str(HUGE_INT)), "checkpoint.every": ("huge", str(HUGE_INT)),
     "checkpoint.keep": ("huge", str(HUGE_INT)), "logging.every": ("huge", str(HUGE_INT)),
     "logging.progress_seconds": ("huge", "1.0e+30"), "model.overrides.aux_loss_weight": ("zero", "0"),
     "model.overrides.z_loss_weight": ("zero", "0"), "model.overrides.router_noise": ("zero", "0")},
]
COVERED = {(key, kind) for run in RUNS for key, (kind, _) in run.items()}

WRONG = st.sampled_from(["x", "[1, 2]", "{a: 1}", "true"])


def values(kind: str) -> st.SearchStrategy[tuple[str, str]]:
    """(kind of value, its YAML text) for a setting of this kind."""
    if kind == "int":
        return st.one_of(st.just(("zero", "0")), st.integers(-2**62, -1).map(lambda v: ("negative", str(v))),
                         st.integers(2**32, 2**62).map(lambda v: ("huge", str(v))),
                         st.one_of(WRONG, st.just("1.5")).map(lambda v: ("wrong type", v)))
    if kind == "float":
        return st.one_of(st.just(("zero", "0")), st.floats(-1e300, -1e-9).map(lambda v: ("negative", repr(v))),
                         st.floats(1e10, 1e300).map(lambda v: ("huge", repr(v))),
                         st.sampled_from([".nan", ".inf", "-.inf"]).map(lambda v: ("non-finite", v)),
                         WRONG.map(lambda v: ("wrong type", v)))
    # bool and choice: another type, or a name that is none of the choices
    return st.sampled_from(["0", "-1", str(HUGE_INT), "x", "''", "[1]"]).map(lambda v: ("wrong value", v))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fields")
    return write_config(run_config(make_training_data(d / "data"), d / "run"), d / "run.yaml")


def check(config: Path, *overrides: str) -> tuple[int, str]:
    """`moma train CONFIG OVERRIDES --check --world-size 2` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["train", str(config), *overrides, "--check", "--world-size", "2"])
    return code, err.getvalue()


def test_every_setting_kind_is_known() -> None:
    keys = dict(FIELDS)
    assert {"checkpoint.every", "logging.every", "optim.lr", "data.prefetch_factor", "model.preset"} <= set(keys)
    assert all(key in keys for run in RUNS for key in run)  # no run names a setting that is gone


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_value_is_refused_naming_its_key_or_runs(config: Path, data: st.DataObject) -> None:
    key, kind = data.draw(st.sampled_from(FIELDS), label="setting")
    what, text = data.draw(values(kind), label="value")
    code, err = check(config, f"{key}={text}")
    if code == 0:
        assert (key, what) in COVERED, f"{key}={text} ({what}) passes --check but no run in RUNS tries it"
    else:
        assert code == 2 and err.count("\n") == 1 and key in err, (key, text, code, err)


def test_checkpoint_every_zero_and_logging_every_zero(config: Path) -> None:
    """Old code: both passed --check, then crashed at the first step (modulo by zero)."""
    assert check(config, "checkpoint.every=0")[0] == 0  # only at the end of each launch (see RUNS)
    code, err = check(config, "logging.every=0")
    assert code == 2 and "logging.every = 0: must be >= 1" in err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", range(len(RUNS)))
def test_what_passes_check_runs(config: Path, tmp_path: Path, run: int) -> None:
    overrides = [f"{key}={text}" for key, (_, text) in RUNS[run].items()]
    run_dir = tmp_path / "run"
    assert check(config, *overrides, f"run_dir={run_dir}")[0] == 0
    run_deepspeed(["--module", "moma.pipeline.cli", "train", str(config), *overrides, f"run_dir={run_dir}",
                   "stop_at_step=2"], log=tmp_path / "log")
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if RUNS[run].get("logging.every", ("", "1"))[1] == "1":
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    else:
        assert rows == []  # logging every 10^12 steps
    if RUNS[run].get("checkpoint.every") == ("zero", "0"):
        assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step2"]  # only at the end
