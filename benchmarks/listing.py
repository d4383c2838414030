"""listing: an S3 prefix of 100,000 objects, listed by today's serial listing and by the parallel one.

A moto S3 server runs in its own process (``python -m benchmarks.listing --serve``: its CPU does not share
the client's GIL) on 127.0.0.1. Each layout gets its own bucket (moto scans a whole bucket per request),
filled with boto3 from 16 threads (small objects, the key as body, so sizes and ETags differ):

* ``wide``  100 sub-prefixes x 1,000 objects   ``wide/p000/c0000.mp4``
* ``deep``  10 x 10 sub-prefixes x 1,000 objects ``deep/a00/b00/c0000.mp4`` (the split goes two levels down)
* ``flat``  all objects under one prefix, no sub-prefixes (both listings are serial; not run by default)

Listings (``pipeline.storage``), timed interleaved (`common.round_robin`, ``--reps`` each, one warm-up):

* ``serial``      today's listing, ``list_media_entries(list_workers=1)``: one recursive s3fs ``find``,
                  1,000 keys a page, one page after the other
* ``split-1``     the parallel listing's requests (split as for 16 workers) sent one at a time: separates
                  what the split costs or saves on this server from what concurrency gains
* ``parallel-W``  ``list_media_entries(list_workers=W)`` for each W of ``--workers``

Every listing asks the server (s3fs's directory cache is cleared before each). Recorded: wall time
(median, min, max), the client process's CPU time (the server is another process), the requests the
server answered per listing, and whether the entries (uri, source_version) equal the serial listing's.

``--servers`` (default ``moto,replay:0,replay:50``) says how the server answers:

* ``moto``      moto itself, loopback, no added latency. moto spends ~0.2-0.3 s of CPU on each page of 1,000
                keys (its response serialiser) in one process (one GIL), and scans the whole bucket and sorts
                every key under the prefix for each page: it is not a model of S3, whose pages are served
                by many machines at once
* ``replay:L``  each listing page moto answered once (the untimed first listing) is replayed from memory
                after sleeping L ms (HEAD requests go to moto, after the same sleep): a store that answers
                every request in L ms, concurrently, with no server CPU; ``replay:0`` leaves the client's
                own cost alone (botocore parsing the XML: the part concurrency cannot hide under one GIL)

Uploads are never delayed. Run it on one core (``taskset -c 1``) on a shared machine: client and server
then share that core.

    taskset -c 1 python -m benchmarks.listing --objects 100000 --layouts wide,deep
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from . import common

SUITE = "listing"
KEY = ("layout", "objects", "server", "latency_ms", "config")
CONTROL = "/__meda_bench__"
LAYOUTS = ("wide", "deep", "flat")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=100_000, help="objects per layout (a multiple of 1,000 for wide/deep)")
    p.add_argument("--layouts", type=common.str_list, default=["wide", "deep"], help=f"of {', '.join(LAYOUTS)}")
    p.add_argument("--servers", type=common.str_list, default=["moto", "replay:0", "replay:50"],
                   help="moto (as is) and/or replay:L (listing pages replayed after L ms), comma list")
    p.add_argument("--workers", type=common.int_list, default=[4, 16, 32], help="list_workers of the parallel runs")
    p.add_argument("--reps", type=int, default=3, help="timed listings per configuration (median reported)")
    p.add_argument("--upload-threads", type=int, default=16)
    p.add_argument("--serve", action="store_true", help="internal: run the moto server, print its port")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# the server (child process)
# ---------------------------------------------------------------------------------------------------
def serve() -> int:
    """moto's S3 app behind a WSGI wrapper that adds the latency, replays listing pages (in replay mode) and
    counts GET/HEAD requests; GET ``CONTROL?latency_ms=X&replay=0|1&reset=1`` sets the latency and the mode
    and returns (then resets) the count."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    state = {"latency_s": 0.0, "requests": 0, "replay": False, "replayed": 0}
    pages: dict[str, tuple[str, list, bytes]] = {}  # path?query of a listing page -> moto's answer
    lock = threading.Lock()

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == CONTROL:
            qs = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            with lock:
                if "latency_ms" in qs:
                    state["latency_s"] = float(qs["latency_ms"][0]) / 1e3
                if "replay" in qs:
                    state["replay"] = qs["replay"][0] == "1"
                body = json.dumps(state).encode()
                if "reset" in qs:
                    state["requests"] = state["replayed"] = 0
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            with lock:
                state["requests"] += 1
                delay = state["latency_s"]
            if delay:
                time.sleep(delay)
            query = environ.get("QUERY_STRING", "")
            if state["replay"] and environ["REQUEST_METHOD"] == "GET" and "list-type=2" in query:
                key = environ.get("PATH_INFO", "") + "?" + query
                if key not in pages:
                    answer: dict[str, Any] = {}

                    def capture(status, headers, exc_info=None):
                        answer.update(status=status, headers=headers)

                    body = b"".join(app(environ, capture))
                    pages[key] = (answer["status"], answer["headers"], body)
                else:
                    with lock:
                        state["replayed"] += 1
                status, headers, body = pages[key]
                start_response(status, headers)
                return [body]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, wrapped, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    return 0


class Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.listing", "--serve"],
                                     stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        port = self.proc.stdout.readline().strip()
        if not port:
            raise RuntimeError("the moto server did not start")
        self.endpoint = f"http://127.0.0.1:{port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def control(self, **query) -> dict[str, Any]:
        url = f"{self.endpoint}{CONTROL}?{urllib.parse.urlencode(query)}"
        with self._opener.open(url, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# set-up and measurement
# ---------------------------------------------------------------------------------------------------
def layout_keys(layout: str, n: int) -> list[str]:
    if layout == "wide":
        return [f"wide/p{i:03d}/c{j:04d}.mp4" for i in range(n // 1000) for j in range(1000)]
    if layout == "deep":
        subs = n // 1000
        return [f"deep/a{i // 10:02d}/b{i % 10:02d}/c{j:04d}.mp4" for i in range(subs) for j in range(1000)]
    if layout == "flat":
        return [f"flat/c{j:06d}.mp4" for j in range(n)]
    raise ValueError(f"unknown layout {layout!r}; choose of {', '.join(LAYOUTS)}")


def upload(endpoint: str, bucket: str, keys: list[str], threads: int) -> float:
    import boto3
    from botocore.config import Config

    t0 = time.perf_counter()
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=threads))
    client.create_bucket(Bucket=bucket)

    def put(chunk):
        for k in chunk:
            client.put_object(Bucket=bucket, Key=k, Body=k.encode())

    chunks = [keys[i:i + 500] for i in range(0, len(keys), 500)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, chunks))
    return time.perf_counter() - t0


def entries_of(url: str, found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`list_media_entries`'s result from a raw listing (for ``split-1``, which calls the helper directly)."""
    from pipeline import storage

    ext = set().union(*storage.KIND_EXTENSIONS.values())
    return [{"uri": storage._to_url(url, p), "source_version": storage.source_version(found[p])}
            for p in sorted(found) if storage._is_media(p, ext)]


def measure(server: Server, layout: str, args) -> Iterator[list[dict[str, Any]]]:
    """Upload the layout's objects, then for each ``--servers`` case yield its records."""
    from pipeline import storage

    bucket = f"bench-{layout}-{uuid.uuid4().hex[:6]}"
    keys = layout_keys(layout, args.objects)
    server.control(latency_ms=0)
    common.log(f"[listing] {layout}: uploading {len(keys):,} objects ...")
    up_s = upload(server.endpoint, bucket, keys, args.upload_threads)
    common.log(f"[listing] {layout}: uploaded in {up_s:.0f} s")
    url = f"s3://{bucket}/{layout}"
    opts = {"endpoint_url": server.endpoint}
    fs, path = storage.filesystem_for(url, **opts)
    results: dict[str, list[dict[str, Any]]] = {}

    def run(config: str):
        fs.invalidate_cache()
        if config == "serial":
            out = storage.list_media_entries(url, list_workers=1, **opts)
        elif config == "split-1":
            out = entries_of(url, storage._s3_parallel_find(fs, path, [], 1, split_until=16))
        else:
            out = storage.list_media_entries(url, list_workers=int(config.split("-")[1]), **opts)
        results[config] = out

    configs = ["serial", "split-1"] + [f"parallel-{w}" for w in args.workers]
    records = []
    for case in args.servers:
        mode, _, latency_text = case.partition(":")
        if mode not in ("moto", "replay") or (mode == "moto" and latency_text):
            raise ValueError(f"--servers: {case!r} is neither moto nor replay:L")
        latency = float(latency_text or 0)
        server.control(latency_ms=latency, replay=int(mode == "replay"))
        # requests per listing: one untimed call each, counted by the server
        requests = {}
        for c in configs:
            server.control(reset=1)
            run(c)
            requests[c] = server.control(reset=1)["requests"]
        same = {c: results[c] == results["serial"] for c in configs}
        n_entries = len(results["serial"])
        if n_entries != len(keys):
            raise RuntimeError(f"serial listing found {n_entries} of {len(keys)} objects")
        cpu: dict[str, list[float]] = {}
        server.control(reset=1)
        times = common.round_robin({c: (lambda c=c: run(c)) for c in configs}, warmup=0, steps=args.reps,
                                   log=common.log, cpu_times=cpu)
        counts = server.control(reset=1)  # replayed: listing pages answered from memory while timing
        same = {c: same[c] and results[c] == results["serial"] for c in configs}  # the last timed call too
        base = statistics.median(times["serial"])
        base_cpu = statistics.median(cpu["serial"])
        for c in configs:
            s = common.summarize(times[c])
            rec = {"layout": layout, "objects": len(keys), "server": mode, "latency_ms": latency, "config": c, **s,
                   "cpu_median_s": statistics.median(cpu[c]), "times_s": times[c], "cpu_s": cpu[c],
                   "requests": requests[c], "entries": len(results[c]), "same_as_serial": same[c],
                   "speedup_vs_serial": base / s["median_s"],
                   "cpu_ratio_vs_serial": statistics.median(cpu[c]) / base_cpu if base_cpu else None,
                   "upload_s": up_s, "case_requests_timed": counts["requests"],
                   "case_pages_replayed_timed": counts["replayed"]}
            records.append(rec)
            common.log(f"[listing] {layout} {case} {c}: {s['median_s']:.2f} s "
                       f"(x{rec['speedup_vs_serial']:.2f}), CPU {rec['cpu_median_s']:.2f} s, "
                       f"{requests[c]} requests, same entries: {same[c]}")
        if not all(same.values()):
            raise RuntimeError(f"listings differ from the serial one: {same}")
        yield records
        records = []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)  # moto takes any credentials; these keep botocore off ~/.aws
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ["no_proxy"] = os.environ["NO_PROXY"]
    t_start = time.time()
    run = {"command": common.command_line(SUITE, argv), "machine": common.machine_info(args.threads, bandwidth=False)}
    import botocore
    import moto
    import s3fs

    run["versions"] = {"s3fs": s3fs.__version__, "botocore": botocore.__version__, "moto": moto.__version__}
    server = Server()
    try:
        for layout in args.layouts:
            for records in measure(server, layout, args):
                run["wall_s"] = time.time() - t_start
                run["load_average_at_end"] = common.load_average()
                # written after each (layout, server) case: a long run keeps what it measured
                common.write_results(SUITE, args.out_dir, dict(run), records, KEY, to_markdown, fresh=args.fresh)
                args.fresh = False
    finally:
        server.stop()
    return 0


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _case(r):
    return r["layout"], r["objects"], r["server"], r["latency_ms"]


def _server_name(server: str, latency: float) -> str:
    return "moto" if server == "moto" else f"replay {latency:g} ms"


def _best_parallel(recs, case):
    par = [r for r in recs if _case(r) == case and r["config"].startswith("parallel-")]
    return max(par, key=lambda r: r["speedup_vs_serial"], default=None)


def target_rows(recs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """docs/benchmarks.md's Targets row (issue 13): an S3 (moto) listing of 100,000 objects timed against
    today's listing, with the same entries."""
    big = [r for r in recs if r["objects"] >= 100_000]
    if not big:
        return []
    parts = []
    for case in sorted({_case(r) for r in big}):
        serial = next((r for r in big if _case(r) == case and r["config"] == "serial"), None)
        best = _best_parallel(big, case)
        if serial and best:
            parts.append(f"{case[0]}, {_server_name(case[2], case[3])}: serial {serial['median_s']:.1f} s, "
                         f"{best['config']} {best['median_s']:.1f} s (x{best['speedup_vs_serial']:.2f})")
    same = all(r["same_as_serial"] for r in big)
    return [("S3 (moto) listing of 100,000 objects timed against today's serial listing, same entries",
             "met" if same and parts else "not met", "; ".join(parts) + ("" if same else "; ENTRIES DIFFER"))]


def to_markdown(data: dict[str, Any]) -> str:
    recs = sorted(data["records"], key=lambda r: (r["layout"], r["objects"], r["server"], r["latency_ms"],
                                                  ("serial", "split-1").index(r["config"])
                                                  if r["config"] in ("serial", "split-1")
                                                  else 2 + int(r["config"].split("-")[1])))
    rows = [[r["layout"], r["objects"], _server_name(r["server"], r["latency_ms"]), r["config"], r["median_s"],
             r["min_s"], r["max_s"], r["cpu_median_s"], r["requests"], r["speedup_vs_serial"], r.get("cpu_ratio_vs_serial"),
             "yes" if r["same_as_serial"] else "NO"] for r in recs]
    table = common.md_table(["layout", "objects", "server", "listing", "wall s (median)", "min", "max",
                             "client CPU s", "requests", "speed-up vs serial", "CPU / serial CPU",
                             "same entries"], rows)
    how = ("A moto S3 server in its own process on 127.0.0.1; per layout one bucket: `wide` = 100 sub-prefixes "
           "x 1,000 objects, `deep` = 10 x 10 sub-prefixes x 1,000 objects (`flat` = one prefix, no sub-prefixes). "
           "`serial` = today's listing (`list_media_entries(list_workers=1)`: one recursive s3fs `find`, 1,000 "
           "keys a page, pages one after the other); `parallel-W` = `list_workers=W` (delimiter listings split the "
           "prefix into sub-prefixes, each listed recursively, W at a time; s3fs's client holds at most 10 "
           "connections, botocore's default, so W = 16 has at most 10 requests in flight); `split-1` = the "
           "parallel listing's requests sent one at a time, which separates what the split itself costs or "
           "saves on this server from what concurrency gains. Server `moto` = moto as is, loopback, no added "
           "latency: it spends ~0.2-0.3 s of CPU per page of 1,000 keys in one process and scans the bucket and "
           "sorts every key under the prefix for each page, so it is no model of S3; `replay L ms` = each "
           "listing page moto answered once is replayed from memory after L ms (HEAD requests also wait L ms): "
           "a store answering every request in L ms, concurrently, with no server CPU (real S3 pages take tens "
           "to a few hundred ms); `replay 0 ms` leaves only the client's own cost (botocore parsing the XML "
           "under one GIL). Every listing asks the server (s3fs's cache cleared before each); configurations "
           "interleaved, median of the repetitions; client CPU = this process's CPU time (the server is "
           "another process); requests = GET/HEAD requests the server answered for one listing; same entries = "
           "(uri, source_version) lists equal to the serial listing's.")
    return f"# listing\n\n{how}\n\n{table}\n\nRuns:\n{common.runs_markdown(data)}\n"


if __name__ == "__main__":
    from benchmarks.listing import main as _main

    sys.exit(_main())
