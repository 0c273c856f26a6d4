"""The character-table shortcut must give exactly the tokenizer's ids, offsets and word starts."""

import pytest

from domainlm.data.fastpath import CharTableTokenizer, supports
from tests.conftest import EN_DOCS, ZH_DOCS

TRICKY = [
    "酒店ABC服务Hotel123很好！Café déjà vu，Ｆｕｌｌ－ｗｉｄｔｈ１２３。",
    "兼容字豈更車（U+F900）😀表情 ℃ ½ ≥ §1.2.3 e-mail: a.b@c.com",
    "a\u0301 combining, 中\u0301 after a CJK char, ﹏ wavy, 〜 wave, 「引用」『二重』【括弧】",
    "   leading and trailing spaces   ", "unknownwordxyzqq 不在词表的字：龘靐齉",
    "",
]


def reference(backend, sentences):
    out = []
    for enc in backend.encode_batch(sentences, add_special_tokens=False):
        words = [-1 if w is None else w for w in enc.word_ids]
        first = [i == 0 or words[i] != words[i - 1] for i in range(len(words))]  # written out, not the helper
        out.append((enc.ids, [s for s, _ in enc.offsets], first))
    return out


@pytest.mark.parametrize("lowercase", [True, False])
def test_identical_to_the_tokenizer(tmp_path, lowercase):
    from domainlm.vocab import train_wordpiece

    tok = train_wordpiece((ZH_DOCS + EN_DOCS + TRICKY) * 2, tmp_path, vocab_size=500, lowercase=lowercase)
    backend = tok.backend_tokenizer
    assert supports(backend)
    sentences = ZH_DOCS + EN_DOCS + TRICKY
    fast = CharTableTokenizer(backend)
    for _ in range(2):  # second pass: from the filled table
        got = [(i.tolist(), o.tolist(), w.tolist()) for i, o, w in fast.encode_batch(sentences)]
        assert got == reference(backend, sentences)


def test_other_tokenizers_are_not_taken(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    assert not supports(t)
