"""The encoder's architecture: `config.json`'s fields and Trendyol's TYArcFace module.

The model card's architecture (`"head": "flatten"`, the default) is timm backbone
`forward_features` -> BatchNorm2d on the feature map -> flatten -> Linear -> BatchNorm1d ->
L2 normalise; ConvNeXt-Base/224 gives a 1024x7x7 map and a 512-d embedding. Parameter
names (`backbone.*`, `bn1`, `fc11`, `bn11`) are the published checkpoint's, so its
`model.safetensors` loads unchanged.

Two pooled heads serve generic ImageNet backbones: `"avgpool"` (global average pool -> L2
normalise; the offline EfficientNet-Lite0 model) and `"pool_linear"` (average pool ->
Linear -> BatchNorm1d -> L2 normalise; what `vsearch train` gives such a backbone).
A `pool_linear` head may pool with GeM instead (`"pooling": "gem"`: generalised mean,
`mean(x^p)^(1/p)` with a learned `p`, Radenovic et al. 2018), which weighs the strongest
activations more than an average does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from app.core.errors import ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Head = Literal["flatten", "avgpool", "pool_linear"]
Pooling = Literal["avg", "gem"]
GEM_INITIAL_P = 3.0


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
    head: Head = "flatten"
    pooling: Pooling = "avg"
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
            pooling = raw.get("pooling", "avg")
            config = cls(
                backbone_name=str(raw["backbone_name"]),
                backbone_features=int(raw["backbone_features"]),
                hidden_size=int(raw.get("hidden_size", 1)),
                embedding_dim=int(raw["embedding_dim"]),
                input_size=input_size,
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
                head=head,
                pooling=pooling,
                extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"config.json is missing or has a malformed field: {exc}") from exc
        if head not in ("flatten", "avgpool", "pool_linear"):
            raise ModelLoadError(
                f"config.json: unknown head {head!r} (flatten, avgpool or pool_linear)"
            )
        if pooling not in ("avg", "gem"):
            raise ModelLoadError(f"config.json: unknown pooling {pooling!r} (avg or gem)")
        if pooling == "gem" and head != "pool_linear":
            raise ModelLoadError("config.json: GeM pooling needs the pool_linear head")
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
            **({"pooling": self.pooling} if self.pooling != "avg" else {}),
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
        "pooling",
    }
)


class TYArcFace(nn.Module):
    """Backbone + embedding head; parameter names match the published checkpoint."""

    backbone: Any  # a timm model; forward_features is not in nn.Module's type
    bn1: nn.BatchNorm2d
    fc11: nn.Linear
    bn11: nn.BatchNorm1d
    gem_p: nn.Parameter

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
            if config.pooling == "gem":
                self.gem_p = nn.Parameter(torch.tensor(GEM_INITIAL_P))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global pooling of an (N, C, H, W) map: average, or GeM with the learned p."""
        if self.config.pooling == "gem":
            p = self.gem_p.clamp(min=1.0)
            return features.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return features.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map the backbone's feature map to unit-length embeddings, in fp32.

        The backbone may run in fp16/bf16; the head stays in fp32 so that the low-precision
        part is the one the precision check measures.
        """
        features = features.float()
        if self.config.head == "avgpool":
            pooled = features.mean(dim=(2, 3))
        elif self.config.head == "pool_linear":
            pooled = self.bn11(self.fc11(self.pool(features)))
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
    """Side of the backbone's final feature map for a square input.

    Raises:
        ModelLoadError: The backbone cannot take this input size, or its features are not
            an (N, C, S, S) map (vision transformers give tokens, Swin channels-last maps);
            every head here pools or flattens such a map.
    """
    try:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, input_size, input_size)
            out = backbone.forward_features(probe)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the backbone cannot run on a {input_size}px input: {str(exc).splitlines()[0]}"
        ) from exc
    channels = int(getattr(backbone, "num_features", out.shape[1]))
    if out.ndim != 4 or out.shape[1] != channels or out.shape[2] != out.shape[3]:
        raise ModelLoadError(
            f"the backbone's features have shape {tuple(out.shape)} for a {input_size}px input; "
            f"the heads need an (N, {channels}, S, S) feature map, as convolutional backbones "
            "(ConvNeXt, EfficientNet, ResNet, ...) give"
        )
    return int(out.shape[-1])
