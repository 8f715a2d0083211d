"""A model's int8-everywhere file against its float file, as a study writes them (prints figures;
asserts nothing).

    python benchmarks/int8_vs_fp32.py [--model vit-ti|convnext] [--rounds 40]

``vit-ti``: ViT-Ti/16 (torchvision's ``VisionTransformer``: 224×224 images, 12 blocks, hidden 192,
3 heads, MLP 768). ``convnext``: a small torchvision ``ConvNeXt`` (96×96 images, stages of 48, 96,
192 and 384 channels, 2/2/4/2 blocks), whose pointwise Linear layers run on 4-D tensors (MatMuls).
Random weights (ViT's classifier too, which torchvision starts at zero). Each is exported as a
candidate with every layer planned at int8, through the same code a trial runs. It prints what the
file holds (Q/DQ, integer MatMuls), how close its logits are to PyTorch's float model on a random
image (cosine), and both files' median latency on ONNX Runtime's CPU provider, one thread, the two
sessions timed in turn.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

from profilers import cpu_info, disabled_optimizers
from search.artifacts import export_candidate, export_float
from search.compress import apply_plan, bake
from search.model import compressible_layers
from search.plan import LayerPlan, Plan, Quantization


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers())
    )


def _model(name: str) -> tuple[torch.nn.Module, int]:
    """The model and its image size."""
    if name == "convnext":
        widths, depths = (48, 96, 192, 384), (2, 2, 4, 2)
        stages = [CNBlockConfig(c, n, d) for c, n, d in zip(widths, (*widths[1:], None), depths)]
        return ConvNeXt(stages, num_classes=100).eval(), 96
    model = VisionTransformer(224, 16, 12, 3, 192, 768, num_classes=1000).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model, 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("vit-ti", "convnext"), default="vit-ti")
    parser.add_argument("--rounds", type=int, default=40, help="Runs of each file, taken in turn.")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    info = cpu_info()
    isa = ", ".join(info["isa"]) or "none listed"
    print(f"machine: {info['cpu']}, ISA {isa}; ONNX Runtime {ort.__version__}, 1 thread")
    torch.manual_seed(0)
    model, size = _model(args.model)
    image = torch.randn(1, 3, size, size)
    plan = Plan(layers={name: LayerPlan(quantization=Quantization(8)) for name in compressible_layers(model)})
    calibration = [(torch.randn(1, 3, size, size), None) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": Path(tmp, "fp32.onnx"), "int8": Path(tmp, "int8.onnx")}
        export_float(model, image, files["fp32"])
        candidate = bake(apply_plan(model, plan, image))
        exported = export_candidate(
            candidate, image, files["int8"], plan=plan, precisions=["fp32", "int8"], calibration=calibration
        )
        ops = collections.Counter(node.op_type for node in onnx.load(str(files["int8"])).graph.node)
        int8 = sum(precision == "int8" for precision in exported.layer_precision.values())
        shown = ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMul")
        counts = ", ".join(f"{op} {ops[op]}" for op in shown)
        print(f"int8 file: {int8} of {len(exported.layer_precision)} layers at int8; {counts}")
        sessions = {name: _session(path) for name, path in files.items()}
        feeds = {name: {s.get_inputs()[0].name: image.numpy()} for name, s in sessions.items()}
        with torch.no_grad():
            reference = model(image).numpy().ravel()
        logits = sessions["int8"].run(None, feeds["int8"])[0].ravel()
        cosine = float(logits @ reference / np.linalg.norm(logits) / np.linalg.norm(reference))
        print(f"int8 file against PyTorch's float model: cosine of the logits {cosine:.4f}")
        for name, session in sessions.items():
            for _ in range(5):
                session.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
    fp32, quantized = (1000 * float(np.median(times[name])) for name in ("fp32", "int8"))
    print(f"fp32 {fp32:.2f} ms, int8 {quantized:.2f} ms: int8 runs {fp32 / quantized:.2f}x the float file's speed")


if __name__ == "__main__":
    main()
