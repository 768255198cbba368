"""MuonWithAdamW outside a Trainer: the same steps as torch's Muon and AdamW, one state dict, schedules."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from optiplug_muon.optim import MuonWithAdamW, lr_scale

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(i: int = 0, n: int = 4) -> torch.Tensor:
    data = TokenBlocks(n=64)
    return torch.stack([data[j]["input_ids"] for j in range(i * n, (i + 1) * n)])


def _train(model, optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        ids = _batch(i % 16)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _names_on(optimizer, model, use_muon: bool) -> set[str]:
    ids = {id(p) for g in optimizer.param_groups if g["use_muon"] == use_muon for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_routes_the_hidden_matrices_to_muon_and_the_rest_to_adamw_with_the_core_decay_rule():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "muon", weight_decay=0.1)
    muon = _names_on(optimizer, model, True)
    assert muon == {n for n, _ in model.named_parameters() if n.rsplit(".", 2)[-2] in HIDDEN}
    assert len(muon) == 14
    adamw = {g["weight_decay"]: {n for n, p in model.named_parameters() if any(p is q for q in g["params"])}
             for g in optimizer.param_groups if not g["use_muon"]}  # fmt: skip
    assert adamw[0.1] == {"model.embed_tokens.weight", "lm_head.weight"}
    assert adamw[0.0] == {n for n, _ in model.named_parameters() if "norm" in n}
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups if g["use_muon"])
    assert optimizer.routing.summary().startswith("muon: 14 matrices")


def test_tied_head_is_the_embedding_and_stays_on_adamw():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = optiplug.build_optimizer(model, "muon")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p is model.lm_head.weight for g in optimizer.param_groups if g["use_muon"] for p in g["params"])
    assert len(_names_on(optimizer, model, True)) == 7


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize(("weight_decay", "nesterov"), [(0.0, True), (0.1, False)])
def test_steps_are_bitwise_torch_muon_and_torch_fused_adamw(adjust_lr, weight_decay, nesterov):
    """The combined optimizer must not change a bit of what torch's two optimizers do side by side."""
    ours_model, ref_model = tiny_llama(), tiny_llama()
    fields = {"adjust_lr": adjust_lr, "weight_decay": weight_decay, "nesterov": nesterov, "lr": 0.03, "adamw_lr": 4e-3}
    ours = optiplug.build_optimizer(ours_model, {"name": "muon", **fields})
    muon_names = _names_on(ours, ours_model, True)
    params = dict(ref_model.named_parameters())
    decay = {n for g in ours.param_groups if not g["use_muon"] and g["weight_decay"] for n in _names(ours_model, g)}
    muon = torch.optim.Muon([params[n] for n in sorted(muon_names)], lr=0.03, weight_decay=weight_decay,
                            nesterov=nesterov, adjust_lr_fn=adjust_lr)  # fmt: skip
    rest = [n for n in params if n not in muon_names]
    adamw = torch.optim.AdamW(
        [{"params": [params[n] for n in rest if n in decay], "weight_decay": weight_decay},
         {"params": [params[n] for n in rest if n not in decay], "weight_decay": 0.0}],
        lr=4e-3, betas=(0.9, 0.95), fused=True,
    )  # fmt: skip
    for i in range(4):
        ids = _batch(i)
        for model, optimizers in ((ours_model, [ours]), (ref_model, [muon, adamw])):
            model(input_ids=ids, labels=ids).loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


def _names(model, group) -> set[str]:
    return {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}


def test_spectral_scales_wide_matrices_by_sqrt_fan_out_over_fan_in_and_decays_with_the_base_rate():
    """spectral == lr * sqrt(fan_out / fan_in): a wide matrix's step is smaller than original's by that factor."""
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.zeros(48, 16)), torch.nn.Parameter(torch.zeros(16, 48))  # step = -update
    grads = {id(tall): torch.randn(48, 16), id(wide): torch.randn(16, 48)}
    steps = {}
    for adjust in ("original", "spectral"):
        params = [torch.nn.Parameter(tall.detach().clone()), torch.nn.Parameter(wide.detach().clone())]
        optimizer = MuonWithAdamW([{"params": params}], lr=0.05, adjust_lr=adjust, weight_decay=0.0)
        for p, original in zip(params, (tall, wide)):
            p.grad = grads[id(original)].clone()
        optimizer.step()
        steps[adjust] = [p.detach() - o.detach() for p, o in zip(params, (tall, wide))]
    assert torch.equal(steps["spectral"][0], steps["original"][0])  # tall: sqrt(48/16) either way
    assert torch.allclose(steps["spectral"][1], steps["original"][1] * math.sqrt(16 / 48), rtol=1e-6, atol=0)
    assert lr_scale("spectral", 16, 48) == pytest.approx(0.57735, rel=1e-5)
    assert lr_scale("match_rms_adamw", 16, 48) == pytest.approx(0.2 * math.sqrt(48))

    # weight decay uses the unscaled rate, as torch.optim.Muon applies it: zero gradient -> pure decay
    p = torch.nn.Parameter(torch.ones(16, 48))
    optimizer = MuonWithAdamW([{"params": [p]}], lr=0.05, adjust_lr="spectral", weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(p.detach(), torch.full_like(p, 1 - 0.05 * 0.1))


def test_conv1d_weights_are_stepped_as_the_transposed_linear_weight():
    """GPT-2's Conv1D stores (fan_in, fan_out): torch.optim.Muon on it reads the fans the wrong way round."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))  # fmt: skip
    optimizer = optiplug.build_optimizer(model, "muon")
    muon = _names_on(optimizer, model, True)
    assert muon == {f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(g["transposed"] for g in optimizer.param_groups if g["use_muon"])
    weight = model.transformer.h[0].mlp.c_fc.weight  # (32, 128): fan_out 128, fan_in 32 -> original scale 2
    start = weight.detach().clone()
    linear = torch.nn.Parameter(start.T.contiguous())  # the same weight as nn.Linear stores it
    naive = torch.nn.Parameter(start.clone())  # what routing Conv1D straight into torch.optim.Muon does
    references = [torch.optim.Muon([p], lr=0.02, weight_decay=0.0) for p in (linear, naive)]  # torch defaults to 0.1
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    linear.grad, naive.grad = weight.grad.T.contiguous(), weight.grad.clone()
    for each in (optimizer, *references):
        each.step()
    step = (weight.detach() - start).T
    assert torch.equal(weight.detach().T, linear.detach())
    naive_step = (naive.detach() - start).T
    assert step.norm() / naive_step.norm() == pytest.approx(2.0, rel=1e-2)  # sqrt(128/32): naive routing loses it


def test_state_dict_is_weights_only_and_resumes_bit_exactly():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, {"name": "muon", "weight_decay": 0.1, "adjust_lr": "spectral"})
    _train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = optiplug.build_optimizer(resumed_model, {"name": "muon", "weight_decay": 0.1, "adjust_lr": "spectral"})
    resumed.load_state_dict(saved)
    assert _train(resumed_model, resumed, 3, start=3) == _train(model, optimizer, 3, start=3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    kinds = {tuple(sorted(state)) for state in saved["state"].values()}
    assert kinds == {("momentum_buffer",), ("exp_avg", "exp_avg_sq", "step")}


def test_after_loading_the_inner_adamw_follows_the_loaded_groups():
    """load_state_dict replaces the group dicts: AdamW must read the new ones, or the schedule never reaches it."""
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "muon")
    _train(model, optimizer, 1)
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, optimizer, 1, start=1)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == []


def test_a_scheduler_reaches_muon_and_adamw_groups():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, {"name": "muon", "lr": 0.02, "adamw_lr": 4e-3})
    scheduler = optiplug.build_scheduler(optimizer, {"name": "linear", "warmup_steps": 0}, num_training_steps=4)
    for _ in range(2):
        _train(model, optimizer, 1)
        scheduler.step()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == pytest.approx([2e-3, 0.01])
    assert optimizer.log_values() == {"adamw_learning_rate": pytest.approx(3e-3)}  # the rate of the last step taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_measured_state(dtype):
    model = tiny_llama().to(dtype)
    cfg = optiplug.get_entry("muon").config(weight_decay=0.1)
    optimizer = optiplug.build_optimizer(model, cfg)
    _train(model, optimizer, 2)
    analytic = optiplug.get_entry("muon").state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert optiplug.optimizer_state_bytes(optimizer) == analytic
    adamw_only = optiplug.adam_state_bytes(optiplug.ParamShape.of_model(model))
    assert analytic < adamw_only


# ---- the engagement check: Newton–Schulz counted where it runs, confirmed after the first step ----------------


def test_first_step_confirms_that_every_matrix_was_orthogonalized():
    import logging

    from optiplug_muon.engagement import newton_schulz_flops, tally

    class Collect(logging.Handler):  # its own handler: counts what the logger emitted, whatever propagates where
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "muon")
    logger, collect = logging.getLogger("transformers.trainer.muon"), Collect()
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        calls, flops = tally.calls, tally.flops
        _train(model, optimizer, 2)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert tally.calls - calls == 2 * 14
    expected = sum(newton_schulz_flops(*p.shape) for g in optimizer.param_groups if g["use_muon"] for p in g["params"])
    assert tally.flops - flops == 2 * expected
    assert (
        collect.messages.count(
            "muon: the first step ran Newton–Schulz 14 times under one process for the 14 matrices routed to Muon"
        )
        == 1
    )  # once: the first step only


def test_a_matrix_without_a_gradient_is_not_expected_to_be_orthogonalized():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "muon")
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    model.model.layers[0].mlp.up_proj.weight.grad = None  # as a matrix unused in the step (an idle expert)
    optimizer.step()  # 13 of 13 with a gradient: confirmed


def test_first_step_stops_a_muon_that_skipped_newton_schulz(monkeypatch):
    """The injected failure: the Muon step applies the momentum as it is (SGD), never orthogonalizing it."""
    from optiplug_muon.engagement import EngagementError

    def sgd(self, p, matrix, state, group):
        state["lr_scale"] = 1.0
        return matrix

    monkeypatch.setattr(MuonWithAdamW, "matrix_update", sgd)
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "muon")
    with pytest.raises(EngagementError) as error:
        _train(model, optimizer, 1)
    assert str(error.value) == (
        "muon: the first step ran Newton–Schulz 0 times under one process, where the routing (14 matrices to Muon) "
        "needs 14: Muon is not running as configured, and the run stops rather than train something else under its "
        "name; please report it with your torch and engine versions"
    )
    assert isinstance(error.value, optiplug.OptiplugError)  # the CLI prints it as one line


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_a_0_1_0_checkpoint_of_transposed_conv1d_momentum_resumes_exactly():
    """0.1.0 kept a Conv1D weight's momentum as (fan_out, fan_in); it is turned on load (the 16 x 16 c_proj too,
    where the shapes alone cannot tell). Fixture: tests/fixtures/conv1d-0.1.0/make.py, run by the 0.1.0 code."""
    import json
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "conv1d-0.1.0"
    make = _load_module(fixture / "make.py")
    expected = json.loads((fixture / "run.json").read_text())["losses"][3:]
    saved = torch.load(fixture / "optimizer.pt", weights_only=True)
    outcomes = {}
    for how in ("load_state_dict", "torch's own load"):
        model = make.gpt2()
        model.load_state_dict(torch.load(fixture / "model.pt", weights_only=True))
        muon, adamw = make.groups(model)
        optimizer = MuonWithAdamW(muon, adamw, lr=0.02, weight_decay=0.1)
        if how == "load_state_dict":
            optimizer.load_state_dict(saved)
        else:
            torch.optim.Optimizer.load_state_dict(optimizer, saved)
        losses = []
        try:
            for step in range(3, 6):
                ids = make.batch(step)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        except RuntimeError as error:  # a non-square momentum in the other layout does not even fit
            outcomes[how] = str(error)
            continue
        final = torch.load(fixture / "final.pt", weights_only=True)
        outcomes[how] = (losses, max(_relative_gap(p, final[n]) for n, p in model.state_dict().items()))
    # Bit-equal on the CPU that wrote the fixture; another CPU's matmul kernels move Newton–Schulz's output a
    # little (measured on an AMD EPYC: losses 2e-6 relative, weights 1.2% of a tensor's largest value), while the
    # same steps from a fresh momentum move the weights by 87%: the bounds below sit between the two.
    losses, weight_gap = outcomes["load_state_dict"]  # type: ignore[misc]
    assert losses == pytest.approx(expected, rel=1e-4)
    assert weight_gap < 0.05
    assert (
        outcomes["torch's own load"] == "The size of tensor a (16) must match the size of tensor b (48) at "
        "non-singleton dimension 1"
    )


def _load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem + "_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_group_rules_apply_to_muon_matrices_and_adamw_tensors_alike():
    """The context's groups split by optiplug.split_param_groups: a rule's parameters keep its label on both sides."""
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(
        model, {"name": "muon", "param_groups": [{"match": r"layers\.0\.", "lr_scale": 0.5}]}
    )
    rows = [(len(g["params"]), g["use_muon"], g["optiplug_group"], g["lr"]) for g in optimizer.param_groups]
    assert rows == [
        (7, True, "default", 0.02), (7, True, r"layers\.0\.", 0.01),  # Muon's parts first, as 0.1.0 saved them
        (2, False, "default", 0.03), (3, False, "default", 0.03), (2, False, r"layers\.0\.", 0.015),
    ]  # fmt: skip
    layer0 = next(g for g in optimizer.param_groups if g["use_muon"] and g["lr"] == 0.01)
    assert _names(model, layer0) == {n for n in _names_on(optimizer, model, True) if ".layers.0." in n}
