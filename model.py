"""DualVLA's model: a Qwen2-VL-family backbone with learnable action queries and an action head.

One sequence per sample (NOTES §1 and §6):

    <|im_start|>user  [image tokens per camera]  What action should the robot take to {i}?<|im_end|>
    <|im_start|>assistant  [reasoning r]  <|act|>  [queries ×Q]            (flow head)
                                              <|act|>  [bin tokens ×chunk·A] <|im_end|>  (tokens head)
    multimodal sample:  ...user [image] question<|im_end|> <|im_start|>assistant  answer<|im_end|>

The reasoning and <|act|> are text targets (lm_loss, Eq. 3); a frame whose reasoning was pruned
has only <|act|> as its text target, so the model learns *when* to reason. The action is
conditioned on the reasoning, π_θ(a | o, i, r).

    query states (B,Q,H) ──► cond ──FiLM──┐
    camera images ──► conv ×4 ────────────┴──► spatial-softmax keypoints
    robot state, noisy chunk x_t, time t ─────► MLP ──► velocity or clean chunk (B, chunk, A)   (flow head)

The flow head is InstructVLA's action expert in miniature: it has its own image path (FACTS.md,
"Learning on CPU": without it a small VLM barely learns to act).
"""
import importlib.util
import itertools
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import normalize_action, reasoning_text, subtask_target, unnormalize_action

ACT, QUERY = "<|act|>", "<|query|>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
SYSTEM = "You are a helpful assistant."


class UserError(ValueError):
    """A bad path, flag or checkpoint; CLIs print it as one line and exit 2."""


@dataclass
class VLAConfig:
    backbone: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # hub name or local folder of any Qwen2/2.5/3-VL
    action_head: str = "flow"       # "flow" (InstructVLA-style expert) | "tokens" (OpenVLA-style bins)
    action_dim: int = 7             # xyz delta, rotation delta, gripper (14 for two arms)
    state_dim: int = 7              # x, y, z, roll, pitch, yaw, gripper
    chunk: int = 0                  # actions per prediction; 0 = 16 for flow, 1 for tokens
    n_queries: int = 8              # learnable action queries (InstructVLA uses 64)
    n_bins: int = 256               # OpenVLA's uniform bins over [-1, 1]
    flow_steps: int = 10            # Euler steps at inference
    flow_target: str = "velocity"   # the flow head predicts the velocity (π0) | the clean chunk ("action", x1-prediction)
    flow_time: str = "uniform"      # training time t: "uniform" | "beta" (InstructVLA/π0: Beta(1.5, 1), mass near the noise)
    flow_sigma_min: float = 0.0     # σ_min of the conditional flow path (InstructVLA: 1e-3); 0 = rectified flow
    action_expert: str = "cnn"      # flow head: "cnn" (small conv + MLP, CPU-sized) | "dit" (InstructVLA's transformer)
    head_vision: str = ""           # "dit": DINOv2 checkpoint (hub name or folder) of the expert's image encoder
    head_layers: int = 2            # "dit": transformer layers (InstructVLA: 12, width 768)
    image_size: int = 224           # robot frames' VLM input side, a multiple of patch × merge (28 for Qwen2.5-VL)
    min_pixels: int = 0             # multimodal images keep their size within [min_pixels, max_pixels] on the
    max_pixels: int = 0             #   backbone's grid (Qwen2-VL's native resolution); 0 = the backbone's own bound
    head_image_size: int = 64       # the action expert's own image path
    head_width: int = 256           # hidden width of the action expert
    cameras: tuple = ("image",)     # one image-token block per camera, in this order
    max_reasoning_tokens: int = 256
    prompt: str = "What action should the robot take to {instruction}?"

    def __post_init__(self):
        if self.action_head not in ("flow", "tokens"):
            raise UserError(f"action_head must be 'flow' or 'tokens', got {self.action_head!r}")
        if self.flow_target not in ("velocity", "action"):
            raise UserError(f"flow_target must be 'velocity' or 'action', got {self.flow_target!r}")
        if self.flow_time not in ("uniform", "beta"):
            raise UserError(f"flow_time must be 'uniform' or 'beta', got {self.flow_time!r}")
        if self.action_expert not in ("cnn", "dit"):
            raise UserError(f"action_expert must be 'cnn' or 'dit', got {self.action_expert!r}")
        if self.action_expert == "dit" and not self.head_vision and self.action_head == "flow":
            raise UserError("action_expert 'dit' needs head_vision: a DINOv2 checkpoint (model.build_tiny_vision)")
        if self.chunk == 0:
            self.chunk = 16 if self.action_head == "flow" else 1
        self.cameras = tuple(self.cameras)


# ----------------------------------------------------------------------------- action expert

class SpatialSoftmax(nn.Module):
    """Expected (x, y) of each feature map: K channels -> 2K keypoints (Levine et al.), learned temperature."""

    def __init__(self, temperature=0.05):
        super().__init__()
        # Sharp from the start: at temperature 1 a unit-scale map gives a near-uniform softmax whose
        # keypoints barely move with the image, and the head learns to ignore them.
        self.log_temperature = nn.Parameter(torch.full((1,), math.log(temperature)))  # 1-D: FSDP2 shards no scalars

    def forward(self, x):  # (B, K, H, W)
        B, K, H, W = x.shape
        p = (x.flatten(2) / self.log_temperature.exp()).softmax(-1).view(B, K, H, W)
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
        return torch.cat([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=1)  # (B, 2K)


class ImageEncoder(nn.Module):
    """Four strided convs, each normalised then FiLM-modulated by the query states, then keypoints.

    GroupNorm keeps the maps at unit scale: without it the default init shrinks them layer by layer
    until the spatial softmax is flat and the keypoints carry no image information at all.
    """

    def __init__(self, width, cond_dim, channels=(32, 32, 64, 64)):
        super().__init__()
        chans = (3,) + channels
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2 if i < 2 else 1, padding=1)
                                   for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])))
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in channels)
        self.films = nn.ModuleList(nn.Linear(cond_dim, 2 * c) for c in channels)
        self.keypoints = SpatialSoftmax()
        self.out = nn.Linear(2 * channels[-1], width)

    def forward(self, pixels, cond):  # (B, 3, h, w), (B, cond_dim)
        x = pixels
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            gamma, beta = film(cond)[..., None, None].chunk(2, dim=1)
            x = F.silu(norm(conv(x)) * (1 + gamma) + beta)
        return self.out(self.keypoints(x))  # (B, width)


def sample_flow_time(n, cfg, generator=None):
    """Training times of the flow loss, t in [0, 1): t = 0 is pure noise, t = 1 the action chunk.

    "beta" is InstructVLA's, after π0: t = 0.999 · (1 − z), z ~ Beta(1.5, 1), which puts the mass on the
    NOISY end (density ∝ √(1 − t/0.999)). π0 runs time the other way (t = 1 is noise) and draws t = 0.999·z + 0.001:
    the same emphasis. z = u^(2/3) inverts Beta(1.5, 1)'s CDF z^1.5, so one seeded uniform draw gives t."""
    u = torch.rand(n, generator=generator)
    return u if cfg.flow_time == "uniform" else 0.999 * (1 - u ** (2 / 3))


def flow_path(x1, noise, t, sigma_min):
    """InstructVLA's conditional flow (Lipman et al.): x_t = t·x1 + (1 − (1 − σ_min)·t)·x0 and its velocity
    x1 − (1 − σ_min)·x0; σ_min = 0 is the rectified flow. (B, chunk, A) ×2, (B,) -> x_t, velocity."""
    tt = t[:, None, None]
    return tt * x1 + (1 - (1 - sigma_min) * tt) * noise, x1 - (1 - sigma_min) * noise


def clean_to_velocity(x1_hat, x_t, t, sigma_min):
    """The velocity implied by a predicted clean chunk x̂1 at (x_t, t): solve flow_path for x0, then x1 − (1 − σ)·x0."""
    tt = t[:, None, None]
    x0 = (x_t - tt * x1_hat) / (1 - (1 - sigma_min) * tt)
    return x1_hat - (1 - sigma_min) * x0


def time_embedding(t, dim):
    """Sinusoidal embedding of the flow time t in [0, 1]: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ActionExpert(nn.Module):
    """Flow-matching action head: velocity v(x_t, t | query states, images, state), or with
    flow_target="action" the clean chunk x̂1, from which v = (x̂1 - x_t) / (1 - t) (the same flow,
    parameterised like DDPM's x0-prediction: its loss weighs each time by (1 - t)², and at small scale it
    learns as fast as plain regression, where velocity prediction lags far behind: README, "The miniature")."""

    def __init__(self, cfg: VLAConfig, hidden_size: int):
        super().__init__()
        w, n_act = cfg.head_width, cfg.chunk * cfg.action_dim
        self.cond = nn.Sequential(nn.Linear(cfg.n_queries * hidden_size, w), nn.SiLU(), nn.Linear(w, w))
        self.images = nn.ModuleList(ImageEncoder(w, w) for _ in cfg.cameras)
        self.state = nn.Linear(cfg.state_dim, w)
        self.inp = nn.Linear(n_act + w * (3 + len(cfg.cameras)), w)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 4 * w), nn.SiLU(),
                                                  nn.Linear(4 * w, w)) for _ in range(3))
        self.out = nn.Linear(w, n_act)
        self.locate = nn.Linear(w, 2)  # grounding probe on the first camera's features (the ground term)
        self.chunk, self.action_dim, self.width, self.target = cfg.chunk, cfg.action_dim, w, cfg.flow_target
        self.sigma_min = cfg.flow_sigma_min

    def context(self, query_states, head_pixels, state):
        """Everything the velocity depends on except (x_t, t): computed once per prediction."""
        c = self.cond(query_states.flatten(1).float())                              # (B, w)
        feats = [enc(head_pixels[:, k], c) for k, enc in enumerate(self.images)]     # cams × (B, w)
        return torch.cat([c, self.state(state)] + feats, dim=-1)

    def target_xy(self, ctx):
        """Where the first camera's features put the object of the current subtask: (B, 2) in [-1, 1]."""
        return self.locate(ctx[:, 2 * self.width:3 * self.width])

    def forward(self, x_t, t, ctx):  # (B, chunk, A), (B,), (B, ·) -> (B, chunk, A): velocity or x̂1
        h = self.inp(torch.cat([x_t.flatten(1), time_embedding(t, self.width), ctx], dim=-1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(-1, self.chunk, self.action_dim)

    def velocity(self, x_t, t, ctx):
        """The flow's velocity at (x_t, t), whichever target the head predicts (t < 1)."""
        pred = self(x_t, t, ctx)
        return pred if self.target == "velocity" else clean_to_velocity(pred, x_t, t, self.sigma_min)


class DiTExpert(nn.Module):
    """InstructVLA's action expert (its `ActionModelWithState`, vla/action_head.py): a DINOv2 image encoder
    FiLM-modulated by the mean query state, then a transformer over one sequence,

        [image tokens ×P | projected query states ×Q | state token | noisy actions ×chunk + time]
            ──► transformer ──► the action tokens, flattened ──► MLP ──► velocity or x̂1 (chunk, A)

    with InstructVLA's block-causal mask (image tokens see images; queries and state see images, queries and
    state; action tokens see everything). The transformer is torch's pre-norm encoder where InstructVLA uses a
    12-layer, 768-wide Llama from config; learned positions on the action tokens replace Llama's RoPE. The
    image tokens are the second-to-last DINOv2 layer's patch tokens (OpenVLA's FiLM backbone takes that layer;
    InstructVLA's copy passes an int where the set is meant and so reads an early layer). Dropout is 0.
    Same interface as ActionExpert: context once per prediction, then velocity per Euler step.
    """

    def __init__(self, cfg: VLAConfig, hidden_size: int, vision=None):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel
        if vision is None:
            try:
                vision = AutoModel.from_pretrained(cfg.head_vision)
                proc = AutoImageProcessor.from_pretrained(cfg.head_vision)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load head_vision {cfg.head_vision!r}: {str(e).splitlines()[0]}") from None
            mean, std = proc.image_mean, proc.image_std
        else:  # from_pretrained: architecture from the checkpoint, weights and statistics loaded after
            mean, std = [0.0] * 3, [1.0] * 3
        if len(cfg.cameras) != 1:
            raise UserError("action_expert 'dit' takes one camera (InstructVLA's SimplerEnv setting)")
        # Only what is used: the embeddings and all layers but the last (no final norm), so every parameter is
        # in the graph (DDP); the mask token serves DINOv2's masked pretraining only.
        self.embeddings, self.layers = vision.embeddings, vision.encoder.layer[:-1]
        self.embeddings.mask_token = None
        self.vision_config, vis = vision.config, vision.config.hidden_size
        w, A = cfg.head_width, cfg.action_dim
        # DINOv2 normalisation, applied to head pixels given in [-0.5, 0.5] (make_batch's convention)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        self.n_prefix = 1 + getattr(vision.config, "num_register_tokens", 0)  # CLS (+ registers) dropped
        self.film = nn.ModuleList(nn.Linear(hidden_size, 2 * vis) for _ in self.layers)
        for f in self.film:  # identity at the start: the pretrained features pass through unchanged
            nn.init.zeros_(f.weight), nn.init.zeros_(f.bias)
        self.visual_proj = nn.Sequential(nn.Linear(vis, w), nn.SiLU(), nn.Linear(w, w))
        self.query_proj = nn.Sequential(nn.Linear(hidden_size, w), nn.SiLU(), nn.Linear(w, w))
        self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.action_in = nn.Linear(A, w)
        self.action_time = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w))
        self.action_pos = nn.Parameter(torch.randn(cfg.chunk, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, max(1, w // 64), 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.head_layers, norm=nn.LayerNorm(w),
                                                 enable_nested_tensor=False)
        n = cfg.chunk * w  # InstructVLA's head: the action tokens flattened, then a 4-layer MLP
        self.out = nn.Sequential(nn.Linear(n, 4 * w), nn.SiLU(), nn.Linear(4 * w, 2 * w), nn.SiLU(),
                                 nn.Linear(2 * w, w // 2), nn.SiLU(), nn.Linear(w // 2, cfg.chunk * A))
        self.locate = nn.Linear(w, 2)  # grounding probe on the mean image token (the ground term)
        self.chunk, self.action_dim, self.width, self.target = cfg.chunk, A, w, cfg.flow_target
        self.sigma_min = cfg.flow_sigma_min
        self.n_image = (cfg.head_image_size // vision.config.patch_size) ** 2

    def image_tokens(self, pixels, cond):
        """DINOv2 with FiLM after each layer's attention (x·(1 + γ) + β, γ, β from the mean query state)."""
        x = self.embeddings((pixels + 0.5 - self.pixel_mean) / self.pixel_std)  # (B, prefix + P, vis)
        for layer, film in zip(self.layers, self.film):
            gamma, beta = film(cond)[:, None].chunk(2, dim=-1)
            x = x + layer.drop_path(layer.layer_scale1(layer.attention(layer.norm1(x))[0]))
            x = x * (1 + gamma) + beta
            x = x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
        return x[:, self.n_prefix:]                                                    # (B, P, vis)

    def context(self, query_states, head_pixels, state):
        """The prefix tokens [images, queries, state]: (B, P + Q + 1, w), once per prediction."""
        qs = query_states.float()
        images = self.visual_proj(self.image_tokens(head_pixels[:, 0], qs.mean(1)))
        return torch.cat([images, self.query_proj(qs), self.state_proj(state)[:, None]], dim=1)

    def target_xy(self, ctx):
        """Where the image tokens put the object of the current subtask: (B, 2) in [-1, 1]."""
        return self.locate(ctx[:, :self.n_image].mean(1))

    def forward(self, x_t, t, ctx):  # (B, chunk, A), (B,), (B, P+Q+1, w) -> (B, chunk, A): velocity or x̂1
        B, n_ctx = ctx.shape[0], ctx.shape[1]
        time = time_embedding(t, self.width)[:, None].expand(-1, self.chunk, -1)
        actions = self.action_time(torch.cat([time, self.action_in(x_t)], dim=-1)) + self.action_pos
        seq = torch.cat([ctx, actions], dim=1)
        L = seq.shape[1]
        blocked = torch.ones(L, L, dtype=torch.bool, device=seq.device)  # True = may not attend
        blocked[:self.n_image, :self.n_image] = False
        blocked[self.n_image:n_ctx, :n_ctx] = False
        blocked[n_ctx:] = False
        h = self.transformer(seq, mask=blocked)[:, n_ctx:]                              # (B, chunk, w)
        return self.out(h.flatten(1)).view(B, self.chunk, self.action_dim)

    def velocity(self, x_t, t, ctx):
        """The flow's velocity at (x_t, t), whichever target the head predicts (t < 1)."""
        pred = self(x_t, t, ctx)
        return pred if self.target == "velocity" else clean_to_velocity(pred, x_t, t, self.sigma_min)


# ----------------------------------------------------------------------------- the VLA

def attention_implementation():
    """flash_attention_2 where the flash_attn package and CUDA are present, else sdpa. Qwen2.5-VL's windowed
    vision attention is one varlen call per layer under flash_attention_2, where sdpa makes one per window."""
    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def load_backbone(name_or_path, dtype=torch.float32):
    """(model, tokenizer, image_processor) through transformers' Auto classes; one-line errors.

    fp32 by default: transformers 5 loads a checkpoint in its stored dtype (Qwen2.5-VL's is bf16), and
    training needs fp32 master weights under bf16 autocast, or small updates round away."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise UserError(f"backbone folder not found: {name_or_path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype,
                                                            attn_implementation=attention_implementation())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load backbone {name_or_path!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer, image_processor


def text_target_mask(batch):
    """(B, L-1) positions whose NEXT token is a text target (reasoning, <|act|>, answer): lm_loss's mask."""
    return (batch["labels"][:, 1:] != -100) & ~batch["action_positions"][:, 1:]


class Prompter:
    """Records -> the backbone's inputs, the sequence in this module's docstring: chat-template token ids, the
    image processor's pixels, labels (-100 but on the text and action targets) and the masks marking the action
    tokens and the queries. It adds <|act|>, <|query|> and the action bins to the tokenizer. No weights: DualVLA
    holds one and builds its training batches (make_batch) and generation prompts through it."""

    def __init__(self, config, tokenizer, image_processor):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        bins = [f"<|a_{i}|>" for i in range(config.n_bins)]
        new = [t for t in [ACT, QUERY] + bins if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ACT, QUERY, IM_END, PAD, IMAGE_PAD)}
        self.bin_ids = torch.tensor(tokenizer.convert_tokens_to_ids(bins))
        # the vision grid: patch 14 × merge 2 = 28 px per image token for Qwen2/2.5-VL, 16 × 2 = 32 for Qwen3-VL
        self.merge = image_processor.merge_size
        self.factor = image_processor.patch_size * self.merge
        if config.image_size % self.factor:
            raise UserError(f"image_size must be a multiple of {self.factor} for {config.backbone} "
                            f"(patch {image_processor.patch_size} × merge {self.merge}), got {config.image_size}")
        self.pixel_bounds = (config.min_pixels or image_processor.size["shortest_edge"],
                             config.max_pixels or image_processor.size["longest_edge"])
        self.image_tokens = (config.image_size // self.factor) ** 2  # per robot frame

    # ---- images

    def images(self, record):
        """A robot frame's images as RGB PIL images, one per camera of the model."""
        imgs = record["image"] if isinstance(record["image"], (list, tuple)) else [record["image"]]
        if len(imgs) != len(self.config.cameras):
            raise UserError(f"model expects {len(self.config.cameras)} image(s) per frame "
                            f"({', '.join(self.config.cameras)}), got {len(imgs)}")
        return [(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))).convert("RGB")
                for im in imgs]

    def pixels(self, images, native=False):
        """A batch's images through the backbone's image processor -> (pixel_values, image_grid_thw), or None
        for text only. Robot frames become image_size² (a fixed token count, what the action head trained on);
        native ones (multimodal samples, benchmark questions: `native` one flag for all or one per image) keep
        their size within pixel_bounds on the processor's own grid (transformers' smart_resize), as Qwen2-VL
        reads documents and scene text. One processor call per run of one kind, in order."""
        if not images:
            return None, None
        flags = [native] * len(images) if isinstance(native, bool) else list(native)
        s, (lo, hi) = self.config.image_size, self.pixel_bounds
        outs = []
        for is_native, run in itertools.groupby(zip(flags, images), key=lambda x: x[0]):
            ims = [im for _, im in run]
            if is_native:
                size = {"shortest_edge": lo, "longest_edge": hi}
            else:
                ims = [im.resize((s, s), Image.BICUBIC) for im in ims]
                size = {"shortest_edge": s * s, "longest_edge": s * s}
            outs.append(self.image_processor(images=ims, size=size, return_tensors="pt"))
        return torch.cat([o["pixel_values"] for o in outs]), torch.cat([o["image_grid_thw"] for o in outs])

    def token_counts(self, grid):
        """image_grid_thw (N, 3) -> image tokens per image: its patches merged merge × merge."""
        return (grid.prod(-1) // self.merge ** 2).tolist()

    def head_pixels(self, images):
        """The action expert's own view of a frame: (N, 3, s, s) in [-0.5, 0.5], s = head_image_size."""
        s = self.config.head_image_size
        arr = np.stack([np.asarray(im.resize((s, s), Image.BILINEAR), np.float32) / 255 - 0.5 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (N, 3, s, s)

    # ---- text

    def prompt_ids(self, tokens, text, names=None):
        """Chat-template prompt up to 'assistant\\n', with one vision block per image of tokens[k] image tokens."""
        blocks = [VISION_START + IMAGE_PAD * n + VISION_END for n in tokens]
        vision = "".join(f"{n}: {b}" for n, b in zip(names, blocks)) if names else "".join(blocks)
        s = (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{vision}{text}{IM_END}\n"
             f"{IM_START}assistant\n")
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    def robot_prompt(self, record):
        """A robot frame's prompt: its cameras' image blocks (named when several) and the instruction."""
        names = list(self.config.cameras) if len(self.config.cameras) > 1 else None
        return self.prompt_ids([self.image_tokens] * len(self.config.cameras), self.config.prompt.format(
            instruction=record["instruction"].strip().rstrip(".").lower()), names)

    def bins(self, actions):
        """Normalised actions in [-1, 1] -> bin indices (OpenVLA's uniform discretisation)."""
        return np.clip(((actions + 1) / 2 * self.config.n_bins).astype(int), 0, self.config.n_bins - 1)

    # ---- one sample

    def state(self, record, stats):
        """A frame's robot state (zeros when it has none), normalised with its robot's q01/q99 `stats` if any."""
        s = record.get("state")
        s = np.zeros(self.config.state_dim, np.float32) if s is None else np.asarray(s, np.float32)
        if s.shape != (self.config.state_dim,):
            raise UserError(f"state has shape {s.shape}, model expects ({self.config.state_dim},)")
        return normalize_action(s, stats) if stats else s

    def action_chunk(self, record, stats):
        """A frame's action chunk (chunk, A), normalised with `stats` if any, and its mask: a lone frame (no
        data.add_action_chunks) has its own action, the rest of the chunk masked."""
        cfg = self.config
        a = record.get("actions")
        if a is None:
            a = np.repeat(np.asarray(record["action"], np.float32)[None], cfg.chunk, 0)
            m = np.arange(cfg.chunk) == 0
        else:
            m = np.asarray(record["action_mask"], bool)
        a = np.asarray(a, np.float32)
        if a.shape != (cfg.chunk, cfg.action_dim):
            raise UserError(f"episode {record.get('episode')} step {record.get('step')}: action chunk has "
                            f"shape {a.shape}, model expects ({cfg.chunk}, {cfg.action_dim})")
        return (normalize_action(a, stats) if stats else a), m

    def robot_sample(self, record, images, reasoning, stats):
        """A robot frame -> its sequence (prompt, text target, action tokens, tail) and arrays. Text target: the
        reasoning r (none with `reasoning=False`, the action teacher's view, or when pruned) and <|act|>; then
        the chunk as bin tokens (tokens head) or the query tokens the flow head reads. stats: (action, state)."""
        cfg = self.config
        r = reasoning_text(record.get("reasoning")) if reasoning else ""
        target = self.tokenizer(r, add_special_tokens=False)["input_ids"][:cfg.max_reasoning_tokens] if r else []
        target = target + [self.ids[ACT]]
        arrays = self.robot_arrays(record, images, stats)
        if cfg.action_head == "flow":
            act_tokens, tail = [], [self.ids[QUERY]] * cfg.n_queries
        else:
            act_tokens, tail = self.bin_ids[self.bins(arrays["action"].reshape(-1))].tolist(), []
        return (self.robot_prompt(record), target, act_tokens, tail), arrays

    def robot_arrays(self, record, images, stats):
        """A robot frame's action chunk and its mask, state, images and grounding target (None: no ECoT boxes)."""
        a, m = self.action_chunk(record, stats[0])
        return dict(action=a, action_mask=m, state=self.state(record, stats[1]), images=images,
                    ground=subtask_target(record.get("reasoning"), *images[0].size))

    def expert_batch(self, records, robot_stats):
        """What the flow head reads of robot frames besides the query states: states, action chunks and masks, its
        own image view and the grounding targets (train.py's specialist with a frozen VLM; no text, no VLM pixels)."""
        return self.stacked([self.robot_arrays(r, self.images(r), robot_stats(r.get("robot"))) for r in records])

    def stacked(self, frames):
        stack = lambda key: torch.from_numpy(np.stack([f[key] for f in frames]))
        return dict(states=stack("state"), actions=stack("action"), action_mask=stack("action_mask"),
                    head_pixels=torch.stack([self.head_pixels(f["images"]) for f in frames]),
                    ground=torch.tensor(np.stack([np.zeros(2, np.float32) if f["ground"] is None else f["ground"]
                                                  for f in frames])),
                    ground_mask=torch.tensor([f["ground"] is not None for f in frames]))

    def answer_sample(self, record, tokens):
        """A multimodal sample -> its sequence: the question's prompt, the answer and <|im_end|> as text target."""
        prompt = self.prompt_ids(tokens, record["instruction"])
        answer = self.tokenizer(reasoning_text(record["reasoning"]), add_special_tokens=False)["input_ids"]
        return prompt, answer + [self.ids[IM_END]], [], []

    # ---- batches

    def padded(self, seqs):
        """Sequences (prompt, text target, action tokens, tail) -> right-padded input_ids, attention_mask, labels
        and action_positions, (B, L) each; labels are -100 but on the text target and the action tokens."""
        L = max(sum(len(p) for p in s) + (1 if s[2] else 0) for s in seqs)  # +1: <|im_end|> after bins
        B = len(seqs)
        input_ids = torch.full((B, L), self.ids[PAD], dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        act_pos = torch.zeros((B, L), dtype=torch.bool)
        for b, (prompt, target, act_tokens, tail) in enumerate(seqs):
            ids = prompt + target + act_tokens + ([self.ids[IM_END]] if act_tokens else []) + tail
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attn[b, :len(ids)] = 1
            t0 = len(prompt)
            labels[b, t0:t0 + len(target)] = torch.tensor(target)
            a0 = t0 + len(target)
            act_pos[b, a0:a0 + len(act_tokens)] = True
            if act_tokens:
                labels[b, a0:a0 + len(act_tokens) + 1] = torch.tensor(act_tokens + [self.ids[IM_END]])
        return input_ids, attn, labels, act_pos

    def batch(self, records, reasoning, robot_stats):
        """Records -> right-padded model inputs (DualVLA.make_batch). robot_stats(robot) -> (action, state)
        statistics: each robot frame is normalised with its own robot's."""
        per_record = [self.images(rec) if rec["domain"] == "robot" else [im.convert("RGB") for im in (
            rec["image"] if isinstance(rec["image"], (list, tuple)) else [rec["image"]])] for rec in records]
        native = [rec["domain"] != "robot" for rec, imgs in zip(records, per_record) for _ in imgs]
        pixel_values, grid = self.pixels([im for imgs in per_record for im in imgs], native)
        counts = iter(self.token_counts(grid) if grid is not None else [])
        seqs, frames = [], []
        for rec, imgs in zip(records, per_record):
            tokens = [next(counts) for _ in imgs]
            if rec["domain"] == "robot":
                seq, arrays = self.robot_sample(rec, imgs, reasoning, robot_stats(rec.get("robot")))
                seqs.append(seq), frames.append(arrays)
            else:
                seqs.append(self.answer_sample(rec, tokens))
        input_ids, attn, labels, act_pos = self.padded(seqs)
        batch = dict(input_ids=input_ids, attention_mask=attn, labels=labels, pixel_values=pixel_values,
                     image_grid_thw=grid, mm_token_type_ids=(input_ids == self.ids[IMAGE_PAD]).int(),
                     query_mask=input_ids == self.ids[QUERY], action_positions=act_pos,
                     is_robot=torch.tensor([r["domain"] == "robot" for r in records]),
                     records=records, domain=[r["domain"] for r in records])
        if frames:
            batch.update(self.stacked(frames))
        return batch

    def left_padded(self, prompts, pixels):
        """Prompt batch, left-padded for generation (new tokens then line up at the right).
        pixels: (pixel_values, image_grid_thw) of the batch's images, from pixels()."""
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.ids[PAD], dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):], attn[b, L - len(p):] = torch.tensor(p), 1
        return dict(input_ids=ids, attention_mask=attn, pixel_values=pixels[0], image_grid_thw=pixels[1],
                    mm_token_type_ids=(ids == self.ids[IMAGE_PAD]).int())


class DualVLA(nn.Module):
    """The backbone, Q learnable action queries θ_q and the action head; a Prompter builds the inputs.

        records ─Prompter─► ids, pixels, masks ─► backbone (query rows = θ_q) ─► hidden states (B, L, H)
            ├─► lm_head: lm_loss on reasoning, <|act|> and answers (Eq. 3); the tokens head's bins (Eq. 2)
            └─► flow head: query states + its own image view + robot state ─► flow-matching loss (Eq. 2)
    """

    def __init__(self, config: VLAConfig, backbone=None, tokenizer=None, image_processor=None, head_vision=None):
        """`head_vision`: an already built DINOv2 for the "dit" expert (from_pretrained's), else config.head_vision's."""
        super().__init__()
        if backbone is None:
            backbone, tokenizer, image_processor = load_backbone(config.backbone)
        self.config, self.backbone = config, backbone
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.prompter = Prompter(config, tokenizer, image_processor)  # adds <|act|>, <|query|> and the bins
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:  # only grow: Qwen has spare rows
            backbone.resize_token_embeddings(len(tokenizer))
        self.ids, self.bin_ids = self.prompter.ids, self.prompter.bin_ids  # the tokens forward and generation read
        hidden = backbone.config.get_text_config().hidden_size
        self.queries = nn.Parameter(torch.randn(config.n_queries, hidden) * 0.02)
        self.head = None if config.action_head != "flow" else (
            DiTExpert(config, hidden, head_vision) if config.action_expert == "dit" else ActionExpert(config, hidden))
        self.norm_stats = {}
        self.ground_weight = 0.0  # weight of the grounding term in forward's loss (train.py's --ground-weight)

    # ---- statistics and batches

    def set_action_stats(self, action_stats, state_stats=None, robot="unknown"):
        """One robot's q01/q99 statistics (data.action_stats) of actions and states; saved with the model.

        Kept per robot, as OpenVLA and InstructVLA keep theirs per dataset (bridge_dataset, fractal20220817_data):
        each frame is normalised with its robot's, and actions are un-normalised with the robot acted for."""
        self.norm_stats[robot] = {"action": action_stats, "state": state_stats}

    def robot_stats(self, robot=None):
        """(action, state) statistics for `robot`: its own, else those of the robot whose name starts its
        name (SimplerEnv's google_robot_static -> google_robot, the policy setup widowx_bridge -> widowx), else
        the only set (a one-robot checkpoint); (None, None) for a model without statistics."""
        if not self.norm_stats:
            return None, None
        names = [robot] if robot in self.norm_stats else [k for k in self.norm_stats if str(robot).startswith(k)]
        names = names or (list(self.norm_stats) if len(self.norm_stats) == 1 else [])
        if not names:
            raise UserError(f"the checkpoint has statistics for {', '.join(self.norm_stats)}, not for robot "
                            f"{robot!r}: name one of them (evaluate.py --robot)")
        stats = self.norm_stats[max(names, key=len)]
        return stats["action"], stats["state"]

    def make_batch(self, records, reasoning=True):
        """Records -> right-padded model inputs (Prompter.batch), each robot frame normalised with its robot's
        statistics. `reasoning=False` drops r (the action teacher's view)."""
        return self.prompter.batch(records, reasoning, self.robot_stats)

    def to_device(self, batch):
        """A batch's tensors on the model's device (make_batch builds them on the CPU)."""
        dev = self.queries.device
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- training forward

    def hidden_states(self, batch):
        """Last-layer states of the backbone, with the query rows of the embedding replaced by θ_q."""
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        qm = batch["query_mask"]
        if qm.any():
            q = self.queries.to(embeds.dtype).repeat(int(qm.sum()) // self.config.n_queries, 1)
            embeds = embeds.masked_scatter(qm[..., None], q)
        out = self.backbone.model(input_ids=batch["input_ids"], inputs_embeds=embeds,
                                  attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                                  image_grid_thw=batch["image_grid_thw"],
                                  mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False)  # one pass: no KV cache
        return out.last_hidden_state

    def forward(self, batch, noise=None, t=None):
        """Eq. 2/3: lm_loss over the text targets, action_loss over the action (CE on bins or flow MSE);
        flow head: plus ground_weight × the grounding term (0 unless train.py's --ground-weight).

        `noise`/`t` may be given so that a teacher sees the very same noisy action (distill.py).
        """
        batch = self.to_device(batch)
        h = self.hidden_states(batch)                                    # (B, L, H)
        logits = self.backbone.lm_head(h)                                # (B, L, V)
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        text = text_target_mask(batch)
        lm_sum = F.cross_entropy(shift_logits[text], shift_labels[text], reduction="sum") if text.any() \
            else logits.sum() * 0
        out = dict(logits=logits, lm_sum=lm_sum, lm_count=text.sum())
        if not batch["is_robot"].any():
            out.update(action_sum=lm_sum * 0, action_count=torch.tensor(0))
        elif self.config.action_head == "tokens":
            out.update(self.bin_loss(shift_logits, shift_labels, batch))
        else:
            out.update(self.flow_loss(h, batch, noise, t))
        out["lm_loss"] = out["lm_sum"] / out["lm_count"].clamp(min=1)
        out["action_loss"] = out["action_sum"] / out["action_count"].clamp(min=1)
        out["loss"] = out["lm_loss"] + out["action_loss"]
        if "ground_sum" in out:  # not in the paper; at weight 0 it only keeps the probe in the graph (DDP)
            out["loss"] = out["loss"] + self.ground_weight * out["ground_sum"] / out["ground_count"].clamp(min=1)
        return out

    def bin_loss(self, shift_logits, shift_labels, batch):
        """The tokens head's action term (Eq. 2): cross-entropy over the bins at each action token, summed over
        the chunk steps the mask keeps."""
        pos = batch["action_positions"][:, 1:]
        n_act = self.config.chunk * self.config.action_dim
        bin_ids = self.bin_ids.to(shift_logits.device)
        action_logits = shift_logits[pos][:, bin_ids].view(-1, n_act, self.config.n_bins)
        targets = torch.searchsorted(bin_ids, shift_labels[pos]).view(-1, n_act)
        mask = batch["action_mask"].repeat_interleave(self.config.action_dim, 1)
        ce = F.cross_entropy(action_logits.transpose(1, 2), targets, reduction="none")
        return dict(action_logits=action_logits, action_targets=targets, action_sum=(ce * mask).sum(),
                    action_count=mask.sum())

    def query_states(self, h, batch):
        """The action queries' rows of the hidden states h: (frames with queries, Q, H), what the flow head reads."""
        return h[batch["query_mask"]].view(-1, self.config.n_queries, h.shape[-1])

    def flow_loss(self, h, batch, noise=None, t=None):
        """The flow head's action term (Eq. 2) on the query states of the hidden states h: expert_loss."""
        return self.expert_loss(self.query_states(h, batch), batch, noise, t)

    def expert_loss(self, qs, batch, noise=None, t=None):
        """The flow head's velocity (or clean chunk) at x_t on the flow path from `noise` at time `t` (drawn when
        None) against the path's, summed over the kept chunk steps; and the grounding probe's squared error.
        qs: the query states (B_robot, Q, H)."""
        ctx = self.head.context(qs, batch["head_pixels"], batch["states"])
        x1 = batch["actions"]
        noise = torch.randn_like(x1) if noise is None else noise
        t = sample_flow_time(x1.shape[0], self.config).to(qs.device) if t is None else t
        x_t, velocity = flow_path(x1, noise, t, self.config.flow_sigma_min)
        pred = self.head(x_t, t, ctx)
        mask = batch["action_mask"][..., None].float()
        target = velocity if self.config.flow_target == "velocity" else x1
        se = ((pred - target) ** 2 * mask).sum()
        gm = batch["ground_mask"][:, None].float()
        ground = ((self.head.target_xy(ctx) - batch["ground"]) ** 2 * gm).sum()
        return dict(flow_pred=pred, noise=noise, t=t, x_t=x_t, action_sum=se,
                    action_count=mask.sum() * self.config.action_dim, ground_sum=ground, ground_count=gm.sum() * 2)

    # ---- inference

    def _generate(self, batch, max_new_tokens, stop, logits_processor=None, min_new_tokens=0):
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        dev = self.queries.device
        out = self.backbone.generate(**{k: batch[k].to(dev) for k in keys if batch[k] is not None},
                                     max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=self.ids[PAD], logits_processor=logits_processor)
        return out[:, batch["input_ids"].shape[1]:]

    @torch.no_grad()
    def generate_answers(self, images, questions, max_new_tokens=32):
        """Greedy answers for a batch: images is a list (per sample) of lists of PIL images."""
        p = self.prompter
        images = [[im.convert("RGB") for im in ims] for ims in images]
        pixels = p.pixels([im for ims in images for im in ims], native=True)
        counts = iter(p.token_counts(pixels[1]) if pixels[1] is not None else [])
        prompts = [p.prompt_ids([next(counts) for _ in ims], q) for ims, q in zip(images, questions)]
        new = self._generate(p.left_padded(prompts, pixels), max_new_tokens, [self.ids[IM_END], self.ids[PAD]])
        return [self.tokenizer.decode(seq[seq != self.ids[PAD]], skip_special_tokens=True).strip() for seq in new]

    @torch.no_grad()
    def predict_action(self, image, instruction, state=None, reason=True, robot=None, generator=None):
        """Reason (KV-cached greedy decoding until <|act|>), then act. Returns actions in the units of
        `robot` (robot_stats: whose statistics un-normalise them)."""
        return self.predict_actions([image], [instruction], [state], reason, [generator] if generator else None,
                                    robot)[0]

    @torch.no_grad()
    def predict_actions(self, images, instructions, states=None, reason=True, generators=None, robot=None):
        """predict_action for a batch of frames (e.g. many episodes stepped together): one left-padded
        generation and one forward for all. generators: one torch.Generator per frame for the flow
        noise, so a frame's actions do not depend on what else is in the batch."""
        p, (action_stats, state_stats) = self.prompter, self.robot_stats(robot)
        recs = [dict(image=im, instruction=text, state=None if states is None else states[b], domain="robot", robot=robot)
                for b, (im, text) in enumerate(zip(images, instructions))]
        imgs = [p.images(r) for r in recs]
        pixels = p.pixels([im for ims in imgs for im in ims])  # once per control step: reasoning and action
        prompts = [p.robot_prompt(r) for r in recs]
        reasoning_ids = self.reason(prompts, pixels) if reason else [[] for _ in recs]
        prompts = [q + r + [self.ids[ACT]] for q, r in zip(prompts, reasoning_ids)]
        if self.config.action_head == "tokens":
            actions = self.bin_actions(prompts, pixels)
        else:
            states_t = torch.from_numpy(np.stack([p.state(r, state_stats) for r in recs]))
            actions = self.flow_actions(prompts, pixels, imgs, states_t, generators)
        actions = np.clip(actions, -1, 1)  # the training targets live in [-1, 1]
        if action_stats:
            actions = unnormalize_action(actions, action_stats)
        return [dict(actions=np.asarray(a, np.float32), n_tokens=len(r) + int(reason),
                     reasoning=self.tokenizer.decode(r, skip_special_tokens=True).strip())
                for a, r in zip(actions, reasoning_ids)]

    def reason(self, prompts, pixels):
        """Each frame's reasoning r: greedy, KV-cached decoding until <|act|> (or <|im_end|>) -> token ids per frame."""
        stops = (self.ids[ACT], self.ids[IM_END])
        new = self._generate(self.prompter.left_padded(prompts, pixels), self.config.max_reasoning_tokens,
                             list(stops)).tolist()
        ids = []
        for seq in new:
            seq = seq[:next((k for k, i in enumerate(seq) if i in stops), len(seq))]
            ids.append([i for i in seq if i != self.ids[PAD]])
        return ids

    def bin_actions(self, prompts, pixels):
        """The tokens head: chunk·A tokens generated among the bins only, each read as its bin's centre in
        [-1, 1] -> (B, chunk, A). prompts end with <|act|>."""
        cfg, n_act = self.config, self.config.chunk * self.config.action_dim
        new = self._generate(self.prompter.left_padded(prompts, pixels), n_act, None, [_AllowOnly(self.bin_ids)],
                             min_new_tokens=n_act)
        bins = torch.searchsorted(self.bin_ids.to(new.device), new[:, :n_act].contiguous()).cpu().numpy()
        return ((bins + 0.5) / cfg.n_bins * 2 - 1).reshape(len(prompts), cfg.chunk, cfg.action_dim)

    def flow_actions(self, prompts, pixels, images, states, generators=None):
        """The flow head: the queries' last hidden states after each prompt (ending with <|act|>), the expert's
        own view of the frames and the normalised robot states (B, S) -> the sampled chunks (B, chunk, A)."""
        cfg, dev = self.config, self.queries.device
        batch = self.prompter.left_padded([q + [self.ids[QUERY]] * cfg.n_queries for q in prompts], pixels)
        batch["query_mask"] = batch["input_ids"] == self.ids[QUERY]
        batch = self.to_device(batch)
        qs = self.query_states(self.hidden_states(batch), batch)
        head_pixels = torch.stack([self.prompter.head_pixels(ims) for ims in images]).to(dev)
        ctx = self.head.context(qs, head_pixels, states.to(dev))
        return self.sample_actions(ctx, generators).cpu().numpy()

    def sample_actions(self, ctx, generators=None):
        """Euler integration of the learned velocity from noise (t=0) to actions (t=1); generators: one per
        row for its noise (None: torch's global stream)."""
        shape = (self.config.chunk, self.config.action_dim)
        x = (torch.stack([torch.randn(shape, generator=g) for g in generators]).to(ctx.device) if generators
             else torch.randn(ctx.shape[0], *shape, device=ctx.device))
        dt = 1.0 / self.config.flow_steps
        for k in range(self.config.flow_steps):
            t = torch.full((ctx.shape[0],), k * dt, device=ctx.device)
            x = x + dt * self.head.velocity(x, t, ctx)
        return x

    # ---- checkpoints

    def save_pretrained(self, path):
        """config.json, model.safetensors, backbone_config.json, tokenizer, image processor; atomic.
        LoRA adapters (train.py's --lora-rank) are first folded into their weights, in place: the checkpoint
        holds a plain model with the same outputs, which loads without peft."""
        from safetensors.torch import save_model
        merge_adapters(self)
        tmp = f"{path.rstrip('/')}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(asdict(self.config), norm_stats=self.norm_stats), f, indent=1)
        self.backbone.config.to_json_file(os.path.join(tmp, "backbone_config.json"))
        if isinstance(self.head, DiTExpert):  # its DINOv2's architecture; the weights are in model.safetensors
            self.head.vision_config.to_json_file(os.path.join(tmp, "head_vision_config.json"))
        self.tokenizer.save_pretrained(tmp)
        self.image_processor.save_pretrained(tmp)
        save_model(self, os.path.join(tmp, "model.safetensors"))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
        for name in ("config.json", "backbone_config.json", "model.safetensors", "tokenizer_config.json"):
            if not os.path.isfile(os.path.join(path, name)):
                raise UserError(f"{path} is not a DualVLA checkpoint: missing {name}")
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
        norm_stats = saved.pop("norm_stats", {})
        if norm_stats and set(norm_stats) <= {"action", "state"}:  # saved before statistics were kept per robot
            norm_stats = {"unknown": {"action": norm_stats.get("action"), "state": norm_stats.get("state")}}
        known = {f.name for f in fields(VLAConfig)}
        cfg = VLAConfig(**{k: v for k, v in saved.items() if k in known})
        bb_cfg = AutoConfig.from_pretrained(os.path.join(path, "backbone_config.json"))
        backbone = AutoModelForImageTextToText.from_config(bb_cfg, dtype=dtype)
        vision = None
        if cfg.action_head == "flow" and cfg.action_expert == "dit":
            from transformers import AutoModel
            vision = AutoModel.from_config(AutoConfig.from_pretrained(os.path.join(path, "head_vision_config.json")))
        model = cls(cfg, backbone, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                    vision)
        load_model(model, os.path.join(path, "model.safetensors"))
        model.norm_stats = norm_stats
        return model


def merge_adapters(model):
    """Fold peft's LoRA layers into their base layers, in place (W + scale·B·A; outputs equal up to rounding)."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):  # a peft LoraLayer
            module.merge()
            model.set_submodule(name, module.get_base_layer())
    return model


class _AllowOnly:
    """Logits processor: only the action-bin tokens may be generated after <|act|>."""

    def __init__(self, allowed):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        keep = torch.full_like(scores, float("-inf"))
        keep[:, self.allowed.to(scores.device)] = 0
        return scores + keep


# ----------------------------------------------------------------------------- the tiny offline model

# A small corpus for the tiny byte-level BPE: the demo's vocabulary, so its sequences stay short.
TINY_CORPUS = [
    SYSTEM, "What action should the robot take to", "pick up the", "put the", "on the", "move the", "near the",
    "TASK: PLAN: VISIBLE OBJECTS: SUBTASK REASONING: SUBTASK: MOVE REASONING: MOVE: GRIPPER POSITION:",
    "red green blue yellow orange purple white black can block plate towel carrot spoon cube bowl",
    "move left right up down forward backward close gripper open gripper stop approach grasp lift release",
    "What colour is the How many objects are there Which object is closest to the gripper left of right of",
    "above below Answer the question using a single word or phrase. Please answer yes or no. Yes No",
    "Options: Hint: Question: Please select the correct answer from the options above. A. B. C. D.",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 [ ] , . ? : the a an is of to and",
    "Describe the table: every object, where it is, and the gripper. a plate in the centre, a red can at the top left "
    "with 'K' on it, the middle right, the bottom centre, the gripper is open, the gripper is closed, eggplant",
    "Where is the relative to the in the image: left, right, above or below? How many cans blocks objects are on the "
    "table? Is there an on the table? What is written on the Is the text written on the Is the gripper open?",
]


def build_tiny(path, hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2,
               vocab=1024, seed=0, patch=7):
    """A random tiny Qwen2.5-VL with an offline-trained byte-level BPE tokenizer, saved as an HF folder."""
    model, tok, image_processor = tiny_backbone(hidden, layers, heads, kv_heads, vision_hidden, vision_depth,
                                                vocab, seed, patch=patch)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def tiny_backbone(hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2, vocab=1024, seed=0,
                  text=None, vision=None, device=None, patch=7):
    """(model, tokenizer, image processor) of build_tiny, in memory. `text`/`vision` override fields of the
    model's text/vision config (bench.py builds Qwen2.5-VL-3B's size this way); `device`: where the random
    weights are made (a 3B model is initialised far faster on the GPU than on the CPU).

    `patch`: the ViT's patch side. The demo's objects are ~7 px across in a 56 px image: Qwen2.5-VL's 14 px
    patches (4 image tokens, each a quarter of the table) never let the tiny model tell them apart
    (FACTS.md, "Can the tiny backbone learn to see?"); 7 px patches give 16 tokens of 14 px each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2VLImageProcessorPil)
    specials = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", ACT, QUERY]
    specials += [f"<|a_{i}|>" for i in range(256)]  # OpenVLA-style action bins, so no resize later
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TINY_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD,
                                  extra_special_tokens={"image_token": IMAGE_PAD, "video_token": "<|video_pad|>",
                                                        "vision_start_token": VISION_START,
                                                        "vision_end_token": VISION_END})
    head_dim = hidden // heads
    third = head_dim // 2 // 3                                   # mrope_section sums to head_dim / 2
    section = [head_dim // 2 - 2 * third, third, third]
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=ids[IM_START],
                              eos_token_id=ids[IM_END], pad_token_id=ids[PAD],
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section)),
                         **(text or {})),
        vision_config=dict(dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_heads=2, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=2,
                                temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
                           **(vision or {})),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=ids[IM_START], eos_token_id=ids[IM_END], pad_token_id=ids[PAD], tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForImageTextToText.from_config(cfg)
    vc = cfg.vision_config   # the processor cuts the patches the ViT expects
    unit = vc.patch_size * vc.spatial_merge_size
    return model, tok, Qwen2VLImageProcessorPil(min_pixels=unit * unit, max_pixels=448 * 448,
                                                patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                                temporal_patch_size=vc.temporal_patch_size)


def build_tiny_vision(path, hidden=32, layers=2, heads=2, seed=0):
    """A random tiny DINOv2 (config, weights, image processor with DINOv2's ImageNet statistics) saved as an HF
    folder: the "dit" expert's head_vision for the tests and the CPU demo, offline."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                     intermediate_size=4 * hidden, patch_size=14, image_size=56))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path
