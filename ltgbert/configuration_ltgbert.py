"""LTG-BERT configuration.

The field names are those of the published LTG-BERT checkpoints (Samuel et al., 2023), so their
``config.json`` files load as they are. This file imports only transformers: it ships inside every saved
checkpoint as remote code.
"""

from transformers import PretrainedConfig

# Named sizes. xs/small/base are the published LTG-BERT shapes; tiny is for tests, demo for the built-in
# default run (small enough to pretrain on a laptop CPU in minutes).
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
    "xs": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=512),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
}


class LtgBertConfig(PretrainedConfig):
    """Configuration of an LTG-BERT encoder and its heads.

    Args:
        vocab_size: size of the WordPiece vocabulary.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of transformer layers.
        num_attention_heads: attention heads per layer; must divide ``hidden_size``.
        intermediate_size: width of the GeGLU feed-forward (the up-projection is twice as wide).
        max_position_embeddings: longest relative distance that gets its own log bucket; longer sequences
            still work, distances beyond this share the outermost bucket.
        position_bucket_size: number of relative-position buckets on each side; even, at least 4.
        layer_norm_eps: epsilon of every LayerNorm (the published models use 1e-7).
        hidden_dropout_prob: dropout on embeddings and on the output of every sub-layer.
        attention_probs_dropout_prob: dropout on attention probabilities and the relative-position table.
        classifier_dropout: dropout before the output layer of every classification head (sequence, token,
            multiple choice, question answering); ``hidden_dropout_prob`` if None.
        classifier_head: what the classification heads put on the encoder output. "linear" (default): dropout
            and one linear layer, as transformers' BERT (without its pooler). "mlp": the head of the published
            LTG-BERT / HPLT code (LayerNorm -> dense -> GELU -> LayerNorm -> dropout -> linear); loading a
            published fine-tuned checkpoint picks it. Not in published configs (new here).
        gradient_checkpointing_mode: what ``gradient_checkpointing_enable()`` recomputes: "full" (whole layers)
            or "selective" (only the attention core and the GeGLU activation; no matmul runs twice). Not in
            published configs (new here); it has no effect until checkpointing is enabled.
        problem_type: "regression", "single_label_classification" or "multi_label_classification";
            None detects it from ``num_labels`` and the label dtype, as transformers' BERT does.
    """

    model_type = "ltgbert"

    def __init__(
        self,
        vocab_size: int = 16384,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 2048,
        max_position_embeddings: int = 512,
        position_bucket_size: int = 32,
        layer_norm_eps: float = 1e-7,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        classifier_dropout: float | None = None,
        classifier_head: str = "linear",
        gradient_checkpointing_mode: str = "full",
        unk_token_id: int = 0,
        cls_token_id: int = 1,
        sep_token_id: int = 2,
        pad_token_id: int = 3,
        mask_token_id: int = 4,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        super().__init__(
            pad_token_id=pad_token_id,
            sep_token_id=sep_token_id,
            cls_token_id=cls_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.position_bucket_size = position_bucket_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.classifier_head = classifier_head
        self.gradient_checkpointing_mode = gradient_checkpointing_mode
        self.unk_token_id = unk_token_id
        self.mask_token_id = mask_token_id
        self._validate()

    def _validate(self):
        # ValueError, not a custom type: this file must import nothing but transformers (remote code).
        def check(ok, message):
            if not ok:
                raise ValueError(f"LtgBertConfig: {message}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
            f"({self.num_attention_heads}); pick a head count that divides it",
        )
        check(
            self.position_bucket_size >= 4 and self.position_bucket_size % 2 == 0,
            f"position_bucket_size must be even and at least 4, got {self.position_bucket_size}",
        )
        check(
            self.max_position_embeddings - 1 > self.position_bucket_size // 2,
            f"max_position_embeddings ({self.max_position_embeddings}) must exceed position_bucket_size // 2 + 1 "
            f"({self.position_bucket_size // 2 + 1}) so that the log buckets are defined",
        )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        check(self.layer_norm_eps > 0, "layer_norm_eps must be positive")
        check(
            self.classifier_head in ("linear", "mlp"),
            f'classifier_head must be "linear" or "mlp", got {self.classifier_head!r}',
        )
        check(
            self.gradient_checkpointing_mode in ("full", "selective"),
            f'gradient_checkpointing_mode must be "full" or "selective", got {self.gradient_checkpointing_mode!r}',
        )

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "LtgBertConfig":
        """A config of a named size (tiny, demo, xs, small, base); kwargs override any field."""
        if name not in PRESETS:
            raise ValueError(f"unknown LTG-BERT size preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})
