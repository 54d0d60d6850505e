"""The model card's reference inference code, kept verbatim in spirit as a baseline.

One image at a time, fp32, torchvision transforms, non-strict weight loading: what a team
gets by pasting the card's snippet. `vsearch bench embed` measures the service against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import Image
from safetensors.torch import load_file
from torch import nn


class CardModel(nn.Module):
    backbone: Any

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config["backbone_name"], pretrained=False, num_classes=0)
        self.bn1 = nn.BatchNorm2d(config["backbone_features"])
        self.fc11 = nn.Linear(
            config["backbone_features"] * config["hidden_size"], config["embedding_dim"]
        )
        self.bn11 = nn.BatchNorm1d(config["embedding_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x)
        features = self.bn1(features)
        features = features.flatten(start_dim=1)
        features = self.fc11(features)
        features = self.bn11(features)
        return F.normalize(features, p=2, dim=1)


class CardPipeline:
    """Model + transform as the card builds them.

    The card's class knows only its flatten head; for a pooled-head model pass the loaded
    module as `model`, and the loop (one image, fp32, torchvision transforms) stays the card's.
    """

    def __init__(self, model_dir: Path, model: nn.Module | None = None) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        if model is None:
            model = CardModel(config)
            model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
        self.model = model.eval()
        size = config["input_size"]
        norm = config["normalization"]
        self.transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize(mean=norm["mean"], std=norm["std"]),
            ]
        )

    def embed_one(self, image: Image.Image) -> torch.Tensor:
        tensor = self.transform(image.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            return self.model(tensor)[0]
