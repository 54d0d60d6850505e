"""Image -> model input, reproducing the model card's torchvision pipeline exactly.

The published pipeline is `Resize((S, S))` (bilinear, on the PIL image) -> `ToTensor()`
-> `Normalize(mean, std)`. Before it we make the image upright and RGB (EXIF orientation,
palette/alpha/CMYK/16-bit modes) and crop it to the query's box.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from app.imaging.crop import crop
from app.imaging.decode import apply_exif_orientation, to_rgb


class Preprocessor:
    """Callable turning a PIL image (and optional box) into a (3, S, S) float32 tensor."""

    def __init__(
        self,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.input_size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(
        self, image: Image.Image, box: tuple[float, float, float, float] | None = None
    ) -> torch.Tensor:
        image = to_rgb(apply_exif_orientation(image))
        image = crop(image, box)
        resized = image.resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        # Same operations, in the same order, as ToTensor() + Normalize().
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True))
        tensor = pixels.view(self.input_size, self.input_size, 3).permute(2, 0, 1).contiguous()
        return tensor.to(dtype=torch.float32).div(255).sub_(self.mean).div_(self.std)
