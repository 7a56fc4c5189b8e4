"""Bad input at every entry point: one row per issue case, with the behaviour it must have (nothing lost, and
messages that name the input and a fix that exists)."""

import csv
import functools
import json
import runpy
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import hf_histo.inference.evaluate as evaluate_module
import hf_histo.inference.explain as explain_module
import hf_histo.inference.predict as predict_module
from hf_histo.cli import build_parser, main
from hf_histo.data.images import DataError
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.explain import explain_folder
from hf_histo.inference.loading import load_engine, load_pipeline
from hf_histo.inference.predict import predict_folder
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification, tiny_backbone_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.name != "__init__.py")
LABELS = {0: "HER2(+)", 1: "Luminal A", 2: "Luminal B"}
FORMULA_LABELS = {0: "=HYPERLINK(1)", 1: "-neg", 2: "@pos", 3: "+plus"}
DATA_COMMANDS = ("inspect", "build", "clean", "evaluate", "predict", "explain")
FORMULA_START = ("=", "+", "-", "@")


# ---- fixtures ---------------------------------------------------------------------------------------------------------
def tiny_model(labels: dict[int, str] = LABELS) -> HistoClassifierForImageClassification:
    torch.manual_seed(0)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config("vit"),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        patching={"strategy": "grid", "patch_size": 32, "min_foreground": 200},
    )
    return HistoClassifierForImageClassification(config).eval()


def tissue(seed: int, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), 240, dtype=np.uint8)
    image[10:70, 10:86] = rng.integers(60, 220, size=(60, 76, 3))
    return image


def write_challenge(root: Path, n: int = 3, corrupt: int | None = None, small_mask: int | None = None) -> Path:
    """Challenge layout with `n` labelled images; image `corrupt` is not an image, mask `small_mask` is 5x5."""
    (root / "train_data").mkdir(parents=True)
    rows = ["sample_index,label"]
    for i in range(n):
        image, mask = root / "train_data" / f"img_{i:04d}.png", root / "train_data" / f"mask_{i:04d}.png"
        Image.fromarray(tissue(i)).save(image)
        Image.fromarray(np.full((5, 5) if i == small_mask else (80, 96), 255, dtype=np.uint8)).save(mask)
        if i == corrupt:
            image.write_bytes(b"not a png")
        rows.append(f"img_{i:04d}.png,{LABELS[i % 3]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_for_hub(
        tiny_model(), tmp_path_factory.mktemp("vit") / "model", image_processor=make_image_processor(32)
    )


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server (no network needed): good.png, bomb.png (8000 px), anything else 404."""
    root = tmp_path_factory.mktemp("www")
    Image.fromarray(tissue(0)).save(root / "good.png")
    Image.fromarray(np.zeros((80, 100, 3), dtype=np.uint8)).save(root / "bomb.png")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def env(model_dir, pipe, server, tmp_path, monkeypatch, capsys, caplog):
    return SimpleNamespace(
        model=model_dir, pipe=pipe, url=server, tmp=tmp_path, mp=monkeypatch, capsys=capsys, caplog=caplog
    )


# ---- helpers the rows use ----------------------------------------------------------------------------------------------
@dataclass
class Cli:
    code: int
    out: str
    err: str


def cli(env: SimpleNamespace, *argv: str) -> Cli:
    env.capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code
    captured = env.capsys.readouterr()
    return Cli(code, captured.out, captured.err)


def no_model_loading(env: SimpleNamespace, engines: bool = True) -> None:
    """Fail the test if a model would be loaded (the check must come before the work)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    for module in (predict_module, evaluate_module, explain_module) if engines else ():
        env.mp.setattr(module, "load_engine", refuse)
    from transformers import AutoModelForImageClassification

    env.mp.setattr(AutoModelForImageClassification, "from_pretrained", refuse)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/slide.png"


def same_scores(a: list[dict], b: list[dict]) -> None:
    assert [e["label"] for e in a] == [e["label"] for e in b]
    np.testing.assert_allclose([e["score"] for e in a], [e["score"] for e in b], atol=1e-6)


# ---- case 7: float images --------------------------------------------------------------------------------------------
def float_image_past_one(env):
    image = tissue(1)
    unit = image.astype(np.float32) / 255
    unit[12, 12, 0] = 1.0001  # rounding noise above 1: still a [0, 1] image
    expected = image.copy()
    expected[12, 12, 0] = 255
    same_scores(env.pipe(unit, top_k=3), env.pipe(expected, top_k=3))


def float_image_with(value: float) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        unit = tissue(1).astype(np.float32) / 255
        unit[40, 40, 1] = value
        return env.pipe(unit)

    return run


# ---- case 12: one bad image ------------------------------------------------------------------------------------------
def pipeline_list_keeps_the_good_images(env):
    good = env.tmp / "good.png"
    Image.fromarray(tissue(0)).save(good)
    bad = env.tmp / "bad.png"
    bad.write_bytes(b"not a png")
    results = env.pipe([str(good), str(bad), tissue(2), np.zeros((0, 0, 3), np.uint8)], top_k=3)
    assert len(results) == 4
    same_scores(results[0], env.pipe(str(good), top_k=3))
    assert results[1].keys() == {"error"} and str(bad) in results[1]["error"]
    same_scores(results[2], env.pipe(tissue(2), top_k=3))
    assert results[3].keys() == {"error"} and "image 3" in results[3]["error"] and "empty" in results[3]["error"]


def single_bad_image(env):
    bad = env.tmp / "bad.png"
    bad.write_bytes(b"not a png")
    env.pipe(str(bad))


def engine_shares_batches_past_a_bad_item(env):
    engine = load_engine(env.model, device="cpu", batch_size=5)  # 6 patches an image: batches span images
    bad = env.tmp / "bad.png"
    bad.write_bytes(b"not a png")
    items = [(tissue(0), None, "a"), (bad, None, "b"), (tissue(2), None, "c")]
    out = list(engine.predict_many(items, return_errors=True))
    assert isinstance(out[1], DataError) and str(bad) in str(out[1])
    for result, (image, _, image_id) in zip((out[0], out[2]), (items[0], items[2])):
        np.testing.assert_allclose(result.probs, engine.predict(image, image_id=image_id).probs, atol=1e-6)
        assert result.image_id == image_id


def predict_skip_keeps_the_other_rows(env):
    data = write_challenge(env.tmp / "data", corrupt=1)
    rows = read_csv(predict_folder(env.model, data, env.tmp / "sub.csv", on_error="skip", probs=True, progress=False))
    assert rows[0] == ["sample_index", "label", *LABELS.values(), "error"]
    assert [r[0] for r in rows[1:]] == ["img_0000.png", "img_0001.png", "img_0002.png"]
    assert rows[2][1:5] == ["", "", "", ""] and "img_0001.png: not an image file" in rows[2][5]
    assert rows[1][1] in LABELS.values() and rows[1][5] == "" and rows[3][5] == ""
    assert "1 of 3 images failed" in env.caplog.text and "img_0001.png" in env.caplog.text


def predict_raise_names_the_file_and_the_switch(env):
    data = write_challenge(env.tmp / "data", corrupt=1)
    try:
        predict_folder(env.model, data, env.tmp / "sub.csv", progress=False)
    finally:
        assert not (env.tmp / "sub.csv").exists()


def cli_predict_default_keeps_the_rest(env):
    data = write_challenge(env.tmp / "data", corrupt=2)
    result = cli(env, "predict", "--model", env.model, "--data", data, "--out", env.tmp / "sub.csv")
    assert result.code == 0, result.err
    rows = read_csv(env.tmp / "sub.csv")
    assert rows[0] == ["sample_index", "label", "error"] and len(rows) == 4
    assert rows[3][1] == "" and "img_0002.png" in rows[3][2]
    assert "img_0002.png" in result.err and "1 of 3" in result.err


def cli_predict_raise_exits_2(env):
    data = write_challenge(env.tmp / "data", corrupt=2)
    result = cli(
        env, "predict", "--model", env.model, "--data", data, "--out", env.tmp / "s.csv", "--on_error", "raise"
    )
    assert result.code == 2 and "img_0002.png" in result.err and "Traceback" not in result.err
    assert not (env.tmp / "s.csv").exists()


def out_is_a_directory(entry: str) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        data = write_challenge(env.tmp / "data")
        no_model_loading(env)
        (env.tmp / "taken").mkdir()
        if entry == "predict":
            predict_folder(env.model, data, env.tmp / "taken", progress=False)
        elif entry == "evaluate":
            evaluate_model(env.model, data, env.tmp / "taken", progress=False)
        else:  # explain writes into a folder: a file there is the bad case
            (env.tmp / "file.txt").write_text("x")
            explain_folder(env.model, data, env.tmp / "file.txt", progress=False)

    return run


def out_parent_is_a_file(env):
    data = write_challenge(env.tmp / "data")
    no_model_loading(env)
    (env.tmp / "file.txt").write_text("x")
    predict_folder(env.model, data, env.tmp / "file.txt" / "sub.csv", progress=False)


def cli_out_is_a_directory(env):
    data = write_challenge(env.tmp / "data")
    no_model_loading(env)
    result = cli(env, "predict", "--model", env.model, "--data", data, "--out", env.tmp)
    assert result.code == 2 and str(env.tmp) in result.err and "directory" in result.err


def evaluate_skip_scores_the_rest(env):
    data = write_challenge(env.tmp / "data", n=4, corrupt=1)
    result = evaluate_model(env.model, data, env.tmp / "m.json", on_error="skip", n_bootstrap=5, progress=False)
    assert result.image_ids == ["img_0000", "img_0002", "img_0003"] and result.metrics["n"] == 3
    failed = json.loads((env.tmp / "m.json").read_text())["failed"]
    assert len(failed) == 1 and "img_0001.png" in failed[0]["file"] and "not an image file" in failed[0]["error"]


def explain_skip_writes_the_rest(env):
    data = write_challenge(env.tmp / "data", corrupt=0)
    paths = explain_folder(env.model, data, env.tmp / "x", on_error="skip", max_images=2, progress=False)
    assert [p.name for p in paths] == ["img_0001.png"]  # the first 2 samples, the bad one listed
    assert "img_0000.png" in env.caplog.text


# ---- case 14: every command that reads data takes the data options --------------------------------------------------
def data_options_parse(command: str) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        positional = {"inspect": ["d", "--out", "o"], "build": ["d"], "clean": ["d", "--out", "o"]}
        argv = positional.get(command, ["--model", "m", "--data", "d", "--out", "o"])
        options = ["--layout", "table", "--on_error", "skip", "--resize_masks", "--max_image_pixels", "123"]
        args = build_parser().parse_args([command, *argv, *options])
        assert (args.layout, args.on_error, args.resize_masks, args.max_image_pixels) == ("table", "skip", True, 123)

    return run


def cli_resize_masks_is_the_fix(command: str) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        data = write_challenge(env.tmp / "data", small_mask=1)
        out = env.tmp / ("out.csv" if command == "predict" else "out.json" if command == "evaluate" else "out")
        base = [command, "--model", env.model, "--data", data, "--out", out]
        extra = ["--n_bootstrap", "5"] if command == "evaluate" else []
        failed = cli(env, *base, *extra, "--on_error", "raise")
        assert failed.code == 2 and "mask_0001.png" in failed.err and "--resize_masks" in failed.err
        fixed = cli(env, *base, *extra, "--resize_masks")
        assert fixed.code == 0, fixed.err

    return run


def cli_max_image_pixels_is_the_fix(command: str) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        data = write_challenge(env.tmp / "data")
        out = env.tmp / "out"
        base = {
            "predict": ["predict", "--model", env.model, "--data", data, "--out", out / "s.csv"],
            "clean": ["clean", data, "--out", out],
            "inspect": ["inspect", data, "--out", out],
        }[command]
        failed = cli(env, *base, "--on_error", "raise", "--max_image_pixels", "1000")
        assert failed.code == 2 and "_0000.png" in failed.err and "--max_image_pixels" in failed.err
        fixed = cli(env, *base, "--max_image_pixels", "100000")
        assert fixed.code == 0, fixed.err

    return run


def recipe_arguments_reach_the_builder(env):
    from hf_histo.training import run as run_module
    from hf_histo.training.arguments import parse_args

    data_args, _, _ = parse_args(
        {},
        ["--data_dir", "d", "--output_dir", str(env.tmp), "--on_error", "skip", "--resize_masks", "true"]
        + ["--max_image_pixels", "123", "--use_cpu"],
    )
    seen = {}
    report = SimpleNamespace(summary=lambda: "")
    env.mp.setattr("hf_histo.data.builder.build_patch_dataset", lambda *a, **kw: (seen.update(kw), report))
    run_module.build_datasets(data_args)
    assert (seen["on_error"], seen["resize_masks"], seen["max_image_pixels"]) == ("skip", True, 123)


def recipe_data_error_hook(env):
    from hf_histo.training import launch

    exits = []
    env.mp.setattr(launch.os, "_exit", exits.append)
    launch.exit_on_data_error(DataError, DataError("/data/x.png: truncated; re-export it"), None)
    assert exits == [2]
    assert "error: /data/x.png: truncated; re-export it" in env.capsys.readouterr().err


def recipe_data_error_exits_2(env):
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "resnet_scratch.py"), "--data_dir", str(env.tmp / "missing")]
        + ["--output_dir", str(env.tmp / "run"), "--use_cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"error: {env.tmp / 'missing'}: no such data folder" in out.stderr and "Traceback" not in out.stderr


# ---- case 15: a missing model folder is not a Hub id ------------------------------------------------------------------
def missing_model(value: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        (env.tmp / "runs").mkdir()
        env.mp.chdir(env.tmp)
        no_model_loading(env)
        load_engine(value(env))

    return run


def hub_id_still_goes_to_the_hub(env):
    from transformers import AutoModelForImageClassification

    calls = []

    def record(name, *args, **kwargs):
        calls.append(name)
        raise OSError("offline")

    env.mp.chdir(env.tmp)
    env.mp.setattr(AutoModelForImageClassification, "from_pretrained", record)
    with pytest.raises(OSError, match="offline"):
        load_engine("owkin/phikon-missing")
    assert calls == ["owkin/phikon-missing"]


def cli_missing_model(env):
    data = write_challenge(env.tmp / "data")
    env.mp.chdir(env.tmp)
    no_model_loading(env, engines=False)
    result = cli(env, "predict", "--model", "./runs/phikon", "--data", data, "--out", env.tmp / "s.csv")
    assert result.code == 2 and "runs/phikon: no such model folder" in result.err


# ---- case 16: URLs, bombs, empty arrays -------------------------------------------------------------------------------
def url_image(env):
    same_scores(env.pipe(f"{env.url}/good.png", top_k=3), env.pipe(tissue(0), top_k=3))


def url_bomb(env):
    env.mp.setattr(env.pipe.engine, "max_image_pixels", 1000)
    env.pipe(f"{env.url}/bomb.png")


def file_bomb(env):
    env.mp.setattr(env.pipe.engine, "max_image_pixels", 1000)
    Image.fromarray(tissue(0)).save(env.tmp / "big.png")
    env.pipe(str(env.tmp / "big.png"))


# ---- case 18: --help everywhere -------------------------------------------------------------------------------------
def recipe_help(path: Path) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        env.mp.setattr(sys, "argv", [str(path), "--help"])
        env.mp.setattr(sys, "excepthook", sys.excepthook)  # parse_args installs the recipes' hook: restore it
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(path), run_name="__main__")
        assert exit_info.value.code in (0, None)
        out = env.capsys.readouterr().out
        if path.stem == "roi_segmentation":  # its own flags: no patch-level or bootstrap options
            assert "--max_image_pixels" in out and "--overwrite_output_dir" in out and "--mask_mode" in out
        else:
            assert "--n_bootstrap" in out and "95% CI" in out and "--max_image_pixels" in out

    return run


def command_help(command: str | None) -> Callable[[SimpleNamespace], Any]:
    def run(env):
        result = cli(env, *([command] if command else []), "--help")
        assert result.code == 0 and "usage: hf-histo" in result.out

    return run


# ---- case 19: CSV cells a spreadsheet would run ------------------------------------------------------------------------
def formula_file_names(env):
    data = env.tmp / "data"
    (data / "images").mkdir(parents=True)
    names = ["=1+2.png", "+x.png", "-x.png", "@x.png", "ok.png"]
    for i, name in enumerate(names):
        Image.fromarray(tissue(i)).save(data / "images" / name)
    rows = read_csv(predict_folder(env.model, data, env.tmp / "s.csv", progress=False))
    assert sorted(r[0] for r in rows[1:]) == sorted(["'=1+2.png", "'+x.png", "'-x.png", "'@x.png", "ok.png"])


def formula_labels_challenge_ids(env):
    model = save_for_hub(tiny_model(FORMULA_LABELS), env.tmp / "model", image_processor=make_image_processor(32))
    data = env.tmp / "data"
    (data / "test_data").mkdir(parents=True)
    for i, name in enumerate(["-1.png", "2.png"]):
        Image.fromarray(tissue(i)).save(data / "test_data" / name)
    rows = read_csv(predict_folder(model, data, env.tmp / "s.csv", probs=True, progress=False))
    assert rows[0] == ["sample_index", "label", "'=HYPERLINK(1)", "'-neg", "'@pos", "'+plus"]
    assert [r[0] for r in rows[1:]] == ["-1.png", "2.png"]  # the challenge's ids stay as they are
    assert all(r[1].startswith("'") for r in rows[1:])


# ---- the table ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One behaviour: `run` calls an entry point; it must raise `raises` matching `match`, or pass its own asserts."""

    case: str
    run: Callable[[SimpleNamespace], Any]
    raises: type[BaseException] | None = None
    match: str | None = None


ROWS = [
    Row("07-float-1.0001-is-unit-range", float_image_past_one),
    Row("07-float-nan-refused", float_image_with(np.nan), DataError, "NaN or infinite"),
    Row("07-float-inf-refused", float_image_with(np.inf), DataError, "NaN or infinite"),
    Row("12-pipeline-list-error-entry", pipeline_list_keeps_the_good_images),
    Row("12-pipeline-single-still-raises", single_bad_image, DataError, r"bad\.png: not an image file"),
    Row("12-engine-batches-survive-bad-item", engine_shares_batches_past_a_bad_item),
    Row("12-predict-skip-error-column", predict_skip_keeps_the_other_rows),
    Row(
        "12-predict-raise-names-switch",
        predict_raise_names_the_file_and_the_switch,
        DataError,
        r"img_0001\.png.*on_error skip",
    ),
    Row("12-cli-predict-default-skip", cli_predict_default_keeps_the_rest),
    Row("12-cli-predict-raise-exit-2", cli_predict_raise_exits_2),
    Row("12-predict-out-is-dir", out_is_a_directory("predict"), DataError, "taken: is a directory; pass a file path"),
    Row(
        "12-evaluate-out-is-dir", out_is_a_directory("evaluate"), DataError, "taken: is a directory; pass a file path"
    ),
    Row("12-explain-out-is-file", out_is_a_directory("explain"), DataError, r"file\.txt: is a file; pass a folder"),
    Row("12-predict-out-parent-is-file", out_parent_is_a_file, DataError, r"file\.txt: is a file, not a folder"),
    Row("12-cli-out-is-dir-exit-2", cli_out_is_a_directory),
    Row("12-evaluate-skip-failed-listed", evaluate_skip_scores_the_rest),
    Row("12-explain-skip", explain_skip_writes_the_rest),
    *(Row(f"14-{c}-takes-data-options", data_options_parse(c)) for c in DATA_COMMANDS),
    *(Row(f"14-{c}-resize-masks", cli_resize_masks_is_the_fix(c)) for c in ("predict", "evaluate", "explain")),
    *(Row(f"14-{c}-max-image-pixels", cli_max_image_pixels_is_the_fix(c)) for c in ("predict", "clean", "inspect")),
    Row("14-recipe-data-options", recipe_arguments_reach_the_builder),
    Row("14-recipe-data-error-hook", recipe_data_error_hook),
    Row("14-recipe-data-error-exit-2", recipe_data_error_exits_2),
    Row("15-dot-path", missing_model(lambda env: "./runs/phikon"), FileNotFoundError, r"runs/phikon: no such model"),
    Row("15-partial-path", missing_model(lambda env: "runs/phikon"), FileNotFoundError, "runs/phikon: no such model"),
    Row("15-absolute", missing_model(lambda env: str(env.tmp / "nope")), FileNotFoundError, "nope: no such model"),
    Row("15-home", missing_model(lambda env: "~/hf-histo-no-model"), FileNotFoundError, "no-model: no such model"),
    Row("15-deep", missing_model(lambda env: "a/b/c"), FileNotFoundError, "a/b/c: no such model folder"),
    Row(
        "15-fold-list",
        missing_model(lambda env: [env.tmp / "nope", env.tmp / "runs"]),
        FileNotFoundError,
        "no such model",
    ),
    Row("15-hub-id-untouched", hub_id_still_goes_to_the_hub),
    Row("15-cli-exit-2", cli_missing_model),
    Row("16-url-image", url_image),
    Row("16-url-refused", lambda env: env.pipe(closed_port_url()), DataError, r"http://127\.0\.0\.1:\d+/slide\.png"),
    Row("16-url-404", lambda env: env.pipe(f"{env.url}/none.png"), DataError, r"/none\.png: .*404"),
    Row("16-url-bomb", url_bomb, DataError, r"bomb\.png: .*--max_image_pixels"),
    Row("16-file-bomb", file_bomb, DataError, r"big\.png: .*--max_image_pixels"),
    Row("16-0x0-array", lambda env: env.pipe(np.zeros((0, 0, 3), np.uint8)), DataError, r"empty \(0x0 pixels\)"),
    Row("16-0-rows-array", lambda env: env.pipe(np.zeros((0, 40), np.float32)), DataError, r"empty \(40x0 pixels\)"),
    Row("16-0x0-pil", lambda env: env.pipe(Image.new("RGB", (0, 0))), DataError, r"empty \(0x0 pixels\)"),
    *(Row(f"18-help-{p.stem}", recipe_help(p)) for p in RECIPES),
    *(Row(f"18-help-{c or 'hf-histo'}", command_help(c)) for c in (None, *DATA_COMMANDS, "demo")),
    Row("19-file-names-neutralised", formula_file_names),
    Row("19-labels-neutralised-challenge-ids-kept", formula_labels_challenge_ids),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.case for r in ROWS])
def test_entry_point(row: Row, env: SimpleNamespace) -> None:
    if row.raises is None:
        row.run(env)
        return
    with pytest.raises(row.raises, match=row.match):
        row.run(env)


def test_every_case_has_a_row():
    assert {r.case.split("-")[0] for r in ROWS} == {"07", "12", "14", "15", "16", "18", "19"}
    assert len(RECIPES) == 7
