"""The training loop over a resolved run (charrnn.training.plan.Plan): truncated BPTT with AdamW,
clipping, warmup + cosine decay, validation, checkpoints.

(The module is `trainer`, not `train`, so that `charrnn.train` stays the API's function:
importing a submodule named `train` would rebind that attribute of the package.)

A "step" is one optimizer step, everywhere: `Trainer.step()` takes one, `Progress.step`
counts them, and the `Step` event reports them every LOG_EVERY. Progress reaches the
caller through `on_event(event)`, typed events from charrnn.events: Setup (once), Step,
Validation (the record appended to metrics.jsonl), Sample (drawn at each validation,
appended to samples.jsonl), Notice. The library never prints.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from charrnn import distributed
from charrnn.config import parse_duration, to_toml
from charrnn.data.batches import RestartingStreams, StatefulBatches
from charrnn.data.text import Vocab
from charrnn.device import autocast, dtype_name, optimizer_kernels
from charrnn.errors import CharRNNError, TrainingInterrupted
from charrnn.events import Notice, OnEvent, Sample, Setup, Step, Validation
from charrnn.infer.evaluate import evaluate, evaluate_windows
from charrnn.infer.sample import SampleSettings, sample_text
from charrnn.model.network import CharRNN, count_parameters, detach
from charrnn.model.startmix import StartMix
from charrnn.store.rundir import RunDir
from charrnn.training.average import WeightAverage
from charrnn.training.finetune import extended_weights
from charrnn.training.plan import Plan
from charrnn.training.schedule import fraction_done, lr_at
from charrnn.training.trainstate import Progress, TrainState

LOG_EVERY = 10


class Trainer:
    """One run: set up from its Plan (new, resumed or fine-tuned), then `run()`."""

    def __init__(self, plan: Plan, on_event: OnEvent | None = None):
        self.plan, self.config = plan, plan.config
        self.device, self.dtype = plan.device, plan.dtype
        self.group = distributed.current()
        # Rank 0 alone reports, writes metrics and checkpoints.
        self.on_event = on_event if on_event is not None and self.group.is_main else (lambda event: None)
        self.run_dir = RunDir(plan.run_dir)
        self._stop = threading.Event()
        self.state = self._setup_state()
        if plan.resume is not None:
            self.state.restore(plan.resume, self.config.batch_size, self.group.rows(self.config.batch_size),
                               self.group.is_main)
        self.forward = self._setup_ddp(self.state.model)
        # Characters and seconds spent in steps since the last validation (for chars/s).
        self._chars, self._train_time = 0, 0.0
        self.on_event(Setup(
            device=str(self.device), device_reason=plan.device_reason,
            dtype=dtype_name(self.dtype), dtype_reason=plan.dtype_reason,
            parameters=count_parameters(self.state.model), vocab_size=len(plan.vocab),
            train_chars=len(plan.train_ids), val_chars=len(plan.val_ids),
            steps_per_epoch=self.state.batches.steps_per_epoch, run_dir=str(plan.run_dir),
            resumed_step=self.state.progress.step if plan.resume is not None else None,
            parent=plan.parent if plan.base is not None else None, sizing=plan.sizing,
            start_mix=self.state.prior.summary() if self.state.prior else None,
            val_read=None if plan.val_windows is None else plan.val_windows.shape[0] * (plan.val_windows.shape[1] - 1),
            prepared={"path": str(plan.corpus.path), "reused": plan.corpus.reused} if plan.corpus.path else None,
            config=asdict(self.config), model_config=asdict(plan.model_config),
        ))

    # -- setup: values from the plan ------------------------------------------------------

    def _setup_state(self) -> TrainState:
        """The seeded model (from the base model's weights when fine-tuning), its optimizer
        and average, the start mix counted from this run's training split, fresh progress."""
        plan, config = self.plan, self.config
        torch.manual_seed(config.seed)
        # The same on every rank: each draws the whole batch's windows and reads its rows.
        windows_rng = torch.Generator().manual_seed(config.seed + 1)
        model = CharRNN(plan.model_config, len(plan.vocab))
        if plan.base is not None:
            model.load_state_dict(extended_weights(plan.base.model, Vocab(plan.base.vocab), plan.vocab,
                                                   model.state_dict()))
        prior = StartMix.build(plan.train_ids, len(plan.vocab)) if config.start_mix else None
        model.to(self.device)
        average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
        # The batch layout comes resolved from the plan; from here on it is the state's (its cursors move).
        return TrainState(model, self._setup_optimizer(model), average, Progress(elapsed_s=plan.probe_s),
                          windows_rng, plan.batches, prior, window_loss=torch.zeros((), device=self.device))

    def _setup_optimizer(self, model: CharRNN) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices only, in the fastest kernels the device has."""
        named = list(model.named_parameters())
        decay = [p for name, p in named if p.dim() >= 2 and name != "start_state"]
        no_decay = [p for name, p in named if p.dim() < 2 or name == "start_state"]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.learning_rate, betas=(0.9, self.config.beta2),
                                 **optimizer_kernels(self.device.type))

    def _setup_ddp(self, model: CharRNN):
        """What the step calls: the model, or it wrapped for DDP when there are several ranks.
        DDP averages the gradients across ranks during backward; clipping then sees the
        all-reduced gradient, as in one process."""
        if self.group.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- the loop -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step and save last.pt (what Ctrl-C does)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        config, progress = self.config, self.state.progress
        steps_per_epoch = self.state.batches.steps_per_epoch
        log_loss, log_steps = torch.zeros((), device=self.device), 0
        last_eval_step = progress.step
        save_every, last_save_s = parse_duration(config.save_every), progress.elapsed_s
        clock, start_elapsed = time.perf_counter(), progress.elapsed_s
        stop_now = False
        with _sigint_requests_stop(self):
            # Inside the handler: a Ctrl-C from the moment config.toml exists finishes a step and saves.
            if self.group.is_main:
                self.run_dir.prepare(to_toml(self.plan.model_config, config),
                                     progress.step if progress.step > 0 else None,
                                     lambda message: self.on_event(Notice(message)))
            while fraction_done(config, progress, steps_per_epoch) < 1.0:
                if stop_now:
                    self.save()
                    raise TrainingInterrupted(f"interrupted at step {progress.step}; last.pt saved. "
                                              f"Resume with: charrnn train --resume {self.plan.run_dir}")
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
                # Under DDP every rank takes the same decision and elapsed time, so they
                # stop and validate at the same step.
                stop_now, progress.elapsed_s = distributed.agree(self._stop.is_set(), progress.elapsed_s, self.device)
                done = fraction_done(config, progress, steps_per_epoch) >= 1.0
                if progress.step % config.eval_every == 0 or done:
                    self._validate(lr, float(grad_norm))  # saves last.pt too
                    last_eval_step, last_save_s = progress.step, progress.elapsed_s
                elif save_every and progress.elapsed_s - last_save_s >= save_every:
                    # A crash loses at most save_every of work even when validations are far
                    # apart; elapsed_s is the same on every rank, so they save together.
                    self.save()
                    last_save_s = progress.elapsed_s
            if last_eval_step != progress.step or progress.step == 0:
                self._validate(0.0, math.nan)
        return {"run_dir": str(self.plan.run_dir), "steps": progress.step, "best_val_loss": progress.best_val_loss,
                "val_loss": progress.val_loss, "elapsed_s": progress.elapsed_s}

    def step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step where the run stands (past the epoch's end, the next epoch) at
        the schedule's learning rate. Returns the loss, the pre-clip gradient norm and the
        learning rate. scripts/bench.py times it alone."""
        config, state, progress = self.config, self.state, self.state.progress
        batches = self.state.batches
        if progress.batch >= batches.steps_per_epoch:
            progress.epoch, progress.batch = progress.epoch + 1, 0
            if isinstance(batches, StatefulBatches):
                state.carried = None  # fixed streams start each epoch from the start state
        lr = lr_at(config, progress.step, fraction_done(config, progress, batches.steps_per_epoch))
        for group in state.optimizer.param_groups:
            group["lr"] = lr

        if config.stateless:
            x, y = batches.batch(state.windows_rng)
            start = None  # the model's start state
        else:
            if isinstance(batches, RestartingStreams):
                x, y, restarted = batches.batch(state.windows_rng)
            else:
                x, y = batches.batch(progress.batch)
                restarted = torch.zeros(x.shape[0], dtype=torch.bool)
            carried = state.carried if state.carried is not None else state.model.init_state(x.shape[0])
            start = state.model.restart(carried, restarted.to(self.device))
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # ids mapped on the host
        with autocast(self.device, self.dtype):
            logits, new_state = self.forward(x, start)  # (B, T, V)
        skip = config.burn_in  # predictions made from a (nearly) empty context
        loss = F.cross_entropy(logits[:, skip:].float().flatten(0, 1), y[:, skip:].flatten())
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip(list(state.model.parameters()))
        state.optimizer.step()
        if state.average is not None:
            state.average.update()
        if not config.stateless:
            state.carried = detach(new_state)

        progress.step += 1
        progress.batch += 1
        progress.chars_seen += config.batch_size * config.seq_len
        progress.window_steps += 1
        state.window_loss += loss.detach()
        self._chars += config.batch_size * config.seq_len
        return loss.detach(), grad_norm.detach(), lr

    def _clip(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip the gradients as config says; returns the pre-clip global norm."""
        config = self.config
        if config.clip_mode == "norm" and config.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # measures only
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(params, config.grad_clip)
        return grad_norm

    # -- validation and saving ----------------------------------------------------------

    def _averaged(self):
        """A block in which the model holds the weights that validation and samples use."""
        return self.state.average.applied() if self.state.average is not None else nullcontext()

    def _validate(self, lr: float, grad_norm: float) -> None:
        state, progress, val_ids = self.state, self.state.progress, self.plan.val_ids
        with self._averaged():
            if state.prior is not None:  # the weights that suit the weights validated
                state.prior.fit(state.model, val_ids if self.plan.val_reader is None else self.plan.val_reader, self.dtype)
            if self.plan.val_windows is not None:  # a long split: the same bounded windows every time
                result = evaluate_windows(state.model, self.plan.val_windows, self.device, self.dtype, prior=state.prior)
            else:
                result = evaluate(state.model, val_ids, self.device, self.dtype, prior=state.prior)
        if not math.isfinite(result.loss):
            raise CharRNNError(f"validation loss became {result.loss} at step {progress.step}; "
                               "lower --learning-rate or keep --grad-clip on")
        progress.val_loss = result.loss
        improved = result.loss < progress.best_val_loss
        progress.best_val_loss = min(progress.best_val_loss, result.loss)
        distributed.all_reduce(state.window_loss)
        state.window_loss /= self.group.world_size
        steps = progress.window_steps
        record = Validation(
            step=progress.step, epoch=round(progress.epoch + progress.batch / self.state.batches.steps_per_epoch, 4),
            train_loss=state.window_loss.item() / steps if steps else math.nan,
            val_loss=result.loss, val_bpc=result.bpc, best_val_loss=progress.best_val_loss, lr=lr,
            grad_norm=grad_norm, chars_per_s=self._chars / self._train_time if self._train_time else math.nan,
            elapsed_s=round(progress.elapsed_s, 3),
        )
        state.window_loss.zero_()
        progress.window_steps = self._chars = 0
        self._train_time = 0.0
        self.save(best=improved)
        if not self.group.is_main:
            return
        self.run_dir.append("metrics.jsonl", asdict(record))
        self.on_event(record)
        if self.config.sample_length:
            sample = Sample(progress.step, self._sample_text())
            self.run_dir.append("samples.jsonl", asdict(sample))  # for charrnn viz
            self.on_event(sample)

    def _sample_text(self) -> str:
        generator = torch.Generator(self.device).manual_seed(self.config.seed + self.state.progress.step)
        settings = SampleSettings(length=self.config.sample_length, temperature=0.8)
        with self._averaged():
            return sample_text(self.state.model, self.plan.vocab, settings, generator, self.device, self.state.prior)

    def save(self, best: bool = False) -> None:
        """last.pt (and best.pt): a collective under DDP, written by rank 0."""
        plan = self.plan
        payload = self.state.checkpoint(model_config=asdict(plan.model_config), vocab=plan.vocab.chars,
                                        train_config=asdict(self.config), corpus=plan.corpus_record(),
                                        parent=plan.parent)
        if self.group.is_main:
            self.run_dir.save(payload, best)


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
