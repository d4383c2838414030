"""The online endpoint: an OpenAI-compatible Ray Serve application with per-request KV compression.

Two deployments::

    HTTP -> MedaIngress (CPU, FastAPI)                      -> MedaModel (GPU or CPU, one Engine)
            auth, body limit, parse + bound the request,       prepare (tokenise, pixels) per request,
            fetch + decode media under a pixel budget,         one engine loop per replica that requests
            build a meda_engine.Request (its own               join as they arrive; events routed back to
            CompressionConfig), responses / SSE, metrics       each caller, a failing request fails alone

One concern per module:

    settings.py  ServeSettings (the app's ``args``), no Ray / torch
    model.py     MedaModel deployment and its replica loop
    ingress.py   MedaIngress (FastAPI routes, auth, media loading)
    metrics.py   ServeMetrics (ray.util.metrics)
    app.py       app_builder: settings -> bound deployments (``serve_config.yaml``'s import_path)
    cli.py       ``meda serve`` (parser importable without torch, transformers or Ray)

Names are imported on first use, so ``pipeline.serve.cli`` and ``pipeline.serve.settings`` stay light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ServeSettings": "settings",
    "MedaModel": "model",
    "Rejection": "model",
    "MedaIngress": "ingress",
    "ServeMetrics": "metrics",
    "app_builder": "app",
    "add_serve_parser": "cli",
    "run_serve": "cli",
    "settings_from_cli": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
