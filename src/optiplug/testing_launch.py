"""One torchrun launch per engine for every multi-process test case of a test session, optiplug's and plugins'.

Starting processes is the slow part of a multi-process test (each imports torch and transformers),
so cases do not launch their own: a test module registers its case functions when it is imported,
and the first test that asks for an engine's results starts ONE ``torchrun`` launch (2 processes,
gloo) that runs every case of that engine registered so far; the other tests read the results.
Under pytest-xdist the workers share the launch (a file lock; the first worker runs it).

A case is a function without arguments, run in every process with ``torch.distributed``
initialised; it returns a JSON-able value (its own result for that process)::

    import pytest
    from optiplug.testing_launch import launched_case

    @launched_case("fsdp2")
    def galore_under_fully_shard():
        ...                      # build a fully_shard-ed model, train, compare
        return {"losses": losses}

    @pytest.mark.slow
    def test_galore(fsdp2):      # the fixture of optiplug.testing: launch_results("fsdp2", ...)
        rank0, rank1 = fsdp2[galore_under_fully_shard]

A case that raises is reported by the test that reads it (with its traceback), the others still
run; a case should not leave a collective half-done on one process (the launch would hang until
its timeout). Cases run in registration order; each starts after a barrier.

Run the launch by hand with ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
optiplug.testing_launch ROOT`` after writing ``ROOT/spec.json`` (see :func:`launch_results`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "LaunchResults",
    "check_resume_in_one_process",
    "check_side_by_side",
    "fsdp2_side_by_side",
    "fully_sharded",
    "launch_results",
    "launch_root",
    "launched_case",
    "load_checkpoint",
    "resume_in_one_process",
    "save_checkpoint",
    "train_steps",
]

PROCESSES = 2
TIMEOUT_S = 1800

_CASES: dict[str, dict[str, dict[str, str]]] = {}  # engine -> key -> {"file", "function"}
_RESULTS: dict[tuple[str, str], LaunchResults] = {}


def _key(function: Callable[..., Any]) -> str:
    return f"{Path(function.__code__.co_filename).resolve()}::{function.__qualname__}"


def launched_case(engine: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register the decorated function as a case of ``engine``'s shared launch (a module-level function)."""

    def register(function: Callable[[], Any]) -> Callable[[], Any]:
        if "<locals>" in function.__qualname__:
            raise TypeError(f"launched_case: {function.__qualname__} must be defined at module level")
        _CASES.setdefault(engine, {})[_key(function)] = {
            "file": str(Path(function.__code__.co_filename).resolve()),
            "function": function.__qualname__,
        }
        return function

    return register


def _launched(engine: str) -> Callable[[Any], LaunchResults]:
    """The fixture of ``engine``'s launch: :func:`launch_results` (one launch per session)."""

    def results(tmp_path_factory: Any) -> LaunchResults:
        return launch_results(engine, tmp_path_factory)

    return results


if sys.modules.get("pytest") is not None:  # loaded by pytest (the root conftest's pytest_plugins): the fixtures
    import pytest

    fsdp2 = pytest.fixture(_launched("fsdp2"), name="fsdp2", scope="session")
    deepspeed = pytest.fixture(_launched("deepspeed"), name="deepspeed", scope="session")


def launch_root() -> Path:
    """In a case: the launch's folder (files written there are read by the tests as ``results.root``)."""
    return Path(os.environ["OPTIPLUG_LAUNCH_ROOT"])


class LaunchResults:
    """The per-process results of one engine's launch: ``results[case]`` is ``[process 0's, process 1's]``."""

    def __init__(self, root: Path, engine: str, launch: subprocess.CompletedProcess | None):
        self.root, self.engine, self.launch = root, engine, launch
        self.per_rank = [
            json.loads(path.read_text()) if path.exists() else {}
            for path in (root / f"result-{rank}.json" for rank in range(PROCESSES))
        ]

    def __getitem__(self, case: Callable[[], Any] | str) -> list[Any]:
        key = case if isinstance(case, str) else _key(case)
        values = []
        for rank, results in enumerate(self.per_rank):
            if key not in results:
                missing = f"{self.engine} launch: case {key} has no result from process {rank}"
                raise AssertionError(missing + self._tail())
            got = results[key]
            if "error" in got:
                raise AssertionError(f"{self.engine} launch: case {key} failed in process {rank}:\n{got['error']}")
            values.append(got["value"])
        return values

    def _tail(self) -> str:
        if self.launch is None:
            return ""
        return f" (launch exit {self.launch.returncode}):\n{self.launch.stdout[-2000:]}\n{self.launch.stderr[-6000:]}"


def launch_results(engine: str, tmp_path_factory: Any, timeout: int = TIMEOUT_S) -> LaunchResults:
    """Run every case of ``engine`` registered so far in one launch, once per test session; their results."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, shared by the xdist workers
    root = base / f"launch-{engine}"
    cached = _RESULTS.get((engine, str(root)))
    if cached is not None:
        return cached
    cases = dict(_CASES.get(engine, {}))
    launch = None
    with FileLock(f"{root}.lock"):
        if not (root / "spec.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            (root / "spec.json").write_text(json.dumps({"engine": engine, "cases": cases}, indent=1))
            launch = _launch(root, timeout)
            (root / "launch.log").write_text(f"exit {launch.returncode}\n{launch.stdout}\n{launch.stderr}")
    results = LaunchResults(root, engine, launch)
    if launch is None and (root / "launch.log").exists():
        results.launch = subprocess.CompletedProcess([], 0, (root / "launch.log").read_text(), "")
    _RESULTS[(engine, str(root))] = results
    return results


def _launch(root: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)]
    command += ["-m", "optiplug.testing_launch", str(root)]
    try:
        return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        err = error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        return subprocess.CompletedProcess(command, -1, out, f"{err}\ntimed out after {timeout} s")


# ---- the worker: every process of the launch ------------------------------------------------


def _load(file: str, function: str) -> Callable[[], Any]:
    folder = str(Path(file).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the case's own helpers next to it, as pytest imports test modules
    name = f"_launched_{abs(hash(file)):x}_{Path(file).stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None, file
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    target: Any = module
    for part in function.split("."):
        target = getattr(target, part)
    return target


def _work(root: Path) -> None:
    import torch.distributed as dist

    os.environ["OPTIPLUG_LAUNCH_ROOT"] = str(root)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = json.loads((root / "spec.json").read_text())
    results: dict[str, Any] = {}
    out = root / f"result-{rank}.json"
    for key, case in spec["cases"].items():
        dist.barrier()
        try:
            results[key] = {"value": _load(case["file"], case["function"])()}
        except Exception:
            results[key] = {"error": traceback.format_exc()}
        out.write_text(json.dumps(results, indent=1))  # after every case: a later hang keeps the results so far
    dist.barrier()


if __name__ == "__main__":
    from optiplug.process_group import exit_process

    try:
        _work(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        exit_process(1)
    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads (process_group)


# ---- a ready-made FSDP2 case: one optimizer, sharded and in one process, side by side --------


def fully_sharded(model: Any) -> Any:
    """``model`` (a Llama) under FSDP2: one ``fully_shard`` unit per decoder layer, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _fully_sharded(seed: int = 0) -> Any:
    from optiplug.testing import tiny_llama

    return fully_sharded(tiny_llama(seed=seed))


def train_steps(
    model: Any, optimizer: Any, batches: Iterable[Any], rows: slice | None = None, device: Any = None
) -> list[float]:
    """One optimizer step per global batch of token ids (the labels are the inputs): on all of it (``rows``
    None), or on this process's ``rows`` of it, the loss then averaged over the processes. The losses.

    A schedule-free optimizer is put in train mode before each step, as the Trainer does; each batch moves to
    ``device`` when one is given.
    """
    import torch.distributed as dist

    losses = []
    switch = getattr(optimizer, "train", None)
    for ids in batches:
        if callable(switch):
            switch()
        if rows is not None:
            ids = ids[rows]
        if device is not None:
            ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if rows is not None:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def _train_steps(model: Any, optimizer: Any, steps: range, batch: int, rank: int | None = None) -> list[float]:
    """:func:`train_steps` of ``steps`` on global batches of ``PROCESSES * batch`` blocks: all of each (``rank``
    None), or process ``rank``'s ``batch`` rows of it."""
    import torch

    from optiplug.testing import TokenBlocks

    data = TokenBlocks(n=256, distinct=8)
    size = PROCESSES * batch
    batches = [torch.stack([data[i]["input_ids"] for i in range(step * size, (step + 1) * size)]) for step in steps]
    return train_steps(model, optimizer, batches, None if rank is None else slice(rank * batch, (rank + 1) * batch))


def _dcp_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(model: Any, optimizer: Any, path: Path | str) -> None:
    """Save model and optimizer as a ``torch.distributed.checkpoint`` (every process its shards) at ``path``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(path))


def load_checkpoint(model: Any, optimizer: Any, path: Path | str) -> None:
    """Load a ``torch.distributed.checkpoint`` of model and optimizer (as :func:`fsdp2_side_by_side` saves it)
    into ``model``/``optimizer``: sharded in a launch, or unsharded in a process without one (DCP reshards)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def fsdp2_side_by_side(optimizer: dict[str, Any], steps: int = 4, batch: int = 2, name: str = "") -> dict[str, Any]:
    """In a case of the "fsdp2" launch: train ``optimizer`` on a ``fully_shard``-ed tiny Llama and on an unsharded
    copy with the whole global batch, side by side; checkpoint, resume, measure.

    The sharded optimizer is built through ``OptiTrainer.create_optimizer`` (and compared with
    ``optiplug.build_optimizer``'s groups). Its state is saved with ``torch.distributed.checkpoint`` after
    ``steps // 2`` steps into ``launch_root() / name`` and a fresh sharded model and optimizer resume from it.

    Returns (JSON): ``losses`` (``sharded``, ``single``, ``resumed``: the resumed run's last steps),
    ``weights_gap`` (largest difference of the weights at the end), ``state_bytes`` (this process's
    ``sharded`` state and the ``single`` one), ``matrices`` / ``updates`` (``last_step_matrices`` and this
    process's ``last_step_matrix_updates`` of a :class:`optiplug.MatrixOptimizer`, else None),
    ``checkpoint`` (its folder), ``class``, ``groups_match`` (trainer-built groups == build_optimizer's).
    """
    import torch.distributed as dist

    import optiplug
    from optiplug.testing import tiny_llama, training_args

    rank = dist.get_rank()
    label = name or str(optimizer["name"])
    sharded, single = _fully_sharded(), tiny_llama(seed=0)
    trainer = optiplug.OptiTrainer(
        model=sharded, args=training_args(launch_root() / label / "out"), optimizer=optimizer
    )
    built = trainer.create_optimizer()
    direct = optiplug.build_optimizer(sharded, optimizer)
    groups_match = [len(g["params"]) for g in built.param_groups] == [len(g["params"]) for g in direct.param_groups]
    del direct, trainer
    reference = optiplug.build_optimizer(single, optimizer)
    half = steps // 2
    losses = {"sharded": _train_steps(sharded, built, range(half), batch, rank)}
    checkpoint = launch_root() / label / "checkpoint"
    save_checkpoint(sharded, built, checkpoint)
    losses["sharded"] += _train_steps(sharded, built, range(half, steps), batch, rank)
    losses["single"] = _train_steps(single, reference, range(steps), batch)
    resumed_model = _fully_sharded(seed=1)  # other weights: everything must come from the checkpoint
    resumed = optiplug.build_optimizer(resumed_model, optimizer)
    load_checkpoint(resumed_model, resumed, checkpoint)
    losses["resumed"] = _train_steps(resumed_model, resumed, range(half, steps), batch, rank)
    gap = max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), single.parameters()))
    return {
        "losses": losses,
        "weights_gap": gap,
        "state_bytes": {
            "sharded": optiplug.optimizer_state_bytes(built),
            "single": optiplug.optimizer_state_bytes(reference),
        },
        "matrices": getattr(built, "last_step_matrices", None),
        "updates": getattr(built, "last_step_matrix_updates", None),
        "checkpoint": str(checkpoint),
        "class": type(built).__name__,
        "groups_match": groups_match,
    }


def resume_in_one_process(optimizer: dict[str, Any], checkpoint: str, steps: int = 4, batch: int = 2) -> list[float]:
    """In the test process (no launch): the losses of the last ``steps - steps // 2`` steps of
    :func:`fsdp2_side_by_side`'s run, resumed from its 2-process checkpoint in one unsharded process."""
    import optiplug
    from optiplug.testing import tiny_llama

    model = tiny_llama(seed=1)
    resumed = optiplug.build_optimizer(model, optimizer)
    load_checkpoint(model, resumed, checkpoint)
    return _train_steps(model, resumed, range(steps // 2, steps), batch)


def check_side_by_side(
    per_process: list[dict[str, Any]],
    *,
    cls: str,
    matrices: int | None = None,
    rtol: float = 1e-5,
    weights_atol: float = 1e-5,
    state_share: float = 0.55,
) -> None:
    """Assert what :func:`fsdp2_side_by_side` measured, as a test of the launch's results does.

    Per-step losses equal one process's within ``rtol`` and the final weights within ``weights_atol``;
    the resumed run's losses exactly the uninterrupted run's; the optimizer is ``cls`` whichever way
    it was built; each process holds at most ``state_share`` of one process's state; and, for a
    :class:`optiplug.MatrixOptimizer`, ``matrices`` matrices were stepped, each updated by exactly
    one process, every process doing some.
    """
    import math

    first = per_process[0]
    assert first["class"] == cls and first["groups_match"], (first["class"], first["groups_match"])
    sharded, single = first["losses"]["sharded"], first["losses"]["single"]
    assert len(sharded) == len(single) and all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(sharded, single)), (
        sharded,
        single,
    )
    assert first["weights_gap"] <= weights_atol, first["weights_gap"]
    resumed = first["losses"]["resumed"]
    assert resumed == sharded[len(sharded) - len(resumed) :], (resumed, sharded)
    for result in per_process:
        assert result["state_bytes"]["sharded"] <= state_share * result["state_bytes"]["single"], result["state_bytes"]
    if matrices is not None:
        assert all(result["matrices"] == matrices for result in per_process)
        updates = [result["updates"] for result in per_process]
        assert sum(updates) == matrices and min(updates) > 0, updates


def check_resume_in_one_process(optimizer: dict[str, Any], result: dict[str, Any], rtol: float = 1e-5) -> None:
    """Assert that :func:`fsdp2_side_by_side`'s 2-process checkpoint (``result`` of process 0) continues in this
    one unsharded process with the uninterrupted 2-process run's losses, within ``rtol``."""
    import math

    losses = resume_in_one_process(optimizer, result["checkpoint"])
    expected = result["losses"]["sharded"][-len(losses) :]
    assert all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(losses, expected)), (losses, expected)
