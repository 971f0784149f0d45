"""The Broden reader: exact round trip of the synthetic set, selection, and malformed input."""
from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neurosem.data.broden import BrodenDataset, broden_fingerprint
from neurosem.data.synthetic import write_synthetic_broden
from neurosem.errors import DataError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("broden") / "broden1_64"
    info = write_synthetic_broden(root, n_images=20, image_size=64, seg_size=32, seed=11)
    return root, info


def _expected_seg(info, i, categories, max_planes):
    planes = [p for c in categories for p in info.masks(i).get(c, [])]
    out = np.zeros((max_planes, info.seg_size, info.seg_size), np.int64)
    for k, p in enumerate(planes):
        out[k] = p
    return out


def test_round_trip_is_exact(synth):
    root, info = synth
    ds = BrodenDataset(root)
    assert len(ds) == info.n_images
    assert ds.categories == info.categories
    assert ds.pixel_categories == ["color", "object", "part", "material"]
    assert ds.image_categories == ["scene", "texture"]
    assert ds.image_size == (64, 64) and ds.seg_size == (32, 32)
    assert ds.label_names == info.label_names
    assert ds.n_labels == len(info.label_names)
    max_planes = max(sum(len(v) for v in info.masks(i).values()) for i in range(len(ds)))
    assert ds.max_planes == max_planes and ds.max_image_labels == 2
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and item["id"] == info.images[i].id
        assert item["image"].dtype == torch.float32
        np.testing.assert_array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(),
                                      info.render(i))
        assert item["seg"].dtype == torch.int64
        np.testing.assert_array_equal(item["seg"].numpy(),
                                      _expected_seg(info, i, ds.pixel_categories, max_planes))
        labels = info.image_labels(i)
        assert item["image_labels"].tolist() == labels["scene"] + labels["texture"]


def _coverage_from_masks(info):
    """Per category and label number: sum over images of the covered fraction (plain loops)."""
    cov = {c: {} for c in info.categories}
    s2 = info.seg_size ** 2
    for i in range(info.n_images):
        for cat, planes in info.masks(i).items():
            for p in planes:
                for n, cnt in zip(*np.unique(p, return_counts=True)):
                    if n:
                        cov[cat][int(n)] = cov[cat].get(int(n), 0.0) + cnt / s2
        for cat, nums in info.image_labels(i).items():
            for n in nums:
                cov[cat][n] = cov[cat].get(n, 0.0) + 1.0
    return cov


def test_primary_category_is_largest_coverage(synth):
    root, info = synth
    ds = BrodenDataset(root)
    cov = _coverage_from_masks(info)
    wheel = info.labels["wheel"]
    assert cov["object"][wheel] != pytest.approx(cov["part"][wheel])  # no tie: the check bites
    for name, n in info.labels.items():
        cats = info.label_categories[name]
        best = max(cats, key=lambda c: (round(cov[c].get(n, 0.0), 6), info.categories.index(c)))
        assert ds.categories[ds.primary_category[n]] == best, name
    assert ds.primary_category[0] == -1
    # the two-category label is listed in both categories
    k_obj, k_part = ds.categories.index("object"), ds.categories.index("part")
    assert ds.label_in_category[wheel, k_obj] and ds.label_in_category[wheel, k_part]
    assert ds.label_in_category.sum(axis=1)[wheel] == 2
    assert ds.label_coverage[wheel, k_part] == pytest.approx(cov["part"][wheel], abs=1e-6)
    # with one of its categories unselected, the other one is primary
    for keep in ("object", "part"):
        sub = BrodenDataset(root, categories=[keep, "scene"])
        assert sub.categories[sub.primary_category[wheel]] == keep
        assert sub.primary_category[info.labels["red"]] == -1
    # frequency column read as is
    assert ds.label_frequency[info.labels["stone"]] == 0
    assert ds.label_frequency[info.labels["white"]] == info.n_images


def test_primary_tie_goes_to_later_category(tmp_path, synth):
    """NetDissect-Lite takes max over (coverage, category index): equal coverage -> later one."""
    root = tmp_path / "b"
    shutil.copytree(synth[0], root)
    wheel = synth[1].labels["wheel"]
    for cat in ("object", "part"):
        path = root / f"c_{cat}.csv"
        rows = list(csv.reader(open(path)))
        for r in rows[1:]:
            if int(r[1]) == wheel:
                r[4] = "1.5"
        with open(path, "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    ds = BrodenDataset(root)
    assert ds.categories[ds.primary_category[wheel]] == "part"


def test_split_and_category_selection(synth):
    root, info = synth
    val = BrodenDataset(root, split="val")
    assert val.image_ids == [im.id for im in info.images if im.split == "val"]
    assert len(val) == 5
    item = val[1]
    assert item["index"] == 1 and item["id"] == info.images[7].id
    ds = BrodenDataset(root, categories=["texture", "part", "object"])
    assert ds.categories == ["object", "part", "texture"]  # category.csv order
    assert ds.pixel_categories == ["object", "part"] and ds.image_categories == ["texture"]
    for i in range(len(ds)):
        item = ds[i]
        np.testing.assert_array_equal(item["seg"].numpy(),
                                      _expected_seg(info, i, ["object", "part"], ds.max_planes))
        assert item["image_labels"].tolist() == info.image_labels(i)["texture"]
    assert ds.max_planes == max(len(info.masks(i)["object"]) + len(info.masks(i)["part"])
                                for i in range(len(ds)))


def test_image_size_selects_directory_and_parent_folder(synth):
    root, info = synth
    assert BrodenDataset(root.parent).root == root  # one broden1_* child
    assert BrodenDataset(root.parent, image_size=64).root == root
    with pytest.raises(DataError, match="images are 64x64, not 224x224"):
        BrodenDataset(root, image_size=224)


def test_without_labels_reads_no_png_and_custom_transform(tmp_path, synth):
    root = tmp_path / "b"
    shutil.copytree(synth[0], root)
    for p in (root / "images").rglob("img_*_*.png"):
        p.unlink()
    ds = BrodenDataset(root, with_labels=False, transform=lambda img: torch.zeros(3, *img.size))
    item = ds[0]
    assert set(item) == {"image", "index", "id"} and item["image"].shape == (3, 64, 64)
    with pytest.raises(DataError, match="label PNG missing"):
        BrodenDataset(root)[0]


def test_picklable_and_works_with_dataloader_workers(synth):
    root, info = synth
    ds = BrodenDataset(root, split="val")
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["seg"], ds[2]["seg"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    batches = list(loader)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(ds)))
    assert batches[0]["seg"].shape == (2, ds.max_planes, 32, 32)


def test_fingerprint(tmp_path, synth):
    root = tmp_path / "b"
    shutil.copytree(synth[0], root)
    ds = BrodenDataset(root)
    assert ds.fingerprint() == broden_fingerprint(synth[0])  # location does not matter
    assert BrodenDataset(root, split="val", categories=["scene"]).fingerprint() == ds.fingerprint()
    with open(root / "c_part.csv", "a") as fh:
        fh.write("\n")
    assert broden_fingerprint(root) != ds.fingerprint()


# ------------------------------------------------------------------ malformed directories

@pytest.fixture
def broken(tmp_path, tiny_broden):
    """A fresh copy of the tiny set to break."""
    root = tmp_path / "broken"
    shutil.copytree(tiny_broden, root)
    return root


def _rewrite_csv(path: Path, edit) -> None:
    rows = list(csv.reader(open(path, newline="")))
    rows = edit(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def _index_rows(root):
    return list(csv.DictReader(open(root / "index.csv", newline="")))


def _error(fn) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_csv(broken, name):
    (broken / name).unlink()
    msg = _error(lambda: BrodenDataset(broken))
    assert f"{broken / name}: file missing" in msg


def test_missing_root(tmp_path):
    assert "does not exist" in _error(lambda: BrodenDataset(tmp_path / "nowhere"))
    assert "index.csv: file missing" in _error(lambda: BrodenDataset(tmp_path))


def test_missing_and_corrupt_image_fail_when_read(broken):
    first = _index_rows(broken)[0]["image"]
    second = _index_rows(broken)[1]["image"]
    (broken / "images" / first).unlink()
    (broken / "images" / second).write_bytes(b"not a png at all")
    ds = BrodenDataset(broken)  # csv-level checks pass
    assert _error(lambda: ds[0]) == f"{broken / 'images' / first}: image missing (listed in " \
                                     f"index.csv line 2)"
    msg = _error(lambda: ds[1])
    assert msg.startswith(f"{broken / 'images' / second}: cannot decode image")
    ds[2]  # the others still read


def test_truncated_label_png(broken):
    png = _index_rows(broken)[0]["object"].split(";")[0]
    path = broken / "images" / png
    path.write_bytes(path.read_bytes()[:40])
    msg = _error(lambda: BrodenDataset(broken)[0])
    assert msg.startswith(f"{path}: cannot decode label PNG")


def test_missing_label_png(broken):
    png = _index_rows(broken)[0]["color"]
    (broken / "images" / png).unlink()
    ds = BrodenDataset(broken)
    assert _error(lambda: ds[0]).startswith(f"{broken / 'images' / png}: label PNG missing")
    assert ds[1]["seg"].shape[0] == ds.max_planes


def test_unknown_label_in_png(broken):
    png = _index_rows(broken)[0]["color"]
    path = broken / "images" / png
    arr = np.asarray(Image.open(path)).copy()
    arr[3, 4] = (44, 1, 0)  # 44 + 256 = 300, not in label.csv
    Image.fromarray(arr).save(path)
    msg = _error(lambda: BrodenDataset(broken)[0])
    assert msg == f"{path}: label 300 (R + 256*G) is not in label.csv"


def test_label_png_of_wrong_size(broken):
    png = _index_rows(broken)[0]["color"]
    path = broken / "images" / png
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    assert "label PNG is 8x8, index.csv line 2 says 16x16" in _error(lambda: BrodenDataset(broken)[0])


def test_image_of_wrong_size(broken):
    img = _index_rows(broken)[0]["image"]
    Image.new("RGB", (30, 32)).save(broken / "images" / img)
    assert "image is 32x30, index.csv line 2 says 32x32" in _error(lambda: BrodenDataset(broken)[0])


def test_unknown_label_in_index(broken):
    _rewrite_csv(broken / "index.csv", lambda rows: rows[:3] + [rows[3][:-1] + ["999"]] + rows[4:])
    msg = _error(lambda: BrodenDataset(broken))
    assert msg.startswith(f"{broken / 'index.csv'} line 4 (")
    assert "column texture: label 999 is not in label.csv" in msg


def test_images_of_different_sizes(broken):
    def edit(rows):
        rows[5][2] = rows[5][3] = "48"
        return rows
    _rewrite_csv(broken / "index.csv", edit)
    msg = _error(lambda: BrodenDataset(broken))
    assert "images of different sizes" in msg and "48x48 images" in msg and "line 6" in msg


def test_category_column_missing_from_index(broken):
    _rewrite_csv(broken / "index.csv", lambda rows: [r[:-1] for r in rows])  # drop texture
    msg = _error(lambda: BrodenDataset(broken))
    assert "index.csv: no column for category texture" in msg
    assert len(BrodenDataset(broken, categories=["object", "scene"])) == 12  # fine without it


def test_missing_fixed_column(broken):
    _rewrite_csv(broken / "index.csv", lambda rows: [r[:2] + r[3:] for r in rows])  # drop ih
    assert "column(s) ih missing" in _error(lambda: BrodenDataset(broken))


def test_unknown_label_in_category_file(broken):
    _rewrite_csv(broken / "c_scene.csv", lambda rows: rows + [["9", "777", "moon", "0", "0"]])
    assert f"{broken / 'c_scene.csv'} line" in _error(lambda: BrodenDataset(broken))
    assert "label 777 is not in label.csv" in _error(lambda: BrodenDataset(broken))


def test_bad_numbers_in_label_csv(broken):
    _rewrite_csv(broken / "label.csv", lambda rows: rows + [["x1", "odd", "", "", "", ""]])
    assert "label.csv line" in _error(lambda: BrodenDataset(broken))
    assert "should be an integer, got 'x1'" in _error(lambda: BrodenDataset(broken))


def test_unknown_category_and_split(broken):
    msg = _error(lambda: BrodenDataset(broken, categories=["object", "sky"]))
    assert "no category 'sky'" in msg and "choose from color, object" in msg
    msg = _error(lambda: BrodenDataset(broken, split="test"))
    assert "no images in split 'test'; splits: train, val" in msg


def test_error_in_a_dataloader_worker_keeps_its_one_line_message(broken):
    png = _index_rows(broken)[0]["color"]
    (broken / "images" / png).unlink()
    loader = torch.utils.data.DataLoader(BrodenDataset(broken), batch_size=4, num_workers=1)
    messages, n_ok = [], 0
    batches = iter(loader)
    while True:  # drain the loader: torch shuts a worker down slowly after an error otherwise
        try:
            next(batches)
            n_ok += 1
        except DataError as err:
            messages.append(str(err))
        except StopIteration:
            break
    assert n_ok == 2 and len(messages) == 1
    msg = messages[0]
    assert msg == f"{broken / 'images' / png}: label PNG missing (listed in index.csv " \
                           f"line 2)"


def test_csv_files_with_a_byte_order_mark_are_read(synthetic_broden, tmp_path):
    import shutil

    from neurosem.data.broden import BrodenDataset

    root = tmp_path / "bom"
    shutil.copytree(synthetic_broden, root)
    for name in ("index.csv", "label.csv", "category.csv"):
        text = (root / name).read_text(encoding="utf-8")
        (root / name).write_text("\ufeff" + text, encoding="utf-8")
    ds, ref = BrodenDataset(root), BrodenDataset(synthetic_broden)
    assert len(ds) == len(ref) and ds.label_names == ref.label_names and ds.categories == ref.categories


# ------------------------------------------------------------------ files outside the directory

def _set_index_cell(root: Path, row: int, column: str, value: str) -> None:
    def edit(rows):
        rows[row][rows[0].index(column)] = value
        return rows
    _rewrite_csv(root / "index.csv", edit)


@pytest.mark.parametrize("column", ["image", "object", "part"])
def test_entries_climbing_out_of_the_directory_are_refused(broken, tmp_path, column):
    secret = tmp_path / "private.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(secret)
    for value in ("../../private.png", str(secret), "synthetic/../../../private.png"):
        _set_index_cell(broken, 3, column, value)
        msg = _error(lambda: BrodenDataset(broken))
        image = _index_rows(broken)[2]["image"]
        assert msg == (f"{broken / 'index.csv'} line 4 ({image}), column {column}: {value!r} points "
                       f"outside the Broden directory {broken}; entries are paths relative to its images/")


def test_symlink_out_of_the_directory_is_refused_when_read(broken, tmp_path):
    secret = tmp_path / "private.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(secret)
    rows = _index_rows(broken)
    image, png = rows[0]["image"], rows[1]["color"]
    for rel in (image, png):
        (broken / "images" / rel).unlink()
        (broken / "images" / rel).symlink_to(secret)
    ds = BrodenDataset(broken)  # csv-level checks pass: the entries themselves are relative
    assert _error(lambda: ds[0]) == (
        f"{broken / 'images' / image}: image resolves to {secret}, outside the Broden directory {broken} "
        f"(listed in index.csv line 2); keep the files inside it (no symlinks out)")
    assert _error(lambda: ds.load_seg(1)).startswith(
        f"{broken / 'images' / png}: label PNG resolves to {secret}, outside the Broden directory")
    ds[2]  # the others still read


def test_symlinks_inside_the_directory_and_a_linked_images_folder_are_read(broken, tmp_path):
    reference = BrodenDataset(broken)
    want = [reference[i] for i in range(3)]
    rows = _index_rows(broken)
    # a label PNG that links to another file inside images/
    (broken / "images" / "copy.png").write_bytes((broken / "images" / rows[0]["color"]).read_bytes())
    (broken / "images" / rows[0]["color"]).unlink()
    (broken / "images" / rows[0]["color"]).symlink_to(broken / "images" / "copy.png")
    # images/ itself kept elsewhere (a shared disk) and linked in
    shutil.move(str(broken / "images"), str(tmp_path / "shared_images"))
    (broken / "images").symlink_to(tmp_path / "shared_images")
    ds = BrodenDataset(broken)
    for i in range(3):
        assert torch.equal(ds[i]["image"], want[i]["image"]) and torch.equal(ds[i]["seg"], want[i]["seg"])


# ------------------------------------------------------------------ label numbers

def test_label_number_far_above_the_row_count_is_refused(broken):
    from neurosem.data.broden import LABEL_NUMBER_SLACK

    assert len(list(csv.DictReader(open(broken / "label.csv")))) == 34 and LABEL_NUMBER_SLACK == 4096
    _rewrite_csv(broken / "label.csv", lambda rows: rows + [["300000000", "huge", "", "", "", ""]])
    msg = _error(lambda: BrodenDataset(broken))  # refused before any table of that size is made
    assert msg == (f"{broken / 'label.csv'} line 36: label number 300000000 is far above the 35 labels "
                   f"listed (at most 4131 is accepted: tables are sized by the largest number); number "
                   f"the labels from 1 without large gaps")
    _rewrite_csv(broken / "label.csv", lambda rows: rows[:-1] + [["4132", "huge", "", "", "", ""]])
    assert "label number 4132 is far above the 35 labels" in _error(lambda: BrodenDataset(broken))
    _rewrite_csv(broken / "label.csv", lambda rows: rows[:-1] + [["4131", "gap", "", "", "", ""]])
    ds = BrodenDataset(broken)  # the largest number accepted: a gap, same items as before
    assert ds.n_labels == 4132 and ds.label_names[4131] == "gap" and ds.primary_category[4131] == -1
    assert ds.label_names[34] and not ds.label_names[35]
