"""Stand-in of modules/scripts.py (v1.10.1): the Script base (:52-348) and the parts of ScriptRunner (:542-1025)
that run always-on scripts: each hook gets `p.script_args[args_from:args_to]` positionally; exceptions in hooks
are reported, not raised (:820-996). PostprocessImageArgs (:32-34) carries one image through
postprocess_image_after_composite (:273-280, runner :924-930). `scripts_data` (:379, one ScriptClassData per
Script class of every loaded script file, :381, :503) and the two runners (:1028-1029; their `scripts` list,
:544, holds every Script instance) are what other extensions look the X/Y/Z plot up in.
"""
import traceback
from collections import namedtuple

scripts_data = []
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_txt2img = None
scripts_img2img = None

AlwaysVisible = object()


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Script:
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_image_after_composite(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    def __init__(self, scripts):
        self.alwayson_scripts = list(scripts)
        self.scripts = list(scripts)
        self.errors = []

    def _each(self, name, p, *extra, **kwargs):
        for s in self.alwayson_scripts:
            try:
                getattr(s, name)(p, *extra, *p.script_args[s.args_from:s.args_to], **kwargs)
            except Exception:
                self.errors.append(traceback.format_exc())

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_image_after_composite(self, p, pp):
        self._each("postprocess_image_after_composite", p, pp)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
