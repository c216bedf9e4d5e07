"""ltgbert: pretrain LTG-BERT encoders with masked language modelling and fine-tune them for classification.

Importing the package registers the LTG-BERT config and model classes with transformers' Auto classes, and
marks them for ``save_pretrained`` to write ``auto_map`` plus the two source files, so a saved directory also
loads with ``trust_remote_code=True`` where this package is not installed. Nothing else happens at import.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from .configuration_ltgbert import PRESETS, LtgBertConfig
from .modeling_ltgbert import (
    LtgBertForMaskedLM,
    LtgBertForSequenceClassification,
    LtgBertModel,
    LtgBertPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(LtgBertConfig.model_type, LtgBertConfig, exist_ok=True)
for _auto, _cls in (
    (AutoModel, LtgBertModel),
    (AutoModelForMaskedLM, LtgBertForMaskedLM),
    (AutoModelForSequenceClassification, LtgBertForSequenceClassification),
):
    _auto.register(LtgBertConfig, _cls, exist_ok=True)
    _cls.register_for_auto_class(_auto.__name__)
LtgBertConfig.register_for_auto_class()

__all__ = [
    "PRESETS",
    "LtgBertConfig",
    "LtgBertForMaskedLM",
    "LtgBertForSequenceClassification",
    "LtgBertModel",
    "LtgBertPreTrainedModel",
]
