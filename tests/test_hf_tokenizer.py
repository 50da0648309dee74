"""Hugging Face tokenizers (``hf:DIR``): ids against the ``tokenizers`` library itself, BOS/EOS/PAD
from each file that can name them, clear errors, and a tiny run trained, evaluated and sampled
through one (the workdir keeps its own copy)."""

import json
import math
import shutil

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from glocal import workdir as workdirs  # noqa: E402
from glocal.configs.base import ConfigError  # noqa: E402
from glocal.tokenizers import TokenizerError, get_tokenizer  # noqa: E402
from glocal.train import data  # noqa: E402
from tests.test_train import RUN, losses  # noqa: E402

SENTENCES = ["the cat sat on the mat.", "a dog ate the cat's food!", "def f(x): return x + 1",
             "héllo wörld, ünïcode ✓", "the quick brown fox jumps over the lazy dog"]
TEXTS = ["the cat ate the fox", "  two  spaces\nand a newline", "ünïcode ✓ and ✗", "zzz qqq 12345", ""]


def make_tokenizer(folder, specials=("<pad>", "<s>", "</s>", "<|im_end|>"), vocab_size=300):
    """A byte-level BPE trained on a few sentences (lossless: decode(encode(t)) == t), saved
    as ``folder/tokenizer.json``; returns the library's own tokenizer as the reference."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return folder


def test_encode_decode_match_the_library(tok_dir):
    ref = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for spec in (f"hf:{tok_dir}", f"hf:{tok_dir / 'tokenizer.json'}"):
        tok = get_tokenizer(spec)
        assert tok.name == spec and tok.vocab_size == ref.get_vocab_size(with_added_tokens=True) == 300
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == ref.decode(ids) == text
            # Special tokens are dropped on decoding.
            assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
        assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def _ids(folder):
    tok = get_tokenizer(f"hf:{folder}")
    return tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids


@pytest.mark.parametrize("source", ["generation_config", "config", "tokenizer_config", "tokenizer_config_dict",
                                    "special_tokens_map", "vocabulary"])
def test_special_ids_from_each_source(tmp_path, tok_dir, source):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    s, e, p = (ref.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    assert (s, e, p) == (1, 2, 0)
    if source in ("generation_config", "config"):  # ids, here deliberately other than the token names'
        (tmp_path / f"{source}.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": 8, "pad_token_id": 9}))
        assert _ids(tmp_path) == (7, 8, 9, (8,))
        return
    if source != "vocabulary":  # token strings, here swapped against their names
        tokens = {"bos_token": "</s>", "eos_token": "<s>", "pad_token": "<pad>"}
        if source == "tokenizer_config_dict":
            tokens = {k: {"content": v, "lstrip": False} for k, v in tokens.items()}
        name = "special_tokens_map" if source == "special_tokens_map" else "tokenizer_config"
        (tmp_path / f"{name}.json").write_text(json.dumps(tokens))
        assert _ids(tmp_path) == (e, s, p, (s,))
        return
    assert _ids(tmp_path) == (s, e, p, (e,))  # no config files: <s>, </s>, <pad> by name


def test_special_id_precedence_lists_and_fallbacks(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    # generation_config wins over config.json and tokenizer_config.json, key by key; a list of EOS ids
    # (chat models) gives eos_id = the first and all as eos_ids; an id outside the vocabulary (-1) is unset.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6, 2], "bos_token_id": None}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 4, "eos_token_id": 3, "pad_token_id": -1}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "</s>", "bos_token": "<s>"}))
    assert _ids(tmp_path) == (4, 5, 2, (5, 6, 2))
    # GPT-2 style: one <|endoftext|> token is BOS, EOS and PAD.
    gpt = tmp_path / "gpt"
    ref = make_tokenizer(gpt, specials=("<|endoftext|>",))
    eot = ref.token_to_id("<|endoftext|>")
    assert _ids(gpt) == (eot, eot, eot, (eot,))
    # Only an EOS: it is BOS and PAD too.
    eos_only = tmp_path / "eos_only"
    eos = make_tokenizer(eos_only, specials=("</s>",)).token_to_id("</s>")
    assert _ids(eos_only) == (eos, eos, eos, (eos,))
    assert get_tokenizer(f"hf:{eos_only}").sources == {"eos": "the vocabulary's '</s>'", "bos": "EOS (no BOS found)",
                                                       "pad": "EOS (no PAD found)"}
    # No EOS anywhere: the error names the files it looked for.
    none = tmp_path / "none"
    make_tokenizer(none, specials=("[X]",))
    with pytest.raises(TokenizerError, match="no EOS token found.*generation_config.json, config.json, "
                                             "tokenizer_config.json, special_tokens_map.json"):
        get_tokenizer(f"hf:{none}")


def test_clear_errors(tmp_path, tok_dir, monkeypatch):
    with pytest.raises(TokenizerError, match=f"tokenizer path {tmp_path / 'nope'} does not exist"):
        get_tokenizer(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty holds no tokenizer.json"):
        get_tokenizer(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="is not a readable Hugging Face tokenizer file"):
        get_tokenizer(f"hf:{tmp_path / 'bad'}")
    with pytest.raises(TokenizerError, match="names no path"):
        get_tokenizer("hf:")
    with pytest.raises(TokenizerError, match="unknown tokenizer 'sp'"):
        get_tokenizer("sp:x.model")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerError, match=r"pip install 'glocal\[hf\]'"):
        get_tokenizer(f"hf:{tok_dir}")


def test_tail_split_bytes_and_tokens_per_byte(tmp_path, tok_dir):
    tok = get_tokenizer(f"hf:{tok_dir}")
    text = " ".join(SENTENCES * 8)
    (tmp_path / "a.txt").write_text(text)
    c = data.load_corpus(str(tmp_path / "a.txt"), tokenizer=tok, vocab_size=300, val_fraction=0.1)
    n = len(tok.encode(text)) + 2
    k = max(1, int(n * 0.1))
    assert len(c.val) == k
    assert c.val_bytes == pytest.approx(len(text.encode()) * k / n)  # the one document, pro rata
    assert data.tokens_per_byte(c, tok, pack=True) == pytest.approx((k - 1) / c.val_bytes)
    assert data.tokens_per_byte(c, get_tokenizer("byte"), pack=True) == 1.0
    np.save(tmp_path / "t.npy", np.arange(500) % 300)
    c = data.load_corpus(str(tmp_path / "t.npy"), tokenizer=tok, vocab_size=300)
    assert c.val_bytes is None and data.tokens_per_byte(c, tok, pack=True) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok_dir):
    """A 3-step run on train.txt (validation: val.txt) with the tokenizer of ``src``, whose
    generation_config.json names two EOS ids."""
    root = tmp_path_factory.mktemp("hfrun")
    src = root / "src"
    shutil.copytree(tok_dir, src)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}))
    text = "\n".join(SENTENCES[i % 5] + f" {i}" for i in range(300))
    (root / "train.txt").write_text(text)
    (root / "val.txt").write_text("\n".join(SENTENCES[::-1] * 4))
    from glocal.cli import main

    wd = root / "wd"
    rc = main(["train", "--config", "transformer_tiny", "--workdir", str(wd), f"tokenizer=hf:{src}",
               f"data={root / 'train.txt'}", f"val_data={root / 'val.txt'}",
               *(f"{k}={v}" for k, v in {**RUN, "steps": "3", "sample_tokens": "5", "vocab_size": "320"}.items())])
    assert rc == 0
    return root, wd, src


def test_train_records_and_copies_the_tokenizer(run):
    root, wd, src = run
    assert json.loads((wd / "model.json").read_text())["tokenizer"] == "hf:tokenizer"
    assert (wd / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((wd / "tokenizer" / "generation_config.json").read_text())["eos_token_id"] == [2, 3]
    tok = workdirs.load_tokenizer(wd)
    assert tok.name == "hf:tokenizer" and tok.eos_ids == (2, 3)
    # The token stream is the library's ids of each document between BOS and EOS.
    ref = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    c = data.load_corpus(str(root / "train.txt"), tokenizer=tok, vocab_size=320, val_spec=str(root / "val.txt"))
    for split, name in ((c.train, "train.txt"), (c.val, "val.txt")):
        body = ref.encode((root / name).read_text(), add_special_tokens=False).ids
        np.testing.assert_array_equal(split, [1, *body, 2])
    # bits per byte = bits/token * loss targets (the body and EOS) / UTF-8 bytes of the validation text
    val = (root / "val.txt").read_text()
    per_byte = (len(ref.encode(val, add_special_tokens=False).ids) + 1) / len(val.encode())
    final = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines() if "eval_bpb" in l][-1]
    assert final["eval_bpb"] == pytest.approx(final["eval_loss"] / math.log(2) * per_byte, rel=1e-9)
    assert per_byte < 0.9 and sorted(losses(wd)) == [1, 2, 3]  # (BPE merges: fewer tokens than bytes)


def test_generate_and_eval_use_the_workdirs_tokenizer(run, capsys):
    import glocal
    from glocal.cli import main

    _, wd, src = run
    prompt = "the cat"
    assert main(["generate", "--workdir", str(wd), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    ref = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    ids = ref.encode(prompt, add_special_tokens=False).ids
    model, _ = workdirs.load_model(wd)
    new = glocal.generate(model, [ids], 5, stop_tokens=[2, 3])[0]  # greedy, stops at either EOS id
    assert out == prompt + ref.decode(ids + new)[len(prompt):] + "\n"
    assert main(["eval", "--workdir", str(wd)]) == 0
    final = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines() if "eval_bpb" in l][-1]
    assert f"{final['eval_bpb']:.3f} bits-per-byte" in capsys.readouterr().out


def test_resume_checks_the_tokenizer(run, tmp_path, capsys):
    from glocal.train.trainer import train

    _, wd, src = run
    # The folder the copy came from is the same tokenizer: the first command, run again, resumes.
    assert train(None, wd, {"tokenizer": f"hf:{src}"})["step"] == 3
    assert "already trained to step 3" in capsys.readouterr().out
    make_tokenizer(tmp_path / "other", vocab_size=290)
    for other in (f"hf:{tmp_path / 'other'}", "byte"):
        with pytest.raises(ConfigError, match="differs from the tokenizer .* was trained with .'hf:tokenizer'"):
            train(None, wd, {"tokenizer": other})
    # A tokenizer with more ids than the model's vocabulary is refused before anything is written.
    with pytest.raises(ConfigError, match="has 300 ids but the model's vocab_size is 256; set vocab_size>=300"):
        train("transformer_tiny", tmp_path / "small", {**RUN, "tokenizer": f"hf:{src}", "vocab_size": "256"})
    assert not (tmp_path / "small").exists()
