"""What a merge keeps of each target's gain, on hand-made tables with known answers."""

import pytest

from fusechat.evaluate.report import format_markdown
from fusechat.evaluate.retention import against, retention

BPB = {
    "pivot": {"describe": 4.0, "reverse": 10.0, "add": 6.0, "average": 6.667},
    "target-describer": {"describe": 1.0, "reverse": 4.0, "add": 6.0, "average": 3.667},
    "target-calculator": {"describe": 4.0, "reverse": 10.0, "add": 6.0, "average": 6.667},  # gained nothing
    "sft": {"describe": 2.0, "reverse": 8.0, "add": 3.0, "average": 4.333},
    "varm": {"describe": 2.5, "reverse": 7.0, "add": 5.0, "average": 4.833},
    "linear": {"describe": 0.5, "reverse": 4.0, "add": None, "average": 2.25},
}
SKILLS = {"describer": ["describe", "reverse"], "calculator": ["add"]}


def test_retention_is_the_share_of_the_summed_gain():
    kept = retention(BPB, SKILLS, ["varm", "linear"])
    # varm: (4 − 2.5) + (10 − 7) = 4.5 of (4 − 1) + (10 − 4) = 9
    assert kept["varm"]["describer"] == 0.5
    # linear beats the target on describe and ties it on reverse: (3.5 + 6) / 9
    assert kept["linear"]["describer"] == pytest.approx(9.5 / 9, abs=1e-4)
    # a target that gained nothing has no retention; neither has a merge with a missing cell
    assert kept["varm"]["calculator"] is None and kept["linear"]["calculator"] is None


def test_a_merge_that_is_the_pivot_keeps_nothing_and_the_target_keeps_all():
    table = {**BPB, "copy-of-pivot": BPB["pivot"], "copy-of-target": BPB["target-describer"]}
    kept = retention(table, {"describer": SKILLS["describer"]}, ["copy-of-pivot", "copy-of-target"])
    assert kept == {"copy-of-pivot": {"describer": 0.0}, "copy-of-target": {"describer": 1.0}}


def test_against_sft_per_skill():
    diff = against(BPB, ["varm", "sft"])
    assert diff == {"varm": {"describe": 0.5, "reverse": -1.0, "add": 2.0, "average": 0.5}}


def test_the_report_shows_retention_and_marks_the_runs_merge():
    text = format_markdown({"bits_per_byte": BPB, "retention": retention(BPB, SKILLS, ["varm", "linear"]),
                            "merge_method": "varm"})
    assert "| varm (the run's merge) | 0.50 | – |" in text
    assert "| linear | 1.06 | – |" in text
