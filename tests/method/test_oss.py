"""OSS rules: correct-only, easy/hard order, shortfall filled from the rest in the same order."""
import torch

from cao2core.method.oss import select_confidence, select_random, select_stability


def probs_of(rows):
    return torch.tensor(rows, dtype=torch.float32)


# pool of 6 over 3 classes, target class 1
POOL = probs_of([[0.1, 0.8, 0.1],   # 0 correct, conf .8
                 [0.7, 0.2, 0.1],   # 1 wrong,   conf .7
                 [0.3, 0.6, 0.1],   # 2 correct, conf .6
                 [0.05, 0.9, 0.05],  # 3 correct, conf .9
                 [0.1, 0.1, 0.8],   # 4 wrong,   conf .8
                 [0.4, 0.5, 0.1]])  # 5 correct, conf .5


def test_easy_keeps_most_confident_correct():
    assert select_confidence(POOL, 1, 3, "easy").tolist() == [3, 0, 2]


def test_hard_keeps_least_confident_correct():
    assert select_confidence(POOL, 1, 3, "hard").tolist() == [5, 2, 0]


def test_shortfall_filled_from_wrong_in_same_order():
    assert select_confidence(POOL, 1, 6, "easy").tolist() == [3, 0, 2, 5, 4, 1]
    assert select_confidence(POOL, 1, 6, "hard").tolist() == [5, 2, 0, 3, 1, 4]


def test_ties_keep_pool_order():
    tied = probs_of([[0.5, 0.5, 0.0]] * 1 + [[0.2, 0.6, 0.2]] * 3)
    assert select_confidence(tied, 1, 3, "easy").tolist() == [1, 2, 3]


def test_random_is_seeded():
    a = select_random(10, 4, torch.Generator().manual_seed(5))
    b = select_random(10, 4, torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4


def test_stability_keeps_most_consistent_regardless_of_correctness():
    before = probs_of([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    final = probs_of([[0.1, 0.9, 0.0], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.0, 0.1, 0.9]])
    # rows 1 and 2 agree exactly (cosine 1; tie keeps pool order), row 3 nearly, row 0 hardly
    assert select_stability(before, final, 3).tolist() == [1, 2, 3]
    assert select_stability(before, final, 4).tolist()[-1] == 0


def test_official_stability_order_is_the_official_argsort():
    """The official script keeps ``np.argsort(cos)[-ipc:]``: written here with NumPy from the cosines alone."""
    import numpy as np

    from cao2core.method.oss import official_stability_order, stability_of
    gen = torch.Generator().manual_seed(3)
    for pool, ipc in [(8, 3), (20, 10), (5, 5), (40, 1)]:
        before = torch.rand(pool, 10, generator=gen).softmax(1)
        final = torch.rand(pool, 10, generator=gen).softmax(1)
        before_np, final_np = before.double().numpy(), final.double().numpy()
        cos = (before_np * final_np).sum(1) / np.linalg.norm(before_np, axis=1) / np.linalg.norm(final_np, axis=1)
        keep = select_stability(before, final, ipc)
        reordered = official_stability_order(keep)
        assert reordered.tolist() == np.argsort(cos)[-ipc:].tolist()
        assert keep.tolist() == np.argsort(cos)[::-1][:ipc].tolist()      # the default: most consistent first
