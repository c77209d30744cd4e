"""The ```python blocks of README.md and of the documentation site's pages (docs/*.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


class Block(NamedTuple):
    """One example: where it is (``docs/keyed.md:1``, its page and number there) and its code."""

    where: str
    code: str


def python_blocks() -> list[Block]:
    """Every ```python block, README.md first, then the pages in name order."""
    blocks = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        name = page.relative_to(ROOT).as_posix()
        found = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
        blocks += [Block(f"{name}:{i}", code) for i, code in enumerate(found)]
    return blocks
