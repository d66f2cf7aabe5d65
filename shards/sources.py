"""Find the images and labels of an ImageNet tree in any of the layouts DESIGN.md accepts.

train: `train/<wnid>/*.JPEG`. val: `val/<wnid>/*.JPEG`, or flat `val/*.JPEG` labelled by
`LOC_val_solution.csv` (Kaggle) or by `ILSVRC2012_validation_ground_truth.txt` plus a wnid
list in ILSVRC2012_ID order. The images may sit in the source root or, as in the Kaggle
download, under `ILSVRC/Data/CLS-LOC/`. Labels are wnid indices in sorted order.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.layouts import sample_key

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SYNSET_MAPPING = "LOC_synset_mapping.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
WNID_LISTS = ("ILSVRC2012_validation_wnids.txt", "synsets.txt")
KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")
_WNID = re.compile(r"^n\d{8}$")
_VAL_ID = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Item:
    """One input file: where it is, which split, its class and its WebDataset key."""

    source: str  # path relative to the source root
    split: str
    wnid: str | None  # None when the labels file does not name it
    key: str


@dataclass
class SourceTree:
    root: Path
    wnids: list[str]
    names: dict[str, str]
    items: dict[str, list[Item]] = field(default_factory=dict)
    # inputs known to be unusable before decoding: (source, split, reason)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)

    def label(self, wnid: str) -> int:
        return self.wnids.index(wnid)


def image_root(source: Path) -> Path:
    """The folder holding train/ and val/: the source itself, or Kaggle's ILSVRC/Data/CLS-LOC."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: source directory not found; pass --source DIR (an ImageNet tree)")
    for root in (source, source / KAGGLE_ROOT):
        if (root / "train").is_dir() or (root / "val").is_dir():
            return root
    raise FileNotFoundError(
        f"{source}: no train/ or val/ folder (looked in {source} and {source / KAGGLE_ROOT}); "
        "point --source at the ImageNet root"
    )


def _find(name: str, *dirs: Path) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / "ILSVRC2012_devkit_t12" / "data" / name):
            if candidate.is_file():
                return candidate
    return None


def _read_names(source: Path, root: Path) -> dict[str, str]:
    path = _find(SYNSET_MAPPING, source, root)
    names: dict[str, str] = {}
    if path:
        for line in path.read_text().splitlines():
            wnid, _, rest = line.strip().partition(" ")
            if wnid:
                names[wnid] = rest.split(",")[0].strip() or wnid
    return names


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _val_labels(source: Path, root: Path, files: list[Path]) -> dict[str, str]:
    """stem -> wnid for flat val/ images."""
    csv_path = _find(LOC_SOLUTION, root, source)
    if csv_path:
        labels = {}
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise ValueError(f"{csv_path}: expected the header 'ImageId,PredictionString'")
            for row in reader:
                tokens = (row["PredictionString"] or "").split()
                if tokens:
                    labels[row["ImageId"].strip()] = tokens[0]
        return labels
    gt_path = _find(GROUND_TRUTH, root, source)
    if gt_path:
        list_path = next((p for p in (_find(n, gt_path.parent, root, source) for n in WNID_LISTS) if p), None)
        if list_path is None:
            raise FileNotFoundError(
                f"{gt_path} found but no wnid list: put {WNID_LISTS[0]} (one wnid per line in "
                "ILSVRC2012_ID order, as in the devkit's data/meta.mat) beside it"
            )
        by_id = [w.strip() for w in list_path.read_text().split()]
        ids = [int(t) for t in gt_path.read_text().split()]
        labels = {}
        for p in files:
            m = _VAL_ID.search(p.stem)
            n = int(m.group(1)) if m else 0
            if 1 <= n <= len(ids) and 1 <= ids[n - 1] <= len(by_id):
                labels[p.stem] = by_id[ids[n - 1] - 1]
        return labels
    raise FileNotFoundError(
        f"{root / 'val'} is flat but has no labels: put {LOC_SOLUTION} beside val/ or in {source}, "
        f"or {GROUND_TRUTH} plus {WNID_LISTS[0]}"
    )


def _add(tree: SourceTree, split: str, path: Path, wnid: str | None, seen: dict[str, int]) -> None:
    rel = str(path.relative_to(tree.root))
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        tree.rejects.append((rel, split, f"not an image file name ({path.suffix or 'no extension'})"))
        return
    key = sample_key(path.stem)
    n = seen.get(key, 0)
    seen[key] = n + 1
    if n:  # the same stem twice in a split (another class or extension): keep both, distinctly
        key = f"{key}_dup{n}"
        while key in seen:
            n += 1
            key = f"{sample_key(path.stem)}_dup{n}"
        seen[key] = 1
    tree.items[split].append(Item(rel, split, wnid, key))


def discover(source: Path, splits: tuple[str, ...] = ("train", "val")) -> SourceTree:
    """List every input of `splits` under `source`, with its wnid (or a reject reason)."""
    source = Path(source)
    root = image_root(source)
    train_dirs = _class_dirs(root / "train")
    val_dir = root / "val"
    names = _read_names(source, root)
    if train_dirs:
        wnids = [d.name for d in train_dirs]
    elif names:
        wnids = sorted(names)
    else:
        wnids = [d.name for d in _class_dirs(val_dir)]
    if not wnids:
        raise FileNotFoundError(
            f"{root}: no classes found (expected train/<wnid>/ folders or {SYNSET_MAPPING}); "
            "check --source"
        )
    tree = SourceTree(root=root, wnids=sorted(wnids), names=names)
    for split in splits:
        tree.items[split] = []
        seen: dict[str, int] = {}
        if split == "train":
            if not train_dirs:
                raise FileNotFoundError(f"{root / 'train'}: no class folders; pass --splits val or fix --source")
            for d in train_dirs:
                for p in _files(d):
                    _add(tree, split, p, d.name, seen)
        elif split == "val":
            if not val_dir.is_dir():
                raise FileNotFoundError(f"{val_dir}: not found; pass --splits train or fix --source")
            class_dirs = _class_dirs(val_dir)
            if class_dirs:
                for d in class_dirs:
                    for p in _files(d):
                        _add(tree, split, p, d.name, seen)
            else:
                files = _files(val_dir)
                labels = _val_labels(source, root, files)
                for p in files:
                    _add(tree, split, p, labels.get(p.stem), seen)
        else:
            raise ValueError(f"--splits: unknown split {split!r} (use train, val)")
    return tree
