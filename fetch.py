"""
Every download a recipe reads, and whether it is here.

    python neighbor_grpo.py --preset=flux-dev --fetch        # print the plan, download it, check the result offline
    python neighbor_grpo.py --preset=flux-dev --fetch=plan   # the plan only (also --fetch --dry-run)

The plan: the model's pipeline folders (models.hub_files: only what from_pretrained reads, never a repository's
single-file checkpoint), every reward, guard and Table 1 judge the configuration names (rewards.reward_files, with
their tokenizers and processors), and HPDv2's prompts (data/hpdv2/prepare.py); each repository with its files, its
size and whether it is gated, where the hub says. Downloads go to the Hugging Face cache (HF_HOME), resumable.
Before anything heavy loads, a run calls require_downloads(cfg): offline (HF_HUB_OFFLINE=1) or with the hub out of
reach, every missing piece is named in one message ending in the --fetch command that gets them, exit 2; nothing
waits on the hub client's retries. Imports models and rewards, never neighbor_grpo (which imports this).
"""

import dataclasses
import fnmatch
import importlib.util
import json
import os
import posixpath
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path

import models
import rewards

ROOT = Path(__file__).resolve().parent
HPDV2 = ROOT / "data" / "hpdv2"  # what data/hpdv2/prepare.py writes: train.txt, test.txt
PROBE_S = 2.0  # seconds the hub has to answer before a run calls it unreachable (its client would retry ~35 s)
FLAGS = ("--fetch", "--fetch=plan", "--dry-run", "--dry_run")
COMMAND = ["neighbor_grpo.py"]  # the script and arguments of this run, for the --fetch command its message ends in


class FetchError(models.ModelError):
    """Downloads missing, a gated repository without a token, a failed download: the message says what and the fix."""


@dataclasses.dataclass
class Need:
    """One hub repository a run reads: what it is for, allow_patterns, and per piece the files of which one must be
    there (an index.json: with its shards)."""

    what: str  # "model (FLUX)", "reward hpsv2", "guard clipscore", "judge unifiedreward"
    repo: str
    patterns: list
    required: list
    repo_type: str = "model"
    gated: bool | None = None  # None: unknown until the hub answers
    names: tuple = ()  # the names the cache may hold it under (a renamed repository's former one)
    files: list = None  # [(path, bytes)] once the hub listed them
    left_out: int = 0  # bytes of the repository no pattern matches (once listed)


# -----------------------------------------------------------------------------
# The plan: what a configuration reads


def reward_roles(cfg, evaluation=False, everything=False):
    """{reward: role} a run loads: build()'s (the training rewards; with evaluations, eval_rewards and the guards),
    evaluate.py's (evaluation=True: eval_only_rewards), or everything (--fetch prepares both)."""
    roles = {}
    if not evaluation or everything:
        roles.update({n: "reward" for n in cfg.rewards})
        if cfg.eval_every or everything:
            for names, role in ((cfg.eval_rewards, "evaluation reward"), (cfg.guard_rewards, "guard")):
                roles.update({n: role for n in names if n not in roles})
    if evaluation or everything:
        roles.update({n: "judge" for n in cfg.eval_only_rewards if n not in roles})  # Table 1's columns
    return roles


def plan(cfg, evaluation=False, everything=False):
    """(hub needs, prompt files, notes) of cfg: the model, its rewards, the text files "hpdv2" stands for."""
    needs = []
    found = models.hub_files(cfg.model_path, skip=("transformer",) if cfg.transformer_path else ())
    if found:  # a transformer_path replaces the repository's transformer: diffusers then skips its folder
        fam = models.family(cfg.model_path)
        needs.append(Need(f"model ({fam.NAME})", cfg.model_path, *found, gated=cfg.model_path in fam.GATED))
    notes = []
    for name, role in reward_roles(cfg, evaluation, everything).items():
        for key, repo, patterns, required in rewards.reward_files(name, cfg):
            current = rewards.RENAMED.get(repo, repo)  # downloaded under the hub's name; the cache may hold either
            same = [n for n in needs if n.what.startswith(f"{role} {name}") and n.repo == current]
            if same:  # another file of the same repository (ImageReward's config beside its checkpoint)
                same[0].patterns += patterns
                same[0].required += required
                continue
            own = repo == rewards.REWARD_WEIGHTS[name][0]  # else its tokenizer's, processor's or CLIP's: named
            needs.append(Need(f"{role} {name}" + ("" if own else f" ({key})"),
                              current, patterns, required, names=tuple(dict.fromkeys((repo, current)))))
        if name == "unifiedreward":
            url = cfg.unifiedreward_url or "no --unifiedreward_url: skipped"
            notes.append(f"{role} unifiedreward: a server ({url}), nothing to download")
    prompts = []
    if (not evaluation or everything) and cfg.prompt_file == "hpdv2":
        prompts.append(HPDV2 / "train.txt")
    if (everything or evaluation or cfg.eval_every) and cfg.eval_prompts == "hpdv2":
        prompts.append(HPDV2 / "test.txt")
    return needs, prompts, notes


# -----------------------------------------------------------------------------
# The cache, read offline


def cache_dir():
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def snapshot(need):
    """The cached snapshot folder of need's repository (under any of its names), or None: snapshot_download with
    local_files_only, which also refuses a snapshot its cached listing shows incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for repo in need.names or (need.repo,):
        try:
            return Path(snapshot_download(repo, repo_type=need.repo_type, allow_patterns=need.patterns,
                                          local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
    return None


def missing_files(folder, required):
    """The files of required (one of each tuple; an index.json with every shard it names) not in folder."""
    out = []
    for choice in required:
        present = [f for f in choice if (folder / f).is_file()]
        if not present:
            out.append(choice[0])
        elif present[0].endswith(".index.json"):
            try:
                shards = sorted(set(json.loads((folder / present[0]).read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                out.append(present[0])
                continue
            out += [p for p in (posixpath.join(posixpath.dirname(present[0]), s) for s in shards)
                    if not (folder / p).is_file()]
    return out


def cache_missing(need):
    """What of need the cache lacks, in words ("" when it is all there)."""
    folder = snapshot(need)
    if folder is None:
        return "not in the cache"
    files = missing_files(folder, need.required)
    return f"lacks {', '.join(files[:4])}{f' and {len(files) - 4} more' if len(files) > 4 else ''}" if files else ""


# -----------------------------------------------------------------------------
# The hub, asked once with a short timeout


def offline():
    """Why nothing can be downloaded ("" when the hub answers): HF_HUB_OFFLINE, or no answer within PROBE_S."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=PROBE_S).close()
    except urllib.error.HTTPError:  # it answered
        pass
    except (OSError, ValueError):
        return f"{constants.ENDPOINT} did not answer within {PROBE_S:.0f} s"
    return ""


def license_line(repo):
    return (f"{repo} is gated: accept its license at https://huggingface.co/{repo} (logged in), then set HF_TOKEN "
            "(or huggingface-cli login) to a token of that account")


def list_files(need):
    """need.files and need.gated from the hub's listing; an error line, or ""."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError

    api = HfApi()
    info = api.dataset_info if need.repo_type == "dataset" else api.model_info
    try:
        listing = info(need.repo, files_metadata=True)
    except GatedRepoError:
        return license_line(need.repo)
    except Exception as e:  # noqa: BLE001 -- not found, a 5xx, a dropped connection: one line each
        return f"{need.repo}: the hub did not list it ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    need.gated = bool(listing.gated)
    sizes = {s.rfilename: s.size or 0 for s in listing.siblings}
    chosen = [f for f in sizes if any(fnmatch.fnmatch(f, p) for p in need.patterns)]
    safetensors = {posixpath.dirname(f) for f in chosen if f.endswith(".safetensors")}
    need.files = [(f, sizes[f]) for f in sorted(chosen)  # a pickle only where no safetensors is (as transformers)
                  if not (f.endswith(".bin") and posixpath.dirname(f) in safetensors)]
    need.left_out = sum(size for f, size in sizes.items() if f not in dict(need.files))
    absent = [choice for choice in need.required if not set(choice) & set(sizes)]
    if absent:
        return f"{need.repo}: the hub lists none of {', '.join(absent[0])}; is it the repository meant?"
    if need.gated and not get_token():
        return license_line(need.repo)
    return ""


# -----------------------------------------------------------------------------
# What the user reads: the plan, the missing pieces


def gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def grouped(paths):
    """Paths grouped by folder: "model_index.json; transformer/{config.json, ...}"."""
    folders = {}
    for p in paths:
        folders.setdefault(posixpath.dirname(p), []).append(posixpath.basename(p))
    return "; ".join(f"{d}/{{{', '.join(fs)}}}" if d and len(fs) > 1 else posixpath.join(d, fs[0]) if d else
                     ", ".join(fs) for d, fs in folders.items())


def print_plan(needs, prompts, notes, why):
    print(f"fetch plan (Hugging Face cache {cache_dir()}" + (f"; {why}: no sizes, nothing downloads)" if why else ")"))
    total = 0
    for n in needs:
        gated = {True: "gated", False: "not gated", None: "gated: unknown"}[n.gated]
        size = gb(sum(s for _, s in n.files)) if n.files is not None else "size unknown"
        total += sum(s for _, s in n.files or ())
        status = "missing" if cache_missing(n) else "cached"
        print(f"  {n.what:<36} {n.repo}  {gated}, {size}, {status}")
        print(f"      {grouped([f for f, _ in n.files] if n.files is not None else n.patterns)}")
        if n.left_out >= 1e9:
            print(f"      left out: {gb(n.left_out)} of the repository that nothing here reads")
    if prompts:
        status = "missing" if any(not p.is_file() for p in prompts) else "cached"
        print(f"  {'prompts (HPDv2)':<36} {prepare_module().TRAIN_REPO} train.json, {prepare_module().BENCHMARK_REPO} "
              f"benchmark/*.json (datasets) -> {', '.join(p.name for p in prompts)}, {status}")
    for note in notes:
        print(f"  {note}")
    if total:
        print(f"  total {gb(total)}")
    if not needs and not prompts:
        print("  nothing to download: the model, rewards and prompts are local")


def named(need):
    """The repository, its files when they are a few single ones, and where a gated one's license is accepted."""
    files = "" if "*" in str(need.patterns) or len(need.patterns) > 3 else f" {', '.join(need.patterns)}"
    gated = f" (gated: accept its license at https://huggingface.co/{need.repo}, set HF_TOKEN)" if need.gated else ""
    return need.repo + files + gated


def fetch_command():
    return "python " + shlex.join([*COMMAND, "--fetch"])


def require_downloads(cfg, evaluation=False):
    """Before anything heavy loads: every file the run reads is here, or else, offline or with the hub out of reach,
    one FetchError naming each missing piece and the --fetch command; online, missing hub files download as they
    load (a line says which), missing prompts stop it. Reads only the cache and the disk (a 2 s probe if needed)."""
    needs, prompts, _ = plan(cfg, evaluation)
    missing = [f"  {n.what}: {named(n)}, {m}" for n in needs if (m := cache_missing(n))]
    absent = [p for p in prompts if not p.is_file()]
    if absent:
        missing.append(f"  prompts: {', '.join(str(p.relative_to(ROOT)) for p in absent)} (HPDv2's, written by "
                       "data/hpdv2/prepare.py)")
    if not missing:
        return
    why = offline()
    if not why and not absent:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"downloading as they load (`{fetch_command()}` fetches ahead):\n" + "\n".join(missing))
        return
    reason = f"offline ({why})" if why else "HPDv2's prompts are not prepared"
    raise FetchError(f"{reason}; {len(missing)} of the downloads this run reads are missing from {cache_dir()} and "
                     "the disk:\n" + "\n".join(missing) + f"\nget them all (on a machine with internet, into the same "
                     f"HF_HOME): {fetch_command()}")


# -----------------------------------------------------------------------------
# --fetch


def prepare_module():
    spec = importlib.util.spec_from_file_location("hpdv2_prepare", HPDV2 / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch(cfg, plan_only=False):
    """Print the plan of everything cfg reads (training and evaluation), download what the cache lacks, and check
    the result offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError

    needs, prompts, notes = plan(cfg, everything=True)
    why = offline()
    errors = [] if why else [e for e in (list_files(n) for n in needs) if e]
    print_plan(needs, prompts, notes, why)
    if plan_only or not needs and not prompts:
        return
    if errors:
        raise FetchError("; ".join(dict.fromkeys(errors)))
    todo = [n for n in needs if cache_missing(n)]
    if why and (todo or any(not p.is_file() for p in prompts)):
        raise FetchError(f"cannot download: offline ({why}); run this on a machine with internet (a login node) "
                         "into the same HF_HOME")
    for n in todo:
        print(f"downloading {n.repo} ({n.what})")
        try:
            snapshot_download(n.repo, repo_type=n.repo_type,
                              allow_patterns=[f for f, _ in n.files] if n.files is not None else n.patterns)
        except GatedRepoError:  # a token, but its account has not accepted the license
            raise FetchError(license_line(n.repo)) from None
        except Exception as e:  # noqa: BLE001 -- a dropped connection, a full disk: one line, and how to go on
            raise FetchError(f"{n.repo}: the download stopped ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                             f"run {fetch_command()} again: it resumes") from None
    if any(not p.is_file() for p in prompts):
        try:
            prepare_module().main([f"--out={HPDV2}"])
        except SystemExit as e:  # prepare.py's one line: what to download, or which local copies to pass
            raise FetchError(str(e)) from None
    left = [f"{n.repo} {m}" for n in needs if (m := cache_missing(n))] + [str(p) for p in prompts if not p.is_file()]
    if left:
        raise FetchError(f"after the download, still missing: {'; '.join(left)}")
    print(f"checked offline: all {len(needs)} repositories{' and the prompts' if prompts else ''} are here; a run "
          f"may set HF_HUB_OFFLINE=1 with HF_HOME={os.environ.get('HF_HOME', '(default)')}")


def dispatch(argv, job):
    """(argv without the fetch flags, the job): fetch instead of job for --fetch, its plan only for --fetch=plan or
    --fetch --dry-run. Remembers the script and its arguments for require_downloads' message."""
    flags = [a for a in argv if a.split("=")[0] in ("--fetch", "--dry-run", "--dry_run")]
    rest = [a for a in argv if a not in flags]
    ours = Path(sys.argv[0]).suffix == ".py" and Path(sys.argv[0]).resolve().parent == ROOT  # not pytest's
    COMMAND[:] = [sys.argv[0] if ours else "neighbor_grpo.py", *rest]
    if not flags:
        return rest, job
    wrong = [a for a in flags if a not in FLAGS]
    if wrong:
        raise FetchError(f"{wrong[0]}: use --fetch (download what the configuration reads) or --fetch=plan (print "
                         "the plan only)")
    if "--fetch" not in flags and "--fetch=plan" not in flags:
        raise FetchError(f"{flags[0]}: only with --fetch (--fetch --dry-run prints the plan)")
    return rest, lambda cfg: fetch(cfg, plan_only="--fetch=plan" in flags or len(flags) > 1)
