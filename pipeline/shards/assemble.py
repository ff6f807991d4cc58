"""Documents -> token arrays, a batch at a time (docs/design.md, "Vocabulary").

    <|bos|> segment segment ... <|eos|>     text segment: its BPE ids
                                            image segment: <|boi|> codes + image_offset (raster) <|eoi|>

Texts of a batch go through tiktoken's batch encode; distinct images of a batch through the VQ
encoder in batches (an image shared by several documents, e.g. COCO's five captions, is encoded
once). A document with an image that cannot be read becomes a Reject naming the image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moma.pipeline.documents import Document, ImageSegment, Reject, TextSegment
from moma.tokenizers.image_encode import BatchImageEncoder
from moma.tokenizers.image_preprocess import DEFAULT_MAX_PIXELS, ImageError
from moma.tokenizers.image_tokenizer import ImageTokenizer
from moma.tokenizers.text import TextTokenizer
from moma.tokenizers.vocab import Vocab


@dataclasses.dataclass
class Tokenizers:
    text: TextTokenizer
    image: ImageTokenizer | None
    text_path: str
    image_path: str | None

    @property
    def vocab(self) -> Vocab:
        return Vocab(text=self.text.identity, image=self.image.identity if self.image else None)

    @classmethod
    def load(cls, text_path: str | Path, image_path: str | Path | None = None,
             text_pattern: str | None = None) -> Tokenizers:
        return cls(text=TextTokenizer.load(text_path, pattern=text_pattern),
                   image=ImageTokenizer.load(image_path) if image_path else None,
                   text_path=str(text_path), image_path=str(image_path) if image_path else None)


@dataclasses.dataclass
class TokenizedDocument:
    doc: Document
    tokens: np.ndarray  # uint32 [n]
    text_tokens: int  # text-modality tokens (BPE + controls)
    image_tokens: int  # image codes


class DocumentTokenizer:
    def __init__(self, tokenizers: Tokenizers, image_batch: int = 64, text_threads: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = True) -> None:
        self.tok = tokenizers
        self.vocab = tokenizers.vocab
        self.text_threads = text_threads
        self.images = BatchImageEncoder(tokenizers.image, workers=0, batch_size=image_batch, max_pixels=max_pixels,
                                        draft=jpeg_draft) if tokenizers.image else None

    def __call__(self, docs: Sequence[Document]) -> Iterator[TokenizedDocument | Reject]:
        texts = [seg.text for d in docs for seg in d.segments if isinstance(seg, TextSegment)]
        encoded_texts = iter(self.tok.text.encode_batch(texts, num_threads=self.text_threads)) if texts else iter(())
        codes = self._encode_images(docs)
        v = self.vocab
        for doc in docs:
            parts: list[np.ndarray] = [np.array([v.bos_id], dtype=np.uint32)]
            bad: ImageError | None = None
            n_image = 0
            for seg in doc.segments:
                if isinstance(seg, TextSegment):
                    parts.append(np.asarray(next(encoded_texts), dtype=np.uint32))
                    continue
                result = codes[seg.identity]
                if isinstance(result, ImageError):
                    bad = bad or ImageError(result.reason, result.detail, seg.ref)
                    continue
                parts += [np.array([v.boi_id], dtype=np.uint32), v.image_codes_to_ids(result),
                          np.array([v.eoi_id], dtype=np.uint32)]
                n_image += result.size
            if bad is not None:
                yield Reject(doc.source, doc.record_id, bad.reason, str(bad))
                continue
            parts.append(np.array([v.eos_id], dtype=np.uint32))
            tokens = np.concatenate(parts)
            yield TokenizedDocument(doc, tokens, text_tokens=int(tokens.size - n_image), image_tokens=n_image)

    def _encode_images(self, docs: Sequence[Document]) -> dict[str, np.ndarray | ImageError]:
        unique: dict[str, ImageSegment] = {}
        for d in docs:
            for seg in d.segments:
                if isinstance(seg, ImageSegment):
                    unique.setdefault(seg.identity, seg)
        if not unique:
            return {}
        if self.images is None:
            raise ValueError("documents with images need an image tokenizer (--image-tokenizer)")
        keys = list(unique)
        return dict(zip(keys, self.images.encode(unique[k].source for k in keys)))
