"""The compact console: one line per stage on the screen, the stages' own output in the log file."""

import pytest

from fusechat.progress import compact_active, compact_console, console, stage_detail, stage_line


def test_compact_console_sends_stage_output_to_the_log(tmp_path, capfd):
    log = tmp_path / "run.log"
    with compact_console(log):
        assert compact_active()
        with stage_line("prepare"):
            console.print("prepared 12 conversations")
            print("a library's own print")
            stage_detail("step 3/10")
        with stage_line("train"):
            console.print("{'loss': 1.5}", markup=False)
    assert not compact_active()
    screen = capfd.readouterr()
    shown = screen.out + screen.err
    assert "✓ prepare" in shown and "✓ train" in shown
    assert "prepared 12 conversations" not in shown and "a library's own print" not in shown
    text = log.read_text()
    assert "prepared 12 conversations" in text and "a library's own print" in text and "{'loss': 1.5}" in text
    assert text.index("prepare") < text.index("prepared 12") < text.index("train")


def test_compact_console_shows_the_log_tail_on_an_error(tmp_path, capfd):
    log = tmp_path / "run.log"
    with pytest.raises(ValueError):
        with compact_console(log):
            with stage_line("align"):
                console.print("reading shard 7")
                raise ValueError("shard 7 is torn")
    shown = capfd.readouterr().err
    assert "reading shard 7" in shown and str(log) in shown.replace("\n", "")
    assert "✓ align" not in shown
    console.print("after the block")  # the console is the screen's again, not the closed log
    assert "after the block" in capfd.readouterr().err


def test_without_compact_mode_a_stage_is_a_rule_and_details_are_ignored(capfd):
    with stage_line("fuse"):
        stage_detail("ignored")
        console.print("fused 3 sources")
    shown = capfd.readouterr().err
    assert "fuse" in shown and "fused 3 sources" in shown and "ignored" not in shown
