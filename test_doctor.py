"""Tests for doctor.py on a CPU: the tiny models end to end, a report that survives an interruption, a crash or a
time-out, and checks in processes of their own."""

import json
import sys
import time

import pytest

import bench
import doctor
import neighbor_grpo as ng


def test_the_doctor_runs_end_to_end_on_a_cpu_and_says_there_is_no_gpu(tmp_path):
    report = bench.main(["--doctor", f"--out={tmp_path}"])  # bench.py's spelling runs doctor.py
    checks = report["checks"]
    assert report["device"].startswith("no GPU") and report["memory_gib"] is None and not report["isolated"]
    kernels = checks["kernels"]
    assert all(kernels[n]["ok"] for n in ("bf16 matmul", "collectives", "training's attention kernel",
                                          "bitsandbytes NF4")), kernels
    assert kernels["bitsandbytes NF4"]["relative_error"] < 0.2 and kernels["gemm_tflops"] > 0
    assert report["presets"]["flux-dev over 8"]["predicted_gib"] == pytest.approx(39.4, abs=0.1)
    verdicts = checks["attention-flash"]["verdicts"]  # the four families' calls, forward and backward
    assert len(verdicts) == 4 and set(verdicts.values()) == {"ok"}, verdicts
    assert checks["attention-cudnn"]["status"] == "skipped" and "compile" in checks["lora-compiled"]["why"]
    assert checks["gradient"]["finite"] and checks["gradient"]["cosine"] > 0.9
    runs = [checks[n] for n in ("lora-eager", "nf4-lora", "full", "sde")]
    assert all(r["status"] == "ok" and r["s_per_iteration"] > 0 and r["correct"] for r in runs), runs
    # FLOPs counted on an iteration of their own equal --meta's; NF4's 4-bit matmuls count as the bf16 base's
    assert checks["lora-eager"]["count_vs_meta"] == pytest.approx(1, abs=0.01)
    assert checks["nf4-lora"]["tflop_counted"] == pytest.approx(checks["lora-eager"]["tflop_counted"], rel=1e-9)
    assert report["fastest_correct_lora_setting"]["check"] == "lora-eager" and report["table3"]["ratio"] > 0
    assert json.loads((tmp_path / "doctor.json").read_text())["device"] == report["device"]
    assert "| NF4 + LoRA r=64 (tiny) | 4, 4, 2, 2 |" in (tmp_path / "doctor.md").read_text()
    assert "aten::" in (tmp_path / "profile_eager.txt").read_text()  # the eager iteration's top kernels
    assert not ng.dist.is_initialized()


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
