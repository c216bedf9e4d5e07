"""ltgbert: pretrain LTG-BERT encoders with masked language modelling and fine-tune them for classification.

Importing the package registers the LTG-BERT config and model classes with transformers' Auto classes
(``AutoModel``, ``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``,
``AutoModelForTokenClassification``, ``AutoModelForMultipleChoice``, ``AutoModelForQuestionAnswering``), and
marks them for ``save_pretrained`` to write ``auto_map`` plus the two source files, so a saved directory also
loads with ``trust_remote_code=True`` where this package is not installed. Nothing else happens at import.
"""

import transformers

from .configuration_ltgbert import PRESETS, LtgBertConfig
from .modeling_ltgbert import (
    AUTO_CLASSES,
    LtgBertForMaskedLM,
    LtgBertForMultipleChoice,
    LtgBertForQuestionAnswering,
    LtgBertForSequenceClassification,
    LtgBertForTokenClassification,
    LtgBertModel,
    LtgBertPreTrainedModel,
)

__version__ = "0.1.0"

transformers.AutoConfig.register(LtgBertConfig.model_type, LtgBertConfig, exist_ok=True)
for _auto_name, _cls in AUTO_CLASSES.items():
    getattr(transformers, _auto_name).register(LtgBertConfig, _cls, exist_ok=True)
    _cls.register_for_auto_class(_auto_name)
LtgBertConfig.register_for_auto_class()

__all__ = [
    "PRESETS",
    "LtgBertConfig",
    "LtgBertForMaskedLM",
    "LtgBertForMultipleChoice",
    "LtgBertForQuestionAnswering",
    "LtgBertForSequenceClassification",
    "LtgBertForTokenClassification",
    "LtgBertModel",
    "LtgBertPreTrainedModel",
]
