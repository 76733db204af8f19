"""Concept sets: sizes, de-duplication, provenance ids that follow the content."""

from __future__ import annotations

import pytest

from neuroviz import concepts


def test_imagenet_set_has_unique_class_names():
    cs = concepts.load_concept_set("imagenet")
    assert 990 <= len(cs) <= 1000
    assert len({c.casefold() for c in cs}) == len(cs)
    assert "tabby" in " ".join(cs.concepts)


def test_words20k_size_filter_and_plural_dedup(tmp_path):
    cs = concepts.load_concept_set("words20k", store_root=tmp_path)
    words = set(cs.concepts)
    assert len(cs) == 20_000
    assert len(words) == len(cs)
    assert {"cat", "dog", "car", "red", "tree"} <= words
    assert not words & {"the", "and", "of", "because", "three"}  # function and number words
    assert all(len(w) >= 3 and w.replace("-", "").isalpha() for w in words)
    assert "dogs" not in words and "cars" not in words  # plural of a kept word
    # cached as a text file in the shared cache; a second load reads it back identically
    from neuroviz.store import SharedCache

    files = list(SharedCache.default().concepts_dir().glob("words20k-*.txt"))
    assert len(files) == 1
    again = concepts.load_concept_set("words20k", store_root=tmp_path)
    assert again.concepts == cs.concepts and again.id == cs.id


def test_smaller_word_set_is_a_prefix(tmp_path):
    small = concepts.load_concept_set("words2k", store_root=tmp_path)
    big = concepts.load_concept_set("words20k", store_root=tmp_path)
    assert len(small) == 2000
    assert big.concepts[:2000] == small.concepts
    assert small.id != big.id


def test_heuristic_filter_drops_inflections_and_adverbs():
    kept = concepts._heuristic_filter(["cat", "cats", "box", "boxes", "berry", "berries", "walk", "walked", "quickly", "glass"])
    assert kept == ["cat", "box", "berry", "walk", "glass"]


def test_text_file_set_dedups_and_skips_comments(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my concepts\nstriped  cat\nDog\n\ndog\nstriped cat\nred ball\n")
    cs = concepts.load_concept_set(str(path))
    assert cs.name == "mine"
    assert cs.concepts == ["striped cat", "Dog", "red ball"]


def test_id_follows_content_not_name(tmp_path):
    a = concepts.from_texts("a", ["cat", "dog"])
    b = concepts.from_texts("b", ["cat", "dog"])
    c = concepts.from_texts("a", ["cat", "dogs"])
    assert a.id == b.id
    assert a.id != c.id
    path = tmp_path / "v.txt"
    path.write_text("cat\ndog\n")
    first = concepts.load_concept_set(str(path)).id
    path.write_text("cat\ndog\nbird\n")
    assert concepts.load_concept_set(str(path)).id != first


def test_demo_labels_from_metadata(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "metadata.csv").write_text("path,label\na.png,frog\nb.png,frog\nc.png,red apple\n")
    cs = concepts.load_concept_set("demo_labels", store_root=tmp_path)
    assert cs.concepts == ["frog", "red apple"]


def test_union_and_errors(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "metadata.csv").write_text("path,label\na.png,tabby\nb.png,zebra\n")
    both = concepts.load_concept_set("demo_labels+imagenet", store_root=tmp_path)
    assert both.concepts[:2] == ["tabby", "zebra"]
    assert both.concepts.count("zebra") == 1
    with pytest.raises(ValueError, match="imagenet"):
        concepts.load_concept_set("no-such-set")
    with pytest.raises(FileNotFoundError, match="demo-set"):
        concepts.load_concept_set("demo_labels", store_root=tmp_path / "empty")
    assert concepts.list_concept_sets() == ["imagenet", "words20k", "demo_labels"]
