"""Data pipeline: sources, packing, determinism, iterator state, host sharding, bad input."""

import pathlib

import numpy as np
import pytest

from glocal.tokenizers import ByteTokenizer
from glocal.train import data

TOK = ByteTokenizer()
EOS = TOK.eos_id


def make_folder(root, n_docs=60, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "class", "return", "self", "import", "for", "in", "if", "else", "x", "y", "=", "(", ")"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(words, size=rng.integers(20, 120)))
        (root / f"doc{i:03d}.py").write_text(text + "\n")
    (root / ".hidden").write_text("never read")
    (root / "blob.bin.dat").write_bytes(b"\0\1\2binary")
    return root


def naive_rows(tokens, idx, T, eos):
    """Loop reference for Windows.rows: segment id counts EOS seen before each input token."""
    out = {k: [] for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    for i in idx:
        w = [int(t) for t in tokens[i * T: i * T + T + 1]]
        seg, pos, segs, poss = 0, 0, [], []
        for j in range(T + 1):
            if j > 0 and w[j - 1] == eos:
                seg += 1
                pos = 0
            segs.append(seg)
            poss.append(pos)
            pos += 1
        out["inputs"].append(w[:-1])
        out["targets"].append(w[1:])
        out["positions"].append(poss[:-1])
        out["segment_ids"].append([s + 1 for s in segs[:-1]])
        out["loss_mask"].append([float(segs[j] == segs[j + 1]) for j in range(T)])
    return {k: np.array(v) for k, v in out.items()}


def test_folder_source_splits_documents_and_skips_hidden_and_binary(tmp_path):
    folder = make_folder(tmp_path / "corpus")
    c = data.load_corpus(str(folder), tokenizer=TOK, vocab_size=384)
    files = sorted(folder.glob("doc*.py"))
    docs = [np.concatenate([[TOK.bos_id], np.frombuffer(f.read_bytes(), np.uint8), [EOS]]) for f in files]
    np.testing.assert_array_equal(c.val, np.concatenate(docs[49::50]))
    np.testing.assert_array_equal(c.train, np.concatenate([d for i, d in enumerate(docs) if i % 50 != 49]))
    assert c.eos_id == EOS and "60 text files" in c.description


def test_token_array_and_text_sources(tmp_path):
    ids = np.arange(5000) % 300
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    ids.astype(np.uint16).tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        c = data.load_corpus(str(tmp_path / name), tokenizer=TOK, vocab_size=384, val_fraction=0.1)
        np.testing.assert_array_equal(np.concatenate([c.train, c.val]), ids)
        assert len(c.val) == 500 and c.eos_id is None
    c = data.load_corpus(str(tmp_path / "t.npy"), tokenizer=TOK, vocab_size=384, eos_id=299)
    rows = data.Windows(c.train, 310, c.eos_id, True, "t").rows(np.array([0]))
    assert rows["segment_ids"][0, 299] == 1 and rows["segment_ids"][0, 300] == 2  # new doc after id 299
    assert rows["positions"][0, 300] == 0 and rows["loss_mask"][0, 299] == 0
    (tmp_path / "a.txt").write_text("hello world " * 100)
    c = data.load_corpus(str(tmp_path / "a.txt"), tokenizer=TOK, vocab_size=384, val_spec=str(tmp_path / "a.txt"))
    np.testing.assert_array_equal(c.train, c.val)
    assert c.train[0] == TOK.bos_id and c.train[-1] == EOS


def test_array_record_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "docs.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    texts = [f"record number {i}\n".encode() for i in range(60)]
    for t in texts:
        w.write(t)
    w.close()
    c = data.load_corpus(str(path), tokenizer=TOK, vocab_size=384)
    expect_val = np.concatenate([[TOK.bos_id], np.frombuffer(texts[49], np.uint8), [EOS]])
    np.testing.assert_array_equal(c.val, expect_val)


def test_default_corpus_is_the_stdlib():
    files = data.default_corpus_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    import sysconfig
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel


def test_packing_matches_loop_reference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, size=2000)
    tokens[rng.random(2000) < 0.05] = EOS
    T = 32
    w = data.Windows(tokens, T, EOS, pack=True, what="t")
    idx = np.array([0, 3, 17, len(w) - 1])
    got, want = w.rows(idx), naive_rows(tokens, idx, T, EOS)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["loss_mask"].min() == 0  # some boundary was crossed
    unpacked = data.Windows(tokens, T, EOS, pack=False, what="t").rows(idx)
    assert (unpacked["segment_ids"] == 1).all() and (unpacked["loss_mask"] == 1).all()
    np.testing.assert_array_equal(unpacked["positions"], np.broadcast_to(np.arange(T), (4, T)))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_is_deterministic_reshuffles_and_restores():
    tokens = np.arange(20_000)  # a window's first token identifies it
    w = data.Windows(tokens, 16, None, pack=True, what="t")
    a = _take(data.train_iterator(w, batch_size=8, grad_accum=2, seed=3), 5)
    b = _take(data.train_iterator(w, batch_size=8, grad_accum=2, seed=3), 5)
    c = _take(data.train_iterator(w, batch_size=8, grad_accum=2, seed=4), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert a[0]["inputs"].shape == (2, 4, 16)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))
    # windows of one epoch are all distinct (a permutation, not sampling with replacement)
    firsts = np.concatenate([x["inputs"][:, :, 0].ravel() for x in a])
    assert len(set(firsts.tolist())) == len(firsts)
    # state round trip onto a fresh iterator
    it = data.train_iterator(w, batch_size=8, grad_accum=2, seed=3)
    _take(it, 2)
    state = it.get_state()
    rest = _take(it, 3)
    it2 = data.train_iterator(w, batch_size=8, grad_accum=2, seed=3)
    it2.set_state(state)
    for x, y in zip(rest, _take(it2, 3)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_processes_rows_make_the_global_batch():
    tokens = np.arange(20_000) % 250
    w = data.Windows(tokens, 16, None, pack=True, what="t")
    whole = _take(data.train_iterator(w, batch_size=8, grad_accum=2, seed=1), 3)
    parts = [_take(data.train_iterator(w, batch_size=8, grad_accum=2, seed=1, rows=slice(2 * h, 2 * h + 2)), 3)
             for h in range(2)]
    for i in range(3):
        joined = np.concatenate([parts[0][i]["inputs"], parts[1][i]["inputs"]], axis=1)
        np.testing.assert_array_equal(joined, whole[i]["inputs"])
    evals = [data.eval_batches(w, batch_size=4, num_batches=2, rows=r) for r in (slice(0, 2), slice(2, 4), None)]
    for a, b, both in zip(*evals):
        np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), both["inputs"])


def test_eval_batches_are_fixed_and_cover_the_split():
    tokens = np.arange(10_000) % 250
    w = data.Windows(tokens, 16, None, pack=True, what="t")
    a = data.eval_batches(w, batch_size=4, num_batches=3)
    b = data.eval_batches(w, batch_size=4, num_batches=3)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, b))
    np.testing.assert_array_equal(a[0]["inputs"][0], tokens[:16])
    np.testing.assert_array_equal(a[-1]["inputs"][-1], tokens[(len(w) - 1) * 16:(len(w) - 1) * 16 + 16])


def test_bad_inputs_give_clear_errors(tmp_path):
    kw = dict(tokenizer=TOK, vocab_size=384)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_corpus(str(tmp_path / "nope"), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="is empty"):
        data.load_corpus(str(tmp_path / "empty"), **kw)
    np.save(tmp_path / "big.npy", np.array([1, 2, 3, 999, 4] * 10, np.int32))
    with pytest.raises(data.DataError, match=r"token id 999 \(first at position 3\).*outside.*\[0, 384\)"):
        data.load_corpus(str(tmp_path / "big.npy"), **kw)
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
    with pytest.raises(data.DataError, match="not a whole number of uint16"):
        data.load_corpus(str(tmp_path / "odd.bin"), **kw)
    np.save(tmp_path / "f.npy", np.ones((4, 4), np.float32))
    with pytest.raises(data.DataError, match="1-D integer"):
        data.load_corpus(str(tmp_path / "f.npy"), **kw)
    with pytest.raises(data.DataError, match="fewer than one window of seq_len \\+ 1 = 65"):
        data.Windows(np.arange(50), 64, None, True, "validation split")
