"""The BERT model: encoder (:class:`BertModel`) and heads (:class:`BertForMLM`, :class:`BertForClassification`)."""

from .bert import BertModel, count_parameters, with_config
from .electra import ElectraForPretraining, encoder_of, mlm_of, pretraining_model
from .heads import BertForClassification, BertForMLM, MLMHead
from .layers import attention

__all__ = ["BertModel", "BertForMLM", "BertForClassification", "ElectraForPretraining", "MLMHead", "attention",
           "count_parameters", "encoder_of", "mlm_of", "pretraining_model", "with_config"]
