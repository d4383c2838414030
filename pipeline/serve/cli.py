"""``meda serve``: run the endpoint on a local Ray instance, or on an existing cluster (``--ray-address``).

Import-light: the parser needs argparse and `meda_engine.cli_args` only; Ray, Serve, torch and
FastAPI are imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from meda_engine.cli_args import add_compression_args, compression_from_args

APP_NAME = "meda"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``meda serve``."""
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible endpoint (Ray Serve)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve /v1/chat/completions with per-request KV compression. For clusters, deploy "
                    "serve_config.yaml, or start Ray first and pass --ray-address (docs/serving.md).")
    p.add_argument("--model", required=True, help="hub id, checkpoint directory or s3:// prefix")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    add_compression_args(p)  # the server's default compression; requests override it per call
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-gpus", type=float, help="GPUs per model replica (default: 1 if CUDA is available)")
    p.add_argument("--max-replicas", type=int, default=1, help="autoscale the model up to this many replicas")
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows one replica's engine loop decodes together")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="most prompt tokens (rows x longest) one engine step prefills together")
    p.add_argument("--kv-cache-memory-fraction", type=float,
                   help="KV-cache cap per replica, as a fraction of the device memory (default: the scheduler's)")
    p.add_argument("--allow-bucket", action="append", default=[], help="object-store bucket pattern (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], help="http(s) host pattern (repeatable)")
    p.add_argument("--allow-http", action="store_true", help="also accept plain http:// media URLs")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// media (MinIO, ...)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable (of this shell) holding the accepted API keys, comma-separated; "
                        "naming one makes a key required (default: MEDA_API_KEY, optional)")
    p.add_argument("--require-api-key", action="store_true",
                   help="refuse to start unless an API key is set (always on when --api-key-env is given)")
    p.add_argument("--ray-address", help="an existing Ray cluster, e.g. auto (default: start a local one)")
    p.add_argument("--keep-running", action="store_true",
                   help="with --ray-address: leave the app deployed on exit (stop it with `serve delete meda`)")
    p.set_defaults(func=run_serve)
    return p


def settings_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The `ServeSettings` args the flags describe (validated by `app_builder`)."""
    num_gpus = args.num_gpus
    if num_gpus is None:
        import torch

        num_gpus = 1.0 if torch.cuda.is_available() else 0.0
    comp = compression_from_args(args).to_dict()
    settings: dict[str, Any] = {
        "model": args.model, "served_model_name": args.served_model_name,
        "method": comp.pop("method"), "budget": comp.pop("budget"), "budget_tokens": comp.pop("budget_tokens"),
        "compression": comp, "device": args.device, "dtype": args.dtype, "num_gpus": num_gpus,
        "max_replicas": args.max_replicas, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory_fraction": args.kv_cache_memory_fraction,
        "allowed_buckets": args.allow_bucket, "allowed_hosts": args.allow_host, "allow_http": args.allow_http,
        "api_key_env": args.api_key_env or "MEDA_API_KEY",
        "require_api_key": bool(args.require_api_key or args.api_key_env),
    }
    if args.s3_endpoint_url:
        settings["storage"] = {"endpoint_url": args.s3_endpoint_url}
    return settings


def ray_auth_for_existing_cluster(environ: dict[str, str] | None = None) -> str | None:
    """Ray 2.60 clusters started with ``ray start`` use token auth by default, but a client joining
    one does not turn it on by itself (the connection then fails with InvalidAuthToken). With
    ``RAY_AUTH_MODE`` unset and a token available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), set ``RAY_AUTH_MODE=token``. Returns the mode set, if any."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE"):
        return None
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token")
    if env.get("RAY_AUTH_TOKEN") or token_file.is_file():
        env["RAY_AUTH_MODE"] = "token"
        return "token"
    return None


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (what process managers send) both end `meda serve` cleanly. SIGINT is installed
    explicitly: a process started with SIGINT ignored (inherited from its parent, e.g. a launcher that
    ignores it) would otherwise never see Ctrl-C and leave the app serving."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_cli(args)
    _stop_on_signals()
    if args.ray_address:
        ray_auth_for_existing_cluster()  # before Ray is imported: its config reads the variable once
    from .app import app_builder

    app = app_builder(settings)  # validates, resolves paths and keys: fails before Ray starts
    import ray
    from ray import serve

    ray.init(address=args.ray_address or None, log_to_driver=False)
    _stop_on_signals()  # again: Ray's driver start-up may install its own handlers
    started_ray = not args.ray_address
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # the application ended DEPLOY_FAILED: report the replica's error
            print(f"meda serve: error: the application did not start: {e}", file=sys.stderr, flush=True)
            for name, message in _deployment_errors(serve):
                print(f"meda serve: {name}: {message}", file=sys.stderr, flush=True)
            _stop(serve, ray, started_ray, keep=False)
            return 1
        print(f"meda serve: http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        _stop(serve, ray, started_ray, keep=args.keep_running and not started_ray)
        return 0


def _deployment_errors(serve) -> list[tuple[str, str]]:
    """(deployment, message) for each deployment of the app that reported an error (a replica's traceback)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - the status is best effort: the error above is already printed
        return []
    if app is None:
        return []
    return [(name, d.message) for name, d in app.deployments.items() if d.message]


def _stop(serve, ray, started_ray: bool, *, keep: bool) -> None:
    """Shut down what this command started: the app (and Ray itself, if it started it)."""
    if keep:
        print(f"meda serve: exiting; the application {APP_NAME!r} keeps running on the cluster "
              f"(stop it with `serve delete {APP_NAME}` or `serve shutdown -y`)", flush=True)
        return
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        if started_ray:
            ray.shutdown()
            print("meda serve: stopped (the local Ray instance too)", flush=True)
        else:
            print(f"meda serve: deleted the application {APP_NAME!r}; the Ray cluster keeps running "
                  "(`ray stop` stops it)", flush=True)
