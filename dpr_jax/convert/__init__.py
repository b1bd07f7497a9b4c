"""Hugging Face <-> dpr-jax checkpoints, both directions (Karpukhin et al. 2020, sec. 3.1 and 6.1).

DPR's bi-encoder is two BERT towers E_Q and E_P (sec. 3.1) and its reader a BERT with span and
passage-selection heads (sec. 6.1). Hugging Face ships them as ``DPRQuestionEncoder``,
``DPRContextEncoder`` and ``DPRReader``; DPR itself starts training from a plain ``BertModel``.
The Flax modules here name their parameters after Hugging Face's state-dict keys, so converting
is a rename, a transpose of every Linear weight (``kernel = weight.T``), ``LayerNorm.weight`` <->
``scale`` and ``Embedding.weight`` <-> ``embedding``:

=========================================================  ===========================================
Hugging Face key                                           Flax path
=========================================================  ===========================================
``embeddings.word_embeddings.weight``                      ``embeddings/word_embeddings/embedding``
``embeddings.LayerNorm.weight``                            ``embeddings/LayerNorm/scale``
``encoder.layer.3.attention.self.query.weight``            ``encoder_layer_3/attention_self/query/kernel``
``encoder.layer.3.attention.output.dense.bias``            ``encoder_layer_3/attention_output_dense/bias``
``encoder.layer.3.output.LayerNorm.weight``                ``encoder_layer_3/output_LayerNorm/scale``
``pooler.dense.weight``                                    ``pooler_dense/kernel``
``question_encoder.bert_model.<bert key>``                 ``question_encoder/bert_model/<bert path>``
``question_encoder.encode_proj.weight``                    ``question_encoder/encode_proj/kernel``
``ctx_encoder.bert_model.<bert key>``                      ``ctx_encoder/bert_model/<bert path>``
``span_predictor.encoder.bert_model.<bert key>``           ``encoder/bert_model/<bert path>``
``span_predictor.qa_outputs.weight``                       ``qa_outputs/kernel``
``span_predictor.qa_classifier.weight``                    ``qa_classifier/kernel``
=========================================================  ===========================================

The two pure functions :func:`hf_state_dict_to_flax` and :func:`flax_to_hf_state_dict` work on
numpy arrays (no torch) and are strict: the expected key set and every shape follow from the
config, and a missing key, an extra key or a wrong shape raises ``ValueError`` naming the key.
A few legacy layouts are normalised first (:func:`normalize_hf_state_dict`): ``LayerNorm.gamma /
beta``, the ``position_ids`` / ``token_type_ids`` buffers, a ``bert.`` prefix with task heads
(``BertForPreTraining`` and friends; the heads are dropped and listed) and the unused BERT pooler
that transformers 4 kept inside DPR encoders (transformers 5 builds them with
``add_pooling_layer=False`` and DPR reads the [CLS] vector of the last layer).

Every output is written into a temporary sibling directory and renamed into place once complete,
after every check has passed; an existing non-empty destination is replaced only with
``--overwrite``. Exported Hugging Face directories carry ``dpr_jax_export.json`` (what made them).

The package, by job: :mod:`.tables` (the key tables), :mod:`.hf_dir` (reading and writing
Hugging Face directories), :mod:`.from_hf` (Hugging Face and DPR ``.cp`` -> model directory),
:mod:`.to_hf` (model directory -> Hugging Face). The command line and what each source becomes:
:mod:`dpr_jax.cli.convert`.
"""

from dpr_jax.convert.from_hf import FROM_HF, convert_from_dpr, convert_from_hf
from dpr_jax.convert.hf_dir import HFCheckpoint, read_hf, write_hf_dir
from dpr_jax.convert.tables import (
    ARCHITECTURES,
    flax_to_hf_state_dict,
    hf_param_shapes,
    hf_state_dict_to_flax,
    normalize_hf_state_dict,
)
from dpr_jax.convert.to_hf import EXPORT_FORMATS, TO_HF, convert_to_hf

__all__ = [
    "ARCHITECTURES", "EXPORT_FORMATS", "FROM_HF", "TO_HF", "HFCheckpoint", "convert_from_dpr",
    "convert_from_hf", "convert_to_hf", "flax_to_hf_state_dict", "hf_param_shapes",
    "hf_state_dict_to_flax", "normalize_hf_state_dict", "read_hf", "write_hf_dir",
]  # fmt: skip
