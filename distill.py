"""Dual-teacher adaptive distillation (paper Sec. 3.2.2, Eq. 5-7).

    L = L_VLA + λ · L_KD,   L_KD chosen per sample by its data domain ("adaptive" = this routing):
      robot frame       -> action teacher π^a (the specialist), Eq. 5:  T² · KL(π^a(a|o,i) ‖ π_θ(a|o,i,r))
      multimodal sample -> reasoning teacher π^r (the generalist), Eq. 6: T² · KL(π^r(r|o,i) ‖ π_θ(r|o,i))

Each sample runs exactly one teacher forward, under no_grad, with the teachers in eval mode.
The `kd` flag gives the ablation rows of the paper's Table 8:
    dual       the paper: each domain to its own teacher
    action     no reasoning teacher (multimodal samples get no KD)
    reasoning  no action teacher (robot frames get no KD)
    single     one teacher (π^r) on all data, on every target it predicts: the "plain KL"
    none       plain fine-tuning on the pruned data
"""
import torch
import torch.nn.functional as F

from model import UserError, text_target_mask

KD_MODES = ("dual", "action", "reasoning", "single", "none")


def kd_kl(student_logits, teacher_logits, mask, T):
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over the vocabulary, averaged over `mask`.

    The T² keeps the gradient's scale independent of T (Hinton et al.). log-softmax in float32,
    so it is stable under bf16 autocast.
    """
    mask = mask.bool()
    if not mask.any():
        return student_logits.sum() * 0
    s = F.log_softmax(student_logits[mask].float() / T, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / T, dim=-1)
    return T * T * (t.exp() * (t - s)).sum(-1).mean()


def action_kd(student_out, teacher_out, batch, T):
    """Eq. 5 on the robot frames of `batch` (student and teacher outputs list them in the same order).

    tokens head: kd_kl over the action-bin distributions, Eq. 5 literally.
    flow head: the paper does not say. One Euler step of a flow policy is a Gaussian
    x_{t+dt} ~ N(x_t + dt·v(x_t, t), σ²I); for two such steps from the same x_t,
    KL(N(μ_a, σ²I) ‖ N(μ_θ, σ²I)) = dt²/(2σ²) · ‖v_a − v_θ‖², so with the same noise and time given
    to both models the KL is a scaled squared distance of the predicted velocities. We use the mean
    squared distance (the constant folds into λ) of what the heads predict: velocities, or for
    flow_target="action" clean chunks, i.e. velocities weighed by (1 - t)² as in that head's own loss.
    T plays no role here.
    """
    mask = batch["action_mask"].to(student_out["action_sum"].device)
    if "action_logits" in student_out:
        per_dim = mask.repeat_interleave(student_out["action_logits"].shape[1] // mask.shape[1], 1)
        return kd_kl(student_out["action_logits"], teacher_out["action_logits"], per_dim, T)
    m = mask[..., None].float()
    sq = (student_out["flow_pred"] - teacher_out["flow_pred"]) ** 2 * m
    return sq.sum() / (m.sum() * sq.shape[-1]).clamp(min=1)


def reasoning_kd(student_out, teacher_out, batch, T, rows, teacher_batch):
    """Eq. 6: kd_kl over the text targets (answers, reasoning) of the samples `rows` of `batch`.

    The teacher saw those samples alone (`teacher_batch`, right-padded the same way), so its
    positions are the student's, cut to the teacher's length.
    """
    L = teacher_batch["input_ids"].shape[1]
    student = student_out["logits"][rows, :L][:, :-1]
    teacher = teacher_out["logits"][:, :-1]
    return kd_kl(student, teacher, text_target_mask(teacher_batch).to(student.device), T)


def teacher_forward(teacher, batch, **kw):
    with torch.no_grad():
        return teacher(batch, **kw)


def dual_teacher_loss(student, action_teacher, reasoning_teacher, batch, lam=0.15, T=2.0, kd="dual",
                      noise=None, t=None):
    """Eq. 7: L = L_VLA + λ · L_KD with L_KD routed per sample by its domain.

    `noise`/`t` (flow head) fix the student's noisy actions, which the action teacher then shares;
    `student` may be wrapped in DDP (its batches are built by the inner DualVLA).
    """
    if kd not in KD_MODES:
        raise UserError(f"--kd must be one of {', '.join(KD_MODES)}, got {kd!r}")
    out = student(batch, noise=noise, t=t)
    make_batch = getattr(student, "module", student).make_batch
    zero = out["loss"] * 0
    l_act, l_reason = zero, zero
    records = batch["records"]
    robot = [i for i, r in enumerate(records) if r["domain"] == "robot"]
    mm = [i for i, r in enumerate(records) if r["domain"] == "mm"]
    flow = {"noise": out["noise"], "t": out["t"]} if "flow_pred" in out else {}
    if kd == "single":  # π^r sees exactly what the student sees and supervises every target
        t_out = teacher_forward(reasoning_teacher, batch, **flow)
        if robot:
            l_act = action_kd(out, t_out, batch, T)
        full = torch.arange(len(records))
        l_reason = reasoning_kd(out, t_out, batch, T, full, batch)
    else:
        if robot and kd in ("dual", "action"):
            # π^a(a | o, i): the action teacher never sees reasoning
            a_batch = make_batch([records[i] for i in robot], reasoning=False)
            l_act = action_kd(out, teacher_forward(action_teacher, a_batch, **flow), batch, T)
        if mm and kd in ("dual", "reasoning"):
            r_batch = make_batch([records[i] for i in mm])
            l_reason = reasoning_kd(out, teacher_forward(reasoning_teacher, r_batch), batch, T,
                                    torch.tensor(mm), r_batch)
    loss = out["loss"] + lam * (l_act + l_reason)
    return dict(loss=loss, l_vla=out["loss"], l_kd_action=l_act, l_kd_reason=l_reason,
                lm_loss=out["lm_loss"], action_loss=out["action_loss"])


def check_teachers(student, action_teacher, reasoning_teacher):
    """Teachers must share the student's tokenizer and action head, else KD compares different things."""
    for name, t in (("action teacher", action_teacher), ("reasoning teacher", reasoning_teacher)):
        if t.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            raise UserError(f"{name} uses a different tokenizer than the student")
        for k in ("action_head", "action_dim", "chunk", "n_bins", "cameras"):
            a, b = getattr(t.config, k), getattr(student.config, k)
            if a != b:
                raise UserError(f"{name} has {k}={a!r}, the student {k}={b!r}")
