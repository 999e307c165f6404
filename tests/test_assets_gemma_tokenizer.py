"""The Gemma GGUF tokenizer fix: a Unigram vocabulary scored by BPE rank becomes a real BPE."""

import json

from tokenizers import Tokenizer

from sd2_hf.assets import _gemma_unigram_to_bpe


def test_unigram_with_rank_scores_becomes_bpe(tmp_path):
    # As transformers' GGUF converter writes it: specials at -1000, characters at 0, merged
    # pieces scored by -rank. Viterbi over these scores picks single characters.
    vocab = [["<pad>", -1000.0], ["<unk>", -1000.0], ["<bos>", -1000.0]]
    vocab += [[c, 0.0] for c in "helowrd▁"]
    vocab += [["he", -1.0], ["ll", -2.0], ["hell", -3.0], ["hello", -4.0], ["▁w", -5.0], ["or", -6.0], ["▁wor", -7.0], ["ld", -7.5], ["▁world", -8.0]]  # fmt: skip
    state = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(["<pad>", "<unk>", "<bos>"])
        ],  # fmt: skip
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        "model": {"type": "Unigram", "unk_id": 1, "vocab": vocab, "byte_fallback": False},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(state))
    before = Tokenizer.from_file(str(path)).encode("hello world").tokens
    assert before == list("hello") + ["▁", "w", "o", "r", "l", "d"]

    _gemma_unigram_to_bpe(path)
    tok = Tokenizer.from_file(str(path))
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    enc = tok.encode("hello world", add_special_tokens=False)
    assert enc.tokens == ["hello", "▁world"]
    assert [tok.id_to_token(i) for i in enc.ids] == enc.tokens  # ids unchanged
    assert tok.token_to_id("hello") == [t for t, _ in vocab].index("hello")
    # a second call is a no-op
    _gemma_unigram_to_bpe(path)
    assert Tokenizer.from_file(str(path)).encode("hello world").tokens == [
        "<bos>",
        "hello",
        "▁world",
    ]
