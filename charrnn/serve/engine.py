"""Continuous batching: one decoding loop per served model (all of them stepped by one
thread, Runner), each request's streams rows of one packed decoder (charrnn.infer.decode).

    submit(Request) -> Sequence            (any thread; waits in a queue when rows are full)
    the loop, one step:
      drop cancelled sequences             (a client that went away: its rows freed now)
      admit waiting ones                   (their primes read together, one forward pass
                                            per prompt length, each prompt once; one read
                                            lately: its kept state; states into free rows;
                                            a prompt over PRIME_SLICE characters is read a
                                            slice a step first, so it stalls no one)
      draw a character for every row       (each sequence's own temperature, top-p and
                                            generator: sample.next_ids_rows)
      hand each sequence its characters    (stop strings held back until they cannot match)
      drop the finished, step the decoder  -> the next logits

A sequence is one prompt with its n choices (rows side by side) and one torch.Generator
seeded from the request: it draws (n, 1) uniforms a step as `charrnn sample -s n` does, so
the same request with the same seed writes the same text. Choices that are done keep
drawing until the whole sequence is (as `charrnn sample` does), so the generator's
stream, and with it every other choice's text, does not depend on when one stopped.

Width: the decoder is 1, 2, 4, 8, ... streams wide (at least the rows in use; it narrows
when a quarter would do) and its rows are fp32, their products on charrnn.infer.rows' kernel:
every output is the same sequence of operations at every width (and the elementwise
maths keeps scratch rows below the streams', decode.Decoder.pad), so a row's logits are
bit for bit the same whatever else is being decoded, and one stream is decoded one row
wide, at `charrnn sample`'s cost. Where the kernel is not built (no C compiler at
install) the products are torch's, whose kernels change with the row count (on the CPUs
measured: a matrix-vector path for 1-3 rows, blocked sgemm from 4), and the decoder is
4, 8, 16, ... rows wide instead. nn.LSTM's prime reads are padded to a multiple of 4 rows
for the same reason. So a request's text is the same whatever else is being served.
Against `charrnn sample` (one stream: nn.LSTM reads the prime one row wide, then torch's
matrix-vector path, whose sums the kernel repeats bit for bit on the CPUs measured) the
logits agree to ~1e-6, and the text is the same unless a draw lands that close to the
boundary between two characters (tests/test_serve.py checks the texts on its models).

Nothing here knows about HTTP: `notify(sequences)` (from the loop's thread) tells the
server which sequences have new events; a Sequence's events are a deque of
("text", choice, text, logprobs), ("finish", choice, reason) and ("end",) or ("error", message).
"""


from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import torch

from charrnn.infer.decode import Decoder, make_decoder
from charrnn.infer.lanes import Lanes, widen
from charrnn.infer.sample import bias_row, count_drawn, mix_next, next_ids_rows, shapes
from charrnn.model.startmix import POSITIONS
from charrnn.serve.prompts import MIN_WIDTH, PromptReading, key_of
from charrnn.serve.sequence import Busy, Meter, Request, Sequence, _logprob_entries

BLOCK = 64  # uniforms drawn at once per sequence


class Engine(PromptReading):
    """The decoding loop of one model (charrnn.infer.api.Model), one step() at a time from one
    thread (a Runner's, in the server)."""

    def __init__(self, model, max_streams: int = 64, max_queued: int = 64,
                 notify: Callable[[list[Sequence]], None] = lambda sequences: None, meter: Meter = Meter(),
                 threads: int | None = None):
        self.model = model
        self.network, self.vocab, self.prior, self.device = model.network, model.vocab, model.prior, model.device
        self.max_streams, self.max_queued = max_streams, max_queued
        self.notify, self.meter = notify, meter
        self._decoder: Decoder | Lanes = make_decoder(self.network, 1, self.device, cuda_graph=False, invariant=True)
        # The row kernel's rows are the same bits at every width; without it (not built, or a
        # GPU) torch's matmul is, at multiples of 4 rows.
        self.min_width = 1 if self._decoder.invariant else MIN_WIDTH
        if self.min_width > 1:
            self._decoder = self._decoder.with_streams(self.min_width)
        self._active: list[Sequence] = []
        self._rows = 0
        # Per row, in row order: logits (rows, V) the next draw draws from; temperature and
        # top_p (rows, 1); uniforms (rows, BLOCK), each sequence's coming draws; column (rows,),
        # where in them each row is.
        self._table: dict[str, torch.Tensor] = {}
        self._prime_cache: OrderedDict[tuple, tuple] = OrderedDict()  # prompt -> (logits, state), last used last
        self._reading: OrderedDict[tuple, list] = OrderedDict()  # long prompt -> [ids, characters read, state]
        self._waiting: deque[Sequence] = deque()
        self._queued = 0  # streams waiting, sum of their n
        self._lock = threading.Lock()
        self._closing: str | None = None
        self.poke: Callable[[], None] = lambda: None  # there is work: set by the Runner that steps it
        self.steps = 0
        self.threads = threads or torch.get_num_threads()  # intra-op threads from 16 rows up
        self._read_threads = 1  # for nn.LSTM's prompt reads (_read), set by _threads_for

    # -- from any thread ---------------------------------------------------------------------

    def submit(self, request: Request, waker: Any = None) -> Sequence:
        sequence = Sequence(request, waker)
        if request.length == 0:  # nothing to draw (max_tokens 0, e.g. to echo a prompt): done now
            sequence.events.extend([("finish", j, "length") for j in range(request.n)] + [("end",)])
            sequence.finished = True
            return sequence
        with self._lock:
            if self._closing is not None:
                raise Busy(self._closing)
            if request.n > self.max_streams or \
                    self._rows + self._queued + request.n > self.max_streams + self.max_queued:
                raise Busy("every stream is in use and the queue is full")
            self._waiting.append(sequence)
            self._queued += request.n
        self.poke()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        if not sequence.cancelled and not sequence.finished:
            sequence.cancel_step = self.steps
            sequence.cancel()
            self.poke()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active or self._reading)

    @property
    def row_kernel(self) -> bool:
        """Whether the decoder's products run on charrnn.infer.rows' kernel (one row wide for one
        stream); False: torch's matmul at multiples of 4 rows."""
        return self._decoder.invariant

    @property
    def active_streams(self) -> int:
        return self._rows

    @property
    def queued_streams(self) -> int:
        return self._queued  # a count kept under the lock: other threads read it (/health, /metrics)

    def refuse(self, message: str) -> None:
        """Take no more requests: submit raises Busy(message) from now on."""
        with self._lock:
            self._closing = message

    def close(self, message: str = "the server is shutting down") -> None:
        """End every open sequence with an error event (once nothing steps this engine)."""
        self.refuse(message)
        ended = [*self._active, *self._waiting]
        for sequence in ended:
            if not sequence.finished:
                sequence.end(message)
        self._active, self._waiting, self._rows, self._queued = [], deque(), 0, 0
        if ended:
            self.notify(ended)

    def failed(self, message: str) -> None:
        ended = [s for s in self._active if not s.finished]
        for sequence in ended:
            sequence.end(message)
        self._active, self._rows, self._table = [], 0, {}
        self.notify(ended)

    # -- the loop's thread ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """One decoding step for every active sequence (see the module docstring)."""
        started = time.perf_counter()
        self._threads_for(self._rows + self.queued_streams)
        touched = self._drop([s for s in self._active if s.cancelled], logits=True)
        self._admit()
        if not self._active:
            self.notify(touched)
            return
        ids = self._draw()
        touched += self._hand_on(ids)
        finished = [s for s in self._active if s.finished]
        if finished:
            ids = ids[_rows_of([s for s in self._active if not s.finished])]
            self._drop(finished, logits=False)
        if self._active:
            self._advance(ids)
        self.steps += 1
        self.meter.step(time.perf_counter() - started, self._rows)
        self.notify(touched)

    def _threads_for(self, rows: int) -> None:
        """One intra-op thread below 16 rows: there a second thread gains little (8 rows at
        2x384: 807 vs 669 us a step) and its spinning takes the core the event loop and the
        clients need. The thread count does not change a single bit of the results."""
        wanted = 1 if rows < 16 else self.threads
        self._read_threads = wanted
        if self._decoder.invariant:  # two lanes of the decoder (or the kernel's products) take them
            self._decoder.threads, wanted = wanted, 1
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _admit(self) -> None:
        """Take in the waiting sequences that fit, reading their primes in batches; a long
        prompt not read before waits, in its place, while _read_slice reads it."""
        self._read_slice()
        joining, unread = [], []
        with self._lock:
            rows = self._rows
            while self._waiting and rows + self._waiting[0].request.n <= self.max_streams:
                sequence = self._waiting.popleft()
                if sequence.cancelled:
                    self._queued -= sequence.request.n
                    sequence.freed_step = self.steps
                    continue
                if self._unread_long(sequence.request.prompt_ids):
                    unread.append(sequence)
                    continue
                self._queued -= sequence.request.n
                joining.append(sequence)
                rows += sequence.request.n
            self._waiting.extendleft(reversed(unread))
        for sequence in unread:
            self._start_reading(sequence.request.prompt_ids)
        if not joining:
            return
        self._resize(rows)
        primes = self._primes_of(joining)
        for sequence in joining:
            request, n = sequence.request, sequence.request.n
            logits, state = primes[key_of(request.prompt_ids)]
            read = request.prompt_ids.long()[None].expand(n, -1).to(self.device)
            sequence.read_ids = read if self.prior is not None and read.shape[1] < POSITIONS else None
            sequence.start = self._rows
            self._decoder.load_state(tuple(x.expand(-1, n, -1) for x in state), sequence.rows)
            self._append({"logits": logits.expand(n, -1).clone(), "temperature": torch.full((n, 1), request.temperature),
                          "top_p": torch.full((n, 1), request.top_p), "uniforms": self._block(sequence),
                          "column": torch.zeros(n, dtype=torch.long), **self._controls(request)})
            self._rows += n
            self._active.append(sequence)

    def _controls(self, request: Request) -> dict[str, torch.Tensor]:
        """The request's top-k, min-p, bias and penalties as per-row columns, and its rows'
        counts of what they drew (for the penalties), all zeros to start."""
        n, size = request.n, len(self.vocab)
        return {"top_k": torch.full((n, 1), request.top_k, dtype=torch.long), "min_p": torch.full((n, 1), request.min_p),
                "bias": bias_row(request.logit_bias, size).expand(n, -1).clone(), "frequency": torch.full((n, 1), request.frequency_penalty),
                "presence": torch.full((n, 1), request.presence_penalty), "counts": torch.zeros(n, size)}

    def _block(self, sequence: Sequence) -> torch.Tensor:
        """The sequence's next BLOCK draws, (n, BLOCK): one torch.rand call gives the same
        numbers as BLOCK calls of (n, 1), so its text is as if it drew step by step."""
        n = sequence.request.n
        if sequence.request.temperature == 0:  # greedy draws nothing
            return torch.zeros(n, BLOCK)
        return torch.rand((BLOCK, n), generator=sequence.generator).T

    def _draw(self) -> torch.Tensor:
        """One id per row, each sequence with its own settings and generator -> (rows,)."""
        table = self._table
        for s in self._active:
            if s.drawn and s.drawn % BLOCK == 0:
                table["uniforms"][s.rows] = self._block(s)
        uniforms = table["uniforms"].gather(1, table["column"][:, None])
        table["column"].add_(1).remainder_(BLOCK)
        requests = [s.request for s in self._active]
        greedy = any(r.temperature == 0 for r in requests)
        nucleus = any(r.top_p < 1 for r in requests)
        on = self.device
        shaping = (table["bias"].to(on), table["counts"].to(on), table["frequency"].to(on), table["presence"].to(on)) \
            if any(shapes(r) for r in requests) else None
        ids = next_ids_rows(table["logits"], table["temperature"].to(on), table["top_p"].to(on), uniforms.to(on), greedy,
                            nucleus, top_k=table["top_k"].to(on) if any(r.top_k for r in requests) else None,
                            min_p=table["min_p"].to(on) if any(r.min_p > 0 for r in requests) else None, shaping=shaping)
        if shaping is not None:  # while no row is shaped the counts can lag: they multiply zeros
            count_drawn(table["counts"], ids.cpu())
        return ids

    def _hand_on(self, ids: torch.Tensor) -> list[Sequence]:
        alphabet = self.vocab.chars
        chars = [alphabet[i] for i in ids.tolist()]
        log_probs = None
        if any(s.request.logprobs is not None for s in self._active):
            log_probs = self._table["logits"].float().log_softmax(-1)
        touched, handed = [], 0
        for s in self._active:
            start, n = s.start, s.request.n
            entries = None if s.request.logprobs is None else _logprob_entries(
                log_probs[start : start + n], ids[start : start + n], s.request.logprobs, alphabet)
            first = s.first_char_s is None
            handed += s.take(chars[start : start + n], entries)
            if first and s.first_char_s is not None:
                self.meter.first_char(s.first_char_s)
            if s.events:
                touched.append(s)
        self.meter.chars(handed)
        return touched

    def _advance(self, ids: torch.Tensor) -> None:
        padded = torch.zeros(self._decoder.num_streams, dtype=torch.long, device=self.device)
        padded[: self._rows] = ids
        logits = self._decoder.step(padded)[: self._rows].clone()
        # The prior, for sequences still in their first POSITIONS characters: one call per
        # history length (those that joined at the same step), not one per sequence.
        groups: dict[int, list[Sequence]] = {}
        for s in self._active:
            if s.read_ids is not None:
                groups.setdefault(s.read_ids.shape[1], []).append(s)
        for group in groups.values():
            rows = _rows_of(group)
            mixed, history = mix_next(self.prior, logits[rows], torch.cat([s.read_ids for s in group]), ids[rows])
            logits[rows] = mixed
            for s, part in zip(group, history.split([s.request.n for s in group])):
                s.read_ids = part if part.shape[1] < POSITIONS else None
        self._table["logits"] = logits

    # -- rows ------------------------------------------------------------------------------------

    def _drop(self, gone: list[Sequence], logits: bool) -> list[Sequence]:
        """Free the rows of sequences that are done or cancelled, moving the rest up."""
        if not gone:
            return []
        keep = [s for s in self._active if s not in gone]
        index = _rows_of(keep)
        self._table = {name: (column if name == "logits" and not logits else column[index])
                       for name, column in self._table.items()} if keep else {}
        row = 0
        for s in keep:
            if s.start != row:
                self._decoder.move(s.rows, slice(row, row + s.request.n))
                s.start = row
            row += s.request.n
        self._active, self._rows = keep, row
        for s in gone:
            s.freed_step = self.steps
        self._resize(self._rows)
        return [s for s in gone if s.events]

    def _append(self, rows: dict[str, torch.Tensor]) -> None:
        """Add a sequence's rows to the per-row tables (logits, settings, draws)."""
        table = self._table
        self._table = {name: torch.cat([table[name], value]) if table else value for name, value in rows.items()}

    def _resize(self, rows: int) -> None:
        """Widen the decoder to hold rows, or narrow it when a quarter of it would do."""
        width = self._decoder.num_streams
        if rows <= width and (width == self.min_width or rows > width // 4):
            return
        new_width = self.min_width
        while new_width < rows:
            new_width *= 2
        decoder = widen(self._decoder, new_width)
        kept = min(self._rows, rows)
        if kept:
            decoder.load_state(self._decoder.state(slice(0, kept)), slice(0, kept))
        self._decoder = decoder


def _rows_of(sequences: list[Sequence]) -> torch.Tensor:
    """The row indices of sequences, in order (int64, maybe empty)."""
    return torch.tensor([row for s in sequences for row in range(s.rows.start, s.rows.stop)], dtype=torch.long)
