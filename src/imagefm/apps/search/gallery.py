"""A self-contained HTML page of search results: thumbnails inlined, no files beside it."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from imagefm.apps.search.index import SearchHit

THUMBNAIL_SIZE = 256

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
h1 { font-size: 1.2rem; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border-radius: 6px; box-shadow: 0 1px 3px #0002;
         overflow: hidden; }
figure img { width: 100%; height: 200px; object-fit: contain; background: #eee; display: block; }
figcaption { padding: .4rem .6rem; font-size: .8rem; word-break: break-all; }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.missing { height: 200px; display: flex; align-items: center; justify-content: center;
           color: #999; background: #eee; }
"""


def thumbnail_jpeg(path: str | Path | bytes, size: int = THUMBNAIL_SIZE,
                   max_pixels: int | None = None) -> bytes:
    """A JPEG thumbnail (longest side ``size``) of an image file or encoded bytes."""
    from imagefm.data.image import DEFAULT_MAX_PIXELS, open_image

    image = open_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_gallery(hits: Sequence[SearchHit], out: str | Path, *, title: str) -> Path:
    """Write ``out`` (HTML): one card per hit with its thumbnail, score and path."""
    cards = []
    for rank, hit in enumerate(hits, start=1):
        try:
            data = base64.b64encode(thumbnail_jpeg(hit.full_path)).decode("ascii")
            picture = f'<img alt="" src="data:image/jpeg;base64,{data}">'
        except (OSError, ValueError):  # moved or broken since indexing
            picture = '<div class="missing">not readable</div>'
        cards.append(f'<figure>{picture}<figcaption><span class="score">#{rank} '
                     f'{hit.score:.3f}</span><br>{html.escape(hit.path)}</figcaption></figure>')
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<div class="grid">{"".join(cards)}</div></body></html>\n')
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out
