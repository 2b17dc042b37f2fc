"""`falconet serve`: load the model, start the engine loop, run uvicorn until a signal.

Shutdown on SIGINT or SIGTERM: new requests are refused at once, requests in flight get
`shutdown_timeout` seconds to finish and are then aborted (their streams end with
finish_reason "abort" and `data: [DONE]`), the engine thread stops, the process exits 0.
A second SIGINT quits without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import uvicorn

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.models.loader import load_model
from falconet.serve.app import create_app
from falconet.serve.async_engine import AsyncEngine


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts the engine's drain when a signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_shutdown(self.shutdown_timeout)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal once it has shut down (SIGTERM then kills the process);
            # the shutdown was handled, so it is a clean exit instead.
            getattr(self, "_captured_signals", []).clear()


def build_engine(
    model: str | None,
    dtype: str = "float32",
    max_queue: int = 256,
    quantization: str | None = None,
    **engine_options,
) -> AsyncEngine:
    try:
        config = EngineConfig(**engine_options)
    except TypeError as e:
        raise FalconetError(f"unknown engine option: {e}") from None
    loaded = load_model(model, dtype=dtype, max_model_len=config.max_model_len, quantization=quantization)
    if loaded.tokenizer is None:
        raise FalconetError(f"{loaded.path}: the server needs a tokenizer")
    return AsyncEngine(LLMEngine(loaded, config), max_queue=max_queue)


def bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn: a taken port is then a clean error, and port 0 a free one."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise FalconetError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _config(engine: AsyncEngine, model_name: str, host: str, port: int, api_key, shutdown_timeout, log_level):
    logging.getLogger("falconet.serve").setLevel(log_level.upper())
    return uvicorn.Config(
        create_app(engine, model_name, api_key),
        host=host,
        port=port,
        log_level=log_level,
        # A backstop: the engine's own drain ends every stream within shutdown_timeout.
        timeout_graceful_shutdown=shutdown_timeout + 5,
    )


def serve(
    engine: AsyncEngine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    shutdown_timeout: float = 5.0,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (call from the main thread). `sock`: already bound to
    host:port (the CLI binds before loading the model, so that a taken port fails fast)."""
    with sock or bind(host, port) as sock:
        port = sock.getsockname()[1]
        config = _config(engine, model_name, host, port, api_key, shutdown_timeout, log_level)
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info(
            "Falconet serving %s on http://%s:%d/v1 (Ctrl-C to stop)", model_name, shown, port
        )
        _Server(config, engine, shutdown_timeout).run(sockets=[sock])


class ServerThread:
    """A server on a background thread, for tests and notebooks: `with ServerThread(...) as s: s.url`.
    Without signals: `stop()` drains like a signal would."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        shutdown_timeout: float = 1.0,
        log_level: str = "warning",
    ):
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._sock = bind(host, port)
        port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = _config(engine, model_name, host, port, api_key, shutdown_timeout, log_level)
        self.server = uvicorn.Server(config)
        self.app = config.app
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="falconet-http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise FalconetError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.engine.begin_shutdown(self.shutdown_timeout)
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
