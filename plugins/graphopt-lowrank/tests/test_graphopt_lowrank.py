"""Tests of the ``lowrank`` pass, run through graphopt's public API only: the factors are the
truncated SVD, the rewritten layers compute the rank-r layer, each rank rule picks the rank
it promises, what is left alone is said, and a digits classifier recovers after factoring.

These run from the plugin folder (``pytest``) and as part of graphopt's own suite."""

from __future__ import annotations

import copy

import graphopt_lowrank
import pytest
import torch
import torch.nn.functional as F
import torchvision
from graphopt_lowrank import LowRank, factor_matrix, factor_ratio
from sklearn.datasets import load_digits
from torch import nn

import graphopt


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: extra intra-op threads only fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry() -> graphopt.Registry:
    # the plugin object directly, without entry points: works installed or not
    return graphopt.load_registry(autoload=False, extra=[graphopt_lowrank])


def _run(registry, model: nn.Module, pipeline: str, *inputs: torch.Tensor) -> graphopt.Result:
    manager = graphopt.PassManager(pipeline, registry=registry, reproducer=False)
    return manager.run(graphopt.trace(model.eval(), inputs))


def _truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a layer weight, by a plain SVD."""
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def _ranks(gm: nn.Module) -> dict[str, int]:
    """Factored layer path → the rank of its pair."""
    mods = dict(gm.named_modules())
    out = {}
    for path, m in mods.items():
        if path.endswith("_lr_a"):
            out[path[: -len("_lr_a")]] = (
                m.out_features if isinstance(m, nn.Linear) else m.out_channels
            )
    return out


# -- the factors --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)], ids=["tall", "wide"])
def test_factors_are_the_truncated_svd(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(*shape, generator=g, dtype=torch.float64)
    matrix[:, 0] *= 50  # an uneven spectrum
    sigma = torch.linalg.svdvals(matrix)
    for rank in range(1, min(shape) + 1):
        first, second = factor_matrix(matrix, rank)
        assert first.shape == (rank, shape[1]) and second.shape == (shape[0], rank)
        err2 = float((matrix - second @ first).pow(2).sum())
        assert err2 == pytest.approx(float(sigma[rank:].pow(2).sum()), rel=1e-8, abs=1e-9)
        # √S on each side
        torch.testing.assert_close(first.norm(dim=1), second.norm(dim=0), rtol=1e-9, atol=0)
        for _ in range(10):  # Eckart–Young: a random rank-r projection never does better
            q = torch.linalg.qr(torch.randn(shape[1], rank, generator=g, dtype=torch.float64))[0]
            assert float((matrix - matrix @ q @ q.T).pow(2).sum()) >= err2 - 1e-9
    first, second = factor_matrix(matrix.float(), min(shape))
    assert first.dtype == torch.float32
    torch.testing.assert_close(second @ first, matrix.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(48, 40), (3, 7, 48)),
        (nn.Conv2d(8, 32, 3, padding=1), (2, 8, 10, 10)),
        (
            nn.Conv2d(6, 24, (3, 5), stride=2, padding=(2, 1), dilation=2, bias=False),
            (1, 6, 17, 15),
        ),
        (nn.Conv2d(5, 16, 4, padding="same", padding_mode="reflect"), (1, 5, 9, 9)),
        (nn.Conv2d(16, 32, 1), (2, 16, 5, 5)),
        (nn.Conv1d(4, 16, 5, stride=2, dilation=3, padding=4), (2, 4, 40)),
        (nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1), (1, 3, 5, 8, 8)),
    ],
    ids=["linear-3d-input", "3x3", "stride-dilation", "same-reflect", "1x1", "conv1d", "conv3d"],
)
def test_pair_computes_the_rank_r_layer(registry, layer: nn.Module, shape) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = nn.Sequential(layer).eval()
    result = _run(registry, model, "lowrank(macs_ratio=0.5)", x)
    (path, rank), *_ = _ranks(result.ir.gm).items()
    rows, cols = layer.weight.shape[0], layer.weight[0].numel()
    assert factor_ratio(rank, rows, cols) <= 0.5 < factor_ratio(rank + 1, rows, cols)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.weight.copy_(_truncated(layer.weight, rank))
        expected = reference(x)
        out = result.ir.gm(x)
    assert out.shape == expected.shape
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-5
    entry = result.ledger[-1]
    assert entry.macs <= 0.5 * result.ledger[0].macs + 1
    assert entry.stats["MACs saved"] == pytest.approx(result.ledger[0].macs - entry.macs, abs=2)
    assert any(note.startswith(f"{path}: rank {rank}/") for note in entry.notes)


# -- the rank rules on a real architecture -------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)
    }


def test_energy_threshold_picks_the_smallest_rank_keeping_it(registry, resnet) -> None:
    model, x = resnet
    result = _run(registry, model, "lowrank(energy=0.5)", x)
    ranks = _ranks(result.ir.gm)
    notes = result.ledger[-1].notes
    assert ranks
    for path, layer in _layers(model).items():
        weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        sigma2 = torch.linalg.svdvals(weight).pow(2)
        kept = (sigma2.cumsum(0) / sigma2.sum()).tolist()
        rank = next(i + 1 for i, k in enumerate(kept) if k >= 0.5 - 1e-12)
        ratio = factor_ratio(rank, *weight.shape)
        if ratio < 1:
            assert ranks[path] == rank, path
        else:  # the rank keeping half the energy would cost more than the layer: kept
            assert path not in ranks
            assert any(n.startswith(f"kept {path}: rank {rank}/") for n in notes), path
    assert any("follow it with distill" in n for n in notes)


def test_macs_target_picks_the_largest_rank_within_it(registry, resnet) -> None:
    model, x = resnet
    result = _run(registry, model, "lowrank(macs_ratio=0.3)", x)
    ranks = _ranks(result.ir.gm)
    before = graphopt.trace(model, (x,)).costs()
    after = result.ir.costs()
    assert set(ranks) == set(_layers(model))  # every layer can reach 30 % at some rank
    for path, rank in ranks.items():
        layer = model.get_submodule(path)
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        assert factor_ratio(rank, rows, cols) <= 0.3 < factor_ratio(rank + 1, rows, cols)
        node = path.replace(".", "_")
        pair = after[node + "_lr_a"].macs + after[node + "_lr_b"].macs
        assert pair == pytest.approx(factor_ratio(rank, rows, cols) * before[node].macs, rel=1e-6)
    assert result.ledger[-1].macs <= 0.3 * result.ledger[0].macs
    assert not result.ledger[-1].exact and result.ledger[-1].rel_err > 0


# -- what is left alone -------------------------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.small = nn.Linear(32, 2)
        self.fc = nn.Linear(2, 2)
        self.proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.grouped(self.conv(x)).mean((2, 3))
        return self.fc(self.small(y)), self.proj(self.proj(t))  # proj is called twice


def test_kept_layers_ignore_kinds_and_shared_modules(registry) -> None:
    torch.manual_seed(0)
    model = _Mixed().eval()
    x, t = torch.randn(2, 4, 6, 6), torch.randn(2, 64)
    result = _run(registry, model, "lowrank(energy=0.3,ignore=[conv])", x, t)
    ranks = _ranks(result.ir.gm)
    notes = result.ledger[-1].notes
    assert "conv" not in ranks and "kept conv: ignored" in notes
    assert "kept grouped: grouped convolution" in notes
    assert "fc" not in ranks and "kept fc: rank 1/2 would cost 1.00× its MACs" in notes
    assert "proj" in ranks
    # the shared module became one shared pair, used at both call sites
    targets = [str(n.target) for n in result.ir.nodes(op="call_module")]
    assert targets.count("proj_lr_a") == 2 and "proj" not in targets
    with torch.no_grad():
        reference = copy.deepcopy(model)
        for path, rank in ranks.items():
            layer = reference.get_submodule(path)
            layer.weight.copy_(_truncated(layer.weight, rank))
        for got, want in zip(result.ir.gm(x, t), reference(x, t), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    only_linear = _run(registry, model, "lowrank(macs_ratio=0.5,layers=linear)", x, t)
    assert set(_ranks(only_linear.ir.gm)) == {"proj"}  # conv is not a Linear
    notes = only_linear.ledger[-1].notes
    assert "kept small: even rank 1 costs more than macs_ratio=0.5" in notes  # 1/2 + 1/32


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("lowrank(energy=0.5,macs_ratio=0.5)", "give only one of them"),
        ("lowrank(energy=0.9,macs_ratio=0.5)", "give only one of them"),
        ("lowrank(macs_ratio=1)", "expected a fraction in (0, 1)"),
        ("lowrank(energy=0)", "expected a fraction in (0, 1]"),
        ("lowrank(layers=attention)", "attention"),
        ("lowrank(ignore=[nosuch*])", "'nosuch*' matches no Linear or conv layer"),
    ],
)
def test_bad_options_are_one_sentence_errors(registry, pipeline: str, message: str) -> None:
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graphopt.GraphoptError) as info:
        _run(registry, model, pipeline, torch.randn(2, 16))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_hook_registers_the_pass(registry) -> None:
    assert registry.passes["lowrank"] is LowRank
    assert registry.pass_owner["lowrank"] == "graphopt_lowrank"
    assert not LowRank.exact


# -- accuracy on real data ---------------------------------------------------------------------


def test_digits_mlp_within_two_points_after_factoring_and_brief_fine_tuning(registry) -> None:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]

    def fit(model: nn.Module, epochs: int, lr: float) -> None:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(1)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y_train), generator=g).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        model.eval()

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    fit(model, epochs=10, lr=3e-3)
    original = accuracy(model)
    assert original > 0.95
    # the 10-way head is left whole: a rank-2 head cannot separate ten classes
    result = _run(registry, model, "lowrank(macs_ratio=0.3,ignore=[4])", x_test[:4])
    assert set(_ranks(result.ir.gm)) == {"0", "2"}
    assert result.ledger[-1].macs <= 0.35 * result.ledger[0].macs
    factored = accuracy(result.ir.gm)
    fit(result.ir.gm, epochs=3, lr=1e-3)
    tuned = accuracy(result.ir.gm)
    print(f"digits MLP: original {original:.4f}, factored {factored:.4f}, tuned {tuned:.4f}")
    assert tuned >= original - 0.02
