"""COCO caption metrics (pycocoevalcap) with PTB tokenisation, or its Python equivalent."""

from __future__ import annotations

import pytest

from capfilt.core.errors import CapfiltError
from capfilt.training import caption_metrics as metrics_module
from capfilt.training.caption_metrics import (
    caption_metrics,
    ptb_tokenize,
    python_ptb_tokenize,
    spice_unavailable,
)

needs_java = pytest.mark.skipif(not metrics_module.java_available(), reason="no java on PATH")

SCENES = {
    "k1": "a red circle on a white table",
    "k2": "two blue squares next to a green tree",
    "k3": "a yellow triangle under the bright sky",
    "k4": "a dog running across the grass field",
}

# Captions with the punctuation, quotes, brackets and clitics that COCO captions hold.
CAPTION_LIKE = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' bowls, and a cat's toy.",
    '"Hello," she said.',
    "It's 10:30 and 3,000 people are at the U.S. Open.",
    "A sign that says 'Stop'.",
    "A group of people standing around a table (with food).",
    "Mr. Smith's car is red!",
    "The kids -- all five -- play.",
    "A man with a hat...",
    "The cost is $5.50 or 50% off",
    "A 2-year-old child can't stop eating; it is: a cake?",
    "A close-up of a pizza , e.g. a pepperoni one .",
    "He's, she's, it's; we'd, you'll, I'm.",
    "{braces} [brackets] and a + sign",
]


def test_identical_captions_score_bleu_one_and_a_high_cider():
    references = {key: [text] for key, text in SCENES.items()}
    scores = caption_metrics(SCENES, references, metrics=("bleu4", "cider"), tokenizer="python")
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] > 9.0  # CIDEr-D is 10 for captions identical to their one reference
    assert scores["images"] == 4 and scores["references"] == 4
    assert scores["tokenizer"] == "python" and scores["unavailable"] == {}


def test_bleu4_of_a_small_example_matches_the_hand_computation():
    """Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; the closest reference has 6 words."""
    scores = caption_metrics(
        {"k": "A red circle on the table."},
        {"k": ["A red circle on a table!", "A circle."]},
        metrics=("bleu4",),
        tokenizer="python",
    )
    assert scores["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_cider_of_a_small_example_matches_the_hand_computation():
    """CIDEr-D with idf log(2) for every reference n-gram: image a matches its reference in
    unigrams and bigrams (10 · 2/4), image b shares one of two unigrams (10 · 0.5/4)."""
    scores = caption_metrics(
        {"a": "red circle", "b": "blue square"},
        {"a": ["red circle"], "b": ["green square"]},
        metrics=("cider",),
        tokenizer="python",
    )
    assert scores["cider"] == pytest.approx((5.0 + 1.25) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({}, {}, "predictions are empty"),
        ({"a": "x"}, {"b": ["x"]}, "same images"),
        ({"a": "x", "b": "y"}, {"a": ["x"]}, "same images"),
        ({"a": "x"}, {"a": []}, "non-empty list"),
        ({"a": "x"}, {"a": "x"}, "non-empty list"),
        ({"a": None}, {"a": ["x"]}, "must be strings"),
        ({"a": "x"}, {"a": ["..."]}, "empty once tokenised"),
    ],
)
def test_empty_or_mismatched_inputs_fail_in_one_clear_error(predictions, references, message):
    with pytest.raises(CapfiltError, match=message):
        caption_metrics(predictions, references, tokenizer="python")


def test_the_python_tokenizer_lowercases_and_drops_ptb_punctuation():
    assert python_ptb_tokenize("A dog's bowl, \"full\" (of food)... isn't it?") == (
        "a dog 's bowl full -lrb- of food -rrb- is n't it"
    )
    assert python_ptb_tokenize("The U.S. flag; e.g. at 10:30, 3,000 people.") == (
        "the u.s. flag e.g. at 10:30 3,000 people"
    )


@needs_java
def test_the_python_tokenizer_matches_ptb_on_caption_like_text():
    assert [python_ptb_tokenize(text) for text in CAPTION_LIKE] == ptb_tokenize(CAPTION_LIKE)


@needs_java
def test_ptb_keeps_one_line_per_text_whatever_the_line_breaks_inside():
    texts = ["a cat\non a mat", "", "a dog\r\nand\u2028a ball", "."]
    assert ptb_tokenize(texts) == ["a cat on a mat", "", "a dog and a ball", ""]


def test_without_java_the_scores_come_from_python_and_java_metrics_say_why(monkeypatch):
    monkeypatch.setattr(metrics_module, "java_available", lambda: False)
    scores = caption_metrics(SCENES, {k: [v] for k, v in SCENES.items()})
    assert scores["tokenizer"] == "python" and scores["bleu4"] > 0.99
    assert set(scores["unavailable"]) == {"ptb_tokenizer", "meteor", "spice"}
    assert all("Java" in why for why in scores["unavailable"].values())
    assert "meteor" not in scores and "spice" not in scores
    with pytest.raises(CapfiltError, match="PTB tokenizer cannot run.*Java"):
        caption_metrics(SCENES, {k: [v] for k, v in SCENES.items()}, tokenizer="ptb")


def test_spice_without_its_corenlp_jars_is_left_out_with_the_reason(monkeypatch, tmp_path):
    from pycocoevalcap.spice import get_stanford_models

    monkeypatch.setattr(metrics_module, "java_available", lambda: True)
    monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path))  # no lib/ jars here
    assert "Stanford CoreNLP" in spice_unavailable()
    scores = caption_metrics(
        SCENES, {k: [v] for k, v in SCENES.items()}, metrics=("spice",), tokenizer="python"
    )
    assert "spice" not in scores and "Stanford CoreNLP" in scores["unavailable"]["spice"]


@needs_java
@pytest.mark.slow  # METEOR's jar loads its paraphrase table first: 10 s or more
def test_meteor_runs_with_java_and_scores_identical_captions_near_one():
    references = {key: [text] for key, text in SCENES.items()}
    scores = caption_metrics(SCENES, references, metrics=("bleu4", "meteor"))
    assert scores["tokenizer"] == "ptb" and scores["unavailable"] == {}
    assert 0.9 < scores["meteor"] <= 1.0 and scores["bleu4"] > 0.99


@needs_java
def test_a_meteor_jar_that_dies_is_left_out_with_the_reason(monkeypatch):
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "METEOR_JAR", "no-such-meteor.jar")
    references = {key: [text] for key, text in SCENES.items()}
    scores = caption_metrics(SCENES, references, metrics=("meteor", "cider"), tokenizer="python")
    assert "meteor" not in scores and "METEOR failed" in scores["unavailable"]["meteor"]
    assert scores["cider"] > 9.0


def test_a_failing_spice_run_is_left_out_and_keeps_stdout_clean(monkeypatch, capfd):
    """SPICE's jar inherits stdout, which carries `capfilt evaluate --json`."""
    import subprocess
    import sys

    from pycocoevalcap.spice import spice

    class BrokenSpice:
        def compute_score(self, gold, hypotheses):
            subprocess.run([sys.executable, "-c", "print('spice chatter')"], check=True)
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(metrics_module, "spice_unavailable", lambda: None)
    monkeypatch.setattr(spice, "Spice", BrokenSpice)
    references = {key: [text] for key, text in SCENES.items()}
    scores = caption_metrics(SCENES, references, metrics=("bleu4", "spice"), tokenizer="python")
    assert "spice" not in scores and "SPICE failed" in scores["unavailable"]["spice"]
    assert scores["bleu4"] > 0.99
    out, err = capfd.readouterr()
    assert "spice chatter" not in out and "spice chatter" in err
