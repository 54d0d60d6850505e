from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from app.core.errors import InvalidBox, ModelLoadError, ModelUnavailable
from app.inference import precision as precision_mod
from app.inference.builders import init_random
from app.inference.loading import resolve_model_dir
from app.inference.runtime import load_model
from tests.images import pattern
from tests.inference.card_reference import card_embed


def _copy(model_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(model_dir, target)
    return target


class TestEmbedMatchesModelCard:
    """The service's `embed` reproduces the card's code to 1e-5 in fp32."""

    def test_batched_and_single_without_boxes(self, tiny_model_dir: Path) -> None:
        images = [pattern(90 + 7 * i, 70 + 5 * i, seed=i) for i in range(6)]
        expected = card_embed(tiny_model_dir, images).numpy()
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")

        batched = embedder.embed(images)
        single = np.concatenate([embedder.embed([img]) for img in images])

        assert batched.shape == (6, 512)
        assert batched.dtype == np.float32
        assert np.abs(batched - expected).max() <= 1e-5
        assert np.abs(single - expected).max() <= 1e-5
        np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)

    def test_boxes_crop_before_resizing(self, tiny_model_dir: Path) -> None:
        images = [pattern(120, 100, seed=10 + i) for i in range(4)]
        boxes = [(10, 5, 60, 70), None, (0, 0, 120, 100), (33.0, 20.0, 40.0, 50.0)]
        crops = [
            img if box is None else img.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
            for img, box in zip(images, boxes, strict=True)
        ]
        expected = card_embed(tiny_model_dir, crops).numpy()
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")

        batched = embedder.embed(images, boxes)
        single = np.concatenate(
            [embedder.embed([img], [box]) for img, box in zip(images, boxes, strict=True)]
        )

        assert np.abs(batched - expected).max() <= 1e-5
        assert np.abs(single - expected).max() <= 1e-5
        # The crop matters: the same image uncropped embeds differently.
        assert float(batched[0] @ embedder.embed([images[0]])[0]) < 0.999

    def test_box_outside_the_image_is_an_error(self, tiny_model_dir: Path) -> None:
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")
        image = pattern(50, 40)
        for box in [(40, 0, 20, 10), (0, 0, 0, 10), (-1, 0, 10, 10), (0, 30, 10, 11)]:
            with pytest.raises(InvalidBox):
                embedder.embed([image], [box])


class TestStrictLoading:
    def test_missing_tensor_is_named(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        state = load_file(str(target / "model.safetensors"))
        del state["fc11.weight"]
        del state["backbone.stem.0.weight"]
        save_file(state, str(target / "model.safetensors"))

        with pytest.raises(ModelLoadError, match=r"2 missing tensor\(s\)") as info:
            load_model(target, device="cpu", precision="fp32")
        assert "fc11.weight" in str(info.value)
        assert "backbone.stem.0.weight" in str(info.value)

    def test_misshaped_tensor_is_named(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        state = load_file(str(target / "model.safetensors"))
        state["bn11.weight"] = torch.ones(256)
        save_file(state, str(target / "model.safetensors"))

        with pytest.raises(ModelLoadError, match=r"bn11\.weight \(file \(256,\), model \(512,\)\)"):
            load_model(target, device="cpu", precision="fp32")

    def test_training_tensors_are_ignored_and_logged_once(
        self, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        state = load_file(str(target / "model.safetensors"))
        state["arcface.weight"] = torch.randn(100, 512)
        save_file(state, str(target / "model.safetensors"))
        image = pattern(seed=3)

        with caplog.at_level(logging.INFO, logger="app.inference.loading"):
            embedder = load_model(target, device="cpu", precision="fp32")

        ignored = [r for r in caplog.records if "used only in training" in r.getMessage()]
        assert len(ignored) == 1
        assert "arcface.weight" in ignored[0].getMessage()
        reference = load_model(tiny_model_dir, device="cpu", precision="fp32")
        np.testing.assert_array_equal(embedder.embed([image]), reference.embed([image]))

    def test_config_that_disagrees_with_the_backbone(
        self, tiny_model_dir: Path, tmp_path: Path
    ) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        config = json.loads((target / "config.json").read_text())
        config["hidden_size"] = 49
        (target / "config.json").write_text(json.dumps(config))

        with pytest.raises(ModelLoadError, match="hidden_size=49"):
            load_model(target, device="cpu", precision="fp32")

    def test_directory_without_weights(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        (target / "model.safetensors").unlink()
        with pytest.raises(ModelLoadError, match="model.safetensors does not exist"):
            load_model(target, device="cpu", precision="fp32")

    def test_corrupt_weights(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        (target / "model.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
            load_model(target, device="cpu", precision="fp32")


def _as_another_user(action: Callable[[], str]) -> str:
    """Run `action` in a forked child as uid/gid 65534 (nobody); return what it returned.

    Root reads any file, so a permission problem can only be seen from another user.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no torch work happens before the check under test
        os.close(read_end)
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, action().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


class TestUnreadableFiles:
    """A model directory mounted for another user: unreadable is not the same as missing."""

    @pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root")
    def test_mode_0600_weights_say_permission_denied_and_how_to_fix(
        self, tiny_model_dir: Path
    ) -> None:
        shared = Path(tempfile.mkdtemp(prefix="vs-model-"))
        try:
            shared.chmod(0o755)
            target = _copy(tiny_model_dir, shared, "mounted")
            target.chmod(0o755)
            (target / "config.json").chmod(0o644)
            (target / "model.safetensors").chmod(0o600)

            def attempt() -> str:
                try:
                    load_model(target, device="cpu", precision="fp32")
                except ModelLoadError as exc:
                    return str(exc)
                return "loaded"

            message = _as_another_user(attempt)
        finally:
            shutil.rmtree(shared)

        weights = target / "model.safetensors"
        assert message.startswith(f"cannot read {weights}: permission denied")
        assert "the file is mode 0600 owned by uid 0" in message
        assert "runs as uid 65534" in message
        assert f"chmod a+r {weights}" in message
        assert "does not exist" not in message

    def test_missing_weights_are_not_called_a_permission_problem(
        self, tiny_model_dir: Path, tmp_path: Path
    ) -> None:
        target = _copy(tiny_model_dir, tmp_path)
        (target / "model.safetensors").unlink()

        with pytest.raises(ModelLoadError) as info:
            load_model(target, device="cpu", precision="fp32")

        assert str(info.value) == f"{target / 'model.safetensors'} does not exist"


class TestModelId:
    def test_stable_and_tied_to_the_weights(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        first = load_model(tiny_model_dir, device="cpu", precision="fp32").model_id
        again = load_model(tiny_model_dir, device="cpu", precision="fp32").model_id
        other = init_random(tmp_path / "tiny", backbone="convnext_atto", input_size=64, seed=1)
        different = load_model(other, device="cpu", precision="fp32").model_id

        assert first == again
        assert first.startswith("tiny@")
        assert different.startswith("tiny@")
        assert different != first


class TestHubIds:
    def test_unreachable_hub_says_how_to_use_a_local_directory(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        from huggingface_hub import constants

        # A closed local port: the download fails at once, without leaving this machine.
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

        with pytest.raises(ModelUnavailable) as info:
            resolve_model_dir("Trendyol/e-commerce-product-image-encoder")
        message = str(info.value)
        assert "hf download Trendyol/e-commerce-product-image-encoder" in message
        assert "VS_MODEL=" in message

    def test_path_that_is_not_a_model_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ModelLoadError, match="is not a model directory"):
            resolve_model_dir(str(tmp_path / "nowhere"))


class TestPrecision:
    def test_bf16_on_this_cpu_agrees_with_fp32(self, tiny_model_dir: Path) -> None:
        if not precision_mod.cpu_supports_bf16():
            pytest.skip("this CPU has no native bf16")
        images = [pattern(seed=i) for i in range(4)]
        fp32 = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)
        bf16 = load_model(tiny_model_dir, device="cpu", precision="bf16")

        assert bf16.precision == "bf16"
        assert bf16.precision_cosine is not None
        assert bf16.precision_cosine >= 0.999
        assert np.min(np.sum(bf16.embed(images) * fp32, axis=1)) >= 0.999

    def test_auto_keeps_bf16_only_where_it_is_faster(
        self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The pass timings are scripted (real ones depend on the CPU): fp32's first, then
        the low precision's; the real measurement shows in `precision_speedup`."""
        monkeypatch.setattr(precision_mod, "cpu_supports_bf16", lambda: True)
        images = [pattern(seed=i) for i in range(3)]
        fp32 = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)
        for fp32_s, bf16_s, expected in ((1.0, 0.4, "bf16"), (1.0, 1.9, "fp32")):
            timings = iter((fp32_s, bf16_s))

            def scripted(run: Callable[[], object], timings: Iterator[float] = timings) -> float:
                run()
                return next(timings)

            monkeypatch.setattr(precision_mod, "timed_pass", scripted)
            auto = load_model(tiny_model_dir, device="cpu", precision="auto")

            assert auto.precision == expected
            assert auto.precision_speedup == round(fp32_s / bf16_s, 3)
            assert auto.describe()["precision_speedup_vs_fp32"] == auto.precision_speedup
            if expected == "fp32":  # the exact fp32 weights are back
                assert next(auto.module.backbone.parameters()).dtype == torch.float32
                np.testing.assert_array_equal(auto.embed(images), fp32)

    def test_auto_on_this_cpu_measures_its_speedup(self, tiny_model_dir: Path) -> None:
        if not precision_mod.cpu_supports_bf16():
            pytest.skip("this CPU has no native bf16")
        auto = load_model(tiny_model_dir, device="cpu", precision="auto")

        assert auto.precision_speedup is not None
        assert auto.precision_speedup > 0
        assert auto.precision == ("bf16" if auto.precision_speedup >= 1.0 else "fp32")

    def test_falls_back_to_exact_fp32_when_low_precision_disagrees(
        self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(precision_mod, "cpu_supports_bf16", lambda: True)
        monkeypatch.setattr(precision_mod, "PRECISION_MIN_COSINE", 1.01)  # nothing can pass
        monkeypatch.setattr(precision_mod, "timed_pass", lambda run: (run(), 1.0)[1])  # a tie
        images = [pattern(seed=i) for i in range(3)]
        fp32 = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)

        auto = load_model(tiny_model_dir, device="cpu", precision="auto")

        assert auto.precision == "fp32"
        assert next(auto.module.backbone.parameters()).dtype == torch.float32
        np.testing.assert_array_equal(auto.embed(images), fp32)

    def test_fp16_on_cpu_is_refused(self, tiny_model_dir: Path) -> None:
        with pytest.raises(ModelLoadError, match="fp16 is not supported on CPU"):
            load_model(tiny_model_dir, device="cpu", precision="fp16")

    def test_cuda_requested_without_a_gpu(self, tiny_model_dir: Path) -> None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_model(tiny_model_dir, device="cuda", precision="auto")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    def test_cuda_fp16_agrees_with_cpu_fp32(self, tiny_model_dir: Path) -> None:
        images = [pattern(seed=i) for i in range(8)]
        cpu = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)
        gpu = load_model(tiny_model_dir, device="cuda", precision="auto")
        assert gpu.precision == "fp16"
        assert np.min(np.sum(gpu.embed(images) * cpu, axis=1)) >= 0.999


class TestCompile:
    @pytest.mark.slow
    def test_compiled_model_matches_eager(self, tiny_model_dir: Path) -> None:
        images = [pattern(seed=i) for i in range(5)]
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")
        eager = embedder.embed(images)

        assert embedder.compile()
        compiled = embedder.embed(images)

        assert embedder.describe()["compiled"] is True
        assert np.min(np.sum(eager * compiled, axis=1)) >= 0.9999


class TestFullSizeLayout:
    @pytest.mark.slow
    def test_convnext_base_224_loads_with_the_published_shapes(self, tmp_path: Path) -> None:
        target = init_random(
            tmp_path / "convnext-base", backbone="convnext_base", input_size=224, seed=0
        )
        config = json.loads((target / "config.json").read_text())
        state = load_file(str(target / "model.safetensors"))

        embedder = load_model(target, device="cpu", precision="fp32")
        out = embedder.embed([pattern(300, 260, seed=1), Image.new("RGB", (224, 224), "white")])

        assert config["backbone_features"] == 1024
        assert config["hidden_size"] == 49
        assert tuple(state["bn1.weight"].shape) == (1024,)
        assert tuple(state["fc11.weight"].shape) == (512, 1024 * 49)
        assert tuple(state["bn11.running_var"].shape) == (512,)
        assert out.shape == (2, 512)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
