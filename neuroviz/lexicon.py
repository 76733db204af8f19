"""A small word-category lexicon: which kind of concept a neuron label names.

MILAN (Hernandez et al., ICLR 2022, section "Analysis") sorts neuron descriptions by what
they mention: attributes (colours, textures, materials), object categories, scenes and
relations. This module does that sorting with hand-written word lists, so it is fast,
deterministic and auditable:

- ``colour``: colour words and brightness ("red", "dark", "colorful");
- ``texture``: textures, patterns and simple shapes: the 47 DTD texture adjectives
  (Cimpoi et al. 2014) plus stripes/dots/grids/edges/circles and the like;
- ``material``: materials and stuff ("wood", "metal", "fur", "water", "grass", "skin");
- ``object``: things, animals, people and their parts, text; common nouns written here plus,
  optionally, the 1,000 ImageNet class names;
- ``scene``: places and surroundings ("kitchen", "street", "beach", "sky"), including the
  ImageNet class names that are places ("seashore", "library", "volcano");
- ``relation``: a label that relates two things with a spatial/relational word
  ("a dog on a sofa", "cup next to a plate");
- ``uninterpretable``: no label, a label that declares itself uninterpretable, a label whose
  calibrated score is too low, or one that matched nothing (decided in :mod:`neuroviz.analysis`).

A word that appears in several lists gets the category of the hand-written list listed
first in ``CATEGORY_ORDER``; the hand-written lists always win over ImageNet names (so
"orange" is a colour and "velvet" a material). Matching is on lower-case word sequences,
longest phrase first, with the last word also tried in its singular form ("golden
retrievers" -> "golden retriever").

A label's *head* category is the category of its rightmost matched term (English noun
phrases put the head last: "red car" is about a car, "wooden table" about a table), except
that a relation word between two matched terms makes it ``relation``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

CATEGORY_ORDER: tuple[str, ...] = ("colour", "texture", "material", "object", "scene", "relation", "uninterpretable")
CONTENT_CATEGORIES: tuple[str, ...] = ("colour", "texture", "material", "object", "scene")

CATEGORY_TITLES: dict[str, str] = {
    "colour": "Colour",
    "texture": "Texture / pattern / shape",
    "material": "Material",
    "object": "Object / part",
    "scene": "Scene / place",
    "relation": "Relation",
    "uninterpretable": "Uninterpretable",
}

# Sentences the optional text-embedding fallback compares an unmatched label with.
CATEGORY_DESCRIPTIONS: dict[str, str] = {
    "colour": "a colour, such as red, green, blue, yellow, black or white",
    "texture": "a texture, pattern or simple shape, such as stripes, dots, a grid, edges or circles",
    "material": "a material or substance, such as wood, metal, glass, fabric, fur, water or grass",
    "object": "an object, animal, person or body part, such as a dog, a car, a face or a cup",
    "scene": "a scene or place, such as a kitchen, a street, a beach, a forest or the sky",
}

COLOUR_WORDS = """
red orange yellow green blue purple violet pink brown black white gray grey beige tan cyan
magenta turquoise teal navy maroon gold golden silver indigo lilac lavender crimson scarlet
olive khaki ochre amber bronze copper ivory cream
colour color colours colors coloured colored colourful colorful multicoloured multicolored
bright dark pale vivid pastel monochrome reddish bluish greenish yellowish brownish pinkish
greyish grayish orangish purplish whitish blackish hue tint shade saturated
""".split()

TEXTURE_WORDS = """
banded blotchy braided bubbly bumpy chequered checkered cobwebbed cracked crosshatched
crystalline dotted fibrous flecked frilly gauzy grid grooved honeycombed interlaced knitted
lacelike lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous
potholed scaly smeared spiralled spiraled sprinkled stained stratified striped studded swirly
veined waffled woven wrinkled zigzagged
texture textures textured pattern patterns patterned stripe stripes dot dots spot spots
spotted speckled checkerboard checker plaid tartan lattice mesh weave repetition repeated
edge edges line lines curve curves curved circle circles circular square squares rectangle
rectangular triangle triangular corner corners shape shapes round spiral zigzag wavy
rough smooth shiny glossy fuzzy furry hairy spiky blurry blurred diagonal horizontal vertical
stroke strokes contour outline gradient noise grain grainy ring rings star stars cross
hexagon hexagonal oval arc arcs
""".split()

MATERIAL_WORDS = """
wood wooden metal metallic steel iron aluminium aluminum chrome glass plastic paper cardboard
fabric cloth textile leather fur feather feathers wool woolen woollen cotton silk velvet denim
lace linen stone rock brick bricks concrete marble granite ceramic porcelain tile tiles rubber
water sand snow ice grass soil dirt mud gravel asphalt skin foliage wax clay
liquid foam smoke fire flame cork straw bamboo
""".split()

OBJECT_WORDS = """
object objects thing item person people man men woman women child children boy girl baby
human crowd player face head eye eyes nose mouth lip lips ear ears hand hands finger fingers
arm arms leg legs foot feet hair beard body torso teeth tooth tongue neck shoulder
animal dog cat bird horse cow sheep pig fish insect bug spider snake lizard monkey bear
elephant giraffe zebra lion tiger wolf fox deer rabbit mouse duck chicken hen owl eagle
parrot penguin butterfly bee frog turtle whale dolphin shark paw paws tail wing wings beak
fin fins horn horns muzzle snout claw claws
flower flowers tree trees plant plants leaf leaves petal petals branch trunk mushroom fruit
fruits vegetable vegetables apple banana orange lemon strawberry berry grape grapes food
meal bread cake pizza
car cars vehicle vehicles wheel wheels tire tyre bus truck train boat ship airplane plane
aircraft bicycle bike motorcycle tractor
building buildings house houses window windows door doors roof tower bridge fence wall
walls column pillar stairs staircase chimney
table chair sofa couch bed lamp shelf cabinet desk bench furniture
text texts letter letters word words writing handwriting caption font character characters
digit digits number numbers sign signs logo label labels symbol book books page newspaper
screen monitor keyboard phone computer clock
bottle cup mug glass bowl plate dish spoon fork knife pot pan jar box bag basket
ball toy toys doll balloon kite umbrella
clothing clothes shirt dress hat cap shoe shoes boot boots jacket coat tie glasses
sunglasses helmet mask
""".split()

SCENE_WORDS = """
scene scenery landscape background indoor indoors outdoor outdoors interior exterior
kitchen bedroom bathroom living-room office classroom corridor hallway hall room
street streets road roads highway alley sidewalk city cityscape town village downtown
sky skies cloud clouds sea ocean beach shore coast coastline lake river stream pond
waterfall mountain mountains hill hills valley cliff canyon forest woods jungle field fields
meadow farm farmland garden park desert island harbor harbour port underwater horizon
sunset sunrise night
stadium arena restaurant shop store market supermarket library church temple airport
station playground courtyard parking-lot campsite countryside suburb skyline
alp coral-reef geyser lakeside promontory sandbar seashore volcano bakery barbershop bookshop
butcher-shop confectionery grocery-store shoe-shop tobacco-shop toyshop boathouse cinema
mosque monastery palace planetarium prison greenhouse home-theater dock
""".split()

# Words that relate two things; multi-word ones are written with hyphens and matched as phrases.
RELATION_WORDS = """
on in inside above below under underneath beneath beside besides behind near over against
between around across along atop among amid within onto into toward towards
next-to in-front-of on-top-of close-to surrounded-by covered-by covered-with
with holding wearing riding carrying eating sitting standing lying hanging
""".split()

UNINTERPRETABLE_LABELS = frozenset(
    {"", "uninterpretable", "none", "unknown", "n/a", "na", "nothing", "no concept", "none fits", "?"}
)

_MAX_PHRASE = 6
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens; hyphens, apostrophes and punctuation separate words."""
    return _TOKEN.findall(text.lower().replace("'s", ""))


def singular(word: str) -> str:
    """A crude English singular, good enough for head nouns ("faces", "leaves", "boxes")."""
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ves"):
        return word[:-3] + "f"
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


@dataclass(frozen=True)
class TermMatch:
    """One lexicon term found in a label: word span [start, end), the term and its category."""

    start: int
    end: int
    term: str
    category: str


@dataclass(frozen=True)
class LabelMatch:
    """What one label names: its matched terms, relation words, head and all categories."""

    label: str
    terms: tuple[TermMatch, ...]
    relation_words: tuple[str, ...]
    head: str | None  # None when nothing matched
    categories: tuple[str, ...]  # distinct categories named, relation included, in CATEGORY_ORDER

    @property
    def matched(self) -> bool:
        return self.head is not None


@dataclass
class Lexicon:
    """Word lists per category; ``match(label)`` says which categories a label names."""

    terms: dict[tuple[str, ...], str]  # token sequence -> category
    relations: frozenset[tuple[str, ...]]
    descriptions: dict[str, str] = field(default_factory=lambda: dict(CATEGORY_DESCRIPTIONS))
    name: str = "default"

    def match(self, label: str | None) -> LabelMatch:
        """Longest-phrase-first matching of the label's words against every list."""
        text = (label or "").strip()
        words = tokens(text)
        found: list[TermMatch] = []
        rel_positions: list[tuple[int, str]] = []
        i = 0
        while i < len(words):
            hit = None
            for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
                span = tuple(words[i:i + n])
                category = self.terms.get(span) or self.terms.get(span[:-1] + (singular(span[-1]),))
                if category:
                    hit = TermMatch(i, i + n, " ".join(span), category)
                    break
                if span in self.relations:
                    rel_positions.append((i, " ".join(span)))
                    i += n - 1
                    break
            if hit:
                found.append(hit)
                i = hit.end
            else:
                i += 1
        is_relation = any(
            any(t.end <= pos for t in found) and any(t.start > pos for t in found) for pos, _ in rel_positions
        )
        head = "relation" if is_relation else (found[-1].category if found else None)
        named = {t.category for t in found} | ({"relation"} if is_relation else set())
        return LabelMatch(
            label=text,
            terms=tuple(found),
            relation_words=tuple(w for _, w in rel_positions),
            head=head,
            categories=tuple(c for c in CATEGORY_ORDER if c in named),
        )

    @property
    def id(self) -> str:
        """Hash of the word lists, so cached analyses follow the lexicon's content."""
        from .provenance import provenance_key

        return provenance_key({"terms": sorted(" ".join(k) + "=" + v for k, v in self.terms.items()),
                               "relations": sorted(" ".join(r) for r in self.relations), "descriptions": self.descriptions})

    def words(self, category: str) -> list[str]:
        """The terms of one category (for the documentation table in the UI)."""
        return sorted(" ".join(k) for k, v in self.terms.items() if v == category)


def _phrase(entry: str) -> tuple[str, ...]:
    return tuple(tokens(entry.replace("-", " ")))


def build_lexicon(include_imagenet: bool = True, extra: dict[str, list[str]] | None = None) -> Lexicon:
    """The default lexicon; ``extra`` adds user terms per category (they win over everything)."""
    terms: dict[tuple[str, ...], str] = {}

    def add(words: list[str], category: str) -> None:
        for w in words:
            key = _phrase(w)
            if key and key not in terms:  # first list wins on conflicts
                terms[key] = category

    for category, words in (extra or {}).items():
        if category not in CONTENT_CATEGORIES:
            raise ValueError(f"Unknown lexicon category '{category}'; use one of {', '.join(CONTENT_CATEGORIES)}.")
        add(list(words), category)
    # Scenes before objects so that place-like ImageNet names and "room" words stay scenes;
    # colours first so "orange" is a colour; materials before objects so "glass" is a material.
    add(COLOUR_WORDS, "colour")
    add(TEXTURE_WORDS, "texture")
    add(MATERIAL_WORDS, "material")
    add(SCENE_WORDS, "scene")
    add(OBJECT_WORDS, "object")
    if include_imagenet:
        from .offline_weights import imagenet_class_names

        add(imagenet_class_names(), "object")
    relations = frozenset(_phrase(w) for w in RELATION_WORDS)
    return Lexicon(terms, relations, name="default" + ("+imagenet" if include_imagenet else "") + ("+extra" if extra else ""))


@lru_cache(maxsize=2)
def default_lexicon(include_imagenet: bool = True) -> Lexicon:
    """The shared default lexicon (built once per process)."""
    return build_lexicon(include_imagenet)
