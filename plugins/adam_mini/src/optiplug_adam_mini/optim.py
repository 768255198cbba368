"""adam-mini's ``Adam_mini``, built quietly: its prints go to a logger, its layout comes from the model's config."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable
from typing import Any

import torch
from adam_mini import Adam_mini

from optiplug_adam_mini.layout import Layout

__all__ = ["AdamMini", "logger"]

logger = logging.getLogger("transformers.trainer.adam_mini")
"""Adam-mini's construction report: under the Trainer's logger, so ``training.log_level`` decides what shows."""


class AdamMini(Adam_mini):
    """``adam_mini.Adam_mini`` with what it prints sent to :data:`logger`, and the launch and layout set for it.

    * Its construction output (a line per parameter, then a partition report and warnings at the first
      step) is captured and logged: the lines per parameter at DEBUG, the report at INFO, its warnings at
      WARNING. Nothing reaches stdout.
    * ``head_numel`` is ``head_dim x hidden`` from the config (adam-mini assumes ``hidden / heads`` rows
      per head, which is wrong for models whose config sets another ``head_dim``).
    * ``world_size`` is 1: the launch is a single process or DDP (the plugin's check refuses sharded
      engines), where every process holds whole parameters and averaged gradients, so no block needs a
      cross-process reduction. adam-mini sets it to ``torch.cuda.device_count()``, which all-gathers
      without a process group in a single-process run on a multi-GPU machine, and with the wrong number
      of processes on several nodes.
    * Each parameter's group (adam-mini makes one per parameter) takes the options of the group
      ``ctx.param_groups`` put it in: weight decay by the Trainer's split (not on biases and norms)
      instead of adam-mini's name test (``"norm"``, ``"ln"`` or ``"bias"`` anywhere in the name), and
      whatever ``optimizer.param_groups`` sets.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        layout: Layout,
        *,
        group_options: dict[int, dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        tied_output: bool = False,
    ) -> None:
        named = [(name, param) for name, param in named_parameters if param.requires_grad]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            super().__init__(
                named,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                dim=layout.hidden,
                n_heads=layout.heads,
                n_kv_heads=layout.kv_heads,
                verbose=True,
            )
        self.head_numel = layout.head_numel
        self.world_size = 1
        self.defaults["weight_decay"] = weight_decay  # a per-group option here, as in every torch optimizer
        for group in self.param_groups:
            [param] = group["params"]
            group.update({k: v for k, v in group_options[id(param)].items() if k != "params"})
        report = io.StringIO()
        if (layout.hidden * layout.hidden) % layout.heads == 0:  # count_block asserts it (for its own head size)
            with contextlib.redirect_stdout(report):
                self.count_block()
        self.check_block_name = False  # the report is made: step() must not print it again
        self.verbose = False
        _log(printed.getvalue(), report.getvalue(), tied_output)


def _log(construction: str, report: str, tied_output: bool) -> None:
    for line in filter(None, (line.strip() for line in construction.splitlines())):
        logger.debug("adam_mini: %s", line)
    for line in filter(None, (line.strip() for line in report.splitlines())):
        warning = "Warning by Adam-mini" in line
        # "No output layer found" is expected with a head tied to the embedding (adam-mini says to ignore it then).
        if warning and not (tied_output and "No output layer found" in line):
            logger.warning("adam_mini: %s", line.lstrip("=> "))
        else:
            logger.info("adam_mini: %s", line.lstrip("=> "))
