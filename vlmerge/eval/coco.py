"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) for Japanese, via pycocoevalcap.

pycocoevalcap's PTBTokenizer leaves Japanese unsplit (one "word" per sentence, CIDEr 0), so text is
normalised and MeCab-tokenised here and handed over space-joined. Scores keep pycocoevalcap's scale
(BLEU/METEOR/ROUGE-L in 0..1, CIDEr-D in 0..10). CIDEr weights n-grams by their document frequency over the
references of the whole call: it is only meaningful on a set of several items. SPICE needs a download and is
not offered. METEOR runs the bundled Java jar (English settings, the standard COCO configuration; on Japanese
tokens only its exact-match module finds anything); loading its paraphrase table takes ~10 s, so the process
is started once per scorer and reused.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vlmerge.errors import VlmergeError
from vlmerge.eval.text import ja_tokens, normalize_ja

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def pretokenize(text: str) -> str:
    """Normalised, lower-cased MeCab tokens joined by spaces; '|' is dropped (METEOR's field separator)."""
    tokens = (token.replace("|", "").lower() for token in ja_tokens(normalize_ja(text)))
    return " ".join(token for token in tokens if token)


def _meteor_jar() -> Path:
    from pycocoevalcap.meteor import meteor

    return Path(meteor.__file__).parent / "meteor-1.5.jar"


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.stdin.close()
        process.kill()
        process.wait()


class MeteorScorer:
    """METEOR 1.5 over its -stdio protocol, with failures reported as VlmergeError naming Java and the jar."""

    def __init__(self, java: str = "java", max_memory: str = "2G"):
        self.java = java
        self.max_memory = max_memory
        self._process: subprocess.Popen | None = None
        self._stderr = None

    def _start(self) -> subprocess.Popen:
        java = shutil.which(self.java)
        if java is None:
            raise VlmergeError(
                f"METEOR needs Java: {self.java!r} was not found on PATH; install a JRE "
                "(e.g. apt-get install default-jre-headless) or score without METEOR (meteor=False)"
            )
        jar = _meteor_jar()
        if not jar.is_file():
            raise VlmergeError(f"METEOR jar {jar} is missing; reinstall pycocoevalcap or use meteor=False")
        self._stderr = tempfile.TemporaryFile()
        command = [java, "-jar", f"-Xmx{self.max_memory}", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        process = subprocess.Popen(
            command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        weakref.finalize(self, _terminate, process)
        return process

    def _failure(self, what: str) -> VlmergeError:
        detail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        self.close()
        return VlmergeError(
            f"METEOR (java -jar {_meteor_jar().name}) failed while {what}: {detail or 'no error output'}; "
            "check the Java installation or score without METEOR (meteor=False)"
        )

    def _exchange(self, line: str, n_replies: int, what: str) -> list[str]:
        if self._process is None:
            self._process = self._start()
        try:
            self._process.stdin.write(f"{line}\n".encode())
            self._process.stdin.flush()
            replies = [self._process.stdout.readline().decode().strip() for _ in range(n_replies)]
        except (BrokenPipeError, OSError) as err:
            raise self._failure(what) from err
        if any(not reply for reply in replies):
            raise self._failure(what)
        return replies

    def score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and per-item METEOR of pre-tokenised hypotheses against their references."""
        stats = []
        for i, (hypothesis, refs) in enumerate(zip(hypotheses, references)):
            line = " ||| ".join(["SCORE", *refs, hypothesis])
            stats.extend(self._exchange(line, 1, f"scoring item {i}"))
        replies = self._exchange(" ||| ".join(["EVAL", *stats]), len(stats) + 1, "aggregating")
        try:
            values = [float(reply) for reply in replies]
        except ValueError as err:
            raise self._failure(f"reading its output {replies[:3]!r}") from err
        return values[-1], values[:-1]

    def close(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def coco_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, meteor: MeteorScorer | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Corpus scores and per-item scores (with the tokenised prediction) of MeCab-tokenised captions."""
    hypotheses = [pretokenize(p) for p in predictions]
    tokenised_refs = [[pretokenize(r) for r in refs] for refs in references]
    gts = {i: refs for i, refs in enumerate(tokenised_refs)}
    res = {i: [hypothesis] for i, hypothesis in enumerate(hypotheses)}
    per_item: list[dict] = [{"tokens": hypothesis} for hypothesis in hypotheses]
    values: dict[str, float] = {}

    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for key, corpus, items in zip(BLEU_KEYS, bleu, bleu_items):
        values[key] = float(corpus)
        for item, score in zip(per_item, items):
            item[key] = float(score)
    if meteor is not None:
        values["METEOR"], items = meteor.score(hypotheses, tokenised_refs)
        for item, score in zip(per_item, items):
            item["METEOR"] = score
    for key, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        corpus, items = scorer.compute_score(gts, res)
        values[key] = float(corpus)
        for item, score in zip(per_item, items):
            item[key] = float(score)
    return values, per_item
