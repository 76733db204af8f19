"""Demo set builder: the skimage-only build end to end, idempotency, and the image/label
helpers on small synthetic stamps (so no test needs the 161 MB tuxpaint download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from neuroviz import demo_set
from neuroviz.demo_set import (
    BACKGROUND_RGB,
    MIN_SIDE,
    DemoSetReport,
    build_demo_set,
    composite_on_background,
    crop_to_content,
    fit_max_side,
    is_alphabet_glyph,
    read_demo_metadata,
    read_tuxpaint_description,
    scan_opencv,
    scan_tuxpaint,
    tuxpaint_label,
    write_items,
)

OLD = 1_000_000_000  # a fixed past mtime, so "was it rewritten?" does not hinge on clock resolution


def _image_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "images").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def skimage_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSetReport]:
    dest = tmp_path_factory.mktemp("demo") / "demo"
    return dest, build_demo_set(dest, sources=("skimage",), max_side=128)


# ------------------------------------------------------------------------ skimage-only build


def test_skimage_build_writes_rgb_images_matching_metadata(skimage_build: tuple[Path, DemoSetReport]) -> None:
    dest, report = skimage_build
    rows = read_demo_metadata(dest)
    assert report.root == dest
    assert report.n_images == len(rows) >= 15
    assert report.by_source == {"skimage": len(rows)}
    assert report.warnings == []
    assert {r["path"] for r in rows} == _image_files(dest)
    assert list(rows[0]) == ["path", "label", "category", "source", "description"]
    for r in rows:
        assert r["source"] == "skimage" and r["label"] and r["category"]
        with Image.open(dest / r["path"]) as im:
            assert im.mode == "RGB"
            assert max(im.size) <= 128
    assert (dest / "licenses" / "scikit-image-data.README.txt").is_file()


def test_chelsea_is_labelled_cat(skimage_build: tuple[Path, DemoSetReport]) -> None:
    dest, _ = skimage_build
    chelsea = [r for r in read_demo_metadata(dest) if "chelsea" in r["path"]]
    assert len(chelsea) == 1
    assert "cat" in chelsea[0]["label"]


def test_second_build_is_a_no_op(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    first = build_demo_set(dest, sources=("skimage",), max_side=64)
    files = [dest / "metadata.csv", dest / "BUILD_INFO.json", *(dest / p for p in _image_files(dest))]
    for f in files:
        os.utime(f, (OLD, OLD))

    calls: list[tuple[int, int, str]] = []
    second = build_demo_set(dest, sources=("skimage",), max_side=64, progress=lambda *a: calls.append(a))
    assert second == first
    assert calls == []  # nothing was processed
    assert all(f.stat().st_mtime == OLD for f in files)

    # A different request, or force=True, rebuilds.
    build_demo_set(dest, sources=("skimage",), max_side=64, force=True)
    assert (dest / "metadata.csv").stat().st_mtime != OLD


def test_unfinished_build_is_redone(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    build_demo_set(dest, sources=("skimage",), max_side=64)
    # What a build killed before its last step leaves: images and BUILD_INFO, no metadata.csv.
    (dest / "metadata.csv").unlink()
    stray = dest / "images" / "skimage" / "stray.png"
    Image.new("RGB", (40, 40)).save(stray)
    with pytest.raises(FileNotFoundError):
        read_demo_metadata(dest)
    report = build_demo_set(dest, sources=("skimage",), max_side=64)
    assert not stray.exists()
    assert len(read_demo_metadata(dest)) == report.n_images > 0


def test_progress_reaches_total(tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    report = build_demo_set(tmp_path / "demo", sources=("skimage",), max_side=48, progress=lambda *a: calls.append(a))
    done, total, _ = calls[-1]
    assert done == total == report.n_images + sum(report.skipped.values())


def test_without_apt_falls_back_to_skimage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = demo_set.shutil.which
    monkeypatch.setattr(demo_set.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    report = build_demo_set(tmp_path / "demo", sources=("tuxpaint", "skimage"), max_side=48)
    assert report.by_source["tuxpaint"] == 0
    assert report.by_source["skimage"] == report.n_images > 0
    assert any("apt-get not available" in w for w in report.warnings)
    assert any("scikit-image samples only" in w for w in report.warnings)
    assert not (tmp_path / "downloads").exists() or not list((tmp_path / "downloads").glob("*.deb"))


def test_unknown_source_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        build_demo_set(tmp_path / "demo", sources=("flickr",))


# ----------------------------------------------------------------------------- image helpers


def _rgba_stamp(size: tuple[int, int], box: tuple[int, int, int, int], color=(200, 30, 30, 255)) -> Image.Image:
    im = Image.new("RGBA", size, (0, 0, 0, 0))  # black under alpha 0, which must not leak out
    im.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    return im


def test_composite_fills_transparency_with_background() -> None:
    im = _rgba_stamp((10, 10), (2, 2, 6, 6))
    im.putpixel((8, 8), (0, 0, 255, 128))  # half-transparent blue
    out = composite_on_background(im)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == BACKGROUND_RGB
    assert out.getpixel((3, 3)) == (200, 30, 30)
    px = out.getpixel((8, 8))
    assert isinstance(px, tuple)
    r, _, b = px
    assert abs(r - BACKGROUND_RGB[0] / 2) <= 2 and abs(b - (255 + BACKGROUND_RGB[2]) / 2) <= 2


def test_composite_handles_la_and_palette_transparency() -> None:
    la = Image.new("LA", (4, 4), (90, 0))
    la.putpixel((1, 1), (90, 255))
    out = composite_on_background(la)
    assert out.getpixel((0, 0)) == BACKGROUND_RGB and out.getpixel((1, 1)) == (90, 90, 90)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.putpixel((2, 2), 1)
    pal.info["transparency"] = 0
    out = composite_on_background(pal)
    assert out.getpixel((0, 0)) == BACKGROUND_RGB and out.getpixel((2, 2)) == (10, 200, 10)

    assert composite_on_background(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_crop_to_content_keeps_object_and_small_margin() -> None:
    im = _rgba_stamp((200, 100), (50, 40, 150, 60))  # 100x20 object
    out = crop_to_content(im)
    assert out.size == (100 + 2 * 5, 20 + 2 * 5)  # 5% of the longest side each way
    assert crop_to_content(Image.new("RGB", (30, 20))).size == (30, 20)  # no alpha: untouched


def test_fit_max_side_only_shrinks() -> None:
    assert fit_max_side(Image.new("RGB", (1000, 500)), 512).size == (512, 256)
    assert fit_max_side(Image.new("RGB", (300, 900)), 512).size == (171, 512)
    assert fit_max_side(Image.new("RGB", (40, 30)), 512).size == (40, 30)


# ----------------------------------------------------------------------- tuxpaint rules


@pytest.mark.parametrize(
    ("rel", "glyph"),
    [
        ("symbols/alphabets/english/filled/uppercase/a.png", True),
        ("symbols/alphabets/asl/b.png", True),
        ("symbols/alphabets/german/outlined/lowercase/sz.png", True),
        ("symbols/math/7.png", True),
        ("symbols/math/operators/op0_plus.png", False),
        ("animals/mammals/cats/cheetah.png", False),
        ("food/fruit/x_fruit.png", False),
    ],
)
def test_is_alphabet_glyph(rel: str, glyph: bool) -> None:
    assert is_alphabet_glyph(rel) is glyph


@pytest.mark.parametrize(
    ("description", "stem", "label"),
    [
        ("A cheetah.", "cheetah", "cheetah"),
        ("An hippopotamus.", "hippo", "hippopotamus"),
        ("A “Stop” sign. Stop here, then go when it’s your turn.", "stop", "stop sign"),
        ("A candy cane is a traditional Christmas treat in the United States.", "Candy_cane_photo_2", "candy cane"),
        ("Jupiter—the largest planet in our solar system!", "5_jupiter", "jupiter"),
        ("A pair of pliers.", "plyers", "pliers"),
        ("Remember to flush the toilet and wash your hands with soap!", "toilet", "toilet"),
        ("A tough APC like this M-3 Bradley Fighting Vehicle gets you to battle!", "bradley", "tough apc"),
        ("", "flower3", "flower"),
        ("Grandma’s old rag doll.", "grannysmith", "grandma's old rag doll"),
    ],
)
def test_tuxpaint_label(description: str, stem: str, label: str) -> None:
    assert tuxpaint_label(description, stem) == label


def _write_stamp(path: Path, size=(120, 80), box=(20, 20, 100, 60), text: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _rgba_stamp(size, box).save(path)
    if text is not None:
        path.with_suffix(".txt").write_text(text, encoding="utf-8")


def test_scan_and_write_synthetic_stamps(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    _write_stamp(stamps / "symbols/alphabets/english/filled/uppercase/a.png", text="The letter A.\n")
    _write_stamp(stamps / "symbols/alphabets/asl/b.png")
    _write_stamp(stamps / "symbols/math/7.png", text="Seven.\n")
    cheetah_txt = "A cheetah.\nde.utf8=Ein Gepard.\nfr.utf8=Un guépard.\n"
    _write_stamp(stamps / "animals/mammals/cats/cheetah.png", text=cheetah_txt)
    _write_stamp(stamps / "animals/mammals/cats/cheetah_mirror.png")
    _write_stamp(stamps / "food/crumb.png", size=(20, 12), box=(0, 0, 20, 12), text="A crumb.\n")
    (stamps / "vehicles").mkdir(parents=True)
    (stamps / "vehicles/bus.svg").write_text("<svg/>")

    items, skipped = scan_tuxpaint(stamps)
    assert [(i.category, i.name, i.label) for i in items] == [
        ("animals/mammals/cats", "cheetah", "cheetah"),
        ("food", "crumb", "crumb"),
    ]
    assert dict(skipped) == {"alphabet glyph": 3, "mirrored duplicate": 1, "svg only (not rasterised)": 1}
    assert items[0].description == "A cheetah."

    dest = tmp_path / "out"
    rows, write_skipped = write_items(items, dest, max_side=64)
    assert dict(write_skipped) == {f"too small (<{MIN_SIDE} px)": 1}
    assert rows == [
        {
            "path": "images/tuxpaint/animals/mammals/cats/cheetah.png",
            "label": "cheetah",
            "category": "animals/mammals/cats",
            "source": "tuxpaint",
            "description": "A cheetah.",
        }
    ]
    with Image.open(dest / rows[0]["path"]) as im:
        assert im.mode == "RGB"
        assert im.size == (64, 35)  # cropped to 80x40 plus 4 px each side (88x48), shrunk to 64 wide
        assert im.getpixel((0, 0)) == BACKGROUND_RGB  # the margin is background, not black
        assert im.getpixel((32, 18)) == (200, 30, 30)


def test_read_tuxpaint_description_uses_english_line(tmp_path: Path) -> None:
    txt = tmp_path / "x.txt"
    txt.write_text("A red apple.\nde.utf8=Ein roter Apfel.\n", encoding="utf-8")
    assert read_tuxpaint_description(txt) == "A red apple."
    txt.write_text("de.utf8=Ein Apfel.\nen_GB.utf8=An apple.\n", encoding="utf-8")
    assert read_tuxpaint_description(txt) == "An apple."


def test_scan_opencv_skips_calibration_series(tmp_path: Path) -> None:
    for name in ("left01.jpg", "right14.jpg", "left.jpg", "baboon.jpg", "notes.png"):
        Image.new("RGB", (40, 40)).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image")
    items, skipped = scan_opencv(tmp_path)
    assert [(i.name, i.ext) for i in items] == [("baboon", ".jpg"), ("left", ".jpg"), ("notes", ".png")]
    assert dict(skipped) == {"calibration series": 2}
    assert items[0].label == "baboon"
