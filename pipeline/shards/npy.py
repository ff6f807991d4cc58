"""Decoding a shard's `.tokens.npy` member (np.save's format, version 1, 1-D integer array).

    tokens = load_npy(member_bytes)
"""

from __future__ import annotations

import io
import re

import numpy as np

# np.save's version-1 header for a 1-D array, as the shard writer produces it
_NPY_1D = re.compile(rb"\{'descr': '([<>|][ui][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def load_npy(data: bytes) -> np.ndarray:
    """np.load of a .npy member, with a fast path for plain 1-D integer arrays: np.load parses
    every header with ast.literal_eval, which cost as much as the rest of reading a document.
    Anything else (other versions, shapes, dtypes) goes through np.load itself."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        m = _NPY_1D.fullmatch(data, 10, end)
        if m is not None:
            dtype, count = np.dtype(m[1].decode()), int(m[2])
            if len(data) - end != count * dtype.itemsize:
                raise ValueError(f"npy body holds {len(data) - end} bytes, header says {count} x {dtype}")
            return np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return np.load(io.BytesIO(data), allow_pickle=False)
