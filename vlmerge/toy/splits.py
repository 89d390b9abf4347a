"""Write the toy eval sets: Japanese VQA (`toy_vqa_ja/`) and Japanese math (`toy_math_ja/`).

Regenerate the shipped sets from the repository root with:

    python -m vlmerge.toy.splits --out eval_data

Each folder holds `search.jsonl` (the search's fitness) and `heldout.jsonl` (the final report), plus
`MANIFEST.json` (source, license, seeds, split sizes, sha256 of every file). VQA lines are
`{"id", "image": "images/<id>.png", "question", "answers": [...]}` with the PNGs beside them; math lines are
`{"id", "question", "answer"}` (the number as text). Scenes and problems come from seeds at or above
EVAL_SEED_BASE, which training data should not use. Splits are disjoint: an item whose (scene layout,
question) or math question text already appeared in either split is skipped. Folders are written to a
temporary folder and swapped in whole, so a failed run never leaves a half-written set.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vlmerge.errors import VlmergeError, exit_on_user_error
from vlmerge.models.export import check_output_dir, staged_dir
from vlmerge.toy import problems as P
from vlmerge.toy import scenes as S

EVAL_SEED_BASE = 90_000
SPLITS = ("search", "heldout")
LICENSE = "CC0-1.0"
VQA_DIR, MATH_DIR = "toy_vqa_ja", "toy_math_ja"


@dataclass(frozen=True)
class EvalSetConfig:
    """Split sizes per task. VQA: a 192-item search split (64 items let the search fit their noise: on a
    separate validation split the evolved merge scored 1.2 points lower and twice as spread over seeds) and a
    512-item held-out split (a 128-item one moves a mean ROUGE-L by ~3.5 points). Math: 384 / 512. A 128-item
    held-out split puts a standard error of ~4.4 points on an accuracy near 50%; smaller search splits let the
    search fit their noise (validation split, evolved acc_ja: 64 items 45.2, 192 items 47.2, seeds 0-2; 384 items
    and 240 evaluations, toy_math_ja's default now, 48.1 against 45.4 for 192 items and 120, seeds 0-10)."""

    seed: int = 0
    vqa_search_size: int = 192
    vqa_heldout_size: int = 512
    math_search_size: int = 384
    math_heldout_size: int = 512
    canvas: int = 32
    math: P.ProblemConfig = field(default_factory=P.ProblemConfig)

    def __post_init__(self):
        """Every check is arithmetic, so a set that cannot be made is refused before anything is generated."""
        for name in SIZE_FIELDS:
            if getattr(self, name) < 1:
                raise VlmergeError(f"toy eval set {name}={getattr(self, name)}: must be at least 1")
        if self.seed < 0:
            raise VlmergeError(f"toy eval set seed={self.seed}: must be 0 or more (the split seeds must stay at "
                               f"or above {EVAL_SEED_BASE}, which training data does not use)")
        if not MIN_CANVAS <= self.canvas <= MAX_CANVAS:
            raise VlmergeError(f"toy eval set canvas={self.canvas}: must be between {MIN_CANVAS} and {MAX_CANVAS} px")
        for task, limit in (("vqa", vqa_capacity()), ("math", math_capacity(self.math))):
            sizes = self.sizes(task)
            if sum(sizes.values()) > limit:
                raise VlmergeError(
                    f"toy eval set {task}_search_size={sizes['search']} + {task}_heldout_size={sizes['heldout']} "
                    f"= {sum(sizes.values())}: the toy world has only {limit} distinct {task} items "
                    f"({CAPACITY_OF[task]}), and the splits share none")

    def sizes(self, task: str) -> dict[str, int]:
        """{"search": n, "heldout": n} of `task` ("vqa" or "math")."""
        return {split: getattr(self, f"{task}_{split}_size") for split in SPLITS}

    def split_seed(self, split: str) -> int:
        return EVAL_SEED_BASE + 2 * self.seed + SPLITS.index(split)

    def command(self) -> str:
        default, flags = EvalSetConfig(), ["python -m vlmerge.toy.splits --out eval_data"]
        for name in ("seed", *SIZE_FIELDS, "canvas"):
            if getattr(self, name) != getattr(default, name):
                flags.append(f"--{name.replace('_', '-')} {getattr(self, name)}")
        return " ".join(flags)


SIZE_FIELDS = ("vqa_search_size", "vqa_heldout_size", "math_search_size", "math_heldout_size")
MIN_CANVAS, MAX_CANVAS = 16, 1024  # shapes need 6 px in a quarter of the canvas; the toy models see 32 px
CAPACITY_OF = {"vqa": "(scene layout, question) pairs", "math": "Japanese question texts"}


def math_capacity(config: P.ProblemConfig) -> int:
    """How many distinct Japanese question texts `P.make_problems` can draw: per operation, the operand pairs
    (a - b is posed as (a + b) - a: one text per drawn pair) times, per template, the people it names (the asker,
    and the other person where the template names one) times the items. The splits refuse a repeated text, so
    both together hold at most this many problems."""
    people = {False: len(P.NAMES), True: len(P.NAMES) * (len(P.NAMES) - 1)}
    total = 0
    for op in set(config.ops):
        lo, hi = config.factor_range if op == "×" else config.operand_range
        templates = sum(people["{ot}" in ja] for _, ja in P.TEMPLATES[op])
        total += (hi - lo + 1) ** 2 * templates * len(P.ITEMS)
    return total


def vqa_capacity() -> int:
    """How many distinct (scene layout, question) pairs the VQA splits can draw: the sum over every layout
    (each grid cell empty or one of the shape x colour pairs, at least one shape) of its questions with exactly
    one answer (`S.question_specs`), counted per kind rather than by listing the layouts."""
    cells, pairs = len(S.CELLS), len(S.SHAPES) * len(S.COLOURS)
    layouts = (1 + pairs) ** cells - 1  # count_all: one per layout
    # colour_of and where_is a shape kind that is there exactly once; shape_of a colour that is there exactly once
    by_kind = 2 * len(S.SHAPES) * cells * len(S.COLOURS) * (1 + pairs - len(S.COLOURS)) ** (cells - 1)
    by_colour = len(S.COLOURS) * cells * len(S.SHAPES) * (1 + pairs - len(S.SHAPES)) ** (cells - 1)
    # what_at a position holding exactly one shape: one of its cells filled, its others empty, the rest anything
    by_position = sum(len(covered) * pairs * (1 + pairs) ** (cells - len(covered))
                      for _, covered in S.POSITIONS.values())
    return layouts + by_kind + by_colour + by_position


def vqa_splits(config: EvalSetConfig) -> dict[str, list[dict]]:
    """Japanese VQA items per split, one question per scene, no (layout, question) repeated anywhere.

    Each scene is asked the question kind least used so far in its split (ties: a seeded draw), so the
    question kinds are equally represented even in a 64-item split.
    """
    seen: set = set()
    out = {}
    for split, size in config.sizes("vqa").items():
        seed, items, i = config.split_seed(split), [], 0
        used = dict.fromkeys(S.QUESTION_KINDS, 0)
        rng = random.Random(f"vlmerge-eval-vqa:{seed}")
        while len(items) < size:
            if i > 100 * size:
                raise VlmergeError(f"toy VQA {split}: too few distinct scenes for {size} items")
            scene = S.scene_at(seed, i, size=config.canvas)
            specs = [s for s in S.question_specs(scene) if (scene.key(), s) not in seen]
            i += 1
            if not specs:
                continue
            fewest = min(used[s.kind] for s in specs)
            spec = rng.choice([s for s in specs if used[s.kind] == fewest])
            seen.add((scene.key(), spec))
            used[spec.kind] += 1
            items.append(S.vqa_item(scene, spec, "ja"))
        out[split] = items
    return out


def math_splits(config: EvalSetConfig) -> dict[str, list[P.Problem]]:
    """Problems per split, no Japanese question text repeated anywhere.

    Each split draws problems at random; when few distinct texts are left (sizes near `math_capacity`) the
    draws stall, and the split is filled from the texts not yet used, in a seeded order (ids `m<seed>-r<n>`).
    """
    seen: set[str] = set()
    out = {}
    for split, size in config.sizes("math").items():
        seed, chosen, done = config.split_seed(split), [], 0
        budget = 101 * size  # problems drawn before the draws count as stalled
        while len(chosen) < size and done < budget:
            upto = min(budget, max(2 * done, size))  # doubling: make_problems redraws the prefix every call
            for p in P.make_problems(upto, seed, config.math)[done:]:
                q = P.question(p, "ja")
                if q not in seen:
                    seen.add(q)
                    chosen.append(p)
                    if len(chosen) == size:
                        break
            done = upto
        if len(chosen) < size:
            rest = _unused_problems(config.math, seen, seed)[: size - len(chosen)]
            seen.update(P.question(p, "ja") for p in rest)
            chosen += rest
        if len(chosen) < size:  # EvalSetConfig refuses sizes above math_capacity: not reached
            raise VlmergeError(f"toy math {split}: too few distinct problems for {size} items; widen "
                               f"operand_range {config.math.operand_range} or ops {config.math.ops}")
        out[split] = chosen
    return out


def _unused_problems(config: P.ProblemConfig, seen: set[str], seed: int) -> list[P.Problem]:
    """One problem per Japanese question text `config` can pose that is not in `seen`, in an order seeded by
    `seed`. Lists every problem make_problems could draw; where several give one text (a template without {ot}
    ignores the other person) the first is kept."""
    unused: dict[str, P.Problem] = {}
    for op in dict.fromkeys(config.ops):
        lo, hi = config.factor_range if op == "×" else config.operand_range
        for a, b in itertools.product(range(lo, hi + 1), repeat=2):
            a, b = (a + b, a) if op == "-" else (a, b)  # as make_problems poses a - b
            for template, (name, other), item in itertools.product(
                    range(len(P.TEMPLATES[op])), itertools.permutations(P.NAMES, 2), P.ITEMS):
                problem = P.Problem("", op, a, b, name, other, item, template)
                q = P.question(problem, "ja")
                if q not in seen:
                    unused.setdefault(q, problem)
    order = list(unused.values())
    random.Random(f"vlmerge-eval-math-rest:{seed}").shuffle(order)
    return [replace(p, id=f"m{seed}-r{i:05d}") for i, p in enumerate(order)]


def write_eval_sets(out: str | Path, config: EvalSetConfig | None = None) -> list[Path]:
    """Write both folders under `out`; returns their paths."""
    out, config = Path(out), config or EvalSetConfig()
    for folder in (out / VQA_DIR, out / MATH_DIR):  # all checked before the first is replaced
        check_output_dir(folder, overwrite=True)
    vqa = vqa_splits(config)
    math = math_splits(config)

    def fill_vqa(folder: Path) -> None:
        (folder / "images").mkdir()
        for split, items in vqa.items():
            lines = []
            for it in items:
                image = f"images/{it['id']}.png"
                S.render(it["scene"]).save(folder / image, format="PNG")
                lines.append({"id": it["id"], "image": image, "question": it["question"],
                              "answers": it["answers"]})
            _write_jsonl(folder / f"{split}.jsonl", lines)

    def fill_math(folder: Path) -> None:
        for split, items in math.items():
            _write_jsonl(folder / f"{split}.jsonl", [
                {"id": p.id, "question": P.question(p, "ja"), "answer": P.answer_text(p)} for p in items])

    vqa_format = 'jsonl lines {"id", "image": "images/<id>.png" (relative to the jsonl), "question", ' \
        '"answers"}'
    math_format = 'jsonl lines {"id", "question", "answer"} (answer: the number as text)'
    seeds = {"generator_seed": config.seed, "split_seeds": {s: config.split_seed(s) for s in SPLITS}}
    vqa_generator = {**seeds, "canvas_px": config.canvas}
    math_generator = {**seeds, **asdict(config.math)}
    return [_write_folder(out / VQA_DIR, config, "vqa", fill_vqa, vqa_format, vqa_generator),
            _write_folder(out / MATH_DIR, config, "math", fill_math, math_format, math_generator)]


def verify_manifest(folder: str | Path) -> None:
    """Raise VlmergeError naming every file that is missing, unlisted, or differs from MANIFEST.json."""
    folder = Path(folder)
    manifest_path = folder / "MANIFEST.json"
    if not manifest_path.is_file():
        raise VlmergeError(f"{manifest_path} is missing")
    listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    problems = [f"{name}: missing" for name in sorted(set(listed) - present)]
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(listed))]
    problems += [f"{name}: sha256 differs" for name in sorted(set(listed) & present)
                 if _sha256(folder / name) != listed[name]]
    if problems:
        raise VlmergeError(f"{manifest_path} does not match the folder: " + "; ".join(problems))


def _write_folder(target: Path, config: EvalSetConfig, task: str, fill, data_format: str,
                  generator: dict) -> Path:
    with staged_dir(target, overwrite=True) as tmp:
        fill(tmp)
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "name": target.name,
            "source": f"generated by vlmerge.toy (command: {config.command()})",
            "license": LICENSE,
            "generator": generator,
            "splits": config.sizes(task),
            "format": data_format,
            "files": files,
        }
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
    return target


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmerge.toy.splits", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval_data", help="parent folder of toy_vqa_ja/ and toy_math_ja/")
    parser.add_argument("--seed", type=int, default=0)
    for name in SIZE_FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(EvalSetConfig, name))
    parser.add_argument("--canvas", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    config = EvalSetConfig(args.seed, *(getattr(args, name) for name in SIZE_FIELDS), canvas=args.canvas)
    for folder in write_eval_sets(args.out, config):
        print(f"wrote {folder}")


if __name__ == "__main__":
    exit_on_user_error(main)
