"""Shared test helpers: the tiny preset, logs and exports of runs, torchrun launches, images on the uint8 grid."""

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: hub look-ups fail at once instead of retrying

import pytest
import torch

import flux
import models
import neighbor_grpo as ng


def tiny_cfg(tmp_path=None, *args):
    argv = ["--preset=tiny", *args] + ([f"--out_dir={tmp_path}"] if tmp_path else [])
    return ng.parse_config(argv)


@pytest.fixture(scope="module")
def tiny_pipe():
    return models.load_pipeline(tiny_cfg(), torch.device("cpu"), torch.float32)


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def exported(out_dir):
    """The trained weights a run exported: the whole transformer, or the LoRA adapter."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    if (out_dir / "lora").exists():
        return load_file(out_dir / "lora/pytorch_lora_weights.safetensors")
    return dict(FluxTransformer2DModel.from_pretrained(out_dir / "transformer").named_parameters())


def launch(nproc, script, *args, torchrun=()):
    """The command and environment running script under torchrun with nproc gloo ranks (plain python for one);
    torchrun: more of its options (--standalone: c10d rendezvous on a free port, --max_restarts=1)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(ng.__file__)), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *torchrun] if nproc > 1 \
        else [sys.executable]
    return [*launcher, str(script), *map(str, args)], env


def uint8_grid_images(n, size, seed):
    """Images already at the models' input size and on the uint8 grid: PIL and tensor pipelines agree exactly."""
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def to_pil(image):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


FLUX_SCHEDULER = flux.FLUX_SCHEDULER


def fixed_tiny_run(out, parse=ng.parse_config, method=ng.NEIGHBOR, *args):
    """Three tiny iterations, one transition per transformer call in the update, as the figures were recorded (the
    SDE loss at theta_old is a sum of round-off, which batching changes; batched = 1 is its own test)."""
    ng.train(parse(["--preset=tiny", "--rewards=brightness", "--iterations=3", "--sample_every=0", "--eval_every=0",
                    "--ckpt_every=0", "--update_batch_size=1", f"--out_dir={out}", *args]), method)
    return [(r["loss"], r["reward/brightness"], r["clip_frac"]) for r in read_log(out)]


def update_gradients(parse, method, batch, *args):
    """The gradient at every optimizer step of one iteration's update (policy_update, SGD at lr 1e-2 so that anchors
    after the first see rho != 1), with update_batch_size=batch: [[gradient per trained parameter] per step]."""
    cfg = parse(["--preset=tiny", "--rewards=brightness", "--eval_every=0", "--sample_every=0", "--groups_per_rank=2",
                 f"--update_batch_size={batch}", *args])
    run = ng.build(cfg, method)
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.SGD(params, lr=1e-2)
    steps = []
    run.optimizer.register_step_pre_hook(lambda *_: steps.append([p.grad.clone() for p in params]))
    ng.train_iteration(run, cfg, 0)
    return steps


def assert_same_figures(ours, recorded):
    """Equal up to round-off that another CPU's kernels may add (a ratio flipping across the clip edge included)."""
    changed = "the numbers changed: expected after an algorithm change (re-record them with python conftest.py), a " \
              f"bug after a refactoring; now {ours}"
    for (loss, reward, clip), (loss0, reward0, clip0) in zip(ours, recorded, strict=True):
        # a loss at theta = theta_old (the SDE baseline's) is a sum of round-off: compared at round-off's scale
        assert loss == pytest.approx(loss0, rel=1e-3, abs=5e-8) and reward == pytest.approx(reward0, rel=1e-5), changed
        assert clip == pytest.approx(clip0, abs=2.1 / 192), changed  # 192 ratios per iteration


class Judge:
    """A fake OpenAI-compatible chat-completions server on 127.0.0.1 answering as MixGRPO's "semantic" question asks
    (word scores, then Alignment, Coherence and Style lines; alignment = 1 + 4 x the image's first grey pixel).
    requests: (question, max_tokens, Authorization header) of each. Modes: good, malformed (no score lines), partly
    (none for captions with "dog"), slow (1 s), auth (401 unless the bearer key matches)."""

    def __init__(self, mode, key=None):
        import http.server
        import threading

        judge = self
        self.mode, self.requests = mode, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                import base64
                import io
                import time

                from PIL import Image

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "UnifiedReward"
                image, text = body["messages"][0]["content"]
                jpeg = base64.b64decode(image["image_url"]["url"].removeprefix("data:image/jpeg;base64,"))
                assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
                judge.requests.append((text["text"], body["max_tokens"], self.headers.get("Authorization")))
                if judge.mode == "slow":
                    time.sleep(1.0)
                if judge.mode == "auth" and self.headers.get("Authorization") != f"Bearer {key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                score = 1 + 4 * Image.open(io.BytesIO(jpeg)).convert("L").getpixel((0, 0)) / 255
                answer = (f'Word-wise Scores: [["cat", 1], ["[No_mistakes]", 4]]\n\nAlignment Score (1-5): {score:.2f}\n'
                          "Coherence Score (1-5): 2\nStyle Score (1-5): 5")
                if judge.mode == "malformed" or (judge.mode == "partly" and "dog" in text["text"]):
                    answer = "Looks fine."
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # the recorded numbers of test_neighbor_grpo.py and test_sde_grpo.py, as the code gives them now
    import sde_grpo

    for name, parse, method, args in [("RECORDED['train_solver']", ng.parse_config, ng.NEIGHBOR, []),
                                      ("RECORDED['rollout']", ng.parse_config, ng.NEIGHBOR, ["--old_anchor=rollout"]),
                                      ("SDE_RECORDED", sde_grpo.parse_config, sde_grpo.SDE, [])]:
        print(name, "=", fixed_tiny_run(tempfile.mkdtemp(), parse, method, *args))
