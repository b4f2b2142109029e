"""Performance as ratios measured side by side in one run (no timed assertions anywhere else).

    python bench.py            # the table
    python bench.py --quick    # fewer repeats, < 2 min on 2 cores
    python bench.py --json     # one JSON object

Every figure is a ratio of two medians taken in this process, so
it holds across machines far better than an absolute time. Warm-up runs are excluded.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import data
import distill
import prune
import tabletop
from model import DualVLA, VLAConfig, build_tiny


@dataclass
class BenchConfig:
    quick: bool = False
    threads: int = 2          # torch.set_num_threads: fixed and printed, ratios depend on it
    repeats: int = 15         # timed runs per figure (median); --quick uses 5
    batch_size: int = 8
    hidden: int = 256         # the bench backbone: a random Qwen2.5-VL of this width ...
    layers: int = 4           # ... and depth (3.7 M params at 256/4: big enough that the backbone,
    image_size: int = 56      #     not Python overhead, dominates a step)
    demo: str = "runs/demo"   # trained checkpoints for pruned_speedup (python train.py --stage distill)
    json: bool = False


TARGETS = dict(train_overhead=("<=", 1.15), distill_overhead=("<=", 1.5), distill_memory=("<=", 1.6),
               kinematic_fps=(">=", 1e6), reader_ratio=(">=", 3.0), flow_head_cost=("<=", 1.3),
               kv_cache=("<=", 1.5), pruned_speedup=(">=", 1.25))


def median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def demo_records(n_episodes, image_size=64):
    eps = [tabletop.expert_episode(t, 10_000 + j, image_size) for t in tabletop.TASKS for j in range(n_episodes)]
    return eps, data.add_action_chunks(data.episode_records(eps), 16)


def mm_records(n):
    return tabletop.qa_samples(123, n)


def bench_model(path, cfg, head="flow"):
    torch.manual_seed(0)
    return DualVLA(VLAConfig(backbone=path, action_head=head, image_size=cfg.image_size, head_image_size=64))


def train_overhead(model, robot, cfg):
    """A specialist train step (forward + backward) of DualVLA / the bare backbone's on the same inputs."""
    batch = model.make_batch(robot[:cfg.batch_size])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def dualvla():
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def bare():
        model.zero_grad(set_to_none=True)
        model.backbone(**{k: batch[k] for k in keys}, labels=batch["labels"]).loss.backward()

    return median_seconds(dualvla, cfg.repeats) / median_seconds(bare, cfg.repeats)


def distill_step_fns(path, cfg, robot, mm):
    student, a_t, r_t = (bench_model(path, cfg) for _ in range(3))
    for t in (a_t, r_t):
        t.eval().requires_grad_(False)
    batch = student.make_batch(robot[:cfg.batch_size - cfg.batch_size // 4] + mm[:cfg.batch_size // 4])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        return run

    plain = step(lambda: student(batch)["loss"])
    dual = step(lambda: distill.dual_teacher_loss(student, a_t, r_t, batch, kd="dual")["loss"])
    return plain, dual, (student, a_t, r_t), opt


def distill_figures(path, cfg, robot, mm):
    """Time and memory of a `--kd dual` step / a plain fine-tune step on the same batch."""
    plain, dual, models, opt = distill_step_fns(path, cfg, robot, mm)
    mem = dict(plain=step_memory_mb(plain, models[:1], opt), dual=step_memory_mb(dual, models, opt))
    return median_seconds(dual, cfg.repeats) / median_seconds(plain, cfg.repeats), mem


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory_mb(step, models, opt):
    """Memory a train step holds at its peak: every model's weights, the gradients and optimizer state,
    and the activations autograd saves for backward (counted once per storage, weights excluded).

    CPU has no allocator peak counter like torch.cuda.max_memory_allocated and RSS is dominated by
    noise at this size, so we count what must be resident; teachers run under no_grad and save nothing.
    """
    step()  # the first step creates gradients and optimizer state
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    resident = tensor_bytes(t for m in models for t in list(m.parameters()) + list(m.buffers()))
    grads = tensor_bytes(p.grad for m in models for p in m.parameters() if p.grad is not None)
    state = tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return (resident + grads + state + sum(saved.values())) / 2**20


def kinematic_fps(cfg):
    """Frames/s of prune.kinematic_labels over many equal-length episodes stacked into one call."""
    rng = np.random.default_rng(0)
    n_eps, n = (500, 200) if cfg.quick else (2000, 200)
    pose = np.cumsum(rng.normal(size=(n_eps, n, 6)) * 0.01, axis=1)
    grip = (rng.random((n_eps, n)) > 0.02).astype(np.float64)
    return n_eps * n / median_seconds(lambda: prune.kinematic_labels(pose, grip), max(3, cfg.repeats // 3), 1)


def scene_fps(episodes, cfg):
    """Frames/s of prune.scene_labels (image features + the unsupervised boundary score) and of a
    trained detector over the same frames (not a ratio: it sizes the scene layer's share of a prune run)."""
    frames = [[s["image"] for s in ep["steps"]] for ep in episodes]
    n = sum(len(f) for f in frames)
    detector = prune.train_detector(episodes, {ep["id"]: np.flatnonzero(prune.phase_boundaries(ep)).tolist()
                                               for ep in episodes[:3]})
    run = lambda det: [prune.scene_labels(f, det) for f in frames]
    reps = max(3, cfg.repeats // 5)
    return n / median_seconds(lambda: run(None), reps, 1), n / median_seconds(lambda: run(detector), reps, 1)


def reader_ratio(episodes, model, robot, cfg):
    """Records/s of the episode reader / records/s one train step consumes (batch / step time)."""
    with tempfile.TemporaryDirectory() as d:
        data.write_episodes(episodes, d)
        n = sum(len(e["steps"]) for e in episodes)
        read = n / median_seconds(lambda: data.episode_records(data.read_episodes(d)), 3, 1)
    batch = model.make_batch(robot[:cfg.batch_size])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        opt.step()

    consume = cfg.batch_size / median_seconds(step, cfg.repeats)
    return read / consume, read, consume


@torch.no_grad()
def flow_head_cost(model, robot, cfg):
    """predict_action (prefix once + flow_steps Euler steps of the head) / one backbone forward."""
    model.eval()
    rec = robot[0]
    batch = model.make_batch([dict(rec, reasoning=None)])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    fwd = median_seconds(lambda: model.backbone(**{k: batch[k] for k in keys}), cfg.repeats)
    act = median_seconds(lambda: model.predict_action(rec["image"], rec["instruction"], rec["state"], reason=False),
                         cfg.repeats)
    return act / fwd


@torch.no_grad()
def kv_cache(model, robot, cfg):
    """Per-token generation time at 256 new tokens / at 32 (flat with a KV cache, growing without)."""
    model.eval()
    batch = model._left_padded([model._robot_prompt(robot[0])], model._pixels(model._images(robot[0])))

    def gen(n):
        return lambda: model._generate(batch, n, None, min_new_tokens=n)

    reps = max(3, cfg.repeats // 3)
    return (median_seconds(gen(256), reps, 1) / 256) / (median_seconds(gen(32), reps, 1) / 32)


@torch.no_grad()
def pruned_speedup(cfg):
    """Control-step latency, reasoning every step (generalist, unpruned) / on keyframes (DualVLA, pruned)."""
    ckpts = {k: os.path.join(cfg.demo, k, "model") for k in ("generalist", "distill")}
    if not all(os.path.isdir(p) for p in ckpts.values()):
        return None, {}
    lat, toks = {}, {}
    for name, path in ckpts.items():
        model = DualVLA.from_pretrained(path).eval()
        times, tokens = [], []
        for task in tabletop.TASKS:
            env = tabletop.make(task, seed=777)
            obs, _ = env.reset()
            for _ in range(4 if cfg.quick else 10):
                image = obs["image"][env.camera_names[0]]["rgb"]
                t0 = time.perf_counter()
                out = model.predict_action(image, env.get_language_instruction(), obs["state"], reason=True)
                times.append(time.perf_counter() - t0)
                tokens.append(out["n_tokens"])
                obs, _, done, _, _ = env.step(out["actions"][0])
                if done:
                    break
        lat[name], toks[name] = float(np.median(times)), float(np.mean(tokens))
    return lat["generalist"] / lat["distill"], {"tokens_per_step": toks}


def run(cfg):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(os.path.join(tmp, "bb"), hidden=cfg.hidden, layers=cfg.layers, heads=4, kv_heads=2,
                          vision_hidden=64)
        model = bench_model(path, cfg)
        n_params = sum(p.numel() for p in model.backbone.parameters())
        episodes, robot = demo_records(2 if cfg.quick else 4)
        mm = mm_records(16)
        res, extra = {}, {}
        res["train_overhead"] = train_overhead(model, robot, cfg)
        res["distill_overhead"], mem = distill_figures(path, cfg, robot, mm)
        res["distill_memory"], extra["distill_memory_mb"] = mem["dual"] / mem["plain"], mem
        res["kinematic_fps"] = kinematic_fps(cfg)
        extra["scene_fps"], extra["scene_fps_detector"] = scene_fps(episodes, cfg)
        res["reader_ratio"], read, consume = reader_ratio(episodes, model, robot, cfg)
        extra["reader_records_per_s"], extra["train_records_per_s"] = read, consume
        res["flow_head_cost"] = flow_head_cost(model, robot, cfg)
        res["kv_cache"] = kv_cache(model, robot, cfg)
        res["pruned_speedup"], extra["pruned"] = pruned_speedup(cfg)
    return dict(figures=res, extra=extra, threads=cfg.threads, backbone_params=n_params,
                model=f"random Qwen2.5-VL, hidden {cfg.hidden}, {cfg.layers} layers, image {cfg.image_size} px",
                torch=torch.__version__)


def table(result):
    rows = ["| figure | value | target | met |", "|---|---|---|---|"]
    for k, v in result["figures"].items():
        op, target = TARGETS[k]
        if v is None:
            rows.append(f"| `{k}` | n/a (needs runs/demo: python train.py --stage distill) | {op} {target:g} | |")
            continue
        met = v <= target if op == "<=" else v >= target
        val = f"{v:,.0f}" if v > 1000 else f"{v:.2f}"
        rows.append(f"| `{k}` | {val} | {op} {target:,g} | {'yes' if met else '**no**'} |")
    head = (f"torch {result['torch']}, {result['threads']} threads; {result['model']} "
            f"({result['backbone_params'] / 1e6:.1f} M backbone params)")
    return head + "\n\n" + "\n".join(rows) + "\n\n" + json.dumps(result["extra"])


def main(argv=None):
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 repeats and smaller sets (< 2 min on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--demo", default=d.demo, help="folder with generalist/ and distill/ checkpoints")
    a = p.parse_args(argv)
    cfg = BenchConfig(quick=a.quick, json=a.json, threads=a.threads, demo=a.demo, repeats=5 if a.quick else d.repeats)
    result = run(cfg)
    print(json.dumps(result) if cfg.json else table(result))


if __name__ == "__main__":
    main()
