"""Training for every stage of DualVLA's recipe (paper Sec. 3; NOTES.md §1-3), in one flat script.

    python train.py --stage distill                  # fresh machine: demo data, tiny model, the whole chain
    python train.py --stage specialist --data DIR    # DIR: an episode folder or a LeRobot dataset root
    python train.py --demo-task bimanual --cameras overhead_camera,wrist_camera   # 2 cameras, 14-DoF demo
    torchrun --nproc_per_node 8 train.py --preset paper --stage generalist --mm-data llava.json [--fsdp]

    specialist  robot data, no reasoning in the targets (Eq. 2)              -> the action teacher π^a
    generalist  from the specialist: robot data with reasoning on every frame
                + multimodal data (Eq. 3)                                    -> the reasoning teacher π^r
    prune       dual-layer pruning of the robot data's reasoning (Sec. 3.2.1, prune.py)
    distill     from the generalist, on pruned robot + multimodal data, L = L_VLA + λ·L_KD with
                π^a on robot frames and π^r on multimodal samples (Eq. 5-7, distill.py)
    all         the four in order, then evaluate.py on the tabletop demo (report.py)

Everything lands in OUT (default runs/<preset>): data/ (demo data), tiny/ (the demo's random tiny
backbone, with --backbone-steps 0), <stage>/{model, config.json, metrics.jsonl, summary.json, checkpoints/step_N,
eval/}, pruned/. The demo's pretrained tiny backbone is shared: runs/backbones/<hash of its settings>/ (backbones.py).
A stage whose default input is missing builds it first; one already under OUT is reused. Flags apply
to every stage this command runs (use one command per stage for per-stage settings).

Engine: torchrun (DDP, or FSDP2 with --fsdp), bf16 autocast on GPU, gradient accumulation and
clipping, warmup + constant/cosine LR, atomic checkpoints every --ckpt-every steps; --resume after a
kill reproduces the uninterrupted run bit for bit (same world size and --threads). Processes and checkpoints:
checkpoint.py.
"""
import argparse
import errno
import inspect
import json
import math
import os
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import data
import prune
import report
import tabletop
from backbones import backbone_path, head_vision_path
from checkpoint import (all_sum, barrier, check_run_folder, checkpoints, first_line, load_json, logged_step,
                        read_checkpoint, restore_checkpoint, save_checkpoint, save_final, set_rng_states,
                        setup_distributed, start_stage_dir, unwrap, wrap)
from data import DataError
from distill import KD_MODES, check_teachers, dual_teacher_loss
from model import ACT, QUERY, DualVLA, UserError, VLAConfig, attention_implementation, sample_flow_time, text_target_mask

LAMBDAS = (0.15, 0.5, 1.0, 2.0)   # λ of Eq. 7 as ablation rows: the paper's 0.15 and larger
STAGES = ("specialist", "generalist", "prune", "distill", "all")
PAPER_BACKBONE = "Qwen/Qwen2.5-VL-3B-Instruct"
PAPER_HEAD_VISION = "facebook/dinov2-with-registers-large"


@dataclass
class TrainConfig:
    stage: str = "distill"          # specialist | generalist | prune | distill | all
    preset: str = "demo"            # demo: CPU, minutes | mini: the miniature, CPU, ~21 min a seed | paper: Qwen2.5-VL-3B on GPUs
    out: str = ""                   # run folder; "" = runs/<preset>
    # data; "" = the tabletop demo data, written to OUT/data on first use
    data: str = ""                  # robot episodes: an episode folder (episodes.jsonl) or a LeRobot root
    mm_data: str = ""               # multimodal data, LLaVA-format JSON (generalist, distill)
    mm_images: str = ""             # image folder of --mm-data; "" = the JSON's folder
    pruned_data: str = ""           # distill's robot data; "" = OUT/pruned, written by --stage prune
    prune: str = "both"             # pruning mode (Table 7): both | scene | kinematic | random | none
    demo_episodes: int = 100        # demo data: expert episodes per tabletop task
    demo_qa: int = 3000             # demo data: question-answer pairs
    demo_task: str = "single"       # demo robot data: single (3 one-arm tasks, 7-D) | bimanual (2 arms, 14-D)
    demo_hold: int = 0              # demo data: expert steps recorded after each success (tabletop.py --hold)
    demo_noise: float = 0.0         # demo data: DART noise on the executed motion (tabletop.py --noise)
    demo_miss: float = 0.0          # demo data: share of episodes with a missed, retried grasp (tabletop.py --miss)
    cameras: str = ""               # comma-separated, frame order: demo cameras, LeRobot keys or names; "" = data's
    # model
    backbone: str = ""              # specialist's VLM (hub name or folder); "" = the demo's tiny one or Qwen (paper)
    backbone_steps: int = 0         # tiny backbone's pretraining steps on tabletop captions and QA; 0 = random
    backbone_cache: str = "runs/backbones"  # pretrained tiny backbones, one folder per settings (backbones.tiny_settings)
    init: str = ""                  # DualVLA checkpoint to start from; "" = the previous stage's model
    action_teacher: str = ""        # distill: π^a; "" = OUT/specialist/model
    reasoning_teacher: str = ""     # distill: π^r; "" = OUT/generalist/model
    action_head: str = "flow"       # flow | tokens; every checkpoint loaded must have this head
    image_size: int = 56            # robot frames' VLM image side, a multiple of patch × merge (tiny: 56 px = 16 tokens); new models only
    head_image_size: int = 64       # the action expert's own image side; new models only
    min_pixels: int = 0             # native-resolution multimodal images: fewest pixels (0 = the backbone's); new models only
    max_pixels: int = 0             # most pixels, i.e. image tokens × 28² (0 = the backbone's); new models only
    chunk: int = 0                  # actions per prediction; 0 = 16 (flow) or 1 (tokens); new models only
    n_queries: int = 8              # learnable action queries (InstructVLA uses 64); new models only
    flow_target: str = "velocity"   # flow head predicts: velocity (π0) | action (the clean chunk); new models only
    flow_time: str = "uniform"      # flow loss time: uniform | beta (InstructVLA's Beta(1.5, 1), noisy end); new models only
    flow_sigma_min: float = 0.0     # σ_min of the flow path (InstructVLA: 1e-3); new models only
    action_expert: str = "cnn"      # flow head: cnn (conv + MLP, CPU-sized) | dit (InstructVLA's); new models only
    head_vision: str = ""           # dit: DINOv2 checkpoint; "" = a random tiny one under OUT/tiny_vision; new models only
    head_width: int = 256           # width of the action expert (dit: InstructVLA's 768); new models only
    head_layers: int = 2            # dit: transformer layers (InstructVLA: 12); new models only
    lora_rank: int = 0              # LoRA rank on the LLM's projections (peft), base weights frozen; 0 = full fine-tuning
    freeze_action_head: bool = False  # generalist/distill: keep the action expert as loaded (InstructVLA's stage 2)
    # optimisation (paper: lr 2e-5 for distillation; the rest is ours)
    steps: int = 500                # optimizer steps
    batch_size: int = 32            # global batch: samples per optimizer step over all ranks and accumulation
    grad_accum: int = 1             # micro-batches per optimizer step and rank
    lr: float = 3e-4                # peak learning rate (3e-4 beat 1e-3 for the tiny model, FACTS.md)
    schedule: str = "constant"      # after warmup: constant | cosine
    warmup_steps: int = 20          # linear warmup from lr/warmup_steps
    min_lr_ratio: float = 0.1       # cosine ends at lr * this
    weight_decay: float = 0.0       # AdamW decay on matrices (not on biases and norms)
    grad_clip: float = 1.0          # max global gradient norm; 0 = no clipping
    mm_ratio: float = 0.25          # multimodal share of each batch (generalist, distill; Eq. 3's mixture)
    freeze_vlm_steps: int = 0       # keep the VLM (backbone + queries) frozen for the first N steps (flow head)
    ground_weight: float = 0.0      # weight of the action expert's grounding term (ECoT boxes; not in the paper)
    grad_checkpointing: bool = False  # recompute the backbone's activations in backward (big models)
    # distillation (Sec. 3.2.2)
    lambda_kd: float = 0.15         # λ of Eq. 7 (paper)
    kd_temperature: float = 2.0     # T of Eq. 5/6 (ours: the paper does not give it)
    kd: str = "dual"                # dual | action | reasoning | single | none (the Table 8 ablations)
    # engine
    seed: int = 0                   # model init, data order, flow noise; rank r also seeds seed + r
    bf16: bool = True               # bf16 autocast on GPU (CPU runs stay fp32)
    compile: bool = False           # torch.compile each LLM decoder layer and the action expert (fewer GPU launches)
    prefetch: bool = True           # build the next step's batches in a background thread while this one runs
    fsdp: bool = False              # FSDP2 fully_shard under torchrun, for models that do not fit per GPU
    threads: int = 0                # torch CPU threads per process; 0 = torch's default (1 is best on a busy CPU)
    log_every: int = 10             # steps between metrics.jsonl lines
    ckpt_every: int = 200           # steps between resumable checkpoints (and one at the end)
    keep_ckpts: int = 2             # resumable checkpoints kept (the newest)
    resume: bool = False            # continue from the newest checkpoint of each stage run
    overwrite: bool = False         # replace a stage's earlier run in OUT (without it or --resume such a run is kept)
    eval_episodes: int = 50         # demo evaluation: tabletop episodes per task (held-out seeds 0..N-1)
    eval_questions: int = 50        # --stage all: questions per demo benchmark
    ablations: bool = False         # --stage all: also distill with every other --prune and --kd mode (Tables 7, 8)


# Stage presets, applied over the defaults above and under the command line. The paper gives λ = 0.15
# and lr 2e-5 for distillation; batch sizes and step counts are ours (the paper states none): they
# follow InstructVLA's lr 5e-5 for the earlier stages and a global batch of 128 on 8 GPUs.
DEMO = {
    # One thread: the tiny model's ops gain little from a second one, and OpenMP threads spin-wait
    # when the 2 cores are shared (a step measured 10x slower with 2 threads on a busy machine).
    # The tiny backbone pretrained for 800 steps (~2 CPU minutes, once per settings: docs/miniature.md).
    # Multimodal images on the robot frames' 4 x 4 grid, as the tiny backbone was pretrained.
    # A 4-action chunk for episodes of 10-20 steps; hold steps show the policy how to stay done.
    "common": dict(threads=1, flow_target="action", backbone_steps=800, min_pixels=56 * 56, max_pixels=56 * 56,
                   chunk=4, demo_hold=3),
    # The VLM frozen throughout (trained with the head it gave lower success), so its outputs are computed once
    # (train.vlm_outputs) and 4,000 cosine steps cost the action expert alone. The grounding term and
    # x1-prediction made the head learn fastest (docs/miniature.md).
    # Co-training at lr 1e-3 with half the batch multimodal, the first setting in which the tiny VLM learned any
    # QA (at 1e-4 its answers ran on and 150 steps left the frozen expert 0 % success, docs/miniature.md).
    # As InstructVLA's stage 2, the action expert stays frozen after the specialist; distillation runs at
    # 0.4x the co-training lr, the paper's ratio (2e-5 against its base model's 5e-5).
    "specialist": dict(steps=4000, batch_size=32, lr=1e-3, schedule="cosine", freeze_vlm_steps=4000,
                       ground_weight=1.0),
    "generalist": dict(steps=150, batch_size=16, lr=1e-3, mm_ratio=0.5, freeze_action_head=True),
    "distill": dict(steps=150, batch_size=16, lr=4e-4, mm_ratio=0.5, freeze_action_head=True),
}
PRESETS = {
    "demo": DEMO,
    # The miniature reproduction: the demo at a larger scale. 3x the demos (held-out open-loop direction 0.88
    # against 0.73 with 100 a task), a longer backbone pretraining, 4x the co-training and distillation steps.
    "mini": {
        "common": dict(DEMO["common"], demo_episodes=300, backbone_steps=3000),
        "specialist": DEMO["specialist"],
        "generalist": dict(DEMO["generalist"], steps=600),
        "distill": dict(DEMO["distill"], steps=600),
    },
    # The base model's expert and regime (NOTES §6): InstructVLA's action expert on DINOv2-L with registers (its
    # timm vit_large_patch14_reg4_dinov2), Beta(1.5, 1) flow time, σ_min 1e-3, LoRA r 128 on the robot stage and
    # fresh adapters with the expert frozen on the generalist. Distillation (the paper is silent) keeps the
    # generalist's regime: the student's expert is its teachers' (all three share the specialist's), so action KD
    # acts through the query states, where InstructVLA's design puts action degeneration.
    "paper": {
        "common": dict(backbone=PAPER_BACKBONE, image_size=224, n_queries=64, batch_size=128, schedule="cosine",
                       warmup_steps=500, weight_decay=0.01, grad_checkpointing=True, log_every=50,
                       ckpt_every=2000, keep_ckpts=3, action_expert="dit", head_vision=PAPER_HEAD_VISION,
                       head_image_size=224, head_width=768, head_layers=12, flow_time="beta", flow_sigma_min=1e-3,
                       lora_rank=128),
        "specialist": dict(steps=30000, lr=5e-5),
        "generalist": dict(steps=30000, lr=5e-5, freeze_action_head=True),
        "distill": dict(steps=10000, lr=2e-5, schedule="constant", warmup_steps=0,  # paper: 2e-5, fixed
                        freeze_action_head=True),
    },
}
# Fields naming a stage's own inputs: never passed on to the stages built to provide them.
STAGE_INPUTS = ("init", "action_teacher", "reasoning_teacher", "pruned_data", "stage")


# ----------------------------------------------------------------------------- configuration

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse prints the usage too)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def field_help():
    """The comment after each TrainConfig field, as its --help text."""
    src = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, re.M))


def parse_args(argv):
    """argparse flags generated from TrainConfig; returns only the flags given explicitly."""
    p = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)
    helps = field_help()
    for f in fields(TrainConfig):
        presets = [f"{name} {stage} {values[f.name]!r}" for name, stages in PRESETS.items()
                   for stage, values in stages.items() if f.name in values]
        h = f"{helps.get(f.name, '')} (default {f.default!r}" + (f"; presets: {', '.join(presets)})" if presets else ")")
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        else:
            choices = {"stage": STAGES, "preset": tuple(PRESETS), "schedule": ("constant", "cosine"),
                       "action_head": ("flow", "tokens"), "prune": prune.MODES, "kd": KD_MODES,
                       "flow_target": ("velocity", "action"), "flow_time": ("uniform", "beta"),
                       "action_expert": ("cnn", "dit"),
                       "demo_task": ("single", "bimanual")}.get(f.name)
            p.add_argument(flag, type=f.type, choices=choices, help=h, metavar=None if choices else f.type.__name__.upper())
    return vars(p.parse_args(argv))


def stage_config(stage, explicit):
    """Defaults, then the preset's common and per-stage values, then the explicit flags."""
    preset = explicit.get("preset", TrainConfig.preset)
    values = {**PRESETS[preset].get("common", {}), **PRESETS[preset].get(stage, {}), **explicit, "stage": stage}
    if values.get("action_head") == "tokens" and "freeze_vlm_steps" not in explicit:
        values["freeze_vlm_steps"] = 0  # the tokens head lives in the VLM: freezing it would train nothing
    cfg = TrainConfig(**values)
    cfg.out = cfg.out or os.path.join("runs", cfg.preset)
    return cfg


# Smallest value of each numeric flag. --keep-ckpts 0 would keep no checkpoint to resume from; --chunk 0 and
# --threads 0 mean the defaults (see their help).
MINIMUM = dict(steps=1, batch_size=1, grad_accum=1, log_every=1, ckpt_every=1, keep_ckpts=1, n_queries=1, chunk=0,
               threads=0, warmup_steps=0, min_lr_ratio=0, weight_decay=0, grad_clip=0, freeze_vlm_steps=0,
               ground_weight=0, lambda_kd=0, demo_episodes=1, demo_qa=0, demo_hold=0, image_size=28,
               head_image_size=8, eval_episodes=0, eval_questions=0)


def validate(cfg):
    """Config and path errors as UserError, before anything is built."""
    for name in ("data", "mm_data", "mm_images", "pruned_data", "init", "action_teacher", "reasoning_teacher"):
        path = getattr(cfg, name)
        if path and not os.path.exists(path):
            raise UserError(f"--{name.replace('_', '-')} {path}: no such file or folder")
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
        if f.name in MINIMUM and value < MINIMUM[f.name]:
            raise UserError(f"{flag} {value}: must be >= {MINIMUM[f.name]}")
    for name in ("lr", "kd_temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0 <= cfg.mm_ratio < 1:
        raise UserError(f"--mm-ratio {cfg.mm_ratio}: must be >= 0 and < 1")
    if cfg.lora_rank and cfg.fsdp:  # fully_shard replaces the parameters, and with them add_lora's gradient hook
        raise UserError("--lora-rank runs under DDP, not --fsdp (with LoRA the 3B model's training state fits a GPU)")
    if cfg.freeze_vlm_steps and cfg.action_head == "tokens":
        raise UserError("--freeze-vlm-steps needs --action-head flow (the tokens head is the VLM itself)")
    if cfg.freeze_vlm_steps and cfg.freeze_action_head and cfg.stage in ("generalist", "distill"):
        raise UserError(f"--freeze-vlm-steps {cfg.freeze_vlm_steps} with --freeze-action-head leaves nothing to train "
                        f"in --stage {cfg.stage}'s first steps (--no-freeze-action-head trains the expert)")
    if cfg.demo_hold < 0 or not 0 <= cfg.demo_noise < tabletop.MAX_STEP or not 0 <= cfg.demo_miss <= 1:
        raise UserError(f"need --demo-hold >= 0, 0 <= --demo-noise < {tabletop.MAX_STEP} (the largest step) "
                        "and 0 <= --demo-miss <= 1")
    if cfg.data and cfg.demo_task != "single":
        raise UserError("--demo-task picks the demo's robot data; with --data there is no demo data to pick")
    if not cfg.data and camera_list(cfg):  # here, on every rank: the demo data is written by rank 0 alone
        try:
            tabletop.make(tabletop.TASKS[0], cameras=camera_list(cfg))
        except ValueError as e:
            raise UserError(f"--cameras: {e}") from None


# ----------------------------------------------------------------------------- data

def camera_list(cfg):
    """--cameras as a tuple of names (empty: the data's own)."""
    return tuple(c.strip() for c in cfg.cameras.split(",") if c.strip())


def demo_data(cfg, ctx):
    """The tabletop demo set under OUT/data (episodes.jsonl, mm.json, LMUData/; bimanual/ with
    --demo-task bimanual), rendered from --cameras (default the overhead camera), written once."""
    root = os.path.join(cfg.out, "data")
    written = [os.path.join(root, "LMUData", "TabletopVQA.tsv")]  # written last
    written += [os.path.join(root, "bimanual", "episodes.jsonl")] if cfg.demo_task == "bimanual" else []
    if ctx["rank"] == 0 and not all(map(os.path.isfile, written)):
        cameras = camera_list(cfg) or ("overhead_camera",)
        print(f"demo data: writing {cfg.demo_episodes} expert episodes per task and {cfg.demo_qa} QA pairs to {root}"
              f" ({', '.join(cameras)})")
        t0 = time.time()
        tabletop.write_demo(root, cfg.demo_episodes, cfg.demo_qa, seed=cfg.seed, cameras=cameras,
                            bimanual_episodes=cfg.demo_episodes if cfg.demo_task == "bimanual" else 0,
                            hold=cfg.demo_hold, noise=cfg.demo_noise, miss=cfg.demo_miss)
        print(f"demo data: done in {time.time() - t0:.0f} s")
    barrier(ctx)  # always: whether the files exist must not decide which ranks meet here
    return root


def robot_episodes(path, cameras=(), load_images=False):
    """An episode folder or a LeRobot dataset root -> episodes (images as paths unless load_images).
    cameras: the LeRobot image keys to read, in this order (default all); an episode folder has its own."""
    if os.path.isfile(os.path.join(path, "episodes.jsonl")) or path.endswith(".jsonl"):
        return data.read_episodes(path, load_images=load_images)
    if os.path.isfile(os.path.join(path, "meta", "info.json")):
        return data.read_lerobot(path, camera_keys=cameras or None, load_images=load_images)  # else LazyFrames
    raise UserError(f"{path}: neither an episode folder (episodes.jsonl) nor a LeRobot dataset (meta/info.json)")


def robot_source(cfg, ctx):
    """robot_path, the demo data written first when it is the demo's."""
    if not cfg.data:
        demo_data(cfg, ctx)
    return robot_path(cfg)


def robot_path(cfg):
    """--data, or the demo's robot episodes (OUT/data, or OUT/data/bimanual for --demo-task bimanual)."""
    return cfg.data or os.path.join(cfg.out, "data", *(("bimanual",) if cfg.demo_task == "bimanual" else ()))


def data_cameras(cfg, path, robot):
    """A new model's camera names, in frame order: --cameras, else the data's own (a LeRobot set's image
    keys, the demo's overhead camera), else "image" for one image per frame and camera_0, camera_1, ...
    for several (an episode folder names no cameras)."""
    if camera_list(cfg):
        return camera_list(cfg)
    if os.path.isfile(os.path.join(path, "meta", "info.json")):
        features = data.lerobot_meta(path)["info"]["features"]
        return tuple(k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video"))
    if not cfg.data:
        return ("overhead_camera",)
    n = len(robot[0]["image"]) if isinstance(robot[0]["image"], (list, tuple)) else 1
    return ("image",) if n == 1 else tuple(f"camera_{k}" for k in range(n))


def check_robot_data(config, robot, path, cfg):
    """Every robot frame must fit the model: one image per camera, action and state widths (UserError)."""
    if camera_list(cfg) and camera_list(cfg) != tuple(config.cameras):
        raise UserError(f"--cameras {cfg.cameras}: the model was trained with cameras {','.join(config.cameras)} "
                        f"(in this order); leave --cameras out or match it")
    hint = "" if cfg.data else " (OUT/data holds the demo data written first: use another --out for other --cameras)"
    for r in robot:
        where = f"{path}: episode {r['episode']} step {r['step']}"
        n = len(r["image"]) if isinstance(r["image"], (list, tuple)) else 1
        if n != len(config.cameras):
            raise UserError(f"{where}: {n} image(s) per frame, the model expects {len(config.cameras)} "
                            f"({', '.join(config.cameras)}){hint}")
        for field, width in (("action", config.action_dim), ("state", config.state_dim)):
            if len(r[field]) != width:
                raise UserError(f"{where}: field '{field}' has {len(r[field])} values, the model expects {width}")


def check_text(tokenizer, records, path):
    """No instruction, reasoning or answer may hold a special token's text: "<|image_pad|>" would be read as an
    image slot and "<|act|>" as the start of the action (UserError naming the record and field)."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for n, r in enumerate(records):
        for field, text in (("instruction", r["instruction"]), ("reasoning", data.reasoning_text(r["reasoning"]))):
            found = [t for t in re.findall(r"<\|[^|<>]*\|>", text) if t in specials] if "<|" in text else []
            if found:
                name = f"episode {r['episode']} step {r['step']}" if r["domain"] == "robot" else f"sample {r.get('id', n)}"
                raise UserError(f"{path}: {name}: field '{field}' holds the special token {found[0]} (the model's "
                                f"own markup); remove or reword it")


def mm_records(cfg, ctx):
    """The multimodal records (images as paths): --mm-data, or the demo's QA pairs."""
    path = cfg.mm_data or os.path.join(demo_data(cfg, ctx), "mm.json")
    root = cfg.mm_images or os.path.join(os.path.dirname(path), "" if cfg.mm_data else "mm_images")
    return data.read_llava(path, root, load_images=False)


def open_images(records):
    """Records of one batch with their images opened (records hold paths or LeRobot LazyFrames until used)."""
    def load(x):
        return [load(y) for y in x] if isinstance(x, (list, tuple)) else data.open_image(x)
    return [dict(r, image=load(r["image"])) for r in records]


def step_inputs(model, micro, reasoning, ctx):
    """make_batch of each micro-batch (images opened and processed, text tokenised), pinned on CUDA so that
    to_device's copies do not wait for the host."""
    inner, batches = unwrap(model), []
    for recs in micro:
        batch = inner.make_batch(open_images(recs), reasoning=reasoning)
        if ctx["device"].type == "cuda":
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        batches.append(batch)
    return batches


def to_device(batch, ctx):
    return {k: v.to(ctx["device"], non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def prefetched(make, ahead):
    """Endless results of make(), in order. With `ahead`, the next one is made in a background thread while
    the caller works on this one: one worker, so calls run one after another, as without it."""
    if not ahead:
        while True:
            yield make()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(make)
        while True:
            done, pending = pending, pool.submit(make)
            yield done.result()


def flow_noise(records, model_cfg, seed, step):
    """Flow-matching noise and time per robot record, drawn from (seed, step, episode, frame).

    A sample gets the same noise whatever rank or micro-batch it lands in, so a torchrun run
    reproduces a single-process run with the same global batch.
    """
    noise, t = [], []
    for r in records:
        if r["domain"] == "robot":
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{step}/{r['episode']}/{r['step']}".encode()))
            noise.append(torch.randn(model_cfg.chunk, model_cfg.action_dim, generator=g))
            t.append(sample_flow_time(1, model_cfg, generator=g)[0])
    return dict(noise=torch.stack(noise), t=torch.stack(t)) if noise else {}


# ----------------------------------------------------------------------------- models

def checkpoint_head(path, cfg):
    """Reject a checkpoint whose action head is not the requested one (read from its config.json)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{path} is not a DualVLA checkpoint: missing config.json")
    head = load_json(config).get("action_head")
    if head != cfg.action_head:
        raise UserError(f"{path} has action head {head!r} but this run asks for {cfg.action_head!r} "
                        f"(--action-head); pick the matching head or another --out")


def gripper_dims(width):
    """Entries of an action or state vector left unnormalised (data.action_stats): the gripper, the last of
    each arm's 7 values (x, y, z, roll, pitch, yaw, gripper), so (6,) for one arm and (6, 13) for two. A
    width that is not 7 per arm (ours): its last entry is taken as the gripper, as for one arm."""
    return tuple(range(6, width, 7)) if width % 7 == 0 else (width - 1,)


def new_model(cfg, backbone, robot, cameras, parts=(), head_vision=""):
    """The specialist's starting point: backbone + fresh queries and head, sized to the data (cameras, action
    and state widths), with per-dimension action/state statistics of `robot`, per robot. `parts`: an already built
    (backbone model, tokenizer, image processor) to use instead of loading `backbone` (bench.py's); `head_vision`:
    the "dit" expert's DINOv2 (head_vision_path)."""
    torch.manual_seed(cfg.seed)  # identical on every rank (FSDP does not broadcast the initial weights)
    actions, states = np.stack([r["action"] for r in robot]), np.stack([r["state"] for r in robot])  # (N, A), (N, S)
    model = DualVLA(VLAConfig(backbone=backbone, action_head=cfg.action_head, chunk=cfg.chunk,
                              n_queries=cfg.n_queries, flow_target=cfg.flow_target, image_size=cfg.image_size,
                              head_image_size=cfg.head_image_size, cameras=cameras,
                              min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                              action_dim=actions.shape[1], state_dim=states.shape[1], flow_time=cfg.flow_time,
                              flow_sigma_min=cfg.flow_sigma_min, action_expert=cfg.action_expert,
                              head_vision=head_vision, head_width=cfg.head_width, head_layers=cfg.head_layers),
                    *parts)
    names = np.array([r.get("robot", "unknown") for r in robot])
    for name in dict.fromkeys(names):  # one set per robot (Bridge's and Fractal's ranges differ), first-seen order
        model.set_action_stats(data.action_stats(actions[names == name], gripper_dims(actions.shape[1])),
                               data.action_stats(states[names == name], gripper_dims(states.shape[1])), robot=name)
    return model


def load_model(path, cfg):
    checkpoint_head(path, cfg)
    try:
        return DualVLA.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # cut short, edited, another model's weights
        raise UserError(f"{path}: cannot load this checkpoint ({first_line(e)})") from None


def on_device(model, ctx):
    model = model.to(ctx["device"])  # DualVLA.forward moves each batch (distill.py builds teachers' on the CPU)
    model.backbone.set_attn_implementation(attention_implementation())  # checkpoints do not store it
    return model


def compile_blocks(model, backend="inductor"):
    """torch.compile, in place, each LLM decoder layer and the action expert's modules (--compile).

    Module by module (Module.compile), not the whole model: parameter names and state dicts stay as they
    were, and DDP or FSDP2 (one shard group per decoder layer) wrap the model as without it. The vision
    tower stays eager: under sdpa its attention loops over the windows of each image."""
    for block in model.backbone.model.language_model.layers:
        block.compile(backend=backend)
    if model.head is not None:
        for module in (model.head, *model.head.images):
            module.compile(backend=backend)
    return model


def as_student(model, cfg, ctx):
    """The model to train, on the device; with --grad-checkpointing the backbone recomputes its activations
    in backward instead of keeping them (a 3B backbone's would not fit beside its AdamW state)."""
    model = on_device(model, ctx)
    model.ground_weight = cfg.ground_weight  # in its loss even at 0: DDP needs every parameter in the graph
    if cfg.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    return compile_blocks(model) if cfg.compile else model


def as_teacher(model, cfg, ctx):
    """A frozen teacher on the device: eval mode, no gradients, and bf16 on GPU (it only runs forwards, so
    it needs no fp32 master copy: half the memory of a third fp32 model)."""
    model = on_device(model, ctx).eval().requires_grad_(False)
    if ctx["device"].type == "cuda" and cfg.bf16:
        model = model.to(torch.bfloat16)
    return compile_blocks(model) if cfg.compile else model


# InstructVLA's LoRA targets: the LLM's attention and MLP projections (not gate_proj, not the vision tower)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def add_lora(model, cfg):
    """--lora-rank r: InstructVLA's adapters (its stage 1: peft LoRA, alpha 2r, dropout 0.05) on the LLM, the rows
    of the tokens DualVLA adds (<|act|>, <|query|>, the action bins) trainable in the embedding matrix too.

    DualVLA.save_pretrained folds a stage's adapters into the weights, so a later stage with --lora-rank trains a
    second, fresh set on top of the merged first one: a plain second LoRA where InstructVLA's stage 2 mixes the
    two with X-LoRA (peft's XLoraConfig). X-LoRA's classifier reads the hidden states of an extra, adapter-free
    pass through the whole LLM each step, hooked onto the model's top-level forward, which DualVLA bypasses
    (it runs the inner model on its own embeddings), and InstructVLA strips its hooks to generate
    (cleanup_xlora_pre_hooks). What the regime is about stays: adapters on a frozen LLM, the expert frozen."""
    if not cfg.lora_rank:
        return model
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--lora-rank needs peft (pip install peft)") from None
    inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.05,
                                       target_modules=LORA_TARGETS), model.backbone.model.language_model)
    new = torch.tensor([model.ids[ACT], model.ids[QUERY]] + model.bin_ids.tolist())
    for w in {id(w): w for w in embedding_matrices(model)}.values():  # one matrix when tied (Qwen2.5-VL-3B)
        w.requires_grad_(True)  # peft froze it; a hook needs a tensor that takes gradients
        w.register_hook(lambda g: g * new_row_mask(g.shape[0], new, g.device)[:, None])
    return model


def new_row_mask(n, rows, device):
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[rows.to(device)] = True
    return mask


def embedding_matrices(model):
    return model.backbone.get_input_embeddings().weight, model.backbone.lm_head.weight


def set_vlm_trainable(model, trainable, cfg):
    """What the optimizer trains. The VLM (backbone + queries) while `trainable`: every weight, or with
    --lora-rank the adapters and the embedding matrices (add_lora's hook keeps their old rows fixed). The action
    expert, unless --freeze-action-head in a stage that starts from a trained one (the specialist trains it, Eq. 2)."""
    model.backbone.requires_grad_(trainable and not cfg.lora_rank)
    if trainable and cfg.lora_rank:
        for name, p in model.backbone.named_parameters():
            p.requires_grad_("lora_" in name)
        for w in embedding_matrices(model):
            w.requires_grad_(True)
    model.queries.requires_grad_(trainable)
    if model.head is not None:
        model.head.requires_grad_(not (cfg.freeze_action_head and cfg.stage != "specialist"))


# ----------------------------------------------------------------------------- the training loop

def make_optimizer(model, cfg):
    """AdamW, weight decay on matrices only (not on biases and norms, nor with --lora-rank on the embedding
    matrices: decay would move the rows add_lora keeps fixed); on CUDA the fused kernel (one launch for all
    parameters instead of a few per tensor)."""
    fixed = {id(w) for w in embedding_matrices(model)} if cfg.lora_rank else set()
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in fixed]
    other = [p for p in model.parameters() if p.ndim < 2 or id(p) in fixed]
    cuda = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=other, weight_decay=0.0)],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=True if cuda else None)


def optimizer_step(model, opt, cfg):
    """After the micro-batches' backward: clip the global gradient norm, step, clear the gradients."""
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lr_at(step, cfg):
    """Linear warmup, then constant or cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def vla_losses(model, micro, step, cfg, ctx, reasoning, batches=None):
    """Eq. 2/3 over the micro-batches of one step, backward included; returns the summed terms.

    Each term is summed over its tokens and divided by the GLOBAL count of those tokens (all ranks,
    all micro-batches), times the world size because DDP/FSDP average gradients: a torchrun run
    then takes the very step a single process takes on the same global batch.
    `batches`: step_inputs(micro), when already built (the train loop's prefetch).
    """
    inner = unwrap(model)
    batches = batches or step_inputs(model, micro, reasoning, ctx)
    counts = torch.tensor([[int(text_target_mask(b).sum()), int(b["action_mask"].sum()) * inner.config.action_dim
                            if "action_mask" in b else 0, 2 * int(b["ground_mask"].sum()) if "ground_mask" in b else 0]
                           for b in batches], dtype=torch.float64).sum(0)
    n_lm, n_act, n_ground = all_sum(counts, ctx).clamp(min=1).tolist()
    ground = torch.zeros(1, dtype=torch.float64)
    sums = torch.zeros(6, dtype=torch.float64)  # lm robot, lm mm, action; their token counts
    for k, (recs, batch) in enumerate(zip(micro, batches)):
        noise = flow_noise(recs, inner.config, cfg.seed, step) if inner.config.action_head == "flow" else {}
        with sync_context(model, cfg, ctx, last=k == len(batches) - 1), autocast(cfg, ctx):
            out = model(to_device(batch, ctx), **{name: x.to(ctx["device"]) for name, x in noise.items()})
            loss = out["lm_sum"] / n_lm + out["action_sum"] / n_act
            if "ground_sum" in out:  # also at weight 0, as in DualVLA.forward's loss
                loss = loss + inner.ground_weight * out["ground_sum"] / n_ground
                ground += float(out["ground_sum"].detach())
            loss = loss * ctx["world"]
        loss.backward()
        sums += domain_sums(out, batch)
    sums = all_sum(sums, ctx)
    lm_robot, lm_mm, action = (sums[:3] / sums[3:].clamp(min=1)).tolist()
    total = (sums[0] + sums[1]) / n_lm + sums[2] / n_act
    terms = dict(loss=float(total), lm_robot=lm_robot, lm_mm=lm_mm, action=action)
    if cfg.ground_weight:  # logged apart: `loss` stays Eq. 2/3, comparable across runs
        terms["ground"] = float(all_sum(ground, ctx)) / n_ground
    return terms


def frozen_vlm(cfg, model, ctx):
    """Whether the stage trains the flow head alone on a VLM frozen throughout (the CPU presets' specialist): the VLM's
    outputs on a frame then never change, and vlm_outputs computes them once instead of every step."""
    return (cfg.stage == "specialist" and cfg.freeze_vlm_steps >= cfg.steps and model.config.action_head == "flow"
            and ctx["world"] == 1)


@torch.no_grad()
def vlm_outputs(model, robot, ctx, batch_size=64):
    """{(episode, step): (query states (Q, H), lm loss sum, its token count)} of every robot frame as the specialist
    sees it (no reasoning), from one pass of the frozen VLM."""
    out = {}
    for i in range(0, len(robot), batch_size):
        recs = robot[i:i + batch_size]
        batch = to_device(model.make_batch(open_images(recs), reasoning=False), ctx)
        h = model.hidden_states(batch)
        qs = model.query_states(h, batch)
        ce, rows = text_losses(model.backbone.lm_head(h), batch)
        lm = torch.zeros(len(recs), device=h.device).index_add_(0, rows, ce)
        n = torch.bincount(rows, minlength=len(recs))
        for k, r in enumerate(recs):
            out[(r["episode"], r["step"])] = (qs[k], lm[k], n[k])
    return out


def expert_losses(model, micro, step, cfg, ctx, cached, batches):
    """vla_losses for a specialist on a frozen VLM (frozen_vlm), from its cached outputs: the same step (the lm term
    of a frozen VLM has no gradient) and the same logged terms. batches: Prompter.expert_batch of each micro-batch."""
    inner = unwrap(model)
    n_act = sum(int(b["action_mask"].sum()) for b in batches) * inner.config.action_dim
    n_ground = 2 * sum(int(b["ground_mask"].sum()) for b in batches)
    sums = torch.zeros(4, dtype=torch.float64)  # lm, its tokens, action, ground
    for recs, batch in zip(micro, batches):
        qs, lm, n = (torch.stack(x) for x in zip(*(cached[(r["episode"], r["step"])] for r in recs)))
        noise = flow_noise(recs, inner.config, cfg.seed, step)
        out = inner.expert_loss(qs, to_device(batch, ctx), **{k: v.to(ctx["device"]) for k, v in noise.items()})
        loss = out["action_sum"] / max(n_act, 1) + inner.ground_weight * out["ground_sum"] / max(n_ground, 1)
        loss.backward()
        sums += torch.tensor([float(lm.sum()), float(n.sum()), float(out["action_sum"].detach()),
                              float(out["ground_sum"].detach())], dtype=torch.float64)
    lm_robot, action = float(sums[0] / sums[1].clamp(min=1)), float(sums[2]) / max(n_act, 1)
    terms = dict(loss=lm_robot + action, lm_robot=lm_robot, lm_mm=0.0, action=action)
    if cfg.ground_weight:
        terms["ground"] = float(sums[3]) / max(n_ground, 1)
    return terms


def text_losses(logits, batch):
    """The lm loss of each text-target token and the batch row it lies in."""
    mask = text_target_mask(batch).to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), batch["labels"][:, 1:].to(mask.device)[mask],
                                           reduction="none")
    return ce, mask.nonzero()[:, 0]


def domain_sums(out, batch):
    """Summed lm loss of robot and multimodal rows and the action loss, with their counts (for logs)."""
    with torch.no_grad():
        ce, rows = text_losses(out["logits"], batch)
        robot = batch["is_robot"].to(rows.device)[rows]
        return torch.tensor([ce[robot].sum(), ce[~robot].sum(), out["action_sum"], robot.sum(), (~robot).sum(),
                             out["action_count"]], dtype=torch.float64)


def distill_losses(model, teachers, micro, step, cfg, ctx, batches=None):
    """Eq. 7 (distill.py) over the micro-batches of one step, backward included.

    dual_teacher_loss returns per-rank means, so under torchrun the step is the mean over ranks of
    their losses (equal to the single-process step up to the token counts differing between ranks).
    `batches`: step_inputs(micro), when already built (the train loop's prefetch).
    """
    inner, terms = unwrap(model), {}
    batches = batches or step_inputs(model, micro, True, ctx)
    for k, (recs, batch) in enumerate(zip(micro, batches)):
        batch = to_device(batch, ctx)
        noise = flow_noise(recs, inner.config, cfg.seed, step) if inner.config.action_head == "flow" else {}
        with sync_context(model, cfg, ctx, last=k == len(micro) - 1), autocast(cfg, ctx):
            out = dual_teacher_loss(model, *teachers, batch, lam=cfg.lambda_kd, T=cfg.kd_temperature, kd=cfg.kd,
                                    **{name: x.to(ctx["device"]) for name, x in noise.items()})
        (out["loss"] / len(micro)).backward()
        for name, v in out.items():
            terms[name] = terms.get(name, 0.0) + float(v.detach()) / len(micro)
    names = ("loss", "l_vla", "lm_loss", "action_loss", "l_kd_action", "l_kd_reason")
    mean = all_sum(torch.tensor([terms[n] for n in names], dtype=torch.float64), ctx) / ctx["world"]
    return dict(zip(("loss", "l_vla", "lm", "action", "kd_action_robot", "kd_reason_mm"), mean.tolist()))


def sync_context(model, cfg, ctx, last):
    """Gradient accumulation: all-reduce only on the last micro-batch of a step."""
    if ctx["world"] > 1 and not last:
        if cfg.fsdp:
            model.set_requires_gradient_sync(False)
            return nullcontext()
        return model.no_sync()
    if ctx["world"] > 1 and cfg.fsdp:
        model.set_requires_gradient_sync(True)
    return nullcontext()


def autocast(cfg, ctx):
    on_gpu = ctx["device"].type == "cuda" and cfg.bf16
    return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()


def fixed_batch_loss(model, teachers, records, cfg, ctx, reasoning):
    """The training loss on one fixed batch with fixed noise: a steadier progress signal than the batch loss."""
    inner = unwrap(model)
    batch = inner.make_batch(open_images(records), reasoning=reasoning)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast(cfg, ctx):
        torch.manual_seed(cfg.seed)
        if teachers:
            return float(dual_teacher_loss(inner, *teachers, batch, lam=cfg.lambda_kd, T=cfg.kd_temperature,
                                           kd=cfg.kd)["loss"])
        noise = flow_noise(records, inner.config, cfg.seed, -1) if inner.config.action_head == "flow" else {}
        return float(inner(batch, **{name: x.to(ctx["device"]) for name, x in noise.items()})["loss"])


def stage_inputs(cfg):
    """Where a stage's model and data come from: {name: (path, stage that makes it or None)}."""
    model = lambda stage: os.path.join(cfg.out, stage, "model")
    pick = lambda given, stage: (given, None) if given else (model(stage), stage)
    if cfg.stage == "generalist":
        return dict(init=pick(cfg.init, "specialist"))
    if cfg.stage == "distill":
        return dict(init=pick(cfg.init, "generalist"), action_teacher=pick(cfg.action_teacher, "specialist"),
                    reasoning_teacher=pick(cfg.reasoning_teacher, "generalist"),
                    pruned_data=(cfg.pruned_data, None) if cfg.pruned_data else (os.path.join(cfg.out, "pruned"), "prune"))
    return {}


def build_models(cfg, ctx, inputs, robot, cameras):
    """The model to train (+ the frozen teachers for distill) on the device, and how to rebuild it unsharded."""
    if cfg.stage == "specialist":
        backbone = None if cfg.init else backbone_path(cfg, ctx)
        vision = None if cfg.init else head_vision_path(cfg, ctx)
        make = lambda: add_lora(load_model(cfg.init, cfg) if cfg.init else
                                new_model(cfg, backbone, robot, cameras, head_vision=vision), cfg)
    else:
        make = lambda: add_lora(load_model(inputs["init"], cfg), cfg)
    model, teachers = as_student(make(), cfg, ctx), ()
    if cfg.stage == "distill":
        teachers = tuple(as_teacher(load_model(inputs[k], cfg), cfg, ctx)
                         for k in ("action_teacher", "reasoning_teacher"))
        check_teachers(model, *teachers)
    return model, teachers, make


def train(cfg, ctx, inputs):
    """One training stage: data, models, optimizer, the loop, checkpoints, the final model."""
    stage_dir, rank0, t_start = os.path.join(cfg.out, cfg.stage), ctx["rank"] == 0, time.time()
    robot_path = inputs["pruned_data"] if cfg.stage == "distill" else robot_source(cfg, ctx)
    robot = data.episode_records(robot_episodes(robot_path, camera_list(cfg)))
    if not robot:
        raise UserError(f"{robot_path}: no robot frames")
    data.verify_images(robot, robot_path)
    mm = mm_records(cfg, ctx) if cfg.stage != "specialist" else []  # Eq. 2: robot data only
    if cfg.stage != "specialist" and cfg.mm_ratio > 0 and not mm:  # Eq. 3 without its multimodal half
        raise UserError(f"{cfg.mm_data or 'the demo'}: no multimodal sample with its image found; check --mm-images "
                        f"(or --mm-ratio 0 to train without multimodal data)")
    data.verify_images(mm, cfg.mm_data or "the demo's mm.json")
    model, teachers, rebuild = build_models(cfg, ctx, inputs, robot, data_cameras(cfg, robot_path, robot))
    check_robot_data(model.config, robot, robot_path, cfg)
    check_text(model.tokenizer, robot, robot_path)
    check_text(model.tokenizer, mm, cfg.mm_data or "the demo's mm.json")
    data.add_action_chunks(robot, model.config.chunk)
    reasoning = cfg.stage != "specialist"  # Eq. 2: the specialist's targets hold no reasoning
    micro_size, rem = divmod(cfg.batch_size, ctx["world"] * cfg.grad_accum)
    if rem or not micro_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                        f"({ctx['world']} x {cfg.grad_accum})")
    mm_ratio = cfg.mm_ratio if mm else 0.0
    if micro_size - round(micro_size * mm_ratio) < 1:
        raise UserError(f"a micro-batch of {micro_size} with --mm-ratio {mm_ratio} holds no robot sample")
    latest = start_stage_dir(stage_dir, cfg, ctx, dict(inputs=inputs, world_size=ctx["world"],
                                                          model=asdict(model.config)))

    ckpt = read_checkpoint(latest, cfg, ctx) if latest else None
    # frozen while loading a checkpoint written by a frozen step (the last frozen step is step freeze_vlm_steps
    # itself): its optimizer holds no state for the VLM, and state loads only into trainable parameters; the
    # loop unfreezes at its first step past the freeze
    frozen = cfg.freeze_vlm_steps > 0 and cfg.freeze_vlm_steps >= (ckpt["progress"]["step"] if ckpt else 0)
    set_vlm_trainable(model, not frozen, cfg)
    wrapped = wrap(model, cfg, ctx)  # before the optimizer: fully_shard replaces the parameters
    opt = make_optimizer(model, cfg)
    start = restore_checkpoint(ckpt, wrapped, opt, cfg, ctx) if ckpt else 0
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    if rank0:
        if start:
            print(f"{cfg.stage}: resuming from {latest}")
        if start and os.path.isfile(metrics_path):  # drop what a killed run logged after its last checkpoint
            with open(metrics_path) as f:
                lines = [line for line in f if logged_step(line) <= start]
            data.atomic_write(metrics_path, "".join(lines))
        print(f"{cfg.stage}: {len(robot)} robot frames from {robot_path} ({', '.join(model.config.cameras)}; "
              f"{model.config.action_dim}-D actions), {len(mm)} multimodal samples; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {cfg.steps} steps of "
              f"{cfg.batch_size} on {ctx['world']} process(es)"
              + (f"; VLM frozen for {cfg.freeze_vlm_steps} steps" if frozen and start < cfg.freeze_vlm_steps else ""))
    stream = data.mixed_batches(robot, mm, micro_size, mm_ratio, cfg.seed, ctx["rank"], ctx["world"],
                                start=start * cfg.grad_accum)
    fixed = next(data.mixed_batches(robot, mm, min(cfg.batch_size, 16), mm_ratio, cfg.seed + 1))
    fixed_before = fixed_batch_loss(wrapped, teachers, fixed, cfg, ctx, reasoning)
    torch.manual_seed(cfg.seed + ctx["rank"])  # per-rank randomness (distill.py's flow noise, dropout)
    if ckpt:
        set_rng_states(ckpt["rng"])  # last, so nothing above consumes the restored streams

    cached = None
    if frozen_vlm(cfg, model, ctx):
        t0 = time.time()
        cached = vlm_outputs(model, robot, ctx)
        if rank0:
            print(f"{cfg.stage}: the VLM is frozen throughout: its outputs on the {len(robot)} frames computed once "
                  f"({time.time() - t0:.0f} s)")

    def next_step():  # with --prefetch only the worker reads the stream: the data order stays the same
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        if cached:
            return micro, [model.prompter.expert_batch(open_images(recs), model.robot_stats) for recs in micro]
        return micro, step_inputs(model, micro, reasoning, ctx)

    steps = prefetched(next_step, cfg.prefetch)
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, disable=not rank0, mininterval=2, file=sys.stdout)
    log, first, t_log, logged = None, None, time.time(), start
    for step in range(start, cfg.steps):
        if frozen and step >= cfg.freeze_vlm_steps:
            frozen = False
            set_vlm_trainable(model, True, cfg)
            if not cfg.fsdp:  # DDP hooks only the parameters trainable when it is built; FSDP2 checks each step
                wrapped = wrap(model, cfg, ctx)
        micro, batches = next(steps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        log = distill_losses(wrapped, teachers, micro, step, cfg, ctx, batches) if teachers else \
            expert_losses(wrapped, micro, step, cfg, ctx, cached, batches) if cached else \
            vla_losses(wrapped, micro, step, cfg, ctx, reasoning, batches)
        if not math.isfinite(log["loss"]):
            domains = [r["domain"] for recs in micro for r in recs]
            kept = checkpoints(stage_dir)
            raise FloatingPointError(
                f"{cfg.stage}: loss is {log['loss']} at step {step + 1} on a batch of {domains.count('robot')} "
                f"robot and {domains.count('mm')} multimodal samples; last good checkpoint: {kept[-1] if kept else 'none'}")
        optimizer_step(model, opt, cfg)
        first, done = first or log, step + 1
        if rank0 and (done % cfg.log_every == 0 or done == cfg.steps):
            sps = cfg.batch_size * (done - logged) / (time.time() - t_log)
            t_log, logged = time.time(), done
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(step=done, lr=lr_at(step, cfg), samples_per_s=round(sps, 2),
                                        **{k: round(v, 6) for k, v in log.items()})) + "\n")
            bar.set_postfix(loss=f"{log['loss']:.4f}", sps=f"{sps:.1f}")
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(wrapped, opt, done, stage_dir, cfg, ctx)
    steps.close()  # waits for the batch built ahead, so nothing else tokenises beside it
    bar.close()
    summary = dict(stage=cfg.stage, model=save_final(wrapped, stage_dir, cfg, ctx, rebuild), steps=cfg.steps,
                   resumed_at=start, wall_s=round(time.time() - t_start, 1),
                   first_loss=first["loss"] if first else math.nan, last_loss=log["loss"] if log else math.nan,
                   fixed_batch_loss=[fixed_before, fixed_batch_loss(wrapped, teachers, fixed, cfg, ctx, reasoning)],
                   last=log)
    if rank0:
        data.atomic_write(os.path.join(stage_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- stages

def run_prune(cfg, ctx):
    """Sec. 3.2.1 on the generalist's robot data -> OUT/pruned (episode folder + prune_stats.json, which also
    records the source, so a prune of other data never counts as done)."""
    out, t0, source = os.path.join(cfg.out, "pruned"), time.time(), robot_source(cfg, ctx)
    if ctx["rank"] == 0:
        _, stats = prune.prune(robot_episodes(source, camera_list(cfg)), cfg.prune, out=out)  # frames opened per episode
        data.atomic_write(os.path.join(out, "prune_stats.json"),
                          json.dumps(dict(stats, source=os.path.realpath(source)), indent=2))
        print(f"prune ({cfg.prune}): reasoning kept on {stats['keyframes']} of {stats['frames']} frames, "
              f"{stats['reasoning_tokens_after']} of {stats['reasoning_tokens_before']} words -> {out}")
    barrier(ctx)
    return dict(stage="prune", model=out, wall_s=round(time.time() - t0, 1))


# Flags that change no stage's result: a finished run with other values of these still counts as done.
RUN_ONLY = ("resume", "overwrite", "ablations", "eval_episodes", "eval_questions", "log_every", "prefetch")


def finished(cfg):
    """This stage's summary if a run of it already finished in OUT with the same flags, else None (also with
    --overwrite). So a rerun or a killed `--stage all` goes on where it stopped, and `--stage all --ablations`
    after a plain `--stage all` trains only the ablations."""
    if cfg.overwrite:
        return None
    if cfg.stage == "prune":
        out = os.path.join(cfg.out, "pruned")
        stats = os.path.join(out, "prune_stats.json")
        done = os.path.isfile(stats) and load_json(stats).get("mode") == cfg.prune and \
            load_json(stats).get("source") == os.path.realpath(robot_path(cfg))
        return dict(stage="prune", model=out, wall_s=0.0) if done else None
    stage_dir = os.path.join(cfg.out, cfg.stage)
    paths = [os.path.join(stage_dir, f) for f in ("summary.json", "config.json")]
    if not all(map(os.path.isfile, paths)):
        return None
    summary, old = load_json(paths[0]), load_json(paths[1])
    flags = json.loads(json.dumps(asdict(cfg)))  # as config.json stores them (tuples become lists)
    same = all(old.get(k) == v for k, v in flags.items() if k not in RUN_ONLY)
    return summary if same and summary.get("steps") == cfg.steps else None


def run_stage(stage, explicit, ctx):
    """Run `stage`, building its missing default inputs first (or reusing them from OUT)."""
    cfg = stage_config(stage, explicit)
    validate(cfg)
    previous = finished(cfg)
    if previous:
        if ctx["rank"] == 0:
            print(f"{stage}: already done in {previous['model']} with these flags (--overwrite trains it again)")
        return [previous]
    check_run_folder(cfg)
    inputs, done = stage_inputs(cfg), []
    for name, (path, maker) in inputs.items():
        if maker == "prune":  # pruned data of another --prune mode or other data must not stand in
            flags = {k: v for k, v in explicit.items() if k not in STAGE_INPUTS}
            exists = finished(stage_config("prune", dict(flags, overwrite=False)))
        else:
            exists = os.path.isfile(os.path.join(path, "model.safetensors"))
        if maker and not exists:
            if ctx["rank"] == 0:
                print(f"{stage}: {name} {path} is missing; running --stage {maker} first")
            done += run_stage(maker, {k: v for k, v in explicit.items() if k not in STAGE_INPUTS}, ctx)
        elif ctx["rank"] == 0 and maker:
            print(f"{stage}: reusing {path} as {name}")
    paths = {k: v[0] for k, v in inputs.items()}
    return done + [run_prune(cfg, ctx) if stage == "prune" else train(cfg, ctx, paths)]


def ablation_runs(cfg, explicit, ctx):
    """Tables 6-8 beside the main run: distill again from the same specialist and generalist with every
    other --prune mode (each on its own pruned data), every other --kd mode and every other λ of LAMBDAS (on
    the main pruned data).
    -> [(stage folder relative to OUT, the flags of its distill run)], each in OUT/ablations/<kind>-<mode>/."""
    keep = {k: v for k, v in explicit.items() if k not in STAGE_INPUTS + ("out", "demo_task", "ablations")}
    model = lambda stage: os.path.join(cfg.out, stage, "model")
    mm = os.path.join(demo_data(cfg, ctx), "mm.json") if not cfg.mm_data else cfg.mm_data
    shared = dict(keep, data=robot_source(cfg, ctx), mm_data=mm, mm_images=cfg.mm_images or os.path.join(
        os.path.dirname(mm), "" if cfg.mm_data else "mm_images"), init=model("generalist"),
        action_teacher=model("specialist"), reasoning_teacher=model("generalist"))
    runs = [(f"prune-{m}", dict(shared, prune=m)) for m in prune.MODES if m != cfg.prune]
    runs += [(f"kd-{m}", dict(shared, kd=m, pruned_data=os.path.join(cfg.out, "pruned"))) for m in KD_MODES if m != cfg.kd]
    runs += [(f"lambda-{v:g}", dict(shared, lambda_kd=v, pruned_data=os.path.join(cfg.out, "pruned")))
             for v in LAMBDAS if v != cfg.lambda_kd]
    return [(os.path.join("ablations", name, "distill"), dict(flags, out=os.path.join(cfg.out, "ablations", name)))
            for name, flags in runs]


def main(argv=None):
    t0 = time.time()
    try:
        explicit = parse_args(argv)
        cfg = stage_config(explicit.get("stage", TrainConfig.stage), explicit)
        validate(cfg)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        ctx = setup_distributed(cfg)
        if cfg.stage == "all":
            summaries = []
            for stage in STAGES[:-1]:
                summaries += run_stage(stage, dict(explicit, stage=stage), ctx)[-1:]
            evaluated = [s["stage"] for s in summaries if s["stage"] != "prune"]
            for folder, flags in ablation_runs(cfg, explicit, ctx) if cfg.ablations else []:
                summaries += run_stage("distill", flags, ctx)
                evaluated.append(folder)
        else:
            summaries = run_stage(cfg.stage, explicit, ctx)
            # the main job on the embedded default: the three models it trained (or reused), evaluated
            evaluated = [s for s in STAGES[:-1] if s != "prune" and os.path.isdir(os.path.join(cfg.out, s, "model"))] \
                if cfg.stage == "distill" and not cfg.data else []
        if ctx["rank"] == 0:
            if evaluated and not cfg.data:
                report.evaluate_demo(cfg, evaluated, backbone_path(cfg, ctx))
            report.print_summary(summaries, cfg, time.time() - t0, evaluated and not cfg.data)
            if evaluated and not cfg.data and not cfg.mm_data:
                report.write_results(cfg, evaluated[:3])
    except (UserError, DataError, FloatingPointError, OSError) as e:  # raised alike on every rank
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {one_line(e)}", file=sys.stderr)
        shutdown()
        sys.exit(2)
    shutdown()


def one_line(e):
    """The error message on one line; an OSError names its file, and a full disk says so."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full{f' writing {e.filename}' if e.filename else ''}: free space and rerun with --resume"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())


def shutdown():
    """A barrier before destroying the group avoids gloo's occasional abort at exit (FACTS.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
