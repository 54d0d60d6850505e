"""A loaded model ready to serve: the `Embedder` and `load_model`.

The Embedder owns the inference-time choices: device, precision (backbone cast to fp16/bf16,
head in fp32), `channels_last` inputs, `torch.inference_mode`, optional TorchInductor
compilation or OpenVINO's CPU runtime, and warm-up. `preprocess` is CPU work that any
thread may do; `forward` runs on the BatchWorker's one thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.core.allocator import current_allocator
from app.core.errors import ModelLoadError
from app.inference.architecture import ModelConfig, TYArcFace
from app.inference.loading import load_module
from app.inference.openvino_runtime import OpenVinoForward
from app.inference.precision import (
    DTYPES,
    PRECISION_MIN_COSINE,
    Precision,
    calibration_images,
    candidate_precision,
    settle_precision,
    timed_pass,
)
from app.inference.preprocess import Preprocessor

LOG = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("VS_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


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
    ) -> None:
        self.module = module
        self.config = config
        self.model_id = model_id
        self.device = device
        self.embedding_dim = config.embedding_dim
        self.preprocessor = Preprocessor(config.input_size, config.mean, config.std)
        self.precision_cosine: float | None = None
        # fp32 time / this precision's time on the calibration images (`auto` on a CPU)
        self.precision_speedup: float | None = None
        self.compiled = False
        self.runtime = "torch"
        self._openvino: OpenVinoForward | None = None
        self._forward_fn: Callable[[torch.Tensor], torch.Tensor] = module
        self.set_precision(precision)

    def set_precision(self, precision: Precision) -> None:
        """Move the module to the device and cast the backbone (the head stays fp32)."""
        self.precision = precision
        self.dtype = DTYPES[precision]
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
        if self._openvino is not None:
            return self._openvino(batch.numpy())
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

    def compile(self) -> bool:
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
            for n in (2, 1):  # 2 first: a first call at 1 would specialise the batch
                self.forward(torch.zeros(n, 3, size, size))
        except Exception:  # noqa: BLE001 - compilation is an optimisation, never a failure
            LOG.exception("torch.compile failed; running the model eagerly")
            self._forward_fn = self.module
            return False
        self.compiled = True
        return True

    def use_openvino(self, wanted: Precision | None = None, *, auto: bool = False) -> bool:
        """Run the forward pass on OpenVINO's CPU runtime from now on (`VS_RUNTIME=openvino`).

        Converts the module (a trace: 7 s for ConvNeXt-Base on an idle 2-core CPU) and
        compiles it at `wanted` (default: the precision already settled on). There its
        service path ran 20% faster than PyTorch eager, just below compiled PyTorch, with
        no C++ compiler (docs/benchmarks.md). With `auto` and a low `wanted`, OpenVINO's
        own fp32 and low-precision graphs are timed against each other on the calibration
        images (PyTorch's timings say nothing about OpenVINO's kernels: on a CPU with
        AVX512-BF16 and no AMX its bf16 graph ran at half the speed of its fp32 one) and
        checked for agreement, as `settle_precision` does for PyTorch; call it on an fp32
        module so that fp32 stays exact (`load_model(..., runtime="openvino")` does). Only
        on a CPU; without OpenVINO installed, or on any conversion failure, PyTorch stays
        and the log says why.
        """
        if self.device.type != "cpu":
            LOG.warning("VS_RUNTIME=openvino runs on a CPU only; PyTorch stays on %s", self.device)
            return False
        if current_allocator() == "tcmalloc":
            LOG.warning(
                "VS_RUNTIME=openvino does not run under a preloaded tcmalloc (it aborts with "
                "'free(): invalid pointer'); running PyTorch. VS_ALLOCATOR=auto leaves "
                "tcmalloc out when VS_RUNTIME=openvino is set"
            )
            return False
        wanted = wanted or self.precision
        try:
            # trace the fp32 module (a bf16 backbone goes back to fp32 exactly for it)
            self.module.backbone.to(dtype=torch.float32)
            first = "fp32" if auto else wanted
            forward = OpenVinoForward(
                self.module, self.config.input_size, first, torch.get_num_threads()
            )
            if auto and wanted != "fp32":
                forward = self._settle_openvino_precision(forward, wanted)
            forward.release_graph()
        except ImportError:
            LOG.warning(
                "VS_RUNTIME=openvino but OpenVINO is not installed "
                "(pip install 'vsearch[openvino]'); running PyTorch"
            )
            self.set_precision(self.precision)
            return False
        except Exception:  # noqa: BLE001 - a faster runtime is an optimisation, never a failure
            LOG.exception("OpenVINO could not convert the model; running PyTorch")
            self.set_precision(self.precision)
            return False
        self._openvino = forward
        self.runtime = "openvino"
        self.set_precision(forward.precision)  # type: ignore[arg-type]
        LOG.info(
            "forward pass on OpenVINO %s (%s; converted in %.1f s)",
            forward.version,
            forward.precision,
            forward.convert_s,
        )
        return True

    def _settle_openvino_precision(
        self, fp32: OpenVinoForward, wanted: Precision
    ) -> OpenVinoForward:
        """OpenVINO at `wanted` if it agrees with its fp32 graph and is faster, else fp32."""
        images = calibration_images(self.config.input_size)
        batch = torch.stack([self.preprocess(image) for image in images]).numpy()
        low = fp32.at(wanted)
        reference, rows = fp32(batch), low(batch)  # also the warm passes
        cosine = float(np.min(np.sum(rows * reference, axis=1)))
        fp32_s = timed_pass(lambda: fp32(batch))
        self.precision_speedup = round(fp32_s / timed_pass(lambda: low(batch)), 3)
        if cosine >= PRECISION_MIN_COSINE and self.precision_speedup >= 1.0:
            self.precision_cosine = cosine
            return low
        LOG.warning(
            "OpenVINO in %s: %.2fx the speed of fp32, min cosine %.5f against it; using fp32",
            wanted,
            self.precision_speedup,
            cosine,
        )
        self.precision_cosine = 1.0
        return fp32

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
            "precision_speedup_vs_fp32": self.precision_speedup,
            "compiled": self.compiled,
            "runtime": self.runtime,
            "allocator": current_allocator(),
        }


def load_model(
    path_or_hub_id: str | Path,
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "torch",
) -> Embedder:
    """Load a model directory (or hub id) strictly and pick its precision.

    Args:
        path_or_hub_id: Directory with config.json + model.safetensors, or a hub id.
        device: `auto`, `cpu` or `cuda`.
        precision: `auto`, `fp32`, `bf16` or `fp16`. With `auto`, a low precision is kept
            only when its embeddings agree with fp32 (min cosine >= 0.999 on a fixed
            image set) and, on a CPU, it runs faster than fp32 there; otherwise the model
            falls back to fp32 and says so in the log.
        runtime: `torch`, or `openvino` for OpenVINO's CPU runtime (`Embedder.use_openvino`,
            which then settles the precision on OpenVINO's own timings); PyTorch where
            OpenVINO cannot run, with the log saying why.
    """
    loaded = load_module(path_or_hub_id)
    config = loaded.config
    dev = resolve_device(device)
    wanted = candidate_precision(dev, precision)
    embedder = Embedder(
        loaded.module, config, model_id=loaded.model_id, device=dev, precision="fp32"
    )
    auto = precision == "auto"
    if not (runtime == "openvino" and embedder.use_openvino(wanted, auto=auto)):
        settle_precision(embedder, wanted, auto=auto)
    LOG.info(
        "loaded model %s (%s, %s head, %d-d) on %s in %s",
        loaded.model_id,
        config.backbone_name,
        config.head,
        config.embedding_dim,
        dev,
        embedder.precision,
    )
    return embedder
