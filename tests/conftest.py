"""Shared fixtures: synthetic Broden sets written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NEUROSEM_NO_PROGRESS", "1")


@pytest.fixture(scope="session", autouse=True)
def _label_cache_dir(tmp_path_factory):
    """The label cache of every test run in a fresh folder (never the user's ~/.cache)."""
    old = os.environ.get("NEUROSEM_CACHE_DIR")
    os.environ["NEUROSEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("neurosem-cache"))
    yield
    if old is None:
        os.environ.pop("NEUROSEM_CACHE_DIR", None)
    else:
        os.environ["NEUROSEM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synthetic_broden(tmp_path_factory) -> Path:
    """A small synthetic Broden-format set (48 images, 64x64 images, 32x32 label maps)."""
    from neurosem.data.synthetic import write_synthetic_broden

    root = tmp_path_factory.mktemp("broden") / "synthetic"
    write_synthetic_broden(root, n_images=48, image_size=64, seg_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_broden(tmp_path_factory) -> Path:
    """An even smaller set (12 images, 32x32 images, 16x16 label maps)."""
    from neurosem.data.synthetic import write_synthetic_broden

    root = tmp_path_factory.mktemp("broden") / "tiny"
    write_synthetic_broden(root, n_images=12, image_size=32, seg_size=16, seed=1)
    return root
