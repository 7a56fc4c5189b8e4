"""The `hf-histo` command line: every --help, a lazy import, DATA or --data, one-line hints, recipes, registration."""

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from tiny_models import tiny_model, tissue_image

import hf_histo
import hf_histo.models
from hf_histo.cli import build_parser, main
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.transforms import make_image_processor

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.name != "__init__.py")
DATA_COMMANDS = ("inspect", "build", "clean", "evaluate", "predict", "explain")
HEAVY = ("torch", "transformers")


def run_main(capsys, *argv: str) -> SimpleNamespace:
    """`main(argv)` in-process: exit code (argparse exits too), stdout and stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(code=code, out=out.out, err=out.err)


def python(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime` output (`import time: self | cumulative | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


# ---- --help ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, *build_parser().commands])
def test_every_subcommand_answers_help(capsys, command):
    result = run_main(capsys, *([command] if command else []), "--help")
    assert result.code == 0 and result.out.startswith("usage: hf-histo"), result.err
    if command in DATA_COMMANDS:
        assert result.out.startswith(f"usage: hf-histo {command} DATA"), result.out.splitlines()[0]
        assert "--data DATA" in result.out


def test_every_option_states_its_default_or_that_it_is_required():
    for name, command in build_parser().commands.items():
        for action in command._actions:
            if not action.option_strings or "--help" in action.option_strings:
                continue
            text = (action.help or "").lower()
            assert "default" in text or "required" in text, (name, action.option_strings, action.help)


def test_option_names_are_the_recipes_and_build_has_their_defaults():
    from hf_histo.training.arguments import make_parser

    recipe = {o: a for a in make_parser()._actions for o in a.option_strings}
    own = {"--data", "--model", "--out", "--masks", "--split", "--probs", "--batch_size", "--max_images"}
    own |= {"--num_proc", "--num_workers", "--quick", "--verbose", "-v", "--help", "-h", "--host", "--port"}
    own |= {"--no_calibration", "--roi_model", "--window_size", "--window_overlap"}
    parser = build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            for option in action.option_strings:
                assert option in own or option in recipe, f"hf-histo {name} {option}: not a recipe flag"
    assert "--strategies" not in parser.commands["inspect"]._option_string_actions
    build = {o: a for a in parser.commands["build"]._actions for o in a.option_strings}
    for option, action in build.items():
        if option in recipe and option not in ("--help", "-h"):
            assert action.default == recipe[option].default, option


@pytest.mark.slow  # each recipe imports transformers and torch (~10 s each here)
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_answers_help(recipe):
    result = python(str(recipe.relative_to(ROOT)), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    own = "--crop_size" if recipe.stem == "roi_segmentation" else "--strategy"
    assert "--data_dir" in result.stdout and own in result.stdout


# ---- import time: no torch, no transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "hf_histo.cli", "--help"],
        ["-m", "hf_histo.cli", "predict", "--help"],
        ["-m", "hf_histo.cli", "recipes"],
        ["-c", "import hf_histo; hf_histo.PatchingConfig; hf_histo.aggregate; hf_histo.read_samples"],
        ["-c", "import hf_histo.data.images, hf_histo.models.aggregation, hf_histo.models; hf_histo.models.BACKBONES"],
    ],
    ids=["help", "predict-help", "recipes", "import-hf_histo", "import-submodules"],
)
def test_help_and_import_load_neither_torch_nor_transformers(argv):
    result = python("-X", "importtime", *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = imported_modules(result.stderr)
    assert "hf_histo" in modules  # the parse worked
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_public_names_resolve_lazily_and_unknown_names_raise():
    for package in (hf_histo, hf_histo.models):
        assert package.__all__ == sorted(package.__all__)
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018
    assert hf_histo.PatchingConfig is PatchingConfig
    assert hf_histo.models.register_auto_classes.__module__ == "hf_histo.models"


# ---- registration still happens before first use --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny classifier saved with `save_pretrained` (no custom_pipelines), its processor and a tissue image."""
    folder = tmp_path_factory.mktemp("cli") / "model"
    tiny_model().save_pretrained(folder)
    make_image_processor(32).save_pretrained(folder)
    Image.fromarray(tissue_image()).save(folder.parent / "image.png")
    return folder


LAZY_CHILD = textwrap.dedent(
    """
    import json, sys
    import hf_histo

    folder = sys.argv[1]
    lazy = "torch" not in sys.modules and "transformers" not in sys.modules
    from hf_histo.inference.loading import load_engine

    engine = load_engine(folder)  # the library's loader registers the Auto classes itself
    hf_histo.load_pipeline  # reading a pipeline name registers the pipeline task
    import transformers

    pipe = transformers.pipeline("histo-image-classification", model=folder)
    result = pipe(sys.argv[2])
    print(json.dumps({"lazy": lazy, "engine": type(engine).__name__, "pipe": type(pipe).__name__, "top": result[0]}))
    """
)

EAGER_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import hf_histo  # torch already loaded: the package registers at import

    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    config = AutoConfig.for_model("histo_classifier")
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
    tasks = PIPELINE_REGISTRY.get_supported_tasks()
    print(json.dumps({"config": type(config).__name__, "model": type(model).__name__, "task": "histo-image-classification" in tasks}))
    """
)


def test_registration_happens_on_first_use_after_a_lazy_import(saved_model):
    result = python("-c", LAZY_CHILD, str(saved_model), str(saved_model.parent / "image.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["lazy"] and got["engine"] == "InferenceEngine" and got["pipe"] == "HistoImageClassificationPipeline"
    assert set(got["top"]) == {"label", "score"}


def test_registration_is_eager_when_torch_was_imported_first(saved_model):
    result = python("-c", EAGER_CHILD, str(saved_model))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got == {"config": "HistoClassifierConfig", "model": "HistoClassifierForImageClassification", "task": True}


# ---- DATA or --data: the same call -------------------------------------------------------------------------------------
def fake_results(command: str):
    """What each library function returns, as much as the CLI reads of it."""
    table = SimpleNamespace(table=lambda: "TABLE", summary=lambda: "SUMMARY")
    report = SimpleNamespace(summary=lambda: "SUMMARY", cache_dir="cache/histo_patches/x")
    return {
        "inspect": table,
        "build": ("DATASET", report),
        "clean": table,
        "evaluate": table,
        "predict": Path("out.csv"),
        "explain": [Path("a.png")],
    }[command]


LIBRARY = {
    "inspect": ("hf_histo.data.inspect", "inspect_dataset"),
    "build": ("hf_histo.data.builder", "build_patch_dataset"),
    "clean": ("hf_histo.data.cleaning", "clean_dataset"),
    "evaluate": ("hf_histo.inference.evaluate", "evaluate_model"),
    "predict": ("hf_histo.inference.predict", "predict_folder"),
    "explain": ("hf_histo.inference.explain", "explain_folder"),
}
REQUIRED = {"inspect": ["--out", "o"], "clean": ["--out", "o"], "build": []}


def record_calls(monkeypatch, command: str) -> list:
    module_name, function = LIBRARY[command]
    module = importlib.import_module(module_name)
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return fake_results(command)

    monkeypatch.setattr(module, function, fake)
    return calls


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_data_positional_and_option_make_the_same_call(monkeypatch, capsys, command):
    calls = record_calls(monkeypatch, command)
    options = REQUIRED.get(command, ["--model", "m", "--out", "o"])
    positional = run_main(capsys, command, "slides", *options)
    aliased = run_main(capsys, command, *options, "--data", "slides")
    assert positional.code == aliased.code == 0, positional.err + aliased.err
    assert len(calls) == 2 and calls[0] == calls[1]
    args, kwargs = calls[0]
    assert "slides" in args or kwargs.get("data_dir") == "slides", calls[0]
    assert positional.out == aliased.out
    if command == "build":
        assert "cache folder" in positional.out and "reuses it" in positional.out
    if command == "evaluate":
        assert positional.out.splitlines() == ["TABLE", "wrote o"]


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_data_twice_or_missing_is_a_usage_error(monkeypatch, capsys, command):
    calls = record_calls(monkeypatch, command)
    options = REQUIRED.get(command, ["--model", "m", "--out", "o"])
    both = run_main(capsys, command, "a", "--data", "b", *options)
    assert both.code == 2 and f"hf-histo {command}: error: DATA given twice" in both.err
    neither = run_main(capsys, command, *options)
    assert neither.code == 2 and "required: DATA (or --data DATA)" in neither.err
    assert calls == []


def test_inference_options_are_wired(monkeypatch, capsys):
    calls = record_calls(monkeypatch, "predict")
    base = ["predict", "d", "--model", "m", "--out", "o.csv"]
    assert run_main(capsys, *base).code == 0
    assert calls[-1][1]["split"] is None and calls[-1][1]["masks"] is None  # the library picks the split
    assert run_main(capsys, *base, "--split", "all", "--masks", "md", "--batch_size", "4", "--tta", "d4").code == 0
    kwargs = calls[-1][1]
    assert (kwargs["split"], kwargs["masks"], kwargs["batch_size"], kwargs["tta"]) == ("all", "md", 4, "d4")
    for command in ("evaluate", "explain"):
        calls = record_calls(monkeypatch, command)
        assert run_main(capsys, command, "d", "--model", "m", "--out", "o", "--masks", "md").code == 0
        assert calls[-1][1]["masks"] == "md"
    calls = record_calls(monkeypatch, "inspect")
    assert run_main(capsys, "inspect", "d", "--out", "o", "--strategy", "topk", "grid").code == 0
    assert calls[-1][1]["strategies"] == ("topk", "grid") and calls[-1][0][2].strategy == "topk"


# ---- a mistyped option: the error and a one-line hint ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (
            ["predict", "d", "--model", "m", "--out", "o", "--batchsize", "8"],
            "hf-histo predict: did you mean --batch_size?",
        ),
        (["inspect", "d", "--out", "o", "--strategies", "grid"], "hf-histo inspect: did you mean --strategy?"),
        (["build", "d", "--patchsize", "64"], "hf-histo build: did you mean --patch_size?"),
        (["predcit", "d"], "hf-histo: did you mean predict?"),
        (["predict", "d", "--model", "m", "--out", "o", "--tta", "flip"], "hf-histo predict: did you mean flips?"),
        (["evaluate", "d", "--out", "o"], "hf-histo evaluate:"),  # a required option: no guess, just the hint
    ],
)
def test_a_usage_error_prints_the_error_and_a_one_line_hint(capsys, argv, hint):
    result = run_main(capsys, *argv)
    lines = result.err.splitlines()
    assert result.code == 2 and result.out == ""
    assert len(lines) == 2, lines  # not the whole usage
    assert lines[0].startswith(hint.split(":")[0] + ": error: ")
    assert lines[1].startswith(hint) and lines[1].endswith(f"see '{lines[1].split(':')[0]} --help'"), lines[1]


def test_a_mistyped_option_from_the_shell_is_two_lines():
    result = python("-m", "hf_histo.cli", "predict", "d", "--model", "m", "--out", "o", "--batchsize", "8")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "hf-histo predict: error: unrecognized arguments: --batchsize 8",
        "hf-histo predict: did you mean --batch_size? see 'hf-histo predict --help'",
    ]


# ---- hf-histo recipes ------------------------------------------------------------------------------------------------------
def test_recipes_lists_every_recipe_with_what_it_reproduces_and_a_launch_command(capsys):
    result = run_main(capsys, "recipes")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    for recipe in RECIPES:
        first = recipe.read_text(encoding="utf-8").split('"""')[1].splitlines()[0]
        (row,) = [i for i, line in enumerate(lines) if line.startswith(recipe.stem + " ")]
        assert lines[row].endswith(first), lines[row]
        launch = lines[row + 1].strip()
        assert launch.startswith(("accelerate launch ", "python ")) and f"recipes/{recipe.stem}.py" in launch, launch
    assert "python -m hf_histo.recipes.NAME" in result.out
