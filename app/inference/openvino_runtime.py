"""OpenVINO's CPU runtime as an Embedder's forward pass (`VS_RUNTIME=openvino`).

The PyTorch module is converted once at start (`openvino.convert_model`, a trace of the
module on a dummy batch, with the batch dimension left dynamic) and compiled for the CPU
with the latency hint: one stream over the process's inference threads, which is what the
BatchWorker's one forward pass at a time wants. The converted graph computes exactly what
the module does (the L2-normalised embedding); the inference precision follows the
precision the service settled on (fp32 stays fp32: OpenVINO would otherwise pick bf16 on
a CPU that has it).

OpenVINO is an optional dependency (`pip install 'vsearch[openvino]'`); without it
`OpenVinoForward` raises ImportError and the caller keeps PyTorch.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from app.inference.architecture import TYArcFace

# the service's precisions -> OpenVINO's INFERENCE_PRECISION_HINT
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


class OpenVinoForward:
    """A compiled OpenVINO model behind the Embedder's `forward`: float32 (n, 3, S, S)
    arrays in, (n, dim) float32 rows out. Calls are serialised (one infer request)."""

    def __init__(self, module: TYArcFace, input_size: int, precision: str, threads: int) -> None:
        import openvino as ov

        example = torch.zeros(2, 3, input_size, input_size)
        started = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript trace OpenVINO converts through warns of its own deprecation
            warnings.simplefilter("ignore", FutureWarning)
            self._model: Any = ov.convert_model(
                module, example_input=example, input=[(-1, 3, input_size, input_size)]
            )
        self.convert_s = time.perf_counter() - started
        self.threads = max(1, threads)
        self.version = str(ov.__version__)
        self._lock = threading.Lock()
        self._compile(precision)

    def _compile(self, precision: str) -> None:
        import openvino as ov

        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": self.threads,
        }
        compiled = ov.Core().compile_model(self._model, "CPU", config)
        with self._lock:
            self._compiled = compiled
            self._request = compiled.create_infer_request()
            self.precision = precision

    def at(self, precision: str) -> OpenVinoForward:
        """The same converted graph compiled at another precision (no second trace)."""
        other = copy.copy(self)
        other._lock = threading.Lock()
        other._compile(precision)
        return other

    def release_graph(self) -> None:
        """Drop the converted graph once no other precision will be compiled from it (it
        holds a copy of the weights beside the compiled model's)."""
        self._model = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            # the request reuses its output buffer: copy before the next call
            return np.array(self._request.get_output_tensor(0).data, dtype=np.float32)


def openvino_gemm_gflops(
    seconds: float = 1.5, threads: int | None = None, precision: str = "f32"
) -> float:
    """Sustained fp32 matrix-multiply GFLOP/s through OpenVINO's CPU plugin (best of
    sizes 1024/2048/4096; an n x n input times a constant n x n weight, the shape of a
    linear layer), for rooflines that should not depend on PyTorch's own GEMM."""
    import openvino as ov
    import openvino.opset13 as ops

    best = 0.0
    rng = np.random.default_rng(0)
    for n in (1024, 2048, 4096):
        x = ops.parameter([n, n], np.float32)
        w = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
        model = ov.Model([ops.matmul(x, w, False, False)], [x])
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        }
        config["INFERENCE_NUM_THREADS"] = threads or torch.get_num_threads()
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        a = rng.standard_normal((n, n), dtype=np.float32)
        request.infer({0: a})
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            request.infer({0: a})
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best
