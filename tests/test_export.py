"""An export you can take away: tokenizers inside it (move it, delete the originals, it generates),
clean tensor names mapped both ways by expert_layout, HF's sharded layout, and damaged exports named
in one line (truncated file; NaN weights give JSON null, a warning and a non-zero exit).

    .venv/bin/python -m pytest tests/test_export.py -x -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from corpus_fixtures import make_tokenizers
from safetensors.torch import load_file, save_file
from training_fixtures import make_training_data

from moma.pipeline.cli import main as cli_main
from moma.pipeline.model.config import ModelConfig
from moma.pipeline.shards.assemble import Tokenizers
from moma.pipeline.training.engine import build_model, configure_accelerator
from moma.pipeline.training.expert_layout import export_names, internal_names
from moma.pipeline.training.export import (
    INDEX,
    WEIGHTS,
    expected_shapes,
    load_exported,
    read_weights,
    write_model_dir,
)

configure_accelerator()


def make_export(out: Path, toks: tuple[Path, Path], ffn: str = "moma_4t4i", max_shard: int | str = "5GB",
                aux: bool = True, seed: int = 4) -> tuple[Path, torch.nn.Module]:
    """What `moma export` writes for a checkpoint of this model (the real writer; the state is the
    model's own global-named weights, as consolidated_state returns them)."""
    vocab = Tokenizers.load(str(toks[0]), str(toks[1])).vocab
    cfg = ModelConfig(vocab_size=vocab.size, image_offset=vocab.image_offset, d_model=32, n_layers=2, n_heads=2,
                      ffn_hidden=48, ffn=ffn, max_seq_len=160, pad_id=vocab.pad_id, aux_routers=aux)
    model = build_model(cfg, seed=seed).eval()
    client = {"vocab": vocab.to_json(), "step": 7, "tokens": 700,
              "config": {"tokenizers": {"text": str(toks[0]), "image": str(toks[1]), "text_pattern": None},
                         "data": {"seq_len": 24, "shuffle_buffer": 5}, "parallel": {"micro_batch": 3},
                         "eval": {"batches": 6}}}
    write_model_dir(out, dict(model.state_dict()), client, cfg.to_json(), {"checkpoint": "test"}, max_shard)
    return out, model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("ffn", ["dense", "moe_8x", "moma_1t1i", "moma_2t2i", "moma_4t4i_mod", "dense_mod"])
def test_clean_names_map_both_ways_for_every_variant(ffn: str) -> None:
    cfg = ModelConfig(vocab_size=300, image_offset=280, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, ffn=ffn,
                      max_seq_len=64, pad_id=260, aux_routers=ffn != "moma_1t1i" and ffn != "dense")
    names = list(expected_shapes(cfg))
    clean = export_names(names)
    assert len(set(clean.values())) == len(names)  # one clean name per tensor
    assert not [c for c in clean.values() if "deepspeed" in c or "_moe." in c or "_ffn." in c]
    assert internal_names(names) == {c: n for n, c in clean.items()}
    if ffn == "moma_2t2i":
        assert {"layers.0.ffn.image.experts.1.w1.weight", "layers.0.ffn.text.router.weight"} <= set(clean.values())
    if ffn == "moma_1t1i":
        assert "layers.1.ffn.image.w2.weight" in clean.values()


def test_an_export_moved_without_its_original_tokenizers_still_generates(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    toks = make_tokenizers(tmp_path / "tok")
    export, model = make_export(tmp_path / "export", toks)
    refs = json.loads((export / "tokenizers.json").read_text())
    assert refs["text"] == "tokenizers/text" and refs["image"] == "tokenizers/image"
    keys = set(load_file(str(export / WEIGHTS)))
    assert "layers.0.ffn.image.experts.0.w1.weight" in keys and not [k for k in keys if "deepspeed" in k]
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(str(export), str(moved))
    shutil.rmtree(tmp_path / "tok")
    back = load_exported(moved)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(ids, routing=back.routing(ids, mode="causal")).logits,
                           model(ids, routing=model.routing(ids, mode="causal")).logits)
    assert cli_main(["generate", "--model", str(moved), "--prompt", "a red square", "--max-new-tokens", "8",
                     "--min-new-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_tokens"] == 8
    info = json.loads((moved / "export.json").read_text())
    assert info["heldout"]["batch_size"] == 3 and info["heldout"]["data"]["seq_len"] == 24


def test_large_models_are_sharded_with_an_index(tmp_path: Path) -> None:
    toks = make_tokenizers(tmp_path / "tok")
    export, model = make_export(tmp_path / "export", toks, max_shard="40KB")
    index = json.loads((export / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (export / WEIGHTS).exists()
    state = model.state_dict()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for f in files:  # each shard within the limit unless one tensor alone is larger
        shard = load_file(str(export / f))
        assert sum(v.numel() * 4 for v in shard.values()) <= 40_000 or len(shard) == 1
        assert all(index["weight_map"][k] == f for k in shard)
    back = load_exported(export)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), state.values()))
    # exported again unsharded into the same directory: the stale shards and index are gone
    make_export(export, toks)
    assert sorted(p.name for p in export.glob("model*.safetensors*")) == [WEIGHTS]


def test_a_truncated_export_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toks = make_tokenizers(tmp_path / "tok")
    for name, shard in (("one", "5GB"), ("sharded", "40KB")):
        export, _ = make_export(tmp_path / name, toks, max_shard=shard)
        victim = sorted(export.glob("model*.safetensors"))[-1]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        assert cli_main(["generate", "--model", str(export), "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(victim) in err and "truncated" in err, err
        assert cli_main(["eval", str(export), "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(victim) in err, err
        with pytest.raises(ValueError, match="truncated"):
            read_weights(export)


def test_nan_weights_give_json_null_a_warning_and_a_failing_exit(data: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    export, _ = make_export(tmp_path / "export", (data["text"], data["image"]), ffn="moma_1t1i", aux=False)
    state = load_file(str(export / WEIGHTS))
    state["layers.1.ffn.image.w2.weight"][0, 0] = float("nan")
    save_file(state, str(export / WEIGHTS))
    code = cli_main(["eval", str(export), "--data", str(data["captions"]), "--batches", "2"])
    out, err = capsys.readouterr()
    row = json.loads(out.strip().splitlines()[-1])  # strict JSON: no NaN literal
    assert code == 1 and row["loss"] is None and row["loss_image"] is None
    assert "NaN" not in out and "layers.1.ffn.image.w2.weight" in err and "warning" in err
    assert cli_main(["generate", "--model", str(export), "--prompt", "x"]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
