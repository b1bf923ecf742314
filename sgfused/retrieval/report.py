"""Search results for people: a fixed-width table, JSON, and a self-contained HTML page.

The HTML page has no external asset (no script, stylesheet, font or image link): one
inline ``<style>`` and, per hit, an inline SVG drawing the image frame with the box of
the region each caption word attended to most, in that word's colour (hover: word, region,
weight), next to the list of words and all their listed regions. It opens from a file, offline, in any browser.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .._files import atomic_write
from .explain import WordAlignment
from .search import Hit, SearchResult

# distinguishable on white, one per caption word (cycled)
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#800000", "#469990")
FRAME = 320  # the SVG's longer side, in CSS pixels


def _region_text(alignment: WordAlignment) -> str:
    parts = []
    for r in alignment.regions:
        label = f" {r.label}" if r.label else ""
        box = " [" + " ".join(f"{v:.2f}" for v in r.box) + "]" if r.box is not None else ""
        parts.append(f"region {r.region}{label}{box} {r.weight:.3f}")
    return "; ".join(parts)


def _unknown_notes(result: SearchResult) -> list[str]:
    """One line per vocabulary that lacks some of the caption's words: the model's, and the shortlist key's."""
    notes = []
    if result.unknown_words:
        notes.append(f"unknown words (read as <unk>): {' '.join(result.unknown_words)}")
    if result.shortlist_unknown_words:
        notes.append(f"unknown to the shortlist checkpoint (read as <unk> by the first stage): "
                     f"{' '.join(result.shortlist_unknown_words)}")
    return notes


def format_results(result: SearchResult) -> str:
    """The hits as a table (with each word's regions under its hit when they were explained)."""
    if result.direction == "t2i":
        title = f"caption {result.query['caption']!r} -> images"
        header = f"{'rank':>4} {'image':>7} {'score':>9} {'shortlist':>9}"
    else:
        title = f"image {result.query['image']} -> captions"
        header = f"{'rank':>4} {'caption':>7} {'image':>7} {'score':>9} {'shortlist':>9}  text"
    stage = result.stage + (f", K' = {result.shortlist}" if result.shortlist else "")
    lines = [f"{title} ({stage}, gallery {result.gallery_size})"]
    lines += _unknown_notes(result)
    lines.append(header)
    for hit in result.hits:
        if result.direction == "t2i":
            lines.append(f"{hit.rank:>4} {hit.item:>7} {hit.score:>9.4f} {hit.shortlist_score:>9.4f}")
        else:
            lines.append(f"{hit.rank:>4} {hit.item:>7} {hit.image:>7} {hit.score:>9.4f} {hit.shortlist_score:>9.4f}  {hit.caption}")
        for word in hit.alignment or []:
            mark = "" if word.known else " (unknown)"
            lines.append(f"       {word.word}{mark} -> {_region_text(word)}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: SearchResult) -> None:
    """The result (query, hits, scores, alignments) as indented JSON, written atomically."""
    atomic_write(Path(path), lambda f: f.write((json.dumps(result.to_dict(), indent=2) + "\n").encode()))


def _frame(size: tuple[float, float] | None) -> tuple[float, float]:
    if size is None:
        return FRAME, FRAME
    width, height = size
    scale = FRAME / max(width, height)
    return round(width * scale, 1), round(height * scale, 1)


def _svg(hit: Hit, size: tuple[float, float] | None) -> str:
    width, height = _frame(size)
    shapes = [f'<rect class="frame" x="0" y="0" width="{width}" height="{height}"/>']
    for number, word in enumerate(hit.alignment or []):
        colour = PALETTE[number % len(PALETTE)]
        for region in word.regions[:1]:  # the strongest region: more boxes per word would hide the image
            if region.box is None:
                continue
            x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in region.box)
            x, y, w, h = x1 * width, y1 * height, max(x2 - x1, 0.0) * width, max(y2 - y1, 0.0) * height
            tip = html.escape(f"{word.word} -> region {region.region} {region.label or ''} ({region.weight:.3f})")
            shapes.append(
                f'<rect class="box" data-word="{number}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'stroke="{colour}"><title>{tip}</title></rect>'
            )
            shapes.append(f'<text x="{x + 2:.1f}" y="{y + 11:.1f}" fill="{colour}">{html.escape(word.word)}</text>')
    return (f'<svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">' + "".join(shapes) + "</svg>")


def _words(hit: Hit) -> str:
    if not hit.alignment:
        return '<p class="note">no word-region alignment (search with --explain)</p>'
    rows = []
    for number, word in enumerate(hit.alignment):
        colour = PALETTE[number % len(PALETTE)]
        unknown = ' <span class="note">(unknown)</span>' if not word.known else ""
        rows.append(f'<li><span class="chip" style="background:{colour}"></span><b>{html.escape(word.word)}</b>'
                    f'{unknown} &rarr; {html.escape(_region_text(word))}</li>')
    return "<ul>" + "".join(rows) + "</ul>"


_STYLE = """
body { font: 14px sans-serif; margin: 1.5em; color: #222; }
.hit { display: flex; gap: 1.5em; margin: 1em 0; padding: 1em; border: 1px solid #ccc; border-radius: 6px; }
.hit svg { flex: none; }
.frame { fill: #f4f4f4; stroke: #999; }
.box { fill: none; stroke-width: 2.5; }
svg text { font: 10px sans-serif; }
.chip { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
ul { list-style: none; padding: 0; margin: 0.5em 0; }
.note { color: #777; }
"""


def write_html(path: str | os.PathLike, result: SearchResult, sizes=None) -> None:
    """A self-contained page of the hits, their scores and the word -> region alignment drawn over the boxes.

    ``sizes``: the index's ``(n_images, 2)`` width, height table (frames keep the image's aspect), or None.
    """
    if result.direction == "t2i":
        query = f"Caption: <q>{html.escape(result.query['caption'])}</q> &rarr; images"
    else:
        query = f"Image {result.query['image']} &rarr; captions"
    stage = html.escape(result.stage + (f", K' = {result.shortlist}" if result.shortlist else ""))
    cards = []
    for hit in result.hits:
        drawn = hit.image if result.direction == "t2i" else result.query["image"]  # the image whose boxes are drawn
        size = tuple(float(v) for v in sizes[drawn]) if sizes is not None else None
        what = f"image {hit.image}" if result.direction == "t2i" else f"caption {hit.item} (image {hit.image})"
        text = f"<p><q>{html.escape(hit.caption)}</q></p>" if hit.caption else ""
        cards.append(
            f'<div class="hit" id="hit{hit.rank}">{_svg(hit, size)}<div><h2>#{hit.rank}: {html.escape(what)}</h2>'
            f'<p>score {hit.score:.4f} &middot; shortlist score {hit.shortlist_score:.4f}</p>{text}{_words(hit)}</div></div>'
        )
    unknown = "".join(f'<p class="note">{html.escape(note)}</p>' for note in _unknown_notes(result))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>sgfused search</title>"
        f"<style>{_STYLE}</style></head><body><h1>{query}</h1><p>{stage}, gallery of {result.gallery_size}</p>"
        f"{unknown}{''.join(cards)}</body></html>\n"
    )
    atomic_write(Path(path), lambda f: f.write(page.encode()))
