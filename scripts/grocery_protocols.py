"""Write training and validation files for the grocery-store dataset (Klasson et al., WACV
2019) in the formats `vsearch train` and `vsearch eval` read.

Only the train and val splits are used for training material:
  train.csv           train photos, plus each iconic (catalogue) image `--iconic-repeat` times
  train+val.csv       the same with the val photos
  val/gallery.csv     the iconic images         } validation during training:
  val/queries.csv     the val photos            } val photos against the catalogue images

Usage: python scripts/grocery_protocols.py DATASET_DIR OUT_DIR [--iconic-repeat 3]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path, help="grocery-store/ (with dataset/ and protocols/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--iconic-repeat", type=int, default=3)
    args = parser.parse_args()
    root = args.dataset / "dataset"
    iconic = list(csv.DictReader((args.dataset / "protocols" / "iconic" / "gallery.csv").open()))

    def split(name: str) -> list[tuple[str, str]]:
        rows = []
        for line in (root / f"{name}.txt").read_text().splitlines():
            path, label, _coarse = (x.strip() for x in line.split(","))
            rows.append((path, label))
        return rows

    args.out.mkdir(parents=True, exist_ok=True)
    iconic_rows = [(r["img_path"], r["product_id"]) for r in iconic] * args.iconic_repeat
    for name, parts in (("train", ["train"]), ("train+val", ["train", "val"])):
        rows = [row for part in parts for row in split(part)] + iconic_rows
        with (args.out / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
    val = args.out / "val"
    val.mkdir(exist_ok=True)
    with (val / "gallery.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seller_img_id", "img_path", "product_id", "group"])
        for r in iconic:
            writer.writerow([r["seller_img_id"], r["img_path"], r["product_id"], r["group"]])
    groups = {r["product_id"]: r["group"] for r in iconic}
    with (val / "queries.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_img_id", "img_path", "product_id", "group"])
        for n, (path, label) in enumerate(split("val")):
            writer.writerow([n, path, label, groups.get(label, "")])
    print(f"wrote {args.out}/train.csv, train+val.csv, val/gallery.csv, val/queries.csv")


if __name__ == "__main__":
    main()
