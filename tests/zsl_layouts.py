"""Miniature copies of the zero-shot benchmarks in their standard layouts (what DualCoOp and Diff-ZS-MLC read).

The file names, folder layout, JSON fields and array shapes are the real ones; the images are a few tiny
coloured squares. MS-COCO's class names and category ids are the real ones (48 seen, 17 unseen); NUS-WIDE's
81 unseen names are the real ones, its 925 seen tags stand-ins (``tag000``...: the real list is not shipped).

Keyword options give the copies as people have them on disk: Windows separators in the image lists, the
``Flickr/`` (or ``train2014/``) folder written or not and on disk or not, folders or files symlinked from
another disk, a BOM with CRLF line ends, blank lines and trailing blanks, upper-case extensions on disk,
image names saved as Python strings (an object array), and seen-train rows without a seen label.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mlgen.classifiers.benchmarks import COCO_FILES, NUS_FILES, shipped

# The 80 MS-COCO categories in id order (ids skip 12, 26, 29, 30, 45, 66, 68, 69, 71, 83); "_" stands for a space.
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
)
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _coco_ids() -> dict[str, int]:
    return dict(zip((name.replace("_", " ") for name in COCO_NAMES.split()), COCO_IDS, strict=True))


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _place(path: Path, data: bytes, elsewhere: Path | None) -> None:
    """Write ``data`` at ``path``, or at the same name under ``elsewhere`` (another disk) with ``path`` a
    symlink to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if elsewhere is None:
        path.write_bytes(data)
        return
    elsewhere.mkdir(parents=True, exist_ok=True)
    (elsewhere / path.name).write_bytes(data)
    os.symlink(elsewhere / path.name, path)


def _text_file(path: Path, lines: list[str], messy: bool) -> None:
    """One name a line; ``messy``: as an editor on Windows leaves it (BOM, CRLF, trailing blanks, blank lines)."""
    if messy:
        path.write_bytes(("\ufeff" + "\r\n".join(f"{line}  " for line in lines) + "\r\n\r\n").encode("utf-8"))
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_coco_zsl(
    root: Path,
    images: int = 6,
    *,
    messy: bool = False,
    folder_in_name: bool = False,
    windows: bool = False,
    linked: Path | None = None,
    images_folder: bool = False,
    unzipped_twice: bool = False,
) -> Path:
    """ROOT with annotations/instances_*_48_17.json and train2014/, val2014/ images; each split's images
    carry labels of that split only (one image of each file has no annotation: the official loader skips it).

    ``messy``: JSON files with a BOM and CRLF line ends; ``folder_in_name``: each ``file_name`` starts with its
    folder (``train2014/COCO_...``); ``windows``: written with ``\\``; ``linked``: every image a symlink to a
    file under that folder (another disk); ``images_folder``: the image folders in ROOT/images/;
    ``unzipped_twice``: train2014.zip unpacked into ROOT/train2014/ (ROOT/train2014/train2014/*.jpg)."""
    ids = _coco_ids()
    seen, unseen = shipped("coco_48_17_seen"), shipped("coco_48_17_unseen")
    per_split = {"seen-train": seen, "unseen-test": unseen, "gzsl-test": seen + unseen}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    seed = 0
    for split, (name, folder) in COCO_FILES.items():
        labels = per_split[split]
        on_disk = root / "images" / folder if images_folder else root / folder
        on_disk = on_disk / folder if unzipped_twice else on_disk
        on_disk.mkdir(parents=True, exist_ok=True)
        data = {"info": {}, "licenses": [], "images": [], "annotations": [], "categories": []}
        data["categories"] = [{"id": ids[c], "name": c, "supercategory": "thing"} for c in labels]
        for n in range(images + 1):
            image_id = (1 if folder == "train2014" else 500_000) + n + (1000 if split == "gzsl-test" else 0)
            file_name = f"COCO_{folder}_{image_id:012d}.jpg"
            _place(on_disk / file_name, _jpeg(seed := seed + 1), linked / folder if linked else None)
            written = f"{folder}/{file_name}" if folder_in_name else file_name
            written = written.replace("/", "\\") if windows else written
            data["images"].append({"id": image_id, "file_name": written, "height": 24, "width": 24})
            if n == images:  # no annotation: not an image of the split
                continue
            for c in dict.fromkeys([labels[(n * 7) % len(labels)], labels[-1 - n]]):  # GZSL: a seen, an unseen
                data["annotations"].append(
                    {
                        "id": len(data["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": ids[c],
                        "bbox": [1, 1, 10, 10],
                        "area": 100.0,
                        "iscrowd": 0,
                        "segmentation": [[1, 1, 11, 1, 11, 11]],
                    }
                )
        text = json.dumps(data, indent=1 if messy else None)
        if messy:
            (root / "annotations" / name).write_bytes(("\ufeff" + text.replace("\n", "\r\n")).encode("utf-8"))
        else:
            (root / "annotations" / name).write_text(text, encoding="utf-8")
    return root


def nus_names() -> list[str]:
    """all_labels.txt's 1,006 names: 925 stand-in seen tags and the real 81 unseen, in alphabetical order."""
    return sorted([f"tag{i:03d}" for i in range(925)] + shipped("nus_81_unseen"))


def make_nus_zsl(
    root: Path,
    images: int = 6,
    *,
    windows: bool = False,
    flickr_in_list: bool = True,
    flickr_on_disk: bool = True,
    linked: Path | None = None,
    messy: bool = False,
    upper_extension: bool = False,
    object_names: bool = False,
    all_negative: int = 0,
    from_root: bool = False,
) -> Path:
    """ROOT with annotations/Tag_all/all_labels.txt, annotations/zsl/formatted_*_filtered.npy ([N, 1006]
    multi-hot rows and [N] image paths) and images/Flickr/CONCEPT/NNNN_ID.jpg.

    As people have it: ``windows`` (lists written with ``\\``), ``flickr_in_list`` / ``flickr_on_disk`` (the
    ``Flickr/`` folder in the lists, on disk), ``linked`` (each concept folder a symlink to one under that
    folder: another disk), ``messy`` (all_labels.txt with a BOM, CRLF, trailing blanks and a blank line),
    ``upper_extension`` (``.JPG`` on disk, ``.jpg`` in the lists), ``object_names`` (the lists saved as Python
    strings), ``all_negative`` (that many seen-train rows with no seen label: the first without any tag, the
    others with unseen tags only), ``from_root`` (the lists written relative to ROOT: ``images/Flickr/...``)."""
    names = nus_names()
    unseen = set(shipped("nus_81_unseen"))
    columns = {
        "seen-train": [i for i, n in enumerate(names) if n not in unseen],
        "unseen-test": [i for i, n in enumerate(names) if n in unseen],
        "gzsl-test": list(range(len(names))),
    }
    (root / "annotations" / "Tag_all").mkdir(parents=True, exist_ok=True)
    _text_file(root / "annotations" / "Tag_all" / "all_labels.txt", names, messy)
    (root / "annotations" / "zsl").mkdir(parents=True, exist_ok=True)
    seed = 100
    for split, (labels_name, images_name) in NUS_FILES.items():
        cols = columns[split]
        targets = np.zeros((images, len(names)), dtype=np.int64)
        paths = []
        for n in range(images):
            if split == "seen-train" and n < all_negative:  # no seen label: no tag, or unseen tags only
                targets[n, columns["unseen-test"][n : n + 2] if n else []] = 1
            else:
                targets[n, [cols[(n * 5) % len(cols)], cols[(n * 11 + 2) % len(cols)]]] = 1
            concept, name = names[cols[n % len(cols)]], f"{n:04d}_{seed:010d}"
            on_disk = (
                ("Flickr/" if flickr_on_disk else "") + f"{concept}/{name}." + ("JPG" if upper_extension else "jpg")
            )
            folder = (root / "images" / on_disk).parent
            if linked is not None and not folder.exists():
                (linked / concept).mkdir(parents=True, exist_ok=True)
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(linked / concept, folder, target_is_directory=True)
            _place(root / "images" / on_disk, _jpeg(seed := seed + 1), None)
            path = ("images/" if from_root else "") + ("Flickr/" if flickr_in_list else "") + f"{concept}/{name}.jpg"
            path = path.replace("/", "\\") if windows else path
            paths.append(path + " " * (n % 2))  # the official lists are stripped: trailing blanks happen
        np.save(root / "annotations" / "zsl" / labels_name, targets)
        names_array = np.array(paths, dtype=object) if object_names else np.array(paths)
        np.save(root / "annotations" / "zsl" / images_name, names_array, allow_pickle=object_names)
    return root
