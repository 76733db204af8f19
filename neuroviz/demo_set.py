"""The demo probe set: real images that ship inside packages, so the app works offline.

Sources (each optional, see ``build_demo_set``):

* ``tuxpaint``: Debian ``tuxpaint-stamps-default``, photographic cut-outs (animals, food,
  plants, vehicles, household objects...). Each stamp's folder gives its category and its
  ``<name>.txt`` (first line: the English description) its label. The alpha is composited
  onto a uniform light grey (``BACKGROUND_RGB``).
* ``darknet``: Debian ``darknet``, the 7 photos in ``/usr/share/darknet/data``.
* ``opencv``: Debian ``opencv-doc``, the images in ``examples/data``.
* ``skimage``: scikit-image's bundled ``skimage.data`` samples (only those in the wheel; no
  pooch download is ever attempted).

The Debian packages are fetched with ``apt-get download`` (no install, no root needed on
most systems) and read with ``dpkg-deb --fsys-tarfile``; only the wanted files are
unpacked. When apt or dpkg is missing or a download fails, that source is left out and the
report says so in ``warnings``: the build itself still succeeds with what it has.

Output layout::

    dest/images/<source>/<category path>/<name>.png|.jpg   RGB, longest side <= max_side
    dest/metadata.csv      path,label,category,source,description  (written last)
    dest/BUILD_INFO.json   what was built, so a second call can return at once
    dest/licenses/         the packages' copyright files
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from .files import atomic_write_bytes
from .progress import Progress

__all__ = [
    "ALL_SOURCES",
    "BACKGROUND_RGB",
    "BUILD_VERSION",
    "DemoItem",
    "DemoSetReport",
    "build_demo_set",
    "composite_on_background",
    "crop_to_content",
    "fit_max_side",
    "is_alphabet_glyph",
    "read_demo_metadata",
    "read_tuxpaint_description",
    "scan_darknet",
    "scan_opencv",
    "scan_skimage",
    "scan_tuxpaint",
    "tuxpaint_label",
    "write_items",
]

# Bump when the output for the same inputs changes (labels, layout, background, ...), so an
# old cache/demo is rebuilt instead of silently reused.
BUILD_VERSION = 1

ALL_SOURCES: tuple[str, ...] = ("tuxpaint", "darknet", "opencv", "skimage")

# Light grey rather than white: white stamps (ghost, white flag, white cow) stay visible,
# and it is still a plain "product shot" backdrop that models see as background.
BACKGROUND_RGB: tuple[int, int, int] = (240, 240, 240)

# Below this (longest side, after cropping) an image carries too little for a probe
# (tuxpaint's 7-px party horn, music notes); bigger images are only ever shrunk.
MIN_SIDE = 32

# Margin added around a cut-out's content box, as a fraction of its longest side, so the
# object does not touch the frame (models' centre crops would clip it).
CROP_MARGIN = 0.05

JPEG_QUALITY = 90

METADATA_COLUMNS = ("path", "label", "category", "source", "description")


DEB_PACKAGES = {
    "tuxpaint": "tuxpaint-stamps-default",
    "darknet": "darknet",
    "opencv": "opencv-doc",
}

# Inside each .deb: the image folder, and which files of it to unpack (the rest of the
# package, e.g. tuxpaint's 7,800 .ogg sound files or opencv's HTML docs, is never written).
_TUX_ROOT = "usr/share/tuxpaint/stamps"
_DARKNET_ROOT = "usr/share/darknet/data"
_OPENCV_ROOT = "usr/share/doc/opencv-doc/examples/data"
_DEB_WANT: dict[str, Callable[[str], bool]] = {
    "tuxpaint": lambda n: n.startswith(_TUX_ROOT + "/") and n.lower().endswith((".png", ".txt", ".svg")),
    # Top level only: data/labels/ holds darknet's ASCII glyph sprites.
    "darknet": lambda n: n.startswith(_DARKNET_ROOT + "/") and "/" not in n[len(_DARKNET_ROOT) + 1 :]
    and n.lower().endswith((".jpg", ".jpeg", ".png")),
    "opencv": lambda n: n.startswith(_OPENCV_ROOT + "/") and "/" not in n[len(_OPENCV_ROOT) + 1 :]
    and n.lower().endswith((".jpg", ".jpeg", ".png")),
}

# A stamp's first-clause description is cut at these words: what follows is commentary
# ("A candy cane is a traditional...", "A stethoscope lets your doctor listen...").
_CLAUSE_WORDS = (
    r"is|are|was|were|to|that|which|who|like|used|resembles|lets|stands|means|carries|carry|"
    r"makes|gets|has|have|can|will|saw"
)
_LEADING_FILLERS = re.compile(
    r"^(?:(?:it's|it is|this is|these are|here is|a|an|the|some|(?:pair|head|plant|piece|bunch|couple) of)\s+)+",
    re.I,
)
# A clause starting with one of these is a sentence about the stamp, not its name
# ("Remember to flush the toilet", "With a fast APC like this Stryker...", "Our moon as...").
_NOT_A_NAME = frozenset(
    "remember with this that important our because until it there these those here when if down".split()
)
_LANG_LINE = re.compile(r"^[A-Za-z]{2,3}(?:_[A-Z]{2})?(?:@\w+)?\.utf8=")
_MAX_LABEL_WORDS = 6


@dataclass
class DemoSetReport:
    """What a build produced: the UI shows counts and warnings, the CLI prints them."""

    root: Path
    n_images: int
    by_source: dict[str, int]
    skipped: dict[str, int]
    warnings: list[str]


@dataclass(frozen=True)
class DemoItem:
    """One image to write: where it comes from and the metadata row it will get."""

    source: str
    category: str  # posix folder path, e.g. "animals/mammals/cats"
    name: str  # output file stem
    label: str
    description: str
    origin: Path  # the file to read
    is_cutout: bool = False  # crop to alpha content before compositing (tuxpaint stamps)
    ext: str = ".png"  # .jpg when the source was a JPEG photo, lossless .png otherwise


# --------------------------------------------------------------------------- image helpers


def composite_on_background(img: Image.Image, background: tuple[int, int, int] = BACKGROUND_RGB) -> Image.Image:
    """Flatten any PIL mode (RGBA, LA, P with transparency, L, I;16...) to RGB.

    Models take RGB; transparent pixels must become a deterministic plain colour rather
    than whatever RGB values happen to hide under alpha 0 (often black or noise).
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greys: Pillow's direct convert clips instead of scaling to 8 bit.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def crop_to_content(img: Image.Image, margin: float = CROP_MARGIN) -> Image.Image:
    """Crop a cut-out to its non-transparent box plus a small margin.

    Some stamps sit in a canvas far larger than the object; cropping makes the object,
    not empty background, fill what the model sees. Images without alpha are returned as is.
    """
    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:  # fully transparent: nothing to crop to
        return rgba
    x0, y0, x1, y1 = box
    pad = round(max(x1 - x0, y1 - y0) * margin)
    w, h = rgba.size
    return rgba.crop((max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)))


def fit_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longest side is at most ``max_side``, keeping aspect.

    Bounds disk use and decoding time; upscaling would only invent pixels.
    """
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------ tuxpaint helpers


def is_alphabet_glyph(rel_path: str | PurePosixPath) -> bool:
    """True for tuxpaint letter/number stamps, which the demo set leaves out.

    They are rendered glyphs, not objects: anything under ``symbols/alphabets`` (English,
    German, Spanish letters and the ASL hand-sign alphabet) plus single-character stamps
    such as ``symbols/math/7.png``.
    """
    p = PurePosixPath(str(rel_path).replace("\\", "/"))
    parts = [s.lower() for s in p.parts]
    if "alphabets" in parts[:-1]:
        return True
    return len(p.stem) == 1 and p.stem.isalnum()


def read_tuxpaint_description(txt_path: Path) -> str:
    """The English description of a stamp: the first line of its ``.txt``.

    The following ``xx.utf8=`` lines are translations; ``en``/``en_GB`` ones are used only
    if a file has no untagged first line.
    """
    lines = [ln.strip() for ln in txt_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    for ln in lines:
        if ln and not _LANG_LINE.match(ln):
            return ln
    for tag in ("en.utf8=", "en_GB.utf8=", "en_US.utf8=", "en_AU.utf8="):
        for ln in lines:
            if ln.startswith(tag) and ln[len(tag) :].strip():
                return ln[len(tag) :].strip()
    return ""


def _label_from_stem(stem: str) -> str:
    words = [w for w in re.split(r"[_\-\s]+", stem.lower()) if w and w != "mirror"]
    while len(words) > 1 and words[-1].isdigit():  # "candy_cane_2" -> "candy cane"
        words.pop()
    while len(words) > 1 and words[0].isdigit():  # "5_jupiter" -> "jupiter"
        words.pop(0)
    if words:  # "flower3" -> "flower", "001penny" -> "penny"
        words[-1] = re.sub(r"(?<=[a-z])\d+$", "", words[-1])
        words[0] = re.sub(r"^\d+(?=[a-z])", "", words[0])
    return " ".join(words) or stem


def tuxpaint_label(description: str, stem: str) -> str:
    """A short lower-case label ("cheetah", "red apple") from a stamp's description.

    Descriptions are sentences ("A cheetah.", "A “Stop” sign. Stop here, then go...");
    the dashboard needs a word or two. The first clause is kept, articles are dropped, and
    when that is still a long sentence the file name is used instead.
    """
    text = re.sub("[\"“”„«»‘`]", "", description.replace("’", "'")).strip()
    text = re.split(r"[.!?;:()\[\]—–|]|,\s|\s-\s", text, maxsplit=1)[0]
    text = re.split(rf"\s+(?:{_CLAUSE_WORDS})\s+", text, maxsplit=1, flags=re.I)[0]
    text = _LEADING_FILLERS.sub("", text.strip()).strip().lower()
    text = re.sub(r"\s+", " ", text)
    if not text or len(text.split()) > _MAX_LABEL_WORDS or text.split()[0] in _NOT_A_NAME:
        return _label_from_stem(stem)
    return text


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def scan_tuxpaint(stamps_root: Path) -> tuple[list[DemoItem], Counter[str]]:
    """List the usable stamps under a ``.../tuxpaint/stamps`` folder, and why others are left out.

    A separate step from writing so the skip rules can be tested on a synthetic folder.
    Skipped: letter/number glyphs, ``*_mirror.png`` (tuxpaint's pre-flipped duplicates),
    and stamps that exist only as SVG (no rasteriser is assumed to be installed).
    """
    items: list[DemoItem] = []
    skipped: Counter[str] = Counter()
    pngs = sorted(stamps_root.rglob("*.png"), key=lambda p: p.relative_to(stamps_root).as_posix())
    png_stems = {p.with_suffix("") for p in pngs}
    for svg in sorted(stamps_root.rglob("*.svg")):
        if svg.with_suffix("") not in png_stems and not is_alphabet_glyph(svg.relative_to(stamps_root).as_posix()):
            skipped["svg only (not rasterised)"] += 1
    for png in pngs:
        rel = PurePosixPath(png.relative_to(stamps_root).as_posix())
        if is_alphabet_glyph(rel):
            skipped["alphabet glyph"] += 1
            continue
        if png.stem.lower().endswith("_mirror"):
            skipped["mirrored duplicate"] += 1
            continue
        txt = png.with_suffix(".txt")
        description = read_tuxpaint_description(txt) if txt.is_file() else ""
        category = rel.parent.as_posix() if rel.parent != PurePosixPath(".") else "misc"
        items.append(
            DemoItem(
                source="tuxpaint",
                category=category,
                name=_safe_name(png.stem),
                label=tuxpaint_label(description, png.stem),
                description=description,
                origin=png,
                is_cutout=True,
            )
        )
    return items, skipped


# ------------------------------------------------------------------ darknet/opencv/skimage

# Darknet's sample photos, described by hand (the package has no captions).
_DARKNET_INFO: dict[str, tuple[str, str]] = {
    "dog": ("dog", "A dog next to a bicycle, with a pickup truck behind."),
    "eagle": ("eagle", "An eagle perched on a branch."),
    "giraffe": ("giraffe", "A giraffe and a zebra in the grass."),
    "horses": ("horses", "Horses in a field."),
    "kite": ("kite", "People flying kites on a beach."),
    "person": ("person", "A person with a dog and a horse."),
    "scream": ("the scream painting", "Edvard Munch's painting The Scream."),
}

# OpenCV's sample images: a readable label and a coarse category; unknown stems fall back
# to the cleaned file stem in category "misc".
_OPENCV_INFO: dict[str, tuple[str, str]] = {
    "Blender_Suzanne1": ("suzanne 3d render", "synthetic"),
    "Blender_Suzanne2": ("suzanne 3d render", "synthetic"),
    "HappyFish": ("cartoon fish", "art"),
    "LinuxLogo": ("linux logo", "logos"),
    "WindowsLogo": ("windows logo", "logos"),
    "aero1": ("aerial view of a city", "photos"),
    "aero3": ("aerial view of a city", "photos"),
    "aloeGT": ("aloe disparity map", "charts"),
    "aloeL": ("aloe plant", "photos"),
    "aloeR": ("aloe plant", "photos"),
    "apple": ("apple", "photos"),
    "baboon": ("baboon", "photos"),
    "basketball1": ("person with a basketball", "photos"),
    "basketball2": ("person with a basketball", "photos"),
    "blox": ("blocks render", "synthetic"),
    "board": ("circuit board", "photos"),
    "box": ("cookie box", "photos"),
    "box_in_scene": ("box in a cluttered scene", "photos"),
    "building": ("building", "photos"),
    "butterfly": ("butterfly", "photos"),
    "cards": ("playing cards", "synthetic"),
    "chessboard": ("chessboard pattern", "charts"),
    "chicky_512": ("dog", "photos"),
    "detect_blob": ("coloured shapes", "synthetic"),
    "digits": ("handwritten digits", "charts"),
    "ela_modified": ("notebook", "photos"),
    "ela_original": ("notebook", "photos"),
    "ellipses": ("noisy ellipses", "synthetic"),
    "fruits": ("fruits", "photos"),
    "gradient": ("gradient", "synthetic"),
    "graf1": ("graffiti", "photos"),
    "graf3": ("graffiti", "photos"),
    "home": ("palace", "photos"),
    "imageTextN": ("printed text", "text"),
    "imageTextR": ("printed text", "text"),
    "left": ("books", "photos"),
    "right": ("books", "photos"),
    "leuvenA": ("street with brick houses", "photos"),
    "leuvenB": ("street with brick houses", "photos"),
    "licenseplate_motion": ("car licence plate", "photos"),
    "mask": ("mask", "synthetic"),
    "messi5": ("footballer", "photos"),
    "ml": ("robot graduate cartoon", "art"),
    "notes": ("sheet music", "text"),
    "opencv-logo": ("opencv logo", "logos"),
    "opencv-logo-white": ("opencv logo", "logos"),
    "orange": ("orange", "photos"),
    "pca_test1": ("black shapes", "synthetic"),
    "pic1": ("shapes", "synthetic"),
    "pic2": ("noisy shapes", "synthetic"),
    "pic3": ("outlined shapes", "synthetic"),
    "pic4": ("textured shapes", "synthetic"),
    "pic5": ("shapes", "synthetic"),
    "pic6": ("shapes", "synthetic"),
    "rubberwhale1": ("toys", "photos"),
    "rubberwhale2": ("toys", "photos"),
    "smarties": ("sweets", "synthetic"),
    "squirrel_cls": ("squirrel", "photos"),
    "starry_night": ("the starry night painting", "art"),
    "stuff": ("desk items", "photos"),
    "sudoku": ("sudoku puzzle", "photos"),
    "templ": ("head silhouette", "synthetic"),
    "tmpl": ("template", "synthetic"),
    "text_defocus": ("blurred text", "text"),
    "text_motion": ("blurred text", "text"),
}

# The stereo-calibration series left01..right14: 26 near-identical one-channel shots of a
# chessboard. They add nothing for probing neurons over what chessboard.png already shows.
_OPENCV_CALIBRATION = re.compile(r"^(left|right)\d+$")

# Bundled skimage.data files (no pooch): file, label, category, description. Read directly
# from ``skimage.data.data_dir`` so nothing can trigger a download. motorcycle_right (the
# other half of a stereo pair) and the 14-px GIF are left out on purpose.
_SKIMAGE_INFO: tuple[tuple[str, str, str, str], ...] = (
    ("astronaut.png", "astronaut", "people", "Astronaut Eileen Collins (NASA portrait)."),
    ("brick.png", "brick wall", "textures", "A brick wall."),
    ("camera.png", "cameraman", "people", "A man with a camera on a tripod (the classic 'cameraman' image)."),
    ("cell.png", "cell", "microscopy", "A cell floating in saline."),
    ("chelsea.png", "cat", "animals", "Chelsea the cat."),
    ("chessboard_GRAY.png", "checkerboard", "synthetic", "A checkerboard pattern."),
    ("clock_motion.png", "clock", "objects", "A wall clock with motion blur."),
    ("coffee.png", "coffee cup", "food", "A cup of coffee on a saucer."),
    ("coins.png", "coins", "objects", "Greek coins from Pompeii."),
    ("color.png", "colour wheel", "synthetic", "A colour wheel."),
    ("grass.png", "grass", "textures", "Grass."),
    ("gravel.png", "gravel", "textures", "Gravel."),
    ("horse.png", "horse silhouette", "synthetic", "The silhouette of a horse."),
    ("hubble_deep_field.jpg", "galaxies", "space", "The Hubble eXtreme Deep Field."),
    ("ihc.png", "stained tissue", "microscopy", "Immunohistochemistry staining of colon tissue."),
    ("logo.png", "scikit-image logo", "logos", "The scikit-image logo."),
    ("microaneurysms.png", "retina detail", "microscopy", "Microaneurysms in a retina image."),
    ("moon.png", "moon surface", "space", "The surface of the moon."),
    ("motorcycle_left.png", "motorcycle", "vehicles", "A motorcycle (left view of a stereo pair)."),
    ("page.png", "printed page", "text", "A scanned page of text."),
    ("phantom.png", "shepp-logan phantom", "synthetic", "The Shepp-Logan phantom, a test image for tomography."),
    ("retina.jpg", "retina", "medical", "A photograph of a human retina."),
    ("rocket.jpg", "rocket", "vehicles", "A SpaceX Falcon 9 rocket on the launch pad."),
    ("text.png", "text", "text", "Text on a textured background."),
)


def _photo_ext(p: Path) -> str:
    return ".jpg" if p.suffix.lower() in (".jpg", ".jpeg") else ".png"


def scan_darknet(data_dir: Path) -> tuple[list[DemoItem], Counter[str]]:
    """Darknet's sample photos in ``data_dir`` (top level only), hand-labelled."""
    items: list[DemoItem] = []
    for p in sorted(data_dir.iterdir()):
        if not p.is_file() or p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        label, desc = _DARKNET_INFO.get(p.stem, (_label_from_stem(p.stem), ""))
        items.append(DemoItem("darknet", "photos", _safe_name(p.stem), label, desc, p, ext=_photo_ext(p)))
    return items, Counter()


def scan_opencv(data_dir: Path) -> tuple[list[DemoItem], Counter[str]]:
    """OpenCV's ``examples/data`` images, minus the one-channel calibration series."""
    items: list[DemoItem] = []
    skipped: Counter[str] = Counter()
    for p in sorted(data_dir.iterdir()):
        if not p.is_file() or p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        if _OPENCV_CALIBRATION.match(p.stem):
            skipped["calibration series"] += 1
            continue
        label, category = _OPENCV_INFO.get(p.stem, (_label_from_stem(p.stem), "misc"))
        desc = f"OpenCV sample image {p.name}."
        items.append(DemoItem("opencv", category, _safe_name(p.stem), label, desc, p, ext=_photo_ext(p)))
    return items, skipped


def scan_skimage() -> tuple[list[DemoItem], Counter[str], list[str]]:
    """scikit-image's bundled samples; a warning (not an error) when skimage is missing."""
    try:
        import skimage.data
    except Exception as exc:  # ImportError, or a broken install
        return [], Counter(), [f"scikit-image not importable ({exc}): its samples are left out"]
    data_dir = Path(skimage.data.data_dir)
    items: list[DemoItem] = []
    skipped: Counter[str] = Counter()
    for fname, label, category, desc in _SKIMAGE_INFO:
        p = data_dir / fname
        if not p.is_file():  # a future wheel may stop bundling it; never download
            skipped["skimage sample not bundled"] += 1
            continue
        items.append(DemoItem("skimage", category, _safe_name(p.stem), label, desc, p, ext=_photo_ext(p)))
    return items, skipped, []


# ------------------------------------------------------------------------- Debian fetching


def _fetch_deb(package: str, downloads: Path, progress: Progress | None) -> Path:
    """The cached ``.deb`` for ``package``, downloaded with ``apt-get download`` if absent.

    Raises RuntimeError with a readable reason when it cannot be had.
    """
    cached = sorted(downloads.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get not available")
    downloads.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0, 0, f"downloading {package}")
    cmd = ["apt-get", "download", "-q", package]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root apt drops to the _apt user, which cannot write into our folder.
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
    # Download into a scratch folder so an interrupted download never looks cached.
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".partial-") as tmp:
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"apt-get download {package} failed: {exc}") from exc
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if res.returncode != 0 or not got:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no .deb produced"]
            raise RuntimeError(f"apt-get download {package} failed: {tail[0]}")
        final = downloads / got[-1].name
        os.replace(got[-1], final)
    return final


def _extract_deb(deb: Path, out: Path, want: Callable[[str], bool]) -> int:
    """Unpack the regular files of ``deb`` whose path satisfies ``want`` into ``out``.

    Streams ``dpkg-deb --fsys-tarfile`` instead of ``dpkg -x``: tuxpaint's package is
    mostly sound files and opencv-doc mostly HTML, which we never need on disk.
    """
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb not available")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for m in tf:
                name = "/".join(s for s in PurePosixPath(m.name).parts if s not in (".", "/"))
                if not m.isfile() or ".." in name.split("/") or not want(name):
                    continue
                src = tf.extractfile(m)
                if src is None:
                    continue
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                n += 1
    except tarfile.TarError as exc:
        raise RuntimeError(f"cannot read {deb.name}: {exc}") from exc
    finally:
        if proc.stdout:
            proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"dpkg-deb failed on {deb.name}: {err.strip()[-200:]}")
    return n


# ---------------------------------------------------------------------------------- writing


def write_items(
    items: Sequence[DemoItem],
    dest: Path,
    max_side: int,
    progress: Progress | None = None,
) -> tuple[list[dict[str, str]], Counter[str]]:
    """Write each item as an RGB image under ``dest/images`` and return the metadata rows.

    Unreadable or too-small images are counted, not fatal: one bad file in a package must
    not sink the whole demo set.
    """
    rows: list[dict[str, str]] = []
    skipped: Counter[str] = Counter()
    used: set[str] = set()
    total = len(items)
    for i, it in enumerate(items):
        try:
            with Image.open(it.origin) as im:
                im.load()
                img = crop_to_content(im) if it.is_cutout else im.copy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            skipped["unreadable"] += 1
            if progress:
                progress(i + 1, total, f"unreadable: {it.origin.name}")
            continue
        if max(img.size) < MIN_SIDE:
            skipped[f"too small (<{MIN_SIDE} px)"] += 1
            if progress:
                progress(i + 1, total, f"too small: {it.origin.name}")
            continue
        rgb = fit_max_side(composite_on_background(img), max_side)
        rel = PurePosixPath("images", it.source, it.category, it.name + it.ext)
        k = 2
        while rel.as_posix().lower() in used:  # same stem twice in a folder (case-insensitive FS safe)
            rel = PurePosixPath("images", it.source, it.category, f"{it.name}_{k}{it.ext}")
            k += 1
        used.add(rel.as_posix().lower())
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if it.ext == ".jpg":
            rgb.save(target, "JPEG", quality=JPEG_QUALITY)
        else:
            rgb.save(target, "PNG")
        rows.append(
            {
                "path": rel.as_posix(),
                "label": it.label,
                "category": it.category,
                "source": it.source,
                "description": it.description,
            }
        )
        if progress:
            progress(i + 1, total, rel.as_posix())
    return rows, skipped


def _write_csv(path: Path, rows: Iterable[dict[str, str]]) -> None:
    buffer = io.StringIO(newline="")
    w = csv.DictWriter(buffer, fieldnames=list(METADATA_COLUMNS))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def _write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _build_key(sources: Sequence[str], max_side: int) -> dict[str, object]:
    return {"version": BUILD_VERSION, "sources": sorted(sources), "max_side": int(max_side)}


def _cached_report(dest: Path, key: dict[str, object]) -> DemoSetReport | None:
    info_path, meta_path = dest / "BUILD_INFO.json", dest / "metadata.csv"
    if not (info_path.is_file() and meta_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in key.items()):
        return None
    return DemoSetReport(
        root=dest,
        n_images=int(info.get("n_images", 0)),
        by_source=dict(info.get("by_source", {})),
        skipped=dict(info.get("skipped", {})),
        warnings=list(info.get("warnings", [])),
    )


# ------------------------------------------------------------------------------ public API


def build_demo_set(
    dest: Path,
    sources: Sequence[str] = ALL_SOURCES,
    max_side: int = 512,
    progress: Callable[[int, int, str], None] | None = None,
    force: bool = False,
) -> DemoSetReport:
    """Build (or reuse) the demo probe set in ``dest`` so the app has real images offline.

    Returns at once when ``dest`` already holds a finished build of the same sources,
    ``max_side`` and ``BUILD_VERSION`` (also when that build had warnings, e.g. a failed
    download: pass ``force=True`` to try again). ``progress(done, total, message)`` is called
    per image; ``total`` is 0 while packages are still being fetched. Debian ``.deb`` files
    are cached in ``dest.parent / "downloads"``; the unpacked files are deleted afterwards.
    """
    dest = Path(dest)
    sources = list(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in ALL_SOURCES]
    if unknown:
        raise ValueError(f"unknown demo-set source(s) {unknown}; choose from {list(ALL_SOURCES)}")
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be at least {MIN_SIDE}")
    key = _build_key(sources, max_side)
    if not force:
        cached = _cached_report(dest, key)
        if cached is not None:
            return cached
    dest.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        # Another process (a second Streamlit session, the CLI) may have finished the same
        # build while we waited for the lock.
        if not force:
            cached = _cached_report(dest, key)
            if cached is not None:
                return cached
        return _build(dest, sources, key, max_side, progress)


@contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """Serialise builds of one ``dest``: two concurrent builds would delete each other's images."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, builds are rare enough
        yield
        return
    with open(dest / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(
    dest: Path, sources: list[str], key: dict[str, object], max_side: int, progress: Progress | None
) -> DemoSetReport:
    t0 = time.monotonic()
    # Un-finish the old build first: if we are killed from here on, metadata.csv is absent
    # and the next call rebuilds instead of trusting a half-written images/ folder.
    for stale in (dest / "metadata.csv", dest / "BUILD_INFO.json"):
        stale.unlink(missing_ok=True)
    for stale_dir in (dest / "images", dest / "licenses"):
        if stale_dir.exists():
            shutil.rmtree(stale_dir)

    downloads = dest.parent / "downloads"
    # Left behind only by a killed build; never trusted, just removed.
    for leftover in sorted(downloads.glob(".partial-*")) + sorted(downloads.glob(".unpacked-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    warnings: list[str] = []
    skipped: Counter[str] = Counter()
    items: list[DemoItem] = []
    packages: dict[str, str] = {}

    with ExitStack() as stack:
        scratch: Path | None = None
        for source in sources:
            if source == "skimage":
                got, skip, warn = scan_skimage()
                items += got
                skipped += skip
                warnings += warn
                if got:
                    _copy_license(Path(got[0].origin).parent / "README.txt", dest, "scikit-image-data.README.txt")
                continue
            package = DEB_PACKAGES[source]
            try:
                deb = _fetch_deb(package, downloads, progress)
                if scratch is None:
                    # Next to the .deb cache rather than in /tmp, which may be a small tmpfs.
                    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=downloads, prefix=".unpacked-")))
                if progress:
                    progress(0, 0, f"unpacking {deb.name}")
                out = scratch / source
                doc = f"usr/share/doc/{package}/copyright"
                _extract_deb(deb, out, _want_with(_DEB_WANT[source], doc))
            except RuntimeError as exc:
                warnings.append(f"{source}: {exc}; the demo set is built without it")
                continue
            packages[source] = deb.name
            _copy_license(out / doc, dest, f"{package}.copyright")
            if source == "tuxpaint":
                got, skip = scan_tuxpaint(out / _TUX_ROOT) if (out / _TUX_ROOT).is_dir() else ([], Counter())
            elif source == "darknet":
                got, skip = scan_darknet(out / _DARKNET_ROOT) if (out / _DARKNET_ROOT).is_dir() else ([], Counter())
            else:
                got, skip = scan_opencv(out / _OPENCV_ROOT) if (out / _OPENCV_ROOT).is_dir() else ([], Counter())
            if not got:
                warnings.append(f"{source}: no images found in {deb.name}")
            items += got
            skipped += skip

        failed = [s for s in sources if s in DEB_PACKAGES and s not in packages]
        if failed and not packages and "skimage" in sources:
            warnings.append("no Debian package could be fetched: the demo set uses scikit-image samples only")

        rows, skip = write_items(items, dest, max_side, progress)
        skipped += skip
    # (the scratch folder with the unpacked packages is gone here)

    by_source = {s: sum(1 for r in rows if r["source"] == s) for s in sources}
    if not rows:
        warnings.append("the demo set is empty: no source produced any image")
    report = DemoSetReport(
        root=dest, n_images=len(rows), by_source=by_source, skipped=dict(sorted(skipped.items())), warnings=warnings
    )
    info = {
        **key,
        **{k: v for k, v in asdict(report).items() if k != "root"},
        "packages": packages,
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    _write_json(dest / "BUILD_INFO.json", info)
    # Last: its presence (with a matching BUILD_INFO.json) is what marks the build finished.
    _write_csv(dest / "metadata.csv", rows)
    return report


def _want_with(want: Callable[[str], bool], extra: str) -> Callable[[str], bool]:
    return lambda name: name == extra or want(name)


def _copy_license(src: Path, dest: Path, name: str) -> None:
    if src.is_file():
        (dest / "licenses").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / "licenses" / name)


def read_demo_metadata(root: Path) -> list[dict[str, str]]:
    """The rows of ``root/metadata.csv`` (path relative to root, label, category, source, description).

    Raises FileNotFoundError when the set has not been (completely) built.
    """
    with open(Path(root) / "metadata.csv", newline="", encoding="utf-8") as fh:
        return [dict(r) for r in csv.DictReader(fh)]
