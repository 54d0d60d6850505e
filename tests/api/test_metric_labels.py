"""Request metrics take their labels from a closed set, whatever clients send."""

from __future__ import annotations

import secrets

import httpx


def request_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("vsearch_http_requests_total{")]


class TestClosedLabels:
    async def test_invented_methods_and_paths_add_no_series(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.get("/health")
        before = request_series((await client.get("/metrics")).text)
        for _ in range(300):
            token = "X" + secrets.token_hex(6).upper()
            response = await client.request(token, f"/products/{secrets.token_hex(4)}")
            assert response.status_code == 405
            await client.get(f"/{secrets.token_hex(6)}")
        text = (await client.get("/metrics")).text
        after = request_series(text)

        assert (
            'method="OTHER",route="/products/{product_id:product_id}",status="405"} 300.0' in text
        )
        assert 'method="GET",route="unmatched",status="404"} 300.0' in text
        assert len(after) - len(before) <= 3  # the two above and the first /metrics
        assert not any("X" in line.split('method="')[1][:2] for line in after)

    async def test_standard_methods_keep_their_names(self, client: httpx.AsyncClient) -> None:
        await client.request("PUT", "/products/a")
        await client.options("/products")
        text = (await client.get("/metrics")).text
        assert 'method="PUT",route="/products/{product_id:product_id}",status="405"' in text
        assert 'method="OPTIONS",route="/products",status="405"' in text
