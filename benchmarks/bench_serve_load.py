"""`prism serve` under load and under hostile input, through the real CLI process and the official
`openai` client (issue 14's probe, re-run on the uvicorn transport).

A tiny random PRISM artifact is served by `prism serve` in a subprocess (so its RSS is measured from
/proc). Load: N requests at each concurrency level (default 100 at 1, 500 at 8, 1,000 at 32 = 1,600),
failures, p50/p95 latency, server RSS before and after. Hostile input: a table of malformed bodies
(status, OpenAI error shape), 16 unauthenticated 8 MB bodies (RSS delta), 150 half-sent requests
(what they get, RSS delta), 20 client disconnects (log lines, tracebacks).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve_load.py            # ~1-3 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = os.environ.get("PRISM_SRC") or str(Path(__file__).resolve().parents[1] / "src")  # PRISM_SRC: another checkout


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(art: Path, api_key: str, log_path: Path, extra: list) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PRISM_API_KEY=api_key)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_persona.cli",
            "serve",
            "--prism",
            str(art),
            "--port",
            "0",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-tokens",
            "8",
            *extra,
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=log,
        text=True,
    )
    for line in proc.stderr:
        log.write(line)
        if "listening on" in line:
            url = line.strip().rsplit(" ", 1)[-1]
            threading.Thread(target=lambda: [log.write(x) or log.flush() for x in proc.stderr], daemon=True).start()
            return proc, url
    raise RuntimeError(f"the server did not start; see {log_path}")


def load_table(url: str, key: str, pid: int, levels: list[tuple[int, int]]) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
    rows = []
    for n, conc in levels:
        before = rss_mb(pid)
        lat, fails = [], []

        def one(i):
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(
                    model="prism",
                    messages=[{"role": "user", "content": f"q{i} expert?"}],
                    max_tokens=4,
                    extra_body={"prism": {}},
                )
                lat.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                fails.append(type(exc).__name__)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
        lat.sort()
        rows.append(
            {
                "requests": n,
                "concurrency": conc,
                "failures": len(fails),
                "fail_kinds": sorted(set(fails)),
                "p50_s": round(statistics.median(lat), 3) if lat else None,
                "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
                "req_per_s": round(n / wall, 1),
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(rss_mb(pid), 1),
            }
        )
    return rows


def post_raw(port: int, body: bytes, key: str | None, timeout=10) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, {}


def chat(**kw) -> bytes:
    return json.dumps({"model": "prism", "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


BAD = [
    ("not JSON", b"{not json"),
    ("not UTF-8", b"\xff\xfe\x00"),
    ("empty body", b""),
    ("JSON array", b"[1,2]"),
    ("no messages", b'{"model": "prism"}'),
    ("messages not a list", b'{"messages": "hi"}'),
    ("empty messages", b'{"messages": []}'),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("content an object", b'{"messages": [{"role": "user", "content": {"a": 1}}]}'),
    ("temperature a string", chat(temperature="hot")),
    ("temperature 7", chat(temperature=7)),
    ("top_p 1.5", chat(top_p=1.5)),
    ("max_tokens 0", chat(max_tokens=0)),
    ("max_tokens a string", chat(max_tokens="9")),
    ("n=3", chat(n=3)),
    ("stream 'yes'", chat(stream="yes")),
    ("seed 2**64", chat(seed=2**64)),
    ("seed -1", chat(seed=-1)),
    ("prism.force 'on'", chat(prism={"force": "on"})),
    ("prompt over the limit", chat(messages=[{"role": "user", "content": "x" * 20000}])),
]


def bad_body_table(port: int, key: str) -> list[dict]:
    rows = []
    for name, body in BAD:
        status, reply = post_raw(port, body, key)
        err = reply.get("error") if isinstance(reply, dict) else None
        shape = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
        rows.append({"case": name, "status": status, "openai_error_shape": shape})
    return rows


def hostile(port: int, pid: int, key: str) -> list[dict]:
    rows = []
    # 16 unauthenticated 8 MB bodies
    before = rss_mb(pid)
    big = b"x" * (8 * 1024 * 1024)
    statuses = []

    def send_big(_):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big))
            try:
                s.sendall(big)
            except OSError:
                pass
            statuses.append(int(s.recv(4096).split(b" ", 2)[1]))
            s.close()
        except (OSError, IndexError, ValueError) as exc:
            statuses.append(type(exc).__name__)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(send_big, range(16)))
    rows.append(
        {
            "case": "16 unauthenticated 8 MB bodies",
            "answers": sorted(map(str, set(statuses))),
            "rss_delta_mb": round(rss_mb(pid) - before, 1),
        }
    )
    # 150 half-sent requests
    before = rss_mb(pid)
    socks = []
    for _ in range(150):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key.encode()
                + b'\r\nContent-Length: 1000\r\n\r\n{"model"'
            )
            socks.append(s)
        except OSError:
            pass
    t0 = time.perf_counter()
    try:
        health = post_raw(port, chat(), key, timeout=30)[0]
    except OSError as exc:
        health = type(exc).__name__
    answers: dict = {}
    for s in socks:
        try:
            code = str(int(s.recv(4096).split(b" ", 2)[1]))
        except (OSError, IndexError, ValueError):
            code = "no answer"
        answers[code] = answers.get(code, 0) + 1
        s.close()
    rows.append(
        {
            "case": "150 half-sent requests",
            "a_normal_request_meanwhile": health,
            "answers": answers,
            "seconds_until_all_answered": round(time.perf_counter() - t0, 1),
            "rss_delta_mb": round(rss_mb(pid) - before, 1),
        }
    )
    # 20 client disconnects mid-body
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode()
            + b'\r\nContent-Length: 500\r\n\r\n{"mod'
        )
        time.sleep(0.02)
        s.close()
    time.sleep(1.0)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="100x1,500x8,1000x32", help="requests x concurrency, comma-separated")
    ap.add_argument("--out", default="", help="write the tables as JSON here")
    ap.add_argument("--server-args", default="--body-timeout-s 5", help="extra `prism serve` flags")
    args = ap.parse_args()
    sys.path.insert(0, SRC)
    import torch

    torch.set_num_threads(1)
    from prism_persona.testing import make_tiny_artifact, make_tiny_model

    levels = [tuple(int(x) for x in item.split("x")) for item in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", num_layers=3, hidden_size=64)
        art = make_tiny_artifact(model, Path(tmp) / "prism")
        key = "bench-key"
        log_path = Path(tmp) / "server.log"
        proc, url = start_server(art, key, log_path, args.server_args.split())
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        try:
            result = {
                "load": load_table(url, key, proc.pid, levels),
                "bad_bodies": bad_body_table(port, key),
                "hostile": hostile(port, proc.pid, key),
            }
        finally:
            proc.terminate()
            proc.wait(60)
        text = log_path.read_text()
        result["log"] = {
            "disconnect_lines": text.count("disconnected"),
            "tracebacks": text.count("Traceback"),
            "exit_code_after_sigterm": proc.returncode,
        }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
