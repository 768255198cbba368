"""badam's optimizers, subclassed where the plugin has to change what they do, and the factory.

What changes, and why:

* Exact resume. ``badam.BlockOptimizer.state_dict`` is its base optimizer's: the step
  counter, the active and next block, the random block order and the fp32 master copy of
  the active block are lost, so a resumed run trains another block from other weights; the
  schedule's learning rate of the outer parameter groups is lost too. ``BlockOptimizerRatio``
  loses its step counter, windows and masks, and stores reset states as
  ``collections.defaultdict``, which ``torch.load(weights_only=True)`` refuses. Both
  ``state_dict()`` here add a ``"badam"`` entry of tensors and plain types that
  ``load_state_dict()`` restores.
* Costs that change no loss. A float32 weight is its own master copy (badam clones it: half
  as much state again, for the same values); a block switch does not run ``gc.collect()``
  (nothing it frees is in a reference cycle; see the tests); ``torch.cuda.empty_cache()`` runs
  at switches, not after every step.
* Weight decay. badam rebuilds its groups at every switch with the base optimizer's default
  weight decay for every parameter, norms included; here the decay group is transformers'
  (no decay on biases and norms) with the configured value.
* DeepSpeed ZeRO-3. DeepSpeed copies the updated float32 partitions back into the model only
  after the optimizer's step returns, and badam switches blocks inside it, re-partitioning from
  weights not yet updated: each block's last step is lost. Here the switch waits for the end of
  the step (``switch_if_due``, called by the callback) and keeps the schedule's learning rate.
* No ``print``: activations are recorded in ``switches`` and logged by the callback.
* Set-up that can be undone: ``release()`` gives back what the optimizer changed on the model
  (``requires_grad`` flags, ratio mode's gradient hooks) and ``attach()`` applies it again.

Everything else (the update itself, block order, DeepSpeed ZeRO-3 re-partitioning, sparse
masks) is badam's own code.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from badam import BlockOptimizer, BlockOptimizerRatio

import optiplug
from optiplug_badam.blocks import in_block, never_trained_message, plan_blocks, ratio_frozen
from optiplug_badam.config import BAdamConfig

__all__ = ["BlockAdamW", "RatioAdam", "build_badam"]

NEVER = 2**62  # switch_every for "never": badam's `step % -1 == 0` would switch at every step

NamedParameters = Sequence[tuple[str, torch.nn.Parameter]]


def _hyperparameters(groups: Iterable[dict]) -> list[dict]:
    return [{key: value for key, value in group.items() if key != "params"} for group in groups]


def _not_saved_by_us(mode: str) -> optiplug.CheckpointError:
    return optiplug.CheckpointError(
        f"badam: this optimizer state was not saved by optiplug-badam in mode '{mode}'; resume with the optimizer "
        "and mode that wrote the checkpoint"
    )


class BlockAdamW(BlockOptimizer):
    """``badam.BlockOptimizer`` (layer mode) with exact resume, cheaper switches and proper decay groups.

    Args:
        base_optimizer: the AdamW whose update runs on the active block.
        named_parameters: the trainable ``(name, parameter)`` pairs.
        blocks: lists of name prefixes, one list per block.
        switch_every: steps per block; -1 never switches.
        switch_mode: ``ascending``, ``descending``, ``random`` or ``fixed``.
        start_block: index of the first block, or None for the first of ``switch_mode``'s order.
        active_modules: prefixes trained with every block.
        decay_names: parameter names that get weight decay.
        weight_decay: the decay group's weight decay.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters: NamedParameters,
        blocks: Sequence[Sequence[str]],
        *,
        switch_every: int = 50,
        switch_mode: str = "ascending",
        start_block: int | None = None,
        active_modules: Sequence[str] = (),
        decay_names: Iterable[str] = (),
        weight_decay: float = 0.0,
    ):
        from transformers.integrations import is_deepspeed_zero3_enabled

        # The attributes badam's methods read, set as BlockOptimizer.__init__ sets them (same order of
        # draws from torch's RNG), without its prints, its float32 warning and its state_dict binding.
        self.verbose = 0
        self.log_fn = None
        self.switch_mode = switch_mode
        self.switch_block_every = switch_every if switch_every > 0 else NEVER
        self.named_parameters_list = list(named_parameters)
        self.block_prefix_list = [list(block) for block in blocks]
        self.block_num = len(self.block_prefix_list)
        self.active_modules = list(active_modules)
        self.weight_decay = weight_decay
        self.decay_names = frozenset(decay_names)
        self.global_step = 0
        self.base_optimizer = base_optimizer
        self.defaults = base_optimizer.defaults
        self.ds_zero3_enabled = is_deepspeed_zero3_enabled()
        self.param_groups = base_optimizer.param_groups
        # Each active parameter's master copy goes into the base group of the outer group that holds
        # the parameter: the groups (and optimizer.param_groups' rates and options) survive every switch.
        self._outer_group = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self.lora_mode = any("lora" in name for name, _ in self.named_parameters_list)
        self.block_order: list[int] = []
        self.switches: list[tuple[int, int]] = []
        self.active_block: int | None = None
        self.switch_due = False  # DeepSpeed ZeRO-3 only: a switch waiting for the end of the step
        if start_block is not None:
            self.current_block_idx = start_block
        elif switch_mode == "descending":
            self.current_block_idx = self.block_num - 1
        elif switch_mode == "random":
            self.block_order = torch.randperm(self.block_num).tolist()
            self.current_block_idx = self.block_order.pop()
        else:  # ascending, and fixed without a start block (badam leaves it unset there)
            self.current_block_idx = 0
        torch.optim.Optimizer.__init__(self, self.param_groups, base_optimizer.defaults)
        self.switch_trainable_params()

    # ---- block switching ----
    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.ds_zero3_enabled:
            self.step_single_gpu(*args, **kwargs)
            if (self.global_step + 1) % self.switch_block_every == 0:
                self.switch_trainable_params()
            return
        # DeepSpeed ZeRO-3 calls this once per parameter group, and copies the updated float32
        # partitions back into the model only after the last call returns. badam switches inside
        # that last call, re-partitioning from weights not yet updated: the block's last step is
        # lost. The switch is left for switch_if_due(), which the callback calls at the step's end.
        self.step_ds_zero3(*args, **kwargs)
        if abs(self.global_step - round(self.global_step)) < 1e-6:  # a whole step: every group stepped
            self.global_step = round(self.global_step)
            if (self.global_step + 1) % self.switch_block_every == 0:
                self.switch_due = True

    def switch_if_due(self) -> None:
        """Under DeepSpeed ZeRO-3, switch blocks once the step is complete (called by the callback)."""
        if self.switch_due:
            self.switch_due = False
            self.switch_trainable_params()

    def switch_trainable_params(self, verbose: int | None = None) -> None:
        """Activate the block at ``current_block_idx`` and move the index to the next one."""
        skipped = 0
        while self.lora_mode and not self._has_lora(self.current_block_idx):
            skipped += 1
            if skipped > self.block_num:
                raise optiplug.ConfigError("badam: no block holds a LoRA parameter; check optimizer.blocks")
            self._update_active_block_idx()
        self._activate(self.current_block_idx)
        self._update_active_block_idx()

    def _has_lora(self, index: int) -> bool:
        prefixes = self.block_prefix_list[index] + self.active_modules
        return any("lora" in name for name, _ in self.named_parameters_list if in_block(name, prefixes))

    def _activate(self, index: int) -> None:
        self.active_block = index
        self.active_param_prefixs = self.block_prefix_list[index] + self.active_modules
        if self.ds_zero3_enabled:
            # badam's ZeRO-3 switch builds new groups with the constructor's learning rate; keep the schedule's.
            schedule = {k: v for k, v in self.param_groups[0].items() if k in ("lr", "initial_lr")}
            self._switch_trainable_params_zero3(0)
            for group in self.param_groups:
                group.update(schedule)
        else:
            self._switch_trainable_params_single_gpu(0)
        self.base_optimizer.state = defaultdict(dict)
        self.switches.append((int(self.global_step), index))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _update_active_block_idx(self) -> None:
        if self.switch_mode == "random":
            if not self.block_order:
                self.block_order = torch.randperm(self.block_num).tolist()
            self.current_block_idx = self.block_order.pop()
        elif self.switch_mode == "ascending":
            self.current_block_idx = (self.current_block_idx + 1) % self.block_num
        elif self.switch_mode == "descending":
            self.current_block_idx = (self.current_block_idx - 1) % self.block_num

    def _switch_trainable_params_single_gpu(self, verbose: int | None = 0) -> None:
        self.param_idx2lp: dict[int, torch.nn.Parameter] = {}
        self.param_idx2hp: dict[int, torch.Tensor] = {}
        buckets: list[list[torch.Tensor]] = [[] for _ in self.param_groups]
        for i, (name, param) in enumerate(self.named_parameters_list):
            if not in_block(name, self.active_param_prefixs):
                param.requires_grad_(False)
                param.grad = None
                continue
            if self.lora_mode and "lora" not in name:
                continue
            param.requires_grad_(True)
            # A float32 weight is its own master copy: the same values as badam's clone, without the memory.
            master = param if param.dtype == torch.float32 else param.detach().float().requires_grad_(True)
            self.param_idx2lp[i] = param
            self.param_idx2hp[i] = master
            buckets[self._outer_group[id(param)]].append(master)
        self.base_optimizer.param_groups = [
            {**self.defaults, **_hyperparameters([group])[0], "params": params}
            for group, params in zip(self.param_groups, buckets)
        ]

    def _update_lr(self) -> None:
        # badam copies the first group's rate to every base group; each base group follows its own outer group.
        if self.ds_zero3_enabled:
            super()._update_lr()
            return
        for group, outer in zip(self.base_optimizer.param_groups, self.param_groups):
            group["lr"] = outer["lr"]

    def _pairs(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        lows = getattr(self, "param_idx2lp", {})
        highs = getattr(self, "param_idx2hp", {})
        return [(lows[i], highs[i]) for i in lows]

    def _grad_to_hp(self, clear_lp_grads: bool = True) -> None:
        for low, high in self._pairs():
            if high is low:
                continue
            assert low.grad is not None, "The low precision parameter's gradient is None."
            high.grad = low.grad.float()
            if clear_lp_grads:
                low.grad = None

    def _update_param(self) -> None:
        for low, high in self._pairs():
            if high is not low:
                low.data.copy_(high.to(low.dtype).data)

    # ---- what the optimizer holds ----
    def master_weights(self) -> list[torch.Tensor]:
        """The float32 copies of the active block's weights that are not float32 themselves."""
        return [high for low, high in self._pairs() if high is not low]

    def _base_indices(self) -> dict[int, int]:
        """``id(tensor) -> index`` as the base optimizer's ``state_dict`` numbers its parameters."""
        params = [p for group in self.base_optimizer.param_groups for p in group["params"]]
        return {id(p): i for i, p in enumerate(params)}

    def log_values(self) -> dict[str, float]:
        """Joins each Trainer log record (optiplug's optimizer ``log_values`` convention)."""
        return {"badam_active_block": float(self.active_block if self.active_block is not None else -1)}

    def state_dict(self) -> dict[str, Any]:
        """The base AdamW's ``state_dict`` with each master copy under its parameter's state
        (``"master_weight"``), and the block schedule under ``"badam"``."""
        state = self.base_optimizer.state_dict()
        index = self._base_indices()
        for master in self.master_weights():  # a new dict: the ones in `state` are the live AdamW states
            i = index[id(master)]
            state["state"][i] = {**state["state"].get(i, {}), "master_weight": master.detach()}
        state["badam"] = {
            "mode": "layer",
            "global_step": self.global_step,
            "num_blocks": self.block_num,
            "active_block": self.active_block,
            "next_block": self.current_block_idx,
            "block_order": list(self.block_order),
            "param_groups": _hyperparameters(self.param_groups),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("badam", None)
        if not isinstance(extra, dict) or extra.get("mode") != "layer":
            raise _not_saved_by_us("layer")
        if extra["num_blocks"] != self.block_num:
            raise optiplug.CheckpointError(
                f"badam: the checkpoint was saved with {extra['num_blocks']} blocks and this run has {self.block_num}: "
                "resume with the same model and optimizer.blocks"
            )
        per_param = {i: dict(values) for i, values in state_dict["state"].items()}
        saved = {i: values.pop("master_weight") for i, values in per_param.items() if "master_weight" in values}
        state_dict["state"] = {i: values for i, values in per_param.items() if values}
        self.global_step = extra["global_step"]
        self.block_order = [int(i) for i in extra["block_order"]]
        if self.ds_zero3_enabled:
            warnings.warn(
                "badam: under DeepSpeed ZeRO-3 the active block is not restored from the checkpoint (only the step "
                "counter and block order are)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.base_optimizer.load_state_dict(state_dict)
            return
        self._activate(int(extra["active_block"]))
        self.current_block_idx = int(extra["next_block"])
        index = self._base_indices()
        masters = {index[id(m)]: m for m in self.master_weights()}
        if sorted(masters) != sorted(saved) or any(masters[i].shape != saved[i].shape for i in masters):
            raise optiplug.CheckpointError(
                "badam: the checkpoint's master weights do not match the active block's parameters: resume with the "
                "same model, dtype and optimizer settings"
            )
        with torch.no_grad():
            for i, master in masters.items():
                master.copy_(saved[i])
        self.base_optimizer.load_state_dict(state_dict)
        for group, hyperparameters in zip(self.param_groups, extra["param_groups"]):
            group.update(hyperparameters)

    # ---- what the optimizer changed on the model ----
    def release(self) -> None:
        """Make every parameter this optimizer manages trainable again (after training)."""
        for _, param in self.named_parameters_list:
            param.requires_grad_(True)

    def attach(self) -> None:
        """Freeze every parameter outside the active block again (before training)."""
        for name, param in self.named_parameters_list:
            active = in_block(name, self.active_param_prefixs) and not (self.lora_mode and "lora" not in name)
            param.requires_grad_(active)


class RatioAdam(BlockOptimizerRatio):
    """``badam.BlockOptimizerRatio`` (ratio mode) with exact resume and removable gradient hooks.

    Args:
        param_groups: the parameter groups (weight decay is not applied in this mode).
        named_parameters: the trainable ``(name, parameter)`` pairs.
        update_ratio: fraction of each parameter's entries updated at a time.
        switch_every: steps before the window moves; -1 never moves it.
        mask_mode: ``adjacent`` or ``scatter``.
        lr, betas, eps: Adam's hyperparameters.
        include_embedding, include_lm_head: train badam's embedding / output-head parameter.
    """

    def __init__(
        self,
        param_groups: list[dict],
        named_parameters: NamedParameters,
        *,
        update_ratio: float = 0.1,
        switch_every: int = 100,
        mask_mode: str = "adjacent",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        include_embedding: bool = False,
        include_lm_head: bool = False,
    ):
        # BlockOptimizerRatio.__init__ drops its gradient hooks' handles (the hooks stay on the model for
        # good) and fails on a model without an 'embed' or 'lm_head' parameter. This is the same set-up,
        # in the same order (the per-parameter seeds draw from torch's RNG), keeping the handles.
        self.update_ratio = update_ratio
        self.verbose = 0
        self.sparse_hook = self.sparse_update_hook()
        self.param_groups = param_groups
        self.named_parameters_list = list(named_parameters)
        self.sparse_dict: defaultdict[torch.Tensor, dict] = defaultdict(dict)
        self.switch_every = switch_every if switch_every > 0 else NEVER
        self.preserve_threshold = 100
        self.global_step = 0
        self.current_block_index = 0
        self.include_embedding = include_embedding
        self.param_num = len(self.named_parameters_list)
        self.ordered_named_params: list = []
        self.frozen = [
            layer
            for wanted, layer in ((include_embedding, self.embedding_layer), (include_lm_head, self.lm_head_layer))
            if not wanted and layer is not None
        ]
        self.mask_mode = mask_mode
        self.keep_mask = True
        self.mask_dict: dict[torch.Size, Any] = {}
        for param in self.frozen:
            param.requires_grad_(False)
        self.hooked = [param for _, param in self.named_parameters_list if param.requires_grad]
        self._handles: list[Any] = []
        for _, param in self.named_parameters_list:
            self.sparse_dict[param]["offset"] = 0
            self.sparse_dict[param]["seed"] = torch.randint(0, 1000, (1,)).item()
        self.attach()
        torch.optim.Optimizer.__init__(self, param_groups, dict(lr=lr, betas=betas, eps=eps))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["state"] = {index: dict(values) for index, values in state["state"].items() if values}
        params = [param for _, param in self.named_parameters_list]
        state["badam"] = {
            "mode": "ratio",
            "global_step": self.global_step,
            "offsets": [int(self.sparse_dict[p]["offset"]) for p in params],
            "seeds": [int(self.sparse_dict[p]["seed"]) for p in params],
            "masks": [
                {"shape": list(shape), "indices": mask._indices(), "values": mask._values()}
                for shape, mask in self.mask_dict.items()
                if mask is not None
            ],
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("badam", None)
        if not isinstance(extra, dict) or extra.get("mode") != "ratio":
            raise _not_saved_by_us("ratio")
        params = [param for _, param in self.named_parameters_list]
        if len(extra["offsets"]) != len(params):
            raise optiplug.CheckpointError(
                f"badam: the checkpoint was saved for {len(extra['offsets'])} parameters and this run trains "
                f"{len(params)}: resume with the same model and settings"
            )
        super().load_state_dict(state_dict)
        self.global_step = extra["global_step"]
        for param, offset, seed in zip(params, extra["offsets"], extra["seeds"]):
            self.sparse_dict[param]["offset"] = int(offset)
            self.sparse_dict[param]["seed"] = int(seed)
        device = {tuple(p.shape): p.device for p in reversed(params)}
        self.mask_dict = {}
        for mask in extra["masks"]:
            shape = torch.Size(mask["shape"])
            where = device.get(tuple(shape), mask["indices"].device)
            self.mask_dict[shape] = torch.sparse_coo_tensor(mask["indices"].to(where), mask["values"].to(where), shape)

    def release(self) -> None:
        """Remove the gradient hooks and unfreeze the embedding / output head (after training)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param in self.frozen:
            param.requires_grad_(True)

    def attach(self) -> None:
        """Freeze the embedding / output head and hook the gradients again (before training)."""
        for param in self.frozen:
            param.requires_grad_(False)
        if not self._handles:
            self._handles = [param.register_post_accumulate_grad_hook(self.sparse_hook) for param in self.hooked]


def build_badam(ctx: optiplug.BuildContext, cfg: BAdamConfig) -> BlockAdamW | RatioAdam:
    """Build the optimizer ``cfg`` describes on ``ctx``'s trainable parameters."""
    named = ctx.named_parameters()
    if not named:
        raise optiplug.ConfigError("badam: the model has no trainable parameters; unfreeze some or pick another model")
    names = [name for name, _ in named]
    if cfg.mode == "ratio":
        frozen = ratio_frozen(names, cfg)
        if frozen:
            warnings.warn(never_trained_message(frozen), UserWarning, stacklevel=2)
        role = {optiplug.GROUP_ROLE: f"sparse adam on {cfg.update_ratio:g} of each tensor at a time"}
        return RatioAdam(
            ctx.param_groups(0.0, **role),
            named,
            update_ratio=cfg.update_ratio,
            switch_every=cfg.switch_every,
            mask_mode=cfg.mask_mode,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            include_embedding=cfg.include_embedding,
            include_lm_head=cfg.include_lm_head,
        )
    plan = plan_blocks(names, cfg)
    if plan.never_trained:
        warnings.warn(never_trained_message(plan.never_trained), UserWarning, stacklevel=2)
    base = torch.optim.AdamW(
        ctx.param_groups(cfg.weight_decay, **{optiplug.GROUP_ROLE: "adamw on the active block"}),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **optiplug.kernel_kwargs("auto", [p for _, p in named]),
    )
    return BlockAdamW(
        base,
        named,
        plan.blocks,
        switch_every=cfg.switch_every,
        switch_mode=cfg.switch_mode,
        start_block=cfg.start_block,
        active_modules=cfg.active_modules,
        decay_names=ctx.decay_parameter_names(),
        weight_decay=cfg.weight_decay,
    )
