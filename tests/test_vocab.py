"""The unified vocabulary: layout invariants, modality function, serialisation, identity checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moma.tokenizers.vocab import SPECIAL_TOKENS, IdentityMismatchError, TokenizerIdentity, Vocab, check_identity

TEXT = TokenizerIdentity(kind="tiktoken", name="t", sha256="a" * 64, size=1000, extra={"pattern": "p"})
IMAGE = TokenizerIdentity(kind="vq", name="i", sha256="b" * 64, size=64, extra={"resolution": 64})


def test_layout_is_contiguous_and_ordered() -> None:
    v = Vocab(text=TEXT, image=IMAGE)
    specials = list(v.specials.values())
    assert specials == list(range(1000, 1016))
    assert [v.bos_id, v.eos_id, v.boi_id, v.eoi_id, v.pad_id] == [v.specials[n] for n in SPECIAL_TOKENS]
    assert v.image_offset == 1016 and v.size == 1016 + 64
    assert Vocab(text=TEXT).size == 1016  # text-only vocabulary: empty image range


def test_modality_numpy_and_torch() -> None:
    v = Vocab(text=TEXT, image=IMAGE)
    ids = np.array([0, 999, v.bos_id, v.boi_id, v.eoi_id, v.pad_id, v.image_offset, v.size - 1], dtype=np.uint32)
    expected = [False] * 6 + [True, True]
    assert v.modality(ids).tolist() == expected
    assert v.modality(torch.from_numpy(ids.astype(np.int64))).tolist() == expected


def test_image_code_mapping_round_trip() -> None:
    v = Vocab(text=TEXT, image=IMAGE)
    codes = np.arange(64)
    ids = v.image_codes_to_ids(codes)
    assert ids.dtype == np.uint32 and v.modality(ids).all()
    assert (v.ids_to_image_codes(ids) == codes).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.check_ids(np.array([v.size]))


def test_json_round_trip_and_tampered_layout(tmp_path: Path) -> None:
    v = Vocab(text=TEXT, image=IMAGE)
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v
    data = json.loads((tmp_path / "vocab.json").read_text())
    data["layout"]["size"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json.*disagrees"):
        Vocab.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a moma vocabulary"):
        Vocab.load(tmp_path / "other.json")


def test_identity_check_names_both_sources() -> None:
    other = TokenizerIdentity(kind="vq", name="i", sha256="c" * 64, size=64, extra={"resolution": 64})
    check_identity(IMAGE, IMAGE, what="image", expected_from="x", found_from="y")
    with pytest.raises(IdentityMismatchError, match=r"shards/manifest.json has vq:i@bbbb.*run.yaml has vq:i@cccc"):
        check_identity(IMAGE, other, what="image", expected_from="shards/manifest.json", found_from="run.yaml")
    with pytest.raises(IdentityMismatchError, match="has none"):
        check_identity(IMAGE, None, what="image", expected_from="a", found_from="b")
