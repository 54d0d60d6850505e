"""`vsearch train`: fine-tune a model in the service's layout with ArcFace (+ XBM).

Input: a model directory (e.g. `vsearch model init-pretrained`, or the Trendyol model)
and a CSV of labelled images (`path` or `img_path`, `label` or `product_id`, optional
`bbox_x, bbox_y, bbox_w, bbox_h`). Output: the same layout (`config.json` +
`model.safetensors`), which the service loads unchanged; the ArcFace class centres are
kept in the file as a training-only tensor (the loader ignores them).

A backbone with a plain average-pooled head gets a projection head (Linear + BatchNorm1d,
`"head": "pool_linear"`); a Trendyol-style flatten head is fine-tuned as it is. The
backbone is frozen for `freeze_epochs` (only the head and class centres learn), then
trained at `backbone_lr_scale` times the learning rate, with AdamW and a one-cycle
schedule. Each epoch ends with a checkpoint (resumable) and, when a validation protocol
is given, its mAP@1000; the output then holds the epoch with the best one (`keep`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from app.core.errors import InvalidRequest, ModelLoadError
from app.core.files import atomic_write
from app.evaluation.metrics import evaluate_scores
from app.evaluation.protocols import load_protocol
from app.evaluation.run import embed_items
from app.imaging.crop import Box, crop
from app.imaging.decode import decode_image
from app.inference.architecture import ModelConfig, TYArcFace, build_module
from app.inference.builders import write_model_dir
from app.inference.loading import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_state_strict,
    resolve_model_dir,
)
from app.inference.precision import cpu_supports_bf16
from app.inference.runtime import Embedder, resolve_device
from app.training.losses import ArcFace, CrossBatchMemory

LOG = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    init: str
    data: Path
    out: Path
    images_root: Path | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    backbone_lr_scale: float = 0.25
    weight_decay: float = 1e-4
    saturation_jitter: float = 0.0
    hue_jitter: float = 0.0
    crop_scale: float = 0.6
    class_sampling: float = 0.0
    input_size: int | None = None
    embedding_dim: int = 512
    scale: float = 30.0
    margin: float = 0.3
    subcenters: int = 3
    xbm_size: int = 4096
    xbm_weight: float = 1.0
    xbm_start_epoch: int = 1
    freeze_epochs: int = 1
    ema_decay: float = 0.0
    pooling: str | None = None
    final_size: int | None = None
    final_epochs: int = 2
    final_crop_scale: float | None = None
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    mixed_precision: bool = True
    val_gallery: Path | None = None
    val_queries: Path | None = None
    val_images_root: Path | None = None
    resume: bool = True
    keep: str = "best"
    extra: dict[str, Any] = field(default_factory=dict)


class PrecisionChoice:
    """Per training phase, whether autocast to `candidate` beats fp32 on this machine.

    A CPU can list bf16 instructions and still train slower in bf16 than in fp32
    (measured on a Xeon virtual machine without AMX: EfficientNet-Lite0 at 224 px, 2.05 s
    against 1.52 s per step of 32), and the balance can change with the image side. So
    on a CPU the first steps of each phase (side, frozen or not) are a trial: after
    `PHASE_WARM_UP` untimed steps (new shapes, the data loader's first batches), blocks
    of `TRIAL_BLOCK` steps in fp32, the candidate, the candidate and fp32 (the order
    evens out a remaining trend), each step's compute timed, and the rest of the phase
    runs in the faster one (median over its blocks without their first `WARM_UP` steps).
    Blocks, not alternating steps: a step right after a switch pays for the switch
    (alternating, fp32 steps took 2.7-3.4 s where a run of them took 1.5 s). The trial
    steps are ordinary training steps. On CUDA the candidate is used without timing.
    """

    PHASE_WARM_UP = 4
    TRIAL_BLOCK = 4
    WARM_UP = 1
    BLOCKS = (False, True, True, False)  # True: the candidate

    def __init__(self, candidate: torch.dtype | None, *, timed: bool) -> None:
        self.candidate = candidate
        self.timed = timed and candidate is not None
        self.chosen: dict[Hashable, torch.dtype | None] = {}
        self.speedup: dict[Hashable, float] = {}
        self._trials: dict[Hashable, list[float]] = {}

    def dtype(self, phase: Hashable) -> torch.dtype | None:
        """The autocast dtype for the next step of `phase` (None: fp32)."""
        if not self.timed:
            return self.candidate
        if phase in self.chosen:
            return self.chosen[phase]
        step = len(self._trials.get(phase, [])) - self.PHASE_WARM_UP
        return self.candidate if step >= 0 and self.BLOCKS[step // self.TRIAL_BLOCK] else None

    def record(self, phase: Hashable, seconds: float) -> None:
        """Note how long the step of `phase` just taken took; decides after the trial."""
        if not self.timed or phase in self.chosen:
            return
        trials = self._trials.setdefault(phase, [])
        trials.append(seconds)
        size, start = self.TRIAL_BLOCK, self.PHASE_WARM_UP
        if len(trials) < start + len(self.BLOCKS) * size:
            return
        timed: dict[bool, list[float]] = {False: [], True: []}
        for i, kind in enumerate(self.BLOCKS):
            timed[kind] += trials[start + i * size + self.WARM_UP : start + (i + 1) * size]
        fp32, other = float(np.median(timed[False])), float(np.median(timed[True]))
        self.speedup[phase] = round(fp32 / other, 3)
        self.chosen[phase] = self.candidate if other < fp32 else None
        LOG.info(
            "phase %s: %.2f s per step in fp32, %.2f s in %s; training in %s",
            phase,
            fp32,
            other,
            dtype_name(self.candidate),
            dtype_name(self.chosen[phase]),
        )

    def describe(self, phase: Hashable) -> dict[str, Any]:
        """What an epoch record says about the phase's precision."""
        out: dict[str, Any] = {"precision": dtype_name(self.dtype(phase))}
        if phase in self.speedup:
            out["precision_speedup_vs_fp32"] = self.speedup[phase]
        return out


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "fp32"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    box: Box | None


def read_samples(path: Path, root: Path) -> tuple[list[Sample], list[str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        path_col = "path" if "path" in columns else "img_path"
        label_col = "label" if "label" in columns else "product_id"
        if path_col not in columns or label_col not in columns:
            raise InvalidRequest(
                f"{path} needs a path (or img_path) column and a label (or product_id) column"
            )
        box_cols = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
        has_box = all(c in columns for c in box_cols)
        rows = list(reader)
    names = sorted({r[label_col] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for r in rows:
        box = None
        if has_box and all(r[c].strip() for c in box_cols):
            x, y, w, h = (float(r[c]) for c in box_cols)
            box = Box(x, y, w, h)
        samples.append(Sample(root / r[path_col], index[r[label_col]], box))
    return samples, names


class LabelledImages(Dataset[tuple[torch.Tensor, int]]):
    """Decoded exactly as the service decodes, cropped to the box, then augmented.

    Brightness and contrast are jittered (lighting changes between photos); hue and
    saturation are not by default: a product's colour is part of what it is (a yellow and
    a green apple, a red and a blue shirt are different products), and on validation the
    recipe without them was ahead (docs/benchmarks.md). Random resized crops keep at least
    `crop_scale` of the image's area (0.6 by default: ahead of 0.35 on validation; at 0.35
    a crop can enlarge an object 1.7x, at 0.6 1.3x).
    """

    def __init__(
        self,
        samples: list[Sample],
        config: ModelConfig,
        size: int,
        *,
        saturation: float = 0.0,
        hue: float = 0.0,
        crop_scale: float = TrainConfig.crop_scale,
    ) -> None:
        self.samples = samples
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(crop_scale, 1.0), ratio=(0.75, 1.333)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.3, contrast=0.3, saturation=saturation, hue=hue),
                T.ToTensor(),
                T.Normalize(config.mean, config.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        image = decode_image(sample.path.read_bytes(), max_pixels=10**9)
        return self.transform(crop(image, sample.box)), sample.label


class WeightAverage:
    """An exponential moving average of the model's weights (Polyak averaging).

    The averaged weights are validated beside the trained ones every epoch and, when
    enabled, are what the output model holds. The decay warms up as (1 + t) / (10 + t), so
    the first steps, taken from pretrained weights, do not linger in the average.
    BatchNorm statistics are copied, not averaged.
    """

    def __init__(self, module: TYArcFace, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.module: TYArcFace = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        averaged = self.module.state_dict()
        for name, value in module.state_dict().items():
            if value.dtype.is_floating_point and "running_" not in name:
                averaged[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                averaged[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = int(state["steps"])


KEEP_CHOICES = ("best", "last")


def parse_keep(keep: str, epochs: int) -> str | int:
    """`best`, `last`, or an epoch number in 1..`epochs` (training stops after it)."""
    if keep in KEEP_CHOICES:
        return keep
    try:
        number = int(keep)
    except ValueError:
        raise InvalidRequest(f"unknown keep {keep!r} (best, last or an epoch number)") from None
    if not 1 <= number <= epochs:
        raise InvalidRequest(f"keep {number} is not an epoch of 1..{epochs}")
    return number


def stop_epoch(keep: str | int, epochs: int, final_epochs: int, validated: bool) -> int:
    """How many epochs of the `epochs`-long schedule to train before the output is written.

    An epoch number stops there. `best` without a validation protocol stops after the
    first epoch at the final side: in every validated grocery-store run of the recipe
    (final sides of 288 and 320 px, one to three final epochs, 10 or 12 epochs; chosen on
    the val split, docs/benchmarks.md) that epoch had the best validation mAP@1000, and
    the ones after it, at lower learning rates, fell back. With validation, `best` trains
    the whole schedule and keeps the best epoch; `last` trains it and keeps the last.
    """
    if isinstance(keep, int):
        return keep
    if keep == "best" and not validated and final_epochs > 0:
        return epochs - final_epochs + 1
    return epochs


class KeptEpoch:
    """Which epoch's weights the output model holds: the last, or the best on validation.

    With `keep="best"` and a validation protocol, each epoch's validation mAP@1000 is
    compared with the best so far and, when higher (ties keep the earlier epoch), the
    weights, the class centres and the model config (the side changes for the last
    epochs) are copied. The last epoch, at the lowest learning rate, is not always the
    best: in every grocery-store run it was below the one before it (docs/benchmarks.md).
    Without validation, or with `keep="last"` or an epoch number, the last epoch trained
    is kept (where training stops: `stop_epoch`).
    """

    def __init__(self, keep: str | int) -> None:
        # an epoch number stops training there: what is kept is then the last epoch
        self.keep = keep if isinstance(keep, str) else "last"
        self.epoch: int | None = None
        self.score = float("-inf")
        self.state: dict[str, torch.Tensor] | None = None
        self.config: ModelConfig | None = None

    def offer(
        self, record: dict[str, Any], module: TYArcFace, arcface: ArcFace, *, score_key: str
    ) -> bool:
        """Note epoch `record`; True where its weights are now the ones kept."""
        score = record.get(score_key)
        if self.keep != "best" or score is None:
            return self.keep == "last" or score is None
        if score <= self.score:
            return False
        self.epoch, self.score = int(record["epoch"]), float(score)
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.state["arcface.weight"] = arcface.weight.detach().clone()
        self.config = module.config
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "score": self.score,
            "state": self.state,
            "config": asdict(self.config) if self.config is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.score, self.state = state["epoch"], state["score"], state["state"]
        self.config = ModelConfig(**state["config"]) if state["config"] is not None else None


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed + worker_id)
    np.random.seed((seed + worker_id) % 2**32)


DEFAULT_POOLING = "avg"


def prepare_module(
    init: str, embedding_dim: int, input_size: int | None, pooling: str | None = None
) -> TYArcFace:
    """The model to fine-tune, with a trainable head.

    A new head (for an `avgpool` backbone) pools with `pooling` (default `DEFAULT_POOLING`);
    a model that already has its head keeps its pooling, and asking for another is an error.
    """
    model_dir, _ = resolve_model_dir(init)
    config = ModelConfig.from_file(model_dir / CONFIG_FILE)
    module = build_module(config)
    load_state_strict(module, load_file(str(model_dir / WEIGHTS_FILE)), str(model_dir))
    size = input_size or config.input_size
    if pooling not in (None, "avg", "gem"):
        raise InvalidRequest(f"unknown pooling {pooling!r} (avg or gem)")
    if config.head != "avgpool" and pooling not in (None, config.pooling):
        raise InvalidRequest(
            f"{init} already has its head, which pools with {config.pooling!r}; "
            "fine-tune it as it is or start from a model without a head"
        )
    if config.head == "flatten" and size != config.input_size:
        raise ModelLoadError(
            "a flatten head is tied to its input size: train at "
            f"{config.input_size} px (or start from a pooled head)"
        )
    if config.head == "avgpool":
        new_config = ModelConfig(
            backbone_name=config.backbone_name,
            backbone_features=config.backbone_features,
            hidden_size=1,
            embedding_dim=embedding_dim,
            input_size=size,
            mean=config.mean,
            std=config.std,
            head="pool_linear",
            pooling="gem" if (pooling or DEFAULT_POOLING) == "gem" else "avg",
        )
        trained = TYArcFace(new_config)
        trained.backbone.load_state_dict(module.backbone.state_dict())
        return trained
    if size != config.input_size:
        config = ModelConfig(**{**asdict(config), "input_size": size})
        module.config = config
    return module


FINAL_SIZE_SCALE = 1.25


def final_side(size: int, requested: int | None, head: str) -> int:
    """The side the last epochs train at (and the model is served at).

    By default a pooled head moves to 1.25x its side, rounded to a multiple of 32 (224 ->
    288); a flatten head is tied to its input size and keeps it.
    """
    if requested is None:
        if head == "flatten":
            return size
        return max(size, 32 * int(size * FINAL_SIZE_SCALE / 32 + 0.5))
    if head == "flatten" and requested != size:
        raise InvalidRequest(
            "a flatten head is tied to its input size: it cannot change size for the last epochs"
        )
    return requested


def validate(
    module: TYArcFace, config: TrainConfig, device: torch.device
) -> dict[str, float | int] | None:
    if config.val_gallery is None or config.val_queries is None:
        return None
    root = config.val_images_root or config.val_gallery.parent
    protocol = load_protocol(config.val_gallery, config.val_queries, root)
    module.eval()
    embedder = Embedder(
        module,
        module.config,
        model_id="training",
        device=device,
        precision="fp32",
    )
    gallery = embed_items(embedder, protocol.gallery, threads=max(1, config.workers))
    queries = embed_items(embedder, protocol.queries, threads=max(1, config.workers))
    labels = {
        x: i for i, x in enumerate(sorted({it.label for it in protocol.gallery + protocol.queries}))
    }
    metrics = evaluate_scores(
        queries @ gallery.T,
        np.asarray([labels[q.label] for q in protocol.queries]),
        np.asarray([labels[g.label] for g in protocol.gallery]),
    ).as_dict()
    module.train()
    return metrics


def class_sampler(
    samples: list[Sample], power: float, generator: torch.Generator
) -> WeightedRandomSampler | None:
    """Draw each epoch's images so that a product with n images is drawn in proportion
    to n^(1 - power): 0 is plain shuffling (None), 0.5 square-root sampling, 1 every
    product equally often. Draws are with replacement, as many per epoch as there are
    images."""
    if not 0.0 <= power <= 1.0:
        raise InvalidRequest(f"class sampling must be between 0 and 1, got {power}")
    if power == 0.0:
        return None
    counts = Counter(s.label for s in samples)
    weights = [counts[s.label] ** -power for s in samples]
    return WeightedRandomSampler(weights, len(samples), replacement=True, generator=generator)


def check_validation_split(config: TrainConfig, samples: list[Sample]) -> None:
    """Refuse validation queries that are also training images.

    The validation score is what epochs and hyperparameters are chosen by; a query the
    model was trained on makes that score a measure of memory, not of retrieval. (The
    validation *gallery* may be training material: catalogue images usually are.)
    """
    if config.val_gallery is None or config.val_queries is None:
        return
    root = config.val_images_root or config.val_gallery.parent
    protocol = load_protocol(config.val_gallery, config.val_queries, root)
    trained = {s.path.resolve() for s in samples}
    leaked = [q.path for q in protocol.queries if q.path.resolve() in trained]
    if leaked:
        raise InvalidRequest(
            f"{len(leaked)} validation queries are also training images (first: {leaked[0]}); "
            "validate on images the model does not train on"
        )


def train(
    config: TrainConfig,
    *,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune; returns a summary (per-epoch loss and validation, times, output)."""
    if config.subcenters < 1:
        raise InvalidRequest(f"subcenters must be at least 1, got {config.subcenters}")
    for name, value in (
        ("crop scale", config.crop_scale),
        ("final crop scale", config.final_crop_scale),
    ):
        if value is not None and not 0.0 < value <= 1.0:
            raise InvalidRequest(f"{name} must be in (0, 1], got {value}")
    keep = parse_keep(config.keep, config.epochs)
    kept = KeptEpoch(keep)
    generator = _seed_everything(config.seed)
    device = resolve_device(config.device)
    root = config.images_root or config.data.parent
    samples, names = read_samples(config.data, root)
    check_validation_split(config, samples)
    sampler = class_sampler(samples, config.class_sampling, generator)
    module = prepare_module(config.init, config.embedding_dim, config.input_size, config.pooling)
    model_config = module.config
    size = model_config.input_size
    final_size = final_side(size, config.final_size, model_config.head)
    final_epochs = min(config.final_epochs, config.epochs) if final_size != size else 0
    final_crop_scale = (
        config.crop_scale if config.final_crop_scale is None else config.final_crop_scale
    )
    validated = config.val_gallery is not None and config.val_queries is not None
    stop = stop_epoch(keep, config.epochs, final_epochs, validated)
    module.to(device)
    module.to(memory_format=torch.channels_last)
    arcface = ArcFace(
        model_config.embedding_dim,
        len(names),
        scale=config.scale,
        margin=config.margin,
        subcenters=config.subcenters,
    ).to(device)
    xbm = (
        CrossBatchMemory(model_config.embedding_dim, config.xbm_size)
        if config.xbm_size > 0
        else None
    )

    def make_loader(side: int, crop_scale: float) -> DataLoader[tuple[torch.Tensor, int]]:
        return DataLoader(
            LabelledImages(
                samples,
                model_config,
                side,
                saturation=config.saturation_jitter,
                hue=config.hue_jitter,
                crop_scale=crop_scale,
            ),
            batch_size=config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=config.workers,
            generator=generator,
            worker_init_fn=_worker_init,
            persistent_workers=config.workers > 0,
        )

    loader = make_loader(size, config.crop_scale)
    head_params = [p for n, p in module.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": module.backbone.parameters(), "lr": config.lr * config.backbone_lr_scale},
            {"params": head_params + list(arcface.parameters()), "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )
    steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[config.lr * config.backbone_lr_scale, config.lr],
        total_steps=max(steps, 1),
        pct_start=0.15,
    )
    amp_dtype: torch.dtype | None = None
    if config.mixed_precision:
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif cpu_supports_bf16():
            amp_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    precision = PrecisionChoice(amp_dtype, timed=device.type == "cpu")

    average = WeightAverage(module, config.ema_decay) if config.ema_decay > 0 else None
    config.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = config.out / CHECKPOINT
    start_epoch, history = 0, []
    if config.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        module.load_state_dict(state["module"])
        arcface.load_state_dict(state["arcface"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if xbm is not None and state.get("xbm"):
            xbm.load_state_dict(state["xbm"])
        if average is not None and state.get("ema"):
            average.load_state_dict(state["ema"])
        if state.get("kept"):
            kept.load_state_dict(state["kept"])
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        LOG.info("resuming from epoch %d", start_epoch + 1)
        if start_epoch > stop:
            raise InvalidRequest(
                f"the checkpoint in {config.out} is past epoch {stop}, where this run stops "
                "(--keep); --restart trains afresh"
            )

    if on_start is not None:
        on_start(
            {
                "classes": len(names),
                "images": len(samples),
                "steps_per_epoch": len(loader),
                "epochs": config.epochs,
                "stop_after_epoch": stop,
                "first_epoch": start_epoch + 1,
                "device": str(device),
                "mixed_precision": dtype_name(amp_dtype),
                "precision_timed": precision.timed,
            }
        )
    started = time.perf_counter()
    for epoch in range(start_epoch, stop):
        if final_epochs and epoch == max(start_epoch, config.epochs - final_epochs):
            # The last epochs train at a higher resolution (FixRes: random resized crops
            # make objects look larger in training than in a plain resize at test time),
            # and the model is then served at that size.
            model_config = ModelConfig(**{**asdict(model_config), "input_size": final_size})
            module.config = model_config
            if average is not None:
                average.module.config = model_config
            loader = make_loader(final_size, final_crop_scale)
        frozen = epoch < config.freeze_epochs
        module.train()
        module.backbone.requires_grad_(not frozen)
        if frozen:
            module.backbone.eval()  # frozen BatchNorm statistics too
        losses = []
        phase = (model_config.input_size, frozen)
        epoch_started = time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            step_started = time.perf_counter()
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            labels = labels.to(device)
            step_dtype = precision.dtype(phase)
            with torch.autocast(
                device.type, dtype=step_dtype or torch.float32, enabled=step_dtype is not None
            ):
                embeddings = module(images)
                loss = arcface(embeddings, labels)
                if xbm is not None and epoch >= config.xbm_start_epoch:
                    loss = loss + config.xbm_weight * xbm.loss(embeddings, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                average.update(module)
            if xbm is not None:
                xbm.enqueue(embeddings, labels)
            losses.append(float(loss.detach()))
            precision.record(phase, time.perf_counter() - step_started)
            if on_step is not None:
                on_step(epoch, step + 1, len(loader), float(np.mean(losses[-20:])))
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": round(float(np.mean(losses)), 4) if losses else None,
            "frozen_backbone": frozen,
            "input_size": model_config.input_size,
            "seconds": round(time.perf_counter() - epoch_started, 1),
            **precision.describe(phase),
        }
        val = validate(module, config, device)
        if val is not None:
            record["val_map_at_1000"] = round(float(val["map_at_1000"]), 4)
            record["val_top1"] = round(float(val["top1"]), 4)
        if average is not None:
            val = validate(average.module, config, device)
            if val is not None:
                record["ema_val_map_at_1000"] = round(float(val["map_at_1000"]), 4)
                record["ema_val_top1"] = round(float(val["top1"]), 4)
        final = average.module if average is not None else module
        record["kept"] = kept.offer(
            record,
            final,
            arcface,
            score_key="ema_val_map_at_1000" if average else "val_map_at_1000",
        )
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        _save_checkpoint(
            checkpoint_path,
            module,
            arcface,
            optimizer,
            scheduler,
            xbm,
            generator,
            epoch,
            history,
            average,
            kept,
        )

    final = average.module if average is not None else module
    state_dict = dict(final.state_dict())
    state_dict["arcface.weight"] = arcface.weight.detach()
    kept_epoch = len(history)
    if kept.epoch is not None and kept.state is not None and kept.config is not None:
        kept_epoch, model_config, state_dict = kept.epoch, kept.config, kept.state
    write_model_dir(
        config.out,
        model_config,
        state_dict,
        description="fine-tuned by vsearch train",
        training={k: str(v) for k, v in asdict(config).items() if k != "extra"},
    )
    summary = {
        "out": str(config.out),
        "classes": len(names),
        "images": len(samples),
        "epochs": config.epochs,
        "trained_epochs": len(history),
        "kept_epoch": kept_epoch,
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": history,
        "mixed_precision": dtype_name(amp_dtype),
    }
    (config.out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_checkpoint(
    path: Path,
    module: nn.Module,
    arcface: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    xbm: CrossBatchMemory | None,
    generator: torch.Generator,
    epoch: int,
    history: list[dict[str, Any]],
    average: WeightAverage | None = None,
    kept: KeptEpoch | None = None,
) -> None:
    state = {
        "ema": average.state_dict() if average is not None else None,
        "kept": kept.state_dict() if kept is not None else None,
        "module": module.state_dict(),
        "arcface": arcface.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "xbm": xbm.state_dict() if xbm is not None else None,
        "torch_rng": torch.get_rng_state(),
        "loader_rng": generator.get_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "epoch": epoch,
        "history": history,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
