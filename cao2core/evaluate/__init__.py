"""``cao2 eval``: score a distilled set by training a student on it and testing on real held-out data.

Modules, in the order a run uses them: ``data`` (label spaces, folder layouts, image sets), ``students``
(ConvNet-D in timm's registry, student construction), ``augment`` (seeded batch augmentation), ``protocols``
(hard / rded / rded-faithful training loops), ``report`` (eval.json, markdown, plot) and ``cli``.
"""
