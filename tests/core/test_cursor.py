"""The paging cursor codec: round trips, and every forged token is a 422, never a 500."""

from __future__ import annotations

import base64
import json
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.cursor import InvalidCursor, decode_cursor, encode_cursor


def forge(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


class TestCodec:
    def test_round_trip_keeps_ints_and_exact_floats(self) -> None:
        token = encode_cursor("pairs", (0.1 + 0.2, 7, 2**63 - 1))
        assert decode_cursor(token, "pairs", (float, int, int)) == (0.1 + 0.2, 7, 2**63 - 1)

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "!!",
            "%%%",
            "x" * 600,
            forge(["products", 2**63]),  # past int64: would overflow the database
            forge(["products", -1]),
            forge(["products", "7"]),
            forge(["products", 1.5]),
            forge(["products", True]),
            forge(["pairs", 1]),  # another list's cursor
            forge(["products"]),
            forge(["products", 1, 2]),
            forge({"products": 1}),
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        ],
    )
    def test_forged_tokens_are_refused(self, token: str) -> None:
        with pytest.raises(InvalidCursor):
            decode_cursor(token, "products", (int,))

    @pytest.mark.parametrize("score", ["nan", "inf", "-inf", "1e999", "abc", 0.5])
    def test_float_keys_must_be_finite_numbers_as_written(self, score: object) -> None:
        with pytest.raises(InvalidCursor):
            decode_cursor(forge(["pairs", score, 1, 2]), "pairs", (float, int, int))


class TestThroughHttp:
    @pytest.mark.parametrize(
        ("path", "payload"),
        [
            ("/products", ["products", 2**70]),
            ("/products", ["products", 2**63]),
            ("/duplicates?min_score=0.9", ["pairs", "0.9", 2**64, 1]),
            ("/duplicates/groups?min_score=0.9", ["groups", 10**30]),
        ],
    )
    async def test_huge_integers_are_422_on_each_database(
        self, db_client: httpx.AsyncClient, path: str, payload: list[object]
    ) -> None:
        sep = "&" if "?" in path else "?"
        response = await db_client.get(f"{path}{sep}cursor={forge(payload)}")
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_cursor"
        assert response.headers["x-request-id"]


@given(token=st.text(max_size=600))
@settings(max_examples=300, deadline=None)
def test_any_text_decodes_or_is_refused_cleanly(token: str) -> None:
    try:
        key = decode_cursor(token, "pairs", (float, int, int))
    except InvalidCursor:
        return
    score, a_pk, b_pk = key
    assert math.isfinite(score)
    assert 0 <= int(a_pk) < 2**63
    assert 0 <= int(b_pk) < 2**63


@given(
    payload=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=10,
    )
)
@settings(max_examples=300, deadline=None)
def test_any_forged_json_decodes_or_is_refused_cleanly(payload: object) -> None:
    token = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    try:
        (pk,) = decode_cursor(token, "products", (int,))
    except InvalidCursor:
        return
    assert isinstance(pk, int)
    assert 0 <= pk < 2**63
