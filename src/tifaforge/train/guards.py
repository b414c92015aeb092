"""A non-finite loss or gradient skips the optimizer step, is reported with its step, and is never saved.

    tifa train cpt CONFIG      # a NaN step prints "step 7: non-finite gradient ... update skipped"

transformers keeps training through NaN (`logging_nan_inf_filter` only hides it from the logged
mean), so NaN weights get checkpointed and pushed. Here, just before `optimizer.step()`, every
gradient is checked (a NaN/inf loss makes them non-finite too); the flag is all-reduced so every rank
skips together (FSDP shards differ per rank). Skipping = dropping the gradients: AdamW leaves
parameters without a gradient untouched, moments and weight decay included. The scheduler still
advances. That step's checkpoint is not written; after `max_consecutive` bad steps in a row the
stage stops, and `failure` says at which step. Under DeepSpeed the engine owns the gradients (they
are not on the parameters), so this guard sees none and DeepSpeed's own overflow checks apply.
"""

from __future__ import annotations

import logging
from typing import Any

from tifaforge.train import distributed

log = logging.getLogger(__name__)


def nonfinite_grads(params) -> int:
    """How many parameter gradients hold a NaN or inf."""
    import torch

    return sum(1 for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all()))


def nonfinite_guard(max_consecutive: int, stage: str, report=None):
    """The TrainerCallback; `report(row)` receives one metrics row per skipped step."""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        def __init__(self) -> None:
            self.bad_steps: list[int] = []
            self.consecutive = 0
            self.failure: str | None = None
            self._skip = False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            bad = nonfinite_grads(params)
            self._skip = distributed.any_rank(bad > 0)
            if self._skip:
                for p in params:
                    p.grad = None  # AdamW skips parameters without a gradient: no update at all
                self._record(state, bad, report)

        def on_step_end(self, args, state, control, **kwargs):
            if not self._skip:
                self.consecutive = 0
                return
            control.should_save = False  # a skipped step is never what a checkpoint holds
            self._skip = False
            if self.consecutive >= max_consecutive:
                self.failure = (f"{stage}: step {state.global_step}: non-finite loss or gradient for "
                                f"{self.consecutive} consecutive steps (skipped: {self.bad_steps[-max_consecutive:]})")
                control.should_training_stop = True

        def _record(self, state, bad: int, report) -> None:
            step = state.global_step + 1  # the step being taken (global_step counts finished ones)
            self.bad_steps.append(step)
            self.consecutive += 1
            log.warning("%s: step %d: non-finite gradient in %d tensors (NaN/inf loss or gradient); "
                        "the update was skipped", stage, step, bad)
            if report is not None and state.is_world_process_zero:
                row: dict[str, Any] = {"step": step, "event": "nonfinite_step_skipped", "tensors": bad}
                report(row)

    return NonFiniteGuard()
