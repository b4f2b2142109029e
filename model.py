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
    image_size: int = 224           # VLM input side, a multiple of 28 (patch 14 × merge 2)
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
        if self.chunk == 0:
            self.chunk = 16 if self.action_head == "flow" else 1
        if self.image_size % 28:
            raise UserError(f"image_size must be a multiple of 28 (patch 14 × merge 2), got {self.image_size}")
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
        return pred if self.target == "velocity" else (pred - x_t) / (1 - t)[:, None, None]


# ----------------------------------------------------------------------------- the VLA

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
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load backbone {name_or_path!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer, image_processor


def text_target_mask(batch):
    """(B, L-1) positions whose NEXT token is a text target (reasoning, <|act|>, answer): lm_loss's mask."""
    return (batch["labels"][:, 1:] != -100) & ~batch["action_positions"][:, 1:]


class DualVLA(nn.Module):

    def __init__(self, config: VLAConfig, backbone=None, tokenizer=None, image_processor=None):
        super().__init__()
        if backbone is None:
            backbone, tokenizer, image_processor = load_backbone(config.backbone)
        self.config, self.backbone = config, backbone
        self.tokenizer, self.image_processor = tokenizer, image_processor
        bins = [f"<|a_{i}|>" for i in range(config.n_bins)]
        new = [t for t in [ACT, QUERY] + bins if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:  # only grow: Qwen has spare rows
            backbone.resize_token_embeddings(len(tokenizer))
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ACT, QUERY, IM_END, PAD, IMAGE_PAD)}
        self.bin_ids = torch.tensor(tokenizer.convert_tokens_to_ids(bins))
        hidden = backbone.config.get_text_config().hidden_size
        self.queries = nn.Parameter(torch.randn(config.n_queries, hidden) * 0.02)
        self.head = ActionExpert(config, hidden) if config.action_head == "flow" else None
        self.norm_stats = {}
        self.image_tokens = (config.image_size // 28) ** 2
        self.ground_weight = 0.0  # weight of the grounding term in forward's loss (train.py's --ground-weight)

    # ---- inputs

    def set_action_stats(self, action_stats, state_stats=None):
        """q01/q99 statistics (data.action_stats) used to normalise actions/states; saved with the model."""
        self.norm_stats = {"action": action_stats, "state": state_stats}

    def _images(self, record):
        imgs = record["image"] if isinstance(record["image"], (list, tuple)) else [record["image"]]
        if len(imgs) != len(self.config.cameras):
            raise UserError(f"model expects {len(self.config.cameras)} image(s) per frame "
                            f"({', '.join(self.config.cameras)}), got {len(imgs)}")
        return [(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))).convert("RGB")
                for im in imgs]

    def _prompt_ids(self, n_images, text, names=None):
        """Chat-template prompt up to 'assistant\\n', with one vision block per image."""
        block = VISION_START + IMAGE_PAD * self.image_tokens + VISION_END
        vision = "".join(f"{n}: {block}" if names else block for n in (names or [None] * n_images))
        s = (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{vision}{text}{IM_END}\n"
             f"{IM_START}assistant\n")
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    def _robot_prompt(self, record):
        names = list(self.config.cameras) if len(self.config.cameras) > 1 else None
        return self._prompt_ids(len(self.config.cameras), self.config.prompt.format(
            instruction=record["instruction"].strip().rstrip(".").lower()), names)

    def _state(self, record):
        s = record.get("state")
        s = np.zeros(self.config.state_dim, np.float32) if s is None else np.asarray(s, np.float32)
        if s.shape != (self.config.state_dim,):
            raise UserError(f"state has shape {s.shape}, model expects ({self.config.state_dim},)")
        return normalize_action(s, self.norm_stats["state"]) if self.norm_stats.get("state") else s

    def _bins(self, actions):
        """Normalised actions in [-1, 1] -> bin indices (OpenVLA's uniform discretisation)."""
        return np.clip(((actions + 1) / 2 * self.config.n_bins).astype(int), 0, self.config.n_bins - 1)

    def _pixels(self, images):
        """All images of a batch through the backbone's image processor, in one call (None for text only)."""
        if not images:
            return None, None
        s = self.config.image_size
        out = self.image_processor(images=[im.resize((s, s), Image.BICUBIC) for im in images], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def _head_pixels(self, images):
        s = self.config.head_image_size
        arr = np.stack([np.asarray(im.resize((s, s), Image.BILINEAR), np.float32) / 255 - 0.5 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (N, 3, s, s)

    def make_batch(self, records, reasoning=True):
        """Records -> right-padded model inputs. `reasoning=False` drops r (the action teacher's view)."""
        cfg, tok = self.config, self.tokenizer
        seqs, images, robot_images, states, actions, amasks, targets = [], [], [], [], [], [], []
        for rec in records:
            imgs = self._images(rec) if rec["domain"] == "robot" else (
                rec["image"] if isinstance(rec["image"], (list, tuple)) else [rec["image"]])
            imgs = [im.convert("RGB") for im in imgs]
            images += imgs
            if rec["domain"] == "robot":
                prompt = self._robot_prompt(rec)
                r = reasoning_text(rec.get("reasoning")) if reasoning else ""
                target = tok(r, add_special_tokens=False)["input_ids"][:cfg.max_reasoning_tokens] if r else []
                target = target + [self.ids[ACT]]
                a = rec.get("actions")
                if a is None:  # a lone frame: its own action, the rest of the chunk masked
                    a = np.repeat(np.asarray(rec["action"], np.float32)[None], cfg.chunk, 0)
                    m = np.arange(cfg.chunk) == 0
                else:
                    m = np.asarray(rec["action_mask"], bool)
                a = np.asarray(a, np.float32)
                if a.shape != (cfg.chunk, cfg.action_dim):
                    raise UserError(f"episode {rec.get('episode')} step {rec.get('step')}: action chunk has "
                                    f"shape {a.shape}, model expects ({cfg.chunk}, {cfg.action_dim})")
                if self.norm_stats.get("action"):
                    a = normalize_action(a, self.norm_stats["action"])
                actions.append(a), amasks.append(m), states.append(self._state(rec)), robot_images.append(imgs)
                targets.append(subtask_target(rec.get("reasoning"), *imgs[0].size))  # None: no ECoT boxes
                if cfg.action_head == "flow":
                    tail, act_tokens = [self.ids[QUERY]] * cfg.n_queries, []
                else:
                    act_tokens = self.bin_ids[self._bins(a.reshape(-1))].tolist()
                    tail = []
                seqs.append((prompt, target, act_tokens, tail))
            else:
                prompt = self._prompt_ids(len(imgs), rec["instruction"])
                answer = tok(reasoning_text(rec["reasoning"]), add_special_tokens=False)["input_ids"]
                seqs.append((prompt, answer + [self.ids[IM_END]], [], []))
        L = max(sum(len(p) for p in s) + (1 if s[2] else 0) for s in seqs)  # +1: <|im_end|> after bins
        B = len(records)
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
        pixel_values, grid = self._pixels(images)
        robot = torch.tensor([r["domain"] == "robot" for r in records])
        batch = dict(input_ids=input_ids, attention_mask=attn, labels=labels, pixel_values=pixel_values,
                     image_grid_thw=grid, mm_token_type_ids=(input_ids == self.ids[IMAGE_PAD]).int(),
                     query_mask=input_ids == self.ids[QUERY], action_positions=act_pos, is_robot=robot,
                     records=records, domain=[r["domain"] for r in records])
        if robot.any():
            batch.update(states=torch.from_numpy(np.stack(states)), actions=torch.from_numpy(np.stack(actions)),
                         action_mask=torch.from_numpy(np.stack(amasks)),
                         head_pixels=torch.stack([self._head_pixels(ims) for ims in robot_images]),
                         ground=torch.tensor(np.stack([np.zeros(2, np.float32) if t is None else t for t in targets])),
                         ground_mask=torch.tensor([t is not None for t in targets]))
        return batch

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
                                  mm_token_type_ids=batch["mm_token_type_ids"])
        return out.last_hidden_state

    def to_device(self, batch):
        """A batch's tensors on the model's device (make_batch builds them on the CPU)."""
        dev = self.queries.device
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

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
        robot = batch["is_robot"]
        if not robot.any():
            out.update(action_sum=lm_sum * 0, action_count=torch.tensor(0))
        elif self.config.action_head == "tokens":
            pos = batch["action_positions"][:, 1:]
            n_act = self.config.chunk * self.config.action_dim
            action_logits = shift_logits[pos][:, self.bin_ids.to(logits.device)].view(-1, n_act, self.config.n_bins)
            targets = torch.searchsorted(self.bin_ids.to(logits.device), shift_labels[pos]).view(-1, n_act)
            mask = batch["action_mask"].repeat_interleave(self.config.action_dim, 1)
            ce = F.cross_entropy(action_logits.transpose(1, 2), targets, reduction="none")
            out.update(action_logits=action_logits, action_targets=targets,
                       action_sum=(ce * mask).sum(), action_count=mask.sum())
        else:
            qs = h[batch["query_mask"]].view(-1, self.config.n_queries, h.shape[-1])  # (Br, Q, H)
            ctx = self.head.context(qs, batch["head_pixels"], batch["states"])
            x1 = batch["actions"]
            noise = torch.randn_like(x1) if noise is None else noise
            t = torch.rand(x1.shape[0], device=h.device) if t is None else t
            x_t = t[:, None, None] * x1 + (1 - t[:, None, None]) * noise      # rectified-flow path
            pred = self.head(x_t, t, ctx)
            mask = batch["action_mask"][..., None].float()
            target = x1 - noise if self.config.flow_target == "velocity" else x1  # velocity x1 - x0, or x1
            se = ((pred - target) ** 2 * mask).sum()
            gm = batch["ground_mask"][:, None].float()
            ground = ((self.head.target_xy(ctx) - batch["ground"]) ** 2 * gm).sum()
            out.update(flow_pred=pred, noise=noise, t=t, x_t=x_t, action_sum=se,
                       action_count=mask.sum() * self.config.action_dim, ground_sum=ground, ground_count=gm.sum() * 2)
        out["lm_loss"] = out["lm_sum"] / out["lm_count"].clamp(min=1)
        out["action_loss"] = out["action_sum"] / out["action_count"].clamp(min=1)
        out["loss"] = out["lm_loss"] + out["action_loss"]
        if "ground_sum" in out:  # not in the paper; at weight 0 it only keeps the probe in the graph (DDP)
            out["loss"] = out["loss"] + self.ground_weight * out["ground_sum"] / out["ground_count"].clamp(min=1)
        return out

    # ---- inference

    def _generate(self, batch, max_new_tokens, stop, logits_processor=None, min_new_tokens=0):
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        dev = self.queries.device
        out = self.backbone.generate(**{k: batch[k].to(dev) for k in keys if batch[k] is not None},
                                     max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=self.ids[PAD], logits_processor=logits_processor)
        return out[:, batch["input_ids"].shape[1]:]

    def _left_padded(self, prompts, pixels):
        """Prompt batch, left-padded for generation (new tokens then line up at the right).
        pixels: (pixel_values, image_grid_thw) of the batch's images, from _pixels."""
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.ids[PAD], dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):], attn[b, L - len(p):] = torch.tensor(p), 1
        return dict(input_ids=ids, attention_mask=attn, pixel_values=pixels[0], image_grid_thw=pixels[1],
                    mm_token_type_ids=(ids == self.ids[IMAGE_PAD]).int())

    @torch.no_grad()
    def generate_answers(self, images, questions, max_new_tokens=32):
        """Greedy answers for a batch: images is a list (per sample) of lists of PIL images."""
        images = [[im.convert("RGB") for im in ims] for ims in images]
        prompts = [self._prompt_ids(len(ims), q) for ims, q in zip(images, questions)]
        batch = self._left_padded(prompts, self._pixels([im for ims in images for im in ims]))
        new = self._generate(batch, max_new_tokens, [self.ids[IM_END], self.ids[PAD]])
        return [self.tokenizer.decode(seq[seq != self.ids[PAD]], skip_special_tokens=True).strip() for seq in new]

    @torch.no_grad()
    def predict_action(self, image, instruction, state=None, reason=True, generator=None):
        """Reason (KV-cached greedy decoding until <|act|>), then act. Returns actions in robot units."""
        return self.predict_actions([image], [instruction], [state], reason, [generator] if generator else None)[0]

    @torch.no_grad()
    def predict_actions(self, images, instructions, states=None, reason=True, generators=None):
        """predict_action for a batch of frames (e.g. many episodes stepped together): one left-padded
        generation and one forward for all. generators: one torch.Generator per frame for the flow
        noise, so a frame's actions do not depend on what else is in the batch."""
        cfg, dev, B = self.config, self.queries.device, len(images)
        recs = [dict(image=im, instruction=text, state=None if states is None else states[b], domain="robot")
                for b, (im, text) in enumerate(zip(images, instructions))]
        imgs = [self._images(r) for r in recs]
        pixels = self._pixels([im for ims in imgs for im in ims])  # once per control step: reasoning and action
        prompts = [self._robot_prompt(r) for r in recs]
        stops = (self.ids[ACT], self.ids[IM_END])
        reasoning_ids = [[] for _ in recs]
        if reason:
            new = self._generate(self._left_padded(prompts, pixels), cfg.max_reasoning_tokens, list(stops)).tolist()
            for b, seq in enumerate(new):
                seq = seq[:next((k for k, i in enumerate(seq) if i in stops), len(seq))]
                reasoning_ids[b] = [i for i in seq if i != self.ids[PAD]]
        if cfg.action_head == "tokens":
            n_act = cfg.chunk * cfg.action_dim
            batch = self._left_padded([p + r + [self.ids[ACT]] for p, r in zip(prompts, reasoning_ids)], pixels)
            new = self._generate(batch, n_act, None, [_AllowOnly(self.bin_ids)], min_new_tokens=n_act)
            bins = torch.searchsorted(self.bin_ids.to(new.device), new[:, :n_act].contiguous()).cpu().numpy()
            actions = ((bins + 0.5) / cfg.n_bins * 2 - 1).reshape(B, cfg.chunk, cfg.action_dim)
        else:
            tail = [self.ids[ACT]] + [self.ids[QUERY]] * cfg.n_queries
            batch = self._left_padded([p + r + tail for p, r in zip(prompts, reasoning_ids)], pixels)
            batch["query_mask"] = batch["input_ids"] == self.ids[QUERY]
            batch = self.to_device(batch)
            qs = self.hidden_states(batch)[batch["query_mask"]].view(B, cfg.n_queries, -1)
            state_t = torch.from_numpy(np.stack([self._state(r) for r in recs])).to(dev)
            ctx = self.head.context(qs, torch.stack([self._head_pixels(ims) for ims in imgs]).to(dev), state_t)
            actions = self.sample_actions(ctx, generators).cpu().numpy()
        actions = np.clip(actions, -1, 1)  # the training targets live in [-1, 1]
        if self.norm_stats.get("action"):
            actions = unnormalize_action(actions, self.norm_stats["action"])
        return [dict(actions=np.asarray(a, np.float32), n_tokens=len(r) + int(reason),
                     reasoning=self.tokenizer.decode(r, skip_special_tokens=True).strip())
                for a, r in zip(actions, reasoning_ids)]

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
        """config.json, model.safetensors, backbone_config.json, tokenizer, image processor; atomic."""
        from safetensors.torch import save_model
        tmp = f"{path.rstrip('/')}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(asdict(self.config), norm_stats=self.norm_stats), f, indent=1)
        self.backbone.config.to_json_file(os.path.join(tmp, "backbone_config.json"))
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
        known = {f.name for f in fields(VLAConfig)}
        cfg = VLAConfig(**{k: v for k, v in saved.items() if k in known})
        bb_cfg = AutoConfig.from_pretrained(os.path.join(path, "backbone_config.json"))
        backbone = AutoModelForImageTextToText.from_config(bb_cfg, dtype=dtype)
        model = cls(cfg, backbone, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))
        load_model(model, os.path.join(path, "model.safetensors"))
        model.norm_stats = norm_stats
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
]


def build_tiny(path, hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2,
               vocab=1024, seed=0):
    """A random tiny Qwen2.5-VL with an offline-trained byte-level BPE tokenizer, saved as an HF folder."""
    model, tok, image_processor = tiny_backbone(hidden, layers, heads, kv_heads, vision_hidden, vision_depth,
                                                vocab, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def tiny_backbone(hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2, vocab=1024, seed=0,
                  text=None, vision=None, device=None):
    """(model, tokenizer, image processor) of build_tiny, in memory. `text`/`vision` override fields of the
    model's text/vision config (bench.py builds Qwen2.5-VL-3B's size this way); `device`: where the random
    weights are made (a 3B model is initialised far faster on the GPU than on the CPU)."""
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
                                num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                                temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
                           **(vision or {})),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=ids[IM_START], eos_token_id=ids[IM_END], pad_token_id=ids[PAD], tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForImageTextToText.from_config(cfg)
    return model, tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=448 * 448)
