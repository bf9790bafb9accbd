"""Stand-in of modules/script_callbacks.py (v1.10.1): the registrars the extension uses and the Params classes.

Signatures: ImageSaveParams :18-30, CFGDenoiserParams :45-69, on_app_started :456, on_cfg_denoiser :523, on_before_ui :588,
on_infotext_pasted :572. Like the host (:330-351), an exception in a callback is reported, not raised.
"""
import traceback

callbacks = {"app_started": [], "cfg_denoiser": [], "before_ui": [], "infotext_pasted": [], "image_saved": []}
errors = []


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def _run(kind, *args):
    for cb in callbacks[kind]:
        try:
            cb(*args)
        except Exception:
            errors.append(traceback.format_exc())


def on_app_started(callback, *, name=None):
    callbacks["app_started"].append(callback)


def on_cfg_denoiser(callback, *, name=None):
    callbacks["cfg_denoiser"].append(callback)


def on_before_ui(callback, *, name=None):
    callbacks["before_ui"].append(callback)


def on_infotext_pasted(callback, *, name=None):
    callbacks["infotext_pasted"].append(callback)


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def before_ui_callback():
    _run("before_ui")


def on_image_saved(callback, *, name=None):
    callbacks["image_saved"].append(callback)


def image_saved_callback(params):
    _run("image_saved", params)
