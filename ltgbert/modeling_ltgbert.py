"""LTG-BERT (Samuel et al., 2023, "Trained on 100 million words and still in shape"), transformers-native.

How this architecture differs from BERT, and where each idea comes from:

1. No absolute position embeddings and no token-type embeddings. Attention gets disentangled relative-position
   terms (DeBERTa, He et al. 2021): score(q, k) = (q.k + q.Kpos[b] + k.Qpos[b]) / sqrt(3 * head_size), with b
   the bucket of the relative position q - k.
2. Log buckets: distances up to position_bucket_size // 2 keep their own bucket; longer ones share
   logarithmically wider buckets (T5, Raffel et al. 2020), so a model generalises past its training length.
3. One relative-position table for all layers, LayerNorm-ed once; each layer projects it with its own
   query/key projection (LTG-BERT).
4. NormFormer-style extra LayerNorms (Shleifer et al. 2021): pre-norm without affine parameters on every
   sub-layer input, an affine LayerNorm after the attention output projection, and one inside the
   feed-forward. There is no final LayerNorm.
5. GeGLU feed-forward (Shazeer 2020) without biases: value * gelu_tanh(gate).
6. Depth-scaled truncated-normal initialisation (LTG-BERT): std sqrt(2 / (5 * hidden)); feed-forward weights
   of layer i further scaled by sqrt(1 / (2 * (i + 1))).
7. MLM head: norm -> dense -> GELU -> norm -> projection tied to the word embeddings (plus an output bias).
8. No pooler: the classification heads read the first ([CLS]) token's last hidden state (sequence, multiple
   choice) or every token's (token classification, question answering). ``config.classifier_head = "mlp"``
   puts the published LTG-BERT head (norm -> dense -> GELU -> norm) before the output layer.

Reading order, as in transformers' modeling files: the checkpoint key table, Embedding, Attention,
FeedForward, Layer, Encoder, PreTrainedModel (initialisation, loading, saving), Model, the heads. The CPU and
compile fast paths (dropout from 16 random bits, its custom-op registration, the flat bucket index, the
compiled GeGLU form, flex attention) sit in one bannered section at the end; what each gains is measured in
BENCHMARKS.md.

How the relative bias is computed: the reference materialises a [T, T, hidden] position tensor per layer. Here
the relative table is projected once per layer to [2 * buckets - 1, hidden], scored against queries and keys
per bucket ([batch, heads, T, 2 * buckets - 1]) and gathered into the additive bias [batch, heads, T, T];
padding is folded into the small per-bucket table. On CPU training steps the bias enters the score matmul
(baddbmm) directly, since SDPA has no fused CPU kernel for dropout or a bias that needs a gradient; elsewhere
it goes to ``torch.nn.functional.scaled_dot_product_attention`` (``attn_implementation="sdpa"``), or into a
flex-attention kernel (``"flex_attention"``) that never builds the [T, T] bias.

This file imports only torch and transformers: it is copied into saved checkpoints as remote code, and runs
under transformers 4.51.3 (the BabyLM evaluation pipeline's pin) as well as 5.x.
"""

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .configuration_ltgbert import LtgBertConfig

try:  # transformers >= 4.52: the layer class whose gradient_checkpointing_enable() options (every_n_layers) apply
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers 4.51.3 (BabyLM's pin): the same whole-layer recomputation, done here

    class GradientCheckpointingLayer(nn.Module):
        """Recompute the whole layer in backward when ``gradient_checkpointing`` is set (as transformers 4.52+)."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Tensors that need gradients travel as positional arguments (reentrant checkpointing sees them).
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint key names -> ours (regex, applied to the state dict at load time by from_pretrained). Published
# LTG-BERT / HPLT checkpoints hold the training model's state dict (no base-model prefix); fine-tuned ones saved
# by their remote code have a `head.` classifier. Our own checkpoints before the MLM output bias moved into the
# decoder have `lm_head.bias`. The tied `classifier.nonlinearity.5.weight` and the `position_indices` buffers
# are derived and dropped (see convert_state_dict).
CHECKPOINT_KEY_MAPPING = {
    r"^embedding\.word_embedding\.": "ltgbert.embeddings.word_embeddings.",
    r"^embedding\.relative_embedding$": "ltgbert.embeddings.relative_embeddings",
    r"^embedding\.relative_layer_norm\.": "ltgbert.embeddings.relative_norm.",
    r"^transformer\.layers\.(\d+)\.attention\.in_proj_qk\.": r"ltgbert.encoder.layers.\1.attention.qk_proj.",
    r"^transformer\.layers\.(\d+)\.attention\.in_proj_v\.": r"ltgbert.encoder.layers.\1.attention.v_proj.",
    r"^transformer\.layers\.(\d+)\.attention\.out_proj\.": r"ltgbert.encoder.layers.\1.attention.out_proj.",
    r"^transformer\.layers\.(\d+)\.attention\.post_layer_norm\.": r"ltgbert.encoder.layers.\1.attention.output_norm.",
    r"^transformer\.layers\.(\d+)\.mlp\.mlp\.1\.": r"ltgbert.encoder.layers.\1.feed_forward.up_proj.",
    r"^transformer\.layers\.(\d+)\.mlp\.mlp\.4\.": r"ltgbert.encoder.layers.\1.feed_forward.down_proj.",
    r"^classifier\.nonlinearity\.1\.": "lm_head.dense.",
    r"^classifier\.nonlinearity\.5\.": "lm_head.decoder.",
    r"^head\.nonlinearity\.1\.": "head_transform.dense.",
    r"^head\.nonlinearity\.5\.": "classifier.",
    r"^lm_head\.bias$": "lm_head.decoder.bias",
}
_DERIVED_KEYS = re.compile(r"(^classifier\.nonlinearity\.5\.weight$)|(\.position_indices$)")


# ---------------------------------------------------------------------------------------------------------------
# Embedding


class LtgBertEmbeddings(nn.Module):
    """Word embeddings (LayerNorm without affine, dropout) and the shared relative-position table (LayerNorm)."""

    def __init__(self, config: LtgBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.dropout = LtgBertDropout(config.hidden_dropout_prob)
        self.relative_embeddings = nn.Parameter(torch.empty(2 * config.position_bucket_size - 1, config.hidden_size))
        self.relative_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids=None, inputs_embeds=None):
        # inputs_embeds replaces the lookup only, as in BERT: the norm and dropout still apply.
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [batch, seq, hidden]
        words = self.dropout(self.word_norm(words))
        relative = self.relative_norm(self.relative_embeddings)  # [2 * buckets - 1, hidden]
        return words, relative


# ---------------------------------------------------------------------------------------------------------------
# Attention


class LtgBertAttention(nn.Module):
    """Self-attention with disentangled relative-position scores (differences 1-4 of the module docstring)."""

    def __init__(self, config: LtgBertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scale = 1.0 / math.sqrt(3 * self.head_size)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.qk_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)  # query rows first, then key
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention_dropout = LtgBertDropout(config.attention_probs_dropout_prob)
        self.output_dropout = LtgBertDropout(config.hidden_dropout_prob)

    def _split_heads(self, x):
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_size).transpose(1, 2)  # [batch, heads, seq, head]

    def forward(self, hidden, relative, bucket_index, padding_mask, output_attentions=False, checkpoint=None):
        """(output [batch, seq, hidden], probs [batch, heads, seq, seq] or None).

        ``checkpoint`` (selective gradient checkpointing, see LtgBertLayer) recomputes the attention core.
        """
        batch, seq, hidden_size = hidden.shape
        x = self.input_norm(hidden)
        # Two matmuls on row slices of the published qk weight instead of one matmul and chunk(): chunk's
        # backward concatenates two activation-sized gradients, a slice's backward touches only the weight.
        w, b = self.qk_proj.weight, self.qk_proj.bias
        query = self._split_heads(F.linear(x, w[:hidden_size], b[:hidden_size]))  # [batch, heads, seq, head]
        key = self._split_heads(F.linear(x, w[hidden_size:], b[hidden_size:]))  # [batch, heads, seq, head]
        value = self._split_heads(self.v_proj(x))  # [batch, heads, seq, head]
        c2p, p2c = self.position_tables(query, key, relative)
        probs = None
        if self.config._attn_implementation == "flex_attention" and not output_attentions:
            context = flex_attention_forward(query, key, value, c2p, p2c, bucket_index, padding_mask, self.scale)
        elif checkpoint is not None and not output_attentions:
            # Selective checkpointing: only the [batch, heads, T, T] tensors are recomputed in backward.
            context, _ = checkpoint(self.attend, query, key, value, c2p, p2c, bucket_index, padding_mask)
        else:
            context, probs = self.attend(query, key, value, c2p, p2c, bucket_index, padding_mask, output_attentions)
        context = context.transpose(1, 2).reshape(batch, seq, -1)  # [batch, heads, seq, head] -> [batch, seq, hidden]
        return self.output_dropout(self.output_norm(self.out_proj(context))), probs

    def position_tables(self, query, key, relative):
        """Per-bucket content-to-position and position-to-content scores, already scaled.

        Returns two [batch, heads, seq, 2 * buckets - 1] tensors: c2p[b, h, q, j] = q.Kpos[j] and
        p2c[b, h, k, j] = k.Qpos[j]. The flex path reads these inside its kernel.
        """
        relative = self.attention_dropout(relative)
        pos = F.linear(relative, self.qk_proj.weight, self.qk_proj.bias)  # [2 * buckets - 1, 2 * hidden]
        # The scale goes on the small [buckets, hidden] tables, not on the [batch, seq, hidden] activations.
        query_pos, key_pos = (
            t.view(-1, self.num_heads, self.head_size) for t in (pos * self.scale).chunk(2, dim=-1)
        )  # each [buckets, heads, head]
        # Broadcast matmuls against [heads, head, buckets]: the tables come out contiguous in [batch, heads, ...]
        # order, so position_bias reads them without a copy, and compiled code indexes them without division.
        c2p = torch.matmul(query, key_pos.permute(1, 2, 0))  # [batch, heads, query, buckets]: q.Kpos[j]
        p2c = torch.matmul(key, query_pos.permute(1, 2, 0))  # [batch, heads, key, buckets]: k.Qpos[j]
        return c2p, p2c

    def position_bias(self, c2p, p2c, bucket_index):
        """The additive bias [batch, heads, query, key]: c2p[.., q, bucket(q, k)] + p2c[.., k, bucket(q, k)]."""
        if torch.compiler.is_compiling():
            # Two gathers and a transposed add, which the compiler fuses into one loop over its own counters.
            batch, heads, seq, _ = c2p.shape
            index = bucket_index.expand(batch, heads, seq, seq)  # [batch, heads, query, key]
            return c2p.gather(3, index) + p2c.gather(3, index.transpose(2, 3)).transpose(2, 3)
        return _flat_position_bias(c2p, p2c, bucket_index)

    def attend(self, query, key, value, c2p, p2c, bucket_index, padding_mask, output_attentions=False):
        """The attention core with the relative-position bias: (context [batch, heads, seq, head], probs)."""
        if padding_mask is not None:
            # Padding keys get a large negative position-to-content score in the small per-bucket table,
            # which the gather spreads over every query: no pass over the [batch, heads, T, T] bias.
            # Half of the dtype's lowest value: adding the finite content scores cannot overflow to -inf,
            # so a row whose keys are all padding stays finite.
            p2c = p2c.masked_fill(~padding_mask[:, None, :, None], torch.finfo(p2c.dtype).min / 2)
        bias = self.position_bias(c2p, p2c, bucket_index)  # [batch, heads, query, key]
        # CPU SDPA has no fused kernel for dropout or for a bias that needs a gradient and falls back to an
        # unfused path with extra passes (q and k scaling, -inf row checks): the explicit path is faster.
        explicit = query.device.type == "cpu" and (self.training or torch.is_grad_enabled())
        if self.config._attn_implementation == "eager" or output_attentions or explicit:
            probs = self._explicit_attention_probs(query, key, bias)  # [batch, heads, query, key]
            context = torch.matmul(self.attention_dropout(probs), value)  # [batch, heads, query, head]
            return context, (probs if output_attentions else None)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            scale=self.scale,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
        )  # [batch, heads, query, head]
        return context, None

    def _explicit_attention_probs(self, query, key, bias):
        """softmax(scale * q.k + bias) with the bias added inside the matmul (baddbmm): [batch, heads, q, k]."""
        batch, heads, seq, head_size = query.shape
        scores = torch.baddbmm(
            bias.reshape(batch * heads, seq, seq),  # [batch * heads, query, key]
            query.reshape(batch * heads, seq, head_size),  # [batch * heads, query, head]
            key.reshape(batch * heads, seq, head_size).transpose(1, 2),  # [batch * heads, head, key]
            alpha=self.scale,
        )  # [batch * heads, query, key]
        return torch.softmax(scores, dim=-1).view(batch, heads, seq, seq)  # [batch, heads, query, key]


# ---------------------------------------------------------------------------------------------------------------
# FeedForward


class LtgBertFeedForward(nn.Module):
    """norm -> GeGLU (two bias-free matmuls) -> norm -> down-projection -> dropout."""

    def __init__(self, config: LtgBertConfig, layer_index: int):
        super().__init__()
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # value half, gate half
        self.inner_norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = LtgBertDropout(config.hidden_dropout_prob)
        # Read by the initialisation: deeper feed-forward weights start smaller (reference scheme).
        self.up_proj.init_scale = self.down_proj.init_scale = math.sqrt(1.0 / (2.0 * (1 + layer_index)))

    def forward(self, hidden, checkpoint=None):
        x = self.input_norm(hidden)
        # Value and gate halves as two matmuls on row slices of up_proj (see LtgBertAttention.forward: no
        # activation-sized concatenation in the backward).
        half = self.up_proj.out_features // 2
        value = F.linear(x, self.up_proj.weight[:half])  # [batch, seq, intermediate]
        gate = F.linear(x, self.up_proj.weight[half:])  # [batch, seq, intermediate]
        # Selective checkpointing recomputes the element-wise activation: two [batch, seq, intermediate]
        # tensors fewer kept for backward, for no matmul.
        x = checkpoint(self.activate, value, gate) if checkpoint is not None else self.activate(value, gate)
        return self.dropout(self.down_proj(x))

    def activate(self, value, gate):
        """GeGLU, then the NormFormer norm: inner_norm(value * gelu_tanh(gate))."""
        if torch.compiler.is_compiling():
            return self.inner_norm(_compiled_geglu(value, gate))
        return self.inner_norm(value * F.gelu(gate, approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------------
# Layer


class LtgBertLayer(GradientCheckpointingLayer):
    """x = x + attention(x); x = x + feed_forward(x).

    Gradient checkpointing: ``gradient_checkpointing_enable()`` (``activation_checkpointing_enable()`` in 5.x)
    marks the layers, honouring its options (``every_n_layers``, ``use_reentrant``, ...). What a marked layer
    recomputes follows ``config.gradient_checkpointing_mode``: "full" recomputes the whole layer (transformers'
    GradientCheckpointingLayer does it); "selective" (Megatron-LM's selective recomputation, Korthikanti et al.
    2022) recomputes only the attention core, whose [batch, heads, T, T] tensors are most of a layer's
    activations at long sequences, and the GeGLU activation: no matmul runs twice.
    """

    def __init__(self, config: LtgBertConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.attention = LtgBertAttention(config)
        self.feed_forward = LtgBertFeedForward(config, layer_index)
        self._checkpointing_requested = False

    # transformers sets this flag, and GradientCheckpointingLayer reads it to recompute the whole layer; in
    # "selective" mode the layer keeps the request to itself and recomputes its two cheap parts instead.
    @property
    def gradient_checkpointing(self):
        return self._checkpointing_requested and self.config.gradient_checkpointing_mode != "selective"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        self._checkpointing_requested = bool(value)

    def _selective_checkpoint(self):
        selective = self._checkpointing_requested and self.config.gradient_checkpointing_mode == "selective"
        return self._gradient_checkpointing_func if selective and self.training and torch.is_grad_enabled() else None

    def forward(self, hidden, relative, bucket_index, padding_mask, output_attentions=False):
        checkpoint = self._selective_checkpoint()
        attention_out, probs = self.attention(
            hidden, relative, bucket_index, padding_mask, output_attentions, checkpoint=checkpoint
        )
        hidden = hidden + attention_out
        hidden = hidden + self.feed_forward(hidden, checkpoint=checkpoint)
        return hidden, probs


# ---------------------------------------------------------------------------------------------------------------
# Encoder


def log_bucket_indices(query_len: int, key_len: int, bucket_size: int, max_position: int, device=None):
    """Index into the relative table for every (query, key) pair: [query_len, key_len] int64.

    Relative position r = q - k; |r| <= bucket_size // 2 keeps its value, larger distances go to
    logarithmic buckets, all clamped at max_position - 1. Shifted by bucket_size - 1 to be >= 0.
    """
    mid = bucket_size // 2
    rel = torch.arange(query_len, device=device)[:, None] - torch.arange(key_len, device=device)[None, :]
    abs_rel = rel.abs().clamp(max=max_position - 1)
    # Inside the linear zone the log branch is unused; feed it `mid` to keep log() finite.
    safe = torch.where(abs_rel <= mid, torch.full_like(abs_rel, mid), abs_rel).float()
    log_pos = torch.ceil(torch.log(safe / mid) / math.log((max_position - 1) / mid) * (mid - 1)).long() + mid
    bucket = torch.where(abs_rel <= mid, rel, log_pos * rel.sign())
    return bucket + bucket_size - 1


class LtgBertEncoder(nn.Module):
    def __init__(self, config: LtgBertConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LtgBertLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable(), with the layers' flags
        # Bucket indices depend only on the config and the length: a cache, not a buffer, so that checkpoint
        # loading (meta-device init) never leaves them uninitialised and published position_indices are moot.
        self._bucket_cache = {}

    def bucket_index(self, seq_len, device):
        """log_bucket_indices for this length, cached per (length, device) in eager mode."""
        c = self.config
        if isinstance(seq_len, torch.SymInt) or torch.compiler.is_compiling():
            # Traced (torch.export, torch.compile): part of the graph, not a constant of one length.
            return log_bucket_indices(seq_len, seq_len, c.position_bucket_size, c.max_position_embeddings, device)
        key = (seq_len, str(device))
        if key not in self._bucket_cache:
            self._bucket_cache[key] = log_bucket_indices(
                seq_len, seq_len, c.position_bucket_size, c.max_position_embeddings, device
            )
        return self._bucket_cache[key]

    def forward(self, hidden, relative, padding_mask, output_attentions=False, output_hidden_states=False):
        if self.gradient_checkpointing and self.training:
            mode = self.config.gradient_checkpointing_mode
            if mode not in ("full", "selective"):
                raise ValueError(f'gradient_checkpointing_mode must be "full" or "selective", got {mode!r}')
        bucket_index = self.bucket_index(hidden.size(1), hidden.device)  # [seq, seq]
        all_hidden = (hidden,) if output_hidden_states else None
        all_probs = () if output_attentions else None
        for layer in self.layers:
            # Positional arguments: reentrant checkpointing passes gradients only to those.
            hidden, probs = layer(hidden, relative, bucket_index, padding_mask, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_probs += (probs,)
        return hidden, all_hidden, all_probs


# ---------------------------------------------------------------------------------------------------------------
# PreTrainedModel


class LtgBertPreTrainedModel(PreTrainedModel):
    config_class = LtgBertConfig
    base_model_prefix = "ltgbert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = ["LtgBertLayer"]
    # Published checkpoints carry the reference's position-index buffers (ours are derived from the config);
    # an encoder or a classifier loaded from a pretraining checkpoint leaves the MLM head behind.
    _keys_to_ignore_on_load_unexpected = [r"position_indices", r"^lm_head\."]

    @classmethod
    def _can_set_attn_implementation(cls):
        # transformers 5.x guesses from the source whether set_attn_implementation() can work; here it always
        # does, since every attention call reads config._attn_implementation.
        return True

    def compile_encoder_layers(self, **compile_kwargs):
        """Compile every encoder layer in place with ``torch.compile`` (regional compilation).

        The layers share one code path, so one compilation serves all of them whatever the depth, and the
        model's modules and state-dict keys stay as they were: checkpoints, ``save_pretrained`` and
        distributed wrappers (DDP, ZeRO-1/2) see an ordinary model. What the compiler gains is the fusion of
        each layer's element-wise work (norms, GeGLU, dropout masks, softmax) around the matmuls.
        ``compile_kwargs`` go to ``nn.Module.compile`` (backend, mode, dynamic, ...).
        """
        for layer in self.base_model.encoder.layers:
            layer.compile(**compile_kwargs)
        return self

    @torch.no_grad()
    def _init_weights(self, module):
        # Tensors already loaded from a checkpoint carry _is_hf_initialized: leave them as they are.
        std = math.sqrt(2.0 / (5.0 * self.config.hidden_size))

        def fresh(tensor):
            return tensor is not None and not getattr(tensor, "_is_hf_initialized", False)

        def trunc_normal(tensor, scale=1.0):
            if fresh(tensor):
                s = std * scale
                nn.init.trunc_normal_(tensor, mean=0.0, std=s, a=-2 * s, b=2 * s)

        def constant(tensor, value):
            if fresh(tensor):
                nn.init.constant_(tensor, value)

        if isinstance(module, LtgBertEmbeddings):
            trunc_normal(module.word_embeddings.weight)
            trunc_normal(module.relative_embeddings)
        elif isinstance(module, LtgBertTiedDecoder):
            constant(module.bias, 0.0)  # the weight is the word-embedding matrix, initialised with the embeddings
        elif isinstance(module, nn.Linear):
            trunc_normal(module.weight, getattr(module, "init_scale", 1.0))
            constant(module.bias, 0.0)
        elif isinstance(module, nn.LayerNorm):
            constant(module.weight, 1.0)
            constant(module.bias, 0.0)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers' ``save_pretrained``; ``auto_map`` names every head, not only the saved class.

        A checkpoint saved by pretraining then loads as any head through remote code too
        (``AutoModelForTokenClassification.from_pretrained(dir, trust_remote_code=True)``).
        """
        if self._auto_class is not None:
            self.config.auto_map = {
                "AutoConfig": "configuration_ltgbert.LtgBertConfig",
                **{auto: f"modeling_ltgbert.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()},
            }
        state_dict = kwargs.get("state_dict")
        if state_dict is not None and getattr(self.config, "tie_word_embeddings", True):
            # A gathered state dict (DeepSpeed, FSDP) holds the tied projection as a separate copy; the
            # checkpoint stores it once, as transformers does for a model's own state dict.
            kwargs["state_dict"] = {k: v for k, v in state_dict.items() if k not in (self._tied_weights_keys or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' ``from_pretrained``; checkpoint keys named in CHECKPOINT_KEY_MAPPING are renamed.

        The renaming happens on the state dict before transformers sees it, so the model saves with our
        names afterwards (transformers' ``key_mapping`` would save back in the old names). A published
        checkpoint with a fine-tuned LTG-BERT classifier head gets ``config.classifier_head = "mlp"``.
        """
        explicit = kwargs.get("key_mapping") is not None or kwargs.get("state_dict") is not None
        if pretrained_model_name_or_path is not None and not explicit:
            state_dict = _state_dict_to_convert(pretrained_model_name_or_path, kwargs)
            if state_dict is not None:
                # transformers takes a state dict only without a model name: resolve the config here,
                # letting config attributes among kwargs (num_labels=...) override it as usual.
                config = kwargs.pop("config", None)
                head_chosen = "classifier_head" in kwargs or isinstance(config, PretrainedConfig)
                if not isinstance(config, PretrainedConfig):
                    config, kwargs = cls.config_class.from_pretrained(
                        config or pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
                    )
                kwargs["state_dict"] = convert_state_dict(state_dict)
                if "head_transform.dense.weight" in kwargs["state_dict"] and not head_chosen:
                    config.classifier_head = "mlp"
                return super().from_pretrained(None, *args, config=config, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _return(self, output, return_dict):
        """The output dataclass, or its tuple of non-None fields when return_dict (or config.return_dict) is off."""
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()


def _state_dict_to_convert(name_or_path, kwargs):
    """The checkpoint's tensors if any key needs renaming (single-file checkpoints), else None."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    hub_keys = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
    hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
    for filename in ("model.safetensors", "pytorch_model.bin"):
        resolved = cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if resolved is None:
            continue
        if filename.endswith(".safetensors"):
            with safe_open(resolved, "pt") as f:
                if not _needs_conversion(f.keys()):
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        state_dict = torch.load(resolved, map_location="cpu", weights_only=True)
        return state_dict if _needs_conversion(state_dict.keys()) else None
    return None


def _needs_conversion(keys) -> bool:
    return any(_DERIVED_KEYS.search(k) or any(re.search(p, k) for p in CHECKPOINT_KEY_MAPPING) for k in keys)


def convert_state_dict(state_dict):
    """Rename a state dict's keys by CHECKPOINT_KEY_MAPPING; drops the tied published projection and the
    position-index buffers (both derived). Keys already in our names pass unchanged."""
    converted = {}
    if "embedding.word_embedding.weight" not in state_dict and "classifier.nonlinearity.5.weight" in state_dict:
        # A save that kept one name of the tied pair (transformers' shared-tensor removal) may keep this one.
        state_dict = {**state_dict, "embedding.word_embedding.weight": state_dict["classifier.nonlinearity.5.weight"]}
    for key, value in state_dict.items():
        if _DERIVED_KEYS.search(key):
            continue
        for pattern, replacement in CHECKPOINT_KEY_MAPPING.items():
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        converted[key] = value
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Model


class LtgBertModel(LtgBertPreTrainedModel):
    """The bare encoder: last hidden state of every token (no pooler, no final LayerNorm)."""

    def __init__(self, config: LtgBertConfig):
        super().__init__(config)
        self.embeddings = LtgBertEmbeddings(config)
        self.encoder = LtgBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,  # accepted for tokenizer/pipeline compatibility; unused
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """``input_ids`` [batch, seq] or ``inputs_embeds`` [batch, seq, hidden] (exactly one of them);
        ``attention_mask`` [batch, seq], 1 for real tokens."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LtgBertModel: pass exactly one of input_ids and inputs_embeds")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        padding_mask = None if attention_mask is None else attention_mask.bool()  # [batch, seq], True = real token
        hidden, relative = self.embeddings(input_ids, inputs_embeds)
        hidden, all_hidden, all_probs = self.encoder(
            hidden, relative, padding_mask, output_attentions, output_hidden_states
        )
        output = BaseModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, attentions=all_probs)
        return self._return(output, return_dict)


# ---------------------------------------------------------------------------------------------------------------
# Heads


class LtgBertHeadTransform(nn.Module):
    """norm -> dense -> GELU (exact, erf) -> norm: the published heads' first half (MLM and classifiers)."""

    def __init__(self, config: LtgBertConfig):
        super().__init__()
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)

    def forward(self, hidden):
        return self.output_norm(F.gelu(self.dense(self.input_norm(hidden))))


class LtgBertTiedDecoder(nn.Linear):
    """Vocabulary projection whose weight is the word-embedding matrix (marker type for initialisation)."""


class LtgBertMaskedLMHead(LtgBertHeadTransform):
    """The head transform, dropout and the tied vocabulary projection with its output bias."""

    def __init__(self, config: LtgBertConfig):
        super().__init__(config)
        self.dropout = LtgBertDropout(config.hidden_dropout_prob)
        # The bias lives in the decoder, so resize_token_embeddings resizes it with the projection.
        self.decoder = LtgBertTiedDecoder(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden):
        return self.decoder(self.dropout(super().forward(hidden)))


class LtgBertForMaskedLM(LtgBertPreTrainedModel):
    """LTG-BERT with its masked-language-modelling head.

    ``logits`` are [batch, seq, vocab], with labels too. ``labelled_logits_only=True`` (pretraining, zero-shot
    scoring) projects onto the vocabulary only where ``labels != -100``: ``logits`` are then
    [num_labelled, vocab] in row-major order of those positions, and the loss is the same.
    """

    _tied_weights_keys = {"lm_head.decoder.weight": "ltgbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: LtgBertConfig):
        super().__init__(config)
        self.ltgbert = LtgBertModel(config)
        self.lm_head = LtgBertMaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """As BERT's; the keyword ``labelled_logits_only: bool = False`` (see the class docstring) is read from
        ``kwargs``: a parameter whose name contains "label" would count as a label column for transformers'
        Trainer (``find_labels``), which then finds no labels in a batch and skips ``compute_metrics``."""
        labelled_logits_only = bool(kwargs.pop("labelled_logits_only", False))
        encoded = self.ltgbert(
            input_ids,
            attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = encoded.last_hidden_state  # [batch, seq, hidden]
        loss = None
        if labels is not None and labelled_logits_only:
            selected = labels != -100  # [batch, seq]
            logits = self.lm_head(hidden[selected])  # [num_labelled, vocab]
            loss = F.cross_entropy(logits.float(), labels[selected])
        else:
            logits = self.lm_head(hidden)  # [batch, seq, vocab]
            if labels is not None:
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.view(-1))
        output = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return self._return(output, return_dict)


class LtgBertClassifierModel(LtgBertPreTrainedModel):
    """The encoder and the output layer that every classification head shares.

    The output layer is BERT's (dropout, then ``classifier``: Linear(hidden, outputs)); with
    ``config.classifier_head = "mlp"`` it is the published LTG-BERT classifier: ``head_transform``
    (norm -> dense -> GELU -> norm) first, so fine-tuned published checkpoints load with their outputs.
    """

    def __init__(self, config: LtgBertConfig, num_outputs: int):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ltgbert = LtgBertModel(config)
        self.head_transform = LtgBertHeadTransform(config) if config.classifier_head == "mlp" else None
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = LtgBertDropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_outputs)
        self.post_init()

    def classify(self, hidden):
        """[..., hidden] -> [..., outputs]."""
        if self.head_transform is not None:
            hidden = self.head_transform(hidden)
        return self.classifier(self.dropout(hidden))

    def encode(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states):
        return self.ltgbert(
            input_ids,
            attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )


class LtgBertForSequenceClassification(LtgBertClassifierModel):
    """Classification or regression on the first ([CLS]) token.

    The problem type follows transformers' BERT: set ``config.problem_type``, or it is detected from
    ``num_labels`` (1 -> regression) and the label dtype (integers -> single label, floats -> multi-label).
    """

    def __init__(self, config: LtgBertConfig):
        super().__init__(config, config.num_labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        encoded = self.encode(input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states)
        logits = self.classify(encoded.last_hidden_state[:, 0])  # [batch, num_labels]
        loss = None if labels is None else self.compute_loss(logits, labels)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return self._return(output, return_dict)

    def compute_loss(self, logits, labels):
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze().float(), labels.squeeze().to(torch.float32))
            return F.mse_loss(logits.float(), labels.to(torch.float32))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))


class LtgBertForTokenClassification(LtgBertClassifierModel):
    """A label for every token (NER, POS); labels of -100 (padding, non-first subwords) are ignored."""

    def __init__(self, config: LtgBertConfig):
        super().__init__(config, config.num_labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        encoded = self.encode(input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states)
        logits = self.classify(encoded.last_hidden_state)  # [batch, seq, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return self._return(output, return_dict)


class LtgBertForMultipleChoice(LtgBertClassifierModel):
    """One score per choice from each choice's [CLS] token; inputs are [batch, choices, seq]."""

    def __init__(self, config: LtgBertConfig):
        super().__init__(config, 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        choices_of = input_ids if input_ids is not None else inputs_embeds  # neither: LtgBertModel says so
        num_choices = None if choices_of is None else choices_of.shape[1]

        def flat(x):  # [batch, choices, seq, ...] -> [batch * choices, seq, ...]
            return None if x is None else x.reshape(-1, *x.shape[2:])

        encoded = self.encode(
            flat(input_ids), flat(attention_mask), flat(inputs_embeds), output_attentions, output_hidden_states
        )
        logits = self.classify(encoded.last_hidden_state[:, 0]).view(-1, num_choices)  # [batch, choices]
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        output = MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return self._return(output, return_dict)


class LtgBertForQuestionAnswering(LtgBertClassifierModel):
    """Extractive question answering: a start and an end score for every token.

    The loss is BERT's: the mean of the start and end cross-entropies, positions outside the sequence clamped
    to its length and ignored.
    """

    def __init__(self, config: LtgBertConfig):
        super().__init__(config, 2)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        encoded = self.encode(input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states)
        logits = self.classify(encoded.last_hidden_state)  # [batch, seq, 2]
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))  # [batch, seq]
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            # Multi-GPU gathers may add a dimension; positions beyond the sequence are ignored.
            start = start_positions.view(-1).clamp(0, ignored)
            end = end_positions.view(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return self._return(output, return_dict)


# Auto class -> our class: what ltgbert/__init__.py registers and save_pretrained's auto_map names.
AUTO_CLASSES = {
    "AutoModel": LtgBertModel,
    "AutoModelForMaskedLM": LtgBertForMaskedLM,
    "AutoModelForSequenceClassification": LtgBertForSequenceClassification,
    "AutoModelForTokenClassification": LtgBertForTokenClassification,
    "AutoModelForMultipleChoice": LtgBertForMultipleChoice,
    "AutoModelForQuestionAnswering": LtgBertForQuestionAnswering,
}


# ===============================================================================================================
# CPU and compile fast paths
#
# Everything below computes exactly what the code above describes, faster on the paths named; BENCHMARKS.md
# has the measurements. Dropout: masks from 16 random bits per element (eager and compiled CPU training).
# Relative bias: one flat index_select per table (eager). GeGLU: the exp form of the tanh GELU (compiled).
# Flex attention: the bias inside the kernel. Nothing here changes the function or the checkpoint layout.
# ===============================================================================================================


class LtgBertDropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU training path; the same module everywhere else.

    CPU ``bernoulli_`` (what ``nn.Dropout`` draws its mask with) is slow per element, enough to show in a small
    model's CPU training step. Here one full-range 64-bit draw yields four 16-bit numbers, and an element is
    dropped when its number is below round(p * 65536): p is used to within 2^-17, the kept values are scaled by
    the exact inverse of the keep rate, and the mask comes from the default generator (seeding and the RNG
    replay of gradient checkpointing work as with nn.Dropout). Autograd keeps the 16-bit numbers (2 bytes per
    element; nn.Dropout keeps a 4-byte float mask). Compiled on CPU, the same bits are drawn by an opaque op
    and the compiler fuses the mask into the neighbouring element-wise work (the same masks as eager for the
    same seed). GPUs, whose dropout is fused, use nn.Dropout.
    """

    def forward(self, x):
        threshold = round(self.p * 65536)
        fast = self.training and 0 < threshold < 65536 and x.device.type == "cpu" and not self.inplace
        if fast and torch.compiler.is_compiling():
            # Inductor's own CPU random numbers are drawn element by element, slower than this draw; the bits
            # come from an opaque op and the compiler fuses the mask into the neighbouring ops.
            return _apply_mask(x, _DROPOUT_BITS(x), threshold)
        if fast:
            return _BitMaskDropout.apply(x, threshold)
        return super().forward(x)


class _BitMaskDropout(torch.autograd.Function):
    """Dropout whose keep-mask comes from 16 random bits per element (see LtgBertDropout)."""

    @staticmethod
    def forward(ctx, x, threshold):
        bits = _draw_bits(x)
        ctx.threshold = threshold
        ctx.save_for_backward(bits)  # 2 bytes per element; the backward rebuilds the mask from them
        return _apply_mask(x, bits, threshold)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return _apply_mask(grad, bits, ctx.threshold), None


def _draw_bits(x):
    """16 random bits per element of x, as int16 of x's shape (signed: the unsigned value minus 32768).

    One full-range draw from the default generator fills four elements.
    """
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return words.view(torch.int16)[: x.numel()].view(x.shape)  # [4 * words] int16 -> x's shape


def _apply_mask(x, bits, threshold):
    """x * keep / (1 - the probability actually used), keep = 0 where the 16-bit number, read as unsigned, is
    below threshold (0 < threshold < 65536).

    The 0/1 mask is built with a cast and an in-place comparison on floats: on CPU, bool tensors (a
    comparison's result, or a bool operand that TensorIterator casts for a float product) are slower per
    element. The comparison runs in float32 (exact for 16-bit integers) or float64, never in a 16-bit float;
    the scale is applied last, as a Python scalar, so that a bf16 product is rounded once.
    """
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    keep = bits.to(work).ge_(threshold - 32768).to(x.dtype)
    return (x * keep).mul_(65536.0 / (65536 - threshold))


def _compiled_draw_bits():
    """``_draw_bits`` as a custom op, for the compiled CPU dropout (see LtgBertDropout).

    torch.compile keeps the op opaque and fuses the mask arithmetic around it; the nondeterministic_seeded
    tag keeps the compiler from merging two draws or recomputing one. Registered once per process: a second
    copy of this file (remote code next to the installed package) reuses the first registration.
    """
    if not hasattr(torch.ops.ltgbert, "dropout_bits"):
        # torch.library.define/impl/register_fake rather than custom_op, whose tags argument needs torch 2.8.
        name = "ltgbert::dropout_bits"
        torch.library.define(name, "(Tensor x) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
        torch.library.impl(name, "CompositeExplicitAutograd", _draw_bits)
        torch.library.register_fake(name, lambda x: torch.empty(x.shape, dtype=torch.int16, device=x.device))
    return torch.ops.ltgbert.dropout_bits


_DROPOUT_BITS = _compiled_draw_bits()


def _flat_bucket_index(bucket_index, buckets):
    """Flat column indices into [seq * buckets] tables: q * buckets + b(q, k) and k * buckets + b(q, k)."""
    query_len, key_len = bucket_index.shape
    c2p_index = torch.arange(query_len, device=bucket_index.device)[:, None] * buckets + bucket_index
    p2c_index = torch.arange(key_len, device=bucket_index.device)[None, :] * buckets + bucket_index
    return c2p_index.view(-1), p2c_index.view(-1)  # each [query * key]


def _flat_position_bias(c2p, p2c, bucket_index):
    """LtgBertAttention.position_bias in eager mode: each table flattened to [batch * heads, seq * buckets] and
    read with one index_select at a flat index (row q or k, column bucket(q, k)).

    On CPU this beats two gathers plus a transposed add, and its backward (index_add) beats gather's
    scatter_add; compiled, it is the other way round (an integer division per element), hence the two paths.
    On CPU, 16-bit tables are gathered in float32: ATen's index_select along dim 1 is slower for 2-byte types
    than the casts cost. Forward and backward are bit for bit those of the 16-bit gather: the gather copies,
    and the sum and the backward's index_add are rounded to the table dtype once either way (CPU index_add
    accumulates 16-bit floats in float32).
    """
    batch, heads, seq, buckets = c2p.shape
    dtype = c2p.dtype
    if c2p.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        c2p, p2c = c2p.float(), p2c.float()
    c2p_index, p2c_index = _flat_bucket_index(bucket_index, buckets)
    bias = c2p.reshape(batch * heads, seq * buckets).index_select(1, c2p_index)  # [batch * heads, q * k]: q.Kpos
    bias = bias + p2c.reshape(batch * heads, seq * buckets).index_select(1, p2c_index)  # + k.Qpos[b(q, k)]
    return bias.view(batch, heads, seq, seq).to(dtype)  # [batch, heads, query, key]


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _compiled_geglu(value, gate):
    """value * gelu_tanh(gate) in the exp form: 0.5 * gate * (1 + tanh(u)) = gate / (1 + exp(-2u)), with
    u = sqrt(2 / pi) * (gate + 0.044715 * gate^3); inductor's CPU code for exp is faster than its tanh."""
    two_u = gate * (2 * _SQRT_2_OVER_PI) * (1 + 0.044715 * gate * gate)
    return value * gate / (1 + torch.exp(-two_u))


def flex_attention_forward(query, key, value, c2p, p2c, bucket_index, padding_mask, scale):
    """Attention with the relative bias computed inside the kernel from the small per-bucket tables.

    Never builds a [batch, heads, T, T] bias: the score_mod reads c2p/p2c at the pair's bucket, and padding
    becomes a block mask. Compile the model (torch.compile) for speed; eager flex is a reference path.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, seq, _ = query.shape

    def score_mod(score, b, h, q_idx, kv_idx):
        bucket = bucket_index[q_idx, kv_idx]
        return score + c2p[b, h, q_idx, bucket] + p2c[b, h, kv_idx, bucket]

    block_mask = None
    if padding_mask is not None:

        def mask_mod(b, h, q_idx, kv_idx):
            return padding_mask[b, kv_idx]

        block_mask = create_block_mask(mask_mod, batch, None, seq, seq, device=query.device)
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
