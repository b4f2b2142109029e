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


# ----------------------------------------------------------------------------- distill.py

import math

from distill import action_kd, check_teachers, dual_teacher_loss, kd_kl


def test_kd_kl_hand_computed():
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    kl_row0 = sum(pi * math.log(pi / (1 / 3)) for pi in p)     # KL(p ‖ uniform), row 1 matches exactly
    both = torch.tensor([True, True])
    assert kd_kl(s, t, both, T=1.0).item() == pytest.approx(kl_row0 / 2, rel=1e-6)
    assert kd_kl(s, t, torch.tensor([False, True]), T=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_kl(t, t, both, T=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # T: T² · KL between the distributions softened by T
    p2 = [math.exp(0.5) / (math.exp(0.5) + 2), 1 / (math.exp(0.5) + 2), 1 / (math.exp(0.5) + 2)]
    kl2 = sum(pi * math.log(pi / (1 / 3)) for pi in p2)
    assert kd_kl(s, t, both, T=2.0).item() == pytest.approx(4 * kl2 / 2, rel=1e-6)
    # masked positions may hold anything, even inf
    s_bad = s.clone()
    s_bad[0] = float("inf")
    assert kd_kl(s_bad, t, torch.tensor([False, True]), T=1.0).item() == pytest.approx(0.0, abs=1e-7)


class CountingTeacher:
    """Counts forwards of a frozen teacher (wraps its __call__, same interface)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.tokenizer, self.config = model.tokenizer, model.config

    def __call__(self, batch, **kw):
        self.calls += 1
        return self.model(batch, **kw)


def frozen(model):
    model.eval().requires_grad_(False)
    return model


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_dual_routing_counts_teacher_forwards(tiny_path, head):
    student = tiny_model(tiny_path, head)
    a_t, r_t = CountingTeacher(frozen(tiny_model(tiny_path, head))), CountingTeacher(frozen(tiny_model(tiny_path, head)))
    robot_batch = student.make_batch(robot_records(3))
    mm_batch = student.make_batch([mm_record(), mm_record("blue")])
    out = dual_teacher_loss(student, a_t, r_t, robot_batch, kd="dual")
    assert (a_t.calls, r_t.calls) == (1, 0) and out["l_kd_reason"].item() == 0
    out = dual_teacher_loss(student, a_t, r_t, mm_batch, kd="dual")
    assert (a_t.calls, r_t.calls) == (1, 1) and out["l_kd_action"].item() == 0
    mixed = student.make_batch(robot_records(2) + [mm_record()])
    dual_teacher_loss(student, a_t, r_t, mixed, kd="single")
    assert (a_t.calls, r_t.calls) == (1, 2)
    out = dual_teacher_loss(student, a_t, r_t, mixed, kd="none")
    assert (a_t.calls, r_t.calls) == (1, 2) and out["loss"].item() == pytest.approx(out["l_vla"].item())


def test_flow_action_kd_zero_for_same_weights_and_noise(tiny_path):
    student = tiny_model(tiny_path, "flow").eval()
    same = frozen(tiny_model(tiny_path, "flow"))
    batch = student.make_batch(robot_records(2))
    s_out = student(batch)
    t_out = same(batch, noise=s_out["noise"], t=s_out["t"])
    assert action_kd(s_out, t_out, batch, T=2.0).item() == pytest.approx(0.0, abs=1e-10)
    other = student(batch)   # fresh noise and time: different velocities
    assert action_kd(other, t_out, batch, T=2.0).item() > 0
    torch.manual_seed(7)
    different = frozen(DualVLA(VLAConfig(backbone=tiny_path, image_size=56, head_image_size=32)))
    t2 = different(batch, noise=s_out["noise"], t=s_out["t"])
    assert action_kd(s_out, t2, batch, T=2.0).item() > 0


def train_steps(model, loss_fn, n, lr=2e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_distill_steps_reduce_vla_and_kd(tiny_path, head):
    recs = robot_records(4) + [mm_record(), mm_record("blue")]
    torch.manual_seed(1)
    teacher = DualVLA(VLAConfig(backbone=tiny_path, action_head=head, image_size=56, head_image_size=32))
    t_batch = teacher.make_batch(recs)
    train_steps(teacher, lambda: teacher(t_batch)["loss"], 30)   # a trained teacher agrees with the labels
    frozen(teacher)
    student = tiny_model(tiny_path, head)
    batch = student.make_batch(recs)

    def measure():
        torch.manual_seed(11)   # the same noise and time each time: a fixed objective
        out = dual_teacher_loss(student, teacher, teacher, batch, lam=1.0, kd="dual")
        return out["l_vla"].item(), out["l_kd_action"].item(), out["l_kd_reason"].item()

    before = measure()
    train_steps(student, lambda: dual_teacher_loss(student, teacher, teacher, batch, lam=1.0)["loss"], 30)
    after = measure()
    assert after[0] < 0.7 * before[0]
    assert after[1] < 0.7 * before[1] and after[2] < 0.7 * before[2]


def test_teacher_mismatch_is_refused(tiny_path, tmp_path):
    student = tiny_model(tiny_path, "flow")
    with pytest.raises(UserError, match="action_head"):
        check_teachers(student, tiny_model(tiny_path, "tokens"), tiny_model(tiny_path, "flow"))
    other_tok = build_tiny(str(tmp_path / "other"), vocab=700)
    with pytest.raises(UserError, match="different tokenizer"):
        check_teachers(student, tiny_model(tiny_path, "flow"), tiny_model(other_tok, "flow"))
    with pytest.raises(UserError, match="--kd must be one of"):
        dual_teacher_loss(student, student, student, student.make_batch([mm_record()]), kd="both")
