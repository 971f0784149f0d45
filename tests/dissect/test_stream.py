"""dissect --no-store: the model streamed twice gives the recorded run's dissection, and writes no store."""
from __future__ import annotations

import numpy as np

from neurosem.dissect import dissect

from .test_dissect import QUANTILE, planted, planted_model  # noqa: F401  (planted: a fixture)


def test_no_store_equals_the_recorded_dissection(planted, synthetic_broden, tmp_path):
    run, recorded = planted
    streamed = dissect(run=tmp_path / "stream", broden=synthetic_broden, model=planted_model(), quantile=QUANTILE,
                       device="cpu", batch_size=16, progress=False, no_store=True, report=False)
    assert not (tmp_path / "stream" / "activations.h5").exists()
    assert streamed.layers == recorded.layers
    np.testing.assert_array_equal(streamed.label_numbers, recorded.label_numbers)
    for layer in recorded.layers:
        np.testing.assert_array_equal(streamed.threshold(layer, exact=True), recorded.threshold(layer, exact=True))
        np.testing.assert_array_equal(streamed.iou(layer), recorded.iou(layer))
        np.testing.assert_array_equal(streamed.top_images(layer)[0], recorded.top_images(layer)[0])
    assert streamed.args["no_store"] is True
