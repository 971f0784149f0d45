"""Dissection without ``activations.h5`` (``dissect --no-store``): the model runs once per pass.

:class:`ModelStream` offers the part of :class:`~neurosem.store.ActivationStore` that the passes
read (``n_done``, ``shape``, ``dtype``, ``iter_batches``), computed by the model on the Broden images
instead of read from disk. Maps are cast to float16 as ``record`` stores them, so the dissection is
the same as one of a recorded run (tests/dissect/test_stream.py checks it to the bit). The disk
holds nothing but the results; the price is a second forward pass over the images (cheap on a
GPU, where decoding the images is the limit).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from neurosem.errors import NeurosemError


class ModelStream:
    """The activations of ``layers`` of ``model`` on the Broden images, batch by batch.

    Args:
        model: a model spec or :class:`~neurosem.models.LoadedModel`.
        ds_root: the Broden directory (images in index.csv order).
        layers: the layers (default: the model's default layers).
        weights: see :func:`neurosem.models.load_model`.
        device: a torch device or ``"auto"``.
        workers: DataLoader processes decoding the images.
        dtype: ``"float16"`` (as ``record`` stores) or ``"float32"``.

    Example:
        >>> stream = ModelStream("resnet18", "data/broden1_224", ["layer4"])     # doctest: +SKIP
        >>> for start, batch in stream.iter_batches(["layer4"], 64):              # doctest: +SKIP
        ...     print(start, batch["layer4"].shape)                              # [B, C, H, W]
    """

    complete = True
    store_id = None

    def __init__(self, model: Any, ds_root: Any, layers: Sequence[str] | None, weights: str = "default",
                 device: str = "auto", workers: int = 2, dtype: str = "float16") -> None:
        import torch

        from neurosem._device import resolve_device
        from neurosem.models import LoadedModel, check_layers, load_model
        from neurosem.record import open_data

        if model is None:
            raise NeurosemError("--no-store runs the model on the Broden images: give MODEL")
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, weights)
        self.layers = check_layers(self.lm.model, list(layers) if layers else self.lm.default_layers)
        self.ds, self.data, self.fingerprint = open_data(str(ds_root))
        self.n_done = len(self.ds)
        self.dev = resolve_device(device)
        self.workers = int(workers)
        self.dtype = dtype
        self._torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        self.image_ids = list(getattr(self.ds, "image_ids", []))
        self.provenance = {"model": self.lm.spec, "weights": self.lm.weights, "data": self.data,
                           "data_fingerprint": self.fingerprint, "layers": self.layers, "dtype": dtype,
                           "stored": False, "transform": {"mean": list(self.lm.mean), "std": list(self.lm.std)}}
        self._shapes: dict[str, tuple[int, int, int, int]] = {}
        for _, batch in self._run(self.layers, 1, limit=1):
            for name, arr in batch.items():
                self._shapes[name] = (self.n_done, *arr.shape[1:])

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        """``(N, C, H, W)`` of a layer."""
        if layer not in self._shapes:
            raise NeurosemError(f"layer {layer!r} is not among the streamed layers ({', '.join(self.layers)})")
        return self._shapes[layer]

    def _run(self, layers: Sequence[str], batch_size: int, limit: int | None = None
             ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        import torch

        from neurosem.record import Recorder, _collate, _Indexed

        n = self.n_done if limit is None else min(limit, self.n_done)
        loader = torch.utils.data.DataLoader(_Indexed(self.ds, 0, n), batch_size=batch_size, shuffle=False,
                                             num_workers=self.workers if limit is None else 0,
                                             pin_memory=self.dev.type == "cuda", collate_fn=_collate)
        mean = torch.tensor(self.lm.mean, device=self.dev, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.lm.std, device=self.dev, dtype=torch.float32).view(1, 3, 1, 1)
        net = self.lm.model.to(self.dev)
        start = 0
        try:
            with torch.inference_mode(), Recorder(net, list(layers), stop_after_last=True, to_cpu=False,
                                                  dtype=self._torch_dtype) as rec:
                for images, _ids in loader:
                    rec.forward(images.to(self.dev, non_blocking=True).float().sub_(mean).div_(std))
                    out = {name: rec.outputs[name].cpu().numpy() for name in layers}
                    yield start, out
                    start += images.shape[0]
        finally:
            net.to("cpu")

    def iter_batches(self, layers: Sequence[str] | None = None, batch_size: int = 64
                     ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(start, {layer: [B, C, H, W] array})`` over all images (a forward pass each time)."""
        return self._run(list(layers or self.layers), batch_size)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
