"""Filter query parameters shared by the list routes (products, duplicates), and the
label map of a product as the API shows it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from app.catalogue.models import Product

LabelQuery = Annotated[
    list[str] | None,
    Query(
        description="`key:value`, repeatable: AND across keys, OR within a key "
        "(`label=color:red&label=color:blue&label=brand:Acme`). `category:<name>` filters "
        "on the category.",
        examples=["color:red"],
    ),
]

ExcludeLabelQuery = Annotated[
    list[str] | None,
    Query(
        description="`key:value`, repeatable: products having any of these are left out.",
        examples=["color:green"],
    ),
]


def label_map(product: Product) -> dict[str, list[str]]:
    """key -> sorted values of a product whose labels were loaded with it."""
    out: dict[str, list[str]] = {}
    for label in product.labels:
        out.setdefault(label.key, []).append(label.value)
    return out
