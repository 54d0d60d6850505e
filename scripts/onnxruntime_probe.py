"""Whether ONNX Runtime runs a model's forward pass faster than PyTorch on this machine.

A probe for the embedding roofline (docs/benchmarks.md): the model is loaded as the service
loads it, exported to ONNX (a dynamic batch), and timed at each batch size in ONNX
Runtime's CPU provider (all graph optimisations, sequential execution, intra-op threads =
PyTorch's) beside PyTorch eager fp32 on the same batches. Both are also given as a fraction
of the fp32 GEMM roofline measured in the same run (PyTorch's matmul). The exported
embeddings are checked against PyTorch's (cosine). Prints JSON lines, then one object.
ONNX Runtime is not a dependency of the service; install it to run this:

    .venv/bin/pip install onnxruntime onnx onnxscript
    .venv/bin/python scripts/onnxruntime_probe.py --model /tmp/m-base
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from app.benchmarks.embed import gemm_gflops, model_gflops
from app.inference.runtime import load_model


def images_per_s(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, images: int) -> float:
    run(batch)  # warm-up: first-call allocations and kernel choices
    reps = max(2, images // len(batch))
    start = time.perf_counter()
    for _ in range(reps):
        run(batch)
    return len(batch) * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    embedder = load_model(args.model, device="cpu", precision="fp32")
    module = embedder.module.eval()
    side = embedder.config.input_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(2, 3, side, side),),
                str(path),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                dynamo=False,
            )
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def on_ort(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"images": batch})[0])

    def on_torch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    flops = model_gflops(embedder.config)
    gemm = gemm_gflops(torch.float32)
    rng = np.random.default_rng(0)
    check = rng.standard_normal((4, 3, side, side)).astype(np.float32)
    a, b = on_ort(check), on_torch(check)
    cosine = float(
        np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    )
    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        batch = rng.standard_normal((bs, 3, side, side)).astype(np.float32)
        # interleaved per batch size, so a change in the machine's load falls on both
        for name, run in (("pytorch_eager_fp32", on_torch), ("onnxruntime_fp32", on_ort)):
            ips = images_per_s(run, batch, args.images)
            rows.append(
                {
                    "runtime": name,
                    "batch": bs,
                    "images_per_s": round(ips, 3),
                    "fraction_of_fp32_roofline": round(ips * flops / gemm, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "torch": torch.__version__,
                "threads": threads,
                "export_s": round(export_s, 1),
                "min_cosine_onnxruntime_vs_pytorch": round(cosine, 6),
                "model_gflops_per_image": round(flops, 3),
                "gemm_gflops_fp32_torch": round(gemm, 1),
                "roofline_images_per_s": round(gemm / flops, 3),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
