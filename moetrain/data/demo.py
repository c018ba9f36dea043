"""The demo corpus: English prose that ships with Python itself, the docstrings of its standard library.

Sources are parsed with ``ast`` (nothing is imported or executed), files and docstrings taken in sorted order,
so the corpus is the same on every run of the same Python version; no download is involved.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import numpy as np

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip"}
_MIN_DOC_CHARS = 200  # short docstrings are mostly signatures, not prose


def demo_documents(max_bytes: int) -> list[str]:
    """Docstrings of the standard library (modules, classes, functions), up to ``max_bytes`` of UTF-8."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    docs.append(doc)
                    total += len(doc.encode("utf-8"))
                    if total >= max_bytes:
                        return docs
    if not docs:
        raise RuntimeError(f"no docstrings found under {stdlib}: the demo corpus needs Python's standard library")
    return docs


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
