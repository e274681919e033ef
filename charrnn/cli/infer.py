"""`charrnn sample` and `charrnn eval`: a trained model's text on stdout, its scores."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from charrnn.cli.common import DYN, Unknown, _err, _errors_to_exit_codes, _json, _load, _prime_text, app
from charrnn.cli.train import _PrepareBar
from charrnn.config import EVAL_STREAMS, DynamicSettings, check_seed, check_streams
from charrnn.errors import UsageError, check_text


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
