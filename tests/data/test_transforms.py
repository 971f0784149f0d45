"""Plain-torch transforms."""
from __future__ import annotations

import pickle

import numpy as np
import torch
from PIL import Image

from neurosem.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Compose,
                                      Normalize, Resize, pil_to_tensor)


def test_pil_to_tensor_values_and_modes():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    t = pil_to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    grey = pil_to_tensor(Image.new("L", (2, 2), 51))
    assert torch.allclose(grey, torch.full((3, 2, 2), 0.2))


def test_normalize_single_and_batch():
    n = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(3, 4, 4)
    expected = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(n(x), expected)
    assert torch.allclose(n(x[None].repeat(2, 1, 1, 1))[1], expected)
    assert repr(n) == f"Normalize(mean={list(IMAGENET_MEAN)}, std={list(IMAGENET_STD)})"


def test_resize_crop_compose_are_deterministic_and_picklable():
    t = Compose([Resize(8), CenterCrop(6), pil_to_tensor, Normalize()])
    img = Image.new("RGB", (16, 12), (255, 255, 255))
    out = t(img)
    assert out.shape == (3, 6, 6)
    assert Resize(8)(img).size == (11, 8) and Resize((4, 5))(img).size == (5, 4)
    assert repr(t) == ("Compose([Resize(8), CenterCrop([6, 6]), pil_to_tensor, "
                       "Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])")
    again = pickle.loads(pickle.dumps(t))
    assert repr(again) == repr(t) and torch.equal(again(img), out)
