"""Stand-in of modules/images.py (v1.10.1): `save_image` (:624-767) with the parts the extension relies on: the
file name is `forced_filename` + "." + extension in `path` (:698-699), or the next free `NNNNN-<seed><suffix>` there
(:673-697, the filename pattern reduced to the seed), the info goes into the PNG's "parameters" text (:700-702,
:565-600), on_image_saved callbacks get the params (:765), and the image is marked `already_saved_as` (:736).
Returns (path, None) as the host does without `save_txt` (:767).
"""
import os

from PIL import PngImagePlugin

from modules import script_callbacks

saved = []   # every path written, in order (for tests)


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    os.makedirs(path, exist_ok=True)
    if forced_filename is None:
        number = len([f for f in os.listdir(path) if f[:5].isdigit()])
        decoration = "" if seed is None else f"-{seed}{suffix}"
        fullfn = os.path.join(path, f"{number:05}{decoration}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    if info is not None:
        pnginfo.add_text(pnginfo_section_name, info)
    image.save(fullfn, pnginfo=pnginfo if extension == "png" else None)
    image.already_saved_as = fullfn
    saved.append(fullfn)
    script_callbacks.image_saved_callback(script_callbacks.ImageSaveParams(image, p, fullfn, {"parameters": info}))
    return fullfn, None
