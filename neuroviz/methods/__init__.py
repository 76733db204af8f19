"""Neuron-description methods: one module per method, one common interface, one registry.

Importing this package registers every method: each module's ``@register_method`` class
adds itself to :data:`~neuroviz.methods.base.METHODS`. A new method is one module here plus
one import line below.
"""

# Registration order is listing order (the pages show methods in it).
from . import clip_dissect, milan, dnd, netdissect, linear_explanations  # noqa: F401, I001  (imported to register them)
from .base import METHODS, DescriptionMethod, MethodContext, get_method, list_methods, register_method, run_method

__all__ = ["METHODS", "DescriptionMethod", "MethodContext", "get_method", "list_methods", "register_method", "run_method"]
