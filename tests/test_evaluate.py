import numpy as np

from vitq.evaluate import accuracy, compare_logits, log_softmax


def test_accuracy_known_values():
    logits = np.array([[5, 1, 0, 0, 0, 0], [0, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float32)
    labels = np.array([0, 2, 0])
    acc = accuracy(logits, labels)
    assert np.isclose(acc["top1"], 100 / 3)
    assert np.isclose(acc["top5"], 200 / 3)  # row 2: class 0 has the lowest logit, out of top-5


def test_compare_identical_and_different():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 7)).astype(np.float32)
    same = compare_logits(a, a)
    assert same["agreement"] == 1.0 and abs(same["kl_mean"]) < 1e-12 and abs(same["cosine_mean"] - 1) < 1e-12
    b = -a
    diff = compare_logits(b, a)
    assert diff["agreement"] == 0.0 and diff["kl_mean"] > 0.1 and np.isclose(diff["cosine_mean"], -1)


def test_kl_matches_definition():
    p = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])
    lp, lq = log_softmax(p[0]), log_softmax(p[1])
    expect = (np.exp(lp) * (lp - lq)).sum()
    assert np.isclose(compare_logits(p[1], p[0])["kl_mean"], expect)
