"""`falconet serve` as a process: SIGTERM or SIGINT lets requests in flight finish within the
shutdown timeout, aborts the rest (their streams still end with [DONE]), and exits 0."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live import MODEL

START_TIMEOUT_S = 60


class CLIServer:
    def __init__(self, model_dir, *args: str):
        cmd = [sys.executable, "-m", "falconet.cli", "serve", "--model", str(model_dir), "--port", "0"]
        cmd += ["--served-model-name", MODEL, "--kv-cache-memory-gb", "0.01", "--threads", "1", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        out = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.log)
                continue
            self.log.append(line)
            m = re.search(r"serving \S+ on (http://\S+)/v1", line)
            if m:
                return m.group(1)
        raise AssertionError("the server did not start:\n" + "".join(self.log))

    def output(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get_nowait())
        return "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Stream:
    """A streaming request, read as data payloads. It holds on to its client: dropping that
    would close the connection, which the server takes as a disconnect."""

    def __init__(self, url: str, max_tokens: int, running: bool = True):
        body = {"model": MODEL, "prompt": "w5 w6", "max_tokens": max_tokens, "ignore_eos": True}
        self.client = httpx.Client(timeout=60)
        request = self.client.build_request("POST", url + "/v1/completions", json={**body, "stream": True})
        res = self.client.send(request, stream=True)
        assert res.status_code == 200  # headers come at admission
        self.lines = (line[6:] for line in res.iter_lines() if line.startswith("data: "))
        if running:
            json.loads(next(self.lines))  # wait for the first token

    def finish_reason(self) -> str | None:
        """Read to the end; the finish reason, or None if the stream broke off without [DONE]."""
        reason = None
        for data in self.lines:
            if data == "[DONE]":
                return reason
            reason = json.loads(data)["choices"][0]["finish_reason"] or reason
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_aborts_what_is_left_after_the_timeout(tiny_chat_dir, sig):
    server = CLIServer(tiny_chat_dir, "--max-num-seqs", "1", "--shutdown-timeout", "0.5")
    try:
        # Eight 250-token requests, one at a time: far more work than half a second.
        streams = [Stream(server.url, 250)] + [Stream(server.url, 250, running=False) for _ in range(7)]
        server.proc.send_signal(sig)
        reasons = [s.finish_reason() for s in streams]
        assert server.proc.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()
    assert None not in reasons  # every stream ended with [DONE]
    assert "abort" in reasons, reasons
    assert "Traceback" not in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def test_sigterm_lets_a_request_in_flight_finish(tiny_chat_dir):
    server = CLIServer(tiny_chat_dir, "--shutdown-timeout", "60")
    try:
        stream = Stream(server.url, 100)
        server.proc.send_signal(signal.SIGTERM)
        assert stream.finish_reason() == "length"
        assert server.proc.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()


def test_taken_port_is_a_clean_error(tiny_chat_dir):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        cmd = [sys.executable, "-m", "falconet.cli", "serve", "--model", str(tiny_chat_dir), "--port", port]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("error: cannot listen on 127.0.0.1:" + port), res.stderr
    assert "Traceback" not in res.stderr
