"""
Reward models for neighbor_grpo.py: each is fn(images [N, 3, H, W] in [0, 1], prompts list[str]) -> tensor [N],
higher is better. The paper's three training rewards (HPSv2.1, PickScore, ImageReward), HPSv3, Table 1's
out-of-domain judges (CLIP score, LAION aesthetic, the UnifiedReward VLM judge), toy rewards for CPU presets (JPEG
sizes, brightness), the digits preset's reward and its two held-out judges, and any importable `module.path:function`.

    fn = load_reward("hpsv2", cfg, device, torch.bfloat16)   # cfg: any object with the reward fields of
    scores = score({"hpsv2": fn}, images, prompts)            # neighbor_grpo.Config (reward_paths, unifiedreward_*)

Each adapter preprocesses tensors as its package's own PIL pipeline does (clip_pixels) and is tested against
that package's scoring path on tiny random models. This file imports nothing of the project's.
"""

import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class RewardError(RuntimeError):
    """A reward that cannot load, failed or returned something unusable: the message names it and the fix."""


def autocast(device, dtype):
    """The reward towers' mixed precision; a no-op in fp32."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def tokenizer_is_empty(tokenizer):
    """transformers 5 silently builds an empty tokenizer when the vocabulary files are missing (even offline)."""
    ids = tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    return not ids or tokenizer.unk_token_id in ids


# -----------------------------------------------------------------------------
# Toy rewards: no weights, CPU-fast


def jpeg(image, quality):
    """An image [3, H, W] in [0, 1] rounded to 8 bits and encoded by PIL as a JPEG at quality: its bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
        buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_compressibility(images, prompts):
    """Minus the JPEG size in kB at quality 95 (DDPO's compressibility reward): rewards simple images."""
    return -torch.tensor([len(jpeg(image, 95)) / 1000 for image in images])


def jpeg_incompressibility(images, prompts):
    """The JPEG size in kB (DDPO's incompressibility reward): rewards detailed images."""
    return -jpeg_compressibility(images, prompts)


def brightness(images, prompts):
    """Mean pixel value: a toy reward that, unlike JPEG sizes, is smooth in the image."""
    return images.float().mean(dim=(1, 2, 3))


# -----------------------------------------------------------------------------
# The paper's training rewards (HPSv2.1, PickScore, ImageReward): weights from the hub or --reward_paths


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, used by all three models below
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size, fit, mean=CLIP_MEAN, std=CLIP_STD):
    """CLIP-style preprocessing on tensors, no PIL round trip. fit="crop": the short side to size, centre crop
    (CLIP, PickScore, ImageReward; clamped like PIL's uint8); fit="pad": the long side to size, zero padding
    (HPSv2's ResizeMaxSize). Bicubic with antialiasing, as PIL and torchvision resize."""
    x = images.float()
    h, w = x.shape[-2:]
    if fit == "crop":  # torchvision's Resize(size): the long side truncated
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:  # HPSv2's ResizeMaxSize: both sides rounded
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    if fit == "crop":
        top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))  # torchvision's CenterCrop
        x = x[..., top: top + size, left: left + size].clamp(0, 1)
    else:
        x = F.pad(x, ((size - nw) // 2, size - nw - (size - nw) // 2, (size - nh) // 2, size - nh - (size - nh) // 2))
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


# what --reward_paths=KEY=PATH can replace: hub repo and file (None: a from_pretrained directory)
REWARD_WEIGHTS = {
    "hpsv2": ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    "pickscore": ("yuvalkirstain/PickScore_v1", None),
    "pickscore_processor": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
    "imagereward": ("THUDM/ImageReward", "ImageReward.pt"),
    "imagereward_med_config": ("THUDM/ImageReward", "med_config.json"),
    "imagereward_bert": ("bert-base-uncased", None),
    "clipscore": ("apple/DFN5B-CLIP-ViT-H-14-378", "open_clip_pytorch_model.bin"),  # MixGRPO's eval script's model
    "clipscore_config": ("apple/DFN5B-CLIP-ViT-H-14-378", "open_clip_config.json"),
    "aesthetic": ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),  # = sac+logos+ava1-l14-linearMSE.pth
    "aesthetic_clip": ("openai/clip-vit-large-patch14", None),
    "hpsv3": ("MizzenAI/HPSv3", "HPSv3.safetensors"),  # the whole reward model, in transformers 4.45's key layout
    "hpsv3_processor": ("Qwen/Qwen2-VL-7B-Instruct", None),  # its config, tokenizer, image processor, chat template
}


RENAMED = {"apple/DFN5B-CLIP-ViT-H-14-378": "apple/DFN5B-CLIP-ViT-H-14-384"}  # the hub's current name: its former

# What each reward downloads: its keys above, in the order its factory asks for them. The others download nothing:
# unifiedreward is a server, the toy and digits rewards and module:function are local; hpsv2's tokenizer ships in its
# package, and open_clip builds its model from the package's config (pretrained=None).
REWARD_KEYS = {
    "hpsv2": ("hpsv2",),
    "pickscore": ("pickscore_processor", "pickscore"),
    "imagereward": ("imagereward_bert", "imagereward_med_config", "imagereward"),
    "clipscore": ("clipscore_config", "clipscore"),
    "aesthetic": ("aesthetic", "aesthetic_clip"),
    "hpsv3": ("hpsv3_processor", "hpsv3"),
}
# the files a from_pretrained directory's loader reads: (allow_patterns, required: one file of each tuple); a weight
# as safetensors, else pytorch_model.bin (transformers' order; fetch.py takes the .bin only where no .safetensors is)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")
MODEL_FILES = (("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin"), [("config.json",), ("model.safetensors", "model.safetensors.index.json",
                                                          "pytorch_model.bin")])
DIRECTORY_FILES = {
    "pickscore": MODEL_FILES,  # CLIPModel.from_pretrained
    "aesthetic_clip": MODEL_FILES,
    "pickscore_processor": (TOKENIZER_FILES + ("vocab.json", "merges.txt"), [("tokenizer.json", "vocab.json")]),
    "imagereward_bert": (TOKENIZER_FILES + ("vocab.txt",), [("tokenizer.json", "vocab.txt")]),  # BertTokenizer
    "hpsv3_processor": (  # AutoProcessor (Qwen2-VL's tokenizer, image and video processors) and AutoConfig: no weights
        TOKENIZER_FILES + ("vocab.json", "merges.txt", "config.json", "preprocessor_config.json",
                           "video_preprocessor_config.json", "processor_config.json", "chat_template.json"),
        [("config.json",), ("preprocessor_config.json",), ("tokenizer.json", "vocab.json")]),
}


def reward_files(name, cfg):
    """What load_reward(name, cfg) reads from the hub: [(key, repo, allow_patterns, required)], required as
    DIRECTORY_FILES'; the keys --reward_paths gives locally left out; none for a reward REWARD_KEYS does not name."""
    local = {item.split("=", 1)[0] for item in cfg.reward_paths}
    out = []
    for key in REWARD_KEYS.get(name, ()):
        repo, filename = REWARD_WEIGHTS[key]
        if key not in local:
            patterns, required = DIRECTORY_FILES[key] if filename is None else ((filename,), [(filename,)])
            out.append((key, repo, list(patterns), list(required)))
    return out


def missing_weights(key, error):
    repo, filename = REWARD_WEIGHTS[key]
    return (f"reward_paths: {key} weights not found ({type(error).__name__}); download them (huggingface-cli "
            f"download {repo}{' ' + filename if filename else ''}) or pass --reward_paths={key}=/local/"
            f"{filename or repo.split('/')[-1]}")


def reward_weights(cfg, key, loader=None):
    """A reward's weights from --reward_paths, else the hub (or its local cache); loader(path) for directories."""
    local = dict(item.split("=", 1) for item in cfg.reward_paths)
    repo, filename = REWARD_WEIGHTS[key]
    if key in local and not Path(local[key]).exists():
        raise RewardError(f"reward_paths: {key}={local[key]} does not exist")
    try:
        if loader is not None:
            loaded = loader(local.get(key, repo))
            if hasattr(loaded, "convert_tokens_to_ids") and tokenizer_is_empty(loaded):
                raise OSError("a tokenizer without its vocabulary files")
            return loaded
        if key in local:
            return local[key]
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo, filename)
        except OSError:  # a cache or mirror that still holds the repo under its former name
            if repo not in RENAMED:
                raise
            return hf_hub_download(RENAMED[repo], filename)
    except (OSError, ValueError) as e:  # ValueError: a directory without the files transformers looks for
        raise RewardError(missing_weights(key, e)) from None


def all_weights(cfg, *requests):
    """reward_weights(cfg, key, loader) of each (key, loader), every missing one named in the same line: one at a time,
    HPSv3 would name its checkpoint only after Qwen2-VL's 16 GB were fetched."""
    found, missing = [], {}
    for key, loader in requests:
        try:
            found.append(None if key in missing else reward_weights(cfg, key, loader))
        except RewardError as e:
            missing[key] = str(e)
    if missing:
        raise RewardError("; ".join(missing.values()))
    return found


def import_package(module, package, reward):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"rewards: {reward} needs the {package} package ({e}); pip install -r requirements.txt") from None


def cosine(a, b):
    """Row-wise cosine in fp32: bf16 would quantise an HPS score of 0.31 in steps of 0.002."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


HPS_ARCH = "ViT-H-14"  # HPSv2's open_clip architecture


def hpsv2_reward(cfg, device, dtype):
    """HPSv2.1 (Wu et al. 2023): the hpsv2 package's open_clip ViT-H-14 with HPS_v2.1_compressed.pt."""
    open_clip = import_package("hpsv2.src.open_clip", "hpsv2x", "hpsv2")
    path = reward_weights(cfg, "hpsv2")  # before building the 1B-parameter model
    model = open_clip.create_model(HPS_ARCH, pretrained=None)  # hpsv2.score() would first fetch laion weights
    model.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    return hpsv2_scorer(model.to(device).eval(), open_clip.get_tokenizer(HPS_ARCH), dtype)


def hpsv2_scorer(model, tokenizer, dtype):
    @torch.no_grad()
    def hpsv2(images, prompts):
        """The image-text cosine of HPSv2's features (about 0.31 for FLUX.1-dev)."""
        device = next(model.parameters()).device
        pixels = clip_pixels(images.to(device), model.visual.image_size[0], fit="pad")
        with autocast(device, dtype):
            image, text = model.encode_image(pixels), model.encode_text(tokenizer(prompts).to(device))
        return cosine(image, text)

    hpsv2.models = (model,)  # what placed() moves
    return hpsv2


def pickscore_reward(cfg, device, dtype):
    """PickScore (Kirstain et al. 2023): CLIP ViT-H-14 fine-tuned on Pick-a-Pic, tokenised as laion's ViT-H-14."""
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer, model = all_weights(cfg, ("pickscore_processor", CLIPTokenizer.from_pretrained),
                                   ("pickscore", CLIPModel.from_pretrained))
    return pickscore_scorer(model.to(device).eval(), tokenizer, dtype)


def pickscore_scorer(model, tokenizer, dtype):
    @torch.no_grad()
    def pickscore(images, prompts):
        """logit_scale * cos(image, text) / 100, as the paper reports it (about 0.23 for FLUX.1-dev)."""
        device = model.device
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        pixels = clip_pixels(images.to(device), model.config.vision_config.image_size, fit="crop")
        with autocast(device, dtype):
            image = model.get_image_features(pixel_values=pixels).pooler_output  # transformers 5: an output object
            text = model.get_text_features(**text).pooler_output
        return model.logit_scale.exp().float() * cosine(image, text) / 100

    pickscore.models = (model,)  # what placed() moves
    return pickscore


def import_imagereward():
    """image-reward 1.5's model code under transformers 5. Its package __init__ imports its training script and
    OpenAI's clip, so only the model modules are loaded; its BERT copy (med.py) calls five transformers 4
    helpers, restored here exactly (head pruning, which ImageReward never uses, excepted)."""
    import types

    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    if "ImageReward.ImageReward" in sys.modules:  # done before
        return sys.modules["ImageReward.ImageReward"], sys.modules["ImageReward.models.BLIP.blip_pretrain"]
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        raise RewardError("rewards: imagereward needs the image-reward package; pip install -r requirements.txt")
    root = spec.submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        if not hasattr(sys.modules.get(name), "__path__"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = [path]
    for helper in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(modeling_utils, helper, getattr(pytorch_utils, helper))
    modeling_utils.find_pruneable_heads_and_indices = None
    med = importlib.import_module("ImageReward.models.BLIP.med")

    def invert_attention_mask(self, mask):
        mask = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).to(self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_layers, is_attention_chunked=False):
        if head_mask is not None:
            raise ValueError("ImageReward: head masks are not supported")
        return [None] * num_layers

    med.BertModel.all_tied_weights_keys = {}  # transformers 5 sets this in post_init(), which med.py never calls
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = get_head_mask
    return importlib.import_module("ImageReward.ImageReward"), importlib.import_module(
        "ImageReward.models.BLIP.blip_pretrain")


def imagereward_tokenizer(path):
    """BLIP's BERT tokenizer: bert-base-uncased plus [DEC] and [ENC], 30524 tokens (the package's init_tokenizer)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def build_imagereward(med_config, tokenizer):
    """The package's ImageReward (BLIP ViT-L + BERT with cross-attention + MLP head) with the given tokenizer."""
    image_reward, blip_pretrain = import_imagereward()
    blip_pretrain.init_tokenizer = lambda: tokenizer  # the package would download bert-base-uncased here
    return image_reward.ImageReward(med_config=med_config).eval()


def imagereward_reward(cfg, device, dtype):
    """ImageReward-v1.0 (Xu et al. 2023), raw model output (about 1.1 for FLUX.1-dev)."""
    tokenizer, med_config, checkpoint = all_weights(cfg, ("imagereward_bert", imagereward_tokenizer),
                                                    ("imagereward_med_config", None), ("imagereward", None))
    model = build_imagereward(med_config, tokenizer)
    state = torch.load(checkpoint, map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)  # strict=False as the package's load()
    if [k for k in missing + unexpected if not k.endswith("position_ids")]:
        raise RewardError(f"reward_paths: imagereward checkpoint does not match ImageReward-v1.0 "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return imagereward_scorer(model.to(device), dtype)


def imagereward_scorer(model, dtype):
    @torch.no_grad()
    def imagereward(images, prompts):
        """ImageReward.score, batched: BLIP features under autocast, the MLP head in fp32, then standardised."""
        device = next(model.parameters()).device
        text = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                    return_tensors="pt").to(device)
        pixels = clip_pixels(images.to(device), 224, fit="crop")
        with autocast(device, dtype):
            image = model.blip.visual_encoder(pixels)
            out = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                          encoder_hidden_states=image,
                                          encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                                            device=device), return_dict=True)
        reward = model.mlp(out.last_hidden_state[:, 0].float())
        return ((reward - model.mean) / model.std).squeeze(-1)

    imagereward.models = (model,)  # what placed() moves
    return imagereward


# -----------------------------------------------------------------------------
# Table 1's out-of-domain judges: CLIP score, LAION aesthetic, the UnifiedReward VLM judge


def clipscore_reward(cfg, device, dtype):
    """CLIP score (Table 1, ref. [8]) as MixGRPO's evaluation computes it: open_clip's ViT-H-14 of its
    hf-hub config (apple/DFN5B-CLIP-ViT-H-14-384), the ViT-H-14 tokenizer, image-text cosine."""
    open_clip = import_package("hpsv2.src.open_clip", "hpsv2x", "clipscore")
    config, checkpoint = all_weights(cfg, ("clipscore_config", None), ("clipscore", None))
    config = json.loads(Path(config).read_text())
    model_cfg = dict(config["model_cfg"])
    model = (open_clip.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.CLIP)(**model_cfg)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    pre = config.get("preprocess_cfg", {})
    return clipscore_scorer(model.to(device).eval(), open_clip.get_tokenizer(HPS_ARCH),
                            pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD), dtype)


def clipscore_scorer(model, tokenizer, mean, std, dtype):
    @torch.no_grad()
    def clipscore(images, prompts):
        """The image-text cosine (about 0.39 for FLUX.1-dev)."""
        device = next(model.parameters()).device
        pixels = clip_pixels(images.to(device), model.visual.image_size[0], "crop", mean, std)  # square: = squash
        with autocast(device, dtype):
            image, text = model.encode_image(pixels), model.encode_text(tokenizer(prompts).to(device))
        return cosine(image, text)

    clipscore.models = (model,)  # what placed() moves
    return clipscore


def aesthetic_mlp():
    """The LAION aesthetic predictor v2's head (improved-aesthetic-predictor; Flow-GRPO's aesthetic scorer)."""
    dims, drops = (768, 1024, 128, 64, 16, 1), (0.2, 0.2, 0.1)
    layers = []
    for i in range(5):
        layers += [torch.nn.Linear(dims[i], dims[i + 1])] + ([torch.nn.Dropout(drops[i])] if i < 3 else [])
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(*layers)  # the checkpoint's key names: layers.0.weight, ...
    return mlp.eval()


def aesthetic_reward(cfg, device, dtype):
    """LAION aesthetic score (Table 1, ref. [26]): the MLP on L2-normalised OpenAI CLIP ViT-L/14 image embeddings."""
    from transformers import CLIPModel

    checkpoint, clip = all_weights(cfg, ("aesthetic", None), ("aesthetic_clip", CLIPModel.from_pretrained))
    mlp = aesthetic_mlp()
    mlp.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return aesthetic_scorer(clip.to(device).eval(), mlp.to(device), dtype)


def aesthetic_scorer(clip, mlp, dtype):
    @torch.no_grad()
    def aesthetic(images, prompts):
        """A 1-10 rating (about 6.1 for FLUX.1-dev); the prompt is not used."""
        device = clip.device
        pixels = clip_pixels(images.to(device), clip.config.vision_config.image_size, fit="crop")
        with autocast(device, dtype):
            embed = clip.get_image_features(pixel_values=pixels).pooler_output
        return mlp.layers(F.normalize(embed.float(), dim=-1)).squeeze(-1)

    aesthetic.models = (clip, mlp)  # what placed() moves
    return aesthetic


HPSV3_PIXELS = 256 * 28 * 28  # the package's min_pixels = max_pixels: every image becomes ~448 x 448, 256 tokens
HPSV3_TOKEN = "<|Reward|>"  # the token whose hidden state the head reads


def hpsv3_template():
    """HPSv3's instruction ({text_prompt} for the caption) and the request ending in the reward token, read from the
    hpsv3 package's source without importing it: the package pins transformers 4.45 and imports trl and deepspeed, so
    it is installed without its dependencies (pip install --no-deps hpsv3==1.0.0, .ci/run) and only read."""
    import ast

    spec = importlib.util.find_spec("hpsv3")
    if spec is None:
        raise RewardError("rewards: hpsv3 needs its prompt template from the hpsv3 package: pip install --no-deps "
                          "hpsv3==1.0.0 (its dependencies would replace this environment's transformers)")
    source = Path(spec.submodule_search_locations[0]) / "dataset" / "data_collator_qwen.py"
    found = {t.id: n.value.value for n in ast.parse(source.read_text()).body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    return found["INSTRUCTION"], found["prompt_with_special_token"]


def hpsv3_head(hidden):
    """HPSv3's RankNet head: hidden state -> (mu, sigma), fp32."""
    return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def hpsv3_reward(cfg, device, dtype):
    """HPSv3 (Ma et al. 2025): Qwen2-VL-7B through transformers' own classes with HPSv3's RankNet head, both from
    HPSv3.safetensors; the backbone in bf16 as it was trained (fp32 when the compute dtype is), the head in fp32."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

    instruction, request = hpsv3_template()
    processor, config, checkpoint = all_weights(
        cfg, ("hpsv3_processor", lambda p: AutoProcessor.from_pretrained(p, padding_side="right")),
        ("hpsv3_processor", AutoConfig.from_pretrained), ("hpsv3", None))
    state = load_file(checkpoint)
    processor.tokenizer.add_tokens([HPSV3_TOKEN], special_tokens=True)  # appended, as the package's add does
    config.text_config.vocab_size = len(processor.tokenizer)  # the package resized the embeddings to it
    with init_empty_weights(include_buffers=False):
        model = Qwen2VLModel(config)
    head = hpsv3_head(config.text_config.hidden_size)
    held = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    head.load_state_dict({k.removeprefix("rm_head."): v.float() for k, v in state.items() if k.startswith("rm_head.")})
    model.load_state_dict(hpsv3_keys(state, held), assign=True)  # strict: every backbone tensor must be there
    return hpsv3_scorer(model.to(device).eval(), head.to(device).eval(), processor, instruction, request)


def hpsv3_keys(state, dtype):
    """HPSv3.safetensors' backbone in transformers 5's Qwen2VLModel layout: model.* is the language model's, visual.*
    the vision tower's; the unused language-model head is dropped."""
    renamed = {}
    for k, v in state.items():
        if k.startswith("model."):
            renamed["language_model." + k.removeprefix("model.")] = v.to(dtype)
        elif k.startswith("visual."):
            renamed[k] = v.to(dtype)
    return renamed


def hpsv3_scorer(model, head, processor, instruction, request):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    reward_id = processor.tokenizer.convert_tokens_to_ids(HPSV3_TOKEN)

    @torch.no_grad()
    def hpsv3(images, prompts):
        """HPSv3's preference mean mu (its head gives mu and sigma) at the reward token (about 10 for a good image)."""
        device = next(model.parameters()).device
        size = smart_resize(*images.shape[-2:], 28, HPSV3_PIXELS, HPSV3_PIXELS)  # as the package's PIL resize
        x = images.float()
        if tuple(size) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        messages = [[{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": instruction.format(text_prompt=prompt) + request}]}] for prompt in prompts]
        batch = processor(text=processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          images=list(x.cpu()), padding=True, return_tensors="pt",
                          images_kwargs=dict(do_rescale=False, do_resize=False)).to(device)
        ids = batch["input_ids"]
        embeds = model.language_model.embed_tokens(ids)
        image = model.visual(batch["pixel_values"].to(model.visual.dtype), grid_thw=batch["image_grid_thw"])
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.pooler_output.to(embeds.dtype))
        # positions 0, 1, ... on all three rope axes, as the package calls the language model (not Qwen2-VL's M-RoPE)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        return head(hidden[ids == reward_id].float())[:, 0]

    hpsv3.models = (model, head)  # what placed() moves
    return hpsv3


UNIFIEDREWARD_QUESTION = (  # ours, asking for the three labelled lines of MixGRPO's "semantic" question
    "Below is a caption and an image generated from it. Consider how well the image shows what the caption describes "
    "(its objects, their attributes, counts and relations), whether it is free of glitches and distorted objects, and "
    "how good it looks. Reason briefly, then end with exactly these three lines, each with one number from 1 (poor) "
    "to 5 (excellent):\nAlignment Score (1-5): N\nCoherence Score (1-5): N\nStyle Score (1-5): N\n"
    "Caption: {prompt}")
UNIFIEDREWARD_PROTOCOLS = {  # how answers are asked for and scored
    "strict": dict(max_tokens=1024, abstain=False),  # an answer without the label stops the run: safe to train on
    "mixgrpo": dict(max_tokens=4096, abstain=True),  # MixGRPO's evaluation: unparseable answers left out, counted
}
API_KEY = "OPENAI_API_KEY"  # a hosted endpoint's key, sent as a bearer token (the OpenAI clients' variable)


def unifiedreward_reward(cfg, device, dtype):
    """UnifiedReward (Table 1, ref. [37]): a VLM judge behind an OpenAI-compatible chat-completions endpoint, as
    MixGRPO serves it; the number on the unifiedreward_score line (1-5, about 3.2 for FLUX.1-dev)."""
    question = UNIFIEDREWARD_QUESTION
    if cfg.unifiedreward_question:
        if not Path(cfg.unifiedreward_question).is_file():
            raise RewardError(f"unifiedreward_question={cfg.unifiedreward_question}: no such file; write the question "
                              "with {prompt} where the caption goes, or pass '' for the built-in one")
        question = Path(cfg.unifiedreward_question).read_text()
    return unifiedreward_scorer(cfg.unifiedreward_url.rstrip("/") + "/chat/completions", question,
                                cfg.unifiedreward_score, **UNIFIEDREWARD_PROTOCOLS[cfg.unifiedreward_protocol])


def score_on_line(answer, label):
    """The number on the label's line, whatever range note follows the label: 'Alignment Score (1-5): 4' gives 4 for
    the label 'Alignment Score' and for 'Alignment Score (1-5)'; None when there is no such line."""
    match = re.search(re.escape(label) + r"(?:\s*\([^)]*\))?[\s:=*]*([0-9]+(?:\.[0-9]+)?)", answer, re.IGNORECASE)
    return float(match.group(1)) if match else None


def unifiedreward_scorer(url, question, label="Alignment Score", max_tokens=1024, abstain=False, workers=8,
                         timeout=120.0, tries=3, backoff=2.0):
    """Each image (JPEG, base64) and its caption posted concurrently by a bounded pool; a request that fails or
    times out is retried with exponential backoff, then the run stops naming the server. An answer without the
    label stops the run too, or with abstain=True scores NaN, which evaluation leaves out of the mean and counts."""
    import base64
    import concurrent.futures
    import urllib.request

    def ask(image, prompt):
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," +
                                                       base64.b64encode(jpeg(image, 95)).decode()}},
                   {"type": "text", "text": question.replace("{prompt}", prompt)}]
        body = json.dumps({"model": "UnifiedReward", "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY):  # read here, never stored: it reaches no log, config or error message
            headers["Authorization"] = "Bearer " + os.environ[API_KEY]
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers),
                                            timeout=timeout) as response:
                    answer = json.loads(response.read())["choices"][0]["message"]["content"]
                break
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # refused, time-out, HTTP, bad JSON
                error = e
                time.sleep(backoff * 2**attempt if attempt + 1 < tries else 0)
        else:
            raise RewardError(f"reward 'unifiedreward': no answer from {url} after {tries} tries "
                              f"({type(error).__name__}: {error}); start the judge (README, Rewards) or fix "
                              "--unifiedreward_url")
        value = score_on_line(answer, label)
        if value is None and not abstain:
            raise RewardError(f"reward 'unifiedreward': {url} answered without '{label}: N' ({answer[:80]!r}); serve "
                              "the UnifiedReward model, or make --unifiedreward_question ask for that line")
        return math.nan if value is None else value

    def unifiedreward(images, prompts):
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return torch.tensor(list(pool.map(ask, images, prompts)))

    unifiedreward.abstains = abstain  # score() lets its NaN through, for evaluation to count
    return unifiedreward


# -----------------------------------------------------------------------------
# The digits preset: its training reward and two held-out judges (data/digits/prepare.py fits all three)


def digits_file(cfg, name, reward):
    path = Path(cfg.model_path) / name
    if not path.is_file():
        raise RewardError(f"rewards: {reward} needs {path}; use --preset=digits (or run data/digits/prepare.py)")
    return torch.load(path)


def digit_alignment_reward(cfg, device, dtype):
    """The digits preset's alignment: the probability its classifier (logistic regression on 8x8 images, fit by
    data/digits/prepare.py) gives to the digit the prompt asks for."""
    state = digits_file(cfg, "classifier.pt", "digit_alignment")
    return digit_scorer(state["weight"], state["bias"])


def digit_features(images):
    """What the digit classifier sees: the image averaged to 8x8 grey, on load_digits' 0..16 scale."""
    return F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8).flatten(1).cpu() * 16


def asked_digits(prompts, reward):
    asked = [re.findall(r"\d", p) for p in prompts]
    if not all(asked):
        raise RewardError(f"reward {reward!r}: a prompt names no digit ({prompts[asked.index([])]!r})")
    return torch.tensor([int(a[-1]) for a in asked])


def digit_scorer(weight, bias):
    def digit_alignment(images, prompts):
        """p(asked digit | image), from the classifier's softmax."""
        probs = torch.softmax(digit_features(images) @ weight.T + bias, dim=-1)
        return probs[torch.arange(len(prompts)), asked_digits(prompts, "digit_alignment")]

    return digit_alignment


class DigitCNN(torch.nn.Module):
    """The alignment judge: a small CNN on the 16x16 grey image, unlike the reward's linear model on 8x8 averages."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 8x8
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 4x4
            torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, images):
        return self.net(images.float().mean(1, keepdim=True))  # [N, 3, 16, 16] in [0, 1] -> logits [N, 10]


def digit_judges(cfg):
    """judges.pt: the CNN's weights, the real training digits and the held-out digits' distances (realism)."""
    return digits_file(cfg, "judges.pt", "the digit judges")


def digit_cnn_reward(cfg, device, dtype):
    cnn = DigitCNN()
    cnn.load_state_dict(digit_judges(cfg)["cnn"])
    return digit_cnn_scorer(cnn.eval())


def digit_cnn_scorer(cnn):
    @torch.no_grad()
    def digit_cnn_alignment(images, prompts):
        """p(asked digit | image) under the CNN judge (held out: never a training reward of the preset)."""
        probs = torch.softmax(cnn(images.cpu()), dim=-1)
        return probs[torch.arange(len(prompts)), asked_digits(prompts, "digit_cnn_alignment")]

    return digit_cnn_alignment


def realism_distance(images, reference, k):
    """Mean L2 distance of each 16x16 grey image [N, 3, 16, 16] to its k nearest real digits [R, 256]."""
    return torch.cdist(images.float().mean(1).flatten(1).cpu(), reference).topk(k, largest=False).values.mean(1)


def digit_realism_reward(cfg, device, dtype):
    judges = digit_judges(cfg)
    return digit_realism_scorer(judges["reference"].float().flatten(1) / 255, judges["calibration"], judges["k"])


def digit_realism_scorer(reference, calibration, k):
    def digit_realism(images, prompts):
        """The fraction of real held-out digits at least as far from the real training digits as this image (its
        mean distance to the k nearest ones, in pixels): about 0.5 for a real digit, 0 for noise. Class-blind."""
        d = realism_distance(images, reference, k)
        return 1 - torch.searchsorted(calibration, d, right=False).float() / len(calibration)

    return digit_realism


# -----------------------------------------------------------------------------
# The registry, the retry, score()


# name -> factory(cfg, device, dtype) returning the reward function; factories load weights once
REWARDS = {
    "hpsv2": hpsv2_reward,
    "pickscore": pickscore_reward,
    "imagereward": imagereward_reward,
    "clipscore": clipscore_reward,
    "aesthetic": aesthetic_reward,
    "hpsv3": hpsv3_reward,
    "unifiedreward": unifiedreward_reward,
    "jpeg_compressibility": lambda cfg, device, dtype: jpeg_compressibility,
    "jpeg_incompressibility": lambda cfg, device, dtype: jpeg_incompressibility,
    "brightness": lambda cfg, device, dtype: brightness,
    "digit_alignment": digit_alignment_reward,
    "digit_cnn_alignment": digit_cnn_reward,
    "digit_realism": digit_realism_reward,
}


def reward_config_problems(cfg):
    """What is wrong with cfg's reward fields, one line each naming the field and the fix (none: an empty list)."""
    problems = [f"{field}: unknown reward {name!r}; use one of {', '.join(REWARDS)} or module.path:function"
                for field in ("rewards", "eval_rewards", "eval_only_rewards", "guard_rewards")
                for name in getattr(cfg, field, ())
                if name not in REWARDS and ":" not in name]
    problems += [f"reward_paths: {item!r} is not key=path with key one of {', '.join(REWARD_WEIGHTS)}"
                 for item in cfg.reward_paths if item.partition("=")[0] not in REWARD_WEIGHTS or "=" not in item]
    if cfg.unifiedreward_protocol not in UNIFIEDREWARD_PROTOCOLS:
        problems.append(f"unifiedreward_protocol={cfg.unifiedreward_protocol}: use one of "
                        f"{', '.join(UNIFIEDREWARD_PROTOCOLS)}")
    elif "unifiedreward" in cfg.rewards and UNIFIEDREWARD_PROTOCOLS[cfg.unifiedreward_protocol]["abstain"]:
        problems.append(f"unifiedreward_protocol={cfg.unifiedreward_protocol} leaves unparseable answers out, which "
                        "training cannot; train with --unifiedreward_protocol=strict")
    if "unifiedreward" in cfg.rewards + cfg.eval_rewards and not cfg.unifiedreward_url:
        problems.append("unifiedreward_url: the unifiedreward judge needs a server, e.g. "
                        "--unifiedreward_url=http://host:8000/v1 (README, Rewards)")
    return problems


def load_reward(name, cfg, device, dtype=torch.float32):
    """A built-in reward by name (its towers run under autocast in dtype), or any importable callable given as
    module.path:function."""
    if name in REWARDS:
        return REWARDS[name](cfg, device, dtype)
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"rewards: cannot import {name!r} ({e}); give module.path:function on PYTHONPATH") from None


REWARD_TRIES, REWARD_BACKOFF_S = 3, 2.0  # a reward that raises (a remote server's hiccup) is called again after 2, 4 s


def call_reward(name, fn, images, prompts):
    """fn(images, prompts), retried with exponential backoff when it raises; then the run stops naming it. Out of GPU
    memory stops at once: a retry meets the same batch on the same memory."""
    for attempt in range(REWARD_TRIES):
        try:
            return fn(images, prompts)
        except RewardError:
            raise
        except torch.OutOfMemoryError:
            raise RewardError(f"reward {name!r} ran out of GPU memory scoring {len(images)} images a call; lower "
                              "--reward_batch_size, or pass --reward_offload (each reward on the GPU only while it "
                              "scores)") from None
        except Exception as e:  # noqa: BLE001 -- any failure of user code is retried, then reported
            error = e
            if attempt + 1 < REWARD_TRIES:
                time.sleep(REWARD_BACKOFF_S * 2**attempt)
    raise RewardError(f"reward {name!r} raised {type(error).__name__} ({str(error)[:160]}) {REWARD_TRIES} times in a "
                      "row; check the reward's model or server, then continue with --resume")


@contextlib.contextmanager
def placed(fn, device):
    """fn's models on device while it scores, then back where they were: a reward loaded on the CPU (reward_offload)
    holds the GPU only for its own call. A reward without models (a function, a remote judge) stays as it is."""
    models = getattr(fn, "models", ()) if device is not None else ()
    homes = [next(m.parameters()).device for m in models]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)


def scores_of(name, returned):
    """A reward's return value as fp32 scores on the CPU, or one line naming the reward and what it returned."""
    try:
        return torch.as_tensor(returned).detach().float().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise RewardError(f"reward {name!r} returned {str(returned)[:80]} ({type(returned).__name__}); a reward "
                          "returns one number per image (a tensor or list of floats)") from None


def score(reward_fns, images, prompts, device=None, batch_size=None):
    """Rewards [M, N] of N images for M reward functions, batch_size images a call (each reward on device while it
    scores, if given), checked for shape and finiteness (a judge that abstains may return NaN, which evaluation leaves
    out of its mean and counts)."""
    rows, n = [], batch_size or len(prompts)
    for name, fn in reward_fns.items():
        with placed(fn, device):
            r = [scores_of(name, call_reward(name, fn, images[b: b + n], prompts[b: b + n]))
                 for b in range(0, len(prompts), n)]
        r = torch.cat([x.reshape(-1) for x in r])
        if r.numel() != len(prompts):
            raise RewardError(f"reward {name!r} returned {r.numel()} scores for {len(prompts)} images")
        if not torch.isfinite(r).all() and not (getattr(fn, "abstains", False) and not r.isinf().any()):
            raise RewardError(f"reward {name!r} returned a non-finite score {r.tolist()} for prompt {prompts[0]!r}")
        rows.append(r)
    return torch.stack(rows)


