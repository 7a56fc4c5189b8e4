"""The `hf-histo` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

# The parser is built from torch-free modules only (`hf-histo --help` answers at once); each `cmd_*` in cli_commands imports
# the library function it calls.
from .cli_commands import (
    cmd_app,
    cmd_build,
    cmd_clean,
    cmd_demo,
    cmd_evaluate,
    cmd_explain,
    cmd_inspect,
    cmd_predict,
    cmd_recipes,
    cmd_segment,
)
from .cli_parser import CommandParser, str_to_bool
from .data.images import DataError
from .data.patching import EMPTY_FALLBACKS, STAIN_NORMS, STRATEGIES, PatchingConfig
from .data.sources import LAYOUTS, SPLIT_CHOICES
from .data.workers import default_num_proc
from .models.aggregation import AGGREGATIONS, TTA_MODES

MODEL_HELP = "trained model folder (a recipe's --output_dir), cross-validation root, or Hub id (owner/name); required"
DEFAULT_BATCH_SIZE = 32  # the library functions' default; recipes evaluate with --per_device_eval_batch_size
DEFAULT_NUM_WORKERS = 2  # inference.engine.DEFAULT_NUM_WORKERS, repeated here so that --help imports no torch


def _add_data_options(
    p: argparse.ArgumentParser, skipped: str, on_error: str = "raise", resize_masks: bool = True
) -> None:
    """The data options of every command that reads data (the fixes its errors name), with the recipes' names."""
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="force a data layout (default: detected from the files)",
    )
    p.add_argument(
        "--on_error",
        choices=("raise", "skip"),
        default=on_error,
        help=f"a bad image or data row: stop at the first, naming it and the fix (raise), or go on (skip: {skipped}) "
        f"(default: {on_error})",
    )
    if resize_masks:  # not for a command that reads no masks (segment)
        p.add_argument(
            "--resize_masks",
            type=str_to_bool,
            nargs="?",
            const=True,
            default=False,
            metavar="BOOL",
            help="resize masks whose size differs from their image instead of failing; alone or with true/false "
            "(default: false)",
        )
    p.add_argument(
        "--max_image_pixels",
        type=int,
        metavar="N",
        default=None,
        help="pixel limit of PIL's decompression-bomb check; raise it for trusted large images "
        "(default: PIL's, about 89 million)",
    )


def _add_patching_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per `PatchingConfig` field: the recipes' names, defaults and help (`DataArguments` mirrors them)."""
    types = {"stride": int, "min_fraction": float, "paint_background": str_to_bool}
    choices = {"strategy": STRATEGIES, "empty_fallback": EMPTY_FALLBACKS, "stain_norm": STAIN_NORMS}
    for f in fields(PatchingConfig):
        if f.name in skip:
            continue
        text = f.metadata["help"].rstrip(".")
        if f.default is not None:
            text += f" (default: {str(f.default).lower() if isinstance(f.default, bool) else f.default})"
        elif "default" not in text:
            text += " (default: none)"
        kwargs: dict[str, Any] = {"default": f.default, "help": text.replace("%", "%%")}
        if f.name == "paint_background":  # `--paint_background` alone, or with true/false as in the recipes
            kwargs.update(nargs="?", const=True)
        kwargs["type"] = types.get(f.name, type(f.default))
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        p.add_argument(f"--{f.name}", **kwargs)


def _add_inference_options(p: argparse.ArgumentParser, choices: bool = True) -> None:
    """--masks, --batch_size, --roi_model, --no_calibration and (predict, evaluate) --num_workers/--aggregation/--tta:
    the options of the commands over a model."""
    p.add_argument(
        "--masks",
        metavar="DIR",
        default=None,
        help="masks for a plain folder of images: a folder of masks named like the images (or one mask file when "
        "DATA is one image file); a given mask overrides the layout's own (default: none: the layout's masks, "
        "else tissue detection)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        metavar="N",
        default=DEFAULT_BATCH_SIZE,
        help=f"patches per forward pass (default: {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--roi_model",
        metavar="DIR",
        default=None,
        help="ROI segmentation model (folder or Hub id, e.g. recipes/roi_segmentation.py's output): images without a "
        "mask are patched on the region it predicts instead of detected tissue; 'none' turns off the model's own "
        "(default: the model config's roi_model when set, else tissue detection)",
    )
    p.add_argument(
        "--no_calibration",
        action="store_true",
        help="report the raw aggregated image probabilities, without the temperature the model fitted on its "
        "validation images (default: off: the model's temperature is applied, as in its reported figures; labels "
        "are the same either way)",
    )
    if choices:
        p.add_argument(
            "--num_workers",
            type=int,
            metavar="N",
            default=DEFAULT_NUM_WORKERS,
            help="threads that decode and patch the next images while the model runs; results are the same for any "
            f"value (default: {DEFAULT_NUM_WORKERS}; 0: one image at a time)",
        )
        p.add_argument(
            "--aggregation",
            choices=AGGREGATIONS,
            default=None,
            help="patch-to-image vote (default: the model's, which its reported figures used)",
        )
        p.add_argument(
            "--tta",
            choices=TTA_MODES,
            default=None,
            help="test-time augmentation views averaged per patch (default: the model's, which its reported "
            "figures used)",
        )


def _add_command(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> CommandParser:
    p: CommandParser = sub.add_parser(name, help=help, description=kwargs.pop("description", help), **kwargs)
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages (default: off)"
    )
    return p


def build_parser() -> CommandParser:
    """The argument parser of the `hf-histo` command."""
    parser = CommandParser(
        prog="hf-histo",
        description="Histopathology image classification with the Hugging Face stack: "
        "inspect, clean and patch a data folder; evaluate, predict, explain and serve (app) a trained model; "
        "segment images with a region-of-interest model.",
        epilog="Every command that reads data takes it as DATA or --data DATA. 'hf-histo COMMAND --help' lists "
        "its options; 'hf-histo recipes' lists the training recipes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (default: off)")
    sub = parser.add_commands(dest="command", required=True, metavar="COMMAND")

    p = _add_command(sub, "inspect", "class counts, patches per image and flags; PNG overviews")
    p.add_data_argument("data folder (any layout) or clean_manifest.csv")
    p.add_argument("--out", required=True, help="folder for the PNGs and inspection.json; required")
    p.add_argument(
        "--strategy",
        nargs="+",
        choices=STRATEGIES,
        metavar="STRATEGY",
        default=["grid", "components", "topk"],
        help="patching strategies to compare, one or more; it takes several values, so give DATA before it or as "
        "--data (default: grid components topk)",
    )
    _add_patching_options(p, skip=("strategy", "paint_background"))  # inspection draws boxes, it crops nothing
    _add_data_options(p, "it is left out and listed in the report")
    p.set_defaults(func=cmd_inspect)

    p = _add_command(
        sub,
        "build",
        "cut patches into the cached HF dataset and print its splits and where the cache is",
        description="Cut patches into the cached HF dataset and print its splits and its cache folder. The flags "
        "have the recipes' names and DataArguments' defaults; each recipe sets its own patching (and some their "
        "own --val_fraction) in RECIPE_DEFAULTS, so pass the recipe's values to build, and reuse, its cache.",
    )
    p.add_data_argument("data folder (any layout) or clean_manifest.csv")
    _add_patching_options(p)
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="share of groups (patients) held out for validation (default: 0.1, DataArguments'; a recipe may set "
        "its own in RECIPE_DEFAULTS)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="split seed: a recipe splits with its --seed, so the same flags give the same split and reuse the same "
        "cache (default: 42, the recipes')",
    )
    p.add_argument(
        "--num_proc",
        type=int,
        default=default_num_proc(),
        help=f"processes cutting patches, as the recipes' --num_proc (default: {default_num_proc()}, the available "
        "CPUs, at most 8)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="datasets cache folder, as the recipes' --cache_dir (default: HF_DATASETS_CACHE, "
        "~/.cache/huggingface/datasets)",
    )
    p.add_argument(
        "--exclude",
        default=None,
        help="file of image ids to leave out, one per line (e.g. clean_out/exclusions.txt) (default: none)",
    )
    _add_data_options(p, "it is left out of the dataset and listed in the report")
    p.set_defaults(func=cmd_build)

    p = _add_command(sub, "clean", "find duplicates, non-tissue images and colour artifacts; nothing is deleted")
    p.add_data_argument("data folder (any layout)")
    p.add_argument(
        "--out", required=True, help="folder for the report, the clean manifest and contact sheets; required"
    )
    p.add_argument(
        "--exclude",
        default=None,
        help="manual exclusion file: one image id per line, '#' comments (default: none)",
    )
    _add_data_options(p, "it is left out")
    p.set_defaults(func=cmd_clean)

    p = _add_command(sub, "evaluate", "image- and patch-level metrics of a trained model on labelled data")
    p.add_data_argument("labelled data: a data folder (any layout) or clean_manifest.csv")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="metrics JSON file to write; required")
    _add_inference_options(p)
    p.add_argument(
        "--n_bootstrap",
        type=int,
        default=1000,
        help="resamples of the macro-F1 95%% interval, as the recipes' --n_bootstrap (default: 1000)",
    )
    _add_data_options(p, "it is left out of the metrics, listed on stderr and in the JSON's failed list")
    p.set_defaults(func=cmd_evaluate)

    p = _add_command(sub, "predict", "one label per image into a submission CSV (sample_index,label)")
    p.add_data_argument(
        "images: a data folder (any layout, labelled or not), a plain folder of images, one image file, "
        "or clean_manifest.csv"
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="CSV file to write; required")
    p.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default=None,
        help="which images to predict; train and test need a layout with splits: challenge, table or manifest "
        "(default: the test images on the challenge layout, a valid submission; all images on the others)",
    )
    p.add_argument("--probs", action="store_true", help="add one probability column per class (default: labels only)")
    _add_inference_options(p)
    _add_data_options(
        p,
        "a bad image keeps its row, with an empty label and the reason in an error column; listed on stderr",
        on_error="skip",
    )
    p.set_defaults(func=cmd_predict)

    p = _add_command(sub, "explain", "per-image PNGs: patch probabilities and attention/Grad-CAM")
    p.add_data_argument("images: a data folder (any layout), a plain folder of images, or one image file")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the PNGs; required")
    p.add_argument("--max_images", type=int, default=None, help="explain the first N images (default: all)")
    _add_inference_options(p, choices=False)
    _add_data_options(p, "a bad image gets no PNG and is listed on stderr", on_error="skip")
    p.set_defaults(func=cmd_explain)

    p = _add_command(
        sub,
        "segment",
        "predict a region-of-interest mask per image with a segmentation model; write images/ + masks/ + labels.csv",
        description="Predict the region-of-interest mask of every image with a segmentation model (sliding windows) "
        "and write OUT as a data folder every command reads: images/ (copies of the images), masks/ "
        "(one PNG per image, same name: 0/255 for a binary model, the class index otherwise) and, for labelled data, "
        "labels.csv.",
    )
    p.add_data_argument("images: a data folder (any layout), a plain folder of images, one image file, or a manifest")
    p.add_argument(
        "--model", required=True, help="segmentation model folder (recipes/roi_segmentation.py) or Hub id; required"
    )
    p.add_argument("--out", required=True, help="folder to write images/, masks/ and labels.csv in; required")
    p.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default=None,
        help="which images; train and test need a layout with splits (default: all images)",
    )
    p.add_argument("--window_size", type=int, metavar="N", default=None, help="window side (default: the model's)")
    p.add_argument(
        "--window_overlap",
        type=float,
        metavar="F",
        default=None,
        help="share of a window overlapping its neighbour, in [0, 1) (default: the model's)",
    )
    p.add_argument("--batch_size", type=int, metavar="N", default=8, help="windows per forward pass (default: 8)")
    p.add_argument(
        "--overwrite_output_dir",
        type=str_to_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="replace the images/, masks/ and labels.csv of an earlier run in OUT; alone or with true/false "
        "(default: false: refuse them)",
    )
    _add_data_options(p, "it gets no mask and is left out of OUT, listed on stderr", "skip", resize_masks=False)
    p.set_defaults(func=cmd_segment)

    p = _add_command(sub, "demo", "the whole product on generated (synthetic) data, offline, in minutes")
    p.add_argument(
        "--out", default="hf_histo_demo", help="folder for everything the demo writes (default: hf_histo_demo)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smaller data and fewer steps, for tests (default: the full demo)"
    )
    p.set_defaults(func=cmd_demo)

    p = _add_command(sub, "app", "serve a trained model in the browser (Gradio): label, patch map, explanation, CSV")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 serves other machines (default: 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument(
        "--max_image_pixels",
        type=int,
        metavar="N",
        default=None,
        help="pixel limit of PIL's decompression-bomb check; raise it for trusted large images (default: PIL's)",
    )
    p.set_defaults(func=cmd_app)

    p = _add_command(sub, "recipes", "list the training recipes: the seed system each reproduces, how to launch it")
    p.set_defaults(func=cmd_recipes)

    for command in parser.commands.values():
        command.set_usage()
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
