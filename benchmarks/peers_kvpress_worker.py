"""Runs inside the kvpress environment (see `peers_kvpress_env.py`): torch + kvpress + transformers<5.3.

    python peers_kvpress_worker.py SPEC.json OUT.json

It imports nothing from meda. Two jobs, both on checkpoints the peers suite saved:

* ``agreement``: a real prefill with a kvpress press hooked into the model
  (``with press(model): model(prompt, past_key_values=DynamicCache())``), then greedy decoding with
  explicit logical positions, as kvpress's own pipeline does; returns the generated ids, the per-layer
  cache lengths and the prefill/decode times.
* ``synthetic``: decode speed on a ``DynamicCache`` filled with random K/V of the per-layer lengths the
  press produces for a context of L tokens (``compute_n_kept`` for SnapKV, ``get_layer_budget`` for
  PyramidKV, all of L for no press), one step = one model forward with one token, as kvpress's
  pipeline loop; configurations are timed interleaved.
* ``real``: RULER prompts on a real (GGUF) checkpoint (`benchmarks/peers_kvpress_real.py`): per prompt
  and press, the context ``ids[:n_ctx]`` is prefilled with the press hooked in, the rest of the prompt
  is fed on the compressed cache one token at a time at its logical positions (layers may hold
  different lengths, so no multi-token mask is needed), then greedy decoding to EOS or the token
  limit. ``snapkv`` can be given our per-layer kept counts (``layer_counts``), so both sides keep the
  same number of tokens in every layer.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def press_for(name, budget, length, window):
    from kvpress import PyramidKVPress, SnapKVPress

    n = round(budget * length)
    # compression_ratio such that kvpress's int(L * (1 - ratio)) equals round(budget * L) exactly
    ratio = (length - n - 0.5) / length
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=window)
    if name == "pyramidkv":
        return PyramidKVPress(compression_ratio=ratio, window_size=window)
    raise ValueError(name)


def real_press(run, window):
    """A kvpress press for one ``real`` run, or None (no compression)."""
    from dataclasses import dataclass, field

    from kvpress import (AdaKVPress, ExpectedAttentionPress, KVzipPress, ObservedAttentionPress, PyramidKVPress,
                         SnapKVPress)

    name, budget = run["press"], run["budget"]
    if name == "none":
        return None
    ratio = lambda n, length: (length - n - 0.5) / length  # noqa: E731  (int(L * (1 - r)) == n)

    @dataclass
    class LayerCountSnapKV(SnapKVPress):
        """SnapKVPress keeping ``counts[layer]`` tokens in each layer (our allocator's exact counts)."""

        counts: list = field(default_factory=list)

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            self.compression_ratio = ratio(self.counts[module.layer_idx], keys.shape[2])
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    if name == "snapkv" and run.get("layer_counts"):
        return LayerCountSnapKV(window_size=window, kernel_size=5, counts=run["layer_counts"])
    r = ratio(round(budget * run["n_ctx"]), run["n_ctx"])
    if name == "snapkv":
        return SnapKVPress(compression_ratio=r, window_size=window)
    if name == "pyramidkv":
        return PyramidKVPress(compression_ratio=r, window_size=window)
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=r)
    if name == "adakv_snapkv":
        return AdaKVPress(SnapKVPress(compression_ratio=r, window_size=window))
    if name == "kvzip":  # context reconstruction, its own (non-uniform) allocation over the layers
        return KVzipPress(compression_ratio=r)
    if name == "observed_attention":  # H2O's accumulated attention (normalised by the queries that see a key)
        return ObservedAttentionPress(compression_ratio=r)
    raise ValueError(f"unknown press {name!r}")


def _kvzip_tokenizer(tokenizer):
    """KVzipPress loads ``AutoTokenizer.from_pretrained(model.config.name_or_path)`` for the chat
    template's prefix and suffix; a GGUF checkpoint needs its ``gguf_file`` for that, so hand it the
    tokenizer already loaded (the same template)."""
    import kvpress.presses.kvzip_press as kz

    class _Loaded:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return tokenizer

    kz.AutoTokenizer = _Loaded


@torch.inference_mode()
def real(job, out_path):
    """RULER prompts on a GGUF checkpoint; results are written to ``out_path`` after every answer."""
    from transformers import AutoModelForCausalLM, DynamicCache

    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    sdpa = AutoModelForCausalLM.from_pretrained(job["dir"], gguf_file=job["gguf_file"], attn_implementation="sdpa",
                                                dtype=torch.float32).eval()
    _kvzip_tokenizer(AutoTokenizer.from_pretrained(job["dir"], gguf_file=job["gguf_file"]))
    eager = None  # ObservedAttentionPress needs the attention weights: the same weights, eager attention
    log(f"[kvpress] loaded {job['gguf_file']} in {time.perf_counter() - t0:.0f}s")
    eos = set(job["eos"])
    out = []
    for prompt in job["prompts"]:
        ids = torch.tensor([prompt["ids"]])
        n_ctx, total = prompt["n_ctx"], len(prompt["ids"])
        for run in prompt["runs"]:
            c0 = time.process_time()
            press = real_press({**run, "n_ctx": n_ctx}, job["window"])
            model = sdpa
            if run["press"] == "observed_attention":
                if eager is None:
                    eager = AutoModelForCausalLM.from_pretrained(
                        job["dir"], gguf_file=job["gguf_file"], attn_implementation="eager", dtype=torch.float32).eval()
                model = eager
            cache = DynamicCache()
            ctx = ids[:, :n_ctx]
            pos = torch.arange(n_ctx)[None]
            if press is None:
                logits = model(input_ids=ctx, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[0, -1]
            else:
                with press(model):
                    logits = model(input_ids=ctx, past_key_values=cache, position_ids=pos,
                                   logits_to_keep=1).logits[0, -1]
            lengths = [int(cache.layers[i].keys.shape[2]) for i in range(len(cache.layers))]
            for j in range(n_ctx, total):  # the rest of the prompt, on the compressed cache
                logits = model(input_ids=ids[:, j : j + 1], past_key_values=cache,
                               position_ids=torch.tensor([[j]])).logits[0, -1]
            gen = []
            for i in range(prompt["max_new_tokens"]):
                tok = int(logits.argmax())
                if tok in eos:
                    break
                gen.append(tok)
                if len(gen) >= prompt["max_new_tokens"]:
                    break
                logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache,
                               position_ids=torch.tensor([[total + i]])).logits[0, -1]
            out.append({"key": f"{run['press']}|{run['budget']}|{prompt['key']}", "generated_ids": gen,
                        "layer_lengths_after_prefill": lengths, "cpu_s": round(time.process_time() - c0, 3)})
            log(f"[kvpress] {out[-1]['key']}: {len(gen)} tokens, lengths {lengths[:3]}..., "
                f"{out[-1]['cpu_s']:.1f}s")
            with open(out_path, "w") as f:
                json.dump({"real": out}, f)
    return out


def layer_lengths(model, name, budget, length, window):
    from kvpress.utils import compute_n_kept

    n_layers = model.config.num_hidden_layers
    if name == "none":
        return [length] * n_layers
    press = press_for(name, budget, length, window)
    if name == "snapkv":
        return [compute_n_kept(length, press.compression_ratio)] * n_layers
    return [press.get_layer_budget(layer.self_attn, length) for layer in model.model.layers]


def greedy(model, cache, first_logits, start_pos, n_new):
    ids = [int(first_logits.argmax())]
    times = []
    pos = torch.tensor([[start_pos]])
    for i in range(n_new - 1):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=pos + i)
        ids.append(int(out.logits[0, -1].argmax()))
        times.append(time.perf_counter() - t0)
    return ids, times


@torch.inference_mode()
def agreement(job):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], attn_implementation="sdpa",
                                                 dtype=getattr(torch, job["dtype"])).eval()
    prompt = torch.tensor([job["prompt_ids"]])
    length = prompt.shape[1]
    out = []
    for name in job["presses"]:
        for budget in job["budgets"] if name != "none" else [1.0]:
            cache = DynamicCache()
            t0 = time.perf_counter()
            if name == "none":
                first = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1).logits[0, -1]
            else:
                with press_for(name, budget, length, job["window"])(model):
                    first = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1).logits[0, -1]
            t1 = time.perf_counter()
            lengths = [int(cache.layers[i].keys.shape[2]) for i in range(len(cache.layers))]
            ids, times = greedy(model, cache, first, length, job["max_new_tokens"])
            out.append({"press": name, "budget": budget, "generated_ids": ids, "prefill_s": t1 - t0,
                        "decode_step_s": times, "layer_lengths_after_prefill": lengths})
            log(f"[kvpress] agreement {name} r={budget}: lengths {lengths[:4]}..., ids {ids[:8]}...")
    return out


@torch.inference_mode()
def synthetic(job):
    from transformers import AutoModelForCausalLM, DynamicCache

    records = []
    for dname in job["dtypes"]:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], attn_implementation="sdpa", dtype=dtype).eval()
        cfg = model.config
        n_kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        for length in job["contexts"]:
            g = torch.Generator().manual_seed(0)
            pool_k = torch.randn((1, n_kv, length, hd), generator=g).to(dtype)
            pool_v = torch.randn((1, n_kv, length, hd), generator=g).to(dtype)
            configs = [("none", 1.0)] + [(p, r) for r in job["budgets"] for p in job["presses"]]
            states = {}
            for name, r in configs:
                lengths = layer_lengths(model, name, r, length, job["window"])
                cache = DynamicCache()
                for i, n in enumerate(lengths):
                    cache.update(pool_k[:, :, :n].clone(), pool_v[:, :, :n].clone(), i)
                held = sum(2 * n * n_kv * hd * pool_k.element_size() for n in lengths)
                states[(name, r)] = {"cache": cache, "tok": 11, "pos": length, "lengths": lengths, "held": held,
                                     "times": [], "cpu": []}

            def step(st):
                out = model(input_ids=torch.tensor([[st["tok"]]]), past_key_values=st["cache"],
                            position_ids=torch.tensor([[st["pos"]]]))
                st["tok"] = int(out.logits[0, -1].argmax())
                st["pos"] += 1

            for s in range(job["warmup"] + job["steps"]):
                for st in states.values():
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    step(st)
                    if s >= job["warmup"]:
                        st["times"].append(time.perf_counter() - t0)
                        st["cpu"].append(time.process_time() - c0)
            for (name, r), st in states.items():
                med = statistics.median(st["times"])
                records.append({"dtype": dname, "context": length, "press": name, "budget": r,
                                "layer_lengths": st["lengths"], "kv_bytes_held": st["held"],
                                "step_times_s": st["times"], "median_s": med, "ms_per_step": 1e3 * med,
                                "step_cpu_s": st["cpu"], "cpu_median_s": statistics.median(st["cpu"])})
                log(f"[kvpress] {dname} L={length} {name} r={r}: {1e3 * med:.1f} ms")
            del states
        del model
    return records


def main():
    spec = json.loads(open(sys.argv[1]).read())
    threads = int(spec.get("threads", 1))
    torch.set_num_threads(threads)
    import kvpress  # noqa: F401  (installs kvpress's attention patch, as any kvpress user gets)
    import transformers

    result = {"threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if spec.get("agreement"):
        result["agreement"] = agreement(spec["agreement"])
    if spec.get("synthetic"):
        result["synthetic"] = synthetic(spec["synthetic"])
    if spec.get("real"):
        result["real"] = real(spec["real"], sys.argv[2] + ".partial")
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
