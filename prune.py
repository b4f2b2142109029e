"""Dual-layer data pruning (DualVLA Sec. 3.2.1; NOTES.md §2).

Each frame of a robot episode gets two binary labels:
  - scene layer: an event-boundary detector fires where the scene changes (the "reasoning trigger");
  - kinematic layer: the end-effector acceleration is above the episode mean, or the gripper flips.
Reasoning text is KEPT only where both fire and set to None elsewhere. Frames are never deleted:
a masked frame still trains the action, just without reasoning.

    python prune.py --data runs/demo/episodes --mode both --out runs/demo/pruned
    python prune.py train-detector --data EPISODE_DIR --labels labels.jsonl --out detector.pt
    python prune.py run --data DIR --out DIR2 --detector detector.pt

Modes are the rows of the paper's pruning ablation (Table 7): both, scene, kinematic, random, none.
"""
import argparse
import contextlib
import json
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from data import DataError, reasoning_text
from model import UserError

MODES = ("both", "scene", "kinematic", "random", "none")
BOUNDARY_TOL = 2   # ±frames a predicted scene boundary may be off and still count (GEBD scores with a tolerance)


@dataclass
class PruneConfig:
    seed: int = 0               # `random` mode: which frames are kept; same seed and episode id -> same frames
    # The AND of two sparse one-frame labels is empty wherever they fire a frame apart, and event-boundary
    # detectors are only accurate to a frame or so (GEBD scores DDM-Net with a tolerance). So the scene label
    # is dilated by ±scene_window frames, in every mode that uses it (so `both` ⊆ `scene`); a kept frame is
    # still a kinematic one. Measured on 40 tabletop expert episodes (detector trained on one per task):
    # w = 0 keeps 13 % of frames and has a kept frame within ±1 of 89 % of the subtask boundaries, w = 1
    # 38 % / 89 %, w = 2 42 % / 89 % (unsupervised scene layer: 11 % / 71 %, 26 % / 74 %, 38 % / 82 %).
    # 1 is the smallest window that forgives a one-frame miss; 0 is the paper's literal AND and the sparsest.
    scene_window: int = 1
    peak_window: int = 2        # a scene boundary must be the highest score within ±this many frames (NMS)
    # Floor under the kinematic threshold: states are float32, so a constant-velocity episode has
    # second differences of ~1e-7 rounding noise, and "above the mean" of pure noise would label half
    # its frames. Real motion (cm-scale steps) has accelerations orders of magnitude larger.
    acc_floor: float = 1e-5
    thumb: int = 16             # image features: each camera pooled to thumb x thumb RGB ...
    hist_bins: int = 8          # ... plus a colour histogram with this many bins per channel
    hidden: int = 32            # detector: channels of its 1-D conv
    kernel: int = 5             # detector: temporal kernel (two layers -> sees ±(kernel-1) frames)
    epochs: int = 300           # detector: full-batch Adam steps (a handful of episodes: ~1 s on CPU)
    lr: float = 3e-3            # detector: Adam learning rate
    filmstrip_episodes: int = 3   # episodes drawn in filmstrip.png, spread over the data set
    filmstrip_frames: int = 16    # most thumbnails per episode row

    def __post_init__(self):
        for name in ("scene_window", "peak_window"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0 frames, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- kinematic layer

def kinematic_labels(pose, gripper, floor=PruneConfig.acc_floor):
    """Action layer of Sec. 3.2.1: ||T''(t_k)||_2 > (1/N) sum_i ||T''(t_i)||_2, OR the gripper flips at t_k.

    pose: (..., N, 6 * arms) float, per arm x, y, z, roll, pitch, yaw (radians); gripper: (..., N) for one
    arm or (..., N, arms), binarised at 0.5 (>= 0.5 is open). Leading dims are independent episodes of
    equal length (kinematic_labels_many stacks a list of episodes this way).
    Angles are unwrapped along time (a yaw going from +pi to -pi is a small turn, not a jump), and
    T'' = np.gradient(np.gradient(T)) (central differences, one-sided at the ends). The first frame of a
    new gripper state is labelled. The threshold is max(episode mean, floor) (see PruneConfig.acc_floor).
    Two arms: a frame is labelled if EITHER arm's acceleration is above that arm's own
    episode mean or EITHER gripper flips -- each arm is judged against its own motion, so a slow arm's
    moves are not drowned out by a fast one.
    Short episodes: N = 2 has T'' == 0 exactly, N = 1 none at all, so only gripper flips are labelled
    (N = 1 -> [False]; N = 2 -> [False, gripper flipped]). Returns bool (..., N).
    """
    pose = np.asarray(pose, dtype=np.float64)
    gripper = np.asarray(gripper, dtype=np.float64)
    if pose.ndim < 2 or pose.shape[-1] == 0 or pose.shape[-1] % 6:
        raise DataError(f"kinematic_labels: field 'pose' must be (N, 6) per arm (x, y, z, roll, pitch, yaw), "
                        f"e.g. (N, 6) or (N, 12); got shape {pose.shape}")
    arms = pose.shape[-1] // 6
    if gripper.ndim == pose.ndim - 1 and arms == 1:
        gripper = gripper[..., None]
    if gripper.shape != pose.shape[:-1] + (arms,):
        raise DataError(f"kinematic_labels: field 'gripper' must have shape {pose.shape[:-1] + (arms,)} "
                        f"(one per arm and frame) for pose {pose.shape}; got {gripper.shape}")
    for name, x in (("pose", pose), ("gripper", gripper)):
        bad = ~np.isfinite(x)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise DataError(f"kinematic_labels: field '{name}' is NaN/inf at frame {where[-2]}"
                            + (f" of episode {where[:-2].tolist()}" if len(where) > 2 else ""))
    n = pose.shape[-2]
    if n < 2:
        return np.zeros(pose.shape[:-1], dtype=bool)
    arm = pose.reshape(pose.shape[:-1] + (arms, 6))                          # (..., N, arms, 6)
    arm = np.concatenate([arm[..., :3], np.unwrap(arm[..., 3:], axis=-3)], axis=-1)
    acc = np.gradient(np.gradient(arm, axis=-3), axis=-3)
    norm = np.sqrt(np.einsum("...i,...i->...", acc, acc))                    # (..., N, arms)
    moving = norm > np.maximum(norm.mean(axis=-2, keepdims=True), floor)
    closed = gripper < 0.5
    flip = np.zeros_like(closed)
    flip[..., 1:, :] = closed[..., 1:, :] != closed[..., :-1, :]
    return (moving | flip).any(axis=-1)


def kinematic_labels_many(poses, grippers, floor=PruneConfig.acc_floor):
    """kinematic_labels over a list of episodes -> list of bool (N_i,). Episodes of equal shape go through one
    stacked call, so short episodes are labelled at numpy speed rather than at one Python call each
    (measured on one busy core, 640 K frames in 16 K episodes of 20-60 frames: 0.26 s, 2.4 M frames/s;
    one call per episode: 0.43 M frames/s)."""
    groups = {}
    for i, (p, g) in enumerate(zip(poses, grippers)):
        groups.setdefault((np.shape(p), np.shape(g)), []).append(i)
    out = [None] * len(poses)
    for idx in groups.values():
        try:
            labels = kinematic_labels(np.stack([poses[i] for i in idx]), np.stack([grippers[i] for i in idx]), floor)
        except DataError:   # name the episode by its position in the list, not in its group
            for i in idx:
                try:
                    kinematic_labels(poses[i], grippers[i], floor)
                except DataError as e:
                    raise DataError(f"episode {i}: {e}") from None
        for i, lab in zip(idx, labels):
            out[i] = lab
    return out


def episode_pose(episode):
    """Episode steps' states -> (pose (N, 6 * arms), gripper (N, arms)).

    The state is x, y, z, roll, pitch, yaw, gripper per arm: 7-D for one arm, 14-D for two
    (arm 1's seven values, then arm 2's).
    """
    states = [np.asarray(s, dtype=np.float64).ravel() for s in step_field(episode, "state")]
    widths = sorted({len(s) for s in states})
    if len(widths) > 1 or (widths and (widths[0] == 0 or widths[0] % 7)):
        raise DataError(f"episode {episode.get('id')!r}: field 'state' must be 7 values per arm "
                        f"(x, y, z, roll, pitch, yaw, gripper) on every step; got widths "
                        f"{sorted({len(s) for s in states})}")
    per_arm = np.stack(states).reshape(len(states), -1, 7) if states else np.zeros((0, 1, 7))
    bad = np.flatnonzero(~np.isfinite(per_arm).all(axis=(1, 2)))
    if len(bad):
        raise DataError(f"episode {episode.get('id')!r} step {bad[0]}: field 'state' is NaN/inf")
    return per_arm[..., :6].reshape(len(states), -1), per_arm[..., 6]


def step_field(episode, field):
    """The list of one field over an episode's steps; DataError naming episode, step and field if absent."""
    steps = episode.get("steps")
    if not isinstance(steps, list):
        raise DataError(f"episode {episode.get('id')!r}: field 'steps' must be a list of step dicts")
    for i, s in enumerate(steps):
        if s.get(field) is None:
            raise DataError(f"episode {episode.get('id')!r} step {i}: field '{field}' is missing")
    return [s[field] for s in steps]


# ----------------------------------------------------------------------------- scene layer

def frame_features(frames, thumb=PruneConfig.thumb, hist_bins=PruneConfig.hist_bins):
    """Cheap per-frame image features (N, D): per camera, thumb x thumb pooled RGB and a colour histogram.

    A frame is a PIL image, an (H, W, 3) uint8 array, a file path or a lerobot_format.LazyFrame, or a list of those
    (one per camera); the cameras' features are concatenated. Values are in [0, 1].
    """
    rows = []
    for frame in frames:
        feats = []
        for img in frame if isinstance(frame, (list, tuple)) else [frame]:
            img = Image.fromarray(np.asarray(img, np.uint8)) if isinstance(img, np.ndarray) else data.open_image(img)
            small = np.asarray(img.convert("RGB").resize((4 * thumb, 4 * thumb), Image.BOX))  # (4t, 4t, 3)
            pooled = small.reshape(thumb, 4, thumb, 4, 3).mean(axis=(1, 3)) / 255.0
            idx = small.reshape(-1, 3).astype(np.int64) * hist_bins // 256 + np.arange(3) * hist_bins
            hist = np.bincount(idx.ravel(), minlength=3 * hist_bins) / (16 * thumb * thumb)
            feats += [pooled.ravel(), hist]
        rows.append(np.concatenate(feats))
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


def peaks(score, above, window):
    """Frames whose score is > `above` and the highest within ±window frames (non-maximum suppression;
    of equal scores the earliest wins, so one event gives one frame)."""
    padded = np.pad(score, window, constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1)          # (N, 2w+1)
    before = win[:, :window].max(axis=1, initial=-np.inf)
    after = win[:, window + 1:].max(axis=1, initial=-np.inf)
    return (score > before) & (score >= after) & (score > above)


def change_channels(feats):
    """(N, 3) per frame: m_t = ||f_t - f_{t-1}||_2 (how much the picture changed), dm_t = m_t - m_{t-1}
    and |dm_t| (0 where undefined: m from frame 1, dm from frame 2 — taking m_0 as 0 would make every episode
    whose first frames move "change" at frame 1).

    An event boundary is where the picture's DYNAMICS change, not where pixels change: a robot arm moving
    at a steady speed changes pixels on every frame (m is high but flat), and a new subtask shows up as a
    step in m (it starts, stops or turns). Measured on tabletop expert episodes, peaks of m itself were
    below chance; peaks of |dm| and a detector on these three channels were not (test_prune_part.py).
    """
    m = np.zeros(len(feats))
    m[1:] = np.linalg.norm(np.diff(feats, axis=0), axis=1)
    dm = np.zeros(len(feats))
    dm[2:] = np.diff(m[1:])
    return np.stack([m, dm, np.abs(dm)], axis=1).astype(np.float32)


class BoundaryNet(nn.Module):
    """Temporal event-boundary detector: a tiny stand-in for the paper's retrained DDM-Net (Sec. 3.2.1).

        frames -> frame_features (N, D) -> change_channels (N, 3) -> standardise
          -> Conv1d(3, hidden, k) -> ReLU -> Conv1d(hidden, 1, k) -> boundary logit per frame (N,)

    It sees the change statistics of ±(k - 1) frames around each frame, not the raw features: trained on
    12 tabletop episodes, a net on raw pooled pixels and their differences memorised scene layouts
    (precision/recall at ±2 frames on 30 new episodes 0.72-0.79 / 0.48-0.71) where the same net on the
    change statistics generalised (0.98-1.0 / 0.99).
    """

    def __init__(self, feat_dim, hidden=32, kernel=5, thumb=16, hist_bins=8):
        super().__init__()
        self.spec = dict(feat_dim=feat_dim, hidden=hidden, kernel=kernel, thumb=thumb, hist_bins=hist_bins)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("std", torch.ones(3))
        self.conv1 = nn.Conv1d(3, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, 1, kernel, padding=kernel // 2)

    def forward(self, x):
        x = ((x - self.mean) / self.std).transpose(1, 2)                     # (B, 3, T)
        return self.conv2(F.relu(self.conv1(x))).squeeze(1)                  # (B, T)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside the block. BoundaryNet is so small that thread hand-offs dominate:
    on a busy 2-core machine 300 training steps took 0.4 s on one thread and 13-20 s on two, and labelling
    ran at 3300 vs 580 frames/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scene_labels(frames, detector=None, cfg=None):
    """Scene layer of Sec. 3.2.1: event boundaries of the video, bool (N,).

    With a trained BoundaryNet: frames whose boundary probability is > 0.5 and a local peak. Without one
    (the unsupervised fallback): frames where the change in feature change, |dm_t|, peaks above its
    episode mean (see change_channels for why not m_t itself).
    """
    cfg = cfg or PruneConfig()
    spec = detector.spec if detector is not None else dict(thumb=cfg.thumb, hist_bins=cfg.hist_bins)
    feats = frame_features(frames, spec["thumb"], spec["hist_bins"])
    if len(feats) < 2:
        return np.zeros(len(feats), dtype=bool)
    x = change_channels(feats)
    if detector is None:  # the threshold: the mean over the frames where |dm| is defined
        return peaks(x[:, 2], x[2:, 2].mean(), cfg.peak_window) if len(x) > 2 else np.zeros(len(x), dtype=bool)
    if feats.shape[1] != spec["feat_dim"]:
        raise DataError(f"scene_labels: the detector was trained on {spec['feat_dim']} features per frame "
                        f"(its cameras), these frames give {feats.shape[1]}: a different number of cameras?")
    with torch.no_grad(), one_thread():
        prob = torch.sigmoid(detector(torch.from_numpy(x)[None]))[0].numpy()
    return peaks(prob, 0.5, cfg.peak_window)


def train_detector(episodes, boundaries, cfg=None):
    """Fit a BoundaryNet on a handful of labelled episodes (the paper's few hand-labelled trajectories).

    boundaries: {episode id: [step, ...]}, the first steps of new events; only these episodes are used.
    Full-batch Adam on per-frame BCE, positives up-weighted by the negative/positive ratio (boundaries are
    rare). Deterministic for a given cfg.seed.
    """
    cfg = cfg or PruneConfig()
    xs, targets, dims = [], [], set()
    for ep in episodes:
        if ep.get("id") not in boundaries:
            continue
        feats = frame_features(step_field(ep, "image"), cfg.thumb, cfg.hist_bins)
        t = np.zeros(len(feats), dtype=np.float32)
        steps = np.asarray(boundaries[ep["id"]], dtype=np.int64)
        if ((steps < 0) | (steps >= len(feats))).any():
            raise DataError(f"labels for episode {ep['id']!r}: field 'boundaries' has steps outside "
                            f"0..{len(feats) - 1}: {steps[(steps < 0) | (steps >= len(feats))].tolist()}")
        t[steps] = 1
        xs.append(change_channels(feats))
        targets.append(t)
        dims.add(feats.shape[1])
    if not xs or sum(t.sum() for t in targets) == 0:
        raise DataError("train_detector: no labelled episode with at least one boundary matches the episodes given")
    if len(dims) > 1:
        raise DataError("train_detector: the labelled episodes have different numbers of cameras")
    torch.manual_seed(cfg.seed)
    net = BoundaryNet(dims.pop(), cfg.hidden, cfg.kernel, cfg.thumb, cfg.hist_bins)
    every = np.concatenate(xs)
    net.mean.copy_(torch.from_numpy(every.mean(axis=0)))
    net.std.copy_(torch.from_numpy(every.std(axis=0) + 1e-6))
    T = max(len(x) for x in xs)
    x, y, mask = torch.zeros(len(xs), T, 3), torch.zeros(len(xs), T), torch.zeros(len(xs), T)
    for i, (xi, ti) in enumerate(zip(xs, targets)):
        x[i, :len(xi)], y[i, :len(ti)], mask[i, :len(xi)] = torch.from_numpy(xi), torch.from_numpy(ti), 1
    pos = (y * mask).sum()
    pos_weight = (mask.sum() - pos) / pos
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    with one_thread():
        for _ in range(cfg.epochs):
            loss = F.binary_cross_entropy_with_logits(net(x), y, pos_weight=pos_weight, reduction="none")
            loss = (loss * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def save_detector(net, path):
    """BoundaryNet -> one .pt file (spec + weights), written atomically (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.atomic_write(path, lambda f: torch.save({"spec": net.spec, "state_dict": net.state_dict()}, f), binary=True)


def load_detector(path):
    """The BoundaryNet saved by save_detector (or `python prune.py train-detector`), in eval mode."""
    if not os.path.isfile(path):
        raise UserError(f"detector file not found: {path} (train one with `python prune.py train-detector`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = BoundaryNet(**blob["spec"])
        net.load_state_dict(blob["state_dict"])
    except Exception as e:
        raise DataError(f"{path}: not a prune.py detector ({str(e).splitlines()[0]})") from None
    return net.eval()


def read_labels(path):
    """labels.jsonl -> {episode id: [boundary step, ...]}; each line {"episode": id, "boundaries": [step, ...]}."""
    if not os.path.isfile(path):
        raise DataError(f"labels file not found: {path}")
    labels = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                steps = [int(s) for s in row["boundaries"]]
                labels[str(row["episode"])] = steps
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path} line {n}: expected {{\"episode\": id, \"boundaries\": [step, ...]}} "
                                f"({type(e).__name__}: {e})") from None
    return labels


def boundary_scores(pred, true, tol=BOUNDARY_TOL):
    """(precision, recall) of predicted boundary frames against true ones, a hit being within ±tol frames.

    Not one-to-one (two predictions next to one true boundary both count): the question asked is whether
    reasoning triggers land near real events. Empty sets score 1.0 (nothing wrong was said / missed).
    """
    pred, true = np.flatnonzero(pred), np.flatnonzero(true)
    if len(pred) == 0 or len(true) == 0:
        return float(len(pred) == 0), float(len(true) == 0)
    dist = np.abs(pred[:, None] - true[None, :])                        # (P, T)
    return float((dist.min(axis=1) <= tol).mean()), float((dist.min(axis=0) <= tol).mean())


def phase_boundaries(episode):
    """Ground-truth boundaries of a tabletop episode: frames whose `phase` differs from the previous one."""
    phase = np.asarray(step_field(episode, "phase"))
    return np.r_[False, phase[1:] != phase[:-1]]


# ----------------------------------------------------------------------------- keyframes and pruning

def dilate(mask, w):
    """True within ±w frames of any True frame."""
    if w == 0:
        return mask
    # the full convolution, centred: mode="same" returns the kernel's length when the episode is shorter
    return np.convolve(mask.astype(np.int64), np.ones(2 * w + 1, dtype=np.int64))[w:w + len(mask)] > 0


def random_keep(k, n, seed, episode_id):
    """k of n frames chosen uniformly, seeded by (seed, episode id): reproducible and order-independent."""
    rng = np.random.default_rng([seed, zlib.crc32(str(episode_id).encode())])
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, size=k, replace=False)] = True
    return keep


def check_modes(modes):
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown prune mode {bad[0]!r}; choose one of {', '.join(MODES)}")


def layer_masks(episodes, modes=MODES, cfg=None, detector=None):
    """[{mode: bool (N,)}] per episode for the requested modes, computing each layer once and only if needed.

      none      every frame keeps its reasoning (keep rate 1)
      kinematic kinematic_labels
      scene     scene_labels dilated by ±cfg.scene_window (see PruneConfig)
      both      kinematic AND scene -- the paper's rule
    Every mode uses the same two layers, so the ablation's rows nest: both ⊆ scene, both ⊆ kinematic.
      random    as many frames as `both` keeps in this episode, chosen uniformly (seeded)
    """
    cfg = cfg or PruneConfig()
    check_modes(modes)
    need = set(modes) | ({"kinematic", "scene", "both"} if {"both", "random"} & set(modes) else set())
    if "kinematic" in need:
        pairs = [episode_pose(ep) for ep in episodes]
        kin = kinematic_labels_many([p for p, _ in pairs], [g for _, g in pairs], cfg.acc_floor)
    out = []
    for i, ep in enumerate(episodes):
        m = {"none": np.ones(len(step_field(ep, "state")), dtype=bool)}
        if "kinematic" in need:
            m["kinematic"] = kin[i]
        if "scene" in need:
            m["scene"] = dilate(scene_labels(step_field(ep, "image"), detector, cfg), cfg.scene_window)
        if "both" in need:
            m["both"] = m["kinematic"] & m["scene"]
        if "random" in need:
            m["random"] = random_keep(int(m["both"].sum()), len(m["none"]), cfg.seed, ep.get("id", ""))
        out.append({k: m[k] for k in modes})
    return out


def keyframes(episode, mode="both", cfg=None, detector=None):
    """Frames of an episode whose reasoning is kept under `mode` (one of MODES), bool (N,). Sec. 3.2.1."""
    return layer_masks([episode], (mode,), cfg, detector)[0][mode]


def as_episodes(records_or_path):
    """A path to an episode folder, a list of episodes, or a list of robot records -> list of episodes."""
    if isinstance(records_or_path, (str, os.PathLike)):
        return check_lengths(data.read_episodes(records_or_path))
    items = list(records_or_path)
    if not items:
        raise DataError("prune: no episodes or records given")
    if all("steps" in x for x in items):
        return check_lengths(items)
    for i, r in enumerate(items):
        if r.get("domain", "robot") != "robot":
            raise DataError(f"prune: record {i} has domain {r.get('domain')!r}; pruning applies to robot "
                            f"episodes only (Sec. 3.2.1), pass the robot records")
    return data.records_to_episodes(items)


def check_lengths(episodes):
    """An episode without frames has nothing to prune (one frame is fine: only a gripper flip could label it)."""
    for i, ep in enumerate(episodes):
        if not ep["steps"]:
            raise DataError(f"prune: episode {ep.get('id', i)!r}: field 'steps' is empty (an episode needs a frame)")
    return episodes


def reasoning_tokens(reasoning):
    """Whitespace-separated words of data.reasoning_text (tokenizer-free, so stats compare across models)."""
    return len(reasoning_text(reasoning).split())


def prune(records_or_path, mode="both", out=None, cfg=None, detector=None):
    """Keep reasoning on `mode`'s keyframes, set it to None elsewhere; every frame and action is kept.

    records_or_path: an episode folder (data.read_episodes), a list of episodes, or robot records
    (grouped with data.records_to_episodes). detector: a BoundaryNet, a path to one, or None for the
    unsupervised scene layer. With `out`, writes the pruned episode folder (data.write_episodes),
    prune_stats.json and filmstrip.png there. Returns (pruned episodes, stats dict).
    """
    cfg = cfg or PruneConfig()
    check_modes([mode])
    if isinstance(detector, (str, os.PathLike)):
        detector = load_detector(detector)
    episodes = as_episodes(records_or_path)
    masks = layer_masks(episodes, MODES, cfg, detector)
    pruned = [dict(ep, steps=[dict(s, reasoning=s.get("reasoning") if k else None)
                              for s, k in zip(ep["steps"], m[mode])]) for ep, m in zip(episodes, masks)]
    stats = prune_stats(episodes, masks, mode, cfg)
    if out is not None:
        data.write_episodes(pruned, out)
        data.atomic_write(os.path.join(out, "prune_stats.json"), lambda f: json.dump(stats, f, indent=2))
        shown = np.unique(np.linspace(0, len(episodes) - 1, min(cfg.filmstrip_episodes, len(episodes))).astype(int))
        filmstrip([episodes[i] for i in shown], [masks[i] for i in shown], mode,
                  os.path.join(out, "filmstrip.png"), cfg)
    return pruned, stats


def prune_stats(episodes, masks, mode, cfg):
    """Counts per layer: keyframes, kept fraction, reasoning frames and tokens kept; if the steps have phases,
    the scene labels (as the modes use them, dilated) against the phase boundaries."""
    tokens = np.concatenate([[reasoning_tokens(s.get("reasoning")) for s in ep["steps"]] for ep in episodes])
    has = tokens > 0
    layers = {}
    for m in MODES:
        keep = np.concatenate([mk[m] for mk in masks])
        layers[m] = dict(keyframes=int(keep.sum()), kept_fraction=round(float(keep.mean()), 4),
                         reasoning_frames_after=int((keep & has).sum()),
                         reasoning_tokens_after=int(tokens[keep].sum()))
    stats = dict(mode=mode, episodes=len(episodes), frames=int(len(tokens)), token_unit="whitespace words",
                 reasoning_frames_before=int(has.sum()), reasoning_tokens_before=int(tokens.sum()),
                 **{k: layers[mode][k] for k in ("keyframes", "kept_fraction", "reasoning_tokens_after")},
                 layers=layers, config=dict(seed=cfg.seed, scene_window=cfg.scene_window,
                                            peak_window=cfg.peak_window, acc_floor=cfg.acc_floor))
    if all(s.get("phase") is not None for ep in episodes for s in ep["steps"]):
        truth = np.concatenate([phase_boundaries(ep) for ep in episodes])
        scene = np.concatenate([mk["scene"] for mk in masks])
        p, r = boundary_scores(scene, truth, BOUNDARY_TOL)
        stats["scene_vs_phase"] = dict(precision=round(p, 4), recall=round(r, 4), tolerance=BOUNDARY_TOL)
    return stats


def filmstrip(episodes, masks, mode, path, cfg):
    """One row per episode: thumbnails (green border = reasoning kept under `mode`, grey = masked) over a
    timeline with a lane per layer (scene blue, kinematic orange, kept green), like the paper's figure."""
    size, pad, lane, cols = 48, 4, 7, cfg.filmstrip_frames
    width, row_h = pad + cols * (size + pad), 12 + size + 14 + 3 * lane + pad
    lanes = (("scene", (40, 90, 220)), ("kinematic", (240, 140, 0)), (f"kept ({mode})", (0, 170, 0)))
    sheet = Image.new("RGB", (width, len(episodes) * row_h + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (ep, mk) in enumerate(zip(episodes, masks)):
        y0, keep, n = r * row_h, mk[mode], len(ep["steps"])
        # every kept frame if they fit, topped up with evenly spaced masked ones for context
        shown = np.unique(np.r_[np.flatnonzero(keep), np.linspace(0, n - 1, cols).round()].astype(int))
        shown = shown[np.linspace(0, len(shown) - 1, min(cols, len(shown))).round().astype(int)]
        title = f"{ep.get('id')}  {mode}: {int(keep.sum())}/{n} kept  {ep.get('instruction', '')}"
        draw.text((pad, y0), title[:width // 6], fill="black")
        for c, t in enumerate(shown):
            img = ep["steps"][t]["image"]
            img = img[0] if isinstance(img, (list, tuple)) else img
            img = Image.fromarray(np.asarray(img, np.uint8)) if isinstance(img, np.ndarray) else data.open_image(img)
            x = pad + c * (size + pad)
            sheet.paste(img.convert("RGB").resize((size - 4, size - 4)), (x + 2, y0 + 14))
            draw.rectangle([x, y0 + 12, x + size - 1, y0 + 11 + size],
                           outline=(0, 170, 0) if keep[t] else (170, 170, 170), width=2)
            draw.text((x + 2, y0 + 12 + size), str(t), fill="black")
        # timeline under the thumbnails: frame t at the centre of its thumbnail when every frame is shown
        span = len(shown) * (size + pad) - pad - size
        for i, marks in enumerate((mk["scene"], mk["kinematic"], keep)):
            lane_y = y0 + 26 + size + i * lane
            for t in np.flatnonzero(marks):
                x = pad + size // 2 + int(t / max(n - 1, 1) * span)
                draw.rectangle([x - 2, lane_y, x + 2, lane_y + lane - 2], fill=lanes[i][1])
    x = pad
    for name, colour in lanes:
        draw.rectangle([x, sheet.height - 10, x + 8, sheet.height - 4], fill=colour)
        draw.text((x + 12, sheet.height - 13), name, fill="black")
        x += 24 + 6 * len(name)
    data.atomic_write(path, lambda f: sheet.save(f, format="PNG"), binary=True)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="prune.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dual-layer data pruning (DualVLA Sec. 3.2.1): keep reasoning text only on keyframes\n"
                    "where the scene changes AND the motion changes; every frame and action is kept.",
        epilog="examples:\n"
               "  python prune.py --data runs/demo/episodes --mode both --out runs/demo/pruned\n"
               "  python prune.py train-detector --data EPISODE_DIR --labels labels.jsonl --out detector.pt\n"
               "  python prune.py run --data DIR --out DIR2 --detector detector.pt\n"
               "labels.jsonl: one line per hand-labelled episode, "
               "{\"episode\": id, \"boundaries\": [step, ...]} (first steps of new events).")
    d = PruneConfig()
    p.add_argument("command", nargs="?", default="run", choices=("run", "train-detector"),
                   help="run (default): prune an episode folder; train-detector: fit the scene layer's "
                        "event-boundary detector on labelled episodes")
    p.add_argument("--data", help="episode folder (episodes.jsonl + images/, as data.write_episodes writes)")
    p.add_argument("--out", help="run: output episode folder (+ prune_stats.json, filmstrip.png); "
                                 "train-detector: the detector .pt file to write")
    p.add_argument("--mode", default="both", choices=MODES,
                   help="which frames keep reasoning: both = scene AND kinematic (the paper), scene, kinematic, "
                        "random (as many frames as both, seeded), none (all) (default: both)")
    p.add_argument("--detector", help="run: a detector .pt from train-detector for the scene layer "
                                      "(default: unsupervised peaks of the change in feature change)")
    p.add_argument("--labels", help="train-detector: labels.jsonl with boundary steps per episode")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random mode's frames / detector init (default {d.seed})")
    p.add_argument("--scene-window", type=int, default=d.scene_window,
                   help=f"scene label dilated by ±this many frames, in every mode (default {d.scene_window})")
    p.add_argument("--peak-window", type=int, default=d.peak_window,
                   help=f"a scene boundary is the top score within ±this many frames (default {d.peak_window})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"train-detector: Adam steps (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"train-detector: learning rate (default {d.lr})")
    p.add_argument("--filmstrip-episodes", type=int, default=d.filmstrip_episodes,
                   help=f"run: episodes drawn in filmstrip.png (default {d.filmstrip_episodes})")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = PruneConfig(seed=args.seed, scene_window=args.scene_window, peak_window=args.peak_window,
                      epochs=args.epochs, lr=args.lr, filmstrip_episodes=args.filmstrip_episodes)
    needed = ("data", "out") + (("labels",) if args.command == "train-detector" else ())
    missing = [f"--{k}" for k in needed if not getattr(args, k)]
    if missing:
        raise UserError(f"{args.command} needs {' and '.join(missing)} (see python prune.py --help)")
    if not os.path.isdir(args.data):
        raise UserError(f"--data: episode folder not found: {args.data}")
    if args.command == "train-detector":
        labels = read_labels(args.labels)
        episodes = data.read_episodes(args.data)
        unknown = sorted(set(labels) - {ep["id"] for ep in episodes})
        if unknown:
            raise DataError(f"{args.labels}: episode {unknown[0]!r} is not in {args.data}")
        net = train_detector(episodes, labels, cfg)
        labelled = [ep for ep in episodes if ep["id"] in labels]
        pred = np.concatenate([scene_labels(step_field(ep, "image"), net, cfg) for ep in labelled])
        true = np.concatenate([np.isin(np.arange(len(ep["steps"])), labels[ep["id"]]) for ep in labelled])
        p, r = boundary_scores(pred, true, BOUNDARY_TOL)
        save_detector(net, args.out)
        print(f"trained on {len(labelled)} episodes ({int(true.sum())} boundaries): training-set precision "
              f"{p:.2f} recall {r:.2f} at ±{BOUNDARY_TOL} frames; wrote {args.out}")
        return
    if os.path.realpath(args.data) == os.path.realpath(args.out):
        raise UserError("--out must differ from --data (pruning would overwrite the source episodes)")
    _, stats = prune(args.data, args.mode, args.out, cfg, args.detector)
    print(f"{args.mode}: {stats['episodes']} episodes, {stats['frames']} frames, reasoning kept on "
          f"{stats['keyframes']} ({stats['kept_fraction']:.1%}); reasoning words {stats['reasoning_tokens_before']} "
          f"-> {stats['reasoning_tokens_after']}; wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, UserError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
