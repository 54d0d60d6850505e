"""Path convertors shared by the product routes."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class ProductIdConvertor(Convertor[str]):
    """A product id in a path (slashes allowed, as `{product_id:path}`) that does not end
    in the image sub-paths of app.api.routes.product_edits: `PATCH /products/x/images` and
    `DELETE /products/x/images/upload` are 405s, not edits of a product named so."""

    regex = r"(?:(?!/images(?:/upload|/[0-9]+)?$).)+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("product_id", ProductIdConvertor())


class ImageIdConvertor(Convertor[str]):
    """An image id in a path: an integer (validated as one by the route), never a word, so
    `DELETE /products/x/images/upload` is a 405 rather than a delete of image "upload"."""

    regex = r"-?[0-9]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("image_id", ImageIdConvertor())
