"""Reference prompts l_c and l_s (paper Eq. 14-15): the prompt without the other LoRA's trigger words.

Each reference is rendered with one LoRA alone, so the other LoRA's trigger words (`sks`, `wc_style`) mean nothing
to the model there; they are taken out where they are known. A LoRA's trigger words come from the first of:
- the WebUI's user metadata beside the file (`<name>.json`, "activation text": what its card adds to a prompt);
- the file's metadata: `modelspec.trigger_phrase`, then `ss_activation_text`;
- kohya's `ss_tag_frequency` ({dataset folder: {tag: count}}): the tags of the highest count over all folders
  (those in every caption of a trigger-word LoRA), at most MAX_TAGS, unless the captions are sentences
  rather than tags (mean tag length >= 16 characters, the WebUI's own test, ui_edit_user_metadata.py:11-14).
"""
from __future__ import annotations

import json
import re
from typing import Any, List, Mapping, Optional, Sequence

MAX_TAGS = 3
SENTENCE_TAG_LENGTH = 16
_METADATA_KEYS = ("modelspec.trigger_phrase", "ss_activation_text")


def split_phrases(text: Any) -> List[str]:
    """Comma-separated phrases of a text (or of a list of texts), stripped, empty ones dropped."""
    if isinstance(text, (list, tuple)):
        return [p for item in text for p in split_phrases(item)]
    if not isinstance(text, str):
        return []
    return [p.strip() for p in text.split(",") if p.strip()]


def frequent_tags(tag_frequency: Any, limit: int = MAX_TAGS) -> List[str]:
    """The most frequent caption tags of kohya's `ss_tag_frequency` (a dict or its JSON text), ties included."""
    if isinstance(tag_frequency, str):
        try:
            tag_frequency = json.loads(tag_frequency)
        except ValueError:
            return []
    if not isinstance(tag_frequency, Mapping):
        return []
    counts: dict = {}
    for tags in tag_frequency.values():
        if isinstance(tags, Mapping):
            for tag, n in tags.items():
                tag = str(tag).strip()
                try:
                    counts[tag] = counts.get(tag, 0) + int(n)
                except (TypeError, ValueError):
                    continue
    counts.pop("", None)
    if not counts or sum(map(len, counts)) / len(counts) >= SENTENCE_TAG_LENGTH:
        return []
    top = max(counts.values())
    return sorted((t for t, n in counts.items() if n == top), key=lambda t: (-len(t), t))[:limit]


def trigger_words(file_metadata: Optional[Mapping] = None, user_metadata: Optional[Mapping] = None) -> List[str]:
    """A LoRA's trigger words from the user's "activation text", the file's trigger keys, or its caption tags."""
    phrases = split_phrases((user_metadata or {}).get("activation text"))
    if phrases:
        return phrases
    meta = file_metadata or {}
    for key in _METADATA_KEYS:
        phrases = split_phrases(meta.get(key))
        if phrases:
            return phrases
    return frequent_tags(meta.get("ss_tag_frequency"))


def without_words(prompt: str, phrases: Sequence[str]) -> str:
    """The prompt with each phrase taken out as a whole word (any case), with its emphasis brackets, e.g.
    `(wc_style:1.2)` or `[sks]`; the commas and spaces left behind are tidied."""
    out = prompt or ""
    for phrase in sorted({p.strip() for p in phrases if p and p.strip()}, key=len, reverse=True):
        core = r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"
        out = re.sub(r"\(\s*" + core + r"\s*(?::\s*-?[\d.]+\s*)?\)", " ", out, flags=re.IGNORECASE)
        out = re.sub(r"\[\s*" + core + r"\s*\]", " ", out, flags=re.IGNORECASE)
        out = re.sub(core, " ", out, flags=re.IGNORECASE)
    out = re.sub(r"[ \t]+", " ", out)
    out = re.sub(r"\s*,(?:\s*,)+", ",", out)            # "a, , b" -> "a, b"
    out = re.sub(r"\s+,", ",", out)
    return out.strip(" ,\t")


def reference_prompt(prompt: str, other_triggers: Sequence[str]) -> str:
    """l_c (or l_s): the prompt without the other LoRA's trigger words; the prompt itself when none is known or
    nothing would be left."""
    stripped = without_words(prompt, other_triggers)
    return stripped if stripped else (prompt or "").strip()
