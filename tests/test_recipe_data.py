"""Dataset loaders (each on a tiny fixture in its real on-disk format), the few-shot sampler, bad inputs."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import defaultdict

import pytest
import torch
from PIL import Image

from clip_lora.data import (
    COOP_SPECS,
    PAPER_DATASETS,
    DatasetError,
    ImageDataset,
    Sample,
    canonical_name,
    imagenet_classes,
    load_dataset,
    load_few_shot,
    make_synthetic,
    official_few_shot,
    sample_few_shot,
    save_few_shot,
)


def _img(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _coop_fixture(root, key, rels_by_class, names=None):
    """Write a CoOp-format dataset: images under the spec's image dir and a split_zhou JSON."""
    spec = COOP_SPECS[key]
    image_root = os.path.join(root, spec.folder, spec.image_dir)
    split = {"train": [], "val": [], "test": []}
    for label, (cname, rels) in enumerate(rels_by_class.items()):
        for i, rel in enumerate(rels):
            _img(os.path.join(image_root, rel))
            part = ("train", "train", "val", "test")[i % 4]
            split[part].append([rel, label, names[label] if names else cname])
    with open(os.path.join(root, spec.folder, spec.split_file), "w") as f:
        json.dump(split, f)
    return image_root, split


# Relative paths shaped like each dataset's real split file.
COOP_CASES = {
    "caltech101": {
        "accordion": [f"accordion/image_{i:04d}.jpg" for i in range(4)],
        "airplane": [f"airplanes/image_{i:04d}.jpg" for i in range(4)],
    },
    "oxford_pets": {
        "abyssinian": [f"Abyssinian_{i}.jpg" for i in range(4)],
        "american_bulldog": [f"american_bulldog_{i}.jpg" for i in range(4)],
    },
    "stanford_cars": {
        "2000 AM General Hummer SUV": [f"cars_train/{i:05d}.jpg" for i in range(4)],
        "2012 Acura RL Sedan": [f"cars_test/{i:05d}.jpg" for i in range(4)],
    },
    "oxford_flowers": {
        "pink primrose": [f"image_{i:05d}.jpg" for i in range(4)],
        "hard-leaved pocket orchid": [f"image_{i:05d}.jpg" for i in range(10, 14)],
    },
    "food101": {
        "apple_pie": [f"apple_pie/{i}.jpg" for i in range(4)],
        "baby_back_ribs": [f"baby_back_ribs/{i}.jpg" for i in range(4)],
    },
    "sun397": {
        "abbey": [f"a/abbey/sun_{i}.jpg" for i in range(4)],
        "airplane cabin": [f"a/airplane_cabin/sun_{i}.jpg" for i in range(4)],
    },
    "dtd": {
        "banded": [f"banded/banded_{i:04d}.jpg" for i in range(4)],
        "blotchy": [f"blotchy/blotchy_{i:04d}.jpg" for i in range(4)],
    },
    "ucf101": {
        "Apply_Eye_Makeup": [f"Apply_Eye_Makeup/v_{i}.jpg" for i in range(4)],
        "Archery": [f"Archery/v_{i}.jpg" for i in range(4)],
    },
    "eurosat": {
        "AnnualCrop": [f"AnnualCrop/AnnualCrop_{i}.jpg" for i in range(4)],
        "SeaLake": [f"SeaLake/SeaLake_{i}.jpg" for i in range(4)],
    },
}


@pytest.mark.parametrize("key", sorted(COOP_CASES))
def test_coop_loader_reads_split_file(tmp_path, key):
    image_root, split = _coop_fixture(str(tmp_path), key, COOP_CASES[key])
    ds = load_dataset(key, str(tmp_path))
    assert len(ds.train) == len(split["train"]) and len(ds.val) == len(split["val"])
    assert len(ds.test) == len(split["test"])
    first = ds.train[0]
    assert first.path == os.path.join(image_root, split["train"][0][0]) and os.path.isfile(first.path)
    assert first.label == 0
    if key == "eurosat":
        # CoOp's EuroSAT names: raw folder names map to the phrases of NEW_CNAMES.
        assert ds.classnames == ["Annual Crop Land", "Sea or Lake"]
    else:
        assert ds.classnames == list(COOP_CASES[key])
    image, label = ImageDataset(ds.test, lambda im: im.size)[0]
    assert image == (8, 8) and label == ds.test[0].label


def test_eurosat_keeps_renamed_split_names(tmp_path):
    # The released split file already holds "Annual Crop Land": it must pass through unchanged.
    _coop_fixture(str(tmp_path), "eurosat", COOP_CASES["eurosat"], names=["Annual Crop Land", "Sea or Lake"])
    assert load_dataset("EuroSAT", str(tmp_path)).classnames == ["Annual Crop Land", "Sea or Lake"]


def test_fgvc_aircraft_reads_variant_files(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    lines = {
        "train": ["1025794 707-320", "1340192 A300B4", "0056978 F/A-18"],
        "val": ["1019011 707-320"],
        "test": ["1514522 F/A-18", "2044524 A300B4"],
    }
    for split, ls in lines.items():
        (d / f"images_variant_{split}.txt").write_text("\n".join(ls) + "\n")
        for line in ls:
            _img(str(d / "images" / (line.split()[0] + ".jpg")))
    ds = load_dataset("FGVCAircraft", str(tmp_path))
    assert ds.classnames == ["707-320", "A300B4", "F/A-18"]
    assert [(os.path.basename(s.path), s.label) for s in ds.train] == [
        ("1025794.jpg", 0),
        ("1340192.jpg", 1),
        ("0056978.jpg", 2),
    ]
    assert [s.label for s in ds.test] == [2, 1] and len(ds.val) == 1
    (d / "images_variant_test.txt").write_text("1514522 Spitfire\n")
    with pytest.raises(DatasetError, match=r"images_variant_test\.txt, line 1.*variants\.txt"):
        load_dataset("fgvc", str(tmp_path))


def test_imagenet_reads_wnid_folders_with_shipped_names(tmp_path):
    pairs = imagenet_classes()
    assert len(pairs) == 1000 and len({w for w, _ in pairs}) == 1000
    assert [w for w, _ in pairs] == sorted(w for w, _ in pairs)  # label order = sorted wnids
    assert pairs[0] == ("n01440764", "tench") and pairs[999] == ("n15075141", "toilet paper")
    assert pairs[21][1] == "kite (bird of prey)"  # CLIP's cleaned names, not WordNet's "kite"
    base = tmp_path / "imagenet" / "images"
    for split in ("train", "val"):
        for w in ("n01440764", "n15075141"):
            for i in range(2):
                _img(str(base / split / w / f"{w}_{i}.JPEG"))
    ds = load_dataset("ImageNet", str(tmp_path))
    assert ds.num_classes == 1000 and ds.classnames[0] == "tench"
    assert sorted({s.label for s in ds.train}) == [0, 999] and len(ds.test) == 4 and ds.val == []
    # CLIP-LoRA's own code reads imagenet/train and imagenet/val without images/.
    alt = tmp_path / "alt"
    for split in ("train", "val"):
        _img(str(alt / "imagenet" / split / "n01443537" / "x.JPEG"))
    assert [s.label for s in load_dataset("imagenet", str(alt)).test] == [1]
    (base / "val" / "not_a_wnid").mkdir()
    with pytest.raises(DatasetError, match="not_a_wnid"):
        load_dataset("imagenet", str(tmp_path))


def test_image_folder_layouts(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "golden_retriever"):
            for i in range(3):
                _img(str(tmp_path / "split" / split / c / f"{i}.jpg"))
    ds = load_dataset("folder", str(tmp_path / "split"))
    assert ds.classnames == ["cat", "golden_retriever"] and len(ds.train) == 6 and len(ds.test) == 6
    for c in ("a", "b"):
        for i in range(10):
            _img(str(tmp_path / "flat" / c / f"{i:02d}.png"))
    flat = load_dataset("folder", str(tmp_path / "flat"))
    assert len(flat.train) == 16 and len(flat.test) == 4
    assert {os.path.basename(s.path) for s in flat.test} == {"08.png", "09.png"}
    assert not {s.path for s in flat.train} & {s.path for s in flat.test}


def test_synthetic_is_a_coop_dataset(tmp_path):
    make_synthetic(str(tmp_path), num_classes=3, train_per_class=2, val_per_class=1, test_per_class=2, image_size=16)
    ds = load_dataset("synthetic", str(tmp_path))
    assert ds.classnames == ["red_circle", "green_square", "blue_triangle"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 6)
    img, label = ImageDataset(ds.train, lambda im: im.getpixel((0, 0)))[(0, 1)]
    assert label == 0 and len(img) == 3


# --------------------------------------------------------------------------- sampler


def _pool(counts):
    return [Sample(f"/x/{c}_{i}.jpg", c, f"c{c}") for c, n in enumerate(counts) for i in range(n)]


def test_sampler_k_per_class_deterministic_without_replacement():
    pool = _pool([10, 10, 10])
    a, b = sample_few_shot(pool, 4, seed=1), sample_few_shot(pool, 4, seed=1)
    assert a == b
    assert sample_few_shot(pool, 4, seed=2) != a
    for c in range(3):
        picked = [s for s in a if s.label == c]
        assert len(picked) == 4 and len(set(picked)) == 4  # no repeats when the class has enough


def test_sampler_replaces_only_when_class_is_short():
    pool = _pool([2, 8])
    chosen = sample_few_shot(pool, 5, seed=3)
    short = [s for s in chosen if s.label == 0]
    assert len(short) == 5 and set(short) <= set(pool[:2])
    assert len({s for s in chosen if s.label == 1}) == 5


@pytest.mark.parametrize("shots", [0, -1, 1.5, True, "4"])
def test_sampler_rejects_bad_shots(shots):
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        sample_few_shot(_pool([3]), shots, seed=1)


def test_few_shot_list_round_trips(tmp_path):
    pool = [Sample(str(tmp_path / "img" / f"{i}.jpg"), i % 2, f"c{i % 2}") for i in range(6)]
    chosen = sample_few_shot(pool, 2, seed=5)
    path = str(tmp_path / "few_shot.json")
    save_few_shot(path, chosen, image_root=str(tmp_path / "img"), dataset="x", shots=2, seed=5)
    payload = json.loads(open(path).read())
    assert payload["shots"] == 2 and payload["seed"] == 5 and payload["train"][0][0].endswith(".jpg")
    assert not os.path.isabs(payload["train"][0][0])
    assert load_few_shot(path) == chosen


def _official_generate_fewshot(data_source, num_shots):
    """The official code's ``DatasetBase.generate_fewshot_dataset`` (datasets/utils.py),
    restated: Python's global ``random``, classes in ``defaultdict`` insertion order."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _label, items in tracker.items():
        if len(items) >= num_shots:
            dataset.extend(random.sample(items, num_shots))
        else:
            dataset.extend(random.choices(items, k=num_shots))
    return dataset


@pytest.mark.parametrize(("shots", "seed"), [(1, 1), (2, 2), (4, 3), (16, 1)])
def test_official_few_shot_replays_the_official_draw(shots, seed):
    # Labels deliberately out of order in the file, and one short class (replacement).
    train = _pool([9, 3, 12, 7])[::-1] + _pool([0, 0, 0, 0, 5])
    val = _pool([6, 2, 6, 6, 1])
    state = random.getstate()
    try:
        # main.py: set_random_seed(seed); then e.g. datasets/dtd.py draws val, then train.
        random.seed(seed)
        _official_generate_fewshot(val, min(shots, 4))
        expected = _official_generate_fewshot(train, shots)
    finally:
        random.setstate(state)
    got = official_few_shot(train, val, shots, seed)
    assert got == expected
    assert [s.label for s in got[:shots]] == [train[0].label] * shots  # insertion order, not sorted labels
    assert official_few_shot(train, val, shots, seed + 1) != got


def test_official_few_shot_imagenet_joint_draw():
    train = _pool([30, 30, 30])
    state = random.getstate()
    try:
        # datasets/imagenet.py: random.sample(items, shots + min(4, shots)); the first shots train.
        random.seed(1)
        expected = []
        for label in range(3):
            items = [s for s in train if s.label == label]
            expected += random.sample(items, 8 + 4)[:8]
    finally:
        random.setstate(state)
    assert official_few_shot(train, [], 8, 1, imagenet=True) == expected


@pytest.mark.parametrize("key", ["oxford_pets", "oxford_flowers", "caltech101", "stanford_cars", "dtd"])
def test_official_code_folder_names_are_accepted(tmp_path, key):
    # The official datasets/<name>.py hard-code other folder names than DATASETS.md
    # (OxfordPets, Flower102, Caltech101, StanfordCars, DTD): a $DATA laid out for it loads too.
    spec = COOP_SPECS[key]
    _coop_fixture(str(tmp_path), key, COOP_CASES[key])
    shutil.move(str(tmp_path / spec.folder), str(tmp_path / spec.official_folder))
    ds = load_dataset(key, str(tmp_path))
    assert ds.classnames == list(COOP_CASES[key]) and os.path.isfile(ds.train[0].path)
    assert os.path.join(str(tmp_path), spec.official_folder) in ds.train[0].path


# --------------------------------------------------------------------------- bad inputs


def test_missing_split_file_names_file_and_source(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        load_dataset("dtd", str(tmp_path))
    msg = str(e.value)
    assert "split_zhou_DescribableTextures.json" in msg and "DATASETS.md" in msg and "relative_path" in msg


def test_missing_dataset_folder_describes_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"oxford_pets.*split_zhou_OxfordPets\.json"):
        load_dataset("OxfordPets", str(tmp_path))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"train": [], "val": []}', "no 'test' key"),
        ('{"train": [["a.jpg", "zero", "x"]], "val": [], "test": []}', r"train\[0\]"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_split_file(tmp_path, content, match):
    d = tmp_path / "eurosat"
    (d / "2750").mkdir(parents=True)
    (d / "split_zhou_EuroSAT.json").write_text(content)
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("eurosat", str(tmp_path))
    assert "split_zhou_EuroSAT.json" in str(e.value)


def test_unreadable_image_names_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = ImageDataset([Sample(str(bad), 0, "x"), Sample(str(tmp_path / "gone.jpg"), 0, "x")], lambda im: im)
    with pytest.raises(DatasetError, match=r"cannot read image .*bad\.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match=r"image not found: .*gone\.jpg"):
        ds[1]


def test_unreadable_image_in_a_loader_worker_keeps_its_type_and_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    loader = torch.utils.data.DataLoader(ImageDataset([Sample(str(bad), 0, "x")], lambda im: im), num_workers=1)
    with pytest.raises(DatasetError, match=r"broken\.png"):
        next(iter(loader))


def test_unknown_dataset_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'.*eurosat.*folder"):
        canonical_name("cifar10")
    assert canonical_name("Flowers102") == "oxford_flowers" and canonical_name("FGVCAircraft") == "fgvc_aircraft"
    assert len(PAPER_DATASETS) == 11 and {canonical_name(n) for n in PAPER_DATASETS} == set(PAPER_DATASETS)
