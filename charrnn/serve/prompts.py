"""Reading the engine's prompts (charrnn.serve.engine): each prompt once however many
sequences share it, the last PRIME_CACHE prompts' states kept, and a prompt over
PRIME_SLICE characters read a slice a step between decoding steps so that it stalls no
one. A mixin of Engine: it reads and writes the engine's decoder-side state
(self.network, self._prime_cache, self._reading, self._read_threads, self.prior)."""

from __future__ import annotations

import torch

from charrnn.serve.sequence import Sequence

MIN_WIDTH = 4  # without the row kernel, and for prime reads: multiples of 4 rows give the same bits
PRIME_CACHE = 256  # prompts whose state after reading them is kept (a 2x384 LSTM's: 6 KB each)
PRIME_SLICE = 32  # a prompt longer than this is read this many characters a step, between decoding steps


def key_of(prompt_ids: torch.Tensor) -> tuple[int, ...]:
    return tuple(prompt_ids.tolist())


class PromptReading:
    def _unread_long(self, prompt_ids: torch.Tensor) -> bool:
        """A prompt to read in slices before it joins: long, and its state not kept."""
        return len(prompt_ids) > PRIME_SLICE and key_of(prompt_ids) not in self._prime_cache

    def _start_reading(self, prompt_ids: torch.Tensor) -> None:
        key = key_of(prompt_ids)
        if key not in self._reading:
            self._reading[key] = [prompt_ids.long().to(self.device), 0, None]

    def _primes_of(self, joining: list[Sequence]) -> dict[tuple, tuple]:
        """Each joining prompt's first logits (1, V) and state (each (L, 1, H)): from the
        cache of the last PRIME_CACHE prompts read, the others read now, each once however
        many sequences (and choices) share it, in one forward pass per prompt length."""
        found, missing = {}, {}
        for sequence in joining:
            key = key_of(sequence.request.prompt_ids)
            if key in self._prime_cache:
                self._prime_cache.move_to_end(key)
                found[key] = self._prime_cache[key]
            else:
                missing.setdefault(key, sequence.request.prompt_ids)
        by_length: dict[int, list[tuple]] = {}
        for key, ids in missing.items():
            by_length.setdefault(len(ids), []).append(key)
        for keys in by_length.values():
            logits, state = self._read_primes(torch.stack([missing[key] for key in keys]))
            for row, key in enumerate(keys):
                found[key] = self._prime_cache[key] = (  # copies: a view would keep the whole batch alive
                    logits[row : row + 1].clone(), tuple(x[:, row : row + 1].clone() for x in state))
        while len(self._prime_cache) > PRIME_CACHE:
            self._prime_cache.popitem(last=False)
        self.meter.primes(read=len(missing), cached=len(joining) - len(missing))
        return found

    def _read_slice(self) -> None:
        """PRIME_SLICE more characters of the oldest long prompt being read, so that reading
        a long prompt (a 4,000-character one took ~0.4 s in one pass at 2x384) never stalls
        the streams being decoded by more than one slice a step. One row, always cut at the
        same places: a prompt reads the same bits however its reading is interleaved."""
        if not self._reading:
            return
        key, job = next(iter(self._reading.items()))
        ids, done, state = job
        stop = min(done + PRIME_SLICE, len(ids))
        logits, job[2] = self._read(ids[None, done:stop], state)
        job[1] = stop
        if stop < len(ids):
            return
        del self._reading[key]
        logits = logits[:, -1].float()
        if self.prior is not None:
            logits = self.prior.mix_at(logits, ids[None])
        self._prime_cache[key] = (logits.clone(), tuple(x.clone() for x in job[2]))
        while len(self._prime_cache) > PRIME_CACHE:
            self._prime_cache.popitem(last=False)
        self.meter.primes(read=1, cached=0)

    def _read(self, ids: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """nn.LSTM over prompts on the step's threads (two from 16 rows: a 32-character slice
        of a long prompt 5.7 -> 3.3 ms at 2x384), also while the decoder's elementwise maths
        keeps to one; the reads' bits do not depend on the thread count (tests/test_engine.py)."""
        threads = torch.get_num_threads()
        if threads == self._read_threads:
            return self.network(ids, state)
        torch.set_num_threads(self._read_threads)
        try:
            return self.network(ids, state)
        finally:
            torch.set_num_threads(threads)

    def _read_primes(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """One forward pass over prompts of one length, (P, T): the first logits (P, V) and
        the state (each (L, P, H)). The batch is padded to a multiple of 4 rows: there, as in
        the decoder, a row's bits do not depend on its neighbours, so a prime reads the same
        whatever it is read with (and a cached one as if read again)."""
        ids = ids.long().to(self.device)
        rows = len(ids)
        padded = torch.cat([ids, ids[:1].expand(-rows % MIN_WIDTH, -1)])
        logits, state = self._read(padded)
        logits = logits[:rows, -1].float()
        if self.prior is not None:
            logits = self.prior.mix_at(logits, ids)
        return logits, state
