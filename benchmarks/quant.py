"""graphopt's int8 quantization against torch.ao.quantization and onnxruntime, in one run.

Part 1 (``--part torch``): for resnet18 and resnet50 (weights=None, BatchNorm statistics
randomised, the same calibration batches for both), graphopt ``fold,quant`` against
torch.ao's ``prepare_fx``/``convert_fx`` with the x86 qconfig: eager CPU latency as a ratio
to fp32 (batch 1, one thread, timed interleaved), output SQNR against fp32 on held-out
inputs, and artifact size against fp32.

Part 2 (``--part onnx``): graphopt ``quant(form=qdq)`` exported to ONNX and run in
onnxruntime, against onnxruntime running the fp32 model: latency ratio, SQNR against the
PyTorch fp32 output and against graphopt's default PyTorch int8 output (fbgemm), for each
QDQ variant (uint8 or int8 activations, 7- or 8-bit activation range).

Part 3 (``--part sqnr``): int8 output SQNR and artifact size for resnet18, resnet50,
mobilenet_v2, efficientnet_b0 and vit_b_16.

    python benchmarks/quant.py                       # all parts
    python benchmarks/quant.py --part onnx --models resnet18

Calibration data here is random normal images (no pretrained weights or image data are
available offline), so absolute SQNR figures are for that setting; the comparison with the
peer uses exactly the same data.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from graphopt.passes.quant import sqnr_db

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import randomize_bn

warnings.filterwarnings("ignore")


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()
    for m in model.modules():  # vit_b_16's head starts at zero: every output would be 0
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    return model


def calibration(res: int, n: int, batch: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, res, res, generator=gen),) for _ in range(n)]


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeat):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def file_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return os.path.getsize(path)


def torch_ao_int8(model: torch.nn.Module, x: torch.Tensor, calib: list) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for (batch,) in calib:
            prepared(batch)
    return convert_fx(prepared)


def part_torch(models: list[str], res: int, repeat: int, tmp: str) -> None:
    print(f"\n## PyTorch eager int8 vs torch.ao.quantization (x86 qconfig), {res}×{res}, batch 1")
    print(f"engine {torch.backends.quantized.engine}, {torch.get_num_threads()} thread(s)")
    header = (
        f"{'model':10} {'fp32 ms':>8} {'graphopt ms':>12} {'ratio':>6} {'torch.ao ms':>12} "
        f"{'ratio':>6} {'go/ao':>6} {'SQNR go':>8} {'SQNR ao':>8} {'fp32 MB':>8} "
        f"{'go MB':>6} {'ao MB':>6}"
    )
    print(header)
    for arch in models:
        model = build(arch)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        test = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(9))
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
        with torch.no_grad():
            ref = model(test)
            s_go, s_ao = sqnr_db(ref, go(test)), sqnr_db(ref, ao(test))
            t = interleaved(
                {
                    "fp32": partial(model, x),
                    "go": partial(go, x),
                    "ao": partial(ao, x),
                },
                repeat,
            )
        mb = [file_size(p) / 1e6 for p in (fp32_path, go_path, ao_path)]
        print(
            f"{arch:10} {t['fp32'] * 1e3:8.1f} {t['go'] * 1e3:12.1f} {t['fp32'] / t['go']:6.2f} "
            f"{t['ao'] * 1e3:12.1f} {t['fp32'] / t['ao']:6.2f} {t['ao'] / t['go']:6.2f} "
            f"{s_go:8.1f} {s_ao:8.1f} {mb[0]:8.1f} {mb[1]:6.1f} {mb[2]:6.1f}"
        )
    print("ratio = fp32 time / int8 time (higher is faster); go/ao = torch.ao time / graphopt time")


def _session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


VARIANTS = {
    "U8S8, 7-bit act (default)": "quant(form=qdq,sensitivity=false)",
    "S8S8, 7-bit act": "quant(form=qdq,onnx_int8=true,sensitivity=false)",
    "U8S8, 8-bit act": "quant(form=qdq,reduce_range=false,sensitivity=false)",
    "S8S8, 8-bit act": "quant(form=qdq,onnx_int8=true,reduce_range=false,sensitivity=false)",
}


def part_onnx(models: list[str], res: int, repeat: int, tmp: str) -> None:
    print(f"\n## ONNX QDQ in onnxruntime vs onnxruntime fp32, {res}×{res}, batch 1, 1 thread")
    print(
        f"{'model':10} {'variant':26} {'ort fp32 ms':>11} {'ort int8 ms':>11} {'speedup':>7} "
        f"{'SQNR vs fp32':>12} {'SQNR vs pt int8':>15} {'MB':>6}"
    )
    for arch in models:
        model = build(arch)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        calib = calibration(res, 8, 4)
        fp32_path = os.path.join(tmp, f"{arch}_fp32.onnx")
        graphopt.optimize(model, "fold", example_inputs=(x,), output=fp32_path)
        pt_int8 = graphopt.optimize(
            model, "fold,quant(sensitivity=false)", example_inputs=(x,), data=calib
        ).ir.gm
        with torch.no_grad():
            ref, ref_int8 = model(x), pt_int8(x)
        fp32 = _session(fp32_path)
        for label, pipeline in VARIANTS.items():
            path = os.path.join(tmp, f"{arch}_{abs(hash(label))}.onnx")
            graphopt.optimize(
                model, f"fold,{pipeline}", example_inputs=(x,), data=calib, output=path
            )
            int8 = _session(path)
            got = _run(int8, x)
            t = interleaved(
                {
                    "fp32": partial(_run, fp32, x),
                    "int8": partial(_run, int8, x),
                },
                repeat,
            )
            print(
                f"{arch:10} {label:26} {t['fp32'] * 1e3:11.1f} {t['int8'] * 1e3:11.1f} "
                f"{t['fp32'] / t['int8']:7.2f} {sqnr_db(ref, got):12.1f} "
                f"{sqnr_db(ref_int8, got):15.1f} {file_size(path) / 1e6:6.1f}"
            )
        print(f"{arch:10} fp32 onnx size {file_size(fp32_path) / 1e6:.1f} MB")


def part_sqnr(models: list[str], tmp: str) -> None:
    print("\n## int8 output SQNR against fp32 and artifact size (graphopt fold,quant → .pt)")
    print(
        f"{'model':16} {'res':>4} {'SQNR dB':>8} {'top-1 agree':>11} {'fp32 MB':>8} "
        f"{'int8 MB':>8} {'size':>6}  most sensitive op"
    )
    for arch in models:
        res = 224 if arch.startswith("vit") else 96
        model = build(arch)
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(7))
        test = torch.randn(8, 3, res, res, generator=torch.Generator().manual_seed(9))
        calib = calibration(res, 4, 4)
        fp32_path, int8_path = os.path.join(tmp, f"{arch}.pt"), os.path.join(tmp, f"{arch}8.pt")
        graphopt.optimize(model, "fold", example_inputs=(x,), output=fp32_path)
        result = graphopt.optimize(
            model, "fold,quant", example_inputs=(x,), data=calib, output=int8_path
        )
        from graphopt.passes.quant import quant_report

        report = quant_report(result.ir.gm)
        worst = report.sensitivity[0] if report and report.sensitivity else None
        with torch.no_grad():
            ref, got = model(test), result.ir.gm(test)
        agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
        a, b = file_size(fp32_path) / 1e6, file_size(int8_path) / 1e6
        note = f"{worst.node} ({worst.op}) {worst.sqnr_db:.1f} dB" if worst else ""
        print(
            f"{arch:16} {res:4} {sqnr_db(ref, got):8.1f} {agree:11.2f} {a:8.1f} {b:8.1f} "
            f"{a / b:5.1f}×  {note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["torch", "onnx", "sqnr", "all"], default="all")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, graphopt {graphopt.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("torch", "all"):
            part_torch(args.models or ["resnet18", "resnet50"], args.resolution, args.repeat, tmp)
        if args.part in ("onnx", "all"):
            part_onnx(args.models or ["resnet18"], args.resolution, args.repeat, tmp)
        if args.part in ("sqnr", "all"):
            five = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16"]
            part_sqnr(args.models or five, tmp)


if __name__ == "__main__":
    main()
