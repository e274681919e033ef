"""What every command shares: the Typer app, the error-to-exit-code rule, stderr lines,
JSON output, loading a trained model, and `main`, the entry point."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from charrnn.config import DynamicSettings
from charrnn.errors import CharRNNError, TextError, check_text
from charrnn.version import __version__

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


DYN = DynamicSettings
PANEL_MODEL = "Model (stored in the checkpoint)"
PANEL_TRAIN = "Training"
PANEL_RUN = "Run and output"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"



def _load(checkpoint_path: Optional[Path], device: str):
    """The trained model (charrnn.infer.api.Model) these commands read, saying which when it was not named."""
    from charrnn.infer import api
    from charrnn.store import checkpoint

    if checkpoint_path is None:
        checkpoint_path = checkpoint.latest_run()
        _err(f"checkpoint: {checkpoint.resolve(checkpoint_path)} (most recent run; pass --checkpoint to choose)")
    return api.load(checkpoint_path, device)



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
