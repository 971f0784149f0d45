"""The synthetic Broden generator: determinism, drawing rules, and true statistics."""
from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurosem.data.synthetic import (CATEGORIES, COLORS, MATERIAL_RGB, OBJECT_RGB,
                                     write_synthetic_broden, scene_of)
from neurosem.errors import NeurosemError


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return write_synthetic_broden(tmp_path_factory.mktemp("syn") / "s", n_images=24,
                                  image_size=64, seg_size=32, seed=3)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_seed_writes_same_bytes_other_seed_differs(tmp_path):
    a = write_synthetic_broden(tmp_path / "a", n_images=10, image_size=32, seg_size=16, seed=5)
    write_synthetic_broden(tmp_path / "b", n_images=10, image_size=32, seg_size=16, seed=5)
    write_synthetic_broden(tmp_path / "c", n_images=10, image_size=32, seg_size=16, seed=6)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert len(files) > 30
    for f in files:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    assert (tmp_path / "a" / "index.csv").read_bytes() != (tmp_path / "c" / "index.csv").read_bytes()
    assert a.images[0].id == "synthetic/img_00000.png"


def test_image_is_block_replicated_label_grid(info):
    b = info.block
    assert b == 2
    for i in range(info.n_images):
        img = np.asarray(Image.open(info.root / "images" / info.images[i].id))
        assert img.shape == (64, 64, 3)
        np.testing.assert_array_equal(img, info.render(i))
        grid = img[::b, ::b]
        np.testing.assert_array_equal(np.repeat(np.repeat(grid, b, 0), b, 1), img)
        np.testing.assert_array_equal(grid, info.draw(i).rgb)


def test_color_plane_is_exact_rgb_of_colour_labels(info):
    palette = {info.labels[n]: np.array(rgb, np.uint8) for n, rgb in info.colors.items()}
    assert info.colors == COLORS
    for i in range(info.n_images):
        rgb = info.draw(i).rgb
        (color,) = info.masks(i)["color"]
        for r in range(info.seg_size):
            for c in range(info.seg_size):
                n = int(color[r, c])
                if n:
                    assert (rgb[r, c] == palette[n]).all()
                else:  # only floor cells have no colour label
                    assert tuple(rgb[r, c]) in MATERIAL_RGB.values()


def test_objects_parts_materials_follow_the_drawing_rules(info):
    L = info.labels
    s = info.seg_size
    for i, im in enumerate(info.images):
        planes = info.masks(i)
        assert im.scene == scene_of([o.name for o in im.objects])
        assert info.image_labels(i) == {"scene": [L[im.scene]], "texture": [L[im.texture]]}
        obj = planes["object"][0] if planes["object"] else np.zeros((s, s), int)
        rgb = info.draw(i).rgb
        for o in im.objects:  # each object lies inside its box and has its class colour
            box = np.zeros((s, s), bool)
            box[o.top:o.top + o.height, o.left:o.left + o.width] = True
            here = obj == L[o.name]
            assert (here & box).any()
            if o.name not in ("house", "car"):
                assert (rgb[here & box] == COLORS[OBJECT_RGB[o.name]]).all()
        assert set(np.unique(obj)) <= {0} | {L[o.name] for o in im.objects}
        parts = planes["part"]
        has_house = any(o.name == "house" for o in im.objects)
        has_car = any(o.name == "car" for o in im.objects)
        assert len(parts) == (2 if has_house else 1 if has_car else 0)
        if parts:  # parts lie on house or car pixels; the knob (2nd plane) lies on a door
            assert np.isin(obj[parts[0] > 0], [L["house"], L["car"]]).all()
        if has_house:
            assert set(np.unique(parts[1])) == {0, L["knob"]}
            assert (parts[0][parts[1] > 0] == L["door"]).all()
        mat = planes["material"][0] if planes["material"] else np.zeros((s, s), int)
        assert (im.floor is None) == (im.scene == "forest")
        if im.floor is not None:
            assert (mat[s - s // 4:] == L[im.floor]).all()
        assert ((mat == L["metal"]) | (mat == L["glass"])).sum() == 0 or has_car
        assert not (mat == L["stone"]).any()


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_frequency_and_coverage_columns_are_true_counts(info):
    """Recount every label from the masks with plain loops; compare with the csv files."""
    s2 = info.seg_size ** 2
    freq = {c: {} for c in CATEGORIES}
    cov = {c: {} for c in CATEGORIES}
    any_freq = {}
    for i in range(info.n_images):
        seen = set()
        for cat, planes in info.masks(i).items():
            in_cat = set()
            for p in planes:
                for n in np.unique(p):
                    if n:
                        name = info.label_names[n]
                        cov[cat][name] = cov[cat].get(name, 0.0) + float((p == n).sum()) / s2
                        in_cat.add(name)
            for name in in_cat:
                freq[cat][name] = freq[cat].get(name, 0) + 1
            seen |= in_cat
        for cat, nums in info.image_labels(i).items():
            for n in nums:
                name = info.label_names[n]
                freq[cat][name] = freq[cat].get(name, 0) + 1
                cov[cat][name] = cov[cat].get(name, 0.0) + 1.0
                seen.add(name)
        for name in seen:
            any_freq[name] = any_freq.get(name, 0) + 1
    for cat in CATEGORIES:
        rows = _csv(info.root / f"c_{cat}.csv")
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:
            assert int(r["number"]) == info.labels[r["name"]]
            assert int(r["frequency"]) == freq[cat].get(r["name"], 0)
            assert float(r["coverage"]) == pytest.approx(cov[cat].get(r["name"], 0.0), abs=1e-6)
    for r in _csv(info.root / "label.csv"):
        assert int(r["frequency"]) == any_freq.get(r["name"], 0)
        total = sum(cov[c].get(r["name"], 0.0) for c in CATEGORIES)
        assert float(r["coverage"]) == pytest.approx(total, abs=1e-6)
        parsed = dict(x[:-1].split("(") for x in r["category"].split(";"))
        assert {k: int(v) for k, v in parsed.items()} == \
            {c: freq[c].get(r["name"], 0) for c in info.label_categories[r["name"]]}
    # the two-category label and the unused label
    assert info.label_categories["wheel"] == ["object", "part"]
    assert "wheel" in [r["name"] for r in _csv(info.root / "c_object.csv")]
    assert "wheel" in [r["name"] for r in _csv(info.root / "c_part.csv")]
    assert any_freq.get("stone", 0) == 0
    expected_primary = max(("object", "part"), key=lambda c: cov[c].get("wheel", 0.0))
    assert info.primary["wheel"] == expected_primary
    assert {r["name"] for r in _csv(info.root / "category.csv")} == set(CATEGORIES)


def test_all_concepts_occur_in_a_default_sized_set(synthetic_broden):
    rows = _csv(synthetic_broden / "label.csv")
    never = [r["name"] for r in rows if int(r["frequency"]) == 0]
    assert never == ["stone"]


@pytest.mark.parametrize("kw", [dict(image_size=64, seg_size=8), dict(image_size=60, seg_size=32),
                                dict(n_images=0)])
def test_bad_arguments_are_one_line_errors(tmp_path, kw):
    with pytest.raises(NeurosemError) as e:
        write_synthetic_broden(tmp_path, **kw)
    assert "\n" not in str(e.value)
