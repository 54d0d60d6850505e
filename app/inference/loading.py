"""Finding and strictly loading a model directory (`config.json` + `model.safetensors`).

A model is a local directory in the layout of `Trendyol/e-commerce-product-image-encoder`,
or that hub id itself (downloaded once through `huggingface_hub`, then read from its
cache). Loading is strict: a missing or mis-shaped tensor is an error naming it, never a
silently random layer. Device and precision are the runtime's business (`runtime.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from app.core.errors import ModelLoadError, ModelUnavailable
from app.inference.architecture import ModelConfig, TYArcFace, build_module

LOG = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class LoadedModule:
    """A model's fp32 module on the CPU and where it came from."""

    module: TYArcFace
    config: ModelConfig
    model_id: str


def resolve_model_dir(spec: str) -> tuple[Path, str]:
    """Find the model directory for `spec` (a local directory or a hub id).

    Returns:
        The directory and the name used in the model id.

    Raises:
        ModelLoadError: A local path that is not a model directory.
        ModelUnavailable: A hub id that cannot be downloaded and is not cached.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"VS_MODEL={spec!r} is not a model directory (expected {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} inside it) nor a hub id like 'owner/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=spec, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
        local_dir = f"models/{spec.split('/')[-1]}"
        raise ModelUnavailable(
            f"Model {spec!r} could not be downloaded from the Hugging Face Hub and is not in "
            f"the local cache ({type(exc).__name__}: {str(exc).splitlines()[0]}). On a machine "
            f"with internet access run `hf download {spec} {CONFIG_FILE} {WEIGHTS_FILE} "
            f"--local-dir {local_dir}`, copy that directory here and set VS_MODEL={local_dir}; "
            "or build an offline model with `vsearch model init-pretrained DIR` and set "
            "VS_MODEL=DIR."
        ) from exc
    return Path(local), spec


def check_readable(path: Path) -> None:
    """Fail with what to do when `path` is missing or this process may not read it.

    A model directory mounted into a container is read by the container's user, often not
    the owner of the files; a file of mode 0600 then reads as "permission denied", which
    must not be mistaken for a missing or corrupt file.
    """
    try:
        with path.open("rb"):
            return
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except PermissionError:
        raise ModelLoadError(_permission_message(path)) from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path} is a directory, not a file") from None


def _permission_message(path: Path) -> str:
    me = os.geteuid()
    try:
        info = path.stat()
    except PermissionError:
        parent = path.parent
        try:
            dir_info = parent.stat()
        except OSError:
            return f"cannot read {path}: permission denied (as uid {me})"
        return (
            f"cannot read {path}: permission denied, its directory is mode "
            f"{stat.S_IMODE(dir_info.st_mode):04o} owned by uid {dir_info.st_uid} and this "
            f"process runs as uid {me}; `chmod a+rx {parent}` (or run as uid {dir_info.st_uid})"
        )
    return (
        f"cannot read {path}: permission denied, the file is mode "
        f"{stat.S_IMODE(info.st_mode):04o} owned by uid {info.st_uid} and this process runs "
        f"as uid {me}; `chmod a+r {path}` (or run as uid {info.st_uid})"
    )


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, failing on any missing or mis-shaped tensor.

    Extra tensors (e.g. the ArcFace class centres kept by training) are ignored and
    reported in one log line.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:20])}")
        if mismatched:
            parts.append(f"{len(mismatched)} mis-shaped tensor(s): {', '.join(mismatched[:20])}")
        raise ModelLoadError(f"{source} does not match config.json: " + "; ".join(parts))
    unused = sorted(k for k in state if k not in expected)
    if unused:
        LOG.info(
            "ignoring %d tensor(s) used only in training from %s: %s",
            len(unused),
            source,
            ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""),
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def weights_digest(path: Path) -> str:
    """sha256 of the weights file (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_module(path_or_hub_id: str | Path) -> LoadedModule:
    """Read a model directory (or hub id) into an fp32 module on the CPU, strictly.

    The model id is the directory's (or hub id's) name and the first 16 hex digits of the
    weights' sha256, so a catalogue can tell two models apart by content.
    """
    model_dir, name = resolve_model_dir(str(path_or_hub_id))
    config_path = model_dir / CONFIG_FILE
    weights = model_dir / WEIGHTS_FILE
    check_readable(config_path)
    config = ModelConfig.from_file(config_path)
    check_readable(weights)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise ModelLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc
    module = build_module(config)
    load_state_strict(module, state, str(weights))
    del state
    model_id = f"{name}@{weights_digest(weights)[:16]}"
    return LoadedModule(module=module, config=config, model_id=model_id)
