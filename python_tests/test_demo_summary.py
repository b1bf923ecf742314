"""scripts/demo_summary.py: the main job's closing table from eval JSON files and training logs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_summary.py"
spec = importlib.util.spec_from_file_location("demo_summary", SCRIPT)
demo_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_summary)


def write_log(path: Path, seconds: list[float]) -> Path:
    lines = ["epoch,iteration,step,loss,lr,seconds"] + [f"0,{i},{i},1.0,0.001,{s}" for i, s in enumerate(seconds)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_eval(path: Path, twins: bool = True) -> Path:
    results = {"full": {"rsum": 512.34, "i2t_r1": 70.0, "t2i_r1": 61.25}}
    if twins:
        results["twin_accuracy"] = {"relation twins": {"i2t": 75.0, "t2i": 62.5, "pairs": 12},
                                    "attribute twins": {"i2t": 50.0, "t2i": 87.5, "pairs": 8}}
    path.write_text(json.dumps(results))
    return path


def test_training_time_adds_up_resumed_runs(tmp_path):
    # a run stopped at 30 s, resumed for 20 s more, then resumed again for 5 s
    log = write_log(tmp_path / "log.csv", [10.0, 30.0, 4.0, 20.0, 5.0])
    assert demo_summary.training_seconds(log) == pytest.approx(55.0)


def test_rows_and_table(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", [12.4, 40.6])
    assert demo_summary.main(["--row", "VSE++", str(write_eval(tmp_path / "a.json")), str(log),
                              "--row", "ensemble", str(write_eval(tmp_path / "b.json", twins=False))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "rSum"]
    assert lines[2].split() == ["VSE++", "512.3", "70.0", "61.2", "75.0", "/", "62.5", "50.0", "/", "87.5", "41", "s"]
    assert lines[3].split() == ["ensemble", "512.3", "70.0", "61.2", "—", "—", "—"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_bad_rows_say_what_is_wrong(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo_summary.main(["--row", "VSE++"])
    assert "--row takes LABEL EVAL_JSON [LOG_CSV], got 1 values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_summary.main(["--row", "VSE++", str(tmp_path / "missing.json")])
    assert "missing.json does not exist" in capsys.readouterr().err
