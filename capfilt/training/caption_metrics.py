"""Captioning scores as COCO's caption evaluation computes them (pycocoevalcap).

    caption_metrics({"img1": "a red circle"}, {"img1": ["a red circle", "a round red shape"]})
    → {"bleu4": ..., "cider": ..., "meteor": ..., "unavailable": {"spice": "why"}, ...}

Every text is first tokenised as COCO does: Stanford's PTBTokenizer (Java), lower case, with
the punctuation tokens pycocoevalcap lists dropped. Without Java, `python_ptb_tokenize` does
the same for the words, punctuation, quotes, brackets and clitics that captions are made of;
rarer text (URLs, symbols) may split differently, so the result names the tokenizer used.

BLEU-4 and CIDEr (COCO's CIDEr-D) are pure Python. METEOR runs pycocoevalcap's jar (Java).
SPICE runs a jar that also needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first
use; an evaluation never downloads it. A metric that cannot run is left out of the scores, with
the reason under "unavailable", rather than failing the evaluation.
"""

from __future__ import annotations

import functools
import re
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from capfilt.core.errors import CapfiltError

METRICS = ("bleu4", "cider", "meteor", "spice")
METRIC_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr", "meteor": "METEOR", "spice": "SPICE"}
TOKENIZERS = ("auto", "ptb", "python")

PTB_TIMEOUT_S = 600


class MetricUnavailable(Exception):
    """A metric (or the Java tokenizer) cannot run here; the message says why."""


def caption_metrics(
    predictions: dict,
    references: dict,
    metrics: tuple[str, ...] = METRICS,
    tokenizer: str = "auto",
) -> dict:
    """COCO caption scores of one predicted caption per image against its reference captions.

    `predictions`: image key → generated caption; `references`: image key → every reference
    text of that image (several count as several references, as in COCO). `tokenizer`: "ptb"
    (Java), "python", or "auto" (PTB when Java runs, else Python). Returns the scores in
    pycocoevalcap's scale (BLEU and METEOR in [0, 1], CIDEr-D in [0, 10]), the counts, the
    tokenizer used, and `unavailable`: metric → why it was not computed.
    """
    keys = _check_inputs(predictions, references)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise CapfiltError(f"unknown caption metrics {unknown}; choose from {', '.join(METRICS)}")
    if tokenizer not in TOKENIZERS:
        raise CapfiltError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {tokenizer!r}")
    texts = [predictions[k] for k in keys] + [text for k in keys for text in references[k]]
    unavailable: dict[str, str] = {}
    tokens, used = None, "python"
    if tokenizer in ("auto", "ptb"):
        try:
            tokens, used = ptb_tokenize(texts), "ptb"
        except MetricUnavailable as e:
            if tokenizer == "ptb":
                raise CapfiltError(f"the PTB tokenizer cannot run: {e}") from None
            unavailable["ptb_tokenizer"] = str(e)
    if tokens is None:
        tokens = [python_ptb_tokenize(text) for text in texts]

    if not any(tokens[len(keys) :]):
        raise CapfiltError("every reference text is empty once tokenised; nothing to score against")
    # pycocoevalcap's scorers take {id: [hypothesis]} and {id: [references]}.
    hypotheses = {i: [tokens[i]] for i in range(len(keys))}
    gold, at = {}, len(keys)
    for i, key in enumerate(keys):
        gold[i] = tokens[at : at + len(references[key])]
        at += len(references[key])

    result: dict = {}
    for metric in dict.fromkeys(metrics):
        try:
            result[metric] = round(float(SCORERS[metric](gold, hypotheses)), 6)
        except MetricUnavailable as e:
            unavailable[metric] = str(e)
    return dict(
        result,
        images=len(keys),
        references=len(texts) - len(keys),
        tokenizer=used,
        unavailable=unavailable,
    )


def _check_inputs(predictions: dict, references: dict) -> list:
    if not predictions:
        raise CapfiltError("no captions to score: the predictions are empty")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise CapfiltError(
            f"predictions and references must cover the same images: {len(missing)} predicted "
            f"without references (e.g. {missing[:3]}), {len(extra)} with references but no "
            f"prediction (e.g. {extra[:3]})"
        )
    for key, texts in references.items():
        if isinstance(texts, str) or not texts:
            raise CapfiltError(
                f"references of image {key!r} must be a non-empty list of texts, got {texts!r}"
            )
        if not all(isinstance(text, str) for text in [predictions[key], *texts]):
            raise CapfiltError(f"the captions of image {key!r} must be strings")
    return list(predictions)


# --- tokenisation ----------------------------------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(texts: list[str]) -> list[str]:
    """COCO's tokenisation: Stanford PTBTokenizer (pycocoevalcap's jar), punctuation dropped.

    The jar is run here rather than through pycocoevalcap's wrapper, which writes its input
    into the installed package (read-only in some installs) and prints to the terminal.
    """
    import subprocess

    from pycocoevalcap.tokenizer import ptbtokenizer

    if not java_available():
        raise MetricUnavailable("needs Java (no `java` on PATH)")
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    # One text per line: any line break inside a text would shift every later one.
    lines = "".join(" ".join(text.split()) + "\n" for text in texts)
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
    try:
        done = subprocess.run(
            [*command, "-preserveLines", "-lowerCase"],
            input=lines.encode(),
            capture_output=True,
            timeout=PTB_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise MetricUnavailable(f"PTBTokenizer did not run: {e}") from None
    out = done.stdout.decode("utf-8", errors="replace").split("\n")
    if done.returncode != 0 or len(out) != len(texts) + 1 or out[-1]:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise MetricUnavailable(
            f"PTBTokenizer failed (exit {done.returncode}, {len(out) - 1} lines for "
            f"{len(texts)} texts): {why[0]}"
        )
    dropped = dropped_tokens()
    return [" ".join(t for t in line.split() if t not in dropped) for line in out[:-1]]


@functools.cache
def dropped_tokens() -> frozenset[str]:
    """The tokens COCO's evaluation drops after tokenising: pycocoevalcap's PUNCTUATIONS.

    Its bracket tokens are upper case while the tokenizer runs with -lowerCase, so "-lrb-"
    and the like stay in COCO's scores; they stay here too.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Quote marks and dash or dot runs the PTB tokenizer makes tokens of, all of them dropped.
_DROPPED_MARKS = re.compile(r'``|\'\'|["`]|-{2,}|\.{3,}')
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_CLITICS = ("'s", "'m", "'d", "'re", "'ve", "'ll", "n't")
_CLITIC = re.compile(rf"^(.+?)({'|'.join(_CLITICS)})$")
# Words whose final period PTB keeps (its list is longer; these are the ones captions use).
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc."])
_LETTERS_WITH_PERIODS = re.compile(r"^(?:[a-z]\.)+$")
_TRAILING = re.compile(r"([!?]+|[,;:%'\-+*])$")
_INNER_SPLIT = re.compile(r"([+*;]|(?<!\d),|,(?!\d))")
_LEADING = re.compile(r"^([,;:'\-+*$])")


def python_ptb_tokenize(text: str) -> str:
    """The PTB tokenisation of `text` as COCO's evaluation applies it, without Java."""
    text = " ".join(text.lower().split())
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = _DROPPED_MARKS.sub(" ", text)
    tokens = [t for word in text.split() for t in _split_word(word)]
    dropped = dropped_tokens()
    return " ".join(t for t in tokens if t not in dropped)


def _split_word(word: str) -> list[str]:
    """One whitespace-separated word → its PTB tokens (punctuation still in)."""
    if word in _BRACKETS.values() or word in _CLITICS:  # -lrb-, or a clitic split already
        return [word]
    head: list[str] = []
    tail: list[str] = []
    while True:
        if m := _LEADING.match(word):
            head.append(m.group(1))
            word = word[1:]
        elif m := _TRAILING.search(word):
            tail.insert(0, m.group(1))
            word = word[: m.start()]
        elif word.endswith(".") and not _keeps_period(word):
            tail.insert(0, ".")
            word = word[:-1]
        else:
            break
    middle: list[str] = []
    if word:
        # a+b → a + b, cat,dog → cat , dog; 3,000 stays whole
        parts = [p for p in _INNER_SPLIT.split(word) if p]
        for part in parts:
            if part in _SPLIT_WORDS:
                middle += _SPLIT_WORDS[part].split()
            elif m := _CLITIC.match(part):
                middle += [m.group(1), m.group(2)]
            else:
                middle.append(part)
    return head + middle + tail


def _keeps_period(word: str) -> bool:
    """u.s., e.g. and single letters keep their final period (abbreviations), as do mr. and st."""
    return _LETTERS_WITH_PERIODS.match(word) is not None or word in _ABBREVIATIONS


# --- scorers: (references {id: [texts]}, hypotheses {id: [text]}) → corpus score ------------
def _bleu4(gold: dict, hypotheses: dict) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(gold, hypotheses, verbose=0)
    return scores[3]


def _cider(gold: dict, hypotheses: dict) -> float:
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(gold, hypotheses)
    return score


def _meteor(gold: dict, hypotheses: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    if not java_available():
        raise MetricUnavailable("needs Java (no `java` on PATH)")
    # "|||" separates fields in METEOR's line protocol; a reference holding it would shift them.
    gold = {k: [text.replace("|||", " ") for text in texts] for k, texts in gold.items()}
    try:
        meteor = Meteor()
    except OSError as e:
        raise MetricUnavailable(f"METEOR did not start: {e}") from None
    process = meteor.meteor_p
    try:
        score, _ = meteor.compute_score(gold, hypotheses)
    except (OSError, ValueError) as e:  # the JVM died: a broken pipe, or an empty reply
        process.kill()
        said = process.stderr.read().decode(errors="replace").strip().splitlines()
        raise MetricUnavailable(f"METEOR failed: {said[-1] if said else repr(e)}") from None
    finally:
        # compute_score keeps its lock when it fails, and Meteor.__del__ waits for that lock;
        # __del__ then closes stdin, which must not raise again for a dead process.
        if meteor.lock.locked():
            meteor.lock.release()
        process.kill()
        process.wait()
        with suppress(OSError):
            process.stdin.close()
    return score


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None when it can (Java and the CoreNLP jars present)."""
    if not java_available():
        return "needs Java (no `java` on PATH)"
    from pycocoevalcap.spice import get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    if not (lib / f"{models.JAR}.jar").is_file():
        return (
            f"needs Stanford CoreNLP ({models.JAR}.jar and -models.jar in {lib}), which "
            "pycocoevalcap downloads on first use and an evaluation does not; fetch them once "
            "with `python -m pycocoevalcap.spice.get_stanford_models` where nlp.stanford.edu "
            "is reachable"
        )
    return None


def _spice(gold: dict, hypotheses: dict) -> float:
    import subprocess

    why = spice_unavailable()
    if why:
        raise MetricUnavailable(why)
    from pycocoevalcap.spice.spice import Spice

    try:
        with _stdout_to_stderr():  # the jar writes to stdout, which may carry --json
            score, _ = Spice().compute_score(gold, hypotheses)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        raise MetricUnavailable(f"SPICE failed: {e}") from None
    return score


@contextmanager
def _stdout_to_stderr():
    """Send this process's stdout, and its children's, to stderr for a while."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


SCORERS = {"bleu4": _bleu4, "cider": _cider, "meteor": _meteor, "spice": _spice}
