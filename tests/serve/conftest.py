"""Fixtures shared by the serving tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    from prism_persona.testing import make_tokenizer

    return make_tokenizer()
