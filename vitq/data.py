"""Labeled image folders: ``labels.csv`` (``file,label[,synset]``) or the ImageFolder layout (``class_x/img.jpg``).

Torch-free: images are decoded with Pillow and preprocessed by :mod:`vitq.runtime.preprocess`, the same code the
runtime uses, so calibration, evaluation and serving see identical tensors.
"""

from __future__ import annotations

import csv
import hashlib
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import DataError, InputError
from .runtime.preprocess import PreprocessConfig, load_image, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


@dataclass
class ImageSet:
    """An ordered list of image files with optional integer labels."""

    root: Path
    files: list[Path]
    labels: list[int] | None
    layout: str  # "labels.csv" | "imagefolder" | "flat"
    skipped: list[str] = field(default_factory=list)  # "file: reason" for images skipped with skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, count: int | None, seed: int = 0) -> "ImageSet":
        """A deterministic subset of ``count`` images (seeded choice, original order kept). ``None``: all."""
        if count is None or count >= len(self.files):
            return self
        if count <= 0:
            raise InputError(f"image count must be positive, got {count}")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self.files), size=count, replace=False))
        return ImageSet(self.root, [self.files[i] for i in idx],
                        [self.labels[i] for i in idx] if self.labels is not None else None, self.layout)

    def fingerprint(self) -> str:
        """sha256 over relative file names and labels (not pixel data): identifies the calibration/eval set."""
        h = hashlib.sha256()
        for i, f in enumerate(self.files):
            h.update(str(f.relative_to(self.root)).encode())
            h.update(b"\t" + (str(self.labels[i]).encode() if self.labels is not None else b"-") + b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"dir": str(self.root), "layout": self.layout, "count": len(self.files),
                "labeled": self.labels is not None, "sha256": self.fingerprint(), "skipped": len(self.skipped)}


def open_image_set(root: str | Path) -> ImageSet:
    """Find the images under ``root``: ``labels.csv`` first, else ImageFolder (one subfolder per class, classes
    sorted by name as torchvision does), else a flat folder of unlabeled images."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"image folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"not a directory: {root} (expected an image folder)")
    csv_path = root / "labels.csv"
    if csv_path.is_file():
        return _from_labels_csv(root, csv_path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        files, labels = [], []
        for ci, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(ci)
        if files:
            return ImageSet(root, files, labels, "imagefolder")
    flat = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not flat:
        raise DataError(f"no images found in {root} (expected labels.csv, class subfolders, or image files)")
    return ImageSet(root, flat, None, "flat")


def _from_labels_csv(root: Path, csv_path: Path) -> ImageSet:
    files, labels = [], []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or [h.strip().lower() for h in header[:2]] != ["file", "label"]:
            raise DataError(f"{csv_path}: first line must be the header 'file,label[,synset]', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected 'file,label', got {row!r}")
            name, lab = row[0].strip(), row[1].strip()
            try:
                label = int(lab)
            except ValueError:
                raise DataError(f"{csv_path}:{lineno}: label {lab!r} is not an integer") from None
            p = root / name
            if not p.is_file():
                # labels.csv written relative to the folder, images sometimes in images/
                alt = root / "images" / name
                if alt.is_file():
                    p = alt
                else:
                    raise DataError(f"{csv_path}:{lineno}: image file {name!r} not found under {root}")
            files.append(p)
            labels.append(label)
    if not files:
        raise DataError(f"{csv_path}: no images listed")
    return ImageSet(root, files, labels, "labels.csv")


def iter_batches(images: ImageSet, cfg: PreprocessConfig, batch_size: int, *, skip_bad: bool = False,
                 prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[Path]]]:
    """Yield ``(x [B,3,H,W] float32, labels [B] or None, paths)``. Decoding runs in a background thread so it
    overlaps with inference. A corrupt image raises :class:`DataError` naming it, unless ``skip_bad`` (then it is
    recorded in ``images.skipped``)."""
    if batch_size <= 0:
        raise InputError(f"batch size must be positive, got {batch_size}")
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def producer():
        try:
            xs, ys, ps = [], [], []
            for i, f in enumerate(images.files):
                if stop.is_set():
                    return
                try:
                    x = preprocess(load_image(f), cfg)
                except DataError as e:
                    if not skip_bad:
                        raise
                    images.skipped.append(f"{f}: {e}")
                    continue
                xs.append(x)
                ps.append(f)
                if images.labels is not None:
                    ys.append(images.labels[i])
                if len(xs) == batch_size:
                    q.put((np.stack(xs), np.asarray(ys, np.int64) if ys else None, ps))
                    xs, ys, ps = [], [], []
            if xs:
                q.put((np.stack(xs), np.asarray(ys, np.int64) if ys else None, ps))
            q.put(None)
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # drain so the producer can exit
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


def load_array(images: ImageSet, cfg: PreprocessConfig, *, skip_bad: bool = False,
               progress: bool = False, desc: str = "images") -> tuple[np.ndarray, np.ndarray | None]:
    """All images of a (small) set as one array ``[N,3,H,W]`` plus labels."""
    from .progress import progress_bar

    xs, ys = [], []
    with progress_bar(total=len(images), desc=desc, unit="img", enable=progress) as bar:
        for x, y, _ in iter_batches(images, cfg, 32, skip_bad=skip_bad):
            xs.append(x)
            if y is not None:
                ys.append(y)
            bar.update(len(x))
    if not xs:
        raise DataError(f"no readable images in {images.root}")
    return np.concatenate(xs), (np.concatenate(ys) if ys else None)
