"""Offline corpora (tfds builders), tokenizers and packing; continuous data sets (toys, digits)."""
from jaxgen.data.pipeline import Batches, corpus, load_texts, pack  # noqa: F401
from jaxgen.data.tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer  # noqa: F401
from jaxgen.data.continuous import (ArrayBatches, Toy, continuous_batches, continuous_data,  # noqa: F401
                                    load_continuous, toy)
