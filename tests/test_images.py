"""The one decode (`hf_histo.data.images`): every file, PIL image and array kind -> the same 8-bit RGB pixels."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_histo.data import cutting
from hf_histo.data.images import DataError, array_to_rgb, load_image, load_rgb, open_image, to_uint8
from hf_histo.inference import engine

H, W = 6, 10
RAMP = (np.arange(H * W, dtype=np.int64).reshape(H, W) * 4 + 3) % 256  # 8-bit values 3 .. 239, 0 and 255 absent
RGB = np.stack([RAMP, 255 - RAMP, (RAMP * 7) % 256], axis=-1).astype(np.uint8)
GRAY = np.repeat(RAMP.astype(np.uint8)[..., None], 3, axis=-1)  # what a grayscale image becomes
WHITE = np.full_like(RGB, 255)
TRANSPARENT = (RAMP % 3) == 0  # pixels with alpha 0 in the RGBA cases
SEE_THROUGH = np.where(TRANSPARENT[..., None], WHITE, RGB)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha blending over white, by hand (PIL rounds half away, hence atol=1 where alpha is partial)."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


# ---- files: each row writes one file and gives the pixels every decode path must return --------------------------------
def _rgb_png(path: Path) -> np.ndarray:
    Image.fromarray(RGB).save(path)
    return RGB


def _rgba_opaque_png(path: Path) -> np.ndarray:
    Image.fromarray(np.dstack([RGB, np.full((H, W), 255, np.uint8)])).save(path)
    return RGB


def _rgba_transparent_png(path: Path) -> np.ndarray:
    alpha = np.where(TRANSPARENT, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([RGB, alpha])).save(path)
    return SEE_THROUGH  # see-through pixels show the white slide


def _rgba_partial_png(path: Path) -> np.ndarray:
    alpha = ((RAMP * 3) % 256).astype(np.uint8)
    Image.fromarray(np.dstack([RGB, alpha])).save(path)
    return _composite(RGB, alpha)


def _palette(transparent: bool) -> Callable[[Path], np.ndarray]:
    colours = np.array([[200, 90, 170], [120, 40, 150], [250, 240, 245], [10, 20, 30]], dtype=np.uint8)
    index = (RAMP % 4).astype(np.uint8)

    def write(path: Path) -> np.ndarray:
        image = Image.fromarray(index, mode="P")
        image.putpalette(colours.flatten().tolist())
        if transparent:
            image.info["transparency"] = 3  # colour 3 is see-through
            image.save(path, transparency=3)
            return np.where((index == 3)[..., None], WHITE, colours[index])
        image.save(path)
        return colours[index]

    return write


def _gray_png(path: Path) -> np.ndarray:
    Image.fromarray(RAMP.astype(np.uint8), mode="L").save(path)
    return GRAY


def _gray_alpha_png(path: Path) -> np.ndarray:
    alpha = np.where(TRANSPARENT, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([RAMP.astype(np.uint8), alpha]), mode="LA").save(path)
    return np.where(TRANSPARENT[..., None], WHITE, GRAY)


def _gray16_png(scale: int) -> Callable[[Path], np.ndarray]:
    def write(path: Path) -> np.ndarray:
        Image.fromarray((RAMP * scale).astype(np.uint16)).save(path)
        with Image.open(path) as im:
            assert im.mode in ("I;16", "I"), im.mode  # a real 16-bit file
        return GRAY

    return write


def _float_tiff(path: Path) -> np.ndarray:
    Image.fromarray((RAMP / 255.0).astype(np.float32), mode="F").save(path)
    return GRAY


def _cmyk_jpeg(path: Path) -> None:
    Image.fromarray(RGB).convert("CMYK").save(path, quality=95)
    return None  # lossy: only the paths' agreement is checked


# An array carries no mode: palette indices, CMYK and gray + alpha arrays are not the file's colours.
ARRAY_IS_ANOTHER_IMAGE = ("P", "CMYK", "LA")
FILES = [
    ("rgb.png", _rgb_png),
    ("rgba_opaque.png", _rgba_opaque_png),
    ("rgba_transparent.png", _rgba_transparent_png),
    ("rgba_partial.png", _rgba_partial_png),
    ("palette.png", _palette(transparent=False)),
    ("palette_transparent.png", _palette(transparent=True)),
    ("gray.png", _gray_png),
    ("gray_alpha.png", _gray_alpha_png),
    ("gray16_full_range.png", _gray16_png(257)),  # v * 257: the 16-bit range
    ("gray16_8bit_values.png", _gray16_png(1)),  # a 16-bit file holding 8-bit values
    ("float.tiff", _float_tiff),
    ("cmyk.jpg", _cmyk_jpeg),
]


@pytest.mark.parametrize(("name", "write"), FILES, ids=[name for name, _ in FILES])
def test_every_decode_path_gives_the_same_rgb_pixels(tmp_path, name, write):
    path = tmp_path / name
    expected = write(path)
    from_builder = load_image(path)  # what the dataset builder trains on
    assert from_builder.mode == "RGB" and from_builder.size == (W, H)
    pixels = np.asarray(from_builder)
    if expected is not None:
        np.testing.assert_allclose(pixels, expected, atol=1 if name == "rgba_partial.png" else 0)
    with Image.open(path) as pil:
        pil.load()
        other_paths = {"path": load_rgb(path), "str": load_rgb(str(path)), "pil": load_rgb(pil)}
        if pil.mode not in ARRAY_IS_ANOTHER_IMAGE:
            other_paths["array"] = load_rgb(np.asarray(pil))
    for how, image in other_paths.items():
        assert image.mode == "RGB", how
        np.testing.assert_array_equal(np.asarray(image), pixels, err_msg=how)


def test_the_builder_and_the_engine_share_the_decode():
    assert cutting.load_image is load_image  # the builder cuts its patches through `cutting`
    assert engine.load_rgb is load_rgb


# ---- arrays and tensors ---------------------------------------------------------------------------------------------------
def _with_max(values: np.ndarray, top: float) -> np.ndarray:
    values = values.copy()
    values[0, 0] = top
    return values


UNIT = RGB / 255.0
ARRAYS = [
    ("uint8 HWC", RGB, RGB),
    ("uint8 HW", RAMP.astype(np.uint8), GRAY),
    ("uint8 HW1", RAMP.astype(np.uint8)[..., None], GRAY),
    ("bool HW", RAMP > 100, np.repeat(np.where(RAMP > 100, 255, 0).astype(np.uint8)[..., None], 3, -1)),
    ("float32 [0, 1]", UNIT.astype(np.float32), RGB),
    ("float64 [0, 1]", UNIT, RGB),
    ("float32 at 1.0001 is clipped", _with_max(UNIT, 1.0001).astype(np.float32), _with_max(RGB, 255)),
    ("float 0-255", RGB.astype(np.float32), RGB),
    ("uint16 RGB v*257", RGB.astype(np.uint16) * 257, RGB),
    ("uint16 RGB 8-bit values", RGB.astype(np.uint16), RGB),
    ("int32 RGB 8-bit values", RGB.astype(np.int32), RGB),
    ("uint8 CHW", np.moveaxis(RGB, -1, 0), RGB),
    ("float CHW", np.moveaxis(UNIT, -1, 0).astype(np.float32), RGB),
    ("uint8 1HW", RAMP.astype(np.uint8)[None], GRAY),
    ("uint8 RGBA opaque", np.dstack([RGB, np.full((H, W), 255, np.uint8)]), RGB),
    ("uint8 RGBA transparent", np.dstack([RGB, np.where(TRANSPARENT, 0, 255).astype(np.uint8)]), SEE_THROUGH),
    ("tensor float CHW", torch.from_numpy(np.moveaxis(UNIT, -1, 0).astype(np.float32)), RGB),
    ("tensor uint8 HWC", torch.from_numpy(RGB.copy()), RGB),
    ("tensor uint8 CHW", torch.from_numpy(np.moveaxis(RGB, -1, 0).copy()), RGB),
]


@pytest.mark.parametrize(("array", "expected"), [row[1:] for row in ARRAYS], ids=[row[0] for row in ARRAYS])
def test_arrays_and_tensors_decode_to_rgb(array, expected):
    for image in (load_rgb(array), array_to_rgb(array)):
        assert image.mode == "RGB" and image.size == (W, H)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_float_scale_is_chosen_by_the_largest_value():
    # The largest value, not the dtype, decides: up to 2 it is [0, 1] (clipped), above it 0-255.
    assert to_uint8(np.array([[0.0, 0.5, 2.0]])).tolist() == [[0, 128, 255]]
    assert to_uint8(np.array([[0.0, 0.5, 2.5]])).tolist() == [[0, 0, 2]]
    assert to_uint8(np.array([[-0.2, 300.0]])).tolist() == [[0, 255]]  # clipped both ways
    assert to_uint8(np.array([[0, 256, 65535]], dtype=np.uint16)).tolist() == [[0, 1, 255]]  # round(v / 257)
    assert to_uint8(np.array([[70000]], dtype=np.int64)).tolist() == [[255]]


BAD_ARRAYS = [
    ("NaN", _with_max(UNIT, np.nan).astype(np.float32), "NaN or infinite"),
    ("inf", _with_max(UNIT, np.inf), "NaN or infinite"),
    ("two channels", np.zeros((H, W, 2), np.uint8), r"got shape \(6, 10, 2\)"),
    ("five channels", np.zeros((H, W, 5), np.uint8), r"got shape \(6, 10, 5\)"),
    ("2 x H x W", np.zeros((2, H, W), np.uint8), r"got shape \(2, 6, 10\)"),
    ("one row of pixels", np.zeros(W, np.uint8), r"got shape \(10,\)"),
    ("a batch", np.zeros((1, H, W, 3), np.uint8), r"got shape \(1, 6, 10, 3\)"),
    ("complex", np.zeros((H, W), np.complex64), "not numbers"),
    ("strings", np.full((H, W), "a"), "not numbers"),
]


@pytest.mark.parametrize(("array", "message"), [row[1:] for row in BAD_ARRAYS], ids=[row[0] for row in BAD_ARRAYS])
def test_bad_arrays_raise_data_errors(array, message):
    with pytest.raises(DataError, match=rf"^image: .*{message}"):
        load_rgb(array)
    with pytest.raises(DataError, match=rf"^slide_7: .*{message}"):
        array_to_rgb(array, "slide_7")


def test_a_file_with_nan_names_the_file(tmp_path):
    path = tmp_path / "broken.tiff"
    Image.fromarray(_with_max(UNIT[..., 0], np.nan).astype(np.float32), mode="F").save(path)
    for decode in (load_image, load_rgb):
        with pytest.raises(DataError, match=r"broken\.tiff: the image holds NaN"):
            decode(path)
    assert open_image(path).mode == "F"  # opening is fine: the decode refuses


def test_other_inputs_are_refused():
    with pytest.raises(TypeError, match="unsupported image input of type list"):
        load_rgb([[0, 1], [2, 3]])
    with pytest.raises(DataError, match="file not found"):
        load_rgb("no/such/image.png")
