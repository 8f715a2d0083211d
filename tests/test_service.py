"""The profiler service and its client over a real loopback socket: measurements, the token,
bad uploads, clients that vanish, concurrent clients, and where it listens."""

from __future__ import annotations

import logging
import pickle
import socket
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from loopback import TOKEN, serving
from pickles import WritesMarker, code_running_checkpoint
from profilers import (
    Measurement,
    MeasurementError,
    OnnxRuntimeCpuProfiler,
    ProfilerUsageError,
    RemoteProfiler,
    ServiceLimits,
    TargetUnavailableError,
    serve,
)
from targets import load_target
from test_profilers import SHORT, two_matmuls

MAX_BYTES = 2**20


class Recording(OnnxRuntimeCpuProfiler):
    """Records when each measurement started and ended, to check they never overlap."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intervals = []

    def measure(self, onnx_path, inputs=None):
        start = time.perf_counter()
        try:
            return super().measure(onnx_path, inputs)
        finally:
            self.intervals.append((start, time.perf_counter()))


@pytest.fixture(scope="module")
def recording():
    return Recording(load_target("cpu"), **SHORT)


@pytest.fixture(scope="module")
def service(recording):
    """``(server, address)`` of a service over ``recording``, for this module."""
    with serving(recording, limits=ServiceLimits(max_bytes=MAX_BYTES)) as running:
        yield running


@pytest.fixture(scope="module")
def address(service):
    return service[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return two_matmuls(tmp_path_factory.mktemp("models") / "fp32.onnx")


def client(address, token=TOKEN, **timing):
    return RemoteProfiler(load_target("cpu"), address, token, **{**SHORT, **timing})


def assert_serving(address, model):
    assert client(address).measure(model).latency_ms > 0


def test_measures_over_loopback(address, model):
    result = client(address).measure(model)
    assert isinstance(result, Measurement)
    assert result.latency_ms > 0 and result.runs >= SHORT["min_runs"]
    assert result.device["host"] == socket.gethostname()
    assert result.device["threads"] == 1
    assert result.samples_ms == ()
    assert result.runtime == "onnxruntime-cpu" and result.source == "measured"


def test_the_setting_comes_from_the_check_already_made(address, monkeypatch):
    """The command line checks the service before the task loads; the run then asks its setting:
    one round trip to ``/health``, not two."""
    asked = []

    def counted():
        profiler = client(address)
        request = profiler._request
        monkeypatch.setattr(
            profiler, "_request", lambda method, route, **kw: asked.append(route) or request(method, route, **kw)
        )
        return profiler

    profiler = counted()
    health = profiler.check()
    assert profiler.setting() == health["setting"] and asked == ["/health"]
    assert counted().setting() == health["setting"] and asked == ["/health", "/health"]  # unchecked: asked now


def test_health_names_the_target(address):
    health = client(address).check()
    assert health["target"] == "cpu" and health["runtime"] == "onnxruntime-cpu"
    assert health["runtime_version"] and health["version"]


def test_says_the_setting_its_measurements_carry_before_measuring(address, model, recording):
    """So a study measured under another setting refuses a client before any work (test_study)."""
    remote = client(address)
    assert remote.setting() == recording.setting() == remote.measure(model).setting


def test_a_service_that_does_not_say_its_setting_is_known_by_its_measurements(monkeypatch, address):
    monkeypatch.setattr(RemoteProfiler, "check", lambda self: {"status": "ok", "target": "cpu"})  # an older service
    assert client(address).setting() is None


def test_listens_on_loopback_only(service):
    server, _ = service
    assert {s.getsockname()[0] for s in server.servers[0].sockets} == {"127.0.0.1"}


def test_serve_binds_localhost_by_default(monkeypatch):
    import uvicorn

    bound = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: bound.update(host=self.config.host))
    serve(load_target("cpu"), token="t")
    assert bound["host"] == "127.0.0.1"


@pytest.mark.parametrize("token", [None, ""])
def test_serve_refuses_an_empty_token(token):
    with pytest.raises(ProfilerUsageError, match="SEARCH_PROFILER_TOKEN"):
        serve(load_target("cpu"), token=token)


def test_wrong_token_is_refused_and_the_server_goes_on(address, model):
    with pytest.raises(TargetUnavailableError, match=f"service at {address} refused the token"):
        client(address, token="wrong").measure(model)
    with pytest.raises(TargetUnavailableError, match="refused the token"):
        client(address, token="wrong").check()
    assert_serving(address, model)


def test_oversized_model_is_refused_and_the_server_goes_on(address, model, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (2 * MAX_BYTES))
    with pytest.raises(MeasurementError, match=r"big.onnx.*\(413\).*at most 1048576"):
        client(address).measure(big)
    # Without a Content-Length (chunked), the service stops reading once over the limit.
    chunks = (b"\0" * 65536 for _ in range(4 * MAX_BYTES // 65536))
    response = httpx.post(
        f"http://{address}/measure", content=chunks, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 413
    assert_serving(address, model)


def test_file_that_is_not_onnx_is_refused(address, model, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(MeasurementError, match=r"notes.onnx.*\(400\).*notes.onnx is not"):
        client(address).measure(path)
    assert_serving(address, model)


def test_model_the_runtime_cannot_run_fails_the_candidate(address, tmp_path):
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([node], "g", [value], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)
    with pytest.raises(MeasurementError, match=r"\(422\).*custom.onnx: ONNX Runtime cannot build"):
        client(address).measure(path)


def test_inputs_are_refused(address, model):
    with pytest.raises(ValueError, match="inputs must be None"):
        client(address).measure(model, {"x": np.ones((1, 64, 256), np.float32)})


@pytest.mark.parametrize(
    "method, route, kwargs, status",
    [
        ("POST", "/measure", {}, 400),  # no body
        ("GET", "/measure", {}, 405),
        ("PUT", "/health", {}, 405),
        ("POST", "/measure", {"content": b"x", "params": {"min_runs": "0"}}, 400),
        ("POST", "/measure", {"content": b"x", "params": {"min_runs": "many"}}, 400),
        ("POST", "/measure", {"content": b"x", "params": {"shell": "rm"}}, 400),
        ("POST", "/nothing", {}, 404),
    ],
)
def test_malformed_requests_get_4xx(address, model, method, route, kwargs, status):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if kwargs.get("params", {}).get("min_runs") == "0":
        kwargs = {**kwargs, "content": model.read_bytes()}
    assert httpx.request(method, f"http://{address}{route}", headers=headers, **kwargs).status_code == status
    assert_serving(address, model)


@pytest.mark.parametrize(
    "kwargs, status, detail",
    [
        # The model as JSON, or as a form with a JSON options part (here malformed): the body must
        # be the file itself, and options go in the query string.
        ({"json": {"model": "AAAA", "min_runs": 10}}, 415,
         "Content-Type 'application/json': expected application/octet-stream, the ONNX file as the raw body"),
        ({"files": {"model": ("m.onnx", b"\x08\x09", "application/octet-stream")},
          "data": {"options": '{"min_runs": 10,'}}, 415, "expected application/octet-stream"),
        ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type 'text/plain'"),
        # Non-finite timing would hold the measurement lock for ever.
        ({"content": b"x", "params": {"max_time_s": "inf"}}, 400, "max_time_s='inf': expected a finite number"),
        ({"content": b"x", "params": {"tolerance": "nan"}}, 400, "tolerance='nan': expected a finite number"),
        ({"content": b"x", "params": {"min_runs": "1.5"}}, 400, "min_runs='1.5': expected a finite whole number"),
    ],
    ids=["json-body", "multipart-bad-json-options", "text-body", "inf-time", "nan-tolerance", "fractional-runs"],
)  # fmt: skip
def test_malformed_request_is_refused_with_the_reason_and_the_server_goes_on(address, model, kwargs, status, detail):
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    response = httpx.post(f"http://{address}/measure", headers=headers, **kwargs)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert_serving(address, model)


def test_a_pickle_upload_is_refused_and_never_unpickled(address, model, tmp_path):
    """The service parses uploads as ONNX protobuf only: a checkpoint that would run code when
    unpickled, sent as the model, is refused and runs nothing."""
    marker = tmp_path / "marker"
    path = code_running_checkpoint(tmp_path / "checkpoint.onnx", marker)
    refused = r"checkpoint.onnx.*\(400\).*checkpoint.onnx is not (an|a valid) ONNX model"
    with pytest.raises(MeasurementError, match=refused):
        client(address).measure(path)
    raw = pickle.dumps(WritesMarker(marker))  # a bare pickle, not torch's zip
    response = httpx.post(
        f"http://{address}/measure", content=raw,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert response.status_code == 400 and "ONNX model" in response.json()["detail"]
    assert not marker.exists()
    assert_serving(address, model)


def test_missing_token_gets_401(address):
    response = httpx.post(f"http://{address}/measure", content=b"x")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"http://{address}/health").status_code == 401


def test_client_vanishing_mid_upload_leaves_the_server_serving(address, model, caplog):
    host, port = address.split(":")
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(
                    b"POST /measure HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 500000\r\n\r\n"
                    + b"\0" * 10000
                )
        assert_serving(address, model)
        deadline = time.monotonic() + 5
        while "disconnected during its upload" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "disconnected during its upload" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_concurrent_clients_are_measured_one_at_a_time(address, model, recording):
    recording.intervals.clear()
    results, errors = [], []

    def one():
        try:
            results.append(client(address, min_time_s=0.2).measure(model))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(results) == 3
    intervals = sorted(recording.intervals)
    assert len(intervals) == 3
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:]))


def test_timing_knobs_travel_with_the_request(address, model, recording):
    result = client(address, min_runs=10**6, min_time_s=0.0, max_time_s=0.05, sessions=2).measure(model)
    assert not result.stable and 0 < result.runs < 10**6
    assert len(result.session_medians_ms) == 2
    assert recording.min_runs == SHORT["min_runs"]  # the service's own profiler is untouched


def test_unreachable_service_says_how_to_start_one(model):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TargetUnavailableError) as info:
        client(f"127.0.0.1:{port}").measure(model)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert f"search serve --target cpu --port {port} --token T" in message


def test_service_for_another_target_is_refused(address, model):
    jetson = RemoteProfiler(load_target("jetson"), address, TOKEN, **SHORT)
    with pytest.raises(TargetUnavailableError, match="measures target 'cpu', not 'jetson-orin-nano'"):
        jetson.check()
    with pytest.raises(TargetUnavailableError, match="measures target 'cpu'"):
        jetson.measure(model)


@pytest.mark.parametrize("text", ["nohost", "host:", "host:99999", ":80"])
def test_bad_address_is_a_usage_error(text):
    with pytest.raises(ProfilerUsageError, match="expected host:port"):
        RemoteProfiler(load_target("cpu"), text, TOKEN)


def test_a_study_measured_through_the_service_says_which_host_measured(address, tiny_task, tmp_path):
    import optuna

    import search

    study = search.run(
        tiny_task, target="jetson-orin-nano", trials=1, profiler=client(address), results_dir=tmp_path,
        finetune=search.Finetune(steps=1), pruner=optuna.pruners.NopPruner(), cost_model=False,
    )  # fmt: skip
    frame = search.load_trials(study)
    assert list(frame["state"]) == ["COMPLETE"]
    assert list(frame["measured_on"]) == [socket.gethostname()]
    assert study.user_attrs["baseline"]["measurement"]["device"]["host"] == socket.gethostname()
