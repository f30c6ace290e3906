"""vllm_zeda.train.data and the demo corpus: file kinds, chat rendering, packing, split, seeded order."""
import json

import pytest
import torch

from vllm_zeda.train.data import batch_indices, find_files, load_blocks, pack, read_documents, split
from vllm_zeda.errors import ZedaError
from vllm_zeda.testing.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_txt_jsonl_and_directories(tmp_path, tok):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("hello world")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "plain"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    (tmp_path / "d" / "ignored.md").write_text("not data")
    files = find_files([tmp_path / "d"])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    docs = read_documents(files[1], tok)
    assert docs == ["plain", "<|user|>hi\n<|assistant|>yo\n"]  # rendered by the tokenizer's chat template


def test_bad_inputs(tmp_path, tok):
    with pytest.raises(ZedaError, match="does not exist"):
        find_files([tmp_path / "missing.txt"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ZedaError, match="no .txt or .jsonl"):
        find_files([tmp_path / "empty_dir"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ZedaError, match=r"bad.jsonl:2 is not valid JSON"):
        read_documents(bad, tok)
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ZedaError, match="neither"):
        read_documents(bad, tok)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ZedaError, match="empty"):
        load_blocks([tmp_path / "e.txt"], tok, 8, seed=0)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ZedaError, match="too few"):
        load_blocks([tmp_path / "short.txt"], tok, 8, seed=0)


def test_packing_keeps_document_boundaries(tmp_path, tok):
    (tmp_path / "a.txt").write_text("abcd")
    (tmp_path / "b.txt").write_text("efgh")
    b = load_blocks([tmp_path / "a.txt", tmp_path / "b.txt"], tok, 5, seed=0, heldout_fraction=0.5)
    assert b.num_tokens == 10  # 4 + EOS + 4 + EOS
    blocks = torch.cat([b.train, b.heldout])
    assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, pack(torch.tensor(
        tok("abcd")["input_ids"] + [tok.eos_token_id] + tok("efgh")["input_ids"] + [tok.eos_token_id]), 5).tolist()))


def test_split_and_order_are_seeded():
    blocks = torch.arange(100).view(50, 2)
    tr1, ho1 = split(blocks, 0.1, 128, seed=3)
    tr2, ho2 = split(blocks, 0.1, 128, seed=3)
    assert torch.equal(tr1, tr2) and torch.equal(ho1, ho2) and ho1.shape[0] == 5
    assert not torch.equal(split(blocks, 0.1, 128, seed=4)[1], ho1)
    assert set(tr1[:, 0].tolist()).isdisjoint(ho1[:, 0].tolist())
    assert split(blocks, 0.1, 2, seed=3)[1].shape[0] == 2  # capped
    # any position can be recomputed; each epoch is a permutation; epochs differ
    stream = batch_indices(7, 0, 21, seed=5)
    assert torch.equal(batch_indices(7, 9, 4, seed=5), stream[9:13])
    for e in range(3):
        assert sorted(stream[7 * e : 7 * e + 7].tolist()) == list(range(7))
    assert not torch.equal(stream[:7], stream[7:14])


def test_demo_corpus_is_real_and_deterministic(tok):
    from vllm_zeda.train.demo_corpus import documents

    docs = documents()
    assert sum(map(len, docs)) >= 100_000
    text = "\n".join(docs)
    assert text.count(" the ") > 1000  # English prose, not code
    documents.cache_clear()
    assert documents() == docs
    b = load_blocks(None, tok, 64, seed=0)
    assert b.train.shape[0] > 1000 and b.heldout.shape[0] >= 1
