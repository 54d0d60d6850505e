"""Duplicate scan staging: the pairs a full scan finds, appended without keys or indexes
and merged into duplicate_pairs when the scan ends.

Revision ID: 0006_duplicate_scan_pairs
Revises: 0005_import_jobs
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_duplicate_scan_pairs"
down_revision: str | None = "0005_import_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "duplicate_scan_pairs",
        sa.Column("a_product_id", sa.BigInteger(), nullable=False),
        sa.Column("b_product_id", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("a_image_id", sa.BigInteger(), nullable=False),
        sa.Column("b_image_id", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("duplicate_scan_pairs")
