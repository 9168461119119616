"""Miniature copies of the zero-shot benchmarks in their standard layouts (what DualCoOp and Diff-ZS-MLC read).

The file names, folder layout, JSON fields and array shapes are the real ones; the images are a few tiny
coloured squares. MS-COCO's class names and category ids are the real ones (48 seen, 17 unseen); NUS-WIDE's
81 unseen names are the real ones, its 925 seen tags stand-ins (``tag000``...: the real list is not shipped).
"""

from __future__ import annotations

import io
import json
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


def make_coco_zsl(root: Path, images: int = 6) -> Path:
    """ROOT with annotations/instances_*_48_17.json and train2014/, val2014/ images; each split's images
    carry labels of that split only (one image of each file has no annotation: the official loader skips it)."""
    ids = _coco_ids()
    seen, unseen = shipped("coco_48_17_seen"), shipped("coco_48_17_unseen")
    per_split = {"seen-train": seen, "unseen-test": unseen, "gzsl-test": seen + unseen}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    seed = 0
    for split, (name, folder) in COCO_FILES.items():
        labels = per_split[split]
        (root / folder).mkdir(exist_ok=True)
        data = {"info": {}, "licenses": [], "images": [], "annotations": [], "categories": []}
        data["categories"] = [{"id": ids[c], "name": c, "supercategory": "thing"} for c in labels]
        for n in range(images + 1):
            image_id = (1 if folder == "train2014" else 500_000) + n + (1000 if split == "gzsl-test" else 0)
            file_name = f"COCO_{folder}_{image_id:012d}.jpg"
            (root / folder / file_name).write_bytes(_jpeg(seed := seed + 1))
            data["images"].append({"id": image_id, "file_name": file_name, "height": 24, "width": 24})
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
        (root / "annotations" / name).write_text(json.dumps(data), encoding="utf-8")
    return root


def nus_names() -> list[str]:
    """all_labels.txt's 1,006 names: 925 stand-in seen tags and the real 81 unseen, in alphabetical order."""
    return sorted([f"tag{i:03d}" for i in range(925)] + shipped("nus_81_unseen"))


def make_nus_zsl(root: Path, images: int = 6) -> Path:
    """ROOT with annotations/Tag_all/all_labels.txt, annotations/zsl/formatted_*_filtered.npy ([N, 1006]
    multi-hot rows and [N] image paths) and images/Flickr/CONCEPT/NNNN_ID.jpg."""
    names = nus_names()
    unseen = set(shipped("nus_81_unseen"))
    columns = {
        "seen-train": [i for i, n in enumerate(names) if n not in unseen],
        "unseen-test": [i for i, n in enumerate(names) if n in unseen],
        "gzsl-test": list(range(len(names))),
    }
    (root / "annotations" / "Tag_all").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "Tag_all" / "all_labels.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (root / "annotations" / "zsl").mkdir(parents=True, exist_ok=True)
    seed = 100
    for split, (labels_name, images_name) in NUS_FILES.items():
        cols = columns[split]
        targets = np.zeros((images, len(names)), dtype=np.int64)
        paths = []
        for n in range(images):
            targets[n, [cols[(n * 5) % len(cols)], cols[(n * 11 + 2) % len(cols)]]] = 1
            path = f"Flickr/{names[cols[n % len(cols)]]}/{n:04d}_{seed:010d}.jpg"
            (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / path).write_bytes(_jpeg(seed := seed + 1))
            paths.append(path + " " * (n % 2))  # the official lists are stripped: trailing blanks happen
        np.save(root / "annotations" / "zsl" / labels_name, targets)
        np.save(root / "annotations" / "zsl" / images_name, np.array(paths))
    return root
