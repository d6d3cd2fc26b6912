"""The method: the run (``engine``) and its stages — pools (``pools``), sample selection (``oss``), latent
optimization (``clo``) — with the work plan, the ranks under torchrun (``distributed``), ``--batch-size auto``
(``batchsize``), ``--dry-run`` (``dryrun``) and the official code's per-dataset settings (``presets``)."""
