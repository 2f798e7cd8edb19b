"""Tests for bench.py: the side-by-side run of Neighbor GRPO and the SDE baseline."""

import csv

import bench


def test_bench_compare_runs_both_methods_and_writes_the_curves(tmp_path, capsys):
    bench.main(["--preset=tiny", "--compare", "--iters=2", "--warmup=0", "--eval_every=2", f"--out={tmp_path}",
                "--group_size=4", "--num_anchors=2", "--num_samples=2"])
    out = capsys.readouterr().out
    assert "speed-up of Neighbor GRPO" in out and "5.28x in the paper" in out
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [(r["method"], r["iteration"]) for r in rows] == [("neighbor", "0"), ("sde", "0"), ("neighbor", "1"),
                                                             ("sde", "1")]
    assert all(r["eval/jpeg_compressibility"] for r in rows[2:]) and not rows[0]["eval/jpeg_compressibility"]
    assert float(rows[3]["wall_clock_s"]) > float(rows[1]["wall_clock_s"]) > 0
    assert (tmp_path / "compare.png").stat().st_size > 10_000
