"""`vsearch bench import`: time `vsearch embeddings import` of N precomputed embeddings.

N synthetic 512-d vectors (the clustered mixture of `bench index`), one image per product
with a title, category and source URL, are written to a Parquet file as an outside
producer would; then the file is imported into each target catalogue (a temporary SQLite
file, a throwaway PostgreSQL server, or `--database-url`) through the import's own code
path, and timed: wall-clock seconds, and the importing process's CPU seconds (the wall
clock of a shared machine says more about its load than about the import). The index is
not part of the figure: it catches up from the change log afterwards (docs/benchmarks.md).

The throwaway PostgreSQL server keeps PostgreSQL's durable defaults (fsync and
synchronous commit on), unlike the test suite's, so its figures are what a real server
on the same disk would give.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.benchmarks.synthetic import EmbeddingMixture
from app.catalogue.embeddings import import_embeddings, load_pyarrow, parquet_schema
from app.core.database import Database
from app.core.files import scratch_directory
from app.core.migrations import upgrade

MODEL_ID = "synthetic@0"
Say = Callable[[str], None]


def write_synthetic(path: Path, n: int, dim: int, chunk: int = 50_000) -> None:
    """N rows of one image per product, in the import's Parquet layout."""
    pa, _, pq = load_pyarrow()
    schema = parquet_schema(dim)
    mixture = EmbeddingMixture(dim)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for c, start in enumerate(range(0, n, chunk)):
            size = min(chunk, n - start)
            vectors = mixture.chunk(c, chunk)[:size]
            ids = range(start, start + size)
            columns: dict[str, Any] = {
                "product_id": [f"sku-{i}" for i in ids],
                "image_sha256": [hashlib.sha256(b"image-%d" % i).hexdigest() for i in ids],
                "model_id": [MODEL_ID] * size,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                "source": [f"https://images.example.com/{i}.jpg" for i in ids],
                "box": [None] * size,
                "width": [640] * size,
                "height": [480] * size,
                "title": [f"product {i}" for i in ids],
                "category": [f"category-{i % 100}" for i in ids],
                "attributes": [None] * size,
            }
            writer.write_table(pa.table(columns, schema=schema))


@contextmanager
def throwaway_postgres(workdir: Path | None = None) -> Iterator[str]:
    """A PostgreSQL server of its own under `workdir` (default: the system's temporary
    directory, which the `postgres` user can reach), with durable defaults; stopped and
    removed on exit."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL server binaries not found (initdb)")
    bin_dir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="vs-bench-pg-", dir=workdir))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*args: str) -> None:
        subprocess.run(
            [*as_postgres, str(bin_dir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=120,
        )

    data = root / "data"
    run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _import_into(url: str, path: Path, dim: int, batch_rows: int, say: Say) -> dict[str, Any]:
    db = Database(url)
    try:
        upgrade(db)
        started, cpu = time.perf_counter(), time.process_time()
        report = import_embeddings(
            db,
            path,
            model_id=MODEL_ID,
            dim=dim,
            batch_rows=batch_rows,
            on_batch=lambda done, _r: say(f"{db.dialect}: {done} rows"),
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        db.dispose()
    return {
        "database": db.dialect,
        "rows": report.rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(report.rows / seconds, 1),
        "client_cpu_s": round(cpu, 2),
        "created": report.products["created"],
        "failed_rows": report.failed_rows,
    }


def run_import_benchmark(
    *,
    n: int,
    dim: int = 512,
    batch_rows: int = 10_000,
    targets: tuple[str, ...] = ("sqlite", "postgres"),
    database_url: str | None = None,
    workdir: Path | None = None,
    progress: Say | None = None,
) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with scratch_directory(workdir) as tmp:
        path = Path(tmp) / "embeddings.parquet"
        started = time.perf_counter()
        write_synthetic(path, n, dim)
        result: dict[str, Any] = {
            "n": n,
            "dim": dim,
            "batch_rows": batch_rows,
            "file_bytes": path.stat().st_size,
            "write_parquet_s": round(time.perf_counter() - started, 2),
            "imports": [],
        }
        say(f"wrote {path.stat().st_size} bytes of Parquet")
        for target in targets:
            if target == "sqlite":
                url = f"sqlite:///{tmp}/catalogue.db"
                result["imports"].append(_import_into(url, path, dim, batch_rows, say))
            elif target == "postgres":
                with throwaway_postgres(workdir) as url:
                    result["imports"].append(_import_into(url, path, dim, batch_rows, say))
        if database_url is not None:
            result["imports"].append(_import_into(database_url, path, dim, batch_rows, say))
    return result
