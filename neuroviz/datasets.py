"""Probe sets: the images a model is probed with.

A probe set comes from an image folder (recursive, any format PIL reads), a text or CSV
list of paths, or the embedded demo set. Image ids are content hashes, so renaming or
moving a file does not invalidate the cache, and the set's id is a hash of its sorted
image ids. Corrupt, truncated, non-image and huge files, broken or looping links and
special files (FIFOs, sockets, devices: never opened, a FIFO would block) are skipped,
counted and reported. Whether a file that PIL cannot open is a damaged image or no image at
all is asked of PIL's own format plug-ins (does any claim its first bytes?).

16-bit and floating-point images (scientific PNGs, TIFFs) are scaled to 8 bits by their
range rather than clipped (a plain ``convert("RGB")`` turns nearly every 16-bit pixel white).
File names that are not UTF-8 are kept as Python keeps them (surrogate escapes, lossless);
:func:`display_path` is their readable form.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import NeurovizError
from .files import atomic_write_json
from .progress import Progress
from .provenance import hash_bytes, provenance_key
from .store import CacheLayout

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # PIL's 32-bit int, float and 16-bit greyscale


class ProbeSetError(NeurovizError, ValueError):
    """A probe set that cannot be opened (missing path, no images); the message says why."""


class UnusableImage(ValueError):
    """An image PIL decodes but whose pixels cannot be shown (e.g. no finite value); the message is the skip reason."""


def display_path(path: str | Path) -> str:
    """A path as readable text: bytes of a non-UTF-8 name (kept as surrogate escapes) shown as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
    """Open an image as RGB (see :func:`to_rgb`)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: transparent ones composited onto white, not black;
    16-bit and float ones scaled by their range (:func:`eight_bit`), not clipped."""
    if img.mode in HIGH_DEPTH_MODES:
        img = eight_bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image as 8-bit greyscale ("L").

    Values already within 0..255 are kept, floats within 0..1 are stretched to 0..255 (their
    usual meaning), anything else is scaled from its own minimum to its maximum. Non-finite
    pixels become 0; an image with no finite pixel is refused (:class:`UnusableImage`).
    """
    values = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise UnusableImage("no finite pixel values")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def file_problem(path: Path) -> str | None:
    """Why ``path`` is no regular file to read (a skip reason), or None when it is one.
    Never opens the file: a FIFO would block."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "looping link"
        if path.is_symlink():
            return "broken link"
        return "missing file" if exc.errno == errno.ENOENT else "unreadable file"
    if stat.S_ISDIR(info.st_mode):
        return "folder"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (FIFO, socket or device)"
    return None


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(content hash, None) for a readable image, (None, reason) for one to skip."""
    problem = file_problem(path)
    if problem:
        return None, problem
    size = path.stat().st_size
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
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    return None, "huge image"
                img.load()
                if img.mode in HIGH_DEPTH_MODES:
                    eight_bit(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "huge image"
    except UnidentifiedImageError:
        return None, "corrupt or truncated image" if claimed_by_an_image_format(data[:64]) else "not an image"
    except UnusableImage as exc:
        return None, f"unusable image ({exc})"
    except (OSError, SyntaxError, ValueError, EOFError):
        return None, "corrupt or truncated image"
    return hash_bytes(data), None


def claimed_by_an_image_format(header: bytes) -> bool:
    """Whether any of PIL's format plug-ins recognises these first bytes (its own signature tests)."""
    Image.init()
    for _, accept in Image.OPEN.values():
        try:
            if accept is not None and accept(header):
                return True
        except Exception:  # a plug-in's test that does not expect so short or odd a header
            continue
    return False


def looks_like_an_image(path: Path) -> bool:
    """Whether PIL recognises the first bytes of the file (for refusing an image given as a list)."""
    try:
        with open(path, "rb") as fh:
            return claimed_by_an_image_format(fh.read(64))
    except OSError:
        return False


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
        else:
            image_id, reason = check_image(path)
        if stamp:
            new_memo[stamp] = [image_id, reason]
        if reason:
            skipped.setdefault(reason, []).append(str(path))
        elif image_id not in images:
            images[image_id] = ProbeImage(image_id, str(path.resolve()), display_path(label))  # a label is text
        else:
            skipped.setdefault("duplicate content", []).append(str(path))
        if progress and (i % 25 == 0 or i == len(entries) - 1):
            progress(i + 1, len(entries), f"checking {display_path(path.name)}")
    if memo_path is not None and new_memo != memo:
        atomic_write_json(memo_path, new_memo)
    ordered = sorted(images.values(), key=lambda im: im.image_id)
    if not ordered:
        raise ProbeSetError(f"No readable images in {display_path(source)} ({sum(len(v) for v in skipped.values())} files skipped).")
    return ProbeSet(name, source, ordered, skipped)


def from_folder(root: str | Path, cache_dir: Path | None = None, progress: Progress | None = None) -> ProbeSet:
    """Every file under ``root`` (recursively) that PIL can read; label = parent folder path.

    Every entry that is not a folder is checked, so broken links and special files are
    counted among the skipped; links to folders are not followed (a loop would never end)
    and are reported too. Hidden files (``.name``) are left out.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ProbeSetError(f"Probe folder not found: {display_path(root)}")
    entries: list[tuple[Path, str]] = []
    folder_links: list[str] = []
    for p in sorted(p for p in root.rglob("*") if not p.name.startswith(".")):
        if p.is_dir():
            if p.is_symlink():
                folder_links.append(str(p))
            continue
        entries.append((p, str(p.parent.relative_to(root)) if p.parent != root else ""))
    probe_set = _scan(display_path(root.name), f"folder:{root.resolve()}", entries, cache_dir, progress)
    if folder_links:
        probe_set.skipped["link to a folder (not followed)"] = folder_links
    return probe_set


def from_list(list_file: str | Path, cache_dir: Path | None = None, progress: Progress | None = None) -> ProbeSet:
    """A .txt (one path per line) or .csv (columns ``path`` and optional ``label``) of images.

    Relative paths are taken relative to the list file's folder.
    """
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise ProbeSetError(f"Image list not found: {display_path(list_file)}")
    if looks_like_an_image(list_file):
        raise ProbeSetError(f"{display_path(list_file)} is an image, not a probe set: give its folder, "
                            "or a .txt/.csv list of image paths.")
    base = list_file.parent
    entries: list[tuple[Path, str]] = []
    if list_file.suffix.lower() == ".csv":  # bytes that are not UTF-8 are kept (surrogate escapes): they name files
        with open(list_file, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ProbeSetError(f"{list_file} needs a 'path' column (and optionally 'label').")
            for row in reader:
                entries.append((base / row["path"], row.get("label") or ""))
    else:
        text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
        if "\0" in text:
            raise ProbeSetError(f"{display_path(list_file)} is not a text list of image paths (it holds binary data).")
        for line in text.splitlines():
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
    raise ProbeSetError(f"Probe set '{display_path(spec)}' is neither 'demo', a folder, nor a .txt/.csv list of images.")
