"""The one owner of a run directory's layout (local path or object-store prefix).

    OUTPUT/
      run.json                      run id, configuration, its fingerprint and key, code version (see plan.py)
      _manifest/manifest.parquet    the planned inputs
      rows/*.parquet                result rows, one file per written block; row_id = clip:method:config key
      _partial/...                  unreadable row files (a killed write) moved aside on resume
      summary.json                  counts, throughput, KV savings (written when the run ends)

Every other module asks this one for these paths; none spells them itself.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS = "rows"
MANIFEST_DIR = "_manifest"
MANIFEST_FILE = "manifest.parquet"
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
