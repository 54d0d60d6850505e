"""Which OpenVINO CPU settings run a model fastest on this machine (forward pass only).

For `VS_RUNTIME=openvino`: the model is converted as the service converts it, then run
at each batch size under the settings the service does not use, beside the one it does:

* the latency hint (one stream over all threads; the service's setting), fp32 and bf16;
* the throughput hint with one stream per core, each batch split across the streams;
* the latency hint with threads pinned to cores;

and OpenVINO's MatMul throughput is measured in fp32 and bf16 (the roofline of each).
Prints one JSON object. Run it with the system allocator (OpenVINO aborts under a
preloaded tcmalloc):

    VS_ALLOCATOR=system .venv/bin/python scripts/openvino_probe.py --model /tmp/m-base
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np
import openvino as ov
import torch

from app.benchmarks.embed import model_gflops
from app.inference.openvino_runtime import openvino_gemm_gflops
from app.inference.runtime import load_model


def images_per_s(compiled: Any, batch: np.ndarray, streams: int, images: int) -> float:
    """Run `batch` split across `streams` infer requests at once, until `images` are done."""
    requests = [compiled.create_infer_request() for _ in range(streams)]
    parts = np.array_split(batch, streams)

    def once() -> None:
        for request, part in zip(requests, parts, strict=True):
            request.start_async({0: part})
        for request in requests:
            request.wait()

    once()
    reps = max(2, images // len(batch))
    start = time.perf_counter()
    for _ in range(reps):
        once()
    return len(batch) * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    embedder = load_model(args.model, device="cpu", precision="fp32")
    side = embedder.config.input_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = ov.convert_model(
            embedder.module,
            example_input=torch.zeros(2, 3, side, side),
            input=[(-1, 3, side, side)],
        )
    core = ov.Core()
    flops = model_gflops(embedder.config)
    gemm = {p: openvino_gemm_gflops(1.5, threads, p) for p in ("f32", "bf16")}
    settings: dict[str, tuple[dict[str, Any], int]] = {
        "latency_f32": ({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}, 1),
        "latency_bf16": ({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}, 1),
        "throughput_f32_streams": (
            {
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": threads,
                "INFERENCE_PRECISION_HINT": "f32",
            },
            threads,
        ),
        "latency_f32_pinned": (
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
                "ENABLE_CPU_PINNING": True,
            },
            1,
        ),
    }
    rng = np.random.default_rng(0)
    rows = []
    for name, (config, streams) in settings.items():
        compiled = core.compile_model(model, "CPU", config | {"INFERENCE_NUM_THREADS": threads})
        precision = config["INFERENCE_PRECISION_HINT"]
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            batch = rng.standard_normal((bs, 3, side, side)).astype(np.float32)
            ips = images_per_s(compiled, batch, streams, args.images)
            rows.append(
                {
                    "setting": name,
                    "batch": bs,
                    "images_per_s": round(ips, 3),
                    "fraction_of_own_precision_roofline": round(ips * flops / gemm[precision], 3),
                    "fraction_of_fp32_roofline": round(ips * flops / gemm["f32"], 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "openvino": ov.__version__,
                "threads": threads,
                "model_gflops_per_image": round(flops, 3),
                "gemm_gflops": {p: round(g, 1) for p, g in gemm.items()},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
