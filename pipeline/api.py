"""The Python API of an export: load it, encode and decode, generate — one process, no DeepSpeed.

    import moma
    m = moma.load("runs/demo/run/export")            # model, both tokenizers, vocabulary
    ids = m.encode("a red circle", image="photo.png")  # <|bos|> [<|boi|> codes <|eoi|>] text
    m.decode(ids)                                     # {"text": ..., "images": [uint8 HxWx3, ...]}
    out = m.generate("a red circle", max_new_tokens=40, seed=0)       # {"text", "images", "ids", ...}
    m.generate("", image="photo.png")                 # a caption
    m.generate("two blue squares", generate_image=True, cfg_scale=3)["images"][0]   # a picture
    logits = m.logits(ids)                            # [t, vocab], the routing generation uses

`moma generate` is this API on the command line (pipeline/generate.py holds the sampling rules).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from moma.pipeline.generate import (
    CAPTION_MIN_TOKENS,
    Generator,
    SamplingConfig,
    decode_output,
    encode_prompt,
    load_generator,
)


@dataclasses.dataclass
class Moma:
    """A loaded export: `model` (pipeline.model.transformer.Transformer, eval mode), `text_tokenizer`,
    `image_tokenizer` (None for a text-only model), `vocab`."""

    generator: Generator
    text_tokenizer: Any
    image_tokenizer: Any
    directory: Path

    @property
    def model(self) -> torch.nn.Module:
        return self.generator.model

    @property
    def vocab(self) -> Any:
        return self.generator.vocab

    def encode(self, text: str = "", image: str | Path | None = None, open_image: bool = False) -> list[int]:
        """<|bos|>, the image (a file) if any, the text, and <|boi|> when `open_image`."""
        ids, _ = encode_prompt(self.vocab, self.text_tokenizer, self.image_tokenizer, text,
                               str(image) if image is not None else None, open_image)
        return ids

    def decode(self, ids: list[int]) -> dict[str, Any]:
        """The text of `ids` and the pictures of its complete images (uint8 arrays)."""
        text, images = decode_output(self.vocab, self.text_tokenizer, self.image_tokenizer, list(ids))
        return {"text": text, "images": images}

    @torch.no_grad()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of one sequence, under the routing generation uses."""
        x = torch.as_tensor(ids).reshape(1, -1)
        return self.model(x, routing=self.model.routing(x, mode=self.generator.mode)).logits[0]

    def generate(self, prompt: str = "", image: str | Path | None = None, generate_image: bool = False,
                 max_new_tokens: int | None = None, min_new_tokens: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, cfg_scale: float = 1.0) -> dict[str, Any]:
        """Continue a prompt; the same defaults as `moma generate` (a caption for an image prompt,
        one image's codes + 2 tokens for `generate_image`, else 64)."""
        ids, uncond = encode_prompt(self.vocab, self.text_tokenizer, self.image_tokenizer, prompt,
                                    str(image) if image is not None else None, generate_image)
        caption = image is not None and not generate_image
        max_new = max_new_tokens or ((self.generator.image_codes or 0) + 2 if generate_image else 64)
        min_new = min_new_tokens if min_new_tokens is not None else \
            (min(CAPTION_MIN_TOKENS, max_new) if caption else 0)
        sampling = SamplingConfig(max_new_tokens=max_new, min_new_tokens=min_new, allow_images=not caption,
                                  temperature=temperature, top_p=top_p, seed=seed, cfg_scale=cfg_scale)
        new = self.generator.generate(ids, sampling, uncond=uncond if generate_image else None,
                                      stop_after_image=generate_image)
        out = self.decode(([self.vocab.boi_id] if generate_image else []) + new)
        return {**out, "ids": new, "unfinished_image": self.generator.unfinished_image(ids + new)}


def load(directory: str | Path, text_tokenizer: str | None = None, image_tokenizer: str | None = None) -> Moma:
    """A `moma export` directory (its bundled tokenizers, or those given)."""
    generator, text, image = load_generator(directory, text_tokenizer, image_tokenizer)
    return Moma(generator, text, image, Path(directory))


__all__ = ["Moma", "load"]
