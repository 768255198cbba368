"""Scale-out on the standard engines, on this CPU machine (gloo): torchrun, accelerate launch, FSDP, DeepSpeed.

Every multi-process run here is a real launcher starting real processes. Two kinds:

* ``optiplug train`` itself under ``torchrun`` / ``accelerate launch`` / ``--nproc`` (the user's path);
* this file as the worker script (``python -m torch.distributed.run ... tests/test_distributed.py MODE``,
  see ``_worker`` at the end): one launch trains every registered optimizer under DDP, records
  each plugin's distributed ``check`` under FSDP/DeepSpeed arguments, and runs an FSDP2 loop, so
  the whole matrix costs one process start-up instead of dozens.

Parity means: 2 processes x per-device batch B give the same per-step losses as 1 process with
batch 2B, same seed and data, up to float reduction order.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import optiplug
import optiplug.app
from optiplug.app.launch import check_engine_launch, relaunch_with_torchrun, torchrun_command

HERE = Path(__file__).resolve()
STEPS = 4  # optimizer steps of every worker run; checkpoints at STEPS // 2
B = 2  # per-device batch of the 2-process runs; the 1-process reference uses 2 * B
RTOL = 1e-5  # measured differences are ~1e-7 relative: only the order of the gradient reduction differs
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# Optimizer settings of the matrix: a key per run, its optimizer section. Every registered optimizer
# appears with its defaults (GaLore with a small rank and a projection update inside the run);
# variants add the modes the plugins refuse or allow distributed.
SETTINGS = {
    "galore_adamw": {"rank": 8, "update_proj_gap": 2},
    "galore_adafactor": {"rank": 8, "update_proj_gap": 2},
    "galore_adamw8bit": {"rank": 8, "update_proj_gap": 2},
    "apollo_adamw": {"rank": 8, "update_proj_gap": 2},  # small rank, projections drawn again within the run
    "apollo_mini": {"update_proj_gap": 2},
}
VARIANTS = {
    "badam:ratio": {"name": "badam", "mode": "ratio"},
    "galore_adamw:layerwise": {"name": "galore_adamw", "rank": 8, "update_proj_gap": 2, "layerwise": True},
}
ADAPTER_OPTIMIZERS = {"loraplus"}  # trained on a peft LoRA model
RESUMED = ["adamw", "galore_adamw"]

# The distributed refusals, exactly as a user reads them (2 processes).
DDP_REFUSALS = {
    "badam": "badam: mode 'layer' trains distributed only under DeepSpeed ZeRO-3, not DDP: launch with a DeepSpeed "
    "config whose zero_optimization.stage is 3",
    "badam:ratio": "badam: mode 'ratio' runs in a single process and this run is distributed (ddp, 2 processes): "
    "train on one device, or use mode 'layer' with DeepSpeed ZeRO-3",
    "galore_adamw:layerwise": "galore_adamw with layerwise: true steps each parameter during backward, before DDP "
    "has averaged its gradient across the 2 processes; set layerwise: false for distributed training",
    "lomo": "lomo updates each weight from its local gradient during backward, before the processes average it: "
    "train it in one process",
    "adalomo": "adalomo updates each weight from its local gradient during backward, before the processes average "
    "it: train it in one process",
}


def _galore_zero(name: str, stage: int) -> str:
    instead = "FSDP2 (fsdp_config.version: 2)" if name == "galore_adamw" else "galore_adamw under FSDP2"
    return (
        f"{name} projects whole weight matrices, and DeepSpeed (ZeRO stage {stage}) hands the optimizer flattened "
        f"1-D partitions of the weights, cut at arbitrary elements; train with {instead}, DDP or a single process"
    )


ENGINE_CHECKS = {
    "fsdp": {
        "adamw": None,
        "sgd": None,
        "badam": "badam: mode 'layer' trains distributed only under DeepSpeed ZeRO-3, not FSDP: launch with a "
        "DeepSpeed config whose zero_optimization.stage is 3",
        "badam:ratio": "badam: mode 'ratio' runs in a single process and this run is distributed (fsdp, 2 processes): "
        "train on one device, or use mode 'layer' with DeepSpeed ZeRO-3",
        "galore_adamw": None,  # FSDP2 (transformers' default): the core's sharded matrix step
        "galore_adafactor": "galore_adafactor projects whole weight matrices, which FSDP splits into row shards "
        "across the processes; train with galore_adamw under FSDP2, DDP or a single process",
    },
    "zero2": {
        "adamw": None,
        "sgd": None,
        "badam": "badam: mode 'layer' under DeepSpeed needs ZeRO stage 3, not stage 2: set zero_optimization.stage "
        "to 3 in the DeepSpeed config",
        "badam:ratio": "badam: mode 'ratio' runs in a single process and this run is distributed (deepspeed, "
        "2 processes): train on one device, or use mode 'layer' with DeepSpeed ZeRO-3",
        "galore_adamw": _galore_zero("galore_adamw", 2),
        "galore_adafactor": _galore_zero("galore_adafactor", 2),
    },
    "zero3": {
        "adamw": None,
        "sgd": None,
        "badam": None,
        "badam:ratio": "badam: mode 'ratio' runs in a single process and this run is distributed (deepspeed, "
        "2 processes): train on one device, or use mode 'layer' with DeepSpeed ZeRO-3",
        "galore_adamw": _galore_zero("galore_adamw", 3),
        "galore_adafactor": _galore_zero("galore_adafactor", 3),
    },
}
FSDP2_OPTIMIZERS = ["adamw", "adam", "sgd", "adagrad", "rmsprop", "radam", "nadam", "adamax"]


# ---- helpers shared by the tests and the worker --------------------------------------------


def deepspeed_config(stage: int) -> dict[str, Any]:
    """The DeepSpeed config of examples/deepspeed-zero{stage}.json (auto values filled by transformers)."""
    return json.loads((HERE.parents[1] / "examples" / f"deepspeed-zero{stage}.json").read_text())


def engine_arguments(engine: str) -> dict[str, Any]:
    if engine == "fsdp":
        return {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    return {"deepspeed": deepspeed_config(int(engine[-1]))}


# optiplug-pytorch-optimizer bridges ~110 optimizers of another package; one of them stands for all in the
# 2-process matrix (its own tests step and resume the whole catalogue; tests/test_every_optimizer.py samples more).
BRIDGE, BRIDGE_SAMPLE = "optiplug-pytorch-optimizer", {"po_lion"}


def matrix_keys() -> dict[str, dict[str, Any]]:
    """Every registered optimizer (with SETTINGS; of the bridge, its sample) and the VARIANTS, by key."""
    rows = [row for row in optiplug.list_optimizers() if row.plugin != BRIDGE or row.name in BRIDGE_SAMPLE]
    keys = {row.name: {"name": row.name, **SETTINGS.get(row.name, {})} for row in rows}
    keys.update({key: optimizer for key, optimizer in VARIANTS.items() if optimizer["name"] in keys})
    return keys


def make_model(optimizer: dict[str, Any]):
    from optiplug.testing import tiny_llama

    model = tiny_llama(seed=0)
    if optimizer["name"] in ADAPTER_OPTIMIZERS:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def make_trainer(optimizer: dict[str, Any], output_dir: Path, batch: int, **arguments: Any):
    from optiplug.testing import TokenBlocks, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    return optiplug.OptiTrainer(
        model=make_model(optimizer), args=args, train_dataset=TokenBlocks(n=64), optimizer=optimizer
    )


def train_once(optimizer: dict[str, Any], output_dir: Path, batch: int, resume: str | None = None, **arguments: Any):
    """``{"losses": [...]}`` of a short run, or ``{"refused": message}`` when the entry's check refuses it."""
    trainer = make_trainer(optimizer, output_dir, batch, **arguments)
    try:
        trainer.check_optimizer()
    except optiplug.ConfigError as error:
        return {"refused": str(error)}
    trainer.train(resume_from_checkpoint=resume)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "losses": [h["loss"] for h in logged],
        "steps": [h["step"] for h in logged],
        "distributed": trainer.optiplug_context().distributed,
        "world_size": trainer.args.world_size,
        "engine": type(trainer.model_wrapped).__name__,
    }


def check_outcome(optimizer: dict[str, Any], args: Any) -> str | None:
    entry = optiplug.get_entry(optimizer["name"])
    cfg = entry.config(**{k: v for k, v in optimizer.items() if k != "name"})
    try:
        if entry.check is not None:
            entry.check(optiplug.BuildContext(model=make_model(optimizer), args=args), cfg)
    except optiplug.ConfigError as error:
        return str(error)
    return None


def launch(*argv: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(*argv: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    return launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv,
                  cwd=cwd, **kwargs)  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def assert_same_losses(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert math.isclose(a, b, rel_tol=RTOL), (got, expected)


# ---- launch.py -------------------------------------------------------------------------------


def test_nproc_runs_the_standard_launcher_command():
    assert torchrun_command(2, ["run.yaml", "optimizer.lr=3e-4"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "optiplug", "train", "run.yaml", "optimizer.lr=3e-4",
    ]  # fmt: skip


def test_nproc_refuses_to_nest_under_a_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(optiplug.ConfigError) as error:
        relaunch_with_torchrun(2, ["run.yaml"])
    assert str(error.value) == (
        "--nproc starts torchrun, but this process already runs under a launcher (LOCAL_RANK/WORLD_SIZE set); "
        "drop --nproc and let the launcher set the number of processes"
    )


def test_nproc_below_one_is_refused():
    with pytest.raises(optiplug.ConfigError, match=r"^--nproc must be at least 1, got 0$"):
        relaunch_with_torchrun(0, [])


# ---- optiplug train under the launchers -------------------------------------------------------


EXAMPLES = HERE.parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides that shrink an example run: a 2-layer, hidden-32 Llama from scratch, short blocks, STEPS steps."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("tiny")
    LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ).save_pretrained(root / "model")  # fmt: skip
    return [
        f"model.name_or_path={root / 'model'}", "model.tokenizer=embedded", "model.from_scratch=true",
        "data.block_size=16", "data.max_blocks=128", f"training.max_steps={STEPS}",
        f"training.per_device_train_batch_size={B}", "training.logging_steps=1", "training.seed=0",
        "training.data_seed=0", "training.disable_tqdm=true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> list[float]:
    """Per-step losses of examples/ddp.yaml in one process with batch 2B."""
    out = tmp_path_factory.mktemp("single")
    result = optiplug.app.train(EXAMPLES / "ddp.yaml", [*tiny, f"training.output_dir={out}",
                                                    f"training.per_device_train_batch_size={2 * B}"])  # fmt: skip
    assert result.summary["world_size"] == 1
    return [loss for _, loss in result.losses]


def summary_and_losses(out: Path) -> tuple[dict, list[float]]:
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    return summary, [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def torchrun_run(tiny, tmp_path_factory) -> dict[str, Any]:
    """examples/ddp.yaml under ``torchrun --nproc_per_node 2``, a checkpoint every STEPS // 2 steps."""
    root = tmp_path_factory.mktemp("torchrun")
    out, logs = root / "out", root / "logs"
    result = ok(torchrun("--log-dir", str(logs), "--tee", "3", "-m", "optiplug", "train", str(EXAMPLES / "ddp.yaml"),
                         *tiny, f"training.output_dir={out}", "training.save_strategy=steps",
                         f"training.save_steps={STEPS // 2}", cwd=root))  # fmt: skip
    return {"out": out, "logs": logs, "result": result}


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_twice_the_batch(torchrun_run, reference):
    out, logs, result = torchrun_run["out"], torchrun_run["logs"], torchrun_run["result"]
    summary, losses = summary_and_losses(out)
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["tokens"] == STEPS * 2 * B * 16
    assert_same_losses(losses, reference)
    assert (out / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert {p.name for p in (out / f"checkpoint-{STEPS // 2}").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}  # fmt: skip
    # logs are not duplicated: only rank 0 prints the Trainer's log lines and the closing line
    rank_out = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    rank_err = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert set(rank_out) == {"0", "1"}
    assert rank_out["0"].count("'loss'") == STEPS and rank_out["1"].count("'loss'") == 0
    assert result.stdout.count("'loss'") == STEPS
    assert "optiplug: done" in rank_err["0"] and "optiplug: done" not in rank_err["1"]


@pytest.mark.slow
def test_resume_with_the_same_launcher_reproduces_the_uninterrupted_run(torchrun_run, tiny, tmp_path):
    """Checkpoint at STEPS // 2 of a 2-process run, resumed by ``optiplug train --nproc 2`` (torchrun)."""
    out = tmp_path / "out"
    checkpoint = torchrun_run["out"] / f"checkpoint-{STEPS // 2}"
    ok(launch(sys.executable, "-m", "optiplug", "train", str(EXAMPLES / "ddp.yaml"), *tiny, "--nproc", "2",
              f"training.output_dir={out}", f"training.resume_from_checkpoint={checkpoint}", cwd=tmp_path))  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    resumed = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > STEPS // 2}
    _, uninterrupted = summary_and_losses(torchrun_run["out"])
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert_same_losses([resumed[step] for step in sorted(resumed)], uninterrupted[STEPS // 2 :])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_zero3_example_trains_badam_under_torchrun(tiny, tmp_path):
    """The ZeRO-3 recipe as documented (run from the repository root), BAdam's distributed mode, on CPU."""
    out = tmp_path / "out"
    ok(torchrun("-m", "optiplug", "train", "examples/deepspeed-zero3.yaml", *tiny, f"training.output_dir={out}",
                "optimizer.name=badam", "optimizer.switch_every=2", cwd=HERE.parents[1], timeout=900))  # fmt: skip
    summary, losses = summary_and_losses(out)
    assert summary["world_size"] == 2 and summary["optimizer"]["name"] == "badam" and summary["steps"] == STEPS
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    saved = load_file(out / "model.safetensors")  # gathered from the ZeRO-3 partitions, not empty shards
    expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in expected.parameters())


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_trains_the_fsdp_example_as_ddp_on_cpu(tiny, reference, tmp_path):
    """``--multi_gpu`` on a machine without GPUs starts torchrun with gloo; FSDP needs GPUs, so
    examples/fsdp.yaml trains as DDP here, with the same losses as one process with twice the batch."""
    out = tmp_path / "out"
    ok(launch("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "optiplug", "train",
              str(EXAMPLES / "fsdp.yaml"), *tiny, f"training.output_dir={out}", cwd=tmp_path))  # fmt: skip
    summary, losses = summary_and_losses(out)
    assert summary["world_size"] == 2
    assert_same_losses(losses, reference)


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_silently_runs_one(tmp_path):
    """Documented trap: ``--cpu --num_processes 2`` needs MPI; without it accelerate starts a single process."""
    ok(launch("accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE), "whoami", str(tmp_path),
              cwd=tmp_path))  # fmt: skip
    started = [json.loads(p.read_text()) for p in tmp_path.glob("process-*.json")]
    assert len(started) == 1 and started[0]["WORLD_SIZE"] in (None, "1")


@pytest.mark.slow
def test_nproc_refusal_is_one_line_before_any_step(tiny, tmp_path):
    out = tmp_path / "out"
    result = launch(sys.executable, "-m", "optiplug", "train", str(EXAMPLES / "ddp.yaml"), *tiny, "--nproc", "2",
                    "optimizer.name=galore_adamw", "optimizer.layerwise=true", f"training.output_dir={out}",
                    cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert f"optiplug: {DDP_REFUSALS['galore_adamw:layerwise']}\n" in result.stderr
    assert "ConfigError" not in result.stderr and "'loss'" not in result.stdout
    assert not (out / "summary.json").exists() and not (out / "trainer_state.json").exists()


@pytest.mark.parametrize(("key", "engine"), [("fsdp", "FSDP"), ("deepspeed", "DeepSpeed")])
def test_fsdp_and_deepspeed_need_a_launcher(monkeypatch, key, engine):
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(optiplug.ConfigError) as error:
        check_engine_launch({key: "full_shard" if key == "fsdp" else "examples/deepspeed-zero2.json"})
    assert str(error.value) == (
        f"training.{key}: {engine} runs in processes started by a launcher, and this one was not: run "
        "`optiplug train CONFIG --nproc N` or `torchrun --nproc_per_node N -m optiplug train CONFIG`"
    )
    check_engine_launch({"ddp_backend": "gloo"})
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_engine_launch({key: "full_shard"})


# ---- every optimizer under DDP, the checks under FSDP and DeepSpeed, FSDP2, resume ----------


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, Any]:
    """The one launch of the matrix worker; under pytest-xdist the workers share it (one launch per session)."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "distributed-matrix"  # this session's, shared by the workers
    else:
        root = tmp_path_factory.mktemp("matrix")
    spec = {"keys": matrix_keys(), "engines": ["fsdp", "zero2", "zero3"] if HAS_DEEPSPEED else ["fsdp"]}
    with FileLock(f"{root}.lock"):
        if not (root / "result.json").exists():
            root.mkdir(exist_ok=True)
            (root / "spec.json").write_text(json.dumps(spec))
            ok(torchrun(str(HERE), "matrix", str(root), cwd=root))
    return {"root": root, "spec": spec, **json.loads((root / "result.json").read_text())}


@pytest.mark.slow
def test_every_optimizer_that_allows_ddp_matches_one_process(matrix, tmp_path):
    assert matrix["world_size"] == 2
    refused = {}
    for key, optimizer in matrix["spec"]["keys"].items():
        got = matrix["train"][key]
        single = train_once(optimizer, tmp_path / key, 2 * B)
        if "refused" in got:
            if single.get("refused") != got["refused"]:  # refused because it is distributed
                refused[key] = got["refused"]
            continue
        assert got["distributed"] == "ddp" and got["world_size"] == 2
        assert "losses" in single, single
        assert_same_losses(got["losses"], single["losses"])
    assert refused == {key: message for key, message in DDP_REFUSALS.items() if key in matrix["spec"]["keys"]}
    trained = {key for key, got in matrix["train"].items() if "losses" in got}
    assert set(matrix["train"]) == set(matrix["spec"]["keys"])
    assert {"adamw", "sgd", "galore_adamw", "galore_adafactor", "loraplus"} & set(matrix["spec"]["keys"]) <= trained


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero2", "zero3"])
def test_plugin_checks_under_fsdp_and_deepspeed_arguments(matrix, engine):
    if engine not in matrix["checks"]:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    expected = {key: message for key, message in ENGINE_CHECKS[engine].items() if key in matrix["spec"]["keys"]}
    assert {key: matrix["checks"][engine][key] for key in expected} == expected
    assert matrix["contexts"][engine]["world_size"] == 2
    assert matrix["contexts"][engine]["distributed"] == ("fsdp" if engine == "fsdp" else "deepspeed")
    if engine != "fsdp":
        assert matrix["contexts"][engine]["deepspeed_stage"] == int(engine[-1])


@pytest.mark.slow
def test_fsdp_arguments_on_cpu_run_ddp(matrix):
    """accelerate enables FSDP only for GPU-like backends: on CPU, training.fsdp trains as plain DDP."""
    assert matrix["fsdp_trainer"] == {"is_fsdp_enabled": False, "distributed_type": "MULTI_CPU",
                                      "wrapped": "DistributedDataParallel"}  # fmt: skip


@pytest.mark.slow
def test_fsdp2_sharded_parameters_take_the_same_steps(matrix):
    """torch's FSDP2 (fully_shard) runs on CPU with gloo: optiplug's optimizers step DTensor shards exactly."""
    for name in FSDP2_OPTIMIZERS:
        got = matrix["fsdp2"][name]
        assert got["parameter_type"] == "DTensor"
        assert_same_losses(got["sharded"], got["single"])


@pytest.mark.slow
def test_optimizer_states_resume_exactly_under_ddp(matrix):
    """adamw and GaLore (projections in the optimizer state) resumed from a 2-process checkpoint."""
    root = matrix["root"]
    ok(torchrun(str(HERE), "resume", str(root), cwd=root))
    resumed = json.loads((root / "resumed.json").read_text())
    assert set(resumed) == {key for key in RESUMED if key in matrix["spec"]["keys"]}
    for key in resumed:
        uninterrupted = matrix["train"][key]["losses"]
        assert len(resumed[key]) == STEPS - STEPS // 2
        assert_same_losses(resumed[key], uninterrupted[STEPS // 2 :])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_matches_one_process(matrix, stage, tmp_path):
    got = matrix["deepspeed"][f"zero{stage}"]
    assert got["engine"] == "DeepSpeedEngine" and got["world_size"] == 2
    assert got["distributed"] == "deepspeed"
    assert_same_losses(got["losses"], train_once({"name": "adamw"}, tmp_path, 2 * B)["losses"])


# ---- the worker: this file run by torchrun ----------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write(path: Path, data: dict[str, Any]) -> None:
    if _rank() == 0:
        path.write_text(json.dumps(data, indent=1))


def _fsdp2_losses(name: str) -> dict[str, Any]:
    """A plain loop: the model sharded by fully_shard, and the same steps on an unsharded copy."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from optiplug.testing import TokenBlocks, tiny_llama

    rank, world = dist.get_rank(), dist.get_world_size()
    data = TokenBlocks(n=64)
    sharded, single = tiny_llama(seed=0), tiny_llama(seed=0)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    optimizers = optiplug.build_optimizer(sharded, name), optiplug.build_optimizer(single, name)
    losses: dict[str, list[float]] = {"sharded": [], "single": []}
    for step in range(STEPS):
        batch = torch.stack([data[i]["input_ids"] for i in range(step * world * B, (step + 1) * world * B)])
        mine = batch[rank * B : (rank + 1) * B]
        for key, model, optimizer, ids in (
            ("sharded", sharded, optimizers[0], mine),
            ("single", single, optimizers[1], batch),
        ):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = loss.detach()
            if key == "sharded":
                dist.all_reduce(loss)
                loss /= world
            losses[key].append(loss.item())
    return {**losses, "parameter_type": type(next(sharded.parameters())).__name__}


def _worker_matrix(root: Path) -> None:
    spec = json.loads((root / "spec.json").read_text())
    result: dict[str, Any] = {"train": {}, "checks": {}, "contexts": {}, "fsdp2": {}}
    for key, optimizer in spec["keys"].items():
        extra = {"save_strategy": "steps", "save_steps": STEPS // 2} if key in RESUMED else {}
        result["train"][key] = train_once(optimizer, root / key.replace(":", "-"), B, **extra)
    result["world_size"] = int(os.environ["WORLD_SIZE"])

    from optiplug.testing import training_args

    for engine in spec["engines"]:
        args = training_args(root / engine, **engine_arguments(engine))
        ctx = optiplug.BuildContext(model=make_model({"name": "adamw"}), args=args)
        result["contexts"][engine] = {"distributed": ctx.distributed, "world_size": ctx.world_size,
                                      "deepspeed_stage": ctx.deepspeed_stage}  # fmt: skip
        result["checks"][engine] = {
            key: check_outcome(spec["keys"][key], args) for key in ENGINE_CHECKS[engine] if key in spec["keys"]
        }
        if engine == "fsdp":
            trainer = make_trainer({"name": "adamw"}, root / "fsdp-trainer", B, **engine_arguments(engine))
            trainer.train()
            result["fsdp_trainer"] = {
                "is_fsdp_enabled": trainer.is_fsdp_enabled,
                "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
                "wrapped": type(trainer.model_wrapped).__name__,
            }
        del args, ctx

    for name in FSDP2_OPTIMIZERS:
        result["fsdp2"][name] = _fsdp2_losses(name)
    if HAS_DEEPSPEED:
        result["deepspeed"] = {
            f"zero{stage}": train_once({"name": "adamw"}, root / f"zero{stage}", B, deepspeed=deepspeed_config(stage))
            for stage in (2, 3)
        }
    _write(root / "result.json", result)


def _worker_resume(root: Path) -> None:
    spec = json.loads((root / "spec.json").read_text())
    resumed = {}
    for key in (k for k in RESUMED if k in spec["keys"]):
        out = root / key.replace(":", "-")
        extra = {"save_strategy": "steps", "save_steps": STEPS // 2}
        got = train_once(spec["keys"][key], out, B, resume=str(out / f"checkpoint-{STEPS // 2}"), **extra)
        resumed[key] = [loss for step, loss in zip(got["steps"], got["losses"]) if step > STEPS // 2]
    _write(root / "resumed.json", resumed)


def _worker_whoami(root: Path) -> None:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    (root / f"process-{os.getpid()}.json").write_text(json.dumps({name: os.environ.get(name) for name in names}))


def _worker(mode: str, root: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workers = {"matrix": _worker_matrix, "resume": _worker_resume, "whoami": _worker_whoami}
    workers[mode](Path(root))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    from optiplug.process_group import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
