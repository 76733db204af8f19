"""Label sets a method must beat: a constant label, its own labels shuffled, the oracle.

- constant ("depiction" for every unit): exposes a metric that rewards a label unrelated to
  the unit, or a backend in which one text is close to every image;
- shuffled: the method's labels given to other units of the same layer (a seeded
  permutation): a label that explains a unit must explain it better than its neighbours' do,
  which exposes labels that only name what the whole layer (or probe set) is about;
- oracle: the class name of each output unit, where ground truth exists: what the right
  one-word answer scores under this backend (a weighted combination of concepts can score higher).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scoring import LabelSet

DEFAULT_CONSTANT = "depiction"


def constant_label_set(text: str, neurons: Sequence[int]) -> LabelSet:
    """Every unit labelled ``text``."""
    return LabelSet(f"baseline: {text}", "constant", {int(n): text for n in neurons}, note="constant label")


def shuffled_label_set(labels: LabelSet, seed: int = 0) -> LabelSet:
    """``labels``' texts permuted across its units (seeded), so each unit gets another's label."""
    neurons = sorted(labels.labels)
    texts = [labels.labels[n] for n in neurons]
    order = np.random.default_rng(seed).permutation(len(neurons))
    return LabelSet(f"shuffled: {labels.name}", "shuffled", {n: texts[i] for n, i in zip(neurons, order)},
                    note=f"{labels.name}'s labels permuted across the layer (seed {seed})", held_out=labels.held_out)


def oracle_label_set(class_names: Sequence[str], neurons: Sequence[int]) -> LabelSet:
    """Each output unit labelled with its class name (only for a layer of one unit per class)."""
    return LabelSet("oracle: class names", "oracle", {int(n): str(class_names[n]) for n in neurons}, note="ground truth")
