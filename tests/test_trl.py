"""TRL's SFTTrainer with optiplug: through OptiTrainerMixin (callbacks and patches run) and through
transformers' ``optimizer_cls_and_kwargs`` route (``optiplug.hf_factory``), each against OptiTrainer."""

from __future__ import annotations

import math

import pytest

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

trl = pytest.importorskip("trl", reason="trl is in the test install (extra 'trl')")

STEPS = 4
RUN = dict(max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no")
RUN |= dict(use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
RUN |= dict(bf16=False, gradient_checkpointing=False, learning_rate=5e-5)  # SFTConfig's defaults differ from Trainer's


def _tokenizer():
    import importlib.resources

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("optiplug") / "assets" / "tokenizer"))


def _tokenized():
    """The same token blocks as optiplug.testing's, as the pre-tokenized dataset SFTTrainer takes as it is."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [b.tolist() for b in TokenBlocks(n=32, distinct=4).blocks]})


class SFT(optiplug.OptiTrainerMixin, trl.SFTTrainer):
    """What the README promises: the mixin in front of TRL's trainer."""


def _model():
    """The tiny Llama without a KV cache in training forwards (SFTTrainer passes use_cache=False; so does the reference)."""
    model = tiny_llama()
    model.config.use_cache = False
    return model


def _sft(tmp_path, **kwargs):
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), packing=False, **RUN)
    return kwargs.pop("cls", SFT)(
        model=_model(), args=args, train_dataset=_tokenized(), processing_class=_tokenizer(), **kwargs
    )


def _reference(tmp_path, sft, **kwargs):
    """The same run through OptiTrainer: same model, data, collator (TRL's) and arguments."""
    return optiplug.OptiTrainer(
        model=_model(),
        args=training_args(tmp_path / "opti", **RUN),
        train_dataset=_tokenized(),
        data_collator=sft.data_collator,
        **kwargs,
    )


SFT_LOSS_TOLERANCE = 1e-4
"""SFTTrainer computes its loss itself (log-probabilities from a fused, chunked head), a rounding away from the
model's own. The runs compared step for step give both trainers the model's own loss (``compute_loss_func``) and
must be equal; the stock-SFTTrainer run keeps TRL's loss and must agree within this tolerance."""


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The model's own loss (what ``model(..., labels=labels).loss`` computes) from its logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(outputs.logits, labels, outputs.logits.shape[-1], num_items_in_batch=num_items_in_batch)


CASES = [
    pytest.param({"name": "badam", "switch_every": 2}, id="badam"),
    pytest.param({"name": "galore_adamw", "rank": 8}, id="galore_adamw", marks=pytest.mark.slow),
    pytest.param({"name": "muon"}, id="muon", marks=pytest.mark.slow),
    pytest.param({"name": "bnb_adamw", "bits": 8}, id="bnb_adamw-8bit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("optimizer", CASES)
def test_sft_with_the_mixin_takes_optitrainers_steps(optimizer, tmp_path):
    sft = _sft(tmp_path, optimizer=optimizer, compute_loss_func=causal_lm_loss)
    sft.train()
    reference = _reference(tmp_path, sft, optimizer=optimizer, compute_loss_func=causal_lm_loss)
    reference.train()
    assert type(optiplug.unwrap_optimizer(sft.optimizer)) is type(optiplug.unwrap_optimizer(reference.optimizer))
    losses = logged_losses(sft)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses.values())
    assert losses == logged_losses(reference)
    if optimizer["name"] == "badam":  # its block-switching callback ran inside TRL's loop
        blocks = [h["badam_active_block"] for h in sft.state.log_history if "loss" in h]
        assert len(set(blocks)) > 1, f"BAdam never switched blocks under SFTTrainer: {blocks}"


@pytest.mark.parametrize("trainer", ["sft", pytest.param("transformers", marks=pytest.mark.slow)])
def test_a_stock_trainer_trains_with_hf_factory(trainer, tmp_path):
    from transformers import Trainer

    factory = optiplug.hf_factory("galore_adamw", rank=8)
    if trainer == "sft":
        stock = _sft(tmp_path, cls=trl.SFTTrainer, optimizer_cls_and_kwargs=factory)
        collator = stock.data_collator
    else:
        reference_collator = _sft(tmp_path).data_collator
        stock = Trainer(
            model=_model(),
            args=training_args(tmp_path / "stock", **RUN),
            train_dataset=_tokenized(),
            data_collator=reference_collator,
            optimizer_cls_and_kwargs=factory,
        )
        collator = reference_collator
    stock.train()
    assert type(optiplug.unwrap_optimizer(stock.optimizer)).__module__.startswith("optiplug_galore")
    reference = optiplug.OptiTrainer(
        model=_model(),
        args=training_args(tmp_path / "opti", **RUN),
        train_dataset=_tokenized(),
        data_collator=collator,
        optimizer={"name": "galore_adamw", "rank": 8},
        scheduler="linear",  # what the stock Trainer builds from args.lr_scheduler_type
    )
    reference.train()
    tolerance = SFT_LOSS_TOLERANCE if trainer == "sft" else 1e-6
    assert logged_losses(stock) == pytest.approx(logged_losses(reference), rel=tolerance, abs=0)


@pytest.mark.parametrize(
    ("optimizer", "needs"),
    [
        ({"name": "badam"}, "needs trainer callbacks and patches of the trainer"),
        ({"name": "schedule_free_adamw"}, "its own scheduler ('constant')"),
        ({"name": "adamw", "layerwise": True}, "the core's layerwise stepping"),
    ],
)
def test_hf_factory_refuses_what_that_route_never_runs(optimizer, needs):
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.hf_factory(optimizer)
    message = str(error.value)
    assert needs in message and "OptiTrainerMixin" in message and "\n" not in message


def test_hf_factory_validates_fields_when_called():
    with pytest.raises(optiplug.ConfigError, match="rank"):
        optiplug.hf_factory("galore_adamw", rank=-1)
    factory, kwargs = optiplug.hf_factory("adamw", lr=1e-3)
    assert kwargs == {}
    with pytest.raises(optiplug.ConfigError, match="unexpected keyword arguments"):
        factory()(tiny_llama(), lr=1.0)
