"""The plugin contract's import path of the previous release: an alias of :mod:`cao2core.generators.conformance`.

Plugins' own tests import the conformance kit from here (``from cao2core.testing import GeneratorConformance``);
the path stays for them, and is the same module object as the new one.
"""
import sys

from .generators import conformance

sys.modules[__name__] = conformance
