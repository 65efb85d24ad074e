"""The pipeline grammar, option typing and ordering constraints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphopt
from graphopt.pipeline import check_order, format_pipeline, parse, resolve
from graphopt.plugins import load_registry


class Shrink(graphopt.Pass):
    name = "shrink"
    summary = "A pass with every kind of option, for grammar tests."
    exact = False

    @dataclass
    class Options:
        ratio: float = graphopt.option(0.5, "fraction", check=lambda v: 0 < v < 1)
        steps: int = graphopt.option(1, "iterations", check=lambda v: v >= 1)
        criterion: Literal["l1", "l2", "random"] = graphopt.option("l1", "importance")
        global_: bool = graphopt.option(False, "rank across layers")
        ignore: list[str] = graphopt.option([], "node globs to leave alone")
        label: str = graphopt.option("x", "free text")
        limit: float | None = graphopt.option(None, "optional cap")


class Late(graphopt.Pass):
    name = "late"
    summary = "Must run after shrink."
    after = ("shrink",)

    def run(self, ir, ctx):  # pragma: no cover - only ordering is tested
        pass


class Early(graphopt.Pass):
    name = "early"
    summary = "Must run before shrink."
    before = ("shrink",)


class _Plugin:
    @staticmethod
    @graphopt.hookimpl
    def graphopt_register_passes(register):
        for cls in (Shrink, Late, Early):
            register(cls)


@pytest.fixture(scope="module")
def registry():
    return load_registry(autoload=False, extra=[_Plugin])


def test_parse_names_and_raw_options():
    steps = parse(' prune(ratio=0.5, ignore=[fc,"head.0"]) , fold ,quant()')
    assert [(s.name, s.options) for s in steps] == [
        ("prune", {"ratio": "0.5", "ignore": ["fc", "head.0"]}),
        ("fold", {}),
        ("quant", {}),
    ]


@pytest.mark.parametrize(
    ("text", "column", "expected"),
    [
        ("prune(ratio=0.5", 16, "',' or ')'"),
        ("prune(ratio 0.5)", 13, "'='"),
        ("prune,,fold", 7, "a pass name"),
        ("prune(ratio=)", 13, "a value"),
        ('prune(label="abc)', 18, "a closing"),
        ("prune fold", 7, "',' or the end"),
        ("prune(a=1,a=2)", 11, "repeats"),
    ],
)
def test_parse_errors_point_at_the_character(text, column, expected):
    with pytest.raises(graphopt.GraphoptError) as info:
        parse(text)
    message = str(info.value)
    assert f"column {column} " in message
    assert expected in message
    assert "\n" not in message


def test_empty_pipeline_is_refused():
    with pytest.raises(graphopt.GraphoptError, match="empty"):
        parse("  ")


def test_options_are_typed_and_validated(registry):
    (p,) = resolve(
        parse("shrink(ratio=0.25,steps=3,criterion=l2,global_=yes,ignore=[a,b],limit=none)"),
        registry,
    )
    o = p.options
    assert (o.ratio, o.steps, o.criterion, o.global_, o.ignore, o.limit) == (
        0.25,
        3,
        "l2",
        True,
        ["a", "b"],
        None,
    )
    (p,) = resolve(parse("shrink(limit=2.5,ignore=fc)"), registry)
    assert p.options.limit == 2.5 and p.options.ignore == ["fc"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("shrink(ratio=abc)", "must be a number"),
        ("shrink(ratio=1.5)", "out of range"),
        ("shrink(steps=2.5)", "whole number"),
        ("shrink(criterion=l3)", "one of l1, l2, random"),
        ("shrink(global_=maybe)", "true or false"),
        ("shrink(colour=red)", "has no option 'colour'"),
        ("shrink(label=[a,b])", "one value"),
        ("nosuchpass", "unknown pass 'nosuchpass'"),
    ],
)
def test_bad_options_name_the_problem(registry, text, fragment):
    with pytest.raises(graphopt.GraphoptError, match=fragment):
        resolve(parse(text), registry)


def test_canonical_form_drops_defaults_and_round_trips(registry):
    passes = resolve(parse('shrink( ratio = 0.250 , steps=1, label="a b" ),late'), registry)
    text = format_pipeline(passes)
    assert text == 'shrink(ratio=0.25,label="a b"),late'
    assert format_pipeline(resolve(parse(text), registry)) == text


values = st.fixed_dictionaries(
    {},
    optional={
        "ratio": st.floats(0.001, 0.999),
        "steps": st.integers(1, 50),
        "criterion": st.sampled_from(["l1", "l2", "random"]),
        "global_": st.booleans(),
        "ignore": st.lists(st.text('abc.*_0123(),= "', min_size=1, max_size=6), max_size=3),
        "label": st.text(min_size=0, max_size=8),
        "limit": st.none() | st.floats(-1e6, 1e6, allow_nan=False),
    },
)


@given(values)
def test_any_valid_options_survive_print_and_parse(options):
    passes = [Shrink(Shrink.Options(**options))]
    text = format_pipeline(passes)
    again = resolve(parse(text), load_registry(autoload=False, extra=[_Plugin]))
    assert again[0].options == passes[0].options
    assert format_pipeline(again) == text


def test_ordering_constraints_are_checked_before_running(registry):
    check_order(resolve(parse("shrink,late"), registry))
    check_order(resolve(parse("early,shrink,late"), registry))
    with pytest.raises(graphopt.GraphoptError, match="must run after 'shrink'"):
        resolve(parse("late,shrink"), registry)
    with pytest.raises(graphopt.GraphoptError, match="must run before 'shrink'"):
        resolve(parse("shrink,early"), registry)
