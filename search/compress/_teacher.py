"""The teacher's outputs on training batches, remembered across the fine-tunes of one process."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from search.model import Inputs, Output, call, reduce_output, tensors

TEACHER_CACHE_BYTES = 256 * 2**20


class TeacherOutputs:
    """``teacher``'s outputs (reduced by ``output``) on a batch of inputs, each remembered by the
    batch's content while they fit in ``max_bytes``.

    Every fine-tune of a study draws the same batches in the same order (a fine-tune's draws are
    its seed's), so from the second one on the teacher is not run again: its forward pass was
    17–65 % of a fine-tune step, the more the smaller the student (benchmarks/teacher_outputs.py,
    figures in benchmarks/RESULTS.md). Batches that never repeat (random augmentation) find
    nothing, at the cost of a digest of their inputs each (47 ms for 64 float images of 224 × 224
    on 2 vCPUs). ``max_bytes=0``: nothing is remembered, the teacher runs on every batch.
    """

    def __init__(
        self, teacher: nn.Module, output: Output | None = None, max_bytes: int = TEACHER_CACHE_BYTES
    ) -> None:
        self.teacher, self.output, self.max_bytes = teacher, output, max_bytes
        self.hits = self.bytes = 0
        self._stored: dict[bytes, torch.Tensor] = {}

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        key = None
        if self.max_bytes > 0:
            key = _fingerprint(inputs)
            if key in self._stored:
                self.hits += 1
                return self._stored[key].clone()  # a task's loss may change its arguments in place
        self.teacher.eval()
        with torch.no_grad():
            out = reduce_output(call(self.teacher, inputs), self.output).detach()
        size = out.numel() * out.element_size()
        if key is not None and self.bytes + size <= self.max_bytes:
            self._stored[key] = out.clone()  # its own storage (not a view of the whole output), kept as it was
            self.bytes += size
        return out


def _fingerprint(inputs: Inputs) -> bytes:
    """A digest of the inputs' form, names, shapes, types and values."""
    digest = hashlib.blake2b(digest_size=16)
    names = list(inputs) if isinstance(inputs, Mapping) else [type(inputs).__name__]
    digest.update(repr(names).encode())
    for tensor in tensors(inputs):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.digest()
