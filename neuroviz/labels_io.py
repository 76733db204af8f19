"""Export and import neuron labels, so they travel between this tool and others.

Formats:

- ``clip_dissect`` (``descriptions.csv``): what CLIP-Dissect's ``describe_neurons.py`` writes:
  columns ``layer, unit, description, similarity``; one row per neuron (the best label).
- ``dnd``: Describe-and-Dissect's table: columns ``Neuron ID, Label 1, Label 2, Label 3``
  (ranks 0..2; the format has no scores).
- ``json``: everything, with provenance: the run (model, weights, layer, pooling, probe set,
  preprocessing), the method, its backends and hyperparameters, the concept set id, and for
  every neuron all ranks with scores, calibrated scores and extras.

Imported labels are stored against a run of this cache like any method's labels: CSV files
under the method ``imported:<file stem>`` (or a name the caller gives), JSON files under the
method recorded in the file. The label key of an import is a hash of the file's content and
the target run, so importing the same file twice replaces rather than duplicates; a JSON
file imported into the run it was exported from keeps its original label key, so the
labels count as cached for that exact method, configuration and backends.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NeurovizError
from .provenance import hash_file, provenance_key
from .store import LabelRow, RunInfo, Store

FORMATS = ("clip_dissect", "dnd", "json")
JSON_FORMAT_NAME = "neuroviz-labels"
JSON_FORMAT_VERSION = 1
DND_LABELS = 3


class LabelFileError(NeurovizError, ValueError):
    """A label file that cannot be read or does not fit the run; the message says why."""


@dataclass
class LabelSet:
    """One method's labels for one run, with everything needed to reproduce or cite them."""

    run: RunInfo
    method: str
    label_key: str
    backends: dict = field(default_factory=dict)
    hyperparams: dict = field(default_factory=dict)
    concept_set_id: str | None = None
    backend_description: str = ""
    rows: list[LabelRow] = field(default_factory=list)

    def top_rows(self) -> list[LabelRow]:
        return [r for r in self.rows if r.rank == 0]


def guess_format(path: Path | str) -> str:
    """The format a file name suggests: .json -> json; a CSV whose header says which; else clip_dissect."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return "json"
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if "Neuron ID" in header:
            return "dnd"
        return "clip_dissect"
    return "dnd" if "dnd" in path.stem.lower() else "clip_dissect"


# -- collecting from the store -----------------------------------------------------------------
def collect_labels(store: Store, run: RunInfo, method: str, label_key: str | None = None) -> LabelSet:
    """The labels of ``method`` for ``run`` (the most recent label run unless ``label_key`` is given)."""
    runs = store.label_runs(run.run_key)
    runs = runs[runs["method"] == method]
    if label_key is not None:
        runs = runs[runs["label_key"] == label_key]
    if runs.empty:
        have = sorted(set(store.label_runs(run.run_key)["method"]))
        raise LabelFileError(
            f"No labels by '{method}' for layer {run.layer} of {run.model_spec} (run {run.run_key}). "
            + (f"Methods with labels: {', '.join(have)}." if have else "Run `python -m neuroviz label ...` first.")
        )
    meta = runs.iloc[-1]
    key = str(meta["label_key"])
    df = store.labels(run.run_key, label_key=key)
    rows = [
        LabelRow(int(r.neuron), int(r.rank), str(r.label), _float(r.score), _float(r.calibrated),
                 json.loads(r.extra_json) if isinstance(r.extra_json, str) and r.extra_json else None)
        for r in df.itertuples()
    ]
    return LabelSet(run, method, key, json.loads(meta["backends_json"] or "{}"), json.loads(meta["hyperparams_json"] or "{}"),
                    meta["concept_set_id"] if isinstance(meta["concept_set_id"], str) else None,
                    str(df["backend"].iloc[0]) if len(df) else "", rows)


def _float(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# -- writing -------------------------------------------------------------------------------------
def write_descriptions_csv(label_sets: list[LabelSet], path: Path | str) -> Path:
    """CLIP-Dissect's descriptions.csv: layer, unit, description, similarity (best label per neuron)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "unit", "description", "similarity"])
        for ls in label_sets:
            for r in ls.top_rows():
                writer.writerow([ls.run.layer, r.neuron, r.label, "" if r.score is None else repr(float(r.score))])
    return path


def write_dnd_csv(label_sets: list[LabelSet], path: Path | str) -> Path:
    """Describe-and-Dissect's table: Neuron ID, Label 1..3 (several layers add a Layer column)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    several = len({ls.run.layer for ls in label_sets}) > 1
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow((["Layer"] if several else []) + ["Neuron ID"] + [f"Label {i + 1}" for i in range(DND_LABELS)])
        for ls in label_sets:
            by_neuron: dict[int, dict[int, str]] = {}
            for r in ls.rows:
                if r.rank < DND_LABELS:
                    by_neuron.setdefault(r.neuron, {})[r.rank] = r.label
            for neuron in sorted(by_neuron):
                labels = [by_neuron[neuron].get(i, "") for i in range(DND_LABELS)]
                writer.writerow(([ls.run.layer] if several else []) + [neuron] + labels)
    return path


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def label_set_to_dict(ls: LabelSet) -> dict:
    run = asdict(ls.run)
    run["map_shape"] = list(ls.run.map_shape) if ls.run.map_shape else None
    return _json_safe({
        "run": run, "method": ls.method, "label_key": ls.label_key, "backends": ls.backends,
        "hyperparams": ls.hyperparams, "concept_set_id": ls.concept_set_id, "backend_description": ls.backend_description,
        "labels": [{"neuron": r.neuron, "rank": r.rank, "label": r.label, "score": r.score,
                    "calibrated": r.calibrated, "extra": r.extra} for r in ls.rows],
    })


def write_json(label_sets: list[LabelSet], path: Path | str) -> Path:
    """All ranks, scores and provenance of every label set, as one JSON document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": JSON_FORMAT_NAME, "version": JSON_FORMAT_VERSION, "exported_at": time.time(),
           "label_sets": [label_set_to_dict(ls) for ls in label_sets]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    return path


def export_labels(store: Store, runs: list[RunInfo], method: str, path: Path | str, fmt: str | None = None,
                  label_key: str | None = None) -> Path:
    """Write ``method``'s labels for ``runs`` (layers) to ``path`` in ``fmt`` (guessed from the name)."""
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise LabelFileError(f"Unknown label format '{fmt}'. Formats: {', '.join(FORMATS)}.")
    label_sets = [collect_labels(store, run, method, label_key) for run in runs]
    writer = {"clip_dissect": write_descriptions_csv, "dnd": write_dnd_csv, "json": write_json}[fmt]
    return writer(label_sets, path)


# -- reading ------------------------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _rows_for_layer(rows: list[dict], layer: str, path: Path) -> list[dict]:
    """Rows of one layer when the file has a layer column; all rows when it names one layer only."""
    key = "layer" if rows and "layer" in rows[0] else "Layer" if rows and "Layer" in rows[0] else None
    if key is None:
        return rows
    layers = list(dict.fromkeys(r[key] for r in rows))
    mine = [r for r in rows if r[key] == layer]
    if mine:
        return mine
    if len(layers) == 1:
        return rows  # one layer under another name (e.g. exported from another tool): take it
    raise LabelFileError(f"{path.name} has no rows for layer '{layer}'; its layers: {', '.join(layers)}. "
                         "Import into the run of one of those layers.")


def _parse_neuron(value: str, path: Path, n_neurons: int) -> int:
    try:
        neuron = int(float(str(value).strip()))
    except ValueError:
        raise LabelFileError(f"{path.name}: '{value}' is not a neuron number.") from None
    if not 0 <= neuron < n_neurons:
        raise LabelFileError(f"{path.name}: neuron {neuron} does not exist in a layer of {n_neurons} neurons "
                             "(is the file for another layer or model?).")
    return neuron


def read_descriptions_csv(path: Path, run: RunInfo) -> list[LabelRow]:
    header, rows = _read_csv(path)
    missing = {"unit", "description"} - set(header)
    if missing:
        raise LabelFileError(f"{path.name} lacks column(s) {', '.join(sorted(missing))}; CLIP-Dissect's "
                             "descriptions.csv has layer, unit, description, similarity.")
    out = []
    for r in _rows_for_layer(rows, run.layer, path):
        score = r.get("similarity", "")
        out.append(LabelRow(_parse_neuron(r["unit"], path, run.n_neurons), 0, r["description"].strip(),
                            float(score) if score not in ("", None) else math.nan))
    return out


def read_dnd_csv(path: Path, run: RunInfo) -> list[LabelRow]:
    header, rows = _read_csv(path)
    if "Neuron ID" not in header:
        raise LabelFileError(f"{path.name} lacks the column 'Neuron ID'; a DnD table has Neuron ID, Label 1, Label 2, Label 3.")
    label_cols = sorted((c for c in header if c.startswith("Label ")), key=lambda c: int(c.split()[1]))
    if not label_cols:
        raise LabelFileError(f"{path.name} has no 'Label 1' column.")
    out = []
    for r in _rows_for_layer(rows, run.layer, path):
        neuron = _parse_neuron(r["Neuron ID"], path, run.n_neurons)
        for rank, col in enumerate(label_cols):
            if (r.get(col) or "").strip():
                out.append(LabelRow(neuron, rank, r[col].strip(), math.nan))
    return out


def read_json(path: Path, run: RunInfo) -> list[dict]:
    """The label sets of a JSON export that fit ``run`` (same run key, else same layer)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LabelFileError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT_NAME:
        raise LabelFileError(f"{path.name} is not a neuroviz label export (format '{JSON_FORMAT_NAME}').")
    sets = doc.get("label_sets") or []
    exact = [s for s in sets if s.get("run", {}).get("run_key") == run.run_key]
    if exact:
        return exact
    same_layer = [s for s in sets if s.get("run", {}).get("layer") == run.layer]
    if same_layer:
        return same_layer
    if len(sets) == 1:
        return sets
    layers = sorted({s.get("run", {}).get("layer") for s in sets})
    raise LabelFileError(f"{path.name} has no labels for layer '{run.layer}'; its layers: {', '.join(map(str, layers))}.")


def import_labels(store: Store, path: Path | str, run: RunInfo, fmt: str | None = None, method: str | None = None) -> list[str]:
    """Store the labels in ``path`` against ``run``; returns the label keys written.

    CSV imports are named ``imported:<file stem>`` unless ``method`` is given; JSON imports
    keep the method recorded in the file unless ``method`` is given.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabelFileError(f"Label file not found: {path}")
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise LabelFileError(f"Unknown label format '{fmt}'. Formats: {', '.join(FORMATS)}.")
    content = hash_file(path)
    if fmt != "json":
        rows = read_descriptions_csv(path, run) if fmt == "clip_dissect" else read_dnd_csv(path, run)
        if not rows:
            raise LabelFileError(f"{path.name} holds no labels.")
        name = method or f"imported:{path.stem}"
        key = provenance_key({"import": content, "format": fmt, "run": run.run_key, "method": name})
        store.save_labels(key, run.run_key, name, {}, {"imported_from": str(path), "format": fmt}, None, rows,
                          f"imported from {path.name} ({fmt})")
        return [key]
    keys = []
    for s in read_json(path, run):
        name = method or s.get("method") or f"imported:{path.stem}"
        original_run = s.get("run", {}).get("run_key")
        if original_run == run.run_key and method is None and s.get("label_key"):
            key = s["label_key"]  # the same artefact as where it came from: same provenance
        else:
            key = provenance_key({"import": content, "label_key": s.get("label_key"), "run": run.run_key, "method": name})
        rows = []
        for item in s.get("labels") or []:
            neuron = _parse_neuron(item.get("neuron"), path, run.n_neurons)
            score = item.get("score")
            rows.append(LabelRow(neuron, int(item.get("rank", 0)), str(item.get("label", "")),
                                 math.nan if score is None else float(score), item.get("calibrated"), item.get("extra")))
        if not rows:
            continue
        hyper = dict(s.get("hyperparams") or {})
        if original_run != run.run_key:
            hyper["imported_from"] = str(path)
        store.save_labels(key, run.run_key, name, s.get("backends") or {}, hyper, s.get("concept_set_id"), rows,
                          s.get("backend_description") or f"imported from {path.name}")
        keys.append(key)
    if not keys:
        raise LabelFileError(f"{path.name} holds no labels.")
    return keys
