"""What gets compressed: :class:`Task` (a trained teacher, its data and how it is scored),
:func:`load_task` for ``module:function`` specs, and the built-in tasks. ``digits`` is the
default: it needs no download and trains its teacher on first use. ``motifs`` is a Conv1d
classifier whose teacher is not over-sized for its task (a half-width student loses points).
``minilm`` compresses the pretrained all-MiniLM-L6-v2 sentence encoder on sentence corpora that
ship with this package."""

from search.tasks._digits import TEACHER_VERSION, digits, digits_cnn
from search.tasks._minilm import (
    MINILM_FINETUNE,
    MINILM_SEQ_LEN,
    CosineToReference,
    SentenceEmbedder,
    minilm,
    read_sentences,
)
from search.tasks._motifs import motif_signals, motifs, motifs_cnn
from search.tasks._task import DEFAULT_TASK, Metric, Task, load_task, top1_accuracy

__all__ = [
    "DEFAULT_TASK",
    "MINILM_SEQ_LEN",
    "MINILM_FINETUNE",
    "TEACHER_VERSION",
    "CosineToReference",
    "Metric",
    "SentenceEmbedder",
    "Task",
    "digits",
    "digits_cnn",
    "load_task",
    "minilm",
    "motif_signals",
    "motifs",
    "motifs_cnn",
    "read_sentences",
    "top1_accuracy",
]
