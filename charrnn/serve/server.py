"""`charrnn serve`'s process: the models named on its command line, and uvicorn running the
app (charrnn.serve.app) until SIGTERM or Ctrl-C, which first ends every open stream."""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Callable

from fastapi import FastAPI

from charrnn.errors import UsageError
from charrnn.serve.app import create_app
from charrnn.serve.chat import ChatTemplate
from charrnn.serve.schemas import Limits


def model_names(paths: list[str]) -> dict[str, str]:
    """{name: path} for `charrnn serve`'s arguments: NAME=PATH, or PATH named for its run
    directory (a .pt outside one: its file name without .pt)."""
    from pathlib import Path

    from charrnn.store.rundir import is_run

    named: dict[str, str] = {}
    for given in paths:
        name, _, path = given.rpartition("=") if "=" in given else ("", "", given)
        if not name:
            p = Path(path)
            name = p.name if p.is_dir() else (p.parent.name if is_run(p.parent) else p.stem)
        if not re.fullmatch(r"[\w.\-]+", name):
            raise UsageError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (NAME=PATH names one)")
        if name in named:
            raise UsageError(f"two models are named {name!r}; name them with NAME=PATH")
        named[name] = path
    return named


class _Server:
    """uvicorn's server, which on SIGTERM / Ctrl-C first ends every open stream with a final
    event (the engines' close) so that shutting down never waits on a long generation."""

    def __init__(self, app: FastAPI, host: str, port: int, on_ready: Callable[[str], None]):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                app.state.close_all()
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises the signal after its shutdown; a stop asked for is a clean exit (0)
                with super().capture_signals():
                    yield
                    getattr(self, "_captured_signals", []).clear()

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.servers and self.servers[0].sockets:
                    bound = self.servers[0].sockets[0].getsockname()
                    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                    on_ready(f"http://{shown}:{bound[1]}")

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = Server(config)

    def run(self) -> None:
        self.server.run()


def serve(models: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          api_key: str | None = None, on_ready: Callable[[str], None] = lambda url: None,
          log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
          threads: int | None = None, chat: ChatTemplate = ChatTemplate()) -> None:
    """Serve models until SIGTERM or Ctrl-C; on_ready(url) once it listens. The decoding
    thread uses `threads` intra-op threads; every other thread should use one (see
    engine.Runner: the `charrnn serve` command sets that before it loads a model)."""
    _Server(create_app(models, limits, api_key, log, threads, chat), host, port, on_ready).run()
