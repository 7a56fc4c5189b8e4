"""One PatchingConfig from the recipe flags and `hf-histo build` through the dataset cache to the model config."""

import dataclasses
from pathlib import Path

import pytest
from test_sources import make_challenge

from hf_histo.cli import build_parser, main
from hf_histo.data.patching import PatchingConfig
from hf_histo.training.arguments import DataArguments, ModelArguments, parse_args
from hf_histo.training.run import build_datasets, build_model

PATCHING_FIELDS = [f.name for f in dataclasses.fields(PatchingConfig)]


def test_data_arguments_expose_every_patching_field_with_its_default_and_help():
    data_fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    defaults = PatchingConfig()
    for name in PATCHING_FIELDS:
        assert data_fields[name].default == getattr(defaults, name), name
        assert data_fields[name].metadata["help"], name
    patching = DataArguments(data_dir="D").patching()
    assert isinstance(patching, PatchingConfig) and patching == defaults


def test_recipe_flags_reach_the_patching_config(tmp_path):
    flags = {
        "strategy": "components",
        "patch_size": "64",
        "stride": "16",
        "min_foreground": "10",
        "min_fraction": "0.25",
        "top_k": "3",
        "min_area": "50",
        "pad": "4",
        "empty_fallback": "whole",
        "stain_norm": "macenko",
    }
    argv = ["--data_dir", "D", "--output_dir", str(tmp_path), "--paint_background"]
    argv += [arg for name, value in flags.items() for arg in (f"--{name}", value)]
    data_args, _, _ = parse_args({}, argv)
    assert data_args.patching() == PatchingConfig(
        strategy="components",
        patch_size=64,
        stride=16,
        min_foreground=10,
        min_fraction=0.25,
        top_k=3,
        min_area=50,
        pad=4,
        paint_background=True,
        empty_fallback="whole",
        stain_norm="macenko",
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--empty_fallback", "black"], "--empty_fallback='black' is not supported"),
        (["--stain_norm", "reinhard"], "--stain_norm='reinhard' is not supported"),
        (["--top_k", "0"], "top_k must be >= 1"),
        (["--min_fraction", "1.5"], r"min_fraction must be in \(0, 1\]"),
        (["--patch_size", "0"], "patch_size and stride must be positive"),
        (["--pad", "-1"], "min_foreground, min_area and pad must be >= 0"),
    ],
)
def test_bad_patching_flags_fail_when_parsed(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args({}, ["--data_dir", "D", "--output_dir", str(tmp_path), *argv])


def test_build_command_has_every_patching_flag_with_the_recipes_defaults():
    parser = build_parser()
    args = parser.parse_args(["build", "DATA"])
    data_args = DataArguments(data_dir="DATA")
    for name in PATCHING_FIELDS:
        assert getattr(args, name) == getattr(data_args, name), name
    assert args.val_fraction == data_args.val_fraction and args.num_proc == data_args.num_proc
    assert args.seed == 42  # TrainingArguments' seed, which the recipes split with
    args = parser.parse_args(["build", "DATA", "--paint_background", "--min_fraction", "0.5", "--num_proc", "2"])
    assert args.paint_background is True and args.min_fraction == 0.5 and args.num_proc == 2
    assert parser.parse_args(["build", "DATA", "--paint_background", "false"]).paint_background is False


def test_inspect_command_takes_one_or_more_strategies():
    parser = build_parser()
    common = ["inspect", "DATA", "--out", "o", "--patch_size", "64"]
    args = parser.parse_args([*common, "--strategy", "topk", "grid"])
    assert args.strategy == ["topk", "grid"] and args.patch_size == 64
    assert parser.parse_args([*common, "--strategy", "grid"]).strategy == ["grid"]


def test_build_command_and_a_recipe_share_the_cache(tmp_path, capsys):
    root = make_challenge(tmp_path / "data", ["a", "b", "a", "b"])
    cache = tmp_path / "cache"
    flags = [
        "--strategy",
        "topk",
        "--patch_size",
        "32",
        "--top_k",
        "2",
        "--val_fraction",
        "0.5",
        "--cache_dir",
        str(cache),
    ]
    assert main(["build", str(root), *flags]) == 0
    assert "built in" in capsys.readouterr().out
    data_args = DataArguments(
        data_dir=str(root), strategy="topk", patch_size=32, top_k=2, val_fraction=0.5, cache_dir=str(cache)
    )
    data = build_datasets(data_args, seed=42)  # the recipes' default seed
    files = {Path(f["filename"]).parent for split in data.values() for f in split.cache_files}
    assert len(list(cache.rglob("dataset_info.json"))) == 1 and len(files) == 1  # one build, reused
    with pytest.raises(SystemExit) as error:
        main(["build", str(root), "--top_k", "0"])
    assert error.value.code == 2 and "top_k must be >= 1" in capsys.readouterr().err


def test_build_model_stores_the_patching_config_as_a_dict():
    patching = PatchingConfig(strategy="topk", patch_size=64, top_k=3, paint_background=True)
    model, _ = build_model(ModelArguments(model_name_or_path="tiny-vit"), ["a", "b"], patching=patching)
    assert model.config.patching == patching.to_dict()
    assert PatchingConfig.from_dict(model.config.to_dict()["patching"]) == patching
