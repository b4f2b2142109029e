"""Where a run's backbone comes from (train.py): --backbone, or the demo's tiny Qwen2.5-VL, pretrained on tabletop
captions and questions as a real backbone is on the web (pretrain_tiny, once per settings under
runs/backbones/<hash>/), or random with --backbone-steps 0; and the "dit" expert's DINOv2 (--head-vision, or a
random tiny one).
"""
import json
import os
import shutil
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import tabletop
from checkpoint import barrier
from model import DualVLA, VLAConfig, build_tiny, build_tiny_vision, tiny_backbone


def backbone_path(cfg, ctx):
    """--backbone, or the demo's tiny Qwen2.5-VL: with --backbone-steps, pretrained (pretrain_tiny) once per
    settings under BACKBONE_CACHE/<hash of tiny_settings> and shared by every stage, seed and run; else random
    under OUT/tiny (built once)."""
    if cfg.backbone:
        return cfg.backbone
    if cfg.backbone_steps:
        s = tiny_settings(cfg)
        path = os.path.join(cfg.backbone_cache, f"{zlib.crc32(json.dumps(s, sort_keys=True).encode()):08x}")
        if ctx["rank"] == 0 and not os.path.isdir(path):   # it appears whole (os.replace)
            print(f"tiny backbone: pretraining on tabletop captions and QA for {s['steps']} steps in {path}")
            report = pretrain_tiny(path, s)
            print(f"tiny backbone: {report['seconds']} s, held-out answer loss {report['heldout_loss']:.3f} "
                  f"({report['heldout_loss_shuffled']:.3f} with shuffled images)")
        barrier(ctx)
        return path
    return random_tiny(build_tiny, os.path.join(cfg.out, "tiny"), "tiny backbone: building a random tiny Qwen2.5-VL",
                       cfg, ctx)


def head_vision_path(cfg, ctx):
    """--head-vision, or for the "dit" expert a random tiny DINOv2 under OUT/tiny_vision (built once)."""
    if cfg.head_vision or cfg.action_expert != "dit":
        return cfg.head_vision
    return random_tiny(build_tiny_vision, os.path.join(cfg.out, "tiny_vision"),
                       "tiny head vision: building a random tiny DINOv2", cfg, ctx)


def random_tiny(build, path, say, cfg, ctx):
    """A random tiny model folder built once by rank 0 (its image processor is written last), then shared."""
    if ctx["rank"] == 0 and not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        print(f"{say} in {path}")
        build(path, seed=cfg.seed)
    barrier(ctx)
    return path


def tiny_settings(cfg):
    """Everything the pretrained tiny backbone depends on: its folder is named by their hash. One fixed seed:
    every run and seed with these settings starts from the same backbone, as every paper run starts from Qwen."""
    return dict(tiny=dict(patch=7, vision_hidden=32, vision_depth=2, hidden=64, layers=2), seed=0,
                steps=cfg.backbone_steps, batch_size=16, lr=3e-3, cell_weight=1.0, image_size=cfg.image_size,
                render_size=64, pool=min(3000, 16 * cfg.backbone_steps),   # distinct samples: half captions, half QA
                world=tabletop.WORLD)


def pretrain_tiny(path, s):
    """The demo's stand-in for a VLM's web pretraining: the tiny Qwen2.5-VL trained on tabletop renders with
    dense captions (every object, its position, the gripper) and balanced questions in the demo benchmarks'
    formats, whose answers the text alone cannot give (Eq. 3's lm loss on answers only). Writes a normal
    backbone folder (save_pretrained) with settings.json and pretrain.json: the loss, the build time and the
    held-out answer loss with true and with shuffled images (the gap says the model reads the image)."""
    t0, c0 = time.time(), time.process_time()
    backbone, tok, image_processor = tiny_backbone(**s["tiny"], seed=s["seed"])
    side = s["image_size"] ** 2  # every image on the robot frames' grid, the one cell_targets labels
    model = DualVLA(VLAConfig(backbone=path, image_size=s["image_size"], min_pixels=side, max_pixels=side),
                    backbone, tok, image_processor)
    pool = (tabletop.caption_samples(s["seed"], s["pool"] // 2, s["render_size"])
            + tabletop.qa_samples(s["seed"] + 1, s["pool"] - s["pool"] // 2, s["render_size"]))
    held = tabletop.caption_samples(s["seed"] + 2, 64, s["render_size"]) + tabletop.qa_samples(s["seed"] + 3, 96,
                                                                                               s["render_size"])
    probe = torch.nn.Linear(backbone.config.vision_config.out_hidden_size, sum(CELL_CLASSES))
    params = list(backbone.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    rng, losses = np.random.default_rng(s["seed"]), []
    grid = int(model.prompter.image_tokens ** 0.5)
    for _ in tqdm(range(s["steps"]), desc="pretraining the tiny backbone", disable=None, leave=False):
        records = [pool[i] for i in rng.choice(len(pool), s["batch_size"], replace=False)]
        batch = model.make_batch(records)
        lm = model(batch)["lm_loss"]
        tokens = backbone.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        logits = probe(tokens).split(CELL_CLASSES, dim=-1)                     # (B·grid², classes) each
        targets = cell_targets([r["scene"] for r in records], grid)              # (B·grid², 3)
        loss = lm + s["cell_weight"] * sum(F.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(lm.item())
    shuffled = [dict(r, image=q["image"]) for r, q in zip(held, held[1:] + held[:1])]
    true_loss, shuffled_loss = answer_loss(model, held), answer_loss(model, shuffled)
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for part in (backbone, tok, image_processor):
        part.save_pretrained(tmp)
    report = dict(seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
                  loss_first=float(np.mean(losses[:20])),
                  loss_last=float(np.mean(losses[-20:])), heldout_loss=true_loss, heldout_loss_shuffled=shuffled_loss,
                  image_gap=shuffled_loss - true_loss)
    for name, obj in (("settings.json", s), ("pretrain.json", report)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return report


CELL_COLOURS, CELL_KINDS = list(tabletop.COLORS) + [""], list(tabletop.SIZES) + [""]
CELL_CLASSES = (len(CELL_COLOURS), len(CELL_KINDS), 2)   # colour, kind (or none), the gripper is here


def cell_targets(layouts, grid):
    """Per image token (row-major grid x grid cells of the image): the colour and kind of the topmost object
    whose centre lies in its cell, and whether the gripper does ((N·grid², 3) class indices).

    pretrain_tiny's dense term: a linear probe on the vision tower's tokens predicts these. With only the
    answers' loss, an ~7 px object is a needle the random tower gives no salient feature; the tiny model then
    learned no colour of a lone object in 250 steps, and with this term it did (docs/miniature.md)."""
    out = np.zeros((len(layouts), grid * grid, 3), np.int64)
    out[..., 0], out[..., 1] = len(CELL_COLOURS) - 1, len(CELL_KINDS) - 1
    for n, things in enumerate(layouts):
        for x, y, colour, kind in things:
            cell = min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)
            if kind == "gripper":
                out[n, cell, 2] = 1
            else:
                out[n, cell, :2] = CELL_COLOURS.index(colour), CELL_KINDS.index(kind)
    return torch.from_numpy(out.reshape(-1, 3))


@torch.no_grad()
def answer_loss(model, records, batch_size=32):
    """Mean loss per answer token over `records` (multimodal)."""
    model.eval()
    total = count = 0
    for i in range(0, len(records), batch_size):
        out = model(model.make_batch(records[i:i + batch_size]))
        total, count = total + float(out["lm_sum"]), count + int(out["lm_count"])
    model.train()
    return total / max(count, 1)
