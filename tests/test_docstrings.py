"""The API reference is rendered by mkdocstrings from Markdown docstrings (Google style): Sphinx roles such
as ``:class:`X``` would appear raw on the page, so none may come back."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj):`")


def test_no_sphinx_roles_in_docstrings():
    found = [f"{p.relative_to(ROOT)}:{n}" for pkg in ("tmcgraph", "apg") for p in sorted((ROOT / pkg).rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if ROLE.search(line)]
    assert found == []
