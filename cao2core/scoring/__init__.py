"""Scoring a set (``cao2 eval``, the API's ``evaluate``): train students on it and test them on real held-out data.

Modules, in the order an evaluation uses them: ``evaluation`` (``evaluate`` and its ``check``), ``data`` (label
spaces, folder layouts, image sets), ``students`` (ConvNet-D in timm's registry, student construction), ``augment``
(seeded batch augmentation), ``protocols`` (hard / rded / rded-faithful training loops), ``report`` (eval.json,
markdown) and ``figures`` (the reports' plots).
"""
