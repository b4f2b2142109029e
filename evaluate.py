"""Evaluation of a DualVLA checkpoint, the paper's three ways (Sec. 4, NOTES §4-5).

    python evaluate.py sim --ckpt DIR --env tabletop|simplerenv   success rates, the 9-column SimplerEnv table
    python evaluate.py mm --ckpt DIR --bench MMStar,...             the eight multimodal benchmarks (VLMEvalKit TSVs)
    python evaluate.py vla-score --rollouts DIR --kb kb.jsonl       VLA Score with a retrieval-augmented judge (Eq. 8)
    python evaluate.py table --sim OUT/sim_results.json             your run beside the paper's rows

The one CLI of the three evaluations, and the SimplerEnv protocol (NOTES §5) here; the eight multimodal
benchmarks are in benchmarks.py, the VLA Score (Sec. 3.3) in vla_score.py, the miniature's tables in
report.py. Each has its config dataclass, its functions and its CLI pair (add_*_args / main_*); `main`
at the bottom dispatches and turns bad input into one line, exit 2.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import tabletop
from benchmarks import add_mm_args, main_mm
from data import DataError, atomic_write
from lerobot_format import lerobot_state
from model import DualVLA, UserError
from report import loss_curves_png, miniature_tables
from vla_score import add_judge_args, add_score_args, main_score, make_judge


# ============================================================================= sim: SimplerEnv (NOTES §5)

ENV_ACTION_DIM = 7  # SimplerEnv: xyz delta, rotation delta, gripper (tabletop envs say theirs: env.action_dim)


@dataclass
class SimConfig:
    env: str = "tabletop"            # "tabletop" (CPU, tabletop.py) | "simplerenv" (GPU, SimplerEnv installed)
    policy: str = "model"            # "model" (--ckpt) | "expert" (tabletop's scripted expert) | "random"
    ckpt: str = ""                   # DualVLA checkpoint folder (save_pretrained)
    tasks: tuple = ()                # tabletop.ALL_TASKS or SIMPLER_COLUMNS keys; () = all (tabletop: policy's width)
    cameras: tuple = ()              # tabletop cameras, one image each per step; () = the checkpoint's own
    episodes: int = None             # tabletop: seeds per task (None: 50, a rate within about ±13 points);
                                     # simplerenv: at most this many per column (None or 0: SimplerEnv's full grid)
    seed: int = 0                    # first tabletop seed: seeds seed..seed+episodes-1, held out from training
    batch: int = 50                  # tabletop: episodes stepped together, one model forward for all
    max_steps: int = 0               # 0 = the env's own limit (SimplerEnv: 80 / 113 / 60 steps per task)
    exec_horizon: int = 1            # execute the first k actions of each predicted chunk
    ensemble: str = "none"           # or predict every step and average overlapping chunks: act (ACT) | adaptive (CogACT)
    ensemble_temp: float = 0.0       # act: ACT's m: w_i = exp(-m i), i = 0 the oldest; 0 = plain mean (as Octo)
    ensemble_horizon: int = 0        # adaptive: predictions averaged; 0 = InstructVLA's 7 (WidowX) / 2 (Google Robot)
    ensemble_alpha: float = 0.1      # adaptive: weights exp(α · cos(prediction, newest prediction)) (CogACT's α)
    reason: bool = True              # let the model generate reasoning before acting
    state: bool = None               # give the model the robot state (observed_state); None = if it trained with state
    robot: str = ""                  # whose statistics (un)normalise; "" = the robot the task names
    sticky_repeat: int = 15          # Google Robot gripper: hold a commanded change for this many steps (InstructVLA: 10)
    gripper_fix: bool = False        # Google Robot: InstructVLA's fix of SimplerEnv's previous_gripper_action
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


def quat_to_matrix(q):
    """Unit quaternion (w, x, y, z) -> 3×3 rotation matrix (transforms3d's quat2mat)."""
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def matrix_to_euler(R):
    """3×3 rotation -> static-axes xyz Euler angles (transforms3d's mat2euler 'sxyz'), R = Rz·Ry·Rx; at
    gimbal lock (|pitch| = π/2) yaw is 0, as there."""
    cy = math.hypot(R[0, 0], R[1, 0])
    if cy > 4 * np.finfo(float).eps:
        return np.array([math.atan2(R[2, 1], R[2, 2]), math.atan2(-R[2, 0], cy), math.atan2(R[1, 0], R[0, 0])])
    return np.array([math.atan2(-R[1, 2], R[1, 1]), math.atan2(-R[2, 0], cy), 0.0])


# SimplerEnv's WidowX tool frame -> Bridge's top-down end-effector frame (InstructVLA's wrapper's default_rot)
BRIDGE_TOOL_ROT = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
LEROBOT_STATE_NAMES = {"widowx": ["x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper"],
                       "google_robot": ["x", "y", "z", "rx", "ry", "rz", "rw", "gripper"]}


def simpler_state(obs, robot):
    """The training state of a SimplerEnv observation: what lerobot_format.lerobot_state gives for the LeRobot row
    (Bridge / Fractal conversion) of the same pose, so the model sees at test the state it trained on.

    obs["agent"]["eef_pos"] is (x, y, z, quaternion w-x-y-z, gripper openness 1 = open) in the robot's base
    frame. The row is built as InstructVLA's SimplerEnv wrapper builds its proprio: WidowX — the rotation
    re-expressed in Bridge's top-down frame (R · BRIDGE_TOOL_ROTᵀ, then Euler), a zero pad, the openness;
    Google robot — the quaternion reordered x-y-z-w and RT-1's gripper closedness 1 − openness. `robot`:
    SimplerEnv's robot name ("widowx", "google_robot_static", ...) or policy setup ("widowx_bridge", ...).
    """
    p = np.asarray(obs["agent"]["eef_pos"], np.float64)
    if robot.startswith("widowx"):
        kind, row = "widowx", np.r_[p[:3], matrix_to_euler(quat_to_matrix(p[3:7]) @ BRIDGE_TOOL_ROT.T), 0.0, p[7]]
    elif robot.startswith("google_robot"):
        kind, row = "google_robot", np.r_[p[:3], np.roll(p[3:7], -1), 1.0 - p[7]]
    else:
        raise UserError(f"no SimplerEnv state layout for robot {robot!r} (widowx or google_robot)")
    return lerobot_state(row[None], LEROBOT_STATE_NAMES[kind], kind)[0]


def observed_state(obs, robot):
    """The robot state an observation offers: tabletop's obs["state"], SimplerEnv's (simpler_state), or None."""
    if "state" in obs:
        return obs["state"]
    return simpler_state(obs, robot) if "eef_pos" in obs.get("agent", {}) else None


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


ENSEMBLES = ("none", "act", "adaptive")
ADAPTIVE_HORIZON = {"widowx_bridge": 7, "google_robot": 2}  # InstructVLA's SimplerEnv policies


class ActionConverter:
    """A raw action dict -> the action dict SimplerEnv's env takes (the post-processing of its wrappers):
    world_vector and axis-angle rotation times action_scale, and each robot's gripper convention.

    widowx_bridge: absolute, +1 open / -1 close from open_gripper > 0.5.
    google_robot:  relative, previous - current open_gripper (+1 close, -1 open); a change above 0.5 is
                   repeated for `sticky_repeat` steps (SimplerEnv's "sticky gripper"), then 0 again; a
                   change commanded meanwhile is dropped, as in SimplerEnv.
                   SimplerEnv compares each command with the previous step's, so a gripper the model closes over
                   a few steps never fires; `gripper_fix` (InstructVLA's SimplerEnv policies) keeps the previous
                   command until a sticky action fires, so the change is measured from the last executed one.
    """

    def __init__(self, policy_setup, sticky_repeat=15, action_scale=1.0, gripper_fix=False):
        if policy_setup not in ("google_robot", "widowx_bridge"):
            raise UserError(f"policy_setup must be 'google_robot' or 'widowx_bridge', got {policy_setup!r}")
        self.policy_setup, self.sticky_repeat, self.action_scale = policy_setup, sticky_repeat, action_scale
        self.gripper_fix = gripper_fix
        self.reset()

    def reset(self):
        self.previous, self.sticky_on, self.repeat, self.sticky_action = None, False, 0, np.zeros(1)

    def gripper(self, open_gripper):
        open_gripper = np.asarray(open_gripper, np.float64).reshape(-1)  # one per arm
        if self.policy_setup == "widowx_bridge":
            return 2.0 * (open_gripper > 0.5) - 1.0
        relative = np.zeros(1) if self.previous is None else self.previous - open_gripper
        if self.previous is None or not self.gripper_fix:
            self.previous = open_gripper
        if abs(relative[0]) > 0.5 and not self.sticky_on:
            self.sticky_on, self.sticky_action, self.previous = True, relative, open_gripper
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


def predictions_for_now(chunks):
    """Chunks (oldest first), chunk i predicted n-1-i steps ago: each one's row for the current step, (n, A)."""
    n = len(chunks)
    return np.stack([c[n - 1 - i] for i, c in enumerate(chunks)]).astype(np.float64)


def ensemble_action(chunks, temp=0.0):
    """ACT's temporal ensemble: weights exp(-temp · i), i = 0 the oldest prediction, favour older predictions
    (SimplerEnv's ActionEnsembler)."""
    preds = predictions_for_now(chunks)
    w = np.exp(-temp * np.arange(len(preds)))
    return (w[:, None] * preds).sum(0) / w.sum()


def adaptive_ensemble_action(chunks, alpha=0.1):
    """CogACT's adaptive ensemble (InstructVLA's SimplerEnv policies): each prediction for this step weighted by
    exp(α · cos(prediction, newest prediction)), over the whole unnormalised action, gripper included, so
    predictions that disagree with the newest count less."""
    preds = predictions_for_now(chunks)
    ref = preds[-1]
    cos = preds @ ref / (np.linalg.norm(preds, axis=1) * np.linalg.norm(ref) + 1e-7)  # CogACT's 1e-7
    w = np.exp(alpha * cos)
    return (w[:, None] * preds).sum(0) / w.sum()


# ----------------------------------------------------------------------------- policies

class Policy:
    """A DualVLA checkpoint behind SimplerEnv's policy interface (reset / step).

    Each model call returns a chunk of actions and possibly reasoning; the pruned model reasons on
    keyframes only, so reasoning and generated tokens are recorded per call, not assumed per step.
    The model gets the robot state the episode loop passes (observed_state) when `use_state` is set, by
    default when the checkpoint was trained with state (it holds state statistics), as InstructVLA's
    state-conditioned SimplerEnv policy does. `robot` names whose statistics normalise the state and
    un-normalise the actions (default: the policy setup's robot, "widowx_bridge" -> widowx).
    SimplerEnv takes one camera and 7-D actions; tabletop (env="tabletop") also takes several cameras
    (step gets a list of images, in the checkpoint's camera order) and 7 dimensions per arm.
    """

    def __init__(self, ckpt, policy_setup="google_robot", exec_horizon=1, ensemble="none", ensemble_temp=0.0,
                 reason=True, sticky_repeat=15, action_scale=1.0, use_state=None, device=None, env="simplerenv",
                 robot="", ensemble_horizon=0, ensemble_alpha=0.1, gripper_fix=False):
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
        if ensemble not in ENSEMBLES:
            raise UserError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
        # how many predictions are averaged: ACT's, the whole chunk; CogACT's, InstructVLA's per-robot horizon
        horizon = cfg.chunk if ensemble == "act" else ensemble_horizon or ADAPTIVE_HORIZON.get(policy_setup, 0)
        if ensemble != "none" and not 1 <= horizon <= cfg.chunk:
            raise UserError(f"--ensemble-horizon must be in 1..{cfg.chunk} (the checkpoint's chunk), got {horizon}")
        self.exec_horizon, self.ensemble, self.ensemble_temp = exec_horizon, ensemble, ensemble_temp
        self.horizon, self.ensemble_alpha = horizon, ensemble_alpha
        self.robot = robot or policy_setup
        self.reason = reason
        self.use_state = bool(self.model.robot_stats(self.robot)[1]) if use_state is None else use_state
        self.convert = ActionConverter(policy_setup, sticky_repeat, action_scale, gripper_fix)
        self.task_description = None
        self.reset(None)

    def reset(self, task_description, seed=None):
        """A new episode; seed: the episode's own flow-noise stream (None: torch's global one)."""
        self.task_description = task_description
        self.queue, self.history = deque(), deque(maxlen=max(self.horizon, 1))
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.fresh = None
        self.convert.reset()

    def needs_prediction(self):
        return self.ensemble != "none" or not self.queue

    def receive(self, out):
        """A prediction (predict_action's dict) for the current step."""
        self.fresh = out
        if self.ensemble != "none":
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
        if self.ensemble == "act":
            a = ensemble_action(self.history, self.ensemble_temp)
        elif self.ensemble == "adaptive":
            a = adaptive_ensemble_action(self.history, self.ensemble_alpha)
        else:
            a = self.queue.popleft()
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
        reason=p.reason, generators=[q.generator for q in policies] if all(q.generator is not None for q in policies) else None,
        robot=p.robot)
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
                for t in tasks for i in range(50 if cfg.episodes is None else cfg.episodes)]
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

def run_episode(policy, env, obs, cameras, max_steps=0, robot="tabletop", seed=None):
    """SimplerEnv's loop: step until the env truncates (or the policy terminates); success is the env's
    flag at the last step. Returns the rollout record (contract format, minus frames) and all images.
    Each step the policy is offered the robot state of the observation (observed_state for `robot`).

    With several cameras the policy gets a list of images (in `cameras` order) and the rollout keeps the
    first camera's; with several arms actions are 7 values per arm, arm after arm (tabletop_bimanual).
    seed: the episode's flow-noise stream for a model policy (None: torch's global one).
    """
    return run_episodes([policy], [env], [obs], cameras, max_steps, robot, None if seed is None else [seed])[0]


def run_episodes(policies, envs, observations, cameras, max_steps=0, robot="tabletop", seeds=None):
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
                                                        for k in need], [observed_state(runs[k]["obs"], robot) for k in need])
        for k in list(active):
            r, env = runs[k], envs[k]
            image = r["image"]
            raw_action, action = policies[k].step(image if len(image) > 1 else image[0], r["task"],
                                                  state=observed_state(r["obs"], robot))
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
                               [o for _, o, _ in opened], opened[0][2], cfg.max_steps, group[0]["robot"],
                               [spec["seed"] for spec in group])
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
                   help="tabletop: seeds per task (default 50); simplerenv: at most this many per column "
                        "(default: SimplerEnv's full grid)")
    p.add_argument("--seed", type=int, default=d.seed, help="first tabletop seed (the set is fixed: seed, seed+1, ...)")
    p.add_argument("--batch", type=int, default=d.batch, help="tabletop: episodes stepped together (one forward each step)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="cap on steps per episode (0 = the env's)")
    p.add_argument("--exec-horizon", type=int, default=d.exec_horizon, help="actions executed per predicted chunk")
    p.add_argument("--ensemble", nargs="?", const="act", default=d.ensemble, choices=ENSEMBLES,
                   help="predict every step and average the overlapping chunks' actions for it: act (ACT's "
                        "temporal ensemble; the bare flag) or adaptive (CogACT's, as InstructVLA evaluates)")
    p.add_argument("--ensemble-temp", type=float, default=d.ensemble_temp, help="act: ACT's m; 0 = plain mean")
    p.add_argument("--ensemble-horizon", type=int, default=d.ensemble_horizon,
                   help="adaptive: predictions averaged (0 = 7 on WidowX, 2 on the Google Robot: InstructVLA's)")
    p.add_argument("--ensemble-alpha", type=float, default=d.ensemble_alpha, help="adaptive: CogACT's α")
    p.add_argument("--no-reason", dest="reason", action="store_false", help="act without generating reasoning")
    p.add_argument("--state", action=argparse.BooleanOptionalAction, default=d.state,
                   help="give the model the robot state (tabletop's, or SimplerEnv's end-effector pose in the "
                        "training layout); default: when the checkpoint was trained with state")
    p.add_argument("--robot", default=d.robot,
                   help="the robot whose statistics normalise states and un-normalise actions, as the training "
                        "data named it (widowx, google_robot, tabletop); default: the one each task names")
    p.add_argument("--sticky-repeat", type=int, default=d.sticky_repeat,
                   help="Google Robot sticky gripper steps (SimplerEnv's 15; InstructVLA's 10)")
    p.add_argument("--gripper-fix", action="store_true",
                   help="Google Robot: compare a gripper command with the last one that fired, not the previous "
                        "step's (InstructVLA's fix of SimplerEnv's previous_gripper_action)")
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
                                ensemble_horizon=cfg.ensemble_horizon, ensemble_alpha=cfg.ensemble_alpha,
                                gripper_fix=cfg.gripper_fix, action_scale=cfg.action_scale, use_state=cfg.state,
                                env=cfg.env, robot=cfg.robot)
    elif cfg.policy == "expert":
        make = ExpertPolicy
    else:
        make = lambda s: RandomPolicy(s, seed=cfg.seed)
    return {s: make(s) for s in ("google_robot", "widowx_bridge")}


def tabletop_setup(cfg, model=None):
    """cfg with the tabletop tasks and cameras a model needs (None: the expert's or a random policy's): by
    default the tasks of its action width
    and the checkpoint's cameras (a one-camera checkpoint whose camera is not a tabletop name sees the
    overhead camera). A checkpoint shown another number of cameras, or given tasks of another width, is
    refused here, before any episode runs."""
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
    setup = tabletop_setup(SimConfig(env="tabletop", tasks=tuple(tasks or ())), model)
    per_task = {}
    for task in setup.tasks:  # the tasks of the model's action width, seen by its cameras
        cos, grip, frames = [], [], []
        for k in range(episodes):
            ep = tabletop.expert_episode(task, seed + k, model.config.head_image_size, setup.cameras)
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
        policy = policies["widowx_bridge"]
        cfg = tabletop_setup(cfg, policy.model if isinstance(policy, Policy) else None)
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
