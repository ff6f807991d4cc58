"""Generation from an export: the KV cache changes nothing but speed, images have exactly their codes,
captions of an image prompt, classifier-free guidance, and every bad input named.

    .venv/bin/python -m pytest tests/test_generate.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from corpus_fixtures import make_tokenizers, png
from safetensors.torch import save_file

from moma.pipeline.cli import main as cli_main
from moma.pipeline.generate import SamplingConfig, encode_prompt, load_generator
from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.transformer import KVCache
from moma.pipeline.shards.assemble import Tokenizers
from moma.pipeline.training.engine import build_model, configure_accelerator

configure_accelerator()


def write_export(d: Path, toks: tuple[Path, Path], ffn: str, aux: bool = True) -> Path:
    vocab = Tokenizers.load(str(toks[0]), str(toks[1])).vocab
    cfg = ModelConfig(vocab_size=vocab.size, image_offset=vocab.image_offset, d_model=32, n_layers=2, n_heads=2,
                      ffn_hidden=48, ffn=ffn, max_seq_len=160, pad_id=vocab.pad_id,
                      aux_routers=aux and ffn.startswith("moma_4"))
    model = build_model(cfg, seed=4)
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    (d / "vocab.json").write_text(json.dumps(vocab.to_json()))
    (d / "tokenizers.json").write_text(json.dumps({"text": str(toks[0]), "image": str(toks[1])}))
    return d


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["dense", "moma_4t4i", "moma_4t4i_mod"])
def export(request: pytest.FixtureRequest, toks: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / request.param, toks, request.param)


def test_the_kv_cache_changes_nothing_but_speed(export: Path) -> None:
    gen, text, image = load_generator(export)
    prompt, _ = encode_prompt(gen.vocab, text, image, "two dogs in a park")
    ids = torch.tensor([prompt + [5, 9, 11]])
    model = gen.model
    with torch.no_grad():
        full = model(ids, routing=model.routing(ids, mode=gen.mode)).logits
        cache = KVCache(model.cfg.n_layers)
        head = model(ids[:, :len(prompt)], routing=model.routing(ids[:, :len(prompt)], mode=gen.mode), cache=cache)
        steps = [head.logits[:, -1]]
        for t in range(len(prompt), ids.shape[1]):
            one = ids[:, t:t + 1]
            steps.append(model(one, routing=model.routing(one, mode=gen.mode), cache=cache).logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, len(prompt) - 1:-1], atol=1e-5)
    sampling = SamplingConfig(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=3)
    with_cache = gen.generate(prompt, sampling)
    without = gen.generate(prompt, SamplingConfig(**{**sampling.__dict__, "use_cache": False}))
    assert with_cache == without and len(with_cache) >= 1


def test_an_image_has_exactly_its_codes_then_eoi(export: Path) -> None:
    gen, text, image = load_generator(export)
    prompt, uncond = encode_prompt(gen.vocab, text, image, "a red square", generate_image=True)
    v = gen.vocab
    for scale in (1.0, 3.0):
        new = gen.generate(prompt, SamplingConfig(max_new_tokens=gen.image_codes + 5, seed=1, cfg_scale=scale),
                           uncond=uncond, stop_after_image=True)
        assert len(new) == gen.image_codes + 1 and new[-1] == v.eoi_id
        assert all(v.image_offset <= t < v.image_offset + v.image.size for t in new[:-1])
    # outside an image no image code is ever sampled
    free = gen.generate(prompt[:-1], SamplingConfig(max_new_tokens=40, seed=2, temperature=2.0))
    inside = False
    for t in free:
        if t == v.boi_id:
            inside = True
        elif t == v.eoi_id:
            inside = False
        elif not inside:
            assert not v.image_offset <= t < v.image_offset + v.image.size


def test_cli_captions_a_picture_and_draws_one(export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.png").write_bytes(png(3))
    assert cli_main(["generate", "--model", str(export), "--image", str(tmp_path / "in.png"), "--max-new-tokens",
                     "12", "--seed", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_tokens"] == 1 + 2 + 64 and out["new_tokens"] >= 1
    assert cli_main(["generate", "--model", str(export), "--prompt", "a boat", "--generate-image", "--image-out",
                     str(tmp_path / "out.png"), "--cfg-scale", "2"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (16, 16)


def test_bad_inputs_are_named(export: Path, toks: tuple[Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    gen, text, image = load_generator(export)
    with pytest.raises(ValueError, match="context of 160 tokens"):
        gen.generate(list(range(150)), SamplingConfig(max_new_tokens=20))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert cli_main(["generate", "--model", str(export), "--image", str(tmp_path / "broken.jpg")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    other = make_tokenizers(tmp_path / "other_tok")
    (tmp_path / "c.txt").write_text("other words entirely\n" * 30)
    from moma.tokenizers.bpe_train import train_bpe

    train_bpe([str(tmp_path / "c.txt")], 300, tmp_path / "t2", progress=False)
    assert cli_main(["generate", "--model", str(export), "--text-tokenizer", str(tmp_path / "t2"),
                     "--image-tokenizer", str(other[1])]) == 2
    assert "does not match the tokenizers" in capsys.readouterr().err


def test_expert_choice_without_auxiliary_routers_cannot_generate(toks: tuple[Path, Path], tmp_path: Path) -> None:
    export = write_export(tmp_path / "ec", toks, "moma_4t4i", aux=False)
    with pytest.raises(ValueError, match="generation needs its auxiliary routers"):
        load_generator(export)


def biased_export(d: Path, toks: tuple[Path, Path], favour: str) -> Path:
    """A dense export whose next-token choice is fixed: every block adds nothing to the residual
    stream (wo, w2 = 0) and every embedding is the same vector, so the logits are the same at every
    position — 0 everywhere but the favoured control token's (32)."""
    from safetensors.torch import load_file

    export = write_export(d, toks, "dense")
    state = load_file(str(export / "model.safetensors"))
    vocab = Tokenizers.load(str(toks[0]), str(toks[1])).vocab
    for k in state:
        if k.endswith(("wo.weight", "w2.weight")):
            state[k].zero_()
    state["tok_embeddings.weight"].fill_(1.0)
    state["output.weight"].zero_()
    state["output.weight"][getattr(vocab, f"{favour}_id")] = 1.0
    save_file(state, str(export / "model.safetensors"))
    return export


def test_min_new_tokens_bans_the_end_of_the_document(toks: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    export = biased_export(tmp_path / "eos", toks, "eos")
    gen, text, image = load_generator(export)
    prompt, _ = encode_prompt(gen.vocab, text, image, "a red square")
    eos = gen.vocab.eos_id
    assert gen.generate(prompt, SamplingConfig(max_new_tokens=10, seed=0)) == [eos]  # what a user got
    new = gen.generate(prompt, SamplingConfig(max_new_tokens=10, min_new_tokens=6, seed=0))
    assert len(new) == 7 and new[-1] == eos and eos not in new[:6]
    with pytest.raises(ValueError, match="min_new_tokens 11"):
        gen.generate(prompt, SamplingConfig(max_new_tokens=10, min_new_tokens=11))
    # a caption of a picture: text, at least 5 tokens, by default (the README's command)
    (tmp_path / "in.png").write_bytes(png(1))
    assert cli_main(["generate", "--model", str(export), "--image", str(tmp_path / "in.png"), "--prompt", ""]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_tokens"] == 6 and out["text"] and out["images"] == 0 and out["unfinished_image"] is False


def test_an_image_is_started_only_when_the_budget_finishes_it(toks: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    export = biased_export(tmp_path / "boi", toks, "boi")
    gen, text, image = load_generator(export)
    prompt, _ = encode_prompt(gen.vocab, text, image, "a red square")
    v, codes = gen.vocab, gen.image_codes
    short = gen.generate(prompt, SamplingConfig(max_new_tokens=codes, seed=0))  # one short of an image
    assert v.boi_id not in short and (len(short) == codes or short[-1] == v.eos_id)
    room = gen.generate(prompt, SamplingConfig(max_new_tokens=codes + 5, seed=0))
    assert room[0] == v.boi_id and room[codes + 1] == v.eoi_id and v.boi_id not in room[1:]
    assert not gen.unfinished_image(prompt + room)
    # an image asked for with too small a budget: reported, not dropped silently
    assert cli_main(["generate", "--model", str(export), "--prompt", "x", "--generate-image", "--max-new-tokens",
                     "10"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["unfinished_image"] is True and out["images"] == 0 and "ends inside an image" in captured.err
