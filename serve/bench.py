"""`slimlm bench serve URL [URL ...]`: a load generator that speaks the OpenAI API.

Closed-loop load: at each concurrency level, that many clients each send streamed chat completions
back to back, over a fixed prompt set with a fixed `max_tokens`, until the level's request count is
done. Every request of a run has a text of its own (past the first few the short prompts are numbered; the long
ones are shuffled documents, one per request), so no server answers a repeated prompt from a prompt cache; what
a chat template puts before the text (a system prompt) is shared, as in real traffic. Latencies follow vLLM's
benchmark definitions:
  TTFT  send -> first chunk carrying text;
  ITL   gaps between consecutive text chunks;
  TPOT  (E2E - TTFT) / (output tokens - 1) per request;
  E2E   send -> last byte.
Output tokens come from the server's `usage` (stream_options.include_usage) when it sends one, else
from the number of text chunks. With several URLs the servers alternate at every level, so a baseline
and a candidate see the same machine state. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

from slimlm.cli import OneLineParser, _non_negative_int, _positive_int
from slimlm.env import library_versions, machine
from slimlm.errors import SlimlmError

# A fixed, varied prompt set (short questions, an instruction, a continuation) cycled in order.
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea at dawn.",
    "Explain in simple words how a transformer language model predicts the next token.",
    "List three tips for staying focused while studying.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "How do you boil water safely? Give step by step instructions.",
    "Summarize the plot of a heist movie you would like to watch.",
    "What are the benefits of regular exercise for the heart and the mind?",
]
DEFAULT_LEVELS = "1,4,8,16"
# Sentences a long prompt's document is drawn from: every request gets its own order, so no server can reuse
# another request's prefix from a prompt cache (the prefill is measured, not a cache hit).
_DOC = [
    "The harbour town woke before dawn, when the fishing boats slipped past the breakwater one by one.",
    "Its market sold bread, cheese, rope, nets and the small blue pottery the island was known for.",
    "In winter the ferry ran twice a week, and storms could cut the island off for days at a time.",
    "The school had forty pupils, two teachers and a library that filled a single upstairs room.",
    "A lighthouse keeper logged the weather every three hours in a book that went back a century.",
    "Tourists came in summer for the cliffs, the birds and a festival with music on the quay.",
    "Most families kept goats; a few grew potatoes and onions in walled fields against the wind.",
    "The council met in the old customs house and argued every spring about the harbour fees.",
    "A doctor visited on Tuesdays, and the pharmacist knew every islander's prescriptions by heart.",
    "Children learned to swim in the cove below the church, where the water stayed calm all year.",
]


def long_prompts(n_tokens: int, count: int = 64) -> list[str]:
    """`count` prompts of about `n_tokens` tokens each (about 4 characters a token): a document of the sentences
    above in an order of its own, then a question about it."""
    import random

    out = []
    for i in range(count):
        rng = random.Random(i)
        words, parts = 0, []
        while words * 4 < n_tokens * 3:  # ~0.75 words a token
            sentence = rng.choice(_DOC)
            parts.append(sentence)
            words += len(sentence.split())
        out.append(" ".join(parts) + "\n\nQuestion: what is this text about? Answer in two sentences.")
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _one(http, url: str, model: str | None, prompt: str, max_tokens: int, endpoint: str, headers: dict) -> dict:
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update({"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    if model:
        body["model"] = model
    import httpx

    out = {"ok": False, "ttft": None, "itl": [], "e2e": None, "tokens": 0, "error": None}
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with http.stream("POST", url + path, json=body, headers=headers) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    out["error"] = str(event["error"])[:200]
                    return out
                if event.get("usage"):
                    out["tokens"] = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    text = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            out["ttft"] = now - t0
                        else:
                            out["itl"].append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, OSError, ValueError) as exc:  # a benchmark reports failures, it does not stop on them
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["e2e"] = time.perf_counter() - t0
    out["tokens"] = out["tokens"] or chunks
    out["ok"] = out["ttft"] is not None
    if not out["ok"]:
        out["error"] = "no text received"
    return out


async def _level(url: str, model: str | None, concurrency: int, n: int, max_tokens: int, endpoint: str,
                 headers: dict, timeout: float, prompts: list[str] | None = None, offset: int = 0) -> dict:
    """One concurrency level: requests offset .. offset + n - 1 of the run, the k-th sending prompts[k], or past the
    end of the list a numbered repeat (`k + 1. prompt`), so that no request of a run repeats another's text."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    results: list[dict] = []
    counter = iter(range(n))
    prompts = prompts or PROMPTS

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        async def worker():
            for i in counter:
                k = offset + i
                prompt = prompts[k] if k < len(prompts) else f"{k + 1}. {prompts[k % len(prompts)]}"
                results.append(await _one(http, url, model, prompt, max_tokens, endpoint, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    e2e = [r["e2e"] for r in ok]
    row = {"url": url, "concurrency": concurrency, "requests": len(results), "completed": len(ok),
           "errors": len(results) - len(ok), "duration_s": round(duration, 3),
           "requests_per_s": round(len(ok) / duration, 4), "output_tokens": tokens,
           "output_tokens_per_s": round(tokens / duration, 3)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            v = _pct(values, q)
            row[f"{name}_p{q}_ms"] = None if v is None else round(1000 * v, 2)
    first_error = next((r["error"] for r in results if r["error"]), None)
    if first_error:
        row["first_error"] = first_error
    return row


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text}")
    return value


def _server_info(url: str, headers: dict) -> dict:
    import httpx

    try:
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        data = r.json().get("data") or []
        return data[0] if data else {}
    except (httpx.TransportError, OSError) as exc:  # no server there: nothing to measure
        return {"error": f"{type(exc).__name__}: {exc}", "unreachable": True}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:  # a server without /v1/models: informational only
        return {"error": f"{type(exc).__name__}: {exc}"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict]) -> None:
    cols = [("server", "server"), ("concurrency", "conc"), ("completed", "ok"), ("errors", "err"),
            ("requests_per_s", "req/s"), ("output_tokens_per_s", "tok/s"), ("ttft_p50_ms", "TTFT p50"),
            ("ttft_p90_ms", "p90"), ("ttft_p99_ms", "p99"), ("tpot_p50_ms", "TPOT p50"), ("tpot_p90_ms", "p90"),
            ("tpot_p99_ms", "p99"), ("itl_p50_ms", "ITL p50"), ("itl_p90_ms", "p90"), ("itl_p99_ms", "p99"),
            ("e2e_p50_ms", "E2E p50"), ("e2e_p90_ms", "p90"), ("e2e_p99_ms", "p99")]
    table = [[h for _, h in cols]] + [[_fmt(r.get(k)) if k != "requests_per_s" else f"{r[k]:.3f}" for k, _ in cols]
                                       for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print("latencies in ms")
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="slimlm bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("urls", nargs="*", metavar="URL", help="server base URL(s), e.g. http://127.0.0.1:8000")
    p.add_argument("--launch", metavar="MODEL", default=None,
                   help="start `slimlm serve MODEL` and its peers (--peers) here instead of measuring URLs")
    p.add_argument("--peers", default="auto",
                   help="with --launch: auto (each one found), none, or a comma list of llama-server,vllm")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="with --launch: the GGUF llama-server serves (default: a q8_0 export of MODEL)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="with --launch: where exports and server logs go (default ~/.cache/slimlm/bench-serve)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="with --launch: threads for every server (default: each server's own choice)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=None,
                   help="long prompts of about N tokens, a different document each (default: short questions)")
    p.add_argument("--model", action="append", default=None,
                   help="model name to send; repeat once per URL to name each (default: each server's /v1/models id)")
    p.add_argument("--concurrency", default=DEFAULT_LEVELS, help=f"comma-separated levels (default {DEFAULT_LEVELS})")
    p.add_argument("--requests", type=_positive_int, default=None,
                   help="requests per level (default: 2 x concurrency, >= 4)")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="output tokens asked per request (default 64)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--warmup", type=_non_negative_int, default=2,
                   help="requests per server before measuring (default 2)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=_seconds, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this file")
    args = p.parse_args(argv)
    if bool(args.urls) == bool(args.launch):
        p.error("give server URLs or --launch MODEL (not both)")
    if not args.launch and (args.gguf or args.threads or args.work or args.peers != "auto"):
        p.error("--peers, --gguf, --work and --threads go with --launch")
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency takes integers, got {args.concurrency!r}")
    if not levels or min(levels) < 1:
        p.error("concurrency levels must be positive")
    bad = [u for u in args.urls if not u.lower().startswith(("http://", "https://"))]
    if bad:
        p.error(f"a server URL starts with http:// or https://, got {bad[0]!r}")
    if args.json:
        from slimlm.models import check_report

        check_report(args.json)
    try:
        import httpx  # noqa: F401  (installed? checked before any work)
    except ImportError:
        print("slimlm: error: httpx is not installed: pip install 'slimlm[serve]'", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.launch:
        return _launched(args, p, levels, headers)
    names = {u.rstrip("/"): u.rstrip("/") for u in args.urls}
    return _measure(args, p, levels, headers, names, extra={})


def _launched(args, p, levels: list[int], headers: dict) -> int:
    from pathlib import Path

    from slimlm.models import resolve
    from slimlm.serve import bench_launch

    resolve(args.launch)  # a bad MODEL is one line before anything starts
    peers, skipped = bench_launch.resolve_peers(args.peers)
    for peer, why in skipped.items():
        print(f"bench serve: no {peer} row: {why}", file=sys.stderr)
    work = Path(args.work or Path.home() / ".cache" / "slimlm" / "bench-serve").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    cmds = bench_launch.commands(args.launch, peers, threads=args.threads, slots=max(levels), work=work,
                                 gguf=args.gguf)
    with bench_launch.launched(cmds, work / "logs") as urls:
        names = {url: name for name, url in urls.items()}
        extra = {"launched": {name: {"argv": cmds[name][0]} for name in cmds}, "peers_skipped": skipped,
                 "model": args.launch}
        return _measure(args, p, levels, headers, names, extra, model_name="m")


def _measure(args, p, levels: list[int], headers: dict, names: dict[str, str], extra: dict,
             model_name: str | None = None) -> int:
    urls = list(names)
    counts = [args.requests or max(4, 2 * c) for c in levels]
    # a prompt of its own for every request of the run (warm-ups included): no server answers one from a prompt
    # cache filled by an earlier level
    prompts = long_prompts(args.prompt_tokens, count=args.warmup + sum(counts)) if args.prompt_tokens else None
    servers = {u: _server_info(u, headers) for u in urls}
    for u, info in servers.items():
        if info.get("unreachable"):
            raise SlimlmError(f"cannot reach {u}: {info['error']}")
    given = args.model or ([model_name] if model_name else [])
    if len(given) not in (0, 1, len(urls)):
        p.error("give --model once for all URLs or once per URL")
    models = {u: (given[i] if len(given) > 1 else given[0]) if given else servers[u].get("id")
              for i, u in enumerate(urls)}

    async def run() -> list[dict]:
        for u in urls:
            for i in range(args.warmup):
                await _level(u, models[u], 1, 1, min(args.max_tokens, 8) if i else args.max_tokens, args.endpoint,
                             headers, args.timeout, prompts, offset=i)
        rows = []
        offset = args.warmup
        for c, n in zip(levels, counts):
            for u in urls:  # alternate servers at every level
                row = {"server": names[u], **await _level(u, models[u], c, n, args.max_tokens, args.endpoint,
                                                          headers, args.timeout, prompts, offset=offset)}
                rows.append(row)
                print(f"  {names[u]} concurrency {c}: {row['output_tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {_fmt(row['ttft_p50_ms'])} ms, errors {row['errors']}", file=sys.stderr)
            offset += n
        return rows

    rows = asyncio.run(run())
    print_table(rows)
    result = {
        "bench": "serve", "endpoint": args.endpoint, "max_tokens": args.max_tokens, "levels": levels,
        "prompt_tokens": args.prompt_tokens, **extra, "rows": rows,
        "servers": {u: {k: servers[u].get(k) for k in ("id", "max_model_len", "slimlm") if k in servers[u]}
                    for u in urls},
        # the client's machine and serving libraries (the servers measured usually run on it, in this environment)
        "machine": {**machine(), **library_versions("slimlm", "torch", "transformers", "fastapi", "uvicorn",
                                                    "httpx")},
    }
    if len(urls) >= 2:
        ratios = {}
        for c in levels:
            a, b = (next(r for r in rows if r["url"] == u and r["concurrency"] == c) for u in urls[:2])
            ratios[str(c)] = {
                "tok_s": round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3)
                if b["output_tokens_per_s"] else None,
                "ttft_p50": round(a["ttft_p50_ms"] / b["ttft_p50_ms"], 3) if a["ttft_p50_ms"] and b["ttft_p50_ms"]
                else None,
            }
        result["ratio_first_over_second"] = ratios
        result["first_over_second"] = [names[u] for u in urls[:2]]
    if args.json:
        from slimlm.models import write_file

        write_file(args.json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
