"""Generation from an export, in one process (no DeepSpeed): text, images, image -> text.

    moma generate --model runs/demo/run/export --prompt "a red square" [--max-new-tokens 64]
    moma generate --model EXPORT --prompt "two blue circles" --generate-image --image-out out.png [--cfg-scale 3]
    moma generate --model EXPORT --image picture.png --prompt ""          # a caption for a picture
    moma generate --model EXPORT --prompt "a poem" --min-new-tokens 20    # no <|eos|> before 20 tokens

Autoregressive with a KV cache (`--no-cache` recomputes every step: the same tokens with the same
seed). MoE models route causally (their auxiliary routers: `moma train-aux-routers`); expert choice
cannot run one token at a time. Inside an image (after <|boi|>) exactly (R/f)^2 codes are sampled
from the image-code range, then <|eoi|> is forced; outside one, image codes are never sampled.
Classifier-free guidance (Chameleon-style): the unconditional stream is the prompt without its text;
inside images the logits are uncond + scale * (cond - uncond). `min_new_tokens`: <|eos|> is banned
until that many new tokens. An image is only started when the budget can finish it; an output that
still ends inside an image (a prompt ending in <|boi|> with too small a budget) is reported
(`"unfinished_image": true`), never dropped silently. Captioning (an image prompt without
--generate-image) samples text only, at least CAPTION_MIN_TOKENS of it by default: a model trained on
random image/caption order often ends the document right after the picture.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.transformer import KVCache, Transformer
from moma.tokenizers.vocab import Vocab


def generation_routing(cfg: ModelConfig) -> str:
    """The routing mode that decodes one token at a time: "causal" (the auxiliary routers) where
    expert choice or mixture-of-depths would rank a token against later ones, else "ec"; such a model
    without auxiliary routers is refused. (The one rule: `moma generate`, `moma.load` and the exported
    Hugging Face code all ask here.)"""
    spec = cfg.ffn_spec
    non_causal = spec.mod or (spec.learned_routing and cfg.router == "expert_choice")
    if non_causal and not cfg.aux_routers:
        raise ValueError(f"{cfg.ffn} routes by expert choice or mixture-of-depths, which is not causal: "
                         f"generation needs its auxiliary routers (moma train-aux-routers, then moma export)")
    return "causal" if non_causal else "ec"


CAPTION_MIN_TOKENS = 5  # an image prompt's default --min-new-tokens (a caption, not an empty string)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # <|eos|> banned until this many new tokens
    allow_images: bool = True  # False: text only (captions)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    cfg_scale: float = 1.0  # > 1: classifier-free guidance inside images
    use_cache: bool = True


class Generator:
    """A model and its vocabulary, ready to continue token sequences."""

    def __init__(self, model: Transformer, vocab: Vocab, image_codes: int | None) -> None:
        self.model, self.vocab = model.eval(), vocab
        self.image_codes = image_codes  # codes per image, (R/f)^2; None: the model has no image tokenizer
        self.mode = generation_routing(model.cfg)

    def _logits(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        routing = self.model.routing(ids, mode=self.mode)
        return self.model(ids, routing=routing, cache=cache).logits[:, -1].float()

    def _allowed(self, inside: int | None, produced: int = 0, sampling: SamplingConfig | None = None
                 ) -> torch.Tensor:
        """The ids that may come next: image codes inside an image, <|eoi|> once it is full, else
        anything but image codes (and the pad / reserved control slots); <|eos|> only after
        `min_new_tokens`; <|boi|> only when images are allowed and the budget can finish one."""
        sampling = sampling or SamplingConfig()
        v, mask = self.vocab, torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
        if inside is not None:
            if inside >= (self.image_codes or 0):
                mask[v.eoi_id] = True
            else:
                mask[v.image_offset:v.image_offset + v.image.size] = True
            return mask
        mask[: v.text_size] = True
        mask[v.eos_id] = produced >= sampling.min_new_tokens
        left = sampling.max_new_tokens - produced - 1  # after this token
        if self.image_codes and sampling.allow_images and left >= self.image_codes + 1:
            mask[v.boi_id] = True
        return mask

    @torch.no_grad()
    def generate(self, prompt: list[int], sampling: SamplingConfig, uncond: list[int] | None = None,
                 stop_after_image: bool = False) -> list[int]:
        """The new ids after `prompt` (up to <|eos|> or max_new_tokens)."""
        cfg = self.model.cfg
        if not 0 <= sampling.min_new_tokens <= sampling.max_new_tokens:
            raise ValueError(f"min_new_tokens {sampling.min_new_tokens} must lie in [0, max_new_tokens "
                             f"{sampling.max_new_tokens}]")
        if len(prompt) + sampling.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + {sampling.max_new_tokens} new ones > the model's "
                             f"context of {cfg.max_seq_len} tokens")
        gen = torch.Generator().manual_seed(sampling.seed)
        guided = uncond is not None and sampling.cfg_scale != 1.0
        streams = [prompt] + ([uncond] if guided else [])
        caches = [KVCache(cfg.n_layers) if sampling.use_cache else None for _ in streams]
        seqs = [list(s) for s in streams]
        inside = self._inside(prompt)
        out: list[int] = []
        pending = [torch.tensor([s]) for s in seqs]
        for _ in range(sampling.max_new_tokens):
            logits = [self._logits(p if c is not None else torch.tensor([s]), c)[0]
                      for p, c, s in zip(pending, caches, seqs)]
            scores = logits[0]
            if guided and inside is not None:
                scores = logits[1] + sampling.cfg_scale * (logits[0] - logits[1])
            scores = scores.masked_fill(~self._allowed(inside, len(out), sampling), float("-inf"))
            token = _sample(scores, sampling, gen)
            out.append(token)
            for s in seqs:
                s.append(token)
            pending = [torch.tensor([[token]]) for _ in seqs]
            if token == self.vocab.boi_id:
                inside = 0
            elif token == self.vocab.eoi_id:
                inside = None
                if stop_after_image:
                    break
            elif inside is not None:
                inside += 1
            if token == self.vocab.eos_id:
                break
        return out

    def allowed_after(self, ids: list[int]) -> torch.Tensor:
        """The ids that may follow `ids` (prompt + output so far) under moma's grammar, whatever the
        budget (what the Hugging Face wrapper's logits processor applies)."""
        return self._allowed(self._inside(ids), 0, SamplingConfig(max_new_tokens=1 << 30))

    def unfinished_image(self, ids: list[int]) -> bool:
        """Whether `ids` (prompt + output) end inside an image."""
        return self._inside(ids) is not None

    def _inside(self, ids: list[int]) -> int | None:
        """Codes emitted so far when `ids` ends inside an image, else None."""
        v = self.vocab
        last_boi = max((i for i, t in enumerate(ids) if t == v.boi_id), default=None)
        if last_boi is None or v.eoi_id in ids[last_boi:]:
            return None
        return len(ids) - last_boi - 1


def _sample(scores: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(scores.argmax())
    probs = torch.softmax(scores / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def load_generator(export: str | Path, text_tokenizer: str | None = None, image_tokenizer: str | None = None
                   ) -> tuple[Generator, Any, Any]:
    """An export plus its tokenizers (those bundled in it, or those given), checked against the
    export's vocabulary: (generator, text tokenizer, image tokenizer or None). Weights holding NaN or
    inf are refused, naming them."""
    from moma.pipeline.training.export import ExportError, load_exported, nonfinite_tensors, read_export
    from moma.tokenizers.image_tokenizer import ImageTokenizer
    from moma.tokenizers.text import TextTokenizer

    info = read_export(export)
    vocab, recorded = info.vocab, info.tokenizers
    text_path, image_path = text_tokenizer or recorded.get("text"), image_tokenizer or recorded.get("image")
    if not text_path:
        raise ValueError(f"{export}: no tokenizers recorded; give --text-tokenizer (and --image-tokenizer)")
    for what, path in (("text", text_path), ("image", image_path)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{export}: its {what} tokenizer {path} is missing (exports written before "
                                    f"tokenizers were bundled point at the originals): give --{what}-tokenizer")
    text = TextTokenizer.load(text_path, pattern=None if text_tokenizer else recorded.get("text_pattern"))
    image = ImageTokenizer.load(image_path) if image_path and vocab.image is not None else None
    got = Vocab(text=text.identity, image=image.identity if image else None)
    if got.to_json() != vocab.to_json():
        raise ValueError(f"{export}: its vocabulary ({vocab.describe()}) does not match the tokenizers "
                         f"{text_path}, {image_path} ({got.describe()})")
    model = load_exported(export)
    bad = nonfinite_tensors(model)
    if bad:
        raise ExportError(f"{export}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); the run diverged "
                          f"or the export is damaged")
    codes = image.cfg.grid ** 2 if image is not None else None
    return Generator(model, vocab, codes), text, image


def encode_prompt(vocab: Vocab, text_tok: Any, image_tok: Any, prompt: str, image: str | None = None,
                  generate_image: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, unconditional ids): <|bos|> [<|boi|> codes <|eoi|>] text [<|boi|>]; the
    unconditional stream drops the text (classifier-free guidance)."""
    from moma.tokenizers.image_preprocess import ImageError, load_image

    head = [vocab.bos_id]
    if image is not None:
        if image_tok is None:
            raise ValueError("an image prompt needs the model's image tokenizer")
        try:
            pixels = load_image(image, image_tok.resolution)
        except ImageError as e:
            raise ValueError(f"--image {image}: {e}") from None
        codes = np.asarray(image_tok.encode([pixels])[0])
        head += [vocab.boi_id, *vocab.image_codes_to_ids(codes).tolist(), vocab.eoi_id]
    tail = [vocab.boi_id] if generate_image else []
    return head + text_tok.encode(prompt) + tail, head + tail


def decode_output(vocab: Vocab, text_tok: Any, image_tok: Any, ids: list[int]) -> tuple[str, list[np.ndarray]]:
    """The text of `ids` and the pictures of its complete images."""
    text_ids, images, current = [], [], None
    for t in ids:
        if t == vocab.boi_id:
            current = []
        elif t == vocab.eoi_id and current is not None:
            if image_tok is not None and len(current) == image_tok.cfg.grid ** 2:
                codes = vocab.ids_to_image_codes(np.asarray(current))
                images.append(image_tok.decode(codes.reshape(1, -1))[0])
            current = None
        elif current is not None:
            current.append(t)
        elif t < vocab.text_size:
            text_ids.append(t)
    return text_tok.decode(text_ids), images
