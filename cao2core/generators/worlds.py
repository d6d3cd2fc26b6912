"""A world folder's ``cao2.json``: the settings a plugin ships beside its weights (label space, sampling defaults,
model configs). Read here once for every plugin, so a broken file is one line naming it, whichever plugin reads it."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

NUMBER = (int, float)
OBJECT_OR_NAME = (dict, str)
_TYPE_WORDS = {str: "a string", int: "a whole number", NUMBER: "a number", dict: "a JSON object",
               OBJECT_OR_NAME: "a JSON object or a preset name"}


def read_world_settings(path: Path, types: dict[str, type | tuple[type, ...]], fix: str) -> dict:
    """The JSON object in ``path``, each key of ``types`` present checked to be of its JSON type (null is taken
    as absent); anything wrong is one UserError naming the file and the key. ``fix`` ends the message of a file
    that cannot be read at all ("remove it to use DiT's defaults")."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); fix its permissions or remove it") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix it or {fix}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} should hold a JSON object of settings ({', '.join(list(types)[:3])}, ...), got "
                        f"{type(settings).__name__}; fix it or {fix}")
    for key, kinds in types.items():
        value = settings.get(key)
        # bool is an int to Python, never a count or a scale to a person writing JSON
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise UserError(f"{path}: {key} is {value!r}; it should be {_TYPE_WORDS[kinds]}")
    return settings
