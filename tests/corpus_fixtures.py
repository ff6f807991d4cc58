"""Small corpora in each source's real on-disk format, plus small tokenizers, written by the tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from image_fixtures import jpeg_bytes, photo_like, write_awkward_images

from moma.tokenizers.bpe_train import train_bpe
from moma.tokenizers.image_tokenizer import ImageTokenizer
from moma.tokenizers.vq_model import VQConfig, VQModel

SMALL_VQ = VQConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=8,
                    codebook_size=64)
CAPTIONS = ["a red square on a white background", "two dogs in a park", "a plate of food", "a city street at night",
            "a cat asleep on a sofa", "a boat on a lake", "mountains under snow", "a bowl of fruit"]


def make_tokenizers(d: Path) -> tuple[Path, Path]:
    """A 400-rank BPE and a randomly initialised 16 px VQ (8 x 8 = 64 codes of 64): fast, and real."""
    d.mkdir(parents=True, exist_ok=True)
    corpus = d / "corpus.txt"
    corpus.write_text(("\n".join(CAPTIONS) + "\n") * 40 + "USER: ASSISTANT: what is in the picture?\n" * 20)
    train_bpe([str(corpus)], 400, d / "text", progress=False)
    torch.manual_seed(0)
    ImageTokenizer(VQModel(SMALL_VQ), name="vq-test").save(d / "vq")
    return d / "text", d / "vq"


def png(i: int) -> bytes:
    buf = io.BytesIO()
    photo_like((40 + i, 30 + i), seed=i).save(buf, format="PNG")
    return buf.getvalue()


def write_coco(d: Path, n: int = 4, missing: int = 2) -> Path:
    (d / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n + missing):
        name = f"{i:012d}.jpg"
        images.append({"id": i + 1, "file_name": name, "height": 30, "width": 40})
        if i < n:
            (d / "images" / name).write_bytes(jpeg_bytes(photo_like((40, 30), seed=i)))
        for c in range(2):
            anns.append({"id": 100 * i + c, "image_id": i + 1, "caption": f"{CAPTIONS[i % 8]} ({c})"})
    (d / "annotations").mkdir(exist_ok=True)
    path = d / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def write_folder(d: Path, n: int = 4) -> Path:
    (d / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = d / ("sub" if i % 2 else "") / f"img{i}"
        base.with_suffix(".png").write_bytes(png(i))
        if i == 3:
            base.with_suffix(".json").write_text(json.dumps({"caption": CAPTIONS[i]}))
        else:
            base.with_suffix(".txt").write_text(CAPTIONS[i] + "\n")
    return d


def write_img2dataset(d: Path, n: int = 4) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", jpeg_bytes(photo_like((32, 32), seed=i))), ("txt", CAPTIONS[i].encode()),
                              ("json", json.dumps({"key": f"{i:09d}", "caption": CAPTIONS[i]}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(d: Path, n: int = 6, struct_images: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    images = [png(i) for i in range(n)]
    column = pa.array([{"bytes": b, "path": None} for b in images]) if struct_images else pa.array(images, pa.binary())
    table = pa.table({"key": [f"k{i}" for i in range(n)], "jpg": column,
                      "caption": [CAPTIONS[i % 8] for i in range(n)]})
    path = d / "part-0.parquet"
    pq.write_table(table, path, row_group_size=2)  # three row groups: the reader's units
    return path


def write_llava(d: Path) -> Path:
    (d / "imgs").mkdir(parents=True, exist_ok=True)
    (d / "imgs" / "a.png").write_bytes(png(1))
    records = [
        {"id": "conv-1", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "What is shown here?\n<image>"},
            {"from": "gpt", "value": "a boat on a lake"}]},
        {"id": "conv-2", "conversations": [{"from": "human", "value": "what is in the picture?"},
                                           {"from": "gpt", "value": "no picture"}]},
    ]
    path = d / "llava.json"
    path.write_text(json.dumps(records))
    return path


def write_obelics(d: Path) -> tuple[Path, Path]:
    (d / "imgs").mkdir(parents=True, exist_ok=True)
    (d / "imgs" / "p.png").write_bytes(png(2))
    table = pa.table({"texts": [["a city street at night", None, "the end"]],
                      "images": [[None, png(3), None]]})
    parquet = d / "obelics.parquet"
    pq.write_table(table, parquet)
    jsonl = d / "obelics.jsonl"
    jsonl.write_text(json.dumps({"texts": [None, "a cat asleep on a sofa"], "images": ["imgs/p.png", None]}) + "\n")
    return parquet, jsonl


def write_mmc4(d: Path) -> Path:
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "images" / "m.png").write_bytes(png(4))
    path = d / "docs.jsonl"
    path.write_text(json.dumps({"text_list": ["mountains under snow.", "a bowl of fruit."],
                                "image_info": [{"image_name": "m.png", "matched_text_index": 1}]}) + "\n")
    return path


def write_text(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "book.txt").write_text("two dogs in a park\n" * 5)
    (d / "lines.jsonl").write_text("\n".join(json.dumps({"text": c}) for c in CAPTIONS[:3]) + "\n")
    return d


def write_bad_corpus(d: Path) -> dict[str, object]:
    """One corpus holding every bad case; returns the sources and the expected reject counts."""
    img_dir = d / "bad_folder"
    files = write_awkward_images(img_dir)
    # good-but-awkward images: every one of these must be written
    awkward_ok = ["good.jpg", "cmyk.jpg", "rotated.jpg", "transparent.png", "palette_alpha.png", "gray16.png",
                  "animated.gif", "one_pixel.png", "very_wide.png"]
    bad = {"truncated.jpg": "corrupt_image", "truncated_header.jpg": "corrupt_image", "zero.jpg": "empty_file",
           "notimage.jpg": "not_an_image", "bomb.png": "decompression_bomb"}
    for name in files:
        files[name].with_suffix(".txt").write_text(f"caption of {name}\n")
    # caption problems on a good image
    for name, raw in (("badutf8", b"caf\xe9 au lait\n"), ("emptycap", b"   \n")):
        (img_dir / f"{name}.png").write_bytes(png(7))
        (img_dir / f"{name}.txt").write_bytes(raw)
    (img_dir / "nocaption.png").write_bytes(png(8))
    # COCO json naming images that are missing
    coco = write_coco(d / "coco", n=2, missing=3)
    # malformed JSON lines in an interleaved source
    mmc4 = d / "mmc4.jsonl"
    mmc4.write_text('{"text_list": ["fine."], "image_info": []}\n{not json\n{"text_list": ["x"], '
                    '"image_info": [{"image_name": "absent.png", "matched_text_index": 0}]}\n')
    # a parquet row with a null image
    pq.write_table(pa.table({"jpg": pa.array([png(1), None], pa.binary()), "caption": ["ok", "null image"]}),
                   d / "nulls.parquet")
    expected_rejects = {"corrupt_image": 2, "empty_file": 1, "not_an_image": 1, "decompression_bomb": 1,
                        "invalid_utf8": 1, "empty_text": 1, "missing_text": 1, "missing_image": 3 * 2 + 1 + 1,
                        "bad_json": 1}
    sources = [f"folder:{img_dir}", f"coco:{coco}", f"mmc4:{mmc4}", f"parquet:{d / 'nulls.parquet'}"]
    good = len(awkward_ok) + 2 * 2 + 1 + 1  # folder images, coco 2 images x 2 captions, mmc4 line 1, parquet row 1
    return {"sources": sources, "rejects": expected_rejects, "good": good, "bad_images": bad}
