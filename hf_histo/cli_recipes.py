"""`hf-histo recipes`: each recipe's seed system and launch command, read from its docstring without importing it."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import NamedTuple

INSTALLED_NOTE = (
    "Installed without the source tree: python -m hf_histo.recipes.NAME (or accelerate launch -m "
    "hf_histo.recipes.NAME) with the same flags; --help lists them, --demo runs offline on generated data."
)


class RecipeSummary(NamedTuple):
    """One recipe as its docstring describes it."""

    name: str
    reproduces: str
    launch: str


def recipe_summaries() -> list[RecipeSummary]:
    """The recipes of the `hf_histo.recipes` package (the repository's recipes/ folder), sorted by name.

    The first docstring line says which seed system the recipe reproduces; the first line of its ``Launch:`` block
    (``Launch (one GPU, ...):`` too) is the command, empty when the docstring has no such block. The files are
    parsed, not imported, so listing them imports neither torch nor transformers.
    """
    spec = importlib.util.find_spec("hf_histo.recipes")
    folders = [] if spec is None or spec.submodule_search_locations is None else spec.submodule_search_locations
    found = []
    for path in sorted(p for folder in folders for p in Path(folder).glob("*.py") if p.name != "__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) or ""
        lines = [line.strip() for line in doc.splitlines()]
        start = next((i for i, line in enumerate(lines) if line.startswith("Launch") and line.endswith(":")), None)
        launch = "" if start is None else next((line for line in lines[start + 1 :] if line), "")
        found.append(RecipeSummary(path.stem, lines[0] if lines else "", launch))
    return found


def recipes_table(recipes: list[RecipeSummary]) -> str:
    """Two lines per recipe (name and what it reproduces, then its launch command) and how to run them installed."""
    width = max((len(r.name) for r in recipes), default=0) + 2
    lines = []
    for r in recipes:
        lines.append(f"{r.name:<{width}}{r.reproduces}")
        lines.append(f"{'':<{width}}{r.launch or f'python -m hf_histo.recipes.{r.name} --help'}")
    return "\n".join([*lines, "", INSTALLED_NOTE])
