"""The fast BLIP path: the same Hugging Face weights, run with fused attention and less waste.

Plain transformers runs BLIP with eager attention, recomputes the image's cross-attention keys
and values for every sampled caption and every scored text, and drives decoding through the
generic `generate` loop. This module reads the weights of the HF modules in place (it calls
their Linear/LayerNorm/Embedding submodules; no parameter is copied) and runs:

- `scaled_dot_product_attention` everywhere (flash / memory-efficient kernels on GPU);
- each image through the vision encoder once, and each image's cross-attention keys/values
  once per layer, shared by all captions of that image: the queries of an image's captions are
  stacked into one query sequence against the image's keys, which are never expanded or copied;
- captioning with a preallocated static KV cache, prompt prefill once per image, and a decoding
  loop without host synchronisation per token (the all-finished check runs every
  `sync_every` steps);
- nucleus / top-k sampling, repetition penalty, min length and greedy decoding with the same
  semantics as `generate` (top-k/top-p work on the top-k candidates, not the whole vocabulary),
  reproducible with a `torch.Generator` or batch-invariant with a seed per image;
- on GPU, optionally each decode step replayed as a CUDA graph, or torch.compile'd.

API (all methods run under `torch.inference_mode`, in the model's dtype and device):

    cap = FastCaptioner(blip_for_conditional_generation, cuda_graphs=False, compile=False)
    image_embeds = cap.encode_images(pixel_values)                 # (B, N, Dv)
    ids = cap.generate(pixel_values,                               # or image_embeds=...
                       num_captions=3, max_new_tokens=20, min_new_tokens=5,
                       do_sample=True, top_p=0.9, top_k=50, repetition_penalty=1.0,
                       prompt_ids=decoder_prompt_ids(tokenizer, "a picture of "),
                       generator=torch.Generator().manual_seed(0))  # (B*3, T), image-major
    # ids start with the prompt ([DEC] ...), like BlipForConditionalGeneration.generate; rows
    # that ended are padded with pad_token_id. max_length/min_length (HF semantics: the prompt
    # counts) may be given instead of max_new_tokens/min_new_tokens. `seeds=` (one per image
    # or per caption) instead of `generator=` makes samples independent of the batch;
    # `logits_processor=`
    # takes generate-style processors (e.g. a keyed sampler, with do_sample=False).

    itm = FastItm(blip_for_image_text_retrieval)
    image_embeds = itm.encode_images(pixel_values)                 # (B, N, Dv)
    probs = itm.itm(image_embeds, image_index, input_ids, attention_mask)   # (M,) P(match)
    cosine = itm.itc(image_embeds, image_index, input_ids, attention_mask)  # (M,)
    # image_index (M,) says which image each of the M texts belongs to; the first token of
    # input_ids is used as given ([CLS] as transformers does, or [ENC] as BLIP trained ITM).
    text_feats = itm.text_features(input_ids, attention_mask)      # (M, E), unit norm
    image_feats = itm.image_features(image_embeds)                 # (B, E), unit norm

    results = OomBackoff(batch_size=512).map(lambda start, stop: work(start, stop), n_items)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from capfilt.core.errors import CapfiltError
from capfilt.models.sampling import caption_row_seeds, image_row_seeds, seeded_exponential


def decoder_prompt_ids(tokenizer, prompt: str | None) -> torch.Tensor:
    """The decoder input for `prompt`, built as BlipForConditionalGeneration.generate does.

    The processor's ids `[CLS] prompt [SEP]` become `[DEC] prompt`: the first token is replaced
    by the decoder's BOS and the trailing `[SEP]` is dropped. Returns a 1-D LongTensor (P,).
    """
    ids = tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
    bos = tokenizer.convert_tokens_to_ids("[DEC]")
    if bos is None or bos == tokenizer.unk_token_id:
        bos = tokenizer.bos_token_id
    return torch.tensor([bos, *ids[1:-1]], dtype=torch.long)


# --- attention building blocks -------------------------------------------------------------


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # (B, H, T, d)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, T, D)


def _text_self_attention(attention, x, key_mask=None, first_only: bool = False):
    """A BlipTextAttention block (self-attention + output dense/LayerNorm) without a cache.

    `first_only`: the output of the first position only (M, 1, D), which still attends to
    every position; each position's output depends on its own query alone, so it is the same.
    """
    sa = attention.self
    heads = sa.num_attention_heads
    queries = x[:, :1] if first_only else x
    q = _split_heads(sa.query(queries), heads)
    k = _split_heads(sa.key(x), heads)
    v = _split_heads(sa.value(x), heads)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    return attention.output(_merge_heads(context), queries)


def _cross_kv(attention, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the image for one cross-attention block: each (B, H, N, d)."""
    sa = attention.self
    heads = sa.num_attention_heads
    return _split_heads(sa.key(image_embeds), heads), _split_heads(sa.value(image_embeds), heads)


def _grouped_cross_attention(attention, x: torch.Tensor, kv, group: int) -> torch.Tensor:
    """Cross-attention where each run of `group` rows of `x` shares one image's keys/values.

    The image attention mask is all ones, so stacking the queries of an image's `group` texts
    into one sequence of length group*T gives exactly the per-text result while the keys and
    values are read once per image instead of being expanded per text.
    """
    sa = attention.self
    rows, length, width = x.shape
    images = rows // group
    k, v = kv  # (images, H, N, d)
    q = sa.query(x).view(images, group * length, sa.num_attention_heads, -1).transpose(1, 2)
    context = F.scaled_dot_product_attention(q, k, v)  # (images, H, group*T, d)
    context = context.transpose(1, 2).reshape(rows, length, width)
    return attention.output(context, x)


class FastVision:
    """BlipVisionModel's forward with fused attention, reading the module's weights in place."""

    def __init__(self, vision_model):
        self.model = vision_model
        self.num_heads = vision_model.config.num_attention_heads

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.embeddings(pixel_values)  # (B, N, D), N = patches + 1
        batch, tokens, width = x.shape
        for layer in model.encoder.layers:
            h = layer.layer_norm1(x)
            qkv = layer.self_attn.qkv(h).view(batch, tokens, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
            context = F.scaled_dot_product_attention(q, k, v)
            x = x + layer.self_attn.projection(_merge_heads(context))
            x = x + layer.mlp(layer.layer_norm2(x))
        return model.post_layernorm(x)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


# --- sampling ------------------------------------------------------------------------------


def process_logits(
    logits: torch.Tensor,
    *,
    seen: torch.Tensor | None,
    block_eos: bool,
    eos_token_id: int,
    repetition_penalty: float,
    temperature: float = 1.0,
    logits_processor=(),
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logit processors of `generate` before its sampling warpers, as tensor ops.

    In `generate`'s order: repetition penalty (over every token already in the row, the prompt
    included) → min length (EOS blocked) → the caller's `logits_processor`s, called as
    `generate` calls them with the ids so far → temperature. No host synchronisation.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalty = repetition_penalty
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    if block_eos:
        logits[:, eos_token_id] = -math.inf
    for processor in logits_processor:
        logits = processor(input_ids, logits)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def nucleus_candidates(
    logits: torch.Tensor, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p filtering as `generate` does it, on the candidates only.

    Returns (candidate logits (R, K), their token ids (R, K)), ascending, with the tokens
    outside the nucleus at -inf. Working on the k candidates instead of the whole vocabulary
    turns a sort of 30k logits per row and step into a top-k.
    """
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        values, ids = torch.topk(logits, top_k, dim=-1, sorted=True)  # descending
        values, ids = values.flip(-1), ids.flip(-1)
    else:
        values, ids = torch.sort(logits, dim=-1)
    if top_p < 1.0:
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1.0 - top_p)
        remove[:, -1] = False  # the most likely token always stays
        values = values.masked_fill(remove, -math.inf)
    return values, ids


def _choose(logits, *, do_sample, top_k, top_p, generator, row_seeds, step) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    values, ids = nucleus_candidates(logits, top_k, top_p)
    probs = values.softmax(dim=-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), draws from p without torch.multinomial's
    # host synchronisation, and lets seeded noise make sampling batch-invariant.
    if row_seeds is not None:
        noise = seeded_exponential(row_seeds, step, ids)
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return ids.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)


# --- captioning ----------------------------------------------------------------------------


class FastCaptioner:
    """Caption generation for a BlipForConditionalGeneration, reading its weights in place."""

    def __init__(
        self, model, *, sync_every: int = 8, compile: bool = False, cuda_graphs: bool = False
    ):
        self.model = model.eval()
        self.decoder = model.text_decoder
        self.bert = model.text_decoder.bert
        self.layers = list(self.bert.encoder.layer)
        text_config = model.config.text_config
        self.num_heads = text_config.num_attention_heads
        self.head_dim = text_config.hidden_size // text_config.num_attention_heads
        self.bos_token_id = text_config.bos_token_id
        self.eos_token_id = text_config.sep_token_id  # generate stops on [SEP]
        self.pad_token_id = text_config.pad_token_id
        self.max_positions = text_config.max_position_embeddings
        self.vision = FastVision(model.vision_model)
        self.sync_every = max(1, sync_every)
        self._step = self._decode
        device, _ = _model_device_dtype(model)
        # GPU only: on small decode steps the GPU waits for kernel launches, which a CUDA
        # graph (one replay per token) or torch.compile (fused kernels) remove.
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        if compile and device.type == "cuda":
            # Static shapes (full-length cache + position mask) keep one graph for all steps.
            self._step = torch.compile(self._decode, dynamic=False)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision encoder output (B, N, Dv) in the model's dtype."""
        device, dtype = _model_device_dtype(self.model)
        return self.vision(pixel_values.to(device=device, dtype=dtype))

    def _decode(self, tokens, positions, cache, cross, group):
        """Run the decoder on `tokens` (R, S) at `positions` (S,), writing K/V into `cache`.

        The self-attention reads the whole preallocated cache under a position mask, so shapes
        do not change from step to step (no re-allocation; graph-capturable).
        """
        rows, length = tokens.shape
        x = self.bert.embeddings(input_ids=tokens, position_ids=positions[None, :].expand(rows, -1))
        capacity = cache[0][0].shape[2]
        slots = torch.arange(capacity, device=tokens.device)
        visible = slots[None, :] <= positions[:, None]  # (S, capacity): causal over the cache
        for i, layer in enumerate(self.layers):
            attention = layer.attention
            sa = attention.self
            q = _split_heads(sa.query(x), self.num_heads)
            key_cache, value_cache = cache[i]
            key_cache.index_copy_(2, positions, _split_heads(sa.key(x), self.num_heads))
            value_cache.index_copy_(2, positions, _split_heads(sa.value(x), self.num_heads))
            context = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=visible)
            x = attention.output(_merge_heads(context), x)
            x = _grouped_cross_attention(layer.crossattention, x, cross[i], group)
            x = layer.output(layer.intermediate(x), x)
        return self.decoder.cls(x[:, -1])  # (R, V) logits of the last position

    def _new_cache(self, rows, capacity, like):
        shape = (rows, self.num_heads, capacity, self.head_dim)
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(len(self.layers))]

    @torch.inference_mode()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        num_captions: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        max_length: int | None = None,
        min_length: int | None = None,
        do_sample: bool = True,
        top_p: float = 1.0,
        top_k: int = 50,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        prompt_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
        logits_processor=(),
    ) -> torch.LongTensor:
        """Caption ids (B*num_captions, T), image-major, starting with the prompt.

        Lengths: `max_new_tokens`/`min_new_tokens` count generated tokens; `max_length`/
        `min_length` follow `generate` and count the prompt ([DEC] + prompt tokens) too.
        `top_k=50` is `generate`'s default when sampling; 0 turns it off. Sampling draws from
        `generator` or, when `seeds` is given (one per image (B,) or one per caption
        (B*num_captions,)), from noise keyed by the seed, step and token id, so a caption does
        not depend on its batch. `logits_processor`: callables `(ids, scores) ->
        scores` applied after the penalties, as in `generate` (e.g. a keyed sampler used with
        `do_sample=False`). The loop stops once every row has emitted [SEP]
        (checked every `sync_every` steps) or at the length limit; ended rows hold pad tokens.
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_embeds")
            image_embeds = self.encode_images(pixel_values)
        images, device = image_embeds.shape[0], image_embeds.device
        if prompt_ids is None:
            prompt_ids = torch.tensor([self.bos_token_id])
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(device)
        prompt_len = prompt_ids.shape[0]
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else 20) - prompt_len
        if min_length is not None:
            min_new_tokens = max(min_new_tokens, min_length - prompt_len)
        if max_new_tokens < 1:
            raise CapfiltError(
                f"max length leaves no room to generate after a {prompt_len}-token prompt; "
                "raise --max-length or shorten --prompt"
            )
        capacity = prompt_len + max_new_tokens
        if capacity > self.max_positions:
            raise CapfiltError(
                f"prompt + {max_new_tokens} new tokens = {capacity} positions, more than the "
                f"model's {self.max_positions}; lower --max-length"
            )
        rows = images * num_captions
        row_seeds = None
        if seeds is not None:
            seeds = torch.as_tensor(seeds, dtype=torch.int64).to(device).reshape(-1)
            if seeds.shape[0] == rows:  # one seed per caption
                row_seeds = caption_row_seeds(seeds)
            elif seeds.shape[0] == images:  # one seed per image
                row_seeds = image_row_seeds(seeds, num_captions)
            else:
                raise ValueError(f"seeds must have {images} (images) or {rows} (captions) values")
        penalties = dict(
            eos_token_id=self.eos_token_id,
            temperature=temperature if do_sample else 1.0,
            repetition_penalty=repetition_penalty,
            logits_processor=logits_processor,
        )

        cross = [_cross_kv(layer.crossattention, image_embeds) for layer in self.layers]

        # Prefill: the prompt is the same for all captions of an image, so run it once per
        # image and copy its keys/values into each caption's rows of the cache.
        prefill_cache = self._new_cache(images, capacity, image_embeds)
        positions = torch.arange(prompt_len, device=device)
        prompt = prompt_ids[None, :].expand(images, -1)
        logits = self._step(prompt, positions, prefill_cache, cross, 1)  # (B, V)
        cache = [
            (k.repeat_interleave(num_captions, 0), v.repeat_interleave(num_captions, 0))
            for k, v in prefill_cache
        ]
        del prefill_cache
        logits = logits.repeat_interleave(num_captions, 0)  # (R, V)

        vocab = logits.shape[-1]
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
            seen[:, prompt_ids] = True
        out = torch.full((rows, capacity), self.pad_token_id, dtype=torch.long, device=device)
        out[:, :prompt_len] = prompt_ids
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        all_positions = torch.arange(capacity, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        decode_step = self._step
        for step in range(max_new_tokens):
            scores = process_logits(
                logits,
                seen=seen,
                block_eos=step < min_new_tokens,
                input_ids=out[:, : prompt_len + step],
                **penalties,
            )
            chosen = _choose(
                scores,
                do_sample=do_sample,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                row_seeds=row_seeds,
                step=step,
            )
            chosen = torch.where(unfinished, chosen, self.pad_token_id)
            out[:, prompt_len + step] = chosen
            lengths += unfinished
            unfinished &= chosen != self.eos_token_id
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            if step + 1 == max_new_tokens:
                break
            if (step + 1) % self.sync_every == 0 and not bool(unfinished.any()):
                break
            position = all_positions[prompt_len + step : prompt_len + step + 1]
            if self.cuda_graphs and decode_step is self._step:
                decode_step = _GraphedDecodeStep(
                    self._step, chosen[:, None], position, cache, cross, num_captions
                )
            logits = decode_step(chosen[:, None], position, cache, cross, num_captions)
        return out[:, : prompt_len + int(lengths.max())]


class _GraphedDecodeStep:
    """One decode step captured as a CUDA graph for one generate call, replayed per token.

    Its inputs are copied into static buffers; the cache and the image keys/values are the
    call's own tensors, which stay put for the whole loop. Capture runs the step for real
    (at the first decode position with the real first tokens), and replaying it at that
    position rewrites the same cache slot with the same values, so capture changes nothing.
    """

    def __init__(self, step, tokens, position, cache, cross, group):
        self.tokens = tokens.clone()
        self.position = position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator and lazy kernel initialisation
                step(self.tokens, self.position, cache, cross, group)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = step(self.tokens, self.position, cache, cross, group)

    def __call__(self, tokens, position, cache, cross, group):
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits


# --- image-text matching and contrast -------------------------------------------------------


class FastItm:
    """ITM and ITC scores for a BlipForImageTextRetrieval, reading its weights in place."""

    def __init__(self, model):
        self.model = model.eval()
        self.bert = model.text_encoder
        self.layers = list(self.bert.encoder.layer)
        self.vision = FastVision(model.vision_model)
        self.pad_token_id = model.config.text_config.pad_token_id

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision encoder output (B, N, Dv) in the model's dtype."""
        device, dtype = _model_device_dtype(self.model)
        return self.vision(pixel_values.to(device=device, dtype=dtype))

    def _encode_text(self, input_ids, attention_mask, cross=None, group=1):
        """First-token output (M, D) of the text encoder (bidirectional); with `cross`,
        image-grounded.

        ITM and ITC read the first token only, so the last layer runs for that token alone
        (its keys and values still come from every token).
        """
        x = self.bert.embeddings(input_ids=input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (M, 1, 1, L)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = _text_self_attention(layer.attention, x, key_mask, first_only=i == last)
            if cross is not None:
                x = _grouped_cross_attention(layer.crossattention, x, cross[i], group)
            x = layer.output(layer.intermediate(x), x)
        return x[:, 0]  # (M, D)

    @torch.inference_mode()
    def itm_hidden(self, image_embeds, image_index, input_ids, attention_mask) -> torch.Tensor:
        """Image-grounded first-token hidden state (M, D) of each text with its image."""
        device = image_embeds.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        image_index = torch.as_tensor(image_index, device=device, dtype=torch.long)
        images, texts = image_embeds.shape[0], input_ids.shape[0]
        if texts == 0:
            return image_embeds.new_zeros((0, self.bert.config.hidden_size))
        # Lay the texts out image-major, `per_image` slots per image (empty slots padded), so
        # each image's keys/values serve all of its texts in one attention call.
        counts = torch.bincount(image_index, minlength=images)
        per_image = int(counts.max())
        order = torch.argsort(image_index, stable=True)
        first_of_image = torch.cumsum(counts, 0) - counts
        sorted_images = image_index[order]
        slot = torch.arange(texts, device=device) - first_of_image[sorted_images]
        dest = sorted_images * per_image + slot
        length = input_ids.shape[1]
        grid_ids = input_ids.new_full((images * per_image, length), self.pad_token_id)
        grid_mask = attention_mask.new_zeros((images * per_image, length))
        grid_mask[:, 0] = 1  # empty slots attend to one token instead of to nothing (NaN)
        grid_ids[dest] = input_ids[order]
        grid_mask[dest] = attention_mask[order]
        cross = [_cross_kv(layer.crossattention, image_embeds) for layer in self.layers]
        hidden = self._encode_text(grid_ids, grid_mask, cross, per_image)  # (B*S, D)
        first = torch.empty((texts, hidden.shape[-1]), dtype=hidden.dtype, device=device)
        first[order] = hidden[dest]
        return first

    @torch.inference_mode()
    def itm(self, image_embeds, image_index, input_ids, attention_mask) -> torch.Tensor:
        """ITM match probability softmax(itm_head(first token))[:, 1], float32 (M,)."""
        hidden = self.itm_hidden(image_embeds, image_index, input_ids, attention_mask)
        return self.model.itm_head(hidden).float().softmax(dim=-1)[:, 1]

    @torch.inference_mode()
    def image_features(self, image_embeds) -> torch.Tensor:
        """Normalised ITC image features (B, E) from the image's first token."""
        return F.normalize(self.model.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, input_ids, attention_mask) -> torch.Tensor:
        """Normalised ITC text features (M, E) of the unimodal text encoder's first token."""
        device = next(self.model.parameters()).device
        hidden = self._encode_text(input_ids.to(device), attention_mask.to(device))
        return F.normalize(self.model.text_proj(hidden).float(), dim=-1)

    @torch.inference_mode()
    def itc(self, image_embeds, image_index, input_ids, attention_mask) -> torch.Tensor:
        """ITC cosine similarity (M,) of each text with its image, float32."""
        image_feats = self.image_features(image_embeds)
        text_feats = self.text_features(input_ids, attention_mask)
        index = torch.as_tensor(image_index, device=image_feats.device, dtype=torch.long)
        return (image_feats[index] * text_feats).sum(dim=-1)


# --- batch size under memory pressure -------------------------------------------------------


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU allocator out-of-memory errors."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


class OomBackoff:
    """Runs work in batches, halving the batch size whenever a batch runs out of memory.

    The reduced size is kept for later batches (and later calls), so one OOM costs one retry.
    """

    def __init__(self, batch_size: int, min_batch_size: int = 1):
        if batch_size < 1:
            raise CapfiltError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.min_batch_size = max(1, min_batch_size)

    def map(self, work: Callable[[int, int], Any], total: int) -> list[Any]:
        """Call `work(start, stop)` over [0, total) and return the results in order."""
        results = []
        start = 0
        while start < total:
            stop = min(total, start + self.batch_size)
            try:
                results.append(work(start, stop))
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if self.batch_size <= self.min_batch_size:
                    raise CapfiltError(
                        f"out of memory even at batch size {self.batch_size}; use a smaller "
                        "model, lower precision (--precision bf16) or a device with more memory"
                    ) from error
                del error  # drop the traceback's references to the failed batch's tensors
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.batch_size = max(self.min_batch_size, self.batch_size // 2)
                continue
            start = stop
        return results
