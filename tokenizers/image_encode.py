"""From image files or bytes to codes at throughput: decode + preprocess in worker processes,
the VQ encoder on whole batches in this process. One bad image never fails the others.

    enc = BatchImageEncoder(ImageTokenizer.load("runs/vq-tiny"), workers=1)
    for result in enc.encode(sources):        # in input order
        codes_or_error = result               # uint32 [(R/f)^2] or ImageError
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections.abc import Iterable, Iterator

import numpy as np

from moma.tokenizers.image_preprocess import DEFAULT_MAX_PIXELS, ImageError, ImageSource, load_image
from moma.tokenizers.image_tokenizer import ImageTokenizer

EncodeResult = np.ndarray | ImageError


def _preprocess(src: ImageSource, resolution: int, max_pixels: int, draft: bool = True) -> np.ndarray | ImageError:
    try:
        return load_image(src, resolution, max_pixels, draft)
    except ImageError as e:
        return e
    except Exception as e:  # noqa: BLE001 - a decoder bug on one image must not stop the batch
        return ImageError("corrupt_image", f"{type(e).__name__}: {e}", "")


class BatchImageEncoder:
    def __init__(self, tokenizer: ImageTokenizer, workers: int = 1, batch_size: int = 64,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True) -> None:
        self.tokenizer = tokenizer
        self.workers = workers
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.draft = draft  # JPEG draft decoding (image_preprocess.py, step 4)
        self._pool: mp.pool.Pool | None = None

    def __enter__(self) -> BatchImageEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _preprocessed(self, sources: Iterable[ImageSource]) -> Iterator[np.ndarray | ImageError]:
        fn = functools.partial(_preprocess, resolution=self.tokenizer.resolution, max_pixels=self.max_pixels,
                               draft=self.draft)
        if self.workers <= 0:
            yield from map(fn, sources)
            return
        if self._pool is None:
            # spawn, not fork: the parent runs torch and tiktoken thread pools, which fork does not copy safely
            self._pool = mp.get_context("spawn").Pool(self.workers)
        yield from self._pool.imap(fn, sources, chunksize=8)

    def encode(self, sources: Iterable[ImageSource]) -> Iterator[EncodeResult]:
        """Codes (uint32 [(R/f)^2]) or the ImageError of each source, in input order."""
        pending: list[np.ndarray | ImageError] = []
        for item in self._preprocessed(sources):
            pending.append(item)
            if len(pending) >= self.batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def _flush(self, pending: list[np.ndarray | ImageError]) -> Iterator[EncodeResult]:
        good = [p for p in pending if isinstance(p, np.ndarray)]
        codes = iter(self.tokenizer.encode(good)) if good else iter(())
        for p in pending:
            yield next(codes) if isinstance(p, np.ndarray) else p
