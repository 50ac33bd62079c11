"""Offline corpora (tfds builders), tokenizers and packing."""
from jaxgen.data.pipeline import Batches, corpus, load_texts, pack  # noqa: F401
from jaxgen.data.tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer  # noqa: F401
