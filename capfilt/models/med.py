"""The MED model of BLIP (arXiv 2201.12086) in one file: config, modules, losses.

MED = a ViT image encoder + a BERT text encoder that runs unimodal (ITC) or image-grounded
through cross-attention (ITM) + a text decoder (LM) that shares every parameter with the text
encoder except self-attention (`MEDConfig.sharing` picks another row of BLIP's Table 3). It is
built from transformers' BLIP modules, so its weights load from and export to
`BlipForConditionalGeneration` (captioner) and `BlipForImageTextRetrieval` (filter)
checkpoints by plain `load_state_dict`.

Shapes: B batch, T text tokens, P = 1 + image patches, D text width, V vision width,
E = `embed_dim` (the ITC space), Q = `queue_size`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capfilt.models.shapes import (
    BERT_BASE,
    DEFAULT_SHARING,
    MED_SHARING,
    PRETRAIN_VIT_B16,
    PRETRAIN_VIT_L16,
    SMALL_TEXT,
    SMALL_VISION,
    TINY_TEXT,
    TINY_VISION,
)

# ---------------------------------------------------------------------------------------------
# config

# At width 64, BERT's init (std 0.02) leaves every [CLS] feature of the tiny model nearly
# the same vector: a saddle where ITC and ITM have almost no gradient for hundreds of steps.
# An init closer to 1/sqrt(width) lets toy runs learn at once.
TINY_INIT = 0.2

# Pretraining runs at 224 px as in the paper; the queue of the tiny preset is small so that
# toy runs see their own features in it instead of random initial vectors.
# BLIP's pretraining settings for the released sizes: BERT's dropout 0.1 in the text model,
# the ViT's LayerNorm eps 1e-6, stochastic depth 0.1 in ViT-L (models/vit.py, blip.py of
# salesforce/BLIP).
BLIP_TEXT = dict(BERT_BASE, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
PRESETS = {
    "tiny": dict(
        # Patches of 8 px: at 16 px a 64 px toy image is 4 × 4 patches, too coarse to tell a
        # circle from a square; 8 × 8 patches cost a step about 30 % more on a CPU.
        vision=dict(TINY_VISION, patch_size=8, initializer_range=TINY_INIT),
        text=dict(TINY_TEXT, initializer_range=TINY_INIT),
        queue_size=64,
    ),
    # Twice the tiny width, 4 + 4 layers, 96 px in 16 px patches (`bench --arch small`).
    "small": dict(
        vision=dict(SMALL_VISION, initializer_range=TINY_INIT),
        text=dict(SMALL_TEXT, initializer_range=TINY_INIT),
        queue_size=256,
    ),
    "base": dict(
        vision=dict(PRETRAIN_VIT_B16, layer_norm_eps=1e-6), text=BLIP_TEXT, queue_size=57600
    ),
    "large": dict(
        vision=dict(PRETRAIN_VIT_L16, layer_norm_eps=1e-6),
        text=BLIP_TEXT,
        queue_size=57600,
        drop_path_rate=0.1,
    ),
}


@dataclass(frozen=True)
class MEDConfig:
    """Everything needed to rebuild a MED model; stored in every checkpoint as JSON."""

    vision: dict  # BlipVisionConfig fields
    text: dict  # BlipTextConfig fields, vocabulary and special-token ids included
    enc_token_id: int  # [ENC], the first token of image-grounded encoding (ITM)
    embed_dim: int = 256  # ITC projection size
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4  # weight of the momentum-distilled targets in ITC
    temp: float = 0.07  # initial ITC temperature, learned within [0.001, 0.5]
    label_smoothing: float = 0.1  # LM loss
    drop_path_rate: float = 0.0  # stochastic depth of the ViT, rising linearly to this
    sharing: str = DEFAULT_SHARING  # what the text decoder shares with the encoder (MED_SHARING)

    def __post_init__(self) -> None:
        if self.sharing not in MED_SHARING:
            raise ValueError(
                f"unknown MED sharing {self.sharing!r}; choose one of {', '.join(MED_SHARING)}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> MEDConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def bos_token_id(self) -> int:  # [DEC]
        return int(self.text["bos_token_id"])

    @property
    def pad_token_id(self) -> int:
        return int(self.text["pad_token_id"])

    def to_dict(self) -> dict:
        return asdict(self)

    def blip_config(self):
        """The transformers BlipConfig of the captioner and filter this model exports to."""
        from transformers import BlipConfig

        text = dict(self.text, label_smoothing=self.label_smoothing)
        return BlipConfig(
            text_config=text,
            vision_config=dict(self.vision),
            projection_dim=self.embed_dim,
            image_text_hidden_size=self.embed_dim,
            label_smoothing=self.label_smoothing,
            # transformers keeps an unknown field in config.json and ignores it; `--init` of an
            # export reads it back to rebuild the same MED.
            **{SHARING_CONFIG_KEY: self.sharing},
        )


# The field of an exported BlipConfig that records the MED sharing it was exported from.
SHARING_CONFIG_KEY = "capfilt_med_sharing"


def med_config(preset: str, tokenizer, **overrides) -> MEDConfig:
    """A MEDConfig of a preset (`tiny`, `base`, `large`) whose vocabulary matches `tokenizer`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    vision = dict(spec["vision"])
    text = dict(spec["text"], **text_special_ids(tokenizer))
    text["encoder_hidden_size"] = vision["hidden_size"]
    overrides.setdefault("queue_size", spec["queue_size"])
    overrides.setdefault("drop_path_rate", spec.get("drop_path_rate", 0.0))
    return MEDConfig(vision=vision, text=text, enc_token_id=enc_token_id(tokenizer), **overrides)


def med_config_from_blip(blip_config, tokenizer, **overrides) -> MEDConfig:
    """The MEDConfig matching a transformers BlipConfig (of a captioner or a filter); its
    sharing is the one a capfilt export recorded, BLIP's for any other checkpoint."""
    vision_keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
    )
    text_keys = (
        "vocab_size",
        "hidden_size",
        "encoder_hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "bos_token_id",
        "pad_token_id",
        "sep_token_id",
        "eos_token_id",
    )
    vision = {k: getattr(blip_config.vision_config, k) for k in vision_keys}
    text = {k: getattr(blip_config.text_config, k) for k in text_keys}
    overrides.setdefault("embed_dim", blip_config.image_text_hidden_size)
    overrides.setdefault("sharing", getattr(blip_config, SHARING_CONFIG_KEY, DEFAULT_SHARING))
    return MEDConfig(vision=vision, text=text, enc_token_id=enc_token_id(tokenizer), **overrides)


def text_special_ids(tokenizer) -> dict:
    """BlipTextConfig fields that must agree with the tokenizer: [DEC] is the decoder's BOS."""
    dec = tokenizer.convert_tokens_to_ids("[DEC]")
    if dec is None or dec == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no [DEC] token; BLIP's decoder needs it as BOS")
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=dec,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def enc_token_id(tokenizer) -> int:
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc is None or enc == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no [ENC] token; BLIP's ITM needs it")
    return int(enc)


# ---------------------------------------------------------------------------------------------
# distributed helpers


def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process (no gradient); itself when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same: torch.Tensor | None = None
):
    """For each text an image, for each image a text, drawn in proportion to softmax(ITC
    similarity) among the batch's other pairs (the own pair has weight 0).

    `sim_i2t` and `sim_t2i` are (B, B): similarities within the batch. `same` (B, B, bool)
    marks other pairs that are positives too (identical texts, as web alt-text and toy
    captions repeat): they are never drawn as negatives unless a row has nothing else.
    Returns (neg_image, neg_text), each (B,) indices into the batch.
    """
    others = ~torch.eye(sim_i2t.shape[0], dtype=torch.bool, device=sim_i2t.device)  # (B, B)
    allowed = others if same is None else others & ~same
    # A batch whose texts are all the same has no true negative: fall back to the others.
    allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, others)
    weights_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4  # (B, B); + ε: never all zero
    weights_t2i = weights_t2i * allowed
    weights_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4  # (B, B)
    weights_i2t = weights_i2t * allowed
    neg_image = torch.multinomial(weights_t2i, 1).squeeze(1)  # (B,) an image for each text
    neg_text = torch.multinomial(weights_i2t, 1).squeeze(1)  # (B,) a text for each image
    return neg_image, neg_text


def tie_encoder_decoder(
    encoder: nn.Module, decoder: nn.Module, sharing: str = DEFAULT_SHARING
) -> None:
    """Make `decoder` use the encoder's modules (real tying) where `sharing` says so.

    Both are BlipTextModel. BLIP's `all-but-sa` leaves the decoder only
    `encoder.layer[i].attention` (self-attention with its output projection and LayerNorm) of
    its own; `all` shares that too, `all-but-ca` keeps `crossattention` instead, and `none`
    shares nothing, the embeddings included. State-dict keys are the same in every case.
    """
    if sharing != "none":
        decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        for part in MED_SHARING[sharing]:
            setattr(dec_layer, part, getattr(enc_layer, part))


# ---------------------------------------------------------------------------------------------
# fused attention for training

ATTENTIONS = ("sdpa", "eager")


def _sdpa_vision_attention(module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
    """BlipAttention's forward through scaled_dot_product_attention (same weights, same math)."""
    batch, tokens, width = hidden_states.shape
    qkv = module.qkv(hidden_states).view(batch, tokens, 3, module.num_heads, module.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, P, d)
    dropout = module.dropout.p if module.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=module.scale)
    return module.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None


def _sdpa_text_attention(
    module, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_mask=None
) -> tuple[torch.Tensor, None]:
    """BlipTextSelfAttention's forward without a cache through scaled_dot_product_attention.

    The masks are transformers' additive masks ((B, 1, 1, T) padding, or (B, 1, T, T) causal in
    the decoder), cast to the compute dtype as SDPA wants; as in transformers, cross-attention
    uses the encoder mask (None: every image token is visible).
    """
    cross = encoder_hidden_states is not None
    mask = encoder_mask if cross else attention_mask
    source = encoder_hidden_states if cross else hidden_states
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    q = module.query(hidden_states)
    batch, length, width = q.shape
    q = q.view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
    k = module.key(source).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, S, d)
    v = module.value(source).view(batch, -1, heads, head_dim).transpose(1, 2)
    if mask is not None:
        mask = mask.to(device=q.device, dtype=q.dtype)
    dropout = module.dropout.p if module.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return context.transpose(1, 2).reshape(batch, length, width), None


@functools.cache
def _fused_attention_classes():
    """Subclasses of transformers' BLIP attention modules whose forward runs SDPA.

    transformers' BLIP has eager attention only; swapping an instance's class keeps its
    parameters and state-dict keys. The text module falls back to transformers' own forward
    when a generation cache is in use (never in training).
    """
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    class SdpaBlipAttention(BlipAttention):
        def forward(self, hidden_states, **kwargs):
            return _sdpa_vision_attention(self, hidden_states)

    class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
        def forward(
            self,
            hidden_states,
            attention_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            cache=None,
            **kwargs,
        ):
            if cache is not None or kwargs.get("past_key_values") is not None:
                return super().forward(
                    hidden_states,
                    attention_mask=attention_mask,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    cache=cache,
                    **kwargs,
                )
            return _sdpa_text_attention(
                self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask
            )

    return {BlipAttention: SdpaBlipAttention, BlipTextSelfAttention: SdpaBlipTextSelfAttention}


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Run every BLIP attention module of `model` through SDPA (in place); returns `model`."""
    swaps = _fused_attention_classes()
    for module in model.modules():
        fused = swaps.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model


@functools.cache
def _stochastic_depth_class():
    """transformers' BlipEncoderLayer with stochastic depth: in training, each sample skips
    the attention and the MLP branch with probability `drop_path` (timm's DropPath, as BLIP's
    ViT). The class swap keeps parameters and state-dict keys; at 0 it is the plain layer."""
    from transformers.models.blip.modeling_blip import BlipEncoderLayer

    class DropPathBlipEncoderLayer(BlipEncoderLayer):
        drop_path = 0.0

        def _branch(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.drop_path == 0.0:
                return x
            keep = 1.0 - self.drop_path
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
            return x * mask / keep

        def forward(self, hidden_states, **kwargs):
            residual = hidden_states
            hidden_states, _ = self.self_attn(
                hidden_states=self.layer_norm1(hidden_states), **kwargs
            )
            hidden_states = residual + self._branch(hidden_states)
            residual = hidden_states
            hidden_states = self.mlp(self.layer_norm2(hidden_states))
            return residual + self._branch(hidden_states)

    return BlipEncoderLayer, DropPathBlipEncoderLayer


def use_stochastic_depth(vision_model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 at the first ViT layer to `rate` at the last."""
    if not rate:
        return
    plain, with_drop_path = _stochastic_depth_class()
    layers = [m for m in vision_model.modules() if isinstance(m, plain)]
    for index, layer in enumerate(layers):
        layer.__class__ = with_drop_path
        layer.drop_path = rate * index / max(1, len(layers) - 1)


@torch.no_grad()
def resize_position_embeddings(model: MED, image_size: int) -> None:
    """Train `model` at another image size: its ViTs' position embeddings are interpolated
    (bicubic over the patch grid, the class position kept), as BLIP does to finetune at 384 px
    a model pretrained at 224. Changes `model.config` to the new size."""
    from dataclasses import replace

    patch = int(model.config.vision["patch_size"])
    grid = image_size // patch
    for vision in (model.vision_model, model.vision_model_m):
        embeddings = vision.embeddings
        old = embeddings.position_embedding  # (1, 1 + g*g, D)
        side = int(round((old.shape[1] - 1) ** 0.5))
        patches = old[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic")
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(old.dtype)
        embeddings.position_embedding = nn.Parameter(torch.cat([old[:, :1], patches], dim=1))
        embeddings.image_size, embeddings.num_patches = image_size, grid * grid
        embeddings.num_positions = grid * grid + 1
        vision.config.image_size = image_size
    model.config = replace(model.config, vision=dict(model.config.vision, image_size=image_size))


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every transformer layer of `model` in place; returns how many.

    Layers, not the whole model: the training step keeps its data-dependent parts (hard
    negative sampling, the queues) in eager mode, while each layer's many small kernels
    (bias, GELU, LayerNorm, residual) fuse and its Python overhead goes. Parameters and
    state-dict keys are unchanged. The first steps pay for compilation.
    """
    from transformers.models.blip.modeling_blip import BlipEncoderLayer
    from transformers.models.blip.modeling_blip_text import BlipTextLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BlipEncoderLayer | BlipTextLayer):
            module.compile(backend=backend)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# the model


class MED(nn.Module):
    """BLIP's multimodal mixture of encoder-decoder, with ITC, ITM and LM losses."""

    def __init__(self, config: MEDConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}")
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

        self.config = config
        text_config = BlipTextConfig(**config.text, label_smoothing=config.label_smoothing)
        vision_config = BlipVisionConfig(**config.vision)
        width = text_config.hidden_size

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config)
        tie_encoder_decoder(self.text_encoder, self.text_decoder.bert, config.sharing)
        # The LM head's output matrix is the decoder's word embedding matrix, as in BERT: the
        # encoder's too, unless the sharing is `none`.
        self.text_decoder.cls.predictions.decoder.weight = (
            self.text_decoder.bert.embeddings.word_embeddings.weight
        )
        self.vision_proj = nn.Linear(vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        if attention == "sdpa":
            use_fused_attention(self)
        use_stochastic_depth(self.vision_model, config.drop_path_rate)

        # Momentum encoders: exponential moving averages of the unimodal encoders, never trained
        # by gradients; their features fill the queues and make ITC's soft targets.
        self.vision_model_m = copy.deepcopy(self.vision_model)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

        self.register_buffer(
            "image_queue", F.normalize(torch.randn(config.embed_dim, config.queue_size), dim=0)
        )  # (E, Q)
        self.register_buffer(
            "text_queue", F.normalize(torch.randn(config.embed_dim, config.queue_size), dim=0)
        )  # (E, Q)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # momentum encoders ------------------------------------------------------------------------
    def model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.vision_model, self.vision_model_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    def momentum_parameters(self):
        for _, momentum in self.model_pairs():
            yield from momentum.parameters()

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Set the momentum encoders equal to the online ones (after loading weights)."""
        for online, momentum in self.model_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m ← m·p_m + (1 − m)·p for every momentum parameter."""
        m = self.config.momentum
        online, momentum = [], []
        for model, model_m in self.model_pairs():
            online += [p.detach() for p in model.parameters()]
            momentum += list(model_m.parameters())
        # Two multi-tensor kernels for all parameters instead of two kernels per parameter.
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, online, alpha=1.0 - m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Write the features of every process's batch into the queues, wrapping around."""
        image_feat = concat_all_gather(image_feat)  # (B_all, E)
        text_feat = concat_all_gather(text_feat)  # (B_all, E)
        size = self.config.queue_size
        n = min(image_feat.shape[0], size)
        image_feat, text_feat = image_feat[-n:], text_feat[-n:]
        # The pointer stays on the device: no host synchronisation in the training step.
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        self.image_queue[:, slots] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat.T.to(self.text_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    # encoders -------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, V)

    def text_embeds(self, input_ids, attention_mask, encoder=None) -> torch.Tensor:
        encoder = encoder or self.text_encoder
        mask = self.additive_mask(attention_mask)
        return encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def additive_mask(self, attention_mask, causal: bool = False) -> torch.Tensor:
        """The (B, 1, 1, T) or, `causal`, (B, 1, T, T) additive mask that transformers would
        build from the (B, T) padding mask (0 where visible, the dtype's minimum elsewhere),
        built here without a host sync: transformers first asks whether every token is visible
        (`mask.all()`, a sync), four times a training step."""
        dtype = self.text_encoder.embeddings.word_embeddings.weight.dtype
        visible = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        if causal:
            length = attention_mask.shape[1]
            past = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device)
            visible = visible & past.tril()  # (B, 1, T, T)
        additive = torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device)
        return additive.masked_fill_(~visible, torch.finfo(dtype).min)

    def grounded_cls(self, input_ids, attention_mask, image_embeds) -> torch.Tensor:
        """Image-grounded text encoding ([ENC] first, cross-attention on); first token's state."""
        ids = input_ids.clone()
        ids[:, 0] = self.config.enc_token_id
        out = self.text_encoder(
            input_ids=ids,
            attention_mask=self.additive_mask(attention_mask),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,  # every image token is visible
        )
        return out.last_hidden_state[:, 0, :]  # (B, D)

    def itm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """(B, 2) image-text matching logits; column 1 is 'matches'."""
        return self.itm_head(
            self.grounded_cls(input_ids, attention_mask, self.image_embeds(pixel_values))
        )

    # losses ---------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values,
        input_ids,
        attention_mask,
        alpha: float | None = None,
        losses: tuple[str, ...] = ("itc", "itm", "lm"),
        prompt_length: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The requested loss terms (`itc`, `itm`, `lm`) of one batch, as a dict of scalars.

        `input_ids` start with [CLS] (the tokenizer's usual output); ITM swaps in [ENC] and LM
        [DEC]. `alpha` overrides the config's ITC distillation weight (BLIP ramps it in).
        With `itc` the momentum encoders are updated and the queues advance.
        """
        alpha = self.config.alpha if alpha is None else alpha
        image_embeds = self.image_embeds(pixel_values)  # (B, P, V)
        out: dict[str, torch.Tensor] = {}
        sim_i2t = sim_t2i = None
        if "itc" in losses or "itm" in losses:
            out_itc, sim_i2t, sim_t2i = self._itc(
                pixel_values, image_embeds, input_ids, attention_mask, alpha
            )
            if "itc" in losses:
                out["itc"] = out_itc
        if "itm" in losses:
            out["itm"] = self._itm(image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i)
        if "lm" in losses:
            out["lm"] = self._lm(image_embeds, input_ids, attention_mask, prompt_length)
        return out

    def _itc(self, pixel_values, image_embeds, input_ids, attention_mask, alpha):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)  # (B, E)
        text_cls = self.text_embeds(input_ids, attention_mask)[:, 0, :]  # (B, D)
        text_feat = F.normalize(self.text_proj(text_cls), dim=-1)  # (B, E)

        with torch.no_grad():
            self.momentum_update()
            image_embeds_m = self.vision_model_m(pixel_values=pixel_values).last_hidden_state
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            text_m = self.text_embeds(input_ids, attention_mask, self.text_encoder_m)[:, 0, :]
            text_feat_m = F.normalize(self.text_proj_m(text_m), dim=-1)  # (B, E)
            # The batch's own momentum features first, then the queue: (E, B + Q).
            image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone().detach()], dim=1)

            sim_i2t_m = image_feat_m @ text_feat_all / self.temp  # (B, B + Q)
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp  # (B, B + Q)
            one_hot = torch.zeros_like(sim_i2t_m)
            one_hot.fill_diagonal_(1)
            i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * one_hot
            t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * one_hot

        sim_i2t = image_feat @ text_feat_all.to(image_feat.dtype) / self.temp  # (B, B + Q)
        sim_t2i = text_feat @ image_feat_all.to(text_feat.dtype) / self.temp  # (B, B + Q)
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(dim=1).mean()
        self.dequeue_and_enqueue(image_feat_m, text_feat_m)
        return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i

    def _itm(self, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i):
        batch = input_ids.shape[0]
        same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)  # (B, B)
        neg_image, neg_text = sample_hard_negatives(
            sim_i2t[:, :batch], sim_t2i[:, :batch], same_text
        )
        ids_all = torch.cat([input_ids, input_ids, input_ids[neg_text]], dim=0)  # (3B, T)
        atts_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]], dim=0)
        images_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
        vl = self.grounded_cls(ids_all, atts_all, images_all)  # (3B, D)
        logits = self.itm_head(vl)  # (3B, 2)
        labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        return F.cross_entropy(logits.float(), labels)

    def _lm(self, image_embeds, input_ids, attention_mask, prompt_length: int):
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.bos_token_id
        targets = decoder_ids.masked_fill(decoder_ids == self.config.pad_token_id, -100)
        if prompt_length:
            targets[:, :prompt_length] = -100
        logits = self.text_decoder(
            input_ids=decoder_ids,
            attention_mask=self.additive_mask(attention_mask, causal=True),
            encoder_hidden_states=image_embeds,
            return_logits=True,
        )  # (B, T-1, vocab): predicts tokens 1..T-1
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.label_smoothing,
        )

    # weights to and from Hugging Face BLIP ----------------------------------------------------
    def decoder_own_keys(self) -> list[str]:
        """State-dict keys of `text_decoder` whose tensors the encoder does not share: BLIP's
        self-attention and LM head transform, more or fewer as `config.sharing` says."""
        shared = {id(t) for t in self.text_encoder.state_dict(keep_vars=True).values()}
        return [
            k
            for k, t in self.text_decoder.state_dict(keep_vars=True).items()
            if id(t) not in shared
        ]

    @torch.no_grad()
    def load_blip(self, captioner=None, filter=None) -> None:
        """Copy weights from HF BLIP models (either or both), then reset the momentum encoders.

        MED has one image encoder and one text encoder: the filter (BlipForImageTextRetrieval)
        supplies them when given, the captioner (BlipForConditionalGeneration) supplies the
        decoder's own weights (`decoder_own_keys`: self-attention and the LM head transform
        with BLIP's sharing; the whole decoder with `none`). A missing side's own text weights
        start as a copy of the other's, as both started from BERT's in BLIP.
        """
        if captioner is None and filter is None:
            raise ValueError("load_blip needs a captioner, a filter or both")
        if filter is not None:
            self.vision_model.load_state_dict(filter.vision_model.state_dict())
            self.text_encoder.load_state_dict(filter.text_encoder.state_dict())
            self.vision_proj.load_state_dict(filter.vision_proj.state_dict())
            self.text_proj.load_state_dict(filter.text_proj.state_dict())
            self.itm_head.load_state_dict(filter.itm_head.state_dict())
        if captioner is not None:
            source = captioner.text_decoder.state_dict()
            if filter is None:
                self.vision_model.load_state_dict(captioner.vision_model.state_dict())
                self.text_decoder.load_state_dict(source)
            else:
                own = {k: source[k] for k in self.decoder_own_keys()}
                self.text_decoder.load_state_dict(own, strict=False)
        # Both are BlipTextModel with the same keys; shared tensors copy onto themselves.
        if captioner is None:
            self.text_decoder.bert.load_state_dict(self.text_encoder.state_dict())
        elif filter is None:
            self.text_encoder.load_state_dict(self.text_decoder.bert.state_dict())
        self.copy_to_momentum()

    @torch.no_grad()
    def to_blip(self, kind: str):
        """A transformers BlipForConditionalGeneration ('captioner') or BlipForImageTextRetrieval
        ('filter') holding copies of this model's weights."""
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

        config = self.config.blip_config()
        if kind == "captioner":
            model = BlipForConditionalGeneration(config)
            model.vision_model.load_state_dict(self.vision_model.state_dict())
            model.text_decoder.load_state_dict(self.text_decoder.state_dict())
        elif kind == "filter":
            model = BlipForImageTextRetrieval(config)
            for name in ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head"):
                getattr(model, name).load_state_dict(getattr(self, name).state_dict())
        else:
            raise ValueError(f"kind must be 'captioner' or 'filter', not {kind!r}")
        return model.eval()
