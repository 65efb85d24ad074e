"""Every out-of-range option message states the valid range: a walk over every option of
every registered pass (the built-ins and the lowrank plugin), with values just outside
each declared bound, and values on an inclusive bound accepted."""

from __future__ import annotations

import dataclasses
from typing import Any

import graphopt_lowrank
import pytest

import graphopt
from graphopt.pass_api import Bounds, OptionSpec, _item_type, format_value

REGISTRY = graphopt.load_registry(autoload=False, extra=[graphopt_lowrank])
OPTIONS = [
    (cls, spec) for name, cls in sorted(REGISTRY.passes.items()) for spec in cls.option_specs()
]


def _outside(bounds: Bounds, integer: bool) -> list[float]:
    """Values just beyond each finite bound."""
    step = 1 if integer else 0.25
    values = []
    if bounds.ge is not None:
        values.append(bounds.ge - step)
    if bounds.gt is not None:
        values.append(bounds.gt)
    if bounds.le is not None:
        values.append(bounds.le + step)
    if bounds.lt is not None:
        values.append(bounds.lt)
    return values


def _text(spec: OptionSpec, value: float) -> Any:
    item: Any = int(value) if _item_type(spec.type) is int else float(value)
    return [format_value(item)] if "list" in spec.type_name else format_value(item)


def test_the_walk_covers_every_pass_and_their_bounded_options() -> None:
    passes = {cls.name for cls, _ in OPTIONS}
    assert {"prune", "quant", "sparsify", "depthwise", "distill", "bnrecal", "lowrank"} <= passes
    bounded = {f"{cls.name}.{s.name}" for cls, s in OPTIONS if s.bounds is not None}
    assert {"prune.ratio", "prune.target", "quant.percentile", "lowrank.energy"} <= bounded
    assert len(bounded) >= 25


@pytest.mark.parametrize("cls,spec", OPTIONS, ids=[f"{c.name}.{s.name}" for c, s in OPTIONS])
def test_each_out_of_range_message_states_the_range(cls: type[graphopt.Pass], spec) -> None:
    field = next(f for f in dataclasses.fields(cls.Options) if f.name == spec.name)
    check, bounds = field.metadata.get("check"), spec.bounds
    if check is not None:  # a rule beyond bounds must say what it accepts
        assert field.metadata.get("check_msg"), f"{cls.name}.{spec.name} has a silent check"
    if bounds is None:
        numeric = _item_type(spec.type) in (int, float)
        fraction = "fraction" in spec.help or "percentile" in spec.help
        assert not (numeric and fraction), f"{cls.name}.{spec.name} is a fraction without bounds"
        return
    integer = _item_type(spec.type) is int
    for value in _outside(bounds, integer):
        text = _text(spec, value)
        with pytest.raises(graphopt.GraphoptError) as info:
            cls.parse_options({spec.name: text})
        message = str(info.value)
        assert message.startswith(f"option {cls.name}({spec.name}=")
        assert "is out of range; expected " in message
        assert bounds.interval() in message, message
        assert "\n" not in message
    for edge in (bounds.ge, bounds.le):  # an inclusive bound is a valid value
        if edge is not None:
            cls.parse_options({spec.name: _text(spec, edge)})


def test_the_prune_ratio_message_of_the_issue() -> None:
    with pytest.raises(graphopt.GraphoptError) as info:
        graphopt.PassManager("prune(ratio=1.0)")
    assert str(info.value) == (
        "option prune(ratio=1.0) is out of range; expected a fraction in [0, 1)"
    )
    assert REGISTRY.pass_class("prune").option_specs()[0].type_name == "float in [0, 1)"
