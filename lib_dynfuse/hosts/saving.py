"""An extra image of a generation (the selection heat-map) saved beside the generation's first saved image.

Both WebUIs save through `modules.images.save_image(image, path, basename, ..., info=, p=, forced_filename=,
save_to_dirs=)` (AUTOMATIC1111 images.py:624, Forge images.py:627) and mark each PIL image they saved with its
path, `image.already_saved_as` (images.py:736 / :748). A generation's own images are saved before the scripts'
`postprocess` runs (processing.py:1085), so there the first saved image of `Processed.images` (from
`index_of_first_image`: a grid comes first) names the folder, the file name and the format to follow. Nothing is
saved when the host saved none (saving off, or `save_images: false` over the API). Going through `save_image`
keeps the host's options (PNG info, `.txt` beside, replace action) and its `on_image_saved` callbacks.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

log = logging.getLogger("dynfuse")


def first_saved(processed: Any) -> Optional[str]:
    """The path of the first image of this generation the host saved, or None."""
    images = list(getattr(processed, "images", None) or [])
    start = int(getattr(processed, "index_of_first_image", 0) or 0)
    for image in images[start:]:
        path = getattr(image, "already_saved_as", None)
        if path:
            return str(path)
    return None


def save_beside(p: Any, processed: Any, image: Any, suffix: str, infotext: str) -> Optional[str]:
    """Save `image` as `<first saved image's name><suffix>` in its folder and format; returns the path or None."""
    path = first_saved(processed)
    if path is None:
        return None
    from modules import images   # the host's own saving path
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    try:
        saved, _ = images.save_image(image, folder, "", extension=ext.lstrip(".") or "png", info=infotext, p=p,
                                     forced_filename=stem + suffix, save_to_dirs=False)
    except Exception as e:   # a full disk or a bad folder: the generation itself is done and saved
        log.warning("DynFuse: could not save %s%s beside %s: %s", stem, suffix, path, e)
        return None
    return saved
