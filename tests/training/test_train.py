"""`vsearch train` on a few real grocery photos: JSON lines, defaults, the validation guard."""

from __future__ import annotations

import colorsys
import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from app.cli import cli
from app.core.errors import InvalidRequest, ModelLoadError
from app.inference.architecture import GEM_INITIAL_P, ModelConfig, build_module
from app.inference.builders import randomise, write_model_dir
from app.inference.runtime import load_model
from app.training import train as train_module
from app.training.losses import ArcFace
from app.training.report import TrainingLog
from app.training.train import (
    LabelledImages,
    PrecisionChoice,
    Sample,
    TrainConfig,
    class_sampler,
    final_side,
    parse_keep,
    prepare_module,
    stop_epoch,
)

runner = CliRunner()
PRODUCTS = ("Fruit/Banana", "Fruit/Kiwi", "Packages/Milk/Arla-Standard-Milk")


def _files(dataset: Path, split: str, per_product: int) -> list[tuple[str, str]]:
    rows = []
    for product in PRODUCTS:
        paths = sorted((dataset / "dataset" / split / product).rglob("*.jpg"))[:per_product]
        rows += [(str(p.relative_to(dataset / "dataset")), product) for p in paths]
    return rows


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def material(dataset: Path, tmp_path: Path) -> dict[str, Path]:
    train = _files(dataset, "train", 6)
    val = _files(dataset, "val", 2) or _files(dataset, "test", 2)
    return {
        "data": _write(tmp_path / "train.csv", ["path", "label"], [list(r) for r in train]),
        "gallery": _write(
            tmp_path / "gallery.csv",
            ["seller_img_id", "img_path", "product_id"],
            [[str(n), p, label] for n, (p, label) in enumerate(train[::3])],
        ),
        "queries": _write(
            tmp_path / "queries.csv",
            ["user_img_id", "img_path", "product_id"],
            [[str(n), p, label] for n, (p, label) in enumerate(val)],
        ),
        "train_as_queries": _write(
            tmp_path / "leak.csv",
            ["user_img_id", "img_path", "product_id"],
            [[str(n), p, label] for n, (p, label) in enumerate(train[:2])],
        ),
        "root": dataset / "dataset",
    }


def _args(model: Path, material: dict[str, Path], out: Path, queries: Path) -> list[str]:
    return [
        "train",
        "--init",
        str(model),
        "--data",
        str(material["data"]),
        "--images-root",
        str(material["root"]),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--xbm-size",
        "24",
        "--workers",
        "0",
        "--val-gallery",
        str(material["gallery"]),
        "--val-queries",
        str(queries),
        "--val-images-root",
        str(material["root"]),
        "--log-interval",
        "0",
    ]


@pytest.mark.slow
def test_weight_average_is_validated_beside_the_trained_weights_and_saved(
    tiny_model_dir: Path, material: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ema"
    args = _args(tiny_model_dir, material, out, material["queries"])
    args += ["--ema-decay", "0.9", "--keep", "last"]

    result = runner.invoke(cli, args)

    assert result.exit_code == 0, result.output
    epochs = [json.loads(line) for line in result.stdout.splitlines()][:2]
    for line in epochs:
        assert 0.0 <= line["ema_val_map_at_1000"] <= 1.0
        assert 0.0 <= line["val_map_at_1000"] <= 1.0
    trained = load_model(out, device="cpu", precision="fp32")
    assert trained.embedding_dim == 512
    # the saved weights are the average's, not the last step's
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    saved = load_file(str(out / "model.safetensors"))
    name = next(n for n in saved if n.startswith("backbone.") and saved[n].ndim == 4)
    assert torch.equal(saved[name], checkpoint["ema"]["module"][name])
    assert not torch.equal(saved[name], checkpoint["module"][name])


@pytest.mark.slow
def test_train_prints_json_lines_an_unattended_log_can_follow(
    tiny_model_dir: Path, material: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "trained"
    result = runner.invoke(cli, _args(tiny_model_dir, material, out, material["queries"]))

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["epoch", "epoch", "done"]
    assert [line["epoch"] for line in lines[:2]] == [1, 2]
    assert all(0.0 <= line["val_map_at_1000"] <= 1.0 for line in lines[:2])
    assert all(line["precision"] in {"fp32", "bfloat16"} for line in lines[:2])
    assert lines[-1]["history"] == [{k: v for k, v in x.items() if k != "event"} for x in lines[:2]]
    progress = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert progress[0]["event"] == "start"
    assert progress[0]["images"] == 18
    assert progress[0]["steps_per_epoch"] == 3
    steps = [p for p in progress if p["event"] == "progress"]
    assert {p["epoch"] for p in steps} == {1, 2}
    assert (out / "model.safetensors").exists()


def test_validation_queries_that_are_training_images_are_refused(
    tiny_model_dir: Path, material: dict[str, Path], tmp_path: Path
) -> None:
    result = runner.invoke(
        cli, _args(tiny_model_dir, material, tmp_path / "o", material["train_as_queries"])
    )

    assert result.exit_code == 1
    assert "2 validation queries are also training images" in result.stderr


def test_the_documented_recipe_is_the_default() -> None:
    config = TrainConfig(init="m", data=Path("d.csv"), out=Path("o"))
    assert config.epochs == 10
    assert config.xbm_size == 4096  # ahead of 2048 on val on every epoch from 6 on
    assert config.subcenters == 3
    assert (config.final_size, config.final_epochs) == (None, 2)  # 224 -> 288 for a pooled head
    assert config.pooling is None  # measured, not kept
    assert config.ema_decay == 0.0  # measured, not kept
    assert (config.hue_jitter, config.saturation_jitter) == (0.0, 0.0)  # colour is identity
    assert config.crop_scale == 0.6  # ahead of 0.35 on val at the kept epoch
    assert config.keep == "best"
    result = runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"})
    assert "[default: 10]" in result.stdout
    assert "[default: 4096]" in result.stdout


def test_progress_lines_are_spaced_by_the_interval() -> None:
    now = [0.0]
    out, err = io.StringIO(), io.StringIO()
    log = TrainingLog(out, err, interval_s=30.0, clock=lambda: now[0])
    log.start({"images": 10})
    for step in range(1, 101):
        now[0] += 1.0
        log.step(0, step, 100, 2.5)
    log.epoch(0, {"epoch": 1, "loss": 2.5})

    progress = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [p["event"] for p in progress] == ["start", "progress", "progress", "progress"]
    assert [p["step"] for p in progress[1:]] == [30, 60, 90]
    assert progress[1]["epoch_eta_seconds"] == pytest.approx(70.0)
    assert json.loads(out.getvalue()) == {"event": "epoch", "epoch": 1, "loss": 2.5}


@pytest.fixture
def pooled_model_dir(tmp_path: Path) -> Path:
    """A random ConvNeXt-Atto at 64 px with a plain average-pooled head (no projection)."""
    config = ModelConfig(
        backbone_name="convnext_atto",
        backbone_features=320,
        hidden_size=1,
        embedding_dim=320,
        input_size=64,
        head="avgpool",
    )
    module = build_module(config)
    randomise(module, torch.Generator().manual_seed(0))
    return write_model_dir(tmp_path / "pooled", config, module.state_dict())


@pytest.mark.slow
def test_a_gem_head_trained_at_a_larger_size_for_the_last_epoch_is_served_as_trained(
    pooled_model_dir: Path, material: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "gem"
    args = _args(pooled_model_dir, material, out, material["queries"]) + [
        "--pooling",
        "gem",
        "--final-size",
        "96",
        "--final-epochs",
        "1",
        "--keep",
        "last",
    ]

    result = runner.invoke(cli, args)

    assert result.exit_code == 0, result.output
    epochs = [json.loads(line) for line in result.stdout.splitlines()][:2]
    assert [e["input_size"] for e in epochs] == [64, 96]
    config = json.loads((out / "config.json").read_text())
    assert (config["head"], config["pooling"], config["input_size"]) == ("pool_linear", "gem", 96)
    saved = load_file(str(out / "model.safetensors"))
    assert saved["gem_p"].item() != pytest.approx(GEM_INITIAL_P)  # p is learned
    served = load_model(out, device="cpu", precision="fp32")
    assert served.config.input_size == 96
    module = served.module
    # the service's module pools exactly as GeM says: mean(x^p)^(1/p), then the projection
    features = torch.rand(2, 320, 3, 3) + 0.1
    p = saved["gem_p"]
    expected = torch.nn.functional.normalize(
        module.bn11(module.fc11(features.pow(p).mean(dim=(2, 3)).pow(1 / p))), dim=1
    )
    with torch.inference_mode():
        assert torch.allclose(module.forward_head(features), expected, atol=1e-5)


def test_gem_pooling_lies_between_the_average_and_the_maximum() -> None:
    config = ModelConfig(
        backbone_name="convnext_atto",
        backbone_features=320,
        hidden_size=1,
        embedding_dim=16,
        input_size=64,
        head="pool_linear",
        pooling="gem",
    )
    module = build_module(config)
    features = torch.rand(4, 320, 5, 5)
    with torch.no_grad():
        module.gem_p.fill_(1.0)
        assert torch.allclose(module.pool(features), features.mean(dim=(2, 3)), atol=1e-6)
        module.gem_p.fill_(3.0)
        gem = module.pool(features)
    assert (gem > features.mean(dim=(2, 3))).all()
    assert (gem < features.amax(dim=(2, 3))).all()
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_gem_needs_a_projection_head_and_a_known_name() -> None:
    base = {
        "backbone_name": "convnext_atto",
        "backbone_features": 320,
        "embedding_dim": 320,
        "input_size": 64,
    }
    with pytest.raises(ModelLoadError, match="GeM pooling needs the pool_linear head"):
        ModelConfig.from_dict({**base, "head": "avgpool", "pooling": "gem"})
    with pytest.raises(ModelLoadError, match="unknown pooling 'max'"):
        ModelConfig.from_dict({**base, "head": "pool_linear", "pooling": "max"})
    # a config without the key (every model written before GeM) pools by averaging
    assert ModelConfig.from_dict({**base, "head": "pool_linear"}).pooling == "avg"
    assert "pooling" not in ModelConfig.from_dict({**base, "head": "pool_linear"}).to_dict()


def test_a_model_with_a_head_keeps_its_pooling(tiny_model_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="already has its head, which pools with 'avg'"):
        prepare_module(str(tiny_model_dir), 512, None, "gem")
    with pytest.raises(InvalidRequest, match="unknown pooling"):
        prepare_module(str(tiny_model_dir), 512, None, "max")


def test_sub_center_arcface_scores_each_product_by_its_nearest_centre() -> None:
    torch.manual_seed(0)
    plain = ArcFace(8, 3, margin=0.3)
    sub = ArcFace(8, 3, margin=0.3, subcenters=2)
    with torch.no_grad():
        sub.weight.copy_(torch.randn(6, 8))
        # one centre per product in the plain loss: the first of each product's pair
        plain.weight.copy_(sub.weight[0::2])
    labels = torch.tensor([0, 1, 2])
    near_first = sub.weight.detach()[0::2].clone()  # each embedding on its first centre
    near_second = sub.weight.detach()[1::2].clone()  # ... and on its second

    # an embedding on either centre of its product is as well placed as it can be
    assert sub(near_first, labels).item() < 0.01
    assert sub(near_second, labels).item() < 0.01
    # the plain loss knows only the first centres: the second look is far from its product
    assert plain(near_second, labels).item() > 1.0
    # with one centre each, sub-center ArcFace is plain ArcFace
    one = ArcFace(8, 3, margin=0.3, subcenters=1)
    with torch.no_grad():
        one.weight.copy_(plain.weight)
    assert torch.equal(one(near_first, labels), plain(near_first, labels))


def test_the_last_epochs_move_a_pooled_head_to_a_larger_side_by_default() -> None:
    assert final_side(224, None, "pool_linear") == 288
    assert final_side(224, None, "avgpool") == 288
    assert final_side(320, None, "pool_linear") == 416
    assert final_side(224, 256, "pool_linear") == 256
    # a flatten head's Linear is sized for one feature map: it keeps its side
    assert final_side(224, None, "flatten") == 224
    assert final_side(224, 224, "flatten") == 224
    with pytest.raises(InvalidRequest, match="flatten head is tied to its input size"):
        final_side(224, 288, "flatten")


def test_a_cpu_phase_trains_in_bf16_only_where_its_trial_block_was_faster() -> None:
    choice = PrecisionChoice(torch.bfloat16, timed=True)
    slow_bf16 = {None: 1.5, torch.bfloat16: 2.0}
    fast_bf16 = {None: 4.7, torch.bfloat16: 4.2}
    block = PrecisionChoice.TRIAL_BLOCK
    for phase, seconds in (((224, False), slow_bf16), ((320, False), fast_bf16)):
        warm_up = PrecisionChoice.PHASE_WARM_UP
        tried = []
        for _ in range(warm_up + 4 * block):
            dtype = choice.dtype(phase)
            tried.append(dtype)
            # The phase's first steps, and the first of each block (it pays for the
            # switch), are slow and must not decide.
            n = len(tried) - warm_up
            warm = 10.0 if n <= 0 or n % block == 1 else 0.0
            choice.record(phase, seconds[dtype] + warm)
        fp32, bf16 = [None] * block, [torch.bfloat16] * block
        assert tried == [None] * warm_up + fp32 + bf16 + bf16 + fp32
    assert choice.dtype((224, False)) is None
    assert choice.describe((224, False)) == {"precision": "fp32", "precision_speedup_vs_fp32": 0.75}
    assert choice.dtype((320, False)) is torch.bfloat16
    assert choice.describe((320, False))["precision"] == "bfloat16"
    # A phase not yet timed starts its own trial.
    assert choice.dtype((224, True)) is None


def test_without_timing_the_candidate_precision_is_used_throughout() -> None:
    assert PrecisionChoice(torch.float16, timed=False).dtype((224, False)) is torch.float16
    untimed = PrecisionChoice(None, timed=True)
    assert not untimed.timed
    untimed.record((224, False), 1.0)
    assert untimed.dtype((224, False)) is None
    assert untimed.describe((224, False)) == {"precision": "fp32"}


def _hues(images: LabelledImages, config: ModelConfig, n: int) -> list[float]:
    """The mean hue (in turns) of `n` augmented views of the dataset's one image."""
    mean, std = torch.tensor(config.mean), torch.tensor(config.std)
    hues = []
    for _ in range(n):
        tensor, _ = images[0]
        rgb = (tensor * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
        r, g, b = (float(c.mean()) for c in rgb)
        hues.append(colorsys.rgb_to_hsv(r, g, b)[0])
    return hues


def test_hue_jitter_off_keeps_a_products_colour(tmp_path: Path) -> None:
    # A flat yellow-green image: a colour that tells two products apart (a Golden Delicious
    # from a Granny Smith) must come through augmentation unchanged when hue jitter is off.
    path = tmp_path / "apple.png"
    Image.new("RGB", (64, 64), (170, 190, 60)).save(path)
    config = ModelConfig(
        backbone_name="x", backbone_features=8, hidden_size=1, embedding_dim=8, input_size=32
    )
    samples = [Sample(path, 0, None)]
    kept = LabelledImages(samples, config, 32, saturation=0.0, hue=0.0)
    moved = LabelledImages(samples, config, 32, saturation=0.0, hue=0.1)
    torch.manual_seed(0)
    original = colorsys.rgb_to_hsv(170 / 255, 190 / 255, 60 / 255)[0]
    assert max(abs(h - original) for h in _hues(kept, config, 12)) < 0.01
    assert max(abs(h - original) for h in _hues(moved, config, 12)) > 0.03


def test_crop_scale_bounds_how_much_of_the_image_a_crop_keeps(tmp_path: Path) -> None:
    # A 64 px image whose left half is black and right half white: a crop that keeps the
    # whole area (scale 1, square aspect) sees both halves, one that may keep a tenth of it
    # sometimes sees one colour only.
    path = tmp_path / "halves.png"
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 64))
    image.save(path)
    config = ModelConfig(
        backbone_name="x", backbone_features=8, hidden_size=1, embedding_dim=8, input_size=32
    )
    samples = [Sample(path, 0, None)]
    std = torch.tensor(config.std)
    mean = torch.tensor(config.mean)

    def one_coloured(crop_scale: float) -> int:
        images = LabelledImages(samples, config, 32, crop_scale=crop_scale)
        count = 0
        for _ in range(200):
            tensor, _ = images[0]
            grey = (tensor * std[:, None, None] + mean[:, None, None]).mean(0)
            count += int(float(grey.max() - grey.min()) < 0.5)
        return count

    torch.manual_seed(0)
    assert one_coloured(1.0) == 0
    assert one_coloured(0.1) > 5
    with pytest.raises(InvalidRequest, match="crop scale must be in"):
        train_module.train(TrainConfig(init="m", data=Path("d.csv"), out=Path("o"), crop_scale=0))
    result = runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--crop-scale" in result.stdout


def test_colour_jitter_options_reach_the_recipe() -> None:
    result = runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--hue-jitter" in result.stdout
    assert "--saturation-jitter" in result.stdout


def _small_config(
    model_dir: Path, material: dict[str, Path], out: Path, **overrides: Any
) -> TrainConfig:
    """Three short epochs of the 64 px pooled model, the last ones at 96 px."""
    return TrainConfig(
        init=str(model_dir),
        data=material["data"],
        out=out,
        images_root=material["root"],
        epochs=3,
        batch_size=6,
        xbm_size=24,
        workers=0,
        final_size=96,
        **overrides,
    )


@pytest.mark.slow
def test_the_output_holds_the_epoch_best_on_validation(
    pooled_model_dir: Path,
    material: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Validation is scripted (epoch 2 best) so that the kept epoch is not the last; the
    # weights each epoch ended with are captured where the checkpoint is written.
    scores = itertools.cycle([0.5, 0.7, 0.6])
    monkeypatch.setattr(
        train_module, "validate", lambda *a, **k: {"map_at_1000": next(scores), "top1": 0.5}
    )
    ended: list[dict[str, torch.Tensor]] = []
    save = train_module._save_checkpoint

    def capture(path: Path, module: torch.nn.Module, *args: object, **kwargs: object) -> None:
        ended.append({k: v.clone() for k, v in module.state_dict().items()})
        save(path, module, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "_save_checkpoint", capture)
    config = _small_config(
        pooled_model_dir,
        material,
        tmp_path / "best",
        final_epochs=1,
        val_gallery=material["gallery"],
        val_queries=material["queries"],
        val_images_root=material["root"],
    )

    summary = train_module.train(config)

    assert summary["kept_epoch"] == 2
    assert [r["kept"] for r in summary["history"]] == [True, True, False]
    saved = load_file(str(tmp_path / "best" / "model.safetensors"))
    name = next(n for n in saved if n.startswith("backbone.") and saved[n].ndim == 4)
    assert torch.equal(saved[name], ended[1][name])
    assert not torch.equal(saved[name], ended[2][name])
    # epoch 2 trained at the first side: the model is served at it, not at the last side's
    served = json.loads((tmp_path / "best" / "config.json").read_text())
    assert served["input_size"] in (64, [3, 64, 64])

    last = train_module.train(
        TrainConfig(**{**config.__dict__, "out": tmp_path / "last", "keep": "last"})
    )
    assert last["kept_epoch"] == 3


def test_an_unknown_keep_is_refused() -> None:
    config = TrainConfig(init="m", data=Path("d.csv"), out=Path("o"), keep="first")
    with pytest.raises(InvalidRequest, match="unknown keep 'first'"):
        train_module.train(config)
    with pytest.raises(InvalidRequest, match="keep 11 is not an epoch of 1..10"):
        train_module.train(TrainConfig(init="m", data=Path("d.csv"), out=Path("o"), keep="11"))


def test_where_training_stops() -> None:
    # best without validation: the first epoch at the final side (epoch 9 of the recipe's 10)
    assert stop_epoch(parse_keep("best", 10), 10, 2, validated=False) == 9
    assert stop_epoch("best", 12, 3, validated=False) == 10
    # with validation the whole schedule runs and the best epoch is kept
    assert stop_epoch("best", 10, 2, validated=True) == 10
    assert stop_epoch("last", 10, 2, validated=False) == 10
    # no final phase: nothing to stop at
    assert stop_epoch("best", 10, 0, validated=False) == 10
    # an epoch number stops there, with or without validation
    assert parse_keep("7", 10) == 7
    assert stop_epoch(parse_keep("7", 10), 10, 2, validated=True) == 7


@pytest.mark.slow
def test_without_validation_training_stops_after_the_first_epoch_at_the_final_side(
    pooled_model_dir: Path, material: dict[str, Path], tmp_path: Path
) -> None:
    config = _small_config(pooled_model_dir, material, tmp_path / "recipe", final_epochs=2)

    summary = train_module.train(config)

    assert (summary["epochs"], summary["trained_epochs"], summary["kept_epoch"]) == (3, 2, 2)
    assert [r["input_size"] for r in summary["history"]] == [64, 96]
    served = json.loads((config.out / "config.json").read_text())
    assert served["input_size"] in (96, [3, 96, 96])
    # the learning rate followed the 3-epoch schedule: it stopped short of its end
    scheduler = torch.load(config.out / "checkpoint.pt", weights_only=False)["scheduler"]
    assert scheduler["total_steps"] == 3 * 3
    assert scheduler["last_epoch"] == 2 * 3
    # a checkpoint from a run that went further is not silently taken for this one
    last = TrainConfig(**{**config.__dict__, "out": tmp_path / "last", "keep": "last"})
    assert train_module.train(last)["trained_epochs"] == 3
    with pytest.raises(InvalidRequest, match="is past epoch 2"):
        train_module.train(TrainConfig(**{**last.__dict__, "keep": "best"}))


@pytest.mark.slow
def test_the_epochs_at_the_final_side_take_their_own_crop_scale(
    pooled_model_dir: Path,
    material: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[tuple[int, float]] = []
    original = train_module.LabelledImages

    def record(samples: Any, config: Any, size: int, **kwargs: Any) -> Any:
        made.append((size, kwargs["crop_scale"]))
        return original(samples, config, size, **kwargs)

    monkeypatch.setattr(train_module, "LabelledImages", record)
    config = _small_config(pooled_model_dir, material, tmp_path / "same", final_epochs=1)
    train_module.train(TrainConfig(**{**config.__dict__, "keep": "last"}))
    assert made == [(64, 0.6), (96, 0.6)]  # by default the final epochs crop as the others

    made.clear()
    whole = TrainConfig(
        **{**config.__dict__, "out": tmp_path / "whole", "keep": "last", "final_crop_scale": 1.0}
    )
    assert train_module.train(whole)["trained_epochs"] == 3
    assert made == [(64, 0.6), (96, 1.0)]
    with pytest.raises(InvalidRequest, match="final crop scale must be in"):
        train_module.train(TrainConfig(**{**config.__dict__, "final_crop_scale": 1.5}))
    result = runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--final-crop-scale" in result.stdout


@pytest.mark.parametrize(
    ("power", "expected_share_of_rare"),
    [(0.5, 2 / (2 + 8)), (1.0, 1 / 2)],  # counts 4 and 64: sqrt 2 and 8; equal 1 and 1
)
def test_class_sampling_draws_products_by_their_image_count(
    power: float, expected_share_of_rare: float
) -> None:
    samples = [Sample(Path(f"r{i}.jpg"), 0, None) for i in range(4)]
    samples += [Sample(Path(f"c{i}.jpg"), 1, None) for i in range(64)]
    sampler = class_sampler(samples, power, torch.Generator().manual_seed(0))
    assert sampler is not None
    draws = [samples[i].label for _ in range(300) for i in sampler]
    assert len(draws) == 300 * len(samples)  # as many draws per epoch as images
    assert draws.count(0) / len(draws) == pytest.approx(expected_share_of_rare, abs=0.01)


def test_class_sampling_off_is_plain_shuffling_and_out_of_range_is_refused() -> None:
    samples = [Sample(Path("a.jpg"), 0, None), Sample(Path("b.jpg"), 1, None)]
    assert class_sampler(samples, 0.0, torch.Generator()) is None
    with pytest.raises(InvalidRequest, match="between 0 and 1"):
        class_sampler(samples, 1.5, torch.Generator())
    result = runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--class-sampling" in result.stdout
