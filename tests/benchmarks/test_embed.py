"""`vsearch bench embed` on every kind of model the CLI writes, with a few images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from app.cli import cli
from app.inference.architecture import ModelConfig, build_module
from app.inference.builders import init_pretrained, init_random, randomise, write_model_dir
from app.inference.precision import cpu_supports_bf16

runner = CliRunner()

FAST = [
    "--images", "3", "--batch-sizes", "1,2", "--callers", "2", "--no-compile", "--no-openvino"
]  # fmt: skip


def bench(model: Path | str, *extra: str) -> dict[str, Any]:
    args = ["bench", "embed", "--model", str(model), *FAST, "--device", "cpu", *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def pool_linear_model(out: Path) -> Path:
    """A pooled-head model as `vsearch train` writes it (ArcFace centres included)."""
    config = ModelConfig(
        backbone_name="resnet18",
        backbone_features=512,
        hidden_size=1,
        embedding_dim=128,
        input_size=64,
        head="pool_linear",
    )
    module = build_module(config)
    randomise(module, torch.Generator().manual_seed(0))
    state = dict(module.state_dict())
    state["arcface.weight"] = torch.randn(10, 128)
    return write_model_dir(out, config, state, description="trained")


def assert_matches_the_card_loop(report: dict[str, Any], head: str, dim: int) -> None:
    """Worker rows at fp32 reproduce the reference loop's embeddings."""
    assert report["model"]["head"] == head
    assert report["model"]["embedding_dim"] == dim
    names = [row["name"] for row in report["rows"]]
    fastest = max(report["rows"][1:3], key=lambda row: row["images_per_s"])["name"]
    # the model alone, at the batch size of the fastest worker row
    assert names == ["reference", "worker_bs1", "worker_bs2", fastest.replace("worker", "model")]
    for row in report["rows"]:
        assert row["images_per_s"] > 0
    for row in report["rows"][1:3]:
        assert row["min_cosine_vs_reference"] >= 0.9999
    assert report["best"]["name"] in ("worker_bs1", "worker_bs2")
    assert report["machine"]["model_gflops_per_image"] > 0


class TestEveryModelTheCliWrites:
    @pytest.mark.parametrize(
        ("backbone", "size"),
        [("convnext_atto", 64), ("resnet18", 64), ("efficientnet_b0", 64)],
    )
    def test_init_random(self, tmp_path: Path, backbone: str, size: int) -> None:
        model = init_random(tmp_path / backbone, backbone=backbone, input_size=size)

        report = bench(model, "--precision", "fp32", "--no-roofline")

        assert_matches_the_card_loop(report, "flatten", 512)
        assert report["model"]["backbone"] == backbone

    def test_trained_pool_linear_head(self, tmp_path: Path) -> None:
        report = bench(
            pool_linear_model(tmp_path / "trained"), "--precision", "fp32", "--no-roofline"
        )

        assert_matches_the_card_loop(report, "pool_linear", 128)

    @pytest.mark.slow
    def test_init_pretrained(self, tmp_path: Path) -> None:
        model = init_pretrained(tmp_path / "lite0")

        report = bench(model, "--precision", "fp32", "--no-roofline")

        assert_matches_the_card_loop(report, "avgpool", 1280)

    @pytest.mark.slow
    def test_init_random_full_trendyol_shapes(self, tmp_path: Path) -> None:
        model = init_random(tmp_path / "cnb", backbone="convnext_base", input_size=224)

        # Two images, one batch size: ConvNeXt-Base's reference loop is ~1 s an image here.
        report = bench(model, "--precision", "fp32", "--no-roofline", "--batch-sizes", "2")

        assert report["model"]["head"] == "flatten"
        assert [row["name"] for row in report["rows"]] == ["reference", "worker_bs2", "model_bs2"]
        assert report["rows"][1]["min_cosine_vs_reference"] >= 0.9999

    @pytest.mark.slow
    def test_roofline_and_automatic_precision(self, tiny_model_dir: Path) -> None:
        report = bench(tiny_model_dir)

        assert report["machine"]["gemm_gflops_fp32"] > 0
        if cpu_supports_bf16():
            assert report["machine"]["gemm_gflops_bf16"] > 0
        else:  # emulated bf16 is not timed (minutes on an AVX2-only CPU)
            assert "gemm_gflops_bf16" not in report["machine"]
            assert {row["precision"] for row in report["rows"]} == {"fp32"}
        for row in report["rows"]:
            assert 0 < row["fraction_of_roofline"]
        assert report["best"]["fraction_of_roofline"] is not None


class TestOpenVinoRows:
    def test_the_service_path_on_openvino_beside_pytorch(self, tiny_model_dir: Path) -> None:
        pytest.importorskip("openvino")

        report = bench(tiny_model_dir, "--precision", "fp32", "--openvino")

        rows = {row["name"]: row for row in report["rows"]}
        assert {"worker_bs1_openvino", "worker_bs2_openvino"} <= set(rows)
        ov_model_rows = [name for name in rows if name.startswith("model_") and "openvino" in name]
        assert len(ov_model_rows) == 1
        for name in ("worker_bs1_openvino", "worker_bs2_openvino"):
            assert rows[name]["min_cosine_vs_reference"] >= 0.9999
        assert report["model"]["runtime"] == "torch"
        # the OpenVINO rows come from a model of its own, its precision settled on OpenVINO
        assert report["model_openvino"]["runtime"] == "openvino"
        assert report["model_openvino"]["precision"] == "fp32"
        assert report["openvino_convert_s"] > 0
        machine = report["machine"]
        # the fp32 roofline is the faster of PyTorch's and OpenVINO's matrix products
        assert machine["gemm_gflops_fp32"] == max(
            machine["gemm_gflops_fp32_torch"], machine["gemm_gflops_fp32_openvino"]
        )
        roofline = machine["gemm_gflops_fp32"] / machine["model_gflops_per_image"]
        for row in report["rows"]:  # (the machine's figures are rounded, the rows' are not)
            assert row["roofline_images_per_s"] == pytest.approx(roofline, rel=0.01)


class TestErrorsAreOneLine:
    """What the user can fix is an `error:` line and exit status 1, not a traceback."""

    def run(self, *args: str) -> tuple[int, str]:
        """Exit status and the last line of output (log lines may come before it)."""
        result = runner.invoke(cli, list(args))
        assert "Traceback" not in result.output
        return result.exit_code, result.output.strip().splitlines()[-1]

    def test_model_directory_that_does_not_exist(self, tmp_path: Path) -> None:
        code, output = self.run("bench", "embed", "--model", str(tmp_path / "none"), *FAST)

        assert code == 1
        assert output.startswith(f"error: VS_MODEL='{tmp_path / 'none'}' is not a model directory")

    def test_weights_that_do_not_match_the_config(
        self, tiny_model_dir: Path, tmp_path: Path
    ) -> None:
        broken = tmp_path / "broken"
        broken.mkdir()
        config = json.loads((tiny_model_dir / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps(config))
        save_file({"fc11.weight": torch.zeros(3, 3)}, str(broken / "model.safetensors"))

        code, output = self.run("bench", "embed", "--model", str(broken), *FAST)

        assert code == 1
        weights = broken / "model.safetensors"
        assert output.startswith(f"error: {weights} does not match config.json")
        flat = config["backbone_features"] * config["hidden_size"]
        assert f"fc11.weight (file (3, 3), model (512, {flat}))" in output

    def test_images_dir_without_images(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        empty = tmp_path / "empty"
        empty.mkdir()
        args = ["bench", "embed", "--model", str(tiny_model_dir), "--images-dir", str(empty)]

        code, output = self.run(*args, *FAST, "--no-roofline")

        assert code == 1
        assert output.startswith(f"error: no images under {empty}")

    def test_bad_batch_sizes(self, tiny_model_dir: Path) -> None:
        code, output = self.run(
            "bench", "embed", "--model", str(tiny_model_dir), "--batch-sizes", "0,2"
        )

        assert code == 1
        assert output.startswith("error: images, callers and every batch size must be at least 1")

    def test_backbone_without_a_feature_map(self, tmp_path: Path) -> None:
        out = tmp_path / "vit"
        code, output = self.run(
            "model",
            "init-random",
            str(out),
            "--backbone",
            "vit_tiny_patch16_224",
            "--input-size",
            "224",
        )

        assert code == 1
        assert output.startswith("error: the backbone's features have shape (1, 197, 192)")
        assert not out.exists()

    def test_unknown_backbone(self, tmp_path: Path) -> None:
        code, output = self.run("model", "init-random", str(tmp_path / "m"), "--backbone", "nope")

        assert code == 1
        assert output.startswith("error: unknown timm backbone 'nope'")
