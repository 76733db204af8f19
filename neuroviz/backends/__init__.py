"""Backends that the description methods use: multimodal (image+text), captioner, language model.

Each kind has an abstract interface in :mod:`neuroviz.backends.base` and a registry
(:class:`neuroviz.registry.Registry`) in its own module: ``multimodal.MULTIMODAL``,
``captioner.CAPTIONERS``, ``language.LANGUAGE_MODELS``, each with a ``create_*`` function.
A new backend is one decorated factory in its kind's module; :mod:`.pool` wires the kinds a
method needs.
"""
