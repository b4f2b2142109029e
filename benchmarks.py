"""The eight multimodal benchmarks of the paper's evaluation (Sec. 4, NOTES §5), scored as VLMEvalKit does.

    python evaluate.py mm --ckpt DIR --bench MMStar,...   reads VLMEvalKit's <name>.tsv files from --data-root

VLMEvalKit TSVs are read as they are, prompts and answer extraction follow VLMEvalKit's, and each
benchmark keeps its own metric: choice accuracy, CircularEval, VQA accuracy, ANLS, OCRBench hits
and MM-Vet's GPT-4 grader (any judge of vla_score.make_judge). Multiple-choice answers are read by
exact matching; with --judge, those it cannot read go to a judge model, as in VLMEvalKit's default.
Predictions and judge results are written as they come, so --resume continues a stopped run.
"""
import ast
import base64
import binascii
import csv
import io
import json
import os
import re
import string
import sys
from dataclasses import dataclass, fields

import torch
from PIL import Image
from tqdm import tqdm

from data import DataError, atomic_write, open_image, read_appended
from model import DualVLA, UserError
from vla_score import JudgeAbort, JudgeError


# ============================================================================= mm: eight benchmarks (NOTES §5)

# name -> (prompt kind, metric, max new tokens). Prompt kinds: "mcq" (hint, question, options and
# the select line), "yn" (yes/no), "vqa" (single word or phrase), "open" (the question as is:
# VLMEvalKit adds nothing for OCRBench and MM-Vet). The token budgets are ours: VLMEvalKit lets each
# model pick its own; these fit each answer format (MM-Vet's free-form answers need the most).
BENCHMARKS = {
    "MMMU_DEV_VAL": ("mcq", "mmmu", 64),
    "MMVet": ("open", "judge", 512),
    "MMStar": ("mcq", "accuracy", 32),
    "OCRBench": ("open", "ocrbench", 128),
    "MMBench_DEV_EN_V11": ("mcq", "circular", 32),
    "MMBench_DEV_EN": ("mcq", "circular", 32),
    "TextVQA_VAL": ("vqa", "vqa_accuracy", 32),
    "InfoVQA_VAL": ("vqa", "anls", 32),
    "DocVQA_VAL": ("vqa", "anls", 32),
    "TabletopMCQ": ("mcq", "accuracy", 16),     # the demo's own TSVs (tabletop.write_benchmarks)
    "TabletopYN": ("yn", "yes_no", 8),
    "TabletopVQA": ("vqa", "vqa_accuracy", 16),
}
# The paper's eight; the MMBench slot takes MMBench_DEV_EN when V1.1 was not run (the paper names
# no version).
PAPER_MM_BENCHMARKS = ("MMMU_DEV_VAL", "MMVet", "MMStar", "OCRBench", "MMBench_DEV_EN_V11",
                       "TextVQA_VAL", "InfoVQA_VAL", "DocVQA_VAL")
SLOT_FALLBACK = {"MMBench_DEV_EN_V11": "MMBench_DEV_EN"}
PAPER_MM_AVERAGE = {"DualVLA": 65.4, "InstructVLA-G": 65.5}  # NOTES §2, §3: the only numbers given
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit's MMBench TSVs store rotation k of question i as i + k·1e6


@dataclass
class MMConfig:
    ckpt: str = ""                   # DualVLA checkpoint folder (model.save_pretrained output)
    bench: str = ",".join(PAPER_MM_BENCHMARKS)  # comma-separated names from BENCHMARKS
    data_root: str = os.environ.get("LMUData", "~/LMUData")  # VLMEvalKit's own default for <name>.tsv
    out: str = ""                    # results go to OUT/eval/mm/; default: the checkpoint folder
    batch_size: int = 8              # questions per generate_answers call
    max_new_tokens: int = 0          # 0: each benchmark's own budget from BENCHMARKS
    limit: int = 0                   # score only the first N questions of each benchmark (0: all)
    mmmu_split: str = "validation"   # the paper's MMMU number is the validation split of MMMU_DEV_VAL
    device: str = "auto"             # "auto": cuda when available, else cpu
    resume: bool = False             # keep predictions and judgements already in OUT/eval/mm/; do the rest


# ----------------------------------------------------------------------------- reading VLMEvalKit TSVs


def bench_paths(cfg):
    """{name: TSV path} for cfg.bench, all checked before any model loads or generates."""
    return {n: tsv_path(cfg.data_root, n) for n in parse_bench(cfg.bench)}


def tsv_path(data_root, name):
    """$LMUData/<name>.tsv, where VLMEvalKit downloads it; a missing file is a UserError."""
    path = os.path.join(os.path.expanduser(data_root), f"{name}.tsv")
    if not os.path.isfile(path):
        hint = ("tabletop.write_benchmarks writes it" if name.startswith("Tabletop") else
                f"VLMEvalKit downloads it to $LMUData/{name}.tsv; copy it here or pass --data-root")
        raise UserError(f"no TSV for {name}: {path} does not exist ({hint})")
    return path


def parse_bench(spec):
    """'MMStar,OCRBench' -> names; an unknown name lists the supported ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--bench is empty (supported: {', '.join(BENCHMARKS)})")
    for n in names:
        if n not in BENCHMARKS:
            raise UserError(f"unknown benchmark {n!r} (supported: {', '.join(BENCHMARKS)})")
    return names


def _as_list(cell):
    """A python-list cell "['a', 'b']" (MMMU's images, VQA's 10 answers) -> list; any other -> [cell]."""
    if len(cell) > 1 and cell[0] == "[" and cell[-1] == "]":
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            return [cell]
        if isinstance(value, list):
            return [str(x) for x in value]
    return [cell]


def _open_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s, validate=True)))


def read_tsv(path):
    """Rows of a VLMEvalKit benchmark TSV, images checked but not yet decoded.

    Columns: index, image (base64; a python-list string of several for MMMU; or, when it is at most
    64 characters, the index of another row whose image to reuse), image_path (used when there is
    no image column), question, hint, option columns A, B, ..., answer, category, l2-category, split.
    Rows without an image are dropped, as VLMEvalKit does. Errors name the file, row and column.
    """
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # one base64 image is megabytes; the default cap is 128 KB
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        try:
            raw = [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not a readable TSV ({e})") from None
    for col in ("index", "question", "answer"):
        if col not in header:
            raise DataError(f"{path}: no '{col}' column (columns: {', '.join(header)})")
    if "image" not in header and "image_path" not in header:
        raise DataError(f"{path}: neither an 'image' nor an 'image_path' column (columns: {', '.join(header)})")
    letters = [c for c in string.ascii_uppercase if c in header]
    int_index = all(re.fullmatch(r"-?\d+", r["index"].strip()) for r in raw)
    by_index = {r["index"].strip(): r["image"] for r in raw} if "image" in header else {}
    checked, seen, rows = set(), set(), []
    for n, r in enumerate(raw, start=1):
        key = r["index"].strip()
        where = f"{path}: row {n} (index {key})"
        if key in seen:
            raise DataError(f"{where}, column 'index': duplicate index")
        seen.add(key)
        for col in ("question", "answer"):
            if not r[col].strip():
                raise DataError(f"{where}, column '{col}': empty")
        images, image_paths = None, None
        if "image" in header:
            cell = r["image"]
            if not cell:
                continue
            if len(cell) <= 64:                    # VLMEvalKit's rule: a short cell names another row
                cell = by_index.get(cell.strip(), "")
                if len(cell) <= 64:
                    raise DataError(f"{where}, column 'image': {r['image']!r} is not the index of a row "
                                    "with an image")
            images = _as_list(cell)
            for s in images:
                if s not in checked:
                    try:
                        _open_b64(s)                # header only: cheap, and fails before any generation
                    except (binascii.Error, ValueError, OSError):
                        raise DataError(f"{where}, column 'image': not a base64-encoded image") from None
                    checked.add(s)
        else:
            image_paths = [_resolve_image_path(p, path) for p in _as_list(r["image_path"].strip())]
            for p in image_paths:
                if not os.path.isfile(p):
                    raise DataError(f"{where}, column 'image_path': {p} does not exist")
        rows.append(dict(
            index=int(key) if int_index else key, where=where, question=r["question"],
            answer=r["answer"].strip(), hint=r.get("hint", "").strip() or None,
            options={c: r[c] for c in letters if r[c].strip()}, category=r.get("category", ""),
            l2_category=r.get("l2-category", ""), split=r.get("split", "").strip(),
            images=images, image_paths=image_paths,
            columns={k: v for k, v in r.items() if k != "image"}))
    return rows


def _resolve_image_path(p, tsv):
    """An image_path is absolute, relative to the TSV's folder, or under its images/<name>/ folder."""
    folder = os.path.dirname(os.path.abspath(tsv))
    name = os.path.splitext(os.path.basename(tsv))[0]
    for cand in (p, os.path.join(folder, p), os.path.join(folder, "images", name, p)):
        if os.path.isfile(cand):
            return cand
    return p


def row_images(row):
    """The row's images as PIL RGB (VLMEvalKit converts RGBA/P/LA; the model wants RGB anyway)."""
    try:
        if row["images"] is not None:
            return [_open_b64(s).convert("RGB") for s in row["images"]]
        return [open_image(p, f"{row['where']}, column 'image_path'") for p in row["image_paths"]]
    except (binascii.Error, ValueError, OSError) as e:
        col = "image" if row["images"] is not None else "image_path"
        raise DataError(f"{row['where']}, column '{col}': cannot decode the image ({e})") from None


# ----------------------------------------------------------------------------- prompts


def mm_prompt(row, kind):
    """The user text VLMEvalKit builds: ImageMCQDataset, ImageYORNDataset, ImageVQADataset, ImageBase.

    MMMU's '<image k>' tags stay in the text and its images go in order: generate_answers puts all
    images before the text (VLMEvalKit interleaves them for models that accept interleaving).
    """
    q = row["question"]
    if kind == "mcq":
        prompt = f"Hint: {row['hint']}\n" if row["hint"] else ""
        prompt += f"Question: {q}\n"
        if row["options"]:
            prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in row["options"].items())
            prompt += "Please select the correct answer from the options above. \n"
        return prompt
    if kind == "yn":  # MME-style TSVs already end with the instruction
        return q if "please answer yes or no" in q.lower() else q + "\nPlease answer yes or no."
    if kind == "vqa":
        return q + "\nAnswer the question using a single word or phrase."
    return q


# ----------------------------------------------------------------------------- answer extraction


REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def infer_choice(prediction, options):
    """The option letter a free-form answer picks, 'Z' when it picks none, or None when exact matching
    cannot read it: VLMEvalKit's exact matching (can_infer), whose False sends an answer to the judge.

    1. Option letters as whole tokens after '.()[],:;!*#{}' become spaces: exactly one of them, among
       the last four tokens, is the answer ("C", "Answer: (C)", "**C**"); "A and B" picks nothing.
    2. "answer is x", any case ("the answer is b" -> B); a lone lowercase "b" is not a letter here.
    3. Else the one option whose text (case-insensitive) the answer contains, if the answer is at most
       twice as long as all option texts together.
    A refusal or a lone "Z" gives 'Z' (read: no option) with no text matching. Unlike VLMEvalKit's
    rule 2, the letter must be a word of its own: VLMEvalKit reads "the answer is dog" as D. Both
    read "the answer is a cat" as A.
    """
    text = str(prediction).strip()
    if any(r in text for r in REFUSALS):
        return "Z"
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [c for c in options if c in tokens]
    if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:
        return found[0]
    if not found and "Z" in tokens:
        return "Z"
    m = re.search(r"(?i)answer\s+is\s+\**([a-z])\**(?![a-z])", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_yes_no(prediction):
    """'Yes' / 'No' / None: VLMEvalKit's YOrN_Extraction (exactly one of the two words present)."""
    words = process_punctuation(str(prediction).lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


# ----------------------------------------------------------------------------- VQA metrics


PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official VQA evaluation's contraction table (apostrophe dropped -> restored), less its
# capitalised keys ("Im", "Ive", "Id've"), which never fire after lowercasing.
CONTRACTIONS = dict(pair.split(" ") for pair in (
    "aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|"
    "couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|"
    "hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|"
    "howd how'd|howll how'll|hows how's|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|"
    "maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|"
    "mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|"
    "ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|"
    "shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|"
    "somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|"
    "somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've|"
    "someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've|"
    "something'dve something'd've|somethingll something'll|thats that's|thered there'd|"
    "thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|"
    "theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|"
    "wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|"
    "whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|"
    "whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|"
    "whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|"
    "yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|"
    "y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've"
).split("|"))


def process_punctuation(text):
    """The VQA evaluation's punctuation rule: a mark next to a space (or any mark, when the text has a
    digit,digit comma) is deleted, one inside a word becomes a space; periods go unless between digits."""
    out, digit_comma = text, re.search(r"\d,\d", text) is not None
    for p in PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out)


def normalize_vqa_answer(answer):
    """Standard VQA normalisation: whitespace, punctuation, lowercase, number words -> digits,
    articles dropped, contractions restored (VLMEvalKit's process_answer)."""
    text = process_punctuation(str(answer).replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction, answers):
    """VQA accuracy: min(#other humans who gave the answer / 3, 1), averaged over the 10 leave-one-out
    subsets of the 10 human answers, as the official metric and VLMEvalKit (TextVQA) compute it.
    Normalisation is always applied (VLMEvalKit; the official code skips it when all 10 agree).
    One reference answer (the tabletop demo) gives a normalised exact match, where the leave-one-out
    formula would always give 0."""
    gts = [normalize_vqa_answer(a) for a in answers]
    pred = normalize_vqa_answer(prediction)
    if len(gts) == 1:
        return float(gts[0] == pred)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction, answers, threshold=0.5):
    """Average Normalised Levenshtein Similarity for one question (DocVQA, InfoVQA): the best
    1 - dist/max(len) over the answers (lowercased, whitespace collapsed), 0 below `threshold`.
    VLMEvalKit keeps a similarity equal to the threshold, as here; it takes the length of the
    unnormalised strings, here the normalised ones (the DocVQA definition)."""
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for a in answers:
        gt = " ".join(str(a).lower().split())
        n = max(len(gt), len(pred))
        best = max(best, 1.0 if n == 0 else 1 - levenshtein(gt, pred) / n)
    return best if best >= threshold else 0.0


HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(prediction, answers, category):
    """OCRBench: a hit when any answer is a substring of the prediction, case-insensitive; for
    handwritten math all spaces are dropped and case is kept."""
    if category == HME:
        pred = str(prediction).strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = str(prediction).lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers)


# ----------------------------------------------------------------------------- MM-Vet judge


MMVET_PROMPT = """
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction.
<AND> in the ground truth means it is totally right
only when all elements in the ground truth are present in the prediction,
and <OR> means it is totally right when any one element in the ground truth is present in the prediction.
The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right).
Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme talks about Iceland and Greenland. It's pointing out that despite their names,
Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.
Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.
The text 'This is why I have trust issues' is a playful way to suggest
that these contradictions can lead to distrust or confusion.
The humor in this meme is derived from the unexpected contrast between the names of the countries
and their actual physical characteristics. | 1.0
"""  # MM-Vet's own GPT-4 grader prompt (its authors' evaluator), verbatim: scores depend on it


def mmvet_score(judge, question, answer, prediction, tries=5):
    """MM-Vet: the judge completes the table row with a score in [0, 1]. Like VLMEvalKit, 5 tries,
    then 0.0; returns (score, the judge's last reply, error): error names a failed item (the judge
    gave no number, or a call failed), which scores 0.0 and is counted."""
    prompt = MMVET_PROMPT + "\n" + " | ".join(
        [question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), str(prediction), ""])
    reply = ""
    for _ in range(tries):
        try:
            reply = str(judge(prompt)).strip()
        except JudgeError as e:
            return 0.0, None, str(e)
        try:
            score = float(reply)
        except ValueError:
            continue
        if 0.0 <= score <= 1.0:
            return score, reply, None
    return 0.0, reply, f"no score in [0, 1] in {tries} judge replies"


# ----------------------------------------------------------------------------- MCQ judge


MCQ_JUDGE_PROMPT = (
    "You are an AI assistant who helps me match an answer to the options of a single-choice question. "
    "You get a question, several options and an answer, and you must find the option whose meaning is "
    "closest to the answer. If every option means something clearly different from the answer, output Z. "
    "Output one single uppercase letter: {letters} (those that are valid options), or Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: ")


def mcq_judge_prompt(question, options, prediction):
    """VLMEvalKit's choice-extraction prompt (multiple_choice.build_prompt) in its shape: the task, two
    worked examples (a match, and Z for none), then the item, with the options as its
    build_option_str lists them. Here the letters named are the item's own (VLMEvalKit: always A-D)."""
    listed = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return MCQ_JUDGE_PROMPT.format(letters=", ".join(options), question=question, options=listed,
                                   prediction=str(prediction).strip())


def judge_choice(judge, question, options, prediction, tries=3):
    """(letter or 'Z', the judge's last reply, error) for an answer exact matching cannot read:
    VLMEvalKit's extract_answer_from_item, which asks up to 3 times and reads each reply with
    can_infer. Where VLMEvalKit then picks a random option, here the item fails (error set, no hit)."""
    prompt, reply = mcq_judge_prompt(question, options, prediction), None
    for _ in range(tries):
        try:
            reply = str(judge(prompt))
        except JudgeError as e:
            return None, None, str(e)
        letter = infer_choice(reply, options)
        if letter is not None:
            return letter, reply, None
    return None, reply, f"no option letter in {tries} judge replies"


# ----------------------------------------------------------------------------- scoring


def mcq_target(row, metric):
    """(options, correct letter), as VLMEvalKit's MMMU evaluation has them: an open question becomes
    two options, A = the answer and B = 'Other Answers' (MMMU_preproc), and an answer that is not one
    uppercase letter counts as A — an open question's text, and a multi-answer row such as
    "['A', 'C']", where only A then scores."""
    if metric != "mmmu":
        return row["options"], row["answer"]
    options = row["options"] or {"A": row["answer"], "B": "Other Answers"}
    answer = row["answer"]
    return options, answer if len(answer) == 1 and answer in string.ascii_uppercase else "A"


MCQ_METRICS = ("accuracy", "circular", "mmmu")


def score_row(row, prediction, metric, judge=None, lost=False):
    """One question's record: extracted, hit in [0, 1] (None for MM-Vet without a judge), judged (the
    judge was asked), error (a failed judge item: no hit, counted). MCQ answers exact matching cannot
    read go to the judge when there is one; `lost`: a circular group already failed, so none asked.
    VLMEvalKit with a judge tries exact matching only on answers under 10 characters and sends longer
    ones to the judge too; here exact matching reads first at any length, so the judge sees only what
    it cannot read (fewer calls; they differ only where the two would read a long answer differently)."""
    rec = dict(extracted=None, hit=None, judged=False, error=None)
    if metric in MCQ_METRICS:
        options, gt = mcq_target(row, metric)
        letter = infer_choice(prediction, options)
        if letter is None and judge is not None and not lost:
            letter, reply, error = judge_choice(judge, row["question"], options, prediction)
            rec.update(judged=True, reply=reply, error=error)
        letter = None if letter == "Z" else letter
        return dict(rec, extracted=letter, hit=float(letter == gt))
    if metric == "yes_no":
        yn = extract_yes_no(prediction)
        return dict(rec, extracted=yn, hit=float(yn is not None and yn.lower() == row["answer"].lower()))
    if metric == "judge":
        if judge is None:
            return rec
        score, reply, error = mmvet_score(judge, row["question"], row["answer"], prediction)
        return dict(rec, extracted=reply, hit=score, judged=True, error=error)
    answers = _as_list(row["answer"])
    if metric == "vqa_accuracy":
        return dict(rec, extracted=normalize_vqa_answer(prediction), hit=vqa_accuracy(prediction, answers))
    if metric == "anls":
        return dict(rec, extracted=" ".join(str(prediction).lower().split()), hit=anls(prediction, answers))
    return dict(rec, extracted=str(prediction).strip(),
                hit=float(ocrbench_hit(prediction, answers, row["category"])))


def circular_hits(rows, hits):
    """MMBench circular evaluation: rotation k of question i has index i + k·1e6; question i counts
    only if every rotation present is right. Returns {i: 0.0 | 1.0} for the questions whose
    unrotated row (index < 1e6) is there, as VLMEvalKit scores only those."""
    groups = {}
    for row, hit in zip(rows, hits):
        groups.setdefault(row["index"] % CIRCULAR_OFFSET, []).append(hit)
    return {row["index"]: float(all(h == 1.0 for h in groups[row["index"]]))
            for row in rows if row["index"] < CIRCULAR_OFFSET}


def select_rows(rows, metric, cfg, path):
    """MMMU: only the chosen split; --limit: the first N questions (with all their rotations)."""
    if metric == "mmmu" and any(r["split"] for r in rows):
        rows = [r for r in rows if r["split"] == cfg.mmmu_split]
        if not rows:
            raise DataError(f"{path}, column 'split': no row has split {cfg.mmmu_split!r}")
    if metric == "circular":
        for r in rows:
            if not isinstance(r["index"], int):
                raise DataError(f"{r['where']}, column 'index': circular evaluation needs integer indices")
        if cfg.limit:
            keep = set(sorted({r["index"] % CIRCULAR_OFFSET for r in rows})[:cfg.limit])
            rows = [r for r in rows if r["index"] % CIRCULAR_OFFSET in keep]
    elif cfg.limit:
        rows = rows[:cfg.limit]
    if not rows:
        raise DataError(f"{path}: no questions to score")
    if metric in MCQ_METRICS:
        for r in rows:
            options, gt = mcq_target(r, metric)
            if gt not in options:
                raise DataError(f"{r['where']}, column 'answer': {gt!r} is not one of the options "
                                f"{', '.join(options) or '(none)'}")
    return rows


def _category_means(units, key, several):
    """{category: 100 × mean hit}; `several`: the cell lists several, as MM-Vet's capabilities 'rec,ocr'."""
    sums = {}
    for row, hit in units:
        for c in ((row[key].split(",") if several else [row[key]]) if row[key] else []):
            sums.setdefault(c.strip(), []).append(hit)
    return {c: 100 * sum(h) / len(h) for c, h in sorted(sums.items())}


def summarize_benchmark(rows, hits, metric):
    """Score on 0–100: mean hit × 100 (OCRBench: hits out of 1000 / 10, the same at 1000 questions;
    MMBench: over questions after circular evaluation). MM-Vet without a judge: not scored."""
    res = dict(metric=metric, n=len(rows))
    if metric == "judge" and any(h is None for h in hits):
        return dict(res, score=None, status="not scored: MM-Vet needs a judge model (none given)")
    if metric == "circular":
        group = circular_hits(rows, hits)
        units = [(r, group[r["index"]]) for r in rows if r["index"] in group]
        res.update(n=len(units), n_rows=len(rows))
    else:
        units = list(zip(rows, hits))
    res.update(score=100 * sum(h for _, h in units) / max(len(units), 1), status="scored")
    if metric == "ocrbench":
        res["hits"] = int(sum(h for _, h in units))
    for key, name in (("category", "categories"), ("l2_category", "l2-categories")):
        means = _category_means(units, key, several=metric == "judge")
        if means:
            res[name] = means
    return res


# ----------------------------------------------------------------------------- running


def generate_predictions(model, rows, prompts, max_new_tokens, batch_size, desc="", on_batch=None):
    """Greedy answers through model.generate_answers (KV-cached), `batch_size` questions a call;
    on_batch(rows, answers) gets each batch as it is generated (to write it)."""
    preds = []
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=None, leave=False):
        images = [row_images(r) for r in rows[i:i + batch_size]]
        out = model.generate_answers(images, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
        if len(out) != len(images):
            raise RuntimeError(f"generate_answers returned {len(out)} answers for {len(images)} questions")
        preds += [str(p) for p in out]
        if on_batch:
            on_batch(rows[i:i + batch_size], preds[i:])
    return preds


def _pred_tsv(rows, preds):
    """The benchmark TSV minus images, plus `prediction`: what VLMEvalKit's evaluate() reads."""
    cols = list(rows[0]["columns"]) + ["prediction"]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(cols)
    for r, p in zip(rows, preds):
        w.writerow([r["columns"].get(c, "") for c in cols[:-1]] + [p])
    return buf.getvalue()


def read_jsonl_records(path, header=None):
    """The records of a file this module appends to (predictions or judgements), for --resume.
    A first-line header must equal `header` (a different run's file is refused, naming the field);
    a torn last line (a killed run) is dropped. Missing file: []."""
    recs = []
    for n, rec in read_appended(path):
        if not isinstance(rec, dict) or (n > 1 or header is None) and "index" not in rec:
            raise DataError(f"{path} line {n}: field 'index' missing; not a file evaluate.py mm wrote")
        recs.append(rec)
    if header is not None and recs:
        for k, v in header.items():
            if recs[0].get(k) != v:
                raise UserError(f"{path}: written with {k} = {recs[0].get(k)!r}, this run has {v!r}; "
                                "pass the same flags, or drop --resume to start the benchmark again")
        recs = recs[1:]
    return recs


def _appender(path, fresh, first=None):
    """fn(records) appending JSON lines to `path`, flushed at once (a killed run keeps them);
    `fresh` starts the file anew (with the header line `first`)."""
    if fresh:
        atomic_write(path, "" if first is None else json.dumps(first) + "\n")

    def append(recs):
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
    return append


def run_benchmark(model, name, path, cfg, out_dir, judge=None):
    """Read, prompt, generate, score one benchmark.

    Predictions go to <name>.predictions.jsonl batch by batch as they are generated, and each judge
    result to <name>.judgements.jsonl as it comes; with cfg.resume both are read back and only the
    rest is generated or judged (a failed judge item is asked again). Then <name>.jsonl (one record
    per question) and <name>_pred.tsv are written.
    """
    kind, metric, budget = BENCHMARKS[name]
    rows = select_rows(read_tsv(path), metric, cfg, path)
    prompts = [mm_prompt(r, kind) for r in rows]
    budget = cfg.max_new_tokens or budget
    pred_path = os.path.join(out_dir, f"{name}.predictions.jsonl")
    header = dict(benchmark=name, ckpt=cfg.ckpt, max_new_tokens=budget)
    on_disk = lambda: {json.dumps(p["index"]): str(p.get("prediction", ""))
                       for p in read_jsonl_records(pred_path, header)}
    done = on_disk() if cfg.resume else {}
    append = _appender(pred_path, fresh=not done, first=header)
    todo = [k for k, r in enumerate(rows) if json.dumps(r["index"]) not in done]
    generate_predictions(model, [rows[k] for k in todo], [prompts[k] for k in todo], budget, cfg.batch_size, name,
                         on_batch=lambda rs, ps: append([dict(index=r["index"], prediction=p) for r, p in zip(rs, ps)]))
    done = on_disk()
    preds = [done[json.dumps(r["index"])] for r in rows]  # what is on disk is what is scored

    # judge results are reused only for the same prediction and judge, and only when they succeeded
    judged_path = os.path.join(out_dir, f"{name}.judgements.jsonl")
    judge_name = getattr(judge, "name", "judge")
    cache = {}
    if cfg.resume and judge is not None:
        cache = {(json.dumps(j["index"]), j.get("prediction")): j for j in read_jsonl_records(judged_path)
                 if not j.get("error") and j.get("judge") == judge_name}
    record_judgement = _appender(judged_path, fresh=not cfg.resume)
    # VLMEvalKit's circular prefetch: a rotation exact matching reads wrong loses the question, and
    # the judge is not asked about its other rotations
    lost = {r["index"] % CIRCULAR_OFFSET for r, p in zip(rows, preds)
            if infer_choice(p, r["options"]) not in (None, r["answer"])} if metric == "circular" else set()
    scored = []
    for r, p in zip(rows, preds):
        key = (json.dumps(r["index"]), p)
        if key in cache:
            scored.append({k: cache[key][k] for k in ("extracted", "hit", "judged", "error", "reply") if k in cache[key]})
            continue
        s = score_row(r, p, metric, judge, lost=metric == "circular" and r["index"] % CIRCULAR_OFFSET in lost)
        if s["judged"]:
            record_judgement([dict(index=r["index"], prediction=p, judge=judge_name, **s)])
        scored.append(s)
    hits = [s["hit"] for s in scored]
    result = summarize_benchmark(rows, hits, metric)
    failed = [r["index"] for r, s in zip(rows, scored) if s["error"]]
    if metric in MCQ_METRICS:
        result["matching"] = "exact" if judge is None else f"exact, then judge {judge_name}"
    if metric in MCQ_METRICS or metric == "judge":
        result.update(judged=sum(s["judged"] for s in scored), failed=len(failed), failed_items=failed)
    group = circular_hits(rows, hits) if metric == "circular" else {}
    lines = []
    for r, p, s in zip(rows, preds, scored):
        rec = dict(index=r["index"], prediction=p, extracted=s["extracted"], hit=s["hit"], answer=r["answer"])
        if s["judged"]:
            rec.update(judge_reply=s.get("reply"), error=s["error"])
        if group:
            rec["circular_hit"] = group.get(r["index"] % CIRCULAR_OFFSET)
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write(os.path.join(out_dir, f"{name}.jsonl"), "".join(line + "\n" for line in lines))
    atomic_write(os.path.join(out_dir, f"{name}_pred.tsv"), _pred_tsv(rows, preds))
    return result


def paper_average(benchmarks):
    """The mean over the paper's eight scored benchmarks; None unless all eight are scored
    (`partial` then averages those that are)."""
    scores, missing = {}, []
    for name in PAPER_MM_BENCHMARKS:
        for n in (name, SLOT_FALLBACK.get(name)):
            if n in benchmarks and benchmarks[n].get("score") is not None:
                scores[n] = benchmarks[n]["score"]
                break
        else:
            missing.append(name)
    mean = sum(scores.values()) / len(scores) if scores else None
    return dict(score=None if missing else mean, partial=mean, benchmarks=list(scores), missing=missing)


def evaluate_mm(model, cfg, judge=None):
    """Run every benchmark in cfg.bench; write OUT/eval/mm/summary.json after each one (merged with
    one already there, so benchmarks can run in separate calls) and return it. A judge that stops
    the run (JudgeAbort) leaves the finished benchmarks in summary.json and the unfinished one's
    predictions and judgements on disk, for --resume."""
    paths = bench_paths(cfg)
    out_dir = os.path.join(cfg.out or cfg.ckpt, "eval", "mm")
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "summary.json")
    benchmarks = {}
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                benchmarks = json.load(f)["benchmarks"]
            if not isinstance(benchmarks, dict):
                raise TypeError("'benchmarks' is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{summary_path}: not a summary this command wrote ({e}); move it away") from None
    summary = None
    for n, path in paths.items():
        try:
            benchmarks[n] = dict(run_benchmark(model, n, path, cfg, out_dir, judge), ckpt=cfg.ckpt)
        except JudgeAbort as e:
            raise JudgeAbort(f"{e}; {n}: predictions and judgements so far kept in {out_dir}, rerun with "
                             "--resume to continue") from None
        summary = dict(benchmarks=benchmarks, average=paper_average(benchmarks), paper_average=PAPER_MM_AVERAGE)
        atomic_write(summary_path, json.dumps(summary, indent=1))
    return summary


def mm_table(summary):
    """Per-benchmark scores and the 8-benchmark average beside the paper's (which gives only that)."""
    lines = ["| benchmark | metric | questions | score | answers read by (judged, failed judge items) |",
             "|---|---|---|---|---|"]
    for name, b in summary["benchmarks"].items():
        score = f"{b['score']:.1f}" if b.get("score") is not None else b["status"]
        read = b.get("matching", "judge" if b["metric"] == "judge" else "exact")
        judged = f" ({b['judged']}, {b['failed']})" if "judged" in b else ""
        lines.append(f"| {name} | {b['metric']} | {b['n']} | {score} | {read}{judged} |")
    avg = summary["average"]
    if avg["score"] is not None:
        ours = f"{avg['score']:.1f}"
    elif avg["partial"] is not None:
        ours = (f"n/a (missing {', '.join(avg['missing'])}; "
                f"mean of {len(avg['benchmarks'])} scored: {avg['partial']:.1f})")
    else:
        ours = "n/a (none of the eight scored)"
    paper = ", ".join(f"{k} {v}" for k, v in summary["paper_average"].items())
    lines.append(f"| **average of the paper's 8** | | | {ours} (paper: {paper}) | |")
    return "\n".join(lines)


def add_mm_args(p):
    """Flags of `evaluate.py mm`, one per MMConfig field."""
    d = MMConfig()
    p.add_argument("--ckpt", required=True, help="DualVLA checkpoint folder (train.py's checkpoints/step_N)")
    p.add_argument("--bench", default=d.bench, help=f"comma-separated benchmarks (default: the paper's 8); "
                   f"supported: {', '.join(BENCHMARKS)}")
    p.add_argument("--data-root", default=d.data_root, help="folder holding <name>.tsv, VLMEvalKit's $LMUData "
                   "(default: $LMUData or ~/LMUData)")
    p.add_argument("--out", default=d.out, help="run folder; results go to OUT/eval/mm/ (default: the checkpoint)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="questions per generation call")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="answer length cap (default 0: each benchmark's own)")
    p.add_argument("--limit", type=int, default=d.limit, help="only the first N questions per benchmark (smoke runs)")
    p.add_argument("--mmmu-split", default=d.mmmu_split, help="MMMU_DEV_VAL split to score")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--resume", action="store_true",
                   help="keep the predictions and judge results already in OUT/eval/mm/ and do only the rest")
    return p


def main_mm(args, judge=None):
    """`evaluate.py mm`: load the checkpoint, score, print the table. `judge(prompt) -> str` (--judge)
    scores MM-Vet and reads the MCQ answers exact matching cannot (MMBench, MMStar, MMMU); without
    one MM-Vet is reported as not scored and MCQ answers are read by exact matching alone."""
    cfg = MMConfig(**{f.name: getattr(args, f.name) for f in fields(MMConfig)})
    bench_paths(cfg)  # fail on a name or a file before the model loads
    if cfg.batch_size < 1 or cfg.max_new_tokens < 0 or cfg.limit < 0:
        raise UserError("--batch-size must be ≥ 1, --max-new-tokens and --limit ≥ 0")
    if not os.path.isdir(cfg.ckpt):
        raise UserError(f"checkpoint folder not found: {cfg.ckpt}")
    if getattr(judge, "name", "").startswith("oracle:"):
        raise UserError("--judge oracle scores tabletop rollouts only; evaluate.py mm takes --judge openai or hf")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model = DualVLA.from_pretrained(cfg.ckpt).to(device).eval()
    summary = evaluate_mm(model, cfg, judge)
    print(mm_table(summary))
    for name, b in summary["benchmarks"].items():
        if b.get("failed"):
            print(f"{name}: {b['failed']} failed judge item(s), scored 0 (indices {b['failed_items'][:10]}"
                  f"{' ...' if b['failed'] > 10 else ''}); --resume asks the judge again")
    return summary
