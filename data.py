"""Per-frame records shared by every script, the files they come from, and the action statistics.

A record is a plain dict, one per frame (robot) or per question (multimodal):

    robot: dict(image=PIL.Image | [PIL.Image, ...] (one per camera), instruction=str,
                state=np.float32 (S,), action=np.float32 (A,), reasoning=dict | str | None,
                domain="robot", episode=str, step=int)   (+ robot, task, phase when known)
    mm:    dict(image=..., instruction=question, state=None, action=None,
                reasoning=answer str, domain="mm")

This mirrors the paper's notation (Sec. 3.1): robot frames are (o_t, i_t, a_t) plus an optional
reasoning r_t; multimodal samples are (o, i, r, ∅). Readers, all returning these records or episodes
(dict(id, instruction, robot, task, steps=[dict(image, state, action, reasoning[, phase])])):

    episode folder   DIR/episodes.jsonl (one episode per line) + DIR/images/*.png    (write_/read_/iter_episodes)
    LLaVA JSON       [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}] (write_/read_/iter_llava)
    LeRobot v2.x/3.0 meta/info.json, meta/tasks.*, meta/episodes*, data/*.parquet, videos/*.mp4 (read_/iter_lerobot)
    ECoT             embodied_features_bridge.json, joined by file path + episode id + step (read_ecot)
    VLA-IT           InstructVLA's bridge_instruction.json / fractal_instruction.json          (read_vla_it)

Bad input raises DataError naming the file, line/row/episode and field. `python data.py inspect PATH`
prints what a path holds before a long job.
"""
import argparse
import glob
import io
import json
import os
import re
import sys

import numpy as np
from PIL import Image

# ECoT's tag order; a reasoning dict is serialised in this order, missing tags skipped.
REASONING_TAGS = ("TASK", "PLAN", "VISIBLE OBJECTS", "SUBTASK REASONING", "SUBTASK",
                  "MOVE REASONING", "MOVE", "GRIPPER POSITION")


class DataError(ValueError):
    """Bad input data; the message names the file, line/episode and field."""


def reasoning_text(reasoning):
    """Tag dict -> one string in REASONING_TAGS order ("TASK: ... PLAN: ..."); str passes; None -> ""."""
    if reasoning is None:
        return ""
    if isinstance(reasoning, str):
        return reasoning
    return " ".join(f"{tag}: {reasoning[tag]}" for tag in REASONING_TAGS if reasoning.get(tag))


def action_stats(actions, gripper_dims=(-1,)):
    """Per-dimension q01/q99 of (N, A) actions; gripper dims are left unnormalised (q01=-1, q99=1)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or len(actions) == 0:
        raise DataError(f"action_stats: expected a non-empty (N, A) array, got shape {actions.shape}")
    q01, q99 = np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0)
    mask = np.ones(actions.shape[1], dtype=bool)
    mask[list(gripper_dims)] = False
    q01[~mask], q99[~mask] = -1.0, 1.0  # identity map for the gripper: it is kept as is
    return {"q01": q01.tolist(), "q99": q99.tolist(), "mask": mask.tolist()}


def normalize_action(action, stats):
    """Map to [-1, 1] with q01/q99 (OpenVLA's BOUNDS_Q99), clipped; masked-out dims unchanged."""
    q01, q99, mask = (np.asarray(stats[k]) for k in ("q01", "q99", "mask"))
    a = np.asarray(action, dtype=np.float32)
    scaled = np.clip(2 * (a - q01) / np.maximum(q99 - q01, 1e-8) - 1, -1, 1)
    return np.where(mask, scaled, a).astype(np.float32)


def unnormalize_action(action, stats):
    """Inverse of normalize_action (exact inside [q01, q99])."""
    q01, q99, mask = (np.asarray(stats[k]) for k in ("q01", "q99", "mask"))
    a = np.asarray(action, dtype=np.float32)
    return np.where(mask, (a + 1) / 2 * (q99 - q01) + q01, a).astype(np.float32)


def add_action_chunks(records, chunk):
    """Give each robot record `actions` (chunk, A): its own action and the next chunk-1 of its episode.

    Past the episode's end the last action is repeated and `action_mask` is False there
    (LeRobot's action_is_pad), so the loss ignores the padding.
    """
    by_episode = {}
    for r in records:
        if r["domain"] == "robot":
            by_episode.setdefault(r["episode"], []).append(r)
    for frames in by_episode.values():
        frames.sort(key=lambda r: r["step"])
        acts = np.stack([np.asarray(r["action"], dtype=np.float32) for r in frames])
        n = len(frames)
        for i, r in enumerate(frames):
            idx = np.arange(i, i + chunk)
            r["actions"] = acts[np.minimum(idx, n - 1)]
            r["action_mask"] = idx < n
    return records
