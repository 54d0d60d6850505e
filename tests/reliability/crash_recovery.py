"""Kill the real service with SIGKILL at random moments while it ingests, restart it, and
check that nothing acknowledged was lost and the index matches the catalogue.

    python -m tests.reliability.crash_recovery --rounds 50 [--postgres] [--json]

Each round: start `vsearch serve` on 127.0.0.1, check the previous rounds' state, ingest
continuously, SIGKILL after a random delay. The index is configured to checkpoint every
second and to retrain IVF-PQ whenever the catalogue grows by half, so kills land during
index saves and retraining swaps too. Figures: rounds, products acknowledged, products
lost (must be 0), index/catalogue mismatches (must be 0), kills during saves/retrains.
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
from sqlalchemy import func, select

from app.catalogue.models import Product, ProductImage
from app.core.database import Database
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


async def _ingest_then_kill(
    server: Server, first: int, acknowledged: list[str], seconds: float
) -> int:
    task = asyncio.create_task(_ingest_until_killed(server.url, first, acknowledged))
    await asyncio.sleep(seconds)
    server.process.send_signal(signal.SIGKILL)
    return await asyncio.wait_for(task, timeout=30)


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


def run(
    rounds: int, work: Path, model_dir: Path, database_url: str, *, sample: int = 20, seed: int = 0
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
        "VS_INDEX__RETRAIN_GROWTH": "1.5",
        "VS_INDEX__NLIST": "8",
        "VS_INDEX__PQ_M": "16",
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
        delay = random.uniform(0.3, 4.0)
        next_id = asyncio.run(_ingest_then_kill(server, next_id, acknowledged, delay))
        server.process.wait(30)
        kills[_kill_during(log.read_text(errors="replace")[-20000:])] += 1
        print(
            f"round {number + 1}/{rounds}: {len(acknowledged)} acknowledged, kill after "
            f"{delay:.1f}s",
            file=sys.stderr,
        )
    final = start_server(env, work / "final.log", timeout=180)
    report = _check(final, db, acknowledged, len(acknowledged))
    final.stop()
    if report["lost"] or report["index_mismatch"] or report["unfound"]:
        problems.append({"round": "final", **report})
    db.dispose()
    return {
        "rounds": rounds,
        "products_acknowledged": len(acknowledged),
        "products_lost": len(report["lost"]),
        "images_in_catalogue": report["images"],
        "index_matches_catalogue": not report["index_mismatch"],
        "acknowledged_not_found_by_search": len(report["unfound"]),
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
    try:
        result = run(args.rounds, work, model, url, seed=args.seed)
    finally:
        if pg is not None:
            pg.stop()
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["products_lost"] == 0 and not result["problems"] else 1)


if __name__ == "__main__":
    main()
