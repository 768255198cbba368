"""Bridged optimizers' argument errors are refused by `optiplug validate` and `optiplug train` alike, in one line
naming the field: by the field's range (where pytorch-optimizer's constructor checks nothing) or by the
constructor itself, run on the model's skeleton at validate time."""

from __future__ import annotations

import pytest
from optiplug_pytorch_optimizer.catalogue import BOUNDS, config_class, specs

from optiplug.app.testing import validate_and_train

CASES = {
    "po_lion betas": (["optimizer.betas=[1.0,0.999]"], "optimizer.betas: beta1 must be in the range [0.0, 1.0) (got (1.0, 0.999))"),
    "po_lion weight_decay": (["optimizer.weight_decay=-1"], "optimizer.weight_decay: Input should be greater than or equal to 0 (got -1)"),
    "po_adamw eps": (["optimizer.eps=-1"], "optimizer.eps: Input should be greater than or equal to 0 (got -1)"),
    "po_prodigy d0": (["optimizer.d0=-1"], "optimizer.d0: Input should be greater than 0 (got -1)"),
    "po_sgd momentum": (["optimizer.momentum=5"], "optimizer.momentum: Input should be less than or equal to 1 (got 5)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_validate_and_train_refuse_a_bridged_argument_naming_the_field(tmp_path, case):
    overrides, expected = CASES[case]
    name = case.split()[0]
    validated, trained = validate_and_train(tmp_path, f"optimizer.name={name}", *overrides)
    assert validated == trained == (1, f"optiplug: {expected}\n")
    assert not (tmp_path / "out").exists()


def test_every_bridged_default_is_inside_the_ranges():
    checked = 0
    for spec in specs().values():
        config = config_class(spec)
        config.model_validate(config().model_dump())  # defaults are not validated by pydantic: here they are
        checked += sum(1 for field in spec.fields if field["name"] in BOUNDS and field["type"] == "float")
    assert checked > 100  # weight_decay, eps, momentum, ... of most optimizers
