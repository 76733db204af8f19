"""Probe sets: the images a model is probed with.

A probe set comes from an image folder (recursive, any format PIL reads), a text or CSV
list of paths, or the embedded demo set. Image ids are content hashes, so renaming or
moving a file does not invalidate the cache, and the set's id is a hash of its sorted
image ids. Corrupt, truncated, non-image and huge files are skipped, counted and reported.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import NeurovizError
from .files import atomic_write_json
from .progress import Progress
from .provenance import hash_bytes, provenance_key
from .store import CacheLayout

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000


class ProbeSetError(NeurovizError, ValueError):
    """A probe set that cannot be opened (missing path, no images); the message says why."""


@dataclass(frozen=True)
class ProbeImage:
    image_id: str
    path: str
    label: str = ""


@dataclass
class ProbeSet:
    """An ordered, de-duplicated list of valid images plus what was skipped and why."""

    name: str
    source: str
    images: list[ProbeImage]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return provenance_key([im.image_id for im in self.images])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def skipped_summary(self) -> str:
        if not self.skipped:
            return "no files skipped"
        return ", ".join(f"{len(v)} {reason}" for reason, v in sorted(self.skipped.items()))

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.images[index].path)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; transparent images are composited onto white, not black."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(content hash, None) for a readable image, (None, reason) for one to skip."""
    try:
        size = path.stat().st_size
    except OSError:
        return None, "unreadable file"
    if size == 0:
        return None, "empty file"
    if size > MAX_FILE_BYTES:
        return None, "huge file"
    try:
        data = path.read_bytes()
    except OSError:
        return None, "unreadable file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            import io

            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    return None, "huge image"
                img.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "corrupt or truncated image" if _looks_like_image(path) else "not an image"
    except (OSError, SyntaxError, ValueError, EOFError):
        return None, "corrupt or truncated image"
    return hash_bytes(data), None


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES


def _scan(name: str, source: str, entries: list[tuple[Path, str]], cache_dir: Path | None, progress: Progress | None) -> ProbeSet:
    """Validate and hash files; results are remembered per (path, size, mtime) in cache_dir."""
    memo: dict[str, list] = {}
    memo_path = None
    if cache_dir is not None:
        memo_path = CacheLayout(cache_dir).scan_memo_path(provenance_key(source))
        if memo_path.exists():
            try:
                memo = json.loads(memo_path.read_text())
            except (OSError, ValueError):
                memo = {}
    images: dict[str, ProbeImage] = {}
    skipped: dict[str, list[str]] = {}
    new_memo: dict[str, list] = {}
    for i, (path, label) in enumerate(entries):
        try:
            st = path.stat()
            stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = None
        if stamp and stamp in memo:
            image_id, reason = memo[stamp]
        elif not path.exists():
            image_id, reason = None, "missing file"
        else:
            image_id, reason = check_image(path)
        if stamp:
            new_memo[stamp] = [image_id, reason]
        if reason:
            skipped.setdefault(reason, []).append(str(path))
        elif image_id not in images:
            images[image_id] = ProbeImage(image_id, str(path.resolve()), label)
        else:
            skipped.setdefault("duplicate content", []).append(str(path))
        if progress and (i % 25 == 0 or i == len(entries) - 1):
            progress(i + 1, len(entries), f"checking {path.name}")
    if memo_path is not None and new_memo != memo:
        atomic_write_json(memo_path, new_memo)
    ordered = sorted(images.values(), key=lambda im: im.image_id)
    if not ordered:
        raise ProbeSetError(f"No readable images in {source} ({sum(len(v) for v in skipped.values())} files skipped).")
    return ProbeSet(name, source, ordered, skipped)


def from_folder(root: str | Path, cache_dir: Path | None = None, progress: Progress | None = None) -> ProbeSet:
    """Every file under ``root`` (recursively) that PIL can read; label = parent folder path."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ProbeSetError(f"Probe folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    entries = [(p, str(p.parent.relative_to(root)) if p.parent != root else "") for p in files]
    return _scan(root.name, f"folder:{root.resolve()}", entries, cache_dir, progress)


def from_list(list_file: str | Path, cache_dir: Path | None = None, progress: Progress | None = None) -> ProbeSet:
    """A .txt (one path per line) or .csv (columns ``path`` and optional ``label``) of images.

    Relative paths are taken relative to the list file's folder.
    """
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise ProbeSetError(f"Image list not found: {list_file}")
    base = list_file.parent
    entries: list[tuple[Path, str]] = []
    if list_file.suffix.lower() == ".csv":
        with open(list_file, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ProbeSetError(f"{list_file} needs a 'path' column (and optionally 'label').")
            for row in reader:
                entries.append((base / row["path"], row.get("label") or ""))
    else:
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((base / line, ""))
    return _scan(list_file.stem, f"list:{list_file.resolve()}", entries, cache_dir, progress)


def from_demo(cache_dir: Path, progress: Progress | None = None) -> ProbeSet:
    """The embedded demo set built by ``python -m neuroviz demo-set`` (labels from metadata.csv)."""
    root = CacheLayout(cache_dir).demo_dir()
    meta = root / "metadata.csv"
    if not meta.exists():
        raise ProbeSetError("The demo set is not built yet. Run `python -m neuroviz demo-set` (the README's setup does it).")
    with open(meta, newline="") as fh:
        rows = list(csv.DictReader(fh))
    entries = [(root / r["path"], r.get("label") or "") for r in rows]
    ps = _scan("demo", f"demo:{root.resolve()}", entries, cache_dir, progress)
    ps.name = "demo"
    return ps


def open_probe_set(spec: str, cache_dir: Path, progress: Progress | None = None) -> ProbeSet:
    """``demo``, an image folder, or a .txt/.csv list of image paths."""
    if spec == "demo":
        return from_demo(cache_dir, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return from_folder(path, cache_dir, progress)
    if path.is_file():
        return from_list(path, cache_dir, progress)
    raise ProbeSetError(f"Probe set '{spec}' is neither 'demo', a folder, nor a .txt/.csv list of images.")
