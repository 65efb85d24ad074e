"""The distill and bnrecal passes: losses against hand computations, node pairing through
provenance after rewrites, training on real data (load_digits), checkpoints, plugin losses,
and the same loop under torchrun with two gloo processes.

Run as a script (``python -m torch.distributed.run --nproc_per_node 2 tests/test_distill.py
OUT``) this module is the DDP worker the last test launches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, Block, randomize_bn, run_main
from graphopt.passes.distill import (
    Distill,
    TrainVal,
    adapter,
    block_outputs,
    ce_loss,
    distill,
    evaluate,
    feature_loss,
    kd_loss,
    pair_nodes,
    tap,
)
from torch import nn

import graphopt
from graphopt import GraphIR, GraphoptError, PassContext, PassManager

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a real model on real data ----------------------------------------------------------------


class DigitsNet(nn.Module):
    """Three conv-bn-relu stages and a linear head for the 8×8 digits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def stage(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(stage(1, w), stage(w, 2 * w, 2), stage(2 * w, 2 * w))
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def digits(n_train: int = 1200, batch: int = 60, shuffle: bool = True):
    """load_digits as (train DataLoader, [one validation batch]); images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train_set = torch.utils.data.TensorDataset(x[:n_train], y[:n_train])
    train = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=shuffle)
    return train, [(x[n_train:], y[n_train:])]


def digits_splits(batch: int = 50):
    """load_digits as train (1100, shuffled DataLoader), validation (300, for early stopping)
    and test (397, for the accuracies reported), each of the last two one batch."""
    train, rest = digits(n_train=1100, batch=batch)
    x, y = rest[0]
    return train, [(x[:300], y[:300])], [(x[300:], y[300:])]


def train_classifier(model: nn.Module, loader, epochs: int = 10, lr: float = 3e-3) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model: nn.Module, val) -> float:
    return evaluate(model.eval(), None, val, 1, torch.device("cpu"))[1]


@pytest.fixture(scope="module")
def trained():
    """A DigitsNet teacher trained on load_digits, with its data."""
    torch.manual_seed(0)
    train, val = digits()
    teacher = train_classifier(DigitsNet(32), train)
    return teacher, train, val


def shrink(teacher: DigitsNet, keep: float) -> DigitsNet:
    """A narrower DigitsNet holding the first channels of each of the teacher's layers
    (hand pruning without any fine-tuning: a damaged, compressed student)."""
    width = teacher.features[0][0].out_channels
    student = DigitsNet(max(1, round(width * keep))).eval()
    with torch.no_grad():
        for p_s, p_t in zip(
            student.state_dict().values(), teacher.state_dict().values(), strict=True
        ):
            p_s.copy_(p_t[tuple(slice(0, n) for n in p_s.shape)])
    return student


def test_docstring_examples_run():
    import doctest

    import graphopt.passes.distill as package
    from graphopt.passes.distill import data

    for module in (package, data):
        failures, tried = doctest.testmod(module)
        assert tried and not failures, module.__name__


# -- losses against hand computations ----------------------------------------------------------


def test_kd_loss_is_batchmean_kl_times_t_squared_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=gen, requires_grad=True)
    t = torch.randn(4, 5, generator=gen)
    temp = 3.0
    p_t = torch.softmax(t / temp, 1)
    log_p_s = torch.log_softmax(s / temp, 1)
    by_hand = (p_t * (p_t.log() - log_p_s)).sum() / 4 * temp**2
    loss = kd_loss(s, t, temp)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    loss.backward()
    # d/ds of T²·KL/N is T·(softmax(s/T) − softmax(t/T))/N
    expected = temp * (torch.softmax(s.detach() / temp, 1) - p_t) / 4
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_on_dense_logits_compares_per_position():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    rows_s, rows_t = s.permute(0, 2, 3, 1).reshape(-1, 3), t.permute(0, 2, 3, 1).reshape(-1, 3)
    per_row = F.kl_div(
        F.log_softmax(rows_s / 2, 1), F.softmax(rows_t / 2, 1), reduction="sum"
    )  # summed over all 32 positions, divided by the batch of 2
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(float(per_row) / 2 * 4, rel=1e-5)


def test_feature_and_cross_entropy_losses_by_hand():
    gen = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    s2, t2 = torch.randn(2, 7, generator=gen), torch.randn(2, 7, generator=gen)
    scales = [2.0, 0.5]
    by_hand = (((s1 - t1) ** 2).mean() / 2.0 + ((s2 - t2) ** 2).mean() / 0.5) / 2
    assert float(feature_loss([s1, s2], [t1, t2], scales)) == pytest.approx(float(by_hand))
    logits, target = torch.randn(3, 4, generator=gen), torch.tensor([0, 3, 1])
    ce = -torch.log_softmax(logits, 1)[torch.arange(3), target].mean()
    assert float(ce_loss(logits, target)) == pytest.approx(float(ce), rel=1e-6)


def test_adapters_map_student_channels_to_the_teachers():
    assert isinstance(adapter((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)
    cases = [((2, 8, 4, 4), (2, 16, 4, 4)), ((2, 8), (2, 16)), ((2, 8, 5), (2, 16, 5))]
    cases += [((2, 5, 8), (2, 5, 16)), ((2, 4, 3, 3, 3), (2, 6, 3, 3, 3))]
    for s_shape, t_shape in cases:
        a = adapter(s_shape, t_shape)
        assert a is not None
        assert tuple(a(torch.randn(s_shape)).shape) == t_shape
        assert sum(p.numel() for p in a.parameters()) == 8 * 16 if s_shape[1:2] == (8,) else True
    assert adapter((2, 8, 4, 4), (2, 16, 2, 2)) is None  # spatial size differs
    assert adapter((2, 8, 4, 4), (2, 8, 16)) is None


# -- pairing through provenance ------------------------------------------------------------------


def test_default_pairs_are_block_outputs_of_real_architectures():
    import torchvision

    resnet = graphopt.trace(torchvision.models.resnet18(weights=None), ()).gm
    assert block_outputs(resnet) == [f"layer{i}_{j}_relu_1" for i in range(1, 5) for j in (0, 1)]
    mobilenet = graphopt.trace(torchvision.models.mobilenet_v2(weights=None), ()).gm
    names = block_outputs(mobilenet)
    assert len(names) == 19 and names[0] == "features_0_2" and names[-1] == "features_18_2"
    assert "add" in names  # a residual block ends in its add
    vit = graphopt.trace(torchvision.models.vit_b_16(weights=None), ()).gm
    assert len(block_outputs(vit)) == 12  # one per encoder layer
    assert block_outputs(graphopt.trace(DigitsNet(4), ()).gm) == [
        "features_0_2",
        "features_1_2",
        "features_2_2",
    ]


def test_pairing_follows_provenance_after_fold(trained):
    """fold erases every BatchNorm node and gives its conv the BN's provenance, so a pair
    named after a BatchNorm lands on the conv that now computes the same value."""
    teacher = randomize_bn(DigitsNet(8)).eval()
    x = trained[2][0][0][:16]
    ir = GraphIR.trace(teacher, (x,))
    folded = PassManager("fold", reproducer=False).run(ir).ir
    assert not folded.nodes(module_type=nn.BatchNorm2d)
    t_gm = GraphIR.trace(teacher, (x,)).gm
    pairs, missing = pair_nodes(t_gm, folded.gm, ["features_*_1"])
    assert [(p.teacher, p.student) for p in pairs] == [
        (f"features_{i}_1", f"features_{i}_0") for i in range(3)
    ]
    assert missing == []
    _, t_vals = tap(t_gm, [p.teacher for p in pairs])(x)
    _, s_vals = tap(folded.gm, [p.student for p in pairs])(x)
    for t_val, s_val in zip(t_vals, s_vals, strict=True):
        assert torch.allclose(t_val, s_val, rtol=1e-4, atol=1e-5)
    default, _ = pair_nodes(t_gm, folded.gm)
    assert [p.student for p in default] == ["features_0_2", "features_1_2", "features_2_2"]


def test_depthwise_student_pairs_by_provenance_and_recovers(trained):
    """depthwise splits each conv into a depthwise and a pointwise node, both standing for
    the original conv; the pointwise one carries its value. Distilling after it recovers."""
    teacher, train, val = trained
    x = (val[0][0][:1],)
    lossy = graphopt.optimize(teacher, "depthwise(rank=2)", example_inputs=x)
    pairs, _ = pair_nodes(GraphIR.trace(teacher, x).gm, lossy.ir.gm, ["features_*_0"])
    assert [p.student for p in pairs] == [f"features_{i}_0_pw" for i in range(3)]
    result = graphopt.optimize(
        teacher,
        "depthwise(rank=2),distill(epochs=6,lr=3e-3,patience=0,progress=false)",
        example_inputs=x,
        data=(train, val),
    )
    assert result.ledger[-1].macs < 0.3 * result.ledger[0].macs
    acc = [accuracy(m, val) for m in (teacher, lossy.ir.gm, result.ir.gm)]
    assert acc[1] < acc[0] - 0.3, acc
    assert acc[2] >= acc[0] - 0.025, acc


def test_pruned_resnet18_learns_back_its_teachers_predictions():
    """A real torchvision architecture (residual blocks, downsample branches): prune to half
    its MACs, then distil on unlabelled inputs through the eight block-output pairs, whose
    channel counts pruning changed (1×1 adapters)."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(96, 3, 32, 32, generator=gen)
    train = [(xs[i : i + 16],) for i in range(0, 96, 16)]
    val = [(torch.randn(64, 3, 32, 32, generator=gen),)]
    result = graphopt.optimize(
        model,
        "prune(target=0.5),distill(epochs=2,lr=3e-3,patience=0,progress=false)",
        example_inputs=(val[0][0][:1],),
        data=(train, val),
    )
    stats = result.ledger[-1].stats
    assert stats["feature pairs"] == 8
    assert result.ledger[-1].macs < 0.55 * result.ledger[0].macs
    assert stats["val agreement after"] > stats["val agreement before"] + 0.3, stats


class _BatchInView(nn.Module):
    """A DigitsNet whose head input is reshaped to the batch size: exported for one batch
    size, the program holds that size as a constant."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.net.features(x).mean((2, 3))
        return self.net.head(pooled.view(x.shape[0], -1))


def test_exported_programs_pair_blocks_and_need_a_dynamic_batch(trained, tmp_path):
    """A .pt2 model: the block scopes come from torch.export's own module stack; a program
    whose ops hold the batch size it was exported for is refused in one sentence, one whose
    ops do not (or exported with a dynamic batch) trains."""
    teacher, train, val = trained
    small = shrink(teacher, 0.25)
    fixed, dynamic = tmp_path / "fixed.pt2", tmp_path / "dynamic.pt2"
    baked = tmp_path / "baked.pt2"
    torch.export.save(torch.export.export(small, (val[0][0][:2],)), fixed)
    torch.export.save(torch.export.export(_BatchInView(small), (val[0][0][:2],)), baked)
    batch = {"x": {0: torch.export.Dim("batch", min=1)}}
    torch.export.save(torch.export.export(small, (val[0][0][:2],), dynamic_shapes=batch), dynamic)
    ir = graphopt.load(str(dynamic))
    assert block_outputs(ir.gm) == ["features_0_2_relu", "features_1_2_relu", "features_2_2_relu"]
    result = graphopt.optimize(ir, "distill(epochs=1,progress=false)", data=(train, val))
    assert result.ledger[-1].stats["feature pairs"] == 3
    result = graphopt.optimize(str(fixed), "distill(epochs=1,progress=false)", data=(train, val))
    assert result.ledger[-1].stats["feature pairs"] == 3
    with pytest.raises(GraphoptError, match=r"does not run on a training batch of shape"):
        graphopt.optimize(str(baked), "distill(epochs=1)", data=(train, val))


class _Functionalize(graphopt.Pass):
    """Replace each ReLU module node by a functional call (new node, new name)."""

    name = "functionalize"
    summary = "relu modules to F.relu"
    exact = True

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        for node in ir.nodes(module_type=nn.ReLU):
            with ir.graph.inserting_after(node):
                new = ir.graph.call_function(F.relu, (node.args[0],))
            ir.replace(node, new)


def test_pairing_finds_replaced_modules_and_functional_ops(block, block_input):
    ir = GraphIR.trace(DigitsNet(8).eval(), (torch.randn(2, 1, 8, 8),))
    student = PassManager([_Functionalize()], reproducer=False).run(ir).ir
    pairs, _ = pair_nodes(ir.gm, student.gm)
    assert [p.teacher for p in pairs] == ["features_0_2", "features_1_2", "features_2_2"]
    assert [p.student for p in pairs] == ["relu", "relu_1", "relu_2"]
    # functional ops pair too, by name pattern: the Block's residual add, concat and attention
    b_ir = GraphIR.trace(block, block_input)
    pairs, _ = pair_nodes(b_ir.gm, b_ir.copy().gm, ["add", "cat_1", "getitem_3"])
    assert [p.student for p in pairs] == ["add", "cat_1", "getitem_3"]
    with pytest.raises(GraphoptError, match="no teacher node matches"):
        pair_nodes(b_ir.gm, b_ir.gm, ["nothing_*"])


# -- training ------------------------------------------------------------------------------------


def test_distill_recovers_a_hand_pruned_student(trained):
    teacher, train, val = trained
    student = shrink(teacher, 0.5)
    acc_teacher, acc_before = accuracy(teacher, val), accuracy(student, val)
    run = distill(
        student, teacher, (train, val), example_inputs=(val[0][0][:1],), epochs=8, lr=3e-3,
        progress=False,
    )  # fmt: skip
    acc_after = accuracy(run.ir.gm, val)
    print(f"teacher {acc_teacher:.4f} shrunk {acc_before:.4f} distilled {acc_after:.4f}")
    assert acc_teacher > 0.97
    assert acc_before < acc_teacher - 0.05  # the compression really hurt
    assert acc_after >= acc_teacher - 0.015
    assert run.stats["val accuracy after"] == pytest.approx(acc_after)
    assert run.stats["feature pairs"] == 3  # channel counts differ: three 1×1 adapters
    assert accuracy(student, val) == acc_before  # the caller's student is untouched


def test_prune_to_40_percent_of_the_macs_then_distill_to_within_a_point_of_the_teacher():
    """The headline: a trained CNN pruned to 40 % of its MACs loses most of its accuracy;
    distilling from the original in the same pipeline brings it back within one point."""
    torch.manual_seed(0)
    train, val, test = digits_splits()
    teacher = train_classifier(DigitsNet(32), train)
    x = (test[0][0][:1],)
    prune = "prune(target=0.4,round_to=1)"
    pruned = graphopt.optimize(teacher, prune, example_inputs=x)
    result = graphopt.optimize(
        teacher,
        f"{prune},distill(epochs=15,lr=3e-3,patience=5,progress=false)",
        example_inputs=x,
        data=(train, val),
    )
    macs = result.ledger[-1].macs / result.ledger[0].macs
    acc = [accuracy(m, test) for m in (teacher, pruned.ir.gm, result.ir.gm)]
    print(f"MACs {macs:.3f}; test accuracy teacher {acc[0]:.4f} pruned {acc[1]:.4f} "
          f"distilled {acc[2]:.4f}")  # fmt: skip
    assert 0.38 <= macs <= 0.42
    assert acc[0] > 0.97
    assert acc[1] < acc[0] - 0.3  # one-shot pruning to 40 % really hurts
    assert acc[2] >= acc[0] - 0.01
    stats = result.ledger[-1].stats
    assert (
        stats["feature pairs"] == 3 and stats["val accuracy after"] > stats["val accuracy before"]
    )
    assert accuracy(teacher, test) == acc[0]  # the caller's model is untouched


def test_pruned_int8_model_recovers_through_qat_and_distillation():
    """prune to 40 % of the MACs, distil, then quantization-aware training (fake-quant from
    ``quant(form=qat)``) distilled from the float original, then int8: the int8 pruned model
    ends within a point of the float teacher; without training it does not come close."""
    torch.manual_seed(0)
    train, val, test = digits_splits()
    teacher = train_classifier(DigitsNet(32), train)
    x = (test[0][0][:1],)
    data = TrainVal(train, val)  # quant calibrates on the training batches
    prune = "prune(target=0.4,round_to=1)"
    plain = graphopt.optimize(teacher, f"{prune},fold,quant", example_inputs=x, data=data)
    pipeline = (
        f"{prune},distill(epochs=15,lr=3e-3,patience=5,progress=false),fold,quant(form=qat),"
        "distill(epochs=3,patience=0,progress=false),quant"
    )
    result = graphopt.optimize(teacher, pipeline, example_inputs=x, data=data)
    assert any(str(n.target).startswith("quantized.conv2d") for n in result.ir.graph.nodes)
    acc = [accuracy(m, test) for m in (teacher, plain.ir.gm, result.ir.gm)]
    print(f"test accuracy teacher {acc[0]:.4f} int8 pruned {acc[1]:.4f} after QAT {acc[2]:.4f}")
    assert acc[1] < acc[0] - 0.3
    assert acc[2] >= acc[0] - 0.01


def test_iterative_prune_and_recover_schedule(trained):
    teacher, train, val = trained
    x = (val[0][0][:1],)
    result = graphopt.optimize(
        teacher,
        'distill(prune_targets=[0.7,0.4],prune="prune(round_to=1)",epochs=4,lr=3e-3,'
        "patience=0,progress=false)",
        example_inputs=x,
        data=(train, val),
    )
    entry = result.ledger[-1]
    assert 0.38 <= entry.macs / result.ledger[0].macs <= 0.42
    assert entry.stats["epochs"] == 8
    rounds = [
        float(m) for m in re.findall(r"round \d: ([\d.]+)% of the MACs", " ".join(entry.notes))
    ]
    assert len(rounds) == 2 and 68 <= rounds[0] <= 72 and 38 <= rounds[1] <= 42, entry.notes
    assert accuracy(result.ir.gm, val) >= accuracy(teacher, val) - 0.02
    # the same by hand, and network slimming: distill may come before a prune too
    for pipeline in (
        "prune(target=0.7),distill,prune(target=0.4),distill",
        "distill(l1_bn=0.0001),prune(target=0.5,criterion=bn_scale),distill",
    ):
        assert PassManager(pipeline).pipeline == pipeline
    with pytest.raises(GraphoptError, match="'bnrecal' must run before 'fold'"):
        PassManager("fold,bnrecal")
    with pytest.raises(GraphoptError, match="has no 'target' option"):
        graphopt.optimize(teacher, 'distill(prune_targets=[0.5],prune="fold")',
                          example_inputs=x, data=(train, val))  # fmt: skip
    with pytest.raises(GraphoptError, match="must name one pruning step"):
        graphopt.optimize(teacher, 'distill(prune_targets=[0.5],prune="prune,prune")',
                          example_inputs=x, data=(train, val))  # fmt: skip


def test_block_model_distils_through_every_structure(block, block_input):
    """Residual add, split, concat, grouped/depthwise convs, attention and a shared module:
    a noisy copy of the Block learns back the teacher's outputs (no labels)."""
    torch.manual_seed(0)
    noisy = randomize_bn(Block(), seed=0).eval()
    noisy.load_state_dict(block.state_dict())
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std().nan_to_num(0.1))
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(256, 3, 8, 8, generator=gen)
    train = [(xs[i : i + 32],) for i in range(0, 256, 32)]
    val = [(torch.randn(128, 3, 8, 8, generator=gen),)]
    run = distill(
        noisy, block, {"train": train, "val": val}, example_inputs=block_input, epochs=6,
        features=["add", "cat_1", "getitem_3"], gamma=0.5, progress=False, patience=0, lr=3e-3,
    )  # fmt: skip
    assert run.stats["feature pairs"] == 3
    assert "the batches carry no labels" in " ".join(run.notes)
    assert "val agreement after" in run.stats
    with torch.no_grad():
        before = graphopt.deviation(noisy(val[0][0]), block(val[0][0])).rel_err
        after = graphopt.deviation(run.ir.gm(val[0][0]), block(val[0][0])).rel_err
    assert after < 0.6 * before, (before, after)


def test_pipeline_without_data_refuses_in_one_sentence(capsys, tmp_path):
    ir = GraphIR.trace(DigitsNet(4).eval(), (torch.randn(1, 1, 8, 8),))
    with pytest.raises(GraphoptError, match="distill needs training data"):
        PassManager("distill", reproducer=False).run(ir)
    with pytest.raises(GraphoptError, match="bnrecal needs"):
        PassManager("bnrecal", reproducer=False).run(ir)
    model = tmp_path / "digits_model.py"
    tests = str(ROOT / "tests")
    model.write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom test_distill import DigitsNet\n"
        "def make():\n    return DigitsNet(4).eval()\n"
    )
    out = tmp_path / "out.pt"
    r = run_main(capsys, "optimize", f"{model}:make", "--input-shape", "1,1,8,8",
                 "--passes", "distill", "-o", str(out))  # fmt: skip
    assert r.code == 2 and "distill needs training data" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_data_spec_returning_loaders(capsys, tmp_path):
    spec = tmp_path / "digits_data.py"
    tests = str(ROOT / "tests")
    spec.write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom test_distill import DigitsNet, digits\n"
        "def make():\n    return DigitsNet(4).eval()\n"
        "def loaders():\n    return digits(n_train=300, batch=100)\n"
    )
    out = tmp_path / "out.pt2"
    r = run_main(capsys, "optimize", f"{spec}:make", "--input-shape", "1,1,8,8",
                 "--passes", "bnrecal(batches=2),distill(epochs=2,patience=0)",
                 "--data", f"{spec}:loaders", "-o", str(out))  # fmt: skip
    assert r.code == 0, r.stderr
    assert out.exists()
    assert "val accuracy" in r.stdout and "epochs: 2" in r.stdout


def test_bad_options_and_data_are_one_sentence(trained):
    teacher, train, val = trained
    student = shrink(teacher, 0.25)
    x = (val[0][0][:1],)
    bad = [
        ({"prune_targets": [0.5, 0.8]}, "decreasing fractions"),
        ({"resume": True}, "needs checkpoint=FOLDER"),
        ({"losses": ["nope"]}, "unknown distillation loss 'nope'"),
        ({"features": ["nothing*"]}, "no teacher node matches"),
        ({"temperature": 0}, "out of range"),
        ({"optimizer": "adam"}, "must be one of adamw, sgd"),
    ]
    for options, message in bad:
        with pytest.raises(GraphoptError, match=message):
            distill(student, teacher, (train, val), example_inputs=x, **options)
    batches = iter([(val[0][0][:8], val[0][1][:8])])
    with pytest.raises(GraphoptError, match="one-shot iterator"):
        distill(student, teacher, batches, example_inputs=x)
    with pytest.raises(GraphoptError, match="has 3 items but the model takes 1"):
        distill(student, teacher, [(x[0], x[0], x[0])], example_inputs=x)
    with pytest.raises(GraphoptError, match="without a 'train' entry"):
        distill(student, teacher, {"val": val}, example_inputs=x)


class _CountBatches(graphopt.Pass):
    """Reads ctx.data as plain batches, as calibrating passes do."""

    name = "count_batches"
    summary = "count the data's batches"

    def run(self, ir: GraphIR, ctx: PassContext) -> None:
        for inputs, _ in ctx.data:
            ctx.stat("batches")
            ctx.stat("samples", len(inputs))


def test_trainval_is_plain_batches_to_other_passes_and_carries_validation(trained):
    teacher, train, val = trained
    ir = GraphIR.trace(teacher, (val[0][0][:1],))
    steps = [_CountBatches(), Distill(Distill.parse_options({"epochs": 1, "progress": False}))]
    result = PassManager(steps, reproducer=False).run(ir, data=TrainVal(train, val))
    assert result.ledger[1].stats == {"batches": len(train), "samples": 1200}
    assert "teacher val accuracy" in result.ledger[2].stats


def _logit_l2(inputs):
    return inputs.student_logits.pow(2).mean()


class _Interrupt(KeyboardInterrupt):
    """A run stopped from outside (Ctrl-C): it passes through graphopt as it is, not as a
    fault of the plugin whose loss was running."""


def test_plugin_loss_checkpoint_and_resume(trained, tmp_path):
    """A loss from a plugin (through the hook) changes training; a run interrupted after two
    epochs and resumed from its checkpoint ends where an uninterrupted run does."""
    teacher, _, val = trained
    train, _ = digits(n_train=480, batch=80, shuffle=False)
    calls = {"n": 0, "stop": None}

    def flaky(inputs):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] > calls["stop"]:
            raise _Interrupt
        return _logit_l2(inputs)

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_distill_losses(self, register):
            register("logit_l2", flaky)

    registry = graphopt.load_registry(autoload=False, extra=[Plugin()])
    assert "logit_l2" in registry.distill_losses
    student = shrink(teacher, 0.25)
    common = dict(example_inputs=(val[0][0][:1],), epochs=4, patience=0, progress=False,
                  registry=registry, lr=3e-3)  # fmt: skip

    def norm(gm):
        with torch.no_grad():
            return float(gm(val[0][0]).pow(2).mean())

    plain = distill(student, teacher, (train, val), **common)
    full = distill(student, teacher, (train, val), losses=["logit_l2:2"], **common)
    assert norm(full.ir.gm) < 0.8 * norm(plain.ir.gm)

    calls.update(n=0, stop=2 * len(train))  # dies in the third epoch
    folder = str(tmp_path / "ckpt")
    with pytest.raises(_Interrupt):
        distill(student, teacher, (train, val), losses=["logit_l2:2"], checkpoint=folder, **common)
    saved = torch.load(os.path.join(folder, "distill.pt"), weights_only=True)
    assert saved["epoch"] == 2
    calls.update(stop=None)
    resumed = distill(student, teacher, (train, val), losses=["logit_l2:2"], checkpoint=folder,
                      resume=True, **common)  # fmt: skip
    assert any("resumed from" in n and "after epoch 2" in n for n in resumed.notes)
    for (k, a), b in zip(
        full.ir.gm.state_dict().items(), resumed.ir.gm.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    other = DigitsNet(16).eval()
    with pytest.raises(GraphoptError, match="does not fit this student"):
        distill(other, teacher, (train, val), checkpoint=folder, resume=True,
                **{**common, "registry": None})  # fmt: skip


def test_two_plugins_registering_one_loss_name_is_an_error():
    class First:
        @graphopt.hookimpl
        def graphopt_register_distill_losses(self, register):
            register("logit_l2", _logit_l2)

    class Second(First):
        pass

    with pytest.raises(
        GraphoptError,
        match="distillation loss 'logit_l2' is registered by both plugin 'First' and plugin "
        "'Second'",
    ):
        graphopt.load_registry(autoload=False, extra=[First(), Second()])


def test_l1_on_bn_scales_and_frozen_bn(trained):
    teacher, train, val = trained
    student = shrink(teacher, 0.5)
    common = dict(example_inputs=(val[0][0][:1],), epochs=2, patience=0, progress=False)

    def bn_l1(gm):
        bns = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
        return sum(float(m.weight.detach().abs().sum()) for m in bns)

    plain = distill(student, teacher, (train, val), lr=1e-2, **common)
    slim = distill(student, teacher, (train, val), lr=1e-2, l1_bn=0.1, **common)
    assert bn_l1(slim.ir.gm) < 0.8 * bn_l1(plain.ir.gm)
    assert slim.stats["val accuracy after"] > 0.8
    frozen = distill(student, teacher, (train, val), freeze_bn=True, **common)
    for m_s, m_f in zip(student.modules(), frozen.ir.gm.modules(), strict=False):
        if isinstance(m_s, nn.BatchNorm2d):
            assert torch.equal(m_s.running_mean, m_f.running_mean)


def test_sgd_with_a_constant_schedule_also_recovers(trained):
    teacher, train, val = trained
    student = shrink(teacher, 0.5)
    run = distill(
        student, teacher, (train, val), example_inputs=(val[0][0][:1],), epochs=3,
        optimizer="sgd", lr=0.05, schedule="constant", patience=0, progress=False,
    )  # fmt: skip
    assert run.stats["val accuracy after"] > run.stats["val accuracy before"] + 0.5


def test_exact_zeros_stay_zero_unless_asked(trained):
    teacher, train, val = trained
    student = shrink(teacher, 0.25)
    conv = student.features[1][0]
    with torch.no_grad():
        conv.weight[conv.weight.abs() < conv.weight.abs().median()] = 0
    zeros = conv.weight == 0
    common = dict(example_inputs=(val[0][0][:1],), epochs=1, progress=False)
    kept = distill(student, teacher, (train, val), **common)
    weight = kept.ir.gm.get_submodule("features.1.0").weight
    assert bool((weight[zeros] == 0).all()) and bool((weight[~zeros] != 0).all())
    assert any("zero weights in 1 tensors" in n for n in kept.notes)
    grown = distill(student, teacher, (train, val), keep_zeros=False, **common)
    regrown = grown.ir.gm.get_submodule("features.1.0").weight[zeros] != 0
    assert float(regrown.float().mean()) > 0.9


def test_bnrecal_restores_stale_statistics(trained):
    teacher, train, val = trained
    stale = randomize_bn(shrink(teacher, 1.0), seed=5)
    acc_stale = accuracy(stale, val)
    batches = list(train)[:10]
    ir = GraphIR.trace(stale, (val[0][0][:1],))
    result = PassManager("bnrecal(batches=10)", reproducer=False).run(ir, data=batches)
    fixed = result.ir.gm
    assert result.ledger[-1].stats == {"batches": 10}
    assert accuracy(fixed, val) > acc_stale + 0.2
    assert accuracy(fixed, val) >= accuracy(teacher, val) - 0.02
    # the first BatchNorm's running mean is the average of its per-batch input means
    conv = fixed.get_submodule("features.0.0")
    with torch.no_grad():
        means = torch.stack([conv(x).mean((0, 2, 3)) for x, _ in batches]).mean(0)
    assert torch.allclose(fixed.get_submodule("features.0.1").running_mean, means, atol=1e-5)
    assert not any(m.training for m in fixed.modules())


# -- torchrun --------------------------------------------------------------------------------------


def _ddp_run(freeze_bn: bool = True) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The run both sides of the DDP test make: identical code, whatever the world size.
    Returns the trained weights and the batch sizes this process trained on."""
    torch.manual_seed(0)
    train, val = digits(n_train=480, batch=60, shuffle=True)
    teacher = DigitsNet(8).eval()
    student = shrink(teacher, 0.5)
    sizes: list[int] = []

    def batch_size(inputs):  # a weightless plugin loss that records what this process saw
        sizes.append(inputs.student_logits.shape[0])
        return inputs.student_logits.sum() * 0

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_distill_losses(self, register):
            register("batch_size", batch_size)

    run = distill(
        student, teacher, (train, val), example_inputs=(val[0][0][:1],), epochs=2,
        freeze_bn=freeze_bn, patience=0, progress=False, device="cpu", losses=["batch_size"],
        registry=graphopt.load_registry(autoload=False, extra=[Plugin()]),
    )  # fmt: skip
    return run.ir.gm.state_dict(), sizes


def test_torchrun_with_two_gloo_processes_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", __file__, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, sizes = _ddp_run()
    assert sizes == [60] * 16  # 480 samples in batches of 60, two epochs
    for rank in (0, 1):
        ddp, ddp_sizes = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert ddp_sizes == [30] * 16  # each process trained on half of every batch
        for key, value in single.items():
            assert torch.allclose(value.float(), ddp[key].float(), rtol=1e-4, atol=1e-5), key
    # BatchNorm in training mode: per-process batch statistics, but the processes still end
    # with one model (running statistics averaged), close to the single-process one
    one, _ = torch.load(tmp_path / "bn_rank0.pt", weights_only=True)
    other, _ = torch.load(tmp_path / "bn_rank1.pt", weights_only=True)
    for key, value in one.items():
        assert torch.equal(value, other[key]), key


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    torch.save(_ddp_run(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    torch.save(_ddp_run(freeze_bn=False), os.path.join(sys.argv[1], f"bn_rank{rank}.pt"))
