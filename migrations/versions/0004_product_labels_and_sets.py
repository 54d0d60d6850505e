"""Product labels (key -> values, one row per value, indexed by (key, value, product)) and
product set memberships.

Revision ID: 0004_product_labels_and_sets
Revises: 0003_duplicate_calibration
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_product_labels_and_sets"
down_revision: str | None = "0003_duplicate_calibration"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "product_labels",
        sa.Column(
            "product_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
            name=op.f("fk_product_labels_product_id_products"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("product_id", "key", "value", name=op.f("pk_product_labels")),
    )
    with op.batch_alter_table("product_labels", schema=None) as batch_op:
        batch_op.create_index(
            "ix_product_labels_key_value", ["key", "value", "product_id"], unique=False
        )
    op.create_table(
        "product_set_members",
        sa.Column("set_id", sa.String(length=64), nullable=False),
        sa.Column(
            "product_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
            name=op.f("fk_product_set_members_product_id_products"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("set_id", "product_id", name=op.f("pk_product_set_members")),
    )
    with op.batch_alter_table("product_set_members", schema=None) as batch_op:
        batch_op.create_index("ix_product_set_members_product_id", ["product_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("product_set_members", schema=None) as batch_op:
        batch_op.drop_index("ix_product_set_members_product_id")
    op.drop_table("product_set_members")
    with op.batch_alter_table("product_labels", schema=None) as batch_op:
        batch_op.drop_index("ix_product_labels_key_value")
    op.drop_table("product_labels")
