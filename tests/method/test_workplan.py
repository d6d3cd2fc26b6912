"""Class groups: which classes share forward passes."""
from cao2core.method.workplan import chunks, class_groups


def test_groups_pack_consecutive_classes_into_one_chunk():
    assert class_groups([10] * 5, 64) == [[0, 1, 2, 3, 4]]
    assert class_groups([2] * 5, 4) == [[0, 1], [2, 3], [4]]
    assert class_groups([3, 2, 1, 5], 6) == [[0, 1, 2], [3]]


def test_a_class_larger_than_a_chunk_is_a_group_of_its_own():
    assert class_groups([100, 1, 1], 64) == [[0], [1, 2]]
    assert class_groups([1, 1, 1], 1) == [[0], [1], [2]]
    assert chunks(100, 64) == 2 and chunks(64, 64) == 1
