"""graphopt's int8 quantization against torch.ao, onnxruntime and fp32, side by side in one run.

Parts (``--part NAME``, several allowed; default all):

* ``torch``: resnet18/resnet50, ``fold,quant`` against torch.ao's ``prepare_fx``/``convert_fx``
  (x86 qconfig) on the same calibration data: eager latency ratio to fp32, output SQNR,
  artifact size.
* ``vit``: torchvision vit_b_16 and timm DeiT with plain ``quant`` (the default accuracy
  target): output SQNR on held-out inputs, latency against fp32, the ops kept float; and
  ``smooth=0.5`` against none, on the model as built and on a copy with activation outliers
  (a few LayerNorm channels scaled up ×30 and the Linears reading them scaled down, which
  leaves the float function unchanged: the shape of trained transformers' activations).
* ``onnx``: graphopt's int8 ``.onnx`` (plain ``quant``, QDQ) against onnxruntime's
  ``quantize_dynamic`` and ``quantize_static`` (QDQ, per-channel, MinMax) applied to the
  same fp32 export, all run by onnxruntime: latency, SQNR against PyTorch fp32, size.
* ``target``: ``quant(min_sqnr=30)`` on resnet50, mobilenet_v3_large, efficientnet_b0,
  vit_b_16 and convnext_tiny: target met, ops kept float, latency against all-int8
  (``min_sqnr=0``) and fp32, and the time the search took.
* ``token``: token models (integer ids into an embedding): graphopt's default (dynamic int8)
  and its variants against ``torch.ao.quantization.quantize_dynamic``; weight-only int8/int4
  size and speed. Rows come from :data:`TOKEN_MODELS` (models built from torch modules;
  Hugging Face models are ``--part hf``).
* ``hf``: Hugging Face BERT and GPT-2 (``hf:`` sources, small configurations): plain
  ``quant`` (dynamic int8) against ``torch.ao.quantization.quantize_dynamic`` on the same
  module (as is, and with GPT-2's ``Conv1D`` made ``nn.Linear`` so that it quantizes them
  too); and weight-only int8/int4 on a Llama decoder (one token, a 16-token prompt).
* ``hf-onnx``: BERT's and GPT-2's int8 ``.onnx`` from plain ``quant`` (dynamic int8 as
  ``DynamicQuantizeLinear`` + ``MatMulInteger``) against onnxruntime's ``quantize_dynamic``
  and ``quantize_static`` on the same fp32 export, all run by onnxruntime.
* ``hf-onnx-avx2``: the dynamic int8 ``.onnx`` files of ``hf-onnx`` run once by
  onnxruntime here and once by the ONNX reference evaluator with a ``MatMulInteger`` whose
  pair sums saturate in int16 as on CPUs without VNNI: the accuracy each file keeps there.
* ``hf-ao``: like for like, graphopt's dynamic int8 with every Linear in int8 against
  torch.ao's ``quantize_dynamic`` on the same layers (BERT, GPT-2 at 128 tokens; the Llama
  decoder at 1 and 16 tokens), two models timed interleaved.
* ``digits``: accuracy on real data (scikit-learn's digits) of the float CNN, ``quant``,
  and ``quant(max_drop=…)``.
* ``sqnr``: output SQNR and artifact size of plain ``quant`` across five torchvision models.

    python benchmarks/quant.py --part vit onnx
    python benchmarks/quant.py --part target --models resnet50 vit_b_16

Weights are random (no pretrained weights offline; BatchNorm statistics randomised; a zero
head re-initialised) and calibration data is random normal images unless said otherwise,
so absolute SQNR figures are for that setting; each comparison uses the same data for both
sides. Latency: batch 1, one thread, each side timed interleaved with the others (median).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from graphopt.passes.quant import quant_report, sqnr_db
from torch import nn

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import randomize_bn

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs to the root logger


# -- shared helpers ------------------------------------------------------------------------------


class Images(nn.Module):
    """Calls a model on one image batch (timm ViTs take optional mask arguments fx would
    otherwise turn into inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build(arch: str, res: int = 224) -> nn.Module:
    """A torchvision model by name, or ``timm:NAME``; random weights, BN statistics
    randomised, a zero-initialised Linear (ViT heads) re-initialised."""
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        import timm

        model: nn.Module = Images(timm.create_model(arch[5:], pretrained=False, img_size=res))
    else:
        kw = {"image_size": res} if arch.startswith("vit") else {}
        model = getattr(torchvision.models, arch)(weights=None, **kw)
    model = randomize_bn(model).eval()
    for m in model.modules():  # vit_b_16's head starts at zero: every output would be 0
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
    return model


def calibration(res: int, n: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, res, res, generator=gen),) for _ in range(n)]


def held_out(res: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(9))


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so load hits all alike;
    each round in a new (seeded) order, since a model runs faster or slower after another
    by a few % (caches), which a fixed order would charge to one of them every round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    order, rng = list(fns.items()), random.Random(0)
    for _ in range(repeat):
        rng.shuffle(order)
        for name, f in order:
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def file_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return os.path.getsize(path)


def no_grad(f: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return f(*args)

    return run


def output_sqnr(ref_model: Callable[..., Any], model: Callable[..., Any], x: Any) -> float:
    with torch.no_grad():
        return sqnr_db(ref_model(x), model(x))


def kept_float(result: graphopt.Result) -> list[str]:
    report = quant_report(result.ir.gm)
    return [c.node for c in report.kept_float] if report else []


# -- part torch ----------------------------------------------------------------------------------


def torch_ao_int8(model: nn.Module, x: torch.Tensor, calib: list) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for (batch,) in calib:
            prepared(batch)
    return convert_fx(prepared)


def part_torch(models: list[str], res: int, repeat: int, tmp: str) -> None:
    print(f"\n## PyTorch eager int8 vs torch.ao.quantization (x86 qconfig), {res}×{res}, batch 1")
    print(
        f"{'model':10} {'fp32 ms':>8} {'graphopt ms':>12} {'ratio':>6} {'torch.ao ms':>12} "
        f"{'ratio':>6} {'go/ao':>6} {'SQNR go':>8} {'SQNR ao':>8} {'fp32 MB':>8} "
        f"{'go MB':>6} {'ao MB':>6}"
    )
    for arch in models:
        model = build(arch, res)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        test = held_out(res, 4)
        calib = calibration(res, 8, 4)
        fp32_path = os.path.join(tmp, f"{arch}_fp32.pt")
        go_path = os.path.join(tmp, f"{arch}_int8.pt")
        graphopt.optimize(model, "fold", example_inputs=(x,), output=fp32_path)
        go = graphopt.optimize(
            model, "fold,quant(sensitivity=false)", example_inputs=(x,), data=calib, output=go_path
        ).ir.gm
        ao = torch_ao_int8(model, x, calib)
        ao_path = os.path.join(tmp, f"{arch}_ao.pt")
        torch.save(ao.state_dict(), ao_path)  # its modules do not pickle whole in torch 2.14
        s_go, s_ao = output_sqnr(model, go, test), output_sqnr(model, ao, test)
        t = interleaved(
            {"fp32": no_grad(model, x), "go": no_grad(go, x), "ao": no_grad(ao, x)}, repeat
        )
        mb = [file_size(p) / 1e6 for p in (fp32_path, go_path, ao_path)]
        print(
            f"{arch:10} {t['fp32'] * 1e3:8.1f} {t['go'] * 1e3:12.1f} {t['fp32'] / t['go']:6.2f} "
            f"{t['ao'] * 1e3:12.1f} {t['fp32'] / t['ao']:6.2f} {t['ao'] / t['go']:6.2f} "
            f"{s_go:8.1f} {s_ao:8.1f} {mb[0]:8.1f} {mb[1]:6.1f} {mb[2]:6.1f}"
        )
    print("ratio = fp32 time / int8 time (higher is faster); go/ao = torch.ao time / graphopt time")


# -- part vit ------------------------------------------------------------------------------------


def with_outliers(model: nn.Module, channels: int = 4, factor: float = 30.0) -> nn.Module:
    """A copy whose LayerNorms emit a few channels ×``factor`` larger, with the Linears
    that read them scaled down by as much: the same function, activations with outliers."""
    import torch.fx as fx

    model = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    gen = torch.Generator().manual_seed(3)
    for node in gm.graph.nodes:
        affine = _layer_norm_affine(gm, modules, node)
        if affine is None:
            continue
        readers = [modules.get(str(u.target)) for u in node.users if u.op == "call_module"]
        if not readers or not all(type(r) is nn.Linear for r in readers):
            continue
        idx = torch.randperm(affine[0].shape[0], generator=gen)[:channels]
        with torch.no_grad():
            for p in affine:
                p[idx] *= factor
            for r in readers:
                r.weight[:, idx] /= factor  # type: ignore[index]
    return gm


def _layer_norm_affine(gm: Any, modules: dict[str, nn.Module], node: Any) -> list[Any] | None:
    """The weight and bias of a LayerNorm call: a module, or ``F.layer_norm`` on stored
    parameters (as fx traces timm's LayerNorm)."""
    norm = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        return [norm.weight, norm.bias]
    if node.op == "call_function" and node.target is torch.nn.functional.layer_norm:
        attrs = [node.kwargs.get("weight"), node.kwargs.get("bias")]
        if all(a is not None and a.op == "get_attr" for a in attrs):
            return [gm.get_parameter(str(a.target)) for a in attrs]
    return None


def part_vit(models: list[str], repeat: int) -> None:
    print("\n## transformers with plain quant (default target) and SmoothQuant, 224×224")
    print(
        f"{'model':28} {'pipeline':30} {'SQNR dB':>8} {'fp32 ms':>8} {'int8 ms':>8} "
        f"{'speed-up':>8} {'quant s':>8}  ops kept float"
    )
    for arch in models:
        base = build(arch)
        for variant in ("", " +outliers"):
            model = with_outliers(base) if variant else base
            x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
            test, calib = held_out(224, 8), calibration(224, 4, 4)
            pipes = ["quant"] if not variant else []
            pipes += ["quant(min_sqnr=0,smooth=none)", "quant(min_sqnr=0)"]  # α 0.5 default
            for pipe in pipes:
                start = time.perf_counter()
                result = graphopt.optimize(model, pipe, example_inputs=(x,), data=calib)
                took = time.perf_counter() - start
                gm = result.ir.gm
                s = output_sqnr(model, gm, test)
                t = interleaved({"fp32": no_grad(model, x), "int8": no_grad(gm, x)}, repeat)
                floats = kept_float(result)
                print(
                    f"{arch + variant:28} {pipe:30} {s:8.1f} {t['fp32'] * 1e3:8.1f} "
                    f"{t['int8'] * 1e3:8.1f} {t['fp32'] / t['int8']:8.2f} {took:8.1f}  "
                    f"{len(floats)}: {', '.join(floats)}"
                )


# -- part onnx -----------------------------------------------------------------------------------


def _session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def ort_pre_process(fp32_path: str, prepared: str) -> None:
    """onnxruntime's recommended pre-processing before its quantizers. Its symbolic shape
    inference gives up on some graphs with free dims ("Incomplete symbolic shape inference",
    a token model exported with free batch and length); those get the ONNX shape inference
    and graph optimisation without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(prepared)))  # it leaves scratch files in the cwd
    try:
        try:
            quant_pre_process(fp32_path, prepared)
        except Exception:
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
    finally:
        os.chdir(here)


def ort_quantized(fp32_path: str, calib: list, tmp: str, arch: str) -> dict[str, str]:
    """onnxruntime's dynamic and static quantization of the fp32 export, after its
    recommended pre-processing (shape inference and graph optimisation)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    name = _session(fp32_path).get_inputs()[0].name
    paths = {k: os.path.join(tmp, f"{arch}_{k}.onnx") for k in ("ort dynamic", "ort static")}
    prepared = os.path.join(tmp, f"{arch}_prepared.onnx")
    ort_pre_process(fp32_path, prepared)  # what onnxruntime's docs ask for first
    quantize_dynamic(prepared, paths["ort dynamic"], weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: b[0][i : i + 1].numpy()} for b in calib for i in range(4)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(
        prepared, paths["ort static"], Reader(), quant_format=QuantFormat.QDQ, per_channel=True
    )
    return paths


def part_onnx(models: list[str], repeat: int, tmp: str) -> None:
    print("\n## int8 ONNX in onnxruntime: graphopt (plain quant → QDQ) vs onnxruntime's own")
    print("   quantizers on the same fp32 export; 224×224 (ViT too), batch 1, 1 thread")
    print(f"{'model':10} {'variant':26} {'ms':>7} {'vs fp32':>7} {'SQNR dB':>8} {'MB':>6}")
    for arch in models:
        model = build(arch)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
        test = [t[None] for t in held_out(224, 8)]
        calib = calibration(224, 4, 4)
        paths = {"fp32": os.path.join(tmp, f"{arch}_fp32.onnx")}
        graphopt.optimize(model, "fold", example_inputs=(x,), output=paths["fp32"])
        paths.update(ort_quantized(paths["fp32"], calib, tmp, arch))
        floats = {}
        for label, pipe in (
            ("graphopt quant", "quant"),
            ("graphopt all-int8", "quant(min_sqnr=0)"),
            ("graphopt 8-bit act (VNNI)", "quant(reduce_range=false)"),
        ):
            path = os.path.join(tmp, f"{arch}_{len(paths)}.onnx")
            res = graphopt.optimize(
                model, f"fold,{pipe}", example_inputs=(x,), data=calib, output=path
            )
            paths[label], floats[label] = path, len(kept_float(res))
        sessions = {k: _session(p) for k, p in paths.items()}
        with torch.no_grad():
            ref = torch.cat([model(t) for t in test])
        t = interleaved({k: partial(_run, s, x) for k, s in sessions.items()}, repeat)
        for k, s in sessions.items():
            got = torch.cat([_run(s, a) for a in test])
            label = k + (f" ({floats[k]} float)" if floats.get(k) else "")
            print(
                f"{arch:10} {label:26} {t[k] * 1e3:7.1f} {t['fp32'] / t[k]:7.2f} "
                f"{sqnr_db(ref, got):8.1f} {file_size(paths[k]) / 1e6:6.1f}"
            )


# -- part target ---------------------------------------------------------------------------------


def part_target(models: list[str], target: float, repeat: int) -> None:
    print(f"\n## quant(min_sqnr={target:g}) against all-int8 (min_sqnr=0), PyTorch eager")
    print(
        f"{'model':18} {'res':>4} {'all-int8 dB':>11} {'target dB':>9} {'met':>4} {'float':>5} "
        f"{'fp32 ms':>8} {'int8 ms':>8} {'target ms':>9} {'vs int8':>7} {'search s':>8}"
    )
    for arch in models:
        res = 224
        model = build(arch, res)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        test, calib = held_out(res, 8), calibration(res, 4, 4)
        start = time.perf_counter()
        all_int8 = graphopt.optimize(
            model, "fold,quant(min_sqnr=0)", example_inputs=(x,), data=calib
        )
        base_s = time.perf_counter() - start
        start = time.perf_counter()
        aimed = graphopt.optimize(
            model, f"fold,quant(min_sqnr={target:g})", example_inputs=(x,), data=calib
        )
        search_s = time.perf_counter() - start - base_s
        report = quant_report(aimed.ir.gm)
        assert report is not None
        s0, s1 = output_sqnr(model, all_int8.ir.gm, test), output_sqnr(model, aimed.ir.gm, test)
        t = interleaved(
            {
                "fp32": no_grad(model, x),
                "int8": no_grad(all_int8.ir.gm, x),
                "target": no_grad(aimed.ir.gm, x),
            },
            repeat,
        )
        print(
            f"{arch:18} {res:4} {s0:11.1f} {s1:9.1f} {'yes' if s1 >= target else 'NO':>4} "
            f"{len(report.kept_float):5} {t['fp32'] * 1e3:8.1f} {t['int8'] * 1e3:8.1f} "
            f"{t['target'] * 1e3:9.1f} {t['target'] / t['int8']:7.2f} {search_s:8.1f}"
        )
    print("SQNR on 8 held-out images; 'met' judged there (the search judges on calibration data)")


# -- part token ----------------------------------------------------------------------------------


class TokenClassifier(nn.Module):
    """Embedding + nn.TransformerEncoder + a classification head: a BERT-like model built
    from torch modules."""

    def __init__(
        self, vocab: int, d: int, heads: int, layers: int, classes: int, length: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos[:, : ids.shape[1]])
        return self.head(h[:, 0])


class TokenDecoder(nn.Module):
    """Embedding + causal nn.TransformerEncoder + a tied LM head: a GPT-like model."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, batch_first=True, activation="gelu", norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: batch × length
        h = self.embed(ids) + self.pos
        return self.lm_head(self.blocks(h, mask=self.mask, is_causal=True))


@dataclass
class TokenModel:
    """A row of the token benchmark: a builder and the token batches it is run on."""

    name: str
    build: Callable[[], nn.Module]
    vocab: int
    batch: int
    length: int


#: rows of ``--part token`` (torch-built token models; Hugging Face ones: ``--part hf``)
TOKEN_MODELS = [
    TokenModel(
        "encoder d256×4 (classifier)",
        lambda: TokenClassifier(8000, 256, 4, 4, 2, 128),
        8000,
        1,
        128,
    ),
    TokenModel(
        "encoder d512×6 (classifier)",
        lambda: TokenClassifier(8000, 512, 8, 6, 2, 128),
        8000,
        1,
        128,
    ),
    TokenModel(
        "decoder d512×6 (LM), 1 token", lambda: TokenDecoder(8000, 512, 8, 6, 1), 8000, 1, 1
    ),
    TokenModel(
        "decoder d2048×1 (LM), 1 token", lambda: TokenDecoder(8000, 2048, 16, 1, 1), 8000, 1, 1
    ),
]


def part_token(repeat: int, tmp: str) -> None:
    from torch.ao.quantization import quantize_dynamic

    print("\n## token models: graphopt vs torch.ao.quantization.quantize_dynamic, batch 1")
    head = f"{'model':30} {'variant':34} {'ms':>7} {'vs fp32':>7} {'vs ao':>6} {'SQNR dB':>8}"
    print(head + f" {'MB':>6} {'float':>5}")
    for spec in TOKEN_MODELS:
        torch.manual_seed(0)
        model = spec.build().eval()
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, spec.vocab, (spec.batch, spec.length), generator=gen)
        data = [(torch.randint(0, spec.vocab, (8, spec.length), generator=gen),) for _ in range(4)]
        test = torch.randint(0, spec.vocab, (16, spec.length), generator=gen)
        variants = {
            "graphopt quant (dynamic)": "quant",
            "graphopt quant(min_sqnr=35)": "quant(min_sqnr=35)",
            "graphopt quant(form=aten)": "quant(form=aten)",
            "graphopt weight_only int8": "quant(mode=weight_only)",
            "graphopt weight_only int4 g128": "quant(mode=weight_only,bits=4)",
            "graphopt int4 g128 all (no target)": "quant(mode=weight_only,bits=4,min_sqnr=0)",
        }
        models: dict[str, Any] = {"fp32": model}
        floats: dict[str, int] = {}
        paths = {"fp32": os.path.join(tmp, "tok_fp32.pt")}
        torch.save(model, paths["fp32"])
        for label, pipe in variants.items():
            paths[label] = os.path.join(tmp, f"tok_{len(paths)}.pt")
            res = graphopt.optimize(
                model, pipe, example_inputs=(ids,), data=data, output=paths[label]
            )
            models[label], floats[label] = res.ir.gm, len(kept_float(res))
        # torch's fast path reads Linear weights, which quantize_dynamic replaces: off for it
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            ao = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
            paths["torch.ao quantize_dynamic"] = os.path.join(tmp, "tok_ao.pt")
            torch.save(ao.state_dict(), paths["torch.ao quantize_dynamic"])
            models["torch.ao quantize_dynamic"] = ao
            with torch.no_grad():
                ref = model(test)
                outs = {k: m(test) for k, m in models.items()}
            t = interleaved({k: no_grad(m, ids) for k, m in models.items()}, repeat)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        ao_t = t["torch.ao quantize_dynamic"]
        for k in models:
            print(
                f"{spec.name:30} {k:34} {t[k] * 1e3:7.2f} {t['fp32'] / t[k]:7.2f} "
                f"{ao_t / t[k]:6.2f} {sqnr_db(ref, outs[k]):8.1f} {file_size(paths[k]) / 1e6:6.1f} "
                f"{floats.get(k, '')!s:>5}"
            )
    print(
        "fp32 timed with torch's fast path off (quantize_dynamic breaks it); 'vs X' = X time / "
        "this time; float = Linears kept in float by the target (default 25 dB)"
    )


# -- part hf -------------------------------------------------------------------------------------

#: the Hugging Face models of ``--part hf`` (``hf:`` sources: random weights, small configs)
#: BERT with 128 labels: the SQNR of 2 logits a sequence measures one draw of the weight
#: rounding more than the method (on it, 7-bit weights beat the finer bounded-pair ones)
HF_MODELS = ["hf:bert?num_hidden_layers=4&num_labels=128", "hf:gpt2?n_layer=2"]


@dataclass
class HFModel:
    """A Hugging Face model as graphopt loads it, with token batches to run it on."""

    spec: str
    module: nn.Module
    names: list[str]
    example: tuple[torch.Tensor, ...]
    calib: list[tuple[torch.Tensor, ...]]  # 4 batches of 1 sequence (calibration, the target)
    test: list[tuple[torch.Tensor, ...]]  # 8 held-out sequences (SQNR)

    def trace(self) -> graphopt.GraphIR:
        return graphopt.GraphIR.trace(
            self.module, self.example, source=self.spec, input_names=self.names
        )

    def call(self, model: Any) -> Callable[..., torch.Tensor]:
        """``model`` (the HF module, torch.ao's copy or a graphopt GraphModule) as a function
        of the positional token inputs returning the logits."""

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            if isinstance(model, torch.fx.GraphModule):
                out = model(*inputs)
            else:
                out = model(**dict(zip(self.names, inputs, strict=True)))
            return logits(out)

        return run


def logits(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (the logits of an HF output or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return logits(out[0])


def hf_model(spec: str, length: int = 128) -> HFModel:
    from graphopt.loading import load_model

    loaded = load_model(spec)
    module = loaded.module.eval()
    names = list(loaded.input_names or ["input_ids"])
    vocab = int(module.config.vocab_size)
    gen = torch.Generator().manual_seed(2)

    def batch() -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        extra = [torch.ones(1, length, dtype=torch.long) for _ in names[1:]]  # attention mask
        return (ids, *extra)

    return HFModel(spec, module, names, batch(), [batch() for _ in range(4)],
                   [batch() for _ in range(8)])  # fmt: skip


def _hf_sqnr(hf: HFModel, model: Any, ref: torch.Tensor) -> float:
    run = hf.call(model)
    with torch.no_grad():
        return sqnr_db(ref, torch.cat([run(*b) for b in hf.test]))


def part_hf(models: list[str], repeat: int, tmp: str) -> None:
    """graphopt's plain ``quant`` (dynamic int8 for token models) against
    ``torch.ao.quantization.quantize_dynamic`` on the same Hugging Face module."""
    from graphopt.passes.quant.expand import linear_modules
    from torch.ao.quantization import quantize_dynamic

    print("\n## Hugging Face token models: graphopt quant vs torch.ao quantize_dynamic, 128 tokens")
    print(
        f"{'model':30} {'variant':38} {'ms':>7} {'vs fp32':>7} {'vs ao':>6} {'SQNR dB':>8} "
        f"{'MB':>6} {'int8 Linears':>12}"
    )
    for spec in models:
        hf = hf_model(spec)
        with torch.no_grad():
            ref = torch.cat([hf.call(hf.module)(*b) for b in hf.test])
        runs: dict[str, Any] = {"fp32": hf.module}
        paths = {"fp32": os.path.join(tmp, "hf_fp32.pt")}
        torch.save(hf.module.state_dict(), paths["fp32"])
        count: dict[str, int] = {}
        for label, pipe in (
            ("graphopt quant", "quant"),
            ("graphopt quant(min_sqnr=0)", "quant(min_sqnr=0)"),  # torch.ao's layers, all int8
            ("graphopt quant(reduce_range=false)", "quant(reduce_range=false)"),
        ):
            paths[label] = os.path.join(tmp, f"hf_{len(paths)}.pt")
            res = graphopt.optimize(hf.trace(), pipe, output=paths[label])
            report = quant_report(res.ir.gm)
            runs[label], count[label] = res.ir.gm, len(report.quantized) if report else 0
        ao = quantize_dynamic(copy.deepcopy(hf.module), {nn.Linear}, dtype=torch.qint8)
        runs["torch.ao quantize_dynamic"] = ao
        linear_like = copy.deepcopy(hf.module)
        if linear_modules(linear_like):  # GPT-2's Conv1D: torch.ao leaves it float
            label = "torch.ao after Conv1D → Linear"
            runs[label] = quantize_dynamic(linear_like, {nn.Linear}, dtype=torch.qint8)
        for label, model in runs.items():
            if label.startswith("torch.ao"):
                paths[label] = os.path.join(tmp, f"hf_{len(paths)}.pt")
                torch.save(model.state_dict(), paths[label])
                count[label] = sum(
                    type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")
                    for m in model.modules()
                )
        x = hf.example
        t = interleaved({k: no_grad(hf.call(m), *x) for k, m in runs.items()}, repeat)
        ao_t = t["torch.ao quantize_dynamic"]
        for k, model in runs.items():
            print(
                f"{spec:30} {k:38} {t[k] * 1e3:7.2f} {t['fp32'] / t[k]:7.2f} {ao_t / t[k]:6.2f} "
                f"{_hf_sqnr(hf, model, ref):8.1f} {file_size(paths[k]) / 1e6:6.1f} "
                f"{count.get(k, '')!s:>12}"
            )
    print(
        "'vs X' = X time / this time (higher is faster); SQNR of the logits on 8 held-out "
        "random sequences; MB: the .pt artifact (torch.ao: its state_dict)"
    )


def _feeds(session: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    return {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}


def ort_quantized_tokens(
    fp32_path: str, calib: list, tmp: str, *, static: bool = True
) -> dict[str, str]:
    """onnxruntime's dynamic (its defaults, and with ``reduce_range``: 7-bit weights) and
    (unless ``static=False``) static (QDQ, per-channel, MinMax) quantization of a token
    model's fp32 export, after its recommended pre-processing."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    session = _session(fp32_path)
    paths = {k: os.path.join(tmp, f"hf_{k.replace(' ', '_')}.onnx") for k in ORT_VARIANTS}
    prepared = os.path.join(tmp, "hf_prepared.onnx")
    ort_pre_process(fp32_path, prepared)
    quantize_dynamic(prepared, paths["ort dynamic"], weight_type=QuantType.QInt8)
    quantize_dynamic(
        prepared, paths["ort dynamic reduce_range"], weight_type=QuantType.QInt8,
        reduce_range=True,
    )  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([_feeds(session, b) for b in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    if not static:
        return {k: v for k, v in paths.items() if k != "ort static"}
    quantize_static(
        prepared, paths["ort static"], Reader(), quant_format=QuantFormat.QDQ, per_channel=True
    )
    return paths


ORT_VARIANTS = ("ort dynamic", "ort dynamic reduce_range", "ort static")
#: graphopt's rows of the ONNX table of ``--part hf``
GRAPHOPT_ONNX = {
    "graphopt quant": "quant",
    "graphopt quant(reduce_range=false)": "quant(reduce_range=false)",
    "graphopt quant(mode=static)": "quant(mode=static)",
}


def part_hf_onnx(models: list[str], repeat: int, tmp: str) -> None:
    """graphopt's int8 ``.onnx`` of a Hugging Face token model (plain ``quant``: dynamic int8
    as ``DynamicQuantizeLinear`` + ``MatMulInteger``; static QDQ for reference, calibrated on
    the same batches as onnxruntime's static quantizer) against onnxruntime's quantizers on
    the same fp32 export."""
    print("\n## Hugging Face token models in onnxruntime: graphopt quant → .onnx vs onnxruntime's")
    print("   quantize_dynamic and quantize_static (QDQ) on the same fp32 export; 128 tokens")
    print(f"{'model':30} {'variant':34} {'ms':>7} {'vs fp32':>7} {'ort dyn/this':>12} "
          f"{'ort stat/this':>13} {'SQNR dB':>8} {'MB':>6}")  # fmt: skip
    for spec in models:
        hf = hf_model(spec)
        with torch.no_grad():
            ref = torch.cat([hf.call(hf.module)(*b) for b in hf.test])
        paths = {"fp32": os.path.join(tmp, "hf_fp32.onnx")}
        graphopt.optimize(hf.trace(), "cleanup", output=paths["fp32"])
        paths.update(ort_quantized_tokens(paths["fp32"], hf.calib, tmp))
        for label, pipe in GRAPHOPT_ONNX.items():
            paths[label] = os.path.join(tmp, f"hf_go_{len(paths)}.onnx")
            graphopt.optimize(hf.trace(), pipe, data=hf.calib, output=paths[label])
        sessions = {k: _session(p) for k, p in paths.items()}
        feeds = {k: _feeds(s, hf.example) for k, s in sessions.items()}
        t = interleaved({k: partial(s.run, None, feeds[k]) for k, s in sessions.items()}, repeat)
        for k, s in sessions.items():
            got = torch.cat([torch.from_numpy(s.run(None, _feeds(s, b))[0]) for b in hf.test])
            print(
                f"{spec:30} {k:34} {t[k] * 1e3:7.2f} {t['fp32'] / t[k]:7.2f} "
                f"{t['ort dynamic'] / t[k]:12.2f} {t['ort static'] / t[k]:13.2f} "
                f"{sqnr_db(ref, got):8.1f} {file_size(paths[k]) / 1e6:6.1f}"
            )
    print(
        "ort dyn/this, ort stat/this: onnxruntime quantize_dynamic's (static's) time / this "
        "time (≥ 1: this is at least as fast); calibration (static rows): the same 4 random "
        "sequences; SQNR of the logits against PyTorch fp32 on 8 held-out ones"
    )


def saturating_matmul_integer() -> type:
    """An ONNX reference-evaluator kernel for ``MatMulInteger`` that computes what a CPU
    without VNNI computes: uint8 × int8 products added two at a time (input positions
    ``k``, ``k+1`` for even ``k``) into a saturating int16 (``vpmaddubsw``), then summed in
    int32; zero points are subtracted afterwards, as onnxruntime's MLAS does. Counts the
    saturated pairs in ``SATURATED``."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    class MatMulInteger(OpRun):  # the class name is the op it replaces
        def _run(self, a, b, a_zero_point=None, b_zero_point=None):  # type: ignore[no-untyped-def]
            lead, k = a.shape[:-1], a.shape[-1]
            x = a.reshape(-1, k).astype(np.float64)
            w = b.astype(np.float64)
            acc = x @ w  # exact: the sums stay far below 2**53
            if k % 2:
                x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
            xe, xo, we, wo = x[:, 0::2], x[:, 1::2], w[0::2], w[1::2]
            # only a pair whose weights sum past 32767 / 255 in magnitude can saturate
            for j in np.nonzero((np.abs(we) + np.abs(wo) > 128).any(1))[0]:
                cols = np.nonzero(np.abs(we[j]) + np.abs(wo[j]) > 128)[0]
                pair = xe[:, j, None] * we[j, cols] + xo[:, j, None] * wo[j, cols]
                fix = np.clip(pair, -32768, 32767) - pair
                acc[:, cols] += fix
                SATURATED[0] += int(np.count_nonzero(fix))
            SATURATED[1] += x.shape[0] * we.size
            az = 0.0 if a_zero_point is None else float(np.asarray(a_zero_point).flat[0])
            acc -= az * w.sum(0)
            if b_zero_point is not None and np.any(b_zero_point):
                bz = np.asarray(b_zero_point, np.float64).reshape(-1)
                acc -= (x.sum(1, keepdims=True) - az * k) * bz
            return (acc.reshape(*lead, -1).astype(np.int32),)

    return MatMulInteger


def gather_elements() -> type:
    """``GatherElements`` for the reference evaluator (onnx 1.23's fails on an axis longer
    than 64: it goes through ``numpy.choose``)."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=None):  # type: ignore[no-untyped-def]
            axis = self.axis if axis is None else axis  # type: ignore[attr-defined]
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    return GatherElements


#: saturated pair sums, pair sums computed (by :func:`saturating_matmul_integer`)
SATURATED = [0, 0]


def part_hf_onnx_avx2(models: list[str], tmp: str) -> None:
    """The dynamic int8 ``.onnx`` files of ``--part hf-onnx`` (graphopt's and onnxruntime's),
    run by onnxruntime on this CPU and by the ONNX reference evaluator with a ``MatMulInteger``
    that saturates as CPUs without VNNI do (AVX2, AVX-512 without VNNI): the SQNR each file
    gives on such a CPU, wherever it is measured."""
    from onnx.reference import ReferenceEvaluator

    kernels = [saturating_matmul_integer(), gather_elements()]
    print("\n## Dynamic int8 ONNX on a CPU without VNNI (int16 pair sums, emulated), 128 tokens")
    print(f"{'model':30} {'variant':34} {'SQNR dB here':>12} {'SQNR dB AVX2':>12} "
          f"{'saturated pairs':>15}")  # fmt: skip
    for spec in models:
        hf = hf_model(spec)
        test = hf.test[:4]
        with torch.no_grad():
            ref = torch.cat([hf.call(hf.module)(*b) for b in test])
        fp32 = os.path.join(tmp, "hf_fp32.onnx")
        graphopt.optimize(hf.trace(), "cleanup", output=fp32)
        paths = ort_quantized_tokens(fp32, hf.calib, tmp, static=False)
        for label, pipe in GRAPHOPT_ONNX.items():
            if "static" not in pipe:
                paths[label] = os.path.join(tmp, f"hf_go_{len(paths)}.onnx")
                graphopt.optimize(hf.trace(), pipe, output=paths[label])
        for label, path in paths.items():
            session = _session(path)
            feeds = [_feeds(session, b) for b in test]
            here = torch.cat([torch.from_numpy(session.run(None, f)[0]) for f in feeds])
            evaluator = ReferenceEvaluator(path, new_ops=kernels)
            SATURATED[:] = [0, 0]
            avx2 = torch.cat([torch.from_numpy(evaluator.run(None, f)[0]) for f in feeds])
            share = SATURATED[0] / max(SATURATED[1], 1)
            print(f"{spec:30} {label:34} {sqnr_db(ref, here):12.1f} {sqnr_db(ref, avx2):12.1f} "
                  f"{share:15.1e}", flush=True)  # fmt: skip
    print(
        "SQNR of the logits against PyTorch fp32 on 4 held-out random sequences; 'here': "
        "onnxruntime on this CPU; 'AVX2': the reference evaluator with int16-saturating pair "
        "sums; saturated pairs: their share of all uint8 × int8 pair sums"
    )


#: the decoder of the weight-only table of ``--part hf`` (a Llama of 0.11 B parameters)
HF_DECODER = (
    "hf:llama?num_hidden_layers=4&hidden_size=1024&intermediate_size=2816&"
    "num_attention_heads=16&num_key_value_heads=4&vocab_size=32000"
)


def part_hf_decode(spec: str, repeat: int, tmp: str) -> None:
    """Weight-only int8/int4 on a Hugging Face decoder, one token and a short prompt, against
    fp32, graphopt's dynamic int8 and ``torch.ao``'s ``quantize_dynamic``."""
    from torch.ao.quantization import quantize_dynamic

    print("\n## Hugging Face decoder: weight-only int8/int4 vs dynamic int8, batch 1")
    print(
        f"{'model':14} {'tokens':>6} {'variant':40} {'ms':>7} {'vs fp32':>7} {'vs ao':>6} "
        f"{'SQNR dB':>8} {'MB':>7}"
    )
    variants = {
        "graphopt quant (dynamic int8)": "quant",
        "graphopt weight_only int8": "quant(mode=weight_only)",
        "graphopt weight_only int4 g128": "quant(mode=weight_only,bits=4)",
        "graphopt weight_only int4 g128 (no target)": "quant(mode=weight_only,bits=4,min_sqnr=0)",
    }
    for length in (1, 16):
        hf = hf_model(spec, length)
        with torch.no_grad():
            ref = torch.cat([hf.call(hf.module)(*b) for b in hf.test])
        runs: dict[str, Any] = {"fp32": hf.module}
        paths = {"fp32": os.path.join(tmp, "dec_fp32.pt")}
        torch.save(hf.module.state_dict(), paths["fp32"])
        for label, pipe in variants.items():
            paths[label] = os.path.join(tmp, f"dec_{len(paths)}.pt")
            runs[label] = graphopt.optimize(hf.trace(), pipe, output=paths[label]).ir.gm
        ao = quantize_dynamic(copy.deepcopy(hf.module), {nn.Linear}, dtype=torch.qint8)
        runs["torch.ao quantize_dynamic"] = ao
        paths["torch.ao quantize_dynamic"] = os.path.join(tmp, "dec_ao.pt")
        torch.save(ao.state_dict(), paths["torch.ao quantize_dynamic"])
        t = interleaved({k: no_grad(hf.call(m), *hf.example) for k, m in runs.items()}, repeat)
        ao_t = t["torch.ao quantize_dynamic"]
        for k, model in runs.items():
            print(
                f"{'llama 4×1024':14} {length:6} {k:40} {t[k] * 1e3:7.2f} "
                f"{t['fp32'] / t[k]:7.2f} {ao_t / t[k]:6.2f} {_hf_sqnr(hf, model, ref):8.1f} "
                f"{file_size(paths[k]) / 1e6:7.1f}"
            )
    print(f"{spec}; SQNR of the logits on 8 held-out random prompts")


def part_hf_ao(repeat: int) -> None:
    """Like for like: graphopt's dynamic int8 with every Linear in int8 (``quant(min_sqnr=0)``:
    the accuracy target off, so the same layers as torch.ao) against torch.ao's
    ``quantize_dynamic`` on the HF module with GPT-2's ``Conv1D`` made ``nn.Linear``; two
    models timed interleaved, so the ratio holds under a shared machine's load."""
    from graphopt.passes.quant.expand import linear_modules
    from torch.ao.quantization import quantize_dynamic

    print("\n## like for like: graphopt quant(min_sqnr=0) vs torch.ao quantize_dynamic, the")
    print("   same Linears in int8 (7-bit activations, fbgemm), batch 1")
    print(f"{'model':30} {'tokens':>6} {'graphopt ms':>11} {'torch.ao ms':>11} {'ao/go':>6} "
          f"{'SQNR go':>8} {'SQNR ao':>8}")  # fmt: skip
    for spec, length in (
        (HF_MODELS[0], 128),
        (HF_MODELS[1], 128),
        (HF_DECODER, 1),
        (HF_DECODER, 16),
    ):
        hf = hf_model(spec, length)
        with torch.no_grad():
            ref = torch.cat([hf.call(hf.module)(*b) for b in hf.test])
        go = graphopt.optimize(hf.trace(), "quant(min_sqnr=0)").ir.gm
        same = copy.deepcopy(hf.module)
        linear_modules(same)
        ao = quantize_dynamic(same, {nn.Linear}, dtype=torch.qint8)
        runs = {"go": go, "ao": ao}
        t = interleaved({k: no_grad(hf.call(m), *hf.example) for k, m in runs.items()}, repeat)
        name = "llama 4×1024" if spec == HF_DECODER else spec
        print(
            f"{name:30} {length:6} {t['go'] * 1e3:11.2f} {t['ao'] * 1e3:11.2f} "
            f"{t['ao'] / t['go']:6.3f} {_hf_sqnr(hf, go, ref):8.1f} {_hf_sqnr(hf, ao, ref):8.1f}"
        )
    print("ao/go = torch.ao time / graphopt time (≥ 1: graphopt at least as fast)")


# -- part digits ---------------------------------------------------------------------------------


def part_digits() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from quant_digits import accuracy, digits_data, train

    x, y, train_idx, test_idx = digits_data()
    model = train(x, y, train_idx)
    calib = [(x[train_idx[i : i + 64]],) for i in range(0, 640, 64)]
    labelled = [(x[train_idx[i : i + 64]], y[train_idx[i : i + 64]]) for i in range(0, 640, 64)]
    example = (x[test_idx[:1]],)
    base = accuracy(model, x[test_idx], y[test_idx])
    print("\n## real data: scikit-learn digits CNN, accuracy on 397 held-out images")
    print(f"{'model':34} {'accuracy %':>10} {'drop':>6}")
    print(f"{'float':34} {base:10.2f} {0:6.2f}")
    for label, pipe, data in (
        ("fold,quant", "fold,quant", calib),
        ("fold,quant(max_drop=0.5)", "fold,quant(max_drop=0.5)", labelled),
    ):
        gm = graphopt.optimize(model, pipe, example_inputs=example, data=data).ir.gm
        acc = accuracy(gm, x[test_idx], y[test_idx])
        print(f"{label:34} {acc:10.2f} {base - acc:6.2f}")


# -- part sqnr -----------------------------------------------------------------------------------


def part_sqnr(models: list[str], tmp: str) -> None:
    print("\n## plain quant → .pt: output SQNR against fp32 and artifact size")
    print(
        f"{'model':16} {'res':>4} {'SQNR dB':>8} {'top-1 agree':>11} {'fp32 MB':>8} "
        f"{'int8 MB':>8} {'size':>6} {'float':>5} {'quant s':>13}  most sensitive op"
    )
    for arch in models:
        res = 224 if arch.startswith("vit") else 96
        model = build(arch, res)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        test = held_out(res, 8)
        calib = calibration(res, 4, 4)
        fp32_path, int8_path = os.path.join(tmp, f"{arch}.pt"), os.path.join(tmp, f"{arch}8.pt")
        graphopt.optimize(model, "fold", example_inputs=(x,), output=fp32_path)
        start = time.perf_counter()
        graphopt.optimize(model, "fold,quant(min_sqnr=0)", example_inputs=(x,), data=calib)
        off_s = time.perf_counter() - start
        start = time.perf_counter()
        result = graphopt.optimize(model, "fold,quant", example_inputs=(x,), data=calib)
        on_s = time.perf_counter() - start
        graphopt.lower(
            result.ir.gm, (x,), int8_path, result.metadata(), graphopt.get_registry().exporters
        )
        report = quant_report(result.ir.gm)
        worst = report.sensitivity[0] if report and report.sensitivity else None
        with torch.no_grad():
            ref, got = model(test), result.ir.gm(test)
        agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
        a, b = file_size(fp32_path) / 1e6, file_size(int8_path) / 1e6
        note = f"{worst.node} ({worst.op}) {worst.sqnr_db:.1f} dB" if worst else ""
        print(
            f"{arch:16} {res:4} {sqnr_db(ref, got):8.1f} {agree:11.2f} {a:8.1f} {b:8.1f} "
            f"{a / b:5.1f}× {len(kept_float(result)):5} {off_s:6.1f} {on_s:6.1f}  {note}"
        )
    print("quant s: fold,quant(min_sqnr=0) then fold,quant (the default 25 dB target)")


def cpu_name() -> str:
    """The CPU model and whether it has VNNI (int8 dot products without int16 saturation)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = set(
        next(
            (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
        )
    )
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return f"{name}, {'VNNI: ' + ' '.join(vnni) if vnni else 'no VNNI'}"


PARTS = (
    "torch", "vit", "onnx", "target", "token", "hf", "hf-onnx", "hf-onnx-avx2", "hf-ao",
    "digits", "sqnr",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-sqnr", type=float, default=30.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, graphopt "
        f"{graphopt.__version__}; {cpu_name()}; torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.part:
            if part == "torch":
                part_torch(
                    args.models or ["resnet18", "resnet50"], args.resolution, args.repeat, tmp
                )
            elif part == "vit":
                part_vit(args.models or ["vit_b_16", "timm:deit_small_patch16_224"], args.repeat)
            elif part == "onnx":
                part_onnx(args.models or ["resnet18", "resnet50", "vit_b_16"], args.repeat, tmp)
            elif part == "target":
                five = [
                    "resnet50",
                    "mobilenet_v3_large",
                    "efficientnet_b0",
                    "vit_b_16",
                    "convnext_tiny",
                ]
                part_target(args.models or five, args.min_sqnr, args.repeat)
            elif part == "token":
                part_token(args.repeat, tmp)
            elif part == "hf":
                part_hf(args.models or HF_MODELS, args.repeat, tmp)
                part_hf_decode(HF_DECODER, args.repeat, tmp)
            elif part == "hf-onnx":
                part_hf_onnx(args.models or HF_MODELS, args.repeat, tmp)
            elif part == "hf-onnx-avx2":
                part_hf_onnx_avx2(args.models or HF_MODELS, tmp)
            elif part == "hf-ao":
                part_hf_ao(args.repeat)
            elif part == "digits":
                part_digits()
            else:
                five = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16"]
                part_sqnr(args.models or five, tmp)


if __name__ == "__main__":
    main()
