"""Kill the real service with SIGKILL at random moments while it ingests, restart it, and
check that nothing acknowledged was lost and the index matches the catalogue.

    python -m tests.reliability.crash_recovery --rounds 50 [--postgres] [--preload 50000]

Each round: start `vsearch serve` on 127.0.0.1, check the previous rounds' state, ingest
continuously, SIGKILL. Rounds take turns: a kill after a random delay, a kill the moment
the service logs that it starts writing an index generation (a save), and a kill shortly
after it logs that it starts rebuilding the index (a retraining swap). The index
checkpoints every second and retrains IVF-PQ whenever the catalogue grows by a few
percent; `--preload` fills the catalogue with synthetic embeddings first so that saves
and rebuilds take long enough to be hit. Where each kill landed is read back from the
service's log. Figures: rounds, products acknowledged, products lost (must be 0),
index/catalogue mismatches (must be 0), kills during ingest/saves/rebuilds; after a last
graceful stop, the saved index files hold exactly the catalogue's image ids, once each.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import func, insert, select

from app.catalogue.models import Product, ProductImage, utcnow
from app.core.database import Database
from app.index.shard import Shard
from app.index.store import generation_dir, read_manifest
from app.inference.runtime import load_model
from tests.images import encode, pattern
from tests.server import Server, start_server


def _image(seed: int) -> str:
    return base64.b64encode(encode(pattern(48, 40, seed=seed), "PNG")).decode()


async def _ingest_until_killed(url: str, start: int, acknowledged: list[str]) -> int:
    """Post batches until the server dies; returns the next unused product number."""
    n = start
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            batch = [{"id": f"p{n + i}", "images": [{"data": _image(n + i)}]} for i in range(4)]
            n += len(batch)
            try:
                response = await client.post("/products", json={"products": batch})
            except httpx.TransportError:
                return n  # the server died under us: these were never acknowledged
            if response.status_code == 200:
                for result in response.json()["results"]:
                    if result["status"] != "failed":
                        acknowledged.append(result["id"])


TRIGGERS = {"save": "writing index generation", "retrain": "rebuilding the index"}


async def _ingest_then_kill(
    server: Server,
    first: int,
    acknowledged: list[str],
    seconds: float,
    trigger: str | None = None,
    after: float = 0.0,
) -> int:
    """Ingest, then SIGKILL after `seconds`, or sooner: `after` seconds past the first log
    line (written after the start of ingest) that contains `trigger`."""
    offset = server.log.stat().st_size
    task = asyncio.create_task(_ingest_until_killed(server.url, first, acknowledged))
    deadline = time.monotonic() + seconds
    with server.log.open("rb") as fh:
        fh.seek(offset)
        pending = b""
        while time.monotonic() < deadline:
            pending += fh.read()
            if trigger is not None and trigger.encode() in pending:
                await asyncio.sleep(after)
                break
            pending = pending[pending.rfind(b"\n") + 1 :]
            await asyncio.sleep(0.001)
    server.process.send_signal(signal.SIGKILL)
    return await asyncio.wait_for(task, timeout=30)


def preload(db: Database, model_dir: Path, n: int, seed: int = 0) -> None:
    """Fill the catalogue with n products of one synthetic embedding each (the model's id
    and dimension), so the index is big enough that saves and rebuilds take a while."""
    model = load_model(str(model_dir), device="cpu", precision="fp32")
    rng = np.random.default_rng(seed)
    now = utcnow()
    for start in range(0, n, 10_000):
        size = min(10_000, n - start)
        x = rng.normal(size=(size, model.embedding_dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        with db.write() as session:
            pks = [
                session.execute(
                    insert(Product).returning(Product.pk),
                    {"external_id": f"synthetic-{start + i}", "attributes": {}},
                ).scalar_one()
                for i in range(size)
            ]
            session.execute(
                insert(ProductImage),
                [
                    {
                        "product_pk": pk,
                        "position": 0,
                        "sha256": f"synthetic-{start + i}",
                        "width": 1,
                        "height": 1,
                        "embedding": x[i].tobytes(),
                        "model_id": model.model_id,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i, pk in enumerate(pks)
                ],
            )


def _kill_during(log_tail: str) -> str:
    lines = [line for line in log_tail.splitlines() if line.startswith("{")]
    state = "ingest"
    for line in lines:
        message = json.loads(line).get("message", "")
        if message.startswith("rebuilding the index"):
            state = "retrain"
        elif message.startswith("index generation") and "live" in message and state == "retrain":
            state = "ingest"
        elif message.startswith("writing index generation") and state != "retrain":
            state = "save"
        elif message.startswith("saved index generation") and state == "save":
            state = "ingest"
    return state


def _check(server: Server, db: Database, acknowledged: list[str], sample: int) -> dict[str, Any]:
    with db.read() as session:
        images = int(session.scalar(select(func.count()).select_from(ProductImage)) or 0)
        present = set(session.scalars(select(Product.external_id)))
    lost = [pid for pid in acknowledged if pid not in present]
    ready = httpx.get(f"{server.url}/ready", timeout=10).json()
    mismatch = ready["index"]["ntotal"] != images
    unfound = []
    for pid in random.sample(acknowledged, min(sample, len(acknowledged))):
        seed = int(pid[1:])
        got = httpx.post(
            f"{server.url}/search", json={"image": _image(seed), "k": 1}, timeout=30
        ).json()["results"]
        if not got or got[0]["id"] != pid:
            unfound.append(pid)
    return {"lost": lost, "index_mismatch": mismatch, "unfound": unfound, "images": images}


def _saved_index_vs_catalogue(index_root: Path, db: Database) -> dict[str, Any]:
    """Compare the ids in the index files the stopped service left with the catalogue's."""
    manifest = read_manifest(index_root)
    if manifest is None:
        return {"index_files": False}
    directory = generation_dir(index_root, manifest.generation)
    ids: list[int] = []
    for name in manifest.shards:
        ids.extend(Shard.read(directory / name, manifest.kind).ids().tolist())
    with db.read() as session:
        catalogue = set(session.scalars(select(ProductImage.id)))
    return {
        "index_files": True,
        "generation": manifest.generation,
        "kind": manifest.kind,
        "index_ids": len(ids),
        "duplicate_ids": len(ids) - len(set(ids)),
        "missing_from_index": len(catalogue - set(ids)),
        "not_in_catalogue": len(set(ids) - catalogue),
    }


def run(
    rounds: int,
    work: Path,
    model_dir: Path,
    database_url: str,
    *,
    sample: int = 20,
    seed: int = 0,
    growth: float = 1.5,
    pq_m: int = 16,
) -> dict[str, Any]:
    random.seed(seed)
    env = {
        "VS_MODEL": str(model_dir),
        "VS_DATA_DIR": str(work / "data"),
        "VS_DATABASE_URL": database_url,
        "VS_PRECISION": "fp32",
        "VS_LOG_LEVEL": "DEBUG",
        "VS_INDEX__SAVE_INTERVAL_S": "1",
        "VS_INDEX__CATCHUP_INTERVAL_S": "0.2",
        "VS_INDEX__TRAIN_THRESHOLD": "150",
        "VS_INDEX__RETRAIN_GROWTH": str(growth),
        "VS_INDEX__NLIST": "8",
        "VS_INDEX__PQ_M": str(pq_m),
        "VS_INDEX__SHARDS": "2",
    }
    db = Database(database_url)
    acknowledged: list[str] = []
    kills: dict[str, int] = {"ingest": 0, "save": 0, "retrain": 0}
    problems: list[dict[str, Any]] = []
    next_id = 0
    started = time.perf_counter()
    for number in range(rounds):
        log = work / f"round-{number:03d}.log"
        server = start_server(env, log, timeout=180)
        report = _check(server, db, acknowledged, sample)
        if report["lost"] or report["index_mismatch"] or report["unfound"]:
            problems.append({"round": number, **report})
        aim = ("random", "save", "retrain")[number % 3]
        if aim == "random":
            kill = asyncio.run(
                _ingest_then_kill(server, next_id, acknowledged, random.uniform(0.3, 4.0))
            )
        else:
            kill = asyncio.run(
                _ingest_then_kill(
                    server,
                    next_id,
                    acknowledged,
                    15.0,
                    trigger=TRIGGERS[aim],
                    after=0.0 if aim == "save" else random.uniform(0.0, 0.3),
                )
            )
        next_id = kill
        server.process.wait(30)
        landed = _kill_during(log.read_text(errors="replace")[-20000:])
        kills[landed] += 1
        print(
            f"round {number + 1}/{rounds}: {len(acknowledged)} acknowledged, aimed at "
            f"{aim}, landed during {landed}",
            file=sys.stderr,
        )
    final = start_server(env, work / "final.log", timeout=180)
    report = _check(final, db, acknowledged, len(acknowledged))
    final.stop()  # graceful: the index files are saved
    saved = _saved_index_vs_catalogue(work / "data" / "index", db)
    if report["lost"] or report["index_mismatch"] or report["unfound"]:
        problems.append({"round": "final", **report})
    if not saved["index_files"] or any(
        saved[k] for k in ("duplicate_ids", "missing_from_index", "not_in_catalogue")
    ):
        problems.append({"round": "final", "saved_index": saved})
    db.dispose()
    return {
        "rounds": rounds,
        "products_acknowledged": len(acknowledged),
        "products_lost": len(report["lost"]),
        "images_in_catalogue": report["images"],
        "index_matches_catalogue": not report["index_mismatch"],
        "acknowledged_not_found_by_search": len(report["unfound"]),
        "saved_index_after_graceful_stop": saved,
        "kills_during": kills,
        "problems": problems,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preload", type=int, default=0, help="synthetic products in the catalogue first"
    )
    args = parser.parse_args()
    import tempfile

    from app.core.migrations import upgrade
    from app.inference.builders import init_random
    from tests.postgres import PostgresServer, find_bin_dir

    work = args.work or Path(tempfile.mkdtemp(prefix="vs-crash-"))
    model = init_random(work / "model", backbone="convnext_atto", input_size=64)
    pg = None
    if args.postgres:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            sys.exit("PostgreSQL server binaries not found")
        pg = PostgresServer.start(bin_dir)
        url = pg.url()
    else:
        url = f"sqlite:///{work / 'catalogue.db'}"
    upgrade(Database(url))
    if args.preload:
        db = Database(url)
        preload(db, model, args.preload, args.seed)
        db.dispose()
    try:
        # With a preloaded catalogue, retrain after 2% growth so rebuilds keep happening,
        # and use the service's 64-byte PQ codes (16 bytes cost ranking precision).
        growth, pq_m = (1.02, 64) if args.preload else (1.5, 16)
        result = run(args.rounds, work, model, url, seed=args.seed, growth=growth, pq_m=pq_m)
    finally:
        if pg is not None:
            pg.stop()
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["products_lost"] == 0 and not result["problems"] else 1)


if __name__ == "__main__":
    main()
