"""`charrnn gradients`, `viz`, `serve` and `export`: the commands that hand a trained model
to the pictures, the server and the exporters."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from charrnn.cli.common import Unknown, _err, _errors_to_exit_codes, _json, _load, app
from charrnn.config import MAX_BATCH, check_seed
from charrnn.errors import UsageError, check_text


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

        from charrnn.data.text import read_corpus
        from charrnn.infer import api
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

        from charrnn.atomic import write_text
        from charrnn.data.text import read_corpus
        from charrnn.infer.sample import check_temperature
        from charrnn.viz import report

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
            from charrnn.serve import server
            from charrnn.serve.schemas import Limits
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
            limits = Limits(max_streams=max_streams, max_queued=max_queued, max_prompt=max_prompt,
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
        from charrnn.export import onnx
        from charrnn.export import page as web_page
        from charrnn.infer import api

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
            size = web_page.export_page(model, target, "float16" if weights == "fp16" else "float32")
        else:
            size = onnx.export_onnx(model, target)
        prior = "; the start mix is not in it (a decoding prior, charrnn's own)" if model.prior is not None else ""
        _err(f"export: {target} ({size / 1e6:.2f} MB, {model!r}){prior}")
