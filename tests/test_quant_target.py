"""quant's accuracy target (min_sqnr, max_drop, the default floor) and its per-format forms."""

from __future__ import annotations

import math
import re
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn, run_main
from graphopt.passes.quant import DEFAULT_MARGIN_DB, DEFAULT_MIN_SQNR, Quant, quant_report
from graphopt.passes.quant.search import Evaluation, choose_floats, float_order
from quant_helpers import batches, out_sqnr
from quant_helpers import quantize as run
from torch import nn

from graphopt import GraphIR, GraphoptError, PassManager

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the search ----------------------------------------------------------------------------------


def additive(noise: dict[str, float], signal: float = 1.0):
    """An evaluate() whose output noise is the sum of the int8 sites' noises."""
    calls = []

    def evaluate(floats, target_db):
        calls.append(floats)
        total = sum(v for k, v in noise.items() if k not in floats)
        db = math.inf if total == 0 else 10 * math.log10(signal / total)
        return Evaluation(floats, {"sqnr_db": db}, db >= target_db)

    return evaluate, calls


def test_search_keeps_the_fewest_worst_sites_float():
    noise = {f"op{i}": 10 ** -(2 + i / 4) for i in range(12)}  # op0 worst
    ranking = sorted(noise, key=lambda k: -noise[k])
    for target in (15.0, 20.0, 25.0, 28.0):
        evaluate, _ = additive(noise)
        best, tried = choose_floats(lambda: ranking, lambda f, t=target, e=evaluate: e(f, t))
        assert best.met and best.figures["sqnr_db"] >= target
        # fewest: no smaller set of float sites meets the target (sites are ranked by noise)
        k = len(best.floats)
        assert set(best.floats) == set(ranking[:k])
        if k:
            assert not evaluate(tuple(ranking[: k - 1]), target).met
        assert len(tried) <= 2 * math.ceil(math.log2(len(noise))) + k + 2  # not one per site


@pytest.mark.parametrize("guess", [1, 3, 5, 9, 12])
def test_search_from_a_guess_finds_the_same_fewest(guess):
    noise = {f"op{i}": 10 ** -(2 + i / 4) for i in range(12)}
    ranking = sorted(noise, key=lambda k: -noise[k])
    evaluate, _ = additive(noise)
    plain, _ = choose_floats(lambda: ranking, lambda f: evaluate(f, 25.0))
    best, tried = choose_floats(lambda: ranking, lambda f: evaluate(f, 25.0), lambda o: guess)
    assert best.floats == plain.floats and best.met
    if guess == len(plain.floats):  # a right guess: all-int8, the guess, one fewer, give-back
        assert len(tried) == 3 + len(best.floats) - 1


def test_search_gives_back_sites_a_wrong_ranking_put_first():
    noise = {"a": 1e-4, "b": 1e-2, "c": 1e-5}
    evaluate, _ = additive(noise)
    wrong = ["a", "b", "c"]  # b is the one that matters
    best, _ = choose_floats(lambda: wrong, lambda f: evaluate(f, 25.0))
    assert best.met and best.floats == ("b",)


def test_search_keeps_cheap_sites_float_before_a_costly_one():
    # a language model's head: the noisiest op, but as costly as everything else together;
    # two small layers hold as much noise between them
    noise = {"head": 1.2e-2, "a": 6e-3, "b": 6e-3, "c": 1e-3, "d": 1e-3}
    cost = {"head": 1000.0, "a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}
    evaluate, _ = additive(noise)
    aim = 10 * math.log10(1 / 1.45e-2)  # met once the head, or a and b, are float
    order = float_order(noise, cost)
    assert order[:2] == ["a", "b"] and order[-1] == "head"
    best, _ = choose_floats(lambda: order, lambda f: evaluate(f, aim), cost=cost.__getitem__)
    assert best.met and set(best.floats) == {"a", "b"}
    # by noise alone the head would be chosen: one op, but 50 times the cost
    fewest, _ = choose_floats(
        lambda: sorted(noise, key=lambda k: -noise[k]), lambda f: evaluate(f, aim)
    )
    assert fewest.floats == ("head",)


def test_search_gives_back_the_costliest_site_first():
    # a ranking that misjudged big: the shortest prefix that meets the target is big, a, b;
    # either big or a can go back to int8, not both, and the give-back must take big
    noise = {"big": 4e-3, "a": 4e-3, "b": 5e-3, "c": 1e-3}
    cost = {"big": 100.0, "a": 1.0, "b": 1.0, "c": 1.0}
    evaluate, _ = additive(noise)
    aim = 10 * math.log10(1 / 5.5e-3)
    order = ["big", "a", "b", "c"]
    best, _ = choose_floats(lambda: order, lambda f: evaluate(f, aim), cost=cost.__getitem__)
    assert best.met and set(best.floats) == {"a", "b"}
    plain, _ = choose_floats(lambda: order, lambda f: evaluate(f, aim))  # reverse ranking order
    assert set(plain.floats) == {"big", "b"}


def test_search_does_not_rank_when_all_int8_meets_the_target():
    evaluate, _ = additive({"a": 1e-4})

    def ranking():
        raise AssertionError("ranking is costly and not needed")

    best, tried = choose_floats(ranking, lambda f: evaluate(f, 20.0))
    assert best.floats == () and len(tried) == 1


# -- min_sqnr on real models --------------------------------------------------------------------


def resnet(res=32):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(5))
    return model, x, batches((4, 3, res, res))


def test_min_sqnr_keeps_ops_float_until_met_and_says_which():
    model, x, data = resnet()
    base = run(model, x, "quant(min_sqnr=0)", data)
    report0 = quant_report(base.ir.gm)
    assert report0.target == "" and not report0.kept_float  # 0: the target is off
    all_int8 = out_sqnr(model, base.ir.gm, x)
    aim = round(all_int8 + 3)
    result = run(model, x, f"quant(min_sqnr={aim})", data)
    report = quant_report(result.ir.gm)
    assert report.target_met and report.sqnr_db >= aim
    assert 0 < len(report.kept_float) < len(report.quantized)
    kept = {c.node for c in report.kept_float}
    assert not kept & set(report.quantized)
    assert all("quantized alone, output SQNR" in c.reason for c in report.kept_float)
    assert out_sqnr(model, result.ir.gm, x) > all_int8 + 1.5  # on other inputs too
    entry = result.ledger[-1]
    assert entry.stats["ops kept float (target)"] == len(kept)
    note = next(n for n in entry.notes if n.startswith("target output SQNR"))
    assert "met keeping" in note and all(name in note for name in kept)
    assert len(report.impact) == len(report.quantized) + len(kept)  # every site measured
    # the share of the MACs kept float, against the float model's own count (fold keeps the
    # conv and add names; an add counts no MACs)
    macs = {k: c.macs for k, c in GraphIR.trace(model, (x,)).costs().items()}
    sites = kept | set(report.quantized)
    assert sites <= macs.keys()
    share = sum(macs[k] for k in kept) / sum(macs[k] for k in sites)
    said = re.search(r"float \(([\d.]+)% of the quantizable MACs\)", note)
    assert said and float(said.group(1)) == pytest.approx(100 * share, abs=0.06)
    assert report.float_macs_share == pytest.approx(share)


def test_unreachable_target_is_one_sentence():
    model, x, data = resnet()
    with pytest.raises(GraphoptError, match="holds only with every op in float"):
        run(model, x, "quant(min_sqnr=200)", data)


def test_default_target_is_quiet_when_met_and_loud_when_the_model_is_broken():
    model, x, data = resnet()
    result = run(model, x, "quant", data)
    report = quant_report(result.ir.gm)
    assert report.target == f"output SQNR ≥ {DEFAULT_MIN_SQNR:g} dB" and report.target_met
    assert not any(n.startswith("WARNING") for n in result.ledger[-1].notes)

    class Outlier(nn.Module):  # one input channel 1000× the others (and fc1 reads it
        def __init__(self) -> None:  # 1000× weaker): per-tensor int8 rounds the rest away
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
            self.register_buffer("gain", torch.tensor([1000.0] + [1.0] * 15))
            with torch.no_grad():
                self.fc1.weight[:, 0] /= 1000

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x * self.gain)))

    torch.manual_seed(0)
    model = Outlier().eval()
    x = torch.randn(64, 16)
    with pytest.warns(UserWarning, match=r"below 20 dB.*fc1"):
        result = run(model, x, "quant", [(x,)])
    report = quant_report(result.ir.gm)
    assert [c.node for c in report.kept_float] == ["fc1"]
    # the default target is searched with a margin, so it also holds on unseen inputs
    assert report.sqnr_db >= DEFAULT_MIN_SQNR + DEFAULT_MARGIN_DB
    assert any(n.startswith("WARNING") and "fc1" in n for n in result.ledger[-1].notes)
    note = next(n for n in result.ledger[-1].notes if n.startswith("target output SQNR"))
    assert f"searched at {DEFAULT_MIN_SQNR + DEFAULT_MARGIN_DB:g} dB" in note


def test_default_target_on_a_seeded_sample_of_timm():
    """Plain quant on the models timm's seeded sample draws (tests/test_timm.py), at 64 px
    with random calibration, as a user without data would run it: the int8 model keeps
    20 dB on inputs calibration never saw, a model whose all-int8 figure is below that is
    named in a warning with its worst layers, and ops kept float come with their share of
    the MACs."""
    pytest.importorskip("timm")
    from test_timm import seeded_sample

    import graphopt

    for name in seeded_sample():
        try:
            ir = graphopt.load(f"timm:{name}", input_shapes=[(1, 3, 64, 64)])
        except GraphoptError:  # a model that cannot run at 64 px takes its default size
            ir = graphopt.load(f"timm:{name}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = graphopt.optimize(ir, "fold,quant")
        notes = result.ledger[-1].notes
        gen = torch.Generator().manual_seed(3)
        held_out = [torch.randn(ir.example_inputs[0].shape, generator=gen) for _ in range(4)]
        sqnr = out_sqnr(ir.gm, result.ir.gm, torch.cat(held_out))
        assert sqnr >= 20, (name, sqnr, notes)
        note = next(n for n in notes if n.startswith("target output SQNR"))
        # "met with every op in int8 (output SQNR X dB" or "…, all-int8 X dB"
        found = re.search(r"all-int8 ([\d.]+) dB", note) or re.search(r"SQNR ([\d.]+) dB", note)
        assert found, note
        all_int8 = float(found.group(1))
        if "met keeping" in note:
            assert "of the quantizable MACs" in note, note
        if all_int8 < 20:
            loud = [str(w.message) for w in caught if "below 20 dB" in str(w.message)]
            assert loud and "the worst layers alone in int8" in loud[0], (name, notes)


# -- max_drop ------------------------------------------------------------------------------------


def test_max_drop_on_labelled_data(digits_model):
    model, x, y = digits_model
    labelled = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)]
    result = run(model, x[:2], "quant(max_drop=0.5)", labelled)
    report = quant_report(result.ir.gm)
    assert report.target == "top-1 accuracy % drop ≤ 0.5" and report.target_met

    def acc(m):
        with torch.no_grad():
            return float((m(x[:400]).argmax(1) == y[:400]).float().mean()) * 100

    assert acc(result.ir.gm) >= acc(model) - 0.5
    note = next(n for n in result.ledger[-1].notes if n.startswith("target"))
    assert "top-1 accuracy %" in note and "(float " in note


def test_max_drop_with_a_metric_callable(digits_model, monkeypatch):
    model, x, _ = digits_model
    seen = []

    def agreement(m):  # % of the first 200 images where m agrees with the float model
        seen.append(m)
        with torch.no_grad():
            return float((m(x[:200]).argmax(1) == model(x[:200]).argmax(1)).float().mean()) * 100

    module = types.ModuleType("quant_metric_for_test")
    module.agreement = agreement
    monkeypatch.setitem(sys.modules, "quant_metric_for_test", module)
    data = [(x[i : i + 100],) for i in range(0, 400, 100)]
    result = run(model, x[:2], "quant(max_drop=1,metric=quant_metric_for_test:agreement)", data)
    assert quant_report(result.ir.gm).target_met and len(seen) >= 2  # float and int8 scored
    # and as a Python callable, through the options object
    quant = Quant(Quant.parse_options({"max_drop": 1}))
    quant.options.metric = agreement
    result = PassManager([quant], reproducer=False).run(GraphIR.trace(model, (x[:2],)), data=data)
    assert quant_report(result.ir.gm).target_met


@pytest.fixture(scope="module")
def digits_model():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x[400:]), y[400:]).backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize(
    ("pipeline", "data", "message"),
    [
        ("quant(max_drop=1)", "unlabelled", "needs labelled data"),
        ("quant(metric=a:b)", "unlabelled", "give max_drop too"),
        ("quant(max_drop=1,metric=no_such_module:f)", "unlabelled", "cannot be imported"),
        ("quant(max_drop=-1)", "unlabelled", "accuracy points ≥ 0"),
        ("quant(smooth=2)", "unlabelled", r"α in \[0, 1\]"),
        ("quant(form=qat,min_sqnr=30)", "unlabelled", "no accuracy target applies"),
    ],
)
def test_bad_target_options_are_one_sentence(pipeline, data, message):
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(8, 4)
    with pytest.raises(GraphoptError, match=message):
        run(model, x, pipeline, [(x,)])


# -- the form follows the output format -----------------------------------------------------------


@pytest.mark.parametrize(("suffix", "form"), [(".onnx", "qdq"), (".pt", "int8"), (".pt2", "qdq")])
def test_cli_plain_quant_writes_every_format(suffix, form, tmp_path, capsys):
    torch.save(torch.randn(8, 3, 16, 16), tmp_path / "calib.pt")
    out = tmp_path / f"m{suffix}"
    run_cli = run_main(
        capsys,
        "optimize",
        "models_for_cli:small_cnn",
        "--input-shape",
        "1,3,16,16",
        "--data",
        str(tmp_path / "calib.pt"),
        "--passes",
        "fold,quant",
        "-o",
        str(out),
    )
    assert run_cli.code == 0, run_cli.stderr
    assert out.exists() and "reloaded and checked" in run_cli.stdout
    assert f"picked form={form}" in run_cli.stdout
    if suffix == ".onnx":
        import onnx

        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "\x1b[" not in run_cli.stdout + run_cli.stderr


@pytest.mark.parametrize(
    ("pipeline", "suffix", "message"),
    [
        ("quant(form=int8)", ".onnx", r"only a \.pt file can hold, not a \.onnx file"),
        ("quant(form=int8)", ".pt2", r"only a \.pt file can hold, not a \.pt2 file"),
        ("quant(mode=weight_only)", ".onnx", "no ONNX operator"),
        ("quant(mode=dynamic,form=qdq)", ".pt", "has the form"),
    ],
)
def test_cli_refuses_impossible_forms_before_loading_the_model(
    pipeline, suffix, message, tmp_path, capsys
):
    out = tmp_path / f"m{suffix}"
    # the model does not exist: the refusal must come before anything is loaded
    run_cli = run_main(
        capsys, "optimize", "no_such.module:model", "--passes", pipeline, "-o", str(out)
    )
    assert run_cli.code == 2
    assert run_cli.stderr.count("\n") == 1 and "Traceback" not in run_cli.stderr
    assert re.search(message, run_cli.stderr), run_cli.stderr
    assert list(tmp_path.iterdir()) == []
