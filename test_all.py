"""Every test of the project: tiny models built from configs, data the tests generate, no network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import data
from model import ACT, DualVLA, UserError, VLAConfig, build_tiny


# ----------------------------------------------------------------------------- model.py

@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def tiny_model(tiny_path, head="flow", **kw):
    torch.manual_seed(0)
    return DualVLA(VLAConfig(backbone=tiny_path, action_head=head, image_size=56, head_image_size=32, **kw))


def robot_records(n, seed=0, chunk=None):
    rng = np.random.default_rng(seed)
    recs = []
    for k in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        recs.append(dict(image=img, instruction="pick up the red can", state=rng.normal(size=7).astype(np.float32),
                         action=rng.uniform(-1, 1, 7).astype(np.float32),
                         reasoning={"TASK": "pick up the red can", "MOVE": "move left"} if k % 2 == 0 else None,
                         domain="robot", episode=f"e{k}", step=0))
    return recs


def mm_record(answer="red"):
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    return dict(image=img, instruction="What colour is the can?", state=None, action=None, reasoning=answer,
                domain="mm")


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_forward_shapes(tiny_path, head):
    m = tiny_model(tiny_path, head)
    batch = m.make_batch(robot_records(3) + [mm_record()])
    out = m(batch)
    B, L = batch["input_ids"].shape
    assert out["logits"].shape == (B, L, len(m.tokenizer))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert batch["actions"].shape == (3, m.config.chunk, 7)
    if head == "flow":
        assert m.config.chunk == 16 and out["velocity"].shape == (3, 16, 7) and out["t"].shape == (3,)
        assert batch["query_mask"].sum() == 3 * m.config.n_queries
    else:
        assert m.config.chunk == 1 and out["action_logits"].shape == (3, 7, 256)
        assert batch["action_positions"].sum() == 3 * 7


def test_label_mask_covers_exactly_the_targets(tiny_path):
    m = tiny_model(tiny_path, "tokens")
    recs = robot_records(2) + [mm_record("blue")]
    batch = m.make_batch(recs)
    tok = m.tokenizer
    text = batch["labels"].clone()
    text[batch["action_positions"]] = -100
    got = [tok.decode([i for i in row.tolist() if i != -100]) for row in text]
    assert got[0] == data.reasoning_text(recs[0]["reasoning"]) + ACT + "<|im_end|>"
    assert got[1] == ACT + "<|im_end|>"      # a pruned frame: only <|act|> (and the closing token) as text
    assert got[2] == "blue<|im_end|>"
    # prompt, image and padding positions never carry a label
    assert (batch["labels"][batch["input_ids"] == m.ids["<|image_pad|>"]] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # the action positions hold exactly the bins of the normalised action
    bins = torch.searchsorted(m.bin_ids, batch["input_ids"][batch["action_positions"]]).view(2, 7).numpy()
    expect = np.stack([m._bins(np.asarray(r["action"])) for r in recs[:2]])
    assert (bins == expect).all()


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_overfits_one_batch(tiny_path, head):
    m = tiny_model(tiny_path, head)
    batch = m.make_batch(robot_records(4) + [mm_record()])
    g = torch.Generator().manual_seed(1)
    fixed = dict(noise=torch.randn(4, m.config.chunk, 7, generator=g), t=torch.rand(4, generator=g)) \
        if head == "flow" else {}
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for _ in range(120):
        out = m(batch, **fixed)
        first = first or (out["lm_loss"].item(), out["action_loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    out = m(batch, **fixed)
    assert float(out["lm_loss"]) < 0.1 * first[0]
    assert float(out["action_loss"]) < 0.1 * first[1]


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_save_load_round_trip_is_exact(tiny_path, tmp_path, head):
    m = tiny_model(tiny_path, head)
    stats = data.action_stats(np.random.default_rng(0).normal(size=(50, 7)))
    m.set_action_stats(stats, data.action_stats(np.random.default_rng(1).normal(size=(50, 7))))
    m.eval()
    ckpt = m.save_pretrained(str(tmp_path / "ck"))
    m2 = DualVLA.from_pretrained(ckpt).eval()
    batch = m.make_batch(robot_records(2) + [mm_record()])
    torch.manual_seed(3)
    a = m(batch)
    torch.manual_seed(3)
    b = m2(batch)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert m2.norm_stats == m.norm_stats and m2.config == m.config
    img = robot_records(1)[0]["image"]
    torch.manual_seed(4)
    pa = m.predict_action(img, "pick up the red can", reason=False)
    torch.manual_seed(4)
    pb = m2.predict_action(img, "pick up the red can", reason=False)
    assert np.array_equal(pa["actions"], pb["actions"])


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_predict_action_finite(tiny_path, head):
    m = tiny_model(tiny_path, head, max_reasoning_tokens=8).eval()
    m.set_action_stats(data.action_stats(np.random.default_rng(0).uniform(-0.05, 0.05, size=(50, 7))))
    gray = Image.fromarray(np.full((40, 50), 100, np.uint8))   # wrong mode and size: converted, not rejected
    out = m.predict_action(gray, "pick up the red can", state=np.zeros(7, np.float32))
    assert out["actions"].shape == (m.config.chunk, 7) and np.isfinite(out["actions"]).all()
    assert isinstance(out["reasoning"], str) and 1 <= out["n_tokens"] <= 9
    assert np.abs(out["actions"][:, :6]).max() <= 0.05 + 1e-5   # unnormalised back into robot units
    answers = m.generate_answers([[gray], [gray]], ["What colour is the can?", "How many?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_bad_checkpoint_and_backbone_paths(tiny_path, tmp_path):
    with pytest.raises(UserError, match="backbone folder not found"):
        DualVLA(VLAConfig(backbone=str(tmp_path / "nope")))
    m = tiny_model(tiny_path)
    ck = m.save_pretrained(str(tmp_path / "ck"))
    os.remove(os.path.join(ck, "model.safetensors"))
    with pytest.raises(UserError, match="missing model.safetensors"):
        DualVLA.from_pretrained(ck)
    with pytest.raises(UserError, match="expects 1 image"):
        m.make_batch([dict(robot_records(1)[0], image=[robot_records(1)[0]["image"]] * 2)])
