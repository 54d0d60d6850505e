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

from app.catalogue.duplicates import SCAN_NPROBE, SCAN_REFINE
from app.core.config import Settings
from app.core.errors import ModelLoadError, ServiceError
from app.core.files import scratch_directory
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
    variant: Annotated[
        str,
        typer.Option(
            help="EfficientNet-Lite variant: lite0, lite1 or lite2 (0.77, 1.00 and 1.15 "
            "GFLOPs per image at 224 px; ImageNet top-1 75.1%, 76.7% and 77.6% as "
            "published, at their native 224, 240 and 260 px)."
        ),
    ] = "lite0",
) -> None:
    """Write an ImageNet EfficientNet-Lite model (needs the `pretrained` extra)."""
    from app.inference.builders import init_pretrained

    _settings()
    path = init_pretrained(out_dir, input_size=input_size, variant=variant)
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
    openvino: Annotated[
        bool,
        typer.Option(
            "--openvino/--no-openvino",
            help="Also measure the forward pass on OpenVINO (CPU, where it is installed).",
        ),
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
        openvino=openvino,
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
    file: Annotated[
        Path, typer.Argument(help="CSV, JSONL or Parquet file of products.", exists=True)
    ],
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
    engine: Annotated[
        str,
        typer.Option(
            help="local: this process; ray: Ray Data (read tasks + a model actor pool), "
            "needs the `ray` extra."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray: a running cluster (e.g. auto); default: a local instance."),
    ] = None,
    ray_cpus: Annotated[int, typer.Option(help="Ray: logical CPU slots of a local instance.")] = 8,
    ray_gpus: Annotated[float, typer.Option(help="Ray: GPUs (one per model actor).")] = 0,
    ray_actors: Annotated[int, typer.Option(help="Ray: model actors.", min=1)] = 1,
    ray_actor_threads: Annotated[
        int, typer.Option(help="Ray: torch threads (and CPU slots) per CPU actor.", min=1)
    ] = 2,
    ray_batch_size: Annotated[int, typer.Option(help="Ray: images per batch.", min=1)] = 32,
    ray_window: Annotated[
        int, typer.Option(help="Ray: products per dataset (the resume step).", min=1)
    ] = 20_000,
) -> None:
    """Index products from a file through the same service as POST /products.

    Re-running the same file resumes: unchanged products are skipped without embedding.
    """
    import asyncio

    if engine == "ray":
        from app.bulk.ray_ingest import RayOptions

        options = RayOptions(
            address=ray_address,
            num_cpus=ray_cpus,
            num_gpus=ray_gpus,
            actors=ray_actors,
            actor_threads=ray_actor_threads,
            batch_size=ray_batch_size,
            window=ray_window,
        )
        ray_columns = (id_column, image_column, title_column, category_column)
        _ingest_ray(file, images_root, ray_columns, options, failures, json_output)
        return
    if engine != "local":
        raise typer.BadParameter(f"--engine must be local or ray, not {engine!r}")

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from app.catalogue.ingest import CsvColumns, read_records
    from app.catalogue.ingest import ingest as run
    from app.catalogue.service import ProductResult
    from app.services import open_services

    settings = _settings()
    columns = CsvColumns(
        id=id_column, image=image_column, title=title_column, category=category_column
    )
    total = sum(1 for _ in read_records(file, images_root=images_root, columns=columns))
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
                        read_records(file, images_root=images_root, columns=columns),
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


def _ingest_ray(
    file: Path,
    images_root: Path | None,
    columns: tuple[str, str, str, str],
    options: Any,
    failures: Path | None,
    json_output: bool,
) -> None:
    """`vsearch ingest --engine ray`: the same input, summary, failures file and exit codes."""
    try:
        import ray  # noqa: F401 - an absent extra is reported before any work
    except ImportError:
        err.print("error: --engine ray needs Ray: pip install 'vsearch[ray]'")
        raise typer.Exit(code=1) from None
    from app.bulk.ray_ingest import run_ray_ingest
    from app.catalogue.ingest import CsvColumns, read_products

    settings = _settings()
    id_, image, title, category = columns
    csv_columns = CsvColumns(id=id_, image=image, title=title, category=category)
    total = sum(1 for _ in read_products(file, images_root=images_root, columns=csv_columns))
    progress = _bar("ingest (ray)")
    fh = failures.open("w") if failures else None
    try:
        with progress:
            task = progress.add_task("ingest", total=total)
            summary = run_ray_ingest(
                settings,
                file,
                images_root=images_root,
                columns=csv_columns,
                options=options,
                failures=fh,
                state_path=settings.data_dir / "ray-ingest.json",
                on_products=lambda done, _images: progress.update(task, completed=done),
            )
    finally:
        if fh is not None:
            fh.close()
    result = summary.as_dict()
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


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{option}: {text!r} is not a list like 16,32") from None


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
        typer.Option(
            help="IVF-PQ factory strings to test (default: a measured set); FACTORY@S "
            "gives that index S shards instead of --shards."
        ),
    ] = None,
    nprobe: Annotated[str, typer.Option(help="nprobe values for --factory.")] = "16,32,64",
    refine: Annotated[str, typer.Option(help="refine factors for --factory.")] = "4,8",
    workdir: Annotated[Path | None, typer.Option(help="Where index files go.")] = None,
    train_n: Annotated[
        int | None, typer.Option(help="Training sample size (default: 40 per list).")
    ] = None,
    shipped: Annotated[
        float | None,
        typer.Option(
            help="Only the service's own index at its shipped defaults, tuned to this "
            "recall@10 as at every rebuild, measured on queries the tuner never saw.",
        ),
    ] = None,
    vectors: Annotated[
        Path | None,
        typer.Option(
            help="Real embeddings (.npy, n x d float32, e.g. from `vsearch bench "
            "augmented-embeddings`) instead of synthetic clusters; the last --queries rows "
            "are the queries, --n and --dim come from the file.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    unseen: Annotated[
        bool,
        typer.Option(
            "--unseen/--seen",
            help="With --vectors: leave every view of the query images out of the database "
            "(a query is a photo of something not yet listed), or keep them (a query is one "
            "more view of a listed image).",
        ),
    ] = False,
    hnsw_m: Annotated[str, typer.Option(help="hnswlib M values.")] = "16,32",
    hnsw_ef: Annotated[str, typer.Option(help="hnswlib ef values.")] = "128,256,512,1024",
    sq8: Annotated[
        bool | None,
        typer.Option("--sq8/--no-sq8", help="FAISS SQ8 refine-in-RAM variant (default: n <= 2M)."),
    ] = None,
    cold: Annotated[
        int,
        typer.Option(
            help="Per IVF row, also time this many batch-1 queries with the exact-vector "
            "file dropped from the page cache (0: skip)."
        ),
    ] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON rows.")] = False,
) -> None:
    """Exact vs the sharded IVF-PQ index vs hnswlib on clustered synthetic vectors (or on
    real embeddings with --vectors)."""
    from app.benchmarks.index import IvfConfig, run_index_benchmark

    _settings()
    configs = None
    if factory:
        try:
            configs = [
                IvfConfig.parse(f, _ints(nprobe, "--nprobe"), _ints(refine, "--refine"))
                for f in factory
            ]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--factory") from None
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
        shipped=shipped,
        vectors=vectors,
        unseen=unseen,
        hnsw_ms=_ints(hnsw_m, "--hnsw-m"),
        hnsw_efs=_ints(hnsw_ef, "--hnsw-ef"),
        sq8=sq8,
        cold=cold,
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
    per_query: Annotated[
        Path | None,
        typer.Option(help="Write every query's result: .jsonl (JSON lines) or .csv."),
    ] = None,
    hardest: Annotated[
        Path | None,
        typer.Option(help="Save a PNG of the hardest queries beside their top results."),
    ] = None,
    hardest_count: Annotated[int, typer.Option(help="Queries in the PNG.")] = 12,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON object.")] = False,
) -> None:
    """Retrieval quality of a model on a gallery/queries protocol (mAP@1000, top-k, delta),
    the product pairs it confuses most, and optionally every query's result and a picture
    of the hardest queries."""
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
            per_query=per_query,
            hardest_sheet=hardest,
            hardest_count=hardest_count,
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
    if result["confusions"]:
        confused = Table(title="most-confused products (top-1 errors)")
        for column in ("product", "answered as", "queries", "share of product"):
            confused.add_column(column)
        for c in result["confusions"]:
            confused.add_row(
                c["product_id"],
                c["confused_with"],
                str(c["queries"]),
                f"{c['share_of_product']:.1%}",
            )
        err.print(confused)
    err.print(f"{result['images_per_s']} images/s")
    if json_output:
        print(json.dumps(result))


@bench_cli.command("augmented-embeddings")
def bench_augmented_embeddings(
    model: Annotated[str, typer.Option(help="Model directory or hub id.")],
    images: Annotated[
        Path, typer.Option(help="Directory of product photos (searched recursively).", exists=True)
    ],
    out: Annotated[Path, typer.Option(help="Output .npy (n x d float32).")],
    n: Annotated[int, typer.Option(help="Augmented views to embed.", min=1)] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the image order and augmentations.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
) -> None:
    """Embed random crops, flips and colour-jittered views of real photos (for
    `vsearch bench index --vectors`); prints JSON."""
    from app.benchmarks.augmented import write_augmented_embeddings
    from app.inference.runtime import load_model

    _settings()
    embedder = load_model(model, device=device, precision=precision)
    progress = _bar("embed")
    started = last = time.monotonic()

    def advance(done: int, total: int) -> None:
        nonlocal last
        progress.update(task, completed=done, total=total)
        now = time.monotonic()
        if not err.is_terminal and (now - last >= 30 or done == total):
            # No live bar in a log file: a line every 30 s shows the run moving.
            last = now
            rate = done / max(now - started, 1e-9)
            err.print(f"embed {done}/{total} ({rate:.1f} images/s)")

    with progress:
        task = progress.add_task("embed", total=n)
        result = write_augmented_embeddings(
            embedder, images, n, out, seed=seed, batch_size=batch_size, progress=advance
        )
    print(json.dumps(result, indent=2))


@bench_cli.command("duplicates")
def bench_duplicates(
    n: Annotated[int, typer.Option(help="Synthetic images (one product each).")] = 100_000,
    dim: Annotated[int, typer.Option(help="Dimension.")] = 512,
    floor: Annotated[float, typer.Option(help="Pair floor.")] = 0.9,
    batch: Annotated[int, typer.Option(help="Images per kNN batch.")] = 4096,
    nprobe: Annotated[
        int, typer.Option(help="IVF lists probed per image (0: the tuned search's).")
    ] = SCAN_NPROBE,
    refine: Annotated[
        int, typer.Option(help="Candidates re-ranked per neighbour (0: the tuned search's).")
    ] = SCAN_REFINE,
    database_url: Annotated[
        str | None, typer.Option(help="Catalogue database (default: a temporary SQLite file).")
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="sqlite (a temporary file) or postgres (a throwaway server started here); "
            "ignored with --database-url."
        ),
    ] = "sqlite",
    workdir: Annotated[Path | None, typer.Option(help="Where temporary files go.")] = None,
) -> None:
    """Time a full duplicates scan over N synthetic images (prints JSON)."""
    from app.benchmarks.duplicates import run_duplicates_benchmark

    if target not in ("sqlite", "postgres"):
        err.print(f"[red]--target must be sqlite or postgres, not {target!r}.[/red]")
        raise typer.Exit(code=2)

    settings = _settings()
    result = run_duplicates_benchmark(
        n=n,
        dim=dim,
        floor=floor,
        batch=batch,
        nprobe=nprobe,
        refine=refine,
        index_settings=settings.index,
        database_url=database_url,
        target=target,
        workdir=workdir,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


@bench_cli.command("search-quality")
def bench_search_quality(
    model: Annotated[str, typer.Option(help="Model directory (or hub id).")],
    gallery: Annotated[Path, typer.Option(help="gallery.csv (Products-10K format).", exists=True)],
    queries: Annotated[Path, typer.Option(help="queries.csv (Products-10K format).", exists=True)],
    images_root: Annotated[Path, typer.Option(help="Base of img_path.", exists=True)],
    k: Annotated[int, typer.Option(help="Products per search (MRR depth).")] = 20,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="Where the catalogue goes.")] = None,
) -> None:
    """Flip TTA, query expansion and product-level scoring through the service's search
    path on a protocol (product-level top-k, MRR, search ms; prints JSON)."""
    import asyncio

    from app.benchmarks.search_quality import run_search_quality
    from app.services import open_services

    base = _settings()

    async def run(data_dir: Path) -> dict[str, Any]:
        settings = base.model_copy(
            update={
                "model": model,
                "data_dir": data_dir,
                "database_url": None,
                "precision": precision,
                # one product can hold hundreds of images: a bulk load, not a web client
                "batch": base.batch.model_copy(update={"queue_size": 4096}),
                "duplicates": base.duplicates.model_copy(update={"neighbours": 1}),
            }
        )
        async with open_services(settings, tail=False) as services:
            return await run_search_quality(
                services.catalogue,
                services.search,
                gallery,
                queries,
                images_root,
                k=k,
                say=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False),
            )

    with scratch_directory(workdir) as tmp:
        result = asyncio.run(run(Path(tmp)))
    print(json.dumps(result, indent=2))


@bench_cli.command("search-latency")
def bench_search_latency(
    n: Annotated[int, typer.Option(help="Synthetic vectors in the index.")] = 1_000_000,
    queries: Annotated[int, typer.Option(help="Queries timed one at a time.")] = 500,
    model: Annotated[
        list[str] | None, typer.Option(help="Also time flip TTA's forward pass on this model.")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where temporary files go.")] = None,
) -> None:
    """Added p50/p99 of query expansion and product scoring at N vectors, and of flip TTA
    on the model (prints JSON)."""
    from app.benchmarks.search_quality import run_flip_latency, run_search_latency

    settings = _settings()
    result: dict[str, Any] = {}
    for name in model or []:
        result.setdefault("flip", []).append(run_flip_latency(name))
    result["index"] = run_search_latency(
        n=n,
        queries=queries,
        shards=settings.index.shards,
        workdir=workdir,
        say=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    print(json.dumps(result, indent=2))


@bench_cli.command("calibration")
def bench_calibration(
    dataset: Annotated[Path, typer.Argument(help="The grocery-store dataset directory.")],
    model: Annotated[
        Path, typer.Option(help="Model directory (`vsearch model init-pretrained` writes one).")
    ],
    per_class: Annotated[int, typer.Option(help="Photos per product.")] = 15,
    floor: Annotated[float, typer.Option(help="Pair floor.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Which products go to the fitting half.")] = 0,
    plot: Annotated[
        Path | None, typer.Option(help="Where to write the reliability diagram (PNG).")
    ] = None,
) -> None:
    """Calibration of duplicate probabilities on held-out products (prints JSON)."""
    from app.benchmarks.calibration import run_calibration_benchmark
    from app.services import open_services

    settings = _settings()
    result = run_calibration_benchmark(
        open_services=open_services,
        dataset=dataset,
        model=model,
        per_class=per_class,
        floor=floor,
        seed=seed,
        plot=plot,
        base=settings,
        say=lambda msg: err.print(f"[dim]{msg}[/dim]"),
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


def _train_default(name: str) -> Any:
    """The recipe's defaults live in one place, `TrainConfig`; the options show them."""
    from app.training.train import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


@cli.command()
def train(
    init: Annotated[str, typer.Option(help="Model directory to start from.")],
    data: Annotated[Path, typer.Option(help="CSV: path,label[,bbox_x..bbox_h].", exists=True)],
    out: Annotated[Path, typer.Option(help="Output model directory (also checkpoints).")],
    images_root: Annotated[Path | None, typer.Option(help="Base of the CSV's paths.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = _train_default("epochs"),
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = _train_default(
        "batch_size"
    ),
    lr: Annotated[float, typer.Option(help="Peak learning rate of the head.")] = _train_default(
        "lr"
    ),
    backbone_lr_scale: Annotated[
        float, typer.Option(help="Backbone lr = lr x this.")
    ] = _train_default("backbone_lr_scale"),
    saturation_jitter: Annotated[
        float, typer.Option(help="Colour jitter: saturation factor range (0: off).")
    ] = _train_default("saturation_jitter"),
    hue_jitter: Annotated[
        float, typer.Option(help="Colour jitter: hue shift range, in turns (0: off).")
    ] = _train_default("hue_jitter"),
    crop_scale: Annotated[
        float,
        typer.Option(
            help="Random resized crops keep at least this fraction of the image's area "
            "(0-1; 1: no crop, only the aspect ratio varies)."
        ),
    ] = _train_default("crop_scale"),
    class_sampling: Annotated[
        float,
        typer.Option(
            help="Draw a product with n images in proportion to n^(1 - this): 0 plain "
            "shuffling, 0.5 square-root, 1 every product equally often."
        ),
    ] = _train_default("class_sampling"),
    input_size: Annotated[int | None, typer.Option(help="Training/inference side (px).")] = None,
    embedding_dim: Annotated[
        int, typer.Option(help="Head size for pooled backbones.")
    ] = _train_default("embedding_dim"),
    scale: Annotated[float, typer.Option(help="ArcFace scale s (Trendyol: 128).")] = _train_default(
        "scale"
    ),
    margin: Annotated[
        float, typer.Option(help="ArcFace margin m (Trendyol: 0.25).")
    ] = _train_default("margin"),
    subcenters: Annotated[
        int, typer.Option(help="ArcFace centres per product (sub-center ArcFace; 1: plain).")
    ] = _train_default("subcenters"),
    xbm_size: Annotated[
        int, typer.Option(help="Cross-batch memory size (0: off).")
    ] = _train_default("xbm_size"),
    xbm_weight: Annotated[float, typer.Option(help="Weight of the XBM term.")] = _train_default(
        "xbm_weight"
    ),
    freeze_epochs: Annotated[
        int, typer.Option(help="Epochs with a frozen backbone.")
    ] = _train_default("freeze_epochs"),
    ema_decay: Annotated[
        float,
        typer.Option(help="Keep an average of the weights with this decay (0: off); saved."),
    ] = _train_default("ema_decay"),
    pooling: Annotated[
        str | None,
        typer.Option(help="Pooling of a new head: avg or gem (default: the recipe's)."),
    ] = None,
    final_size: Annotated[
        int | None,
        typer.Option(
            help="Train the last --final-epochs at this side (px) and serve the model at it "
            "[default: 1.25x the input side, rounded to 32; a flatten head keeps its side]."
        ),
    ] = _train_default("final_size"),
    final_epochs: Annotated[
        int, typer.Option(help="Epochs at --final-size at the end (0: none).")
    ] = _train_default("final_epochs"),
    final_crop_scale: Annotated[
        float | None,
        typer.Option(
            help="--crop-scale for the epochs at --final-size (default: --crop-scale; "
            "1: the whole image, as it is served)."
        ),
    ] = _train_default("final_crop_scale"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = _train_default("seed"),
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = _train_default(
        "workers"
    ),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    mixed_precision: Annotated[
        bool,
        typer.Option(
            "--amp/--no-amp",
            help="bf16/fp16 autocast where supported (on a CPU only where timed faster than fp32).",
        ),
    ] = True,
    val_gallery: Annotated[Path | None, typer.Option(help="Validation gallery.csv.")] = None,
    val_queries: Annotated[Path | None, typer.Option(help="Validation queries.csv.")] = None,
    val_images_root: Annotated[Path | None, typer.Option(help="Validation images root.")] = None,
    keep: Annotated[
        str,
        typer.Option(
            help="The epoch the output holds: best (with a validation protocol the highest "
            "validation mAP@1000; without one the first epoch at --final-size, the best in "
            "every validated run of the recipe, where training then stops), last, or an "
            "epoch number (training stops after it; the schedule still spans --epochs)."
        ),
    ] = _train_default("keep"),
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore an existing checkpoint in OUT.")
    ] = False,
    log_interval: Annotated[
        float,
        typer.Option(help="Seconds between progress lines when stderr is not a terminal."),
    ] = 30.0,
) -> None:
    """Fine-tune a model with ArcFace (+ cross-batch memory); writes the service's layout.

    Prints JSON lines, each flushed at once: one per epoch on stdout (loss, seconds,
    validation mAP@1000 and top-1) and a final `done` line with the summary; on stderr a
    progress bar on a terminal, else a `start` line and a `progress` line every
    `--log-interval` seconds, so a log file shows the run moving.
    """
    import sys

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from app.training.report import TrainingLog
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
        saturation_jitter=saturation_jitter,
        hue_jitter=hue_jitter,
        crop_scale=crop_scale,
        class_sampling=class_sampling,
        input_size=input_size,
        embedding_dim=embedding_dim,
        scale=scale,
        margin=margin,
        subcenters=subcenters,
        xbm_size=xbm_size,
        xbm_weight=xbm_weight,
        freeze_epochs=freeze_epochs,
        ema_decay=ema_decay,
        pooling=pooling,
        final_size=final_size,
        final_epochs=final_epochs,
        final_crop_scale=final_crop_scale,
        seed=seed,
        workers=workers,
        device=device,
        mixed_precision=mixed_precision,
        val_gallery=val_gallery,
        val_queries=val_queries,
        val_images_root=val_images_root,
        resume=not restart,
        keep=keep,
    )
    terminal = err.is_terminal
    log = TrainingLog(sys.stdout, None if terminal else sys.stderr, interval_s=log_interval)
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[val]}"),
        TimeRemainingColumn(),
        console=err,
        disable=not terminal,
    )
    task = progress.add_task("train", total=None, epoch="-", loss="-", val="")
    last_epoch = epochs

    def on_start(info: dict[str, Any]) -> None:
        nonlocal last_epoch
        last_epoch = info.get("stop_after_epoch", epochs)  # --keep may stop before --epochs
        log.start(info)

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        progress.update(
            task, completed=step, total=steps, epoch=f"{epoch + 1}/{last_epoch}", loss=f"{loss:.3f}"
        )
        log.step(epoch, step, steps, loss)

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        val = f"val mAP {record['val_map_at_1000']:.3f}" if "val_map_at_1000" in record else ""
        progress.update(task, val=val)
        log.epoch(epoch, record)

    with progress:
        summary = run_training(config, on_start=on_start, on_step=on_step, on_epoch=on_epoch)
    log.done(summary)


@duplicates_cli.command("scan")
def duplicates_scan(
    floor: Annotated[
        float | None, typer.Option(help="Lowest score stored (default VS_DUPLICATES__FLOOR).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Images per kNN batch.")] = 4096,
    nprobe: Annotated[
        int, typer.Option(help="IVF lists probed per image (0: the tuned search's).")
    ] = SCAN_NPROBE,
    refine: Annotated[
        int, typer.Option(help="Candidates re-ranked per neighbour (0: the tuned search's).")
    ] = SCAN_REFINE,
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
                nprobe=nprobe,
                refine=refine,
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


thumbnails_cli = typer.Typer(help="Image thumbnails for the review pages.", no_args_is_help=True)
cli.add_typer(thumbnails_cli, name="thumbnails")


@thumbnails_cli.command("backfill")
def thumbnails_backfill(
    batch: Annotated[int, typer.Option(help="Images read at once.")] = 32,
) -> None:
    """Make the thumbnails of images ingested before thumbnails were made at ingest.

    Images are re-read from their URL or local path; the model is not loaded.
    """
    import asyncio

    from app.catalogue.thumbnails import backfill_thumbnails
    from app.imaging.decode import DecodeLimits, ImageDecoder
    from app.services import make_fetcher, open_database

    settings = _settings()

    async def run() -> dict[str, object]:
        db = open_database(settings)
        fetcher = make_fetcher(settings)
        decoder = ImageDecoder(DecodeLimits.from_settings(settings.image))
        try:
            progress = _bar("thumbnails")
            task = progress.add_task("thumbnails", total=None)
            with progress:
                report = await backfill_thumbnails(
                    db,
                    fetcher,
                    decoder,
                    max_bytes=settings.image.max_bytes,
                    batch=batch,
                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
        finally:
            decoder.shutdown()
            await fetcher.aclose()
            db.dispose()
        return report.as_dict()

    result = asyncio.run(run())
    print(json.dumps(result, indent=2))
    if result["unrecoverable_images"] or result["failed_images"]:
        err.print(
            "[yellow]some images have no thumbnail: uploaded bytes are not kept, so post "
            "those products again[/yellow]"
        )
        raise typer.Exit(code=2)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
