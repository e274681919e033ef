"""`charrnn serve` for real: uvicorn on a loopback port, with the official openai client,
curl and raw sockets; served text and scores equal what the CLI prints."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from browser import Browser, chromium
from conftest import ROOT, VERSE
from typer.testing import CliRunner

import charrnn
from charrnn.cli import app as cli_app
from charrnn.infer import rows
from charrnn.serve.app import create_app
from charrnn.serve.engine import Engine
from charrnn.serve.schemas import Limits

openai = pytest.importorskip("openai")


@contextlib.contextmanager
def running(models, limits=Limits(), api_key=None, **options):
    """create_app(models) served by uvicorn on 127.0.0.1 in a thread; yields (url, app, log lines)."""
    lines = []
    app = create_app(models, limits, api_key, log=lines.append, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
        assert thread.is_alive(), "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app, lines
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def model(trained_run):
    return charrnn.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    with running({"tiny": model, "twin": model}, Limits(max_tokens=2000, max_prompt=500, max_body=20_000)) as served:
        yield served


@pytest.fixture
def visible_stream(monkeypatch):
    """The tiny model writes its 30-50 characters in a few milliseconds, within one of the
    bridge's 10-ms wakes, so a stream of them may go out as one event (as it should: the
    bridge bounds the wakes). Each decoding step here takes 2 ms more, as a real model's
    does, so a stream has characters to send at several wakes."""
    step = Engine.step

    def slower(self):
        step(self)
        time.sleep(0.002)

    monkeypatch.setattr(Engine, "step", slower)


def cli(*args):
    result = CliRunner().invoke(cli_app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def complete(url, **body):
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=60)


# -- the openai client, curl, the CLI's own figures --------------------------------------------------


def test_the_openai_client_gets_a_completion_and_a_streamed_one(server, visible_stream):
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny", "twin"]
    done = client.completions.create(model="tiny", prompt="The ", max_tokens=50, temperature=0.8, seed=3)
    assert len(done.choices[0].text) == 50 and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 50 and done.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model="tiny", prompt="The ", max_tokens=50, temperature=0.8, seed=3,
                                            stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl here")
def test_the_readme_openai_example_runs_against_a_server(model):
    import io
    from contextlib import redirect_stdout

    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "OpenAI(" in b]
    assert len(blocks) == 2  # completions, then chat
    with running({"tinyshakespeare": model}, Limits(unknown="skip")) as (url, _, lines):  # the tiny model lacks R, O, ...
        outs = []
        for block in blocks:
            outs.append(io.StringIO())
            with redirect_stdout(outs[-1]):
                exec(compile(block.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    assert len(outs[0].getvalue()) == 400 + 1  # 200 characters, a newline, 200 streamed
    assert outs[1].getvalue().endswith("\n") and "\n\n" not in outs[1].getvalue()  # one turn, printed
    assert [line.split()[:3] for line in lines] == [["POST", "/v1/completions", "200"]] * 2 + \
        [["POST", "/v1/chat/completions", "200"]]


def test_curl_streams_server_sent_events(server, visible_stream):
    url, _, _ = server
    out = subprocess.run(["curl", "-sN", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"prompt": "The", "max_tokens": 30, "stream": True, "seed": 1, "model": "tiny"})],
                         capture_output=True, text=True, timeout=60).stdout
    events = [line[6:] for line in out.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert len(text) == 30


@pytest.mark.parametrize("options", [
    dict(cli=["--temperature", 0.8, "--top-p", 0.9], body=dict(temperature=0.8, top_p=0.9)),
    dict(cli=["--temperature", 0], body=dict(temperature=0)),
])
def test_a_seeded_completion_equals_charrnn_sample(server, trained_run, options):
    url, _, _ = server
    printed = cli("sample", "-m", trained_run, "--prime", "The ", "--length", 200, "--seed", 42, "--device", "cpu",
                  "--dtype", "fp32", *options["cli"])
    served = complete(url, prompt="The ", max_tokens=200, seed=42, echo=True, **options["body"]).json()
    assert served["choices"][0]["text"] == printed.rstrip("\n")


def test_n_choices_and_a_stop_string_equal_charrnn_sample_without_the_stop(server, trained_run):
    url, _, _ = server
    printed = [json.loads(line)["text"] for line in cli(
        "sample", "-m", trained_run, "--prime", "fox", "--length", 150, "--seed", 8, "-s", 3, "--stop", "o",
        "--temperature", 1.0, "--json", "--device", "cpu", "--dtype", "fp32").splitlines()]
    served = complete(url, prompt="fox", max_tokens=150, seed=8, n=3, stop="o", temperature=1.0).json()["choices"]
    for text, choice in zip(printed, served):
        if text.endswith("o"):
            assert choice["text"] == text[:-1] and choice["finish_reason"] == "stop"
        else:
            assert choice["text"] == text and choice["finish_reason"] == "length"


EVERY_CONTROL = dict(top_k=6, min_p=0.02, frequency_penalty=0.6, presence_penalty=0.2, logit_bias={"o": -3})


@pytest.mark.parametrize("controls, crowd", [({}, 3), ({}, 31), (EVERY_CONTROL, 31)],
                         ids=["plain-4-wide", "plain-32-wide", "every-control-32-wide"])
def test_the_same_seed_gives_the_same_text_alone_and_among_others(server, controls, crowd):
    """Alone (the decoder 1 row wide), among 3 others (4 wide) and among 31 (32 wide, its
    products split between two threads): the same text."""
    url, _, _ = server
    mine = dict(prompt="The lazy", max_tokens=300, seed=77, temperature=0.9, top_p=0.95, **controls)
    alone = complete(url, **mine).json()["choices"][0]["text"]

    def other(k):
        extra = dict(top_k=k % 4, frequency_penalty=0.1 * (k % 3)) if k % 3 else {}
        return complete(url, prompt="a" * (1 + k % 5), max_tokens=300 + 10 * k, seed=k, temperature=1.1,
                        stream=k % 2 == 0, **extra).status_code

    with ThreadPoolExecutor(crowd + 1) as pool:
        others = [pool.submit(other, k) for k in range(crowd)]
        time.sleep(0.05)
        crowded = pool.submit(complete, url, **mine)
        assert all(f.result() == 200 for f in others)
        assert crowded.result().json()["choices"][0]["text"] == alone


@pytest.mark.parametrize("cpu_bf16", ["0", "1"], ids=["fp32-host", "bf16-host"])
def test_score_equals_charrnn_eval(server, trained_run, tmp_path, monkeypatch, cpu_bf16):
    """dtype auto as on a CPU without and with bf16 instructions (CHARRNN_CPU_BF16), in
    the server and in charrnn eval alike: the same figures, and a score's bpc is its
    surprisal trace's mean to 1e-6 in both."""
    monkeypatch.setenv("CHARRNN_CPU_BF16", cpu_bf16)
    url, _, _ = server
    text = VERSE * 4
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    printed = json.loads(cli("eval", tmp_path / "held.txt", "-m", trained_run, "--json", "--device", "cpu"))
    served = httpx.post(f"{url}/v1/score", json={"model": "tiny", "text": text}).json()
    assert served["chars"] == printed["chars"]
    assert served["loss"] == pytest.approx(printed["loss"], abs=1e-9) and served["bpc"] == pytest.approx(printed["bpc"])
    one = httpx.post(f"{url}/v1/score", json={"text": text[:300], "streams": 1, "surprisal": True, "model": "tiny"}).json()
    values = one["surprisal"]["values"]
    assert values[0] is None and len(values) == 300
    assert sum(values[1:]) / 299 == pytest.approx(one["bpc"], rel=1e-6)  # the mean surprisal is the bpc


def test_logprobs_and_echo_in_openais_shape(server):
    url, _, _ = server
    body = complete(url, prompt="The", max_tokens=20, seed=5, logprobs=2, echo=True).json()["choices"][0]
    lp = body["logprobs"]
    assert "".join(lp["tokens"]) == body["text"] and len(lp["tokens"]) == 23
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:]) and lp["text_offset"][:3] == [0, 1, 2]


def test_max_tokens_0_echoes_the_prompt_and_draws_nothing(server):
    url, _, _ = server
    done = complete(url, prompt="The", max_tokens=0, echo=True, n=2).json()
    assert [c["text"] for c in done["choices"]] == ["The", "The"] and done["usage"]["completion_tokens"] == 0
    streamed = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 0,
                                                         "stream": True}).text
    assert streamed.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in streamed


def test_models_health_and_metrics(server, trained_run):
    url, _, _ = server
    complete(url, prompt="The metrics", max_tokens=10)
    complete(url, prompt="The metrics", max_tokens=10)  # its prompt's state is kept from the first
    card = httpx.get(f"{url}/v1/models/tiny").json()["charrnn"]
    losses = [json.loads(l)["val_loss"] for l in (trained_run / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in json.loads(l)]
    assert card["training"]["best_val_loss"] == pytest.approx(min(losses))
    assert card["config"]["hidden_size"] == 32 and card["vocabulary_size"] == len(card["vocabulary"])
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["models"]["tiny"]["row_kernel"] == rows.available()
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("charrnn_requests_total", "charrnn_generated_characters_total", "charrnn_active_streams",
                 "charrnn_queued_streams", "charrnn_time_to_first_character_seconds_bucket",
                 "charrnn_decode_step_seconds_bucket"):
        assert name in metrics
    done = re.search(r'charrnn_requests_total\{path="/v1/completions",status="200"\} (\d+)', metrics)
    assert done and float(done.group(1)) >= 1
    cached = re.search(r'charrnn_prompts_total\{model="tiny",source="cached"\} (\S+)', metrics)
    assert cached and float(cached.group(1)) >= 1


def test_each_request_is_logged_in_one_line(server):
    url, _, lines = server
    complete(url, prompt="The", max_tokens=12)
    assert any(re.fullmatch(r"POST /v1/completions 200 12 chars \d+\.\d{3} s", line) for line in lines)


# -- bad input: a 4xx in OpenAI's error shape, never a 500 ------------------------------------------

BAD = [
    ("not JSON", b'{"prompt": ', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("wrong type", {"prompt": 3}, 400, "prompt: must be a string or a list of strings"),
    ("wrong type", {"prompt": "a", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ("out of range", {"prompt": "a", "temperature": 3}, 400, "temperature: Input should be less than or equal to 2"),
    ("out of range", {"prompt": "a", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ("out of range", {"prompt": "a", "max_tokens": 2001}, 400, "max_tokens must be 0 to 2000"),
    ("out of range", {"prompt": "a", "n": 17}, 400, "n must be 1 to 16"),
    ("out of range", {"prompt": "a", "seed": -1}, 400, "seed: Input should be greater than or equal to 0"),
    ("out of range", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4 strings"),
    ("out of range", {"prompt": "a", "logprobs": 21}, 400, "logprobs: Input should be less than or equal to 20"),
    ("missing", {"max_tokens": 3}, 400, "prompt: is required"),
    ("unknown model", {"prompt": "a", "model": "../../etc/passwd"}, 404, "model '../../etc/passwd' is not served here"),
    ("empty prompt", {"prompt": ""}, 400, "prompt is empty"),
    ("empty prompt", {"prompt": []}, 400, "prompt: the list is empty"),
    ("huge prompt", {"prompt": "a" * 501}, 400, "prompt has 501 characters; the limit is 500"),
    ("unknown characters", {"prompt": "a\u2603b"}, 400, "character(s) unknown to the model: '\u2603'"),
    ("huge body", {"prompt": "a", "user": "x" * 30_000}, 413, "over 20,000 bytes"),
]


@pytest.mark.parametrize("family, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_a_message_naming_the_field(server, family, body, status, message):
    url, _, _ = server
    raw = body if isinstance(body, bytes) else json.dumps({"model": "tiny", **body} if "model" not in body else body).encode()
    reply = httpx.post(f"{url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and "Traceback" not in reply.text and error["type"]


def test_other_bad_requests(server):
    url, _, _ = server
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert "error" in httpx.get(f"{url}/v1/nothing").json()
    assert httpx.get(f"{url}/v1/models/nope").status_code == 404
    assert httpx.post(f"{url}/v1/score", json={"model": "tiny", "text": "x"}).status_code == 400
    assert httpx.post(f"{url}/v1/score", json={"model": "tiny", "text": "ab", "path": "/etc"}).json()["error"]["message"] \
        == "path: is not a field of this request"
    two = httpx.post(f"{url}/v1/completions", json={"prompt": "a"})  # two models: which?
    assert two.status_code == 400 and "model is required" in two.json()["error"]["message"]


def test_an_api_key_is_required_when_set(model):
    with running({"m": model}, api_key="s3cret") as (url, _, _):
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret")
        assert client.completions.create(model="m", prompt="T", max_tokens=5).choices[0].text


def test_past_the_streams_and_the_queue_a_503_with_retry_after(model):
    with running({"m": model}, Limits(max_streams=2, max_queued=1, max_tokens=10**7)) as (url, app, _):
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "T", "max_tokens": 10**7, "n": 2,
                                                                  "stream": True}) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            queued = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                          kwargs=dict(json={"prompt": "T", "max_tokens": 5}, timeout=30))
            queued.start()
            deadline = time.time() + 20
            while app.state.served["m"].engine.queued_streams == 0 and time.time() < deadline:
                time.sleep(0.01)
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "T", "max_tokens": 5})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["error"]["message"]
        queued.join(timeout=30)


def test_a_client_that_goes_away_frees_its_rows_within_one_step(server):
    url, app, _ = server
    engine = app.state.served["tiny"].engine
    host, port = url[7:].split(":")
    body = json.dumps({"model": "tiny", "prompt": "The", "max_tokens": 2000, "stream": True}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        sequence = next(s for s in engine._active if s.request.length == 2000)
    deadline = time.time() + 10
    while sequence.freed_step is None and time.time() < deadline:
        time.sleep(0.005)
    assert sequence.cancelled and sequence.freed_step - sequence.cancel_step <= 1
    assert sum(c.chars for c in sequence.choices) < 2000


# -- the command ----------------------------------------------------------------------------------


def test_charrnn_serve_prints_its_url_and_stops_on_sigterm_ending_open_streams(trained_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", f"poem={trained_run}", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before it listened"
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "T", "max_tokens": 4000, "stream": True,
                                                                  "model": "poem"}, timeout=30) as reply:
            for event in reply.iter_lines():
                if event.startswith("data: "):
                    events.append(event[6:])
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
        assert proc.wait(timeout=20) == 0
        log = proc.stderr.read()
        assert re.search(r"POST /v1/completions 200 \d+ chars", log) and "Traceback" not in log
    finally:
        proc.kill()


def test_charrnn_serve_bad_arguments_are_one_line_errors(trained_run, tmp_path):
    from conftest import run_cli

    missing = run_cli("serve", tmp_path / "nope", "--port", "0")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    twice = run_cli("serve", trained_run, trained_run, "--port", "0")
    assert twice.returncode == 2 and "two models are named 'tiny'" in twice.stderr
    zero = run_cli("serve", trained_run, "--max-streams", "0")
    assert zero.returncode == 2 and "--max-streams must be at least 1" in zero.stderr


# -- the playground, in a real browser ----------------------------------------------------------------


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_playground_streams_shaded_text_in_headless_chromium(model, tmp_path):
    page = (ROOT / "charrnn" / "serve" / "playground.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "import(" not in page  # no CDN
    with running({"poem": model}) as (url, _, lines), Browser(tmp_path / "profile") as browser:
        browser.open(f"{url}/")
        browser.wait("document.getElementById('card').textContent.includes('validation loss')")
        assert "2x32 lstm" in browser.js("document.getElementById('card').textContent")
        browser.js("""document.getElementById('prime').value = 'The quick';
                      document.getElementById('length').value = '300';
                      document.getElementById('seed').value = '4';
                      document.getElementById('go').click()""")
        browser.wait("document.body.dataset.done === '1'")
        shades = browser.js("[...document.querySelectorAll('#out span:not(.prime)')].map(s => s.style.background)")
        assert len(shades) == 300 and len(set(shades)) > 5 and all(s.startswith(("rgba(220, 40, 40", "rgb(220, 40, 40)")) for s in shades)
        text = browser.js("document.getElementById('out').textContent")
        served = complete(url, model="poem", prompt="The quick", max_tokens=300, seed=4, temperature=0.8)
        assert text == "The quick" + served.json()["choices"][0]["text"]  # the page shows what was drawn
        assert any(line.startswith("POST /v1/completions 200 300 chars") for line in lines)
        shot = tmp_path / "playground.png"
        browser.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("CHARRNN_SCREENSHOTS"):
            shutil.copy(shot, os.environ["CHARRNN_SCREENSHOTS"])


# -- the sampling controls OpenAI-style clients send ---------------------------------------------


def test_the_sampling_controls_through_the_openai_client(server, trained_run):
    """top_k=1 is greedy; a logit_bias of -100 keeps a character out of 1,000; a frequency
    penalty lowers repeats on a seeded sample; the seeded server writes what `charrnn
    sample` writes with the same controls (fp32, as the server's engine here)."""
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")

    def text(**options):
        extra = {k: options.pop(k) for k in ("top_k", "min_p") if k in options}
        done = client.completions.create(model="tiny", prompt="The ", seed=4, extra_body=extra or None, **options)
        return done.choices[0].text

    greedy = text(max_tokens=200, temperature=0)
    assert text(max_tokens=200, temperature=1.0, top_k=1) == greedy
    plain = text(max_tokens=1000, temperature=1.0)
    banned = text(max_tokens=1000, temperature=1.0, logit_bias={"e": -100})
    assert plain.count("e") > 20 and "e" not in banned and len(banned) == 1000

    def repeats(sample: str) -> float:  # the share of characters that repeat one of the last 8
        return sum(c in sample[max(0, i - 8) : i] for i, c in enumerate(sample)) / len(sample)

    penalised = text(max_tokens=1000, temperature=1.0, frequency_penalty=2.0)
    assert repeats(penalised) < repeats(plain) - 0.05, (repeats(penalised), repeats(plain))
    controls = dict(temperature=0.9, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.4, logit_bias={"o": -2.5})
    served = text(max_tokens=300, top_k=10, min_p=0.03, **controls)
    printed = cli("sample", "-m", trained_run, "--prime", "The ", "--length", 300, "--seed", 4, "--device", "cpu",
                  "--dtype", "fp32", "--temperature", 0.9, "--top-p", 0.95, "--top-k", 10, "--min-p", 0.03,
                  "--frequency-penalty", 0.5, "--presence-penalty", 0.4, "--logit-bias", "o=-2.5")
    assert "The " + served == printed.rstrip("\n")
    api = charrnn.load(trained_run, device="cpu").sample("The ", 300, top_k=10, min_p=0.03, seed=4, **controls)
    assert api == printed.rstrip("\n")


@pytest.mark.parametrize("body, param, message", [
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"frequency_penalty": 3}, "frequency_penalty", "less than or equal to 2"),
    ({"presence_penalty": -2.5}, "presence_penalty", "greater than or equal to -2"),
    ({"logit_bias": {"e": 101}}, "logit_bias", "must be from -100 to 100"),
    ({"logit_bias": {"Z": 5}}, "logit_bias", "'Z' is not a character the model knows"),
    ({"logit_bias": {"99999": 5}}, "logit_bias", "id 99999 is past the model's"),
    ({"logit_bias": {"ab": 5}}, "logit_bias", "neither one character nor a character id"),
    ({"logit_bias": {"e": "x"}}, "logit_bias", ""),
])
def test_bad_sampling_controls_are_400s_naming_the_field(server, body, param, message):
    url, _, _ = server
    reply = complete(url, prompt="The ", max_tokens=5, **body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert message in reply.json()["error"]["message"]


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_playground_chat_tab_streams_a_shaded_reply_in_headless_chromium(model, tmp_path):
    """The chat tab: the conversation's lines become messages, the reply streams in shaded
    after the conversation as the model read it, and is added to the conversation; it is
    what /v1/chat/completions answers for the same messages and seed."""
    from charrnn.serve.chat import template_from

    with running({"poem": model}, Limits(unknown="skip"), chat=template_from("irc")) as (url, _, lines), \
            Browser(tmp_path / "profile") as browser:
        browser.open(f"{url}/")
        browser.wait("document.getElementById('card').textContent.includes('validation loss')")
        browser.js("""document.getElementById('tab-chat').click();
                      document.getElementById('conversation').value = 'user: The quick\\nassistant: brown fox\\nuser: jumps';
                      document.getElementById('length').value = '200';
                      document.getElementById('seed').value = '6';
                      document.getElementById('chatgo').click()""")
        browser.wait("document.body.dataset.done === '1'")
        messages = [{"role": "user", "content": "The quick"}, {"role": "assistant", "content": "brown fox"},
                    {"role": "user", "content": "jumps"}]
        answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "poem", "messages": messages, "seed": 6,
                                                                "max_tokens": 200, "temperature": 0.8}).json()
        reply = answer["choices"][0]["message"]["content"]
        assert reply and browser.js("document.querySelector('#out .prime').textContent") == answer["prompt"]
        shades = browser.js("[...document.querySelectorAll('#out span:not(.prime)')].map(s => s.style.background)")
        assert len(shades) == len(reply) and len(set(shades)) > 2
        assert browser.js("document.getElementById('out').textContent") == answer["prompt"] + reply
        assert browser.js("document.getElementById('conversation').value").endswith(f"\nassistant: {reply}\n")
        assert ["POST", "/v1/chat/completions", "200"] in [line.split()[:3] for line in lines]
