"""The report's reconstruction section: the grid of a pixel objective embedded in the page with its caption (and
drawn by headless Chromium), "not a pixel objective" for the others."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from mimscale.eval import reconstruct as R
from mimscale.models.vit import build_vit
from mimscale.objectives.mae import MAE
from mimscale.report.data import Run
from mimscale.report.html import render
from mimscale.report.recon import recon_section

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def runs(tmp_path):
    torch.manual_seed(0)
    obj = MAE(build_vit("vit_micro", 16, 4), MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=4))
    pixel, other, unfinished = (tmp_path / n for n in ("mae", "conmim", "running"))
    R.save(obj, torch.randn(4, 3, 16, 16), (0.5,) * 3, (0.25,) * 3, pixel)
    R.save(build_vit("vit_micro", 16, 4), torch.empty(0), (), (), other)
    unfinished.mkdir()
    return [Run(path=str(d), label=d.name) for d in (pixel, other, unfinished)]


@pytest.mark.unit
def test_section_embeds_the_grid_and_says_not_a_pixel_objective(runs):
    html = recon_section(runs)
    assert html.startswith("<h2>Reconstructions</h2>")
    assert html.count("<figure") == 1 and "data:image/png;base64," in html
    assert "ORIGINAL patch" in html  # the norm-pix caption
    assert "not a pixel objective" in html and "no reconstructions saved" in html
    assert recon_section([]) == ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (CI installs it)")
def test_grid_is_drawn_in_headless_chromium(runs, tmp_path):
    probe = """<script>window.addEventListener('load', () => {
      const img = document.querySelector('figure.recon img');
      document.body.setAttribute('data-recon', img && img.complete ? img.naturalWidth + 'x' + img.naturalHeight : 'none');
    });</script>"""
    page = tmp_path / "report.html"
    page.write_text(render(runs).replace("</body>", probe + "</body>", 1), encoding="utf-8")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        page.as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'data-recon="(\d+)x(\d+)"', p.stdout)
    assert m, p.stdout[-2000:]
    w, h = int(m.group(1)), int(m.group(2))
    assert (w, h) == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)  # 4 columns, 4 images, 2-px gaps: decoded by the browser
    assert "not a pixel objective" in p.stdout and "<figcaption>" in p.stdout
