"""Load test of `lathe serve`: N concurrent streaming chat requests to a server on 127.0.0.1.

Every request must succeed and /health must keep answering during the load; the script prints
p50/p90/p99 of time to first token and of total latency, and the throughput. The baseline, measured
in the same run on the same server build, is the same load with batching off (one request per
batch), so the printed ratios show what merging queued requests into one batch buys.

    python bench/serve_load.py                      # a tiny random-weight model, 100 requests
    python bench/serve_load.py --run runs/my-run --n 100 --max-tokens 32

Loopback only and bounded: N requests, max_tokens each, and a deadline (--timeout) for the whole load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A tiny model writes text, one token at a time.",
    'def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # {"name": "lathe", "ok": true}',
    "Numbers like 12, 345 and 6789 are split one digit per token. Caf\u00e9 cr\u00e8me, na\u00efve.",
] * 3


def make_tiny_run(folder: Path, seed: int = 0, block_size: int = 128) -> Path:
    """A run directory (checkpoint + tokenizer.json) with a tiny random-weight GPT.

    The output rows of the special tokens are zero, so their logits are 0 while some text token's
    is almost surely above 0: greedy replies never end early and always run to max_tokens, which
    keeps every request's work the same (and gives tests long, deterministic replies)."""
    import torch

    from lathe.config import ModelConfig, TokenizerConfig
    from lathe.model import GPT
    from lathe.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from lathe.train.checkpoint import save_checkpoint

    tok = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=320, min_frequency=1))
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                            block_size=block_size, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "checkpoints", 1, model, None, {})
    tok.save(folder / "tokenizer.json")
    return folder


@dataclass
class LoadReport:
    requests: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)
    health_checks: int = 0
    health_failures: int = 0
    health_max_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def lines(self) -> list[str]:
        return [f"requests {self.requests}, failed {len(self.failures)}, wall {self.wall_s:.2f} s, "
                f"{self.completion_tokens} tokens, {self.tokens_per_s:.1f} tokens/s",
                "time to first token  " + _quantiles(self.ttft_s),
                "total latency        " + _quantiles(self.latency_s),
                f"/health during load: {self.health_checks} checks, {self.health_failures} failed, "
                f"slowest {self.health_max_s * 1000:.0f} ms"]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _quantiles(values: list[float]) -> str:
    return "  ".join(f"p{q} {percentile(values, q) * 1000:7.0f} ms" for q in (50, 90, 99))


async def _one_stream(client, url: str, body: dict, report: LoadReport) -> None:
    start = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                report.failures.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    report.failures.append(f"stream error: {chunk['error']['message']}")
                    return
                if chunk.get("usage"):
                    report.completion_tokens += chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
            if not done:
                report.failures.append("stream ended without [DONE]")
                return
    except Exception as e:  # a load test counts failures, whatever they are
        report.failures.append(f"{type(e).__name__}: {e}")
        return
    report.latency_s.append(time.perf_counter() - start)
    report.ttft_s.append(first if first is not None else report.latency_s[-1])


async def _watch_health(client, url: str, report: LoadReport, stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            ok = (await client.get(url + "/health")).status_code == 200
        except Exception:
            ok = False
        report.health_checks += 1
        report.health_failures += not ok
        report.health_max_s = max(report.health_max_s, time.perf_counter() - start)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


async def run_load(url: str, model: str, n: int = 100, max_tokens: int = 16, api_key: str | None = None,
                   timeout_s: float = 120.0) -> LoadReport:
    """N concurrent streaming chat requests to `url` (loopback), with /health polled throughout."""
    import httpx

    if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
        raise ValueError(f"load tests run against this machine only, not {url}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport(requests=n, wall_s=0.0)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s, trust_env=False) as client:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_health(client, url, report, stop))
        start = time.perf_counter()
        bodies = [{"model": model, "stream": True, "stream_options": {"include_usage": True},
                   "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                   "messages": [{"role": "user", "content": f"Request {i}: tell me about the quick brown fox."}]}
                  for i in range(n)]
        try:
            await asyncio.wait_for(asyncio.gather(*(_one_stream(client, url, b, report) for b in bodies)), timeout_s)
        except asyncio.TimeoutError:
            report.failures.append(f"the load did not finish within {timeout_s:.0f} s")
        report.wall_s = time.perf_counter() - start
        stop.set()
        await watcher
    return report


def _serve_and_load(run: Path, args, max_batch: int) -> tuple[LoadReport, int]:
    from lathe.serve.server import BackgroundServer, Limits, create_app, load_models

    models = load_models(run, device=args.device, name="bench")
    app = create_app(models, limits=Limits(max_batch_rows=max_batch, max_pending=max(256, args.n)))
    with BackgroundServer(app) as server:
        report = asyncio.run(run_load(server.url, "bench", args.n, args.max_tokens, timeout_s=args.timeout))
        batches = app.state.scheduler.batches
        import httpx

        alive = httpx.get(server.url + "/health", trust_env=False).status_code == 200
    if not alive:
        report.failures.append("/health did not answer after the load")
    return report, batches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory to serve (default: a tiny random-weight model)")
    p.add_argument("--n", type=int, default=100, help="concurrent streaming requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64, help="samples per batch in the measured configuration")
    p.add_argument("--timeout", type=float, default=300, help="deadline for each load, seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the tiny model, where more "
                                                 "threads only contend; torch's default with --run)")
    p.add_argument("--no-baseline", action="store_true", help="skip the batching-off baseline")
    args = p.parse_args()
    if args.n > 1000:
        p.error("--n is capped at 1000: this is a bounded loopback test")

    threads = args.threads or (None if args.run else 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else make_tiny_run(Path(tmp) / "tiny")
        report, batches = _serve_and_load(run, args, args.max_batch)
        print(f"== batched (up to {args.max_batch} samples per batch): {batches} batches")
        print("\n".join(report.lines()))
        failed = bool(report.failures or report.health_failures)
        for failure in report.failures[:10]:
            print("  FAILED:", failure)
        if not args.no_baseline:
            base, base_batches = _serve_and_load(run, args, 1)
            print(f"== baseline, batching off (1 request per batch): {base_batches} batches")
            print("\n".join(base.lines()))
            failed |= bool(base.failures or base.health_failures)
            if not failed:
                print(f"== ratios batched / baseline: throughput x{report.tokens_per_s / base.tokens_per_s:.2f}, "
                      f"p50 latency x{percentile(report.latency_s, 50) / percentile(base.latency_s, 50):.2f}, "
                      f"p50 time to first token x{percentile(report.ttft_s, 50) / percentile(base.ttft_s, 50):.2f}")
    print("FAILED" if failed else "OK: no request failed, /health answered throughout")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
