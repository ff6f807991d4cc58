"""Progress for long work: a tqdm bar on a terminal, a plain line every few seconds in a log.

    bar = progress(total=steps, desc="train")      # tqdm when stderr is a terminal, else LogProgress
    bar.update(1); bar.set_postfix(loss="2.31"); bar.close()
    write("a message")                              # above a bar, or a plain line

tqdm redraws about ten times a second; written into a file (a SLURM log, `moma demo > log`) that
is thousands of lines. When stderr is not a terminal the bar is replaced by one line every
`MOMA_PROGRESS_SECONDS` seconds (default 10; or the `every_s` argument) and a summary line at close.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

DEFAULT_EVERY_S = 10.0


def _interval(every_s: float | None) -> float:
    if every_s is not None:
        return every_s
    try:
        return float(os.environ.get("MOMA_PROGRESS_SECONDS", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


class LogProgress:
    """The subset of tqdm's interface this project uses, as plain periodic lines on stderr."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, every_s: float | None = None,
                 **_: Any) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        self.n = self._start_n = initial
        self.disable = disable
        self.every_s = _interval(every_s)
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        word = "done" if final else "progress"
        return f"{head}{word} {done} {self.unit} in {elapsed:.0f}s ({rate:.2f} {self.unit}/s){tail}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.every_s:
            self._last = now
            print(self._line(), file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and not self.disable:
            print(self._line(final=True), file=sys.stderr, flush=True)
        self._closed = True


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """tqdm(...) on a terminal, LogProgress(...) otherwise (same arguments)."""
    every_s = kwargs.pop("every_s", None)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return LogProgress(iterable, every_s=every_s, **kwargs)


def write(message: str) -> None:
    """A message that does not break a tqdm bar (tqdm.write on a terminal, print otherwise)."""
    if sys.stderr.isatty():
        tqdm.write(message)
    else:
        print(message, flush=True)
