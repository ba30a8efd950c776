"""`<acq>/index.html` (output root): a static page of an acquisition's newest previews per slice.

Rebuilt from what is under ``<acq>/previews/`` (``slice<NNNN>-<label>/<name>.png``, label
``m<M>`` for a mosaic, ``axis`` for the 3-D axis) each time a stage writes previews: written
under a temporary name and renamed into place, writers on one host serialised by a lock file
(``<acq>/previews/.index.lock``), so the page always lists every preview on disk. Links are
relative (the page works from the file system and from any web server of the output root);
each carries the file's modification time so a browser shows the newest image.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import html
import re
from collections.abc import Iterator
from pathlib import Path

from services.io.atomic import atomic_file
from services.io.layout import index_path

PREVIEW_DIR = re.compile(r"^slice(?P<slice>\d{4,})-(?P<label>m\d+|axis)$")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".index.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _label_key(label: str) -> tuple[int, int]:
    return (1, 0) if label == "axis" else (0, int(label[1:]))


def previews_by_slice(acq_dir: Path) -> dict[int, dict[str, list[Path]]]:
    """{slice: {label: [png, ...]}} of what is on disk, sorted."""
    found: dict[int, dict[str, list[Path]]] = {}
    root = acq_dir / "previews"
    if not root.is_dir():
        return found
    for sub in sorted(root.iterdir()):
        match = PREVIEW_DIR.match(sub.name)
        if not match or not sub.is_dir():
            continue
        pngs = sorted(p for p in sub.glob("*.png") if not p.name.startswith("."))
        if pngs:
            found.setdefault(int(match["slice"]), {})[match["label"]] = pngs
    return found


def render_index(acq: str, acq_dir: Path) -> str:
    """The page's HTML."""
    slices = previews_by_slice(acq_dir)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(acq)}: previews</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;"
        "margin:0 .5em .5em 0}img{max-width:320px;max-height:320px;background:#000}"
        "figcaption{font-size:small}</style></head><body>",
        f"<h1>{html.escape(acq)}</h1>",
        f"<p>{len(slices)} slices with previews; updated {now}. Mosaics in the stitched frame "
        "(x right, y down); orientation as hue weighted by retardance; axis: in-plane, "
        "thru-plane and |3-D axis| colours.</p>",
    ]
    for k in sorted(slices, reverse=True):
        out.append(f'<section id="slice{k:04d}"><h2>slice {k}</h2>')
        for label in sorted(slices[k], key=_label_key):
            title = "3-D axis" if label == "axis" else f"mosaic {label[1:]}"
            out.append(f"<h3>{title}</h3><div>")
            for png in slices[k][label]:
                rel = png.relative_to(acq_dir).as_posix()
                stamp = png.stat().st_mtime_ns
                src = html.escape(f"{rel}?v={stamp}")
                name = html.escape(png.stem)
                out.append(
                    f'<figure><a href="{src}"><img src="{src}" alt="{name}" loading="eager">'
                    f"</a><figcaption>{name}</figcaption></figure>"
                )
            out.append("</div>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_index(output_root: Path, acq: str) -> Path:
    """Rewrite `<acq>/index.html` from the previews on disk; returns its path."""
    target = Path(output_root) / index_path(acq)
    acq_dir = target.parent
    with _locked(acq_dir / "previews"):
        page = render_index(acq, acq_dir)
        with atomic_file(target) as tmp:
            tmp.write_text(page)
    return target
