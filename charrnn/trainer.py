"""The one training loop: truncated BPTT with AdamW, clipping, warmup + cosine decay.

(The module is `trainer`, not `train`, so that `charrnn.train` stays the API's function:
importing a submodule named `train` would rebind that attribute of the package.)

Progress reaches the caller through `on_event(event)`, typed events from charrnn.events:
Setup (once), Step (every LOG_EVERY steps), Validation (each validation: the record
appended to metrics.jsonl), Sample (drawn at each validation, appended to samples.jsonl),
Notice (something the user should know, e.g. a repaired file). The library never prints."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from charrnn import checkpoint, distributed, sizing
from charrnn.average import WeightAverage
from charrnn.checkpoint import Checkpoint
from charrnn.config import ModelConfig, TrainConfig, build, parse_duration, to_toml
from charrnn.data import Corpus, RandomWindows, RestartingStreams, StatefulBatches, Vocab, split
from charrnn.device import autocast, dtype_name, resolve_device, resolve_dtype
from charrnn.errors import CharRNNError, CheckpointError, DataError, TrainingInterrupted, UsageError
from charrnn.events import Notice, OnEvent, Sample, Setup, Step, Validation
from charrnn.evaluate import evaluate
from charrnn.model import CharRNN, count_parameters, detach
from charrnn.sample import SampleSettings, sample_text
from charrnn.startmix import StartMix

LOG_EVERY = 10


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the training split
    batch: int = 0  # next batch within the epoch
    elapsed_s: float = 0.0  # wall-clock seconds of training so far, across resumes
    chars_seen: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.nan
    window_loss_sum: float = 0.0  # train loss summed since the last validation
    window_steps: int = 0


def lr_at(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warmup over warmup_steps, the peak held, then cosine decay to min_lr_ratio
    over the last decay_frac of the run (fraction = how far the run is, 0..1)::

        lr |   ______________
           |  /              `-.
           | /                  `-._  min_lr_ratio
           +---------------------------> fraction
            warmup           1 - decay_frac   1
    """
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    start = 1.0 - config.decay_frac
    decayed = min(1.0, max(0.0, (fraction - start) / config.decay_frac)) if config.decay_frac else 0.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * decayed))
    return config.learning_rate * warm * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def fraction_done(config: TrainConfig, progress: Progress, steps_per_epoch: int) -> float:
    """How far training is, 0..1, by whichever stop condition is nearest."""
    parts = []
    if config.steps:
        parts.append(progress.step / config.steps)
    if config.epochs:
        parts.append((progress.epoch + progress.batch / steps_per_epoch) / config.epochs)
    if config.time:
        parts.append(progress.elapsed_s / config.time_budget_s)
    return max(parts)


def choose_run_dir(out: str | None, corpus_name: str, root: str | Path = "runs") -> tuple[Path, str]:
    """--out as given (it must not hold a run), else runs/<corpus name>[-N], never reused."""
    if out:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} is a file, not a directory; give a new or empty directory")
        if any((path / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl")):
            raise UsageError(f"{path} already holds a run; continue it with --resume {path} or pick another --out")
        return path, "asked for"
    base = Path(root) / corpus_name
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path, "new" if n == 1 else f"{base} is taken"


class Trainer:
    """One run: set up from a corpus (or a checkpoint to resume), then `run()`."""

    def __init__(self, corpus: Corpus, model_config: ModelConfig, train_config: TrainConfig, run_dir: Path,
                 on_event: OnEvent | None = None, resume: Checkpoint | None = None,
                 auto: tuple[str, ...] = (), init_from: Checkpoint | None = None):
        """`auto`: the model fields (of charrnn.sizing.SIZED) and the weight decay
        (SIZED_DECAY) to choose for this corpus and budget rather than take from the
        configs, and the training fields (SIZED_TRAIN: the batch size) to choose for the
        device; a resumed run keeps its own.
        `init_from`: a loaded checkpoint whose weights start this run (fine-tuning; the
        model_config must be its own), with the vocabulary extended by this corpus's new characters."""
        self.on_event = on_event or (lambda event: None)
        self.config = train_config.with_default_stop()
        self.model_config = model_config
        self.run_dir = Path(run_dir)
        self.corpus = corpus
        self._stop = threading.Event()
        self.group = distributed.current()
        if not self.group.is_main:  # rank 0 alone reports, writes metrics and checkpoints
            self.on_event = lambda event: None

        device_reason, dtype_reason = self._setup_device()
        auto = auto if resume is None else ()  # a resumed run keeps its own choices
        reasons = []
        if "batch_size" in auto:
            batch_size, why = sizing.batch_for(self.device, model_config.cell, self.group.world_size)
            self.config = replace(self.config, batch_size=batch_size)
            reasons.append(why)
        if "eval_every" in auto:  # as many sequences apart whatever the batch
            self.config = replace(self.config, eval_every=sizing.eval_every_for(self.config.batch_size))
        base_vocab = self._setup_data(corpus, resume, init_from)
        choice = None
        if any(k in sizing.SIZED + sizing.SIZED_DECAY for k in auto):
            choice = self._choose_size(model_config, auto)
            self.model_config = replace(model_config, **{k: getattr(choice, k) for k in auto if k in sizing.SIZED})
            self.config = replace(self.config, **{k: getattr(choice, k) for k in auto if k in sizing.SIZED_DECAY})
            reasons.insert(0, choice.reason(len(self.train_ids), self._budget_text()))
        self._setup_model(init_from, base_vocab)
        self.optimizer = self._make_optimizer()
        self.average = WeightAverage(self.model, self.config.ema_decay) if self.config.ema_decay else None
        self.progress = Progress(elapsed_s=choice.probe_s if choice else 0.0)  # the probe spends the budget too
        self.state = None  # carried recurrent state (stateful mode)
        if resume is not None:
            self._restore(resume)
        # Since the last validation: summed train loss (on device: no per-step sync) and its
        # steps, which survive a resume; characters and seconds spent in steps (for chars/s).
        self._loss_sum = torch.tensor(self.progress.window_loss_sum, device=self.device)
        self._loss_steps = self.progress.window_steps
        self._chars, self._train_time = 0, 0.0

        self.on_event(Setup(
            device=str(self.device), device_reason=device_reason,
            dtype=dtype_name(self.dtype), dtype_reason=dtype_reason,
            parameters=count_parameters(self.model), vocab_size=len(self.vocab),
            train_chars=len(self.train_ids), val_chars=len(self.val_ids),
            steps_per_epoch=self.batches.steps_per_epoch, run_dir=str(self.run_dir),
            resumed_step=self.progress.step if resume is not None else None,
            parent=self.parent if init_from is not None else None,
            start_mix=mix.summary() if (mix := self.model.start_mix) else None,
            sizing={"fields": list(auto), "reason": "; ".join(reasons)} if reasons else None,  # not for eval_every alone
            config=asdict(self.config), model_config=asdict(self.model_config),
        ))

    # -- setup, phase by phase: device, data, (size), model, optimizer, restore ------------

    def _setup_device(self) -> tuple[str, str]:
        """The device (this rank's, under DDP) and the autocast dtype; their reasons."""
        device, device_reason = resolve_device(self.config.device)
        self.device = distributed.rank_device(device)
        self.dtype, dtype_reason = resolve_dtype(self.config.dtype, self.device)
        return device_reason, dtype_reason

    def _setup_data(self, corpus: Corpus, resume: Checkpoint | None, init_from: Checkpoint | None) -> Vocab | None:
        """The vocabulary (the run's own, the base model's extended, or the corpus's), the
        train/validation split and the batch layout. Returns the base vocabulary when fine-tuning."""
        base_vocab = None
        if resume is not None:
            self.vocab = Vocab(resume.vocab)
            if resume.corpus.get("sha256") not in (None, corpus.sha256):
                raise DataError(
                    "this corpus differs from the one the run was trained on; give the same files to --resume"
                )
            self.parent = resume.parent
        elif init_from is not None:
            base_vocab = Vocab(init_from.vocab)
            added = "".join(c for c in Vocab.from_data(corpus).chars if c not in base_vocab)
            self.vocab = Vocab("".join(sorted(base_vocab.chars + added)))
            self.parent = {"path": init_from.path, "added_chars": added}
        else:
            self.vocab = Vocab.from_data(corpus)
            self.parent = None
        # The encoded corpus is small (1 byte a character): on a GPU it lives there whole,
        # so a step copies nothing from the host.
        ids = self.vocab.encode_data(corpus).to(self.device)
        self.train_ids, self.val_ids = split(ids, self.config.val_frac)
        self.rows = self.group.rows(self.config.batch_size)  # this rank's streams
        config = self.config
        if config.stateless:
            self.batches = RandomWindows(self.train_ids, config.batch_size, config.seq_len, self.rows)
        elif config.stream_restart > 0:
            self.batches = RestartingStreams(self.train_ids, config.batch_size, config.seq_len,
                                             config.stream_restart, self.rows)
        else:
            self.batches = StatefulBatches(self.train_ids, config.batch_size, config.seq_len, self.rows)
        if len(self.val_ids) < 2:
            raise DataError(f"the validation split has {len(self.val_ids)} character(s); use a longer corpus or a larger --val-frac")
        return base_vocab

    def _setup_model(self, init_from: Checkpoint | None, base_vocab: Vocab | None) -> None:
        """The seeded model (from the base model's weights when fine-tuning) on its device,
        wrapped for DDP when there are several ranks."""
        torch.manual_seed(self.config.seed)
        # The same on every rank: each draws the whole batch's windows and reads its rows.
        self.windows_rng = torch.Generator().manual_seed(self.config.seed + 1)
        self.model = CharRNN(self.model_config, len(self.vocab))
        if init_from is not None:
            self._start_from(init_from.model, base_vocab)
        if self.config.start_mix:  # counted from this run's training split (a fine-tune's own text)
            self.model.start_mix = StartMix.build(self.train_ids, len(self.vocab))
        self.model.to(self.device)
        self.forward = self.model
        if self.group.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP averages the gradients across ranks during backward; clipping then sees the
            # all-reduced gradient, as in one process.
            ids_arg = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids_arg)

    def _start_from(self, weights: dict[str, torch.Tensor], base_vocab: Vocab) -> None:
        """Fine-tuning: every weight from the base model (the averaged ones, if it averaged:
        what it samples with). The embedding and output rows of characters it never saw are
        new: embedding rows as a fresh model draws them, output rows at zero weight and the
        base's lowest bias, so a new character starts as the rarest one and is learned."""
        kept = torch.tensor([self.vocab.chars.index(c) for c in base_vocab.chars])  # base id -> new id
        state = self.model.state_dict()
        for key, value in weights.items():
            if key == "embedding.weight" or key.startswith("head."):
                row = state[key].clone() if key == "embedding.weight" else (
                    torch.zeros_like(state[key]) if key == "head.weight" else torch.full_like(state[key], float(value.min())))
                row[kept] = value
                value = row
            state[key] = value
        self.model.load_state_dict(state)

    def _choose_size(self, model_config: ModelConfig, auto: tuple[str, ...]) -> sizing.Choice:
        """Rank 0 chooses (its probe times this machine) and every rank takes its choice."""
        choice = None
        if self.group.is_main:
            widths = sizing.WIDTHS if "hidden_size" in auto else (model_config.hidden_size,)
            choice = sizing.choose(model_config, self.config, len(self.train_ids), len(self.vocab),
                                   self.device, self.dtype, widths=widths)
        if self.group.world_size > 1:
            text = distributed.broadcast_text(json.dumps(asdict(choice)) if choice else None)
            choice = sizing.Choice(**json.loads(text))
        return choice

    def _budget_text(self) -> str:
        config = self.config
        parts = [f"{config.steps} steps" if config.steps else "", f"{config.epochs:g} epochs" if config.epochs else "",
                 config.time]
        return ", ".join(p for p in parts if p)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices only; fused kernels on CUDA, foreach elsewhere."""
        named = list(self.model.named_parameters())
        decay = [p for name, p in named if p.dim() >= 2 and name != "start_state"]
        no_decay = [p for name, p in named if p.dim() < 2 or name == "start_state"]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fast = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=self.config.learning_rate, betas=(0.9, 0.99), **fast)

    def _restore(self, payload: Checkpoint) -> None:
        # With weight averaging, "model" holds the averaged weights and "train_weights" the raw ones.
        self.model.load_state_dict(payload.train_weights or payload.model)
        if self.average is not None:
            # Without ema_updates, averaging was turned on at this resume: it starts here.
            self.average.load(payload.model, payload.ema_updates or 0)
        self.optimizer.load_state_dict(payload.optimizer)
        if self.model.start_mix is not None and payload.start_mix is not None:
            self.model.start_mix.weights = payload.start_mix["weights"].clone()  # as fit at its last validation
        saved = payload.progress
        self.progress = Progress(**{k: saved[k] for k in Progress.__dataclass_fields__})
        carried = payload.carried_state or []
        if carried and carried[0].shape[1] != self.config.batch_size:
            raise UsageError("--batch-size cannot change when resuming a stateful run")
        # The checkpoint holds the state of all B streams; this rank takes its rows.
        self.state = tuple(s[:, self.rows].to(self.device) for s in carried) or None
        if isinstance(self.batches, RestartingStreams):
            self.batches.cursors = payload.cursors.clone()  # all B streams, as every rank keeps them
        rng = payload.rng
        self.windows_rng.set_state(rng["windows"])  # one window stream, the same on every rank
        if self.group.is_main:  # other ranks keep their own dropout streams
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng.get("cuda"):
                torch.cuda.set_rng_state(rng["cuda"][0], self.device)

    # -- saving -------------------------------------------------------------------------

    def payload(self) -> Checkpoint:
        """Everything resume needs, as the checkpoint that save() writes."""
        self.progress.window_loss_sum = self._loss_sum.item()
        self.progress.window_steps = self._loss_steps
        rng = {"torch": torch.get_rng_state(), "windows": self.windows_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = [torch.cuda.get_rng_state(self.device)]
        carried = [distributed.gather_rows(s.detach()).cpu() for s in self.state] if self.state is not None else []
        extra = {}
        if isinstance(self.batches, RestartingStreams):
            extra["cursors"] = self.batches.cursors.clone()
        if self.model.start_mix is not None:
            extra["start_mix"] = self.model.start_mix.state()
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.average is not None:  # inference uses the average; training resumes from the raw weights
            extra.update(train_weights=weights, ema_updates=self.average.updates)
            weights = self.average.state_dict()
        return Checkpoint(
            model_config=asdict(self.model_config), vocab=self.vocab.chars, model=weights,
            optimizer=self.optimizer.state_dict(), train_config=asdict(self.config),
            progress=asdict(self.progress), carried_state=carried, rng=rng,
            corpus={"name": self.corpus.name, "sources": [str(s) for s in self.corpus.sources],
                    "sha256": self.corpus.sha256, "chars": len(self.train_ids) + len(self.val_ids)},
            parent=self.parent, **extra,
        )

    def save(self, best: bool = False) -> None:
        payload = self.payload()  # collective under DDP: every rank gathers the state
        if not self.group.is_main:
            return
        checkpoint.save(self.run_dir / "last.pt", payload)
        if best:
            checkpoint.save(self.run_dir / "best.pt", payload)

    def _prepare_run_dir(self, resuming: bool) -> None:
        if not self.group.is_main:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = checkpoint.write_problem(err) or err.strerror
            raise CheckpointError(f"cannot create the run directory {self.run_dir}: {problem}") from None
        for stale in self.run_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        checkpoint.write_text(self.run_dir / "config.toml", to_toml(self.model_config, self.config))
        for name in ("metrics.jsonl", "samples.jsonl") if resuming else ():
            # Drop records written after the checkpoint we resume from (a killed run's last eval).
            path = self.run_dir / name
            if path.exists():
                kept = [line for line, record in _read_records(path, self.on_event) if record["step"] <= self.progress.step]
                checkpoint.write_text(path, "".join(line + "\n" for line in kept))

    # -- the loop -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step and save last.pt (what Ctrl-C does)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        config, progress = self.config, self.progress
        self.model.train()
        steps_per_epoch = self.batches.steps_per_epoch
        log_loss, log_steps = torch.zeros((), device=self.device), 0
        last_eval_step = progress.step
        save_every, last_save_s = parse_duration(config.save_every), progress.elapsed_s
        clock, start_elapsed = time.perf_counter(), progress.elapsed_s
        stop_now = False
        with _sigint_requests_stop(self):
            # Inside the handler: a Ctrl-C from the moment config.toml exists finishes a step and saves.
            self._prepare_run_dir(resuming=progress.step > 0)
            while fraction_done(config, progress, steps_per_epoch) < 1.0:
                if stop_now:
                    self.save()
                    raise TrainingInterrupted(
                        f"interrupted at step {progress.step}; last.pt saved. "
                        f"Resume with: charrnn train --resume {self.run_dir}"
                    )
                step_start = time.perf_counter()
                loss, grad_norm, lr = self.step()
                log_loss += loss
                log_steps += 1
                now = time.perf_counter()
                self._train_time += now - step_start
                progress.elapsed_s = start_elapsed + now - clock
                if progress.step % LOG_EVERY == 0:
                    self.on_event(Step(
                        step=progress.step, loss=(log_loss / log_steps).item(), lr=lr,
                        chars_per_s=self._chars / max(self._train_time, 1e-9),
                        fraction=fraction_done(config, progress, steps_per_epoch),
                        epoch=progress.epoch + progress.batch / steps_per_epoch,
                    ))
                    log_loss.zero_()
                    log_steps = 0
                stop_now = self._agree_on_stop()
                done = fraction_done(config, progress, steps_per_epoch) >= 1.0
                if progress.step % config.eval_every == 0 or done:
                    self._validate(lr, float(grad_norm))  # saves last.pt too
                    last_eval_step = progress.step
                    last_save_s = progress.elapsed_s
                elif save_every and progress.elapsed_s - last_save_s >= save_every:
                    # A crash loses at most save_every of work even when validations are far
                    # apart; elapsed_s is the same on every rank, so they save together.
                    self.save()
                    last_save_s = progress.elapsed_s
            if last_eval_step != progress.step or progress.step == 0:
                self._validate(0.0, math.nan)
        return {"run_dir": str(self.run_dir), "steps": progress.step, "best_val_loss": progress.best_val_loss,
                "val_loss": progress.val_loss, "elapsed_s": progress.elapsed_s}

    def step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One training step where the run stands: past the epoch's end, the next epoch; the
        schedule's learning rate; the update; the counters. Returns the loss, the pre-clip
        gradient norm and the learning rate. `run()` is this in a loop with validations,
        saves and stop conditions; scripts/bench.py times it alone."""
        config, progress = self.config, self.progress
        steps_per_epoch = self.batches.steps_per_epoch
        if progress.batch >= steps_per_epoch:
            progress.epoch, progress.batch = progress.epoch + 1, 0
            if isinstance(self.batches, StatefulBatches):
                self.state = None  # fixed streams start each epoch from the start state
        lr = lr_at(config, progress.step, fraction_done(config, progress, steps_per_epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = self.train_step()
        progress.step += 1
        progress.batch += 1
        progress.chars_seen += config.batch_size * config.seq_len
        self._loss_sum += loss
        self._loss_steps += 1
        self._chars += config.batch_size * config.seq_len
        return loss, grad_norm, lr

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next batch; returns the loss and pre-clip gradient norm."""
        config = self.config
        if config.stateless:
            x, y = self.batches.batch(self.windows_rng)
            state = None  # the model's start state
        else:
            if isinstance(self.batches, RestartingStreams):
                x, y, restarted = self.batches.batch(self.windows_rng)
            else:
                x, y = self.batches.batch(self.progress.batch)
                restarted = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            carried = self.state if self.state is not None else self.model.init_state(x.shape[0])
            state = self.model.restart(carried, restarted)
        with autocast(self.device, self.dtype):
            logits, new_state = self.forward(x, state)  # (B, T, V)
        skip = config.burn_in  # predictions made from a (nearly) empty context
        loss = F.cross_entropy(logits[:, skip:].float().flatten(0, 1), y[:, skip:].flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.model.parameters())
        if config.clip_mode == "norm" and config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)  # returns the pre-clip norm
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # measures only
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(params, config.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        if not config.stateless:
            self.state = detach(new_state)
        return loss.detach(), grad_norm.detach()

    def _agree_on_stop(self) -> bool:
        """Whether to stop (Ctrl-C); under DDP every rank takes the same decision and the
        same elapsed time (the largest), so they stop and validate at the same step."""
        if self.group.world_size == 1:
            return self._stop.is_set()
        flags = torch.tensor([float(self._stop.is_set()), self.progress.elapsed_s], dtype=torch.float64,
                             device=self.device)
        distributed.all_reduce(flags, "max")
        self.progress.elapsed_s = flags[1].item()
        return bool(flags[0].item())

    def _averaged(self):
        """A block in which the model holds the weights that validation and samples use."""
        return self.average.applied() if self.average is not None else nullcontext()

    def _validate(self, lr: float, grad_norm: float) -> None:
        progress = self.progress
        with self._averaged():
            if self.model.start_mix is not None:  # the weights that suit the weights validated
                self.model.start_mix.fit(self.model, self.val_ids, self.dtype)
            result = evaluate(self.model, self.val_ids, self.device, self.dtype)
        if not math.isfinite(result.loss):
            raise CharRNNError(f"validation loss became {result.loss} at step {progress.step}; "
                               "lower --learning-rate or keep --grad-clip on")
        progress.val_loss = result.loss
        improved = result.loss < progress.best_val_loss
        if improved:
            progress.best_val_loss = result.loss
        steps = self._loss_steps
        distributed.all_reduce(self._loss_sum)
        self._loss_sum /= self.group.world_size
        record = Validation(
            step=progress.step, epoch=round(progress.epoch + progress.batch / self.batches.steps_per_epoch, 4),
            train_loss=self._loss_sum.item() / steps if steps else math.nan,
            val_loss=result.loss, val_bpc=result.bpc,
            best_val_loss=progress.best_val_loss, lr=lr, grad_norm=grad_norm,
            chars_per_s=self._chars / self._train_time if self._train_time else math.nan,
            elapsed_s=round(progress.elapsed_s, 3),
        )
        self._loss_sum.zero_()
        self._loss_steps = self._chars = 0
        self._train_time = 0.0
        self.save(best=improved)
        if not self.group.is_main:
            return
        checkpoint.append_line(self.run_dir / "metrics.jsonl", json.dumps(asdict(record)))
        self.on_event(record)
        if self.config.sample_length:
            sample = Sample(progress.step, self._sample_text())
            checkpoint.append_line(self.run_dir / "samples.jsonl", json.dumps(asdict(sample)))  # for charrnn viz
            self.on_event(sample)

    def _sample_text(self) -> str:
        generator = torch.Generator(self.device).manual_seed(self.config.seed + self.progress.step)
        settings = SampleSettings(length=self.config.sample_length, temperature=0.8)
        with self._averaged():
            text = sample_text(self.model, self.vocab, settings, generator, self.device)
        self.model.train()
        return text


@contextmanager
def _sigint_requests_stop(trainer: Trainer):
    """First Ctrl-C: finish the step, save, stop. A second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop.is_set():
            raise KeyboardInterrupt
        trainer.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_records(path: Path, on_event: OnEvent) -> list[tuple[str, dict]]:
    """The (line, record) pairs of metrics.jsonl or samples.jsonl. A torn last line (a crash or a full disk
    mid-write) is dropped with a warning; damage anywhere else is an error naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}; move it away to resume without its history") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                on_event(Notice(f"{path}: dropped its last line, cut off mid-write"))
                break
            raise DataError(f"{path} is damaged at line {number} (not a record with a step); "
                            "fix or remove that line, or move the file away, to resume") from None
        records.append((line, record))
    return records


def resume_configs(payload: Checkpoint, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a run to resume: as saved, with the train flags given now on top."""
    model_config = build(ModelConfig, payload.model_config)
    train_config = build(TrainConfig, payload.train_config, overrides)
    return model_config, train_config
