"""Metric-learning losses: ArcFace (additive angular margin) and a cross-batch memory.

ArcFace (Deng et al., 2019) adds the margin `m` to the angle between an embedding and its
class centre, scales by `s` and applies cross-entropy; Trendyol's model used s=128,
m=0.25. XBM (Wang et al., 2020) keeps the embeddings of recent batches in a queue and adds
a contrastive term against them, so every step sees thousands of pairs, not one batch's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFace(nn.Module):
    """Class centres plus the margin-adjusted logits.

    With `subcenters` K > 1 (sub-center ArcFace, Deng et al., ECCV 2020) each class has K
    centres and an embedding is scored against the nearest one, so a product whose photos
    fall into a few distinct looks (loose and bagged fruit, front and back of a pack) need
    not be pulled into a single point.
    """

    def __init__(
        self,
        embedding_dim: int,
        classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.3,
        subcenters: int = 1,
    ) -> None:
        super().__init__()
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(classes * subcenters, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = scale
        self.margin = margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        # Past pi - m, cos(theta + m) is no longer decreasing; fall back to a linear penalty.
        self.threshold = math.cos(math.pi - margin)
        self.extra = math.sin(math.pi - margin) * margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        if self.subcenters > 1:
            cosine = cosine.view(cosine.shape[0], -1, self.subcenters).amax(dim=2)
        sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(min=1e-7))
        with_margin = cosine * self.cos_m - sine * self.sin_m
        with_margin = torch.where(cosine > self.threshold, with_margin, cosine - self.extra)
        one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        logits = self.scale * (one_hot * with_margin + (1.0 - one_hot) * cosine)
        return F.cross_entropy(logits, labels)


class CrossBatchMemory:
    """A FIFO of past (detached) embeddings and labels, and its contrastive loss."""

    def __init__(self, embedding_dim: int, size: int, *, margin: float = 0.5) -> None:
        self.size = size
        self.margin = margin
        self.features = torch.zeros(size, embedding_dim)
        self.labels = torch.full((size,), -1, dtype=torch.long)
        self.pointer = 0
        self.filled = 0

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        n = embeddings.shape[0]
        idx = (torch.arange(n) + self.pointer) % self.size
        self.features[idx] = F.normalize(embeddings.detach().float().cpu())
        self.labels[idx] = labels.detach().cpu()
        self.pointer = (self.pointer + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Contrastive loss of the batch against the memory: pull positives to 1, push
        negatives below `margin`."""
        if self.filled == 0:
            return embeddings.new_zeros(())
        memory = self.features[: self.filled].to(embeddings.device)
        memory_labels = self.labels[: self.filled].to(embeddings.device)
        sims = F.normalize(embeddings.float()) @ memory.T
        positive = labels[:, None] == memory_labels[None, :]
        pos_loss = ((1.0 - sims) * positive).sum()
        neg = sims * (~positive) * (sims > self.margin)
        return (pos_loss + neg.sum()) / embeddings.shape[0]

    def state_dict(self) -> dict[str, object]:
        return {
            "features": self.features,
            "labels": self.labels,
            "pointer": self.pointer,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.features = state["features"]  # type: ignore[assignment]
        self.labels = state["labels"]  # type: ignore[assignment]
        self.pointer = int(state["pointer"])  # type: ignore[call-overload]
        self.filled = int(state["filled"])  # type: ignore[call-overload]
