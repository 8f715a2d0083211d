"""What the profiler service refuses, and that it stays up and small doing so: timing above its
limits, uploads over the size limit (streamed to disk), a full queue, models declaring more memory
than allowed, clients that leave mid-measurement, SIGTERM mid-measurement, paths in errors, and
a load of concurrent clients mixing all of these. Loopback only; each test takes seconds."""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from loopback import TOKEN, memory_kib, serving, serving_process
from profilers import (
    MeasurementError,
    OnnxRuntimeCpuProfiler,
    ProfilerUsageError,
    RemoteProfiler,
    ServiceLimits,
    create_app,
)
from profilers._service import declared_bytes
from targets import load_target
from test_profilers import SHORT, two_matmuls
from test_service import Recording

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ServiceLimits(max_bytes=2**20, max_model_memory=64 * 2**20, max_time_s=30, max_sessions=3,
                       max_queue=1, upload_idle_s=0.5)  # fmt: skip
# The service's own timing: one short session, so a busy service says to retry after 1 s.
SERVICE_TIMING = {**SHORT, "sessions": 1}


# --- Models a hostile or careless client might send ---------------------------------------------


def _save(path, nodes, inputs, outputs, initializers=(), opsets=(("", 17),)):
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def huge_input(path, side=12000):
    """A model of about a hundred bytes whose input alone would take side x side floats."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])
    return _save(path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y])


def huge_intermediate(path, side=20000):
    """A small input, and a ConstantOfShape that would fill side x side floats from a constant shape."""
    shape = numpy_helper.from_array(np.array([side, side], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _save(path, nodes, [x], [y], [shape])


def custom_op(path):
    """Valid ONNX that ONNX Runtime cannot build (an op of an unknown domain)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    return _save(path, [node], [x], [y], opsets=(("", 17), ("com.example", 1)))


def dangling_input(path):
    """A graph the ONNX checker refuses: its node reads a tensor nothing defines."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return _save(path, [helper.make_node("Add", ["x", "nowhere"], ["y"])], [x], [y])


def external_weights(path):
    """A model whose weight lives in a side file next to it."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        "valid": two_matmuls(folder / "valid.onnx"),
        "huge-input": huge_input(folder / "huge-input.onnx"),
        "huge-intermediate": huge_intermediate(folder / "huge-intermediate.onnx"),
        "custom-op": custom_op(folder / "custom-op.onnx"),
        "dangling": dangling_input(folder / "dangling.onnx"),
        "external": external_weights(folder / "external.onnx"),
    }


@pytest.fixture(scope="module")
def recording():
    return Recording(load_target("cpu"), **SERVICE_TIMING)


@pytest.fixture(scope="module")
def address(recording):
    with serving(recording, limits=LIMITS) as (_, address):
        yield address


def client(address, **timing):
    return RemoteProfiler(load_target("cpu"), address, TOKEN, **{**SHORT, **timing})


def post(address, content=b"", **kwargs):
    headers = {**AUTH, "Content-Type": "application/octet-stream", **kwargs.pop("headers", {})}
    return httpx.post(f"http://{address}/measure", content=content, headers=headers, timeout=30, **kwargs)


def queue(address):
    return httpx.get(f"http://{address}/health", headers=AUTH).json()["queue"]


def wait_until(condition, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def measuring_forever(address, model, seconds=20):
    """A raw connection whose request asks for ``seconds`` of timing, open while the service
    measures it; yields the socket (close it to leave)."""
    host, port = address.split(":")
    body = model.read_bytes()
    query = f"name=slow.onnx&sessions=1&min_time_s={seconds}&max_time_s={seconds}&warmup_s=0"
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.sendall(
        f"POST /measure?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    try:
        wait_until(lambda: queue(address)["measuring"] == 1)
        yield raw
    finally:
        raw.close()


# --- Timing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knob, value, allowed",
    [("max_time_s", "1e9", "0 to 30 (set by search serve --max-time-s)"),
     ("min_time_s", "31", "0 to 30 (set by search serve --max-time-s)"),
     ("warmup_s", "100", "0 to 30 (set by search serve --max-time-s)"),
     ("sessions", "1000", "1 to 3 (set by search serve --max-sessions)")],
)  # fmt: skip
def test_timing_above_the_service_limit_is_refused_naming_the_option_and_range(address, models, knob, value, allowed):
    response = post(address, models["valid"].read_bytes(), params={knob: value})
    assert response.status_code == 400
    assert response.json()["detail"] == f"timing parameter {knob}={value!r}: this service allows {allowed}"
    timing = {knob: int(value) if knob == "sessions" else float(value)}
    if knob == "min_time_s":
        timing["max_time_s"] = timing["min_time_s"]  # the client's own rule: min_time_s <= max_time_s
    with pytest.raises(MeasurementError, match=rf"\(400\): timing parameter {knob}=.*this service allows {allowed[:6]}"):
        client(address, **timing).measure(models["valid"])
    assert client(address).measure(models["valid"]).latency_ms > 0


def test_a_client_asking_more_than_the_limits_is_stopped_by_its_check(address):
    with pytest.raises(ProfilerUsageError, match=r"max_time_s=100 \(at most 30, search serve --max-time-s\)"):
        client(address, max_time_s=100).check()
    with pytest.raises(ProfilerUsageError, match=r"sessions=5 \(at most 3, search serve --max-sessions\)"):
        client(address, sessions=5).check()
    assert client(address).check()["limits"]["max_time_s"] == 30


def test_the_service_refuses_to_start_with_its_own_timing_above_its_limits():
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), max_time_s=10)
    with pytest.raises(ProfilerUsageError, match="own max_time_s=10 is above its limit --max-time-s 5"):
        create_app(profiler, "t", ServiceLimits(max_time_s=5))
    with pytest.raises(ProfilerUsageError, match=r"max_queue=-1"):
        ServiceLimits(max_queue=-1)


# --- A client that leaves, a service told to stop -----------------------------------------------


def test_a_measurement_whose_client_left_is_cancelled(address, models, recording, caplog):
    recording.intervals.clear()
    with caplog.at_level(logging.INFO, logger="profilers._service"):
        started = time.monotonic()
        with measuring_forever(address, models["valid"], seconds=20):
            time.sleep(0.3)
        wait_until(lambda: queue(address) == {"measuring": 0, "waiting": 0}, timeout_s=5)
        assert time.monotonic() - started < 6  # not the 20 s it asked for
        wait_until(lambda: "slow.onnx was cancelled: its client disconnected" in caplog.text, timeout_s=5)
    (start, end), = recording.intervals
    assert end - start < 5
    assert client(address).measure(models["valid"]).latency_ms > 0


def test_sigterm_stops_the_service_within_seconds_mid_measurement(tmp_path, models):
    with serving_process(tmp_path, {"max_time_s": 600}, **SERVICE_TIMING) as (process, address):
        answers = []
        query = {"min_time_s": 600, "max_time_s": 600, "sessions": 1, "name": "slow.onnx"}
        thread = threading.Thread(target=lambda: answers.append(post(address, models["valid"].read_bytes(), params=query)))
        thread.start()
        wait_until(lambda: queue(address)["measuring"] == 1)
        time.sleep(0.3)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        stopped_s = time.monotonic() - sent
        thread.join(10)
    print(f"stopped {stopped_s:.2f} s after SIGTERM")
    assert stopped_s < 5, stopped_s
    assert process.returncode == -signal.SIGTERM  # uvicorn re-raises the signal once shut down
    (answer,) = answers
    assert answer.status_code == 503 and answer.json()["detail"] == "the profiler service is stopping"
    # The upload's folder and ONNX Runtime's are gone (a dot-file of the environment may be there).
    assert not [path.name for path in (tmp_path / "tmp").iterdir() if not path.name.startswith(".")]


# --- Uploads and the queue ----------------------------------------------------------------------


def test_an_upload_over_the_limit_is_refused_as_it_streams(address, models):
    sent = []

    def chunks():  # 64 MiB, without a Content-Length: only the stream tells the size
        for _ in range(1024):
            sent.append(65536)
            yield b"\0" * 65536

    try:
        response = post(address, chunks())
        assert response.status_code == 413
        assert response.json()["detail"].startswith(f"the model is over {2**20} bytes")
    except httpx.TransportError:  # the service may close before httpx reads the answer
        pass
    assert sum(sent) < 16 * 2**20  # it stopped reading at the limit, not at the end
    assert client(address).measure(models["valid"]).latency_ms > 0


def test_a_stalled_upload_gives_its_place_back(address, models):
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            b"POST /measure HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 1000
        )
        answer = b""
        while b"bytes" not in answer and (data := raw.recv(4096)):
            answer += data
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "the upload stalled for 0.5 s after 1000 bytes" in answer
    assert queue(address) == {"measuring": 0, "waiting": 0}


def test_a_full_queue_answers_503_with_retry_after(address, models):
    with measuring_forever(address, models["valid"], seconds=20):
        # LIMITS.max_queue is 1: one more may wait, the next is refused at once.
        waiting = threading.Thread(target=lambda: client(address).measure(models["valid"]))
        waiting.start()
        wait_until(lambda: queue(address)["waiting"] == 1)
        started = time.monotonic()
        response = post(address, models["valid"].read_bytes())
        assert time.monotonic() - started < 2
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"  # one session of at most 1 s
        assert "busy: one model is measured and 1 wait" in response.json()["detail"]
    waiting.join(30)  # the one waiting is measured once the slow one has gone
    assert not waiting.is_alive()
    assert client(address).measure(models["valid"]).latency_ms > 0


def test_the_remote_profiler_waits_out_a_busy_service(address, models):
    results = []
    with measuring_forever(address, models["valid"], seconds=20) as raw:
        clients = [threading.Thread(target=lambda: results.append(client(address).measure(models["valid"])))
                   for _ in range(3)]  # fmt: skip
        for thread in clients:
            thread.start()
        time.sleep(1.5)  # one waits in the queue, two are told to retry
        raw.close()
        for thread in clients:
            thread.join(30)
    assert len(results) == 3 and all(result.latency_ms > 0 for result in results)


# --- Model memory -------------------------------------------------------------------------------


def test_declared_bytes_counts_inputs_outputs_weights_and_inferred_tensors(models):
    # x, h, r, y: 64 x 256 floats each (batch counts 1); w1, w2: 256 x 256 floats each
    assert declared_bytes(onnx.load(models["valid"])) == 4 * 64 * 256 * 4 + 2 * 256 * 256 * 4
    assert declared_bytes(onnx.load(models["huge-input"])) == 2 * 12000 * 12000 * 4
    assert declared_bytes(onnx.load(models["huge-intermediate"])) >= 20000 * 20000 * 4


@pytest.mark.parametrize("kind, declared", [("huge-input", 2 * 12000**2 * 4), ("huge-intermediate", None)])
def test_a_model_declaring_more_memory_than_allowed_is_refused_before_a_session(address, models, recording, kind, declared):
    recording.intervals.clear()
    assert models[kind].stat().st_size < 300
    response = post(address, models[kind].read_bytes(), params={"name": f"{kind}.onnx"})
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail.startswith(f"{kind}.onnx declares {declared or ''}")
    assert detail.endswith(f"this service takes at most {64 * 2**20} (search serve --max-model-memory-mib)")
    assert recording.intervals == []  # never measured: no session was made


# --- No paths of the service's machine in what it answers ---------------------------------------


@pytest.mark.parametrize("kind", ["garbage", "truncated", "custom-op", "dangling", "external", "huge-input", "failing"])
def test_errors_name_the_clients_file_and_no_path_of_the_service(models, tmp_path, kind, monkeypatch):
    class Failing(OnnxRuntimeCpuProfiler):
        def measure(self, onnx_path, inputs=None):
            raise OSError(f"cannot map {onnx_path} nor {tempfile.gettempdir()}/ort-x/weights.bin")

    data = {"garbage": b"\x08\x09not onnx", "truncated": models["valid"].read_bytes()[:5000]}.get(kind)
    if data is None:
        data = models["valid" if kind == "failing" else kind].read_bytes()
    profiler = (Failing if kind == "failing" else OnnxRuntimeCpuProfiler)(load_target("cpu"), **SERVICE_TIMING)
    with serving(profiler, limits=LIMITS) as (_, address):
        response = post(address, data, params={"name": f"/home/me/{kind}.onnx"})
    assert 400 <= response.status_code < 600
    body = response.text
    assert f"{kind}.onnx" in body and "/home/me" not in body
    assert tempfile.gettempdir() not in body and "search-serve-" not in body, body


# --- Load ---------------------------------------------------------------------------------------

LOAD_LIMITS = {"max_bytes": 48 * 2**20, "max_model_memory": 64 * 2**20, "max_queue": 2, "max_time_s": 5}
BIG_GARBAGE = 40 * 2**20  # under the upload limit: written to disk whole, then refused as not ONNX
OVERSIZED = 200 * 2**20  # streamed without a Content-Length; refused at 48 MiB


def _send(address, kind, models):
    """One request of ``kind``; its outcome as ``(status, what it says)``, retried while the
    service is busy (503), as RemoteProfiler does."""
    sizes = {"oversized": OVERSIZED, "big-garbage": BIG_GARBAGE}
    chunk = b"\0" * 2**20
    params = {"name": f"{kind}.onnx", **SERVICE_TIMING}
    for _ in range(200):
        if kind in sizes:  # a stream: only the service's reading tells the size
            body = (chunk for _ in range(sizes[kind] // len(chunk)))
        else:
            body = b"\x08\x09not onnx" if kind == "garbage" else models[kind].read_bytes()
        try:
            response = post(address, body, params=params)
        except httpx.TransportError:  # closed on an oversized stream before the answer was read
            return kind, "closed"
        if response.status_code != 503:
            break
        time.sleep(float(response.headers["retry-after"]))
    answer = response.json()
    if response.status_code == 200:
        return kind, 200, answer["precision"], answer["runtime"], answer["profiler"], answer["device"]["threads"]
    return kind, response.status_code, answer["detail"]


def test_load_concurrent_mixed_clients_get_the_serial_answers_in_bounded_memory(tmp_path, models):
    kinds = (["valid"] * 8 + ["garbage"] * 3 + ["custom-op"] * 2 + ["huge-input"] * 2 + ["big-garbage"] * 3
             + ["oversized"] * 3)  # fmt: skip
    with serving_process(tmp_path, LOAD_LIMITS, **SERVICE_TIMING) as (process, address):
        started_kib, _ = memory_kib(process.pid)
        serial = {kind: _send(address, kind, models) for kind in dict.fromkeys(kinds)}
        _, serial_peak_kib = memory_kib(process.pid)
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            concurrent = list(pool.map(lambda kind: _send(address, kind, models), kinds))
        load_s = time.monotonic() - started
        _, peak_kib = memory_kib(process.pid)
    # The same answers as one client at a time; only an oversized stream may be closed on
    # before its 413 is read, in either run.
    answered = [(kind, answer) for kind, answer in zip(kinds, concurrent) if answer[1] != "closed"]
    assert {kind for kind, answer in zip(kinds, concurrent) if answer[1] == "closed"} <= {"oversized"}
    assert [answer for _, answer in answered] == [serial[kind] for kind, _ in answered]
    counts = collections.Counter(answer[1] for answer in concurrent)
    assert counts[200] == 8  # every valid request measured
    assert counts[400] == 6 and counts[422] == 2 and counts[413] + counts["closed"] == 5
    print(f"load: {len(kinds)} requests from 6 threads in {load_s:.1f} s, {dict(counts)}; server RSS "
          f"{started_kib / 1024:.0f} MiB at start, peak {serial_peak_kib / 1024:.0f} MiB after the serial "
          f"pass, {peak_kib / 1024:.0f} MiB after the concurrent one")  # fmt: skip
    # Uploads go to disk and one is parsed at a time: clients at once cost no more memory than
    # one after another (three held 48 MiB uploads would add 144 MiB).
    assert peak_kib - serial_peak_kib < 40 * 1024
    assert peak_kib < 600 * 1024
    assert load_s < 60
