"""A world folder's cao2.json, read for every plugin: one line naming the file and the key, whatever is wrong."""
from __future__ import annotations

import pytest

from cao2core.errors import UserError
from cao2core.generators.worlds import NUMBER, read_world_settings

TYPES = {"name": str, "steps": int, "scale": NUMBER, "config": dict}


def test_well_typed_settings_are_returned_as_written(tmp_path):
    path = tmp_path / "cao2.json"
    path.write_text('{"name": "w", "steps": 8, "scale": 2, "config": {"a": 1}, "other": [1], "scale2": null}')
    assert read_world_settings(path, TYPES, "remove it") == {"name": "w", "steps": 8, "scale": 2, "config": {"a": 1},
                                                             "other": [1], "scale2": None}
    path.write_text('{"steps": null}')      # null: as if absent, the plugin's default
    assert read_world_settings(path, TYPES, "remove it") == {"steps": None}


@pytest.mark.parametrize("text,match", [
    ('{"steps": 8.5}', "steps is 8.5; it should be a whole number"),
    ('{"steps": true}', "steps is True; it should be a whole number"),
    ('{"scale": "2"}', "scale is '2'; it should be a number"),
    ('{"config": []}', "config is []; it should be a JSON object"),
    ('"text"', "should hold a JSON object of settings (name, steps, scale, ...), got str; fix it or remove it"),
    ("{", "is not valid JSON"),
])
def test_each_fault_is_one_line_naming_the_file(tmp_path, text, match):
    path = tmp_path / "cao2.json"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_world_settings(path, TYPES, "remove it")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message


def test_an_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "cao2.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(UserError, match="cannot be read"):
        read_world_settings(path, TYPES, "remove it")
