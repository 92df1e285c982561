"""The BERT model: encoder (:class:`BertModel`) and heads (:class:`BertForMLM`, :class:`BertForClassification`)."""

from .bert import BertModel, count_parameters, with_config
from .heads import BertForClassification, BertForMLM, MLMHead
from .layers import attention

__all__ = ["BertModel", "BertForMLM", "BertForClassification", "MLMHead", "attention", "count_parameters",
           "with_config"]
