"""The recipes' arguments from outside the dataclasses: the `--config` file and which names a run set itself."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat argument dict from a `.yaml`/`.yml` or `.json` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    elif path.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values")
    return values


def pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config PATH` / `--config=PATH` out of `argv`: `(path or None, the other arguments)`."""
    rest, config = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config = next(args, None)
            if config is None:
                raise ValueError("--config needs a file path")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


def given(name: str, argv: Sequence[str], preset: Mapping[str, Any]) -> bool:
    """Whether the recipe, the config file or the command line set `name` (rather than the dataclass default)."""
    flags = {name, f"no_{name}"}
    return name in preset or any(a.startswith("--") and a[2:].split("=")[0].replace("-", "_") in flags for a in argv)


def bool_flag(name: str, argv: Sequence[str], default: bool) -> bool:
    """The value of `--name [VALUE]` / `--name=VALUE` in `argv` (the last one wins; bare: true), else `default`."""
    value = default
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            word = argv[i + 1].lower() if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
            value = word in ("1", "true", "yes", "y")
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1].lower() in ("1", "true", "yes", "y")
    return value
