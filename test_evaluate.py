"""Tests for evaluate.py (Table 1's evaluation) and data/hpdv2/prepare.py (the prompts it and training read)."""

import importlib.util
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import models
import neighbor_grpo as ng
import report
from conftest import launch, tiny_cfg

EVAL_ARGS = ["--preset=tiny", "--rewards=jpeg_compressibility,test_rewards:brightness", "--eval_size=5",
             "--num_samples=2"]


def test_eval_table_has_table_1s_shape_with_the_papers_rows():
    summary = {name: dict(mean=0.5 + i, se=0.01) for i, name in enumerate(["hpsv2", "aesthetic", "brightness"])}
    lines = report.table1(summary, 3200, "runs/x/transformer", evaluate.PAPER_TABLE1).splitlines()
    assert lines[0] == "| model | hpsv2 | aesthetic | brightness |"
    assert lines[2] == "| runs/x/transformer (n = 3200) | 0.5000 ± 0.0100 | 1.5000 ± 0.0100 | 2.5000 ± 0.0100 |"
    assert lines[3] == "| FLUX.1-dev† (paper) | 0.310 | 6.108 | – |" and lines[-1].endswith("| 0.366 | 6.621 | – |")
    assert len(lines) == 3 + 4  # FLUX.1-dev, DanceGRPO, MixGRPO, Neighbor GRPO
    assert ng.SystemConfig().eval_only_rewards == ("hpsv2", "pickscore", "imagereward", "clipscore", "unifiedreward",
                                             "aesthetic")


def test_evaluation_scores_a_checkpoint_deterministically(tmp_path):
    ng.train(tiny_cfg(tmp_path / "run", "--iterations=3", "--sample_every=0", "--eval_every=0"))
    trained = f"--transformer_path={tmp_path / 'run/transformer'}"
    for name, extra in (("base", []), ("trained", [trained]), ("again", [trained])):
        evaluate.main([*EVAL_ARGS, f"--out_dir={tmp_path / name}", *extra])
    base, first, again = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("base", "trained", "again"))
    assert first["scores"] == again["scores"]  # one fixed noise per prompt
    assert first["scores"] != base["scores"]  # the checkpoint was evaluated, not the base model
    values = [s["test_rewards:brightness"] for s in first["scores"]]
    summary = first["rewards"]["test_rewards:brightness"]
    assert first["num_prompts"] == 5 and summary["mean"] == pytest.approx(sum(values) / 5)
    assert summary["se"] == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item() / math.sqrt(5))
    assert len((tmp_path / "trained/eval.md").read_text().splitlines()) == 3  # header, rule, the model's row
    assert Image.open(tmp_path / "trained/eval.png").size == (2 * 128, 128)  # 64 px samples scaled up
    with pytest.raises(SystemExit):  # an existing evaluation is not overwritten
        evaluate.main([*EVAL_ARGS, f"--out_dir={tmp_path / 'base'}"])


def test_eval_scores_do_not_depend_on_batch_size_or_ranks(tmp_path):
    args = [*EVAL_ARGS, "--rewards=brightness"]  # continuous in the image: JPEG sizes jump with float noise
    for batch in (1, 4):
        evaluate.main([*args, f"--eval_batch_size={batch}", f"--out_dir={tmp_path / f'batch{batch}'}"])
    command, env = launch(2, evaluate.__file__, *args, f"--out_dir={tmp_path / 'two'}")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / n / "eval.json").read_text()) for n in ("batch1", "batch4", "two")]
    assert runs[0]["num_prompts"] == 5  # 5 prompts over 2 ranks: one padded slot
    for run in runs[1:]:
        assert [r["index"] for r in run["scores"]] == list(range(5))
        assert all(abs(a["brightness"] - b["brightness"]) < 1e-5 for a, b in zip(runs[0]["scores"], run["scores"]))


# ---------------------------------------------------------------------------- data/hpdv2/prepare.py


def load_hpdv2_prepare():
    spec = importlib.util.spec_from_file_location("hpdv2_prepare", ng.ROOT / "data/hpdv2/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_cache(root, repo, files):
    """files laid out as huggingface_hub caches a dataset repo (refs/main -> a snapshot)."""
    folder = root / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/main").write_text("0123abc")
    for name, content in files.items():
        (folder / "snapshots/0123abc" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "snapshots/0123abc" / name).write_text(json.dumps(content))


def test_hpdv2_prepare_writes_the_training_and_benchmark_prompts_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    records = [dict(prompt=p, human_preference=[1, 0], file_path=["a.jpg", "b.jpg"]) for p in
               ["a cat", " a dog ", "a cat", "a red cube", " "]]
    hub_cache(tmp_path / "hub", "ymhao/HPDv2", {"train.json": records})
    styles = ("anime", "concept-art", "paintings", "photo")
    hub_cache(tmp_path / "hub", "zhwang/HPDv2", {f"benchmark/{s}.json": [f"{s} {i}" for i in range(3)] for s in styles})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    prepare = load_hpdv2_prepare()
    prepare.main([f"--out={tmp_path / 'out'}"])
    assert (tmp_path / "out/train.txt").read_text() == "a cat\na dog\na red cube\n"  # unique, in order
    assert (tmp_path / "out/test.txt").read_text().splitlines() == [f"{s} {i}" for s in styles for i in range(3)]
    monkeypatch.setattr(ng, "HPDV2_FILES", dict(prompt_file=tmp_path / "out/train.txt",
                                                eval_prompts=tmp_path / "out/test.txt"))
    assert ng.load_prompts("hpdv2") == ["a cat", "a dog", "a red cube"]
    assert len(ng.load_prompts("hpdv2", "eval_prompts")) == 12


def test_hpdv2_prepare_offline_names_the_right_repository_and_local_copies_work(tmp_path):
    prepare = load_hpdv2_prepare()
    with pytest.raises(SystemExit, match="huggingface-cli download ymhao/HPDv2 train.json --repo-type dataset"):
        prepare.main([f"--out={tmp_path}"])
    (tmp_path / "train.json").write_text(json.dumps([dict(prompt="a lemon"), dict(prompt="a whale")]))
    (tmp_path / "bench").mkdir()
    for style in ("anime", "concept-art", "paintings"):
        (tmp_path / "bench" / f"{style}.json").write_text(json.dumps([f"{style} 0"]))
    with pytest.raises(SystemExit, match="photo.json"):
        prepare.main([f"--out={tmp_path}", f"--train_json={tmp_path / 'train.json'}", f"--benchmark={tmp_path}/bench"])
    (tmp_path / "bench/photo.json").write_text(json.dumps(["photo 0"]))
    prepare.main([f"--out={tmp_path}", f"--train_json={tmp_path / 'train.json'}", f"--benchmark={tmp_path}/bench"])
    assert (tmp_path / "test.txt").read_text().splitlines() == ["anime 0", "concept-art 0", "paintings 0", "photo 0"]


def test_the_anchors_prompt_file_keeps_its_first_50000_lines_without_chinese(tmp_path):
    prepare = load_hpdv2_prepare()
    lines = ["a cat", "\u4e00\u53ea\u732b", "a dog"] + [f"prompt {i}" for i in range(50_000)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines), encoding="utf-8")
    prepare.main([f"--out={tmp_path}", f"--anchors_prompts={tmp_path / 'prompts.txt'}"])
    kept = (tmp_path / "train_anchors.txt").read_text().splitlines()
    assert kept[:3] == ["a cat", "a dog", "prompt 0"] and len(kept) == 50_000 and kept[-1] == "prompt 49997"


# ---------------------------------------------------------------------------- Table 1's protocol


def test_the_protocols_fields_reach_the_sampler_and_any_field_set_wins(tmp_path, monkeypatch):
    grids, shapes = [], []
    real_rollout = ng.rollout
    monkeypatch.setattr(ng, "rollout", lambda v, x, grid, solver: grids.append((len(grid) - 1, solver)) or
                        shapes.append(tuple(x.shape)) or real_rollout(v, x, grid, solver))
    cfg = evaluate.parse_config(["--preset=tiny", "--eval_protocol=mixgrpo", "--eval_resolution=32",
                                 "--eval_steps=3", "--eval_only_rewards=brightness", "--eval_size=2",
                                 f"--out_dir={tmp_path}"])
    assert (cfg.eval_jpeg_quality, cfg.eval_solver, cfg.reward_precision) == (75, "euler", "mixgrpo")
    evaluate.evaluate_model(cfg)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["resolution"], result["num_steps"], result["solver"], result["num_prompts"]) == (32, 3, "euler", 2)
    assert set(grids) == {(3, "euler")} and shapes[0][1] == (32 // 2 // 2) ** 2  # tokens: VAE factor 2, 2x2 patches
    assert Image.open(tmp_path / "eval.png").size == (2 * 128, 128)
    flux_dev = evaluate.parse_config([])  # Table 1's protocol by default
    assert (flux_dev.eval_resolution, flux_dev.eval_steps, flux_dev.eval_guidance_scale, flux_dev.eval_size,
            flux_dev.unifiedreward_protocol) == (1024, 50, 3.5, 0, "mixgrpo")
    tiny = evaluate.parse_config(["--preset=tiny"])
    assert (tiny.eval_protocol, tiny.eval_resolution, tiny.eval_jpeg_quality, tiny.eval_steps) == ("train", 0, 0, 0)
    with pytest.raises(ng.ConfigError, match="eval_protocol=mixgpro"):
        evaluate.parse_config(["--eval_protocol=mixgpro"])


def test_the_jpeg_round_trip_changes_the_images_as_pil_does():
    images = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), 9,
                                            stride=1, padding=4)  # smooth, like an image
    ours = evaluate.jpeg_round_trip(images, 75)
    for image, out in zip(images, ours):
        import io

        buffer = io.BytesIO()
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG")  # PIL's default
        expected = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1) / 255
        assert torch.equal(out, expected.float())
    assert (ours - images).abs().max() > 0.01 and (ours - images).abs().mean() < 0.02  # lossy, not broken


def test_unscored_judge_answers_are_left_out_and_counted_beside_the_mean(tmp_path):
    from conftest import Judge

    judge = Judge("partly")  # no score line for captions with a dog
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na lemon\na dog on a sofa\n")
    try:
        evaluate.main(["--preset=tiny", f"--eval_prompts={prompts}", "--eval_only_rewards=unifiedreward,brightness",
                       f"--unifiedreward_url={judge.url}", "--unifiedreward_protocol=mixgrpo", f"--out_dir={tmp_path}"])
    finally:
        judge.close()
    result = json.loads((tmp_path / "eval.json").read_text())
    judged = [s["unifiedreward"] for s in result["scores"]]
    assert judged[1] is None and judged[3] is None and None not in judged[::2]
    summary = result["rewards"]["unifiedreward"]
    assert summary["missing"] == 2 and summary["mean"] == pytest.approx(sum(judged[::2]) / 2)
    assert "(2 unscored)" in (tmp_path / "eval.md").read_text() and result["rewards"]["brightness"]["missing"] == 0


def test_mixgrpo_precision_runs_hpsv2_under_fp16_autocast_and_the_rest_in_fp32(monkeypatch, tmp_path):
    loaded = {}
    monkeypatch.setattr(ng, "load_reward", lambda name, cfg, device, dtype: loaded.setdefault(name, dtype))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    for precision, expected in (("mixgrpo", (torch.float16, torch.float32)), ("compute", (torch.bfloat16,) * 2)):
        loaded.clear()
        cfg = evaluate.parse_config([f"--reward_precision={precision}", f"--eval_prompts={prompts}"])
        ng.eval_setup(cfg, {}, "cpu", ("hpsv2", "pickscore", "imagereward", "clipscore", "aesthetic"),
                      evaluate.PRECISIONS.get(cfg.reward_precision))
        assert loaded.pop("hpsv2") == expected[0] and set(loaded.values()) == {expected[1]}


def test_evaluate_reads_the_transformer_in_the_compute_dtype(tmp_path, monkeypatch):
    """No fp32 copy of the weights on the host: from_pretrained is asked for bf16 (8 ranks of FLUX.1-dev in fp32
    would hold 380 GB), and the checkpoint's evaluation runs in it."""
    from diffusers import FluxTransformer2DModel

    ng.train(tiny_cfg(tmp_path / "run", "--iterations=1", "--sample_every=0", "--eval_every=0"))
    real, asked = FluxTransformer2DModel.from_pretrained.__func__, []

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("dtype"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", classmethod(spy))
    evaluate.main([*EVAL_ARGS, f"--out_dir={tmp_path / 'eval'}", "--mixed_precision=bf16",
                   f"--transformer_path={tmp_path / 'run/transformer'}"])
    assert asked == [torch.bfloat16] and (tmp_path / "eval/eval.json").exists()


def test_an_evaluation_that_cannot_fit_the_gpu_stops_in_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    """Table 1's protocol at 1024² holds the bf16 transformer, five fp32 judges and, at start-up, T5-XXL: ~46 GiB."""
    monkeypatch.setattr(models, "device_memory", lambda device, world=1: 40 * 10**9)
    monkeypatch.setattr(ng, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "this GPU's 37.3 GiB usable cannot hold the evaluation (~45.7 GiB at its start-up)" in err


def test_hpsv3_is_an_evaluation_column(tmp_path):
    from test_rewards import tiny_hpsv3

    processor_dir, checkpoint, _, _ = tiny_hpsv3(tmp_path)
    evaluate.main([*EVAL_ARGS, f"--out_dir={tmp_path / 'eval'}", "--eval_only_rewards=test_rewards:brightness,hpsv3",
                   f"--reward_paths=hpsv3_processor={processor_dir},hpsv3={checkpoint}", "--eval_size=2"])
    result = json.loads((tmp_path / "eval/eval.json").read_text())
    assert math.isfinite(result["rewards"]["hpsv3"]["mean"]) and "hpsv3" in (tmp_path / "eval/eval.md").read_text()
