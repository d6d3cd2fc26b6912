"""The plugin contract's import path of the previous release: an alias of :mod:`cao2core.generators.hookspecs`.

Plugins import ``hookimpl`` and the contract's types from here (``from cao2core.hookspecs import hookimpl``); the
path stays for them, and is the same module object as the new one.
"""
import sys

from .generators import hookspecs

sys.modules[__name__] = hookspecs
