"""Machine failures under the annotation job, on Ray's own multi-node harness (issue 13, item 4).

Run as a script, one scenario per process (a `ray.cluster_utils.Cluster` cannot share a process with
the test session's local Ray)::

    python tests/cluster_scenarios.py SCENARIO CORPUS_DIR OUTPUT_DIR

Scenarios:
    node-kill    a head and two worker nodes (separate raylets); the worker node that hosts a model
                 actor is removed once the first rows are written
    actor-kill   a model actor's process dies mid-batch (the fake engine's crash hook, once)
    no-progress  every model actor fails to start (the fake engine's init-failure hook)

Prints one line "RESULT <json>": {"ok": bool, "error": str | None, "wall_s": float, "killed": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _wait_for_rows(out: Path, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if list((out / "rows").glob("*.parquet")):
            return True
        time.sleep(0.2)
    return False


def _actor_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "MapWorker" in (a.class_name or "")}


def main() -> None:
    scenario, corpus, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ["MEDA_FAKE_DELAY_S"] = "0.4"
    if scenario == "actor-kill":
        os.environ["MEDA_FAKE_CRASH_ONCE"] = str(out.parent / "crashed-once")
    if scenario == "no-progress":
        os.environ["MEDA_FAKE_INIT_ERROR"] = "the checkpoint cannot be loaded (injected)"

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.batch.config import AnnotateConfig
    from pipeline.batch.job import run

    env = {"env_vars": {k: os.environ[k] for k in ("MEDA_FAKE_DELAY_S", "MEDA_FAKE_CRASH_ONCE", "MEDA_FAKE_INIT_ERROR",
                                                   "OMP_NUM_THREADS") if k in os.environ}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 128 * 2**20})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    cfg = AnnotateConfig(input=corpus, output=str(out), engine="fake", baseline="none", batch_size=1, frames=4,
                         progress=False, num_actors=2, cpus_per_actor=0.5, cpus_per_preprocess_worker=0.5)
    # Sized so that the job can still progress on what is left after a node is lost (head 1 CPU + a fresh
    # worker node of 2): two model actors and the preprocessing actor (0.5 CPU each), wherever Ray places
    # them, leave one node with a whole CPU for a decode task. With 1 CPU per model actor (and 1 for the
    # preprocessing actor) the actors can hold, or split, the 3 CPUs so that no node has a whole CPU free:
    # no decode task can be placed and the retry round stalls. Ray Data does not shrink or move a fixed
    # actor pool to make room (docs/pipeline.md, "Preprocessing in a CPU stage").
    killed: dict = {}

    def kill_a_node() -> None:
        if not _wait_for_rows(out, 120):
            return
        hosts = _actor_nodes()
        victim = next((w for w in workers if w.node_id in hosts), workers[0])
        killed["node_id"] = victim.node_id
        killed["rows_before"] = len(list((out / "rows").glob("*.parquet")))
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)  # a replacement, as an autoscaler would

    if scenario == "node-kill":
        threading.Thread(target=kill_a_node, daemon=True).start()
    t0 = time.monotonic()
    error = None
    try:
        run(cfg)
    except BaseException as e:  # noqa: BLE001 - the scenario reports it
        error = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps({"ok": error is None, "error": error and error[-4000:], "wall_s": time.monotonic() - t0,
                      "killed": killed}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
