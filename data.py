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
    LeRobot v2.x/3.0 meta/info.json, meta/tasks.*, meta/episodes*, data/*.parquet, videos/*.mp4 (write_/read_/iter_lerobot)
    ECoT             embodied_features_bridge.json, joined by file path + episode id + step (read_ecot)
    VLA-IT           InstructVLA's bridge_instruction.json / fractal_instruction.json          (read_vla_it)
    the paper's mix  VLA-IT for both robots, ECoT's Bridge reasoning as an option        (paper_reasoning)

Bad input raises DataError naming the file, line/row/episode and field. `python data.py inspect PATH`
prints what a path holds before a long job; `python data.py export-lerobot SRC OUT` writes an episode
folder as a LeRobot v2.1/v3.0 dataset.
"""
import argparse
import functools
import glob
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice

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


BOX = re.compile(r"([^,\[\]]+?)\s*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\]")


def subtask_target(reasoning, width, height):
    """ECoT's boxes -> (x, y) in [-1, 1] of the object the current SUBTASK is about, or None.

    The object is the visible one the subtask names last ("carry the can to the plate" -> the plate,
    where the gripper is heading). Boxes are pixel coordinates in the first camera's image.
    """
    if not isinstance(reasoning, dict) or not reasoning.get("SUBTASK") or not reasoning.get("VISIBLE OBJECTS"):
        return None
    subtask = reasoning["SUBTASK"].lower()
    boxes = {m[1].strip().lower(): [int(v) for v in m.groups()[1:]] for m in BOX.finditer(reasoning["VISIBLE OBJECTS"])}
    # where each name last ends; at the same end the longer name wins ("the red can" names "red can", not "can")
    named = [(subtask.rfind(name) + len(name), len(name), name) for name in boxes
             if re.search(rf"\b{re.escape(name)}\b", subtask)]
    if not named:
        return None
    x0, y0, x1, y1 = boxes[max(named)[2]]
    return np.array([(x0 + x1) / width - 1, (y0 + y1) / height - 1], np.float32)


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


# ---------------------------------------------------------------------------------------------- files

def read_appended(path):
    """[(line number, record)] of a JSONL file written a record at a time (predictions, judgements), for
    --resume: [] when absent; a last line cut short (a killed run) is dropped; another bad line is named."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); move it away or drop --resume") from None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((n, json.loads(line)))
        except ValueError:
            if n == len(lines):
                break
            raise DataError(f"{path} line {n}: not JSON; move the file away or drop --resume") from None
    return out


def atomic_write(path, content, binary=False):
    """Write `content` (str/bytes, or a function of the open file) through a temporary name and
    os.replace, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            content(f) if callable(content) else f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_png(image, path):
    atomic_write(path, lambda f: open_image(image).save(f, format="PNG"), binary=True)


def _open_image(source, where):
    """A path or encoded bytes -> RGB PIL image, fully decoded here so corrupt bytes fail now, with context."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {source}") from None
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        name = "image bytes" if isinstance(source, bytes) else source
        raise DataError(f"{where}: corrupt image {name} ({e})") from None


def verify_images(records, where):
    """A fast pass over the image files of records before a long job: each must open as an image whose data is
    complete (PIL's verify: chunks and checksums, no decoding), so a corrupt frame fails now rather than when a
    batch first uses it. LeRobot frames (LazyFrame) are checked as they are decoded."""
    for n, r in enumerate(records):
        for p in r["image"] if isinstance(r["image"], (list, tuple)) else [r["image"]]:
            if not isinstance(p, str):
                continue
            name = f"episode {r['episode']} step {r['step']}" if r["domain"] == "robot" else f"sample {n}"
            try:
                with Image.open(p) as im:
                    im.verify()
            except FileNotFoundError:
                raise DataError(f"{where}: {name} field 'image': image file not found: {p}") from None
            except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
                raise DataError(f"{where}: {name} field 'image': corrupt image {p} ({e})") from None


def _not_utf8(path, e):
    return DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _jsonl(path, required=()):
    """Yield (where, row) for each line of a JSONL file; a malformed line or a missing field names the
    file, line and field."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            missing = [k for k in required if k not in row] if isinstance(row, dict) else ["(not an object)"]
            if missing:
                raise DataError(f"{where}: missing field '{missing[0]}'")
            yield where, row


def _vector(value, where, dims, key):
    """A flat float32 vector whose length matches the first one seen for `key` (one action width per set)."""
    try:
        v = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{key}' is not a list of numbers") from None
    if v.ndim != 1:
        raise DataError(f"{where}: field '{key}' should be a flat list, got shape {v.shape}")
    if not np.isfinite(v).all():  # clipped by the normalisation, an inf would train as a plausible value
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise DataError(f"{where}: field '{key}' holds {v[i]} at index {i} (values must be finite)")
    if dims.get(key) is None:
        dims[key] = len(v)
    elif len(v) != dims[key]:
        raise DataError(f"{where}: field '{key}' has {len(v)} values, expected {dims[key]}")
    return v


# ------------------------------------------------------------------------------------ episode folder

def write_episodes(episodes, out_dir):
    """Write the project's episode folder: out_dir/episodes.jsonl (one episode per line) + out_dir/images/.

    Step images become images/<id>_<step>.png, or images/<id>_<step>_<camera>.png for a list of cameras
    (the JSON then holds the list of names, in camera order). episodes.jsonl is replaced last, so a
    folder is never half-written from a reader's point of view.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines, stems = [], {}
    for n, ep in enumerate(episodes):
        for field in ("id", "instruction", "steps"):
            if field not in ep:
                raise DataError(f"write_episodes: episode {n}: missing field '{field}'")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(ep["id"]))  # ids such as "bridge/12" become file-safe
        if stem in stems:
            raise DataError(f"write_episodes: episodes {stems[stem]} and {n} share the id (file stem) {stem!r}")
        stems[stem] = n
        steps = []
        for t, step in enumerate(ep["steps"]):
            many = isinstance(step["image"], (list, tuple))
            names = []
            for c, image in enumerate(step["image"] if many else [step["image"]]):
                names.append(f"images/{stem}_{t}" + (f"_{c}" if many else "") + ".png")
                _save_png(image, os.path.join(out_dir, names[-1]))
            row = dict(image=names if many else names[0],
                       state=np.asarray(step["state"], dtype=np.float32).tolist(),
                       action=np.asarray(step["action"], dtype=np.float32).tolist(),
                       reasoning=step.get("reasoning"))
            row.update((k, v) for k, v in step.items() if k not in row)
            steps.append(row)
        try:
            lines.append(json.dumps({**{k: v for k, v in ep.items() if k != "steps"}, "steps": steps},
                                    default=lambda o: o.tolist()) + "\n")  # numpy scalars, e.g. a phase
        except (TypeError, AttributeError) as e:
            raise DataError(f"write_episodes: episode {ep['id']!r}: a field is not JSON-serialisable ({e})") from None
    atomic_write(os.path.join(out_dir, "episodes.jsonl"), lambda f: f.writelines(lines))


def iter_episodes(path, load_images=True, action_dim=None):
    """Yield the episodes of a folder (DIR or DIR/episodes.jsonl) one at a time, for sets that do not fit in RAM.

    State and action become float32 arrays (every action as wide as the first, or `action_dim`);
    images are loaded as RGB PIL images, or with load_images=False checked to exist and left as paths.
    """
    jsonl = os.path.join(path, "episodes.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(jsonl):
        raise DataError(f"{path}: no episodes.jsonl (not an episode folder)")
    root, dims, seen = os.path.dirname(jsonl), {"state": None, "action": action_dim}, {}
    for where, ep in _jsonl(jsonl, ("id", "instruction", "steps")):
        if not isinstance(ep["id"], (str, int)) or isinstance(ep["id"], bool):
            raise DataError(f"{where}: field 'id' must be a string or an integer, got {type(ep['id']).__name__}")
        if str(ep["id"]) in seen:  # two episodes under one id would mix their action chunks
            raise DataError(f"{where}: field 'id' {ep['id']!r} repeats the id of {seen[str(ep['id'])]}")
        seen[str(ep["id"])] = where
        where += f" (episode {ep['id']!r})"
        if not isinstance(ep["instruction"], str):
            raise DataError(f"{where}: field 'instruction' must be a string, got {type(ep['instruction']).__name__}")
        if not isinstance(ep["steps"], list):
            raise DataError(f"{where}: field 'steps' must be a list of steps, got {type(ep['steps']).__name__}")
        steps = []
        for t, step in enumerate(ep["steps"]):
            w = f"{where} step {t}"
            if not isinstance(step, dict):
                raise DataError(f"{w}: a step must be an object, got {type(step).__name__}")
            for field in ("image", "state", "action"):
                if field not in step:
                    raise DataError(f"{w}: missing field '{field}'")
            names = step["image"] if isinstance(step["image"], list) else [step["image"]]
            if not names or not all(isinstance(name, str) for name in names):
                raise DataError(f"{w}: field 'image' must be a file name or a list of them")
            paths = [os.path.join(root, name) for name in names]
            for p in paths if not load_images else ():
                if not os.path.exists(p):
                    raise DataError(f"{w} field 'image': image file not found: {p}")
            images = [_open_image(p, f"{w} field 'image'") for p in paths] if load_images else paths
            steps.append({"reasoning": None, **step, "image": images if isinstance(step["image"], list) else images[0],
                          "state": _vector(step["state"], w, dims, "state"),
                          "action": _vector(step["action"], w, dims, "action")})
        yield {"robot": "unknown", "task": "", **ep, "steps": steps}


def read_episodes(path, load_images=True, action_dim=None):
    """All episodes of an episode folder (see iter_episodes)."""
    return list(iter_episodes(path, load_images, action_dim))


def episode_records(episodes):
    """Episodes -> robot records, one per step (the step's phase is kept when it has one). Episode ids must
    be unique: the action chunks are gathered by id."""
    records, seen = [], {}
    for n, ep in enumerate(episodes):
        if str(ep["id"]) in seen:
            raise DataError(f"episodes {seen[str(ep['id'])]} and {n} share the id {str(ep['id'])!r}")
        seen[str(ep["id"])] = n
        for t, step in enumerate(ep["steps"]):
            r = dict(image=step["image"], instruction=ep["instruction"], state=step["state"],
                     action=step["action"], reasoning=step.get("reasoning"), domain="robot",
                     episode=str(ep["id"]), step=t, robot=ep.get("robot", "unknown"), task=ep.get("task", ""))
            if step.get("phase") is not None:
                r["phase"] = step["phase"]
            records.append(r)
    return records


def records_to_episodes(records):
    """Robot records -> episodes (inverse of episode_records): grouped by `episode` in first-seen order,
    steps sorted by `step`; multimodal records are ignored."""
    groups = {}
    for r in records:
        if r.get("domain", "robot") == "robot":
            groups.setdefault(r["episode"], []).append(r)
    episodes = []
    for eid, frames in groups.items():
        frames = sorted(frames, key=lambda r: r["step"])
        steps = [dict(image=r["image"], state=r["state"], action=r["action"], reasoning=r.get("reasoning"),
                      **({"phase": r["phase"]} if "phase" in r else {})) for r in frames]
        episodes.append(dict(id=eid, instruction=frames[0]["instruction"], robot=frames[0].get("robot", "unknown"),
                             task=frames[0].get("task", ""), steps=steps))
    return episodes


# -------------------------------------------------------------------------------- LLaVA-format JSON

def write_llava(samples, json_path, image_dir):
    """Multimodal records -> a LLaVA-format JSON whose image paths are relative to image_dir.

    An image object shared by several records (several questions about one scene) is written once.
    """
    os.makedirs(image_dir, exist_ok=True)
    names, entries = {}, []
    for n, r in enumerate(samples):
        many = isinstance(r["image"], (list, tuple))
        rels = []
        for image in r["image"] if many else [r["image"]]:
            if id(image) not in names:
                names[id(image)] = f"{len(names):07d}.png"
                _save_png(image, os.path.join(image_dir, names[id(image)]))
            rels.append(names[id(image)])
        entries.append({"id": str(r.get("id", n)), "image": rels if many else rels[0], "conversations": [
            {"from": "human", "value": "<image>\n" * len(rels) + r["instruction"]},
            {"from": "gpt", "value": reasoning_text(r["reasoning"])}]})
    atomic_write(json_path, lambda f: json.dump(entries, f, ensure_ascii=False, indent=1))


def iter_llava(json_path, image_root, load_images=True):
    """Yield multimodal records from a LLaVA-format JSON (the Bunny mix is this format), lazily.

    Each human/gpt pair of a conversation is one record (pair k > 0 gets id "<id>_<k>"); the "<image>"
    placeholder is stripped from the question. Entries whose image file is missing, and text-only
    entries (no "image"), are skipped and counted; the counts are printed at the end.
    """
    data = _load_json(json_path)
    if not isinstance(data, list):
        raise DataError(f"{json_path}: expected a JSON list of LLaVA entries, got {type(data).__name__}")
    missing = text_only = 0
    for n, entry in enumerate(data):
        where = f"{json_path} entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise DataError(f"{where}: missing field 'conversations' (a list of turns)")
        where += f" (id {entry.get('id')!r})"
        if "image" not in entry:
            text_only += 1
            continue
        many = isinstance(entry["image"], list)
        rels = entry["image"] if many else [entry["image"]]
        if not rels or not all(isinstance(rel, str) for rel in rels):
            raise DataError(f"{where}: field 'image' must be a file name or a list of them")
        paths = [os.path.join(image_root, rel) for rel in rels]
        if not all(os.path.exists(p) for p in paths):
            missing += 1
            continue
        images = [_open_image(p, f"{where} field 'image'") for p in paths] if load_images else paths
        turns = entry["conversations"]
        if len(turns) < 2 or len(turns) % 2:
            raise DataError(f"{where}: field 'conversations' needs human/gpt pairs, got {len(turns)} turns")
        for k in range(0, len(turns), 2):
            human, gpt = turns[k], turns[k + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                    and gpt.get("from") == "gpt" and isinstance(human.get("value"), str)
                    and isinstance(gpt.get("value"), str)):
                raise DataError(f"{where}: field 'conversations' turns {k}-{k + 1}: expected a 'human' then a "
                                f"'gpt' turn, each with a string 'value'")
            rid = str(entry.get("id", n)) + (f"_{k // 2}" if k else "")
            yield dict(image=images if many else images[0], instruction=human["value"].replace("<image>", "").strip(),
                       state=None, action=None, reasoning=gpt["value"], domain="mm", id=rid)
    if missing or text_only:
        print(f"read_llava: {json_path}: skipped {missing} entries whose image file is missing "
              f"and {text_only} text-only entries")


def read_llava(json_path, image_root, load_images=True):
    """All multimodal records of a LLaVA-format JSON (see iter_llava)."""
    return list(iter_llava(json_path, image_root, load_images))


# ------------------------------------------------------------------------------------------- mixing

def mixed_batches(robot, mm, batch_size, mm_ratio, seed=0, rank=0, world_size=1, start=0):
    """Endless batches of `batch_size` records: round(batch_size * mm_ratio) multimodal, the rest robot.

    The generalist's mixture (Eq. 3); each record keeps its domain, which Eq. 7 routes on. Each domain is
    read as a stream of seeded permutations, a fresh one per epoch; batch b of rank r takes stream
    positions (b * world_size + r) * n + k. So the same seed gives the same batches, ranks under torchrun
    never share a record within an epoch, and `start` (one int: the batch index) resumes at a data position
    without replaying what came before. `robot` and `mm` are sequences (len and indexing).
    """
    n_mm = int(round(batch_size * mm_ratio))
    if not 0 <= mm_ratio <= 1 or not 0 <= rank < world_size:
        raise DataError(f"mixed_batches: need 0 <= mm_ratio <= 1 and 0 <= rank < world_size, "
                        f"got mm_ratio={mm_ratio}, rank={rank}, world_size={world_size}")
    streams = [(robot, batch_size - n_mm, "robot"), (mm, n_mm, "multimodal")]
    for records, n, name in streams:
        if n and not len(records):
            raise DataError(f"mixed_batches: the batch needs {n} {name} records per batch but none were given")
    perms = {}

    def take(d, records, n, b):
        out = []
        for k in range(n):
            epoch, i = divmod((b * world_size + rank) * n + k, len(records))
            if perms.get(d, (None,))[0] != epoch:
                perms[d] = (epoch, np.random.default_rng([seed, d, epoch]).permutation(len(records)))
            out.append(records[int(perms[d][1][i])])
        return out

    b = start
    while True:
        yield [r for d, (records, n, _) in enumerate(streams) for r in take(d, records, n, b)]
        b += 1


# ------------------------------------------------------------------------------ LeRobot v2.x / v3.0

def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading LeRobot datasets needs pyarrow: pip install pyarrow") from None
    return pq, pc, pa


def _read_parquet(path, columns=(), only=False):
    """A parquet table that must hold `columns` (and, with only=True, just them: a v3.0 file holds many
    episodes and cameras, so a reader loads no more than it needs)."""
    pq = _pyarrow()[0]
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        names = pq.read_schema(path).names
        table = None if set(columns) - set(names) else pq.read_table(path, columns=list(columns) if only else None)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for broken files
        raise DataError(f"{path}: unreadable parquet ({e})") from None
    if table is None:
        raise DataError(f"{path}: missing column(s) {', '.join(c for c in columns if c not in names)}")
    return table


def lerobot_meta(root):
    """meta/info.json, the task table and the per-episode metadata of a LeRobot v2.x or v3.0 dataset.

    v2.x: meta/tasks.jsonl {"task_index", "task"}, meta/episodes.jsonl {"episode_index", "tasks", "length"},
    one parquet (and one mp4 per camera) per episode. v3.0: meta/tasks.parquet (task_index, task),
    meta/episodes/chunk-*/file-*.parquet whose rows say which data/video file holds each episode
    ("data/chunk_index", "videos/<key>/from_timestamp", ...), several episodes per file.
    """
    info_path = os.path.join(root, "meta", "info.json")
    if not os.path.exists(info_path):
        raise DataError(f"{root}: unknown layout (no meta/info.json, so not a LeRobot dataset)")
    info = _load_json(info_path)
    for field in ("codebase_version", "features", "data_path", "fps"):
        if field not in info:
            raise DataError(f"{info_path}: missing field '{field}'")
    version = str(info["codebase_version"])
    if version not in ("v2.0", "v2.1", "v3.0"):
        raise DataError(f"{info_path}: field 'codebase_version' is {version!r}; this reader knows v2.0, v2.1, v3.0")
    meta = os.path.join(root, "meta")
    if version.startswith("v2"):
        rows = _jsonl(os.path.join(meta, "tasks.jsonl"), ("task_index", "task"))
        tasks = {r["task_index"]: r["task"] for _, r in rows}
        episodes = [r for _, r in _jsonl(os.path.join(meta, "episodes.jsonl"), ("episode_index",))]
    else:
        path = os.path.join(meta, "tasks.parquet")
        table = _read_parquet(path, ("task_index",))
        name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)  # pandas' index
        if name is None:
            raise DataError(f"{path}: missing column task")
        tasks = dict(zip(table["task_index"].to_pylist(), table[name].to_pylist()))
        files = sorted(glob.glob(os.path.join(meta, "episodes", "chunk-*", "file-*.parquet")))
        if not files:
            raise DataError(f"{meta}/episodes: no chunk-*/file-*.parquet (LeRobot v3.0 episode metadata)")
        episodes = []
        for path in files:
            table = _read_parquet(path, ("episode_index", "data/chunk_index", "data/file_index"))
            episodes += table.select([c for c in table.column_names if not c.startswith("stats/")]).to_pylist()
    return dict(root=root, info=info, version=version, tasks=tasks,
                episodes=sorted(episodes, key=lambda e: e["episode_index"]))


def _feature_names(feature):
    names = (feature or {}).get("names")
    return list(next(iter(names.values()))) if isinstance(names, dict) else list(names or [])


def lerobot_state(states, names, robot_type=""):
    """observation.state rows (T, D) -> our state: x, y, z, roll, pitch, yaw, gripper where the layout is known.

    Community Bridge (names x y z roll pitch yaw pad gripper): the pad is dropped. Fractal (x y z rx ry rz
    rw gripper): the quaternion (x, y, z, w) becomes roll/pitch/yaw (extrinsic xyz, as scipy's
    as_euler("xyz")), and on google_robot the stored gripper, RT-1's gripper_closed (OXE state_obs_keys),
    is flipped to our 1 = open. Other layouts (own robots, two arms) are kept as they are.
    """
    s = np.asarray(states, dtype=np.float64)
    if "pad" in names:
        return s[:, [i for i, n in enumerate(names) if n != "pad"]].astype(np.float32)
    if names[3:7] == ["rx", "ry", "rz", "rw"]:
        x, y, z, w = s[:, 3], s[:, 4], s[:, 5], s[:, 6]
        roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
        pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1, 1))
        yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
        grip = 1 - s[:, 7] if robot_type == "google_robot" else s[:, 7]
        return np.stack([s[:, 0], s[:, 1], s[:, 2], roll, pitch, yaw, grip], 1).astype(np.float32)
    return s.astype(np.float32)


def _decode_video(path, timestamps, where, tolerance_s=1e-3):
    """Frames of an mp4 at `timestamps` (s): seek to the keyframe before the first, decode forward, take the
    nearest frame (LeRobot's rule); a frame further than tolerance_s from its timestamp is an error."""
    try:
        import av
    except ImportError:
        raise ImportError("decoding LeRobot videos needs PyAV: pip install av") from None
    if not os.path.exists(path):
        raise DataError(f"{where}: video file not found: {path}")
    lo, hi = min(timestamps), max(timestamps)
    times, images = [], []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            container.seek(int(lo / stream.time_base), stream=stream)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time >= lo - tolerance_s:
                    times.append(frame.time)
                    images.append(frame.to_image())
                    if frame.time >= hi - tolerance_s:
                        break
    except av.FFmpegError as e:
        raise DataError(f"{where}: cannot decode video {path} ({e})") from None
    times, out = np.asarray(times), []
    for ts in timestamps:
        j = int(np.argmin(np.abs(times - ts))) if len(times) else None
        if j is None or abs(times[j] - ts) > tolerance_s:
            raise DataError(f"{where}: no frame within {tolerance_s}s of timestamp {ts:.4f} in {path}")
        out.append(images[j])
    return out


def _video_fmt(row, key, chunk, ep):
    """The fields of info.json's video_path template, v2.x and v3.0 alike."""
    return dict(video_key=key, episode_chunk=chunk, episode_index=ep,
                chunk_index=row.get(f"videos/{key}/chunk_index"), file_index=row.get(f"videos/{key}/file_index"))


@dataclass(frozen=True)
class LazyFrame:
    """One LeRobot frame, decoded only when a batch needs it (open_image): a row of a parquet image
    column, or a timestamp of an mp4. Records of a set far larger than RAM (Bridge, Fractal) hold these."""
    path: str                # the parquet file, or the mp4
    key: str = ""            # parquet: the image column
    row: int = -1            # parquet: the row within the file; -1 = a video frame
    timestamp: float = 0.0   # video: seconds into the file
    root: str = ""           # parquet: the dataset root, for image structs that hold a path


@functools.lru_cache(maxsize=64)
def _row_group_ends(path):
    md = _pyarrow()[0].ParquetFile(path).metadata
    return np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])


@functools.lru_cache(maxsize=8)
def _row_group_column(path, key, group):
    """One row group of one image column: random access reads a group, not the file (kept for neighbours)."""
    return _pyarrow()[0].ParquetFile(path).read_row_group(group, columns=[key]).column(key).to_pylist()


def open_image(x, where=""):
    """A PIL image from what a record holds: a PIL image, a file path or a LazyFrame."""
    if isinstance(x, Image.Image):
        return x
    if not isinstance(x, LazyFrame):
        return _open_image(x, where or str(x))
    where = where or f"{x.path} field '{x.key or 'video'}'"
    if x.row < 0:
        return _decode_video(x.path, [x.timestamp], where)[0].convert("RGB")
    ends = _row_group_ends(x.path)
    group = int(np.searchsorted(ends, x.row, side="right"))
    cell = _row_group_column(x.path, x.key, group)[x.row - (ends[group - 1] if group else 0)]
    if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
        raise DataError(f"{where} row {x.row}: expected an image struct {{bytes, path}}")
    return _open_image(cell["bytes"] or os.path.join(x.root, cell["path"]), f"{where} row {x.row}")


def _lerobot_episode(meta, row, cameras, cache, load_images):
    info, root, ep = meta["info"], meta["root"], row["episode_index"]
    features, chunk = info["features"], ep // info.get("chunks_size", 1000)
    if meta["version"].startswith("v2"):
        path = os.path.join(root, info["data_path"].format(episode_chunk=chunk, episode_index=ep))
    else:
        path = os.path.join(root, info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                           file_index=row["data/file_index"]))
    videos = [k for k in cameras if features[k]["dtype"] == "video"]
    columns = ["episode_index", "frame_index", "task_index", "observation.state", "action"] + \
        [k for k in cameras if k not in videos and load_images] + (["timestamp"] if videos else [])
    if cache.get("path") != path:  # v3.0 files hold many consecutive episodes: read each file once
        table = _read_parquet(path, columns, only=True)
        cache.update(path=path, table=table.append_column("__row", _pyarrow()[2].array(range(table.num_rows))))
    pc = _pyarrow()[1]
    table = cache["table"].filter(pc.equal(cache["table"]["episode_index"], ep)).sort_by("frame_index")
    where = f"{path} episode {ep}"
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows (the episodes metadata points here)")
    col = {c: table[c].to_pylist() for c in columns}
    dims = {"action": (features.get("action", {}).get("shape") or [None])[0], "observation.state": None}
    actions = [_vector(a, f"{where} row {i}", dims, "action") for i, a in enumerate(col["action"])]
    states = np.stack([_vector(s, f"{where} row {i}", dims, "observation.state")
                       for i, s in enumerate(col["observation.state"])])
    if info.get("robot_type") == "google_robot" and min(a[-1] for a in actions) < 0:
        raise DataError(f"{where} field 'action': a gripper value below 0 is RT-1's relative gripper_closedness_action "
                        "(+1 close, -1 open); expected the absolute form OXE's rt1 transform stores (1 open, 0 closed)")
    states = lerobot_state(states, _feature_names(features.get("observation.state")), info.get("robot_type", ""))
    if not load_images:  # references, decoded when a batch needs them (open_image)
        rows = table["__row"].to_pylist()
        frames = {k: [LazyFrame(os.path.join(root, info["video_path"].format(**_video_fmt(row, k, chunk, ep))),
                                timestamp=row.get(f"videos/{k}/from_timestamp", 0.0) + t) for t in col["timestamp"]]
                  if k in videos else [LazyFrame(path, key=k, row=r, root=root) for r in rows] for k in cameras}
    else:
        frames = {k: [None] * table.num_rows for k in cameras}
    for k in cameras if load_images else ():
        if k in videos:
            start = row.get(f"videos/{k}/from_timestamp", 0.0)  # v3.0: this episode's offset in a shared mp4
            frames[k] = _decode_video(os.path.join(root, info["video_path"].format(**_video_fmt(row, k, chunk, ep))),
                                      [start + t for t in col["timestamp"]], f"{where} field '{k}'")
            continue
        for i, cell in enumerate(col[k]):  # HF datasets' Image feature: struct {bytes, path}
            w = f"{where} row {i} field '{k}'"
            if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
                raise DataError(f"{w}: expected an image struct {{bytes, path}}")
            frames[k][i] = _open_image(cell["bytes"] or os.path.join(root, cell["path"]), w)
    task = col["task_index"][0]
    if task not in meta["tasks"]:
        raise DataError(f"{where} field 'task_index': task {task} is not in the task table")
    steps = [dict(image=frames[cameras[0]][i] if len(cameras) == 1 else [frames[k][i] for k in cameras],
                  state=states[i], action=actions[i], reasoning=None) for i in range(table.num_rows)]
    name = os.path.basename(os.path.normpath(root))
    return dict(id=f"{name}/{ep}", instruction=meta["tasks"][task], robot=info.get("robot_type", "unknown"),
                task=name, episode_index=ep, steps=steps)


def iter_lerobot(root, episodes=None, camera_keys=None, rank=0, world_size=1, load_images=True):
    """Yield the episodes of a LeRobot v2.x / v3.0 dataset one at a time; rank r of world_size reads
    every world_size-th episode from the r-th (its own shard under torchrun).

    camera_keys: image features to read, in this order (default: every image/video feature, as info.json
    lists them); one camera gives a PIL image per step, several a list. The instruction is the task of the
    episode's first frame; the state goes through lerobot_state. load_images=False gives LazyFrame
    references instead of decoded images (open_image decodes one), and reads no image bytes.
    """
    meta = lerobot_meta(root)
    features = meta["info"]["features"]
    visual = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video")]
    cameras = list(camera_keys or visual)
    for k in cameras:
        if k not in visual:
            raise DataError(f"{root}/meta/info.json field 'features': no image feature {k!r} "
                            f"(image features: {visual})")
    if not cameras:
        raise DataError(f"{root}/meta/info.json field 'features': no image or video feature")
    rows = meta["episodes"]
    if episodes is not None:
        wanted, known = set(episodes), {r["episode_index"] for r in rows}
        if wanted - known:
            raise DataError(f"{root}: episode(s) {sorted(wanted - known)[:5]} not in the episodes metadata "
                            f"({len(known)} episodes)")
        rows = [r for r in rows if r["episode_index"] in wanted]
    cache = {}
    for row in rows[rank::world_size]:
        yield _lerobot_episode(meta, row, cameras, cache, load_images)


def read_lerobot(root, episodes=None, camera_keys=None, load_images=True):
    """All (or the listed) episodes of a LeRobot v2.x / v3.0 dataset (see iter_lerobot)."""
    return list(iter_lerobot(root, episodes, camera_keys, load_images=load_images))


# ------------------------------------------------------------------------------------- LeRobot writer

LEROBOT_VERSIONS = ("v2.1", "v3.0")
LEROBOT_FILE_MB = 100  # v3.0: a data file and its mp4s close when one passes this size (LeRobot: 100 and 200)
# The bookkeeping columns every LeRobot dataset declares, besides the cameras, state and action.
LEROBOT_INDEX = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64",
                 "task_index": "int64"}


def _lerobot_stats(x, axes=0):
    """LeRobot's statistics of one feature over one episode: per-dimension min, max, mean, std, count."""
    x = np.asarray(x, dtype=np.float64)
    return dict(min=x.min(axes), max=x.max(axes), mean=x.mean(axes), std=x.std(axes), count=np.array([len(x)]))


def _merge_stats(stats):
    """Episodes' statistics -> the dataset's (meta/stats.json): pooled mean and variance, weighted by frames."""
    n = np.array([s["count"][0] for s in stats], dtype=np.float64)
    w = n.reshape((-1,) + (1,) * np.ndim(stats[0]["mean"])) / n.sum()
    means, stds = np.stack([s["mean"] for s in stats]), np.stack([s["std"] for s in stats])
    mean = (w * means).sum(0)
    return dict(min=np.min([s["min"] for s in stats], 0), max=np.max([s["max"] for s in stats], 0), mean=mean,
                std=np.sqrt((w * (stds ** 2 + (means - mean) ** 2)).sum(0)), count=np.array([int(n.sum())]))


def _lists(stats):
    return {k: {s: v.tolist() for s, v in d.items()} for k, d in stats.items()}


def _open_mp4(path, size, fps):
    """An H.264 mp4 being written: one keyframe every 2 frames (LeRobot's g=2, so a random frame decodes
    fast) and crf 10, near-lossless, since these frames are what a policy trains on."""
    try:
        import av
    except ImportError:
        raise ImportError("writing LeRobot videos needs PyAV: pip install av") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    container = av.open(path, "w")
    stream = container.add_stream("libx264", rate=fps, options={"g": "2", "crf": "10"})
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    return dict(container=container, stream=stream, frames=0, fps=fps, path=path)


def _mp4_add(mp4, images):
    import av
    for image in images:
        frame = av.VideoFrame.from_image(image)
        frame.pts, frame.time_base = mp4["frames"], Fraction(1, mp4["fps"])  # frame k shows at k / fps
        mp4["container"].mux(mp4["stream"].encode(frame))
        mp4["frames"] += 1


def _mp4_close(mp4):
    mp4["container"].mux(mp4["stream"].encode())  # flush the frames the encoder still holds
    mp4["container"].close()


def _lerobot_features(cameras, images, state_dim, action_dim, state_names, video, fps):
    """info.json's features: each camera's dtype and shape (H, W, 3), state and action, the index columns."""
    features = {}
    for key, image in zip(cameras, images):
        w, h = image.size
        features[key] = dict(dtype="video" if video else "image", shape=[h, w, 3], names=["height", "width", "channels"])
        if video:
            features[key]["info"] = {"video.height": h, "video.width": w, "video.codec": "h264",
                                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                     "video.channels": 3, "has_audio": False}
    features["observation.state"] = dict(dtype="float32", shape=[state_dim],
                                         names=list(state_names) if state_names else None)
    features["action"] = dict(dtype="float32", shape=[action_dim], names=None)
    return {**features, **{k: dict(dtype=t, shape=[1], names=None) for k, t in LEROBOT_INDEX.items()}}


def _hf_metadata(features):
    """The data files' schema metadata from which HF datasets takes the column types: LeRobot v2.1 loads
    its parquet without features of its own, so a PNG struct column decodes as an image only through this."""
    hf = {}
    for key, f in features.items():
        if f["dtype"] == "image":
            hf[key] = {"_type": "Image"}
        elif f["dtype"] != "video":
            value = {"dtype": f["dtype"], "_type": "Value"}
            hf[key] = value if f["shape"] == [1] else {"feature": value, "length": f["shape"][0], "_type": "Sequence"}
    return {"huggingface": json.dumps({"info": {"features": hf}})}


def _png_cell(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write_lerobot_files(episodes, out, version, video, fps, cameras, state_names, robot_type):
    """The body of write_lerobot, writing into the folder `out`; returns info.json's dict."""
    pq, _, pa = _pyarrow()
    v2, chunks_size = version == "v2.1", 1000
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF datasets' Image feature
    tasks, rows, stats, dims, features, total = {}, [], [], {"state": None, "action": None}, None, 0
    part = dict(chunk=0, file=0, mb=0.0, writer=None, mp4s={})  # v3.0: the data file (and mp4s) being filled

    def close_part():
        if part["writer"] is not None:
            part["writer"].close()
        for mp4 in part["mp4s"].values():
            _mp4_close(mp4)
        part.update(writer=None, mp4s={}, mb=0.0)

    for e, ep in enumerate(episodes):
        where = f"write_lerobot: episode {ep.get('id', e)!r}"
        if not ep.get("steps"):
            raise DataError(f"{where}: no steps")
        frames = [[open_image(x, where) for x in (s["image"] if isinstance(s["image"], (list, tuple)) else [s["image"]])]
                  for s in ep["steps"]]
        states = np.stack([_vector(s["state"], f"{where} step {t}", dims, "state") for t, s in enumerate(ep["steps"])])
        actions = np.stack([_vector(s["action"], f"{where} step {t}", dims, "action") for t, s in enumerate(ep["steps"])])
        if features is None:
            cameras = list(cameras or (["observation.images.image"] if len(frames[0]) == 1 else
                                       [f"observation.images.image_{c}" for c in range(len(frames[0]))]))
            if len(cameras) != len(frames[0]):
                raise DataError(f"{where}: {len(frames[0])} camera image(s) per step, {len(cameras)} camera key(s)")
            features = _lerobot_features(cameras, frames[0], dims["state"], dims["action"], state_names, video, fps)
            robot_type = robot_type or ep.get("robot", "unknown")
        for t, images in enumerate(frames):
            shapes = [[im.size[1], im.size[0], 3] for im in images]
            if shapes != [features[k]["shape"] for k in cameras]:
                raise DataError(f"{where} step {t} field 'image': {len(images)} image(s) of shape {shapes}, "
                                f"expected {[features[k]['shape'] for k in cameras]}")
        n, task = len(frames), tasks.setdefault(ep["instruction"], len(tasks))
        cam = {k: [images[c] for images in frames] for c, k in enumerate(cameras)}
        columns = {"observation.state": pa.array(states.tolist(), pa.list_(pa.float32(), states.shape[1])),
                   "action": pa.array(actions.tolist(), pa.list_(pa.float32(), actions.shape[1])),
                   "timestamp": pa.array(np.arange(n) / fps, pa.float32()), "frame_index": pa.array(range(n), pa.int64()),
                   "episode_index": pa.array([e] * n, pa.int64()), "index": pa.array(range(total, total + n), pa.int64()),
                   "task_index": pa.array([task] * n, pa.int64())}
        if not video:
            columns.update({k: pa.array([_png_cell(im) for im in cam[k]], image_type) for k in cameras})
        table = pa.table({k: columns[k] for k in features if k in columns}).replace_schema_metadata(
            _hf_metadata(features))
        ep_stats = {k: _lerobot_stats(np.stack([np.asarray(im) for im in cam[k]]) / 255.0, (0, 1, 2))
                    for k in cameras}
        ep_stats = {k: {s: v.reshape(3, 1, 1) if s != "count" else v for s, v in d.items()} for k, d in ep_stats.items()}
        ep_stats.update({"observation.state": _lerobot_stats(states), "action": _lerobot_stats(actions),
                         **{k: _lerobot_stats(table[k].to_numpy()[:, None]) for k in LEROBOT_INDEX}})
        stats.append(ep_stats)
        row = dict(episode_index=e, tasks=[ep["instruction"]], length=n)
        chunk = e // chunks_size
        if v2:
            path = os.path.join(out, f"data/chunk-{chunk:03d}/episode_{e:06d}.parquet")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path)
            for k in cameras if video else ():
                mp4 = _open_mp4(os.path.join(out, f"videos/chunk-{chunk:03d}/{k}/episode_{e:06d}.mp4"), cam[k][0].size, fps)
                _mp4_add(mp4, cam[k])
                _mp4_close(mp4)
        else:
            if part["writer"] is None:
                path = os.path.join(out, f"data/chunk-{part['chunk']:03d}/file-{part['file']:03d}.parquet")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                part["writer"] = pq.ParquetWriter(path, table.schema)
                part["mp4s"] = {k: _open_mp4(os.path.join(out, f"videos/{k}/chunk-{part['chunk']:03d}/"
                                                               f"file-{part['file']:03d}.mp4"), cam[k][0].size, fps)
                                for k in (cameras if video else ())}
            part["writer"].write_table(table)  # one row group per episode, as LeRobot writes them
            row.update({"data/chunk_index": part["chunk"], "data/file_index": part["file"],
                        "dataset_from_index": total, "dataset_to_index": total + n})
            for k, mp4 in part["mp4s"].items():
                start = mp4["frames"] / fps
                _mp4_add(mp4, cam[k])
                row.update({f"videos/{k}/chunk_index": part["chunk"], f"videos/{k}/file_index": part["file"],
                            f"videos/{k}/from_timestamp": start, f"videos/{k}/to_timestamp": mp4["frames"] / fps})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            row.update({f"stats/{k}/{s}": v.tolist() for k, d in ep_stats.items() for s, v in d.items()})
            part["mb"] += table.nbytes / 2 ** 20
            mp4_mb = max((os.path.getsize(m["path"]) for m in part["mp4s"].values()), default=0) / 2 ** 20
            if max(part["mb"], mp4_mb) >= LEROBOT_FILE_MB:
                close_part()
                part["chunk"], part["file"] = divmod(part["chunk"] * chunks_size + part["file"] + 1, chunks_size)
        rows.append(row)
        total += n
    close_part()
    if not rows:
        raise DataError("write_lerobot: no episodes")
    meta = os.path.join(out, "meta")
    os.makedirs(meta, exist_ok=True)
    info = dict(codebase_version=version, robot_type=robot_type, total_episodes=len(rows), total_frames=total,
                total_tasks=len(tasks))
    if v2:
        info.update(total_videos=len(rows) * len(cameras) * video, total_chunks=(len(rows) - 1) // chunks_size + 1)
    info.update(chunks_size=chunks_size, fps=fps, splits={"train": f"0:{len(rows)}"})
    if v2:
        info.update(data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
        with open(os.path.join(meta, "tasks.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(task_index=i, task=t)) + "\n" for t, i in tasks.items())
        with open(os.path.join(meta, "episodes.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(meta, "episodes_stats.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(episode_index=e, stats=_lists(s))) + "\n" for e, s in enumerate(stats))
    else:
        info.update(data_files_size_in_mb=LEROBOT_FILE_MB, video_files_size_in_mb=LEROBOT_FILE_MB,
                    data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
        # LeRobot writes tasks from pandas with the task string as the index; the metadata lets pandas restore it.
        index = {"index_columns": ["task"], "column_indexes": [], "columns": [
            {"name": c, "field_name": c, "pandas_type": p, "numpy_type": t, "metadata": None}
            for c, p, t in (("task_index", "int64", "int64"), ("task", "unicode", "object"))]}
        table = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()), "task": list(tasks)})
        pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(index)}), os.path.join(meta, "tasks.parquet"))
        os.makedirs(os.path.join(meta, "episodes", "chunk-000"))
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(meta, "episodes", "chunk-000", "file-000.parquet"))
    if not video:
        info["video_path"] = None
    info["features"] = features
    with open(os.path.join(meta, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(_lists({k: _merge_stats([s[k] for s in stats]) for k in stats[0]}), f, indent=2)
    with open(os.path.join(meta, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=4)
    return info


def write_lerobot(episodes, root, version="v3.0", video=False, fps=5, camera_keys=None, state_names=None,
                  robot_type=None, overwrite=False):
    """Write episodes as a LeRobot dataset that LeRobot's own LeRobotDataset opens and read_lerobot reads back.

    v2.1: one parquet per episode (data/chunk-*/episode_*.parquet), meta/tasks.jsonl, episodes.jsonl,
    episodes_stats.jsonl. v3.0: episodes packed into data/chunk-*/file-*.parquet (a new file past
    LEROBOT_FILE_MB), meta/tasks.parquet, meta/episodes/chunk-000/file-000.parquet (each episode's rows, video
    span and statistics). Both: meta/info.json and meta/stats.json; images as PNG bytes in the parquet, or
    with video=True one H.264 mp4 per camera (per episode in v2.1, per data file in v3.0).

    episodes: dict(id, instruction, robot, steps=[dict(image, state, action)]), consumed one at a time, so an
    iterator over a set larger than RAM works; an image may be a PIL image, a path or a LazyFrame. Reasoning
    has no LeRobot feature and is left out. camera_keys name the cameras (default observation.images.image,
    or observation.images.image_<c> for several); state_names go to info.json (read_lerobot maps known
    layouts, see lerobot_state); fps=5 is Bridge's control rate. The dataset is written under a temporary
    name and renamed into place, so `root` is never half-written; an existing `root` is replaced only with
    overwrite=True.
    """
    version = "v" + str(version).lstrip("v")
    if version not in LEROBOT_VERSIONS:
        raise DataError(f"write_lerobot: version {version!r}; this writer knows {', '.join(LEROBOT_VERSIONS)}")
    root = os.path.normpath(str(root))
    if os.path.exists(root) and not overwrite:
        raise DataError(f"{root}: already exists (--overwrite replaces it)")
    tmp, old = f"{root}.tmp{os.getpid()}", f"{root}.old{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        info = _write_lerobot_files(episodes, tmp, version, video, fps, camera_keys, state_names, robot_type)
        if os.path.exists(root):
            os.rename(root, old)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return info


# --------------------------------------------------------------------------- reasoning annotations

# ECoT's JSON keys -> our tags (ECoT's get_cot_database_keys); bboxes and gripper_position come from "features".
ECOT_KEYS = {"task": "TASK", "plan": "PLAN", "subtask_reason": "SUBTASK REASONING", "subtask": "SUBTASK",
             "move_reason": "MOVE REASONING", "move": "MOVE"}


def _episodes_of(data, json_path):
    """Walk {file_path: {episode_id: annotation}}, the layout ECoT and VLA-IT share."""
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected an object {{file_path: {{episode_id: ...}}}}, "
                        f"got {type(data).__name__}")
    for file_path, eps in data.items():
        if not isinstance(eps, dict):
            raise DataError(f"{json_path} file_path {file_path!r}: expected an object of episodes")
        for episode_id, ann in eps.items():
            where = f"{json_path} file_path {file_path!r} episode {episode_id}"
            if not isinstance(ann, dict):
                raise DataError(f"{where}: expected an object, got {type(ann).__name__}")
            yield (str(file_path), str(episode_id)), ann, where


def read_ecot(json_path):
    """ECoT's embodied_features_bridge.json -> {(file_path, episode_id): {step: reasoning dict}}.

    Layout: {file_path: {episode_id: {"metadata", "features": {"bboxes", "gripper_position", "move_primitive"},
    "reasoning": {"<step>": {task, plan, subtask, subtask_reason, move, move_reason}}}}}. Keys map to our
    tags by ECOT_KEYS; VISIBLE OBJECTS is "name [box], ..." from the step's bboxes ([prob, name, box]) and
    GRIPPER POSITION the next 5 gripper positions flattened, both as ECoT's own loader writes them.
    An episode with no "reasoning" has no annotated steps.
    """
    out = {}
    for key, ann, where in _episodes_of(_load_json(json_path), json_path):
        feats, steps = ann.get("features") or {}, {}
        boxes, grip = feats.get("bboxes") or [], feats.get("gripper_position") or []
        for step, r in (ann.get("reasoning") or {}).items():
            if not step.isdigit() or not isinstance(r, dict) or not set(r) & set(ECOT_KEYS):
                raise DataError(f"{where} field 'reasoning' step {step!r}: expected an integer step with "
                                f"{'/'.join(ECOT_KEYS)} keys")
            t = int(step)
            d = {ECOT_KEYS[k]: str(v) for k, v in r.items() if k in ECOT_KEYS and v not in (None, "")}
            if t < len(boxes) and boxes[t]:
                if not all(isinstance(b, list) and len(b) == 3 for b in boxes[t]):
                    raise DataError(f"{where} field 'features.bboxes' step {t}: expected [prob, name, box] entries")
                d["VISIBLE OBJECTS"] = ", ".join(f"{name} {box}" for _, name, box in boxes[t])
            if t < len(grip) and grip[t] is not None:
                future = []
                for j in range(5):
                    future += (grip[t + j] if t + j < len(grip) else None) or future[-2:]
                d["GRIPPER POSITION"] = str(future)
            steps[t] = d
        out[key] = steps
    return out


# VLA-IT's caption has no question in the file; InstructVLA samples one of its caption prompts.
CAPTION_QUESTION = "Describe the scene in the image."


def read_vla_it(json_path):
    """InstructVLA's VLA-IT annotations (bridge_instruction.json / fractal_instruction.json).

    Layout, from InstructVLA's data_pipeline/data_loading_example.ipynb and its RLDS loader:
        {file_path: {episode_id: {"features": {"move_primitive": [str | null, one per step]},
                                  "alt_instruction": {"Caption": str, "CR": [{"question", "answer"}, ...],
                                                      "CC": [...], "QA": [...]}   # optional}}}
    (CR: rephrased commands, CC: commands set in a context, QA: questions about the first frame.) Any
    other layout is rejected. Returns (reasoning, conversations): reasoning[(file_path, episode_id)] =
    {step: {"MOVE": move_primitive}} (read_ecot's shape, for attach_reasoning); conversations[...] =
    [(question, answer), ...] from Caption (asked as CAPTION_QUESTION), QA, CR, CC (see vla_it_records).
    """
    reasoning, conversations = {}, {}
    for key, ann, where in _episodes_of(_load_json(json_path), json_path):
        if "reasoning" in ann:
            raise DataError(f"{where}: field 'reasoning' is ECoT's (embodied_features_bridge.json): use read_ecot")
        moves = (ann.get("features") or {}).get("move_primitive")
        if not isinstance(moves, list):
            raise DataError(f"{where}: missing field 'features.move_primitive' (a list, one per step); expected "
                            f"InstructVLA's VLA-IT layout")
        reasoning[key] = {t: {"MOVE": str(m)} for t, m in enumerate(moves) if m}
        alt, pairs = ann.get("alt_instruction"), []
        if alt is not None:
            if not isinstance(alt, dict):
                raise DataError(f"{where} field 'alt_instruction': expected an object")
            if alt.get("Caption"):
                pairs.append((CAPTION_QUESTION, str(alt["Caption"])))
            for group in ("QA", "CR", "CC"):
                for i, qa in enumerate(alt.get(group) or []):
                    if not (isinstance(qa, dict) and all(isinstance(qa.get(k), str) for k in ("question", "answer"))):
                        raise DataError(f"{where} field 'alt_instruction.{group}[{i}]': "
                                        f"expected {{question, answer}} strings")
                    pairs.append((qa["question"], qa["answer"]))
        conversations[key] = pairs
    return reasoning, conversations


def attach_reasoning(episodes, annotations, key_fn, strict=True):
    """Join read_ecot / read_vla_it annotations to episodes by key_fn(episode) = (file_path, episode_id)
    and step index; steps with no reasoning keep what they had (None). A second set of annotations
    merges tag by tag into the first. An episode with no annotation is an error naming it (strict) or
    counted and printed (strict=False); an annotated step past the episode's end is always an error.
    Returns the number of episodes joined. Community LeRobot conversions of Bridge drop the RLDS
    file_path / episode_id, so key_fn must map an episode to them (e.g. from a table built with the RLDS set)."""
    unmatched, joined = [], 0
    for ep in episodes:
        file_path, episode_id = key_fn(ep)
        steps = annotations.get((str(file_path), str(episode_id)))
        if steps is None:
            unmatched.append((ep["id"], str(file_path), str(episode_id)))
            continue
        if steps and max(steps) >= len(ep["steps"]):
            raise DataError(f"annotation ({file_path!r}, {episode_id!r}) has step {max(steps)} but episode "
                            f"{ep['id']!r} has {len(ep['steps'])} steps")
        for t, r in steps.items():
            old = ep["steps"][t].get("reasoning")
            ep["steps"][t]["reasoning"] = {**old, **r} if isinstance(old, dict) else r
        joined += 1
    if unmatched and strict:
        raise DataError(f"attach_reasoning: {len(unmatched)} episode(s) have no annotation, e.g. "
                        f"(episode, file_path, episode_id) {unmatched[:3]}")
    if unmatched:
        print(f"attach_reasoning: {len(unmatched)} of {len(unmatched) + joined} episodes have no annotation")
    return joined


def vla_it_records(episodes, conversations, key_fn):
    """VLA-IT question/answer pairs -> multimodal records on the episode's first frame (the frame the
    annotator captioned and asked about); episodes without pairs give none."""
    return [dict(image=ep["steps"][0]["image"], instruction=q, state=None, action=None, reasoning=a,
                 domain="mm", id=f"{ep['id']}_{i}")
            for ep in episodes
            for i, (q, a) in enumerate(conversations.get(tuple(map(str, key_fn(ep))), []))]


def paper_reasoning(vla_it_paths, ecot_path=None):
    """The reasoning the paper prunes (Sec. 3.2.1): InstructVLA's VLA-IT annotations of both robots
    (bridge_instruction.json, fractal_instruction.json: the base model's 650 K), for attach_reasoning and
    vla_it_records. Option: ECoT's Bridge reasoning (embodied_features_bridge.json) instead of VLA-IT's on the
    episodes ECoT annotates. Returns (reasoning, conversations), both keyed by (file_path, episode_id)."""
    reasoning, conversations = {}, {}
    for path in vla_it_paths:
        r, c = read_vla_it(path)
        clash = set(r) & set(reasoning)
        if clash:
            raise DataError(f"{path}: episode {sorted(clash)[0]} is annotated in an earlier VLA-IT file too")
        reasoning.update(r)
        conversations.update(c)
    if ecot_path:
        reasoning.update((key, steps) for key, steps in read_ecot(ecot_path).items() if steps)
    return reasoning, conversations


# ------------------------------------------------------------------------------------------ inspect

def _robot_summary(episodes, cameras, max_episodes):
    instructions, actions, with_reasoning, n = set(), [], 0, 0
    for n, ep in enumerate(islice(episodes, max_episodes), 1):
        instructions.add(ep["instruction"])
        actions += [s["action"] for s in ep["steps"]]
        with_reasoning += sum(bool(reasoning_text(s.get("reasoning"))) for s in ep["steps"])
    if not actions:
        raise DataError("no frames")
    a = np.stack(actions)
    q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    return [f"episodes: {n}", f"frames: {len(a)}", f"cameras: {cameras}", f"instructions: {len(instructions)} distinct",
            f"reasoning: {with_reasoning}/{len(a)} frames ({100 * with_reasoning / len(a):.1f}%)",
            f"action: {a.shape[1]} dims", "  dim        q01        q99"] + \
        [f"  {d:3d} {lo:10.4f} {hi:10.4f}" for d, (lo, hi) in enumerate(zip(q01, q99))]


def inspect_path(path, max_episodes=None, image_root=None):
    """What a data path holds, as the lines `python data.py inspect PATH` prints. Every frame and image is
    decoded, so a corrupt one is found here rather than in a training run (--max-episodes limits the episodes)."""
    path = str(path)
    if os.path.exists(os.path.join(path, "meta", "info.json")):
        meta = lerobot_meta(path)
        feats = meta["info"]["features"]
        cams = [f"{k} {f['dtype']} {f.get('shape')}" for k, f in feats.items()
                if isinstance(f, dict) and f.get("dtype") in ("image", "video")]
        return [f"format: LeRobot {meta['version']} (fps {meta['info']['fps']})"] + \
            _robot_summary(iter_lerobot(path), cams, max_episodes)
    if os.path.isdir(path) or path.endswith(".jsonl"):
        first = next(iter_episodes(path, load_images=False), None)
        if first is None:
            raise DataError(f"{path}: episodes.jsonl holds no episodes")
        image = first["steps"][0]["image"]
        sizes = (_open_image(p, path).size for p in (image if isinstance(image, list) else [image]))
        cams = [f"{w}x{h}" for w, h in sizes]
        return ["format: episode folder (episodes.jsonl + images/)"] + \
            _robot_summary(iter_episodes(path), cams, max_episodes)
    if not path.endswith(".json"):
        raise DataError(f"{path}: unknown layout (expected an episode folder, a LeRobot dataset, or a .json file)")
    data = _load_json(path)
    if isinstance(data, list):
        recs = list(iter_llava(path, image_root or os.path.dirname(path), load_images=False))
        images = {p for r in recs for p in (r["image"] if isinstance(r["image"], list) else [r["image"]])}
        for p in sorted(images):
            _open_image(p, path)
        return ["format: LLaVA JSON", f"entries: {len(data)}", f"question/answer records: {len(recs)}",
                f"image files: {len(images)}"]
    first = next(iter(next(iter(data.values()), {}).values()), {}) if isinstance(data, dict) else {}
    if isinstance(first, dict) and "reasoning" in first:
        ann, kind = read_ecot(path), "ECoT (embodied_features_bridge.json)"
    else:
        ann, conv = read_vla_it(path)
        kind = f"VLA-IT (InstructVLA), {sum(map(len, conv.values()))} question/answer pairs"
    return [f"format: {kind}", f"episodes: {len(ann)}", f"annotated steps: {sum(map(len, ann.values()))}",
            f"episodes with reasoning: {sum(bool(s) for s in ann.values())}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="DualVLA data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print what a data path holds before a long job: format, episodes, "
                                       "frames, cameras, reasoning coverage, action q01/q99 per dimension")
    p.add_argument("path", help="an episode folder, a LeRobot v2.x/v3.0 dataset, or a LLaVA / ECoT / VLA-IT JSON")
    p.add_argument("--max-episodes", type=int, help="read only the first N episodes (default: all)")
    p.add_argument("--image-root", help="LLaVA JSON: folder its image paths are relative to (default: its folder)")
    p = sub.add_parser("export-lerobot", help="write an episode folder (e.g. from python tabletop.py --out "
                                              "data/demo) as a LeRobot dataset that LeRobot's own tools open")
    p.add_argument("src", help="an episode folder (episodes.jsonl + images/)")
    p.add_argument("out", help="the LeRobot dataset root to write")
    p.add_argument("--version", choices=("2.1", "3.0"), default="3.0", help="LeRobot codebase version (default 3.0)")
    p.add_argument("--video", action="store_true", help="encode each camera as H.264 mp4 (needs PyAV) instead of "
                                                        "PNG bytes in the parquet files")
    p.add_argument("--fps", type=int, default=5, help="frames per second of the episodes (default 5, Bridge's rate)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        if args.command == "export-lerobot":
            info = write_lerobot(iter_episodes(args.src, load_images=False), args.out, args.version, args.video,
                                 args.fps, overwrite=args.overwrite)
            print(f"wrote {args.out}: LeRobot {info['codebase_version']}, {info['total_episodes']} episodes, "
                  f"{info['total_frames']} frames, {info['total_tasks']} tasks, images as {'mp4' if args.video else 'PNG'}")
            return
        print("\n".join(inspect_path(args.path, args.max_episodes, args.image_root)))
    except (DataError, ImportError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever a library said
        sys.exit(2)


if __name__ == "__main__":
    main()
