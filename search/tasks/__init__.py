"""What gets compressed: :class:`Task` (a trained teacher, its data and how it is scored),
:func:`load_task` for ``module:function`` specs, and the built-in tasks. ``digits`` is the
default: it needs no download and trains its teacher on first use. ``motifs`` is a Conv1d
classifier whose teacher is not over-sized for its task (a half-width student loses points).
``minilm`` compresses the pretrained all-MiniLM-L6-v2 sentence encoder on sentence corpora that
ship with this package.

Names load on first use (PEP 562): :data:`DEFAULT_TASK` and :data:`METRIC_WINDOW` without PyTorch."""

from search._lazy import lazy_names
from search.tasks._default import DEFAULT_TASK, METRIC_WINDOW

__getattr__, __dir__, _LAZY_NAMES = lazy_names(
    __name__,
    {
        "search.tasks._digits": ("TEACHER_VERSION", "digits", "digits_cnn"),
        "search.tasks._minilm": (
            "MINILM_FINETUNE", "MINILM_SEQ_LEN", "CosineToReference", "SentenceEmbedder", "minilm", "read_sentences",
        ),
        "search.tasks._motifs": ("motif_signals", "motifs", "motifs_cnn"),
        "search.tasks._task": ("Metric", "Task", "load_task", "top1_accuracy"),
    },
)  # fmt: skip
__all__ = sorted([*_LAZY_NAMES, "DEFAULT_TASK", "METRIC_WINDOW"])
