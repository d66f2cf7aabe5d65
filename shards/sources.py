"""Find the images and labels of an ImageNet tree in any of the layouts DESIGN.md accepts.

train: `train/<wnid>/*.JPEG`. val: `val/<wnid>/*.JPEG`, or flat `val/*.JPEG` labelled by
`LOC_val_solution.csv` (Kaggle) or by `ILSVRC2012_validation_ground_truth.txt` plus a wnid
list in ILSVRC2012_ID order. The images may sit in the source root or, as in the Kaggle
download, under `ILSVRC/Data/CLS-LOC/`. Labels are wnid indices in sorted order.

Every entry of a class folder (or of a flat val/) becomes an item or a reject, never
nothing: symbolic links are followed (a broken one is a reject), and a directory, a FIFO or
a socket where an image should be is a reject (a FIFO is never opened: reading one would
block the packer). Entries are listed with `os.scandir`, so a regular file costs no `stat`.

The items are not held as Python objects: each split's list is spilled, one class folder after
another, to an Arrow IPC file read back memory-mapped (shards/listing.py), so the packer's
memory no longer grows by ~290 bytes per image (5.5 GB at 14 million). Any number of classes
(ImageNet-21k's 21,841 included) is a list of wnids and an int32 code per item.
"""
from __future__ import annotations

import csv
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shards.layouts import display_path, sample_key
from shards.listing import NO_LABEL, Listing, ListingWriter

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SYNSET_MAPPING = "LOC_synset_mapping.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
WNID_LISTS = ("ILSVRC2012_validation_wnids.txt", "synsets.txt")
KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")
_WNID = re.compile(r"^n\d{8}$")
_VAL_ID = re.compile(r"(\d+)$")


@dataclass
class SourceTree:
    """What discovery found: the sorted classes, their names, each split's items (a spilled
    `Listing` in `spill_dir`) and the inputs rejected before decoding. `close()` removes the
    spill."""

    root: Path
    wnids: list[str]
    names: dict[str, str]
    spill_dir: Path
    items: dict[str, Listing] = field(default_factory=dict)
    # inputs known to be unusable before decoding: (source, split, reason)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    # class code -> wnid: the sorted classes (code = label), then wnids no train/ folder has
    codes: list[str] = field(default_factory=list, repr=False)
    _labels: dict[str, int] = field(default_factory=dict, repr=False)
    _spill: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def label(self, wnid: str) -> int:
        return self._codes()[wnid]

    def _codes(self) -> dict[str, int]:
        if not self._labels:
            self._labels.update((w, i) for i, w in enumerate(self.codes or self.wnids))
        return self._labels

    def code(self, wnid: str | None) -> int:
        """The class code of `wnid` (its label when it is a class; a new code past the classes
        when not), NO_LABEL for None."""
        if wnid is None:
            return NO_LABEL
        code = self._codes().get(wnid)
        if code is None:
            code = self._labels[wnid] = len(self.codes)
            self.codes.append(wnid)
        return code

    def close(self) -> None:
        self.items.clear()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None


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


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise OSError(e.errno, f"{display_path(str(folder))}: cannot list ({e.strerror}); fix its permissions "
                               "or mount and re-run") from None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _kind(entry: os.DirEntry) -> str:
    """"file", "dir", or a reject reason for anything else (symbolic links followed)."""
    try:
        if entry.is_symlink():
            mode = os.stat(entry.path).st_mode  # follows the link
            return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else _special(mode)
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
        return _special(entry.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:
        if entry.is_symlink():
            return f"broken symbolic link (to {display_path(os.readlink(entry.path))})"
        return "file"  # vanished since the listing: the encoder reports it
    except OSError:
        return "file"  # cannot stat now (permissions, I/O): the encoder retries and reports it


def _special(mode: int) -> str:
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    return f"not a regular file (a {kind})"


def _class_dirs(folder: Path) -> list[os.DirEntry]:
    """Class folders of train/ or a per-class val/: directories (or links to them) not named
    like an image."""
    if not folder.is_dir():
        return []
    return [e for e in _scan(folder) if not _is_image_name(e.name) and _kind(e) == "dir"]


def _val_labels(source: Path, root: Path, stems: list[str]) -> dict[str, str]:
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
        by_id = _wnid_list(list_path)
        ids = [int(t) for t in gt_path.read_text().split()]
        bad = next((i for i in ids if not 1 <= i <= len(by_id)), None)
        if bad is not None:
            raise ValueError(f"{gt_path}: names class ID {bad} but {list_path} lists {len(by_id)} wnids; "
                             "use the wnid list of the same devkit")
        labels = {}
        for stem in stems:
            m = _VAL_ID.search(stem)
            n = int(m.group(1)) if m else 0
            if 1 <= n <= len(ids):
                labels[stem] = by_id[ids[n - 1] - 1]
        return labels
    raise FileNotFoundError(
        f"{root / 'val'} is flat but has no labels: put {LOC_SOLUTION} beside val/ or in {source}, "
        f"or {GROUND_TRUTH} plus {WNID_LISTS[0]}"
    )


def _wnid_list(path: Path) -> list[str]:
    """The wnids of a list in ILSVRC2012_ID order. A list in sorted order is refused: the
    ground truth's IDs follow the devkit's order (meta.mat; ID 1 is n02119789, kit fox), and
    a sorted list (Caffe's synsets.txt, LOC_synset_mapping.txt) maps every val image to a
    wrong class without any error."""
    by_id = [w.strip() for w in path.read_text().split()]
    if len(set(by_id)) != len(by_id):
        raise ValueError(f"{path}: lists a wnid twice; it must hold each class once, in ILSVRC2012_ID order")
    if len(by_id) > 1 and by_id == sorted(by_id):
        raise ValueError(
            f"{path}: its wnids are in sorted order, but {GROUND_TRUTH} counts classes in the devkit's "
            f"ILSVRC2012_ID order (ID 1 is n02119789): every val label would be wrong. Use {WNID_LISTS[0]} "
            "written from the devkit's data/meta.mat (the WNID of ILSVRC2012_ID 1, 2, ... one per line), "
            f"or {LOC_SOLUTION}, or per-class val/<wnid>/ folders"
        )
    return by_id


def _rel(tree: SourceTree, path: str) -> str:
    root = str(tree.root)
    return path[len(root) + 1:] if path.startswith(root + os.sep) else os.path.relpath(path, root)


def _add(tree: SourceTree, split: str, entry: os.DirEntry, code: int, out: ListingWriter) -> None:
    rel = _rel(tree, entry.path)
    kind = _kind(entry)
    if kind == "dir":
        tree.rejects.append((rel, split, "a directory, not an image file (nothing in it is packed)"))
        return
    if kind != "file":
        tree.rejects.append((rel, split, kind))
        return
    stem, suffix = os.path.splitext(entry.name)
    if suffix.lower() not in IMAGE_SUFFIXES:
        tree.rejects.append((rel, split, f"not an image file name ({suffix or 'no extension'})"))
        return
    out.add(os.fsencode(rel), code, sample_key(stem))  # the same key twice gets _dup<n> at close


def _add_class(tree: SourceTree, split: str, folder: os.DirEntry, out: ListingWriter) -> None:
    code = tree.code(folder.name)
    for entry in _scan(Path(folder.path)):
        _add(tree, split, entry, code, out)


def _loose(tree: SourceTree, split: str, folder: Path, classes: list[os.DirEntry]) -> None:
    """Entries of train/ (or a per-class val/) that are not class folders: rejects."""
    names = {c.name for c in classes}
    for entry in _scan(folder):
        if entry.name not in names:
            tree.rejects.append((_rel(tree, entry.path), split,
                                 f"not in a class folder ({split}/<wnid>/)"))


def discover(source: Path, splits: tuple[str, ...] = ("train", "val"), spill_dir: Path | None = None) -> SourceTree:
    """List every input of `splits` under `source`, with its wnid (or a reject reason). The
    item lists are spilled to a new folder in `spill_dir` (default: the system's temporary
    folder, $TMPDIR), about 60 bytes of disk per item; `SourceTree.close()` removes it."""
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
    spill = tempfile.TemporaryDirectory(prefix="shards-listing-", dir=spill_dir)
    wnids = sorted(wnids)
    tree = SourceTree(root=root, wnids=wnids, names=names, spill_dir=Path(spill.name), codes=list(wnids),
                      _spill=spill)
    try:
        for split in splits:
            if split not in ("train", "val"):
                raise ValueError(f"--splits: unknown split {split!r} (use train, val)")
            out = ListingWriter(tree.spill_dir / f"{split}.arrow", split, tree.codes, len(wnids))
            _list_split(tree, source, root, split, train_dirs, out)
            tree.items[split] = out.close()
    except BaseException:
        tree.close()
        raise
    return tree


def _list_split(tree: SourceTree, source: Path, root: Path, split: str, train_dirs: list[os.DirEntry],
                out: ListingWriter) -> None:
    if split == "train":
        if not train_dirs:
            raise FileNotFoundError(f"{root / 'train'}: no class folders; pass --splits val or fix --source")
        _loose(tree, split, root / "train", train_dirs)
        for d in train_dirs:
            _add_class(tree, split, d, out)
        return
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: not found; pass --splits train or fix --source")
    class_dirs = _class_dirs(val_dir)
    if class_dirs:
        _loose(tree, split, val_dir, class_dirs)
        for d in class_dirs:
            _add_class(tree, split, d, out)
    else:
        entries = _scan(val_dir)
        labels = _val_labels(source, root, [os.path.splitext(e.name)[0] for e in entries])
        for e in entries:
            _add(tree, split, e, tree.code(labels.get(os.path.splitext(e.name)[0])), out)
