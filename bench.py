"""Performance as ratios measured side by side in one run (no timed assertions anywhere else).

    python bench.py            # the table
    python bench.py --quick    # fewer repeats, < 2 min on 2 cores
    python bench.py --json     # one JSON object
    python bench.py --gpu [--gpu-compile] [--gpu-out FILE]   # absolute GPU figures of the paper preset (below)
    python bench.py --gpu --gpu-size tiny    # the same code path on a tiny model, in seconds on a CPU

Every figure is a ratio of two medians taken in this process, so
it holds across machines far better than an absolute time. Warm-up runs are excluded.

--gpu measures the paper preset's train steps on a random model of Qwen2.5-VL-3B's size
through train.py's own model setup and step functions: a plain fine-tune step and a `--kd dual`
distill step (student + two teachers resident), each as samples/s, tokens/s, MFU and peak memory, with
the settings that ran (attention implementation, --compile, fused AdamW, batches prefetched) and a
torch.profiler table of one more step's costliest GPU kernels and CPU ops.
"""
import argparse
import copy
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

import data
import distill
import prune
import tabletop
import train
from model import DiTExpert, DualVLA, VLAConfig, build_tiny, merge_adapters, tiny_backbone


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
    gpu: bool = False         # the GPU figures instead of the ratios
    gpu_size: str = "3b"      # 3b: Qwen2.5-VL-3B's size (needs CUDA) | tiny: build_tiny's, for a CPU test
    gpu_micro: int = 16       # per-GPU micro-batch: the paper preset's global 128 over 8 GPUs, no accumulation
    gpu_repeats: int = 5      # timed steps per figure (median), after 2 warm-up steps
    gpu_compile: bool = False  # train.py's --compile for the GPU figures (compiles in the warm-up steps)
    gpu_out: str = ""         # also write the GPU figures to this JSON file


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


def lerobot_reader_ratio(episodes, consume):
    """Records/s of the LeRobot reader (images decoded, as an eager read) / records/s a train step consumes;
    None without pyarrow (LeRobot's parquet needs it)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None, None
    with tempfile.TemporaryDirectory() as d:
        data.write_lerobot(episodes, os.path.join(d, "ds"), version="v2.1")
        n = sum(len(e["steps"]) for e in episodes)
        read = n / median_seconds(lambda: data.episode_records(data.read_lerobot(os.path.join(d, "ds"))), 3, 1)
    return read / consume, read


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
    p = model.prompter
    batch = p.left_padded([p.robot_prompt(robot[0])], p.pixels(p.images(robot[0])))

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
        extra["lerobot_reader_ratio"], extra["lerobot_records_per_s"] = lerobot_reader_ratio(episodes, consume)
        res["flow_head_cost"] = flow_head_cost(model, robot, cfg)
        res["kv_cache"] = kv_cache(model, robot, cfg)
        res["pruned_speedup"], extra["pruned"] = pruned_speedup(cfg)
    return dict(figures=res, extra=extra, threads=cfg.threads, backbone_params=n_params,
                model=f"random Qwen2.5-VL, hidden {cfg.hidden}, {cfg.layers} layers, image {cfg.image_size} px",
                torch=torch.__version__)


# ----------------------------------------------------------------------------- GPU figures

# Qwen/Qwen2.5-VL-3B-Instruct's config.json, so that a random model of the real size is built offline
# (transformers' Qwen2_5_VLConfig defaults are the 7B's): 3.75 B parameters. The tokenizer and image
# processor stay build_tiny's (its BPE splits some reasoning words that Qwen's would not: see tokens/sample).
GPU_SIZES = {
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2,
               text=dict(intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                  mrope_section=[16, 24, 24])),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)),
    "tiny": {},  # build_tiny's defaults
}
# The "dit" action expert's DINOv2 by size: 3b, InstructVLA's DINOv2-L/14 with 4 registers (the paper preset's
# facebook/dinov2-with-registers-large, random here); tiny, build_tiny_vision's, with the expert itself shrunk so
# the CPU test takes seconds.
EXPERT_SIZES = {
    "3b": dict(vision=dict(model_type="dinov2_with_registers", hidden_size=1024, num_hidden_layers=24,
                           num_attention_heads=16, intermediate_size=4096, num_register_tokens=4, patch_size=14,
                           image_size=518, layerscale_value=1e-5)),
    "tiny": dict(vision=dict(model_type="dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, patch_size=14, image_size=56),
                 head_width=64, head_layers=2, head_image_size=56),
}

# Dense bf16 tensor-core peak FLOP/s (datasheets, without sparsity); the first key found in the device
# name wins. NVL parts are clocked below their SXM siblings: no number rather than a wrong one.
PEAK_BF16 = (("NVL", None), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def paper_records(n_mm=32):
    """Demo-like robot frames (one expert episode per task, reasoning on every frame, as the generalist
    trains) and QA samples, rendered at 224 px: the paper preset's image side, so nothing is upsampled."""
    episodes = [tabletop.expert_episode(t, 10_000, 224) for t in tabletop.TASKS]
    return data.add_action_chunks(data.episode_records(episodes), 16), tabletop.qa_samples(123, n_mm, 224)


def expert_config(cfg, size):
    """The paper preset's stage config with the expert's size for `size` (tiny: a CPU-sized expert)."""
    sizes = {k: v for k, v in EXPERT_SIZES[size].items() if k != "vision"}
    return dataclasses.replace(cfg, **sizes)


def paper_student(cfg, ctx, size, robot):
    """The model train.py's stages train (train.new_model, add_lora, set_vlm_trainable, as_student), on a random
    backbone and DINOv2 made on the device: a 3B model's weights never touch the disk or the CPU."""
    from transformers import AutoConfig, AutoModel
    parts = tiny_backbone(**GPU_SIZES[size], device=ctx["device"])
    vision = dict(EXPERT_SIZES[size]["vision"])
    with torch.device(ctx["device"]):
        parts += (AutoModel.from_config(AutoConfig.for_model(vision.pop("model_type"), **vision)),)
    model = train.new_model(cfg, f"random Qwen2.5-VL ({size})", robot, ("overhead_camera",), parts,
                            head_vision=cfg.head_vision)
    train.set_vlm_trainable(train.add_lora(model, cfg), True, cfg)
    return train.as_student(model, cfg, ctx)


def paper_teacher(student, cfg, ctx):
    """A frozen teacher as train.build_models makes one (train.as_teacher: bf16 on GPU). Its weights are a
    copy of the student's: only its cost counts here. With --gpu-compile, as_teacher compiles the copy's
    layers anew (a deep copy of a compiled layer would still call the student's)."""
    backbone = merge_adapters(copy.deepcopy(student.backbone))  # checkpoints hold merged weights
    backbone.gradient_checkpointing_disable()  # train.py's teachers come from checkpoints, without it
    vision = None
    if isinstance(student.head, DiTExpert):
        from transformers import AutoModel
        with torch.device(ctx["device"]):
            vision = AutoModel.from_config(student.head.vision_config)
    teacher = DualVLA(student.config, backbone, student.tokenizer, student.image_processor, vision)
    return train.as_teacher(teacher, cfg, ctx)


def param_groups(model, trainable=False):
    """Parameters by the positions they are applied to: (LLM per token, vision blocks per patch, merger
    per image token); `trainable`: only those that take gradients. The tied embedding / lm_head matrix counts
    once, as the lm_head's matmul."""
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    visual = model.backbone.model.visual
    return np.array([count(model.backbone) - count(visual), count(visual) - count(visual.merger),
                     count(visual.merger)], dtype=np.float64)


def sequence_counts(model, records, reasoning=True):
    """(LLM tokens without padding, vision patches, image tokens) of the batch make_batch builds, and its
    padded token count."""
    b = model.make_batch(records, reasoning=reasoning)
    patches = int(b["image_grid_thw"].prod(-1).sum())
    merged = patches // model.backbone.config.vision_config.spatial_merge_size ** 2
    return np.array([int(b["attention_mask"].sum()), patches, merged], dtype=np.float64), b["input_ids"].numel()


def expert_forward_flops(model, records):
    """Forward FLOPs of the action expert for one robot sample, counted by torch's FlopCounterMode (matmuls,
    convolutions, attention): its context and one flow step, as a training forward runs them."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg, dev = model.config, model.queries.device
    b = model.to_device(model.make_batch([r for r in records if r["domain"] == "robot"][:1]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ctx = model.head.context(torch.zeros(1, cfg.n_queries, model.queries.shape[1], device=dev),
                                 b["head_pixels"], b["states"])
        model.head(torch.zeros(1, cfg.chunk, cfg.action_dim, device=dev), torch.zeros(1, device=dev), ctx)
    return counter.get_total_flops()


def model_flops(model, records, teachers):
    """Model FLOPs of one train step on `records` (MFU's numerator):

        Σ_groups (2·N + 2·N·[gradients flow here] + 2·N_trainable) · positions   student forward + backward
      + (2 + the expert's trainable share) · F · robot frames                     the student's action expert
      + 2 · N · positions over what each teacher is shown, + F per robot frame    teacher forwards (distill)

    N: the parameters applied at those positions (param_groups: LLM per token, vision per patch, merger per
    image token); backward is 2·N for the activation gradients, wherever anything at or before the group trains
    (the LLM: also the queries), plus 2·N_trainable for the weight gradients, so a full fine-tune counts 6·N
    and LoRA with a frozen vision tower 4·N on the LLM and 2·N on the vision tower (PaLM's definition without
    attention's L² term). F: the expert's forward FLOPs as run (expert_forward_flops), then F again for its
    activation gradients, computed even when it is frozen since the query states it reads train, and F times
    its trainable share for its weight gradients. Gradient checkpointing's
    recomputed forward is not model FLOPs. The teachers' views follow distill.dual_teacher_loss with
    kd="dual": the action teacher sees the robot frames without reasoning (its expert runs on them), the
    reasoning teacher the multimodal samples.
    """
    n, n_train = param_groups(model), param_groups(model, trainable=True)
    flows_vision = n_train[1] > 0
    flows_merger = flows_vision or n_train[2] > 0
    flows_llm = flows_merger or n_train[0] > 0 or model.queries.requires_grad
    per_position = 2 * n + 2 * n * np.array([flows_llm, flows_vision, flows_merger]) + 2 * n_train
    flops = per_position @ sequence_counts(model, records)[0]
    robot = [r for r in records if r["domain"] == "robot"]
    expert = expert_forward_flops(model, records) if robot and model.head is not None else 0.0
    if expert:
        head = list(model.head.parameters())
        share = sum(p.numel() for p in head if p.requires_grad) / sum(p.numel() for p in head)
        flops += (2 + share) * expert * len(robot)
    if teachers:
        mm = [r for r in records if r["domain"] == "mm"]
        flops += 2 * n @ sequence_counts(model, robot, reasoning=False)[0] + expert * len(robot) if robot else 0
        flops += 2 * n @ sequence_counts(model, mm)[0] if mm else 0
    return float(flops)


def step_figures(run, model, records, teachers, cfg, ctx):
    """Median step time after 2 warm-up steps, and what follows from it; peak memory since the reset
    (the first warm-up step creates the gradients and AdamW state, so they are in it), as allocated by
    tensors and as reserved by the caching allocator (what must fit on the device)."""
    cuda = ctx["device"].type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx["device"])
    seconds = median_seconds(run, cfg.gpu_repeats, warmup=2)
    counts, padded = sequence_counts(model, records)
    flops, peak = model_flops(model, records, teachers), peak_flops(ctx["device"])
    return dict(micro_batch=len(records), step_s=seconds, samples_per_s=len(records) / seconds,
                tokens_per_s=counts[0] / seconds, tokens_per_sample=counts[0] / len(records),
                padded_tokens_per_sample=padded / len(records), image_tokens_per_sample=counts[2] / len(records),
                model_tflop_per_step=flops / 1e12, mfu=flops / seconds / peak if peak else None,
                peak_memory_gib=torch.cuda.max_memory_allocated(ctx["device"]) / 2**30 if cuda else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved(ctx["device"]) / 2**30 if cuda else None)


def profile_step(run, device, n=8):
    """One more step under torch.profiler: its time, the GPU kernels' total time and count (a step with far
    less kernel time than wall time is bound by launches or the host), and the n costliest GPU kernels and
    CPU ops by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
    seconds = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    averages = prof.key_averages()

    def top(kind, key):
        rows = sorted((r for r in averages if r.device_type == kind), key=lambda r: -getattr(r, key))[:n]
        return [dict(name=r.key[:90], calls=r.count, self_ms=getattr(r, key) / 1e3) for r in rows]
    return dict(step_s=seconds, kernel_s=sum(e.time_range.elapsed_us() for e in kernels) / 1e6, kernels=len(kernels),
                top_gpu=top(DeviceType.CUDA, "self_device_time_total"), top_cpu=top(DeviceType.CPU, "self_cpu_time_total"))


def fitting_figures(name, make_run, model, batches, teachers, cfg, ctx, say):
    """step_figures at the first micro-batch of `batches` (largest first) that fits in device memory, and
    profile_step of that step."""
    for records in batches:
        try:
            run = make_run(records)
            result = step_figures(run, model, records, teachers, cfg, ctx)
            result["profile"] = profile_step(run, ctx["device"])
            say(f"{name}: micro-batch {len(records)}, {result['step_s']:.3f} s/step")
            return result
        except torch.cuda.OutOfMemoryError:
            pass
        # out of the except block, so the traceback's frames (and the activations they hold) are gone
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        say(f"{name}: out of memory at micro-batch {len(records)}")
    return dict(out_of_memory=[len(r) for r in batches])


def train_step(student, teachers, opt, cfg, ctx):
    """records -> one train.py step on them: distill_losses with teachers, vla_losses without (as train.train
    picks), then optimizer_step; its inputs built as train.train builds them (train.prefetched: with
    --prefetch the next step's during this one). Waits for the GPU so that a timer sees the whole step."""
    sync = torch.cuda.synchronize if ctx["device"].type == "cuda" else lambda: None

    def make_run(records):
        steps = train.prefetched(lambda: train.step_inputs(student, [records], True, ctx), cfg.prefetch)

        def run():
            batches = next(steps)
            if teachers:
                train.distill_losses(student, teachers, [records], 0, cfg, ctx, batches)
            else:
                train.vla_losses(student, [records], 0, cfg, ctx, True, batches)
            train.optimizer_step(student, opt, cfg)
            sync()
        return run
    return make_run


def gpu_figures(cfg):
    """The paper preset's fine-tune step and `--kd dual` distill step on one device, through
    train.py's model setup (new_model, as_student, as_teacher, make_optimizer) and step functions
    (vla_losses, distill_losses, optimizer_step): fp32 master weights under bf16 autocast on CUDA, bf16
    teachers, gradient checkpointing, AdamW (fused on CUDA), inputs prefetched, 224 px images, 64 queries,
    a flow head with chunk 16; --gpu-compile adds train.py's --compile.
    Both steps see the same batches, reasoning on every robot frame (pruned data would be shorter)."""
    t0, device = time.perf_counter(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)
    if device.type == "cpu":
        if cfg.gpu_size == "3b":  # 60 GB of fp32 weights, gradients and AdamW state
            raise SystemExit("bench.py --gpu: no CUDA device; the 3b size needs one "
                             "(--gpu-size tiny runs the same code path on the CPU)")
        torch.set_num_threads(cfg.threads)
    ctx = dict(rank=0, world=1, device=device)
    finetune, distill_cfg = (expert_config(train.stage_config(stage, dict(preset="paper", compile=cfg.gpu_compile)),
                                           cfg.gpu_size)
                             for stage in ("generalist", "distill"))
    robot, mm = paper_records()
    # train.py's mixture (mm_ratio of each micro-batch multimodal), at the micro-batch and its halvings
    sizes = [cfg.gpu_micro >> k for k in range(cfg.gpu_micro.bit_length())]
    batches = [next(data.mixed_batches(robot, mm, m, finetune.mm_ratio, finetune.seed)) for m in sizes]
    name, peak = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", peak_flops(device)
    say(f"device {name}; building a random Qwen2.5-VL of the {cfg.gpu_size} size")
    student = paper_student(finetune, ctx, cfg.gpu_size, robot)
    opt = train.make_optimizer(student, finetune)
    res = dict(device=name, torch=torch.__version__, transformers=transformers.__version__, size=cfg.gpu_size,
               params=sum(p.numel() for p in student.parameters()),
               backbone_params=sum(p.numel() for p in student.backbone.parameters()),
               attention=student.backbone.config._attn_implementation, compile=finetune.compile,
               fused_adamw=bool(opt.defaults["fused"]), prefetch=finetune.prefetch,
               bf16_autocast=device.type == "cuda" and finetune.bf16, grad_checkpointing=finetune.grad_checkpointing,
               peak_bf16_tflops=peak / 1e12 if peak else None, repeats=cfg.gpu_repeats,
               image_size=finetune.image_size, n_queries=finetune.n_queries, mm_ratio=finetune.mm_ratio,
               action_expert=finetune.action_expert, lora_rank=finetune.lora_rank,
               trainable_params=sum(p.numel() for p in student.parameters() if p.requires_grad),
               expert_params=sum(p.numel() for p in student.head.parameters()),
               expert_gflop_per_sample=expert_forward_flops(student, robot) / 1e9)
    say(f"student: {res['params'] / 1e9:.3f} B parameters ({res['trainable_params'] / 1e6:.1f} M trained: LoRA r "
        f"{res['lora_rank']}, the {res['action_expert']} expert frozen), {res['attention']} attention, "
        f"compile {'on' if res['compile'] else 'off'}")
    res["finetune"] = fitting_figures("finetune", train_step(student, (), opt, finetune, ctx), student, batches, (),
                                      cfg, ctx, say)
    try:
        teachers = tuple(paper_teacher(student, distill_cfg, ctx) for _ in range(2))
    except torch.cuda.OutOfMemoryError:
        teachers = None
    if teachers is None:
        say("distill: out of memory building the two teachers")
        res["distill"] = dict(out_of_memory=["teachers"])
    else:
        distill.check_teachers(student, *teachers)
        say("teachers: 2 frozen copies of the student" + (", bf16" if device.type == "cuda" else ""))
        res["distill"] = fitting_figures("distill", train_step(student, teachers, opt, distill_cfg, ctx), student,
                                         batches, teachers, cfg, ctx, say)
    res["wall_s"] = time.perf_counter() - t0
    return res


def gpu_table(res):
    def cell(fig, key, fmt):
        v = fig.get(key)
        return "n/a" if v is None else format(v, fmt)
    rows = [f"{res['device']}, torch {res['torch']}: random Qwen2.5-VL ({res['size']}), {res['params'] / 1e9:.3f} B "
            f"params ({res['trainable_params'] / 1e6:.1f} M trained, LoRA r {res['lora_rank']}), "
            f"{res['action_expert']} expert {res['expert_params'] / 1e6:.1f} M params, "
            f"{res['expert_gflop_per_sample']:.1f} GFLOP forward a sample, image {res['image_size']} px, "
            f"{res['n_queries']} queries, median of {res['repeats']} steps; "
            f"{res['attention']} attention, compile {'on' if res['compile'] else 'off'}, fused AdamW "
            f"{'on' if res['fused_adamw'] else 'off'}, prefetch {'on' if res['prefetch'] else 'off'}",
            "| step | micro-batch | s/step | samples/s | tokens/s | tokens/sample | TFLOP/step | MFU | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for step in ("finetune", "distill"):
        fig = res[step]
        if "out_of_memory" in fig:
            rows.append(f"| {step} | out of memory at {fig['out_of_memory']} | | | | | | | |")
            continue
        rows.append(f"| {step} | {fig['micro_batch']} | {fig['step_s']:.3f} | {fig['samples_per_s']:.1f} | "
                    f"{fig['tokens_per_s']:,.0f} | {fig['tokens_per_sample']:.0f} | "
                    f"{fig['model_tflop_per_step']:.1f} | {cell(fig, 'mfu', '.1%')} | "
                    f"{cell(fig, 'peak_memory_gib', '.1f')} |")
    for step in ("finetune", "distill"):
        prof = res[step].get("profile")
        if prof is None:
            continue
        rows += ["", f"{step}, one profiled step: {prof['step_s']:.3f} s, {prof['kernel_s']:.3f} s of GPU kernels "
                     f"in {prof['kernels']:,} launches", "| self time: GPU kernel | calls | ms | CPU op | calls | ms |",
                 "|---|---|---|---|---|---|"]
        for k in range(max(len(prof["top_gpu"]), len(prof["top_cpu"]))):
            cols = [(r["name"][:60], r["calls"], f"{r['self_ms']:.1f}") if r else ("", "", "")
                    for r in (prof[t][k] if k < len(prof[t]) else None for t in ("top_gpu", "top_cpu"))]
            rows.append("| " + " | ".join(str(c) for col in cols for c in col) + " |")
    return "\n".join(rows)


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
    p.add_argument("--gpu", action="store_true", help="the GPU figures of the paper preset instead")
    p.add_argument("--gpu-size", choices=tuple(GPU_SIZES), default=d.gpu_size,
                   help="3b: Qwen2.5-VL-3B's size; tiny: a CPU-sized test of the same path (default %(default)s)")
    p.add_argument("--gpu-micro", type=int, default=d.gpu_micro,
                   help="per-GPU micro-batch, halved until it fits (default %(default)s)")
    p.add_argument("--gpu-repeats", type=int, default=d.gpu_repeats, help="timed steps (default %(default)s)")
    p.add_argument("--gpu-compile", action="store_true", help="train.py's --compile for the GPU figures")
    p.add_argument("--gpu-out", default=d.gpu_out, help="write the GPU figures to this JSON file too")
    a = p.parse_args(argv)
    cfg = BenchConfig(quick=a.quick, json=a.json, threads=a.threads, demo=a.demo, repeats=5 if a.quick else d.repeats,
                      gpu=a.gpu, gpu_size=a.gpu_size, gpu_micro=a.gpu_micro, gpu_repeats=a.gpu_repeats,
                      gpu_compile=a.gpu_compile, gpu_out=a.gpu_out)
    result = gpu_figures(cfg) if cfg.gpu else run(cfg)
    if cfg.gpu and cfg.gpu_out:
        data.atomic_write(cfg.gpu_out, json.dumps(result, indent=1))
    print(json.dumps(result) if cfg.json else (gpu_table if cfg.gpu else table)(result), flush=True)
    return result


if __name__ == "__main__":
    main()
