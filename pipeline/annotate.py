"""Compatibility module: the annotation job now lives in :mod:`pipeline.batch` (one concern per file).

``meda annotate``, ``jobs/annotate.py``, tests and benchmarks import these names from here.
"""

from __future__ import annotations

from .batch.config import (  # noqa: F401
    DEFAULT_INPUT,
    DEFAULT_MODEL,
    DEFAULT_OUTPUT,
    DEFAULT_PROMPT,
    REPO_ROOT,
    AnnotateConfig,
    add_annotate_args,
    add_annotate_parser,
    code_version,
    config_from_args,
)
from .batch.job import run  # noqa: F401
from .batch.layout import RunLayout, join  # noqa: F401
from .batch.plan import plan_run, read_done_rows  # noqa: F401
from .batch.results import format_summary, read_rows, summarize  # noqa: F401
from .batch.stages import Annotator, decode_media, pack_frames, unpack_frames  # noqa: F401
