"""Reference renders cache (renders once per key, LRU) and decoding of given reference images."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib_dynfuse.guidance import ReferenceCache, ReferenceImageError, ReferenceKey, decode_image_arg, images_to_tensor


def key(**changes):
    base = dict(role="subject", model_hash="abc123", loras=(("h_subject", 1.0),), prompt="a dog", seed=7,
                width=64, height=64, sampler="Euler a", steps=20)
    base.update(changes)
    return ReferenceKey(**base)


def image(color):
    return Image.new("RGB", (8, 8), color)


def test_renders_once_per_key_then_hits():
    cache, calls = ReferenceCache(), []

    def render():
        calls.append(1)
        return [image((len(calls), 0, 0))]

    first, hit1 = cache.get_or_render(key(), render)
    second, hit2 = cache.get_or_render(key(), render)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert second[0] is first[0]
    for changed in (dict(seed=8), dict(role="style"), dict(loras=(("h_subject", 0.8),)), dict(prompt="a cat"),
                    dict(steps=10), dict(width=32), dict(sampler="DDIM"), dict(model_hash="zzz")):
        _, hit = cache.get_or_render(key(**changed), render)
        assert not hit
    assert len(calls) == 9 and cache.renders == 9 and cache.hits == 1


def test_lru_evicts_the_least_recently_used():
    cache = ReferenceCache(max_entries=2)
    cache.get_or_render(key(seed=1), lambda: [image("red")])
    cache.get_or_render(key(seed=2), lambda: [image("green")])
    cache.get_or_render(key(seed=1), lambda: pytest.fail("seed 1 is cached"))
    cache.get_or_render(key(seed=3), lambda: [image("blue")])      # evicts seed 2 (least recently used)
    assert key(seed=1) in cache and key(seed=3) in cache and key(seed=2) not in cache


def test_failed_render_stores_nothing():
    cache = ReferenceCache()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_render(key(), interrupted)
    assert len(cache) == 0
    images, hit = cache.get_or_render(key(), lambda: image("red"))   # a single image is wrapped in a list
    assert not hit and len(images) == 1


def test_bad_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        key(role="content")


def _png_b64(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_image_arg_accepts_pil_numpy_and_base64():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    for value in (im, im.convert("RGBA"), arr, arr.astype(np.float32) / 255.0, _png_b64(im),
                  "data:image/png;base64," + _png_b64(im), _png_b64(im).rstrip("=")):
        out = decode_image_arg(value)
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out), arr)
    gray = decode_image_arg(arr[..., 0])
    assert np.array_equal(np.asarray(gray)[..., 1], arr[..., 0])
    assert decode_image_arg(None) is None


@pytest.mark.parametrize("garbage, message", [
    ("not base64 at all!", "not valid base64"),
    (base64.b64encode(b"hello world").decode(), "not an image"),
    ("data:image/png;base64", "no ','"),
    (12, "cannot use a int"),
    (np.zeros((2, 2, 2, 2)), "HxW or HxWx3"),
])
def test_decode_image_arg_garbage_gives_clear_errors(garbage, message):
    with pytest.raises(ReferenceImageError, match=message):
        decode_image_arg(garbage)


def test_images_to_tensor_values():
    arr = np.array([[[255, 0, 51]]], dtype=np.uint8)
    t = images_to_tensor([Image.fromarray(arr), Image.fromarray(arr)])
    assert t.shape == (2, 3, 1, 1) and t.dtype == torch.float32
    assert torch.equal(t[0, :, 0, 0], torch.tensor([1.0, 0.0, 51 / 255.0]))
    x = torch.rand(3, 4, 4)
    assert torch.equal(images_to_tensor(x), x.unsqueeze(0))
