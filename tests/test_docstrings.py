"""Cross-references in docstrings name things that exist: after a module moves, a stale
``:class:`trioworker.old.Name``` would send a reader nowhere."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import trioworker

PACKAGE = Path(trioworker.__file__).parent
REFERENCE = re.compile(r":(?:class|func|mod|data|meth|attr|exc):`~?(trioworker(?:\.\w+)*)`")


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for name in parts[n:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_resolves_tells_real_names_from_stale_ones() -> None:
    assert resolves("trioworker.worker.statistics.WorkerStatistics")
    assert not resolves("trioworker.statistics.WorkerStatistics")
    assert not resolves("trioworker.protocol.no_such_thing")


def test_every_docstring_reference_resolves() -> None:
    stale = sorted(
        f"{path.relative_to(PACKAGE.parent)}: {ref}"
        for path in PACKAGE.rglob("*.py")
        for ref in REFERENCE.findall(path.read_text(encoding="utf-8"))
        if not resolves(ref)
    )
    assert stale == []
