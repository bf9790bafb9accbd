"""DynFuse for the Stable Diffusion WebUI: the Script class and callback registration only.

Everything else is in lib_dynfuse (engine) and lib_dynfuse/hosts (the WebUI adapters).
"""
import os
import sys

from modules import script_callbacks, scripts

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)   # after everything else: only `lib_dynfuse` is looked up here, nothing is shadowed

from lib_dynfuse import __version__  # noqa: E402
from lib_dynfuse.hosts import adapter, common, ui as dynfuse_ui  # noqa: E402
from lib_dynfuse.hosts.diagnostics import counts as diagnostic_counts  # noqa: E402
from lib_dynfuse.hosts import guidance_run  # noqa: E402  (latent refinement, issue 4)
from lib_dynfuse.hosts import score_run  # noqa: E402  (CLIP score, Style Sim, DINO score)
from lib_dynfuse.hosts import xyz  # noqa: E402  (X/Y/Z plot axes)

HOST = adapter()


class Script(scripts.Script):
    def title(self):
        return "DynFuse"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr
        from modules.ui_components import InputAccordion
        from modules import shared
        tab = "img2img" if is_img2img else "txt2img"
        method = dynfuse_ui.saved_value(getattr(shared.cmd_opts, "ui_config_file", None),
                                        os.path.basename(getattr(self, "filename", None) or __file__), tab, "method")
        controls = dynfuse_ui.build(gr, InputAccordion, tab, HOST.lora_names, HOST.refresh_loras,
                                    tooltip_kw=getattr(HOST, "gradio_tooltips", False), method=method)
        self.infotext_fields = dynfuse_ui.infotext_fields(controls)
        self.paste_field_names = list(dynfuse_ui.PASTE_FIELD_NAMES)
        return controls

    def process(self, p, *args):
        common.begin(HOST, p, args)
        guidance_run.begin(HOST, p)   # references + refiner, before the host's no_grad / inference_mode block

    def process_before_every_sampling(self, p, *args, **kwargs):
        hook = getattr(HOST, "before_every_sampling", None)
        if hook is not None:
            hook(p, **kwargs)
        guidance_run.before_every_sampling(HOST, p)   # correction hooks on this pass's CFG denoiser

    def postprocess_image_after_composite(self, p, pp, *args):
        score_run.score_image(HOST, p, pp)   # before the host writes this image's infotext

    def postprocess(self, p, processed, *args):
        guidance_run.finish(HOST, p, processed)
        common.finish(HOST, p, processed)


def _register_extra_network():
    from modules import extra_networks

    class ExtraNetworkDynLora(extra_networks.ExtraNetwork):
        """`<dynlora:subject:style[:key=value...]>` (activate gets the items split at ':', extra_networks.py:31-45)."""

        def __init__(self):
            super().__init__(common.TAG_NAME)

        def activate(self, p, params_list):
            common.activate_tag(HOST, p, [(x.positional, x.named) for x in params_list])

        def deactivate(self, p):
            pass

    extra_networks.register_extra_network(ExtraNetworkDynLora())


def _score_route(body: dict):
    """POST /dynfuse/v1/score: {"images", "subject_refs", "style_refs"} (base64) -> the scores or {"error"}."""
    from fastapi.responses import JSONResponse
    status, payload = score_run.api_score(HOST, body)
    return JSONResponse(payload, status_code=status)


def _info_route(diagnostics: bool = False):
    """GET /dynfuse/v1/info[?diagnostics=true]: version, fields, LoRAs; with the counts of what outlives a job."""
    body = common.info(HOST, __version__)
    if diagnostics:
        body["diagnostics"] = diagnostic_counts(HOST)
    return body


def _add_routes(demo, app):
    app.add_api_route("/dynfuse/v1/info", _info_route, methods=["GET"])
    app.add_api_route("/dynfuse/v1/score", _score_route, methods=["POST"])


# extra_networks.initialize() clears the registry after scripts load: register before the UI (real-host-facts.md)
script_callbacks.on_before_ui(_register_extra_network)
script_callbacks.on_app_started(_add_routes)
# the guidance settings (shared.opts): --nowebui never runs on_ui_settings (webui.py api_only), so they are also
# added before the UI, which both modes run; without that the API's options and override_settings do not know them
script_callbacks.on_before_ui(guidance_run.on_ui_settings)
if hasattr(script_callbacks, "on_ui_settings"):
    script_callbacks.on_ui_settings(guidance_run.on_ui_settings)
# X/Y/Z plot axes: now (the plot is loaded before extensions; with --nowebui the API builds its UI before
# on_before_ui) and again before the UI, for a plot loaded after us (hosts/xyz.py)
xyz.register_axes_safely()
script_callbacks.on_before_ui(xyz.register_axes_safely)
if hasattr(HOST, "on_cfg_denoiser"):
    script_callbacks.on_cfg_denoiser(HOST.on_cfg_denoiser)
