"""The documentation builds from the docstrings and the README, with warnings as errors.

``make docs`` runs the same build into ``docs/_build/html``. Skipped (with the reason) when the
``[docs]`` extra (Sphinx, myst-parser) is not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the [docs] extra (sphinx) is not installed")
pytest.importorskip("myst_parser", reason="the [docs] extra (myst-parser) is not installed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    return out / "html"


def _text(path: Path) -> str:
    return re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8"))


def test_api_reference_from_docstrings(html):
    api = html / "_generated" / "api"
    operator = _text(api / "ntkscale.operator.html")
    assert "class ntkscale.operator.NTKOperator" in operator
    assert "Parameters" in operator  # napoleon turned the Args: section into a field list
    index = _text(api / "index.html")
    import ntkscale

    for name in ntkscale.__all__:  # every public name has an entry on the API front page
        if name != "__version__":
            assert f"nks.{name}" in index or f"ntkscale.{name}" in index, name
    page = _text(api / "ntkscale.operator.html")  # shapes written (N, *in_shape) render as such
    assert "*in_shape" in page and "\\*in_shape" not in page


def test_guide_pages_are_the_readme_sections(html):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    titles = [line[3:].strip() for line in readme.splitlines() if line.startswith("## ")]
    pages = sorted((html / "_generated" / "guide").glob("*.html"))
    assert len(pages) == len(titles)
    for page, title in zip(pages, titles):
        assert title.replace("&", "&amp;") in page.read_text(encoding="utf-8"), (page.name, title)


def test_figures_page_shows_every_committed_figure(html):
    figures = sorted((ROOT / "docs" / "figures").glob("*.png"))
    page = (html / "_generated" / "figures.html").read_text(encoding="utf-8")
    for png in figures:
        assert png.name in page, png.name
        assert (html / "_images" / png.name).exists(), png.name
