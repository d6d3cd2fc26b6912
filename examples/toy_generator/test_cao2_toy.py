"""The toy plugin's own tests: the cao2 conformance kit checks every hook against the contract."""
import cao2_toy
from cao2core.testing import GeneratorConformance


class TestToyConformance(GeneratorConformance):
    generator = cao2_toy        # the module itself; an installed plugin can give its entry-point name instead
    options = {}
