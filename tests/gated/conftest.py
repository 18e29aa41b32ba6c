"""Fixtures shared by the tests of the gated model and its artifact."""

from __future__ import annotations

import shutil

import pytest

from prism_persona.testing import make_tiny_artifact


@pytest.fixture
def artifact_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny artifact (the tests below break it)."""
    src = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    dst = tmp_path / "copy" / "prism"
    shutil.copytree(src, dst)
    return dst
