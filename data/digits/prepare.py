"""
The `digits` preset: a small text-to-image flow model of the FLUX architecture pretrained on scikit-learn's
handwritten digits (1797 images of 8x8, shipped inside the package), and the classifier behind the
`digit_alignment` reward. nanoGPT's shakespeare_char for this project: a real task that trains on a laptop.

    python data/digits/prepare.py            # ~7 minutes on 2 CPU cores; writes the committed files next to this one
    python data/digits/prepare.py --vae_steps=3 --flow_steps=3 --out=/tmp/digits   # plumbing only (the tests)
    python data/digits/prepare.py --only=judges   # refit the held-out judges alone (seconds), the model untouched

Writes a diffusers FluxPipeline directory (transformer/, vae/, text_encoder/, ..., model_index.json) that
`models.load_pipeline` loads like FLUX.1-dev, classifier.pt (the digit_alignment reward), judges.pt (two held-out
judges the preset evaluates but never trains on: digit_cnn_alignment, a CNN on the 16x16 images, and digit_realism,
how close a sample is to real digits of any class), prompts.txt and eval_prompts.txt.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import flux
import models  # noqa: E402
import neighbor_grpo as ng  # noqa: E402
import rewards  # noqa: E402

SIZES = dict(  # ~0.6 M transformer parameters: 16x16 images, VAE factor 2 -> 8x8 latents -> 16 packed tokens
    layers=2, single_layers=4, heads=4, head_dim=16, rope=(4, 6, 6), text_dim=32, pooled_dim=32, text_layers=2,
    latent_channels=4, vae_channels=(16, 32), vae_layers=1, vae_groups=8)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {d}, {w}", "the digit {w}, {d}", "{w} - a drawing of the number {d}",
             "handwritten {d}, {w}")  # the word repeats the digit: more tokens tell the captions apart
EVAL_TEMPLATES = TEMPLATES[:2]  # held-out noise, not held-out wording: a 0.6 M model does not generalise phrasing
EVAL_REPEATS = 5  # each evaluation caption 5 times: 100 held-out samples, each with its own noise
# flow_steps 1000: alignment 0.25 (chance 0.1), room for RL; 4 min on 2 cores
OPTS = dict(out=str(Path(__file__).resolve().parent), seed=0, vae_steps=400, flow_steps=1000, batch=128, lr=1e-3,
            eval_every=250, judge_steps=800, only="")


def caption(template, d):
    return template.format(d=d, w=WORDS[d])


def digits():
    """Images [N, 3, 16, 16] in [0, 1] (ink bright) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16  # load_digits' 0..16
    big = F.interpolate(small, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    return big.repeat(1, 3, 1, 1), torch.tensor(data.target)


def train_classifier(images, labels, n_train):
    """Multinomial logistic regression (scikit-learn) on exactly what the reward sees (rewards.digit_features)."""
    from sklearn.linear_model import LogisticRegression

    x = rewards.digit_features(images).numpy()
    clf = LogisticRegression(max_iter=5000).fit(x[:n_train], labels[:n_train].numpy())
    accuracy = clf.score(x[n_train:], labels[n_train:].numpy())
    return dict(weight=torch.tensor(clf.coef_, dtype=torch.float32),
                bias=torch.tensor(clf.intercept_, dtype=torch.float32), heldout_accuracy=accuracy)


def train_judges(images, labels, n_train, opts, gen, k=5):
    """The held-out judges: a CNN trained on the 16x16 images with shifts and contrast changes (alignment, another
    model than the reward), and realism = where an image's mean distance to its k nearest real training digits
    falls among the held-out real digits' distances."""
    cnn, x, y = rewards.DigitCNN(), images[:n_train], labels[:n_train]
    optimizer = torch.optim.Adam(cnn.parameters(), lr=3e-3)
    for step in range(opts["judge_steps"]):
        idx = torch.randint(n_train, (opts["batch"],), generator=gen)
        shifted = F.pad(x[idx], (1, 1, 1, 1))
        i, j = torch.randint(3, (2,), generator=gen).tolist()
        batch = shifted[..., i:i + 16, j:j + 16] * (0.7 + 0.6 * torch.rand(len(idx), 1, 1, 1, generator=gen))
        loss = F.cross_entropy(cnn(batch.clamp(0, 1)), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cnn.eval()
    with torch.no_grad():
        accuracy = (cnn(images[n_train:]).argmax(1) == labels[n_train:]).float().mean().item()
    reference = (x.mean(1) * 255).round().to(torch.uint8)  # [n_train, 16, 16]
    calibration = rewards.realism_distance(images[n_train:], reference.float().flatten(1) / 255, k).sort().values
    print(f"judges: CNN held-out accuracy {accuracy:.3f}; realism calibrated on {len(calibration)} held-out digits")
    return dict(cnn=cnn.state_dict(), cnn_heldout_accuracy=accuracy, reference=reference, calibration=calibration,
                k=k)


def train_vae(vae, images, opts, gen):
    """Reconstruction (MSE) with a light KL term, then FLUX's latent normalisation set from the data."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=opts["lr"])
    for step in range(opts["vae_steps"]):
        x = images[torch.randint(len(images), (opts["batch"],), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator=gen)).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == opts["vae_steps"] - 1:
            print(f"vae  step {step:4d} | reconstruction mse {loss.item():.4f}")
    with torch.no_grad():
        z = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor)


def train_flow(pipe, latents, labels, cfg, opts, gen, classifier):
    """The rectified-flow loss ||v_theta(x_t, t, c) - (eps - x0)||^2 at uniform t, captions by class."""
    captions = [[caption(t, d) for t in TEMPLATES] for d in range(10)]
    cache = {}
    ng.encode_prompts(pipe, [c for row in captions for c in row], cfg, cache)
    n, channels, side = len(latents), latents.shape[1], latents.shape[-1]
    packed = pipe._pack_latents(latents, n, channels, side, side)
    model = pipe.transformer.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=0.0)
    for step in range(opts["flow_steps"]):
        idx = torch.randint(n, (opts["batch"],), generator=gen)
        prompts = [captions[labels[i]][torch.randint(len(TEMPLATES), (1,), generator=gen).item()] for i in idx]
        conds = [flux.encode_prompt(pipe, p, cfg, cache) for p in prompts]
        x0, eps = packed[idx], torch.randn(packed[idx].shape, generator=gen)
        t = torch.rand(len(idx), generator=gen)
        v = model(hidden_states=(1 - t[:, None, None]) * x0 + t[:, None, None] * eps, timestep=t,
                  guidance=torch.full((len(idx),), cfg.guidance_scale),
                  pooled_projections=torch.cat([c.pooled for c in conds]),
                  encoder_hidden_states=torch.cat([c.prompt_embeds for c in conds]),
                  txt_ids=conds[0].txt_ids, img_ids=conds[0].img_ids, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % opts["eval_every"] == 0 or step == opts["flow_steps"] - 1:
            model.eval()
            print(f"flow step {step + 1:4d} | loss {loss.item():.4f} | alignment {alignment(pipe, cfg, classifier):.3f}")
            model.train()
    return model.eval()


def alignment(pipe, cfg, classifier, per_digit=10):
    """Mean digit_alignment of deterministic samples of every digit under the evaluation captions."""
    prompts = [caption(t, d) for d in range(10) for t in EVAL_TEMPLATES for _ in range(per_digit // 2)]
    grid = ng.pipeline_grid(pipe, cfg, cfg.num_steps)
    images = ng.generate(pipe, prompts, cfg, grid, cfg.seed, torch.float32, {})
    return rewards.digit_scorer(classifier["weight"], classifier["bias"])(images, prompts).mean().item()


def main(argv):
    opts = dict(OPTS)
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts:
            raise SystemExit(f"prepare.py: unknown option --{key}; options: {', '.join(opts)}")
        opts[key] = type(opts[key])(value)
    torch.manual_seed(opts["seed"])
    gen = torch.Generator().manual_seed(opts["seed"])
    cfg = ng.parse_config(["--preset=digits", "--model_path=tiny"])  # the preset's resolution, text lengths, solver
    images, labels = digits()
    perm = torch.randperm(len(labels), generator=gen)
    images, labels = images[perm], labels[perm]
    classifier = train_classifier(images, labels, n_train=1500)
    print(f"classifier: held-out accuracy {classifier['heldout_accuracy']:.3f} on {len(labels) - 1500} digits")
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    judges = train_judges(images, labels, 1500, opts, torch.Generator().manual_seed(opts["seed"] + 1))
    torch.save(judges, out / "judges.pt")
    (out / "prompts.txt").write_text("".join(caption(t, d) + "\n" for t in TEMPLATES for d in range(10)))
    (out / "eval_prompts.txt").write_text("".join(caption(t, d) + "\n" for _ in range(EVAL_REPEATS)
                                                  for t in EVAL_TEMPLATES for d in range(10)))
    if opts["only"] == "judges":  # the committed model and classifier stay as they are
        return print(f"wrote {out / 'judges.pt'}, {out / 'prompts.txt'} and {out / 'eval_prompts.txt'}")
    pipe = flux.build_random_flux(opts["seed"], **SIZES)
    pipe.set_progress_bar_config(disable=True)
    latents = train_vae(pipe.vae, images, opts, gen)
    pipe.vae.eval().requires_grad_(False)
    train_flow(pipe, latents, labels, cfg, opts, gen, classifier)
    pipe.save_pretrained(out)
    torch.save(classifier, out / "classifier.pt")
    (out / "prepare.json").write_text(json.dumps(dict(opts, heldout_accuracy=classifier["heldout_accuracy"],
                                                      base_alignment=alignment(pipe, cfg, classifier)), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
