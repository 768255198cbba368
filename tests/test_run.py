"""optiplug.app.train, the main job: outputs, validation before writing, local models and data; optiplug.app.measure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import optiplug
import optiplug.app
from optiplug import ConfigError, optimizer_state_bytes, tensor_bytes
from optiplug.app import RunConfig
from optiplug.app.data import assets_dir
from optiplug.app.measure import peak_rss_bytes
from optiplug.app.run import SUMMARY_FILE

FAST = [
    "data.block_size=16",
    "data.max_blocks=32",
    "training.max_steps=4",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
]


def _adamw_state_bytes(model) -> int:
    """fp32 exp_avg and exp_avg_sq per element plus a float32 ``step`` per parameter tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(8 * p.numel() + 4 for p in params)


def test_embedded_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = optiplug.app.train(overrides=[*FAST, f"training.output_dir={out}"])

    assert result.output_dir == out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "trainer_state.json", "loss.png", SUMMARY_FILE} <= names  # fmt: skip
    assert not any(name.endswith(".tmp") for name in names)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary == result.summary
    assert summary["optimizer"]["name"] == "adamw" and summary["scheduler"]["name"] == "cosine"
    assert summary["optimizer"]["lr"] == 1e-3
    assert summary["steps"] == 4
    assert summary["tokens"] == 4 * 4 * 16
    assert summary["data"]["corpus_tokens"] > 90_000  # the whole corpus: it is one document
    assert summary["data"] == {"path": "embedded", "blocks": 32, "block_size": 16,
                               "corpus_tokens": summary["data"]["corpus_tokens"]}  # fmt: skip
    assert summary["train_time_s"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["train_time_s"], rel=1e-2)
    assert summary["peak_rss_bytes"] > 100 * 2**20
    assert summary["parameters"] == summary["trainable_parameters"] > 500_000

    model = optiplug.app.run._load_model(RunConfig().model, 42)  # the same seed: the same initial weights
    assert summary["optimizer_state_bytes"] == _adamw_state_bytes(model)

    state = json.loads((out / "trainer_state.json").read_text())
    logged = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    assert [step for step, _ in result.losses] == [1, 2, 3, 4]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [loss for _, loss in result.losses] == pytest.approx([loss for _, loss in logged])
    assert summary["first_loss"] == result.losses[0][1] and summary["final_loss"] == result.losses[-1][1]
    assert 7.0 < summary["first_loss"] < 8.2  # ln(2048) = 7.62: an untrained model guesses uniformly

    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.config.vocab_size == len(AutoTokenizer.from_pretrained(out)) == 2048


def test_overrides_apply_to_a_run_config_object(tmp_path):
    config = optiplug.app.load_config(None, [*FAST, f"training.output_dir={tmp_path}"])
    result = optiplug.app.train(config, ["optimizer.name=sgd", "optimizer.lr=0.05", "scheduler.name=constant",
                                     "training.max_steps=2"])  # fmt: skip
    assert result.summary["optimizer"]["name"] == "sgd" and result.summary["steps"] == 2
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert [h["learning_rate"] for h in state["log_history"] if "loss" in h] == [0.05, 0.05]
    args = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert args.learning_rate == 0.05  # TrainingArguments agrees with the optimizer


# ---- no half-written output that looks finished ---------------------------------------------


def test_bad_data_path_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=[f"data.path={missing}", f"training.output_dir={out}"])
    assert str(info.value) == f"data.path: {missing!r} does not exist"
    assert not out.exists()


def test_failed_validation_leaves_an_earlier_finished_run_alone(tmp_path):
    (tmp_path / SUMMARY_FILE).write_text('{"steps": 7}')
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=["training.max_stepz=3", f"training.output_dir={tmp_path}"])
    assert str(info.value) == (
        "training.max_stepz: not an argument of transformers.TrainingArguments. Did you mean 'max_steps'?"
    )
    assert (tmp_path / SUMMARY_FILE).read_text() == '{"steps": 7}'


class _Explode:
    """A plugin whose callback fails in the middle of training."""

    @optiplug.hookimpl
    def trainer_callbacks(self, trainer, config):
        from transformers import TrainerCallback

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    raise RuntimeError("boom at step 2")

        return [Boom()]


def test_run_failing_while_training_leaves_no_summary(tmp_path, temp_plugin):
    (tmp_path / SUMMARY_FILE).write_text('{"steps": 7}')  # a stale summary of an earlier run, replaced
    (tmp_path / "optiplug_run.json").write_text('{"status": "finished", "files": ["summary.json"]}')
    temp_plugin(_Explode(), "explode")
    with pytest.raises(RuntimeError, match="boom at step 2"):
        optiplug.app.train(overrides=[*FAST, f"training.output_dir={tmp_path}", "training.overwrite_output_dir=true"])
    assert not (tmp_path / SUMMARY_FILE).exists()
    assert not (tmp_path / "loss.png").exists()


def test_missing_model_directory(tmp_path):
    missing = str(tmp_path / "no-model")
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=[f"model.name_or_path={missing}", f"training.output_dir={tmp_path / 'run'}"])
    assert str(info.value) == f"model.name_or_path: the directory {missing!r} does not exist"
    assert not (tmp_path / "run").exists()


def test_hub_id_not_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=["model.name_or_path=acme/no-such-model", f"training.output_dir={tmp_path}"])
    assert str(info.value) == (
        "model.name_or_path: 'acme/no-such-model' is neither a local directory nor a model in the local "
        "Hugging Face cache (optiplug never downloads; fetch it first, e.g. `hf download acme/no-such-model`)"
    )


# ---- a local model directory and local data -------------------------------------------------


def _tiny_model_dir(path: Path, vocab: int = 2048) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(assets_dir() / "tokenizer").save_pretrained(path)
    return path


def _jsonl(path: Path, records: int = 40) -> Path:
    corpus = (assets_dir() / "corpus.txt").read_text().split("\n\n")
    path.write_text("".join(json.dumps({"id": i, "body": corpus[i]}) + "\n" for i in range(records)))
    return path


def test_local_model_directory_and_jsonl_with_freeze(tmp_path):
    from safetensors.torch import load_file

    model_dir = _tiny_model_dir(tmp_path / "model")
    config = RunConfig(
        model={"name_or_path": str(model_dir)},
        data={"path": str(_jsonl(tmp_path / "train.jsonl")), "text_field": "body", "block_size": 16, "max_blocks": 24},
        training={"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "disable_tqdm": True},
        optimizer={"name": "adamw", "lr": 0.01},
        finetuning={"type": "freeze", "trainable": [r"layers\.1\."]},
    )  # fmt: skip
    result = optiplug.app.train(config)

    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "model.safetensors")
    trained = {name for name in before if not torch.equal(before[name], after[name])}
    assert trained and all(".layers.1." in name for name in trained)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])

    layer1 = sum(t.numel() for name, t in before.items() if ".layers.1." in name)
    summary = result.summary
    assert summary["trainable_parameters"] == layer1 < summary["parameters"]
    assert summary["model"] == str(model_dir)
    assert summary["data"]["blocks"] == 24 and summary["steps"] == 3
    assert summary["optimizer_state_bytes"] == sum(8 * t.numel() + 4 for n, t in before.items() if ".layers.1." in n)


def test_freeze_pattern_that_matches_nothing(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=[f"model.name_or_path={model_dir}", "data.block_size=16",
                                  "finetuning.type=freeze", "finetuning.trainable=[mlp, attn_out]",
                                  f"training.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert str(info.value) == (
        "finetuning.trainable: 'attn_out' matches no parameter name; names look like: "
        "model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, lm_head.weight"
    )
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model", vocab=128)
    data = optiplug.app.DataConfig(block_size=16, max_blocks=4)
    from transformers import AutoTokenizer

    from optiplug.app.data import load_dataset

    top = int(load_dataset(data, AutoTokenizer.from_pretrained(model_dir)).blocks.max())
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=[f"model.name_or_path={model_dir}", "data.block_size=16", "data.max_blocks=4",
                                  f"training.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert str(info.value) == (
        f"model.tokenizer: the tokenizer produced token id {top}, but the model's vocabulary has 128 entries; "
        "use the model's own tokenizer"
    )


# ---- optiplug.app.measure -----------------------------------------------------------------------


def test_optimizer_state_bytes_counts_each_storage_once():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False))
    optimizer = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(optimizer) == 0  # state is created on the first step
    model(torch.ones(3, 8)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == (8 * 4 + 4 + 4 * 2) * 8 + 3 * 4

    flat = torch.zeros(100)
    assert tensor_bytes({"a": flat[:10], "b": [flat[10:], (flat,)], "c": 3, "d": "x"}) == 400
    assert tensor_bytes([torch.zeros(5, dtype=torch.float16), torch.zeros(5, dtype=torch.float16)]) == 20
    assert tensor_bytes({"m": torch.empty(4, 4, device="meta")}) == 64


def test_peak_rss_bytes_is_at_least_the_current_rss():
    import psutil

    rss = psutil.Process().memory_info().rss
    assert peak_rss_bytes() >= rss > 10 * 2**20


# ---- the default main job -------------------------------------------------------------------


@pytest.mark.slow
def test_default_job_learns(tmp_path):
    result = optiplug.app.train(overrides=[f"training.output_dir={tmp_path}"])
    summary = result.summary
    assert summary["optimizer"]["name"] == "adamw" and summary["scheduler"]["name"] == "cosine"
    assert summary["first_loss"] > 7.0
    assert summary["final_loss"] < summary["first_loss"] - 2.0
