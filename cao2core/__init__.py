"""cao2: dataset distillation with pretrained generators (CaO2)."""
__version__ = "0.1.0"
