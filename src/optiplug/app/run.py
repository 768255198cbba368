"""The main job: a run config -> model, data, trainer -> trained model and a summary.

``optiplug train`` and :func:`optiplug.app.train` call :func:`train`. With no config it trains the
embedded default: a tiny Llama-style model, randomly initialised, on the corpus shipped with
optiplug, with the default optimizer and scheduler, in about a minute on two CPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from optiplug.app.config import EMBEDDED, ModelConfig, RunConfig, resolve_config
from optiplug.app.safety import DivergedError
from optiplug.errors import ConfigError, OptiplugError

__all__ = [
    "SUMMARY_FILE",
    "RunResult",
    "check_run",
    "default_training_arguments",
    "preflight",
    "train",
    "validate_run",
]

SUMMARY_FILE = "summary.json"
DEFAULT_OUTPUT_DIR = "outputs/optiplug-run"
DEFAULT_MAX_STEPS = 400


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        output_dir: where the model, tokenizer, ``trainer_state.json``, ``loss.png`` and
            ``summary.json`` were written.
        summary: the contents of ``summary.json``.
        losses: ``(step, training loss)`` for every logged step.
    """

    output_dir: Path
    summary: dict[str, Any]
    losses: list[tuple[int, float]]


def _has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()
    )


def default_training_arguments() -> dict[str, Any]:
    """The ``TrainingArguments`` defaults of a run, before the config's ``training`` section is applied."""
    return {
        "output_dir": DEFAULT_OUTPUT_DIR,
        "max_steps": DEFAULT_MAX_STEPS,
        "per_device_train_batch_size": 16,
        "logging_steps": 10,
        "logging_first_step": True,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "disable_tqdm": False,
        "use_cpu": not _has_accelerator(),
    }


# ---- validation: everything below runs before anything is written ---------------------------


def _training_arguments(cfg: RunConfig):
    """``TrainingArguments`` from the defaults and the ``training`` section (the optimizer's lr etc. copied in)."""
    from optiplug.app.evaluation import evaluation_defaults
    from optiplug.app.validation import training_arguments

    defaults = {**default_training_arguments(), **evaluation_defaults(cfg.data.has_evaluation)}
    if "num_train_epochs" in cfg.training and "max_steps" not in cfg.training:
        del defaults["max_steps"]
    args = training_arguments(cfg, defaults)
    _check_resume(cfg, args)
    return args


def _check_resume(cfg: RunConfig, args: Any) -> None:
    """A checkpoint to resume from must exist, be complete and match the run's optimizer and scheduler config."""
    from optiplug.app.safety import check_checkpoint

    checkpoint = args.resume_from_checkpoint
    if checkpoint is None:
        return
    path = Path(checkpoint)
    from optiplug.app.checkpoints import PARTIAL

    if PARTIAL in path.parts:
        from optiplug.errors import CheckpointError

        raise CheckpointError(
            f"training.resume_from_checkpoint: {checkpoint!r} is a checkpoint whose save was cut short; "
            "resume from a checkpoint-N directory of the output directory"
        )
    if not (path / "trainer_state.json").is_file():
        from optiplug.errors import CheckpointError

        what = "does not exist" if not path.exists() else "is not a Trainer checkpoint (no trainer_state.json)"
        raise CheckpointError(
            f"training.resume_from_checkpoint: {checkpoint!r} {what}; give a checkpoint-N directory of an earlier run"
        )
    check_checkpoint(str(checkpoint), cfg.optimizer, cfg.scheduler, engine=bool(args.deepspeed or args.fsdp))


# Any of these makes a directory a tokenizer's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_model_files(cfg: ModelConfig) -> None:
    """The model's and tokenizer's directories: present, with a config.json, tokenizer files and whole weights."""
    from optiplug.app.safety import check_weight_files

    if cfg.name_or_path != EMBEDDED:
        path = _local_dir(cfg.name_or_path, "model.name_or_path")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path: {cfg.name_or_path!r} has no config.json; give a directory written by "
                "save_pretrained"
            )
        if not cfg.from_scratch:
            check_weight_files(path, "model.name_or_path")
    name = cfg.tokenizer or cfg.name_or_path
    if name != EMBEDDED:
        field = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        path = _local_dir(name, field)
        if not any((path / file).is_file() for file in _TOKENIZER_FILES):
            raise ConfigError(
                f"{field}: {name!r} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
                "set model.tokenizer to a tokenizer directory"
            )


def preflight(cfg: RunConfig) -> Any:
    """Every check a run makes before loading weights or tokenizing; ``optiplug validate`` runs exactly these.

    The launcher, the Trainer arguments, the resume checkpoint (complete, whole, same optimizer and
    scheduler config), the output directory (:func:`optiplug.app.safety.check_output_dir`), the
    model's and tokenizer's directories and the data files. Writes nothing.

    Returns:
        The ``TrainingArguments`` of the run.
    """
    from optiplug.app.data import check_evaluation_data, resolve_paths
    from optiplug.app.evaluation import check_evaluation
    from optiplug.app.launch import check_engine_launch
    from optiplug.app.safety import check_output_dir

    check_engine_launch(cfg.training)  # FSDP/DeepSpeed without a launcher: one line, not a traceback
    check_evaluation(cfg.training, cfg.data.has_evaluation)
    args = _training_arguments(cfg)
    check_output_dir(cfg, args)
    _check_model_files(cfg.model)
    resolve_paths(cfg.data.path)
    check_evaluation_data(cfg.data)
    return args


def _local_dir(name: str, field: str) -> Path:
    """A local directory for ``name``: the directory itself, or its snapshot in the Hugging Face cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{field}: {name!r} is a file; expected a model directory or a hub id in the local cache")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"{field}: the directory {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise ConfigError(
            f"{field}: {name!r} is neither a local directory nor a model in the local Hugging Face cache "
            f"(optiplug never downloads; fetch it first, e.g. `hf download {name}`)"
        ) from None


def _load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from optiplug.app.data import assets_dir

    name = cfg.tokenizer or cfg.name_or_path
    field = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    path = assets_dir() / "tokenizer" if name == EMBEDDED else _local_dir(name, field)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{field}: cannot load a tokenizer from {name!r}: {str(error).splitlines()[0]}") from None


def _load_model(cfg: ModelConfig, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from optiplug.app.data import assets_dir

    dtype = getattr(torch, cfg.dtype)
    name = cfg.name_or_path
    path = assets_dir() / "model" if name == EMBEDDED else _local_dir(name, "model.name_or_path")
    try:
        if name == EMBEDDED or cfg.from_scratch:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            set_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name_or_path: cannot load a causal LM from {name!r}: {str(error).splitlines()[0]}"
        ) from None


def _check_fits(model: Any, dataset: Any) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    top = int(dataset.blocks.max())
    if top >= vocab:
        raise ConfigError(
            f"model.tokenizer: the tokenizer produced token id {top}, but the model's vocabulary has {vocab} "
            "entries; use the model's own tokenizer"
        )
    _check_positions(model, dataset.block_size)


PURE_FLOAT16 = (
    "model.dtype=float16 would train float16 weights with float16 optimizer state and no loss scaling: small "
    "gradients and Adam's squared gradients underflow and the loss diverges; use model.dtype=bfloat16, or "
    "model.dtype=float32 with training.fp16=true (mixed precision), or a LoRA adapter (finetuning.type=lora "
    "trains it in float32)"
)


def _check_float16(model: Any) -> None:
    """No trainable parameter is float16 (a LoRA adapter on a float16 model is float32).

    Pure float16 training is refused rather than given float32 master weights: that is mixed precision, which
    ``training.fp16`` with a float32 model already is (with loss scaling), for every optimizer.
    """
    import torch

    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise ConfigError(PURE_FLOAT16)


def _check_positions(model: Any, block_size: int) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and block_size > positions:
        raise ConfigError(
            f"data.block_size={block_size} exceeds the model's max_position_embeddings={positions}; "
            "lower data.block_size"
        )


@contextlib.contextmanager
def _no_zero3_init() -> Iterator[None]:
    """transformers enters DeepSpeed's ``zero.Init`` in ``from_config`` once ZeRO-3 arguments exist: not for a
    model on the meta device, which holds nothing to partition."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def check_run(cfg: RunConfig) -> tuple[Any, list[str]]:
    """Every check ``train`` makes before its first step, writing nothing; ``optiplug validate`` and ``train`` run it.

    :func:`preflight`, then, on the model's skeleton (torch's meta device: no weights read, nothing
    tokenized) with the fine-tuning applied: the block size against the model's positions, and
    :func:`optiplug.factory.check_before_training` (the optimizer's one check path, the optimizer built
    on the skeleton so its constructor checks its arguments, the scheduler built for the run's steps).

    Returns:
        The ``TrainingArguments`` of the run (its cooldown applied), and the checks that need real weights
        (each ``"what (why)"``; they run when training starts).
    """
    from optiplug.app.cooldown import resolve_cooldown
    from optiplug.app.estimate import meta_model
    from optiplug.context import BuildContext
    from optiplug.factory import check_before_training

    cfg, branch = resolve_cooldown(cfg, DEFAULT_OUTPUT_DIR)
    args = preflight(cfg)
    with _no_zero3_init():
        model = meta_model(cfg.model, cfg.finetuning)
    _check_positions(model, cfg.data.block_size)
    _check_float16(model)
    ctx = BuildContext(model=model, args=args, scheduler_config=cfg.scheduler)
    # A cooldown's schedule replaces the configured one (app/cooldown.py); the step count is known unless it
    # comes from the data (training.num_train_epochs).
    scheduler = cfg.scheduler if branch is None else None
    left = check_before_training(ctx, cfg.optimizer, scheduler, max(int(args.max_steps), 0))
    return args, left


def validate_run(cfg: RunConfig) -> Any:
    """:func:`check_run`, returning the ``TrainingArguments`` of the run."""
    return check_run(cfg)[0]


# ---- outputs --------------------------------------------------------------------------------


def _plot_losses(
    losses: list[tuple[int, float]], title: str, path: Path, evaluations: Sequence[tuple[int, float]] = ()
) -> None:
    """The training loss by step, and the evaluation loss at each evaluation (perplexity on the right axis)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if losses:
        steps, values = zip(*losses)
        axes.plot(steps, values, marker="o" if len(losses) < 30 else None, markersize=3, label="training loss")
    if evaluations:
        steps, values = zip(*evaluations)
        axes.plot(steps, values, marker="s", markersize=4, color="C1", label="eval loss")
        perplexity = axes.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.maximum(p, 1e-300))))
        perplexity.set_ylabel("perplexity (exp of the loss)")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss" if evaluations else "training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _summary(cfg: RunConfig, trainer: Any, dataset: Any, losses: list[tuple[int, float]], train_time: float) -> dict:
    from optiplug.app.evaluation import evaluation_summary
    from optiplug.app.measure import peak_rss_bytes
    from optiplug.state_sizes import optimizer_state_bytes
    from optiplug.unwrap import unwrap_optimizer

    args, state, model = trainer.args, trainer.state, trainer.model
    # Throughput counts only this session's steps (a resumed run starts at the checkpoint's step).
    session_steps = state.global_step - int(getattr(trainer, "_initial_global_step", 0) or 0)
    tokens = session_steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens *= dataset.block_size
    train_loss = [e["train_loss"] for e in state.log_history if "train_loss" in e]
    return {
        "optiplug_version": _version(),
        "status": "finished",
        "model": cfg.model.name_or_path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data": {
            "path": cfg.data.path,
            "blocks": len(dataset),
            "block_size": dataset.block_size,
            "corpus_tokens": dataset.total_tokens,
            **_evaluation_data(cfg, trainer.eval_dataset),
        },
        "optimizer": trainer.optimizer_config.model_dump(mode="json"),  # what ran (a resume must match it)
        "scheduler": trainer.scheduler_config.model_dump(mode="json"),
        "resumed_from": args.resume_from_checkpoint,
        "steps": state.global_step,
        "tokens": tokens,
        "train_time_s": round(train_time, 3),
        "steps_per_second": round(session_steps / train_time, 3) if train_time > 0 else None,
        "tokens_per_second": round(tokens / train_time, 1) if train_time > 0 else None,
        "first_loss": losses[0][1] if losses else None,
        # the loss logged last: the mean over the steps since the log before it (training.logging_steps)
        "final_loss": losses[-1][1] if losses else None,
        "final_loss_step": losses[-1][0] if losses else None,
        "mean_loss": train_loss[-1] if train_loss else None,
        "plan": getattr(trainer, "optiplug_plan", None),  # what the run header said
        "cooldown": cooldown.record() if (cooldown := getattr(trainer, "optiplug_cooldown", None)) else None,
        "guard": cfg.guard.model_dump(mode="json"),  # the rules the run was judged by
        **evaluation_summary(state.log_history),
        "optimizer_state_bytes": optimizer_state_bytes(unwrap_optimizer(trainer.optimizer)),
        "peak_rss_bytes": peak_rss_bytes(),
        "device": str(args.device),
        "world_size": args.world_size,
    }


def _evaluation_data(cfg: RunConfig, evaluation: Any) -> dict[str, Any]:
    if evaluation is None:
        return {}
    data = cfg.data
    source = {"eval_path": data.eval_path} if data.eval_path is not None else {"eval_ratio": data.eval_ratio}
    return {**source, "eval_blocks": len(evaluation), "eval_tokens": evaluation.total_tokens}


def _logged_losses(trainer: Any) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]


def _version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("optiplug")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """transformers' own progress bars (saving the model's shards) off for a quiet run, and back after it."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    if not shown:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and not shown:
            logging.enable_progress_bar()


# ---- the job --------------------------------------------------------------------------------


def train(
    config: RunConfig | str | Path | None = None, overrides: Sequence[str] = (), *, quiet: bool = False
) -> RunResult:
    """Train a causal language model with the configured optimizer and scheduler, and write the results.

    The output directory (``training.output_dir``, default ``outputs/optiplug-run``) receives
    the model, the tokenizer, ``trainer_state.json``, ``loss.png`` and, last, ``summary.json``.

    No half-written output looks finished:

    * the config, the data (every file read and tokenized), the model and tokenizer paths,
      the Trainer arguments and the optimizer's compatibility checks are all validated
      before anything is written; a run that fails validation leaves the output directory
      untouched;
    * once validation passes, a ``summary.json`` left by an earlier run is removed before
      training starts, so a run that fails while training leaves none;
    * ``summary.json`` is written last and atomically (a temporary file renamed into place):
      a directory with a ``summary.json`` holds a finished run (``"status": "finished"``) or a
      run that diverged (``"status": "diverged"``, no model saved);
    * the output directory follows the rule of :mod:`optiplug.app.safety` (docs/configuration.md,
      "Safety"): nothing a user wrote is deleted, and a failed run leaves no directory it created empty.

    Only the main process (``trainer.is_world_process_zero()``) writes outputs.

    Args:
        config: a :class:`RunConfig`, a YAML file, or None for the embedded default run.
        overrides: ``"a.b=value"`` strings applied on top (``"optimizer.lr=3e-4"``).
        quiet: print no run header, progress bar or log lines (errors still raise).

    Returns:
        A :class:`RunResult` with the output directory, the summary and the logged losses.

    Raises:
        ConfigError: (and its subclasses) for any invalid input, before anything is written.
        DivergedError: the run diverged by a rule of ``cfg.guard`` (summary.json says so).
        KeyboardInterrupt: Ctrl-C or (:class:`~optiplug.app.stopping.Terminated`) SIGTERM, with
            ``optiplug_message`` (the step and the last checkpoint) set (:mod:`optiplug.app.stopping`).
    """
    from optiplug.app.stopping import stop_on_signals

    with stop_on_signals() as signals:
        return _job(config, overrides, quiet, signals)


def _job(config: RunConfig | str | Path | None, overrides: Sequence[str], quiet: bool, signals: Any) -> RunResult:
    from optiplug.app.adapters import apply_finetuning
    from optiplug.app.checkpoints import remove_partial
    from optiplug.app.cooldown import resolve_cooldown
    from optiplug.app.data import load_datasets
    from optiplug.app.safety import prepare_output_dir

    cfg = resolve_config(config, overrides)
    args, left = check_run(cfg)  # what `optiplug validate` checks, before anything is loaded or written
    cfg, branch = resolve_cooldown(cfg, DEFAULT_OUTPUT_DIR)
    if args.deepspeed:
        import deepspeed

        if not deepspeed.comm.is_initialized():
            # On CPU accelerate creates the gloo group but not deepspeed.comm, and ZeRO-3's
            # zero.Init (entered by from_pretrained/from_config) would see a world size of 1.
            deepspeed.init_distributed()
    resume = args.resume_from_checkpoint
    tokenizer = _load_tokenizer(cfg.model)
    dataset, evaluation = load_datasets(cfg.data, tokenizer)
    model = apply_finetuning(_load_model(cfg.model, args.seed), cfg.finetuning)
    for blocks in (dataset, evaluation):
        if blocks is not None:
            _check_fits(model, blocks)
    output = prepare_output_dir(cfg, args, main=args.process_index == 0)  # changes nothing before the first step
    status = "failed"
    try:
        with _progress_bars(not quiet):
            result = _train(
                cfg, args, tokenizer, dataset, model, resume, evaluation, quiet, branch, output, left, signals
            )
        status = "finished"
        return result
    except DivergedError:
        status = "diverged"
        raise
    except KeyboardInterrupt as interrupt:
        status = "interrupted"
        _describe(interrupt, signals.trainer, output.path)
        raise
    finally:
        if output.main and output.begun:
            remove_partial(output.path)  # a checkpoint whose save was cut short
        details = {"signal": "SIGTERM"} if signals.received == signal.SIGTERM else {}
        problem = output.finish(status, **details)  # never raises: the run's own error is the one reported
        if problem and status == "finished":
            raise OptiplugError(f"the run finished, but optiplug {problem}")
        if problem:
            print(f"optiplug: also, {problem}", file=sys.stderr)


def _describe(interrupt: KeyboardInterrupt, trainer: Any, out: Path) -> None:
    """Set the interruption's one line: how it stopped, at which step, and the last complete checkpoint."""
    from optiplug.app.safety import last_checkpoint
    from optiplug.app.stopping import Terminated

    if hasattr(interrupt, "optiplug_message"):
        return
    what = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
    if trainer is None:
        message = f"{what} before training started"
    else:
        checkpoint = last_checkpoint(out)
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no complete checkpoint was saved"
        message = f"{what} at step {trainer.state.global_step}; {where}"
    interrupt.optiplug_message = message  # type: ignore[attr-defined]


def _written_at_the_ends(cfg: RunConfig) -> list[str]:
    """The entries a run writes outside its checkpoints, at its start (PiSSA's initial adapter) and its end."""
    from optiplug.app.adapters import BASE_MODEL_DIR, PISSA_CONVERTED_DIR, PISSA_INIT_DIR, PISSA_TRAINED_DIR

    names = ["trainer_state.json", "loss.png", SUMMARY_FILE]
    if cfg.finetuning.type == "lora":
        names.append(BASE_MODEL_DIR)
        if cfg.finetuning.pissa_convert:
            names += [PISSA_INIT_DIR, PISSA_TRAINED_DIR, PISSA_CONVERTED_DIR]
    return names


def _train(
    cfg: RunConfig,
    args: Any,
    tokenizer: Any,
    dataset: Any,
    model: Any,
    resume: Any,
    evaluation: Any = None,
    quiet: bool = False,
    branch: Any = None,
    output: Any = None,
    left: Sequence[str] = (),
    signals: Any = None,
) -> RunResult:
    from transformers import default_data_collator

    from optiplug.app.adapters import BASE_MODEL_DIR, pissa_callbacks
    from optiplug.app.checkpoints import save_model_whole
    from optiplug.app.divergence import DivergenceCallback
    from optiplug.app.evaluation import evaluation_losses
    from optiplug.app.header import add_header
    from optiplug.app.stopping import Signals, again_callback
    from optiplug.app.trainer import GuardedTrainer, OutputDirCallback, OutputDirIntent

    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=evaluation,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        run_config=cfg,
    )
    trainer.optiplug_cooldown = branch  # a cooldown's schedule, recorded in every checkpoint
    add_header(trainer, quiet)
    trainer.add_callback(DivergenceCallback(trainer, cfg.guard))
    signals = signals if signals is not None else Signals()
    signals.trainer = trainer  # for the interruption's message
    trainer.add_callback(again_callback(signals))
    if args.enable_jit_checkpoint:  # transformers' SIGTERM handler, installed by the Trainer over ours
        signals.hand_over_sigterm()
    for callback in pissa_callbacks(trainer, cfg.finetuning):
        trainer.add_callback(callback)
    if left:  # checks the model's skeleton could not run: on the weights, before anything is written
        trainer.check_optimizer()
    else:
        trainer.mark_optimizer_checked()
    trainer.optiplug_output = output  # a checkpoint's partial directory is recorded before it is written
    if output is not None:  # the output directory changes only once the optimizer and scheduler are built
        output.expect(_written_at_the_ends(cfg))  # in the first marker: a run killed at its end stays removable
        trainer.callback_handler.callbacks.insert(0, OutputDirCallback(output, stale=[SUMMARY_FILE]))
        trainer.add_callback(OutputDirIntent(output))

    out = Path(args.output_dir)
    main = trainer.is_world_process_zero()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
        signals.raise_if_handed_over()  # the JIT checkpoint stopped the loop: interrupted, not finished
    except DivergedError as error:
        losses = _logged_losses(trainer)
        summary = _summary(cfg, trainer, dataset, losses, time.perf_counter() - start)
        summary.update(status="diverged", diverged_at_step=error.step, diverged=error.what,
                       last_checkpoint=error.checkpoint)  # fmt: skip
        if main:
            title = f"{cfg.optimizer.name} on {cfg.model.name_or_path}: diverged"
            _plot_losses(losses, title, out / "loss.png", evaluation_losses(trainer.state.log_history))
            _write_json_atomic(summary, out / SUMMARY_FILE)
        raise
    train_time = time.perf_counter() - start
    evaluated = evaluation_losses(trainer.state.log_history)
    if evaluation is not None and (not evaluated or evaluated[-1][0] != trainer.state.global_step):
        trainer.evaluate()  # the final weights' loss, unless the last step was evaluated

    save_model_whole(trainer, str(out))
    if main and cfg.finetuning.type == "lora" and (cfg.model.name_or_path == EMBEDDED or cfg.model.from_scratch):
        # The adapter needs its base model, which is not on disk: rebuild it (same seed, same weights).
        _load_model(cfg.model, args.seed).save_pretrained(str(out / BASE_MODEL_DIR))
    losses = _logged_losses(trainer)
    summary = _summary(cfg, trainer, dataset, losses, train_time)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        lr = getattr(cfg.optimizer, "lr", None)
        title = (
            f"{cfg.optimizer.name}{f' (lr {lr:g})' if lr else ''} + {cfg.scheduler.name} on {cfg.model.name_or_path}"
        )
        _plot_losses(losses, title, out / "loss.png", evaluation_losses(trainer.state.log_history))
        _write_json_atomic(summary, out / SUMMARY_FILE)
    return RunResult(output_dir=out, summary=summary, losses=losses)
