"""One planted run for every concept test: dissected, embedded, and its concept vectors trained once."""
from __future__ import annotations

import dataclasses

import pytest

QUANTILE = 0.5          # the planted units are 0/1 maps: thresholds fall on the zeros
CONCEPTS = ["red", "street", "tree"]
SPEC = "tests/concepts/_planted.py:half_model"


def planted_model():
    """The planted model loaded by its spec (so explain can load it again from the run), fed [0, 1] images."""
    from neurosem.models import load_model

    return dataclasses.replace(load_model(SPEC, "default"), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                               input_size=(3, 64, 64))


@pytest.fixture(scope="package")
def planted_run(tmp_path_factory, synthetic_broden):
    """A run of the planted model on the synthetic set: activations, dissection (q = 0.5), embedding."""
    from neurosem.dissect import dissect
    from neurosem.embed import embed

    run = tmp_path_factory.mktemp("concepts") / "run"
    dissect(run=run, broden=synthetic_broden, model=planted_model(), layers=["fine"], quantile=QUANTILE,
            device="cpu", batch_size=16, progress=False, report=False)
    embed(run=run, layers=["fine"], dim=4, device="cpu", progress=False)
    return run


@pytest.fixture(scope="package")
def binary(planted_run, synthetic_broden):
    """The concept vectors of :data:`CONCEPTS` (binary input, 20 epochs), with the figures."""
    from neurosem.concepts import train_concepts

    return train_concepts(planted_run, broden=synthetic_broden, concepts=CONCEPTS, epochs=20, batch_size=16,
                          device="cpu", progress=False, figures=True)
