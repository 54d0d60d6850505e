"""The product image encoder: Trendyol's TYArcFace architecture and its strict loader.

A model is a directory with `config.json` and `model.safetensors` (the layout of
`Trendyol/e-commerce-product-image-encoder`). The architecture is the model card's:
timm backbone `forward_features` -> BatchNorm2d -> flatten -> Linear -> BatchNorm1d ->
L2 normalise (`"head": "flatten"`, the default). `"head": "avgpool"` (global average
pool -> L2 normalise) serves generic ImageNet backbones such as the offline
EfficientNet-Lite0 model, and `"head": "pool_linear"` (average pool -> Linear ->
BatchNorm1d -> L2 normalise) is what `vsearch train` gives such a backbone.

The backbone may run in fp16/bf16; the head always runs in fp32 so that the low-precision
part is the one that is cheap to check (see `calibrate_precision`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from app.core.errors import ModelLoadError, ModelUnavailable
from app.inference.preprocess import Preprocessor

LOG = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISION_MIN_COSINE = 0.999

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    """What `config.json` says about the architecture and its preprocessing."""

    backbone_name: str
    backbone_features: int
    hidden_size: int
    embedding_dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: Literal["flatten", "avgpool", "pool_linear"] = "flatten"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a config dict; unknown keys are kept in `extra` and written back on save."""
        try:
            size = raw["input_size"]
            input_size = int(size[-1]) if isinstance(size, list | tuple) else int(size)
            norm = raw.get("normalization") or {}
            mean = tuple(float(v) for v in norm.get("mean", raw.get("mean", IMAGENET_MEAN)))
            std = tuple(float(v) for v in norm.get("std", raw.get("std", IMAGENET_STD)))
            head = raw.get("head", "flatten")
            config = cls(
                backbone_name=str(raw["backbone_name"]),
                backbone_features=int(raw["backbone_features"]),
                hidden_size=int(raw.get("hidden_size", 1)),
                embedding_dim=int(raw["embedding_dim"]),
                input_size=input_size,
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
                head=head,
                extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"config.json is missing or has a malformed field: {exc}") from exc
        if head not in ("flatten", "avgpool", "pool_linear"):
            raise ModelLoadError(
                f"config.json: unknown head {head!r} (flatten, avgpool or pool_linear)"
            )
        if head == "avgpool" and config.embedding_dim != config.backbone_features:
            raise ModelLoadError(
                "config.json: an avgpool head has embedding_dim == backbone_features, got "
                f"{config.embedding_dim} and {config.backbone_features}"
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "backbone_name": self.backbone_name,
            "backbone_features": self.backbone_features,
            "hidden_size": self.hidden_size,
            "embedding_dim": self.embedding_dim,
            "input_size": self.input_size,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "head": self.head,
        }


_KNOWN_KEYS = frozenset(
    {
        "backbone_name",
        "backbone_features",
        "hidden_size",
        "embedding_dim",
        "input_size",
        "normalization",
        "mean",
        "std",
        "head",
    }
)


class TYArcFace(nn.Module):
    """Backbone + embedding head; parameter names match the published checkpoint."""

    backbone: Any  # a timm model; forward_features is not in nn.Module's type
    bn1: nn.BatchNorm2d
    fc11: nn.Linear
    bn11: nn.BatchNorm1d

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config.backbone_name, pretrained=False, num_classes=0)
        if config.head == "flatten":
            self.bn1 = nn.BatchNorm2d(config.backbone_features)
            self.fc11 = nn.Linear(
                config.backbone_features * config.hidden_size, config.embedding_dim
            )
            self.bn11 = nn.BatchNorm1d(config.embedding_dim)
        elif config.head == "pool_linear":
            self.fc11 = nn.Linear(config.backbone_features, config.embedding_dim)
            self.bn11 = nn.BatchNorm1d(config.embedding_dim)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map the backbone's feature map to unit-length embeddings, in fp32."""
        features = features.float()
        if self.config.head == "avgpool":
            pooled = features.mean(dim=(2, 3))
        elif self.config.head == "pool_linear":
            pooled = self.bn11(self.fc11(features.mean(dim=(2, 3))))
        else:
            pooled = self.bn11(self.fc11(self.bn1(features).flatten(start_dim=1)))
        return F.normalize(pooled, p=2, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.backbone.forward_features(x))


def build_module(config: ModelConfig) -> TYArcFace:
    """Create the architecture for `config` and check its shapes agree with it."""
    try:
        module = TYArcFace(config)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        raise ModelLoadError(
            f"config.json: cannot build backbone {config.backbone_name!r}: {exc}"
        ) from exc
    module.eval()
    num_features = int(getattr(module.backbone, "num_features", config.backbone_features))
    if num_features != config.backbone_features:
        raise ModelLoadError(
            f"config.json says backbone_features={config.backbone_features}, but "
            f"{config.backbone_name} produces {num_features} channels"
        )
    if config.head == "flatten":
        side = feature_map_side(module.backbone, config.input_size)
        if side * side != config.hidden_size:
            raise ModelLoadError(
                f"config.json says hidden_size={config.hidden_size}, but {config.backbone_name} "
                f"at {config.input_size}px gives a {side}x{side} feature map ({side * side})"
            )
    return module


def feature_map_side(backbone: Any, input_size: int) -> int:
    """Side of the backbone's final feature map for a square input."""
    with torch.inference_mode():
        probe = torch.zeros(1, 3, input_size, input_size)
        out = backbone.forward_features(probe)
    return int(out.shape[-1])


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("VS_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def candidate_precision(device: torch.device, precision: str) -> Precision:
    """The precision to try first; `auto` picks fp16 on CUDA, bf16 on capable CPUs."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ModelLoadError("fp16 is not supported on CPU; use bf16 or fp32")
        return precision  # type: ignore[return-value]
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def calibration_images(size: int, count: int = 8, seed: int = 1234) -> list[Image.Image]:
    """A fixed set of structured images (gradients, blocks, noise) for precision checks."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    for i in range(count):
        base = np.stack(
            [
                np.sin(xx * (i + 1) * math.pi) * 0.5 + 0.5,
                np.cos(yy * (i + 2) * math.pi) * 0.5 + 0.5,
                (xx + yy) / 2,
            ],
            axis=-1,
        )
        blocks = rng.random((4, 4, 3)).repeat(size // 4 + 1, 0).repeat(size // 4 + 1, 1)
        noise = rng.random((size, size, 3)) * 0.15
        arr = np.clip(0.55 * base + 0.35 * blocks[:size, :size] + noise, 0, 1)
        images.append(Image.fromarray((arr * 255).astype(np.uint8), "RGB"))
    return images


class Embedder:
    """A loaded model: preprocessing plus a batched forward pass.

    `preprocess` is thread-safe and CPU-only; `forward` must be called from one thread at a
    time (the BatchWorker's), `embed` does both for scripts and tests.
    """

    def __init__(
        self,
        module: TYArcFace,
        config: ModelConfig,
        *,
        model_id: str,
        device: torch.device,
        precision: Precision,
        source_dir: Path,
    ) -> None:
        self.module = module
        self.config = config
        self.model_id = model_id
        self.device = device
        self.precision = precision
        self.source_dir = source_dir
        self.embedding_dim = config.embedding_dim
        self.preprocessor = Preprocessor(config.input_size, config.mean, config.std)
        self.precision_cosine: float | None = None
        self.compiled = False
        self._forward_fn: Callable[[torch.Tensor], torch.Tensor] = module
        self._apply_precision(precision)

    def _apply_precision(self, precision: Precision) -> None:
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.module.to(self.device)
        self.module.backbone.to(dtype=self.dtype)
        self.module.backbone.to(memory_format=torch.channels_last)

    def preprocess(
        self, image: Image.Image, box: tuple[float, float, float, float] | None = None
    ) -> torch.Tensor:
        """One image -> a normalised (3, S, S) float32 tensor."""
        return self.preprocessor(image, box)

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """A (n, 3, S, S) float32 batch -> (n, embedding_dim) float32 unit rows."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        with torch.inference_mode():
            x = batch.to(
                self.device,
                dtype=self.dtype,
                memory_format=torch.channels_last,
                non_blocking=True,
            )
            out = self._forward_fn(x)
            return out.float().cpu().numpy()

    def embed(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
        *,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Embed PIL images, each cropped to its box first (Products-10K `x, y, w, h`)."""
        if boxes is not None and len(boxes) != len(images):
            raise ValueError("boxes must have one entry per image")
        tensors = [
            self.preprocess(img, boxes[i] if boxes is not None else None)
            for i, img in enumerate(images)
        ]
        if not tensors:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        parts = [
            self.forward(torch.stack(tensors[i : i + batch_size]))
            for i in range(0, len(tensors), batch_size)
        ]
        return np.concatenate(parts, axis=0)

    def compile(self, warmup_sizes: Sequence[int] = (2, 1)) -> bool:
        """Compile the forward pass with TorchInductor (weights frozen, dynamic batch).

        Worth it for large models: on a 2-core AVX512-BF16 CPU ConvNeXt-Base/224 goes from
        ~15 to ~21 images/s (docs/benchmarks.md). Compiling takes about a minute, done
        once per batch-size family at start. On any failure the eager module stays.
        """
        try:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            compiled = torch.compile(self.module, dynamic=True)
            self._forward_fn = compiled
            size = self.config.input_size
            for n in warmup_sizes:  # 2 first: a first call at 1 would specialise the batch
                self.forward(torch.zeros(n, 3, size, size))
        except Exception:  # noqa: BLE001 - compilation is an optimisation, never a failure
            LOG.exception("torch.compile failed; running the model eagerly")
            self._forward_fn = self.module
            return False
        self.compiled = True
        return True

    def calibrate_precision(self, fp32_reference: np.ndarray, images: list[Image.Image]) -> float:
        """Smallest cosine between this precision's embeddings and fp32 ones."""
        ours = self.embed(images)
        cos = float(np.min(np.sum(ours * fp32_reference, axis=1)))
        self.precision_cosine = cos
        return cos

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the model once per batch size so the first request pays no set-up cost."""
        size = self.config.input_size
        for n in batch_sizes:
            self.forward(torch.zeros(n, 3, size, size))

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "backbone": self.config.backbone_name,
            "head": self.config.head,
            "embedding_dim": self.embedding_dim,
            "input_size": self.config.input_size,
            "device": str(self.device),
            "precision": self.precision,
            "precision_min_cosine_vs_fp32": self.precision_cosine,
            "compiled": self.compiled,
        }


def load_model(
    path_or_hub_id: str | Path,
    device: str = "auto",
    precision: str = "auto",
    *,
    check_precision: bool = True,
) -> Embedder:
    """Load a model directory (or hub id) strictly and pick its precision.

    Args:
        path_or_hub_id: Directory with config.json + model.safetensors, or a hub id.
        device: `auto`, `cpu` or `cuda`.
        precision: `auto`, `fp32`, `bf16` or `fp16`. With `auto`, a low precision is kept
            only when its embeddings agree with fp32 (min cosine >= 0.999 on a fixed
            image set); otherwise the model falls back to fp32 and says so in the log.
        check_precision: Measure agreement with fp32 for low precisions.
    """
    model_dir, name = resolve_model_dir(str(path_or_hub_id))
    config = ModelConfig.from_file(model_dir / CONFIG_FILE)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} does not exist")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise ModelLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc
    module = build_module(config)
    load_state_strict(module, state, str(weights))
    del state
    model_id = f"{name}@{weights_digest(weights)[:16]}"
    dev = resolve_device(device)
    wanted = candidate_precision(dev, precision)

    reference: np.ndarray | None = None
    images: list[Image.Image] = []
    if wanted != "fp32" and check_precision:
        images = calibration_images(config.input_size)
        fp32 = Embedder(
            module, config, model_id=model_id, device=dev, precision="fp32", source_dir=model_dir
        )
        reference = fp32.embed(images)
        # Keep the fp32 weights so that a failed check can go back to them exactly.
        fp32_state = {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}

    embedder = Embedder(
        module, config, model_id=model_id, device=dev, precision=wanted, source_dir=model_dir
    )
    if reference is not None:
        cos = embedder.calibrate_precision(reference, images)
        if cos < PRECISION_MIN_COSINE:
            if precision == "auto":
                LOG.warning(
                    "%s embeddings agree with fp32 only to cosine %.5f (< %.3f); using fp32",
                    wanted,
                    cos,
                    PRECISION_MIN_COSINE,
                )
                module.backbone.to(torch.float32)
                module.backbone.load_state_dict(fp32_state)
                embedder._apply_precision("fp32")
                embedder.precision_cosine = 1.0
            else:
                LOG.warning(
                    "%s was requested; its embeddings agree with fp32 only to cosine %.5f",
                    wanted,
                    cos,
                )
        else:
            LOG.info("%s embeddings agree with fp32: min cosine %.6f", wanted, cos)
    LOG.info(
        "loaded model %s (%s, %s head, %d-d) on %s in %s",
        model_id,
        config.backbone_name,
        config.head,
        config.embedding_dim,
        dev,
        embedder.precision,
    )
    return embedder
