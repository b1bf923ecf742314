"""Hard-distractor (twin) evaluation on hand-made similarity matrices."""

from __future__ import annotations

import json

import pytest
import torch

from sgfused.evaluate import retrieval_metrics
from sgfused.twins import format_twin_accuracy, load_distractors, twin_accuracy, twin_results, wilson_interval


def _sims() -> torch.Tensor:
    """4 images x 2 captions each; images 0 and 1 are relation twins, 2 and 3 attribute twins."""
    sims = torch.zeros(4, 8)
    sims[0, [0, 1]] = 1.0  # image 0 prefers its own captions ...
    sims[1, [0, 1]] = 0.5  # ... over what its twin scores on them
    sims[1, [2, 3]] = 0.9
    sims[0, [2, 3]] = 0.9  # tie: image 0 scores image 1's captions as high as image 1 does
    sims[2, [4, 5]] = 0.2  # attribute twins: image 3 wins everywhere
    sims[3, [4, 5, 6, 7]] = 0.7
    return sims


RECORDS = [
    {"image": 1, "twin_of": 0, "differs": "direction"},
    {"image": 3, "twin_of": 2, "differs": "attribute"},
]


def test_twin_accuracy_counts_wins_and_half_ties_both_ways():
    relation = twin_accuracy(_sims(), torch.tensor([[1, 0]]), 2)
    # text->image: image 0's captions won by image 0 (1.0 > 0.5); image 1's captions tie (0.9 = 0.9): half each
    assert relation["t2i"] == pytest.approx(75.0) and relation["t2i_trials"] == 4
    # image->text: image 1's best own caption (0.9) vs image 0's captions (0.5): won; image 0: 1.0 > 0.9 won
    assert relation["i2t"] == pytest.approx(100.0) and relation["pairs"] == 1 and relation["i2t_trials"] == 2
    attribute = twin_accuracy(_sims(), torch.tensor([[3, 2]]), 2)
    assert attribute["t2i"] == pytest.approx(50.0)  # image 3 wins its own captions, loses image 2's
    # image->text: image 2 scores its own best 0.2 > 0.0 on image 3's captions (won);
    # image 3 scores 0.7 on its own captions and on image 2's (a tie: half)
    assert attribute["i2t"] == pytest.approx(75.0)


def test_twin_accuracy_carries_wilson_intervals_and_prints_them():
    relation = twin_accuracy(_sims(), torch.tensor([[1, 0]]), 2)
    assert relation["t2i_ci95"] == wilson_interval(75.0, 4) and relation["i2t_ci95"] == wilson_interval(100.0, 2)
    low, high = relation["t2i_ci95"]
    assert 0.0 < low < 75.0 < high < 100.0
    line = format_twin_accuracy({"relation twins": relation})
    assert f"text->image 75.0% [{low:.1f}, {high:.1f}]" in line and "95% Wilson" in line and "\n" not in line


def test_identical_twin_images_score_chance():
    sims = torch.tensor([[0.3, 0.8, 0.1, 0.4], [0.3, 0.8, 0.1, 0.4]])  # two images with one encoding
    accuracy = twin_accuracy(sims, torch.tensor([[1, 0]]), 2)
    assert accuracy["t2i"] == pytest.approx(50.0) and accuracy["i2t"] == pytest.approx(50.0)
    assert accuracy["response"] == 0.0  # the score does not move at all


def test_score_response_is_the_twin_gap_over_the_spread_of_scores():
    # images 0 and 1 are twins, 1 caption per image; every caption's column is a permutation of one set
    sims = torch.tensor([[3.0, 2.5, 0.0, 1.0], [2.5, 3.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.5], [1.0, 0.0, 2.5, 3.0]])
    spread = torch.tensor([0.0, 1.0, 2.5, 3.0]).std().item()  # so the spread over images is this set's std
    accuracy = twin_accuracy(sims, torch.tensor([[0, 1]]), 1)
    assert accuracy["t2i"] == pytest.approx(100.0)
    assert accuracy["response"] == pytest.approx(0.5 / spread)


def test_wilson_interval():
    low, high = wilson_interval(50.0, 100)
    assert low == pytest.approx(40.38, abs=0.01) and high == pytest.approx(59.62, abs=0.01)  # textbook values
    assert wilson_interval(100.0, 10)[1] == pytest.approx(100.0) and wilson_interval(100.0, 10)[0] < 100.0
    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        wilson_interval(50.0, 0)


def test_twin_results_rows_are_metrics_of_the_subsets():
    sims = _sims()
    rows, accuracy = twin_results(sims, RECORDS, 2)
    assert set(rows) == {"relation twins", "attribute twins"}
    assert rows["relation twins"] == retrieval_metrics(sims[[0, 1]][:, [0, 1, 2, 3]], 2)
    assert rows["attribute twins"] == retrieval_metrics(sims[[2, 3]][:, [4, 5, 6, 7]], 2)
    assert accuracy["relation twins"]["pairs"] == 1


def test_kinds_without_pairs_are_left_out():
    rows, accuracy = twin_results(_sims(), RECORDS[:1], 2)
    assert list(rows) == ["relation twins"] and list(accuracy) == ["relation twins"]


def test_load_distractors(tmp_path):
    assert load_distractors(tmp_path, "test") is None  # real datasets have none
    (tmp_path / "test_distractors.json").write_text(json.dumps(RECORDS))
    assert load_distractors(tmp_path, "test") == RECORDS
    (tmp_path / "dev_distractors.json").write_text(json.dumps([{"image": 1}]))
    with pytest.raises(ValueError, match="expected a list of"):
        load_distractors(tmp_path, "dev")


def test_pairs_outside_the_split_are_refused():
    with pytest.raises(ValueError, match=r"pair \(9, 0\) is outside the split's 4 images"):
        twin_results(_sims(), [{"image": 9, "twin_of": 0, "differs": "predicate"}], 2)
