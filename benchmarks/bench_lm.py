"""DnD's language-model calls with and without the two savings: `.venv/bin/python benchmarks/bench_lm.py`.

One DnD neuron makes ~15 calls to the packaged Gemma-3-270M: 10 "simplify this caption" and 5
"summarise these labels" few-shot prompts. Two savings in TransformersLM.generate leave the
answers unchanged: the prompt head shared with the previous call (the examples) is read from a
cached key/value prefix, and generation stops once the answer line is complete. This script
runs the same calls both ways, interleaved neuron by neuron (these machines are noisy), checks
that the extracted concepts agree, and prints the time ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CAPTIONS = [
    "a dog running on a beach with a ball", "a red car parked on the street", "a plate of food with rice and beans",
    "a close up of a cat face", "a person riding a bicycle in a park", "a bowl of soup on a wooden table",
    "an acoustic guitar leaning on a wall", "a yellow flower in a green field", "a clock on a brick tower",
    "a cartoon of a smiling sun",
]


def one_neuron(lm, captions, plain: bool, seed: int) -> tuple[float, list[str]]:
    """The 15 calls of one DnD neuron; returns (seconds, concepts)."""
    from neuroviz.methods.dnd import concept_phrase, simplify_prompt, summary_prompt

    lm.MIN_SHARED_PREFIX = 10**9 if plain else type(lm).MIN_SHARED_PREFIX
    stop = not plain
    start = time.perf_counter()
    out = [concept_phrase(lm.generate(simplify_prompt(c), 8, 0.3, seed + i, stop_at_line_end=stop)) for i, c in enumerate(captions)]
    for j in range(5):
        order = captions[j:] + captions[:j]
        out.append(concept_phrase(lm.generate(summary_prompt(order), 8, 0.3, seed + 100 + j, stop_at_line_end=stop)))
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=4)
    parser.add_argument("--cache", default=str(REPO / "cache"), help="where the dequantised Gemma copy lives")
    args = parser.parse_args()

    from neuroviz.backends.language import create_language_model

    plain_lm = create_language_model("gemma3-270m", store_root=args.cache, record=False)
    plain_lm._load()
    fast_lm = type(plain_lm)(plain_lm.model_id, id=plain_lm.id, loader=lambda: (plain_lm.model, plain_lm.tokenizer))
    one_neuron(fast_lm, CAPTIONS[:3], plain=False, seed=999)  # warm-up
    plain_t, fast_t, same, total = [], [], 0, 0
    for n in range(args.neurons):
        captions = CAPTIONS[n % len(CAPTIONS):] + CAPTIONS[: n % len(CAPTIONS)]
        t0, a = one_neuron(plain_lm, captions, plain=True, seed=n * 1000)
        t1, b = one_neuron(fast_lm, captions, plain=False, seed=n * 1000)
        plain_t.append(t0)
        fast_t.append(t1)
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
        print(f"neuron {n}: plain {t0:6.2f} s   prefix cache + line stop {t1:6.2f} s", flush=True)
    print(f"\nper neuron (15 calls), median: plain {statistics.median(plain_t):.2f} s, "
          f"with the savings {statistics.median(fast_t):.2f} s")
    print(f"ratio (savings / plain) = {statistics.median(f / p for f, p in zip(fast_t, plain_t)):.2f}")
    print(f"concepts identical: {same}/{total}")


if __name__ == "__main__":
    main()
