"""`charrnn train` (its flags derived from the config classes), `charrnn prepare`, and
their progress shown on stderr."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from charrnn.cli.common import PANEL_MODEL, PANEL_RUN, PANEL_TRAIN, _err, _errors_to_exit_codes, _json, app
from charrnn.config import ModelConfig, TrainConfig, stop_text
from charrnn.errors import UsageError


def train(
    corpus: Optional[List[str]] = typer.Argument(None, help="Text files, directories or - (stdin). None: the embedded Python docs.", show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with model and train tables (see configs/).", rich_help_panel=PANEL_RUN),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory.", show_default="runs/<corpus name>, never reusing one", rich_help_panel=PANEL_RUN),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory exactly where its last.pt left off.", rich_help_panel=PANEL_RUN),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Fine-tune: start a new run from this run's (or .pt's) weights; new characters extend its vocabulary.", rich_help_panel=PANEL_RUN),
    encoding: str = typer.Option("utf-8", help="Text encoding of the corpus files.", rich_help_panel=PANEL_RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or samples on stderr.", rich_help_panel=PANEL_RUN),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout at the end.", rich_help_panel=PANEL_RUN),
    dry_run: bool = typer.Option(False, "--dry-run", help="Make every decision (the size for the text and budget included, with its few seconds of probe), print them and stop: no training and no run directory (the corpus is prepared and cached as for a run).", rich_help_panel=PANEL_RUN),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also write the metrics and samples as TensorBoard events to this directory (needs the tensorboard package, charrnn's tensorboard extra).", rich_help_panel=PANEL_RUN),
    **settings,  # one flag per ModelConfig / TrainConfig field, derived from the fields (see below)
):
    """Train a model on a corpus (or continue one with --resume, or fine-tune one with --init-from)."""
    with _errors_to_exit_codes():
        from charrnn.training import run

        sinks = [_TrainView(quiet)]
        if tensorboard is not None and not dry_run and int(os.environ.get("RANK", "0")) == 0:
            from charrnn.viz.tensorboard import TensorBoardLog

            sinks.append(TensorBoardLog(tensorboard))
        try:
            summary = run.train(corpus, config=config, out=out, resume=resume, init_from=init_from, encoding=encoding,
                                on_event=lambda event: [sink(event) for sink in sinks], dry_run=dry_run, **settings)
        finally:
            for sink in sinks:
                sink.close()
        if summary is None:  # another rank under torchrun: rank 0 reports
            return
        where = summary.pop("run_dir_reason")
        if dry_run:
            _err("dry run: nothing trained, no run directory written; the same command without --dry-run trains this")
            if json_out:
                print(_json(summary))
            return
        _err(f"done: {summary['steps']} steps in {summary['elapsed_s']:.0f}s, best val loss "
             f"{summary['best_val_loss']:.4f} nats/char; run directory {summary['run_dir']} ({where})")
        _err(f"sample it with: charrnn sample --checkpoint {summary['run_dir']}")
        if json_out:
            print(_json(summary))


@app.command()
def prepare(
    corpus: List[str] = typer.Argument(..., help="Text files, directories or - (stdin).", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the id file here (e.g. a cluster's shared disk) instead of the cache; charrnn train FILE.ids then takes it.", show_default="the cache: $CHARRNN_CACHE, $XDG_CACHE_HOME/charrnn or ~/.cache/charrnn"),
    encoding: str = typer.Option("utf-8", help="Text encoding of the corpus files."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: the id file, characters, vocabulary, bytes, sha256, whether it was reused."),
):
    """Encode a corpus once into an id file that training, eval and every torchrun rank memory-map (train does this by itself; this names the file)."""
    with _errors_to_exit_codes():
        import time

        from charrnn.data.encode import prepare as prepare_corpus

        if out is not None and (out.is_dir() or out.suffix != ".ids"):
            raise UsageError(f"--out {out}: name a file ending in .ids")
        started = time.perf_counter()
        with _PrepareBar() as bar:
            corpus = prepare_corpus(corpus, encoding, out=out, on_progress=bar, on_notice=lambda m: _err(f"warning: {m}"))
        seconds = time.perf_counter() - started
        if corpus.path is None:
            raise UsageError("this corpus is encoded in memory (the embedded one, or --encoding other than utf-8); "
                             "convert it to a UTF-8 file to prepare it")
        for skipped in corpus.skipped:
            _err(f"warning: skipped {skipped}: not a UTF-8 text file")
        report = {"path": str(corpus.path), "chars": len(corpus.ids), "vocab_size": len(corpus.vocab),
                  "dtype": str(corpus.ids.dtype).removeprefix("torch."), "bytes": corpus.size,
                  "file_bytes": corpus.path.stat().st_size, "sha256": corpus.sha256, "reused": corpus.reused,
                  "seconds": round(seconds, 3)}
        if json_out:
            print(_json(report))
        else:
            print(corpus.path)
            _err(f"{'reused' if corpus.reused else 'prepared'}: {len(corpus.ids):,} characters, vocabulary "
                 f"{len(corpus.vocab)}, {report['file_bytes']:,} bytes, {seconds:.1f}s")


def _setting_flags(cls, panel: str) -> list[inspect.Parameter]:
    """A `--flag` for each field of a config class, from the field's own declaration
    (charrnn.config.setting): its help, spellings and default as shown in --help. None
    means "not given", so the TOML file's value or the default applies."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    parameters = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        names = meta["flags"] or ("--" + field.name.replace("_", "-"),)
        shown = meta["show"] if meta["show"] is not None else str(field.default)
        option = typer.Option(None, *names, help=meta["help"], show_default=shown, rich_help_panel=panel)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[kinds[field.type]]))
    return parameters


_fixed = [p for p in inspect.signature(train).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
train.__signature__ = inspect.Signature(_fixed + _setting_flags(ModelConfig, PANEL_MODEL)
                                        + _setting_flags(TrainConfig, PANEL_TRAIN))
app.command()(train)


class _PrepareBar:
    """A progress bar on stderr while a corpus is prepared (charrnn.data.prepared), shown only
    when it takes over a second."""

    def __init__(self):
        self.bar = None
        self.phase = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            from tqdm import tqdm

            self.phase = phase
            self.bar = tqdm(total=total, desc=f"preparing: {phase}", unit="B", unit_scale=True, delay=1.0,
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _TrainView:
    """Renders training events on stderr: a tqdm bar, eval lines and samples."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.preparing = _PrepareBar()

    def __call__(self, event) -> None:
        from charrnn import events

        if isinstance(event, events.Preparing):
            if not self.quiet:
                self.preparing(event.phase, event.done, event.total)
        elif isinstance(event, events.Setup):
            self.preparing.close()
            self._setup(dataclasses.asdict(event))
        elif isinstance(event, events.Notice):
            self._write(f"warning: {event.message}" if event.warning else event.message)
        elif self.quiet:
            return
        elif isinstance(event, events.Step):
            if sys.stderr.isatty():  # a log file gets the eval lines, not bar redraws
                self._bar(event)
        elif isinstance(event, events.Validation):
            self._write(f"step {event.step}: train loss {event.train_loss:.4f}, val loss {event.val_loss:.4f} "
                        f"({event.val_bpc:.3f} bpc), best {event.best_val_loss:.4f}, {event.chars_per_s:,.0f} chars/s")
        elif isinstance(event, events.Sample):
            self._write("  | " + event.text.replace("\n", "\n  | "))

    def _setup(self, info: dict) -> None:
        model = info["model_config"]
        config = info["config"]
        lines = [
            f"run directory: {info['run_dir']}" + (f" (resuming at step {info['resumed_step']})" if info["resumed_step"] else ""),
            f"device: {info['device']} ({info['device_reason']}); autocast: {info['dtype']} ({info['dtype_reason']})",
            f"model: {model['num_layers']}x{model['hidden_size']} {model['cell']}, dropout {model['dropout']:g}, "
            f"{info['parameters']:,} parameters, vocabulary {info['vocab_size']}",
            f"data: {info['train_chars']:,} train / {info['val_chars']:,} validation characters; "
            f"{'stateless' if config['stateless'] else 'stateful'} batches of {config['batch_size']}x{config['seq_len']}, "
            f"{info['steps_per_epoch']:,} steps per epoch",
            *([f"validation: {info['val_read']:,} of the {info['val_chars']:,} validation characters each time "
               "(the same windows, drawn once from the seed; charrnn eval reads them all)"] if info.get("val_read") else []),
            *([f"prepared: {info['prepared']['path']} ({'reused' if info['prepared']['reused'] else 'written now'})"]
              if info.get("prepared") else []),
            "stop: " + stop_text(config["steps"], config["epochs"], config["time"]),
        ]
        if info.get("start_mix"):
            mix = info["start_mix"]
            lines.append(f"start mix: {mix['grams']:,} n-grams of up to {mix['order']} characters of the training text, "
                         f"mixed into the first {mix['positions']} predictions read from the start state (--no-start-mix: off)")
        if info.get("parent"):
            added = info["parent"]["added_chars"]
            lines.insert(2, f"init: weights from {info['parent']['path']}; " + (
                f"vocabulary extended by {len(added)} character(s): {added!r}" if added else "no new characters"))
        if info.get("sizing"):
            chosen = {"hidden_size": f"{model['hidden_size']} units", "dropout": f"dropout {model['dropout']:g}",
                      "weight_drop": f"weight drop {model['weight_drop']:g}",
                      "weight_decay": f"weight decay {config['weight_decay']:g}",
                      "ema_decay": (f"weight average {config['ema_decay']:g}" if config["ema_decay"]
                                    else "no weight average"),
                      "learning_rate": f"peak rate {config['learning_rate']:g}",
                      "batch_size": f"batch {config['batch_size']}"}  # eval_every follows the batch
            fields = [k for k in info["sizing"]["fields"] if k in chosen]
            flags = " / ".join("--" + k.replace("_", "-") for k in fields)
            what = ", ".join(chosen[k] for k in fields)
            lines.insert(3, f"size: {what} (auto: {info['sizing']['reason']}; {flags} to choose)")
        for line in lines:
            _err(line)

    def _bar(self, info) -> None:  # an events.Step
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, unit="‰", dynamic_ncols=True, mininterval=0.5,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        self.bar.n = min(1000, int(info.fraction * 1000))
        self.bar.set_postfix_str(
            f"step {info.step} ep {info.epoch:.2f} loss {info.loss:.3f} lr {info.lr:.1e} "
            f"{info.chars_per_s:,.0f} ch/s", refresh=False)
        self.bar.refresh()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            _err(text)

    def close(self) -> None:
        self.preparing.close()
        if self.bar is not None:
            self.bar.close()
