"""Data: offline tfds builders, tokenizers, packing and step-indexed batches."""
import numpy as np
import pytest

from jaxgen import data
from jaxgen.data import builders
from jaxgen.errors import JaxgenError


def test_stdlib_corpus_builds_offline(data_dir):
    train = data.load_texts("python_stdlib", "train", data_dir=data_dir, max_files=30)
    val = data.load_texts("python_stdlib", "validation", data_dir=data_dir, max_files=30)
    assert len(train) > 20 and len(val) >= 1
    assert any("def " in t for t in train)
    again = data.load_texts("python_stdlib", "train", data_dir=data_dir, max_files=30)
    assert again == train  # deterministic split and order


def test_text_files_builder(tmp_path, data_dir):
    f = tmp_path / "notes.txt"
    f.write_text("".join(f"line {i}\n" for i in range(2000)))
    train = data.load_texts("text_files", "train", data_files=(str(f),), data_dir=data_dir)
    val = data.load_texts("text_files", "validation", data_files=(str(f),), data_dir=data_dir)
    assert len(train) + len(val) == 2000 // 64 + 1 and len(val) >= 1
    with pytest.raises(JaxgenError, match="does not exist"):
        data.load_texts("text_files", "train", data_files=(str(tmp_path / "nope.txt"),), data_dir=data_dir)
    with pytest.raises(JaxgenError, match="split"):
        data.load_texts("text_files", "test", data_files=(str(f),), data_dir=data_dir)


def test_small_text_files_corpora_split_or_are_refused(tmp_path, data_dir):
    """Fewer than 20 chunks: the last chunk is validation; one chunk is cut in halves; a corpus
    too small for two splits is refused with a message (not tfds's "No examples were yielded")."""
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(300)))  # 5 chunks of 64 lines
    short = tmp_path / "short.txt"
    short.write_text("".join(f"short {i}\n" for i in range(10)))  # one chunk: two halves of 5 lines
    for files, train_texts, val_text in [((one,), 4, "line 256\n"), ((short,), 1, "short 5\n")]:
        kw = dict(data_files=tuple(map(str, files)), data_dir=data_dir)
        train = data.load_texts("text_files", "train", **kw)
        val = data.load_texts("text_files", "validation", **kw)
        assert len(train) == train_texts and len(val) == 1 and val[0].startswith(val_text)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just one line\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for f, what in [(tiny, "has a single line"), (empty, "is empty")]:
        with pytest.raises(JaxgenError, match=f"{what}: too small for a train and a validation split"):
            data.load_texts("text_files", "train", data_files=(str(f),), data_dir=data_dir)
    assert builders.validation_chunks(3) == {2} and builders.validation_chunks(40) == {19, 39}
    with pytest.raises(JaxgenError, match="max_files=1"):
        data.load_texts("python_stdlib", "train", data_dir=data_dir, max_files=1)


def test_byte_tokenizer_roundtrip_and_packing():
    tok = data.ByteTokenizer()
    text = "héllo wörld"
    assert tok.decode(tok.encode(text)) == text
    rows = data.pack(["abc", "defgh"], tok, 4)
    stream = [256, 97, 98, 99, 257, 256, 100, 101, 102, 103, 104, 257]
    np.testing.assert_array_equal(rows, np.asarray(stream).reshape(3, 4))
    with pytest.raises(JaxgenError, match="fewer than one row"):
        data.pack(["a"], tok, 100)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["def foo(x): return x + 1"] * 50,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|mask|>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    tok = data.get_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (1, 2, 3)
    ids = tok.encode("def foo(x)")
    assert list(ids) == t.encode("def foo(x)").ids and len(ids) < len("def foo(x)")  # BPE merges, not bytes
    assert tok.decode(ids) == "def foo(x)"
    with pytest.raises(JaxgenError, match="no tokenizer.json"):
        data.get_tokenizer(str(tmp_path / "missing"))


def test_batches_are_a_function_of_step():
    rows = np.arange(40).reshape(10, 4)
    b = data.Batches(rows, 4, seed=3)
    np.testing.assert_array_equal(b.at(7)["tokens"], data.Batches(rows, 4, seed=3).at(7)["tokens"])
    epoch = np.concatenate([b.at(i)["tokens"][:, 0] for i in range(5)])[:10]  # first epoch covers every row
    assert sorted(epoch // 4) == list(range(10))
    with pytest.raises(JaxgenError, match="packed rows"):
        data.Batches(rows, 11)


def test_validation_bucket_is_stable():
    """Buckets are pinned (a salted or version-dependent hash would move files between splits
    from one run to the next), and about 1 in VALIDATION_EVERY names is validation."""
    pinned = {"os.py": 1, "json/__init__.py": 13, "collections/__init__.py": 2, "argparse.py": 10, "typing.py": 0}
    assert {name: builders._stable_bucket(name) for name in pinned} == pinned
    names = [f"pkg{i // 10}/mod{i}.py" for i in range(4000)]
    share = np.mean([builders._stable_bucket(n) == 0 for n in names])
    assert builders.VALIDATION_EVERY == 20 and 0.035 < share < 0.065
    # a few files with none in bucket 0 (max_files=2, ...): the last one is validation
    assert builders._stdlib_validation(["os.py", "typing.py"]) == {"typing.py"}
    assert builders._stdlib_validation(["os.py", "argparse.py"]) == {"argparse.py"}
