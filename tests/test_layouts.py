"""Layout builders against hand-written expected matrices."""

import numpy as np
import pytest

from mlx_mtp.model.layouts import IGNORE, block_layout, linear_layout, quadratic_layout, training_layout, tree_parents

I = IGNORE


def rows(*lines: str) -> np.ndarray:
    return np.array([[c == "1" for c in line] for line in lines])


def test_training_layout_k2():
    lay = training_layout([10, 11, 12, 13], k=2, loss_start=1)
    np.testing.assert_array_equal(lay.tokens, [10, -1, -2, 11, -1, -2, 12, -1, -2, 13])
    np.testing.assert_array_equal(lay.positions, [0, 1, 2, 1, 2, 3, 2, 3, 4, 3])
    np.testing.assert_array_equal(lay.gate, [0, 1, 1, 0, 1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(lay.labels, [11, 12, 13, 12, 13, I, 13, I, I, I])
    np.testing.assert_array_equal(lay.prev_tokens[:5], [10, 11, 12, 11, 12])
    np.testing.assert_array_equal(lay.anchor, [-1, 3, 6, -1, 6, -1, -1, -1, -1, -1])
    expected = rows(
        "1000000000",
        "1100000000",
        "1110000000",
        "1001000000",
        "1001100000",
        "1001110000",
        "1001001000",
        "1001001100",
        "1001001110",
        "1001001001",
    )
    np.testing.assert_array_equal(lay.mask, expected)


def test_training_layout_prompt_gets_no_masks():
    lay = training_layout([10, 11, 12, 13], k=2, loss_start=2)
    np.testing.assert_array_equal(lay.tokens, [10, 11, -1, -2, 12, -1, -2, 13])
    np.testing.assert_array_equal(lay.positions, [0, 1, 2, 3, 2, 3, 4, 3])
    np.testing.assert_array_equal(lay.labels, [I, 12, 13, I, 13, I, I, I])
    expected = rows(
        "10000000",
        "11000000",
        "11100000",
        "11110000",
        "11001000",
        "11001100",
        "11001110",
        "11001001",
    )
    np.testing.assert_array_equal(lay.mask, expected)


def test_training_layout_k3():
    lay = training_layout([10, 11, 12], k=3, loss_start=1)
    np.testing.assert_array_equal(lay.tokens, [10, -1, -2, -3, 11, -1, -2, -3, 12])
    np.testing.assert_array_equal(lay.positions, [0, 1, 2, 3, 1, 2, 3, 4, 2])
    np.testing.assert_array_equal(lay.labels, [11, 12, I, I, 12, I, I, I, I])
    np.testing.assert_array_equal(lay.anchor, [-1, 4, -1, -1, -1, -1, -1, -1, -1])
    expected = rows(
        "100000000",
        "110000000",
        "111000000",
        "111100000",
        "100010000",
        "100011000",
        "100011100",
        "100011110",
        "100010001",
    )
    np.testing.assert_array_equal(lay.mask, expected)


def test_training_layout_explicit_loss_mask():
    a = training_layout([5, 6, 7, 8], k=2, loss_start=2)
    b = training_layout([5, 6, 7, 8], k=2, loss_mask=[False, False, True, True])
    for field in ("tokens", "positions", "gate", "mask", "labels", "prev_tokens", "anchor"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    with pytest.raises(ValueError):
        training_layout([5, 6, 7], k=2, loss_mask=[True])


def test_linear_layout_k2():
    lay = linear_layout([7, 8], k=2)
    np.testing.assert_array_equal(np.array(lay.tokens), [7, 8, -1, -2])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.array(lay.gate), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.array(lay.mask), rows("1000", "1100", "1110", "1111"))
    assert lay.regular == (0, 1)


def test_linear_layout_k3():
    lay = linear_layout([7], k=3)
    np.testing.assert_array_equal(np.array(lay.tokens), [7, -1, -2, -3])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.array(lay.gate), [0, 1, 1, 1])
    np.testing.assert_array_equal(np.array(lay.mask), rows("1000", "1100", "1110", "1111"))


def test_quadratic_layout_k2():
    lay = quadratic_layout([7, 8], k=2)
    np.testing.assert_array_equal(np.array(lay.tokens), [7, -1, -2, 8, -1, -2])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 2, 1, 2, 3])
    np.testing.assert_array_equal(np.array(lay.gate), [0, 1, 1, 0, 1, 1])
    expected = rows("100000", "110000", "111000", "100100", "100110", "100111")
    np.testing.assert_array_equal(np.array(lay.mask), expected)
    assert lay.regular == (0, 3)


def test_block_layout_masks_after_chosen_tokens():
    # masks after the first and the last of four tokens (a copied draft's step)
    lay = block_layout([7, 8, 9, 6], k=2, masked=[True, False, False, True])
    np.testing.assert_array_equal(np.array(lay.tokens), [7, -1, -2, 8, 9, 6, -1, -2])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 2, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(np.array(lay.gate), [0, 1, 1, 0, 0, 0, 1, 1])
    expected = rows(
        "10000000",
        "11000000",
        "11100000",
        "10010000",
        "10011000",
        "10011100",
        "10011110",
        "10011111",
    )
    np.testing.assert_array_equal(np.array(lay.mask), expected)
    assert lay.regular == (0, 3, 4, 5)
    # every token: the quadratic layout; the last only: the linear layout's attention
    for builder, masked in ((quadratic_layout, [True] * 3), (linear_layout, [False, False, True])):
        a, b = builder([7, 8, 9], 2), block_layout([7, 8, 9], 2, masked)
        for field in ("tokens", "positions", "gate", "mask"):
            np.testing.assert_array_equal(np.array(getattr(a, field)), np.array(getattr(b, field)))
        assert a.regular == b.regular
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        block_layout([7, 8, 9], 2, [True, True])


def test_tree_layout_branches_see_their_own_path():
    # pending 7, branch (8, 9), branch (5): 5 sits where 8 does and sees 7 only
    assert tree_parents((2, 1)) == (-1, 0, 1, 0)
    assert tree_parents((3,)) == (-1, 0, 1, 2)
    assert tree_parents(()) == (-1,)
    lay = block_layout([7, 8, 9, 5], k=1, masked=[True] * 4, parents=tree_parents((2, 1)))
    np.testing.assert_array_equal(np.array(lay.tokens), [7, -1, 8, -1, 9, -1, 5, -1])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 1, 2, 2, 3, 1, 2])
    np.testing.assert_array_equal(np.array(lay.gate), [0, 1, 0, 1, 0, 1, 0, 1])
    expected = rows(
        "10000000",
        "11000000",
        "10100000",
        "10110000",
        "10101000",
        "10101100",
        "10000010",
        "10000011",
    )
    np.testing.assert_array_equal(np.array(lay.mask), expected)
    assert lay.regular == (0, 2, 4, 6)
    np.testing.assert_array_equal(np.array(lay.mask_block), [0, 1, 2, 3])
    # a chain's parents give the block layout
    a, b = quadratic_layout([7, 8, 9], 2), block_layout([7, 8, 9], 2, [True] * 3, parents=(-1, 0, 1))
    np.testing.assert_array_equal(np.array(a.mask), np.array(b.mask))
    with pytest.raises(ValueError, match="3 entries for 4 tokens"):
        block_layout([7, 8, 9, 5], 1, [True] * 4, parents=(-1, 0, 1))
    with pytest.raises(ValueError, match="parents must come before"):
        block_layout([7, 8, 9], 1, [True] * 3, parents=(-1, 2, 0))


def test_quadratic_layout_k3():
    lay = quadratic_layout([7, 8, 9], k=3)
    np.testing.assert_array_equal(np.array(lay.tokens), [7, -1, -2, -3, 8, -1, -2, -3, 9, -1, -2, -3])
    np.testing.assert_array_equal(np.array(lay.positions), [0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5])
    expected = rows(
        "100000000000",
        "110000000000",
        "111000000000",
        "111100000000",
        "100010000000",
        "100011000000",
        "100011100000",
        "100011110000",
        "100010001000",
        "100010001100",
        "100010001110",
        "100010001111",
    )
    np.testing.assert_array_equal(np.array(lay.mask), expected)
    assert lay.regular == (0, 4, 8)
