"""A training run under torchrun and its checkpoints (train.py): the process group and DDP/FSDP2 wrapping, atomic
checkpoints every --ckpt-every steps that --resume continues bit for bit (same world size and --threads), the final
model, and the run folder nothing replaces unasked.
"""
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from safetensors import SafetensorError

from data import atomic_write
from model import UserError


# ----------------------------------------------------------------------------- torchrun

def setup_distributed(cfg):
    """rank/world/device from torchrun's environment; a single process otherwise."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return dict(rank=rank, world=world, device=device)


def barrier(ctx):
    if ctx["world"] > 1:
        dist.barrier()


def all_sum(x, ctx):
    if ctx["world"] == 1:
        return x
    y = x.to(ctx["device"])  # NCCL reduces GPU tensors only
    dist.all_reduce(y)
    return y.cpu()


def wrap(model, cfg, ctx):
    """DDP, or FSDP2 with one shard group per decoder layer and vision block, under torchrun."""
    if ctx["world"] == 1:
        return model
    if cfg.fsdp:
        mesh = init_device_mesh(ctx["device"].type, (ctx["world"],))
        inner = model.backbone.model
        for block in list(inner.language_model.layers) + list(inner.visual.blocks):
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return DistributedDataParallel(model)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(stage_dir):
    """Complete resumable checkpoints of a stage, oldest first (a .tmp folder is a write cut short)."""
    root = os.path.join(stage_dir, "checkpoints")
    names = [n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n)] if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names)]


def save_checkpoint(model, opt, step, stage_dir, cfg, ctx):
    """OUT/<stage>/checkpoints/step_N: model, optimizer, per-rank RNG states, step and data position.

    Written to step_N.tmp and renamed, so a kill mid-write leaves the previous checkpoint intact.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner, msd, osd = unwrap(model), None, None
    if cfg.fsdp or ctx["rank"] == 0:  # a collective under FSDP; DDP's replicas are all the same
        msd, osd = get_model_state_dict(inner, options=opts), get_optimizer_state_dict(inner, opt, options=opts)
    path = os.path.join(stage_dir, "checkpoints", f"step_{step:07d}")
    tmp = path + ".tmp"
    if ctx["rank"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch_save(dict(model=msd, optimizer=osd), os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump(dict(step=step, data_position=step * cfg.grad_accum, world=ctx["world"]), f)
    barrier(ctx)
    torch_save(rng_states(), os.path.join(tmp, f"rng_rank{ctx['rank']}.pt"))
    barrier(ctx)
    if ctx["rank"] == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoints(stage_dir)[:-cfg.keep_ckpts]:
            shutil.rmtree(old)
    barrier(ctx)
    return path


def torch_save(obj, path):
    """torch.save through an open file: a full disk then raises OSError ENOSPC naming the file (saving to a path
    reports only "unexpected pos ...")."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def rng_states():
    """Tensors and plain values only, so a checkpoint loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                           cached_gaussian=cached),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def read_checkpoint(path, cfg, ctx):
    """A checkpoint's progress, model and optimizer state and this rank's RNG states, each file loaded with
    torch.load(weights_only=True) or as JSON: a crafted pickle is refused, never run. UserError naming the
    broken file and the newest intact checkpoint before it."""
    bcast = cfg.fsdp and ctx["world"] > 1  # FSDP: rank 0 reads the state, the others receive their shards
    try:
        return load_checkpoint(path, ctx["rank"], state=ctx["rank"] == 0 or not bcast)
    except UserError as e:
        older = [p for p in checkpoints(os.path.dirname(os.path.dirname(path))) if p < path]
        intact = next((p for p in reversed(older) if checkpoint_loads(p, ctx["rank"])), None)
        raise UserError(f"{e}; newest intact checkpoint: " + (f"{intact} (delete {path} to resume from it)" if intact
                        else "none (start again with --overwrite)")) from None


def load_checkpoint(path, rank, state=True):
    """progress.json, state.pt (model and optimizer; empty when not `state`) and rng_rank<rank>.pt."""
    loaded = {}
    for key, name in (("progress", "progress.json"), ("state", "state.pt"), ("rng", f"rng_rank{rank}.pt")):
        file = os.path.join(path, name)
        if key == "state" and not state:
            loaded[key] = dict(model={}, optimizer={})
            continue
        try:
            loaded[key] = load_json(file) if name.endswith(".json") else \
                torch.load(file, map_location="cpu", weights_only=True)
        except UserError as e:
            raise UserError(f"{file}: unreadable checkpoint file ({str(e).split(': ', 1)[-1]})") from None
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise UserError(f"{file}: unreadable checkpoint file ({first_line(e)})") from None
    return loaded


def checkpoint_loads(path, rank):
    try:
        load_checkpoint(path, rank)
        return True
    except UserError:
        return False


def restore_checkpoint(ckpt, model, opt, cfg, ctx):
    """Load a read_checkpoint's model and optimizer state into the run; returns its step."""
    done = ckpt["progress"]
    if done["world"] != ctx["world"]:
        raise UserError(f"the checkpoint was written by {done['world']} processes, this run has {ctx['world']}; "
                        f"resume with the same number (the data order depends on it)")
    # one set_state_dict for model and optimizer under FSDP deadlocks (FACTS.md)
    inner = unwrap(model)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=cfg.fsdp and ctx["world"] > 1)
    set_model_state_dict(inner, ckpt["state"]["model"], options=opts)
    set_optimizer_state_dict(inner, opt, ckpt["state"]["optimizer"], options=opts)
    return done["step"]


def set_rng_states(s):
    n = s["numpy"]
    torch.set_rng_state(s["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(s["python"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


def logged_step(line):
    """The step of a metrics.jsonl line; a line a kill cut short counts as logged after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_final(model, stage_dir, cfg, ctx, rebuild):
    """OUT/<stage>/model via DualVLA.save_pretrained (the folder later stages and evaluate.py load)."""
    path = os.path.join(stage_dir, "model")
    if cfg.fsdp and ctx["world"] > 1:  # gather the shards, then save an unsharded copy from rank 0
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx["rank"] == 0:
            plain = rebuild()
            plain.load_state_dict(sd)
            plain.save_pretrained(path)
    elif ctx["rank"] == 0:
        try:
            unwrap(model).save_pretrained(path)
        except SafetensorError as e:  # its I/O errors carry no errno, only the OS's text
            raise OSError(errno.ENOSPC if "os error 28" in str(e) else errno.EIO, first_line(e), path) from None
    barrier(ctx)
    return path


# ----------------------------------------------------------------------------- the run folder: --resume and --overwrite

# Flags a resumed run must share with the checkpoint's: they decide the data order and what is learned from.
RESUME_FIXED = ("data", "mm_data", "mm_images", "pruned_data", "demo_episodes", "demo_qa", "demo_task", "demo_hold",
                "demo_noise", "cameras", "backbone", "init", "action_teacher", "reasoning_teacher", "batch_size",
                "grad_accum", "mm_ratio", "seed")


def check_run_folder(cfg):
    """Nothing in OUT is replaced unasked: a stage folder holding another run needs --resume (continue it from
    its newest checkpoint) or --overwrite; --resume refuses flags that would change its data or batches."""
    if cfg.stage == "prune":
        out = os.path.join(cfg.out, "pruned")
        if cfg.data and os.path.realpath(cfg.data) == os.path.realpath(out):
            raise UserError(f"--data {cfg.data} is --stage prune's output folder: pruning would overwrite its input; "
                            f"pick another --out")
        if os.path.isdir(out) and os.listdir(out) and not cfg.overwrite:
            raise UserError(f"{out} holds a prune of other data or another --prune mode; --overwrite replaces it, "
                            f"or pick another --out")
        return
    stage_dir = os.path.join(cfg.out, cfg.stage)
    held = [n for n in ("metrics.jsonl", "summary.json", "model") if os.path.exists(os.path.join(stage_dir, n))]
    ckpts = checkpoints(stage_dir)
    if cfg.overwrite or not (held or ckpts):
        return
    if not cfg.resume:
        raise UserError(f"{stage_dir} holds a {cfg.stage} run with other flags or unfinished; --resume continues it, "
                        f"--overwrite replaces it, or pick another --out")
    if not ckpts and "model" in held:
        raise UserError(f"{stage_dir} holds a trained model but no checkpoint to resume from; --overwrite replaces it")
    config = os.path.join(stage_dir, "config.json")
    old = load_json(config) if ckpts and os.path.isfile(config) else {}
    flags = json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in RESUME_FIXED if k in old and old[k] != flags[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: --{k.replace('_', '-')} is {flags[k]!r}, the run in {stage_dir} used {old[k]!r}; "
                        f"resume with the same value, or --overwrite to start again")


def start_stage_dir(stage_dir, cfg, ctx, record):
    """Resume from the newest checkpoint (--resume), or clear what check_run_folder let be replaced; write
    config.json."""
    latest = checkpoints(stage_dir)[-1:] if cfg.resume else []
    if ctx["rank"] == 0:
        if not latest:
            shutil.rmtree(os.path.join(stage_dir, "checkpoints"), ignore_errors=True)
            if os.path.exists(os.path.join(stage_dir, "metrics.jsonl")):
                os.remove(os.path.join(stage_dir, "metrics.jsonl"))
        if os.path.exists(os.path.join(stage_dir, "summary.json")):  # stale until this run finishes
            os.remove(os.path.join(stage_dir, "summary.json"))
        os.makedirs(stage_dir, exist_ok=True)
        atomic_write(os.path.join(stage_dir, "config.json"), json.dumps(dict(asdict(cfg), **record), indent=1))
    barrier(ctx)
    return latest[0] if latest else None


def load_json(path):
    """A JSON object train.py wrote (config, summary, progress, prune stats); UserError naming the file when it
    was cut short or edited into something else."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def first_line(e):
    """An exception's first line (torch's unpickling errors run to a dozen)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

