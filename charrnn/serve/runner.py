"""The one thread that steps every served model's engine (charrnn.serve.engine), and why
there is only one."""



from __future__ import annotations

import threading

from charrnn.serve.engine import Engine


class Runner:
    """The one thread that steps every engine of a process, in turn (each model served is an
    engine). One, not one per model, because of how torch's intra-op threads wait on a CPU:
    they are OpenMP's, and libgomp lets an idle worker spin for its next task (a few ms) only
    while it manages no more threads than there are CPUs. A second thread that runs
    multi-threaded work (another model's loop, the event loop, a scoring request) brings
    its own workers, and from then on every parallel region waits for its workers to wake:
    serving 64 streams (2x384, two cores), the server's threads used 0.9 of the two cores
    and a step took 9-15 ms; with this thread alone multi-threaded, 1.9 and 6-8 ms
    (docs/benchmarks.md, "Serve"). So `charrnn serve` keeps every other thread at one
    intra-op thread, and only this one uses more (Engine.threads, from 16 rows up)."""

    def __init__(self, engines: list[Engine]):
        self.engines = engines
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        for engine in engines:
            engine.poke = self._poke

    def _poke(self) -> None:
        with self._wake:
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="charrnn-decode", daemon=True)
        self._thread.start()

    def close(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests, stop stepping, end every open sequence with an error event."""
        for engine in self.engines:
            engine.refuse(message)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for engine in self.engines:
            engine.close(message)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not any(e.has_work for e in self.engines):
                    self._wake.wait()
                if self._stopping:
                    return
            for engine in self.engines:
                if engine.has_work:
                    try:
                        engine.step()
                    except Exception as err:  # a bug: end what is open with an error, keep serving
                        engine.failed(f"internal error in the decoding loop: {type(err).__name__}: {err}")
