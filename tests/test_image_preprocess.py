"""The one preprocessing function: every image mode, orientation, animation, odd sizes and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_fixtures import photo_like, write_awkward_images

from moma.tokenizers.image_preprocess import ImageError, load_image, to_rgb

R = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_awkward_images(tmp_path_factory.mktemp("img"))


def test_good_jpeg_from_path_and_bytes(files: dict[str, Path]) -> None:
    a = load_image(files["good.jpg"], R)
    b = load_image(files["good.jpg"].read_bytes(), R)
    assert a.shape == (R, R, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(a, load_image(files["good.jpg"], R))  # deterministic


def test_transparency_is_composited_on_white(files: dict[str, Path]) -> None:
    assert (load_image(files["transparent.png"], R) == 255).all()
    pal = load_image(files["palette_alpha.png"], R)
    assert pal.shape == (R, R, 3)


def test_cmyk_and_16bit_are_converted(files: dict[str, Path]) -> None:
    rgb = load_image(files["good.jpg"], R).astype(int)
    cmyk = load_image(files["cmyk.jpg"], R).astype(int)
    assert np.abs(rgb - cmyk).mean() < 12  # same picture after the round trip through CMYK
    g16 = load_image(files["gray16.png"], R)
    assert (g16[..., 0] == g16[..., 1]).all()  # grey
    assert g16.max() > 200 and g16.min() < 50  # the 16-bit range was scaled, not clipped to white


def test_exif_orientation_is_applied(files: dict[str, Path]) -> None:
    upright = load_image(files["good.jpg"], R).astype(int)
    rotated = load_image(files["rotated.jpg"], R).astype(int)
    # Orientation 6 displays the stored picture turned 90 degrees clockwise
    assert np.abs(rotated - np.rot90(upright, k=-1)).mean() < np.abs(rotated - upright).mean()


def test_animated_gif_uses_first_frame(files: dict[str, Path]) -> None:
    img = load_image(files["animated.gif"], R)
    assert img[..., 0].mean() > 200 and img[..., 2].mean() < 50  # red, the first frame


def test_tiny_and_extreme_aspect_images(files: dict[str, Path]) -> None:
    one = load_image(files["one_pixel.png"], R)
    assert (one == one[0, 0]).all() and tuple(one[0, 0]) == (10, 200, 30)  # upsampled flat
    wide = load_image(files["very_wide.png"], R)
    assert wide.shape == (R, R, 3) and tuple(wide[R // 2, R // 2]) == (200, 10, 10)


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "corrupt_image"),
                                         ("truncated_header.jpg", "corrupt_image"), ("zero.jpg", "empty_file"),
                                         ("notimage.jpg", "not_an_image"), ("bomb.png", "decompression_bomb")])
def test_bad_files_get_a_reason(files: dict[str, Path], name: str, reason: str) -> None:
    with pytest.raises(ImageError) as err:
        load_image(files[name], R)
    assert err.value.reason == reason
    assert name in str(err.value)


def test_pixel_limit_is_configurable(files: dict[str, Path]) -> None:
    with pytest.raises(ImageError, match="decompression_bomb"):
        load_image(files["good.jpg"], R, max_pixels=100)
    with pytest.raises(ImageError, match="missing_file"):
        load_image(files["good.jpg"].with_name("absent.jpg"), R)


def test_to_rgb_modes() -> None:
    img = photo_like()
    for mode in ("L", "LA", "RGBA", "P", "CMYK", "I", "F", "1"):
        assert to_rgb(img.convert(mode)).mode == "RGB", mode


COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_mini" / "images"


def _photos() -> list[Path]:
    """Real 640 px COCO photos when ../shared has them (as on CI); the same test runs without."""
    return sorted(COCO_IMAGES.glob("*.jpg"))[:80] if COCO_IMAGES.is_dir() else []


@pytest.mark.parametrize("resolution", [64, 256])  # the tiny and base image tokenizers
def test_draft_decoding_stays_within_its_tolerance_of_a_full_decode(resolution: int, tmp_path: Path) -> None:
    """JPEG draft decoding (DCT-domain downscaling, image_preprocess.py step 4) is >= 30 dB PSNR
    from decoding full size, on every photo; and it really decodes smaller."""
    from PIL import Image

    from moma.tokenizers.image_preprocess import decode_rgb

    photos = _photos()
    if not photos:
        rng = np.random.default_rng(0)
        for i in range(12):  # textured photo-like pictures: gradients plus noise, as JPEG encodes photos
            img = np.asarray(photo_like((640, 426), seed=i), dtype=np.float32)
            img += rng.normal(0, 20, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=90)
        photos = sorted(tmp_path.glob("*.jpg"))
    worst = np.inf
    for path in photos:
        a = load_image(path, resolution).astype(np.float64)
        b = load_image(path, resolution, draft=False).astype(np.float64)
        mse = float(((a - b) ** 2).mean())
        worst = min(worst, 10 * np.log10(255 ** 2 / max(mse, 1e-10)))
    assert worst >= 30.0, f"draft decoding {worst:.1f} dB from the full decode at {resolution} px"
    side = min(decode_rgb(photos[0], resolution).size)
    full = min(Image.open(photos[0]).size)
    assert (side < full) == (full >= 4 * resolution)  # drafted exactly when a 1/2 scale keeps >= 2 R
