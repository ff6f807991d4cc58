"""Loadable where people evaluate models: `transformers.AutoModelForCausalLM.from_pretrained(export,
trust_remote_code=True)` gives moma's logits (1e-5) and `moma eval`'s held-out loss on the same
tokens, `model.generate` produces text (the same greedy tokens as `moma generate`), an expert-choice
export without auxiliary routers is refused; and the Python API `moma.load`.

    .venv/bin/python -m pytest tests/test_hf.py -x -q      # transformers: the `hf` extra (also in `test`)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from corpus_fixtures import png
from test_export import make_export
from training_fixtures import make_training_data

import moma
from moma.pipeline.cli import main as cli_main
from moma.pipeline.generate import SamplingConfig
from moma.pipeline.loader.loader import DataSource
from moma.pipeline.training.evaluate import HeldoutSettings, heldout_batches


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=["moma_4t4i", "moma_4t4i_mod", "moma_1t1i"])
def export(request: pytest.FixtureRequest, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / request.param
    return make_export(out, (data["text"], data["image"]), ffn=request.param,
                       aux=request.param != "moma_1t1i")[0]


def test_transformers_loads_the_export_with_moma_evals_numbers(export: Path, data: dict[str, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True)
    ours = moma.load(export)
    routing = "ec" if "1t1i" in export.name else "causal"
    assert cli_main(["eval", str(export), "--data", str(data["captions"]), "--routing", routing,
                     "--batches", "3"]) == 0
    figure = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = HeldoutSettings.from_json(json.loads((export / "export.json").read_text())["heldout"])
    ce, n = 0.0, 0
    for batch in heldout_batches(run.data, (DataSource(str(data["captions"])),), ours.vocab, run.batch_size, 3):
        ids, labels = batch["input_ids"], batch["labels"]
        with torch.no_grad():
            logits = hf(ids).logits
            mine = ours.model(ids, routing=ours.model.routing(ids, mode=routing)).logits
        assert torch.allclose(logits, mine, atol=1e-5, rtol=0), float((logits - mine).abs().max())
        ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        n += int((labels != -100).sum())
    assert abs(ce / n - figure["loss"]) < 1e-5, (ce / n, figure["loss"])


def test_transformers_generate_produces_text(export: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True)
    ours = moma.load(export)
    prompt = ours.encode("a red square")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    text = ours.decode(out)["text"]
    assert isinstance(text, str) and len(out) >= 1
    greedy = ours.generator.generate(prompt, SamplingConfig(max_new_tokens=12, temperature=0))
    stop = out.index(ours.vocab.boi_id) if ours.vocab.boi_id in out else len(out)  # moma starts no image
    assert out[:stop] == greedy[:stop]                                                # it cannot finish


def test_an_expert_choice_export_without_auxiliary_routers_is_refused(data: dict[str, Path], tmp_path: Path) -> None:
    export, _ = make_export(tmp_path / "ec", (data["text"], data["image"]), ffn="moma_4t4i", aux=False)
    with pytest.raises(ValueError, match="auxiliary routers"):
        transformers.AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True)


def test_the_python_api(export: Path, tmp_path: Path) -> None:
    m = moma.load(export)
    ids = m.encode("a red square")
    assert ids[0] == m.vocab.bos_id and m.decode(ids)["text"] == "a red square"
    (tmp_path / "in.png").write_bytes(png(2))
    with_image = m.encode("", image=tmp_path / "in.png")
    assert len(with_image) == 1 + 2 + 64 and m.decode(with_image)["images"][0].shape == (16, 16, 3)
    caption = m.generate(image=tmp_path / "in.png", max_new_tokens=10, seed=1)
    assert len(caption["ids"]) >= 5 and m.vocab.eos_id not in caption["ids"][:5] and caption["text"]
    drawn = m.generate("a boat", generate_image=True, cfg_scale=2.0)
    assert len(drawn["images"]) == 1 and not drawn["unfinished_image"]
    assert m.logits(ids).shape == (len(ids), m.model.cfg.vocab_size)


def test_save_pretrained_writes_an_export_again(export: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True)
    hf.save_pretrained(str(tmp_path / "saved"), max_shard_size="30KB")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    ids = torch.tensor([moma.load(export).encode("a red square")])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, again(ids).logits)
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
    assert moma.load(tmp_path / "saved").generate("a boat", max_new_tokens=4)["ids"]
