"""The one owner of a run directory's layout (local path or object-store prefix).

    OUTPUT/
      run.json                      run id, configuration, code version (written when the run starts)
      _manifest/manifest.parquet    the planned inputs
      rows/*.parquet                result rows, one file per written block
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

    @staticmethod
    def partial_target(path: str) -> str:
        """Where an unreadable row file at ``path`` is moved aside."""
        return path.replace("/rows/", "/_partial/", 1)
