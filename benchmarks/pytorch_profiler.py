"""What the PyTorch profiler measures for uniform plans, on a GPU (``gpu``) or any pytorch target.

    python benchmarks/pytorch_profiler.py [--target gpu] [--compile-mode reduce-overhead]

For the default task's teacher, a torchvision ResNet-18 (random weights, 224×224) and a
BERT-base-sized encoder from a ``transformers`` config (random weights, 128 tokens): the model
as it is (the target's float precision), every Linear at int8, and every Linear at 2:4 with its
weights pruned 2:4. Prints each measurement's latency, precision, energy and notes; asserts
nothing. With TensorRT installed, the gpu target is measured by TensorRT instead, and this script
stops: it is about the PyTorch path.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn


def _models() -> dict[str, tuple[nn.Module, object]]:
    import torchvision

    from search.tasks import digits

    task = digits()
    models = {
        "digits CNN": (task.model, task.example_input),
        "ResNet-18": (torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)),
    }
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: the encoder is left out")
        return models
    config = transformers.BertConfig(attn_implementation="eager")  # BERT-base sizes
    ids = torch.randint(0, config.vocab_size, (1, 128))
    models["BERT-base encoder"] = (
        transformers.BertModel(config, add_pooling_layer=False).eval(),
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
    )
    return models


def _plans(model: nn.Module) -> dict[str, object]:
    from search import LayerPlan, Plan, Quantization, WeightSparsity

    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "as is": Plan(),
        "int8 Linear": Plan(layers={n: LayerPlan(quantization=Quantization(8)) for n in linears}),
        "2:4 Linear": Plan(layers={n: LayerPlan(sparsity=WeightSparsity(0.5, "2:4")) for n in linears}),
    }


def _candidate(model: nn.Module, plan, example) -> nn.Module:
    """The model with the plan applied and baked, as the search hands a candidate to the profiler
    (2:4 layers pruned 2:4 by magnitude, int8 weights on the int8 grid)."""
    from search import apply_plan
    from search.compress import bake

    return bake(apply_plan(model, plan, example))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="gpu")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode, or 'none' for eager")
    args = parser.parse_args()

    from profilers import PyTorchProfiler, get_profiler
    from search.artifacts import measure_candidate
    from targets import load_target

    profiler = get_profiler(load_target(args.target))
    if not isinstance(profiler, PyTorchProfiler):
        raise SystemExit(f"target {args.target} is measured by {profiler.runtime} here, not PyTorch")
    profiler.compile_mode = None if args.compile_mode == "none" else args.compile_mode
    unused = Path(tempfile.gettempdir()) / "unused.onnx"  # this profiler measures the module
    for model_name, (model, example) in _models().items():
        baseline = None
        for plan_name, plan in _plans(model).items():
            m = measure_candidate(profiler, unused, _candidate(model, plan, example), example, plan)
            if baseline is None:
                baseline = m.latency_ms
                device = {k: v for k, v in m.device.items() if k not in ("layer_precision", "notes")}
                print(f"{model_name}: {m.runtime}, {m.runtime_version}, compile mode {profiler.compile_mode}; "
                      f"device: {device}")  # fmt: skip
            notes = sorted({note.split(": ", 1)[1] for note in m.device["notes"]})
            print(f"{model_name:18s} {plan_name:12s} {m.latency_ms:8.4f} ms (p90 {m.latency_p90_ms:.4f}, "
                  f"{baseline / m.latency_ms:4.2f}×, spread {m.spread:.1%}, {m.runs} runs) precision {m.precision}; "
                  f"energy {m.energy_mj:.3f} mJ ({m.energy_source}); notes: {notes[:3] or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
