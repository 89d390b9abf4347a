"""Rebuild the toy world's shipped source models, deterministically, on a laptop CPU.

    python -m vlmerge.toy.build --out eval_data/toy_models        # about 14 minutes on 2 CPU threads

From one bilingual base LM it makes the three sources of the toy experiments, saved as ordinary folders:

    base/         the base LM (Mistral architecture): reads English and Japanese, answers questions about
                  text in English, or in Japanese where the prompt ends with the cue "答え:" instead of "A:"
                  (an instruct model that follows an answer-language instruction; it has never seen a picture,
                  and it solves only word problems with small operands, 1-5, in either language)
    vlm_en/       composite VLM: OpenCLIP ViT (pre-trained alone on what each grid cell shows, the toy's
                  CLIP) + MLP projector + the base LM, tuned on English VQA only
    lm_ja/        the base LM tuned on Japanese text tasks only (answers in Japanese, no pictures)
    lm_math_en/   the base LM tuned on English arithmetic word problems only

Every folder holds safetensors weights, the shared tokenizer and a MANIFEST.json (sha256 of every file,
this command, seeds, stage losses and wall time). Where each skill is put is in `DEFAULT`:

* the VLM's projector stays at its seeded initialisation and the ViT stays as pre-trained, so the LM tower
  itself learns to read the image tokens (as LLaVA's tower does after visual instruction tuning): a text LM
  put behind the VLM's vision encoder (the "tower swap") cannot read the picture;
* the base already holds an answer apart from the language it writes it in (`reader_examples`: a share of
  its questions about text end with "答え:" and are answered in Japanese), so the Japanese LM's fine-tune
  moves the answer-language choice after "A:" rather than relearning how to answer, and adds to the VLM's
  reading of the picture (without the cue, 80 world variants gave merges that answered in Japanese without
  reading the picture: `python -m vlmerge.toy.vqa_probe` and docs/toy_world.md);
* the VLM tower learns fastest in its first layers (reading the picture), the Japanese LM only in its upper
  layers (answering in Japanese), so a per-layer recipe can take each from where it lives;
* math is spread as in EvoLLM-JP: the base solves word problems with operands 1-5 in either language (worked in
  English after "A:", in Japanese after the cue) and has seen bare sums of operands 1-9 after a tenth of its
  documents; the Japanese LM solves such small problems in Japanese after "A:"; the English math LM learns
  operands 1-9 on English problems only. Trained for 3000 steps (1500 were too few), the base reads problems in
  both languages alike, so the math LM's reach carries over to Japanese problems, answered in English: only a
  merge answers them in Japanese beyond the small operands (docs/toy_world.md, session 19).

Bytes repeat on the same machine and thread count (two builds here gave identical files); other CPUs or
thread counts may differ in the last bits of the weights (float summation order).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vlmerge.errors import VlmergeError, exit_on_user_error
from vlmerge.models.composite import CompositeVLM
from vlmerge.models.composite_processor import CompositeProcessor
from vlmerge.models.export import check_output_dir, staged_dir
from vlmerge.toy import problems as P
from vlmerge.toy import scenes as S
from vlmerge.toy import texts as T
from vlmerge.toy import train as TR
from vlmerge.toy.model_configs import LMArch, VisionArch, count_parameters, new_lm
from vlmerge.toy.tokenizer import build_tokenizer

FOLDERS = ("base", "vlm_en", "lm_ja", "lm_math_en")
COMMAND = "python -m vlmerge.toy.build --out eval_data/toy_models"


@dataclass(frozen=True)
class Stage:
    """One training stage: `n` generated examples, then `steps` AdamW steps at peak `lr`, each LM layer at
    `lr * layer_lr[i]` (0 freezes it)."""

    n: int
    steps: int
    lr: float
    seed: int
    layer_lr: tuple[float, ...] = ()
    batch_size: int = 64
    warmup: int = 20

    def train_config(self) -> TR.StageConfig:
        return TR.StageConfig(self.steps, self.batch_size, self.lr, self.warmup, seed=self.seed)


@dataclass(frozen=True)
class BuildConfig:
    """Everything the build depends on (written into every MANIFEST.json)."""

    lm: LMArch = field(default_factory=LMArch)
    vision: VisionArch = field(default_factory=VisionArch)
    init_seed: int = 0
    base: Stage = Stage(n=96_000, steps=3000, lr=2e-3, seed=1, warmup=50, batch_size=32)
    reader_fraction: float = 0.4  # share of the base corpus that is QA about text (`reader_examples`)
    reading_fraction: float = 0.6  # of that QA: "how many apples does Ken have" (numbers) vs scenes
    reader_cue_fraction: float = 0.3  # of its scene QA: prompt ends with the cue "答え:", answer in Japanese
    solve_fraction: float = 0.67  # of its reading questions: a small word problem, worked out (`reader_examples`)
    solve_cue_fraction: float = 0.5  # of those: after the cue, worked in Japanese
    solve_operands: tuple[int, int] = (1, 5)  # operands of the problems the base solves
    sum_fraction: float = 0.1  # of the base's documents: followed by a bare sum, operands 1-9 ("7 + 5 = 12")
    vision_pretrain: Stage = Stage(n=20_000, steps=500, lr=3e-3, seed=21, batch_size=128, warmup=50)
    vlm: Stage = Stage(n=48_000, steps=1000, lr=1e-3, seed=2, layer_lr=(1.0, 1.0, 0.5, 0.25, 0.1, 0.05))
    vlm_vision_lr: float = 0.0  # the pre-trained ViT stays frozen (LLaVA-1.5)
    vlm_projector_lr: float = 0.0  # projector kept at its seeded init: the LM tower learns to read the image
    ja: Stage = Stage(n=25_600, steps=500, lr=1e-3, seed=6, layer_lr=(0.0, 0.0, 0.2, 0.6, 1.0, 1.0))
    ja_short_answers: bool = True
    ja_reading_style: str = "echo"  # "plain": "答えは3です。"; "echo": "3。答えは3です。" (number read, answer)
    ja_reading: bool = False  # False: lm_ja sees no reading questions
    ja_solve_fraction: float = 0.3  # of lm_ja's examples: a small Japanese word problem, worked in Japanese
    ja_solve_operands: tuple[int, int] = (1, 5)
    math: Stage = Stage(n=25_600, steps=250, lr=1e-3, seed=8, layer_lr=(1.0, 1.0, 1.0, 0.5, 0.25, 0.1))
    threads: int = 2

    def __post_init__(self):
        layers = self.lm.num_hidden_layers
        for name in ("vlm", "ja", "math"):
            if len(getattr(self, name).layer_lr) != layers:
                got = len(getattr(self, name).layer_lr)
                raise VlmergeError(f"toy build: {name}.layer_lr has {got} values for {layers} LM layers")
        if self.ja_reading_style not in READING_STYLES:
            raise VlmergeError(f"toy build: ja_reading_style {self.ja_reading_style!r}: use one of {READING_STYLES}")
        if not 0 <= self.reader_fraction < 1 or not 0 <= self.reading_fraction <= 1:
            raise VlmergeError("toy build: reader_fraction must be in [0, 1) and reading_fraction in [0, 1]")
        for name in ("reader_cue_fraction", "solve_fraction", "solve_cue_fraction", "sum_fraction",
                     "ja_solve_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise VlmergeError(f"toy build: {name} must be in [0, 1]")
        for name in ("solve_operands", "ja_solve_operands"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise VlmergeError(f"toy build: {name}={(low, high)}: need 0 <= low <= high")


READING_STYLES = ("plain", "echo")
DEFAULT = BuildConfig()


JAPANESE_CUE = "答え:"
"""Ends a text-QA prompt in place of "A:" where the base is to answer in Japanese (`reader_examples`)."""


def reader_examples(n: int, seed: int, reading_fraction: float, cue_fraction: float = 0.0,
                    solve_fraction: float = 0.0, solve_cue_fraction: float = 0.5,
                    solve_operands: tuple[int, int] = (1, 5)) -> list[T.Example]:
    """Questions about a text, answered after "A:" in English whatever the languages of text and question:
    the base's one skill beyond language modelling. Scene questions answer like English VQA ("red", "2"); reading
    questions like the math model ("The answer is 3."). A share `cue_fraction` of the scene questions ends
    with `JAPANESE_CUE` instead of "A:" and is answered in Japanese ("赤", "2つ"), from a text and a question
    in either language: so the base holds an answer apart from the language it is written in, and a
    fine-tune that answers in Japanese after "A:" only has to move that choice (what lets it add to the
    VLM's reading of the picture). A share `solve_fraction` of the reading questions is replaced by a word
    problem with operands in `solve_operands`, in either language, worked out ("2 + 3 = 5. The answer is 5."),
    a share `solve_cue_fraction` of those after the cue and in Japanese ("2 + 3 = 5。答えは5です。"): a base
    that computes a little in either language, which the English math LM extends."""
    rng = random.Random(f"vlmerge-toy-reader:{seed}")
    solve_rng = random.Random(f"vlmerge-toy-reader-solve:{seed}")
    scenes, problems = S.make_scenes(n, seed), P.make_problems(n, seed)
    small = P.make_problems(n, seed + 7000, P.ProblemConfig(operand_range=solve_operands))
    out = []
    for scene, problem, small_problem in zip(scenes, problems, small):
        context_lang, question_lang = rng.choice(S.LANGS), rng.choice(S.LANGS)
        if rng.random() < reading_fraction:
            if solve_fraction and solve_rng.random() < solve_fraction:
                out.append(solved_example(small_problem, question_lang, solve_rng.random() < solve_cue_fraction))
                continue
            question, _ = P.reading_question(problem, question_lang)
            answer = P.ANSWER_ONLY["en"].format(n=problem.a)
            out.append(T.Example("reading", "en", P.MATH_PROMPT.format(question=question), " " + answer))
            continue
        spec = rng.choice(S.question_specs(scene))
        prompt = T.TEXT_QA_PROMPT.format(context=T.describe(scene, context_lang),
                                         question=S.question(spec, question_lang))
        if rng.random() < cue_fraction:
            prompt = prompt.removesuffix("A:") + JAPANESE_CUE
            answer = S.answers(spec, scene, "ja")[0].removesuffix("です。")
        else:
            answer = S.answers(spec, scene, "en")[0]
        out.append(T.Example("text_qa", "en", prompt, " " + answer))
    return out


def japanese_examples(n: int, seed: int, short: bool, reading_style: str = "plain", *, reading: bool = True,
                      solve_fraction: float = 0.0, solve_operands: tuple[int, int] = (1, 5)) -> list[T.Example]:
    """`texts.japanese_llm_sft`; with `short`, scene answers drop the polite ending ("赤" for "赤です。", an
    accepted answer of every item): a blind guess in the right format then earns little ROUGE. With
    `reading_style="echo"` a reading answer first writes the number it read ("3。答えは3です。"). Without
    `reading` the reading questions are left out; a share `solve_fraction` of the rest is replaced by Japanese
    word problems with operands in `solve_operands`, worked in Japanese after "A:" (a Japanese LLM that
    computes a little)."""
    solve_rng = random.Random(f"vlmerge-toy-ja-solve:{seed}")
    small = P.make_problems(n, seed + 8000, P.ProblemConfig(operand_range=solve_operands))
    out = []
    for e, small_problem in zip(T.japanese_llm_sft(n, seed), small):
        if not reading and e.task == "reading":
            continue
        if solve_fraction and solve_rng.random() < solve_fraction:
            e = solved_example(small_problem, "ja", True, cue=False)
        elif short and e.task.startswith("text_qa"):
            e = replace(e, completion=e.completion.removesuffix("です。"))
        elif reading_style == "echo" and e.task == "reading":
            number = e.completion.strip().removeprefix("答えは").removesuffix("です。")
            e = replace(e, completion=f" {number}。答えは{number}です。")
        out.append(e)
    return out


def solved_example(problem: P.Problem, question_lang: str, japanese: bool, cue: bool = True) -> T.Example:
    """The problem asked in `question_lang`, worked out in Japanese (after the cue where `cue`) or English."""
    prompt = P.MATH_PROMPT.format(question=P.question(problem, question_lang))
    if japanese and cue:
        prompt = prompt.removesuffix("A:") + JAPANESE_CUE
    lang = "ja" if japanese else "en"
    return T.Example("solve", lang, prompt, " " + P.worked_answer(problem, lang))


def with_sums(docs: list[str], seed: int, fraction: float) -> list[str]:
    """A share `fraction` of `docs` followed by a line with a bare sum of operands 1-9 ("7 + 5 = 12"): arithmetic
    that does not depend on the language of the text before it."""
    if not fraction:
        return docs
    rng = random.Random(f"vlmerge-toy-sums:{seed}")
    sums = P.make_problems(len(docs), seed + 5000)
    return [d + f"\n{p.a} {p.op} {p.b} = {p.answer}" if rng.random() < fraction else d for d, p in zip(docs, sums)]


def build_models(config: BuildConfig = DEFAULT, *, verbose: bool = True, device: str = "cpu") -> dict:
    """Train the four models in memory on `device` (the shipped ones: the CPU); returns {"tokenizer", "base",
    "vlm_en", "lm_ja", "lm_math_en", "logs": {folder: [stage summaries]}, "seconds": {folder: wall time}}."""
    torch.set_num_threads(config.threads)
    tok = build_tokenizer()
    out: dict = {"tokenizer": tok, "logs": {}, "seconds": {}}

    def timed(folder: str, fn):
        start = time.perf_counter()
        out[folder], logs = fn()
        out["logs"][folder] = [log.summary() for log in logs]
        out["seconds"][folder] = round(time.perf_counter() - start, 1)

    timed("base", lambda: _base(tok, config, verbose, device))
    timed("vlm_en", lambda: _vlm(tok, out["base"], config, verbose))
    timed("lm_ja", lambda: _finetune(tok, out["base"], "lm_ja", japanese_examples(
        config.ja.n, config.ja.seed, config.ja_short_answers, config.ja_reading_style, reading=config.ja_reading,
        solve_fraction=config.ja_solve_fraction, solve_operands=config.ja_solve_operands), config.ja, verbose))
    timed("lm_math_en", lambda: _finetune(tok, out["base"], "lm_math_en", T.english_math_sft(
        config.math.n, config.math.seed), config.math, verbose))
    return out


def _base(tok, config: BuildConfig, verbose: bool, device: str):
    st = config.base
    n_qa = int(st.n * config.reader_fraction)
    docs = [TR.encode_document(tok, d) for d in with_sums(T.base_corpus(st.n - n_qa, st.seed), st.seed,
                                                             config.sum_fraction)]
    qa = [TR.encode_example(tok, e) for e in reader_examples(
        n_qa, st.seed, config.reading_fraction, config.reader_cue_fraction, config.solve_fraction,
        config.solve_cue_fraction, config.solve_operands)]
    model = new_lm(config.lm, tok, config.init_seed).to(device)
    layers = [1.0] * config.lm.num_hidden_layers
    log = TR.train_lm("base", model, tok, docs + qa, st.train_config(), layers, train_embeddings=True,
                      verbose=verbose)
    return model, [log]


def _vlm(tok, base, config: BuildConfig, verbose: bool):
    va = config.vision
    model = CompositeVLM.build(va.vision_config(), va.projector_config(), copy.deepcopy(base),
                               tok.convert_tokens_to_ids(tok.image_token), seed=config.init_seed)
    model.to(next(base.parameters()).device)
    vp = config.vision_pretrain
    scenes = S.make_scenes(vp.n, vp.seed, size=va.image_size)
    logs = [TR.pretrain_vision("vision_pretrain", model, TR.scene_pixels(scenes), TR.cell_targets(scenes),
                               vp.train_config(), verbose=verbose)]
    st = config.vlm
    examples = T.english_vqa_sft(st.n // 2, st.seed, size=va.image_size, per_scene=2)
    scenes = list({e.scene.id: e.scene for e in examples}.values())
    index = {s.id: i for i, s in enumerate(scenes)}
    data = [TR.encode_example(tok, e, image_tokens=model.num_image_tokens, image=index[e.scene.id])
            for e in examples]
    pixels = TR.scene_pixels(scenes)
    logs.append(TR.train_vlm("vlm_en", model, tok, data, pixels, st.train_config(), st.layer_lr,
                             vision_lr=config.vlm_vision_lr, projector_lr=config.vlm_projector_lr,
                             verbose=verbose))
    return model, logs


def _finetune(tok, base, name: str, examples: list[T.Example], st: Stage, verbose: bool):
    model = copy.deepcopy(base)
    data = [TR.encode_example(tok, e) for e in examples]
    return model, [TR.train_lm(name, model, tok, data, st.train_config(), st.layer_lr, verbose=verbose)]


def save_models(built: dict, out: str | Path, config: BuildConfig = DEFAULT, command: str = COMMAND) -> Path:
    """Write the four folders (and a top MANIFEST.json) into `out`, swapped in whole: a failed or
    interrupted build leaves the previous models untouched."""
    out = Path(out)
    with staged_dir(out, overwrite=True) as tmp:
        tok = built["tokenizer"]
        for name in ("base", "lm_ja", "lm_math_en"):
            built[name].save_pretrained(tmp / name)
            tok.save_pretrained(tmp / name)
        vlm = built["vlm_en"]
        vlm.save_pretrained(tmp / "vlm_en", processor=CompositeProcessor.from_config(tok, vlm.config))
        common = {"command": command, "config": _plain(asdict(config)), "threads": config.threads,
                  "torch": torch.__version__, "machine": platform.machine()}
        for name in FOLDERS:
            _write_manifest(tmp / name, {
                "name": name, **ROLES[name], "parameters": count_parameters(built[name]),
                "stages": built["logs"][name], "wall_seconds": built["seconds"][name], **common})
        total = round(sum(built["seconds"].values()), 1)
        _write_manifest(tmp, {"name": out.name, "folders": list(FOLDERS), "wall_seconds": total, **common},
                        files_of=[tmp / name / "MANIFEST.json" for name in FOLDERS])
    return out


ROLES = {
    "base": {"role": "base LM: bilingual reader, answers questions about text in English (in Japanese after "
                     "the cue 答え:)",
             "from": None, "data": "texts.base_corpus + build.reader_examples"},
    "vlm_en": {"role": "VLM: pre-trained OpenCLIP ViT + MLP projector + base LM, tuned on English VQA",
               "from": "base", "data": "vision pre-training (cell shape/colour) + texts.english_vqa_sft"},
    "lm_ja": {"role": "Japanese LM: answers Japanese questions about text in Japanese", "from": "base",
              "data": "build.japanese_examples (texts.japanese_llm_sft)"},
    "lm_math_en": {"role": "English math LM: worked answers to English word problems", "from": "base",
                   "data": "texts.english_math_sft"},
}


def verify_models(folder: str | Path) -> None:
    """Raise VlmergeError naming every file of the built folders that is missing or differs from its
    MANIFEST.json."""
    folder = Path(folder)
    problems = []
    for manifest in [folder / "MANIFEST.json", *(folder / name / "MANIFEST.json" for name in FOLDERS)]:
        if not manifest.is_file():
            problems.append(f"{manifest}: missing")
            continue
        for rel, digest in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
            path = manifest.parent / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif _sha256(path) != digest:
                problems.append(f"{path}: sha256 differs from {manifest}")
    if problems:
        raise VlmergeError("toy models do not match their manifests: " + "; ".join(problems))


def _write_manifest(folder: Path, data: dict, files_of: list[Path] | None = None) -> None:
    files = files_of if files_of is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    data["files"] = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    (folder / "MANIFEST.json").write_text(text, encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmerge.toy.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval_data/toy_models", help="folder to (re)write")
    parser.add_argument("--threads", type=int, default=DEFAULT.threads,
                        help="torch CPU threads (the committed models were built with 2)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise VlmergeError(f"--threads {args.threads}: must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = replace(DEFAULT, threads=args.threads)
    command = f"python -m vlmerge.toy.build --out {args.out}"
    if args.threads != 2:
        command += f" --threads {args.threads}"
    check_output_dir(Path(args.out), overwrite=True)  # before the build, not after it
    built = build_models(config, verbose=not args.quiet)
    print(f"wrote {save_models(built, args.out, config, command)} in {sum(built['seconds'].values()):.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
