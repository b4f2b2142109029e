"""A CPU-sized tabletop world with SimplerEnv's interface, a scripted expert that writes ECoT-style
reasoning, and multimodal QA + VLMEvalKit demo benchmarks from the same renderer.

    env = make("tabletop_pick", seed=0)             # reset / step / get_language_instruction
    ep = expert_episode("tabletop_place", seed=3)   # dict(id, instruction, robot, task, steps)
    python tabletop.py --out data/demo              # episodes + LLaVA QA + LMUData/*.tsv

The table is the unit square seen from above: x to the right, y toward the robot (image down),
z the gripper's height. The data have the structure of Bridge/Fractal + ECoT (Sec. 3.1): per frame
an image, the end-effector state, a 7-D delta action and a reasoning tag dict; the expert moves at
a constant speed within a subtask, so acceleration spikes and gripper flips mark subtask
boundaries — what the kinematic pruning layer (Sec. 3.2.1) detects.
Env seeds below TRAIN_SEED_OFFSET are held out for evaluation; demo episodes use seeds above it.
"""
import argparse
import ast
import base64
import csv
import functools
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data


@dataclass
class DemoConfig:
    out: str = "data/demo"
    episodes: int = 100          # per single-arm task: 300 episodes, ~8 k frames for the demo
    bimanual_episodes: int = 0   # 14-DoF (two-arm) episodes; 0 keeps the default demo 7-DoF
    qa: int = 3000               # LLaVA-style QA pairs for co-training (Sec. 3.1's multimodal data)
    bench: int = 200             # questions per demo benchmark TSV
    seed: int = 0
    image_size: int = 64         # small enough for a CPU demo, large enough to read the labels
    cameras: str = "overhead_camera"
    hold: int = 0                # expert steps recorded after success (the policy learns to stay done)
    noise: float = 0.0           # DART perturbation std of the executed xyz motion (0 = clean demos)
    miss: float = 0.0            # share of episodes whose first grasp misses and is retried (0 = clean demos)


TASKS = ("tabletop_pick", "tabletop_place", "tabletop_move_near")  # SimplerEnv's 7-DoF families
BIMANUAL = "tabletop_bimanual"   # two grippers, 14-D actions: the paper's real-robot setting
ALL_TASKS = TASKS + (BIMANUAL,)
MAX_STEPS = {"tabletop_pick": 24, "tabletop_place": 36, "tabletop_move_near": 36, BIMANUAL: 40}  # ~2x the expert's
CAMERAS = ("overhead_camera", "wrist_camera", "wrist_camera_1")  # wrist_camera_1: second arm
TRAIN_SEED_OFFSET = 1000
WORLD = 2            # the renders' version: a change rebuilds the pretrained tiny backbones (backbones.tiny_settings)

MAX_STEP = 0.12      # per-step xyz motion is clipped to this norm (table = unit square)
SPEED = 0.1          # the expert's constant speed: a reach takes ~5 steps, an episode 10-20
Z_HIGH, Z_LOW, Z_MAX = 0.2, 0.02, 0.3   # carrying height, grasping height, ceiling
GRASP_Z = 0.08       # the fingers reach an object at or below this height (long fingers: a learned descent is coarse)
GRASP_RADIUS = 0.07  # ... whose centre is this close (most of an object's radius: a policy's aim is coarse)
LIFT_Z = 0.15        # pick succeeds once the object is this high
AT_TOL = 0.02        # "above the object/goal" for the subtask bookkeeping
NEAR_TOL = 0.1       # below carrying height and this close: correct in place rather than go back up
NEAR_DIST, NEAR_GOAL, MOVED_TOL = 0.3, 0.2, 0.03   # move near (the receptacle): success, expert's goal; others still
N_GRASPABLE, N_RECEPTACLES = 1, 1   # per scene: the object to take (one per arm in the bimanual task), a plate or towel
HEIGHT_SCALE = 1.5   # top-down camera: things closer to it look bigger
SS = 4               # render at SS x the image size, then box-filter down (anti-aliasing)

TABLE = (165, 135, 100)   # one table colour and one light: held-out scenes differ in layout, not in look
COLORS = {"red": (200, 45, 40), "green": (50, 160, 70), "blue": (45, 80, 205),
          "yellow": (230, 200, 45), "purple": (135, 65, 165), "orange": (240, 135, 35),
          "white": (236, 236, 230)}
PAINTS = ("red", "green", "blue", "yellow", "purple")   # cans and blocks come in these
SIZES = {"can": 0.08, "block": 0.075, "carrot": 0.085, "eggplant": 0.08, "plate": 0.14, "towel": 0.14}
POOL = [("can", c) for c in PAINTS] + [("block", c) for c in PAINTS] + [("carrot", "orange"),
                                                                         ("eggplant", "purple")]
LETTERS, DIGITS = "ABCDEFGHJKLMNPRSTUVXYZ", "23456789"   # text printed on cans / blocks (OCR)
QA_STREAM, BENCH_STREAM, CAPTION_STREAM = 1, 2, 3   # separate random streams: benchmark scenes are held out


# ----------------------------------------------------------------------------- the world

def _name(kind, color):
    return f"{color} {kind}" if kind in ("can", "block") else kind


def _object(rng, kind, color):
    name = _name(kind, color)
    label = {"can": LETTERS, "block": DIGITS}.get(kind, "")
    return dict(name=name, kind=kind, color=color, rgb=COLORS[color], size=SIZES[kind],
                pos=None, z=0.0, angle=float(rng.uniform(0, np.pi)),
                label=str(rng.choice(list(label))) if label else "",
                graspable=kind not in ("plate", "towel"))


def _place_all(rng, objects):
    """Rejection-sample non-overlapping positions; False if the table is too crowded."""
    for o in objects:
        lo = 0.16 if o["graspable"] else 0.2
        for _ in range(100):
            p = rng.uniform(lo, 1 - lo, 2)
            if all(np.linalg.norm(p - q["pos"]) > o["size"] + q["size"] + 0.05
                   for q in objects if q["pos"] is not None):
                o["pos"] = p
                break
        else:
            return False
    return True


def _subtasks(kind, s, d):
    steps = [f"move to the {s}", f"reach down to the {s}", f"grasp the {s}", f"lift the {s}"]
    if kind == "place":
        steps += [f"carry the {s} to the {d}", f"lower the {s} onto the {d}", f"release the {s}"]
    if kind == "near":
        steps += [f"carry the {s} next to the {d}", f"lower the {s} next to the {d}", f"release the {s}"]
    return steps


def _job(objects, kind, src, dest=None, goal=None):
    d = objects[dest]["name"] if dest is not None else None
    return dict(kind=kind, src=src, dest=dest, goal=goal,
                subtasks=_subtasks(kind, objects[src]["name"], d))


def _near_goal(objects, s, t):
    """A free spot NEAR_GOAL from the target, on the side the source comes from."""
    base = np.arctan2(*(objects[s]["pos"] - objects[t]["pos"])[::-1])
    for k in (0, 1, -1, 2, -2, 3, -3, 4):
        g = objects[t]["pos"] + NEAR_GOAL * np.array([np.cos(base + k * np.pi / 4), np.sin(base + k * np.pi / 4)])
        if np.all((g > 0.08) & (g < 0.92)) and all(
                np.linalg.norm(g - o["pos"]) > o["size"] + 0.1 for i, o in enumerate(objects) if i not in (s, t)):
            return g
    return None


def sample_scene(rng, task):
    """Objects, grippers and the task's jobs (one per arm), all drawn from rng."""
    for _ in range(1000):
        objects = [_object(rng, k, "white" if k == "plate" else str(rng.choice(["blue", "green", "yellow"])))
                   for k in [str(k) for k in rng.permutation(["plate", "towel"])][:N_RECEPTACLES]]
        n_grasp = 2 if task == BIMANUAL else N_GRASPABLE
        picks = rng.choice(len(POOL), n_grasp, replace=False)
        if len({POOL[i][1] for i in picks}) < n_grasp:   # one colour each: the colour word alone grounds
            continue
        objects += [_object(rng, *POOL[i]) for i in picks]
        if not _place_all(rng, objects):
            continue
        grasp = [i for i, o in enumerate(objects) if o["graspable"]]
        recs = [i for i, o in enumerate(objects) if not o["graspable"]]
        if task == "tabletop_pick":
            jobs = [_job(objects, "pick", int(rng.choice(grasp)))]
        elif task == "tabletop_place":
            d = int(rng.choice(recs))
            jobs = [_job(objects, "place", int(rng.choice(grasp)), d, objects[d]["pos"].copy())]
        elif task == "tabletop_move_near":
            pairs = [(a, b) for a in grasp for b in recs
                     if np.linalg.norm(objects[a]["pos"] - objects[b]["pos"]) > 0.3]
            if not pairs:
                continue
            s, t = pairs[int(rng.integers(len(pairs)))]
            goal = _near_goal(objects, s, t)
            if goal is None:
                continue
            jobs = [_job(objects, "near", s, t, goal)]
        else:
            left = [i for i in grasp if objects[i]["pos"][0] < 0.45]
            right = [i for i in grasp if objects[i]["pos"][0] > 0.55]
            if not left or not right:
                continue
            jobs = [_job(objects, "pick", int(rng.choice(left))), _job(objects, "pick", int(rng.choice(right)))]
        break
    else:
        raise RuntimeError(f"{task}: no valid layout in 1000 draws")
    starts = [(rng.uniform(0.4, 0.6), 0.88)] if len(jobs) == 1 else [(rng.uniform(0.2, 0.3), 0.88),
                                                                     (rng.uniform(0.7, 0.8), 0.88)]
    arms = [dict(pos=np.array([x, y, Z_HIGH]), grip=1.0, held=None) for x, y in starts]
    return dict(objects=objects, arms=arms, jobs=jobs, instruction=_instruction(objects, jobs),
                start=[o["pos"].copy() for o in objects])


def _instruction(objects, jobs):
    """SimplerEnv-style wording; the target is named by colour and kind, so grounding matters."""
    n = [(objects[j["src"]]["name"], objects[j["dest"]]["name"] if j["dest"] is not None else None) for j in jobs]
    if len(jobs) == 2:
        return f"pick up the {n[0][0]} with the left gripper and the {n[1][0]} with the right gripper"
    kind = jobs[0]["kind"]
    return {"pick": f"pick up the {n[0][0]}", "place": f"put the {n[0][0]} on the {n[0][1]}",
            "near": f"move the {n[0][0]} near the {n[0][1]}"}[kind]


def job_done(scene, i):
    """SimplerEnv's success checks: lifted (pick), resting on the receptacle (place),
    resting beside the receptacle, not on it, with the other objects undisturbed (move near)."""
    job, arm = scene["jobs"][i], scene["arms"][i]
    src = scene["objects"][job["src"]]
    if job["kind"] == "pick":
        return arm["held"] == job["src"] and arm["pos"][2] >= LIFT_Z
    if any(a["held"] == job["src"] for a in scene["arms"]) or src["z"] > 0:
        return False
    dest = scene["objects"][job["dest"]]
    if job["kind"] == "place":
        return np.linalg.norm(src["pos"] - dest["pos"]) <= dest["size"] - 0.03
    still = all(np.linalg.norm(o["pos"] - p) <= MOVED_TOL
                for k, (o, p) in enumerate(zip(scene["objects"], scene["start"])) if k != job["src"])
    return bool(dest["size"] - 0.03 < np.linalg.norm(src["pos"] - dest["pos"]) <= NEAR_DIST and still)


def phase_of(scene, i):
    """Index of arm i's current subtask, read off the world state (len(subtasks) = done)."""
    job, arm = scene["jobs"][i], scene["arms"][i]
    if job_done(scene, i):
        return len(job["subtasks"])
    xy, z = arm["pos"][:2], arm["pos"][2]
    low = z < Z_HIGH - 1e-6
    if arm["held"] != job["src"]:
        d = np.linalg.norm(xy - scene["objects"][job["src"]]["pos"])
        if d > AT_TOL and not (low and d < NEAR_TOL):
            return 0
        return 1 if z > GRASP_Z or d > AT_TOL else 2
    if job["goal"] is None:
        return 3
    d = np.linalg.norm(xy - job["goal"])
    if d > AT_TOL and not (low and d < NEAR_TOL):
        return 3 if low else 4
    return 5 if z > GRASP_Z or d > AT_TOL else 6


def step_world(scene, action):
    """Apply one (7 x arms)-D action: clipped xyz motion, rotation ignored, absolute gripper target."""
    for arm, a in zip(scene["arms"], np.asarray(action, np.float64).reshape(-1, 7)):
        d = a[:3] * min(1.0, MAX_STEP / max(np.linalg.norm(a[:3]), 1e-12))
        arm["pos"] = np.clip(arm["pos"] + d, 0.0, [1.0, 1.0, Z_MAX])
        if arm["held"] is not None:
            held = scene["objects"][arm["held"]]
            held["pos"], held["z"] = arm["pos"][:2].copy(), float(arm["pos"][2])
        grip = 1.0 if a[6] > 0.5 else 0.0
        if arm["grip"] == 1.0 and grip == 0.0 and arm["pos"][2] <= GRASP_Z:
            taken = {b["held"] for b in scene["arms"]}
            near = [(np.linalg.norm(o["pos"] - arm["pos"][:2]), k) for k, o in enumerate(scene["objects"])
                    if o["graspable"] and k not in taken and o["z"] == 0]
            near = [c for c in near if c[0] < GRASP_RADIUS]
            arm["held"] = min(near)[1] if near else None
        if arm["grip"] == 0.0 and grip == 1.0 and arm["held"] is not None:
            scene["objects"][arm["held"]]["z"] = 0.0   # dropped where it is
            arm["held"] = None
        arm["grip"] = grip


# ----------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=32)
def _font(px):
    return ImageFont.load_default(size=max(px, 6))


def _draw_object(dr, o, S):
    x, y = o["pos"] * S
    r = o["size"] * S * (1 + HEIGHT_SCALE * o["z"])
    dark = tuple(int(v * 0.6) for v in o["rgb"])
    u, v = np.array([np.cos(o["angle"]), np.sin(o["angle"])]), np.array([-np.sin(o["angle"]), np.cos(o["angle"])])
    c = np.array([x, y])
    if o["kind"] == "plate":
        dr.ellipse([x - r, y - r, x + r, y + r], fill=o["rgb"], outline=(150, 150, 150), width=max(1, S // 64))
        dr.ellipse([x - 0.7 * r, y - 0.7 * r, x + 0.7 * r, y + 0.7 * r], outline=(200, 200, 200), width=max(1, S // 128))
    elif o["kind"] == "towel":
        dr.rectangle([x - r, y - r, x + r, y + r], fill=o["rgb"])
        for f in (-0.5, 0.5):
            dr.line([x - r, y + f * r, x + r, y + f * r], fill=dark, width=max(1, S // 100))
    elif o["kind"] in ("can", "block"):
        box = [x - r, y - r, x + r, y + r]
        (dr.ellipse if o["kind"] == "can" else dr.rectangle)(box, fill=o["rgb"], outline=dark, width=max(1, S // 64))
        ink = (20, 20, 20) if sum(o["rgb"]) > 450 else (245, 245, 245)
        dr.text((x, y), o["label"], fill=ink, font=_font(int(r * 1.3)), anchor="mm")
    elif o["kind"] == "carrot":
        pts = [c + r * u, c - r * u + 0.45 * r * v, c - r * u - 0.45 * r * v]
        dr.polygon([tuple(p) for p in pts], fill=o["rgb"], outline=dark)
        dr.polygon([tuple(p) for p in (c - r * u, c - 1.4 * r * u + 0.3 * r * v, c - 1.4 * r * u - 0.3 * r * v)],
                   fill=(60, 150, 50))
    else:   # eggplant: an ellipse along its axis with a green cap
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pts = c + np.outer(np.cos(t), r * u) + np.outer(np.sin(t), 0.55 * r * v)
        dr.polygon([tuple(p) for p in pts], fill=o["rgb"], outline=dark)
        cap = c + 0.85 * r * u
        dr.ellipse([cap[0] - 0.3 * r, cap[1] - 0.3 * r, cap[0] + 0.3 * r, cap[1] + 0.3 * r], fill=(60, 150, 50))


def _draw_gripper(dr, arm, S, k):
    """Top view of a parallel gripper: two fingers (apart when open) and a palm toward the robot."""
    x, y = arm["pos"][:2] * S
    s = S * (1 + HEIGHT_SCALE * arm["pos"][2])
    gap = (0.05 if arm["grip"] > 0.5 else 0.022) * s
    w, h = 0.018 * s, 0.05 * s
    col = ((55, 55, 65), (35, 35, 110))[k]
    for sx in (-1, 1):
        cx = x + sx * gap
        dr.rectangle([cx - w / 2, y - h / 2, cx + w / 2, y + h / 2], fill=col)
    dr.rectangle([x - gap - w / 2, y + h / 2, x + gap + w / 2, y + h / 2 + w], fill=col)
    dr.rectangle([x - w / 3, y + h / 2 + w, x + w / 3, y + h / 2 + 3 * w], fill=col)


def render(scene, image_size=64, cameras=("overhead_camera",)):
    """Camera name -> uint8 (H, W, 3). A wrist camera is a crop around its gripper (wider when higher)."""
    if not cameras:
        return {}
    S = image_size * SS
    resting = [(k, o) for k, o in enumerate(scene["objects"]) if o["z"] == 0]
    key = (S,) + tuple((k, *o["pos"]) for k, o in resting)
    if scene.get("canvas", (None,))[0] != key:   # the table redrawn only when something on it moved
        img = Image.new("RGB", (S, S), TABLE)
        dr = ImageDraw.Draw(img)
        for _, o in sorted(resting, key=lambda ko: ko[1]["graspable"]):
            _draw_object(dr, o, S)
        scene["canvas"] = (key, img)
    img = scene["canvas"][1].copy()
    dr = ImageDraw.Draw(img)
    for o in sorted((o for o in scene["objects"] if o["z"] > 0), key=lambda o: o["z"]):
        _draw_object(dr, o, S)
    for k, arm in enumerate(scene["arms"]):
        _draw_gripper(dr, arm, S, k)
    out = {}
    for cam in cameras:
        if cam == "overhead_camera":
            view = img.reduce(SS)
        else:
            x, y, z = scene["arms"][1 if cam.endswith("_1") else 0]["pos"]
            half = (0.125 + 0.5 * z) * S   # a window of 0.25 + z table widths
            view = img.crop((int(x * S - half), int(y * S - half), int(x * S + half), int(y * S + half)))
            view = view.resize((image_size, image_size), Image.BOX)
        out[cam] = np.asarray(view, np.uint8)
    return out


# ----------------------------------------------------------------------------- the env

class TabletopEnv:
    """SimplerEnv's interface on the 2-D world: reset() -> (obs, info); step(action) ->
    (obs, reward, success, truncated, info); obs["image"][camera]["rgb"] is uint8 (H, W, 3),
    obs["state"] the (7 x arms,) end-effector state; info has "progress" and "subtask"."""

    def __init__(self, task_name, seed, image_size, max_steps, cameras):
        self.task_name, self.seed, self.image_size = task_name, int(seed), image_size
        self.max_steps = max_steps or MAX_STEPS[task_name]
        self.camera_names = list(cameras)
        self.n_arms = 2 if task_name == BIMANUAL else 1
        self.action_dim = 7 * self.n_arms
        self.reset()

    def reset(self, seed=None, options=None):
        """Re-draw the scene from the seed (the same seed gives the same scene); options ignored."""
        if seed is not None:
            self.seed = int(seed)
        self.scene = sample_scene(np.random.default_rng(self.seed), self.task_name)
        self.elapsed = 0
        return self.get_obs(), self.get_info()

    def get_language_instruction(self):
        return self.scene["instruction"]

    def get_state(self):
        """(x, y, z, roll, pitch, yaw, gripper) per arm; the gripper never rotates here."""
        return np.concatenate([np.r_[a["pos"], 0.0, 0.0, 0.0, a["grip"]] for a in self.scene["arms"]]).astype(np.float32)

    def get_obs(self):
        images = render(self.scene, self.image_size, self.camera_names)
        return {"image": {c: {"rgb": images[c]} for c in self.camera_names}, "state": self.get_state()}

    def get_info(self):
        phases = [phase_of(self.scene, i) for i in range(self.n_arms)]
        jobs = self.scene["jobs"]
        names = [j["subtasks"][p] if p < len(j["subtasks"]) else "done" for j, p in zip(jobs, phases)]
        return dict(progress=float(np.mean([p / len(j["subtasks"]) for j, p in zip(jobs, phases)])),
                    subtask=_per_arm(names), phase=int(sum(phases)), elapsed_steps=self.elapsed,
                    success=self.success())

    def success(self):
        return all(job_done(self.scene, i) for i in range(self.n_arms))

    def step(self, action):
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != (self.action_dim,) or not np.all(np.isfinite(a)):
            raise ValueError(f"{self.task_name}: expected a finite action of length {self.action_dim} "
                             f"(7 per arm: dx, dy, dz, rotation axis-angle, gripper), got shape {a.shape}")
        step_world(self.scene, a)
        self.elapsed += 1
        info = self.get_info()
        return self.get_obs(), float(info["success"]), info["success"], self.elapsed >= self.max_steps, info


def make(task_name, seed=0, image_size=64, max_steps=None, cameras=("overhead_camera",)):
    """An env for one of ALL_TASKS; cameras=() skips rendering (state-only rollouts)."""
    if task_name not in ALL_TASKS:
        raise ValueError(f"unknown tabletop task {task_name!r}; valid names: {', '.join(ALL_TASKS)}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"{task_name}: image_size must be an integer >= 16, got {image_size!r}")
    valid = CAMERAS if task_name == BIMANUAL else CAMERAS[:2]
    bad = [c for c in cameras if c not in valid]
    if bad or len(set(cameras)) != len(cameras):
        raise ValueError(f"{task_name}: bad camera list {list(cameras)}; valid names: {', '.join(valid)}")
    return TabletopEnv(task_name, seed, image_size, max_steps, cameras)


def _per_arm(texts):
    return texts[0] if len(texts) == 1 else "; ".join(f"{s}: {t}" for s, t in zip(("left", "right"), texts))


# ----------------------------------------------------------------------------- the expert

def _toward(pos, goal):
    """Constant-speed motion toward goal, the last step exactly onto it."""
    d = np.asarray(goal, np.float64) - pos
    n = np.linalg.norm(d)
    return d if n <= SPEED else d / n * SPEED


def _arm_action(scene, i):
    arm, job = scene["arms"][i], scene["jobs"][i]
    p, pos = phase_of(scene, i), arm["pos"]
    src = scene["objects"][job["src"]]["pos"]
    move, grip = np.zeros(3), arm["grip"]
    if p in (0, 1):
        move, grip = _toward(pos, [*src, (Z_HIGH, Z_LOW)[p]]), 1.0
    elif p == 2:   # a closed empty gripper must open before it can grasp
        grip = 0.0 if arm["grip"] > 0.5 else 1.0
    elif p == 3:
        move, grip = _toward(pos, [pos[0], pos[1], Z_HIGH]), 0.0
    elif p in (4, 5) and p < len(job["subtasks"]):
        move, grip = _toward(pos, [*job["goal"], (Z_HIGH, Z_LOW)[p - 4]]), 0.0
    elif p == 6:
        grip = 1.0
    elif p == len(job["subtasks"]) and job["goal"] is not None:   # released: back up, clear of what it placed
        move, grip = _toward(pos, [pos[0], pos[1], Z_HIGH]), 1.0
    return np.r_[move, 0.0, 0.0, 0.0, grip]


def expert_action(env):
    """Privileged closed-loop scripted expert: each arm heads at constant speed for its current
    subgoal (read off the world state), so velocity is constant within a subtask."""
    return np.concatenate([_arm_action(env.scene, i) for i in range(env.n_arms)]).astype(np.float32)


def _move_words(a, grip_before):
    """ECoT's move primitives from one arm's action ("move left forward", "close gripper", "stop")."""
    d = a[:3] / max(np.linalg.norm(a[:3]), 1e-12)
    words = [w for v, (neg, pos) in zip(d, (("left", "right"), ("forward", "backward"), ("down", "up")))
             for w in ([neg] if v < -0.25 else [pos] if v > 0.25 else [])]
    parts = ["move " + " ".join(words)] if words else []
    if (a[6] > 0.5) != (grip_before > 0.5):
        parts.append("open gripper" if a[6] > 0.5 else "close gripper")
    return ", ".join(parts) or "stop"


RELATION = {"left": "left of", "right": "right of", "forward": "in front of", "backward": "behind",
            "down": "below", "up": "above"}
WHY = ["the {s} is not in the gripper yet, so the gripper first goes above it",
       "the gripper is right above the {s} and must go down to reach it",
       "the {s} is between the open fingers, so closing them grasps it",
       "the {s} is grasped and must be raised before it can be carried",
       "the {s} is held high and must be brought to the {d}",
       "the {s} is above its goal and must come down onto the table",
       "the {s} is at its goal, so the gripper lets it go"]


def _arm_reasoning(scene, i, a, size):
    arm, job = scene["arms"][i], scene["jobs"][i]
    p, n = phase_of(scene, i), len(job["subtasks"])
    s = scene["objects"][job["src"]]["name"]
    d = scene["objects"][job["dest"]]["name"] if job["dest"] is not None else ""
    why = ("the task is complete" if p == n else
           f"the {s} is grasped; lifting it completes the task" if p == 3 and job["kind"] == "pick" else
           WHY[p].format(s=s, d=d if job["kind"] == "place" else f"spot next to the {d}"))
    move = _move_words(a, arm["grip"])
    if move.startswith("move"):
        noun = {0: f"the {s}", 1: f"the {s}", 3: "the carrying height", 5: "the table",
                n: "the carrying height"}.get(p, "the goal")
        rel = " and ".join(RELATION[w] for w in move.split(",")[0].split()[1:])
        move_why = f"{noun} is {rel} the gripper"
    else:
        move_why = {"close gripper": f"the fingers are around the {s}", "stop": "nothing is left to do",
                    "open gripper": f"the {s} has reached its goal" if p == 6 else "the gripper must be empty"}[move]
    return dict(plan=", ".join(job["subtasks"]), why=why, subtask=job["subtasks"][p] if p < n else "done",
                move_why=move_why, move=move,
                gripper=[int(round(v * size)) for v in arm["pos"][:2]])


def _sentence(text):
    return text[:1].upper() + text[1:] + "."


def step_reasoning(env, action):
    """ECoT-style tags for the current frame. All tags but VISIBLE OBJECTS and GRIPPER POSITION are
    constant within a subtask — the low-entropy redundancy the paper prunes (Sec. 3.2.1)."""
    W = env.image_size
    parts = [_arm_reasoning(env.scene, i, action[7 * i:7 * i + 7], W) for i in range(env.n_arms)]
    boxes = []
    for o in env.scene["objects"]:
        r = o["size"] * (1 + HEIGHT_SCALE * o["z"])
        x, y = o["pos"]
        boxes.append(f"{o['name']} " + str([min(max(round(v * W), 0), W - 1) for v in (x - r, y - r, x + r, y + r)]))
    return {"TASK": _sentence(env.get_language_instruction()),
            "PLAN": _sentence(_per_arm([p["plan"] for p in parts])),
            "VISIBLE OBJECTS": ", ".join(boxes),
            "SUBTASK REASONING": _sentence(_per_arm([p["why"] for p in parts])),
            "SUBTASK": _sentence(_per_arm([p["subtask"] for p in parts])),
            "MOVE REASONING": _sentence(_per_arm([p["move_why"] for p in parts])),
            "MOVE": _sentence(_per_arm([p["move"] for p in parts])),
            "GRIPPER POSITION": ", ".join(str(p["gripper"]) for p in parts)}


def expert_episode(task_name, seed, image_size=64, cameras=("overhead_camera",), hold=0, noise=0.0, miss=0.0):
    """One expert demonstration: dict(id, instruction, robot, task, steps=[dict(image, state, action,
    reasoning, phase)]); image is a list when there are several cameras, phase the ground-truth
    subtask index (summed over the arms of the bimanual task). It ends on the step that succeeds, or
    `hold` steps later (the expert backs up to the carrying height after a release, then keeps still:
    SimplerEnv reads success at the last step, so a policy must also learn to stay done). noise > 0:
    DART-style perturbations (Laskey et al., 2017): on 30 % of the steps the executed xyz motion gets
    N(0, noise²) per axis added while the recorded action stays the expert's, so the demonstrations show
    recoveries from off-path states. miss: the share of episodes whose
    first grasp misses: the arm slips 1.3 GRASP_RADIUS sideways as the fingers close, so the demonstration
    shows a closed, empty gripper beside the object (where a policy's coarse aim leaves it) and the expert
    reopening, sliding back and grasping again. An episode whose perturbed run does not finish in time is
    recorded unperturbed."""
    if not cameras:
        raise ValueError(f"expert_episode({task_name!r}): needs at least one camera")
    env = make(task_name, seed, image_size, cameras=cameras)
    rng = np.random.default_rng([seed, 1])   # its own stream: the scene is drawn from seed alone
    obs, info = env.reset()
    steps = []

    def record(action):
        imgs = [Image.fromarray(obs["image"][c]["rgb"]) for c in env.camera_names]
        steps.append(dict(image=imgs[0] if len(imgs) == 1 else imgs, state=obs["state"], action=action,
                          reasoning=step_reasoning(env, action), phase=info["phase"]))

    slip = [bool(miss) and rng.random() < miss for _ in range(env.n_arms)]
    for _ in range(env.max_steps):
        action = expert_action(env)
        record(action)
        executed = action.copy()
        if noise and rng.random() < 0.3:
            for i in range(env.n_arms):
                executed[7 * i:7 * i + 3] += rng.normal(0, noise, 3)
        for i, arm in enumerate(env.scene["arms"]):
            if slip[i] and arm["grip"] > 0.5 and action[7 * i + 6] <= 0.5:   # the first close of arm i
                angle = rng.uniform(0, 2 * np.pi)
                executed[7 * i:7 * i + 2] = 1.3 * GRASP_RADIUS * np.array([np.cos(angle), np.sin(angle)])
                slip[i] = False
        obs, _, success, _, info = env.step(executed)
        if success:
            break
    else:
        if noise or miss:
            return expert_episode(task_name, seed, image_size, cameras, hold)
        raise RuntimeError(f"expert failed on {task_name} seed {seed}")
    for _ in range(hold):   # the expert backs up or keeps still, and the task stays done
        action = expert_action(env)
        record(action)
        obs, _, _, _, info = env.step(action)
    return dict(id=f"{task_name}_{seed:05d}", instruction=env.get_language_instruction(), robot="tabletop",
                task=task_name, steps=steps)


# ----------------------------------------------------------------------------- multimodal data

QA_KINDS = ("colour", "count", "position", "closest", "ocr")
L2 = {"colour": "coarse_perception", "count": "coarse_perception", "ocr": "fine-grained_perception",
      "position": "relation_reasoning", "closest": "relation_reasoning"}
NAMES = [_name(*kc) for kc in POOL] + ["plate", "towel"]   # every object a question may name
DIRECTIONS = ("left", "right", "above", "below")
# Each kind's question forms and their answer sets. The answer is drawn uniformly from its form's set
# BEFORE the scene, so the question text alone scores chance (FACTS.md measured 48.5 / 59 / 32 % from the
# text of unbalanced questions: "how many objects" was usually 5, "is there a plate" usually yes).
QA_FORMS = {"colour": {"can": PAINTS, "block": PAINTS}, "count": {"can": "0123", "block": "0123", "object": "23456"},
            "position": {"": DIRECTIONS}, "closest": {"": tuple(NAMES)}, "ocr": {"can": LETTERS, "block": DIGITS}}
YN_FORMS = ("presence", "position", "gripper", "ocr")
BENCH = ("TabletopMCQ", "TabletopYN", "TabletopVQA")


def qa_scene(rng):
    """A scene to ask about: a task scene's receptacles (some of them) with 1-5 of POOL's
    objects, so that every count of QA_FORMS is common; the gripper somewhere above the table."""
    scene = sample_scene(rng, TASKS[int(rng.integers(len(TASKS)))])
    recs = [o for o in scene["objects"] if not o["graspable"]]
    while True:
        objects = [recs[k] for k in rng.permutation(len(recs))[:int(rng.integers(len(recs) + 1))]]
        objects += [_object(rng, *POOL[i]) for i in rng.choice(len(POOL), int(rng.integers(1, 6)), replace=False)]
        for o in objects:
            o["pos"] = None
        if _place_all(rng, objects):
            break
    scene.update(objects=objects, jobs=[], start=[o["pos"].copy() for o in objects], instruction="")
    scene["arms"][0].update(pos=np.r_[rng.uniform(0.1, 0.9, 2), rng.uniform(Z_LOW, Z_HIGH)],
                            grip=float(rng.integers(2)))
    return scene


def _a(name):
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _pairs(objs, rel):
    """Ordered pairs (a, b) of distinct objects where a is `rel` of b: that direction dominates, by 0.12 or more."""
    out = []
    for a in objs:
        for b in objs:
            dx, dy = a["pos"] - b["pos"]
            if a is not b and max(abs(dx), abs(dy)) >= 0.12:
                out += [(a, b)] * (rel == (("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else
                                            ("above" if dy < 0 else "below")))
    return out


def ask(rng, scene, kind, form, answer):
    """A question of `kind` and `form` (QA_FORMS) whose answer about `scene` is `answer`, or None if this scene
    cannot have one. "closest" moves the gripper next to the answer and "ocr" prints the answer on an object
    (both drawn uniformly anyway), so those apply to any scene holding the object."""
    objs = scene["objects"]
    if kind == "colour":
        kinds, tags = [o["kind"] for o in objs], [(o["kind"], o["label"]) for o in objs]
        forms = [f"What colour is the {form}?" for o in objs
                 if o["kind"] == form and o["color"] == answer and kinds.count(form) == 1]
        forms += [f"What colour is the {form} with '{o['label']}' written on it?" for o in objs
                  if o["kind"] == form and o["color"] == answer and tags.count((form, o["label"])) == 1]
        return str(rng.choice(forms)) if forms else None
    if kind == "count":
        n = sum(form in ("object", o["kind"]) for o in objs)
        return f"How many {form}s are on the table?" if str(n) == answer else None
    if kind == "position":
        pairs = _pairs(objs, answer)
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"Where is the {a['name']} relative to the {b['name']} in the image: left, right, above or below?"
    if kind == "closest":
        o = [o for o in objs if o["name"] == answer]
        if not o:
            return None
        arm = scene["arms"][0]
        arm["pos"][:2] = np.clip(o[0]["pos"] + rng.uniform(-0.04, 0.04, 2), 0.05, 0.95)
        d = sorted(np.linalg.norm(p["pos"] - arm["pos"][:2]) for p in objs)
        return "Which object is closest to the gripper?" if len(d) == 1 or d[1] - d[0] >= 0.05 else None
    names = [o["name"] for o in objs]
    labelled = [o for o in objs if o["kind"] == form and names.count(o["name"]) == 1]
    if not labelled:
        return None
    o = labelled[int(rng.integers(len(labelled)))]
    o["label"] = answer
    return f"What is written on the {o['name']}?"


def ask_yes_no(rng, scene, form, yes):
    """A yes/no question of `form` (YN_FORMS) whose answer about `scene` is `yes`, or None (MME-style)."""
    objs, arm = scene["objects"], scene["arms"][0]
    if form == "presence":
        name = NAMES[int(rng.integers(len(NAMES)))]
        return f"Is there {_a(name)} on the table?" if (name in [o["name"] for o in objs]) == yes else None
    if form == "position":
        pairs = _pairs(objs, "left" if yes else "right")
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"Is the {a['name']} to the left of the {b['name']}?"
    if form == "gripper":
        return f"Is the gripper {'open' if (arm['grip'] > 0.5) == yes else 'closed'}?"
    labelled = [o for o in objs if o["label"]]
    if not labelled:
        return None
    o = labelled[int(rng.integers(len(labelled)))]
    pool = LETTERS if o["kind"] == "can" else DIGITS
    text = o["label"] if yes else str(rng.choice([c for c in pool if c != o["label"]]))
    return f"Is the text '{text}' written on the {o['name']}?"


def _until(rng, question):
    """(scene, question(scene)) for the first scene drawn for which `question` gives one."""
    for _ in range(2000):
        scene = qa_scene(rng)
        q = question(scene)
        if q:
            return scene, q
    raise RuntimeError("no scene in 2000 draws has an answer the question needs: QA_FORMS asks for more than "
                       "qa_scene makes")


def _pose(rng, kind):
    """A form of `kind` and its answer, drawn uniformly: before any scene."""
    forms = list(QA_FORMS[kind])
    form = forms[int(rng.integers(len(forms)))]
    answers = QA_FORMS[kind][form]
    return form, str(answers[int(rng.integers(len(answers)))]), answers


def _mcq(rng, i):
    """An MMBench-style row: options drawn uniformly from the form's answer set, their order shuffled."""
    kind = QA_KINDS[i % len(QA_KINDS)]
    form, answer, answers = _pose(rng, kind)
    scene, q = _until(rng, lambda s: ask(rng, s, kind, form, answer))
    options = [answer] + [str(x) for x in rng.choice([a for a in answers if a != answer], 3, replace=False)]
    options = [options[k] for k in rng.permutation(4)]
    return scene, dict(question=q, hint="", **dict(zip("ABCD", options)), answer="ABCD"[options.index(answer)],
                       category=kind, **{"l2-category": L2[kind]}, split="dev"), 4


def _yes_no(rng, i):
    """An MME-style row: yes on even rows, and each form equally often with either answer."""
    form, yes = YN_FORMS[i // 2 % len(YN_FORMS)], i % 2 == 0
    scene, q = _until(rng, lambda s: ask_yes_no(rng, s, form, yes))
    return scene, dict(question=q + " Please answer yes or no.", answer="Yes" if yes else "No", category=form), 2


def _vqa(rng, i):
    """A TextVQA-style row (10 copies of the one answer: VQA accuracy then scores an exact answer 1)."""
    kind = QA_KINDS[i % len(QA_KINDS)]
    form, answer, answers = _pose(rng, kind)
    scene, q = _until(rng, lambda s: ask(rng, s, kind, form, answer))
    return scene, dict(question=q, answer=str([answer] * 10), category=kind), len(answers)


def bench_rows(name, n, seed=0):
    """[(scene, row without its image, uniform chance of the row)] of benchmark `name` (BENCH), in order."""
    k = BENCH.index(name)
    rng = np.random.default_rng([BENCH_STREAM, seed, k])
    return [(s, row, 1 / m) for s, row, m in (((_mcq, _yes_no, _vqa)[k])(rng, i) for i in range(n))]


def qa_samples(seed, n, image_size=64):
    """n LLaVA-style mm records (image, prompt, short answer) in the demo benchmarks' prompt formats, in turn
    open (VQA), multiple choice (MCQ) and yes/no, drawn like the benchmarks but from their own stream."""
    from benchmarks import mm_prompt
    rng, out = np.random.default_rng([QA_STREAM, seed]), []
    for i in range(n):
        fmt = ("vqa", "mcq", "yn")[i % 3]
        scene, row, _ = {"vqa": _vqa, "mcq": _mcq, "yn": _yes_no}[fmt](rng, i // 3)
        options = {c: row[c] for c in "ABCD" if c in row}
        answer = ast.literal_eval(row["answer"])[0] if fmt == "vqa" else row["answer"]
        img = Image.fromarray(render(scene, image_size)["overhead_camera"])
        out.append(dict(image=img, instruction=mm_prompt(dict(row, options=options), fmt), state=None, action=None,
                        reasoning=answer, domain="mm", scene=layout(scene)))
    return out


def layout(scene):
    """What is where: [(x, y, colour, kind)] of the objects, topmost last, then (x, y, "gripper") — the dense
    targets of the tiny backbone's pretraining (backbones.pretrain_tiny)."""
    objs = sorted(scene["objects"], key=lambda o: (o["z"], o["graspable"]))
    return [(*o["pos"], o["color"], o["kind"]) for o in objs] + [(*scene["arms"][0]["pos"][:2], "", "gripper")]


def _where(xy):
    """Coarse position words on a 3 x 3 grid of the image: "at the top left", "in the centre"."""
    row = ("top", "middle", "bottom")[min(int(xy[1] * 3), 2)]
    col = ("left", "centre", "right")[min(int(xy[0] * 3), 2)]
    return "in the centre" if (row, col) == ("middle", "centre") else f"at the {row} {col}"


CAPTION_PROMPT = "Describe the table: every object, where it is, and the gripper."


def caption(scene):
    """A dense caption, objects in reading order: "a plate at the middle left, a red can at the top right with
    'K' on it, ..., the gripper is open in the centre". It names what the image shows and no question can be
    answered without it: pretraining on captions is what taught the tiny model to look (FACTS.md)."""
    objs = sorted(scene["objects"], key=lambda o: (min(int(o["pos"][1] * 3), 2), o["pos"][0]))
    parts = [f"{_a(o['name'])} {_where(o['pos'])}" + (f" with '{o['label']}' on it" if o["label"] else "")
             for o in objs]
    arm = scene["arms"][0]
    return ", ".join(parts + [f"the gripper is {'open' if arm['grip'] > 0.5 else 'closed'} {_where(arm['pos'])}"])


def caption_samples(seed, n, image_size=64):
    """n LLaVA-style mm records (image, CAPTION_PROMPT, caption) of fresh QA scenes."""
    rng, out = np.random.default_rng([CAPTION_STREAM, seed]), []
    for _ in range(n):
        scene = qa_scene(rng)
        out.append(dict(image=Image.fromarray(render(scene, image_size)["overhead_camera"]), instruction=CAPTION_PROMPT,
                        state=None, action=None, reasoning=caption(scene), domain="mm", scene=layout(scene)))
    return out


def _template(question):
    """The question with its object names and quoted text blanked: what a text-only guesser falls back on."""
    for name in sorted(NAMES, key=len, reverse=True):
        question = question.replace(name, "X")
    return re.sub(r"'[^']*'", "'X'", question)


def bench_baselines(n=1000, seed=0, image_size=64):
    """{benchmark: {"chance": uniform chance, "text_only": accuracy}} for the first n rows of each demo benchmark
    that write_benchmarks(n=n, seed=seed) writes. text_only answers from the question text alone (options too):
    the answer most often right for the same question on n rows of another seed, else for the same question
    with the names blanked, else overall; scored with the benchmarks' own scoring (benchmarks.score_row).
    image_size: accepted as write_benchmarks takes it; no image is read."""
    from benchmarks import BENCHMARKS, score_row
    out = {}
    for name in BENCH:
        kind, metric, _ = BENCHMARKS[name]
        counts = {}
        for _, row, _ in bench_rows(name, n, seed + 7919):
            truth = row[row["answer"]] if kind == "mcq" else row["answer"] if kind == "yn" else \
                ast.literal_eval(row["answer"])[0]
            for key in (row["question"], _template(row["question"]), ""):
                counts.setdefault(key, {}).setdefault(truth, 0)
                counts[key][truth] += 1
        hits, chance = [], []
        for _, row, p in bench_rows(name, n, seed):
            keys = [counts.get(k, {}) for k in (row["question"], _template(row["question"]), "")]
            if kind == "mcq":
                options = {c: row[c] for c in "ABCD"}
                guess = max(options, key=lambda c: tuple(k.get(options[c], 0) for k in keys))
                row = dict(row, options=options)
            else:
                seen = next(k for k in keys if k)
                guess = max(seen, key=seen.get)
            hits.append(score_row(row, guess, metric)["hit"])
            chance.append(p)
        out[name] = dict(chance=float(np.mean(chance)), text_only=float(np.mean(hits)))
    return out


def _b64png(scene, image_size):
    buf = io.BytesIO()
    Image.fromarray(render(scene, image_size)["overhead_camera"]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _write_tsv(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_benchmarks(out_dir, n=200, seed=0, image_size=64):
    """Demo benchmarks as VLMEvalKit TSVs from held-out scenes: TabletopMCQ (MMBench columns),
    TabletopYN (MME: Yes/No) and TabletopVQA (TextVQA: answer is a list string of 10 answers)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in BENCH:
        rows = [dict(index=i, image=_b64png(scene, image_size), **row)
                for i, (scene, row, _) in enumerate(bench_rows(name, n, seed))]
        paths.append(os.path.join(out_dir, f"{name}.tsv"))
        _write_tsv(paths[-1], rows)
    return paths


# ----------------------------------------------------------------------------- the demo data set

def write_demo(out, n_episodes=100, n_qa=3000, n_bench=200, seed=0, image_size=64,
               cameras=("overhead_camera",), bimanual_episodes=0, hold=0, noise=0.0, miss=0.0):
    """Everything the demo trains and evaluates on, under out/:
    episodes.jsonl + images/ (expert episodes of each of TASKS, env seeds >= TRAIN_SEED_OFFSET),
    bimanual/ (14-DoF episodes, its own folder: one action width per folder), mm.json + mm_images/
    (LLaVA-format QA) and LMUData/Tabletop{MCQ,YN,VQA}.tsv (held-out demo benchmarks)."""
    first = TRAIN_SEED_OFFSET + seed * 100_000
    episodes = [expert_episode(t, first + j, image_size, cameras, hold, noise, miss)
                for t in TASKS for j in range(n_episodes)]
    data.write_episodes(episodes, out)
    counts = dict(episodes=len(episodes), frames=sum(len(e["steps"]) for e in episodes))
    if bimanual_episodes:
        bimanual = [expert_episode(BIMANUAL, first + j, image_size, cameras, hold, noise, miss)
                    for j in range(bimanual_episodes)]
        data.write_episodes(bimanual, os.path.join(out, "bimanual"))
        counts.update(bimanual_episodes=len(bimanual), bimanual_frames=sum(len(e["steps"]) for e in bimanual))
    data.write_llava(qa_samples(seed, n_qa, image_size), os.path.join(out, "mm.json"), os.path.join(out, "mm_images"))
    write_benchmarks(os.path.join(out, "LMUData"), n_bench, seed, image_size)
    return dict(counts, qa=n_qa, bench_per_tsv=n_bench)


def main(argv=None):
    d = DemoConfig()
    p = argparse.ArgumentParser(description="Write the tabletop demo data: expert episodes with ECoT-style "
                                "reasoning, LLaVA-format QA and VLMEvalKit demo benchmarks.")
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--episodes", type=int, default=d.episodes, help=f"expert episodes per task of {', '.join(TASKS)}")
    p.add_argument("--bimanual-episodes", type=int, default=d.bimanual_episodes,
                   help="14-DoF two-gripper episodes, written to OUT/bimanual/ (default %(default)s)")
    p.add_argument("--qa", type=int, default=d.qa, help="LLaVA-format question-answer pairs (default %(default)s)")
    p.add_argument("--bench", type=int, default=d.bench, help="questions per benchmark TSV (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="data seed (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    p.add_argument("--hold", type=int, default=d.hold, help="expert steps recorded after success (default %(default)s)")
    p.add_argument("--noise", type=float, default=d.noise, help="DART perturbation std of the executed xyz motion, "
                   "table units (default %(default)s: clean demonstrations)")
    p.add_argument("--miss", type=float, default=d.miss, help="share of episodes whose first grasp misses and the "
                   "expert retries (default %(default)s)")
    p.add_argument("--cameras", default=d.cameras, help="comma-separated: overhead_camera, wrist_camera (a crop around the "
                   "gripper); default %(default)s")
    a = p.parse_args(argv)
    try:
        cameras = tuple(c.strip() for c in a.cameras.split(",") if c.strip())
        for flag in ("episodes", "bimanual_episodes", "qa", "bench", "hold"):
            if getattr(a, flag) < (flag == "bench"):
                raise ValueError(f"--{flag.replace('_', '-')} must be >= {int(flag == 'bench')}, got {getattr(a, flag)}")
        if not 0 <= a.noise < MAX_STEP:
            raise ValueError(f"--noise must be in [0, {MAX_STEP}), got {a.noise}")
        if not 0 <= a.miss <= 1:
            raise ValueError(f"--miss must be in [0, 1], got {a.miss}")
        make(TASKS[0], cameras=cameras, image_size=a.image_size)   # checks the camera names and the size
        t0, c0 = time.perf_counter(), time.process_time()
        counts = write_demo(a.out, a.episodes, a.qa, a.bench, a.seed, a.image_size, cameras, a.bimanual_episodes,
                            a.hold, a.noise, a.miss)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out}: {json.dumps(counts)} in {time.perf_counter() - t0:.1f} s "
          f"({time.process_time() - c0:.1f} s CPU)")


if __name__ == "__main__":
    main()
