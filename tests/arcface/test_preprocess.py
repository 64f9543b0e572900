import cv2
import numpy as np
import pytest
import torch

from arcface import preprocess


def test_decode_is_rgb_and_normalisation_matches_formula():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = preprocess.decode_rgb(png.tobytes())
    np.testing.assert_array_equal(decoded, rgb)

    expected = (rgb.astype(np.float64) - 127.5) / 127.5
    chw = preprocess.normalize_numpy(decoded)
    np.testing.assert_allclose(chw, expected.transpose(2, 0, 1), atol=1e-6)
    torch_chw = preprocess.normalize(preprocess.to_chw_uint8(decoded)[None])[0]
    np.testing.assert_allclose(torch_chw.numpy(), chw, atol=1e-6)


def test_flip_is_left_right_mirror():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    flipped = preprocess.flip_horizontal(images)
    assert torch.equal(flipped[..., 0], images[..., 3])
    np.testing.assert_array_equal(preprocess.flip_horizontal_numpy(images.numpy()), flipped.numpy())


def test_decode_error_names_source():
    with pytest.raises(preprocess.ImageDecodeError, match="shard-3 key 17"):
        preprocess.decode_rgb(b"not an image", source="shard-3 key 17")
