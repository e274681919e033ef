"""Load test of `charrnn serve`, beside the in-process batched decoder and a one-request-
at-a-time server, at 1, 8, 32 and 64 concurrent streaming clients (loopback only,
bounded: each client sends --requests requests of --chars characters, then stops).

    python scripts/loadtest.py runs/tinyshakespeare [--widths 1,8,32,64] [--chars 400]
                               [--rounds 3] [--primes same|distinct] [--json]
    python scripts/loadtest.py runs/tinyshakespeare --long-prompt 4000 [--rounds 5]

For each width W it prints:
  in-process   characters/s of model.generate(num_samples=W) (charrnn's packed decoder, no HTTP)
  serve        aggregate characters/s W streaming clients receive from `charrnn serve`, their time
               to first character (p50 / p99; a 100-character prime), and the server's mean
               decoding-step time (from /metrics) against the in-process step at that width
  one-at-a-time a plain server that runs model.stream per request, one request at a time
               (the Flask-style baseline; charrnn's own fast 1-stream decoder), same clients
and the ratios serve / in-process and serve / one-at-a-time. A /health probe every 50 ms
during the serve phase gives its latency: the HTTP side answering while the loop decodes.

The machine is shared and its speed drifts by tens of percent within minutes, so each
width runs --rounds rounds of (in-process, serve) back to back; serve / in-process is the
median of the rounds' own ratios, and the speeds shown are medians too.

--primes same: every request sends the same 100-character prime (the one `charrnn sample`
reads in the in-process run). --primes distinct: each request its own (windows of a longer
passage), so that no request's prime has been read before.

--long-prompt CHARS: 32 clients stream --chars characters each, in rounds without and with
one more client sending a prompt of CHARS characters (never read before) 0.5 s in; it
prints the gaps between the streams' pieces of text (p50, p99, max) and the long
request's time to its first character, medians of the rounds.

The clients are raw asyncio sockets in this process (so client overhead stays small); each
server is its own process. Run it alone: two cores shared with anything else change it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSAGE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
           "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
           "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\nAll:\n"
           "We know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n")
PRIME = PASSAGE[:100]


def prime_for(k: int, r: int, distinct: bool) -> str:
    """Client k's request r's prime: PRIME, or a 100-character window of its own."""
    if not distinct:
        return PRIME
    start = (k + 64 * r) % len(PASSAGE)  # distinct for the 64 x 3 requests of a width
    return (PASSAGE + PASSAGE)[start:][:100]


# -- clients ---------------------------------------------------------------------------------------


async def stream_one(port: int, body: dict, gaps: list | None = None) -> tuple[float | None, int, int]:
    """POST a streaming completion; (seconds to the first character, characters, status).
    gaps: where to add the seconds between one piece of text and the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    started = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status = int(head.split()[1])
    chunked = "transfer-encoding: chunked" in head.lower()
    first, chars, buffer, last = None, 0, b"", started
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            piece = (await reader.readexactly(size + 2))[:-2]
        else:
            piece = await reader.read(65536)
            if not piece:
                break
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {"):
                text = json.loads(event[6:])["choices"][0]["text"] if b'"choices": [{' in event else ""
                now = time.perf_counter()
                if text and first is None:
                    first = now - started
                elif text and gaps is not None:
                    gaps.append(now - last)
                if text:
                    last = now
                chars += len(text)
    writer.close()
    return first, chars, status


async def clients(port: int, width: int, requests: int, chars: int, distinct: bool = False) -> dict:
    body = {"max_tokens": chars, "temperature": 0.8, "stream": True}
    firsts, total, statuses = [], 0, []

    async def client(k: int) -> None:
        nonlocal total
        for r in range(requests):
            first, got, status = await stream_one(port, {**body, "prompt": prime_for(k, r, distinct),
                                                         "seed": 1000 * k + r})
            statuses.append(status)
            total += got
            if first is not None:
                firsts.append(first)

    health, stop = [], asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await reader.read()
            writer.close()
            health.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(width)))
    wall = time.perf_counter() - started
    client_cpu = (time.process_time() - cpu) / wall
    stop.set()
    await prober
    return {"chars_per_s": total / wall, "chars": total, "seconds": wall, "ttfc_p50_ms": 1000 * percentile(firsts, 50),
            "ttfc_p99_ms": 1000 * percentile(firsts, 99), "health_p99_ms": 1000 * percentile(health, 99),
            "non_200": sum(s != 200 for s in statuses), "client_cpu": client_cpu}


async def long_prompt(port: int, width: int, chars: int, length: int, arrive: bool, seed: int) -> dict:
    """width clients stream chars characters each; with arrive, one more client sends a
    prompt of `length` characters (never read before) 0.5 s in. The gaps between the
    streams' pieces of text, p50 / p99, and the long request's time to its first character."""
    gaps: list[float] = []
    body = {"max_tokens": chars, "temperature": 0.8, "stream": True, "prompt": PRIME}

    async def intruder() -> float | None:
        await asyncio.sleep(0.5)
        start = seed % len(PASSAGE)
        text = ((PASSAGE * (2 + length // len(PASSAGE)))[start:])[:length]
        first, _, _ = await stream_one(port, {"prompt": text, "max_tokens": 20, "stream": True, "seed": seed})
        return first

    tasks = [stream_one(port, {**body, "seed": k}, gaps) for k in range(width)]
    results = await asyncio.gather(*tasks, *([intruder()] if arrive else []))
    return {"gap_p50_ms": 1000 * percentile(gaps, 50), "gap_p99_ms": 1000 * percentile(gaps, 99),
            "gap_max_ms": 1000 * max(gaps), "long_ttfc_ms": 1000 * results[-1] if arrive else None}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- servers ---------------------------------------------------------------------------------------


def start(args: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server exited: {proc.wait()}")
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if found and ("serving" in line or "baseline" in line):
            break
    # keep reading its log so that the pipe never fills
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, int(found.group(1))


def step_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the server's decoding-step histogram."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    total = sum(float(m) for m in re.findall(r"charrnn_decode_step_seconds_sum\{[^}]*\} (\S+)", text))
    count = sum(float(m) for m in re.findall(r"charrnn_decode_step_seconds_count\{[^}]*\} (\S+)", text))
    return total, count


def baseline_server(run: str) -> None:
    """One request at a time: model.stream per request, written as OpenAI-style events."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import charrnn

    model = charrnn.load(run, device="cpu")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for char in model.stream(body["prompt"], body["max_tokens"], body["temperature"], seed=body["seed"]):
                event = {"choices": [{"index": 0, "text": char, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    HTTPServer.request_queue_size = 256  # the clients wait in the backlog, one served at a time
    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(f"baseline at http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


# -- in process ----------------------------------------------------------------------------------------


_models: dict = {}


def in_process(run: str, width: int, chars: int) -> tuple[float, float]:
    """(characters/s, seconds per character) of model.generate at this width (fp32, as the server)."""
    import torch

    import charrnn
    from charrnn.infer.sample import SampleSettings

    if run not in _models:
        _models[run] = charrnn.load(run, device="cpu")
    model = _models[run]
    ids, _ = model.vocab.encode(PRIME)
    settings = SampleSettings(length=chars, temperature=0.8)
    torch.manual_seed(0)
    started = time.perf_counter()
    for _ in model.generate(ids, settings, width, seed=0, dtype="fp32"):
        pass
    seconds = time.perf_counter() - started
    return width * chars / seconds, seconds / chars


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--widths", default="1,8,32,64")
    parser.add_argument("--chars", type=int, default=400, help="characters per request")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--baseline-requests", type=int, default=1, help="requests per client, one-at-a-time server")
    parser.add_argument("--rounds", type=int, default=3, help="(in-process, serve) rounds per width")
    parser.add_argument("--primes", choices=("same", "distinct"), default="same")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--long-prompt", type=int, default=0, metavar="CHARS",
                        help="instead: 32 streaming clients, rounds without and with a prompt of CHARS characters arriving")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return baseline_server(args.run)
    if args.long_prompt:
        return long_prompt_rounds(args)
    widths = [int(w) for w in args.widths.split(",")]
    distinct = args.primes == "distinct"
    rows = []
    server, port = start([sys.executable, "-m", "charrnn", "serve", f"m={args.run}", "--port", "0", "--device", "cpu",
                          "--max-streams", str(max(widths)), "--max-queued", str(max(widths))])
    try:
        asyncio.run(clients(port, 1, 1, 50))  # warm up
        for width in widths:
            rounds = []
            for _ in range(args.rounds):  # in-process and serve back to back: the machine's speed drifts
                speed, step = in_process(args.run, width, args.chars)
                before = step_seconds(port)
                served = asyncio.run(clients(port, width, args.requests, args.chars, distinct))
                after = step_seconds(port)
                served["step_ms"] = 1000 * (after[0] - before[0]) / max(1, after[1] - before[1])
                rounds.append((served, {"chars_per_s": speed, "step_ms": 1000 * step}))
                print(f"serve, {width} clients: {served['chars_per_s']:,.0f} chars/s against {speed:,.0f} in process "
                      f"({served['chars_per_s'] / speed:.2f}); the clients used {served['client_cpu']:.0%} of a core",
                      file=sys.stderr)
            ratios = [s["chars_per_s"] / i["chars_per_s"] for s, i in rounds]
            served = {key: median([s[key] for s, _ in rounds]) for key in rounds[0][0]}
            served["non_200"] = sum(s["non_200"] for s, _ in rounds)
            served["rounds"] = [s["chars_per_s"] for s, _ in rounds]
            inside = {key: median([i[key] for _, i in rounds]) for key in ("chars_per_s", "step_ms")}
            inside["rounds"] = [i["chars_per_s"] for _, i in rounds]
            rows.append({"width": width, "serve": served, "in_process": inside, "ratio": median(ratios),
                         "ratios": ratios})
    finally:
        server.terminate()
        server.wait()
    empty = {"chars_per_s": float("nan"), "ttfc_p50_ms": float("nan"), "ttfc_p99_ms": float("nan"), "non_200": 0}
    for row in rows:
        row["one_at_a_time"] = empty
    baseline, port = start([sys.executable, __file__, args.run, "--baseline-server"])
    try:
        for row in rows if args.baseline_requests else []:
            row["one_at_a_time"] = asyncio.run(clients(port, row["width"], args.baseline_requests, args.chars,
                                                       distinct))
            print(f"one at a time, {row['width']} clients: {row['one_at_a_time']['chars_per_s']:,.0f} chars/s",
                  file=sys.stderr)
    finally:
        baseline.terminate()
        baseline.wait()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'clients':>7} | {'in-process':>10} | {'serve':>8} {'/in-proc':>8} {'ttfc p50':>8} {'p99':>6} "
          f"{'step':>6} {'in-proc':>7} {'health p99':>10} | {'one-at-a-time':>13} {'p50':>6} {'p99':>7} | serve/one")
    for row in rows:
        s, b, i = row["serve"], row["one_at_a_time"], row["in_process"]
        print(f"{row['width']:>7} | {i['chars_per_s']:>10,.0f} | {s['chars_per_s']:>8,.0f} "
              f"{row['ratio']:>8.2f} {s['ttfc_p50_ms']:>6.1f}ms {s['ttfc_p99_ms']:>4.0f}ms "
              f"{s['step_ms']:>4.2f}ms {i['step_ms']:>5.2f}ms {s['health_p99_ms']:>8.1f}ms | {b['chars_per_s']:>13,.0f} "
              f"{b['ttfc_p50_ms']:>4.0f}ms {b['ttfc_p99_ms']:>5.0f}ms | {s['chars_per_s'] / b['chars_per_s']:>6.1f}x"
              f"{'' if s['non_200'] + b['non_200'] == 0 else '  (non-200 responses!)'}")


def long_prompt_rounds(args) -> None:
    """--long-prompt: alternate rounds without and with the long prompt arriving."""
    server, port = start([sys.executable, "-m", "charrnn", "serve", f"m={args.run}", "--port", "0", "--device", "cpu",
                          "--max-prompt", str(args.long_prompt)])
    found = {False: [], True: []}
    try:
        asyncio.run(clients(port, 1, 1, 50))  # warm up
        for r in range(args.rounds):
            for arrive in (False, True):
                found[arrive].append(asyncio.run(long_prompt(port, 32, args.chars, args.long_prompt, arrive, 7919 * r + 1)))
                print(f"round {r}, long prompt {arrive}: {found[arrive][-1]}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    rows = {arrive: {key: median([x[key] for x in runs]) for key in runs[0] if runs[0][key] is not None}
            for arrive, runs in found.items()}
    if args.json:
        print(json.dumps({"without": rows[False], "with": rows[True]}, indent=1))
        return
    print(f"32 clients, {args.chars} characters each; medians of {args.rounds} rounds")
    print(f"{'':<28} {'gap p50':>8} {'gap p99':>8} {'gap max':>8} {'long TTFC':>10}")
    for arrive, name in ((False, "no long prompt"), (True, f"a {args.long_prompt:,}-char prompt arrives")):
        row = rows[arrive]
        print(f"{name:<28} {row['gap_p50_ms']:>6.1f}ms {row['gap_p99_ms']:>6.1f}ms {row['gap_max_ms']:>6.0f}ms "
              f"{row.get('long_ttfc_ms', float('nan')):>8.0f}ms")
    print(f"gap p99 with / without: {rows[True]['gap_p99_ms'] / rows[False]['gap_p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
