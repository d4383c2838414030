"""The one owner of a run directory's layout (local path or object-store prefix).

    OUTPUT/
      run.json                      run id, configuration, its fingerprint and key, code version (see plan.py)
      _manifest/manifest.parquet/   the planned inputs, sorted by clip_id: Parquet shards part-NNNNN.parquet
                                    (a directory named like a file, as Spark/Hive datasets are; a run from
                                    before shards holds one file there, still read). Written to
                                    manifest.parquet.new/ first, then swapped in
      _plan/<attempt>/part-NNNNN.parquet
                                    the (clip, method) tasks of one attempt ("tasks": the run's pending tasks;
                                    "lost-N": the retry round of the rows lost with their batch), read by Ray
                                    Data; each attempt's directory is emptied before it is written, and _plan/
                                    is removed when the run ends
      _plan/stage-<name>/           the distributed plan's scratch (partitioned.py): in/in-NNNNN.parquet (one
                                    normalised manifest chunk each), pNNNNN/*.parquet (the pieces of clip-id
                                    range NNNNN: its inputs, previous versions and rows); removed once used.
                                    Its task shards are named part-<range>-<k>.parquet
      rows/*.parquet                result rows, one file per written block; row_id = clip:method:config key
                                    (and worker-errors-*.parquet: rows of batches Ray gave up on)
      _partial/...                  unreadable row files (a killed write) moved aside on resume
      summary.json                  counts, throughput, KV savings (written when the run ends)

Every other module asks this one for these paths; none spells them itself.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS = "rows"
MANIFEST_DIR = "_manifest"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_STAGING = "manifest.parquet.new"
PLAN = "_plan"
PARTIAL = "_partial"
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory. ``output`` is a URL (``s3://...``) or a local path, or the
    filesystem-relative root that ``storage.filesystem_for`` returned for one."""

    output: str

    @property
    def rows(self) -> str:
        return join(self.output, ROWS)

    @property
    def manifest(self) -> str:
        return join(self.output, MANIFEST_DIR, MANIFEST_FILE)

    @property
    def manifest_staging(self) -> str:
        """Where a new manifest's shards are written before they replace `manifest`."""
        return join(self.output, MANIFEST_DIR, MANIFEST_STAGING)

    @staticmethod
    def part(directory: str, index: int) -> str:
        """The ``index``-th Parquet shard of a sharded dataset (manifest, plan) under ``directory``."""
        return join(directory, f"part-{index:05d}.parquet")

    @property
    def plan(self) -> str:
        return join(self.output, PLAN)

    def plan_attempt(self, attempt: str) -> str:
        """The task shards of one attempt ("tasks", "lost-1", ...)."""
        if not attempt or "/" in attempt:
            raise ValueError(f"bad plan attempt name {attempt!r}")
        return join(self.output, PLAN, attempt)

    @staticmethod
    def range_part(directory: str, partition: int, index: int) -> str:
        """The ``index``-th shard of clip-id range ``partition`` under ``directory`` (the distributed plan's)."""
        return join(directory, f"part-{partition:05d}-{index:04d}.parquet")

    def stage(self, name: str) -> str:
        """The distributed plan's scratch directory ``name`` ("plan", "lost")."""
        if not name or "/" in name:
            raise ValueError(f"bad stage name {name!r}")
        return join(self.output, PLAN, f"stage-{name}")

    @staticmethod
    def stage_input(stage: str, chunk: int) -> str:
        """One normalised manifest chunk in a stage directory."""
        return join(stage, "in", f"in-{chunk:05d}.parquet")

    @staticmethod
    def stage_piece(stage: str, partition: int, name: str) -> str:
        """A piece of clip-id range ``partition`` in a stage directory."""
        return join(stage, f"p{partition:05d}", f"{name}.parquet")

    @staticmethod
    def stage_range(stage: str, partition: int) -> str:
        return join(stage, f"p{partition:05d}")

    def worker_errors(self, stamp: str) -> str:
        """The row file of the batches Ray gave up on, written at ``stamp`` (a time and a pid)."""
        return join(self.rows, f"worker-errors-{stamp}.parquet")

    @property
    def partial(self) -> str:
        return join(self.output, PARTIAL)

    @property
    def run_json(self) -> str:
        return join(self.output, RUN_JSON)

    @property
    def summary_json(self) -> str:
        return join(self.output, SUMMARY_JSON)

    def partial_target(self, path: str) -> str:
        """Where an unreadable row file at ``path`` (a file under `rows`, spelt as the filesystem of
        ``output`` spells it) is moved aside: the same relative path under `partial`. Computed relative to
        this run's rows root, so an output whose own path contains ``/rows/`` stays inside the output."""
        root = self.rows.rstrip("/") + "/"
        if not path.startswith(root):
            raise ValueError(f"{path} is not under the run's rows directory {root}")
        return join(self.partial, path[len(root):])
