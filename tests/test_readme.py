"""Every command in README.md and recipes/README.md runs, in order, with tiny settings, in a scratch folder.

What is run: each fenced ```bash test``` / ```python test``` block (a ```bash test offline``` block must fail with
the clear offline message, as a Hub push does here), and every inline `accelerate launch ...` / `python
recipes/...` / `hf-histo ...` command of a table row. The tiny settings (applied by `tiny`) are:

- the Quickstart's install prefix (`python3 -m venv .venv && .venv/bin/pip install ...`) is dropped and its
  second line (`python -m pytest -q`, this suite) is not run from inside it: CI runs that line verbatim
  (`.ci/run`), install included; `hf-histo demo` gets `--quick`;
- a recipe launch gets `--demo` (tiny random backbone, data still from `--data_dir`) and a few CPU steps;
  `--num_processes N` (N > 2) becomes `--cpu --num_processes 2` (real 2-process DDP on CPU);
- `DATA` is the demo's generated data (challenge layout), `OUT` is what the launches before it wrote,
  `image.png` / `mask.png` are a generated image and its mask.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "recipes" / "README.md")
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`((?:accelerate launch|python recipes/|hf-histo) [^`]+)`")
FAST = (
    "--demo --max_steps 2 --use_cpu --image_size 32 --per_device_train_batch_size 8 --dataloader_num_workers 0 "
    "--n_bootstrap 20 --disable_tqdm true --cache_dir patch_cache"
)

SEG_FAST = "--demo --max_steps 2 --use_cpu --disable_tqdm true --overwrite_output_dir true"


def commands(path: Path) -> list[tuple[str, str, set[str]]]:
    """`(language, text, tags)` of the commands of one Markdown file, in reading order."""
    text = path.read_text(encoding="utf-8")
    found: list[tuple[int, str, str, set[str]]] = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if words and words[0] in ("bash", "python"):
            found.append((match.start(), words[0], match["body"], set(words[1:])))
    fenced = [(m.start(), m.end()) for m in FENCE.finditer(text)]
    for line_match in re.finditer(r"^\|.*\|$", text, re.MULTILINE):  # table rows
        if any(a <= line_match.start() < b for a, b in fenced):
            continue
        for match in INLINE.finditer(line_match.group(0)):
            found.append((line_match.start() + match.start(), "bash", match.group(1), {"test"}))
    return [(language, body, tags) for _, language, body, tags in sorted(found, key=lambda item: item[0])]


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    return FENCE.search(section)["body"].strip().splitlines()


def tiny(line: str) -> str:
    """One shell line with the test's tiny settings (see the module docstring)."""
    line = re.sub(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]+&& \.venv/bin/", "", line)
    if re.match(r"python -m pytest\b", line):
        return "true  # the test suite itself: CI runs this line verbatim (.ci/run)"
    if re.search(r"(^|\s)hf-histo demo(\s|$)", line):
        line += " --quick"
    if "recipes/roi_segmentation.py" in line:  # its own flags (no patch cache, no image_size)
        line = re.sub(r"--n_folds \d+", "--n_folds 2", line)
        return line + " " + SEG_FAST
    if re.search(r"recipes/\w+\.py", line):
        line = re.sub(r"--num_processes (\d+)", lambda m: "--cpu --num_processes 2" if int(m[1]) > 2 else m[0], line)
        line = re.sub(r"--n_folds \d+", "--n_folds 2", line)
        line += " " + FAST
        # the README's recipe lines are alternatives; run in sequence they share OUT, so each replaces the last
        line += " --overwrite_output_dir true"
    return line


def shell(script: str) -> str:
    """A bash script of the block's lines (comments and continuations kept), each with the tiny settings."""
    lines, pending = [], ""
    for raw in script.splitlines():
        pending += raw.rstrip("\\") + (" " if raw.endswith("\\") else "")
        if raw.endswith("\\"):
            continue
        code, _, comment = pending.partition("  #")
        lines.append(tiny(code.rstrip()) + (f"  #{comment}" if comment else "") if code.strip() else pending)
        pending = ""
    return "\n".join(lines)


def assert_demo_outputs(summary: dict) -> None:
    """What `hf-histo demo` must have written: data, clean manifest, Hub-ready model, submission, metrics, PNGs."""
    paths = {name: Path(path) for name, path in summary["paths"].items()}
    data = paths["data"]
    assert (data / "train_labels.csv").is_file() and (data / "test_labels.csv").is_file()
    assert len(list((data / "train_data").glob("img_*.png"))) == summary["n_train"]
    assert paths["clean_manifest"].is_file()
    model = paths["model"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "pipeline.py", "README.md"):
        assert (model / name).is_file(), f"the demo model folder lacks {name}"
    assert "macro" in (model / "README.md").read_text(encoding="utf-8").lower()
    with open(data / "test_labels.csv", newline="", encoding="utf-8") as f:
        test_ids = sorted(row["sample_index"] for row in csv.DictReader(f))
    with open(paths["submission"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["sample_index"] for row in rows) == test_ids
    labels = json.loads((model / "config.json").read_text(encoding="utf-8"))["id2label"].values()
    assert {row["label"] for row in rows} <= set(labels)
    metrics = json.loads(paths["test_metrics"].read_text(encoding="utf-8"))
    assert 0.0 <= summary["image_macro_f1"] <= 1.0
    assert metrics["metrics"]["macro_f1"] == pytest.approx(summary["image_macro_f1"])
    assert isinstance(summary["val_image_macro_f1"], float)
    assert len(list(paths["explain"].glob("*.png"))) >= 1 and len(list(paths["inspection"].glob("*.png"))) >= 1
    assert summary["wall_time_s"] > 0
    assert all("owkin/phikon" in note for note in summary["notes"]), summary["notes"]


def test_quickstart_is_two_lines_and_ci_runs_the_second():
    lines = quickstart_lines()
    assert len(lines) == 2, "the first Quickstart block is exactly two lines"
    assert "hf-histo demo" in lines[0] and "pip install -e ." in lines[0]
    assert "pytest" in lines[1] and 'pip install -e ".[dev]"' in lines[1]
    ci = subprocess.run(
        ["bash", "-c", "awk '/^## Quickstart/{q=1} q && /^```/{n++; next} q && n==1 {print}' README.md | sed -n 2p"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ci == lines[1]
    assert (
        "awk '/^## Quickstart/{q=1} q && /^```/{n++; next} q && n==1 {print}' README.md | sed -n 2p"
        in (ROOT / ".ci" / "run").read_text()
    )


def test_every_command_block_is_run():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            words = match["info"].split()
            if words and words[0] in ("bash", "sh", "shell", "console", "python", "py"):
                assert "test" in words[1:], f"{doc.name}: a {words[0]} block is not marked `test`: {match['body']!r}"
    assert len(commands(DOCS[0])) >= 10 and len(commands(DOCS[1])) >= 1


def test_tiny_settings():
    assert tiny(quickstart_lines()[0]) == "hf-histo demo --out hf_histo_demo --quick"
    assert tiny(quickstart_lines()[1]).startswith("true  #")  # not recursively
    many = tiny("accelerate launch --config_file accelerate_config.yaml --num_processes 8 recipes/x.py --data_dir D")
    assert "--cpu --num_processes 2 recipes/x.py --data_dir D --demo --max_steps 2" in many
    assert shell("hf-histo inspect DATA --out x  # note") == "hf-histo inspect DATA --out x  # note"
    assert "--n_folds 2 " in tiny("python recipes/x.py --data_dir D --n_folds 5")


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """All commands of README.md then recipes/README.md, in order, in one scratch folder."""
    for name in ("recipes", "accelerate_config.yaml", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_datasets_cache")  # `hf-histo build` without --cache_dir
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    ran = []
    for doc in DOCS:
        for language, body, tags in commands(doc):
            if "test" not in tags:
                continue
            if language == "python":
                argv = [sys.executable, "-c", body]
                shown = body
            else:
                shown = shell(body)
                argv = ["bash", "-euo", "pipefail", "-c", shown]
            result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            output = result.stdout + result.stderr
            if "offline" in tags:
                assert result.returncode != 0 and "offline mode is on" in output, f"{doc.name}:\n{shown}\n{output}"
                assert "OUT" in output and "hf upload" in output  # names the complete folder and how to upload
            else:
                assert result.returncode == 0, f"{doc.name} command failed:\n{shown}\n--- output ---\n{output[-4000:]}"
            ran.append(shown)
            if "hf-histo demo" in shown:  # the rest of the README works on the demo's data
                assert_demo_outputs(json.loads((tmp_path / "hf_histo_demo" / "demo_summary.json").read_text()))
                if not (tmp_path / "DATA").exists():
                    (tmp_path / "DATA").symlink_to(tmp_path / "hf_histo_demo" / "data")
                shutil.copy(tmp_path / "DATA" / "train_data" / "img_0000.png", tmp_path / "image.png")
                shutil.copy(tmp_path / "DATA" / "train_data" / "mask_0000.png", tmp_path / "mask.png")
    assert any("hf-histo demo" in c for c in ran) and any("--num_processes 2" in c for c in ran)
    written = {
        "inspect_out": "*.png",
        "clean_out": "clean_manifest.csv",
        "OUT": "pipeline.py",
        "explain_out": "*.png",
    }
    for folder, pattern in written.items():
        assert list((tmp_path / folder).glob(pattern)), f"{folder}/{pattern} was not written"
    predictions = (tmp_path / "submission.csv").read_text().splitlines()
    assert predictions[0].startswith("sample_index,label") and len(predictions) > 1
    print("\n".join(f"$ {c}" if "\n" not in c else c for c in ran))
