"""Neuron-description methods: one module per method, one common interface, one registry.

Importing this package registers every method that is available in this checkout.
"""

from .base import DescriptionMethod, MethodContext, get_method, list_methods, register_method, run_method

for _name in ("clip_dissect", "milan", "dnd", "netdissect"):
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a method module not written yet in this checkout
        if not (_exc.name or "").endswith(_name):
            raise

__all__ = ["DescriptionMethod", "MethodContext", "get_method", "list_methods", "register_method", "run_method"]
