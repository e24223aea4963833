"""The report's reconstruction section: each run's ``reconstructions.png`` (written by the final evaluation of
a pixel objective, :mod:`mimscale.eval.reconstruct`) embedded as a data URI with its caption, so the page stays
one self-contained file; "not a pixel objective" for the others."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path


def _one(path: str, label: str) -> str:
    from ..eval.reconstruct import META, NOT_PIXEL, PNG  # late: that module imports torch; `mimscale --help` must not

    d = Path(path)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError):
        return f'<p class="recon-none"><code>{escape(label)}</code>: no reconstructions saved (unfinished run?)</p>'
    if not meta.get("pixel") or not (d / PNG).is_file():
        return f'<p class="recon-none"><code>{escape(label)}</code>: {NOT_PIXEL} ({escape(str(meta.get("objective")))})</p>'
    data = base64.b64encode((d / PNG).read_bytes()).decode("ascii")
    caption = escape(str(meta.get("caption", "")))
    return (
        f'<figure class="recon" data-run="{escape(label)}"><img alt="reconstructions of {escape(label)}" '
        f'src="data:image/png;base64,{data}" style="image-rendering: pixelated; width: 100%; max-width: 640px">'
        f"<figcaption><code>{escape(label)}</code>: {caption}</figcaption></figure>"
    )


def recon_section(runs) -> str:
    """``<h2>Reconstructions</h2>`` and one figure (or line) per run; empty for no runs."""
    if not runs:
        return ""
    return "<h2>Reconstructions</h2>\n" + "\n".join(_one(r.path, r.label) for r in runs) + "\n"
