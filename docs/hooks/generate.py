"""MkDocs hook: pages generated from the code at build time, so they never go stale.

- ``<!-- cli-help: COMMAND -->`` becomes the ``--help`` text of ``pyrovae COMMAND``, taken from
  the argparse parser in :mod:`pyrovae.cli`.
- ``<!-- api-modules -->`` becomes one mkdocstrings ``:::`` block per public module of the
  package, so a module added to pyrovae shows up in the API reference without editing the docs.
- A ``$$ ... $$`` block (LaTeX, on lines of its own) becomes MathML, converted at build time by
  ``latex2mathml``: browsers draw MathML themselves, so the math renders offline, from disk, with
  no script and no CDN.
"""

from __future__ import annotations

import contextlib
import io
import os
import pkgutil
import re

__all__ = ["on_page_markdown"]

#: Modules shown first in the API reference, in this order; the others follow alphabetically.
FIRST = ["vae", "training", "evaluation", "priors", "likelihoods", "nets", "data", "plots"]


def _cli_help(command: str) -> str:
    from pyrovae.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal's width
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            build_parser().parse_args([command, "--help"] if command else ["--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "```text\n" + buffer.getvalue().rstrip() + "\n```"


def _api_modules() -> str:
    import pyrovae

    names = sorted(
        m.name for m in pkgutil.iter_modules(pyrovae.__path__) if not m.name.startswith("_")
    )
    ordered = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    return "\n\n".join(f"::: pyrovae.{name}" for name in ordered)


def _math(markdown: str) -> str:
    from latex2mathml.converter import convert

    def block(m: re.Match) -> str:
        return "\n" + convert(m.group(1).strip(), display="block") + "\n"

    return re.sub(r"^\$\$\n(.*?)\n\$\$$", block, markdown, flags=re.S | re.M)


def on_page_markdown(markdown: str, **kwargs) -> str:
    markdown = re.sub(r"<!-- cli-help: ?(\w*) -->", lambda m: _cli_help(m.group(1)), markdown)
    markdown = _math(markdown)
    return markdown.replace("<!-- api-modules -->", _api_modules())
