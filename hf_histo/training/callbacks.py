"""Trainer callbacks: progressive unfreezing (learning-rate gating), weight EMA, best-checkpoint report; resume-safe."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Blocks that are not counted as unfreezing steps: the final norm goes with the first step, the stem with the last.
_STEM = "embeddings"
_POST = "post_backbone"
_EPS = 1e-6


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's `AcceleratedOptimizer`."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def gated_parameters(optimizer: Any) -> list[torch.nn.Parameter]:
    """Parameters of the optimizer groups currently marked `frozen` by `ProgressiveUnfreezeCallback`."""
    return [p for g in _inner_optimizer(optimizer).param_groups if g.get("frozen") for p in g["params"]]


def drop_gated_gradients(optimizer: Any) -> int:
    """Set `.grad = None` on gated parameters so that no optimizer touches them (no update, no moments).

    Returns:
        The number of gradients dropped.
    """
    n = 0
    for param in gated_parameters(optimizer):
        if param.grad is not None:
            param.grad = None
            n += 1
    return n


class ProgressiveUnfreezeCallback(TrainerCallback):
    """Train the head first, then unfreeze `blocks_per_step` backbone blocks every `every_epochs` epochs.

    Freezing is done by gating, not by `requires_grad`: every trainable parameter is in the optimizer and in the
    DDP wrapper from the start, and the groups of blocks not yet unfrozen get learning rate 0 and no gradients
    (dropped before clipping by `HistoTrainer` and again right before `optimizer.step`, so AdamW/Lion/SGD skip
    them: no update, no weight decay, no moment accumulation). Parameters frozen when DDP wraps the model would
    never be synchronised after unfreezing; gated ones are, since DDP all-reduces their gradients all along.

    The stage is a pure function of `state.epoch`, so resuming from a checkpoint restores it. Blocks are the
    optimizer groups built by `build_param_groups` (`role == "backbone"`), unfrozen from the output side; the
    final norm joins the first step and the stem joins the step that unfreezes the first block.

    Args:
        every_epochs: Epochs between unfreezing steps (seed 000: 20).
        blocks_per_step: Blocks unfrozen per step (seed 000: 2).
        start_epoch: Epoch of the first step (default: `every_epochs`, i.e. the head trains alone first).
        frozen_head_lr: Head learning rate while the whole backbone is gated (seed 001: 3e-4 before 3e-5);
            `None` keeps the scheduled head learning rate.
    """

    def __init__(
        self,
        every_epochs: float = 20,
        blocks_per_step: int = 2,
        start_epoch: float | None = None,
        frozen_head_lr: float | None = None,
    ):
        if every_epochs <= 0 or blocks_per_step < 1:
            raise ValueError(f"need every_epochs > 0 and blocks_per_step >= 1, got {every_epochs}, {blocks_per_step}")
        self.every_epochs = float(every_epochs)
        self.blocks_per_step = int(blocks_per_step)
        self.start_epoch = self.every_epochs if start_epoch is None else float(start_epoch)
        self.frozen_head_lr = frozen_head_lr
        self.history: list[dict[str, Any]] = []
        self._frozen_names: tuple[str, ...] | None = None
        self._hooked: set[int] = set()

    def schedule(self, block_names_in_order: list[str]) -> dict[str, float]:
        """Epoch at which each block is unfrozen, for block names ordered from input to output."""
        units = [b for b in block_names_in_order if b not in (_STEM, _POST)]
        epochs: dict[str, float] = {}
        for k, block in enumerate(reversed(units)):
            epochs[block] = self.start_epoch + (k // self.blocks_per_step) * self.every_epochs
        first = self.start_epoch
        last = max(epochs.values()) if epochs else first
        if _POST in block_names_in_order:
            epochs[_POST] = first
        if _STEM in block_names_in_order:
            epochs[_STEM] = last
        return epochs

    def _annotate(self, optimizer: torch.optim.Optimizer) -> None:
        backbone = [g for g in optimizer.param_groups if g.get("role") == "backbone"]
        by_index = sorted({(g["block_index"], g["name"]) for g in backbone})
        epochs = self.schedule([name for _, name in by_index])
        for group in optimizer.param_groups:
            group["unfreeze_epoch"] = epochs.get(group.get("name"), 0.0) if group.get("role") == "backbone" else 0.0

    def _apply(self, state, optimizer: Any, lr_scheduler: Any) -> None:
        inner = _inner_optimizer(optimizer)
        epoch = float(state.epoch or 0.0)
        scheduled = None
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            scheduled = list(lr_scheduler.get_last_lr())
            if len(scheduled) != len(inner.param_groups):
                scheduled = None
        frozen_names = []
        for i, group in enumerate(inner.param_groups):
            lr = scheduled[i] if scheduled is not None else group["lr"]
            frozen = group.get("unfreeze_epoch", 0.0) > epoch + _EPS
            group["frozen"] = frozen
            if frozen:
                frozen_names.append(group.get("name", f"group{i}"))
                lr = 0.0
            group["lr"] = lr
        all_gated = any(g.get("role") == "backbone" for g in inner.param_groups) and all(
            g.get("frozen") for g in inner.param_groups if g.get("role") == "backbone"
        )
        if self.frozen_head_lr is not None and all_gated:
            for i, group in enumerate(inner.param_groups):
                if group.get("role") == "head":
                    base = group.get("initial_lr", group["lr"]) or 1.0
                    lr = scheduled[i] if scheduled is not None else group["lr"]
                    group["lr"] = lr * self.frozen_head_lr / base
        names = tuple(dict.fromkeys(frozen_names))
        if names != self._frozen_names:
            self._log_change(state, inner, names)
            self._frozen_names = names

    def _log_change(self, state, optimizer: torch.optim.Optimizer, frozen: tuple[str, ...]) -> None:
        blocks = list(dict.fromkeys(g["name"] for g in optimizer.param_groups if g.get("role") == "backbone"))
        trainable = [b for b in blocks if b not in frozen]
        newest = [b for b in trainable if self._frozen_names is not None and b in self._frozen_names]
        event = {
            "epoch": round(float(state.epoch or 0.0), 4),
            "step": int(state.global_step),
            "trainable_blocks": trainable,
            "frozen_blocks": list(frozen),
            "unfrozen_now": newest,
        }
        self.history.append(event)
        if state.is_world_process_zero:
            logger.info(
                "progressive unfreezing at epoch %.2f (step %d): head + %d/%d backbone blocks trainable%s",
                event["epoch"],
                event["step"],
                len(trainable),
                len(blocks),
                f" (unfrozen now: {', '.join(newest)})" if newest else "",
            )

    def _hook(self, optimizer: Any) -> None:
        inner = _inner_optimizer(optimizer)
        if id(inner) in self._hooked:
            return

        def pre_step(opt, args, kwargs) -> None:
            drop_gated_gradients(opt)

        inner.register_step_pre_hook(pre_step)
        self._hooked.add(id(inner))

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """Write each group's unfreeze epoch and gate the groups not yet due."""
        if optimizer is None:
            raise ValueError("ProgressiveUnfreezeCallback needs the Trainer's optimizer (use it with a Trainer)")
        inner = _inner_optimizer(optimizer)
        if not any(g.get("role") == "backbone" for g in inner.param_groups):
            logger.warning("ProgressiveUnfreezeCallback: no backbone param groups (build_param_groups); nothing to do")
        self._frozen_names = None
        self._annotate(inner)
        self._hook(optimizer)
        self._apply(state, optimizer, lr_scheduler)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """Re-apply the gate after the scheduler has set this step's learning rates."""
        if optimizer is not None:
            self._apply(state, optimizer, lr_scheduler)

    def n_steps(self, n_blocks: int) -> int:
        """Number of unfreezing steps needed for `n_blocks` blocks."""
        return math.ceil(n_blocks / self.blocks_per_step)


def format_epoch(epoch: float) -> str:
    """An epoch as people write it: `3` for a whole epoch, `0.08` for part of one."""
    return str(round(epoch)) if abs(epoch - round(epoch)) < 1e-6 else f"{epoch:.2f}"


class WeightEmaCallback(TrainerCallback):
    """An exponential moving average of the weights (timm `ModelEmaV3`), which the model ends training with.

    The average is updated after every optimizer step, with timm's warm-up (the decay grows as
    ``1 - (1 + step) ** -2/3`` up to ``decay``, so that a short run does not average its first, random weights).
    `HistoTrainer.evaluation_loop` scores the averaged weights during training (`averaged`), so checkpoint
    selection and early stopping judge the weights that are kept. Each checkpoint stores the average next to the
    training weights (``ema.pt``): a resumed run continues it, and at the end of training the model takes the
    average of the best checkpoint (``--load_best_model_at_end``) or the current one.

    Args:
        decay: The largest decay, in ``(0, 1)``.
    """

    FILE = "ema.pt"

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1) (0 turns the average off), got {decay}")
        self.decay = decay
        self.ema: ModelEmaV3 | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Start the average from the model, or from the resumed checkpoint's ``ema.pt``."""
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True)
        if state.global_step > 0:  # resumed: Trainer has loaded the checkpoint's state before this call
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was saved without --ema_decay (or the run was killed "
                    "before its average was written), so the average cannot continue; resume from an earlier "
                    "checkpoint, or without --ema_decay, or train again"
                )
            self.ema.module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Fold the weights of this optimizer step into the average."""
        self.ema.update(model, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        """Store the average in the checkpoint Trainer has just written (main process)."""
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / f"{self.FILE}.tmp"
            torch.save(self.ema.module.state_dict(), tmp)
            tmp.replace(folder / self.FILE)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Give the model the average: the best checkpoint's when Trainer has just loaded it, else the current one."""
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best is not None:
            averaged = torch.load(Path(best) / self.FILE, map_location="cpu", weights_only=True)
        else:
            averaged = self.ema.module.state_dict()
        model.load_state_dict(averaged)
        self.ema = None  # training is over: later evaluations score the model, which now holds the average

    @contextlib.contextmanager
    def averaged(self, model: torch.nn.Module) -> Iterator[None]:
        """While training runs, hold the averaged weights in `model` for the block, then restore its own."""
        if self.ema is None:
            yield
            return
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            model.load_state_dict(own)


def logged_evaluation(log_history: Sequence[dict[str, Any]], step: int, key: str) -> dict[str, Any] | None:
    """The first evaluation logged at `step` that holds `key` (e.g. `eval_image_macro_f1`), or None."""
    return next((e for e in log_history if e.get("step") == step and key in e), None)


class BestCheckpointReport(TrainerCallback):
    """At the end of training, log which evaluation the best checkpoint comes from: epoch, step, metric and loss.

    Says how many other evaluations tied with it on `metric_for_best_model` (`HistoTrainer` keeps the lower
    `eval_loss` of a tie, then the earlier) and whether `--load_best_model_at_end` loaded it.
    """

    def on_train_end(self, args, state, control, **kwargs):
        """Log the kept checkpoint (main process, only with `metric_for_best_model` and a saved best step)."""
        name = args.metric_for_best_model
        if not name or state.best_global_step is None or not state.is_world_process_zero:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        best = logged_evaluation(state.log_history, state.best_global_step, key)
        if best is None:
            return
        value = float(best[key])
        ties = sum(
            1
            for e in state.log_history
            if key in e and e is not best and math.isclose(float(e[key]), value, rel_tol=1e-9)
        )
        epoch_text = format_epoch(float(best["epoch"])) if "epoch" in best else "?"
        loss = f", eval_loss={float(best['eval_loss']):.4f}" if "eval_loss" in best else ""
        metric = key.removeprefix("eval_")
        tied = (
            f"; {ties} other evaluation(s) tied on {metric}, the lower eval_loss (then the earlier) won"
            if ties
            else ""
        )
        if args.load_best_model_at_end and state.best_model_checkpoint:
            loaded = f"; loaded at the end of training ({state.best_model_checkpoint})"
        else:
            loaded = "; not loaded (--load_best_model_at_end is off): the model is the last epoch's"
        logger.info(
            "best checkpoint: kept the checkpoint of epoch %s (step %d): %s=%.4f%s%s%s",
            epoch_text,
            state.best_global_step,
            metric,
            value,
            loss,
            tied,
            loaded,
        )
