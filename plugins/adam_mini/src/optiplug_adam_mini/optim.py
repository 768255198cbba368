"""adam-mini's ``Adam_mini``, built quietly: its prints go to a logger, its layout comes from the model's config;
and its step on FSDP2's row shards.

Under FSDP2 (``fully_shard``) every parameter is a DTensor cut into row shards (``Shard(0)``). Adam-mini's
blocks are rows or groups of rows, so each process steps its own rows: per-row blocks (embedding, output head,
value, attention output, MLP) and biases entirely locally; per-head blocks (query and key weights) locally too,
because the plugin's check refuses a number of processes that would cut inside a head (a shard of whole heads
is what upstream's ``model_sharding`` assumed without checking); norm blocks (one value per tensor) with one
all-reduce of their sum of squared gradients. The state keeps upstream's layout with global shapes (the first
moment of a query/key weight as heads x head_numel, one second moment per head, row or tensor), each tensor a
DTensor cut like its parameter, so ``torch.distributed.checkpoint`` saves it, resumes it, and reshards it for
another number of processes that cuts no head.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from adam_mini import Adam_mini

from optiplug_adam_mini.layout import Layout, block_kind

__all__ = ["AdamMini", "logger", "sharded_step"]

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
        self.sharded = any(_is_dtensor(param) for _, param in named)
        _log(printed.getvalue(), report.getvalue(), tied_output)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Upstream's step, or on FSDP2's DTensor parameters :func:`sharded_step` (the same arithmetic per row)."""
        if not self.sharded:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded_step(self)
        return loss


def _is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def _sharded_like(local: torch.Tensor, param: Any, shape: tuple[int, ...]) -> Any:
    """``local`` (this process's rows of a tensor of global ``shape``) as a DTensor cut like ``param``."""
    from torch.distributed.tensor import DTensor, Replicate

    placements = param.placements if shape else [Replicate()] * len(param.placements)
    stride = tuple(int(torch.tensor(shape[i + 1 :]).prod()) for i in range(len(shape)))
    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)  # fmt: skip


def _new_state(optimizer: AdamMini, kind: str, param: Any, local: torch.Tensor) -> dict[str, Any]:
    """Upstream's state for a new parameter, with global shapes and counts, each tensor cut like ``param``."""
    shape = tuple(param.shape)
    zeros = torch.zeros_like(local, memory_format=torch.preserve_format)
    if kind == "adam":
        return {"m": _sharded_like(zeros, param, shape), "step": 0, "v": _sharded_like(zeros.clone(), param, shape)}
    if kind == "one":
        numel = float(param.numel())
        vmean = _sharded_like(torch.zeros((), dtype=local.dtype, device=local.device), param, ())
        return {"m": _sharded_like(zeros, param, shape), "step": 0, "reduced": False, "vmean": vmean,
                "block_numel": numel}  # fmt: skip
    width = optimizer.head_numel if kind == "heads" else shape[1]
    blocks = param.numel() // width
    local_blocks = local.numel() // width
    m = _sharded_like(zeros.view(local_blocks, width), param, (blocks, width))
    vmean = _sharded_like(torch.zeros((local_blocks, 1), dtype=local.dtype, device=local.device), param, (blocks, 1))
    count = "head_per_gpu" if kind == "heads" else "neuron_per_gpu"
    return {"m": m, "step": 0, count: blocks, "vmean": vmean}


def sharded_step(optimizer: AdamMini) -> None:
    """Adam-mini's step on this process's rows of each DTensor parameter (upstream's arithmetic, in its order)."""
    import torch.distributed as dist

    for group in optimizer.param_groups:
        beta1, beta2, lr, eps = group["beta1"], group["beta2"], group["lr"], group["eps"]
        decay = group["weight_decay"]
        kind = block_kind(group["name"])
        for param in group["params"]:
            if param.grad is None:
                continue  # (upstream's norm branch reduces even then: every process has a gradient here)
            weight, grad = param.to_local(), param.grad.to_local()
            state = optimizer.state[param]
            if len(state) == 0:
                state.update(_new_state(optimizer, kind, param, weight))
            m = state["m"].to_local()
            state["step"] += 1
            bias_correction_1 = 1 - beta1 ** state["step"]
            bias_correction_2_sqrt = math.sqrt(1 - beta2 ** state["step"])
            if kind == "adam":
                v = state["v"].to_local()
                v.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                if decay > 0.0:
                    weight.mul_(1 - lr * decay)
                m.lerp_(grad, 1 - beta1)
                h = (v.sqrt() / bias_correction_2_sqrt).add_(eps)
                weight.addcdiv_(m, h, value=-lr / bias_correction_1)
                continue
            vmean = state["vmean"].to_local()
            if kind == "one":
                squares = torch.sum(grad * grad)
                dist.all_reduce(squares, group=param.device_mesh.get_group())  # the tensor's blocks are on every rank
                squares = squares / state["block_numel"]
                if decay > 0.0:
                    weight.mul_(1 - lr * decay)
                m.lerp_(grad, 1 - beta1)
                vmean.mul_(beta2).add_(squares, alpha=1 - beta2)
                h = (vmean.sqrt() / bias_correction_2_sqrt).add_(eps)
                update = m * ((1 / bias_correction_1) / h)
            else:  # heads or rows: blocks of whole rows, all on this process
                blocks = grad.view(m.shape)
                vmean.mul_(beta2).add_(torch.mean(blocks * blocks, dim=1, keepdim=True), alpha=1 - beta2)
                if decay > 0.0:
                    weight.mul_(1 - lr * decay)
                m.lerp_(blocks, 1 - beta1)
                h = (vmean.sqrt() / bias_correction_2_sqrt).add_(eps)
                update = (m * ((1 / bias_correction_1) / h).view(-1, 1)).view(weight.size())
            update.mul_(lr)
            weight.add_(-update)


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
