"""Auditing: find every neuron of a model whose description mentions a concept.

MILAN (Hernandez et al., ICLR 2022, section "Auditing") searches the descriptions of all
neurons for words such as "face" to surface neurons sensitive to protected or spurious
features. Here a query searches the labels of every method in every stored layer of one
model over one probe set, in two ways:

- by text: whole-word match of the query's words in the label (plural-insensitive), with
  optional substring matches ("text" in "textile") at a lower score;
- by meaning: cosine similarity between the query and the label under a text encoder
  (the multimodal backend's ``encode_texts``: MiniLM for the offline ``conse`` backend).

A query may hold several terms separated by commas or "|" ("face, skin, hair"); a label's
score is its best over the terms. Results are ranked by match score, carry each neuron's
top images, and can be saved in the store (``audit/<id>`` records) and exported as CSV/JSON.

Labels of units beyond neurons (an SAE's latents or user directions, :mod:`neuroviz.units`)
are searched too but kept apart: each hit carries its run's ``units``, and is placed at
"features.18 · SAE latents 3f2a1b2c" rather than under the bare layer name, so latent 12
is never read as neuron 12. ``AuditOptions.units`` limits a search to some kinds.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import NeurovizError
from .lexicon import singular, tokens
from .methods.base import dead_units
from .progress import Progress
from .provenance import provenance_key
from .store import Store
from .units import NEURONS, short_units, units_match, units_place

AUDIT_NAMESPACE = "audit"

# Scores of the text-match kinds; meaning matches score their cosine similarity.
TEXT_SCORES = {"exact": 1.0, "phrase": 0.95, "words": 0.85, "substring": 0.6}


class AuditError(NeurovizError, ValueError):
    """A query or saved audit that cannot be used; the message says what to do."""


@dataclass
class AuditOptions:
    """How to search. ``min_similarity`` is a MiniLM cosine: related words score ~0.5-0.8,
    unrelated ones ~0.1-0.35 (measured on this project's labels), so 0.5 keeps close matches."""

    match_text: bool = True
    match_meaning: bool = True
    substring: bool = False
    min_similarity: float = 0.5
    methods: list[str] | None = None  # None: every method
    layers: list[str] | None = None  # None: every stored layer
    all_ranks: bool = False  # also search each method's runner-up labels
    max_results: int = 200
    text_backend: str = "conse"  # multimodal backend whose encode_texts embeds query and labels
    units: list[str] | None = None  # None: neurons and every dictionary's units; else e.g. ["neurons"], ["sae:3f2a1b2c"]


@dataclass
class AuditHit:
    """One neuron whose label matched: where it is, what it is called, and how it matched."""

    layer: str
    neuron: int
    method: str
    label: str
    match_score: float
    match_kind: str  # exact / phrase / words / substring / meaning, joined by "+" when several
    matched_term: str
    rank: int = 0
    label_score: float | None = None
    calibrated: float | None = None
    run_key: str = ""
    label_key: str = ""
    top_images: list[dict] = field(default_factory=list)  # rank, image_idx, image_id, activation, path
    units: str = NEURONS  # the run's units: "neurons", or "sae:<key>" when ``neuron`` is a latent

    @property
    def place(self) -> str:
        """Where the hit is: the layer, or the layer and its units ("features.18 · SAE latents 3f2a1b2c")."""
        return units_place(self.layer, self.units)

    @property
    def unit_word(self) -> str:
        """'neuron', 'latent' or 'direction'."""
        from .units import unit_word

        return unit_word(self.units).lower()


@dataclass
class Audit:
    """A finished search: the query, options, where it looked, and the ranked hits."""

    query: str
    model_spec: str
    probe_set_id: str
    options: AuditOptions
    hits: list[AuditHit]
    created: float = field(default_factory=time.time)
    layers_searched: list[str] = field(default_factory=list)
    n_labels_searched: int = 0
    text_backend_id: str | None = None
    id: str = ""

    def to_dict(self) -> dict:
        """Plain JSON-able dict (the stored record and the JSON export)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Audit:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["options"] = AuditOptions(**data.get("options", {}))
        data["hits"] = [AuditHit(**h) for h in data.get("hits", [])]
        return cls(**data)

    def neurons_by_layer(self, units: str = NEURONS) -> dict[str, list[int]]:
        """The hits of ``units`` (the neurons by default, or one dictionary's latents) as
        ``{layer: [numbers]}``, ready for an edit of those units."""
        out: dict[str, list[int]] = {}
        for hit in self.hits:
            if not (hit.units == units or (units != NEURONS and units_match(hit.units, units))):
                continue
            out.setdefault(hit.layer, [])
            if hit.neuron not in out[hit.layer]:
                out[hit.layer].append(hit.neuron)
        return {k: sorted(v) for k, v in out.items()}


def query_terms(query: str) -> list[str]:
    """Split a query on commas, semicolons and "|" into its terms."""
    terms = [t.strip() for t in re.split(r"[,;|]", query or "") if t.strip()]
    if not terms:
        raise AuditError("Type a word or phrase to search for, e.g. 'face' or 'text, letters'.")
    return terms


def _stems(text: str) -> list[str]:
    return [singular(t) for t in tokens(text)]


def text_match(term: str, label: str, substring: bool = False) -> tuple[float, str] | None:
    """(score, kind) when ``term`` occurs in ``label`` as words, else None.

    exact: same words; phrase: the term's words appear contiguously; words: all appear;
    substring: the raw term is inside the raw label (only when asked).
    """
    q, l = _stems(term), _stems(label)
    if q and q == l:
        return TEXT_SCORES["exact"], "exact"
    if q and any(l[i:i + len(q)] == q for i in range(len(l) - len(q) + 1)):
        return TEXT_SCORES["phrase"], "phrase"
    if len(q) > 1 and set(q) <= set(l):
        return TEXT_SCORES["words"], "words"
    if substring and term.strip().lower() and term.strip().lower() in (label or "").lower():
        return TEXT_SCORES["substring"], "substring"
    return None


def cached_text_embeddings(backend, store: Store | None, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), D) normalised text embeddings, cached by backend id and text list."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, 1), np.float32)
    key = provenance_key({"backend": backend.id, "texts": texts})
    if store is not None:
        cached = store.load_array("text_embeddings", key)
        if cached is not None and len(cached) == len(texts):
            return cached
    emb = np.asarray(backend.encode_texts(texts), dtype=np.float32)
    if store is not None:
        store.save_array("text_embeddings", key, emb)
    return emb


def text_backend(spec: str = "conse"):
    """The multimodal backend whose ``encode_texts`` embeds labels (MiniLM for 'conse')."""
    from .backends.multimodal import create_multimodal

    return create_multimodal(spec)


def _labels_of_model(store: Store, model_spec: str, probe_set_id: str, options: AuditOptions):
    import pandas as pd

    runs = store.find_runs(model_spec, probe_set_id)
    if options.layers:
        runs = [r for r in runs if r.layer in set(options.layers)]
    if options.units:
        runs = [r for r in runs if any(units_match(r.units, wanted) for wanted in options.units)]
    frames = []
    for run in runs:
        df = store.labels(run.run_key, top_only=not options.all_ranks)
        df = df[~df["neuron"].isin(dead_units(store, run))]  # stale labels of dead units describe nothing
        if len(df):
            df = df.assign(layer=run.layer, run_key=run.run_key, units=run.units)
            frames.append(df)
    if not frames:
        return runs, pd.DataFrame(columns=["neuron", "method", "rank", "label", "score", "calibrated", "backend",
                                           "label_key", "extra_json", "layer", "run_key", "units"])
    labels = pd.concat(frames, ignore_index=True)
    if options.methods:
        labels = labels[labels["method"].isin(options.methods)]
    return runs, labels.reset_index(drop=True)


def search(store: Store, model_spec: str, probe_set_id: str, query: str, options: AuditOptions | None = None,
           encoder=None, top_k_images: int = 8, progress: Progress | None = None) -> Audit:
    """Search every stored layer of a model for neurons whose labels match ``query``.

    ``encoder`` is any object with ``id`` and ``encode_texts`` (default: the options'
    text backend); it is only loaded when meaning search is on.
    """
    options = options or AuditOptions()
    if not (options.match_text or options.match_meaning):
        raise AuditError("Turn on text matching, meaning matching, or both.")
    terms = query_terms(query)
    runs, labels = _labels_of_model(store, model_spec, probe_set_id, options)
    if not runs:
        raise AuditError(f"No layers of {model_spec} are extracted over probe set {probe_set_id}; extract some layers first.")
    unique_labels = sorted({str(x) for x in labels["label"].dropna()})
    best: dict[str, tuple[float, str, str]] = {}  # label text -> (score, kind, term)
    kinds: dict[str, set[str]] = {}
    if options.match_text:
        for label in unique_labels:
            for term in terms:
                hit = text_match(term, label, options.substring)
                if hit and hit[0] > best.get(label, (-1.0, "", ""))[0]:
                    best[label] = (hit[0], hit[1], term)
                if hit:
                    kinds.setdefault(label, set()).add(hit[1])
    backend_id = None
    if options.match_meaning and unique_labels:
        encoder = encoder or text_backend(options.text_backend)
        backend_id = encoder.id
        if progress:
            progress(0, 1, "embedding labels")
        label_emb = cached_text_embeddings(encoder, store, unique_labels)
        term_emb = np.asarray(encoder.encode_texts(terms), dtype=np.float32)
        sims = label_emb @ term_emb.T
        for i, label in enumerate(unique_labels):
            j = int(np.argmax(sims[i]))
            score = float(sims[i, j])
            if score >= options.min_similarity:
                kinds.setdefault(label, set()).add("meaning")
                if score > best.get(label, (-1.0, "", ""))[0]:
                    best[label] = (score, "meaning", terms[j])
        if progress:
            progress(1, 1, "labels embedded")
    hits: list[AuditHit] = []
    seen: set[tuple[str, int, str]] = set()
    matched = labels[labels["label"].astype(str).isin(best)] if len(labels) else labels
    for row in matched.sort_values(["rank"]).itertuples(index=False):
        key = (row.run_key, int(row.neuron), row.label_key)
        if key in seen:  # keep each neuron's best-ranked matching label per label run
            continue
        seen.add(key)
        score, _, term = best[str(row.label)]
        order = ["exact", "phrase", "words", "substring", "meaning"]
        kind = "+".join(k for k in order if k in kinds.get(str(row.label), set()))
        hits.append(AuditHit(
            layer=row.layer, neuron=int(row.neuron), method=row.method, label=str(row.label), match_score=round(score, 4),
            match_kind=kind, matched_term=term, rank=int(row.rank),
            label_score=None if _isnan(row.score) else float(row.score),
            calibrated=None if _isnan(row.calibrated) else float(row.calibrated), run_key=row.run_key, label_key=row.label_key,
            units=row.units,
        ))
    places = list(dict.fromkeys(units_place(r.layer, r.units) for r in runs))  # neurons and units of a layer apart
    place_pos = {place: i for i, place in enumerate(places)}
    hits.sort(key=lambda h: (-h.match_score, h.rank, place_pos.get(h.place, 0), h.neuron, h.method))
    hits = hits[: options.max_results]
    attach_top_images(store, hits, probe_set_id, top_k_images)
    audit = Audit(query, model_spec, probe_set_id, options, hits, layers_searched=places,
                  n_labels_searched=int(len(labels)), text_backend_id=backend_id)
    audit.id = _audit_id(audit)
    return audit


def _isnan(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def attach_top_images(store: Store, hits: Sequence[AuditHit], probe_set_id: str, k: int = 8) -> None:
    """Fill each hit's ``top_images`` (with file paths) from the store's top-k table."""
    if k <= 0:
        return
    tops = [store.top_images(hit.run_key, hit.neuron, k) for hit in hits]
    wanted = sorted({int(im["image_idx"]) for top in tops for im in top})
    paths = {r["idx"]: r["path"] for r in store.probe_images(probe_set_id, wanted)} if wanted else {}  # not the whole set
    for hit, top in zip(hits, tops):
        hit.top_images = [{**im, "path": paths.get(im["image_idx"], "")} for im in top]


def _audit_id(audit: Audit) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", audit.query.lower()).strip("-")[:32] or "audit"
    return f"{slug}-{provenance_key([audit.query, asdict(audit.options), audit.model_spec, audit.probe_set_id, audit.created], 8)}"


# ----------------------------------------------------------------------------------------
# saving, listing and exporting


def save_audit(store: Store, audit: Audit) -> str:
    """Store the audit under its id (query, options, results, date); returns the id."""
    if not audit.id:
        audit.id = _audit_id(audit)
    store.put_record(AUDIT_NAMESPACE, audit.id, audit.to_dict())
    return audit.id


def load_audit(store: Store, audit_id: str) -> Audit:
    """A saved audit by id, or an error that says how to list them."""
    record = store.get_record(AUDIT_NAMESPACE, audit_id)
    if record is None:
        raise AuditError(f"No saved audit '{audit_id}'. List them with `python -m neuroviz audit --list`.")
    return Audit.from_dict(record)


def list_audits(store: Store, model_spec: str | None = None) -> list[dict]:
    """Saved audits, newest first: id, query, model, probe set, date, number of hits."""
    out = []
    for key, value, _ in store.list_records(AUDIT_NAMESPACE):
        if model_spec and value.get("model_spec") != model_spec:
            continue
        out.append({"id": key, "query": value.get("query"), "model_spec": value.get("model_spec"),
                    "probe_set_id": value.get("probe_set_id"), "created": value.get("created"),
                    "n_hits": len(value.get("hits", []))})
    return out


def delete_audit(store: Store, audit_id: str) -> None:
    """Forget a saved audit (edits made from it keep their own copy of the neurons)."""
    store.delete_record(AUDIT_NAMESPACE, audit_id)


CSV_COLUMNS = ("layer", "units", "neuron", "method", "label", "match_score", "match_kind", "matched_term", "rank",
               "label_score", "calibrated", "run_key", "label_key", "top_image_ids")


def audit_to_csv(audit: Audit) -> str:
    """One row per hit; the header comment lines name the query, model, probe set and date."""
    buf = io.StringIO()
    buf.write(f"# audit {audit.id}: query={audit.query!r} model={audit.model_spec} probe_set={audit.probe_set_id} "
              f"created={time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(audit.created))}\n")
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    for hit in audit.hits:
        row = {c: getattr(hit, c) for c in CSV_COLUMNS if c != "top_image_ids"}
        row["top_image_ids"] = " ".join(im["image_id"] for im in hit.top_images)
        writer.writerow(row)
    return buf.getvalue()


def audit_to_json(audit: Audit) -> str:
    """The whole audit (query, options, date, hits with top images) as indented JSON."""
    return json.dumps(audit.to_dict(), indent=2, default=str)


def export_audit(audit: Audit, folder: str | Path) -> tuple[Path, Path]:
    """Write ``<id>.csv`` and ``<id>.json`` into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / f"{audit.id}.csv", folder / f"{audit.id}.json"
    csv_path.write_text(audit_to_csv(audit))
    json_path.write_text(audit_to_json(audit))
    return csv_path, json_path


def page_params(hit: AuditHit, model_spec: str, probe_set_id: str) -> dict[str, str]:
    """The dashboard's query parameters naming a hit exactly (``units`` only for a latent or direction)."""
    params = {"model": model_spec, "layer": hit.layer, "neuron": str(hit.neuron), "probe": probe_set_id}
    return params if hit.units == NEURONS else {**params, "units": short_units(hit.units)}


def neuron_page_link(hit: AuditHit, model_spec: str, probe_set_id: str, page: str = "neuron") -> str:
    """Relative URL of the dashboard's neuron page for a hit (?model=&layer=&neuron=&probe=[&units=])."""
    from urllib.parse import urlencode

    return f"{page}?" + urlencode(page_params(hit, model_spec, probe_set_id))
