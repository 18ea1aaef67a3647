"""The agreement numbers of ``models compare`` on constructed cases, each worked by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dicomnode.results.agreement import (
    cohen_kappa,
    compare_results,
    dice,
    match_findings,
)


def nodule(x: float, diameter: float = 6.0, label: str = "nodule", **more: Any) -> dict[str, Any]:
    return {"label": label, "probability": 0.9, "centre_mm": [x, 0.0, 0.0],
            "diameter_mm": diameter, **more}  # fmt: skip


def grade(value: int) -> dict[str, Any]:
    return {"label": "dr_grade", "probability": 0.8, "attributes": {"grade": value}}


def test_dice_of_known_masks() -> None:
    a = np.zeros((2, 4, 4), dtype=bool)
    b = np.zeros((2, 4, 4), dtype=bool)
    a[0, 0, 0:4] = True  # 4 voxels
    b[0, 0, 1:4] = True  # 3 of them shared ...
    b[1, 0, 0:3] = True  # ... and 3 more: 6 voxels
    assert dice(a, b) == pytest.approx(2 * 3 / (4 + 6))  # 0.6
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0  # both empty: they agree
    assert dice(a, np.zeros((4, 4))) is None  # not on one grid


def test_kappa_of_a_known_confusion_matrix() -> None:
    # live 0 / shadow 0: 20, 0/1: 5, 1/0: 10, 1/1: 15; n = 50
    # observed agreement 35/50 = 0.7; chance 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa 0.2 / 0.5 = 0.4
    pairs = [(0, 0)] * 20 + [(0, 1)] * 5 + [(1, 0)] * 10 + [(1, 1)] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa(pairs, weights="quadratic") == pytest.approx(0.4)  # two grades: the same


def test_quadratic_kappa_weighs_distant_grades_more() -> None:
    # (0,0) (1,1) (2,2) (0,2): observed weighted disagreement 1 * 1/4 = 0.25; rows .5 .25 .25,
    # columns .25 .25 .5; chance sum w_ij r_i c_j = 0.40625; kappa_w = 1 - 0.25 / 0.40625 = 5/13
    # unweighted: p_o = 0.75, p_e = .125 + .0625 + .125 = .3125, kappa = .4375 / .6875 = 7/11
    pairs = [(0, 0), (1, 1), (2, 2), (0, 2)]
    assert cohen_kappa(pairs, weights="quadratic") == pytest.approx(5 / 13)
    assert cohen_kappa(pairs) == pytest.approx(7 / 11)
    assert cohen_kappa([(1, 1), (1, 1)]) is None  # one category on both sides: undefined
    assert cohen_kappa([]) is None


def test_findings_match_by_centre_within_the_radius_or_5_mm() -> None:
    live = [nodule(0.0), nodule(40.0, diameter=20.0), nodule(80.0)]
    shadow = [nodule(4.0), nodule(49.0, diameter=4.0), nodule(86.0), nodule(0.0, label="mass")]
    match = match_findings(live, shadow)
    # 4 mm < 5 mm: one; 9 mm < the 10 mm radius of the larger: one; 6 mm > 5 mm: two;
    # a "mass" is never a "nodule"
    assert match.matched == ((0, 0), (1, 1))
    assert match.only_live == (2,) and match.only_shadow == (2, 3)


def test_closest_pairs_first_and_one_to_one() -> None:
    match = match_findings([nodule(0.0), nodule(3.0)], [nodule(2.5)])
    assert match.matched == ((1, 0),) and match.only_live == (0,)


def test_compare_results_counts_dice_and_grades() -> None:
    grid = np.zeros((1, 4, 4), dtype=np.uint8)
    live_mask, shadow_mask = grid.copy(), grid.copy()
    live_mask[0, 0, 0:4] = 1
    shadow_mask[0, 0, 1:4] = 1
    shadow_mask[0, 1, 0:3] = 1
    masks = {"live": live_mask, "shadow": shadow_mask}

    def mask_of(finding: dict[str, Any]) -> Any:
        return masks[finding["mask"]["name"]] == finding["mask"]["value"]

    pairs = [
        (
            {"findings": [nodule(0.0, mask={"name": "live", "value": 1}), nodule(50.0)]},
            {"findings": [nodule(1.0, mask={"name": "shadow", "value": 1})]},
        ),
        ({"findings": [grade(2)]}, {"findings": [grade(2)]}),
        ({"findings": [grade(0)]}, {"findings": [grade(2)]}),
        ({"findings": []}, {"findings": [nodule(0.0)]}),
    ]
    numbers = compare_results(pairs, mask_of)
    assert numbers.inputs == 4
    assert (numbers.matched, numbers.only_live, numbers.only_shadow) == (3, 1, 1)
    assert numbers.dice_pairs == 1 and numbers.mean_dice == pytest.approx(0.6)
    assert numbers.graded == 2 and numbers.grade_agreement == pytest.approx(0.5)
    # grades (2,2), (0,2): rows 0:.5 2:.5, columns 2:1; p_o = .5 = p_e: kappa 0
    assert numbers.kappa == pytest.approx(0.0)
    assert numbers.as_json()["weighted_kappa"] == pytest.approx(0.0)
