"""Product labels and the filter expression over them.

Labels are the filterable part of a product: a key maps to one or more string values
(`color` -> `red`, `blue`). A filter is an AND across keys of ORs within a key (Google
Vision Product Search's semantics), plus keys that must not match:

    must:     {"color": ["red", "blue"], "brand": ["Acme"]}
    must_not: {"color": ["green"]}

reads `(color = red OR color = blue) AND brand = Acme AND NOT color = green`. The product's
`category` is one key among the others (`"category": ["dairy"]`), and so are the product
sets it belongs to (`"set": ["feed"]`), so labels may not use those names. The SQL of a
filter lives in the repository; this module owns its meaning, its validation and the
string form used in query strings (`color:red`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from app.core.errors import InvalidRequest

CATEGORY_KEY = "category"
"""The filter key that names the product's category (not a label)."""

SET_KEY = "set"
"""The filter key that names the product sets a product belongs to (not a label)."""

RESERVED_KEYS = frozenset({CATEGORY_KEY, SET_KEY})
MAX_SETS = 64  # per product

LABEL_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
MAX_VALUE_LENGTH = 256
MAX_VALUES_PER_KEY = 64
MAX_LABEL_VALUES = 256  # per product, all keys together
MAX_FILTER_TERMS = 256  # key/value terms in one filter


def check_label_key(key: str, *, allow_category: bool) -> None:
    """ValueError unless `key` is a usable label key (letters, digits, `_ . -`, at most
    64 characters; `category` only in filters)."""
    if not _LABEL_KEY.match(key):
        raise ValueError(
            f"label key {key!r} must be 1-64 letters, digits, '_', '.' or '-' "
            "(not starting with '.' or '-')"
        )
    if key in RESERVED_KEYS and not allow_category:
        raise ValueError(f"`{key}` is a product field that filters use, not a label")


def normalise_labels(labels: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Labels as stored: values de-duplicated and sorted per key, keys sorted, keys
    without values dropped. ValueError when a key or value is unusable or there are too
    many."""
    out: dict[str, list[str]] = {}
    total = 0
    for key in sorted(labels):
        check_label_key(key, allow_category=False)
        values = sorted(set(labels[key]))
        if len(values) > MAX_VALUES_PER_KEY:
            raise ValueError(f"label {key!r} has more than {MAX_VALUES_PER_KEY} values")
        for value in values:
            if not value or len(value) > MAX_VALUE_LENGTH:
                raise ValueError(f"label values must be 1-{MAX_VALUE_LENGTH} characters")
        total += len(values)
        if values:
            out[key] = values
    if total > MAX_LABEL_VALUES:
        raise ValueError(f"a product has at most {MAX_LABEL_VALUES} label values ({total})")
    return out


@dataclass(frozen=True)
class LabelFilter:
    """`must`: every key must have one of its values; `must_not`: no key may have any of
    its values. An empty filter matches every product."""

    must: Mapping[str, frozenset[str]] = field(default_factory=dict)
    must_not: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        must: Mapping[str, Iterable[str]] | None = None,
        must_not: Mapping[str, Iterable[str]] | None = None,
        *,
        category: str | None = None,
    ) -> LabelFilter:
        """A filter from its two parts; `category` is a shorthand for
        `must.category = [category]` (it narrows further when both are given)."""
        positive = {k: frozenset(v) for k, v in (must or {}).items()}
        if category is not None:
            already = positive.get(CATEGORY_KEY)
            positive[CATEGORY_KEY] = (
                frozenset({category}) if already is None else already & {category}
            )
        negative = {k: frozenset(v) for k, v in (must_not or {}).items()}
        for part in (positive, negative):
            for key, values in part.items():
                try:
                    check_label_key(key, allow_category=True)
                except ValueError as exc:
                    raise InvalidRequest(f"Filter: {exc}.") from None
                if not values and part is negative:
                    raise InvalidRequest(f"Filter: `must_not.{key}` needs at least one value.")
        terms = sum(len(v) for v in positive.values()) + sum(len(v) for v in negative.values())
        if terms > MAX_FILTER_TERMS:
            raise InvalidRequest(f"Filter: at most {MAX_FILTER_TERMS} values in all ({terms}).")
        return cls(positive, negative)

    @classmethod
    def parse_terms(
        cls,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        *,
        category: str | None = None,
    ) -> LabelFilter:
        """The query-string form: repeated `label=key:value` (AND across keys, OR within
        a key) and `exclude_label=key:value`."""
        return cls.build(
            _terms(include or [], "label"),
            _terms(exclude or [], "exclude_label"),
            category=category,
        )

    @property
    def empty(self) -> bool:
        return not self.must and not self.must_not

    @property
    def impossible(self) -> bool:
        """A must key with no values left (e.g. `category` given twice, differently)."""
        return any(not values for values in self.must.values())

    def matches(self, category: str | None, labels: Mapping[str, Iterable[str]]) -> bool:
        """Whether a product with this category and these labels passes."""

        def values_of(key: str) -> set[str]:
            if key == CATEGORY_KEY:
                return {category} if category is not None else set()
            return set(labels.get(key, ()))  # sets, when asked for, come as the `set` key

        return all(values_of(k) & v for k, v in self.must.items()) and not any(
            values_of(k) & v for k, v in self.must_not.items()
        )


def _terms(terms: Sequence[str], parameter: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for term in terms:
        key, sep, value = term.partition(":")
        if not sep or not value:
            raise InvalidRequest(f"`{parameter}` takes `key:value` terms (got {term!r}).")
        out.setdefault(key, set()).add(value)
    return out


def normalise_sets(sets: Iterable[str]) -> list[str]:
    """Set ids as stored: unique and sorted. ValueError when one is unusable."""
    out = sorted(set(sets))
    for set_id in out:
        if not _LABEL_KEY.match(set_id):
            raise ValueError(
                f"set id {set_id!r} must be 1-64 letters, digits, '_', '.' or '-' "
                "(not starting with '.' or '-')"
            )
    if len(out) > MAX_SETS:
        raise ValueError(f"a product is in at most {MAX_SETS} sets")
    return out
