"""The model families (models.py): SD3.5 and Qwen-Image through the same loop as FLUX, on tiny random pipelines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch, max_abs_diff, read_log

import evaluate
import flux
import models
import neighbor_grpo as ng
import qwen_image
import sd3
import sde_grpo

FAMILIES = {"tiny-sd3": sd3, "tiny-qwen-image": qwen_image}
PIPELINE_CALL = {"tiny-sd3": lambda cfg: dict(guidance_scale=cfg.guidance_scale),
                 "tiny-qwen-image": lambda cfg: dict(true_cfg_scale=cfg.guidance_scale, negative_prompt="")}
QUICK = ["--sample_every=0", "--eval_every=0", "--rewards=brightness"]
LORA = ["--lora_rank=4", "--lora_alpha=8", "--lr=1e-2"]
parametrize = pytest.mark.parametrize("preset", list(FAMILIES))


def family_cfg(preset, *args):
    return ng.parse_config([f"--preset={preset}", *args])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pipe(request):
    cfg = family_cfg(request.param)
    return request.param, cfg, models.load_pipeline(cfg, torch.device("cpu"), torch.float32)


def transformer_class(preset):
    import diffusers

    return getattr(diffusers, models.family(preset).TRANSFORMER)


def test_a_family_is_read_from_model_index_json_a_random_name_or_a_hub_id(tmp_path):
    assert models.family("tiny") is models.family("black-forest-labs/FLUX.1-schnell") is models.module("flux")
    assert models.family("tiny-sd3") is models.family("stabilityai/stable-diffusion-3.5-large") is sd3
    assert models.family("random-qwen-image:2") is models.family("Qwen/Qwen-Image") is qwen_image
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert models.family(str(tmp_path)) is sd3
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(models.ModelError, match="a WanPipeline; the families trained here are FluxPipeline, "):
        models.family(str(tmp_path))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_deterministic_sampling_is_the_family_pipeline_with_its_guidance(family_pipe, guidance):
    """sigma = 0, G = 1: the pipeline's own sampling (latents and decoded images), true CFG included."""
    preset, cfg, pipe = family_pipe
    cfg = family_cfg(preset, "--rollout_solver=euler", "--num_steps=4", f"--guidance_scale={guidance}")
    cond = ng.encode_prompt(pipe, "a red apple", cfg, {})
    grid = ng.pipeline_grid(pipe, cfg, cfg.num_steps)
    x1 = ng.neighborhood_noise(pipe, cfg, torch.Generator().manual_seed(3), 1, 0.0, "cpu")
    states, _ = ng.neighborhood_rollout(pipe, cond, cfg, grid, torch.Generator().manual_seed(3), torch.float32, 1,
                                        0.0)
    call = dict(height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.num_steps, latents=x1,
                max_sequence_length=cfg.max_sequence_length, **PIPELINE_CALL[preset](cfg))
    latents = pipe("a red apple", output_type="latent", **call).images
    assert torch.allclose(states[:, -1], latents, atol=1e-5)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(grid, abs=1e-6)  # the grid it stepped on
    images = pipe("a red apple", output_type="pt", **call).images
    assert torch.allclose(ng.decode_images(pipe, states[:, -1], cfg.resolution), images, atol=1e-5)


def test_guidance_changes_the_velocity_and_stacked_prompts_keep_their_own(family_pipe):
    preset, cfg, pipe = family_pipe
    cache, x = {}, ng.neighborhood_noise(pipe, cfg, torch.Generator().manual_seed(4), 2, 0.5, "cpu")
    conds = [ng.encode_prompt(pipe, p, cfg, cache) for p in ("a cat", "a very long prompt about a red bicycle")]
    with torch.no_grad():
        alone = [ng.velocity(pipe.transformer, x[i: i + 1], 0.6, c) for i, c in enumerate(conds)]
        stacked = ng.velocity(pipe.transformer, x, 0.6, ng.stack_conditions(conds))
        unguided = ng.velocity(pipe.transformer, x[:1], 0.6, ng.encode_prompt(
            pipe, "a cat", family_cfg(preset, "--guidance_scale=1"), {}))
    assert torch.allclose(stacked, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(unguided, alone[0], atol=1e-3)


def test_rho_is_one_at_theta_old_with_dpm_rollouts(family_pipe):
    """pi_old's anchor (theta_old's DDIM step, from the guided velocity) is pi_theta's before any update."""
    preset, cfg, pipe = family_pipe
    cfg = family_cfg(preset, "--group_size=6", "--rollout_batch_size=6")
    grid = ng.pipeline_grid(pipe, cfg, cfg.num_steps)
    cond = ng.encode_prompt(pipe, "a red cube", cfg, {})
    states, train_next = ng.neighborhood_rollout(pipe, cond, cfg, grid, torch.Generator().manual_seed(7),
                                                 torch.float32, 6, 0.3)
    adv = ng.quasi_norm_advantages(torch.randn(6, generator=torch.Generator().manual_seed(8)), 0.8)
    group = ng.Group("a red cube", cond, states, train_next, torch.zeros(1, 6), adv, [], [])
    for j, k in [(0, 0), (1, 3), (5, 7)]:
        terms = [(group, j, k)]
        x, v = ng.transition_velocities(pipe.transformer, terms, grid, torch.float32)
        assert ng.anchor_objective(terms, x, v, grid, cfg)[2] < 1e-6


@parametrize
def test_the_tiny_model_learns_a_reward_and_lr_zero_stays(tmp_path, preset):
    means = {}
    for lr, iterations in (("3e-3", 24), ("0", 4)):
        ng.train(family_cfg(preset, f"--out_dir={tmp_path / lr}", f"--iterations={iterations}", f"--lr={lr}", *QUICK))
        r = [rec["reward/brightness"] for rec in read_log(tmp_path / lr)]
        means[lr] = (sum(r[:4]) / 4, sum(r[-4:]) / 4, r[0])
    assert means["3e-3"][1] - means["3e-3"][0] > 0.02  # brighter images (the reward lies in [0, 1])
    assert means["0"][2] == means["3e-3"][2]  # the same first rollout
    start = models.load_pipeline(family_cfg(preset), torch.device("cpu"), torch.float32).transformer
    frozen = transformer_class(preset).from_pretrained(tmp_path / "0/transformer")
    assert max_abs_diff(dict(frozen.named_parameters()), dict(start.named_parameters())) == 0


@parametrize
def test_the_export_loads_with_from_pretrained_and_lora_with_load_lora_weights(tmp_path, preset):
    cfg = family_cfg(preset)
    x = ng.neighborhood_noise(models.load_pipeline(cfg, torch.device("cpu"), torch.float32), cfg,
                               torch.Generator().manual_seed(5), 2, 0.5, "cpu")
    for name, args in (("full", []), ("lora", LORA)):
        model = ng.train(family_cfg(preset, f"--out_dir={tmp_path / name}", "--iterations=2", *QUICK, *args))
        pipe = models.load_pipeline(cfg, torch.device("cpu"), torch.float32)  # a fresh base
        cond = ng.encode_prompt(pipe, "a cat", cfg, {})
        with torch.no_grad():
            base = ng.velocity(pipe.transformer, x, 0.7, cond)
            if name == "full":
                pipe.transformer = transformer_class(preset).from_pretrained(tmp_path / "full/transformer")
            else:
                pipe.load_lora_weights(tmp_path / "lora/lora")
            trained = ng.velocity(model, x, 0.7, cond)
            assert torch.allclose(ng.velocity(pipe.transformer, x, 0.7, cond), trained, atol=1e-6)
            assert not torch.allclose(base, trained, atol=1e-5)  # it did train


@pytest.mark.parametrize("lora", [[], LORA], ids=["full", "lora"])
@pytest.mark.parametrize("preset", ["tiny", *FAMILIES])
def test_what_trains_is_exactly_what_the_guided_output_depends_on(preset, lora):
    """DDP needs a gradient for every parameter that trains: what load_pipeline freezes (the family's unreachable(),
    LoRA adapters included, frozen again after the adapters are switched off and on) is exactly what the guided
    velocity's gradient never reaches."""
    cfg = family_cfg(preset, *lora)
    pipe = models.load_pipeline(cfg, torch.device("cpu"), torch.float32)
    if lora:
        with models.adapters_off(pipe.transformer):
            pass
    trains = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    for n, p in pipe.transformer.named_parameters():  # what the recipe trains, unfrozen
        p.requires_grad_(not lora or "lora_" in n)
        if "lora_B" in n:
            p.data.normal_(std=0.01)  # B = 0 would zero every A's gradient
    x = ng.neighborhood_noise(pipe, cfg, torch.Generator().manual_seed(0), 2, 0.5, "cpu")
    ng.velocity(pipe.transformer, x, 0.5, ng.encode_prompt(pipe, "a cat", cfg, {})).square().sum().backward()
    assert trains == {n for n, p in pipe.transformer.named_parameters() if p.grad is not None and p.grad.any()}


@pytest.mark.parametrize("preset", ["tiny", *FAMILIES])
def test_stand_ins_are_built_in_their_dtype_with_every_constant_their_constructor_computes(preset):
    """A full-width stand-in's transformer (models.random_model on a device) is allocated in the dtype it trains in
    (a frozen base in bf16, never through fp32), seeded N(0, 0.02); its buffers and RoPE tables are the
    constructor's, as a CPU-built model's, cast as from_pretrained(dtype=) casts them."""
    import diffusers

    fam = models.family(preset)
    config = flux.transformer_config(**flux.TINY) if preset == "tiny" else fam.TINY["transformer"]
    build = lambda: getattr(diffusers, fam.TRANSFORMER)(**config)  # noqa: E731
    reference = build()
    for dtype in (torch.bfloat16, torch.float32):
        built = [models.random_model(build, 0, torch.device("cpu"), dtype) for _ in range(2)]
        assert all(p.dtype == dtype for p in built[0].parameters())
        assert max_abs_diff(*(dict(m.named_parameters()) for m in built)) == 0
        assert torch.cat([p.detach().float().flatten() for p in built[0].parameters()]).std().item() == pytest.approx(
            0.02, rel=0.1)
        for name, buffer in reference.named_buffers():
            assert torch.equal(built[0].get_buffer(name), buffer.to(dtype)), name
        for prefix, module in reference.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor):  # Qwen-Image's RoPE tables
                    assert torch.equal(getattr(built[0].get_submodule(prefix), name), value), name


def test_a_tensor_no_fsdp_rank_would_fill_stops_the_meta_build_and_bench_meta(monkeypatch, capsys):
    """Built on the meta device (FSDP's ranks but 0), Qwen-Image's RoPE tables come from its constants(): without
    them load_pipeline(meta=True) and bench.py --meta stop in one line naming the table, instead of a rank dying at
    its first forward (bench.py once gave them zeros)."""
    import bench

    monkeypatch.setattr(qwen_image, "constants", lambda transformer, device: None)
    with pytest.raises(models.ModelError, match=r"QwenImageTransformer2DModel.pos_embed.pos_freqs: .*constants\(\)"):
        models.empty_model(lambda: qwen_image.meta_transformer(qwen_image.TINY), torch.device("cpu"))
    with pytest.raises(SystemExit):
        bench.main(["--preset=tiny-qwen-image", "--meta", "--world_size=2", "--prompt_file="])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pos_embed.pos_freqs" in err


RANKS_DRIVER = """
import json, os, sys, torch, torch.distributed as dist
import diffusers, models, neighbor_grpo as ng
out, runs, common = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
rank, transformer = os.environ["RANK"], getattr(diffusers, models.family(ng.parse_config(common).model_path).TRANSFORMER)
real = transformer.from_pretrained.__func__
def spy(cls, *args, **kwargs):  # who reads the transformer's weights from disk
    open(f"{out}/{name}.weights_read_by_rank{rank}", "w").close()
    return real(cls, *args, **kwargs)
transformer.from_pretrained = classmethod(spy)
full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
for name, args in runs.items():
    torch.manual_seed(0)  # LoRA's A: a loaded pipeline leaves the global generator as the last run did
    model = ng.train(ng.parse_config(common + args + [f"--out_dir={out}/{name}"]))
    torch.save({n.removeprefix("module."): full(p) for n, p in model.named_parameters()}, f"{out}/{name}.rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""
RANKS = {  # each rank's arguments: FSDP2 in two calls an optimizer step, each reduce-scattered; checkpointed blocks
    "fsdp": ["--parallel=fsdp", "--grad_checkpointing=true", "--update_batch_size=1"],
    "ddp": ["--parallel=ddp", "--update_batch_size=2"],
    "ddp_lora": ["--parallel=ddp", "--grad_checkpointing=true", "--update_batch_size=2", *LORA],
}


@pytest.mark.parametrize("preset", ["tiny", *FAMILIES])
def test_two_ranks_equal_one_process_over_the_same_groups(tmp_path, preset):
    """Every family from a saved pipeline over two gloo ranks, in one launch: FSDP2 (ranks but 0 never read the
    weights; Qwen-Image's RoPE tables are no weight), DDP and DDP with LoRA (what the output cannot depend on, as
    Qwen-Image's last text MLP, frozen) each train as one process averaging both groups does."""
    import subprocess

    models.load_pipeline(family_cfg(preset), torch.device("cpu"), torch.float32).save_pretrained(tmp_path / "pipe")
    args = [f"--preset={preset}", f"--model_path={tmp_path / 'pipe'}", "--iterations=2", "--group_size=4",
            "--num_anchors=2", "--num_steps=2", "--num_train_steps=2", *QUICK,
            "--clip_range=1"]  # no ratio at the clip edge, where round-off would flip a term on or off
    (tmp_path / "driver.py").write_text(RANKS_DRIVER)
    command, env = launch(2, tmp_path / "driver.py", tmp_path / "ranks", json.dumps(RANKS), *args)
    (tmp_path / "ranks").mkdir()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = {p.name for p in (tmp_path / "ranks").glob("*.weights_read_by_rank*")}
    assert "fsdp.weights_read_by_rank0" in read and "fsdp.weights_read_by_rank1" not in read
    start = transformer_class(preset).from_pretrained(tmp_path / "pipe/transformer")
    one = {}  # one process over both groups (no parallel wrapper): full fine-tuning, LoRA
    for lora in ([], LORA):
        torch.manual_seed(0)  # LoRA's A, as each rank draws it
        model = ng.train(ng.parse_config([*args, *lora, "--groups_per_rank=2", "--update_batch_size=1",
                                          f"--out_dir={tmp_path / f'one{len(lora)}'}"]))
        one[bool(lora)] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert max_abs_diff(one[False], {n: p.detach() for n, p in start.named_parameters()}) > 1e-3  # it trained
    assert min(p.abs().max().item() for n, p in model.named_parameters()  # every adapter that trains (B starts at 0)
               if "lora_B" in n and p.requires_grad) > 1e-3
    for name, ranks in RANKS.items():
        two = [torch.load(tmp_path / f"ranks/{name}.rank{r}.pt") for r in (0, 1)]
        assert max_abs_diff(two[0], two[1]) == 0, name  # identical on every rank
        # the same updates as one process, to round-off times Adam's step: Adam divides the tiny model's near-zero
        # gradients by their own size, so their round-off can move a weight by a fraction of lr (1e-3; LoRA 1e-2;
        # 1.3e-5 at most measured)
        assert max_abs_diff(two[0], one["--lora_rank=4" in ranks]) < 1e-4, name


@parametrize
def test_a_saved_pipeline_trains_by_model_path_and_a_missing_weight_names_the_repository(tmp_path, preset, capsys):
    pipe = models.load_pipeline(family_cfg(preset), torch.device("cpu"), torch.float32)
    pipe.save_pretrained(tmp_path / "pipe")
    ng.train(family_cfg(preset, f"--model_path={tmp_path / 'pipe'}", f"--out_dir={tmp_path / 'run'}",
                        "--iterations=1", *QUICK))
    assert read_log(tmp_path / "run")[0]["iter"] == 0
    for weights in (tmp_path / "pipe/transformer").glob("*.safetensors"):
        weights.unlink()
    capsys.readouterr()  # the run's progress bars
    with pytest.raises(SystemExit):
        ng.main([f"--preset={preset}", f"--model_path={tmp_path / 'pipe'}", f"--out_dir={tmp_path / 'bad'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"download {FAMILIES[preset].REPO}" in err and "model_path=" in err


@parametrize
def test_the_baseline_kl_evaluation_and_guard_run_for_every_family(tmp_path, preset):
    ng.train(sde_grpo.parse_config([f"--preset={preset}", f"--out_dir={tmp_path / 'sde'}", "--iterations=1",
                                          *QUICK]), sde_grpo.SDE)
    assert read_log(tmp_path / "sde")[0]["iter"] == 0
    ng.train(family_cfg(preset, f"--out_dir={tmp_path / 'kl'}", "--iterations=2", "--kl_coef=1", *QUICK[:2],
                        "--rewards=brightness", "--eval_every=1", "--eval_size=2",
                        "--guard_rewards=jpeg_compressibility"))
    assert "kl" in read_log(tmp_path / "kl")[1] and (tmp_path / "kl/best/transformer").is_dir()
    summary = evaluate.evaluate_model(evaluate.parse_config([f"--preset={preset}", f"--out_dir={tmp_path / 'eval'}",
                                                             "--eval_only_rewards=brightness", "--eval_size=2"]))
    assert 0 < summary["brightness"]["mean"] < 1


@pytest.mark.parametrize("preset,width", [("sd3.5-medium", "random-sd3:2"), ("qwen-image", "random-qwen-image:2")])
def test_bench_meta_prices_a_family_at_its_width_with_guidance_twice_the_forward(preset, width):
    """--meta runs the family's own calls at its true width (2 blocks: at the true depth it takes minutes; README's
    figures are those runs): true CFG doubles every velocity's FLOPs; the true-size transformer counted as released."""
    import bench

    args = [f"--preset={preset}", f"--model_path={width}", "--prompt_file=", "--meta", "--world_size=8"]
    guided, plain = (bench.main([*args, f"--guidance_scale={s}"]) for s in (4.5, 1.0))
    assert guided["rollout_forward"] == pytest.approx(2 * plain["rollout_forward"], rel=1e-6)
    assert guided["update_step"] == pytest.approx(2 * plain["update_step"], rel=0.01)  # + the loss's few FLOPs
    assert set(guided["phases"]) == {"start-up", "rollout", "rewards", "update", "evaluation"}
    fam = models.family(width)
    billions = bench.parameter_count(lambda: fam.meta_transformer(fam.model_sizes(fam.REPO))) / 1e9
    assert billions == pytest.approx({"sd3.5-medium": 2.24, "qwen-image": 20.43}[preset], abs=0.01)


def test_a_compiled_run_without_a_c_compiler_stops_in_one_line_before_any_model_loads(tmp_path):
    root = Path(__file__).resolve().parent
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler")}  # inductor's C++ compiler: $CXX, else g++
    done = subprocess.run([sys.executable, str(root / "neighbor_grpo.py"), "--preset=tiny", "--compile=true",
                           f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "InvalidCxxCompiler" in errors[0] and "C compiler" in errors[0] and "--compile=false" in errors[0]
    assert done.stdout == "" and not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_a_compiled_run_logs_each_block_kinds_variants_after_its_first_iteration(tmp_path, capsys):
    from types import SimpleNamespace

    from report import RunLog

    cfg = ng.parse_config(["--preset=tiny", "--compile=true", f"--out_dir={tmp_path}"])
    model = flux.meta_transformer(flux.TINY)  # real tensors on the CPU, compiled lazily: nothing compiled yet
    models.prepare_blocks(model, False, True)
    log = RunLog(SimpleNamespace(rank=0, start=0, world=1, method=ng.NEIGHBOR, model=model), cfg)
    stats = {"loss": 0.0, "clip_frac": 0.0, "first_anchor_abs_log_ratio": 0.0, "time/total": 1.0}
    for it in (0, 1):
        log.iteration(it, torch.zeros(1, 2), stats)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compiled blocks:")]
    assert lines == ["compiled blocks: FluxTransformerBlock 0 variants, FluxSingleTransformerBlock 0 variants"]
