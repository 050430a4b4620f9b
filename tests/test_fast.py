"""The fast BLIP path against plain transformers on the same tiny weights (fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from capfilt.core.errors import CapfiltError
from capfilt.models.fast import (
    FastCaptioner,
    FastItm,
    OomBackoff,
    decoder_prompt_ids,
    nucleus_candidates,
    process_logits,
)


@pytest.fixture(scope="module")
def captioner_model(tiny_captioner):
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration.from_pretrained(tiny_captioner).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sharpen(model, scale: float = 0.15):
    """Larger random weights, so that images and texts change the outputs of a tiny model."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "word_embeddings" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def sharp_captioner(tiny_captioner):
    """The tiny captioner sharpened: images change its captions, and an [SEP] bias can end
    some captions early while others run on."""
    from transformers import BlipForConditionalGeneration

    return sharpen(BlipForConditionalGeneration.from_pretrained(tiny_captioner).eval())


@pytest.fixture(scope="module")
def filter_model(tiny_filter):
    """The tiny filter sharpened, so ITM probabilities spread over (0, 1)."""
    from transformers import BlipForImageTextRetrieval

    return sharpen(BlipForImageTextRetrieval.from_pretrained(tiny_filter).eval())


def pixels(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- captioning ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_greedy_matches_generate_with_prompt_and_lengths(captioner_model, tiny_tokenizer, prompt):
    pv = pixels(3)
    input_ids = tiny_tokenizer([prompt] * 3, return_tensors="pt").input_ids if prompt else None
    options = dict(max_length=16, min_length=6, do_sample=False, repetition_penalty=1.3)
    with torch.inference_mode():
        expected = captioner_model.generate(pixel_values=pv, input_ids=input_ids, **options)
    prompt_ids = decoder_prompt_ids(tiny_tokenizer, prompt) if prompt else None
    got = FastCaptioner(captioner_model).generate(pv, prompt_ids=prompt_ids, **options)
    assert torch.equal(got, expected)
    # max_length counts the prompt, as in generate: [DEC] + prompt + new tokens = 16
    assert got.shape[1] == 16
    if prompt:
        assert got[0, : len(prompt_ids)].tolist() == prompt_ids.tolist()


def test_greedy_matches_generate_when_captions_end_at_different_steps(sharp_captioner):
    """[SEP] ends rows at different steps; min_length holds it back; the output is as long as
    the longest caption and ended rows are padded, exactly like generate's."""
    eos = sharp_captioner.config.text_config.sep_token_id
    bias = sharp_captioner.text_decoder.cls.predictions.bias
    fast = FastCaptioner(sharp_captioner, sync_every=3)
    mixed = False
    for eos_bias in (0.2, 0.3, 1.0):
        with torch.no_grad():
            bias[eos] = eos_bias
        pv = pixels(6, seed=1)
        for lengths in (dict(max_length=16, min_length=3), dict(max_new_tokens=12)):
            with torch.inference_mode():
                expected = sharp_captioner.generate(pixel_values=pv, do_sample=False, **lengths)
            got = fast.generate(pv, do_sample=False, **lengths)
            assert torch.equal(got, expected), (eos_bias, lengths)
            ended = (got == eos).any(dim=1)
            mixed |= bool(ended.any() and not ended.all())
    with torch.no_grad():
        bias[eos] = 0.0
    assert mixed, "no case had some captions ended and others running"


def test_min_new_tokens_holds_back_sep(sharp_captioner):
    eos = sharp_captioner.config.text_config.sep_token_id
    bias = sharp_captioner.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias[eos] = 5.0  # [SEP] wins as soon as it is allowed
    try:
        ids = FastCaptioner(sharp_captioner).generate(
            pixels(2), do_sample=False, max_new_tokens=10, min_new_tokens=4
        )
    finally:
        with torch.no_grad():
            bias[eos] = 0.0
    assert ids.shape == (2, 1 + 5)  # [DEC], 4 tokens, then [SEP]
    assert (ids[:, 5] == eos).all() and not (ids[:, :5] == eos).any()


def test_sampling_is_reproducible_with_a_generator(captioner_model):
    fast = FastCaptioner(captioner_model)
    pv = pixels(2)
    options = dict(num_captions=4, max_new_tokens=12, top_p=0.9, repetition_penalty=1.1)

    def sample(seed):
        return fast.generate(pv, generator=torch.Generator().manual_seed(seed), **options)

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape[0] == 2 * 4
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) > 1  # the samples of an image differ


def test_seeded_sampling_does_not_depend_on_the_batch(captioner_model):
    fast = FastCaptioner(captioner_model)
    pv = pixels(3)
    seeds = torch.tensor([11, 22, 33])
    options = dict(num_captions=2, max_new_tokens=10, min_new_tokens=10, top_p=0.95)
    together = fast.generate(pv, seeds=seeds, **options)
    alone = fast.generate(pv[1:2], seeds=seeds[1:2], **options)
    assert torch.equal(together[2:4], alone)
    assert not torch.equal(together[0:2], together[2:4])


def test_tiny_top_p_is_greedy(captioner_model):
    fast = FastCaptioner(captioner_model)
    pv = pixels(3)
    options = dict(max_new_tokens=12, repetition_penalty=1.2)
    greedy = fast.generate(pv, do_sample=False, **options)
    nucleus = fast.generate(
        pv,
        do_sample=True,
        top_p=1e-6,
        num_captions=2,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    assert torch.equal(nucleus, greedy.repeat_interleave(2, dim=0))


def test_keyed_sampler_of_the_caption_stage_gives_the_same_captions(tiny_captioner):
    """The caption stage's per-caption seeded nucleus sampler, run inside the fast loop, gives
    exactly the captions of the stage's transformers path."""
    from capfilt.models.blip import Captioner, KeyedNucleusSampler

    captioner = Captioner.load(str(tiny_captioner), "fp32", "cpu", engine="hf")
    pv = pixels(3)
    seeds = list(range(100, 106))
    options = dict(min_length=5, max_length=18, repetition_penalty=1.1)
    expected = captioner.generate_ids(
        pv, prompt="a picture of ", num_captions=2, top_p=0.9, row_seeds=seeds, **options
    )
    got = FastCaptioner(captioner.network).generate(
        pv,
        num_captions=2,
        prompt_ids=captioner.prompt_ids("a picture of ")[0],
        do_sample=False,
        logits_processor=[KeyedNucleusSampler(0.9, torch.tensor(seeds))],
        **options,
    )
    assert torch.equal(got, expected)


def test_logit_processing_matches_generate_processors():
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=generator) * 3
    input_ids = torch.randint(0, 300, (5, 7), generator=generator)
    eos = 3
    seen = torch.zeros(5, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = process_logits(
        logits, seen=seen, block_eos=True, eos_token_id=eos, repetition_penalty=1.3
    )
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone())
    theirs = MinLengthLogitsProcessor(10, eos)(input_ids, theirs)
    assert torch.allclose(ours, theirs)
    for top_k, top_p in [(50, 0.9), (0, 0.9), (20, 1.0), (300, 0.5)]:
        expected = theirs
        if top_k:
            expected = TopKLogitsWarper(top_k)(input_ids, expected)
        expected = TopPLogitsWarper(top_p)(input_ids, expected) if top_p < 1 else expected
        values, ids = nucleus_candidates(ours, top_k, top_p)
        got = torch.full_like(ours, -math.inf).scatter(1, ids, values)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (top_k, top_p)
        kept = ~torch.isinf(expected)
        assert torch.allclose(got[kept], expected[kept])


def test_sampling_follows_the_distribution():
    from capfilt.models.fast import _choose

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, -1)
    counts = []
    for noise in ("generator", "seeds"):
        chosen = _choose(
            logits,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            generator=torch.Generator().manual_seed(0),
            row_seeds=torch.arange(20000) if noise == "seeds" else None,
            step=0,
        )
        counts.append(torch.bincount(chosen, minlength=4).float() / 20000)
    for frequency in counts:
        assert torch.allclose(frequency, probs, atol=0.015), frequency


def test_generate_refuses_lengths_past_the_model(captioner_model):
    fast = FastCaptioner(captioner_model)
    limit = captioner_model.config.text_config.max_position_embeddings
    with pytest.raises(CapfiltError, match="positions"):
        fast.generate(pixels(1), max_new_tokens=limit + 1)
    with pytest.raises(CapfiltError, match="no room"):
        fast.generate(pixels(1), prompt_ids=torch.tensor([5, 6, 7]), max_length=3)


# --- ITM and ITC -----------------------------------------------------------------------------


TEXTS = [
    "a red circle",
    "a photo of a blue square on a white background",
    "a green triangle",
    "jpg",
    "a yellow circle on a white background",
    "a picture of a red square",
    "web image dsc file",
]
# Several captions per image, uneven counts, not sorted by image.
IMAGE_INDEX = [0, 0, 2, 1, 2, 0, 2]


def _encoded(tokenizer):
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (encoded.attention_mask == 0).any()  # padding is exercised
    return encoded.input_ids, encoded.attention_mask


def test_itm_matches_blip_for_image_text_retrieval(filter_model, tiny_tokenizer):
    ids, mask = _encoded(tiny_tokenizer)
    pv = pixels(3, seed=4)
    index = torch.tensor(IMAGE_INDEX)
    with torch.inference_mode():
        out = filter_model(input_ids=ids, pixel_values=pv[index], attention_mask=mask)
        expected = out.itm_score.softmax(dim=-1)[:, 1]
    fast = FastItm(filter_model)
    got = fast.itm(fast.encode_images(pv), index, ids, mask)
    assert expected.std() > 0.05  # the probabilities are not all about 0.5
    assert torch.allclose(got, expected, atol=1e-4)


def test_itc_matches_blip_for_image_text_retrieval(filter_model, tiny_tokenizer):
    ids, mask = _encoded(tiny_tokenizer)
    pv = pixels(3, seed=5)
    index = torch.tensor(IMAGE_INDEX)
    with torch.inference_mode():
        sim = filter_model(
            input_ids=ids, pixel_values=pv[index], attention_mask=mask, use_itm_head=False
        ).itm_score
    fast = FastItm(filter_model)
    got = fast.itc(fast.encode_images(pv), index, ids, mask)
    assert torch.allclose(got, sim.diagonal(), atol=1e-4)


def test_itm_of_a_text_does_not_depend_on_the_other_texts(filter_model, tiny_tokenizer):
    ids, mask = _encoded(tiny_tokenizer)
    fast = FastItm(filter_model)
    embeds = fast.encode_images(pixels(3, seed=6))
    index = torch.tensor(IMAGE_INDEX)
    together = fast.itm(embeds, index, ids, mask)
    alone = fast.itm(embeds, index[3:4], ids[3:4], mask[3:4])
    assert torch.allclose(together[3:4], alone, atol=1e-5)


def test_vision_matches_the_vision_model(filter_model):
    pv = pixels(2, seed=7)
    with torch.inference_mode():
        expected = filter_model.vision_model(pixel_values=pv).last_hidden_state
    got = FastItm(filter_model).encode_images(pv)
    assert torch.allclose(got, expected, atol=1e-5)


def test_bf16_runs_close_to_fp32(filter_model, tiny_tokenizer):
    import copy

    ids, mask = _encoded(tiny_tokenizer)
    pv = pixels(3, seed=8)
    index = torch.tensor(IMAGE_INDEX)
    fp32 = FastItm(filter_model)
    bf16 = FastItm(copy.deepcopy(filter_model).to(torch.bfloat16))
    expected = fp32.itm(fp32.encode_images(pv), index, ids, mask)
    got = bf16.itm(bf16.encode_images(pv), index, ids, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.1)


# --- batch size under memory pressure --------------------------------------------------------


def test_oom_backoff_halves_the_batch_and_keeps_order():
    calls = []

    def work(start, stop):
        calls.append((start, stop))
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(start, stop))

    backoff = OomBackoff(batch_size=16)
    results = backoff.map(work, 10)
    assert [x for chunk in results for x in chunk] == list(range(10))
    assert backoff.batch_size == 2  # 16 -> 8 -> 4 -> 2, kept for later batches
    assert calls[:4] == [(0, 10), (0, 8), (0, 4), (0, 2)]


def test_oom_backoff_gives_up_at_the_minimum_and_passes_other_errors():
    def always_oom(start, stop):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    with pytest.raises(CapfiltError, match="out of memory even at batch size 1"):
        OomBackoff(batch_size=4).map(always_oom, 8)

    def broken(start, stop):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        OomBackoff(batch_size=4).map(broken, 8)


def test_itm_of_no_texts_is_empty(filter_model):
    fast = FastItm(filter_model)
    embeds = fast.encode_images(pixels(2, seed=9))
    empty = torch.zeros((0, 5), dtype=torch.long)
    assert fast.itm(embeds, torch.zeros(0, dtype=torch.long), empty, empty).shape == (0,)
