"""Label spaces: shipped lists, subsets' generator labels, --classes parsing."""
import pytest

from cao2core.errors import UserError
from cao2core.data.labels import imagenet1k, label_space


def test_imagenet_lists_ship_as_package_data():
    wnids, names = imagenet1k()
    assert len(wnids) == len(names) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"


@pytest.mark.parametrize("name,n", [("nette", 10), ("woof", 10), ("in100", 100), ("in1k", 1000), ("mnist", 10)])
def test_sizes(name, n):
    assert len(label_space(name).ids) == n


def test_subset_generator_labels_are_imagenet_indices_in_subset_order():
    wnids, _ = imagenet1k()
    woof = label_space("woof")
    assert woof.ids[0] == "n02096294"          # not sorted: the order of the CaO2/Minimax evaluations
    assert [wnids[i] for i in woof.generator_labels] == list(woof.ids)
    assert woof.generator_space == "in1k"


def test_select_by_id_position_and_range():
    space = label_space("nette")
    picked = space.select("n02102040,0,3-4")
    assert picked.ids == ("n02102040", "n01440764", space.ids[3], space.ids[4])


def test_wnid_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("n01443537 goldfish\nn01440764\n")
    assert label_space(str(f)).generator_labels == (1, 0)
    f.write_text("n99999999\n")
    with pytest.raises(UserError, match="not an ImageNet-1K wnid"):
        label_space(str(f))


@pytest.mark.parametrize("spec,match", [("10", "out of range"), ("x", "unknown class"), ("3-12", "out of range"),
                                        (",", "selects no class")])
def test_bad_classes(spec, match):
    with pytest.raises(UserError, match=match):
        label_space("mnist").select(spec)


def test_a_byte_order_mark_is_not_part_of_the_first_class_id(tmp_path):
    from cao2core.data.labels import label_space
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffcat Cat\ndog\n".encode("utf-8"))
    assert label_space(str(path)).ids == ("cat", "dog")
    path.write_bytes("\ufeffn02086240\nn02087394\n".encode("utf-8"))     # an ImageNet subset too
    assert label_space(str(path)).ids == ("n02086240", "n02087394")
