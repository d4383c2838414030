"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and validator, offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def ray_schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates():
    cfg = load()
    validate(cfg)
    jsonschema.validate(cfg, ray_schema())  # the public schema too (the validator above is private API)
    types = cfg["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU workers must autoscale from 0"
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cfg["docker"]["image"]
    assert any("/home/ray/app" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("breakage", ["typo_key", "min_workers_above_cluster_max", "fractional_gpu", "unknown_head", "no_provider"])
def test_broken_copies_are_rejected(breakage):
    cfg = load()
    if breakage == "typo_key":
        cfg["avialable_node_types"] = cfg.pop("available_node_types")
    elif breakage == "min_workers_above_cluster_max":
        cfg["available_node_types"]["gpu_worker"]["min_workers"] = cfg["max_workers"] + 1
    elif breakage == "fractional_gpu":
        cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown_head":
        cfg["head_node_type"] = "nope"
    elif breakage == "no_provider":
        del cfg["provider"]
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate(cfg)
