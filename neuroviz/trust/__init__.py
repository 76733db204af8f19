"""How far to trust a label: held-out scoring, sanity-tested metrics, baselines and badges.

- :mod:`.split`: a seeded content-hash split of a probe set into a fit part and a score part,
  and the *fit run* (the run restricted to the fit part) that methods label from.
- :mod:`.metrics`: simulation correlation, AUPRC, F1 and IoU (the metrics that pass the sanity
  tests of Neuron_Eval, Oikarinen et al., ICML 2025) with bootstrap intervals over images.
- :mod:`.baselines`: constant, shuffled and oracle label sets.
- :mod:`.scoring`: every label set of a layer scored the same way on the same held-out images.
- :mod:`.badges`: per unit, does its best label beat the shuffled baseline (FDR-corrected).
- :mod:`.humans`: a study's human win rates beside the automatic held-out scores.
"""
