"""The `Content-Encoding` rule both paths call (`sidecar/codings.py`)."""

from __future__ import annotations

import pytest

from sidecar import codings


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        ([], None),
        (["identity"], None),
        ([" Identity "], None),
        ([""], None),
        (["gzip"], "gzip"),
        (["identity, br"], "br"),
        (["identity", "GZIP"], "gzip"),
        (["x-custom"], "x-custom"),
    ],
)
def test_only_identity_is_a_coding_the_sidecar_reads(
    values: list[str], refused: str | None
) -> None:
    assert codings.unreadable(values) == refused
