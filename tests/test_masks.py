"""Masks: every encoding normalises to bool, size checks name both files, tissue detection and fallbacks."""

import numpy as np
import pytest
from PIL import Image

from hf_histo.data.masks import DataError, load_mask, normalize_mask, resolve_mask, tissue_mask

TRUTH = np.zeros((20, 30), bool)
TRUTH[5:15, 8:20] = True


def _palette(truth):
    im = Image.fromarray(truth.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return im


def _rgb(truth):
    arr = np.zeros((*truth.shape, 3), np.uint8)
    arr[truth] = (0, 200, 0)  # foreground in one channel only
    return Image.fromarray(arr)


def _la(truth):
    arr = np.stack([truth.astype(np.uint8) * 255, np.full(truth.shape, 255, np.uint8)], axis=-1)
    return Image.fromarray(arr, mode="LA")


def _rgba(truth):
    arr = np.zeros((*truth.shape, 4), np.uint8)
    arr[..., 3] = 255
    arr[truth, :3] = 255
    return Image.fromarray(arr)


def _i16(truth):
    return Image.fromarray(truth.astype(np.uint16) * 65535)


def _jpeg_like(truth):
    noise = np.random.default_rng(0).integers(0, 12, truth.shape)
    return np.where(truth, 255 - noise, noise).astype(np.uint8)


ENCODINGS = {
    "bool": lambda t: t,
    "uint8_0_1": lambda t: t.astype(np.uint8),
    "uint8_0_255": lambda t: t.astype(np.uint8) * 255,
    "int64_0_1": lambda t: t.astype(np.int64),
    "float_0_1": lambda t: t.astype(np.float32),
    "pil_L_0_255": lambda t: Image.fromarray(t.astype(np.uint8) * 255),
    "pil_L_0_1": lambda t: Image.fromarray(t.astype(np.uint8)),
    "pil_1": lambda t: Image.fromarray(t.astype(np.uint8) * 255).convert("1"),
    "palette": _palette,
    "rgb": _rgb,
    "la": _la,
    "rgba": _rgba,
    "uint16": _i16,
    "jpeg_noise": _jpeg_like,
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_normalize_mask_every_encoding(encoding):
    lossy = encoding == "jpeg_noise"  # an array does not say it came from a JPEG: any non-zero is foreground
    out = normalize_mask(ENCODINGS[encoding](TRUTH), lossy=lossy)
    assert out.dtype == bool and np.array_equal(out, TRUTH)


@pytest.mark.parametrize("encoding", ["pil_L_0_255", "pil_L_0_1", "pil_1", "palette", "rgb", "la", "rgba", "uint16"])
def test_load_mask_files(tmp_path, encoding):
    im = ENCODINGS[encoding](TRUTH)
    path = tmp_path / f"mask_{encoding}.png"
    im.save(path)
    assert np.array_equal(load_mask(path, (30, 20)), TRUTH)


def test_normalize_mask_rejects_bad_shapes():
    with pytest.raises(DataError, match="2-D"):
        normalize_mask(np.zeros((2, 3, 4, 5)))


def test_size_mismatch_names_both_files_and_resize_option(tmp_path):
    path = tmp_path / "mask_0003.png"
    Image.fromarray(TRUTH.astype(np.uint8) * 255).save(path)
    with pytest.raises(
        DataError, match=r"mask_0003\.png: mask size 30x20 differs from image .*img_0003\.png size 60x40"
    ):
        load_mask(path, (60, 40), image_path=tmp_path / "img_0003.png")
    resized = load_mask(path, (60, 40), resize=True)
    assert resized.shape == (40, 60) and np.array_equal(resized[::2, ::2], TRUTH)
    image = Image.new("RGB", (60, 40))
    with pytest.raises(DataError, match="differs"):
        resolve_mask(image, path)
    assert resolve_mask(image, path, resize=True)[0].shape == (40, 60)


def test_unreadable_mask_is_a_data_error(tmp_path):
    path = tmp_path / "mask_bad.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DataError, match="mask_bad.png: the mask file cannot be read"):
        load_mask(path)


def pink_blob_on_white(size=(400, 300)):
    """An H&E-like pink disc (with some darker 'nuclei') on white glass, plus a tiny speck of dust."""
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - w * 0.45) ** 2 + (yy - h * 0.5) ** 2 < (min(w, h) * 0.3) ** 2
    arr = np.full((h, w, 3), (247, 246, 248), np.uint8)
    rng = np.random.default_rng(0)
    arr[disc] = (225, 140, 190) + rng.integers(-12, 12, (disc.sum(), 3))
    nuclei = disc & (rng.random((h, w)) < 0.05)
    arr[nuclei] = (120, 60, 140)
    arr[5:8, 5:8] = (200, 120, 170)  # 9 px of dust: removed as a small object
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), disc


def test_tissue_mask_finds_the_blob():
    image, disc = pink_blob_on_white()
    found = tissue_mask(image)
    iou = (found & disc).sum() / (found | disc).sum()
    assert iou > 0.95
    assert not found[:20, :20].any()  # dust and glass are background
    assert not tissue_mask(Image.new("RGB", (200, 100), (250, 250, 250))).any()  # blank slide stays empty


def test_tissue_mask_on_large_image_scales_back():
    image, disc = pink_blob_on_white((2400, 1200))
    found = tissue_mask(image, detection_width=512)
    assert found.shape == disc.shape
    assert (found & disc).sum() / (found | disc).sum() > 0.9


def test_resolve_mask_sources():
    image, disc = pink_blob_on_white()
    mask, source = resolve_mask(image, None)
    assert source == "tissue" and mask.any()
    empty = np.zeros((300, 400), bool)
    mask, source = resolve_mask(image, empty)
    assert source == "empty_mask_tissue" and mask.any()
    mask, source = resolve_mask(image, empty, empty_fallback="whole")
    assert source == "empty_mask_whole" and mask.all()
    blank = Image.new("RGB", (40, 30), (255, 255, 255))
    mask, source = resolve_mask(blank, None)
    assert source == "whole" and mask.all()
    given = np.zeros((300, 400), bool)
    given[10:20, 10:20] = True
    mask, source = resolve_mask(image, Image.fromarray(given.astype(np.uint8) * 255))
    assert source == "mask" and np.array_equal(mask, given)
    with pytest.raises(ValueError, match="empty_fallback"):
        resolve_mask(image, None, empty_fallback="nothing")
