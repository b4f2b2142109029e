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
    LeRobot v2.x/3.0 meta/info.json, meta/tasks.*, meta/episodes*, data/*.parquet, videos/*.mp4 (lerobot_format.py)
    ECoT             embodied_features_bridge.json, joined by file path + episode id + step (read_ecot)
    VLA-IT           InstructVLA's bridge_instruction.json / fractal_instruction.json          (read_vla_it)
    the paper's mix  VLA-IT for both robots, ECoT's Bridge reasoning as an option        (paper_reasoning)

Bad input raises DataError naming the file, line/row/episode and field. `python data.py inspect PATH`
prints what a path holds before a long job; `python data.py export-lerobot SRC OUT` writes an episode
folder as a LeRobot v2.1/v3.0 dataset.
"""
import argparse
import json
import os
import re
import sys
from itertools import islice

import numpy as np
from PIL import Image

from files import DataError, decode_image, float_vector, jsonl_rows, load_json
# The LeRobot format is one of the readers (and the export's writer); its module holds it whole.
from lerobot_format import iter_lerobot, lerobot_meta, open_image, read_lerobot, write_lerobot

# ECoT's tag order; a reasoning dict is serialised in this order, missing tags skipped.
REASONING_TAGS = ("TASK", "PLAN", "VISIBLE OBJECTS", "SUBTASK REASONING", "SUBTASK",
                  "MOVE REASONING", "MOVE", "GRIPPER POSITION")


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
    for where, ep in jsonl_rows(jsonl, ("id", "instruction", "steps")):
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
            images = [decode_image(p, f"{w} field 'image'") for p in paths] if load_images else paths
            steps.append({"reasoning": None, **step, "image": images if isinstance(step["image"], list) else images[0],
                          "state": float_vector(step["state"], w, dims, "state"),
                          "action": float_vector(step["action"], w, dims, "action")})
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
    data = load_json(json_path)
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
        images = [decode_image(p, f"{where} field 'image'") for p in paths] if load_images else paths
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
    for key, ann, where in _episodes_of(load_json(json_path), json_path):
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
    for key, ann, where in _episodes_of(load_json(json_path), json_path):
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
        sizes = (decode_image(p, path).size for p in (image if isinstance(image, list) else [image]))
        cams = [f"{w}x{h}" for w, h in sizes]
        return ["format: episode folder (episodes.jsonl + images/)"] + \
            _robot_summary(iter_episodes(path), cams, max_episodes)
    if not path.endswith(".json"):
        raise DataError(f"{path}: unknown layout (expected an episode folder, a LeRobot dataset, or a .json file)")
    data = load_json(path)
    if isinstance(data, list):
        recs = list(iter_llava(path, image_root or os.path.dirname(path), load_images=False))
        images = {p for r in recs for p in (r["image"] if isinstance(r["image"], list) else [r["image"]])}
        for p in sorted(images):
            decode_image(p, path)
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
