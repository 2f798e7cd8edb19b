"""
HPDv2's prompts (Wu et al. 2023, the HPSv2 paper) as the text files neighbor_grpo.py reads with "hpdv2":

    python data/hpdv2/prepare.py        # once; writes data/hpdv2/train.txt and data/hpdv2/test.txt

- train.txt: the unique prompts of HPDv2's training annotations, in file order (the paper's 103,700), from
  `train.json` of the hub dataset ymhao/HPDv2 (where HPSv2's README points; ~116 MB). neighbor_grpo.py draws a
  seeded random subset of iterations x groups of them, each used once (prompt_draw).
- test.txt: the 3200 benchmark prompts Table 1 is evaluated on (anime, concept-art, paintings, photo; 800 each),
  from `benchmark/<style>.json` of zhwang/HPDv2 (what the hpsv2 package downloads).

Offline, or with copies made elsewhere:

    python data/hpdv2/prepare.py --train_json=/path/to/train.json --benchmark=/path/to/benchmark
    python data/hpdv2/prepare.py --anchors_prompts=/path/to/prompts.txt   # -> train_anchors.txt

--anchors_prompts takes DanceGRPO's assets/prompts.txt (= MixGRPO's data/prompts.txt) and keeps what their
preprocessing keeps: the first 50,000 lines without Chinese characters (empty lines then dropped); train with
--prompt_file=data/hpdv2/train_anchors.txt to reproduce their prompt pool.
"""

import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STYLES = ("anime", "concept-art", "paintings", "photo")  # the benchmark's files, in this order
TRAIN_REPO, BENCHMARK_REPO = "ymhao/HPDv2", "zhwang/HPDv2"
ANCHORS_KEEP = 50_000  # DanceGRPO's and MixGRPO's preprocess_flux_embedding.py
OPTS = dict(out=str(HERE), train_json="", benchmark="", anchors_prompts="")


def fetch(repo, filename):
    """A file of a hub dataset repo: from the local hub cache, else downloaded into it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except OSError as e:  # offline, or the file is not there: say exactly what to download
        option = "--train_json=PATH" if filename == "train.json" else "--benchmark=DIR"
        raise SystemExit(f"prepare.py: cannot fetch {filename} of {repo} ({type(e).__name__}); download it "
                         f"(huggingface-cli download {repo} {filename} --repo-type dataset) and run again, or pass "
                         f"{option}") from None


def write(path, prompts):
    """One prompt per line, written atomically (several ranks or runs may prepare at once)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}: {len(prompts)} prompts")


def train_prompts(train_json):
    """The unique prompts of train.json's records, in order, whitespace-trimmed, empty ones dropped."""
    records = json.loads(Path(train_json).read_text(encoding="utf-8"))
    return list(dict.fromkeys(p for p in (r["prompt"].strip() for r in records) if p))


def benchmark_prompts(files):
    """The benchmark's prompts, style by style (each file a JSON list of 800)."""
    return [p.strip() for f in files for p in json.loads(Path(f).read_text(encoding="utf-8")) if p.strip()]


def anchors_prompts(path):
    """DanceGRPO's and MixGRPO's training pool: lines without Chinese characters, the first 50,000 of them."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not re.search(r"[\u4e00-\u9fff]", line)][:ANCHORS_KEEP]
    return [line.strip() for line in kept if line.strip()]


def main(argv):
    opts = dict(OPTS)
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts:
            raise SystemExit(f"prepare.py: unknown option --{key}; options: {', '.join('--' + k for k in opts)}")
        opts[key] = value
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    if opts["anchors_prompts"]:
        return write(out / "train_anchors.txt", anchors_prompts(opts["anchors_prompts"]))
    write(out / "train.txt", train_prompts(opts["train_json"] or fetch(TRAIN_REPO, "train.json")))
    if opts["benchmark"]:
        files = [Path(opts["benchmark"]) / f"{style}.json" for style in STYLES]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"prepare.py: --benchmark={opts['benchmark']} lacks {', '.join(missing)}; pass the "
                             f"directory holding {', '.join(s + '.json' for s in STYLES)}")
    else:
        files = [fetch(BENCHMARK_REPO, f"benchmark/{style}.json") for style in STYLES]
    write(out / "test.txt", benchmark_prompts(files))


if __name__ == "__main__":
    main(sys.argv[1:])
