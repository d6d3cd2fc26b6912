"""Sharing a finished run: ``export`` writes it in the layouts other tools read (a Hugging Face ``datasets``
imagefolder with its card, RDED's numeric class folders, DD-Ranking's tensors)."""
