"""Soak test of `charrnn serve`: many requests from many concurrent clients, a third of them
malformed and a tenth hanging up mid-stream; loopback only, bounded in count and time.

    python scripts/soak.py RUN [--requests 2000] [--clients 128] [--json]

Checks, and exits 1 if one fails: no response is a 500 (or anything but the expected
status), the server never crashes (it answers /health at the end), no stream is left
active once every client is done (each disconnected one's rows were freed), and its
resident memory after the soak is within 10% of before (measured after a warm-up that
has used every decoder width once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import start, stream_one  # noqa: E402

MALFORMED = [  # (body bytes, the status it must get)
    (b'{"prompt": ', 400), (b"[1, 2, 3]", 400), (b'{"prompt": 5}', 400), (b'{"prompt": "a", "temperature": -1}', 400),
    (b'{"prompt": "a", "max_tokens": 100000000}', 400), (b'{"prompt": "a", "n": 1000}', 400),
    (b'{"prompt": "a", "model": "nope"}', 404), (b'{"prompt": ""}', 400), (b'{"prompt": "\\u2603\\u2603"}', 400),
    (b'{"prompt": "' + b"a" * 5000 + b'"}', 400), (b'{"prompt": "a", "stop": 7}', 400), (b"\xff\xfe\x00", 400),
]


async def post(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.read()
    writer.close()
    return int(head.split()[1])


async def hang_up(port: int, body: dict) -> int:
    """Start a stream, read its first event, and go away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readuntil(b"data: ")
    writer.transport.abort()
    return int(head.split()[1])


async def soak(port: int, total: int, width: int, seed: int) -> tuple[Counter, list[str]]:
    rng = random.Random(seed)
    plan = []
    for k in range(total):
        roll = rng.random()
        if roll < 1 / 3:
            plan.append(("malformed",) + MALFORMED[k % len(MALFORMED)])
        elif roll < 1 / 3 + 1 / 10:
            plan.append(("hang-up", {"prompt": "ROMEO:", "max_tokens": 2000, "stream": True, "seed": k}, 200))
        else:
            plan.append(("ok", {"prompt": "To be", "max_tokens": rng.randint(20, 300), "stream": rng.random() < 0.7,
                                "n": rng.choice([1, 1, 1, 2]), "seed": k, "temperature": 0.8}, 200))
    queue = list(reversed(plan))
    outcomes: Counter = Counter()
    wrong: list[str] = []

    async def client() -> None:
        while queue:
            kind, what, expected = queue.pop()
            try:
                if kind == "malformed":
                    status = await post(port, what)
                elif kind == "hang-up":
                    status = await hang_up(port, what)
                elif what["stream"]:
                    status = (await stream_one(port, what))[2]
                else:
                    status = await post(port, json.dumps(what).encode())
            except (OSError, asyncio.IncompleteReadError) as err:
                status = f"connection error: {err}"
            outcomes[(kind, status)] += 1
            if status != expected and status != 503:  # 503 + Retry-After is the server shedding load, by design
                wrong.append(f"{kind} {what if kind != 'malformed' else what[:40]!r}: {status} (expected {expected})")

    await asyncio.gather(*(client() for _ in range(width)))
    return outcomes, wrong


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def get(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server, port = start([sys.executable, "-m", "charrnn", "serve", f"m={args.run}", "--port", "0", "--device", "cpu",
                          "--max-streams", "64", "--max-queued", "256"])
    try:
        asyncio.run(soak(port, 300, 96, seed=0))  # warm up: every width, every error path
        time.sleep(0.5)
        before = rss_mb(server.pid)
        started = time.perf_counter()
        outcomes, wrong = asyncio.run(asyncio.wait_for(soak(port, args.requests, args.clients, seed=1), timeout=1800))
        seconds = time.perf_counter() - started
        time.sleep(0.5)
        after = rss_mb(server.pid)
        health = get(port, "/health")
        active = sum(m["active_streams"] + m["queued_streams"] for m in health["models"].values())
    finally:
        server.terminate()
        code = server.wait(timeout=30)
    report = {
        "requests": args.requests, "clients": args.clients, "seconds": round(seconds, 1),
        "outcomes": {f"{kind} {status}": n for (kind, status), n in sorted(outcomes.items(), key=str)},
        "500s": sum(n for (_, status), n in outcomes.items() if status == 500), "unexpected": wrong[:10],
        "streams_left_active": active, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
        "rss_change": round(after / before - 1, 4), "server_alive_at_end": health["status"] == "ok",
        "server_exit_code_on_sigterm": code,
    }
    ok = (report["500s"] == 0 and not wrong and active == 0 and abs(report["rss_change"]) <= 0.10
          and report["server_alive_at_end"] and code == 0)
    report["ok"] = ok
    print(json.dumps(report, indent=None if args.json else 1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
