"""A self-contained HTML page of search results: each query beside its top-k thumbnails with
distances (thumbnails are inlined as data: URIs, so the page can be mailed or opened anywhere)."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cbir_engine.errors import ImageDecodeError
from cbir_engine.fileio import atomic_write
from cbir_engine.store.collection import Hit
from cbir_engine.store.images import thumbnail_png

THUMB_SIDE = 128


@dataclass
class QueryResult:
    """One query (an image file or encoded bytes) and what the index returned for it."""

    name: str
    source: str | os.PathLike[str] | bytes
    hits: Sequence[Hit]
    note: str = ""  # e.g. "label: Sneaker" or a precision figure


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; } .summary { color: #555; }
section { margin: 1.2rem 0; padding-top: .6rem; border-top: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-start; }
figure { margin: 0; width: 136px; text-align: center; font-size: .75rem; }
figure img { width: 128px; height: 128px; object-fit: contain; background: #111;
             image-rendering: pixelated; border: 2px solid transparent; }
figure.query img { border-color: #2563eb; }
figure.same img { border-color: #16a34a; } figure.other img { border-color: #dc2626; }
figcaption { overflow-wrap: anywhere; }
.missing { width: 128px; height: 128px; display: flex; align-items: center; justify-content: center;
           background: #eee; color: #888; }
"""


def _img_tag(source: str | os.PathLike[str] | bytes, alt: str) -> str:
    try:
        data = base64.b64encode(thumbnail_png(source, THUMB_SIDE)).decode("ascii")
    except (ImageDecodeError, OSError):
        return '<div class="missing">unreadable</div>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render(results: Sequence[QueryResult], title: str = "cbir search results", summary: str = "",
           query_labels: Sequence[str | None] | None = None) -> str:
    """The page as a string. With `query_labels`, result borders are green where the hit has the
    query's label and red where not."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f'<p class="summary">{html.escape(summary)}</p>')
    for qi, q in enumerate(results):
        qlabel = query_labels[qi] if query_labels is not None else None
        parts.append(f"<section><h2>{html.escape(q.name)}</h2>")
        if q.note:
            parts.append(f"<p>{html.escape(q.note)}</p>")
        parts.append('<div class="row"><figure class="query">')
        parts.append(_img_tag(q.source, q.name) + "<figcaption>query</figcaption></figure>")
        for h in q.hits:
            cls = "" if qlabel is None else (" same" if h.label == qlabel else " other")
            dist = f"{h.distance:g}" if float(h.distance).is_integer() else f"{h.distance:.4f}"
            caption = f"#{h.rank} &middot; d={dist}"
            if h.label is not None:
                caption += f"<br>{html.escape(h.label)}"
            caption += f"<br>{html.escape(os.path.basename(h.path))}"
            parts.append(f'<figure class="hit{cls}">{_img_tag(h.path, os.path.basename(h.path))}'
                         f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "".join(parts)


def write(path: str | os.PathLike[str], results: Sequence[QueryResult], **kwargs: object) -> None:
    """Renders and writes the page atomically."""
    atomic_write(path, [render(results, **kwargs).encode("utf-8")])  # type: ignore[arg-type]
