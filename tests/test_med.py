"""The MED model: parameter sharing, momentum encoders, queues, and the three losses."""

from __future__ import annotations

import pytest
import torch
from conftest import COLORS, SHAPES, draw_scene

from capfilt.models.med import MED, MEDConfig, med_config, sample_hard_negatives
from capfilt.models.shapes import MED_SHARING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_med(tokenizer, seed: int = 0, **overrides) -> MED:
    torch.manual_seed(seed)
    return MED(med_config("tiny", tokenizer, **overrides))


def toy_batch(tokenizer, n: int = 8, seed: int = 0):
    """n random toy scenes with their true captions, as MED inputs."""
    import random

    rng = random.Random(seed)
    return scene_batch(
        tokenizer, [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(n)]
    )


def scene_batch(tokenizer, scenes, size: int = 64):
    from capfilt.training.pairs import to_pixels

    pixels = torch.stack([to_pixels(draw_scene(c, s, size=size)) for c, s in scenes])
    tokens = tokenizer([f"a {c} {s}" for c, s in scenes], padding="longest", return_tensors="pt")
    return pixels, tokens["input_ids"], tokens["attention_mask"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_med(tiny_tokenizer, queue_size=16)


def test_decoder_shares_every_parameter_but_self_attention(model):
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    assert decoder.embeddings.word_embeddings.weight is encoder.embeddings.word_embeddings.weight
    assert (
        decoder.embeddings.position_embeddings.weight
        is encoder.embeddings.position_embeddings.weight
    )
    # The LM head's output matrix is the shared word-embedding matrix.
    assert (
        model.text_decoder.cls.predictions.decoder.weight
        is encoder.embeddings.word_embeddings.weight
    )
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        for name in ("crossattention", "intermediate", "output"):
            enc_params = list(getattr(enc_layer, name).parameters())
            dec_params = list(getattr(dec_layer, name).parameters())
            assert enc_params and all(a is b for a, b in zip(enc_params, dec_params, strict=True))
        enc_self = set(map(id, enc_layer.attention.parameters()))
        dec_self = set(map(id, dec_layer.attention.parameters()))
        assert enc_self and not enc_self & dec_self

    # The only decoder tensors not also in the encoder: self-attention and the LM head transform.
    encoder_ids = {id(p) for p in encoder.parameters()}
    own = [n for n, p in model.text_decoder.named_parameters() if id(p) not in encoder_ids]
    assert own and all(".attention." in n or n.startswith("cls.predictions.") for n in own)


def test_sharing_survives_a_gradient_step(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=16)
    pixels, ids, mask = toy_batch(tiny_tokenizer, 4)
    opt = torch.optim.SGD([p for p in med.parameters() if p.requires_grad], lr=0.1)
    sum(med(pixels, ids, mask, losses=("lm",)).values()).backward()
    before = med.text_encoder.encoder.layer[0].intermediate.dense.weight.clone()
    opt.step()
    # An LM-only step moves the shared FFN, and the encoder sees the move (same tensor).
    after = med.text_encoder.encoder.layer[0].intermediate.dense.weight
    assert not torch.equal(before, after)
    assert after is med.text_decoder.bert.encoder.layer[0].intermediate.dense.weight


def expected_own_keys(med: MED) -> list[str]:
    """The decoder's own state-dict keys by name, as MED_SHARING describes each variant."""
    shared_parts = MED_SHARING[med.config.sharing]

    def own(key: str) -> bool:
        if key.startswith("cls."):  # the LM head: its output matrix is the word embeddings
            return key != "cls.predictions.decoder.weight" or med.config.sharing == "none"
        if key.startswith("bert.embeddings."):
            return med.config.sharing == "none"
        part = key.split(".")[4]  # bert.encoder.layer.<i>.<part>.…
        return part not in shared_parts

    return [k for k in med.text_decoder.state_dict() if own(k)]


@pytest.mark.parametrize("sharing", list(MED_SHARING))
def test_each_sharing_ties_exactly_the_modules_it_names(tiny_tokenizer, sharing):
    med = tiny_med(tiny_tokenizer, queue_size=8, sharing=sharing)
    encoder, decoder = med.text_encoder, med.text_decoder.bert
    assert (decoder.embeddings is encoder.embeddings) == (sharing != "none")
    # The LM head's output matrix is the decoder's word embeddings, whoever owns them.
    lm_out = med.text_decoder.cls.predictions.decoder.weight
    assert lm_out is decoder.embeddings.word_embeddings.weight
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        for part in ("attention", "crossattention", "intermediate", "output"):
            shared = getattr(dec_layer, part) is getattr(enc_layer, part)
            assert shared == (part in MED_SHARING[sharing]), part
            if not shared:  # own modules hold own tensors, none of the encoder's
                enc_ids = set(map(id, getattr(enc_layer, part).parameters()))
                assert not enc_ids & set(map(id, getattr(dec_layer, part).parameters()))
    assert med.decoder_own_keys() == expected_own_keys(med)
    # Every variant has the same state-dict keys: checkpoints and exports differ in values only.
    assert med.state_dict().keys() == tiny_med(tiny_tokenizer, queue_size=8).state_dict().keys()


def test_unique_parameters_fall_as_more_is_shared(tiny_tokenizer):
    models = {s: tiny_med(tiny_tokenizer, queue_size=8, sharing=s) for s in MED_SHARING}
    count = {s: sum(p.numel() for p in m.parameters()) for s, m in models.items()}
    assert count["none"] > count["all-but-ca"] > count["all"]
    assert count["none"] > count["all-but-sa"] > count["all"]
    # What BLIP's decoder owns beyond `all`'s is exactly its self-attention.
    decoder_layers = models["all-but-sa"].text_decoder.bert.encoder.layer
    self_attention = sum(
        p.numel() for layer in decoder_layers for p in layer.attention.parameters()
    )
    assert count["all-but-sa"] - count["all"] == self_attention


def test_base_preset_trains_as_many_parameters_as_blips_table_3(tiny_tokenizer):
    """With BERT's vocabulary, ViT-B/16 MED trains the #params of BLIP's Table 3 per sharing
    (the momentum encoders are not trained); built on the meta device, without memory."""
    from dataclasses import replace

    table_3 = {"all": 224, "all-but-ca": 252, "all-but-sa": 252, "none": 361}  # millions
    for sharing, millions in table_3.items():
        config = med_config("base", tiny_tokenizer, queue_size=8, sharing=sharing)
        config = replace(config, text=dict(config.text, vocab_size=30524))  # BERT + [DEC], [ENC]
        with torch.device("meta"):
            med = MED(config)
        trained = sum(p.numel() for p in med.parameters() if p.requires_grad)
        assert round(trained / 1e6) == millions, sharing


@pytest.mark.parametrize("sharing", list(MED_SHARING))
def test_one_step_trains_encoder_and_decoder_for_each_sharing(tiny_tokenizer, sharing):
    med = tiny_med(tiny_tokenizer, queue_size=16, sharing=sharing)
    pixels, ids, mask = toy_batch(tiny_tokenizer, 4)
    text_modules = (med.text_encoder, med.text_decoder)

    # The LM loss reaches the encoder through the shared modules, and only through them.
    med(pixels, ids, mask, losses=("lm",))["lm"].backward()
    decoder_ids = set(map(id, med.text_decoder.parameters()))
    for name, p in med.text_encoder.named_parameters():
        assert (p.grad is not None) == (id(p) in decoder_ids), name
    med.zero_grad(set_to_none=True)

    losses = med(pixels, ids, mask)
    assert losses.keys() == {"itc", "itm", "lm"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for module in text_modules:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    own = dict(med.text_decoder.named_parameters())["cls.predictions.transform.dense.weight"]
    before = (med.text_encoder.encoder.layer[0].attention.self.query.weight.clone(), own.clone())
    torch.optim.SGD([p for p in med.parameters() if p.requires_grad], lr=0.1).step()
    after = (med.text_encoder.encoder.layer[0].attention.self.query.weight, own)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_a_config_without_sharing_is_blips_and_an_unknown_one_is_refused(tiny_tokenizer):
    stored = med_config("tiny", tiny_tokenizer).to_dict()
    assert stored["sharing"] == "all-but-sa"
    del stored["sharing"]  # a checkpoint saved before the option existed
    assert MEDConfig.from_dict(stored).sharing == "all-but-sa"
    with pytest.raises(ValueError, match="all-but-ca"):
        MEDConfig.from_dict(dict(stored, sharing="half"))


def test_momentum_update_formula(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=16)
    with torch.no_grad():
        for p in med.vision_proj.parameters():
            p.add_(1.0)  # online and momentum differ now
    online = [p.clone() for p in med.vision_proj.parameters()]
    momentum = [p.clone() for p in med.vision_proj_m.parameters()]
    med.momentum_update()
    m = med.config.momentum
    assert m == 0.995
    for p, p_m, new in zip(online, momentum, med.vision_proj_m.parameters(), strict=True):
        torch.testing.assert_close(new, m * p_m + (1 - m) * p)
        assert not new.requires_grad


def test_queue_pointer_wraps_and_holds_the_enqueued_features(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=6)
    first = torch.nn.functional.normalize(torch.randn(4, 256), dim=1)
    second = torch.nn.functional.normalize(torch.randn(4, 256), dim=1)
    med.dequeue_and_enqueue(first, -first)
    assert int(med.queue_ptr) == 4
    torch.testing.assert_close(med.image_queue[:, :4], first.T)
    torch.testing.assert_close(med.text_queue[:, :4], -first.T)
    med.dequeue_and_enqueue(second, -second)
    assert int(med.queue_ptr) == 2  # 4 + 4 wraps around a queue of 6
    torch.testing.assert_close(med.image_queue[:, [4, 5, 0, 1]], second.T)
    torch.testing.assert_close(med.image_queue[:, [2, 3]], first[2:].T)  # not yet overwritten


def test_forward_advances_the_queue_with_momentum_features(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=16)
    pixels, ids, mask = toy_batch(tiny_tokenizer, 4)
    med(pixels, ids, mask, losses=("itc",))
    assert int(med.queue_ptr) == 4
    with torch.no_grad():
        embeds = med.vision_model_m(pixel_values=pixels).last_hidden_state
        expected = torch.nn.functional.normalize(med.vision_proj_m(embeds[:, 0]), dim=-1)
    torch.testing.assert_close(med.image_queue[:, :4], expected.T, atol=1e-5, rtol=1e-4)


def test_temperature_is_clamped(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=16)
    assert med.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        med.temp.fill_(2.0)
    med(*toy_batch(tiny_tokenizer, 2), losses=("itc",))
    assert med.temp.item() == pytest.approx(0.5)


def test_hard_negatives_are_never_the_pair_itself_and_follow_similarity():
    torch.manual_seed(0)
    batch = 5
    # Text i is most similar to image (i + 1) % B, apart from its own image.
    sim = torch.full((batch, batch), -10.0)
    sim.fill_diagonal_(10.0)
    for i in range(batch):
        sim[i, (i + 1) % batch] = 9.0
    hits = 0
    for _ in range(50):
        neg_image, neg_text = sample_hard_negatives(sim, sim)
        assert (neg_image != torch.arange(batch)).all() and (neg_text != torch.arange(batch)).all()
        hits += int((neg_image == (torch.arange(batch) + 1) % batch).sum())
    assert hits > 0.9 * 50 * batch


def test_itm_reads_enc_and_lm_starts_from_dec(tiny_tokenizer, monkeypatch):
    med = tiny_med(tiny_tokenizer, queue_size=16)
    seen = {"encoder": [], "decoder": []}
    encoder_forward, decoder_forward = med.text_encoder.forward, med.text_decoder.forward

    def spy_encoder(*args, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            seen["encoder"].append(kwargs["input_ids"][:, 0].clone())
        return encoder_forward(*args, **kwargs)

    def spy_decoder(*args, **kwargs):
        seen["decoder"].append(kwargs["input_ids"][:, 0].clone())
        return decoder_forward(*args, **kwargs)

    monkeypatch.setattr(med.text_encoder, "forward", spy_encoder)
    monkeypatch.setattr(med.text_decoder, "forward", spy_decoder)
    pixels, ids, mask = toy_batch(tiny_tokenizer, 4)
    assert (ids[:, 0] == tiny_tokenizer.cls_token_id).all()
    med(pixels, ids, mask)
    enc_id = tiny_tokenizer.convert_tokens_to_ids("[ENC]")
    dec_id = tiny_tokenizer.convert_tokens_to_ids("[DEC]")
    assert seen["encoder"] and all((first == enc_id).all() for first in seen["encoder"])
    assert seen["decoder"] and all((first == dec_id).all() for first in seen["decoder"])
    assert (ids[:, 0] == tiny_tokenizer.cls_token_id).all()  # the caller's ids are untouched


def test_lm_loss_smooths_labels_and_ignores_padding_and_prompt(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=16).eval()
    pixels, ids, mask = toy_batch(tiny_tokenizer, 3)
    loss = med(pixels, ids, mask, losses=("lm",))["lm"]

    # The reference: transformers' own BLIP decoder loss (label smoothing 0.1, -100 ignored).
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = tiny_tokenizer.convert_tokens_to_ids("[DEC]")
    labels = decoder_ids.masked_fill(decoder_ids == tiny_tokenizer.pad_token_id, -100)
    embeds = med.vision_model(pixel_values=pixels).last_hidden_state
    reference = med.text_decoder(
        input_ids=decoder_ids, attention_mask=mask, encoder_hidden_states=embeds, labels=labels
    ).loss
    assert med.text_decoder.label_smoothing == 0.1
    torch.testing.assert_close(loss, reference)

    # Extra padding changes nothing: padded positions carry no loss.
    pad = torch.full((3, 4), tiny_tokenizer.pad_token_id)
    padded = med(
        pixels,
        torch.cat([ids, pad], 1),
        torch.cat([mask, torch.zeros_like(pad)], 1),
        losses=("lm",),
    )["lm"]
    torch.testing.assert_close(padded, loss, atol=1e-5, rtol=1e-5)

    # With the prompt ignored, only later tokens count: the loss moves.
    prompted = med(pixels, ids, mask, losses=("lm",), prompt_length=2)["lm"]
    assert not torch.isclose(prompted, loss)


def test_each_loss_is_finite_and_falls_on_toy_data(tiny_tokenizer):
    # Two batches of six different scenes each, so that the queue (one batch long) never
    # holds a copy of a positive pair as a negative.
    scenes = [(c, s) for c in COLORS for s in SHAPES]
    med = tiny_med(tiny_tokenizer, seed=1, queue_size=6)
    batches = [scene_batch(tiny_tokenizer, scenes[:6]), scene_batch(tiny_tokenizer, scenes[6:])]
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for step in range(40):
        terms = med(*batches[step % 2], alpha=0.4)
        assert all(torch.isfinite(v) for v in terms.values())
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v.item() for k, v in terms.items()})
    for name in ("itc", "itm", "lm"):
        first = sum(h[name] for h in history[:4]) / 4
        last = sum(h[name] for h in history[-4:]) / 4
        assert last < 0.9 * first, f"{name} did not fall: {first:.3f} → {last:.3f}"


def test_fused_attention_gives_transformers_eager_losses_and_gradients(tiny_tokenizer):
    """SDPA in the vision encoder, text encoder (padding mask), cross-attention and decoder
    (causal mask) is the same computation as transformers' eager attention."""
    from capfilt.models.med import use_fused_attention

    config = med_config("tiny", tiny_tokenizer, queue_size=16)
    results = []
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        med = MED(config, attention=attention)
        fused = type(med.vision_model.encoder.layers[0].self_attn).__name__.startswith("Sdpa")
        assert fused == (attention == "sdpa")
        # Texts of different lengths, so padding masks matter.
        pixels, ids, mask = scene_batch(
            tiny_tokenizer, [("red", "circle"), ("blue", "square"), ("green", "triangle")]
        )
        ids = torch.cat([ids, ids[:, -1:].clone().fill_(tiny_tokenizer.pad_token_id)], dim=1)
        mask = torch.cat([mask, torch.zeros_like(mask[:, -1:])], dim=1)
        torch.manual_seed(1)  # the same hard negatives on both sides
        losses = med(pixels, ids, mask)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in med.named_parameters() if p.grad is not None}
        results.append((losses, grads, med))
    (eager_losses, eager_grads, eager), (sdpa_losses, sdpa_grads, sdpa) = results
    for name in ("itc", "itm", "lm"):
        assert torch.allclose(eager_losses[name], sdpa_losses[name], atol=1e-5), name
    assert eager_grads.keys() == sdpa_grads.keys() and len(eager_grads) > 50
    for name, grad in eager_grads.items():
        assert torch.allclose(grad, sdpa_grads[name], atol=1e-5, rtol=1e-4), name
    # The swap keeps every state-dict key, so checkpoints are interchangeable.
    assert eager.state_dict().keys() == sdpa.state_dict().keys()
    assert use_fused_attention(eager) is eager
    assert type(eager.text_decoder.bert.encoder.layer[0].attention.self).__name__.startswith("Sdpa")
    # Momentum encoders are copies made after the swap: fused too.
    assert type(sdpa.text_encoder_m.encoder.layer[0].attention.self).__name__.startswith("Sdpa")


def test_queue_pointer_wraps_on_the_device(tiny_tokenizer):
    med = tiny_med(tiny_tokenizer, queue_size=8)
    feats = torch.nn.functional.normalize(torch.randn(5, med.config.embed_dim), dim=-1)
    med.dequeue_and_enqueue(feats, feats)
    assert int(med.queue_ptr) == 5
    med.dequeue_and_enqueue(feats, feats)
    assert int(med.queue_ptr) == 2  # 10 mod 8
    assert torch.allclose(med.image_queue[:, 0:2], feats[3:5].T)
    assert torch.allclose(med.image_queue[:, 5:8], feats[0:3].T)


def test_compiled_layers_train_like_eager_ones(tiny_tokenizer):
    """compile_layers traces each layer (forward and backward) and changes no result; the
    aot_eager backend checks the tracing without paying for code generation."""
    from capfilt.models.med import compile_layers

    config = med_config("tiny", tiny_tokenizer, queue_size=16)
    pixels, ids, mask = toy_batch(tiny_tokenizer, n=6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        med = MED(config)
        keys = list(med.state_dict())
        if compiled:
            assert compile_layers(med, backend="aot_eager") == 10  # 2 layers x 5 stacks
            assert list(med.state_dict()) == keys
        torch.manual_seed(1)
        losses = med(pixels, ids, mask)
        sum(losses.values()).backward()
        grad = med.vision_model.encoder.layers[0].self_attn.qkv.weight.grad.clone()
        results.append((losses, grad))
    (eager, eager_grad), (compiled, compiled_grad) = results
    for name in ("itc", "itm", "lm"):
        assert torch.allclose(eager[name], compiled[name], atol=1e-5), name
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-5)


def test_a_training_step_builds_its_masks_without_asking_the_device(tiny_tokenizer, monkeypatch):
    """transformers' mask helpers first ask whether every token is visible (`mask.all()`, a
    host sync on a GPU), four times a step; MED hands them finished additive masks, equal to
    theirs, so that question is never asked."""
    import transformers.masking_utils as masking

    model = tiny_med(tiny_tokenizer, queue_size=16)
    pixels, _, _ = toy_batch(tiny_tokenizer, n=4)
    texts = ["a red circle", "a blue square on a green circle", "a circle", "a red square"]
    tokens = tiny_tokenizer(texts, padding="longest", return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert not mask.all()  # padding in the batch: the masks matter
    expected = {
        "padding": masking.create_bidirectional_mask(
            config=model.text_encoder.config,
            inputs_embeds=torch.zeros(4, ids.shape[1], 8),
            attention_mask=mask,
        ),
        "causal": masking.create_causal_mask(
            config=model.text_encoder.config,
            inputs_embeds=torch.zeros(4, ids.shape[1], 8),
            attention_mask=mask,
            cache=None,
        ),
    }
    for name, causal in (("padding", False), ("causal", True)):
        theirs = expected[name]  # (B, 1, T, T)
        if theirs.dtype == torch.bool:  # sdpa's boolean form: True where visible
            theirs = torch.zeros(theirs.shape).masked_fill(~theirs, torch.finfo(torch.float32).min)
        ours = model.additive_mask(mask, causal=causal).expand_as(theirs)  # broadcasts so
        assert torch.equal(ours, theirs), name

    def no_building(*args, **kwargs):
        raise AssertionError("transformers built a mask (and synchronised with the host)")

    monkeypatch.setattr(masking, "sdpa_mask", no_building)
    monkeypatch.setattr(masking, "eager_mask", no_building)
    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", no_building)
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", no_building)
    terms = model(pixels, ids, mask)
    assert set(terms) == {"itc", "itm", "lm"}
    sum(terms.values()).backward()
