"""Upload a Hub-ready checkpoint folder once, from the main process, with one clear error when offline."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from accelerate import PartialState
from huggingface_hub import HfApi

from .card import PLOTS_DIR

# Files a Hub-ready folder must hold (weights may also be sharded: model.safetensors.index.json).
REQUIRED_FILES = (
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "configuration_histo.py",
    "modeling_histo.py",
    "pipeline.py",
)
_UPLOAD_NAMES = {
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "model.safetensors.index.json",
    "requirements.txt",  # the Gradio Space's (app.py) dependencies
}
_UPLOAD_SUFFIXES = {".safetensors", ".py", ".png"}


class HubUnavailableError(RuntimeError):
    """The Hub cannot be reached (offline mode, no network, no login); the local folder is complete."""


def hub_upload_files(output_dir: str | os.PathLike) -> list[str]:
    """Relative paths that `push_folder_to_hub` uploads: weights, configs, card, code and plots.

    Top level: config.json, preprocessor_config.json, README.md, `*.safetensors` (+ index), `*.py`, `*.png`;
    plus everything under `plots/`. Training leftovers stay local: checkpoint-*/, runs/, hidden and temporary
    files, and metrics.json / image_predictions.json / trainer_state.json (they may hold local paths and image ids).
    """
    output_dir = Path(output_dir)
    files = [
        p.name
        for p in output_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and ".tmp" not in p.name
        and (p.name in _UPLOAD_NAMES or p.suffix in _UPLOAD_SUFFIXES)
    ]
    plots_dir = output_dir / PLOTS_DIR
    if plots_dir.is_dir():
        files += [
            f"{PLOTS_DIR}/{p.relative_to(plots_dir).as_posix()}"
            for p in plots_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        ]
    return sorted(files)


def _offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def upload_command(output_dir: str | os.PathLike, repo_id: str) -> str:
    """The `hf upload` command line that uploads exactly `hub_upload_files(output_dir)` (one `--include` each).

    A bare `hf upload repo folder .` would also send checkpoints (pickled optimizer states, `training_args.bin`),
    metrics.json with local paths and any data copied into the folder.
    """
    folder = Path(output_dir)
    includes = " ".join(f"--include {shlex.quote(name)}" for name in hub_upload_files(folder))
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} . {includes}"


def _unavailable(folder: Path, repo_id: str, reason: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"Could not push to https://huggingface.co/{repo_id}: {reason}. The checkpoint folder is complete at "
        f"{folder}; after `hf auth login`, upload its model, processor, card, code and plots (nothing else) with "
        f"`{upload_command(folder, repo_id)}`"
    )


def push_folder_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    is_main_process: bool | None = None,
) -> str | None:
    """Create `repo_id` (if needed) and upload the folder's model, processor, card, code and plots.

    Args:
        output_dir: A folder written by `save_for_hub`.
        repo_id: `"user/name"` on the Hub.
        token: Hub token; the logged-in token by default.
        private: Create the repo as private.
        commit_message: Commit message of the upload.
        is_main_process: Whether this process uploads; by default accelerate's `PartialState().is_main_process`.

    Returns:
        The commit URL, or None on non-main processes (which do nothing).

    Raises:
        FileNotFoundError: The folder lacks a required file (it would not load from the Hub).
        HubUnavailableError: Offline mode, no network, or no valid login; the folder is left as it was. One
            message, not chained to the Hub library's error, with the `upload_command` to run later.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if is_main_process is None:
        is_main_process = PartialState().is_main_process
    if not is_main_process:
        return None
    folder = Path(output_dir).resolve()
    files = hub_upload_files(folder) if folder.is_dir() else []
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name.startswith("model") and name.endswith(".safetensors") for name in files):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (missing {missing}); write it with save_for_hub."
        )
    if _offline():
        raise _unavailable(folder, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=files,
            commit_message=commit_message or "Upload hf-histo model, processor, code, card and plots",
        )
    except OfflineModeIsEnabled:
        raise _unavailable(folder, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)") from None
    except LocalTokenNotFoundError:
        raise _unavailable(folder, repo_id, "not logged in (no Hub token found)") from None
    except HfHubHTTPError as error:
        reason = _first_line(error) or type(error).__name__
        raise _unavailable(folder, repo_id, f"the Hub refused the upload ({reason})") from None
    except (ConnectionError, TimeoutError, OSError) as error:
        raise _unavailable(
            folder, repo_id, f"the Hub is unreachable ({type(error).__name__}: {_first_line(error)})"
        ) from None
    except Exception as error:  # httpx transport errors (no network) do not derive from OSError
        if type(error).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise _unavailable(folder, repo_id, f"the Hub is unreachable ({type(error).__name__})") from None
        raise
    return str(getattr(commit, "commit_url", commit))
