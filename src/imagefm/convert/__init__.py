"""Converters between imagefm and other checkpoint formats, each a strict declarative key map.

    keymap.py     the engine: (source pattern -> our name, transform) tables and their reports
    hf.py         Hugging Face CLIPModel / SiglipModel directories, both ways
    open_clip.py  open_clip hub directories and bare state dicts (+ architecture name), both ways

Most users call ``imagefm.load(path)``, which picks the right converter.
"""

from __future__ import annotations

from imagefm.convert.hf import export_hf, load_hf, load_hf_processor
from imagefm.convert.keymap import KeyMap, KeyMapError, KeyMapReport, load_with_key_map, rule
from imagefm.convert.open_clip import load_open_clip, load_open_clip_processor
from imagefm.convert.open_clip_export import export_open_clip

__all__ = ["KeyMap", "KeyMapError", "KeyMapReport", "export_hf", "export_open_clip", "load_hf",
           "load_hf_processor", "load_open_clip", "load_open_clip_processor", "load_with_key_map",
           "rule"]
