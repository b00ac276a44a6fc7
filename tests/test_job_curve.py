"""Tests for experiments/job_curve.py (not part of the paper): the default job in --resume segments, each scored,
with its wall time; the plot and its peer overlay; one-line refusals."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import job_curve  # noqa: E402
import kinds  # noqa: E402

SMALL = ["--", "--batch", "4", "--num-pages", "4", "--sample-steps", "2", "--grid-images", "1", "--grid-n", "1"]


@pytest.mark.slow
def test_segments_resume_one_job_and_score_each(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    monkeypatch.setattr(kinds, "train_classifier", lambda cache: (kinds.KindCNN().eval(), {"held_out_accuracy": 0}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job_curve.main(["--out", str(tmp_path), "--every", "1", "--segments", "2", "--pages", "2", "--n", "1", *SMALL])
    rows = json.load(open(tmp_path / "curve.json"))["rows"]
    assert [r["step"] for r in rows] == [1, 2] and 0 < rows[0]["train_s"] < rows[1]["train_s"]
    assert all(0 <= r["sample_accuracy"] <= 1 and r["pages"] == 2 and r["n"] == 1 for r in rows)
    log = [json.loads(line)["step"] for line in open(tmp_path / "job" / "log.jsonl")]
    assert log[-1] == 2                                           # one run, resumed, not two
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"rows": [{"images": 4000, "train_s": 60.0, "accuracy": 0.1}]}))
    pytest.importorskip("matplotlib")
    os.remove(tmp_path / "curve.png")
    job_curve.main(["--out", str(tmp_path), "--plot-only", "--peer", str(peer)])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    seen = {}
    monkeypatch.setattr(job_curve, "plot", lambda rows, peer, path, rate, wall: seen.update(wall=wall))
    job_curve.main(["--out", str(tmp_path), "--plot-only", "--wall-log", str(tmp_path / "job" / "log.jsonl")])
    elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(tmp_path / "job" / "log.jsonl"))}
    assert seen["wall"] == elapsed and set(elapsed) == {1, 2}    # ours drawn at the run's own seconds per step


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text(json.dumps({"step": 1, "elapsed_s": 3.0}) + "\n")
    for argv, say in ((["--every", "0"], "must be >= 1"), (["--peer", str(tmp_path / "no.json")], "no such file"),
                      (["--out", str(tmp_path), "--plot-only"], "no "),
                      (["--wall-log", str(tmp_path / "no.jsonl")], "no such file"),
                      (["--out", str(tmp_path / "c"), "--every", "1", "--segments", "2", "--wall-log",
                        str(tmp_path / "one.jsonl")], "no elapsed_s at steps [2]")):   # refused before training
        with pytest.raises(SystemExit) as e:
            job_curve.main(argv)
        assert e.value.code == 2 and say in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
