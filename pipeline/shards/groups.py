"""Where the shard builder cuts tars: groups of consecutive units, decided before partitioning.

    plan = plan_groups(units, readers, max_docs=10_000, max_bytes=10**9)   # one Planned per unit

A tar never holds documents of two groups, and a group's documents go to tars in unit order, rotated
at --max-docs-per-shard / --max-mb-per-shard. A group is a run of consecutive units (in the build's
global listing order, across sources) whose weight reaches a target; the weights and targets are
functions of the listed units alone, never of --num-partitions. A partition owns whole groups, so
every tar's bytes, and after the merge's global numbering every tar's name, are the same whatever the
partitioning (tests/test_shards_partitions.py), and the merge stays a hard link per tar.

A unit's weight is what is known without reading its records: (records, bytes): the reader's record
count (Reader.unit_records; a JSONL file or an img2dataset tar: unknown, 0) and the size on disk of
the file the unit names (a file's slices share it evenly; a folder batch: 0). A group closes when
either sum reaches its target:

    records target = min(max_docs, max(ceil(total records / GROUPS), MIN_RECORDS))
    bytes target   = min(max_bytes, max(ceil(total bytes / GROUPS), MIN_BYTES))

so a big build has about GROUPS groups or more (a group overshoots its target by less than its last
unit), and as many partitions have work whatever the corpus shape (many small files or a few big
ones), with no group much over a shard's limits; a small build (under MIN_RECORDS records and
MIN_BYTES bytes) is one group, one tar.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from moma.pipeline.readers.base import Reader

GROUPS = 64  # a build big enough is cut into about this many groups or more (units of parallel work)
MIN_RECORDS = 1000  # ... but a group is not closed by records below this many
MIN_BYTES = 1 << 20  # ... nor by bytes below this many


def policy() -> dict[str, int]:
    """The constants that decide the cuts (recorded in the build settings: changing them changes bytes)."""
    return {"groups": GROUPS, "min_records": MIN_RECORDS, "min_bytes": MIN_BYTES}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One unit of the build: its global index (tags its records), source, the reader's unit, group."""

    index: int
    source: int
    unit: Any
    group: int


def unit_file(unit: Any) -> str | None:
    """The file a unit names: a path (a text file, a tar), or the first field of a (path, ...) slice;
    None for a folder batch (a list of relative image paths)."""
    if isinstance(unit, str):
        return unit
    if isinstance(unit, tuple) and unit and isinstance(unit[0], str) and os.path.isabs(unit[0]):
        return unit[0]
    return None


def unit_weights(units: Sequence[tuple[int, Any]], readers: Sequence[Reader]) -> list[tuple[int, int]]:
    """(records, bytes) per (source, unit): cheap hints only, no record is read."""
    files = [unit_file(u) for _, u in units]
    shares = Counter(f for f in files if f is not None)  # slices of one file share its size
    sizes: dict[str, int] = {}
    for f in shares:
        try:
            sizes[f] = os.stat(f).st_size
        except OSError:  # unreadable: its read rejects it; it weighs nothing here
            sizes[f] = 0
    weights = []
    for (source, unit), f in zip(units, files):
        try:
            records = readers[source].unit_records(unit) or 0
        except Exception:  # a hint; a unit whose count fails is rejected when read
            records = 0
        weights.append((max(records, 0), sizes[f] // shares[f] if f is not None else 0))
    return weights


def targets(weights: Sequence[tuple[int, int]], max_docs: int, max_bytes: int) -> tuple[int, int]:
    """(records, bytes) at which a group closes (see the module docstring)."""
    records = sum(r for r, _ in weights)
    size = sum(b for _, b in weights)
    return (max(1, min(max_docs, max(math.ceil(records / GROUPS), MIN_RECORDS))),
            max(1, min(max_bytes, max(math.ceil(size / GROUPS), MIN_BYTES))))


def cut(weights: Sequence[tuple[int, int]], max_docs: int, max_bytes: int) -> list[int]:
    """The group of each unit: consecutive runs, each closed when its records or bytes reach the targets."""
    by_records, by_bytes = targets(weights, max_docs, max_bytes)
    groups, group, records, size = [], 0, 0, 0
    for r, b in weights:
        groups.append(group)
        records, size = records + r, size + b
        if records >= by_records or size >= by_bytes:
            group, records, size = group + 1, 0, 0
    return groups


def plan_groups(units: Sequence[tuple[int, Any]], readers: Sequence[Reader], max_docs: int,
                max_bytes: int) -> list[Planned]:
    """Every (source, unit) of the build, in listing order, with its global index and group."""
    groups = cut(unit_weights(units, readers), max_docs, max_bytes)
    return [Planned(i, source, unit, g) for i, ((source, unit), g) in enumerate(zip(units, groups))]


def partition_plan(plan: Sequence[Planned], index: int, n: int) -> list[Planned]:
    """Partition `index` of `n`: every n-th group, whole."""
    return [p for p in plan if p.group % n == index]
