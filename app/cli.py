"""`vsearch`: the command-line entry point (typer). Calls the same services as the API."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app.core.config import Settings
from app.core.logging import configure_logging

cli = typer.Typer(
    help="Visual product search service: serve, manage models, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_cli = typer.Typer(help="Create and inspect model directories.", no_args_is_help=True)
bench_cli = typer.Typer(help="Benchmarks that print their figures as JSON.", no_args_is_help=True)
cli.add_typer(model_cli, name="model")
cli.add_typer(bench_cli, name="bench")

err = Console(stderr=True)
LOG = logging.getLogger("vsearch")


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_level, "text")
    return settings


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
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        timeout_graceful_shutdown=30,
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
    from app.inference.model import load_model

    _settings()
    embedder = load_model(model, device=device, precision=precision)
    print(json.dumps(embedder.describe(), indent=2))


@bench_cli.command("embed")
def bench_embed(
    model: Annotated[Path, typer.Option(help="Model directory.")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 64,
    images_dir: Annotated[
        Path | None, typer.Option(help="Take images from here instead of synthetic ones.")
    ] = None,
    callers: Annotated[int, typer.Option(help="Concurrent callers.")] = 16,
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
) -> None:
    """Reference loop vs the batching worker, with the machine's roofline; prints JSON."""
    from app.benchmarks.embed import run_embed_benchmark

    _settings()
    result = run_embed_benchmark(
        model,
        n_images=images,
        images_dir=images_dir,
        batch_sizes=tuple(int(b) for b in batch_sizes.split(",") if b),
        callers=callers,
        device=device,
        precision=precision,
        max_wait_ms=max_wait_ms,
        preprocess_threads=preprocess_threads,
        compile_model=compile_model,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    print(json.dumps(result, indent=2))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
