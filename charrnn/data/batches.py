"""The batch layouts of training: stateful streams (truncated BPTT, the hidden state carried
from batch to batch), random windows (stateless: zeros at the first step), and streams
that restart at random places; each over ids in memory or read from a prepared file."""

from __future__ import annotations

import torch

from charrnn.errors import DataError


def _too_short(chars: int, batch_size: int, seq_len: int) -> DataError:
    return DataError(
        f"the training text ({chars:,} characters) is shorter than one batch "
        f"(batch size {batch_size} x sequence length {seq_len} + 1); "
        "use a longer corpus or lower --batch-size / --seq-len"
    )


class StatefulBatches:
    """Truncated-BPTT batches over B contiguous streams, as in char-rnn.

    The training split is cut into B equal streams, one per batch row. Step k takes the
    next T characters of every stream, so row b of step k+1 continues row b of step k
    and the hidden state can be carried (detached) from one step to the next::

        corpus:  |---- stream 0 ----|---- stream 1 ----| ... |-- stream B-1 --|
                 step:  0    1    2   ...                     (S // T steps per epoch)
        x[k] = [[s0[kT : kT+T]],        y[k] = x[k] shifted left by one character
                [s1[kT : kT+T]],
                 ...
                [sB-1[kT : kT+T]]]      # (B, T)

    `rows` selects which streams this process owns (all of them in one process).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, rows: slice = slice(None), reader=None):
        stream_len = (len(ids) - 1) // batch_size
        if stream_len < seq_len:
            raise _too_short(len(ids), batch_size, seq_len)
        used = batch_size * stream_len
        self.x = ids[:used].view(batch_size, stream_len)[rows]  # (B, S)
        self.y = ids[1 : used + 1].view(batch_size, stream_len)[rows]  # (B, S)
        self.seq_len = seq_len
        self.steps_per_epoch = stream_len // seq_len
        # reader (charrnn.data.prepared.IdReader): the same ids read with a pread per row, not through the map
        self.reader, self._row_starts = reader, torch.arange(batch_size)[rows] * stream_len

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th (x, y) of an epoch, each (B, T) int64."""
        if self.reader is not None:
            window = self.reader.windows(self._row_starts + index * self.seq_len, self.seq_len + 1).long()
            following = (index + 1) % self.steps_per_epoch
            self.reader.will_need(self._row_starts + following * self.seq_len, self.seq_len + 1)
            return window[:, :-1], window[:, 1:]
        cols = slice(index * self.seq_len, (index + 1) * self.seq_len)
        return self.x[:, cols].long(), self.y[:, cols].long()


class RandomWindows:
    """Stateless batches: B windows of T characters at random offsets, from a generator.

    Every rank draws all B offsets from the same generator and reads its own rows, so N
    ranks train on the batches one process trains on."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, rows: slice = slice(None), reader=None):
        if len(ids) < seq_len + 1 or len(ids) < batch_size * seq_len + 1:
            raise _too_short(len(ids), batch_size, seq_len)
        self.ids = ids
        self.reader = reader  # charrnn.data.prepared.IdReader: the same ids read with a pread per window
        self.batch_size = batch_size
        self.rows = rows
        self.seq_len = seq_len
        # An "epoch" is as many windows as cover the split once, so epochs mean the same in both modes.
        self.steps_per_epoch = max(1, (len(ids) - 1) // (batch_size * seq_len))
        self._offsets = torch.arange(seq_len + 1, device=ids.device)

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        window = self._windows(self._starts(generator))  # (rows, T + 1)
        self._read_ahead(generator)
        return window[:, :-1], window[:, 1:]

    def _starts(self, generator: torch.Generator) -> torch.Tensor:
        """This rank's window starts of the next batch, drawn from generator."""
        return torch.randint(0, len(self.ids) - self.seq_len, (self.batch_size, 1), generator=generator)[self.rows, 0]

    def _read_ahead(self, generator: torch.Generator) -> None:
        """With a reader: ask for the following batch's windows now, drawn from a copy of
        the generator (the generator itself, and so every batch, untouched)."""
        if self.reader is not None:
            ahead = torch.Generator().set_state(generator.get_state())
            self.reader.will_need(self._starts(ahead), self.seq_len + 1)

    def _windows(self, starts: torch.Tensor) -> torch.Tensor:
        """ids[starts[:, None] + arange(T + 1)], int64."""
        if self.reader is not None:
            return self.reader.windows(starts, self.seq_len + 1).long()
        return self.ids[starts[:, None].to(self.ids.device) + self._offsets].long()


class RestartingStreams(RandomWindows):
    """Stateful batches whose streams restart at random places: B cursors into the text.

    Each step every stream takes the next T characters from its cursor, as in
    StatefulBatches, so the state carried from one step to the next reads on; but each
    stream, with probability `restart` per step (and whenever it would run off the end),
    jumps to a random offset and starts again from the model's start state::

        stream b:  ...|--T--|--T--|--T--|  jump  |--T--|--T--| ...
                            carried state    start state, carried again

    A stream thus runs 1/restart windows on average: long context for the state to carry,
    a start from the start state often enough for the model to learn reading from it, and
    batches that, unlike fixed streams, are not the same B places of the text in the same
    order every epoch. `restart` = 1 is random windows from the start state.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, restart: float, rows: slice = slice(None),
                 reader=None):
        super().__init__(ids, batch_size, seq_len, rows, reader)
        self.restart = restart
        # All B cursors, on every rank (the same generator draws the same jumps there), so
        # N ranks read what one process reads; this rank takes its rows.
        self.cursors = torch.arange(batch_size) * ((len(ids) - 1) // batch_size)  # (B,) evenly spaced at first

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each (rows, T) int64, and which of its streams restarted."""
        jump, self.cursors = self._jumps(generator, self.cursors)
        window = self._windows(self.cursors[self.rows])  # (rows, T + 1)
        self.cursors = self.cursors + self.seq_len
        self._read_ahead(generator)
        return window[:, :-1], window[:, 1:], jump[self.rows].to(self.ids.device)

    def _jumps(self, generator: torch.Generator, cursors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which streams restart this step, and every stream's cursor after the restarts."""
        last = len(self.ids) - self.seq_len - 1  # the largest cursor with a whole window after it
        jump = torch.rand(len(cursors), generator=generator) < self.restart
        jump |= cursors > last
        fresh = torch.randint(0, last + 1, (len(cursors),), generator=generator)
        return jump, torch.where(jump, fresh, cursors)

    def _starts(self, generator: torch.Generator) -> torch.Tensor:
        return self._jumps(generator, self.cursors)[1][self.rows]
