"""An independent transcript of the model card's reference code (model class, torchvision
transforms, one image at a time), used to check the service's embeddings exactly."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file
from torch import nn


class TYArcFaceModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config["backbone_name"], pretrained=False, num_classes=0)
        self.bn1 = nn.BatchNorm2d(config["backbone_features"])
        self.fc11 = nn.Linear(
            config["backbone_features"] * config["hidden_size"], config["embedding_dim"]
        )
        self.bn11 = nn.BatchNorm1d(config["embedding_dim"])

    def forward(self, x):
        features = self.backbone.forward_features(x)
        features = self.bn1(features)
        features = features.flatten(start_dim=1)
        features = self.fc11(features)
        features = self.bn11(features)
        return F.normalize(features, p=2, dim=1)


def card_embed(model_dir: Path, images: list[Image.Image]) -> torch.Tensor:
    config = json.loads((model_dir / "config.json").read_text())
    model = TYArcFaceModel(config)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    model.eval()
    transform = T.Compose(
        [
            T.Resize((config["input_size"], config["input_size"])),
            T.ToTensor(),
            T.Normalize(mean=config["normalization"]["mean"], std=config["normalization"]["std"]),
        ]
    )
    rows = []
    with torch.no_grad():
        for image in images:
            rows.append(model(transform(image.convert("RGB")).unsqueeze(0))[0])
    return torch.stack(rows)
