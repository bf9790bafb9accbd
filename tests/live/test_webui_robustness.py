"""Opt-in live tests of a WebUI under load and misuse: concurrent jobs, interrupt and skip, many jobs in a row,
LoRA files that change on disk, and the messages of bad input (skipped unless DYNFUSE_WEBUI_URL is set).

Besides the names of test_webui_http.py they read DYNFUSE_LIVE_LORA_DIR: the host's Lora folder, writable; the
file tests put a LoRA of their own there (`dyn_live_swap`, copied from the subject and zero LoRAs), change or
delete it, and remove it at the end; without it they skip. They need the builtin's `/sdapi/v1/refresh-loras`.
Images are 64x64 with few steps; a job that must last long enough to be interrupted gets many steps.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, List

import pytest

from tests.live.webui import (INFOTEXT_KEY, LORA_DIR, MESSAGE_KEY, PROMPT, SDXL, STYLE, SUBJECT, ZERO, Result,
                              assert_same, call, guided_txt2img, in_background, named, needs_webui, ok,
                              request, require_guidance, result_of, txt2img, wait_for)

pytestmark = needs_webui

REFERENCES_KEY = "DynFuse references"
GUIDED = dict(enabled=True, subject=SUBJECT, style=STYLE, guidance=True, reference_steps=1)
SWAP = "dyn_live_swap"


@pytest.fixture(scope="module")
def plain() -> Result:
    return txt2img()


@pytest.fixture(scope="module")
def fused() -> Result:
    return txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="dynamic"))


def diagnostics() -> Dict[str, Any]:
    """The extension's counts of what outlives a job (hooks, runs, sessions, caches, patch sets) after a gc."""
    info = ok("GET", "/dynfuse/v1/info?diagnostics=true")
    assert "diagnostics" in info, "the info route reports no diagnostics"
    return info["diagnostics"]


# ----------------------------------------------------------------------------- concurrency
CONCURRENT = [
    ("plain", dict(seed=1234)),
    ("fused", dict(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method="klora"))),
    ("plain", dict(seed=77)),
    ("fused", dict(prompt=f"{PROMPT} <dynlora:{SUBJECT}:{STYLE}:method=merge:ws=0.5>")),
    ("plain", dict(prompt=f"{PROMPT} <lora:{SUBJECT}:1>")),
    ("fused", dict(fuse=named(enabled=True, subject=SUBJECT, style=ZERO, subject_weight=0.7))),
    ("plain", dict(seed=5, steps=3)),
    ("fused", dict(fuse=named(enabled=True, subject=STYLE, style=SUBJECT, method="dynamic", criterion="js"))),
]


def body_of(overrides: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(overrides)
    return request(kw.pop("prompt", PROMPT), kw.pop("fuse", None), **kw)


def test_eight_concurrent_jobs_keep_their_own_settings():
    """8 jobs at once, fused and plain mixed (the WebUI queues them): each image and infotext is the one the
    same request gives alone; no plain job carries a DynFuse entry."""
    alone = [result_of(ok("POST", "/sdapi/v1/txt2img", body_of(o))) for _, o in CONCURRENT]
    answers: List[Any] = [None] * len(CONCURRENT)

    def send(i: int) -> None:
        answers[i] = call("POST", "/sdapi/v1/txt2img", body_of(CONCURRENT[i][1]))

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i, ((kind, _), got, solo) in enumerate(zip(CONCURRENT, answers, alone)):
        assert got is not None and got[0] == 200, f"job {i}: {str(got)[:1000]}"
        result = result_of(got[1])
        assert_same(result.image, solo.image, f"job {i} ({kind}) vs the same request alone")
        assert result.params.get(INFOTEXT_KEY) == solo.params.get(INFOTEXT_KEY), f"job {i}"
        assert result.messages() == solo.messages() == [], f"job {i}: {result.params}"
        if kind == "plain":
            assert not any(k.startswith("DynFuse") for k in result.params), f"job {i}: {result.params}"
        else:
            assert INFOTEXT_KEY in result.params, f"job {i}: {result.params}"


# ----------------------------------------------------------------------------- interrupt and skip
def cut_short(body: Dict[str, Any], action: str, reached, what: str) -> Dict[str, Any]:
    """Send `body` from a thread, `action` (interrupt / skip) once the progress satisfies `reached`; the answer."""
    worker, done = in_background(body)
    assert wait_for(reached, worker), f"{what} never reached step 2"
    ok("POST", f"/sdapi/v1/{action}")
    worker.join(timeout=600)
    status, out = done["result"]
    assert status == 200, str(out)[:2000]
    return out


def assert_plain_and_fused_unchanged(plain: Result, fused: Result, action: str) -> None:
    assert_same(txt2img().image, plain.image, f"plain after {action}")
    assert_same(txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE)).image, fused.image,
                f"fused after {action}")


def main_step(steps: int):
    return lambda s: s.get("sampling_steps") == steps and s.get("sampling_step", 0) >= 2


@pytest.mark.parametrize("action", ["interrupt", "skip"])
def test_interrupt_or_skip_during_a_fused_job(action, plain, fused):
    cut_short(request(fuse=named(enabled=True, subject=SUBJECT, style=STYLE), steps=150), action, main_step(150),
              "the long fused job")
    assert_plain_and_fused_unchanged(plain, fused, action)


@pytest.mark.parametrize("action", ["interrupt", "skip"])
def test_interrupt_or_skip_during_a_guided_job(action, plain, fused):
    """During the main sampling of a guided job (references from the cache): the next plain, fused and guided
    jobs are what they were before."""
    seed = 4300 + (action == "skip")
    guided = guided_txt2img(fuse=named(**GUIDED), seed=seed)
    require_guidance(guided)
    cut_short(request(fuse=named(**GUIDED), seed=seed, steps=150), action, main_step(150), "the long guided job")
    assert_plain_and_fused_unchanged(plain, fused, action)
    again = guided_txt2img(fuse=named(**GUIDED), seed=seed)
    assert_same(again.image, guided.image, f"guided after {action}")


def test_skip_during_a_reference_render(plain):
    """A reference render cut short is never cached (the cache stores no render); the job says so and makes its
    image without guidance; the next guided job renders and guides as usual. (Interrupt stops the whole job: the
    stand-in tests cover its reference render.)"""
    action, seed = "skip", 4401
    stored = diagnostics()["reference_cache"]["renders"]
    out = cut_short(request(fuse=named(**dict(GUIDED, reference_steps=150)), seed=seed), action, main_step(150),
                    "the reference render")
    cut = result_of(out)     # the main image is still made, without guidance, and says why
    require_guidance(cut)
    assert "DynFuse guidance" not in cut.params, cut.params
    assert "interrupted" in cut.params.get(MESSAGE_KEY, ""), cut.params
    assert diagnostics()["reference_cache"]["renders"] == stored, "a cut-short reference render was cached"
    assert_same(txt2img().image, plain.image, f"plain after {action}")
    again = guided_txt2img(fuse=named(**dict(GUIDED, reference_steps=2)), seed=seed)
    require_guidance(again)
    assert again.params.get(REFERENCES_KEY) == "subject rendered; style rendered", again.params
    assert "DynFuse guidance" in again.params and MESSAGE_KEY not in again.params, again.params


# ----------------------------------------------------------------------------- many jobs
def test_fifty_fused_jobs_in_a_row_leave_nothing_growing(plain):
    """Hooks, live runs and sessions, patch sets and the caches stay bounded over 50 fused jobs (5 guided ones with
    10 new references among them, more than the reference cache holds), and the server's memory does not trend up."""
    methods = ("dynamic", "klora", "merge")
    sizes = []
    guided_any = False
    for i in range(50):
        if i % 10 == 9:
            r = guided_txt2img(fuse=named(**GUIDED), seed=5000 + i, steps=1)
            guided_any = guided_any or "guidance is off" not in r.params.get(MESSAGE_KEY, "")
        else:
            r = txt2img(fuse=named(enabled=True, subject=SUBJECT, style=STYLE, method=methods[i % 3],
                                   heatmap=(i % 7 == 0)), steps=1)
        assert INFOTEXT_KEY in r.params, f"job {i}: {r.params}"
        if i % 10 == 8:
            sizes.append(diagnostics()["rss_bytes"])
    last = diagnostics()
    assert last["hooks"] == 0 and last["sessions_open"] == 0, last
    assert last["runs_alive"] <= 1 and last["sessions_alive"] <= 2, last
    assert last["patch_sets"] <= 4 and last["unet_wrappers"] <= 2, last   # the last job's own (Forge)
    assert last.get("patch_sets_kept", 0) == 0, last                      # none left in what Forge keeps
    for cache in ("reference_cache", "klora_cache", "lora_file_cache"):
        assert last[cache]["entries"] <= last[cache]["bound"], (cache, last)
    if guided_any:
        assert last["reference_cache"]["entries"] == last["reference_cache"]["bound"], last
    # a leak grows in every interval; the allocator steps now and then while guided jobs come and go and the
    # caches fill (seen: SDXL 6489 -> 6966 MiB in one interval, SD1.5 +64 MiB in one, flat to the MiB between),
    # so the steadiest of the last three 10-job intervals must stay flat
    mib = [round(x / 2 ** 20) for x in sizes]
    steady = min(b - a for a, b in zip(sizes[1:], sizes[2:])) / 2 ** 20
    assert steady < 32, f"RSS grew by {steady:.1f} MiB or more in every 10 jobs ({mib} MiB after jobs 8, 18, ..., 48)"
    assert (max(sizes) - sizes[0]) / 2 ** 20 < 1024, f"RSS grew by more than 1 GiB over 50 fused jobs ({mib} MiB)"
    assert_same(txt2img().image, plain.image, "plain after 50 fused jobs")


# ----------------------------------------------------------------------------- LoRA files changing on disk
@pytest.fixture()
def swap_file():
    """A LoRA of this test's own in the host's Lora folder (a copy of the subject LoRA), removed afterwards."""
    if not LORA_DIR:
        pytest.skip("set DYNFUSE_LIVE_LORA_DIR to the host's (writable) Lora folder")
    path = os.path.join(LORA_DIR, SWAP + ".safetensors")
    put(os.path.join(LORA_DIR, SUBJECT + ".safetensors"), path)
    ok("POST", "/sdapi/v1/refresh-loras")
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)
        ok("POST", "/sdapi/v1/refresh-loras")


def put(source: str, path: str) -> None:
    """Replace `path` with a copy of `source` in one rename (a new inode, new mtime), as a user's save would."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


@pytest.mark.parametrize("method", ["klora", "merge"])
def test_a_replaced_lora_file_is_read_again(swap_file, method):
    """The same name, another file (no refresh of the list): the second job uses the new file's weights."""
    fields = dict(enabled=True, style=STYLE, method=method)
    as_subject = txt2img(fuse=named(subject=SUBJECT, **fields))
    as_zero = txt2img(fuse=named(subject=ZERO, **fields))
    before = txt2img(fuse=named(subject=SWAP, **fields))
    assert_same(before.image, as_subject.image, "the copy of the subject LoRA")
    time.sleep(0.01)
    put(os.path.join(LORA_DIR, ZERO + ".safetensors"), swap_file)
    after = txt2img(fuse=named(subject=SWAP, **fields))
    assert after.messages() == [], after.params
    assert_same(after.image, as_zero.image, "the replaced file")
    assert after.params[INFOTEXT_KEY] != before.params[INFOTEXT_KEY], "the infotext still names the old file's hash"


def test_a_deleted_lora_file_gives_the_plain_image_and_says_so(swap_file, plain):
    assert INFOTEXT_KEY in txt2img(f"{PROMPT} <dynlora:{SWAP}:{STYLE}>").params
    os.remove(swap_file)
    gone = txt2img(f"{PROMPT} <dynlora:{SWAP}:{STYLE}>")
    assert_same(gone.image, plain.image, "a deleted LoRA")
    message = gone.params.get(MESSAGE_KEY, "")
    assert SWAP in message and "no longer" in message, gone.params


# ----------------------------------------------------------------------------- messages
def test_a_lora_for_another_base_model_is_named_with_both_bases(plain):
    """The base check comes before any layer is read, in both hosts, and the message names the LoRA."""
    result = txt2img(f"{PROMPT} <dynlora:{SUBJECT}:{SDXL}>")
    assert_same(result.image, plain.image)
    message = result.params.get(MESSAGE_KEY, "")
    assert f"LoRA {SDXL!r} is for " in message and "but the loaded model is" in message, result.params


def test_missing_guidance_weights_are_all_named_at_once():
    """Neither encoder has weights: one message names both, so the user need not run again to find the second."""
    result = txt2img(fuse=named(**GUIDED), seed=4246,
                     override_settings={"dynfuse_clip_arch": "RN50", "dynfuse_dino_kind": "dinov2-base"})
    message = result.params.get(MESSAGE_KEY, "")
    assert "RN50" in message and "dinov2-base" in message, message
    assert result.messages() and "DynFuse guidance" not in result.params


def test_dino_weights_in_a_torch_pickle_get_a_clear_message():
    """A `.bin` of tensors saved by the torch of the day: AUTOMATIC1111's safe unpickler refuses it (its torch.load
    returns None), which the message says, with .safetensors as the way out; Forge reads it."""
    torch = pytest.importorskip("torch")
    folder = tempfile.mkdtemp(prefix="dynfuse-live-dino-")
    try:
        path = os.path.join(folder, "pytorch_model.bin")
        torch.save({"embeddings.cls_token": torch.zeros(1, 1, 384)}, path)
        result = guided_txt2img(fuse=named(**GUIDED), seed=4247, settings={"dynfuse_dino_weights": path})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    message = result.params.get(MESSAGE_KEY, "")
    assert path in message and "DynFuse guidance" not in result.params, result.params
    assert "does not hold a state dict of tensors" not in message, message
    if "refused" in message:
        assert ".safetensors" in message, message
    else:
        assert "does not fit" in message, message


def test_the_infotext_says_where_the_references_came_from():
    first = guided_txt2img(fuse=named(**GUIDED), seed=int(time.time()) % 100000 + 10000)
    require_guidance(first)
    assert first.params.get(REFERENCES_KEY) == "subject rendered; style rendered", first.params
    again = guided_txt2img(fuse=named(**GUIDED), seed=first.info["seed"])
    assert again.params.get(REFERENCES_KEY) == "subject cached; style cached", again.params
    assert f"{REFERENCES_KEY}: subject cached" in again.info["infotexts"][0]
    assert_same(again.image, first.image)
    given = txt2img(fuse=named(**dict(GUIDED, subject_image=first.png_b64, style_image=first.png_b64)), seed=9)
    assert given.params.get(REFERENCES_KEY) == "subject given; style given", given.params

