"""`app_builder`: validated settings -> the two bound deployments (serve_config.yaml's import_path).

Everything that depends on *where* the app is launched is resolved here, on the launching side, and
handed to the replicas explicitly: a relative local ``model`` path becomes absolute, and the API
keys (``api_keys`` plus ``$api_key_env`` of this process) travel as an `APIKeys` constructor
argument of the ingress, never through the replicas' environment.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from .ingress import MedaIngress
from .model import MedaModel
from .settings import APIKeys, ServeSettings


def resolve_model_path(model: str, cwd: str | None = None) -> str:
    """A local checkpoint path as an absolute path (the replicas' working directory is not the
    launcher's); hub ids and URLs pass unchanged. A path that is clearly local (``./``, ``../``,
    ``/``, ``~``) but does not exist is an error here, not in the replicas."""
    if "://" in model:
        return model
    expanded = os.path.expanduser(model)
    path = os.path.join(cwd or os.getcwd(), expanded)
    if os.path.exists(path):
        return os.path.abspath(path)
    if expanded.startswith(("/", "./", "../")) or model.startswith("~") or model in (".", ".."):
        raise ValueError(f"model checkpoint {model!r} does not exist")
    return model  # a hub id such as Qwen/Qwen2.5-VL-7B-Instruct


def build_settings(args: dict[str, Any]) -> tuple[ServeSettings, APIKeys]:
    """Validate ``args`` and resolve what depends on the launching process (paths, keys)."""
    s = ServeSettings.model_validate(dict(args))
    # clients keep using the name as typed; the replicas load the resolved path
    s = s.model_copy(update={"served_model_name": s.served_name, "model": resolve_model_path(s.model)})
    keys = s.resolve_api_keys()
    return s, keys


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args`` (see `ServeSettings`)."""
    return build_app(args, MedaModel)


def build_app(args: dict[str, Any], model_deployment: Any = MedaModel, *model_args: Any) -> serve.Application:
    """``model_deployment`` (bound to the replicas' settings and ``model_args``) behind `MedaIngress`, with
    the deployment options the settings give. `app_builder` passes `MedaModel`; a benchmark may pass
    another deployment with the same methods (it is deployed under the name ``MedaModel``, which the
    ingress's status check looks for)."""
    s, keys = build_settings(args)
    # the replicas get the keys as an argument only; the settings they see name none
    settings = {**s.model_dump(), "api_keys": [], "api_key_env": None, "require_api_key": False}
    model = model_deployment.options(
        name="MedaModel",
        ray_actor_options={"num_gpus": s.num_gpus, "num_cpus": s.num_cpus},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.autoscaling_target,
                            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s},
        # the engine loop's rows plus as many waiting in its queue
        max_ongoing_requests=2 * s.max_num_seqs,
    ).bind(settings, *model_args)
    return MedaIngress.options(
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        autoscaling_config={"min_replicas": s.ingress_min_replicas, "max_replicas": s.ingress_max_replicas,
                            "target_ongoing_requests": max(1, s.ingress_max_ongoing_requests // 2),
                            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
    ).bind(model, settings, keys)
