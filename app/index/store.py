"""Crash-safe files of the index: generations and the manifest.

Layout under the index directory::

    manifest.json          which generation is live, its parameters and watermark
    gen-000007/            shard-00.faiss ... shard-NN.faiss (+ template.faiss)
    vectors-512.f16        exact vectors for re-ranking, addressed by image id (per dim)

Every file is written with `app.core.files.atomic_write` (temporary name, fsync, rename,
directory fsync); the manifest is written last. A crash at any point leaves the previous
manifest pointing at a complete previous generation, or the new one at a complete new one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.core.files import atomic_write_text
from app.index.feed import Watermark

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    generation: int
    kind: str  # "flat" or "ivfpq"
    dim: int
    model_id: str
    shards: list[str]
    watermark: Watermark
    ntotal: int = 0
    template: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    trained_at_n: int = 0
    created_at: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {raw.get('format')}")
        raw["watermark"] = Watermark(**raw["watermark"])
        return cls(**raw)


def generation_dir(root: Path, generation: int) -> Path:
    return root / f"gen-{generation:06d}"


def read_manifest(root: Path) -> Manifest | None:
    """The live manifest, or None when absent or unreadable (logged)."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return Manifest.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        LOG.warning("index manifest %s is unreadable (%s); the index will be rebuilt", path, exc)
        return None


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_text(root / MANIFEST, manifest.to_json())


def remove_other_generations(root: Path, keep: int) -> None:
    """Delete generation directories other than `keep` (after its manifest is live)."""
    for path in root.glob("gen-*"):
        if path.is_dir() and path.name != generation_dir(root, keep).name:
            shutil.rmtree(path, ignore_errors=True)
