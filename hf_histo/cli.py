"""The `hf-histo` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from .data.images import DataError, pixel_limit
from .data.patching import EMPTY_FALLBACKS, STRATEGIES, PatchingConfig
from .models.aggregation import AGGREGATIONS
from .models.configuration_histo import TTA_MODES

LAYOUT_CHOICES = ("challenge", "table", "class_folders", "manifest")
MODEL_HELP = "trained model folder (a recipe's --output_dir), cross-validation root, or Hub id (owner/name)"
PATCHING_FIELDS = tuple(f.name for f in fields(PatchingConfig))


def _add_data_options(p: argparse.ArgumentParser, skipped: str, on_error: str = "raise") -> None:
    """The data options of every command that reads data (the fixes its errors name), with the same meaning."""
    p.add_argument("--layout", choices=LAYOUT_CHOICES, default=None, help="force a data layout (default: detected)")
    p.add_argument(
        "--on_error",
        choices=("raise", "skip"),
        default=on_error,
        help=f"a bad image or data row: stop at the first, naming it and the fix (raise), or go on (skip: {skipped}). "
        f"Default: {on_error}.",
    )
    p.add_argument(
        "--resize_masks", action="store_true", help="resize masks whose size differs from their image (else an error)"
    )
    p.add_argument(
        "--max_image_pixels",
        type=int,
        default=None,
        help="pixel limit of PIL's decompression-bomb check; raise it for trusted large images",
    )


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"on_error": args.on_error, "resize_masks": args.resize_masks, "max_image_pixels": args.max_image_pixels}


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_patching_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per `PatchingConfig` field: the recipes' names, defaults and help (`DataArguments` mirrors them)."""
    types = {"stride": int, "min_fraction": float, "paint_background": _bool}
    choices = {"strategy": STRATEGIES, "empty_fallback": EMPTY_FALLBACKS}
    for f in fields(PatchingConfig):
        if f.name in skip:
            continue
        default = "" if f.default is None else f" Default: {f.default}."
        kwargs = {"default": f.default, "help": (f.metadata["help"] + default).replace("%", "%%")}
        if f.name == "paint_background":  # `--paint_background` alone, or with true/false as in the recipes
            kwargs.update(nargs="?", const=True)
        kwargs["type"] = types.get(f.name, type(f.default))
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        p.add_argument(f"--{f.name}", **kwargs)


def _patching(args: argparse.Namespace, **override: str) -> PatchingConfig:
    values = {name: value for name, value in vars(args).items() if name in PATCHING_FIELDS and name not in override}
    try:
        return PatchingConfig(**values, **override)
    except ValueError as e:  # a bad combination of flags: argparse's exit status and style, no traceback
        print(f"hf-histo {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset

    report = inspect_dataset(
        args.data,
        args.out,
        _patching(args, strategy=args.strategies[0]),
        strategies=tuple(args.strategies),
        layout=args.layout,
        **_data_options(args),
    )
    print(report.table())
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
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
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .inference.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        batch_size=args.batch_size,
        aggregation=args.aggregation,
        tta=args.tta,
        n_bootstrap=args.n_bootstrap,
        **_data_options(args),
    )
    print(json.dumps({"image": result.metrics, "ci": result.ci, "patch": result.patch_metrics}, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict_folder

    path = predict_folder(
        args.model,
        args.data,
        args.out,
        layout=args.layout,
        probs=args.probs,
        batch_size=args.batch_size,
        aggregation=args.aggregation,
        tta=args.tta,
        **_data_options(args),
    )
    print(f"wrote {path}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .inference.explain import explain_folder

    paths = explain_folder(
        args.model, args.data, args.out, layout=args.layout, max_images=args.max_images, **_data_options(args)
    )
    print(f"wrote {len(paths)} explanation images to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `hf-histo` command."""
    parser = argparse.ArgumentParser(
        prog="hf-histo",
        description="Histopathology image classification with the Hugging Face stack: "
        "inspect, clean and patch a data folder; evaluate, predict and explain with a trained model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="class counts, patches per image and flags; PNG overviews")
    p.add_argument("data", help="data folder (challenge, table or class-folder layout)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument(
        "--strategy",
        "--strategies",
        dest="strategies",
        nargs="+",
        choices=STRATEGIES,
        metavar="STRATEGY",
        default=["grid", "components", "topk"],
        help=f"patching strategies to compare, one or more of {', '.join(STRATEGIES)} (default: grid components topk)",
    )
    _add_patching_options(p, skip=("strategy", "paint_background"))  # inspection draws boxes, it crops nothing
    _add_data_options(p, "it is left out and listed in the report")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "build",
        help="cut patches into the cached HF dataset and print its splits",
        description="Cut patches into the cached HF dataset. The patching and split flags have the recipes' names "
        "and defaults, so the same flags build (and reuse) the same cache as a training run.",
    )
    p.add_argument("data", help="data folder or clean_manifest.csv")
    _add_patching_options(p)
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="share of groups (patients) held out for validation (default: 0.1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="split seed (default 42: a recipe splits with its --seed, whose default is 42, so the same flags give "
        "the same split and reuse the same cache)",
    )
    p.add_argument("--num_proc", type=int, default=None, help="processes cutting patches (default: one)")
    p.add_argument("--cache_dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE)")
    p.add_argument("--exclude", default=None, help="exclusion file (e.g. clean_out/exclusions.txt): one id per line")
    _add_data_options(p, "it is left out of the dataset and listed in the report")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("clean", help="find duplicates, non-tissue images and colour artifacts; nothing is deleted")
    p.add_argument("data", help="data folder")
    p.add_argument("--out", required=True, help="folder for the report, the clean manifest and contact sheets")
    p.add_argument("--exclude", default=None, help="manual exclusion file: one image id per line, '#' comments")
    _add_data_options(p, "it is left out")
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser("evaluate", help="image- and patch-level metrics of a trained model on a labelled folder")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="labelled data folder (any layout)")
    p.add_argument("--out", required=True, help="metrics JSON file to write")
    p.add_argument("--batch_size", type=int, default=32, help="patches per forward pass (default: 32)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=None, help="default: the model's")
    p.add_argument("--tta", choices=TTA_MODES, default=None, help="test-time augmentation; default: the model's")
    p.add_argument(
        "--n_bootstrap", type=int, default=1000, help="resamples of the macro-F1 95%% interval (default: 1000)"
    )
    _add_data_options(p, "it is left out of the metrics, listed on stderr and in the JSON's failed list")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="one label per image into a submission CSV (sample_index,label)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="data folder (any layout, labelled or not)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--probs", action="store_true", help="add one probability column per class")
    p.add_argument("--batch_size", type=int, default=32, help="patches per forward pass (default: 32)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=None, help="default: the model's")
    p.add_argument("--tta", choices=TTA_MODES, default=None, help="test-time augmentation; default: the model's")
    _add_data_options(
        p,
        "a bad image keeps its row, with an empty label and the reason in an error column; listed on stderr",
        on_error="skip",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="per-image PNGs: patch probabilities and attention/Grad-CAM")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="data folder")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--max_images", type=int, default=None, help="explain the first N images (default: all)")
    _add_data_options(p, "a bad image gets no PNG and is listed on stderr", on_error="skip")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("demo", help="the whole product on generated (synthetic) data, offline, in minutes")
    p.add_argument("--out", default="hf_histo_demo", help="folder for everything the demo writes")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer steps (for tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `hf-histo` command; returns the exit status (2 for data errors, with a one-line message)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    # The library's warnings (e.g. the images `--on_error skip` left out) go to this command's stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"hf-histo {args.command}: %(levelname)s: %(message)s"))
    library = logging.getLogger("hf_histo")
    saved = library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    library.propagate = False
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (DataError, FileNotFoundError) as e:
        print(f"hf-histo {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        library.removeHandler(handler)
        library.setLevel(saved[0])
        library.propagate = saved[1]


if __name__ == "__main__":
    sys.exit(main())
