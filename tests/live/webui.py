"""HTTP client helpers of the live tests (standard library for HTTP; Pillow and NumPy for the images).

`DYNFUSE_WEBUI_URL` names the running WebUI; the LoRA names come from the environment (see test_webui_http.py).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

URL = os.environ.get("DYNFUSE_WEBUI_URL", "").rstrip("/")
SUBJECT = os.environ.get("DYNFUSE_LIVE_SUBJECT", "dyn_subject")
STYLE = os.environ.get("DYNFUSE_LIVE_STYLE", "dyn_style")
ZERO = os.environ.get("DYNFUSE_LIVE_ZERO", "dyn_zero")
SDXL = os.environ.get("DYNFUSE_LIVE_SDXL", "dyn_sdxl")
BROKEN = os.environ.get("DYNFUSE_LIVE_BROKEN", "dyn_broken")
LORA_DIR = os.environ.get("DYNFUSE_LIVE_LORA_DIR", "")
CLIP_ARCH = os.environ.get("DYNFUSE_LIVE_CLIP_ARCH", "")
SCRIPT_KEY = "dynfuse"            # alwayson_scripts key; the host matches the title "DynFuse" case-insensitively
INFOTEXT_KEY = "DynFuse"
MESSAGE_KEY = "DynFuse message"
TIMEOUT = 600
MERGE_TOLERANCE = 1.0             # mean |pixel diff| (0..255) between merged-weight and low-rank LoRA application

needs_webui = pytest.mark.skipif(not URL, reason="set DYNFUSE_WEBUI_URL to the URL of a running WebUI to run these")

PROMPT = "a photo of a cat"
BASE = dict(prompt=PROMPT, negative_prompt="", seed=1234, steps=2, width=64, height=64, cfg_scale=7.0,
            sampler_name="Euler", batch_size=1, n_iter=1, send_images=True, save_images=False)


def call(method: str, path: str, body: Any = None) -> Tuple[int, Any]:
    """One request; returns (status, parsed JSON or text) and never raises for an HTTP error status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def ok(method: str, path: str, body: Any = None) -> Any:
    status, out = call(method, path, body)
    assert status == 200, f"{method} {path} answered {status}: {str(out)[:2000]}"
    return out


@dataclasses.dataclass
class Result:
    image: np.ndarray               # first image, RGB uint8
    images: List[np.ndarray]
    info: Dict[str, Any]            # the parsed `info` JSON
    png_b64: str

    @property
    def params(self) -> Dict[str, Any]:
        return self.info.get("extra_generation_params") or {}

    def messages(self) -> List[str]:
        """The extension's user-facing messages: values of DynFuse* keys of the generation parameters."""
        return [str(v) for k, v in self.params.items() if k.lower().startswith("dynfuse") and k != INFOTEXT_KEY]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB"))


def request(prompt: str = PROMPT, fuse: Optional[List[Any]] = None, **overrides) -> Dict[str, Any]:
    """The txt2img body: BASE with `overrides`, our script's args when given."""
    body = dict(BASE, prompt=prompt, **overrides)
    if fuse is not None:
        body["alwayson_scripts"] = {SCRIPT_KEY: {"args": fuse}}
    return body


def result_of(out: Dict[str, Any]) -> Result:
    images = [decode(b) for b in out["images"]]
    return Result(images[0], images, json.loads(out["info"]), out["images"][0])


def txt2img(prompt: str = PROMPT, fuse: Optional[List[Any]] = None, **overrides) -> Result:
    return result_of(ok("POST", "/sdapi/v1/txt2img", request(prompt, fuse, **overrides)))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def assert_same(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    """Bit-identical pixels, or a short message with the mean and max |diff| (0..255)."""
    if not np.array_equal(a, b):
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        raise AssertionError(f"{what + ': ' if what else ''}images differ: mean |diff| {diff.mean():.4f}, max {diff.max()}")


def named(**kw) -> List[Dict[str, Any]]:
    """The API's named form: one dict of FuseArgs fields; the hooked `dynamic` rule unless `method` is given (these
    checks were written for it; the default method, merge, is checked on its own)."""
    return [dict({"method": "dynamic"}, **kw)]


def guided_txt2img(prompt: str = PROMPT, fuse: Optional[List[Any]] = None, settings: Optional[Dict[str, Any]] = None,
                   **overrides) -> Result:
    """A request whose guidance uses DYNFUSE_LIVE_CLIP_ARCH (when set) and `settings` as override settings."""
    override = dict({"dynfuse_clip_arch": CLIP_ARCH} if CLIP_ARCH else {}, **(settings or {}))
    if override:
        overrides["override_settings"] = override
    return txt2img(prompt, fuse=fuse, **overrides)


def require_guidance(result: Result) -> None:
    off = [m for m in result.messages() if "guidance is off" in m]
    if off:
        pytest.skip(f"the host has no guidance weights: {off[0][:200]}")


def progress() -> Dict[str, Any]:
    return ok("GET", "/sdapi/v1/progress?skip_current_image=true")["state"]


def in_background(body: Dict[str, Any]) -> Tuple[threading.Thread, Dict[str, Any]]:
    """POST txt2img from a thread; the (status, answer) lands in the returned dict under "result"."""
    done: Dict[str, Any] = {}

    def run():
        done["result"] = call("POST", "/sdapi/v1/txt2img", body)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, done


def wait_for(condition: Callable[[Dict[str, Any]], bool], worker: threading.Thread, seconds: float = 180) -> bool:
    """Poll the host's progress until `condition(state)` holds (True) or the job ended or time ran out (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline and worker.is_alive():
        if condition(progress()):
            return True
        time.sleep(0.05)
    return False
