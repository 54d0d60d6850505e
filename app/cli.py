"""`vsearch`: the command-line entry point (typer). Calls the same services as the API."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from app.core.config import Settings
from app.core.errors import ModelLoadError, ServiceError
from app.core.logging import configure_logging

if TYPE_CHECKING:
    from rich.progress import Progress
    from typer._click import Context


err = Console(stderr=True)


class CommandGroup(TyperGroup):
    """Prints what a user can fix (a model that does not load, a bad input, a file that
    cannot be read) as one `error:` line and exit status 1, not a traceback."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ServiceError, ModelLoadError, OSError) as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from exc


cli = typer.Typer(
    help="Visual product search service: serve, manage models, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=CommandGroup,
)
model_cli = typer.Typer(help="Create and inspect model directories.", no_args_is_help=True)
bench_cli = typer.Typer(help="Benchmarks that print their figures as JSON.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
duplicates_cli = typer.Typer(
    help="Duplicate pairs for catalogue unification.", no_args_is_help=True
)
cli.add_typer(model_cli, name="model")
cli.add_typer(bench_cli, name="bench")
cli.add_typer(db_cli, name="db")
cli.add_typer(duplicates_cli, name="duplicates")
embeddings_cli = typer.Typer(
    help="Precomputed embeddings in and out as Parquet.", no_args_is_help=True
)
cli.add_typer(embeddings_cli, name="embeddings")

LOG = logging.getLogger("vsearch")


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_level, "text")
    return settings


def _bar(label: str) -> Progress:
    """A progress bar on stderr: label, bar, done/total, time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Processes (each loads the model).")] = 1,
) -> None:
    """Start the HTTP service with the VS_* settings."""
    import uvicorn

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: only the
    # configured proxies may name the client, else any local process could reset limits.
    proxies = [p.strip() for p in settings.trusted_proxies.split(",") if p.strip()]
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        # The app logs one line per request itself (app/api/observability.py).
        access_log=False,
        timeout_graceful_shutdown=30,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or [],
    )


@cli.command("config")
def config_table(
    readme: Annotated[
        Path | None, typer.Option(help="Rewrite the table between the markers in this file.")
    ] = None,
) -> None:
    """Print the configuration table (Markdown) generated from the settings class."""
    from app.core.config import settings_markdown

    table = settings_markdown()
    if readme is None:
        print(table)
        return
    text = readme.read_text()
    start, end = "<!-- config-table:start -->", "<!-- config-table:end -->"
    if start not in text or end not in text:
        raise typer.BadParameter(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    err.print(f"updated the configuration table in {readme}")


@model_cli.command("init-random")
def model_init_random(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write.")],
    backbone: Annotated[str, typer.Option(help="timm backbone name.")] = "convnext_atto",
    input_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    embedding_dim: Annotated[int, typer.Option(help="Embedding size.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a random-weight model in the service's layout (for offline tests)."""
    from app.inference.builders import init_random

    _settings()
    path = init_random(
        out_dir, backbone=backbone, input_size=input_size, embedding_dim=embedding_dim, seed=seed
    )
    err.print(f"wrote {path}/config.json and model.safetensors")


@model_cli.command("init-pretrained")
def model_init_pretrained(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write.")],
    input_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 224,
) -> None:
    """Write the ImageNet EfficientNet-Lite0 model (needs the `pretrained` extra)."""
    from app.inference.builders import init_pretrained

    _settings()
    path = init_pretrained(out_dir, input_size=input_size)
    err.print(f"wrote {path}/config.json and model.safetensors")


@model_cli.command("info")
def model_info(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
) -> None:
    """Load a model strictly and print what the service would use."""
    from app.inference.runtime import load_model

    _settings()
    embedder = load_model(model, device=device, precision=precision)
    print(json.dumps(embedder.describe(), indent=2))


@bench_cli.command("embed")
def bench_embed(
    model: Annotated[str, typer.Option(help="Model directory or hub id.")],
    images: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    images_dir: Annotated[
        Path | None, typer.Option(help="Take images from here instead of synthetic ones.")
    ] = None,
    callers: Annotated[int, typer.Option(help="Concurrent callers.", min=1)] = 16,
    batch_sizes: Annotated[
        str, typer.Option(help="Comma-separated worker batch sizes.")
    ] = "1,8,32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    max_wait_ms: Annotated[float, typer.Option(help="Worker batch wait.")] = 5.0,
    preprocess_threads: Annotated[int, typer.Option(help="Preprocessing threads.")] = 2,
    compile_model: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Also measure the compiled model.")
    ] = True,
    roofline: Annotated[
        bool, typer.Option("--roofline/--no-roofline", help="Measure the machine's GEMM peak.")
    ] = True,
) -> None:
    """Reference loop vs the batching worker, with the machine's roofline; prints JSON."""
    from app.benchmarks.embed import run_embed_benchmark

    _settings()
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"{batch_sizes!r} is not a list like 1,8,32") from None
    result = run_embed_benchmark(
        model,
        n_images=images,
        images_dir=images_dir,
        batch_sizes=sizes,
        callers=callers,
        device=device,
        precision=precision,
        max_wait_ms=max_wait_ms,
        preprocess_threads=preprocess_threads,
        compile_model=compile_model,
        roofline=roofline,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database (VS_DATABASE_URL) to the latest schema."""
    from sqlalchemy.exc import OperationalError

    from app.core.database import Database
    from app.core.migrations import current_revision, upgrade

    # The container entry point runs this before `serve`: it logs as the service does
    # (VS_LOG_FORMAT), so a JSON log stream stays JSON from the first line.
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    db = Database(settings.resolved_database_url)
    try:
        upgrade(db)
        revision = current_revision(db)
    except OperationalError as exc:
        LOG.error("database not reachable: %s", str(exc.orig).strip() or exc)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    LOG.info("database schema at %s", revision, extra={"revision": revision})


@db_cli.command("current")
def db_current() -> None:
    """Print the database's schema revision and the code's."""
    from app.core.database import Database
    from app.core.migrations import current_revision, head_revision

    settings = _settings()
    db = Database(settings.resolved_database_url)
    print(json.dumps({"current": current_revision(db), "head": head_revision()}))
    db.dispose()


@cli.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL file of products.", exists=True)],
    images_root: Annotated[
        Path | None, typer.Option(help="Base of relative image paths (default: the file's dir).")
    ] = None,
    id_column: Annotated[str, typer.Option(help="CSV: product id column.")] = "id",
    image_column: Annotated[str, typer.Option(help="CSV: image path/URL column ('|' splits).")] = (
        "image"
    ),
    title_column: Annotated[str, typer.Option(help="CSV: title column.")] = "title",
    category_column: Annotated[str, typer.Option(help="CSV: category column.")] = "category",
    batch_size: Annotated[int, typer.Option(help="Products per service call.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Products in flight at once.")] = 16,
    failures: Annotated[
        Path | None, typer.Option(help="Write failed products here (JSONL).")
    ] = Path("ingest-failures.jsonl"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index products from a file through the same service as POST /products.

    Re-running the same file resumes: unchanged products are skipped without embedding.
    """
    import asyncio

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from app.catalogue.ingest import CsvColumns, read_products
    from app.catalogue.ingest import ingest as run
    from app.catalogue.service import ProductResult
    from app.services import open_services

    settings = _settings()
    columns = CsvColumns(
        id=id_column, image=image_column, title=title_column, category=category_column
    )
    total = sum(1 for _ in read_products(file, images_root=images_root, columns=columns))
    progress = Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s  failed {task.fields[failed]}"),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal and os.environ.get("CI") == "true",
    )

    async def main() -> dict[str, object]:
        async with open_services(settings, tail=False) as services:
            catalogue = services.catalogue
            catalogue.set_concurrency(concurrency)
            task = progress.add_task("ingest", total=total, rate="0.0", failed=0)
            started, counts = time.perf_counter(), {"images": 0, "failed": 0}

            def on_result(product: object, result: ProductResult) -> None:
                counts["images"] += result.images
                counts["failed"] += result.status == "failed"
                rate = counts["images"] / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=1, rate=f"{rate:.1f}", failed=counts["failed"])

            fh = failures.open("w") if failures else None
            try:
                with progress:
                    summary = await run(
                        catalogue,
                        read_products(file, images_root=images_root, columns=columns),
                        batch_size=batch_size,
                        failures=fh,
                        on_result=on_result,
                    )
            finally:
                if fh is not None:
                    fh.close()
        return summary.as_dict()

    result = asyncio.run(main())
    if failures is not None and result["failed"] == 0:
        failures.unlink(missing_ok=True)
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        err.print(result)
    if result["failed"]:
        err.print(f"[yellow]{result['failed']} product(s) failed; see {failures}[/yellow]")
        raise typer.Exit(code=2)


@cli.command()
def reembed(
    batch: Annotated[int, typer.Option(help="Images per step.")] = 64,
) -> None:
    """Embed the catalogue again with VS_MODEL (after switching models).

    Images are re-read from their URL or local path; the index is rebuilt at the next start.
    """
    import asyncio

    from rich.progress import Progress, TextColumn

    from app.catalogue.service import reembed_catalogue
    from app.services import catalogue_service, open_database, open_embedding

    settings = _settings()

    async def main() -> dict[str, object]:
        db = open_database(settings)
        try:
            async with open_embedding(settings, db, check_catalogue=False) as embedding:
                service = catalogue_service(settings, db, embedding)
                progress = Progress(
                    TextColumn("[bold]reembed[/bold] {task.completed} images"), console=err
                )
                task = progress.add_task("reembed", total=None)
                with progress:
                    report = await reembed_catalogue(
                        service,
                        batch=batch,
                        progress=lambda n: progress.update(task, completed=n),
                    )
        finally:
            db.dispose()
        return {
            "model_id": embedding.embedder.model_id,
            "reembedded": report.reembedded,
            "unrecoverable_uploads": len(report.unrecoverable),
            "failed": report.failed,
        }

    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    if result["unrecoverable_uploads"] or result["failed"]:
        err.print(
            "[yellow]some images could not be re-embedded: post those products again "
            "(uploaded bytes are not kept)[/yellow]"
        )
        raise typer.Exit(code=2)


@cli.command()
def reindex(
    train: Annotated[
        bool | None,
        typer.Option("--train/--exact", help="Force IVF-PQ or exact shards (default: by size)."),
    ] = None,
) -> None:
    """Rebuild every index shard from the database (the source of truth)."""
    from app.services import open_storage

    settings = _settings()
    with open_storage(settings, save=False) as storage:
        progress = _bar("reindex")
        with progress:
            task = progress.add_task("reindex", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            storage.index.rebuild(reason="vsearch reindex", train=train, progress=advance)
        print(json.dumps(storage.index.describe(), indent=2))


@bench_cli.command("index")
def bench_index(
    n: Annotated[int, typer.Option(help="Database vectors.")] = 1_000_000,
    dim: Annotated[int, typer.Option(help="Dimension.")] = 512,
    queries: Annotated[int, typer.Option(help="Queries (half near-duplicates).")] = 1000,
    shards: Annotated[int, typer.Option(help="Shards of the service's index.")] = 4,
    flat: Annotated[
        bool | None, typer.Option("--flat/--no-flat", help="Exact baseline (default: n <= 2M).")
    ] = None,
    hnsw: Annotated[
        bool | None, typer.Option("--hnsw/--no-hnsw", help="hnswlib peer (default: n <= 2M).")
    ] = None,
    factory: Annotated[
        list[str] | None,
        typer.Option(help="IVF-PQ factory strings to test (default: a measured set)."),
    ] = None,
    nprobe: Annotated[str, typer.Option(help="nprobe values for --factory.")] = "16,32,64",
    refine: Annotated[str, typer.Option(help="refine factors for --factory.")] = "4,8",
    workdir: Annotated[Path | None, typer.Option(help="Where index files go.")] = None,
    train_n: Annotated[
        int | None, typer.Option(help="Training sample size (default: 40 per list).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON rows.")] = False,
) -> None:
    """Exact vs the sharded IVF-PQ index vs hnswlib on clustered synthetic vectors."""
    from app.benchmarks.index import IvfConfig, run_index_benchmark

    _settings()
    configs = None
    if factory:
        configs = [
            IvfConfig(
                f,
                tuple(int(v) for v in nprobe.split(",")),
                tuple(int(v) for v in refine.split(",")),
            )
            for f in factory
        ]
    result = run_index_benchmark(
        n=n,
        dim=dim,
        n_queries=queries,
        shards=shards,
        flat=flat,
        hnsw=hnsw,
        configs=configs,
        workdir=workdir,
        train_n=train_n,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result["rows"] if json_output else result, indent=2))


@cli.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model directory (or hub id).")],
    gallery: Annotated[Path, typer.Option(help="gallery.csv (Products-10K format).", exists=True)],
    queries: Annotated[Path, typer.Option(help="queries.csv (Products-10K format).", exists=True)],
    images_root: Annotated[Path, typer.Option(help="Base of img_path.", exists=True)],
    index: Annotated[
        bool, typer.Option("--index", help="Also rank through the sharded IVF-PQ index.")
    ] = False,
    submission: Annotated[
        Path | None, typer.Option(help="Write the top-1000 gallery ids per query (JSON).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON object.")] = False,
) -> None:
    """Retrieval quality of a model on a gallery/queries protocol (mAP@1000, top-k, delta)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from app.evaluation.run import run_evaluation

    settings = _settings()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err
    )
    tasks: dict[str, object] = {}

    def advance(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done)  # type: ignore[arg-type]

    with progress:
        result = run_evaluation(
            model,
            gallery,
            queries,
            images_root,
            device=device,
            precision=precision,
            through_index=index,
            index_settings=settings.index,
            submission=submission,
            batch_size=batch_size,
            progress=advance,
        )
    table = Table(title=f"retrieval quality: {result['model_id']}")
    for column in ("set", "mAP@1000", "top-1", "top-3", "top-5", "delta sim.", "queries"):
        table.add_column(column)

    def add(name: str, m: dict[str, Any]) -> None:
        keys = ("map_at_1000", "top1", "top3", "top5", "delta_similarity")
        cells = [f"{float(m[k]):.4f}" if k in m else "-" for k in keys]
        table.add_row(name, *cells, str(m.get("queries", "-")))

    add("all (exact)", result)
    for group, metrics in result.get("groups", {}).items():
        add(group, metrics)
    if "index" in result:
        add("all (index)", result["index"])
    err.print(table)
    err.print(f"{result['images_per_s']} images/s")
    if json_output:
        print(json.dumps(result))


@bench_cli.command("duplicates")
def bench_duplicates(
    n: Annotated[int, typer.Option(help="Synthetic images (one product each).")] = 100_000,
    dim: Annotated[int, typer.Option(help="Dimension.")] = 512,
    floor: Annotated[float, typer.Option(help="Pair floor.")] = 0.9,
    batch: Annotated[int, typer.Option(help="Images per kNN batch.")] = 1024,
    database_url: Annotated[
        str | None, typer.Option(help="Catalogue database (default: a temporary SQLite file).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where temporary files go.")] = None,
) -> None:
    """Time a full duplicates scan over N synthetic images (prints JSON)."""
    from app.benchmarks.duplicates import run_duplicates_benchmark

    settings = _settings()
    result = run_duplicates_benchmark(
        n=n,
        dim=dim,
        floor=floor,
        batch=batch,
        index_settings=settings.index,
        database_url=database_url,
        workdir=workdir,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


@bench_cli.command("import")
def bench_import(
    n: Annotated[int, typer.Option(help="Rows (one image per product).")] = 100_000,
    dim: Annotated[int, typer.Option(help="Dimension.")] = 512,
    batch: Annotated[int, typer.Option(help="Rows per transaction.")] = 10_000,
    target: Annotated[
        list[str] | None,
        typer.Option(help="sqlite and/or postgres (a throwaway server); default both."),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Also import into this (empty) catalogue.")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where temporary files go.")] = None,
) -> None:
    """Time `vsearch embeddings import` of N synthetic 512-d embeddings (prints JSON)."""
    from app.benchmarks.embeddings_import import run_import_benchmark

    _settings()
    result = run_import_benchmark(
        n=n,
        dim=dim,
        batch_rows=batch,
        targets=tuple(target or ("sqlite", "postgres")),
        database_url=database_url,
        workdir=workdir,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


@bench_cli.command("filters")
def bench_filters(
    n: Annotated[int, typer.Option(help="Database vectors.")] = 1_000_000,
    dim: Annotated[int, typer.Option(help="Dimension.")] = 512,
    queries: Annotated[int, typer.Option(help="Queries.")] = 100,
    fractions: Annotated[
        str, typer.Option(help="Filter selectivities (1 = no filter, the ANN baseline).")
    ] = "0.001,0.05,0.5,1",
    shards: Annotated[int, typer.Option(help="Shards of the service's index.")] = 4,
    train_n: Annotated[
        int | None, typer.Option(help="Training sample size (default: 40 per list).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where index files go.")] = None,
    keep_index: Annotated[
        bool, typer.Option(help="Keep the index and ground truth in --workdir for the next run.")
    ] = False,
) -> None:
    """Filtered search (allow-list, accept-and-deepen, naive post-filter) vs exact
    filtered search at several selectivities (prints JSON)."""
    from app.benchmarks.filters import run_filter_benchmark

    _settings()
    result = run_filter_benchmark(
        n=n,
        dim=dim,
        n_queries=queries,
        fractions=tuple(float(f) for f in fractions.split(",")),
        shards=shards,
        train_n=train_n,
        workdir=workdir,
        keep=keep_index,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


@cli.command()
def train(
    init: Annotated[str, typer.Option(help="Model directory to start from.")],
    data: Annotated[Path, typer.Option(help="CSV: path,label[,bbox_x..bbox_h].", exists=True)],
    out: Annotated[Path, typer.Option(help="Output model directory (also checkpoints).")],
    images_root: Annotated[Path | None, typer.Option(help="Base of the CSV's paths.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the head.")] = 2e-3,
    backbone_lr_scale: Annotated[float, typer.Option(help="Backbone lr = lr x this.")] = 0.25,
    input_size: Annotated[int | None, typer.Option(help="Training/inference side (px).")] = None,
    embedding_dim: Annotated[int, typer.Option(help="Head size for pooled backbones.")] = 512,
    scale: Annotated[float, typer.Option(help="ArcFace scale s (Trendyol: 128).")] = 30.0,
    margin: Annotated[float, typer.Option(help="ArcFace margin m (Trendyol: 0.25).")] = 0.3,
    xbm_size: Annotated[int, typer.Option(help="Cross-batch memory size (0: off).")] = 0,
    xbm_weight: Annotated[float, typer.Option(help="Weight of the XBM term.")] = 1.0,
    freeze_epochs: Annotated[int, typer.Option(help="Epochs with a frozen backbone.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    mixed_precision: Annotated[
        bool, typer.Option("--amp/--no-amp", help="bf16/fp16 autocast where supported.")
    ] = True,
    val_gallery: Annotated[Path | None, typer.Option(help="Validation gallery.csv.")] = None,
    val_queries: Annotated[Path | None, typer.Option(help="Validation queries.csv.")] = None,
    val_images_root: Annotated[Path | None, typer.Option(help="Validation images root.")] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore an existing checkpoint in OUT.")
    ] = False,
) -> None:
    """Fine-tune a model with ArcFace (+ cross-batch memory); writes the service's layout."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from app.training.train import TrainConfig
    from app.training.train import train as run_training

    _settings()
    config = TrainConfig(
        init=init,
        data=data,
        out=out,
        images_root=images_root,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        backbone_lr_scale=backbone_lr_scale,
        input_size=input_size,
        embedding_dim=embedding_dim,
        scale=scale,
        margin=margin,
        xbm_size=xbm_size,
        xbm_weight=xbm_weight,
        freeze_epochs=freeze_epochs,
        seed=seed,
        workers=workers,
        device=device,
        mixed_precision=mixed_precision,
        val_gallery=val_gallery,
        val_queries=val_queries,
        val_images_root=val_images_root,
        resume=not restart,
    )
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[val]}"),
        TimeRemainingColumn(),
        console=err,
    )
    task = progress.add_task("train", total=None, epoch="-", loss="-", val="")

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        progress.update(
            task, completed=step, total=steps, epoch=f"{epoch + 1}/{epochs}", loss=f"{loss:.3f}"
        )

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        val = f"val mAP {record['val_map_at_1000']:.3f}" if "val_map_at_1000" in record else ""
        progress.update(task, val=val)
        progress.console.print(record)

    with progress:
        summary = run_training(config, on_step=on_step, on_epoch=on_epoch)
    print(json.dumps(summary, indent=2))


@duplicates_cli.command("scan")
def duplicates_scan(
    floor: Annotated[
        float | None, typer.Option(help="Lowest score stored (default VS_DUPLICATES__FLOOR).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Images per kNN batch.")] = 512,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore an interrupted scan's progress.")
    ] = False,
) -> None:
    """Recompute every duplicate pair with batched kNN over the catalogue (resumable)."""
    from app.services import open_storage

    settings = _settings()
    with open_storage(settings) as storage:
        progress = _bar("scan")
        with progress:
            task = progress.add_task("scan", total=None)
            report = storage.duplicates.scan(
                state_path=settings.data_dir / "duplicates-scan.json",
                floor=floor,
                batch=batch,
                resume=not restart,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    print(json.dumps(report, indent=2))


@embeddings_cli.command("export")
def embeddings_export(
    file: Annotated[Path, typer.Argument(help="Parquet file to write.")],
) -> None:
    """Write every product's embeddings (one row per image) to a Parquet file."""
    from app.catalogue.embeddings import export_embeddings
    from app.core.errors import ServiceError
    from app.services import catalogue_model, open_database

    settings = _settings()
    db = open_database(settings)
    try:
        known = catalogue_model(db)
        if known is None:
            err.print("[red]The catalogue holds no embeddings.[/red]")
            raise typer.Exit(code=1)
        model_id, dim = known
        progress = _bar("export")
        with progress:
            task = progress.add_task("export", total=None)
            try:
                rows = export_embeddings(
                    db,
                    file,
                    model_id=model_id,
                    dim=dim,
                    progress=lambda n: progress.update(task, completed=n),
                )
            except ServiceError as exc:
                err.print(f"[red]{exc.message}[/red]")
                raise typer.Exit(code=1) from None
    finally:
        db.dispose()
    print(json.dumps({"file": str(file), "rows": rows, "model_id": model_id, "dim": dim}))


@embeddings_cli.command("import")
def embeddings_import(
    file: Annotated[Path, typer.Argument(help="Parquet file of embeddings.", exists=True)],
    batch: Annotated[int, typer.Option(help="Rows per transaction.")] = 10_000,
    duplicates: Annotated[
        bool,
        typer.Option(
            "--duplicates/--no-duplicates",
            help="Refresh each product's duplicate pairs as POST /products does; "
            "--no-duplicates leaves new pairs to `vsearch duplicates scan`.",
        ),
    ] = True,
    failures: Annotated[Path, typer.Option(help="Bad rows go here (JSONL).")] = Path(
        "import-failures.jsonl"
    ),
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore an interrupted import's progress.")
    ] = False,
) -> None:
    """Import precomputed embeddings: products are created or replaced as by POST /products.

    Re-importing a file changes nothing; an interrupted import resumes where it stopped.
    """
    from app.catalogue.embeddings import check_model, import_embeddings
    from app.core.errors import ServiceError
    from app.services import open_storage

    settings = _settings()
    state_path = settings.data_dir / "embeddings-import.json"
    stat = file.stat()
    identity = {"file": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    start_row = 0
    if not restart and state_path.is_file():
        state = json.loads(state_path.read_text())
        if {k: state.get(k) for k in identity} == identity:
            start_row = int(state["rows_done"])
    with open_storage(settings) as storage:
        try:
            total = check_model(file, storage.model_id, storage.index.dim)
        except ServiceError as exc:
            err.print(f"[red]{exc.message}[/red]")
            raise typer.Exit(code=1) from None
        progress = _bar("import")

        def on_batch(rows_done: int, _report: object) -> None:
            progress.update(task, completed=rows_done)
            state_path.write_text(json.dumps({**identity, "rows_done": rows_done}))

        with progress, failures.open("w") as fh:
            task = progress.add_task("import", total=total, completed=start_row)
            report = import_embeddings(
                storage.db,
                file,
                model_id=storage.model_id,
                dim=storage.index.dim,
                index=storage.index,
                after_commit=storage.duplicates.on_commit if duplicates else None,
                batch_rows=batch,
                start_row=start_row,
                failures=fh,
                on_batch=on_batch,
            )
    state_path.unlink(missing_ok=True)
    print(json.dumps(report.as_dict(), indent=2))
    if report.failed_rows:
        err.print(f"[yellow]{report.failed_rows} bad row(s); see {failures}[/yellow]")
        raise typer.Exit(code=2)
    failures.unlink(missing_ok=True)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
