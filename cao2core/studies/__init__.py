"""Studies built from runs and evaluations: a distilled set against random real images (``compare``), the paper's
ablation of OSS and CLO (``ablate``) and a grid of run options on shared seeds (``sweep``)."""
