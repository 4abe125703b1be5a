"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def write_json(path: Optional[str], rows: Any) -> None:
    """Write ``rows`` to ``path`` (directories created); nothing when ``path`` is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)
