"""How a recipe script starts: `accelerate launch --cpu` as real DDP processes, and data errors as one-line exits."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import TracebackType

from ..data.images import DataError

logger = logging.getLogger(__name__)

__all__ = ["exit_on_data_error", "relaunch_for_cpu_ddp"]


def _launcher_num_processes(pid: int) -> int | None:
    """`--num_processes` of an `accelerate launch` command line (Linux /proc), or of its `--config_file`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") for a in argv[:3]) and "launch" not in argv:
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    for i, arg in enumerate(argv):
        if arg in ("--config_file", "--config-file") and i + 1 < len(argv):
            import yaml

            config = yaml.safe_load(Path(argv[i + 1]).read_text(encoding="utf-8")) or {}
            return int(config.get("num_processes", 1))
    return None


def _launched_command() -> list[str]:
    """The script (or `-m module`) and its arguments as this interpreter was started.

    `sys.orig_argv`, not `sys.argv`: a wrapper script may have rewritten `sys.argv` before running a recipe with
    `runpy`, and the relaunch must run the wrapper again. Falls back to `sys.argv` when the interpreter was started
    with its own options (`-u`, `-X ...`) that `torch.distributed.run` would not understand.
    """
    original = list(getattr(sys, "orig_argv", []))[1:]
    if original and (original[0] == "-m" or not original[0].startswith("-")):
        return original
    return list(sys.argv)


def relaunch_for_cpu_ddp(argv: list[str] | None = None) -> None:
    """Make `accelerate launch --cpu --num_processes N script.py` run N DDP processes (gloo).

    accelerate's simple launcher (always used with `--cpu`, checked on accelerate 1.15) starts one process and expects
    `mpirun --hostfile` to multiply it; without an MPI hostfile it would silently train on one process. When this process was started that way (CPU mode,
    `MASTER_ADDR` set, no rank in the environment, N > 1 in the launcher's command line), replace it by
    `torch.distributed.run --nproc_per_node N` on the same script and arguments. Does nothing otherwise.

    Args:
        argv: The script and its arguments to relaunch (default: the command this process was started with).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return
    if any(k in env for k in ("LOCAL_RANK", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return
    n = _launcher_num_processes(os.getppid())
    if not n or n < 2:
        return
    args = _launched_command() if argv is None else argv
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_addr",
        env["MASTER_ADDR"],
        "--master_port",
        env.get("MASTER_PORT", "29500"),
        *args,
    ]
    logger.warning(
        "accelerate --cpu started 1 process for --num_processes %d: relaunching with torch.distributed.run", n
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def exit_on_data_error(exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None) -> None:
    """`sys.excepthook` of a recipe run: a `DataError` prints ``<script>: error: <message>`` and exits with 2.

    The message names the file and the fix, so the traceback adds nothing; other exceptions keep the default hook.
    """
    if not issubclass(exc_type, DataError):
        sys.__excepthook__(exc_type, exc, traceback)
        return
    print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # an excepthook cannot set the exit status otherwise
