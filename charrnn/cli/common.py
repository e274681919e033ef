"""Command-line interface: flags -> config -> one library call -> output.

stdout carries data only (generated text, eval results, --json); progress, samples
during training, warnings and the resolved setup go to stderr. Exit codes: 0 ok,
1 a domain error, 2 a usage error, 130 interrupted (Ctrl-C). The only module that
prints or exits.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from charrnn.version import __version__
from charrnn.config import (EVAL_STREAMS, MAX_BATCH, DynamicSettings, ModelConfig, TrainConfig, check_seed, check_streams,
                            stop_text)
from charrnn.errors import CharRNNError, TextError, UsageError, check_text

app = typer.Typer(
    name="charrnn",
    help="Learn to write like any text, one character at a time: train, sample, eval.",
    add_completion=True,  # charrnn --install-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_debug = bool(os.environ.get("CHARRNN_DEBUG"))


def _flags_take_no_value() -> None:
    """Typer 0.2x prints `<bool>` after on/off flags in --help, as if they took a value."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich


_flags_take_no_value()


def _err(message: str) -> None:
    print(_shown(message), file=sys.stderr, flush=True)


def _shown(text: str) -> str:
    """text as the terminal can show it: a file name's byte that is not UTF-8 (which Python
    keeps as a surrogate) as \\xFF, any other lone surrogate as \\uD800."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json(value) -> str:
    """One JSON line for stdout, every string in it as _shown gives it (a file name that is
    not UTF-8 would otherwise leave a lone surrogate's escape, which strict parsers refuse)."""
    def shown(v):
        if isinstance(v, str):
            return _shown(v)
        if isinstance(v, dict):
            return {shown(k): shown(x) for k, x in v.items()}
        return [shown(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(shown(value))


def _prime_text(prime: str) -> str:
    """--prime's text: itself, or standard input's for "-" (read as UTF-8); refused (exit 2,
    naming --prime) where it is not valid Unicode, as a byte of argv that is not UTF-8 is."""
    if prime != "-":
        return check_text(prime, "--prime")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"--prime - (standard input) is not valid UTF-8: first bad byte at offset {err.start}; "
                        "give text in UTF-8") from None


@contextmanager
def _errors_to_exit_codes():
    """Map library errors to one line on stderr and an exit code (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except CharRNNError as err:
        if _debug:
            raise
        _err(f"error: {err}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        if _debug:
            raise
        _err("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(0) from None
    except Exception as err:  # an unexpected failure: still one line unless --debug
        if _debug:
            raise
        if _out_of_memory(err):
            _err("error: not enough memory for this model and batch; lower --batch-size, --seq-len, "
                 "--hidden-size or --num-samples, or use a device with more memory")
            raise typer.Exit(1) from None
        if _no_bf16_lstm(err):
            _err("error: this CPU cannot run PyTorch's bf16 LSTM kernels (oneDNN needs AVX-512 for them); "
                 "use --dtype fp32, or auto, which picks bf16 only where it runs fast")
            raise typer.Exit(1) from None
        _err(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _out_of_memory(err: Exception) -> bool:
    """Python's MemoryError, torch.OutOfMemoryError (CUDA), or the CPU allocator's refusal."""
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


def _no_bf16_lstm(err: Exception) -> bool:
    """oneDNN's refusal of a bf16 LSTM on a CPU without AVX-512 (--dtype bf16 asked for)."""
    return isinstance(err, RuntimeError) and "primitive descriptor for the LSTM" in str(err)


def _silence_stdout() -> None:
    """After a closed pipe (`| head`), point stdout at /dev/null so exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _version(value: bool) -> None:
    if value:
        print(f"charrnn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (also accepted after any command)."),
):
    """charrnn: character-level LSTM / GRU / RNN language models."""
    global _debug
    _debug = _debug or debug


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


# -- train -------------------------------------------------------------------------------

DYN = DynamicSettings
PANEL_MODEL = "Model (stored in the checkpoint)"
PANEL_TRAIN = "Training"
PANEL_RUN = "Run and output"


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

        from charrnn.data.prepared import prepare as prepare_corpus

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


# -- sample ----------------------------------------------------------------------------

def _load(checkpoint_path: Optional[Path], device: str):
    """The trained model (charrnn.infer.api.Model) these commands read, saying which when it was not named."""
    from charrnn.infer import api
    from charrnn.store import checkpoint

    if checkpoint_path is None:
        checkpoint_path = checkpoint.latest_run()
        _err(f"checkpoint: {checkpoint.resolve(checkpoint_path)} (most recent run; pass --checkpoint to choose)")
    return api.load(checkpoint_path, device)


@app.command()
def sample(
    checkpoint_path: Optional[Path] = typer.Option(None, "--checkpoint", "-m", help="A .pt file or a run directory (its best.pt).", show_default="the most recent run under runs/"),
    prime: str = typer.Option("", "--prime", "-p", help="Text to start from, echoed before the continuation; - reads it from stdin."),
    length: int = typer.Option(500, "--length", "-n", help="New characters per sample."),
    temperature: float = typer.Option(0.8, "--temperature", "-T", help="Below 1 safer, above 1 wilder; 0 = greedy (argmax)."),
    top_k: int = typer.Option(0, help="Sample only from the k likeliest characters (0 = off)."),
    top_p: float = typer.Option(1.0, help="Sample from the smallest set of characters with this total probability (1 = off)."),
    min_p: float = typer.Option(0.0, help="Drop characters less likely than this times the likeliest one (0 = off)."),
    frequency_penalty: float = typer.Option(0.0, help="-2 to 2: lower a character's logit by this for each time this sample has drawn it (OpenAI's)."),
    presence_penalty: float = typer.Option(0.0, help="-2 to 2: lower the logit of any character this sample has drawn (OpenAI's)."),
    logit_bias: str = typer.Option("", help="CHAR=VALUE,... added to those characters' logits, -100 to 100 (-100 bans one); \\n, \\, and \\= for newline, comma, equals."),
    seed: Optional[int] = typer.Option(None, help="Random seed: same seed, same text.", show_default="random, printed on stderr"),
    num_samples: int = typer.Option(1, "--num-samples", "-s", help="Samples generated together as one batch."),
    stop: str = typer.Option("", help="End a sample once it has written this string (included)."),
    unknown: Unknown = typer.Option(Unknown.error, help="Characters of --prime the model does not know: error or skip."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per sample instead of raw text."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="Matmul precision for many streams: auto (bf16 where fast), fp32 or bf16."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Sample an exported .onnx file with onnxruntime instead (one sample, temperature and seed; no PyTorch model code)."),
):
    """Generate text from a trained model, streamed to stdout."""
    if onnx is not None:
        return _sample_onnx(onnx, prime, length, temperature, seed, stop, unknown)
    with _errors_to_exit_codes():
        import torch

        from charrnn.infer.sample import SampleSettings, check_num_samples, parse_logit_bias

        settings = SampleSettings(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                                  stop=_unescape(check_text(stop, "--stop")), min_p=min_p,
                                  frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        settings.validate()
        check_num_samples(num_samples)
        if seed is not None:
            check_seed(seed)
        prime = _prime_text(prime)
        model = _load(checkpoint_path, device)
        if logit_bias:
            settings = dataclasses.replace(settings, logit_bias=parse_logit_bias(model.vocab, check_text(logit_bias, "--logit-bias")))
        prime_ids, dropped = model.vocab.encode(prime, unknown.value, "--prime")
        if dropped:
            _err(f"warning: dropped {dropped} unknown character(s) from --prime")
        echo = model.vocab.decode(prime_ids)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            _err(f"seed: {seed}")
        texts = [""] * num_samples
        stream = sys.stdout
        if not json_out:
            stream.write(echo)
            stream.flush()
        for chars in model.generate(prime_ids, settings, num_samples, seed, dtype):
            for n, char in enumerate(chars):
                texts[n] += char
            if not json_out and chars[0]:
                stream.write(chars[0])
                stream.flush()
        if json_out:
            for n, text in enumerate(texts):
                stream.write(json.dumps({"sample": n, "seed": seed, "prime": echo, "text": text,
                                         "chars": len(text), "temperature": temperature}) + "\n")
        else:
            for text in texts[1:]:
                stream.write("\n\n" + echo + text)
        stream.flush()


def _sample_onnx(path: Path, prime: str, length: int, temperature: float, seed: Optional[int], stop: str,
                 unknown: Unknown) -> None:
    with _errors_to_exit_codes():
        from charrnn.export.onnx import OnnxModel
        from charrnn.infer.sample import check_temperature

        check_temperature(temperature)
        if length < 0:
            raise UsageError(f"--length must be >= 0, not {length}")
        stop = check_text(stop, "--stop")
        prime = _prime_text(prime)
        model = OnnxModel(path)
        ids = model.encode(prime, unknown.value)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
            _err(f"seed: {seed}")
        check_seed(seed)
        sys.stdout.write("".join(model.vocabulary[i] for i in ids))
        for char in model.stream(ids, length, temperature, seed, _unescape(stop)):
            sys.stdout.write(char)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def _unescape(text: str) -> str:
    """Let --stop '\\n\\n' mean two newlines (shells make real newlines awkward to type)."""
    return re.sub(r"\\(n|t|\\)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# -- eval --------------------------------------------------------------------------------

@app.command("eval")
def eval_(
    files: List[str] = typer.Argument(..., help="Text files (or - for stdin) to score, as one text.", show_default=False),
    checkpoint_path: Optional[Path] = typer.Option(None, "--checkpoint", "-m", help="A .pt file or a run directory (its best.pt).", show_default="the most recent run under runs/"),
    unknown: Unknown = typer.Option(Unknown.error, help="Characters the model does not know: error, or skip (and count them)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a line of text."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the files."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="Precision: auto (as training picks), fp32, bf16 or fp16."),
    streams: int = typer.Option(EVAL_STREAMS, help="Parts of the text scored side by side, each read from the start state: 64 as training's validation (eval of the validation split gives its figure); fewer give each character more context (a lower loss, slower); 1 reads the text as one sequence, as papers report bpc. Each part is at least 1,024 characters. For the plain figure; --dynamic reads in 8."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Also score with dynamic evaluation (Krause et al. 2018): after each segment the model takes a gradient step on it, adapting to the text as it reads. A different protocol from plain eval, reported beside it; the checkpoint is not changed.", rich_help_panel="Dynamic evaluation"),
    step_size: float = typer.Option(DYN.step_size, help="Dynamic: RMS-normalised step size (0 = static).", rich_help_panel="Dynamic evaluation"),
    decay: float = typer.Option(DYN.decay, help="Dynamic: pull toward the trained weights per step.", rich_help_panel="Dynamic evaluation"),
    segment: int = typer.Option(DYN.segment, help="Dynamic: characters scored between two steps.", rich_help_panel="Dynamic evaluation"),
):
    """Score text: loss (nats/char), bits per character, perplexity (--dynamic: also adapting as it reads)."""
    with _errors_to_exit_codes():
        from charrnn.infer.evaluate import stream_count

        check_streams(streams)
        settings = DynamicSettings(step_size=step_size, decay=decay, segment=segment)
        settings.validate()  # before the static pass, which can take minutes
        model = _load(checkpoint_path, device)
        with _PrepareBar() as bar:
            result = model.score_files(files, unknown.value, streams, dtype, encoding, on_progress=bar,
                                       on_notice=lambda m: _err(f"warning: {m}"))
        if result.chars < 1:
            raise UsageError("eval needs at least 2 known characters to score")
        report = {**result.as_dict(), "streams": stream_count(result.chars, streams), "files": files,
                  "checkpoint": str(model.path), "start_mix": model.prior is not None}
        if dynamic:
            import time

            started = time.perf_counter()
            adapted = model.score_files(files, unknown.value, dtype=dtype, encoding=encoding, dynamic=settings)
            seconds = time.perf_counter() - started
            report["dynamic"] = {**adapted.as_dict(), "step_size": step_size, "decay": decay, "segment": segment,
                                 "chars_per_s": adapted.chars / seconds}
        if json_out:
            print(_json(report))
            return
        extra = f", {result.dropped} unknown dropped" if result.dropped else ""
        print(f"chars {result.chars}  loss {result.loss:.4f} nats/char  bpc {result.bpc:.4f}  "
              f"perplexity {result.perplexity:.3f}{extra}")
        if dynamic:
            adapted = report["dynamic"]
            print(f"dynamic  loss {adapted['loss']:.4f} nats/char  bpc {adapted['bpc']:.4f}  "
                  f"perplexity {adapted['perplexity']:.3f}  ({adapted['loss'] - result.loss:+.4f} vs static; "
                  f"{adapted['chars_per_s']:,.0f} chars/s)")


@app.command()
def gradients(
    checkpoints: List[Path] = typer.Argument(..., help="Checkpoints or run directories to compare.", show_default=False),
    text: Path = typer.Option(..., "--text", help="Text to take the windows from (e.g. the training corpus)."),
    span: int = typer.Option(100, help="How many steps back to measure (k = 1..span)."),
    windows: int = typer.Option(32, help="Random windows averaged over."),
    seed: int = typer.Option(0, help="Seed for the window positions."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG (needs matplotlib; a table is printed either way)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: each checkpoint name with its list of norms for k = 1..span."),
):
    """Measure how far back gradients reach: ||d loss_T / d h_(T-k)|| for k = 1..span."""
    with _errors_to_exit_codes():
        import torch

        from charrnn.infer import api
        from charrnn.data.text import read_corpus
        from charrnn.viz.gradients import gradient_reach, plot, table

        if not (1 <= span <= MAX_BATCH and 1 <= windows <= MAX_BATCH):
            raise UsageError(f"--span and --windows must be from 1 to {MAX_BATCH}, not {span} and {windows}")
        check_seed(seed)
        curves = {}
        corpus_text = read_corpus([str(text)]).data.decode("utf-8")
        for path in checkpoints:
            model = api.load(path, "cpu")
            ids, _ = model.vocab.encode(corpus_text, "skip")
            if len(ids) < span + 2:
                raise UsageError(f"--text has {len(ids)} known characters; --span {span} needs {span + 2}")
            name = f"{model.model_config.cell} ({model.path.parent.name})"
            curves[name] = gradient_reach(model.network, ids, span, windows, torch.Generator().manual_seed(seed))
        if json_out:
            print(_json(curves))
        else:
            print(table(curves))
        if plot_path is not None:
            if plot(curves, str(plot_path)):
                _err(f"plot: {plot_path}")
            else:
                _err("warning: matplotlib is not installed (pip install 'charrnn[plot]'); printed the table only")


@app.command()
def viz(
    checkpoint_path: Optional[Path] = typer.Argument(None, help="A run directory or a .pt file.", show_default="the most recent run under runs/"),
    text: Optional[str] = typer.Option(None, "--text", help="A text file to analyse, or - for stdin.", show_default="the run's validation split"),
    chars: int = typer.Option(3000, "--chars", help="Characters analysed (from the start of the text). The page's size grows with chars x layers x units: ~1.4 bytes each, ~4 MB for 2x512 at 3000."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file to write.", show_default="report.html in the run directory (or here, for a .pt alone)"),
    open_page: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    unknown: Unknown = typer.Option(Unknown.error, help="Characters the model does not know: error, or skip them."),
    seed: int = typer.Option(1, help="Seed of the sample drawn for section 6."),
    temperature: float = typer.Option(0.8, "--temperature", "-T", help="Temperature of that sample."),
    encoding: str = typer.Option("utf-8", help="Text encoding of --text."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
):
    """Write one self-contained HTML page of what the model learned: training curves, surprisal, every unit's activation, units that track quotes, brackets or line position, gate saturation, and a sample coloured by its probability."""
    with _errors_to_exit_codes():
        import time

        from charrnn.viz import report
        from charrnn.atomic import write_text
        from charrnn.data.text import read_corpus
        from charrnn.infer.sample import check_temperature

        if not 2 <= chars <= MAX_BATCH:
            raise UsageError(f"--chars must be from 2 to {MAX_BATCH}, not {chars}")
        check_seed(seed)
        check_temperature(temperature)
        if out is not None and out.is_dir():
            raise UsageError(f"--out {out} is a directory; name the .html file to write")
        started = time.perf_counter()
        model = _load(checkpoint_path, device)
        if text is not None:
            corpus = read_corpus([text], encoding)
            ids, dropped = model.vocab.encode(corpus.data.decode("utf-8"), unknown.value)  # cut to --chars below
            description = "standard input" if text == "-" else str(text)
            if dropped:
                _err(f"skipped {dropped} character(s) the model does not know")
        else:
            ids, description = model.validation_ids()
        ids = [int(i) for i in ids[:chars]]
        source = report.ReportSource(str(model.path), description, model.run_dir)
        data = report.build(model.network, model.vocab, ids, source, prior=model.prior, seed=seed,
                            temperature=temperature, progress=lambda m: _err(f"viz: {m}"))
        page = report.render(data)
        target = out or (model.run_dir / "report.html" if model.run_dir else Path("report.html"))
        if not target.parent.is_dir():
            raise UsageError(f"--out {target}: the directory {target.parent} does not exist")
        write_text(target, page)
        size = len(page.encode("utf-8")) / 1e6
        _err(f"report: {target} ({size:.1f} MB, {len(ids):,} characters, {time.perf_counter() - started:.0f}s)")
        if open_page:
            import webbrowser

            webbrowser.open(target.resolve().as_uri())


@app.command()
def serve(
    models: Optional[List[str]] = typer.Argument(None, help="Run directories or .pt files, each NAME=PATH or PATH (named for its run directory).", show_default="the most recent run under runs/"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 opens it to the network (set --api-key)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, envvar="CHARRNN_API_KEY", help="Require Authorization: Bearer KEY on every route but / and /health.", show_default="none; or CHARRNN_API_KEY"),
    max_streams: int = typer.Option(64, help="Streams decoded together per model; past them requests queue."),
    max_queued: int = typer.Option(64, help="Streams waiting per model; past them a 503 with Retry-After."),
    max_prompt: int = typer.Option(4096, help="Characters in a prompt."),
    max_tokens: int = typer.Option(4096, help="New characters per choice (max_tokens)."),
    max_n: int = typer.Option(16, help="Choices per prompt (n)."),
    max_body: int = typer.Option(4 * 1024 * 1024, help="Bytes in a request body."),
    unknown: Unknown = typer.Option(Unknown.error, help="Characters a model does not know: error (a 400 naming them) or skip."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    chat_template: str = typer.Option("script", help="How chat messages are written for the model: script (NAME:\\ntext\\n\\n), irc (<NAME> text\\n), plain (text\\n), or a turn such as '{name}: {text}\\n'."),
    speakers: str = typer.Option("", help="Names for the chat roles, as the corpus writes speakers: user=ROMEO,assistant=JULIET.", show_default="the role names"),
):
    """Serve models over HTTP: OpenAI-compatible completions and chat, scoring, a playground page."""
    with _errors_to_exit_codes():
        try:
            from charrnn.serve import app as server
        except ImportError as err:
            raise UsageError(f"charrnn serve needs {err.name}: pip install 'charrnn[serve]' (scripts/setup.sh does)") from None
        import torch

        from charrnn.infer import api
        from charrnn.store import checkpoint

        for flag, value in (("--max-streams", max_streams), ("--max-queued", max_queued), ("--max-prompt", max_prompt),
                            ("--max-tokens", max_tokens), ("--max-n", max_n), ("--max-body", max_body)):
            if value < (0 if flag == "--max-queued" else 1):
                raise UsageError(f"{flag} must be at least {0 if flag == '--max-queued' else 1}, not {value}")
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be 0 to 65535, not {port}")
        from charrnn.serve.chat import template_from

        chat = template_from(check_text(chat_template, "--chat-template"), check_text(speakers, "--speakers"))
        named = server.model_names([str(checkpoint.latest_run())] if not models else models)
        # Only the decoding thread runs multi-threaded (engine.Runner says why): this one,
        # which loads the models and then runs the event loop, and the threads it starts use one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            loaded = {}
            for name, path in named.items():
                loaded[name] = api.load(path, device)
                _err(f"model {name}: {loaded[name]!r}")
            limits = server.Limits(max_streams=max_streams, max_queued=max_queued, max_prompt=max_prompt,
                                   max_tokens=max_tokens, max_n=max_n, max_body=max_body, unknown=unknown.value)
            if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
                _err(f"warning: listening on {host} with no --api-key: anyone who can reach it can use it")
            server.serve(loaded, host, port, limits, api_key,
                         on_ready=lambda url: _err(f"serving {', '.join(loaded)} at {url} (playground: {url}/; Ctrl-C stops)"),
                         log=_err, threads=threads, chat=chat)
        finally:
            torch.set_num_threads(threads)


@app.command()
def export(
    checkpoint_path: Path = typer.Argument(..., help="A run directory (its best.pt) or a .pt file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="model.onnx (the network as an ONNX graph) or page.html (a page that writes in the browser)."),
    web: Optional[Path] = typer.Option(None, "--web", help="A directory to write the page into, as index.html."),
    weights: str = typer.Option("fp16", help="The page's weights: fp16 (the page half the size; its loss cost measured in docs/benchmarks.md) or fp32 (exact)."),
):
    """Export a model: an ONNX file for any runtime, or one self-contained web page (offline)."""
    with _errors_to_exit_codes():
        from charrnn.infer import api
        from charrnn.export import onnx as exporter

        if (out is None) == (web is None):
            raise UsageError("give one of -o model.onnx, -o page.html or --web DIR")
        target = web / "index.html" if web is not None else out
        page = web is not None or target.suffix.lower() in (".html", ".htm")
        if not page and target.suffix.lower() != ".onnx":
            raise UsageError(f"-o {target}: name an .onnx or an .html file")
        if weights not in ("fp16", "fp32"):
            raise UsageError(f"--weights must be fp16 or fp32, not {weights}")
        model = api.load(checkpoint_path, "cpu")
        if web is not None:
            web.mkdir(parents=True, exist_ok=True)
        if page:
            size = exporter.export_page(model, target, "float16" if weights == "fp16" else "float32")
        else:
            size = exporter.export_onnx(model, target)
        prior = "; the start mix is not in it (a decoding prior, charrnn's own)" if model.prior is not None else ""
        _err(f"export: {target} ({size / 1e6:.2f} MB, {model!r}){prior}")


def _utf8_streams() -> None:
    """Text out in UTF-8 whatever the locale: the texts charrnn learns and writes are UTF-8,
    and an ASCII or Latin-1 locale (LANG=en_US.ISO-8859-1, PYTHONIOENCODING=ascii) would
    otherwise fail on the first character it cannot write. stderr shows what it cannot as
    escapes rather than failing."""
    for stream, errors in ((sys.stdout, "strict"), (sys.stderr, "backslashreplace")):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors=errors)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: runs the app, turning usage errors into one line and exit 2."""
    global _debug
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args[1:]:  # accepted after the command name too
        args = [a for a in args if a != "--debug"]
        _debug = True
    _utf8_streams()
    try:
        code = app(args=args, prog_name="charrnn", standalone_mode=False)
    except Exception as err:
        # Typer's (vendored or external) click exceptions: duck-typed, as their home moved.
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":
            code = 2  # Typer has printed the help already
        else:
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            _err(f"error: {err.format_message()}{where}")
            code = err.exit_code
    except BaseException as err:
        if type(err).__name__ != "Abort":
            raise
        _err("interrupted")
        code = 130
    code = code if isinstance(code, int) else 0
    distributed = sys.modules.get("charrnn.distributed")  # imported only by commands that use it
    if distributed is not None and distributed.launched_by_torchrun():
        distributed.leave(code)
    sys.exit(code)
