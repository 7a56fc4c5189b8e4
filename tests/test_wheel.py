"""The wheel works on its own: installed in a fresh venv outside the repository, the demo and every recipe run."""

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.name != "__init__.py")
# test_recipes.py's small settings, with a single step: this test is about packaging, not training.
FAST = "--max_steps 1 --use_cpu --image_size 32 --per_device_train_batch_size 8 --dataloader_num_workers 0"
FAST += " --n_bootstrap 20 --disable_tqdm true"


def test_pyproject_lists_every_package_and_data_file():
    """`packages` is an explicit list (a mapped folder is invisible to `packages.find`): nothing on disk is left out."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert config["package-dir"] == {"hf_histo.recipes": "recipes"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_histo").rglob("*.py")}
    assert sorted(config["packages"]) == sorted(on_disk | {"hf_histo.recipes"})
    package_data = config.get("package-data", {})
    for path in (ROOT / "hf_histo").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            package = ".".join(path.parent.relative_to(ROOT).parts)
            patterns = package_data.get(package, []) + package_data.get("*", [])
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} is not in package-data"


def run(argv: list, cwd: Path, env: dict, timeout: int = 300) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{output[-4000:]}"
    return result.stdout


def builds_offline() -> bool:
    """pip and a setuptools with bdist_wheel built in (>= 70.1), read from metadata: importing setuptools here would
    patch distutils under the test session."""
    try:
        major, minor = version("setuptools").split(".")[:2]
        return importlib.util.find_spec("pip") is not None and (int(major), int(minor)) >= (70, 1)
    except (PackageNotFoundError, ValueError):
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv outside the repository with the wheel installed; dependencies come from this venv through a `.pth`."""
    if not builds_offline():
        pytest.skip("building the wheel offline (--no-build-isolation) needs pip and setuptools>=70.1 here")
    tmp = tmp_path_factory.mktemp("wheel")
    # setuptools' build/ and *.egg-info go to tmp: the tree stays clean, and no stale build/lib file reaches the wheel.
    extra = tmp / "build.cfg"
    extra.write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DIST_EXTRA_CONFIG=str(extra), PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", ROOT, "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp / "dist"], tmp, env)
    (wheel,) = (tmp / "dist").glob("hf_histo-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # after the venv's own
    (site / "dev_packages.pth").write_text("\n".join(ours) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], tmp, env)

    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets_cache")
    work = tmp / "work"  # the cwd of every command: outside the repository, so nothing imports from the tree
    work.mkdir()
    return venv, work, env


@pytest.mark.slow
def test_installed_package_is_the_wheel(installed):
    venv, work, env = installed
    code = (
        "import pkgutil, hf_histo, hf_histo.recipes.phikon_frozen as r\n"
        "print(hf_histo.__file__, r.__file__)\n"
        "print(*sorted(m.name for m in pkgutil.iter_modules(hf_histo.recipes.__path__)))"
    )
    files, recipes = run([venv / "bin" / "python", "-c", code], work, env).splitlines()
    for file in map(Path, files.split()):
        assert file.is_relative_to(venv) and not file.is_relative_to(ROOT), file
    assert recipes.split() == RECIPES


@pytest.mark.slow
def test_demo_runs_from_the_wheel(installed):
    venv, work, env = installed
    run([venv / "bin" / "hf-histo", "demo", "--quick", "--out", "demo"], work, env, timeout=600)
    summary = json.loads((work / "demo" / "demo_summary.json").read_text(encoding="utf-8"))
    assert all(Path(path).exists() for path in summary["paths"].values()), summary["paths"]


@pytest.fixture(scope="module")
def recipe_data(installed):
    """test_recipes.py's data, made by the installed package (this test imports nothing from the tree)."""
    venv, work, env = installed
    code = "from hf_histo.data.synthetic import make_synthetic_dataset as make\n"
    code += "make('data', n_train=12, n_test=2, size_range=(160, 240), seed=0)"
    run([venv / "bin" / "python", "-c", code], work, env)
    return work / "data", work / "recipe_cache"


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_from_the_wheel(name, installed, recipe_data):
    venv, work, env = installed
    data, cache = recipe_data
    out = work / "runs" / name
    argv = ["--demo", "--data_dir", data, "--output_dir", out]
    if name == "roi_segmentation":  # its own flags: crops of image+mask pairs, no patch cache
        argv += ["--max_steps", "1", "--use_cpu", "--disable_tqdm", "true"]
    else:
        argv += ["--cache_dir", cache, *FAST.split()]
    run([venv / "bin" / "python", "-m", f"hf_histo.recipes.{name}", *argv], work, env)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (
        metrics["labels"] == ["background", "roi"] if name == "roi_segmentation" else metrics["run"]["recipe"] == name
    )
