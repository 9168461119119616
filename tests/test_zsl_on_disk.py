"""The benchmark files as people have them on disk (issue 33, item 6), and what a bad file becomes: each
variant of tests/zsl_layouts.py opens with the same images and labels as the standard layout; each bad file
ends in one ``mlgen: error:`` line. Also (item 5): NUS-WIDE's seen-train keeps rows without a seen label."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import mlgen
from mlgen.classifiers import benchmarks
from mlgen.classifiers.benchmarks import open_split, parse_spec
from mlgen.classifiers.data import read_labelled
from mlgen.classifiers.source import labelled_samples
from mlgen.errors import MlgenError
from zsl_layouts import make_coco_zsl, make_nus_zsl

SPLITS = ("seen-train", "unseen-test", "gzsl-test")


def _items(spec: str) -> list[tuple[bytes | None, tuple[str, ...]]]:
    return [(item.image, item.labels) for item in read_labelled(spec)]


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list]]:
    """Each split's (image bytes, labels) in the standard layouts: what every variant must read."""
    root = tmp_path_factory.mktemp("standard")
    coco, nus = make_coco_zsl(root / "coco"), make_nus_zsl(root / "nus")
    return {
        "coco-zsl": {split: _items(f"coco-zsl:{coco}:{split}") for split in SPLITS},
        "nus-zsl": {split: _items(f"nus-zsl:{nus}:{split}") for split in SPLITS},
    }


NUS_VARIANTS = {
    "windows separators": {"windows": True},
    "no Flickr/ in the lists": {"flickr_in_list": False},
    "no Flickr/ on disk": {"flickr_on_disk": False},
    "windows, no Flickr/ in the lists": {"windows": True, "flickr_in_list": False},
    "concept folders symlinked from another disk": {"linked": "other-disk"},
    "symlinked, no Flickr/ on disk, windows": {"linked": "other-disk", "flickr_on_disk": False, "windows": True},
    "BOM, CRLF, trailing blanks, blank line": {"messy": True},
    "upper-case extension on disk": {"upper_extension": True},
    "names as Python strings, windows": {"object_names": True, "windows": True},
    "lists relative to ROOT (images/Flickr/...)": {"from_root": True},
}


@pytest.mark.parametrize("variant", list(NUS_VARIANTS))
def test_each_nus_variant_opens_with_the_standard_images_and_labels(standard, tmp_path, variant) -> None:
    options = dict(NUS_VARIANTS[variant])
    if "linked" in options:
        options["linked"] = tmp_path / options["linked"]
    root = make_nus_zsl(tmp_path / "nus", **options)
    for split in SPLITS:
        assert _items(f"nus-zsl:{root}:{split}") == standard["nus-zsl"][split], split


COCO_VARIANTS = {
    "BOM and CRLF in the JSON": {"messy": True},
    "train2014/ in file_name": {"folder_in_name": True},
    "train2014\\ in file_name": {"folder_in_name": True, "windows": True},
    "images symlinked from another disk": {"linked": "other-disk"},
    "image folders in ROOT/images/": {"images_folder": True},
    "unzipped twice: train2014/train2014/": {"unzipped_twice": True},
}


@pytest.mark.parametrize("variant", list(COCO_VARIANTS))
def test_each_coco_variant_opens_with_the_standard_images_and_labels(standard, tmp_path, variant) -> None:
    options = dict(COCO_VARIANTS[variant])
    if "linked" in options:
        options["linked"] = tmp_path / options["linked"]
    root = make_coco_zsl(tmp_path / "coco", **options)
    for split in SPLITS:
        assert _items(f"coco-zsl:{root}:{split}") == standard["coco-zsl"][split], split


def test_a_root_with_colons_is_parsed_from_the_right(standard, tmp_path) -> None:
    coco = make_coco_zsl(tmp_path / "c:" / "data")  # coco-zsl:/mnt/c:/data
    nus = make_nus_zsl(tmp_path / "nus:2014")  # the last folder itself holds a colon
    assert parse_spec(f"coco-zsl:{coco}") == benchmarks.Spec("coco-zsl", coco, None)
    assert parse_spec(f"nus-zsl:{nus}") == benchmarks.Spec("nus-zsl", nus, None)
    assert parse_spec(f"nus-zsl:{nus}:gzsl-test:skip-missing") == benchmarks.Spec("nus-zsl", nus, "gzsl-test", True)
    assert _items(f"coco-zsl:{coco}:unseen-test") == standard["coco-zsl"]["unseen-test"]
    assert _items(f"nus-zsl:{nus}:gzsl-test") == standard["nus-zsl"]["gzsl-test"]
    with pytest.raises(MlgenError, match="unknown split 'tset'"):  # a typo after an existing root still says so
        parse_spec(f"nus-zsl:{nus}:tset")


def test_a_plain_coco_json_finds_its_images_in_the_coco_layout(standard, tmp_path) -> None:
    root = make_coco_zsl(tmp_path / "coco")  # annotations/ beside train2014/ and val2014/
    expected = [image for image, _ in standard["coco-zsl"]["unseen-test"]]
    items = list(read_labelled(root / "annotations" / "instances_val2014_unseen_48_17.json"))
    assert [item.image for item in items if item.labels] == expected  # found in the sibling val2014/
    # the folders one level down (ROOT/images/val2014), and a split named by the JSON rather than the file names
    (root / "images").mkdir()
    shutil.move(root / "val2014", root / "images" / "val2017")
    data = json.loads((root / "annotations" / "instances_val2014_unseen_48_17.json").read_text())
    for image in data["images"]:
        os.rename(root / "images" / "val2017" / image["file_name"], root / "images" / "val2017" / f"{image['id']}.jpg")
        image["file_name"] = f"{image['id']}.jpg"
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    items = list(read_labelled(root / "annotations" / "instances_val2017.json"))
    assert [item.image for item in items if item.labels] == expected


def _coco_json_apart_from_its_images(standard, tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """A plain COCO JSON alone in its folder, its images in a folder of their own (no COCO layout)."""
    root = make_coco_zsl(tmp_path / "coco")
    annotations = tmp_path / "labels" / "val.json"
    annotations.parent.mkdir()
    shutil.copy(root / "annotations" / "instances_val2014_unseen_48_17.json", annotations)
    shutil.move(root / "val2014", tmp_path / "pictures")
    return annotations, tmp_path / "pictures", [image for image, _ in standard["coco-zsl"]["unseen-test"]]


def test_a_plain_coco_json_finds_its_images_in_the_folder_named_with_images(standard, tmp_path) -> None:
    annotations, pictures, expected = _coco_json_apart_from_its_images(standard, tmp_path)
    assert all(item.image is None for item in read_labelled(annotations))  # not beside it, no COCO layout
    found = [item.image for item in read_labelled(annotations, [tmp_path / "elsewhere", pictures]) if item.labels]
    assert found == expected
    _, images, skipped = labelled_samples(annotations, [pictures])  # what --seen-data / --val-data read
    assert skipped == 0 and list(images())[: len(expected)] == expected


@pytest.mark.slow
def test_evaluate_images_finds_them_and_metrics_name_the_missing_ones(standard, tmp_path) -> None:
    annotations, pictures, _ = _coco_json_apart_from_its_images(standard, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    classes = sorted({label for _, labels in standard["coco-zsl"]["unseen-test"] for label in labels})
    (run / "classes.txt").write_text("\n".join(classes) + "\n")
    args = ["evaluate", "--run", run, "--zero-shot", "clip", "--clip", "tiny", "--data", annotations]
    metrics_file = run / "zero-shot" / "clip" / "metrics.json"
    done = mlgen(*args, "--images", pictures)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(metrics_file.read_text())
    every = len(json.loads(annotations.read_text())["images"])  # the labelled ones and one without a label
    assert metrics["images"] == every and metrics["missing_images_skipped"] == 0, metrics
    first = sorted(pictures.iterdir())[0]
    first.unlink()  # one image gone: counted and named
    assert mlgen(*args, "--images", pictures).returncode == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["missing_images_skipped"] == 1 and metrics["missing_images_first"] == [first.name], metrics
    for bad, said in ((tmp_path / "nowhere", "--images folder not found"), (pictures, "give a .json")):
        data = annotations if bad != pictures else tmp_path / "labels.csv"
        if data.suffix == ".csv":
            data.write_text("image,labels\n")
        done = mlgen(*args[:-1], data, "--images", bad)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and said in lines[0], done.stderr


def test_symlinks_inside_are_followed_but_dotdot_and_absolute_paths_are_refused(tmp_path) -> None:
    root = make_nus_zsl(tmp_path / "nus", linked=tmp_path / "elsewhere")
    assert all(image for image, _ in _items(f"nus-zsl:{root}:unseen-test"))  # concept folders point outside
    path = root / "annotations" / "zsl" / "formatted_val_images_filtered.npy"
    names = np.load(path)
    for bad in ("Flickr/../../annotations/Tag_all/all_labels.txt", "/etc/hostname", "C:\\x.jpg", "a\\..\\..\\x"):
        np.save(path, np.array([bad, *names[1:]]))
        with pytest.raises(MlgenError, match="points outside"):
            read_labelled(f"nus-zsl:{root}:unseen-test")


def test_missing_images_are_counted_and_named_and_skip_missing_goes_on(tmp_path) -> None:
    root = make_nus_zsl(tmp_path / "nus")
    names = [str(name).strip() for name in np.load(root / "annotations/zsl/formatted_val_images_filtered.npy")]
    for name in names[1:5]:
        (root / "images" / name).unlink()
    with pytest.raises(MlgenError) as failed:
        read_labelled(f"nus-zsl:{root}:unseen-test")
    message = str(failed.value)
    assert "4 of 6 images are not there" in message and "skip-missing" in message
    assert all(name in message for name in names[1:4]) and names[4] not in message and "..." in message
    items = list(read_labelled(f"nus-zsl:{root}:unseen-test:skip-missing"))
    assert len(items) == 2 and all(item.image for item in items)
    assert open_split(parse_spec(f"nus-zsl:{root}:unseen-test:skip-missing")).skipped == tuple(names[1:5])
    for name in (names[0], names[5]):
        (root / "images" / name).unlink()
    benchmarks._open_cached.cache_clear()  # a command opens a split once; the annotation files did not change
    with pytest.raises(MlgenError, match="none of its 6 images is there"):  # nothing left to go on with
        read_labelled(f"nus-zsl:{root}:unseen-test:skip-missing")


def test_nus_seen_train_keeps_rows_without_a_seen_label(tmp_path) -> None:
    root = make_nus_zsl(tmp_path / "nus", all_negative=2)  # row 0: no tag; row 1: unseen tags only
    spec = f"nus-zsl:{root}:seen-train"
    items = list(read_labelled(spec))
    assert len(items) == 6 and items[0].labels == () and items[1].labels == ()
    assert all(item.labels for item in items[2:])
    labels, _, skipped = labelled_samples(Path(spec))
    assert labels == [item.labels for item in items] and skipped == 0


def test_out_of_memory_while_loading_an_array_is_one_line(tmp_path, monkeypatch) -> None:
    root = make_nus_zsl(tmp_path / "nus", images=2)

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np, "load", too_big)
    with pytest.raises(MlgenError, match="too large to load into memory"):
        read_labelled(f"nus-zsl:{root}:gzsl-test")


# --- bad files: one line through the real command ---------------------------------------------------------


class _HugeState:
    """Pickles as numpy's own array reconstruction, with a state that asks for 10^12 elements."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**12,), np.dtype("O"), False, self.names))


def _npy_with_pickle(path: Path, rows: int, payload: object) -> None:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|O", "fortran_order": False, "shape": (rows,)})
    out.write(pickle.dumps(payload, protocol=3))
    path.write_bytes(out.getvalue())


def _break(root: Path, how: str) -> str:
    """Break a copy of a layout; returns what the error line must say."""
    zsl = root / "annotations" / "zsl"
    images = zsl / "formatted_val_images_filtered.npy"
    if how == "nus object array asking for 10^12 elements":
        names = [str(name) for name in np.load(images)]
        _npy_with_pickle(images, len(names), _HugeState(names))
        return f"{images.name}: an object array mlgen will not unpickle (shape (1000000000000,) asks for"
    if how == "nus object array with a 2^40-byte string":
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(out, {"descr": "|O", "fortran_order": False, "shape": (6,)})
        images.write_bytes(out.getvalue() + b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc" * 10)
        return f"{images.name}: an object array mlgen will not unpickle (a length past the end of the file"
    if how == "nus image name too long":
        names = np.load(images)
        np.save(images, np.array(["Flickr/" + "x" * 300 + ".jpg", *names[1:]]))
        return "1 of 6 images are not there"
    if how == "nus header asking for 10^12 rows":
        labels = zsl / "formatted_val_all_labels_filtered.npy"
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": (10**12, 1006)})
        labels.write_bytes(out.getvalue() + np.load(labels).tobytes())
        return f"{labels.name}: its header says shape (1000000000000, 1006)"
    if how == "nus .npz renamed to .npy":
        out = io.BytesIO()
        np.savez(out, names=np.load(images))
        images.write_bytes(out.getvalue())
        return ".npz"
    if how == "nus .. in an image path":
        names = np.load(images)
        np.save(images, np.array(["Flickr/../../secret.jpg", *names[1:]]))
        return "points outside"
    if how == "nus all_labels.txt not UTF-8":
        path = root / "annotations" / "Tag_all" / "all_labels.txt"
        path.write_bytes(path.read_bytes().replace(b"airport", b"a\xefrport"))
        return "not UTF-8"
    if how == "nus missing images":
        for name in np.load(images)[:4]:
            (root / "images" / str(name).strip()).unlink()
        return "4 of 6 images are not there"
    if how == "coco .. in a file_name":
        path = root / "annotations" / "instances_val2014_unseen_48_17.json"
        data = json.loads(path.read_text())
        data["images"][0]["file_name"] = "..\\train2014\\" + data["images"][0]["file_name"]
        path.write_text(json.dumps(data))
        return "points outside"
    if how == "coco JSON nested too deep":
        (root / "annotations" / "instances_val2014_unseen_48_17.json").write_text("[" * 100_000 + "]" * 100_000)
        return "not a COCO instance file (RecursionError)"
    raise AssertionError(how)


BAD = [
    "nus object array asking for 10^12 elements",
    "nus object array with a 2^40-byte string",
    "nus image name too long",
    "nus header asking for 10^12 rows",
    "nus .npz renamed to .npy",
    "nus .. in an image path",
    "nus all_labels.txt not UTF-8",
    "nus missing images",
    "coco .. in a file_name",
    "coco JSON nested too deep",
]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {"coco-zsl": make_coco_zsl(root / "coco"), "nus-zsl": make_nus_zsl(root / "nus")}


@pytest.mark.parametrize("how", BAD)
def test_a_bad_file_is_one_line_and_nothing_is_written(layouts, tmp_path, how) -> None:
    benchmark = how.split()[0] + "-zsl"
    root = tmp_path / "copy"
    shutil.copytree(layouts[benchmark], root)
    said = _break(root, how)
    (tmp_path / "run").mkdir()
    done = mlgen(
        "evaluate", "--run", tmp_path / "run", "--zero-shot", "clip", "--clip", "tiny", "--data", f"{benchmark}:{root}"
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("mlgen: error:"), done.stderr
    assert said in lines[0] and "Traceback" not in done.stderr, lines[0]
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.slow
def test_skip_missing_scores_the_benchmark_without_the_missing_images(layouts, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(layouts["coco-zsl"], root)
    data = json.loads((root / "annotations" / "instances_val2014_unseen_48_17.json").read_text())
    (root / "val2014" / data["images"][0]["file_name"]).unlink()
    (tmp_path / "run").mkdir()
    args = [
        "evaluate",
        "--run",
        tmp_path / "run",
        "--zero-shot",
        "clip",
        "--clip",
        "tiny",
        "--data",
        f"coco-zsl:{root}",
    ]
    done = mlgen(*args, "--skip-missing")
    assert done.returncode == 0, done.stderr
    assert "going on without 1 missing images" in done.stderr
    metrics = json.loads((tmp_path / "run" / "zero-shot" / "clip" / "metrics.json").read_text())
    assert metrics["settings"]["zsl"]["images"] == 5 and metrics["settings"]["gzsl"]["images"] == 6
    name = data["images"][0]["file_name"]
    assert metrics["settings"]["zsl"]["missing_images_skipped"] == 1, metrics["settings"]
    assert metrics["settings"]["zsl"]["missing_images_first"] == [name]


def test_a_bom_crlf_and_bad_bytes_in_a_label_sets_file(tmp_path) -> None:
    from mlgen.prompts.composer import read_label_lines

    path = tmp_path / "sets.txt"
    path.write_bytes("\ufeffzebra, kite\r\n\r\nsurfboard  \r\n".encode())
    assert read_label_lines(str(path), "--label-sets") == (("zebra", "kite"), ("surfboard",))
    path.write_bytes(b"zebra\xff\n")
    with pytest.raises(MlgenError, match="not UTF-8"):
        read_label_lines(str(path), "--label-sets")


def test_a_labels_csv_as_people_have_it(tmp_path) -> None:
    """A BOM, CRLF, blanks around the header's names, Windows separators, a folder symlinked from another disk;
    an empty image cell is an unreadable image (counted), not an error; bad bytes are one line."""
    image = make_coco_zsl(tmp_path / "coco", images=1) / "val2014" / "COCO_val2014_000000500000.jpg"
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    shutil.copy(image, folder / "images" / "a.JPG")
    (tmp_path / "other-disk").mkdir()
    shutil.copy(image, tmp_path / "other-disk" / "b.jpg")
    os.symlink(tmp_path / "other-disk", folder / "images" / "linked", target_is_directory=True)
    csv_file = folder / "labels.csv"
    csv_file.write_bytes(
        "\ufeffimage , labels\r\nimages\\a.JPG,cat\r\n\r\nimages\\linked\\b.jpg ,dog|cat\r\n,cat\r\n".encode()
    )
    items = list(read_labelled(csv_file))
    assert [item.image for item in items] == [image.read_bytes(), image.read_bytes(), None]
    assert [item.labels for item in items] == [("cat",), ("dog", "cat"), ("cat",)]
    csv_file.write_bytes(b"image,labels\nimages/a.JPG,caf\xe9\n")
    with pytest.raises(MlgenError, match="not a UTF-8 labels CSV"):
        list(read_labelled(csv_file))
