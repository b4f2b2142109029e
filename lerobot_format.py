"""LeRobot datasets, v2.x and v3.0: the reader (episodes of per-frame records, images decoded only when a batch
needs them) and the writer behind `python data.py export-lerobot`. data.py re-exports read_lerobot,
iter_lerobot, write_lerobot and lerobot_meta beside its other readers.

    v2.x  meta/info.json, meta/tasks.jsonl, meta/episodes.jsonl; one parquet (and one mp4 per camera) per episode
    v3.0  meta/info.json, meta/tasks.parquet, meta/episodes/chunk-*/file-*.parquet; several episodes per file
"""
import functools
import glob
import io
import json
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from files import DataError, decode_image, float_vector, jsonl_rows, load_json


# ------------------------------------------------------------------------------ reader

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
    info = load_json(info_path)
    for field in ("codebase_version", "features", "data_path", "fps"):
        if field not in info:
            raise DataError(f"{info_path}: missing field '{field}'")
    version = str(info["codebase_version"])
    if version not in ("v2.0", "v2.1", "v3.0"):
        raise DataError(f"{info_path}: field 'codebase_version' is {version!r}; this reader knows v2.0, v2.1, v3.0")
    meta = os.path.join(root, "meta")
    if version.startswith("v2"):
        rows = jsonl_rows(os.path.join(meta, "tasks.jsonl"), ("task_index", "task"))
        tasks = {r["task_index"]: r["task"] for _, r in rows}
        episodes = [r for _, r in jsonl_rows(os.path.join(meta, "episodes.jsonl"), ("episode_index",))]
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
        return decode_image(x, where or str(x))
    where = where or f"{x.path} field '{x.key or 'video'}'"
    if x.row < 0:
        return _decode_video(x.path, [x.timestamp], where)[0].convert("RGB")
    ends = _row_group_ends(x.path)
    group = int(np.searchsorted(ends, x.row, side="right"))
    cell = _row_group_column(x.path, x.key, group)[x.row - (ends[group - 1] if group else 0)]
    if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
        raise DataError(f"{where} row {x.row}: expected an image struct {{bytes, path}}")
    return decode_image(cell["bytes"] or os.path.join(x.root, cell["path"]), f"{where} row {x.row}")


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
    actions = [float_vector(a, f"{where} row {i}", dims, "action") for i, a in enumerate(col["action"])]
    states = np.stack([float_vector(s, f"{where} row {i}", dims, "observation.state")
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
            frames[k][i] = decode_image(cell["bytes"] or os.path.join(root, cell["path"]), w)
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


# ------------------------------------------------------------------------------ writer

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
        states = np.stack([float_vector(s["state"], f"{where} step {t}", dims, "state") for t, s in enumerate(ep["steps"])])
        actions = np.stack([float_vector(s["action"], f"{where} step {t}", dims, "action") for t, s in enumerate(ep["steps"])])
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
