"""Test setup: offline Hugging Face libraries (set before any HF import) and shared fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(
    os.environ.get("HF_HISTO_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


def shared_dataset(name: str) -> Path:
    """Path of a real data set under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.resolve() / name
    if not path.is_dir():
        pytest.skip(f"real data {name!r} not found at {path} (set HF_HISTO_SHARED_DATA to its parent folder)")
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("glas_train")`` -> Path, skipping when the data is absent."""
    return shared_dataset
