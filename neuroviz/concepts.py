"""Concept sets: the vocabularies that description methods choose neuron labels from.

Built-in sets (``load_concept_set(spec)``, entries of :data:`CONCEPT_SETS`):

- ``imagenet``: the 1,000 ImageNet class names (torchvision's spelling; the two duplicated
  names, "crane" and "maillot", kept once);
- ``words20k``: the 20,000 most frequent English words (``wordfreq``) that can name a visual
  concept, i.e. nouns and adjectives. When the ``lemminflect`` lexicon is installed a word is
  kept if the lexicon lists it as a noun or an adjective, and an inflected form (``dogs``,
  ``bigger``) is dropped when its lemma (``dog``, ``big``) is kept. Without it a documented
  heuristic stands in (see :func:`_heuristic_filter`). Either way function words, number
  words, tokens with digits or punctuation and words under 3 letters are dropped. The list is
  cached as a text file under ``<store_root>/concepts/``;
- ``words<N>k``: the same with N thousand words;
- ``demo_labels``: the demo probe set's own labels (``metadata.csv`` of the workspace's demo set);
- ``file:<path>`` or just the path of a text file: one concept per line (blank lines and
  ``#`` comments skipped);
- ``a+b``: the union of several specs, in order, duplicates dropped.

Every set has an ``id``: a hash of its concepts, so labels computed from a changed
vocabulary never share a cache entry with the old one.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NeurovizError
from .provenance import provenance_key
from .registry import Registry, UnknownNameError

BUILTIN_CONCEPT_SETS: dict[str, str] = {
    "imagenet": "ImageNet-1k class names (torchvision spelling)",
    "words20k": "20,000 most common English nouns and adjectives (wordfreq)",
    "demo_labels": "the demo probe set's own labels",
}

_WORDS_SPEC = re.compile(r"^words(\d+)k$")
_PLAIN_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")

# Words that carry grammar rather than a visual concept. Written for this project: pronouns,
# determiners, prepositions, conjunctions, auxiliaries and modals, number words, and the
# vague quantifiers that a POS lexicon would still call adjectives ("certain", "various").
FUNCTION_WORDS = frozenset(
    """
    a about above across after afterwards again against ago all almost alone along already also
    although always am among amongst an and another any anybody anyhow anyone anything anyway
    anywhere are around as at away be became because become becomes becoming been before
    beforehand behind being below beside besides between beyond both but by can cannot could
    did do does doing done down due during each either else elsewhere enough etc even ever every
    everybody everyone everything everywhere except few first for former formerly from further
    furthermore had has have having he hence her here hereafter hereby herein hers herself him
    himself his how however i if in indeed instead into is it its itself just last latter
    latterly least less lot lots many may maybe me meanwhile might mine more moreover most
    mostly much must my myself namely neither never nevertheless next no nobody none noone nor
    not nothing now nowhere of off often on once one only onto or other others otherwise our
    ours ourselves out over own per perhaps please quite rather really same several she should
    since so some somebody somehow someone something sometime sometimes somewhere still such
    than that the their theirs them themselves then thence there thereafter thereby therefore
    therein thereupon these they this those though through throughout thru thus to together too
    toward towards under unless until up upon us very via was we well were what whatever when
    whence whenever where whereafter whereas whereby wherein whereupon wherever whether which
    while whither who whoever whole whom whose why will with within without would yet you your
    yours yourself yourselves yes yeah okay ok oh hey hi hello wow lol gonna wanna gotta
    zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    hundred thousand million billion trillion second third fourth fifth sixth seventh eighth
    ninth tenth dozen half
    can't won't don't isn't aren't wasn't weren't shouldn't wouldn't couldn't
    st nd rd th mr mrs ms dr jr sr inc ltd co vs
    sure able like likely certain particular various whose own
    """.split()
)
STOPWORDS = FUNCTION_WORDS


class ConceptSetError(NeurovizError, ValueError):
    """A concept-set spec that names no set, or a set without concepts; the message lists the specs."""


class ConceptSetMissing(NeurovizError, FileNotFoundError):
    """A built-in concept set whose source is not built yet in this cache (the demo set's labels)."""


@dataclass
class ConceptSet:
    """A named list of concept strings; ``id`` hashes the list so caches follow its content."""

    name: str
    concepts: list[str]
    description: str = ""
    source: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        """Hash of the concepts (not the name): the same vocabulary gives the same labels."""
        return provenance_key({"concepts": list(self.concepts)})

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self):
        return iter(self.concepts)


@dataclass(frozen=True)
class WordListConfig:
    """How ``words<N>k`` is drawn from wordfreq (CLIP-Dissect, Oikarinen & Weng 2023, used 20k)."""

    size: int = 20_000
    language: str = "en"
    candidate_pool: int = 120_000  # wordfreq words read so that `size` survive the filter
    min_length: int = 3


def dedupe(concepts: list[str]) -> list[str]:
    """Strip, drop blanks, and keep the first of case-insensitive duplicates (order kept)."""
    seen: set[str] = set()
    out = []
    for raw in concepts:
        text = " ".join(str(raw).split())
        key = text.casefold()
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def imagenet_concepts() -> ConceptSet:
    """The ImageNet-1k class names as a concept set (998 unique names)."""
    from .offline_weights import imagenet_class_names

    return ConceptSet("imagenet", dedupe(imagenet_class_names()), BUILTIN_CONCEPT_SETS["imagenet"], "torchvision")


def _lexicon_available() -> bool:
    try:
        import lemminflect  # noqa: F401
    except ImportError:
        return False
    return True


def _pos_filter(candidates: list[str]) -> list[str]:
    """Keep lexicon nouns/adjectives; drop inflected forms whose lemma is also kept."""
    import lemminflect

    tags = {w: lemminflect.getAllLemmas(w) for w in candidates}
    visual = [w for w in candidates if "NOUN" in tags[w] or "ADJ" in tags[w]]
    kept = set(visual)
    out = []
    for word in visual:
        lemmas = {lemma for pos in ("NOUN", "ADJ") for lemma in tags[word].get(pos, ())}
        if any(lemma != word and lemma in kept for lemma in lemmas):
            continue  # "dogs" when "dog" is in the list
        out.append(word)
    return out


def _heuristic_filter(candidates: list[str]) -> list[str]:
    """Without a POS lexicon: drop -ly adverbs, and plural/past forms whose stem is present.

    "cats" goes when "cat" is there, "boxes" when "box", "berries" when "berry"; "walked"
    when "walk" (a verb form). Other verbs stay: telling them from nouns needs a lexicon.
    """
    present = set(candidates)
    out = []
    for w in candidates:
        if len(w) > 4 and w.endswith("ly"):
            continue
        stems = []
        if w.endswith("ies"):
            stems.append(w[:-3] + "y")
        if w.endswith("es"):
            stems.append(w[:-2])
        if w.endswith("s") and not w.endswith("ss"):
            stems.append(w[:-1])
        if len(w) > 4 and w.endswith("ed"):
            stems += [w[:-2], w[:-1]]
        if any(s in present for s in stems if s):
            continue
        out.append(w)
    return out


def word_filter_name() -> str:
    """Which filter words sets use here (part of their cache name; the id hashes the content)."""
    if _lexicon_available():
        return f"lemminflect-{importlib.metadata.version('lemminflect')}"
    return "heuristic-v1"


def compute_common_words(config: WordListConfig = WordListConfig()) -> list[str]:
    """The `config.size` most frequent nouns/adjectives, most frequent first."""
    from wordfreq import top_n_list

    candidates = []
    for word in top_n_list(config.language, config.candidate_pool):
        w = word.lower()
        if len(w) >= config.min_length and _PLAIN_WORD.match(w) and w not in STOPWORDS:
            candidates.append(w)
    candidates = dedupe(candidates)
    kept = _pos_filter(candidates) if _lexicon_available() else _heuristic_filter(candidates)
    return kept[: config.size]


def _default_store_root() -> Path:
    from .store import DEFAULT_CACHE

    return Path(DEFAULT_CACHE)


def common_words(size: int = 20_000, store_root: Path | str | None = None) -> ConceptSet:
    """``words<N>k``, read from its cached text file when one exists (computing takes ~2 s)."""
    config = WordListConfig(size=size)
    name = f"words{size // 1000}k" if size % 1000 == 0 else f"words{size}"
    wordfreq_version = importlib.metadata.version("wordfreq")
    cache_key = provenance_key({"config": config, "wordfreq": wordfreq_version, "filter": word_filter_name()}, 12)
    from .store import CacheLayout, SharedCache

    root = Path(store_root) if store_root is not None else _default_store_root()
    file_name = f"{name}-{cache_key}.txt"
    shared = SharedCache.default()
    path = shared.adopt(shared.concepts_dir() / file_name, CacheLayout(root).legacy_concepts_dir() / file_name)
    if path.exists():
        words = [w for w in path.read_text(encoding="utf-8").splitlines() if w]
    else:
        words = compute_common_words(config)
        from .files import atomic_write_text

        with contextlib.suppress(OSError):  # a read-only cache only costs a recomputation next time
            atomic_write_text(path, "\n".join(words) + "\n")
    description = f"{len(words):,} most common English nouns and adjectives (wordfreq {wordfreq_version}, {word_filter_name()})"
    return ConceptSet(name, words, description, f"wordfreq:{wordfreq_version}:{word_filter_name()}")


def demo_labels(store_root: Path | str | None = None) -> ConceptSet:
    """The demo probe set's labels, in first-seen order (its own ground-truth vocabulary)."""
    from .store import CacheLayout

    root = Path(store_root) if store_root is not None else _default_store_root()
    meta = CacheLayout(root).demo_dir() / "metadata.csv"
    if not meta.exists():
        raise ConceptSetMissing(
            f"The demo set is not built under {root} (no {meta.name}). "
            "Run `python -m neuroviz demo-set`, or choose another concept set (imagenet, words20k)."
        )
    with open(meta, newline="", encoding="utf-8") as fh:
        labels = [row.get("label") or "" for row in csv.DictReader(fh)]
    return ConceptSet("demo_labels", dedupe(labels), BUILTIN_CONCEPT_SETS["demo_labels"], str(meta))


def from_text_file(path: Path | str) -> ConceptSet:
    """A user's vocabulary: one concept per line; blank lines and ``#`` comments skipped."""
    path = Path(path).expanduser()
    lines = path.read_text(encoding="utf-8").splitlines()
    concepts = dedupe([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])
    if not concepts:
        raise ConceptSetError(f"Concept file {path} has no concepts (write one concept per line).")
    return ConceptSet(path.stem, concepts, f"concepts from {path.name}", str(path.resolve()))


def from_texts(name: str, texts: list[str], description: str = "") -> ConceptSet:
    """A concept set from an in-memory list (typed in the app, or made by a method)."""
    return ConceptSet(name, dedupe(list(texts)), description or f"{name} (custom list)", "inline")


def union(name: str, sets: list[ConceptSet]) -> ConceptSet:
    """Concatenate sets in order, keeping the first of case-insensitive duplicates."""
    concepts = dedupe([c for s in sets for c in s.concepts])
    return ConceptSet(name, concepts, " + ".join(s.name for s in sets), "union")


class UnknownConceptSetError(UnknownNameError, ValueError):
    """A concept-set spec that names no set and no file (callers that catch ValueError still do)."""


def _older_spelling(spec: str) -> str | None:
    """The two spellings outside the one grammar, kept: ``words<N>k`` and a bare file path."""
    if _WORDS_SPEC.match(spec):
        return "words:" + spec[len("words"):]
    return f"file:{spec}" if Path(spec).expanduser().is_file() else None


CONCEPT_SETS: Registry[ConceptSet] = Registry(
    "concept set", error=UnknownConceptSetError, fallback=_older_spelling,
    usage="'words:<N>k' is also written 'words<N>k' (e.g. words20k), 'file:<path>' also as the bare path; "
          "'a+b' combines sets.",
)
CONCEPT_SETS.add("imagenet", lambda store_root: imagenet_concepts(), description=BUILTIN_CONCEPT_SETS["imagenet"])


@CONCEPT_SETS.register("words", argument="<N>k", example="words1k", listing=lambda: ["words20k"])
def _common_words(argument: str, store_root: Path | str | None) -> ConceptSet:
    """The N thousand most common English nouns and adjectives (wordfreq); written words20k."""
    size = int(argument[:-1]) * 1000 if argument[:-1].isdigit() and argument.endswith("k") else 0
    if not 0 < size <= 100_000:
        raise UnknownConceptSetError(f"'words{argument}': choose between words1k and words100k.")
    return common_words(size, store_root)


CONCEPT_SETS.add("demo_labels", demo_labels, description=BUILTIN_CONCEPT_SETS["demo_labels"])


@CONCEPT_SETS.register("file", argument="<path>")
def _text_file(path: str, store_root: Path | str | None) -> ConceptSet:
    """A text file with one concept per line (a bare path works too)."""
    return from_text_file(path)


def load_concept_set(spec: str, store_root: Path | str | None = None) -> ConceptSet:
    """Resolve a concept-set spec (see the module docstring) to a ConceptSet."""
    spec = spec.strip()
    if "+" in spec and not Path(spec).expanduser().exists():
        parts = [p for p in spec.split("+") if p.strip()]
        return union(spec, [load_concept_set(p, store_root) for p in parts])
    return CONCEPT_SETS.create(spec, store_root)


def list_concept_sets() -> list[str]:
    """Concept sets to pick from (other sizes of words<N>k, files and unions are accepted too)."""
    return CONCEPT_SETS.specs()
