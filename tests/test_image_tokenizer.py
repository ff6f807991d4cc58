"""Image VQ tokenizer: shapes, determinism, code ranges, training, persistence, Chameleon layout, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from image_fixtures import photo_like, write_awkward_images

from moma.pipeline.cli import main as cli_main
from moma.tokenizers.image_encode import BatchImageEncoder
from moma.tokenizers.image_preprocess import ImageError, load_image
from moma.tokenizers.image_tokenizer import PRESETS, ImageTokenizer, load_chameleon, preset_config
from moma.tokenizers.vq_model import VQConfig, VQModel
from moma.tokenizers.vq_train import ImageTrainConfig, train_image_tokenizer

SMALL = dict(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=8,
             codebook_size=64, fsq_levels=(4, 4, 4))


def small_tokenizer(quantizer: str = "vq", seed: int = 0) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(VQModel(VQConfig(quantizer=quantizer, **SMALL)), name=f"small-{quantizer}")


def images(n: int, r: int = 32) -> np.ndarray:
    return np.stack([np.asarray(photo_like((r + 10 * i, r + 5 * i), seed=i).resize((r, r))) for i in range(n)])


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_encode_decode_shapes_range_and_determinism(quantizer: str) -> None:
    tok = small_tokenizer(quantizer)
    x = images(5)
    codes = tok.encode(x)
    assert codes.shape == (5, 16 * 16) and codes.dtype == np.uint32  # f = 2 -> 16 x 16 grid
    assert codes.max() < tok.cfg.num_codes
    assert np.array_equal(codes, tok.encode(x))
    out = tok.decode(codes)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, tok.decode(codes))
    with pytest.raises(ValueError, match="codes must lie in"):
        tok.decode(np.full((1, 256), tok.cfg.num_codes))


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_code_indices_decode_to_the_quantized_values(quantizer: str) -> None:
    # decode(codes) must see exactly the latent the encoder's forward pass produced
    quantize = small_tokenizer(quantizer).model.quantize
    z = torch.randn(2, quantize.dim, 6, 6) * 3
    z_q, _, idx = quantize(z)
    assert torch.allclose(quantize.embed(idx), z_q, atol=1e-6)
    assert 0 <= int(idx.min()) and int(idx.max()) < quantize.codebook_size
    if quantizer == "fsq":  # all L_1 * L_2 * L_3 codes are reachable and distinct
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-4, 4, 40)] * 3, indexing="ij")).view(1, 3, 40, -1)
        assert quantize(grid)[2].unique().numel() == 64


def test_presets_build_with_the_documented_token_counts() -> None:
    expect = {"tiny": (64, 1024), "base": (256, 8192), "chameleon": (1024, 8192)}
    for name, (tokens, k) in expect.items():
        cfg = PRESETS[name]
        assert (cfg.tokens_per_image, cfg.num_codes) == (tokens, k), name
        with torch.device("meta"):
            model = VQModel(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
    assert preset_config("tiny", quantizer="fsq").num_codes == 1000
    with pytest.raises(ValueError, match="unknown image tokenizer preset"):
        preset_config("huge")


def taming_keys(ch_mult: tuple[int, ...], num_res_blocks: int, attn_levels: set[int]) -> set[str]:
    """The parameter names of taming-transformers' VQModel, spelled out from its layout rules
    (written independently of moma's model code)."""
    keys: set[str] = set()

    def conv(prefix: str) -> None:
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    def resnet(prefix: str, shortcut: bool) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if shortcut else ()):
            conv(f"{prefix}.{part}")

    def attn(prefix: str) -> None:
        for part in ("norm", "q", "k", "v", "proj_out"):
            conv(f"{prefix}.{part}")

    n = len(ch_mult)
    conv("encoder.conv_in")
    prev = 1
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", shortcut=(j == 0 and prev != m))
            if i in attn_levels:
                attn(f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv")
        prev = m
    for tower in ("encoder", "decoder"):
        resnet(f"{tower}.mid.block_1", False)
        attn(f"{tower}.mid.attn_1")
        resnet(f"{tower}.mid.block_2", False)
        conv(f"{tower}.norm_out")
        conv(f"{tower}.conv_out")
    conv("decoder.conv_in")
    prev = ch_mult[-1]
    for i in reversed(range(n)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", shortcut=(j == 0 and prev != ch_mult[i]))
            if i in attn_levels:
                attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv")
        prev = ch_mult[i]
    conv("quant_conv")
    conv("post_quant_conv")
    keys.add("quantize.embedding.weight")
    return keys


def test_chameleon_preset_has_tamings_exact_parameter_names() -> None:
    cfg = PRESETS["chameleon"]
    with torch.device("meta"):
        model = VQModel(cfg)
    assert set(model.state_dict()) == taming_keys(cfg.ch_mult, cfg.num_res_blocks, set())
    assert tuple(model.state_dict()["quantize.embedding.weight"].shape) == (8192, 256)
    small = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    assert set(VQModel(small).state_dict()) == taming_keys((1, 2, 2), 2, {1})  # attention at 16 px = level 1


def write_chameleon_release(directory: Path, cfg: VQConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised checkpoint in the released layout: Lightning's {'state_dict': ...}
    including taming's training-loss modules, and the vqgan.yaml that describes it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VQModel(cfg).state_dict().items()}
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    extras = {"loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=gen),
              "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3, generator=gen)}
    torch.save({"state_dict": {**state, **extras}, "global_step": 1}, directory / "vqgan.ckpt")
    (directory / "vqgan.yaml").write_text(yaml.safe_dump({"model": {
        "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.codebook_size,
                   "ddconfig": {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
                                "in_channels": 3, "out_ch": 3, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
                                "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
                                "dropout": 0.0},
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}))
    return state


def test_chameleon_checkpoint_loads_strictly(tmp_path: Path) -> None:
    # The real preset's architecture, scaled to test size (a 512 px forward is too slow for the suite).
    cfg = VQConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
                   z_channels=32, embed_dim=16, codebook_size=128, l2_normalize=False)
    state = write_chameleon_release(tmp_path, cfg)
    tok = ImageTokenizer.load(tmp_path)  # finds vqgan.ckpt + vqgan.yaml
    assert tok.cfg == cfg and tok.tokens_per_image == 16
    loaded = tok.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    codes = tok.encode(images(2, 64))
    assert codes.shape == (2, 16) and tok.decode(codes).shape == (2, 64, 64, 3)
    # a checkpoint that misses a tensor is refused, naming it
    bad = torch.load(tmp_path / "vqgan.ckpt", weights_only=True)
    del bad["state_dict"]["decoder.conv_out.bias"]
    torch.save(bad, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="missing.*decoder.conv_out.bias"):
        load_chameleon(tmp_path / "broken.ckpt", tmp_path / "vqgan.yaml")


def test_chameleon_full_preset_reads_the_release_yaml(tmp_path: Path) -> None:
    cfg = PRESETS["chameleon"]
    write_chameleon_release(tmp_path, cfg)
    tok = ImageTokenizer.load(tmp_path / "vqgan.ckpt")
    assert tok.cfg == cfg and tok.tokens_per_image == 1024 and tok.identity.size == 8192


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("train")
    srcs = []
    for i in range(12):
        p = d / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        photo_like((48 + 4 * i, 40 + 3 * i), seed=i).save(p)
        srcs.append(p)
    cfg = ImageTrainConfig(preset="tiny", overrides=dict(SMALL), steps=40, batch_size=8, warmup_steps=5,
                           log_every=1, checkpoint_every=20, grid_every=20)
    train_image_tokenizer(srcs, d / "out", cfg, progress=False)
    return d / "out", srcs


def test_training_lowers_the_loss_and_writes_everything(trained: tuple[Path, list[Path]]) -> None:
    out, _ = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40
    assert np.mean([r["recon"] for r in rows[-3:]]) < 0.7 * np.mean([r["recon"] for r in rows[:3]])
    assert (out / "recon_final.png").exists() and (out / "recon_step000020.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_00000020.pt", "step_00000040.pt"]


def test_saved_tokenizer_and_checkpoint_round_trip(trained: tuple[Path, list[Path]]) -> None:
    out, srcs = trained
    from_dir = ImageTokenizer.load(out)
    from_ckpt = ImageTokenizer.load(out / "checkpoints" / "step_00000040.pt")
    assert from_dir.identity.sha256 == from_ckpt.identity.sha256
    x = np.stack([load_image(s, 32) for s in srcs[:4]])
    assert np.array_equal(from_dir.encode(x), from_ckpt.encode(x))


def test_training_resumes_from_its_checkpoint(trained: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, srcs = trained
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    cfg = ImageTrainConfig(preset="tiny", overrides=dict(SMALL), steps=50, batch_size=8, warmup_steps=5,
                           log_every=5, checkpoint_every=20, grid_every=1000)
    train_image_tokenizer(srcs, resumed, cfg, progress=False)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-3:] == [40, 45, 50]  # continued at 41, not from 0
    assert [r["step"] for r in rows].count(5) == 1


def test_batch_encoder_isolates_bad_images(tmp_path: Path) -> None:
    files = write_awkward_images(tmp_path)
    tok = small_tokenizer()
    order = ["good.jpg", "truncated.jpg", "cmyk.jpg", "zero.jpg", "notimage.jpg", "bomb.png", "rotated.jpg"]
    sources = [files[n] for n in order]
    for workers in (0, 1):
        with BatchImageEncoder(tok, workers=workers, batch_size=3) as enc:
            results = list(enc.encode(sources))
        kinds = [r.reason if isinstance(r, ImageError) else "ok" for r in results]
        assert kinds == ["ok", "corrupt_image", "ok", "empty_file", "not_an_image", "decompression_bomb", "ok"]
        assert np.array_equal(results[0], tok.encode([load_image(files["good.jpg"], 32)])[0])


def test_cli_encode_decode_image(trained: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, srcs = trained
    assert cli_main(["tokenizer", "encode-image", str(srcs[0]), "--tokenizer", str(out),
                     "--out", str(tmp_path / "c.npy")]) == 0
    codes = np.load(tmp_path / "c.npy")
    assert codes.shape == (256,) and codes.dtype == np.uint32
    assert cli_main(["tokenizer", "decode-image", str(tmp_path / "c.npy"), "--tokenizer", str(out),
                     "--out", str(tmp_path / "r.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "r.png").size == (32, 32)
    (tmp_path / "junk.npy").write_text("nope")
    assert cli_main(["tokenizer", "decode-image", str(tmp_path / "junk.npy"), "--tokenizer", str(out),
                     "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_train_image_with_torchrun_ddp(tmp_path: Path) -> None:
    import subprocess

    from launch_fixtures import REPO, VENV_BIN, cpu_env

    for i in range(8):
        photo_like((40 + i, 36), seed=i).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "moma.pipeline.cli",
           "tokenizer", "train-image", "--images", str(tmp_path), "--preset", "tiny", "--steps", "30",
           "--batch-size", "4", "--set", "resolution=32", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and len(rows) == 3  # rank 0 alone logs
    assert rows[-1]["img_per_s"] > 0
    tok = ImageTokenizer.load(out)
    assert tok.tokens_per_image == 16 and tok.encode(images(2, 32)).shape == (2, 16)
