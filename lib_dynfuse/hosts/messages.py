"""User-facing messages of a generation: one infotext line, the UI's info box, extra gallery images.

Nothing here imports a WebUI module.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dynfuse")

INFOTEXT_KEY = "DynFuse"
MESSAGE_KEY = "DynFuse message"


def one_line(message: str) -> str:
    """A message as one plain infotext value: the host splits infotext at newlines (infotext_utils.py:254) and
    only keeps a multi-line value on its line as an escaped JSON string (quote, :56-60), unreadable in the info
    box. A line ending in ':' runs on with a space, other line breaks become '; '."""
    out = ""
    for line in (s.strip() for s in str(message).splitlines()):
        if line:
            out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def report_on_p(p: Any, message: str) -> None:
    """Show a message in the UI's info box (`p.comment`, full text) and in the infotext / API info (one line;
    both hosts; the console has it already from the `dynfuse` logger, so nothing is printed here)."""
    if hasattr(p, "comment"):
        p.comment(message)
    message = one_line(message)
    params = getattr(p, "extra_generation_params", None)
    if params is not None:
        old = params.get(MESSAGE_KEY)
        if not old:
            params[MESSAGE_KEY] = message
        elif message not in old:
            params[MESSAGE_KEY] = f"{old}; {message}"


def append_to_gallery(processed: Any, image: Any, infotext: str) -> None:
    """An extra gallery image with its own infotext (`Processed.images` / `.infotexts`), not saved as a generation."""
    processed.images.append(image)
    processed.infotexts.append(infotext)

