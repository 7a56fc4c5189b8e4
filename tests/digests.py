"""Test helper: per-rank parameter digests written during training, to check DDP replicas and gated blocks."""

from typing import Any

import torch
from transformers import TrainerCallback


def parameter_digests(model: torch.nn.Module, optimizer: Any | None = None) -> dict[str, str]:
    """SHA-256 of the parameters per optimizer group name (or per parameter name without an optimizer)."""
    import hashlib

    def sha(params) -> str:
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    if optimizer is None:
        return {name: sha([p]) for name, p in model.named_parameters()}
    by_name: dict[str, list] = {}
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        by_name.setdefault(str(group.get("name", len(by_name))), []).extend(group["params"])
    return {name: sha(params) for name, params in by_name.items()}


class ParamDigestCallback(TrainerCallback):
    """Write per-rank parameter digests (per block, at train begin, each epoch end and train end) as JSON.

    A debugging aid for distributed runs: equal digests across ranks prove the replicas stayed identical, and a
    block whose digest did not move while it was gated proves the gate held. Rank `r` writes `rank{r}.json`
    into `out_dir`; `tests/test_ddp.py` adds it to the recipe's trainer from a wrapper script.

    Args:
        out_dir: Folder for the JSON files.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record: dict[str, Any] = {"epochs": []}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Digest the initial parameters."""
        self.record["begin"] = parameter_digests(model, optimizer)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Digest the parameters after each epoch."""
        self.record["epochs"].append({"epoch": state.epoch, "digests": parameter_digests(model, optimizer)})

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Digest the final parameters and write the file."""
        import json
        import os

        self.record["end"] = parameter_digests(model, optimizer)
        self.record["all"] = parameter_digests(model)
        rank = int(os.environ.get("RANK", args.process_index))
        self.record["rank"] = rank
        self.record["world_size"] = int(args.world_size)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(self.record, handle, indent=1)
