"""capfilt.models.blip against plain transformers on the same tiny weights; loading rules."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import draw_scene

from capfilt.core.errors import CapfiltError
from capfilt.models import blip, sampling

PROMPT = "a picture of "
SCENES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
TEXTS = ["a red circle", "a photo of a blue square on a white background", "a green", "yellow"]


# Every parity test runs on both engines: `fast` (the default) and `hf` (plain modules).
@pytest.fixture(scope="session", params=blip.ENGINES)
def captioner(tiny_captioner, request):
    return blip.Captioner.load(
        str(tiny_captioner), precision="fp32", device="cpu", engine=request.param
    )


@pytest.fixture(scope="session", params=blip.ENGINES)
def scorer_cls(tiny_filter, request):
    return blip.ItmScorer.load(
        str(tiny_filter), precision="fp32", device="cpu", itm_token="cls", engine=request.param
    )


@pytest.fixture(scope="session")
def images():
    return [draw_scene(color, shape) for color, shape in SCENES]


def test_greedy_captions_are_token_identical_to_transformers_generate(
    tiny_captioner, captioner, images
):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_captioner)
    reference = BlipForConditionalGeneration.from_pretrained(tiny_captioner).eval()
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    options = dict(min_length=5, max_length=20, repetition_penalty=1.1)
    expected = reference.generate(
        pixel_values=inputs.pixel_values,
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        do_sample=False,
        num_beams=1,
        **options,
    )
    ids = captioner.generate_ids(inputs.pixel_values, prompt=PROMPT, decoding="greedy", **options)
    assert torch.equal(ids, expected)

    # The prompt is cut off as BLIP cuts it: the prompt's characters off the decoded text.
    texts = captioner.generate_captions(
        inputs.pixel_values, prompt=PROMPT, decoding="greedy", **options
    )
    for (text,), row in zip(texts, expected, strict=True):
        full = processor.decode(row, skip_special_tokens=True)
        assert full.startswith(PROMPT.strip())
        assert text == full[len(PROMPT) :].strip()
        assert not text.startswith("##")


def test_a_first_token_that_continues_the_prompt_is_cut_as_blip_cuts_it(captioner):
    """ "a picture of" + "##s red circle" decodes to "a picture ofs red circle": BLIP's cut of
    len("a picture of ") characters leaves "red circle", not "##s red circle"."""
    tokenizer = captioner.tokenizer
    prompt_ids = captioner.prompt_ids(PROMPT)[0].tolist()
    new = tokenizer.convert_tokens_to_ids(["##s", "red", "circle"])
    ids = torch.tensor([prompt_ids + new + [tokenizer.sep_token_id]])
    captioner.generate_ids = lambda *a, **k: ids
    try:
        (texts,) = captioner.generate_captions(None, prompt=PROMPT)
    finally:
        del captioner.generate_ids
    assert texts == ["red circle"]


def test_itm_and_itc_match_transformers_within_1e4(tiny_filter, scorer_cls, images):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_filter)
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_filter).eval()
    inputs = processor(images=images, text=TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = reference(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            attention_mask=inputs.attention_mask,
        ).itm_score.softmax(dim=-1)[:, 1]
        itc = reference(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            attention_mask=inputs.attention_mask,
            use_itm_head=False,
        ).itm_score
    features = scorer_cls.encode_images(inputs.pixel_values)
    ours_itm, ours_itc = scorer_cls.score(features, list(range(len(TEXTS))), TEXTS)
    assert torch.allclose(ours_itm, itm, atol=1e-4)
    assert torch.allclose(ours_itc, itc.diagonal(), atol=1e-4)

    # Each image is encoded once and reused for many texts: image 1 against all four texts.
    more_itm, _ = scorer_cls.score(features, [1, 1, 1, 1], TEXTS)
    with torch.no_grad():
        repeated = inputs.pixel_values[1:2].expand(4, -1, -1, -1)
        itm_1 = reference(
            input_ids=inputs.input_ids, pixel_values=repeated, attention_mask=inputs.attention_mask
        ).itm_score.softmax(dim=-1)[:, 1]
    assert torch.allclose(more_itm, itm_1, atol=1e-4)


def test_itm_token_auto_picks_enc_and_changes_scores(tiny_filter, scorer_cls, images):
    enc = blip.ItmScorer(
        scorer_cls.network,
        _processor(tiny_filter),
        scorer_cls.source,
        scorer_cls.device,
        scorer_cls.dtype,
        itm_token="auto",
    )
    assert enc.itm_token == "enc"
    assert enc.itm_token_id == enc.tokenizer.convert_tokens_to_ids("[ENC]")
    assert scorer_cls.itm_token == "cls" and scorer_cls.itm_token_id is None
    pixel_values = enc.image_processor(images=images, return_tensors="pt").pixel_values
    features = enc.encode_images(pixel_values)
    itm_enc, itc_enc = enc.score(features, [0, 1, 2, 3], TEXTS)
    itm_cls, itc_cls = scorer_cls.score(features, [0, 1, 2, 3], TEXTS)
    assert not torch.allclose(itm_enc, itm_cls, atol=1e-6)
    assert torch.allclose(itc_enc, itc_cls)  # ITC always reads [CLS]


def test_itm_token_enc_needs_the_token(tiny_filter, scorer_cls):
    processor = _processor(tiny_filter)
    # A tokenizer without [ENC], like the released checkpoints' BERT tokenizer may be.
    unknown = processor.tokenizer.unk_token_id
    processor.tokenizer.convert_tokens_to_ids = lambda token: unknown
    with pytest.raises(CapfiltError, match="no \\[ENC\\] token"):
        blip.ItmScorer(
            scorer_cls.network,
            processor,
            scorer_cls.source,
            scorer_cls.device,
            scorer_cls.dtype,
            itm_token="enc",
        )
    auto = blip.ItmScorer(
        scorer_cls.network,
        processor,
        scorer_cls.source,
        scorer_cls.device,
        scorer_cls.dtype,
        itm_token="auto",
    )
    assert auto.itm_token == "cls"


def _processor(path):
    from transformers import BlipProcessor

    return BlipProcessor.from_pretrained(path)


def test_nucleus_captions_depend_only_on_their_seed(captioner, images):
    pixel_values = captioner.image_processor(images=images[:3], return_tensors="pt").pixel_values
    seeds = [11, 12, 21, 22, 31, 32]
    options = dict(prompt=PROMPT, decoding="nucleus", num_captions=2, top_p=0.9, max_length=14)
    together = captioner.generate_captions(pixel_values, row_seeds=seeds, **options)
    one_by_one = [
        captioner.generate_captions(
            pixel_values[i : i + 1], row_seeds=seeds[2 * i : 2 * i + 2], **options
        )[0]
        for i in range(3)
    ]
    assert together == one_by_one
    reversed_order = captioner.generate_captions(
        pixel_values.flip(0),
        row_seeds=[s for i in (2, 1, 0) for s in seeds[2 * i : 2 * i + 2]],
        **options,
    )
    assert reversed_order[::-1] == together
    other = captioner.generate_captions(pixel_values, row_seeds=[s + 100 for s in seeds], **options)
    assert other != together


def test_beam_search_returns_num_captions_per_image(captioner, images):
    pixel_values = captioner.image_processor(images=images[:2], return_tensors="pt").pixel_values
    captions = captioner.generate_captions(
        pixel_values, prompt=PROMPT, decoding="beam", num_captions=2, num_beams=3, max_length=12
    )
    assert [len(c) for c in captions] == [2, 2]
    assert all(isinstance(t, str) for c in captions for t in c)


def test_keyed_nucleus_sampler_draws_inside_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # top_p 0.7 keeps tokens 0 and 1
    rows = 4000
    sampler = blip.KeyedNucleusSampler(0.7, torch.arange(rows, dtype=torch.long))
    scores = probs.log().expand(rows, -1).clone()
    drawn = sampler(torch.zeros(rows, 3, dtype=torch.long), scores).argmax(dim=-1)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / rows - 0.5 / 0.8) < 0.03
    # top_p = 1 keeps every token; a tiny top_p keeps the most likely one only.
    every = blip.KeyedNucleusSampler(1.0, torch.arange(rows))(torch.zeros(rows, 3), scores)
    assert (torch.bincount(every.argmax(-1), minlength=4) > 0).all()
    top = blip.KeyedNucleusSampler(1e-6, torch.arange(rows))(torch.zeros(rows, 3), scores)
    assert (top.argmax(-1) == 0).all()


def test_uniform_hash_is_uniform_and_position_dependent():
    seeds = torch.arange(20000, dtype=torch.long)
    u0, u1 = sampling.uniform_hash(seeds, 4), sampling.uniform_hash(seeds, 5)
    assert 0 <= u0.min() and u0.max() < 1
    assert abs(u0.mean().item() - 0.5) < 0.01
    assert (u0 != u1).float().mean() > 0.99


def test_loading_refuses_pickle_only_checkpoints(tmp_path, tiny_captioner):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_captioner, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CapfiltError, match="only pickled weights.*safetensors"):
        blip.Captioner.load(str(folder), device="cpu")


def test_loading_refuses_the_wrong_head(tiny_filter):
    with pytest.raises(CapfiltError, match="BlipForImageTextRetrieval checkpoint.*caption"):
        blip.Captioner.load(str(tiny_filter), device="cpu")


def test_loading_a_missing_model_says_what_to_pass(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CapfiltError) as error:
        blip.Captioner.load("Salesforce/blip-image-captioning-large", device="cpu")
    message = str(error.value)
    assert "not in the Hugging Face cache" in message
    assert "--model /path/to/checkpoint" in message and "HF_HOME" in message
    with pytest.raises(CapfiltError, match="does not exist"):
        blip.Captioner.load(str(tmp_path / "no-such-dir"), device="cpu")


def test_hub_cache_snapshot_records_the_commit(tmp_path, monkeypatch, tiny_filter):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-itm"
    shutil.copytree(tiny_filter, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = blip.resolve_checkpoint("someone/tiny-itm")
    assert source.revision == commit
    assert source.model_id == "someone/tiny-itm"
    revision = blip.resolve_checkpoint(str(tiny_filter)).revision
    assert revision.startswith("sha256:")  # a hash of the folder's files, not its path
    assert blip.resolve_checkpoint(str(tiny_filter) + "/").revision == revision


def test_precision_and_device():
    cpu = torch.device("cpu")
    assert blip.resolve_dtype("auto", cpu) == torch.float32
    assert blip.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert blip.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(CapfiltError, match="fp16 is not supported on the CPU"):
        blip.resolve_dtype("fp16", cpu)
    with pytest.raises(CapfiltError, match="unknown precision"):
        blip.resolve_dtype("fp8", cpu)
    if not torch.cuda.is_available():
        assert blip.resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(CapfiltError, match="CUDA is not available"):
            blip.resolve_device("cuda")


def test_bf16_captioner_runs(tiny_captioner, images):
    captioner = blip.Captioner.load(str(tiny_captioner), precision="bf16", device="cpu")
    assert next(captioner.network.parameters()).dtype == torch.bfloat16
    pixel_values = captioner.image_processor(images=images[:2], return_tensors="pt").pixel_values
    captions = captioner.generate_captions(
        pixel_values, prompt=PROMPT, num_captions=1, row_seeds=[1, 2], max_length=10
    )
    assert len(captions) == 2
