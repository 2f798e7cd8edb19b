"""Tests for fetch.py: each preset's plan against the loading code of diffusers and the reward packages, the pre-load
check offline (every missing piece in one message, exit 2, at once), a run from a cache laid out as the hub's, and
--fetch against a stand-in hub."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download as real_snapshot  # the cache reader a stand-in hub keeps

import fetch
import flux
import models
import neighbor_grpo as ng
import rewards

REWARDS_OF_FLUX_DEV = {  # the paper's rewards and the guards' downloads (UnifiedReward is a server)
    "xswu/HPSv2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "yuvalkirstain/PickScore_v1", "bert-base-uncased",
    "THUDM/ImageReward", "apple/DFN5B-CLIP-ViT-H-14-384", "trl-lib/ddpo-aesthetic-predictor",
    "openai/clip-vit-large-patch14"}
FOLDERS = {  # the components each family's pipeline requires (its __init__'s arguments without a default)
    "FLUX": ["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer"],
    "SD3.5": ["transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
              "text_encoder_3", "tokenizer_3"],
    "Qwen-Image": ["scheduler", "vae", "text_encoder", "tokenizer", "transformer"],
}
PRESET_MODELS = {
    "flux-dev": "black-forest-labs/FLUX.1-dev", "flux-dev-lora": "black-forest-labs/FLUX.1-dev",
    "flux-dev-24gb": "black-forest-labs/FLUX.1-dev", "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-medium-lora": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-medium-24gb": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large-lora": "stabilityai/stable-diffusion-3.5-large", "qwen-image": "Qwen/Qwen-Image",
    "qwen-image-lora": "Qwen/Qwen-Image", "qwen-image-32gb": "Qwen/Qwen-Image"}


def plan_of(*argv, **kwargs):
    needs, prompts, notes = fetch.plan(ng.parse_config(list(argv)), **{"everything": True, **kwargs})
    return {n.repo: n for n in needs}, prompts, notes


def matched(patterns, files):
    import fnmatch

    return {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}


# ---------------------------------------------------------------------------- the plan of each preset


@pytest.mark.parametrize("preset", sorted(PRESET_MODELS))
def test_each_hub_preset_plans_its_model_folders_the_rewards_guards_and_prompts(preset):
    needs, prompts, notes = plan_of(f"--preset={preset}")
    repo = PRESET_MODELS[preset]
    assert set(needs) == {repo} | REWARDS_OF_FLUX_DEV
    model = needs[repo]
    assert model.gated == (not repo.startswith("Qwen/"))  # FLUX.1-dev's and SD3.5's licenses are accepted first
    folders = FOLDERS[models.family(repo).NAME]
    assert {p.split("/")[0] for p in model.patterns} == {"model_index.json", *folders}
    assert [p.name for p in prompts] == ["train.txt", "test.txt"] and "unifiedreward" in notes[0]
    assert needs["xswu/HPSv2"].patterns == ["HPS_v2.1_compressed.pt"]
    assert needs["THUDM/ImageReward"].patterns == ["med_config.json", "ImageReward.pt"]
    assert needs["apple/DFN5B-CLIP-ViT-H-14-384"].names == ("apple/DFN5B-CLIP-ViT-H-14-378",
                                                           "apple/DFN5B-CLIP-ViT-H-14-384")  # the cache may hold either


@pytest.mark.parametrize("preset", ["tiny", "digits", "tiny-sd3", "tiny-qwen-image"])
def test_cpu_presets_plan_no_download(preset):
    assert plan_of(f"--preset={preset}") == ({}, [], [])


@pytest.mark.parametrize("field", ["rewards", "guard_rewards"])
def test_hpsv3_plans_its_checkpoint_and_qwen2_vl_s_processor_without_its_weights(field):
    needs, _, _ = plan_of("--preset=flux-dev-lora", f"--{field}=hpsv3")
    assert needs["MizzenAI/HPSv3"].patterns == ["HPSv3.safetensors"]  # hpsv3/inference.py: hf_hub_download(...)
    processor = needs["Qwen/Qwen2-VL-7B-Instruct"]
    assert {"config.json", "preprocessor_config.json", "vocab.json", "merges.txt"} <= set(processor.patterns)
    assert not [p for p in processor.patterns if "safetensors" in p or p.endswith(".bin")]  # 16 GB not read


def test_local_paths_and_module_rewards_need_no_download(tmp_path):
    paths = ",".join(f"{key}={tmp_path}" for key in rewards.REWARD_WEIGHTS)
    needs, _, _ = plan_of("--preset=flux-dev", f"--model_path={tmp_path}", f"--reward_paths={paths}",
                          "--rewards=test_rewards:brightness,hpsv2", "--prompt_file=", "--eval_prompts=" + __file__)
    assert needs == {}


def test_a_transformer_path_leaves_the_repository_s_transformer_out(tmp_path):
    needs, _, _ = plan_of("--preset=flux-dev", f"--transformer_path={tmp_path}")
    assert not [p for p in needs["black-forest-labs/FLUX.1-dev"].patterns if p.startswith("transformer")]


# ---------------------------------------------------------------------------- against the packages' own loading code

# The repositories' file listings (the hub's "Files and versions" of each main branch, transcribed: the hub is not
# reachable from the tests), sizes in bytes where they matter.
GB = 10**9
FLUX_DEV_FILES = {
    ".gitattributes": 0, "LICENSE.md": 0, "README.md": 0, "dev_grid.jpg": 0, "model_index.json": 0,
    "flux1-dev.safetensors": 23.8 * GB, "ae.safetensors": 0.335 * GB,  # single-file checkpoints (ComfyUI, ...)
    "scheduler/scheduler_config.json": 0, "text_encoder/config.json": 0, "text_encoder/model.safetensors": 0.246 * GB,
    "text_encoder_2/config.json": 0, "text_encoder_2/model-00001-of-00002.safetensors": 4.99 * GB,
    "text_encoder_2/model-00002-of-00002.safetensors": 4.53 * GB, "text_encoder_2/model.safetensors.index.json": 0,
    "tokenizer/merges.txt": 0, "tokenizer/special_tokens_map.json": 0, "tokenizer/tokenizer_config.json": 0,
    "tokenizer/vocab.json": 0, "tokenizer_2/special_tokens_map.json": 0, "tokenizer_2/spiece.model": 0,
    "tokenizer_2/tokenizer.json": 0, "tokenizer_2/tokenizer_config.json": 0, "transformer/config.json": 0,
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": 9.98 * GB,
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors": 9.95 * GB,
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors": 3.87 * GB,
    "transformer/diffusion_pytorch_model.safetensors.index.json": 0, "vae/config.json": 0,
    "vae/diffusion_pytorch_model.safetensors": 0.168 * GB}
SD35_MEDIUM_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "SD3.5M_example_workflow.json", "mmdit-x.png", "model_index.json",
    "sd3.5_medium.safetensors", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.safetensors",
    "text_encoder_3/model-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
    "text_encoders/README.md", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
    "text_encoders/t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json", "tokenizer_3/special_tokens_map.json", "tokenizer_3/spiece.model",
    "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
QWEN_IMAGE_FILES = [
    ".gitattributes", "LICENSE", "README.md", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/generation_config.json", "text_encoder/model.safetensors.index.json",
    *[f"text_encoder/model-0000{i}-of-00004.safetensors" for i in range(1, 5)], "tokenizer/added_tokens.json",
    "tokenizer/chat_template.jinja", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "transformer/config.json",
    *[f"transformer/diffusion_pytorch_model-0000{i}-of-00009.safetensors" for i in range(1, 10)],
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors"]
MODEL_INDEX = {  # model_index.json's components: [library, class]
    "black-forest-labs/FLUX.1-dev": dict(
        _class_name="FluxPipeline", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        text_encoder=["transformers", "CLIPTextModel"], text_encoder_2=["transformers", "T5EncoderModel"],
        tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "T5TokenizerFast"],
        transformer=["diffusers", "FluxTransformer2DModel"], vae=["diffusers", "AutoencoderKL"]),
    "stabilityai/stable-diffusion-3.5-medium": dict(
        _class_name="StableDiffusion3Pipeline", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        text_encoder=["transformers", "CLIPTextModelWithProjection"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"], text_encoder_3=["transformers", "T5EncoderModel"],
        tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"],
        tokenizer_3=["transformers", "T5TokenizerFast"], transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"], image_encoder=[None, None], feature_extractor=[None, None]),
    "Qwen/Qwen-Image": dict(
        _class_name="QwenImagePipeline", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        text_encoder=["transformers", "Qwen2_5_VLForConditionalGeneration"], tokenizer=["transformers", "Qwen2Tokenizer"],
        transformer=["diffusers", "QwenImageTransformer2DModel"], vae=["diffusers", "AutoencoderKLQwenImage"]),
}
LISTINGS = {"black-forest-labs/FLUX.1-dev": list(FLUX_DEV_FILES), "stabilityai/stable-diffusion-3.5-medium":
            SD35_MEDIUM_FILES, "Qwen/Qwen-Image": QWEN_IMAGE_FILES}


def diffusers_download_choice(repo, tmp_path, monkeypatch, **passed):
    """The files diffusers' own DiffusionPipeline.download (diffusers/pipelines/pipeline_utils.py) fetches of the
    listing: its allow_patterns less its ignore_patterns, with the hub calls answered from the listing."""
    import fnmatch
    from types import SimpleNamespace

    import diffusers.pipelines.pipeline_utils as pu

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps(MODEL_INDEX[repo]))
    asked = {}
    monkeypatch.setattr(pu, "_resolve_revision", lambda *a, **k: k.get("revision"))
    monkeypatch.setattr(pu, "model_info", lambda *a, **k: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in LISTINGS[repo]]))
    monkeypatch.setattr(pu, "hf_hub_download", lambda *a, **k: str(index))
    monkeypatch.setattr(pu, "snapshot_download", lambda *a, **k: (asked.update(k), str(tmp_path))[1])
    pu.DiffusionPipeline.download(repo, local_files_only=False, **passed)
    allowed = matched(asked["allow_patterns"], LISTINGS[repo])
    return {f for f in allowed if not any(fnmatch.fnmatch(f, p) for p in asked["ignore_patterns"])}


@pytest.mark.parametrize("repo", sorted(LISTINGS))
def test_the_model_plan_is_the_files_diffusers_own_download_fetches(repo, tmp_path, monkeypatch):
    """models.hub_files against DiffusionPipeline.download's choice on the repository's listing; the root's
    single-file checkpoints (FLUX.1-dev's flux1-dev.safetensors, SD3.5's sd3.5_medium.safetensors and its ComfyUI
    text_encoders/) in neither."""
    patterns, required = models.hub_files(repo)
    ours = matched(patterns, LISTINGS[repo])
    assert ours == diffusers_download_choice(repo, tmp_path, monkeypatch)
    assert not {"flux1-dev.safetensors", "ae.safetensors", "sd3.5_medium.safetensors"} & ours
    assert not [f for f in ours if f.startswith("text_encoders/")]
    assert all(set(choice) & set(LISTINGS[repo]) for choice in required)  # each required piece is in the repository
    without = matched(models.hub_files(repo, skip=("transformer",))[0], LISTINGS[repo])  # --transformer_path
    assert without == diffusers_download_choice(repo, tmp_path, monkeypatch, transformer=object())


def test_flux_dev_plan_leaves_out_the_23_8_gb_single_file_checkpoint():
    needs, _, _ = plan_of("--preset=flux-dev")
    chosen = matched(needs["black-forest-labs/FLUX.1-dev"].patterns, FLUX_DEV_FILES)
    assert "flux1-dev.safetensors" not in chosen
    assert sum(FLUX_DEV_FILES[f] for f in chosen) == pytest.approx(33.7 * GB, abs=0.05 * GB)  # not 57.9 GB


def test_the_reward_plans_are_the_files_their_loaders_read():
    """transformers' from_pretrained of a tokenizer reads its class's vocab_files_names and the base class's
    additional files (tokenization_utils_base.py, PreTrainedTokenizerBase.from_pretrained); of a model, the config
    and safetensors, else pytorch_model.bin (modeling_utils.py, _get_resolved_checkpoint_files); Qwen2-VL's
    AutoProcessor its processor, image and video processor configs and chat templates (processing_utils.py)."""
    import hpsv2.utils
    import transformers.tokenization_utils_base as tub
    import transformers.utils as tu
    from transformers import BertTokenizer, CLIPTokenizer, Qwen2Tokenizer
    from transformers.utils.hub import CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

    base = {tub.ADDED_TOKENS_FILE, tub.SPECIAL_TOKENS_MAP_FILE, tub.TOKENIZER_CONFIG_FILE, tub.FULL_TOKENIZER_FILE,
            CHAT_TEMPLATE_FILE}
    files = {key: patterns for key, patterns in ((k, rewards.DIRECTORY_FILES[k][0]) for k in rewards.DIRECTORY_FILES)}
    assert set(files["pickscore_processor"]) == base | set(CLIPTokenizer.vocab_files_names.values())
    assert set(files["imagereward_bert"]) == base | set(BertTokenizer.vocab_files_names.values())
    assert set(files["hpsv3_processor"]) == base | set(Qwen2Tokenizer.vocab_files_names.values()) | {
        tu.CONFIG_NAME, tu.IMAGE_PROCESSOR_NAME, tu.VIDEO_PROCESSOR_NAME, tu.PROCESSOR_NAME,
        LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE}
    for key in ("pickscore", "aesthetic_clip"):
        assert {tu.CONFIG_NAME, tu.SAFE_WEIGHTS_NAME, tu.SAFE_WEIGHTS_INDEX_NAME, tu.WEIGHTS_NAME} <= set(files[key])
    # the single files each package downloads itself: hpsv2/img_score.py (hps_version_map), ImageReward/utils.py
    # (_MODELS, med_config.json), hpsv3/inference.py, open_clip's hf-hub config and weights (hpsv2/src/open_clip/
    # factory.py, pretrained.py: download_pretrained_from_hf)
    site = Path(hpsv2.utils.__file__).parents[1]
    assert rewards.REWARD_WEIGHTS["hpsv2"][1] == hpsv2.utils.hps_version_map["v2.1"]
    imagereward = (site / "ImageReward/utils.py").read_text()
    assert "THUDM/ImageReward/blob/main/ImageReward.pt" in imagereward and "med_config.json" in imagereward
    assert "'HPSv3.safetensors'" in (site / "hpsv3/inference.py").read_text()
    open_clip = (site / "hpsv2/src/open_clip/factory.py").read_text() + (site / "hpsv2/src/open_clip/pretrained.py"
                                                                        ).read_text()
    assert "'open_clip_config.json'" in open_clip and "'open_clip_pytorch_model.bin'" in open_clip
    assert not [n for n in ("unifiedreward", "jpeg_compressibility", "digit_alignment") if rewards.reward_files(
        n, ng.parse_config(["--preset=tiny"]))]


# ---------------------------------------------------------------------------- the check before loading

OFFLINE_PIECES = [  # a run's rewards and guards, evaluate.py's judges
    "model (FLUX): black-forest-labs/FLUX.1-dev", "hpsv2: xswu/HPSv2 HPS_v2.1_compressed.pt",
    "pickscore: yuvalkirstain/PickScore_v1", "pickscore (pickscore_processor): laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "imagereward: THUDM/ImageReward med_config.json, ImageReward.pt", "imagereward (imagereward_bert): bert-base-uncased",
    "clipscore: apple/DFN5B-CLIP-ViT-H-14-384", "aesthetic: trl-lib/ddpo-aesthetic-predictor",
    "aesthetic (aesthetic_clip): openai/clip-vit-large-patch14", "prompts: data/hpdv2/train.txt"]


def run(script, *args, home, timeout=120, **env):
    start = time.monotonic()
    out = subprocess.run([sys.executable, script, *args], cwd=ng.ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", **env})
    return out, time.monotonic() - start


@pytest.mark.skipif((ng.ROOT / "data/hpdv2/train.txt").exists(), reason="HPDv2's prompts are prepared here")
def test_offline_with_an_empty_cache_a_run_and_evaluate_name_every_missing_piece_in_one_message(tmp_path):
    """Exit 2, no traceback, each piece named, the --fetch command last; the hub never asked (the process's whole
    life: imports, then the check, no ~35 s of retries)."""
    for script, pieces in (("neighbor_grpo.py", OFFLINE_PIECES),
                           ("evaluate.py", [*OFFLINE_PIECES[:-1], "prompts: data/hpdv2/test.txt"])):
        out, seconds = run(script, "--preset=flux-dev", f"--out_dir={tmp_path / script}", home=tmp_path / "hf")
        assert out.returncode == 2 and "Traceback" not in out.stderr and "\nerror: " in "\n" + out.stderr
        err = out.stderr[out.stderr.index("error: "):]  # after the imports' own warnings (bitsandbytes, torchao)
        assert err.startswith("error: offline (HF_HUB_OFFLINE=1)")
        assert all(piece in err for piece in pieces), err
        assert err.splitlines()[-1].endswith(f"python {script} --preset=flux-dev --out_dir={tmp_path / script} "
                                             "--fetch")
        assert seconds < 60  # a sanity bound on a shared CPU: the imports take ~6 s, the check well under one


def silent_server():
    """A TCP port that accepts connections and never answers: a hub out of reach behind a firewall that drops."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def test_with_the_hub_out_of_reach_the_check_says_so_within_its_probe(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    server = silent_server()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(fetch.FetchError, match="did not answer within 2 s") as error:
        fetch.require_downloads(ng.parse_config(["--preset=flux-dev", "--prompt_file=", "--eval_every=0", "--guard_rewards="]))
    assert time.monotonic() - start < fetch.PROBE_S + 3
    assert "reward hpsv2: xswu/HPSv2" in str(error.value) and "clipscore" not in str(error.value)  # no guards
    server.close()


@pytest.mark.parametrize("argv", [["--preset=tiny"], ["--preset=digits"], ["--preset=tiny-sd3"],
                                  ["--preset=tiny", "--rewards=test_rewards:brightness", "--model_path=random:1,1"]])
def test_local_models_and_rewards_are_never_flagged_and_the_hub_never_probed(argv, monkeypatch):
    monkeypatch.setattr(fetch, "offline", lambda: pytest.fail("probed the hub"))
    assert fetch.require_downloads(ng.parse_config(argv)) is None


def hub_layout(cache, repo, save, commit="0123456789abcdef0123456789abcdef01234567"):
    """save(dir) into the Hugging Face cache's layout: models--org--name/snapshots/<commit>/..., refs/main."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    save(root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


TINY_FLUX_DEV_ARGS = [  # flux-dev at a CPU's size; its model from the hub's layout, a reward that downloads nothing
    "--preset=flux-dev", "--resolution=64", "--max_sequence_length=64", "--group_size=3", "--num_anchors=2",
    "--num_steps=2", "--num_train_steps=1", "--iterations=2", "--rewards=jpeg_compressibility", "--guard_rewards=",
    "--eval_every=0", "--prompt_file=", "--device=cpu", "--mixed_precision=fp32", "--parallel=ddp",
    "--grad_checkpointing=false", "--sample_every=0", "--ckpt_every=0", "--rollout_batch_size=3"]


def test_a_cache_laid_out_as_the_hub_s_starts_offline_and_trains_two_iterations(tmp_path):
    """The model_path is FLUX.1-dev's hub id; a tiny random FluxPipeline sits in the cache under that name, so the
    check and diffusers' loading read the hub's real layout."""
    hub_layout(tmp_path / "hf/hub", "black-forest-labs/FLUX.1-dev",
               lambda d: flux.build_random_flux(0, **flux.TINY).save_pretrained(d))
    out, _ = run("neighbor_grpo.py", *TINY_FLUX_DEV_ARGS, f"--out_dir={tmp_path / 'run'}", home=tmp_path / "hf",
                 timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [0, 1]


def test_a_partial_cache_names_the_missing_shard(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = hub_layout(tmp_path, "black-forest-labs/FLUX.1-dev",
                          lambda d: flux.build_random_flux(0, **flux.TINY).save_pretrained(d))
    shard = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    (snapshot / "transformer/diffusion_pytorch_model.safetensors").unlink()
    (snapshot / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": shard.split("/")[1]}}))
    (snapshot / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"")
    (snapshot / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(fetch.FetchError) as error:
        fetch.require_downloads(ng.parse_config(TINY_FLUX_DEV_ARGS))
    assert f"lacks vae/diffusion_pytorch_model.safetensors, {shard}" in str(error.value)


# ---------------------------------------------------------------------------- --fetch against a stand-in hub


class StandInHub:
    """HfApi.model_info and snapshot_download answered from FLUX_DEV_FILES (gated) and small reward listings."""

    def __init__(self, cache):
        self.cache, self.asked = Path(cache), {}

    def info(self, repo, files_metadata=False):
        from types import SimpleNamespace

        listing = FLUX_DEV_FILES if repo in PRESET_MODELS.values() else {
            "config.json": 0, "model.safetensors": GB, "pytorch_model.bin": GB, "vocab.json": 0, "merges.txt": 0,
            "vocab.txt": 0, "tokenizer_config.json": 0, **{f: GB for f in ("HPS_v2.1_compressed.pt", "ImageReward.pt",
            "med_config.json", "open_clip_config.json", "open_clip_pytorch_model.bin", "aesthetic-model.pth")}}
        return SimpleNamespace(gated="manual" if repo in PRESET_MODELS.values() else False,
                               siblings=[SimpleNamespace(rfilename=f, size=int(s)) for f, s in listing.items()])

    def download(self, repo, repo_type="model", allow_patterns=(), **kwargs):
        self.asked[repo] = sorted(allow_patterns)
        for f in allow_patterns:
            hub_layout(self.cache, repo, lambda d: (d / f).parent.mkdir(parents=True, exist_ok=True))
            path = self.cache / f"models--{repo.replace('/', '--')}/snapshots" / "0123456789abcdef0123456789abcdef01234567" / f
            shards = {g: Path(g).name for g in allow_patterns if g.startswith(f.split("/")[0] + "/") and "-of-" in g}
            path.write_text(json.dumps(MODEL_INDEX[repo] if f == "model_index.json" else {"weight_map": shards}))


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants

    hub = StandInHub(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "offline", lambda: "")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **k: hub.info(repo))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: (
        hub.download(repo, **k) if not k.get("local_files_only") else real_snapshot(repo, **k)))
    return hub


FETCH_ARGS = ["--preset=flux-dev", "--fetch", "--prompt_file=", f"--eval_prompts={__file__}"]


def test_fetch_of_a_gated_model_without_a_token_is_one_line_naming_the_license_and_hf_token(stand_in_hub, monkeypatch,
                                                                                           capsys):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        ng.main(FETCH_ARGS)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and not stand_in_hub.asked
    assert err == ("error: black-forest-labs/FLUX.1-dev is gated: accept its license at "
                   "https://huggingface.co/black-forest-labs/FLUX.1-dev (logged in), then set HF_TOKEN (or "
                   "huggingface-cli login) to a token of that account")


def test_fetch_prints_sizes_downloads_only_what_from_pretrained_reads_and_checks_it_offline(stand_in_hub, monkeypatch,
                                                                                           capsys):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    ng.main(FETCH_ARGS)
    out = capsys.readouterr().out
    flux_files = stand_in_hub.asked["black-forest-labs/FLUX.1-dev"]
    assert "flux1-dev.safetensors" not in flux_files and "transformer/config.json" in flux_files
    assert "gated, 33.7 GB, missing" in out and "left out: 24.1 GB" in out  # flux1-dev.safetensors and ae.safetensors
    assert stand_in_hub.asked["yuvalkirstain/PickScore_v1"] == ["config.json", "model.safetensors"]  # no .bin twice
    assert stand_in_hub.asked["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"] == ["merges.txt", "tokenizer_config.json",
                                                                           "vocab.json"]  # not its 3.9 GB weights
    assert "checked offline: all 9 repositories are here" in out
    ng.main([FETCH_ARGS[0], "--fetch=plan", *FETCH_ARGS[2:]])  # a second plan finds everything cached
    assert "missing" not in capsys.readouterr().out


@pytest.mark.parametrize("flag, message", [
    ("--fetch=yes", "--fetch=yes: use --fetch (download what the configuration reads) or --fetch=plan (print the plan "
                    "only)"),
    ("--dry-run", "--dry-run: only with --fetch (--fetch --dry-run prints the plan)")])
def test_a_wrong_fetch_flag_is_one_line(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ng.main(["--preset=tiny", flag])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"


def test_fetch_dry_run_offline_prints_the_plan_without_sizes(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    ng.main(["--preset=flux-dev", "--fetch", "--dry-run"])
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE=1: no sizes, nothing downloads" in out and "black-forest-labs/FLUX.1-dev  gated, size " \
        "unknown, missing" in out
    assert "flux1-dev" not in out and "transformer/{config.json, diffusion_pytorch_model.safetensors" in out


def test_fetch_offline_prints_the_plan_then_stops_in_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        ng.main(["--preset=sd3.5-medium", "--fetch"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "stabilityai/stable-diffusion-3.5-medium  gated" in captured.out
    assert captured.err.strip() == ("error: cannot download: offline (HF_HUB_OFFLINE=1); run this on a machine with "
                                    "internet (a login node) into the same HF_HOME")
