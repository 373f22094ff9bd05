"""jaxlirpa.vnnlib: every shared property file, exact small cases, malformed input, results."""

from pathlib import Path

import numpy as np
import pytest

from jaxlirpa.vnnlib import read, write_result

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "vnncomp"
SIZES = {"acasxu": (5, 5), "mnistfc": (784, 10), "eran": (784, 10), "test_prop.vnnlib": (5, 5)}

DECLARE_2_3 = """(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
"""
BOX = "(assert (>= X_0 -1)) (assert (<= X_0 1.5)) (assert (<= 0 X_1)) (assert (>= 2 X_1))\n"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/vnncomp is absent")
def test_every_shared_property_parses_with_consistent_shapes():
    paths = sorted(SHARED.rglob("*.vnnlib"))
    assert len(paths) == 116
    for path in paths:
        folder = path.relative_to(SHARED).parts[0]
        num_inputs, num_outputs = SIZES.get(folder, SIZES.get(path.name, (1, 1)))
        properties = read(path, num_inputs, num_outputs)
        assert properties, path
        for p in properties:
            assert p.lower.shape == p.upper.shape == (num_inputs,)
            assert np.all(p.lower <= p.upper), path
            assert p.disjuncts, path
            for C, d in p.disjuncts:
                assert C.shape == (d.size, num_outputs) and d.shape == (d.size,), path


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/vnncomp is absent")
def test_acasxu_property_6_has_two_boxes_each_with_four_disjuncts():
    properties = read(SHARED / "acasxu" / "prop_6.vnnlib")
    assert len(properties) == 2
    np.testing.assert_array_equal(properties[1].upper[:2], [0.700434925, -0.11140846])
    for p in properties:
        rows = np.concatenate([C for C, _ in p.disjuncts])
        expected = np.zeros((4, 5))  # row i: Y_{i+1} - Y_0 <= 0
        expected[:, 0] = -1
        expected[np.arange(4), np.arange(1, 5)] = 1
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_array_equal(np.concatenate([d for _, d in p.disjuncts]), np.zeros(4))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/vnncomp is absent")
def test_input_and_output_mixed_inside_one_disjunct():
    (p,) = read(SHARED / "test" / "test_small.vnnlib", num_inputs=1, num_outputs=1)
    np.testing.assert_array_equal([p.lower, p.upper], [[-1.0], [1.0]])
    ((C, d),) = p.disjuncts
    np.testing.assert_array_equal(C, [[-1.0]])  # Y_0 >= 100  <=>  -Y_0 <= -100
    np.testing.assert_array_equal(d, [-100.0])


def test_conjunction_of_bounds_and_output_comparisons():
    text = DECLARE_2_3 + "; a comment (with parentheses\n" + BOX + """
(assert (<= Y_0 Y_1))  ; trailing comment
(assert (>= Y_2 0.25))
(assert (<= -3 Y_1))
"""
    (p,) = read(text)
    np.testing.assert_array_equal(p.lower, [-1.0, 0.0])
    np.testing.assert_array_equal(p.upper, [1.5, 2.0])
    ((C, d),) = p.disjuncts
    np.testing.assert_array_equal(C, [[1, -1, 0], [0, 0, -1], [0, -1, 0]])
    np.testing.assert_array_equal(d, [0, -0.25, 3])


def test_output_or_of_ands():
    text = DECLARE_2_3 + BOX + """
(assert (or
    (and (<= Y_0 Y_2) (<= Y_1 Y_2))
    (and (>= Y_0 7))
))
"""
    (p,) = read(text, num_inputs=2, num_outputs=3)
    (C0, d0), (C1, d1) = p.disjuncts
    np.testing.assert_array_equal(C0, [[1, 0, -1], [0, 1, -1]])
    np.testing.assert_array_equal(d0, [0, 0])
    np.testing.assert_array_equal(C1, [[-1, 0, 0]])
    np.testing.assert_array_equal(d1, [-7])


def test_input_or_gives_one_property_per_box_tightest_bounds_win():
    text = DECLARE_2_3 + """
(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
            (and (>= X_0 2) (<= X_0 3) (>= X_1 2) (<= X_1 3) (<= X_1 2.5))))
(assert (or (<= Y_0 1) (<= Y_1 1)))
"""
    first, second = read(text)
    np.testing.assert_array_equal([first.lower, first.upper], [[0, 0], [1, 1]])
    np.testing.assert_array_equal([second.lower, second.upper], [[2, 2], [3, 2.5]])
    for p in (first, second):
        assert [C.tolist() for C, _ in p.disjuncts] == [[[1, 0, 0]], [[0, 1, 0]]]


def test_reads_a_file_and_names_it_in_errors(tmp_path):
    good, bad = tmp_path / "good.vnnlib", tmp_path / "bad.vnnlib"
    good.write_text(DECLARE_2_3 + BOX + "(assert (<= Y_0 0))")
    bad.write_text(DECLARE_2_3 + BOX + "(assert (<= Y_0 0)")
    assert len(read(good)) == len(read(str(good))) == 1
    with pytest.raises(ValueError, match=r"bad\.vnnlib:7: '\(' is never closed"):
        read(bad)


MALFORMED = [
    (DECLARE_2_3 + BOX + "(assert (<= Y_0 0)))", r":7: unbalanced '\)'"),
    (DECLARE_2_3 + BOX + "(assert (<= Y_3 0))", r":7: Y_3 is neither a declared variable"),
    (DECLARE_2_3 + BOX + "(assert (<= Y_0 zero))", r":7: zero is neither"),
    (DECLARE_2_3 + BOX + "(assert (< Y_0 0))", r":7: expected \(and ...\)"),
    (DECLARE_2_3 + BOX + "(assert (<= X_0 Y_0))", r":7: only X_i vs number"),
    (DECLARE_2_3 + BOX + "(assert (<= X_0 X_1))", r":7: only X_i vs number"),
    (DECLARE_2_3 + BOX + "(check-sat)", r":7: unsupported command \(check-sat\)"),
    (DECLARE_2_3 + "(assert (<= X_0 1)) (assert (<= Y_0 0))", "X_0 lacks a lower or upper bound"),
    (DECLARE_2_3 + "(declare-const X_0 Real)" + BOX, r":6: expected a new \(declare-const"),
    ("(declare-const X_1 Real) (declare-const Y_0 Real)", "X_ variables are not numbered"),
    ("(declare-const X_0 Int) (declare-const Y_0 Real)", r":1: expected a new \(declare-const"),
]


@pytest.mark.parametrize("text, problem", MALFORMED, ids=[problem for _, problem in MALFORMED])
def test_malformed_text_raises_value_error(text, problem):
    with pytest.raises(ValueError, match=problem):
        read(text)


def test_declared_sizes_must_match_the_given_ones():
    with pytest.raises(ValueError, match="declares 3 Y_ variables, expected 4"):
        read(DECLARE_2_3 + BOX, num_outputs=4)


def test_write_result_sat_and_other_verdicts(tmp_path):
    path = tmp_path / "result.txt"
    write_result(path, "sat", x=np.array([[0.5, -1.25]]), y=[3.0])
    assert path.read_text() == "sat\n((X_0 0.5)\n (X_1 -1.25)\n (Y_0 3.0))\n"
    write_result(path, "unsat")
    assert path.read_text() == "unsat\n"
    with pytest.raises(ValueError, match="needs the counterexample"):
        write_result(path, "sat")
    with pytest.raises(ValueError, match="verdict must be one of"):
        write_result(path, "holds")
