"""Sphinx configuration of the ntkscale documentation (``make docs`` → ``docs/_build/html``).

The pages are made from what the repository already holds, at every build, into
``docs/_generated/`` (not committed):

* the guide: one page per ``## `` section of ``README.md``, in the README's order (its opening
  paragraphs are the front page);
* the API reference: one page per public module of ``ntkscale`` (every module and package whose
  name has no leading underscore), from the docstrings by autodoc and napoleon (Google style);
* the figures: every ``docs/figures/*.png``, with the caption written beside it in
  ``docs/figures/NAME.txt`` when there is one.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GEN = DOCS / "_generated"
sys.path.insert(0, str(ROOT / "src"))

import ntkscale  # noqa: E402

project = "ntkscale"
author = "the ntkscale authors"
copyright = "ntkscale authors, MIT license"
release = version = ntkscale.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "figures/*.txt", "_generated/intro.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Type hints name classes unqualified (``Preconditioner``, ``NTKOperator``); such a name matches
# the class where it is defined and the package's entry for the same class (see _aliases), and
# Sphinx links the first match: these "more than one target" notes are not errors.
suppress_warnings = ["ref.python"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"ntkscale {release}"
html_static_path: list[str] = []

# modules that are not documented as a page of their own
SKIP_MODULES = {"ntkscale.__main__"}


# Docstrings write shapes the Python way, ``(N, *in_shape)``, ``(k, *p.shape)``: there the star is
# unpacking, not the start of reStructuredText emphasis. It is escaped outside literals, doctests
# and literal blocks; real emphasis (``*distinct*``) is left alone.
_UNPACK = re.compile(r"(?<![\w*\\`])\*(?=[A-Za-z_][\w.]*[),\]])")
_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_unpacking(app, what, name, obj, options, lines: list[str]) -> None:
    literal_indent = None  # indentation of the paragraph that opened a literal block (::)
    doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        if stripped.startswith(">>>"):
            doctest = True
        elif not stripped:
            doctest = False
        if doctest:
            continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(p if k % 2 else _UNPACK.sub(r"\\*", p) for k, p in enumerate(parts))
        if stripped.endswith("::"):
            literal_indent = indent


def setup(app):
    app.connect("autodoc-process-docstring", _escape_unpacking)


# ---------------------------------------------------------------------------------------------
# the guide: README.md, one page per section


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _rewrite_links(text: str, depth: int) -> str:
    """Links to files of the repository become plain text; images under docs/ keep working."""
    up = "../" * depth

    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"[a-z]+://|#|mailto:", target):
            return m.group(0)
        if bang and target.startswith("docs/"):
            return f"![{label}]({up}{target[len('docs/'):]})"
        return label if not bang else f"*{label}* (`{target}`)"

    return _LINK.sub(fix, text)


def _split_readme(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The README's opening part and its ``## `` sections as (title, body), code blocks respected."""
    intro: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((line[3:].strip(), []))
            continue
        (sections[-1][1] if sections else intro).append(line)
    return "\n".join(intro), [(t, "\n".join(body)) for t, body in sections]


def _guide() -> list[str]:
    intro, sections = _split_readme((ROOT / "README.md").read_text(encoding="utf-8"))
    intro = re.sub(r"\A# [^\n]*\n", "", intro.lstrip())  # the front page has its own title
    (GEN / "intro.md").write_text(_rewrite_links(intro, depth=0), encoding="utf-8")
    pages = []
    for i, (title, body) in enumerate(sections, 1):
        name = f"{i:02d}-{_slug(title)}"
        body = re.sub(r"^(#+) ", lambda m: m.group(1)[1:] + " ", body, flags=re.M)  # ### → ##
        (GEN / "guide" / f"{name}.md").write_text(
            f"# {title}\n{_rewrite_links(body, depth=2)}\n", encoding="utf-8"
        )
        pages.append(f"guide/{name}")
    return pages


# ---------------------------------------------------------------------------------------------
# the API reference


def _public_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(ntkscale.__path__, prefix="ntkscale.")]
    keep = []
    for name in sorted(names):
        if name in SKIP_MODULES or any(part.startswith("_") for part in name.split(".")):
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:  # an optional extra that is not installed
            print(f"ntkscale docs: {name} not documented ({err})", file=sys.stderr)
            continue
        keep.append(name)
    return keep


def _aliases(package: str, modules: list[str]) -> list[str]:
    """Entries ``package.NAME`` for the names a package exports.

    A name defined in another module gets a short entry pointing to its definition, so that a
    reference such as ``:class:`ntkscale.NTKOperator``` resolves to exactly one target; a name
    defined in the package itself is documented there in full.
    """
    pkg = importlib.import_module(package)
    names = getattr(pkg, "__all__", None) or sorted(n for n in vars(pkg) if not n.startswith("_"))
    lines: list[str] = []
    for public in names:
        obj = getattr(pkg, public, None)
        if obj is None or inspect.ismodule(obj):
            continue
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
        elif callable(obj):
            kind = "function"
        else:
            continue
        where = getattr(obj, "__module__", None)
        if f"{package}.{public}" in modules:  # e.g. the function ntkscale.solvers.lanczos
            continue
        if where == package:
            lines += [f".. auto{kind}:: {package}.{public}", ""]
        elif where in modules:
            qual = getattr(obj, "__qualname__", public)
            lines += [f".. py:{kind}:: {public}", f"   :module: {package}", "",
                      f"   Defined in :py:mod:`{where}`: :py:obj:`{where}.{qual}`.", ""]
    return lines


def _api(modules: list[str]) -> list[str]:
    pages = []
    for name in modules:
        title = f"``{name}``"
        text = f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n"
        subs = [m for m in modules if m.rsplit(".", 1)[0] == name]
        if subs:  # a package: its names are documented where they are defined
            text += "   :no-members:\n\nModules:\n\n" + "".join(f"* :py:mod:`{m}`\n" for m in subs)
            text += "\nNames:\n\n" + "\n".join(_aliases(name, modules)) + "\n"
        (GEN / "api" / f"{name}.rst").write_text(text, encoding="utf-8")
        pages.append(f"api/{name}")
    # the package itself: its docstring and where each public name is defined
    lines = ["The public API", "==============", "", ".. automodule:: ntkscale", "   :no-members:", "",
             "``import ntkscale as nks`` gives these names, each defined in a module below:", ""]
    lines += [f"* :py:mod:`nks.{n} <ntkscale.{n}>`" for n in ntkscale.__all__
              if inspect.ismodule(getattr(ntkscale, n)) and f"ntkscale.{n}" in modules]
    lines += [""] + _aliases("ntkscale", modules)
    lines += ["", "Modules", "-------", "", ".. toctree::", "   :maxdepth: 1", ""]
    lines += [f"   {p[len('api/'):]}" for p in pages]
    (GEN / "api" / "index.rst").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pages


# ---------------------------------------------------------------------------------------------
# the figures


def _figures() -> None:
    lines = ["# Figures", "",
             "The figures of the benchmarks and studies, as committed in `docs/figures/`; each says "
             "on which hardware it was measured.", ""]
    pngs = sorted((DOCS / "figures").glob("*.png"))
    for png in pngs:
        caption_file = png.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
        lines += [f"## {png.stem}", "", f"![{png.stem}](../figures/{png.name})", ""]
        if caption:
            lines += [caption, ""]
    if not pngs:
        lines.append("No figures have been committed yet.")
    (GEN / "figures.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _generate() -> None:
    if GEN.exists():
        shutil.rmtree(GEN)
    (GEN / "guide").mkdir(parents=True)
    (GEN / "api").mkdir()
    _guide()
    _api(_public_modules())
    _figures()


_generate()
