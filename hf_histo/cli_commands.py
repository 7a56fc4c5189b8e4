"""What each `hf-histo` subcommand does with its parsed arguments: one library call, imported when it runs."""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import fields
from typing import Any

from .data.images import pixel_limit
from .data.patching import PatchingConfig

PATCHING_FIELDS = tuple(f.name for f in fields(PatchingConfig))


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"on_error": args.on_error, "resize_masks": args.resize_masks, "max_image_pixels": args.max_image_pixels}


def _roi_model(args: argparse.Namespace) -> str | bool | None:
    """--roi_model: a folder or Hub id; 'none' turns off the model config's own (False); None: the config's."""
    return False if args.roi_model is not None and args.roi_model.lower() == "none" else args.roi_model


def _patching(args: argparse.Namespace, **override: str) -> PatchingConfig:
    values = {name: value for name, value in vars(args).items() if name in PATCHING_FIELDS and name not in override}
    try:
        return PatchingConfig(**values, **override)
    except ValueError as e:  # a bad combination of flags: argparse's exit status and style, no traceback
        print(f"hf-histo {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset

    report = inspect_dataset(
        args.data,
        args.out,
        _patching(args, strategy=args.strategy[0]),
        strategies=tuple(args.strategy),
        layout=args.layout,
        **_data_options(args),
    )
    print(report.table())
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .data.builder import build_patch_dataset

    dataset, report = build_patch_dataset(
        args.data,
        _patching(args),
        val_fraction=args.val_fraction,
        seed=args.seed,
        cache_dir=args.cache_dir,
        layout=args.layout,
        exclude=args.exclude,
        num_proc=args.num_proc,
        **_data_options(args),
    )
    print(dataset)
    print(report.summary())
    print(
        "(the summary's last line is the cache folder: a recipe run with the same data, patching and split flags "
        "reuses it)"
    )
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from .data.cleaning import clean_dataset

    # clean_dataset decodes with PIL's global limit (in forked workers too); it may not take every data option yet.
    taken = inspect.signature(clean_dataset).parameters
    options = {name: value for name, value in _data_options(args).items() if name in taken}
    if args.on_error == "skip" and "on_error" not in taken:
        print(f"hf-histo {args.command}: warning: --on_error skip is not supported by clean yet", file=sys.stderr)
    with pixel_limit(args.max_image_pixels):
        result = clean_dataset(args.data, args.out, layout=args.layout, manual_exclusions=args.exclude, **options)
    print(result.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .inference.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        masks=args.masks,
        batch_size=args.batch_size,
        aggregation=args.aggregation,
        tta=args.tta,
        num_workers=args.num_workers,
        n_bootstrap=args.n_bootstrap,
        calibrate=not args.no_calibration,
        roi_model=_roi_model(args),
        **_data_options(args),
    )
    print(result.table())
    print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict_folder

    path = predict_folder(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        masks=args.masks,
        split=args.split,
        probs=args.probs,
        batch_size=args.batch_size,
        aggregation=args.aggregation,
        tta=args.tta,
        num_workers=args.num_workers,
        calibrate=not args.no_calibration,
        roi_model=_roi_model(args),
        **_data_options(args),
    )
    print(f"wrote {path}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .inference.explain import explain_folder

    paths = explain_folder(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        masks=args.masks,
        max_images=args.max_images,
        batch_size=args.batch_size,
        calibrate=not args.no_calibration,
        roi_model=_roi_model(args),
        **_data_options(args),
    )
    print(f"wrote {len(paths)} explanation images to {args.out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference.segment import segment_folder

    result = segment_folder(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        split=args.split,
        window_size=args.window_size,
        window_overlap=args.window_overlap,
        batch_size=args.batch_size,
        on_error=args.on_error,
        max_image_pixels=args.max_image_pixels,
        overwrite=args.overwrite_output_dir,
    )
    print(result.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .cli_recipes import recipe_summaries, recipes_table

    recipes = recipe_summaries()
    if not recipes:
        print("hf-histo recipes: error: no recipes found in the hf_histo.recipes package", file=sys.stderr)
        return 1
    print(recipes_table(recipes))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from .app import serve
    except ModuleNotFoundError as e:  # gradio is the optional `app` extra
        if e.name != "gradio":
            raise
        print("hf-histo app: error: the web app needs gradio: pip install 'hf-histo[app]'", file=sys.stderr)
        return 2
    try:
        serve(args.model, host=args.host, port=args.port, max_image_pixels=args.max_image_pixels)
    except OSError as e:  # a missing model folder (FileNotFoundError) or a port in use
        print(f"hf-histo app: error: {e}", file=sys.stderr)
        return 2
    return 0
