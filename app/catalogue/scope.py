"""What a client confined to some product sets may see and change.

A scope is the set ids an API key is confined to (`VS_API_KEY_SCOPES`), or None for a
key that sees the whole catalogue. A product is in scope when it belongs to at least one
of the scope's sets. Reads are restricted by AND-ing the filter with `set IN scope`, in
the same filter path every list and search already takes, so results stay exact. A
product out of scope is answered as if it did not exist (404), never as forbidden, so a
scoped client cannot learn which ids other sets hold. Writes must put a product in at
least one set of the scope and in none outside it (403 otherwise); memberships of a
product in sets outside the scope are kept when a scoped client replaces its sets, and
are not shown to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import overload

from app.catalogue.filters import SET_KEY, LabelFilter
from app.core.errors import Forbidden

Scope = frozenset[str] | None
"""The product sets a caller is confined to; None: every product."""


def in_scope(sets: Iterable[str], scope: Scope) -> bool:
    """Whether a product in `sets` is visible to a caller with `scope`."""
    return scope is None or not scope.isdisjoint(sets)


@overload
def restrict(where: LabelFilter, scope: Scope) -> LabelFilter: ...
@overload
def restrict(where: None, scope: Scope) -> LabelFilter | None: ...
@overload
def restrict(where: LabelFilter | None, scope: Scope) -> LabelFilter | None: ...
def restrict(where: LabelFilter | None, scope: Scope) -> LabelFilter | None:
    """`where` AND `set IN scope`. Sets the caller asks for outside its scope match
    nothing (an empty answer, not an error)."""
    if scope is None:
        return where
    must = dict(where.must) if where is not None else {}
    asked = must.get(SET_KEY)
    must[SET_KEY] = scope if asked is None else asked & scope
    return LabelFilter(must, where.must_not if where is not None else {})


def sets_within(sets: Sequence[str] | None, scope: Scope, product_id: str) -> None:
    """403 unless a scoped caller puts the product in at least one set, all in scope."""
    if scope is None:
        return
    if not sets:
        raise Forbidden(
            f"Product {product_id!r}: this key is scoped to product sets; give `sets` "
            f"(within {sorted(scope)})."
        )
    outside = sorted(set(sets) - scope)
    if outside:
        raise Forbidden(
            f"Product {product_id!r}: sets {outside} are outside this key's scope {sorted(scope)}."
        )


def shown_sets(sets: Iterable[str], scope: Scope) -> list[str]:
    """The sets of a product as a caller with `scope` is shown them: the names of other
    sets (another shop's, say) are not the caller's to learn."""
    return [s for s in sets if scope is None or s in scope]


def merged_sets(given: Sequence[str], current: Iterable[str], scope: Scope) -> list[str]:
    """The sets a product ends in when a caller with `scope` replaces its sets with
    `given`: memberships outside the scope are not the caller's to drop."""
    if scope is None:
        return list(given)
    return sorted(set(given) | (set(current) - scope))
