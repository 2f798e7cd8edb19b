"""Tests for doctor.py on a CPU: the tiny models end to end, a report that survives an interruption, a crash or a
time-out, and checks in processes of their own."""

import ast
import json
import sys
import time
from pathlib import Path

import pytest

import bench
import doctor
import neighbor_grpo as ng


def test_the_doctor_runs_end_to_end_on_a_cpu_and_says_there_is_no_gpu(tmp_path):
    report = doctor.main([f"--out={tmp_path}"])
    checks = report["checks"]
    assert report["device"].startswith("no GPU") and report["memory_gib"] is None and not report["isolated"]
    kernels = checks["kernels"]
    assert all(kernels[n]["ok"] for n in ("bf16 matmul", "collectives", "training's attention kernel",
                                          "bitsandbytes NF4")), kernels
    nf4 = kernels["bitsandbytes NF4"]  # training's path: 4096 rows, the backward through MatMul4Bit
    assert nf4["rows"] >= 4096 and nf4["path"] == "MatMul4BitBackward" and nf4["dx_vs_fp32"] < 1e-2
    assert nf4["out_vs_fp32"] < 1e-2 and 0.02 < nf4["nf4_vs_bf16"] < 0.2 and kernels["gemm_tflops"] > 0
    assert report["presets"]["flux-dev over 8"]["predicted_gib"] == pytest.approx(39.4, abs=0.1)
    verdicts = checks["attention-flash"]["verdicts"]  # the four families' calls, forward and backward
    assert len(verdicts) == 4 and set(verdicts.values()) == {"ok"}, verdicts
    assert checks["attention-cudnn"]["status"] == "skipped" and checks["lora-compiled"]["why"] == doctor.NOT_SELECTED
    assert checks["gradient"]["finite"] and checks["gradient"]["cosine"] > 0.9
    runs = [checks[n] for n in ("preset", "nf4-lora", "full", "sde", "lora-eager")]
    assert all(r["status"] == "ok" and r["s_per_iteration"] > 0 and r["correct"] for r in runs), runs
    assert set(checks["preset"]["sampling_s"]) == {"sample grid", "evaluation"}  # as a run begins
    assert report["fastest_correct_lora_setting"] and report["table3"]["ratio"] > 0
    assert json.loads((tmp_path / "doctor.json").read_text())["device"] == report["device"]
    assert "| NF4 + LoRA r=64 (tiny, eager) | 4, 4, 2, 2 |" in (tmp_path / "doctor.md").read_text()
    assert not ng.dist.is_initialized()

    studies = doctor.main([f"--out={tmp_path / 'studies'}", "--only=profile,flops"])["checks"]  # a second run
    assert studies["flops"]["count_vs_meta"] == pytest.approx(1, abs=0.01)  # counted apart, equal to --meta's
    assert "aten::" in (tmp_path / "studies" / "profile_eager.txt").read_text()  # the eager iteration's top kernels


def test_the_plan_fits_every_default_check_in_the_default_budget_with_the_h200_estimates(capsys):
    plan = doctor.main(["--plan"])  # on this CPU: an H200's plan, nothing run
    rows = {r["name"]: r for r in plan["checks"]}
    assert list(rows) == list(doctor.ORDER) and not any(r["skipped"] for r in rows.values()), rows
    assert plan["total_s"] == sum(r["estimate_s"] for r in rows.values()) <= doctor.parse([])["budget"] == 480
    assert rows["preset"]["label"] == "flux-dev-lora as it ships, 19 + 38 blocks"  # FLUX.1-dev's depth
    assert rows["preset"]["estimate_s"] >= 93 + 10  # its first compiled iteration and a steady one (docs/cost.md)
    assert capsys.readouterr().out.split()[-5:] == ["total", f"{plan['total_s']:.0f}", "s", "of", "480"]


def test_a_peak_above_the_prediction_names_preflight_wrong_and_not_the_run():
    assert doctor.peak_verdict(45.7, 45.8) == doctor.peak_verdict(46.7, 45.8) == "matches"  # +2 %: 0.9 GiB
    assert doctor.peak_verdict(10.4, 10.0) == "matches"  # +0.5 GiB where 2 % is less
    assert doctor.peak_verdict(47.0, 45.8).startswith("preflight is wrong: the peak 47.0 GiB is 1.2 above")
    run = dict(label="a run", s_per_iteration=1.0, finite=True, abs_log_ratio=4e-6, peak_gib=60.0,
               predicted_gib=45.8)
    report = {"checks": {"lora-eager": run}}
    doctor.summarise(report)
    assert run["correct"] and run["preflight"].startswith("preflight is wrong") and run["log_ratio_margin"] == pytest.approx(6e-6)
    run["abs_log_ratio"] = 2e-5
    doctor.summarise(report)
    assert not run["correct"] and run["not_correct_because"] == ["|log rho| over 1e-05"]


def test_no_two_of_our_files_import_each_other(capsys):
    root = Path(__file__).resolve().parent
    ours = {p.stem: p for p in root.glob("*.py")}
    imports = {}
    for name, path in ours.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions too
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        imports[name] = found & set(ours) - {name}
    assert "bench" in imports["doctor"]  # the direction kept: the doctor uses bench's helpers
    circles = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports[b])
    assert not circles, circles
    with pytest.raises(SystemExit) as stop:  # bench.py's old spelling points to the doctor's entry in one line
        bench.main(["--doctor"])
    assert stop.value.code == 2 and "run python doctor.py" in capsys.readouterr().err


def quick_kernels(spec, device, found):
    found.update(device="a stand-in", gemm_tflops=1.0)
    time.sleep(spec.get("sleep", 0))


def test_a_failed_or_interrupted_check_or_a_spent_budget_leaves_the_checks_before_in_the_report(tmp_path,
                                                                                                monkeypatch):
    def fails(spec, device, found):
        found["begun"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def interrupted(spec, device, found):
        found["begun"] = True
        raise KeyboardInterrupt

    monkeypatch.setitem(doctor.KINDS, "kernels", quick_kernels)
    monkeypatch.setitem(doctor.KINDS, "attention", fails)
    monkeypatch.setitem(doctor.KINDS, "gradient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        doctor.main([f"--out={tmp_path}", "--only=kernels,attention-flash,gradient,lora-eager"])
    checks = json.loads((tmp_path / "doctor.json").read_text())["checks"]
    assert checks["kernels"]["status"] == "ok" and checks["kernels"]["device"] == "a stand-in"
    assert checks["attention-flash"]["status"] == "failed" and "illegal memory" in checks["attention-flash"]["error"]
    assert checks["gradient"]["status"] == "interrupted" and checks["gradient"]["begun"]
    assert "lora-eager" not in checks  # never begun
    assert "| gradient | interrupted" in (tmp_path / "doctor.md").read_text()

    monkeypatch.setitem(doctor.KINDS, "kernels", lambda spec, device, found: time.sleep(1.5))
    monkeypatch.setattr(doctor, "plan", lambda *args: [doctor.Check("gradient", "next", "gradient", 1.0, {})])
    report = doctor.main([f"--out={tmp_path}", "--budget=2"])  # the first check spends the budget
    assert report["checks"]["kernels"]["status"] == "ok" and report["checks"]["gradient"]["status"] == "skipped"
    assert report["checks"]["gradient"]["why"].startswith("the budget: 0 s left, it takes ~1 s")


def test_each_check_in_a_process_of_its_own_survives_a_crash_and_a_time_out(tmp_path, monkeypatch):
    real = doctor.child_command
    fakes = {"attention-flash": "print('torch.AcceleratorError: CUDA error: an illegal memory access', flush=True);"
                                " import os; os.abort()",
             "gradient": "import time; time.sleep(60)"}
    monkeypatch.setattr(doctor, "child_command", lambda check, result: [sys.executable, "-c", fakes[check.name]]
                        if check.name in fakes else real(check, result))
    monkeypatch.setattr(doctor, "TIMEOUT", (0, 2))  # a CPU's check is given 2 s
    t0 = time.monotonic()
    report = doctor.main([f"--out={tmp_path}", "--isolate", "--only=attention-flash,gradient"])
    crashed, slow = report["checks"]["attention-flash"], report["checks"]["gradient"]
    assert crashed["status"] == "failed" and crashed["error"] == (
        "killed by SIGABRT: torch.AcceleratorError: CUDA error: an illegal memory access")
    assert slow["status"] == "timed out" and slow["error"].startswith("timed out after 2 s")
    assert time.monotonic() - t0 < 30  # the sleeping child was killed
    monkeypatch.undo()
    report = doctor.main([f"--out={tmp_path}", "--isolate", "--only=kernels"])  # python doctor.py --one=...
    assert report["isolated"] and report["checks"]["kernels"]["status"] == "ok"
    assert report["checks"]["kernels"]["collectives"]["ok"] and report["device"].startswith("no GPU")
    assert "collectives" in (tmp_path / "parts" / "kernels.json").read_text()
