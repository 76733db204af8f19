"""Backends that the description methods use: multimodal (image+text), captioner, language model.

Each kind has an abstract interface in :mod:`neuroviz.backends.base` and a registry with
``list_*`` / ``create_*`` functions, so adding a backend is one entry.
"""
