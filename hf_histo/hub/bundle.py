"""The code that ships with a checkpoint: config entries for remote code and the flattened module bundle."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..inference.pipeline import TASK, HistoImageClassificationPipeline
from ..inference.saliency import patch_saliency

_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+\.+(?:\w+\.)*(\w+)(\s+import\b)", flags=re.MULTILINE)


def remote_code_fields(config_class: type, model_class: type | None = None) -> dict[str, dict]:
    """The `auto_map` entries and `custom_pipelines` a checkpoint's config.json needs for remote code."""

    def ref(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    auto_map = {"AutoConfig": ref(config_class)}
    if model_class is not None:
        auto_map["AutoModelForImageClassification"] = ref(model_class)
    custom_pipelines = {
        TASK: {
            "impl": ref(HistoImageClassificationPipeline),
            "pt": ["AutoModelForImageClassification"],
            "tf": [],
            "type": "image",
        }
    }
    return {"auto_map": auto_map, "custom_pipelines": custom_pipelines}


def set_remote_code_config(config: Any, model: Any | None = None) -> None:
    """Write `auto_map` and `custom_pipelines` into a config so the checkpoint loads with remote code."""
    fields = remote_code_fields(type(config), type(model) if model is not None else None)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **fields["auto_map"]}
    config.custom_pipelines = fields["custom_pipelines"]


def _relative_modules(module: ModuleType) -> list[ModuleType]:
    """Modules a module imports relatively (`from .x import`, `from ..data.x import`)."""
    source = Path(module.__file__).read_text(encoding="utf-8")
    package = module.__package__ or module.__name__.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if not node.module:
                raise ValueError(f"{module.__file__}: `from . import x` cannot be flattened; use `from .x import y`.")
            name = importlib.util.resolve_name("." * node.level + node.module, package)
            found.append(sys.modules.get(name) or importlib.import_module(name))
    return found


def flatten_imports(source: str) -> str:
    """Rewrite `from ..pkg.mod import x` / `from .mod import x` into the flat `from .mod import x`."""
    return _RELATIVE_IMPORT.sub(r"\1from .\2\3", source)


def write_code_bundle(folder: str | os.PathLike, classes: list[Any]) -> list[Path]:
    """Copy the modules defining `classes` (classes or functions), and everything they import relatively, flat into `folder`.

    Relative imports are rewritten to the flat form, so `transformers.dynamic_module_utils` finds every file next
    to the others. Works from the hf_histo package and from an already flat (remote-code) copy alike.

    Returns:
        The files written, sorted.

    Raises:
        ValueError: Two different modules would get the same file name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [sys.modules[cls.__module__] for cls in classes]
    seen: dict[str, ModuleType] = {}
    while todo:
        module = todo.pop()
        file_name = Path(module.__file__).name
        if file_name in seen:
            # Remote-code copies of one file may live in several hash folders: same content is the same module.
            if Path(seen[file_name].__file__).read_bytes() != Path(module.__file__).read_bytes():
                raise ValueError(
                    f"two shipped modules are both named {file_name}: {seen[file_name].__file__} and "
                    f"{module.__file__}; rename one (the checkpoint folder is flat)."
                )
            continue
        seen[file_name] = module
        todo.extend(_relative_modules(module))
    written = []
    for file_name, module in sorted(seen.items()):
        target = folder / file_name
        target.write_text(flatten_imports(Path(module.__file__).read_text(encoding="utf-8")), encoding="utf-8")
        written.append(target)
    return written


def check_bundle_imports(files: list[Path]) -> None:
    """Check that every relative import of the bundled files names a file of the bundle.

    This is the check transformers' dynamic loader makes when the checkpoint is loaded, done at save time with a
    clear message.

    Raises:
        ValueError: A file imports a sibling that is not in the bundle.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    names = {Path(p).stem for p in files}
    for path in files:
        missing = sorted(set(get_relative_imports(path)) - names)
        if missing:
            raise ValueError(f"{Path(path).name} imports {missing}, which are not in the bundle {sorted(names)}.")


def bundle_code(output_dir: str | os.PathLike, model: Any | None = None) -> list[Path]:
    """Copy the shipped modules flat into a saved checkpoint folder; config.json is read, never rewritten.

    `PreTrainedModel.save_pretrained` already copies configuration_histo.py, modeling_histo.py and backbones.py
    (transformers' `custom_object_save`); this adds the pipeline and every module it imports relatively, with
    each `from ..pkg.module import` rewritten into `from .module import`, overwriting transformers' copies with
    identical-or-flattened versions so all files agree.

    The folder's config.json must already hold `auto_map` and `custom_pipelines`: `save_for_hub` sets them on the
    config before `model.save_pretrained` (or call `set_remote_code_config(model.config, model)` first yourself),
    so config.json is written once.

    Args:
        output_dir: A folder holding a saved model (`config.json`).
        model: The model whose classes ship; defaults to `HistoClassifierForImageClassification`.

    Returns:
        The code files written.

    Raises:
        FileNotFoundError: `output_dir` has no config.json.
        ValueError: config.json lacks the remote-code fields, or a shipped file imports a sibling that is not in
            the bundle.
    """
    output_dir = Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: save the model (model.save_pretrained) before bundling its code.")
    if model is None:
        from ..models import HistoClassifierForImageClassification

        model_cls, config_cls = (
            HistoClassifierForImageClassification,
            HistoClassifierForImageClassification.config_class,
        )
    else:
        model_cls, config_cls = type(model), type(model.config)
    fields = remote_code_fields(config_cls, model_cls)
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = saved.get("auto_map") or {}
    if saved.get("custom_pipelines") != fields["custom_pipelines"] or any(
        auto_map.get(key) != value for key, value in fields["auto_map"].items()
    ):
        raise ValueError(
            f"{config_path} lacks the remote-code fields (auto_map, custom_pipelines): write the folder with "
            "hf_histo.hub.save_for_hub, or call set_remote_code_config(model.config, model) before "
            "model.save_pretrained."
        )
    # saliency.py: the explanations of the folder's web app (app.py), which runs without hf_histo in a Space.
    written = write_code_bundle(output_dir, [HistoImageClassificationPipeline, model_cls, config_cls, patch_saliency])
    check_bundle_imports(written)
    return written
