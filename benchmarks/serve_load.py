"""serve_load: the endpoint under load, engine loop vs the former ``@serve.batch`` replica, over real HTTP.

Two Serve applications run side by side on one local Ray instance, on 127.0.0.1, and differ only in
the model replica; both put the *same* `MedaIngress` (auth, validation, OpenAI chunks) in front:

* ``new``: the real app, `pipeline.serve.app_builder` (`MedaModel`: one continuous-batching
  `EngineLoop` per replica; requests join the running batch as rows free up and stream as produced);
* ``old``: `StaticBatchModel`, defined here, the former design (``git show 063188a^:pipeline/serve.py``):
  ``@serve.batch(max_batch_size, batch_wait_timeout_s)`` collects prepared requests, one worker thread
  runs ``engine.stream_static(batch)`` (today's name of the old padded ``Engine.stream``: a batch is
  prefilled together and decoded until its slowest row ends; the next batch waits), and each caller
  gets its own events back. It answers the same handle protocol as `MedaModel` (``generate``,
  ``stream``, ``ready``, ``check_health``).

Same checkpoint (random weights of ``--model``'s shape, saved with the word tokenizer and loaded with
``Engine.from_pretrained``), same settings, same rows (``--max-num-seqs`` = the old max batch size).
The embedding rows of every token that is not a word (EOS, the other special tokens, unused ids) are
zeroed, so their logit is 0 and greedy decoding never picks them: answers end at ``max_tokens``
(the records check this against the usage the server reports).

Load: ``--clients`` concurrent clients (official ``openai.AsyncOpenAI``, ``stream=True``,
``stream_options={"include_usage": True}``), each sending its ``--requests-per-client`` requests back
to back, with max_tokens drawn uniformly from ``--min-tokens``..``--max-tokens`` (fixed seed; the same
requests for both sides). No request starts after ``--duration`` s of a side. Per request: time to
first token (first chunk with content), end time, completion tokens. Clock: wall time (HTTP, several
processes), so the load average of the machine is recorded around every side; sides alternate.

    python -m benchmarks.serve_load
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from pipeline.serve.model import Rejection

from . import common
from .common import log

SUITE = "serve_load"
KEY = ("model", "clients", "max_num_seqs", "requests_per_client", "side", "round")
CONFIG = ("model", "clients", "max_num_seqs", "requests_per_client")  # one comparison
SERVED_NAME = "meda-bench"
SIDES = ("new", "old")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.set_defaults(model="small")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=6, help="requests each client sends back to back")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=32, help="words of each prompt (one token per word)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows of the engine loop = the old max batch size")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02, help="the old @serve.batch wait (its default)")
    p.add_argument("--method", default="meda", help="the server's default compression method")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--sides", type=common.str_list, default=list(SIDES), help="order within a round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (new, old), alternating")
    p.add_argument("--duration", type=float, default=240.0,
                   help="per side and round: no request starts after this many seconds (in-flight ones finish)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--ray-cpus", type=int, default=4,
                   help="CPUs Ray advertises (each app holds 2: one ingress and one model replica)")
    args = p.parse_args(argv)
    for side in args.sides:
        if side not in SIDES:
            p.error(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if args.clients < 1 or args.requests_per_client < 1 or args.rounds < 1:
        p.error("--clients, --requests-per-client and --rounds must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------
# the former design: @serve.batch + Engine.stream_static in one worker thread
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Failure:
    error: BaseException


async def _in_thread(make_iterator: Callable[[], Iterator], executor: ThreadPoolExecutor) -> AsyncIterator[list]:
    """Drive a blocking iterator in ``executor``; yield the items produced so far, as lists (as before)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for item in make_iterator():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, _Failure(e))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    future = loop.run_in_executor(executor, work)
    ended = False
    while not ended:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        for item in items:
            if isinstance(item, _Failure):
                raise item.error
        ended = items[-1] is done
        items = [x for x in items if x is not done]
        if items:
            yield items
    await future


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class StaticBatchModel:
    """The former model replica: requests are prepared concurrently, then batched by ``@serve.batch``
    into one `Engine.stream_static` call that runs in a worker thread. Same handle protocol as
    `MedaModel`: ``stream`` yields a `Rejection` or ``[]`` once accepted, then lists of events."""

    FAILURES_BEFORE_UNHEALTHY = 3

    def __init__(self, settings: dict[str, Any], batch_wait_timeout_s: float = 0.02):
        import torch

        from meda_engine import CompressionConfig, Engine, GenerationConfig, Request
        from pipeline.serve.settings import ServeSettings

        self.settings = s = ServeSettings(**settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.engine = Engine.from_pretrained(s.model, device=s.device, dtype=s.dtype,
                                             max_pixels_per_frame=s.max_pixels_per_frame,
                                             max_batch_size=s.max_num_seqs)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="meda-engine")
        self._failed_batches = 0
        self._batch.set_max_batch_size(s.max_num_seqs)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # the same one-token probe as ModelServer's constructor (warms the engine alike on both sides)
        self.engine.generate_static([Request(prompt="ping", generation=GenerationConfig(max_new_tokens=1),
                                             compression=CompressionConfig(method="full"))])

    async def generate(self, request):
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            return prepared
        result = None
        async for events in self._batch(prepared):
            result = next((e.result for e in events if e.result is not None), result)
        if result is None:
            raise RuntimeError(f"the engine finished request {request.request_id} without a result")
        return result

    async def stream(self, request):
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            yield prepared
            return
        yield []  # accepted: the ingress may now start the HTTP stream
        async for events in self._batch(prepared):
            if events:
                yield events

    async def ready(self) -> dict[str, Any]:
        return {"status": "ok"}

    def check_health(self) -> None:
        if self._failed_batches >= self.FAILURES_BEFORE_UNHEALTHY:
            raise RuntimeError(f"{self._failed_batches} engine batches failed in a row")

    async def _prepare(self, request):
        from meda_engine import ConfigError, ContextLengthError, MediaError

        try:
            prepared = await asyncio.to_thread(self.engine.prepare, request)
        except ContextLengthError as e:
            return Rejection(400, str(e), "context_length_exceeded")
        except MediaError as e:
            return Rejection(400, str(e), "invalid_media")
        except ConfigError as e:
            return Rejection(400, str(e), "invalid_request")
        limit = self.settings.max_prompt_tokens
        if prepared.prompt.length > limit:
            return Rejection(400, f"the prompt has {prepared.prompt.length} tokens; this server accepts at most "
                                  f"{limit}", "context_length_exceeded")
        return prepared

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # resized from the settings in __init__
    async def _batch(self, batch):
        """Run one batch; each yield hands every caller the events produced for it since the last
        yield (a list, possibly empty), or StopIteration once its result was delivered."""
        finished = [False] * len(batch)
        try:
            async for events in _in_thread(lambda: self.engine.stream_static(batch), self._worker):
                per_request: list[list] = [[] for _ in batch]
                for event in events:
                    per_request[event.index].append(event)
                yield [StopIteration if finished[i] else per_request[i] for i in range(len(batch))]
                for event in events:
                    finished[event.index] |= event.result is not None
        except Exception:
            self._failed_batches += 1
            raise
        self._failed_batches = 0


# ---------------------------------------------------------------------------------------------------
# the two applications
# ---------------------------------------------------------------------------------------------------
def serve_args(args, checkpoint: Path) -> dict[str, Any]:
    return {"model": str(checkpoint), "served_model_name": SERVED_NAME, "device": "cpu", "dtype": "float32",
            "torch_threads": args.threads, "method": args.method, "budget": args.budget,
            "max_num_seqs": args.max_num_seqs, "num_cpus": 1, "ingress_num_cpus": 1, "ingress_max_replicas": 1,
            "max_tokens": max(2048, args.max_tokens), "api_key_env": None}


def new_app(sargs: dict[str, Any]):
    from pipeline.serve import app_builder

    return app_builder(sargs)


def old_app(sargs: dict[str, Any], batch_wait_timeout_s: float):
    """`StaticBatchModel` behind the same `MedaIngress`, with the deployment options app_builder gives
    `MedaModel` (deployed as ``MedaModel`` so the ingress's status check finds it the same way)."""
    from pipeline.serve.app import build_app

    return build_app(sargs, StaticBatchModel, batch_wait_timeout_s)


def build_checkpoint(shape: str, directory: Path, seed: int) -> dict[str, Any]:
    """Random weights of ``shape`` + the word tokenizer, saved for `Engine.from_pretrained`. The embedding
    (tied to the LM head) rows of every non-word token are zeroed: logit 0, never the greedy pick."""
    import torch

    model, tok = common.build_model(shape, torch.float32, seed=seed)
    words = {tok.convert_tokens_to_ids(w) for w in common.WORDS}
    emb = model.get_input_embeddings().weight
    masked = [i for i in range(emb.shape[0]) if i not in words]
    with torch.no_grad():
        emb[masked] = 0.0
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": common.weight_bytes(model),
            "masked_token_ids": len(masked), "word_tokens": len(words)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# the load
# ---------------------------------------------------------------------------------------------------
def workload(args) -> list[list[dict[str, Any]]]:
    rng = random.Random(args.seed)
    return [[{"prompt": " ".join(rng.choice(common.WORDS) for _ in range(args.prompt_words)),
              "max_tokens": rng.randint(args.min_tokens, args.max_tokens)}
             for _ in range(args.requests_per_client)] for _ in range(args.clients)]


async def one_request(client, req: dict[str, Any], t0: float) -> dict[str, Any]:
    sent = time.perf_counter()
    out: dict[str, Any] = {"max_tokens": req["max_tokens"], "start_s": sent - t0, "ttft_s": None, "error": None}
    text, usage, finish, chunks = [], None, None, 0
    try:
        stream = await client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": req["prompt"]}], max_tokens=req["max_tokens"],
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta and choice.delta.content:
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - sent
                    text.append(choice.delta.content)
                    chunks += 1
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # noqa: BLE001 - recorded and counted, the load goes on
        out["error"] = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    out.update(end_s=end - t0, latency_s=end - sent, content_chunks=chunks, finish_reason=finish,
               completion_tokens=usage.completion_tokens if usage is not None else None, text="".join(text))
    return out


async def run_load(base_url: str, plan: list[list[dict[str, Any]]], duration: float,
                   timeout: float) -> tuple[list[dict[str, Any]], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def one_client(c: int, reqs: list[dict[str, Any]]) -> None:
        for k, req in enumerate(reqs):
            if time.perf_counter() - t0 >= duration:
                return
            r = await one_request(client, req, t0)
            results.append({"client": c, "k": k, **r})

    try:
        await asyncio.gather(*(one_client(c, reqs) for c, reqs in enumerate(plan)))
    finally:
        await client.close()
    wall = max((r["end_s"] for r in results), default=time.perf_counter() - t0)
    return sorted(results, key=lambda r: (r["client"], r["k"])), wall


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_side(results: list[dict[str, Any]], wall: float, planned: int) -> dict[str, Any]:
    ok = [r for r in results if r["error"] is None and r["ttft_s"] is not None]
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {"requests_planned": planned, "requests_sent": len(results), "requests_ok": len(ok),
            "errors": [r["error"] for r in results if r["error"] is not None][:5],
            "n_errors": sum(r["error"] is not None for r in results),
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p90_s": percentile(ttft, 0.9),
            "ttft_max_s": max(ttft, default=None),
            "latency_p50_s": percentile(lat, 0.5), "latency_p90_s": percentile(lat, 0.9),
            "all_reached_max_tokens": all(r["completion_tokens"] == r["max_tokens"] for r in ok),
            "usage_equals_content_chunks": all(r["completion_tokens"] == r["content_chunks"] for r in ok)}


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth=False)
    tmp = Path(tempfile.mkdtemp(prefix="meda-serve-load-"))
    started_ray = False
    records: list[dict[str, Any]] = []
    try:
        log(f"[serve_load] checkpoint: random {args.model} shape")
        ckpt_info = build_checkpoint(args.model, tmp / "ckpt", args.seed)
        if not ray.is_initialized():
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}})
            started_ray = True
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        sargs = serve_args(args, tmp / "ckpt")
        t_deploy = time.perf_counter()
        apps = {"new": lambda: new_app(sargs), "old": lambda: old_app(sargs, args.batch_wait_timeout_s)}
        for side in dict.fromkeys(args.sides):
            log(f"[serve_load] deploying {side}")
            serve.run(apps[side](), name=f"serve-load-{side}", route_prefix=f"/{side}")
        deploy_s = time.perf_counter() - t_deploy
        base = {side: f"http://127.0.0.1:{port}/{side}/v1" for side in args.sides}
        # one untimed request per side first (connections, routing, first-call paths)
        warm = [[{"prompt": "the red circle", "max_tokens": 2}]]
        for side in dict.fromkeys(args.sides):
            res, _ = asyncio.run(run_load(base[side], warm, 1e9, args.request_timeout))
            if res[0]["error"]:
                raise RuntimeError(f"the {side} app does not answer: {res[0]['error']}")
        plan = workload(args)
        planned = sum(len(c) for c in plan)
        texts: dict[int, dict[str, dict[tuple[int, int], str]]] = {}
        for rnd in range(args.rounds):
            for side in args.sides:
                log(f"[serve_load] round {rnd} {side}: {args.clients} clients x {args.requests_per_client} requests")
                load_start = common.load_average()
                results, wall = asyncio.run(run_load(base[side], plan, args.duration, args.request_timeout))
                summary = summarize_side(results, wall, planned)
                texts.setdefault(rnd, {})[side] = {(r["client"], r["k"]): r["text"] for r in results}
                rec = {"model": args.model, "side": side, "round": rnd, "clients": args.clients,
                       "requests_per_client": args.requests_per_client, "max_num_seqs": args.max_num_seqs,
                       "max_tokens_range": [args.min_tokens, args.max_tokens], "prompt_words": args.prompt_words,
                       "method": args.method, "budget": args.budget,
                       "batch_wait_timeout_s": args.batch_wait_timeout_s if side == "old" else None,
                       **summary, "load_average_start": load_start, "load_average_end": common.load_average(),
                       "requests": [{k: v for k, v in r.items() if k != "text"} for r in results]}
                records.append(rec)
                log(f"    {side}: {summary['requests_ok']}/{planned} ok, {summary['completion_tokens']} tokens in "
                    f"{wall:.1f} s = {summary['tokens_per_s']:.1f} tok/s; TTFT p50 {summary['ttft_p50_s']} s, "
                    f"p90 {summary['ttft_p90_s']} s; load {rec['load_average_end']}")
        for rec in records:  # ratios new/old within a round, and whether both sides answered alike
            other = {r["side"]: r for r in records if r["round"] == rec["round"]}  # one config per run
            if "new" in other and "old" in other:
                new, old = other["new"], other["old"]
                rec["ttft_p50_new_over_old"] = (new["ttft_p50_s"] / old["ttft_p50_s"]
                                                if new["ttft_p50_s"] and old["ttft_p50_s"] else None)
                rec["tokens_per_s_new_over_old"] = (new["tokens_per_s"] / old["tokens_per_s"]
                                                    if old["tokens_per_s"] else None)
                tn, to = texts[rec["round"]]["new"], texts[rec["round"]]["old"]
                common_keys = tn.keys() & to.keys()
                rec["same_text_as_other_side"] = (sum(tn[k] == to[k] for k in common_keys) / len(common_keys)
                                                  if common_keys else None)
        run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
               "checkpoint": ckpt_info, "deploy_s": deploy_s, "ray_version": ray.__version__,
               "wall_s": time.perf_counter() - t_start, "load_average_at_end": common.load_average()}
        common.write_results(SUITE, args.out_dir, run, records, KEY, to_markdown, fresh=args.fresh)
        log(f"[serve_load] wrote {args.out_dir / (SUITE + '.json')}")
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if started_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def pooled(recs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per configuration (`CONFIG`) with both sides measured: every round's requests pooled per side (TTFT percentiles over
    all of them; tokens/s = all completion tokens / the sides' summed wall time), and the ratios new/old."""
    out: dict[tuple, dict[str, Any]] = {}
    for config in dict.fromkeys(tuple(r[k] for k in CONFIG) for r in recs):
        sides = {}
        for side in SIDES:
            rs = [r for r in recs if tuple(r[k] for k in CONFIG) == config and r["side"] == side]
            if not rs:
                break
            ttft = [q["ttft_s"] for r in rs for q in r["requests"] if q["error"] is None and q["ttft_s"] is not None]
            wall = sum(r["wall_s"] for r in rs)
            sides[side] = {"ttft_p50_s": percentile(ttft, 0.5), "ttft_p90_s": percentile(ttft, 0.9),
                           "tokens_per_s": sum(r["completion_tokens"] for r in rs) / wall if wall else 0.0,
                           "rounds": len(rs)}
        else:
            first = next(r for r in recs if tuple(r[k] for k in CONFIG) == config)
            new, old = sides["new"], sides["old"]
            out[config] = {"new": new, "old": old, "rounds": min(new["rounds"], old["rounds"]),
                          "ttft_p50_new_over_old": new["ttft_p50_s"] / old["ttft_p50_s"],
                          "tokens_per_s_new_over_old": new["tokens_per_s"] / old["tokens_per_s"],
                          **{k: first[k] for k in (*CONFIG, "max_tokens_range")}}
    return out


def target_rows(recs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """docs/benchmarks.md's Targets rows (issue 11): p50 TTFT new <= 0.3x old, tokens/s new >= 1.5x old."""
    rows = []
    for p in pooled(recs).values():
        model = p["model"]
        t, s = p["ttft_p50_new_over_old"], p["tokens_per_s_new_over_old"]
        verdict = (f"TTFT {'met' if t <= 0.3 else 'not met'}, tokens/s {'met' if s >= 1.5 else 'not met'}")
        rows.append((f"endpoint under load ({p['clients']} streaming clients, max_tokens {p['max_tokens_range'][0]}-"
                     f"{p['max_tokens_range'][1]}, {p['max_num_seqs']} rows, {model}): engine loop vs @serve.batch "
                     f"replica, p50 TTFT <= 0.3x and tokens/s >= 1.5x", verdict,
                     f"TTFT p50 {t:.2f}x ({p['new']['ttft_p50_s']:.3g} vs {p['old']['ttft_p50_s']:.3g} s), tokens/s "
                     f"{s:.2f}x ({p['new']['tokens_per_s']:.0f} vs {p['old']['tokens_per_s']:.0f}), wall time over "
                     f"HTTP, {p['rounds']} round(s)"))
    return rows


def to_markdown(data: dict[str, Any]) -> str:
    recs = data["records"]
    rows = [[r["model"], r["max_num_seqs"], r["round"], r["side"], r["clients"], r["requests_ok"], r["requests_planned"], r["n_errors"],
             r["completion_tokens"], r["wall_s"], r["tokens_per_s"], r.get("tokens_per_s_new_over_old"),
             r["ttft_p50_s"], r["ttft_p90_s"], r.get("ttft_p50_new_over_old"), r["latency_p50_s"],
             r["latency_p90_s"], r["all_reached_max_tokens"], r.get("same_text_as_other_side"),
             r["load_average_start"], r["load_average_end"]] for r in recs]
    table = common.md_table(["model", "rows", "round", "side", "clients", "ok", "planned", "errors", "completion tokens",
                             "wall s", "tok/s", "tok/s new/old", "TTFT p50 s", "TTFT p90 s", "TTFT p50 new/old",
                             "latency p50 s", "latency p90 s", "answers = max_tokens", "same text as other side",
                             "load avg start", "load avg end"], rows)
    how = ("Real HTTP on 127.0.0.1 through Ray Serve, the official `openai` client (`AsyncOpenAI`, streaming, "
           "usage included), wall-clock times. `new` = `pipeline.serve.app_builder` (continuous-batching "
           "`EngineLoop` replica); `old` = `StaticBatchModel` in benchmarks/serve_load.py, the former "
           "`@serve.batch` + `Engine.stream_static` replica; the same `MedaIngress` in front of both, same "
           "checkpoint, settings and rows (max_num_seqs = the old max batch size). Each client sends its "
           "requests back to back; TTFT = first content chunk after the request was sent; tok/s = completion "
           "tokens (server-reported usage) / wall time from the first request sent to the last stream closed. "
           "Ratios are new/old: per round, and pooled over the rounds (TTFT percentiles over all requests of a "
           "side, tok/s = all its tokens / its summed wall time). With more clients than rows, TTFT includes the "
           "wait for a row in both designs (new: until any running row finishes; old: until the running batch's "
           "slowest row finishes and the next batch forms). The sides alternate on a shared 2-core machine, so "
           "the load average around each is shown.")
    notes = []
    for config, p in pooled(recs).items():
        model = p["model"]
        t, s = p["ttft_p50_new_over_old"], p["tokens_per_s_new_over_old"]
        per_round = "; ".join(f"round {r['round']}: {r['ttft_p50_new_over_old']:.2f} / {r['tokens_per_s_new_over_old']:.2f}"
                              for r in recs if tuple(r[k] for k in CONFIG) == config and r["side"] == "new"
                              and r.get("ttft_p50_new_over_old") is not None)
        notes.append(
            f"- {model} ({p['clients']} clients x {p['requests_per_client']} requests, max_tokens "
            f"{p['max_tokens_range'][0]}-{p['max_tokens_range'][1]}, {p['max_num_seqs']} rows, {p['rounds']} round(s)): "
            f"TTFT p50 new/old {t:.2f} ({p['new']['ttft_p50_s']:.3g} vs {p['old']['ttft_p50_s']:.3g} s; target <= 0.3: "
            f"{'met' if t <= 0.3 else 'not met'}); tokens/s new/old {s:.2f} ({p['new']['tokens_per_s']:.0f} vs "
            f"{p['old']['tokens_per_s']:.0f}; target >= 1.5: {'met' if s >= 1.5 else 'not met'}). Per round (TTFT / "
            f"tok/s ratios): {per_round}. TTFT p90 {p['new']['ttft_p90_s']:.3g} vs {p['old']['ttft_p90_s']:.3g} s.")
    findings = ("Findings (computed from the records):\n\n" + "\n".join(notes) + "\n\n") if notes else ""
    return f"# serve_load\n\n{how}\n\n{findings}{table}\n\nRuns:\n{common.runs_markdown(data)}\n"


if __name__ == "__main__":
    # run through the package module, so Ray pickles StaticBatchModel by reference, not by value
    from benchmarks.serve_load import main as _main

    sys.exit(_main())
