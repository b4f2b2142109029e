"""The tabletop miniature's results: the demo's evaluation of each trained model and the table the main job
ends with (train.py), and the paper's Tables 2, 5, 6/7/8 and its multimodal average (Sec. 4) over seeds,
from the run folders `train.py --stage all --ablations` writes.

    python evaluate.py table --runs OUT1 OUT2 OUT3 --out report.md
"""
import json
import math
import os

import numpy as np
from PIL import Image

import tabletop
from data import DataError, atomic_write
from model import UserError


# ============================================================================= the demo's evaluation (train.py)

DEMO_BENCH = ("TabletopMCQ", "TabletopYN", "TabletopVQA")  # tabletop.write_demo's held-out benchmarks


def eval_commands(cfg, stage):
    """evaluate.py's sim and mm commands for a stage's model: the tabletop demo's, or the paper's."""
    ckpt, out = os.path.join(cfg.out, stage, "model"), os.path.join(cfg.out, stage)
    env = "simplerenv" if cfg.data else f"tabletop --state --exec-horizon {eval_horizon(cfg)}"  # acts on its state too
    if cfg.data and cfg.preset == "paper":  # the base model's SimplerEnv execution (InstructVLA's policies)
        env += " --ensemble adaptive --sticky-repeat 10 --gripper-fix"
    bench = "" if cfg.mm_data else f" --bench {','.join(DEMO_BENCH)} --data-root {cfg.out}/data/LMUData"
    return (f"python evaluate.py sim --env {env} --ckpt {ckpt} --out {out}/eval/sim"
            + (" --no-reason" if stage == "specialist" else ""),
            f"python evaluate.py mm --ckpt {ckpt}{bench} --out {out}")


def eval_horizon(cfg):
    """Actions executed per predicted chunk in the tabletop evaluation: half of a 16-action chunk, all of a shorter one."""
    return min(8, cfg.chunk or 16)


def demo_kb(cfg, evaluate, vla_score):
    """The demo's VLA Score knowledge base: the expert's rollouts on held-out seeds, oracle-scored (cached)."""
    kb = os.path.join(cfg.out, "data", "kb.jsonl")
    if not os.path.isfile(kb):
        rollouts = os.path.join(cfg.out, "data", "kb_rollouts")
        evaluate.run_sim(evaluate.SimConfig(env="tabletop", policy="expert", episodes=4, seed=900, out=rollouts))
        vla_score.build_kb(rollouts, kb)
    return kb


def evaluate_demo(cfg, stages, text_embedder):
    """The demo's evaluation of each trained model (--stage all, and --stage distill on the embedded default):
    evaluate.py's sim (tabletop), the open-loop check, the VLA Score with the oracle judge (the tiny backbone's
    text states retrieve the few-shot examples: offline, no extra package) and mm (the demo's TSVs).
    An evaluation already written is kept unless --overwrite."""
    try:
        import benchmarks
        import evaluate
        import vla_score
    except ImportError:
        print("evaluate.py not found: skipping the evaluation; run evaluate.py on the models above later")
        return
    if cfg.data:
        print("--data is not the tabletop demo: evaluate with SimplerEnv on a GPU (the commands below)")
        return
    kb = demo_kb(cfg, evaluate, vla_score)
    for stage in stages:
        ckpt, out = os.path.join(cfg.out, stage, "model"), os.path.join(cfg.out, stage)  # -> OUT/<stage>/eval/
        written = ("sim/sim_results.json", "open_loop.json", "vla_score/summary.json") + \
            (() if cfg.mm_data else ("mm/summary.json",))
        if not cfg.overwrite and all(os.path.isfile(os.path.join(out, "eval", f)) for f in written):  # in this order
            print(f"{stage}: already evaluated in {out}/eval")
            continue
        sim = evaluate.run_sim(evaluate.SimConfig(env="tabletop", ckpt=ckpt, episodes=cfg.eval_episodes,
                                                  out=os.path.join(out, "eval", "sim"),
                                                  exec_horizon=eval_horizon(cfg), state=True, reason=stage != "specialist"))
        print(f"{stage}: tabletop success " + ", ".join(
            f"{t} {r['successes']}/{r['episodes']} ({r['interval'][0]:.0f}-{r['interval'][1]:.0f} % at 95 %)"
            for t, r in sim["per_task"].items()))
        model = evaluate.load_policy_model(ckpt)  # once, for the open-loop check and the benchmarks
        loop = evaluate.open_loop_agreement(model, episodes=cfg.eval_episodes, reason=stage != "specialist")
        atomic_write(os.path.join(out, "eval", "open_loop.json"), json.dumps(loop, indent=1))
        print(f"{stage}: open-loop agreement with the expert: direction {loop['direction']:.3f}, "
              f"gripper {loop['gripper']:.3f}")
        try:  # VLA Score (Eq. 8) with the oracle judge, the demo's KB as few-shot examples
            vla_score.main_score(vla_score.ScoreConfig(rollouts=os.path.join(out, "eval", "sim"), kb=kb, judge="oracle",
                                                       text_embedder=text_embedder, image_embedder="pixels",
                                                       out=os.path.join(out, "eval", "vla_score")))
        except (UserError, DataError) as e:  # e.g. two arms' actions, which the judge's prompt has no form for
            print(f"{stage}: VLA Score skipped: {e}")
        if not cfg.mm_data:
            mm = benchmarks.evaluate_mm(model, benchmarks.MMConfig(
                ckpt=ckpt, bench=",".join(DEMO_BENCH), data_root=os.path.join(cfg.out, "data", "LMUData"),
                out=out, limit=cfg.eval_questions))
            print(f"{stage}: demo benchmarks " + json.dumps({k: v.get("score") for k, v in mm["benchmarks"].items()}))


def write_results(cfg, stages):
    """OUT/results.json (demo_results) and its table: what the main job ends with."""
    baselines = tabletop.bench_baselines(n=max(100, 10 * cfg.eval_questions), seed=cfg.seed + 7)  # 10x the questions
    results = demo_results(cfg.out, stages, baselines)
    atomic_write(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=1))
    print(f"\nresults ({os.path.join(cfg.out, 'results.json')}):\n" + results_table(results))


def print_summary(summaries, cfg, wall, evaluated=False):
    """The stages' table train.py prints at the end, and the evaluate.py commands when it did not evaluate."""
    print(f"\n{'stage':<11} {'steps':>6} {'loss first -> last':>20} {'fixed batch before -> after':>28} {'time':>7}  model")
    for s in summaries:
        if s["stage"] == "prune":
            print(f"{'prune':<11} {'':>6} {'':>20} {'':>28} {s['wall_s']:>6.0f}s  {s['model']}")
            continue
        fb = s["fixed_batch_loss"]
        print(f"{s['stage']:<11} {s['steps']:>6} {s['first_loss']:>9.4f} -> {s['last_loss']:<8.4f} "
              f"{fb[0]:>13.4f} -> {fb[1]:<10.4f} {s['wall_s']:>6.0f}s  {s['model']}")
    print(f"total wall time {wall:.0f} s")
    trained = [s["stage"] for s in summaries if s["stage"] != "prune"]
    if trained and not evaluated:
        print("next, evaluate:\n  " + "\n  ".join(eval_commands(cfg, trained[-1])))


# ============================================================================= the miniature (Sec. 4's tables)

def read_json(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing ({what})")
    with open(path) as f:
        return json.load(f)


def stage_metrics(stage_dir):
    """One model's demo evaluation as train.py --stage all writes it under STAGE/eval/: tabletop success
    per task and its average, each demo benchmark's score and their average, and the VLA Score row."""
    sim = read_json(os.path.join(stage_dir, "eval", "sim", "sim_results.json"), "tabletop success")["success"]
    mm = read_json(os.path.join(stage_dir, "eval", "mm", "summary.json"), "demo benchmarks")["benchmarks"]
    vla = read_json(os.path.join(stage_dir, "eval", "vla_score", "summary.json"), "VLA Score")["policies"]
    m = dict(sim, success=float(np.mean(list(sim.values()))))
    m.update({name: b["score"] for name, b in mm.items()}, mm=float(np.mean([b["score"] for b in mm.values()])),
             benchmarks=sorted(mm))
    m.update(next(iter(vla.values())))
    loop = os.path.join(stage_dir, "eval", "open_loop.json")
    if os.path.isfile(loop):  # x100: percent-like, as the other columns
        m.update({f"{k}_agreement": 100 * v for k, v in read_json(loop, "open-loop agreement").items() if k in ("direction", "gripper")})
    return m


def demo_results(run_dir, stages, baselines):
    """The main job's result, OUT/results.json: per stage, tabletop success per task as a rate in [0, 1]
    with its episodes and 95 % Wilson interval, each demo benchmark's accuracy beside its uniform chance
    and the score the question text alone gets (tabletop.bench_baselines), and the VLA Score (Eq. 8, the
    tabletop oracle as judge; None for two-arm rollouts, which its prompt has no form for), every figure in [0, 1]."""
    out = {}
    for stage in stages:
        d = os.path.join(run_dir, stage, "eval")
        tasks = read_json(os.path.join(d, "sim", "sim_results.json"), "tabletop success")["per_task"]
        mm = read_json(os.path.join(d, "mm", "summary.json"), "demo benchmarks")["benchmarks"]
        vla = os.path.join(d, "vla_score", "summary.json")  # absent where the judge had no form (two arms)
        vla = next(iter(read_json(vla, "VLA Score")["policies"].values()))["VLA_Score"] / 100 if os.path.isfile(vla) else None
        out[stage] = dict(
            success={t: r["successes"] / r["episodes"] for t, r in tasks.items()},
            success_interval={t: [r["interval"][0] / 100, r["interval"][1] / 100] for t, r in tasks.items()},
            episodes_per_task=min(r["episodes"] for r in tasks.values()),
            bench={name: b["score"] / 100 for name, b in mm.items()},
            bench_chance={name: baselines[name]["chance"] for name in mm},
            bench_text_only={name: baselines[name]["text_only"] for name in mm},
            vla_score=vla)
    return out


def results_table(results):
    """results.json as the table the main job prints: one row per stage, success % per task with its 95 %
    interval, each benchmark's accuracy % (chance / text-only in the header), the VLA Score."""
    first = next(iter(results.values()))
    tasks, bench = list(first["success"]), list(first["bench"])
    head = ([t.replace("tabletop_", "") + " %" for t in tasks]
            + [f"{b.replace('Tabletop', '')} % (chance {100 * first['bench_chance'][b]:.0f}, text {100 * first['bench_text_only'][b]:.0f})"
               for b in bench] + ["VLA Score"])
    lines = ["| stage | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for stage, r in results.items():
        lo_hi = lambda t: [round(100 * x) for x in r["success_interval"][t]]
        cells = ([f"{100 * r['success'][t]:.0f} [{lo_hi(t)[0]}-{lo_hi(t)[1]}]" for t in tasks]
                 + [f"{100 * r['bench'][b]:.1f}" for b in bench]
                 + ["–" if r["vla_score"] is None else f"{100 * r['vla_score']:.1f}"])
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    n = first["episodes_per_task"]
    return "\n".join(lines) + f"\n(success: {n} held-out episodes a task, [95 % Wilson interval]; benchmarks: accuracy %)"


def mean_std_table(rows, columns):
    """rows: name -> list of metric dicts (one per seed) -> Markdown, 'mean ± std' over seeds (std with n-1)."""
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.1f}"
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell([m.get(c) for m in ms]) for c in columns) + " |"
              for name, ms in rows.items()]
    return "\n".join(lines)


def loss_curves_png(runs, path, size=(960, 300)):
    """Each stage's training action loss (metrics.jsonl: the action term, the quantity action degeneration
    is about) against its steps, one line per seed, drawn with PIL: three panels (specialist, generalist,
    distill), each on its own linear scale."""
    from PIL import ImageDraw
    stages, (W, H) = ("specialist", "generalist", "distill"), size
    img = Image.new("RGB", size, "white")
    draw, pw = ImageDraw.Draw(img), W // len(stages)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for k, stage in enumerate(stages):
        curves = []
        for run in runs:
            with open(os.path.join(run, stage, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curves.append([(r["step"], r["action"]) for r in rows if math.isfinite(r["action"])])
        pts = [p for c in curves for p in c]
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        left, top, right, bottom = k * pw + 45, 25, (k + 1) * pw - 10, H - 30
        draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
        draw.text((left, 6), f"{stage}: action loss (steps {x0}-{x1})", fill="black")
        draw.text((k * pw + 2, top), f"{y1:.2f}", fill="black")
        draw.text((k * pw + 2, bottom - 10), f"{y0:.2f}", fill="black")
        for n, c in enumerate(curves):
            xy = [(left + (right - left) * (x - x0) / max(x1 - x0, 1), bottom - (bottom - top) * (y - y0) / max(y1 - y0, 1e-9))
                  for x, y in c]
            draw.line(xy, fill=colours[n % len(colours)], width=2)
    draw.text((10, H - 18), "one line per run: " + ", ".join(os.path.basename(os.path.normpath(r)) for r in runs), fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"), binary=True)


def miniature_tables(runs):
    """The paper's tables in miniature over seeds (one run folder each): Table 2 (tabletop success), the
    multimodal average, Table 5 (VLA Score, oracle judge), Tables 6-8 (--prune and --kd modes, λ; the main
    distill run is its own mode's row, the others come from OUT/ablations/<kind>-<mode>/distill)."""
    for run in runs:
        if not os.path.isdir(run):
            raise UserError(f"--runs {run}: no such folder")
    main = {stage: [stage_metrics(os.path.join(run, stage)) for run in runs]
            for stage in ("specialist", "generalist", "distill")}
    rows = dict(zip(("specialist", "generalist (co-trained, unpruned)", "DualVLA (pruned + dual-teacher KD)"),
                    main.values()))
    tasks = sorted(k for k in main["specialist"][0] if k.startswith("tabletop_"))
    benches = main["specialist"][0]["benchmarks"]
    flags = [read_json(os.path.join(run, "distill", "config.json"), "the distill run's flags") for run in runs]
    ablation = {}
    for kind, flag in (("prune", "prune"), ("kd", "kd"), ("lambda", "lambda_kd")):
        by_mode = {}
        for run, own, distilled in zip(runs, flags, main["distill"]):
            mode = own[flag]  # named as train.ablation_runs names its folders: a number by its shortest form
            by_mode.setdefault(f"{mode:g}" if isinstance(mode, float) else mode, []).append(distilled)
            root = os.path.join(run, "ablations")
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                if name.startswith(kind + "-"):
                    by_mode.setdefault(name[len(kind) + 1:], []).append(stage_metrics(os.path.join(root, name, "distill")))
        ablation[kind] = by_mode
    n = f"{len(runs)} seed{'s' * (len(runs) > 1)}, mean ± std"
    score_cols = dict(R="R", A="A", I="I", RA="RA", Sim="success", VLA_Score="VLA Score")
    out = [f"### Table 2 analogue: tabletop success % ({n})", "",
           mean_std_table(rows, dict({t: t.replace("tabletop_", "") for t in tasks}, success="Avg",
                                     direction_agreement="open-loop direction ×100", gripper_agreement="open-loop gripper %")), "",
           f"### Multimodal analogue: demo benchmarks ({n})", "",
           mean_std_table(rows, dict({b: b for b in benches}, mm="Avg")), "",
           f"### Table 5 analogue: VLA Score with the oracle judge, % ({n})", "",
           mean_std_table(rows, score_cols)]
    for kind, title in (("prune", "Table 7 analogue: pruning modes (--prune)"),
                        ("kd", "Tables 6/8 analogue: distillation modes (--kd)"),
                        ("lambda", "Table 6 analogue: the KD weight λ (--lambda-kd)")):
        out += ["", f"### {title} ({n} where a mode has all)", "",
                mean_std_table(ablation[kind], dict(success="tabletop Avg", direction_agreement="open-loop direction ×100",
                                                    mm="benchmarks Avg", VLA_Score="VLA Score"))]
    return "\n".join(out)
