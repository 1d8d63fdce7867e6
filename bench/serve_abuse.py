"""`memrerank serve` under abuse, on loopback: normal clients' latency and success while a hostile or careless
client runs beside them (issue 27). Bounded: a few scenarios of --seconds each, loopback only.

The server is `memrerank serve` itself (a subprocess, the CLI's flags), on a tiny 2-layer BERT artifact (max length
64, fp32; the tests' checkpoint: random weights, the real MiniLM tokenizer), one onnxruntime thread. Normal clients
send 1-document requests in a closed loop. Scenarios, each beside them:

* alone — the normal clients only (the reference);
* (a) big — one client sending 1,000-document requests back to back;
* (b) slow — 50 slow uploaders: each sends its headers and half its body, then a byte every 0.5 s (each gets its
  408 at the body timeout and starts again);
* (c) flood — 16 clients sending 500-document requests back to back, far beyond the queue (503s expected);
* (d) malformed — 4 clients cycling through a 200k-deep JSON array, a 5,000-digit `top_n`, a text/plain POST, a
  foreign Host, garbage bytes.

Recorded per scenario: the normal clients' p50/p99 and outcomes (200, 503, other, timeouts), the server's peak RSS
(from /proc), and every error body that is not JSON in the API's error shape (from every client). Targets (the
issue's): p99 of a 1-document request under (a) ≤ 3 × its p99 alone + one model call (measured: a full step,
`max_batch_tokens` of pairs, scored alone in-process); under (b) and (c) every normal request answered (success or
a fast 503), none past its timeout; peak RSS within the configured budget; zero non-JSON error bodies.

    python bench/serve_abuse.py --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, environment, write

HERE = Path(__file__).parent
WORDS = ["the", "lake", "painter", "passport", "dentist", "appointment", "garden", "kitchen", "sister", "birthday", "train", "ticket", "museum", "holiday", "recipe", "bicycle", "river", "morning", "invoice", "library"]
CLIENT_TIMEOUT_S = 10.0
#: Documents per flood request (each past the model's length: 64 tokens a pair).
FLOOD_DOCS = 500


def artifact(workdir: Path) -> Path:
    """The tests' tiny BERT (2 layers, hidden 32, the real MiniLM tokenizer), exported once at max length 64."""
    out = workdir / "artifact"
    if (out / "manifest.json").is_file():
        return out
    import models
    from memrerank.export import export_model

    ckpt = models.make_bert(workdir / "checkpoint")
    return export_model(str(ckpt), out, precisions=["fp32"], max_length=64, log=lambda m: None)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one_model_call_s(art: Path, threads: int) -> float:
    """Seconds for one batcher step scored alone: ``max_batch_tokens`` worth of full-length pairs (median of 5)."""
    import statistics

    from memrerank import LoadOptions, Reranker

    rr = Reranker.load(art, LoadOptions("fp32", threads=threads))
    rng = random.Random(1)
    rows = max(1, rr.max_batch_tokens // 64)
    pairs = [("a question about the lake", text(rng, 80)) for _ in range(rows)]
    rr.predict(pairs)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        rr.predict(pairs)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Server:
    """`memrerank serve` in a subprocess; its RSS sampled from /proc while a scenario runs."""

    def __init__(self, art: Path, flags: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "memrerank.cli", "serve", str(art), "--port", str(self.port), "-q", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import httpx

        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode(errors="replace"))
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not start in 120 s")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Tally:
    """Outcomes and latencies of the normal clients, and every error body seen (checked for the error shape)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.status: dict[str, int] = {}
        self.non_json: list[str] = []
        self.errors_checked = 0

    def count(self, key: str) -> None:
        with self.lock:
            self.status[key] = self.status.get(key, 0) + 1

    def check_error(self, status: int, content_type: str, body: bytes, who: str) -> None:
        """An error answer must be JSON ``{"error": {"type", "message"}}``."""
        ok = content_type.startswith("application/json")
        if ok:
            try:
                data = json.loads(body)
                ok = isinstance(data, dict) and set(data) == {"error"} and {"type", "message"} <= set(data["error"])
            except ValueError:
                ok = False
        with self.lock:
            self.errors_checked += 1
            if not ok:
                self.non_json.append(f"{who}: {status} {content_type!r} {body[:80]!r}")


def normal_client(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
        while not stop.is_set():
            payload = {"query": f"when is the {rng.choice(WORDS)}?", "documents": [text(rng, 12)]}
            t = time.perf_counter()
            try:
                r = c.post(f"{url}/v1/rerank", json=payload)
            except httpx.TimeoutException:
                tally.count("timeout")
                continue
            except httpx.TransportError:
                tally.count("transport_error")
                time.sleep(0.05)
                continue
            elapsed = time.perf_counter() - t
            if r.status_code == 200:
                with tally.lock:
                    tally.latencies.append(elapsed)
                tally.count("200")
            else:
                tally.count(str(r.status_code))
                tally.check_error(r.status_code, r.headers.get("content-type", ""), r.content, "normal")
                if r.status_code == 503:
                    time.sleep(min(0.2, float(r.headers.get("retry-after", "0.2"))))  # a polite client backs off


def big_client(url: str, stop: threading.Event, tally: Tally, docs: int, extra: dict) -> None:
    import httpx

    rng = random.Random(7)
    texts = [text(rng, 40) for _ in range(docs)]
    with httpx.Client(timeout=300) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = c.post(f"{url}/v1/rerank", json={"query": "which memory mentions the lake?", "documents": texts})
            except httpx.HTTPError:
                extra["failed"] = extra.get("failed", 0) + 1
                continue
            if r.status_code == 200:
                extra.setdefault("latencies", []).append(time.perf_counter() - t)
                extra["200"] = extra.get("200", 0) + 1
            else:
                extra[str(r.status_code)] = extra.get(str(r.status_code), 0) + 1
                tally.check_error(r.status_code, r.headers.get("content-type", ""), r.content, "big")
                time.sleep(0.1)


def _raw_answer(raw: bytes) -> tuple[int, str, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    ctype = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("content-type:")), "")
    return status, ctype, body


def slow_uploader(port: int, stop: threading.Event, tally: Tally, extra: dict) -> None:
    body = json.dumps({"query": "q", "documents": ["x" * 2000]}).encode()
    head = (f"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(head + body[: len(body) // 2])
            sent, raw = len(body) // 2, b""
            s.settimeout(0.5)
            while not stop.is_set():
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    if sent < len(body) - 1:  # never the last byte
                        s.sendall(body[sent:sent + 1])
                        sent += 1
                    continue
                if not chunk:
                    break
                raw += chunk
            s.close()
        except OSError:
            extra["socket_errors"] = extra.get("socket_errors", 0) + 1
            time.sleep(0.2)
            continue
        if raw:
            status, ctype, payload = _raw_answer(raw)
            extra[str(status)] = extra.get(str(status), 0) + 1
            tally.check_error(status, ctype, payload, "slow uploader")
        time.sleep(0.2)


MALFORMED = [
    ("deep JSON", b"[" * 200_000 + b"]" * 200_000, {"Content-Type": "application/json"}),
    ("huge integer", b'{"query": "q", "documents": ["d"], "top_n": 1' + b"0" * 5000 + b"}",
     {"Content-Type": "application/json"}),
    ("text/plain", b'{"query": "q", "documents": ["d"]}', {"Content-Type": "text/plain", "Origin": "http://evil.example"}),
    ("foreign Host", b'{"query": "q", "documents": ["d"]}', {"Content-Type": "application/json",
                                                            "Host": "attacker.example"}),
    ("garbage", os.urandom(2000), {"Content-Type": "application/json"}),
    ("not an object", b'[1, 2, 3]', {"Content-Type": "application/json"}),
]


def malformed_client(url: str, stop: threading.Event, tally: Tally, extra: dict) -> None:
    import httpx

    i = 0
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            name, body, headers = MALFORMED[i % len(MALFORMED)]
            i += 1
            try:
                r = c.post(f"{url}/v1/rerank", content=body, headers=headers)
            except httpx.HTTPError:
                extra["failed"] = extra.get("failed", 0) + 1
                continue
            extra[str(r.status_code)] = extra.get(str(r.status_code), 0) + 1
            tally.check_error(r.status_code, r.headers.get("content-type", ""), r.content, f"malformed ({name})")


def flood_client(url: str, stop: threading.Event, tally: Tally, extra: dict, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    docs = [text(rng, 40) for _ in range(FLOOD_DOCS)]
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            try:
                r = c.post(f"{url}/v1/rerank", json={"query": "flood", "documents": docs})
            except httpx.HTTPError:
                extra["failed"] = extra.get("failed", 0) + 1
                continue
            extra[str(r.status_code)] = extra.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                tally.check_error(r.status_code, r.headers.get("content-type", ""), r.content, "flood")


def run_scenario(server: Server, name: str, seconds: float, normal: int, tally_all: Tally) -> dict:
    import numpy as np

    stop = threading.Event()
    tally = Tally()
    extra: dict = {}
    threads = [threading.Thread(target=normal_client, args=(server.url, stop, tally, i)) for i in range(normal)]
    if name == "big":
        threads.append(threading.Thread(target=big_client, args=(server.url, stop, tally, 1000, extra)))
    elif name == "slow":
        threads += [threading.Thread(target=slow_uploader, args=(server.port, stop, tally, extra)) for _ in range(50)]
    elif name == "flood":
        threads += [threading.Thread(target=flood_client, args=(server.url, stop, tally, extra, i)) for i in range(16)]
    elif name == "malformed":
        threads += [threading.Thread(target=malformed_client, args=(server.url, stop, tally, extra)) for _ in range(4)]
    rss = [server.rss_mib()]
    for t in threads:
        t.start()
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.1)
        rss.append(server.rss_mib())
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 30)
        rss.append(server.rss_mib())
    lat = np.array(tally.latencies) if tally.latencies else np.array([float("nan")])
    answered = sum(v for k, v in tally.status.items() if k.isdigit())
    with tally_all.lock:
        tally_all.non_json += tally.non_json
        tally_all.errors_checked += tally.errors_checked
    big = extra.pop("latencies", None)
    return {"scenario": name, "seconds": seconds, "normal_clients": normal, "normal": dict(sorted(tally.status.items())),
            "normal_requests": sum(tally.status.values()), "normal_answered": answered,
            "success_rate": tally.status.get("200", 0) / max(1, sum(tally.status.values())),
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "max_ms": 1e3 * float(np.max(lat)),
            "timeouts": tally.status.get("timeout", 0), "transport_errors": tally.status.get("transport_error", 0),
            "abuser": extra, **({"big_request_s": [round(x, 2) for x in big]} if big else {}),
            "rss_start_mib": rss[0], "rss_peak_mib": max(rss), "errors_checked": tally.errors_checked,
            "non_json_errors": tally.non_json[:10]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "serve-abuse")
    ap.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    ap.add_argument("--normal", type=int, default=3, help="normal clients (closed loop, 1-document requests)")
    ap.add_argument("--threads", type=int, default=1, help="the server's onnxruntime threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_abuse.json")
    args = ap.parse_args()
    env = environment(args.threads)
    art = artifact(args.workdir)
    model_call = one_model_call_s(art, args.threads)
    # the service as configured for this run: defaults but for short timeouts and a smaller queue and request
    # budget (so (b) and (c) reach them within a short run; a 1,000-document request, 64k tokens, still fits)
    config = {"max_concurrency": 32, "max_connections": 128, "max_queued_tokens": 2**17, "header_timeout_s": 2.0,
              "body_timeout_s": 2.0, "max_request_bytes": 4 * 2**20, "max_request_tokens": 2**16}
    flags = ["--precision", "fp32", "--threads", str(args.threads), "--max-concurrency", str(config["max_concurrency"]),
             "--max-connections", str(config["max_connections"]), "--max-queued-tokens",
             str(config["max_queued_tokens"]), "--max-request-tokens", str(config["max_request_tokens"]),
             "--header-timeout", str(config["header_timeout_s"]), "--body-timeout", str(config["body_timeout_s"])]
    # what the configuration bounds, above the idle server: bodies being received (max_concurrency ×
    # max_request_bytes, ×3 once parsed: bytes, str and list objects), queued ids (the queue and one admitted
    # request beyond it, ~40 bytes per Python int) and two tokenizing slices
    budget_mib = (3 * config["max_concurrency"] * config["max_request_bytes"]
                  + 40 * (config["max_queued_tokens"] + config["max_request_tokens"]) + 2 * 64 * 2**20) / 2**20
    server = Server(art, flags)
    tally_all = Tally()
    results = []
    try:
        idle_rss = server.rss_mib()
        for name in ("alone", "big", "slow", "flood", "malformed"):
            row = run_scenario(server, name, args.seconds, args.normal, tally_all)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "non_json_errors"}), flush=True)
            time.sleep(args.seconds / 5)  # let the queue drain and the timeouts fire
    finally:
        server.stop()
    alone = results[0]
    by = {r["scenario"]: r for r in results}
    target_a_ms = 3 * alone["p99_ms"] + 1e3 * model_call
    targets = {
        "a_p99_ms": by["big"]["p99_ms"], "a_target_ms": target_a_ms, "a_met": by["big"]["p99_ms"] <= target_a_ms,
        "bc_all_answered": all(by[s]["timeouts"] == 0 and by[s]["transport_errors"] == 0 for s in ("slow", "flood")),
        "rss_growth_mib": max(r["rss_peak_mib"] for r in results) - idle_rss, "rss_budget_mib": budget_mib,
        "non_json_errors": len(tally_all.non_json), "errors_checked": tally_all.errors_checked}
    targets["rss_met"] = targets["rss_growth_mib"] <= budget_mib
    print(json.dumps(targets), flush=True)
    write(args.out, {"environment": env, "artifact": "tests' tiny BERT (2 layers, hidden 32), max length 64, fp32",
                     "model_call_ms": 1e3 * model_call, "config": config, "idle_rss_mib": idle_rss,
                     "client_timeout_s": CLIENT_TIMEOUT_S, "results": results, "targets": targets,
                     "non_json_examples": tally_all.non_json[:10]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
