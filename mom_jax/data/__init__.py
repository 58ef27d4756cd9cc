"""Data for mom_jax: MQAR generated in-process, offline tokenizers, packed text, grain pipelines.

Batch format (dicts of numpy arrays; ``B`` = per-process batch, ``T`` = sequence length)::

    inputs        int32   [B, T]
    targets       int32   [B, T]   next-token ids
    loss_mask     float32 [B, T]
    num_kv_pairs  int32   [B]      (MQAR only)
"""

from mom_jax.data.mqar import (MQARExamples, accuracy_by_num_kv_pairs, check_mqar_args,
                               generate_mqar, generate_mqar_compact, query_accuracy)
from mom_jax.data.pipeline import (DATASET_NAMES, default_mqar_config, default_text_config, describe,
                                   get_vocab_size, make_eval_batches, make_train_iterator,
                                   train_source, validate_config)
from mom_jax.data.text import (SUPPORTED_EXTENSIONS, PackedWindows, builtin_corpus_documents,
                               load_documents, load_token_streams, read_documents, split_documents,
                               tokenize_and_pack)
from mom_jax.data.tokenizer import (ByteTokenizer, MistralTokenizer, Tokenizer, get_tokenizer,
                                    mistral_model_path)

__all__ = [
    "ByteTokenizer", "DATASET_NAMES", "MQARExamples", "MistralTokenizer", "PackedWindows",
    "SUPPORTED_EXTENSIONS", "Tokenizer", "accuracy_by_num_kv_pairs", "builtin_corpus_documents",
    "check_mqar_args", "default_mqar_config", "default_text_config", "describe", "generate_mqar",
    "generate_mqar_compact", "get_tokenizer", "get_vocab_size", "load_documents",
    "load_token_streams", "make_eval_batches", "make_train_iterator", "mistral_model_path",
    "query_accuracy", "read_documents", "split_documents", "tokenize_and_pack", "train_source",
    "validate_config",
]
