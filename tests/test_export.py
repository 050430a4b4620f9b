"""Weights move both ways: HF BLIP → MED → `capfilt export` → HF BLIP gives the same outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import draw_scene

from capfilt.models.med import MED, SHARING_CONFIG_KEY, med_config, med_config_from_blip
from capfilt.models.shapes import MED_SHARING
from capfilt.training.export import write_blip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_hf(folder, kind):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    return cls.from_pretrained(str(folder), use_safetensors=True).eval()


def processor_inputs(folder, texts):
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(str(folder))
    images = [draw_scene("red", "circle"), draw_scene("blue", "square")]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def test_captioner_round_trip_generates_the_same_ids(tiny_captioner, tiny_tokenizer, tmp_path):
    original = load_hf(tiny_captioner, "captioner")
    med = MED(med_config_from_blip(original.config, tiny_tokenizer, queue_size=8))
    med.load_blip(captioner=original)
    written = write_blip(med, tiny_tokenizer, tmp_path / "export", kinds=("captioner",))
    exported = load_hf(written["captioner"], "captioner")

    inputs = processor_inputs(written["captioner"], ["a picture of", "a picture of"])
    with torch.no_grad():
        want = original.generate(
            pixel_values=inputs["pixel_values"], max_new_tokens=8, min_new_tokens=8
        )
        got = exported.generate(
            pixel_values=inputs["pixel_values"], max_new_tokens=8, min_new_tokens=8
        )
        torch.manual_seed(3)
        want_sampled = original.generate(
            pixel_values=inputs["pixel_values"], do_sample=True, top_p=0.9, max_new_tokens=8
        )
        torch.manual_seed(3)
        got_sampled = exported.generate(
            pixel_values=inputs["pixel_values"], do_sample=True, top_p=0.9, max_new_tokens=8
        )
        want_logits = original(**inputs).logits
        got_logits = exported(**inputs).logits
    assert torch.equal(want, got)
    assert torch.equal(want_sampled, got_sampled)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    # Generation starts from [DEC], the tokenizer's BOS, in the exported config too.
    assert exported.config.text_config.bos_token_id == tiny_tokenizer.convert_tokens_to_ids("[DEC]")
    assert (got[:, 0] == exported.config.text_config.bos_token_id).all()
    # Only safetensors, with a processor that loads back.
    names = {p.name for p in written["captioner"].iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)


def test_filter_round_trip_gives_the_same_itm_logits(tiny_filter, tiny_tokenizer, tmp_path):
    original = load_hf(tiny_filter, "filter")
    med = MED(med_config_from_blip(original.config, tiny_tokenizer, queue_size=8)).eval()
    med.load_blip(filter=original)
    written = write_blip(med, tiny_tokenizer, tmp_path / "export", kinds=("filter",))
    exported = load_hf(written["filter"], "filter")

    inputs = processor_inputs(written["filter"], ["a red circle", "a red circle on white"])
    with torch.no_grad():
        for use_itm_head in (True, False):
            want = original(**inputs, use_itm_head=use_itm_head).itm_score
            got = exported(**inputs, use_itm_head=use_itm_head).itm_score
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # MED's own ITM path swaps in [ENC]; HF reads whatever comes first.
        enc_ids = inputs["input_ids"].clone()
        enc_ids[:, 0] = tiny_tokenizer.convert_tokens_to_ids("[ENC]")
        want = original(
            input_ids=enc_ids,
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
        ).itm_score
        got = med.itm_logits(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", list(MED_SHARING))
def test_med_to_both_and_back_keeps_every_weight(tiny_tokenizer, tmp_path, sharing):
    """A trained-looking MED (the decoder's own weights differ from the encoder's) survives
    export + init, its sharing recorded in each exported config.json."""
    import json

    torch.manual_seed(0)
    med = MED(med_config("tiny", tiny_tokenizer, queue_size=8, sharing=sharing))
    written = write_blip(med, tiny_tokenizer, tmp_path / "export")
    for folder in written.values():
        config = json.loads((folder / "config.json").read_text())
        assert config[SHARING_CONFIG_KEY] == sharing
    back = MED(
        med_config_from_blip(
            load_hf(written["filter"], "filter").config, tiny_tokenizer, queue_size=8
        )
    )
    assert back.config.sharing == sharing
    back.load_blip(
        captioner=load_hf(written["captioner"], "captioner"),
        filter=load_hf(written["filter"], "filter"),
    )
    skip = ("_m.", "queue")  # momentum encoders and queues are training state, not exported
    want = {k: v for k, v in med.state_dict().items() if not any(s in k for s in skip)}
    got = back.state_dict()
    assert want.keys() <= got.keys()
    for key, value in want.items():
        if key == "temp":
            continue  # the learned temperature has no place in HF BLIP
        torch.testing.assert_close(got[key], value, msg=key)
    # The momentum encoders start equal to the loaded online encoders.
    for p, p_m in zip(
        back.vision_model.parameters(), back.vision_model_m.parameters(), strict=True
    ):
        assert torch.equal(p, p_m)


def test_released_blip_loads_into_every_sharing(tiny_captioner, tiny_filter, tiny_tokenizer):
    """A BLIP pair without a recorded sharing is BLIP's; any sharing can still load it: the
    filter gives the encoder, the captioner what the decoder owns, and a missing side's own
    weights start as copies of the other's."""
    captioner, itm = load_hf(tiny_captioner, "captioner"), load_hf(tiny_filter, "filter")
    assert med_config_from_blip(itm.config, tiny_tokenizer).sharing == "all-but-sa"
    filter_text = itm.text_encoder.state_dict()
    captioner_text = captioner.text_decoder.state_dict()
    for sharing in MED_SHARING:
        for given in ("both", "captioner", "filter"):
            med = MED(med_config_from_blip(itm.config, tiny_tokenizer, sharing=sharing))
            med.load_blip(
                captioner=captioner if given != "filter" else None,
                filter=itm if given != "captioner" else None,
            )
            encoder = med.text_encoder.state_dict()
            decoder = med.text_decoder.state_dict()
            own = med.decoder_own_keys()
            if given == "captioner":  # the encoder is a copy of the decoder
                want = {k: captioner_text[f"bert.{k}"] for k in encoder}
            else:
                want = filter_text
            torch.testing.assert_close(encoder, want, atol=0, rtol=0, msg=sharing)
            for key in own:
                if given == "filter":  # the decoder's own text weights: copies of the encoder's
                    if key.startswith("bert."):
                        assert torch.equal(decoder[key], filter_text[key[len("bert.") :]]), key
                else:
                    assert torch.equal(decoder[key], captioner_text[key]), (sharing, key)


def test_export_refuses_to_overwrite_without_the_flag(tiny_tokenizer, tmp_path):
    from capfilt.core.errors import CapfiltError

    med = MED(med_config("tiny", tiny_tokenizer, queue_size=8))
    write_blip(med, tiny_tokenizer, tmp_path, kinds=("filter",))
    with pytest.raises(CapfiltError, match="--overwrite"):
        write_blip(med, tiny_tokenizer, tmp_path, kinds=("filter",))
    write_blip(med, tiny_tokenizer, tmp_path, kinds=("filter",), overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
