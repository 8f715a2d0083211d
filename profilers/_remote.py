"""A profiler on another machine, reached through its profiler service (``search serve``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import numpy as np

from profilers._base import Measurement, Profiler
from profilers._errors import MeasurementError, ProfilerUsageError, TargetUnavailableError
from profilers._wire import DEFAULT_PORT, TIMING_LIMITS, TOKEN_ENV
from targets import Target

# Waiting for a connection is short whatever the timeout: an address that does not answer in
# this time is not going to.
_CONNECT_TIMEOUT_S = 10.0
_MEASUREMENT_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Measurement)
    if f.name != "samples_ms" and f.default is dataclasses.MISSING
)
# Fields with a default (the per-layer report, ...) are taken when the service sends them, so a
# service from before a field was added still answers.
_OPTIONAL_FIELDS = tuple(
    f.name for f in dataclasses.fields(Measurement) if f.default is not dataclasses.MISSING
)


class RemoteProfiler(Profiler):
    """Measures on ``target`` by uploading each model to the profiler service at ``address``
    (``host:port``), which measures it with the device's own profiler, one model at a time.

    The timing knobs are sent with every request, so they work as they do locally, within the
    service's limits (:meth:`check` compares them). The service sends no samples: a remote
    :class:`Measurement` has ``samples_ms == ()``, and its ``device["host"]`` names the machine
    that measured. ``timeout_s`` bounds one measurement, upload and waiting included: a busy
    service answers 503 with ``Retry-After``, and the request is sent again after that long.
    """

    def __init__(
        self, target: Target, address: str, token: str, timeout_s: float = 600, **timing: float
    ) -> None:
        super().__init__(target, **timing)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProfilerUsageError(
                f"profiler service address {address!r}: expected host:port, such as "
                f"192.168.1.20:{DEFAULT_PORT}"
            )
        if not token:
            raise ProfilerUsageError(f"the profiler service needs a token (--token or {TOKEN_ENV})")
        self.address = address
        self.token = token  # handed on to local worker processes (search run --workers)
        self.timeout_s = timeout_s
        self._url = f"http://{address}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._health: dict[str, object] | None = None  # the last check's answer

    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        if inputs is not None:
            raise ValueError(
                "a remote profiler measures on random inputs made by the service; inputs must be None"
            )
        path = Path(onnx_path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MeasurementError(f"{path}: cannot read the model: {exc.strerror or exc}") from exc
        params = {"name": path.name, **self.timing()}
        deadline = time.monotonic() + self.timeout_s
        while True:
            response = self._request(
                "POST", "/measure", content=data, params=params,
                headers={"Content-Type": "application/octet-stream"},
            )  # fmt: skip
            wait = _retry_after(response)
            if wait is None or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
        if response.status_code == 503:
            raise TargetUnavailableError(
                f"the profiler service at {self.address} did not take {path.name} within the "
                f"timeout ({self.timeout_s:g} s): {_detail(response)}"
            )
        if response.status_code in (400, 413, 422, 500):
            raise MeasurementError(
                f"{path}: the profiler service at {self.address} could not measure it "
                f"({response.status_code}): {_detail(response)}"
            )
        answer = self._json(response)
        self._check_target(answer.get("profiler"))
        try:
            fields = {key: answer[key] for key in _MEASUREMENT_FIELDS}
            fields.update({key: answer[key] for key in _OPTIONAL_FIELDS if key in answer})
            fields["device"] = {**answer["device"], "host": answer["host"]}
        except (KeyError, TypeError) as exc:
            raise TargetUnavailableError(
                f"the profiler service at {self.address} answered without {exc}; is it the same "
                "version of compression-search?"
            ) from None
        return Measurement(**fields, samples_ms=())

    def check(self) -> dict[str, object]:
        """The service's ``/health`` answer, once the address, token and target are checked.
        Raises :class:`~profilers.TargetUnavailableError` otherwise."""
        answer = self._json(self._request("GET", "/health"))
        self._check_target(answer.get("target"))
        self._check_limits(answer.get("limits"))
        self._health = answer
        return answer

    def setting(self) -> str | None:
        """The setting the service's measurements will carry, as its ``/health`` says (once the
        address, token, target and limits are checked: by this profiler's last :meth:`check`, else
        now); None from a service that does not say."""
        setting = (self._health or self.check()).get("setting")
        return setting if isinstance(setting, str) else None

    def _request(self, method: str, route: str, **kwargs: object) -> httpx.Response:
        timeout = httpx.Timeout(self.timeout_s, connect=min(_CONNECT_TIMEOUT_S, self.timeout_s))
        try:
            with httpx.Client(base_url=self._url, headers=self._headers, timeout=timeout) as client:
                response = client.request(method, route, **kwargs)
        except httpx.TimeoutException as exc:
            raise self._unavailable(f"no answer within the timeout ({exc.__class__.__name__})") from exc
        except httpx.TransportError as exc:
            raise self._unavailable(str(exc) or exc.__class__.__name__) from exc
        if response.status_code == 401:
            raise TargetUnavailableError(
                f"the profiler service at {self.address} refused the token; pass the one it was "
                "started with (--token or SEARCH_PROFILER_TOKEN)"
            )
        return response

    def _json(self, response: httpx.Response) -> dict:
        try:
            answer = response.json() if response.status_code == 200 else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TargetUnavailableError(
                f"{self.address} answered {response.status_code} {response.reason_phrase}, not a "
                f"measurement: is it a `search serve` profiler service? {_detail(response)}"
            )
        return answer

    def _check_target(self, served: object) -> None:
        if served != self.target.name:
            raise TargetUnavailableError(
                f"the profiler service at {self.address} measures target '{served}', not "
                f"'{self.target.name}'; start it with `--target {self.target.name}` or pass "
                f"`--target {served}`"
            )

    def _check_limits(self, limits: object) -> None:
        """A :class:`~profilers.ProfilerUsageError` naming this profiler's timing knobs above
        the service's limits (a service from before the limits sends none)."""
        if not isinstance(limits, dict):
            return
        over = [
            f"{key}={getattr(self, key):g} (at most {limits[limit]:g}, search serve {flag})"
            for key, (limit, flag) in TIMING_LIMITS.items()
            if isinstance(limits.get(limit), (int, float)) and getattr(self, key) > limits[limit]
        ]
        if over:
            raise ProfilerUsageError(
                f"the profiler service at {self.address} allows less than this run asks: {', '.join(over)}; "
                "ask for less, or restart the service with a higher limit"
            )

    def _unavailable(self, reason: str) -> TargetUnavailableError:
        port = self.address.rpartition(":")[2]
        return TargetUnavailableError(
            f"cannot reach the profiler service at {self.address} ({reason}). On the device, start "
            f"`search serve --target {self.target.name} --port {port} --token T --host <its address>` "
            "(it listens on 127.0.0.1 only unless --host says otherwise; or forward the port, "
            f"`ssh -L {port}:127.0.0.1:{port} <device>`), and pass the same token here"
        )


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before sending again, when the service is busy (503 with Retry-After)."""
    if response.status_code != 503:
        return None
    text = response.headers.get("retry-after", "")
    return float(text) if text.isdigit() else None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else response.text[:200]
