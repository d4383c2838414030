"""`CompressionConfig` / `GenerationConfig`: one budget meaning and strict types at every door
(Python, CLI, HTTP JSON, job configs), and the shared CLI flags."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from meda_engine.cli_args import add_compression_args, compression_from_args
from meda_engine.config import CompressionConfig, ConfigError, GenerationConfig, parse_budget, parse_budget_tokens


# ------------------------------------------------------------------------------------------ budget
def test_budget_is_a_fraction_everywhere_and_int_one_means_everything():
    assert CompressionConfig(budget=1).budget == 1.0 and isinstance(CompressionConfig(budget=1).budget, float)
    # JSON encoders (JavaScript) send 1.0 as 1: the HTTP door must agree with the CLI and Python.
    from_json = CompressionConfig.from_dict(json.loads('{"method": "snapkv", "budget": 1}'))
    assert from_json.budget == 1.0 and from_json.keep_fraction(1000) == 1.0
    assert parse_budget("1") == 1.0 and parse_budget(1) == 1.0
    assert CompressionConfig(budget=0.25).keep_fraction(400) == 0.25


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 2, 64, float("nan"), float("inf"), -float("inf")])
def test_budget_outside_unit_interval_is_rejected_pointing_at_budget_tokens(bad):
    with pytest.raises(ConfigError, match=r"budget.*fraction in \(0, 1\].*budget_tokens|budget must be finite"):
        CompressionConfig(budget=bad)


@pytest.mark.parametrize("bad", [True, False, "0.2", None, [0.2]])
def test_budget_of_the_wrong_type_is_rejected(bad):
    with pytest.raises(ConfigError, match="budget must be a number"):
        CompressionConfig(budget=bad)


def test_budget_tokens_is_a_strict_count_and_overrides_budget():
    c = CompressionConfig(method="h2o", budget=0.9, budget_tokens=24)
    assert c.keep_fraction(240) == pytest.approx(0.1)
    assert c.keep_fraction(10) == 1.0  # capped at the prompt
    for bad in (0, -3, 1.5, 3.0, True, "24"):
        with pytest.raises(ConfigError, match="budget_tokens"):
            CompressionConfig(budget_tokens=bad)


def test_parse_budget_messages():
    with pytest.raises(ConfigError, match=r"fraction in \(0, 1\].*--budget-tokens"):
        parse_budget("1.5")
    with pytest.raises(ConfigError, match=r"fraction in \(0, 1\].*--budget-tokens"):
        parse_budget("64")
    for bad in ("0", "nan", "inf", "-0.2"):
        with pytest.raises(ConfigError, match="fraction"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="not a number"):
        parse_budget("lots")
    assert parse_budget(" 0.3 ") == 0.3
    assert parse_budget_tokens("64") == 64
    for bad in ("0", "1.5", "x", True):
        with pytest.raises(ConfigError, match="budget_tokens"):
            parse_budget_tokens(bad)


# -------------------------------------------------------------------------------------- strict types
INT_FIELDS = ["window", "sink", "score_queries", "pool_kernel"]
BOOL_FIELDS = ["keep_all_text", "merge_keys", "merge_within_modality", "text_prior"]
FLOAT_FIELDS = ["temperature", "min_layer_ratio", "max_layer_ratio", "pyramid_beta"]


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("bad", [1.5, 3.0, True, "3", None])
def test_int_fields_reject_floats_bools_and_strings(name, bad):
    with pytest.raises(ConfigError, match=name):
        CompressionConfig(**{name: bad})


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("bad", ["yes", "true", 1, 0, 1.0])
def test_bool_fields_reject_non_bools(name, bad):
    with pytest.raises(ConfigError, match=name):
        CompressionConfig(**{name: bad})


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [True, "1.0", float("nan"), float("inf"), None])
def test_float_fields_reject_non_numbers_and_non_finite(name, bad):
    with pytest.raises(ConfigError, match=name):
        CompressionConfig(**{name: bad})


def test_float_fields_accept_json_ints_as_floats():
    c = CompressionConfig(temperature=2, min_layer_ratio=0, max_layer_ratio=1, pyramid_beta=20)
    assert all(isinstance(getattr(c, n), float) for n in FLOAT_FIELDS)


@pytest.mark.parametrize("changes, field", [
    ({"method": "magic"}, "method"), ({"method": 3}, "method"), ({"entropy": "both"}, "entropy"),
    ({"entropy": None}, "entropy"), ({"merge": "sum"}, "merge"), ({"merge": 1}, "merge"),
    ({"window": -1}, "window"), ({"sink": -1}, "sink"), ({"score_queries": -1}, "score_queries"),
    ({"pool_kernel": 4}, "pool_kernel"), ({"pool_kernel": 0}, "pool_kernel"),
    ({"pyramid_beta": 0.5}, "pyramid_beta"), ({"temperature": 0}, "temperature"),
    ({"min_layer_ratio": 0.5, "max_layer_ratio": 0.4}, "min_layer_ratio"),
    ({"max_layer_ratio": 1.5}, "max_layer_ratio"),
])
def test_out_of_range_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        CompressionConfig(**changes)


def test_from_dict_rejects_unknown_keys_and_non_mappings_and_round_trips():
    with pytest.raises(ConfigError, match=r"unknown compression setting\(s\) \['budgett'\]"):
        CompressionConfig.from_dict({"budgett": 0.2})
    with pytest.raises(ConfigError, match="mapping"):
        CompressionConfig.from_dict([("budget", 0.2)])  # type: ignore[arg-type]
    c = CompressionConfig(method="snapkv", budget=0.3, budget_tokens=12, window=8)
    assert CompressionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert CompressionConfig.from_dict(None) == CompressionConfig()


def test_generation_config_is_strict():
    for kwargs, field in [({"max_new_tokens": 1.5}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
                          ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": "hot"}, "temperature"),
                          ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"top_p": float("nan")}, "top_p"), ({"seed": 1.5}, "seed"), ({"stop": [1]}, "stop")]:
        with pytest.raises(ConfigError, match=field):
            GenerationConfig(**kwargs)
    assert GenerationConfig(stop="###").stop == ("###",)
    assert GenerationConfig(temperature=1).temperature == 1.0


# --------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    p = argparse.ArgumentParser()
    add_compression_args(p)
    return compression_from_args(p.parse_args(argv))


def test_cli_flags_build_the_same_config_as_python():
    assert _parse([]) == CompressionConfig()
    c = _parse(["--method", "snapkv", "--budget", "1", "--window", "8", "--merge", "pivot", "--merge-keys",
                "--score-queries", "0", "--temperature-entropy", "2"])
    assert c == CompressionConfig(method="snapkv", budget=1.0, window=8, merge="pivot", merge_keys=True,
                                  score_queries=0, temperature=2.0)
    assert _parse(["--method", "h2o", "--budget-tokens", "64"]).budget_tokens == 64


def test_cli_budget_above_one_is_a_usage_error_naming_budget_tokens(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--budget", "1.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "fraction in (0, 1]" in err and "--budget-tokens" in err


def test_cli_args_and_config_do_not_import_torch():
    code = ("import sys, meda_engine.cli_args, meda_engine.config; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_cli_rejects_bad_budget_before_loading_anything(capsys):
    from meda_engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "/nonexistent", "--prompt", "hi", "--budget", "64"])
    assert e.value.code == 2
    assert "--budget-tokens" in capsys.readouterr().err
