"""The character-table shortcut must give exactly the tokenizer's ids, offsets and word starts."""

import pytest

from domainlm.data.fastpath import CharTableTokenizer, supports
from tests.conftest import EN_DOCS, ZH_DOCS

TRICKY = [
    "酒店ABC服务Hotel123很好！Café déjà vu，Ｆｕｌｌ－ｗｉｄｔｈ１２３。",
    "兼容字豈更車（U+F900）😀表情 ℃ ½ ≥ §1.2.3 e-mail: a.b@c.com",
    "a\u0301 combining, 中\u0301 after a CJK char, ﹏ wavy, 〜 wave, 「引用」『二重』【括弧】",
    "   leading and trailing spaces   ",
    "unknownwordxyzqq 不在词表的字：龘靐齉",
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
    assert not supports(backend)  # special-token strings would be special ids here: not the fast path's output
    backend.encode_special_tokens = True
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


def test_the_one_cjk_table_is_the_tokenizers_own_at_every_code_point():
    """Every code point of planes 0-3 (surrogates aside) is isolated by BERT's normaliser exactly when data/cjk.py
    says so."""
    from tokenizers import normalizers

    from domainlm.data.cjk import CJK_CLASS, is_cjk

    norm = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    cps = [cp for cp in range(0x40000) if not 0xD800 <= cp <= 0xDFFF and cp != 1]  # planes 0-3: every CJK block
    # \x01 between characters keeps them apart; an isolated character comes back as " c "
    pieces = norm.normalize_str("\x01".join(map(chr, cps))).split("\x01")
    assert len(pieces) == len(cps)
    isolated = {cp for cp, piece in zip(cps, pieces) if piece == f" {chr(cp)} "}
    assert isolated == {cp for cp in cps if is_cjk(cp)}
    assert 0x2B820 not in isolated and 0x2B920 in isolated  # the boundary the tables used to disagree on
    import re

    pattern = re.compile(f"[{CJK_CLASS}]")
    assert all(
        bool(pattern.match(chr(cp))) == (cp in isolated)
        for cp in (0x4DBF, 0x4DC0, 0x2B81F, 0x2B820, 0x2B91F, 0x2B920, 0x2CEAF, 0x2CEB0)
    )


# ---- property-based: random text from every block that matters --------------------------------------------

BLOCKS = [
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2B91F),
    (0x2B920, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0x2F800, 0x2FA1F),
    (0x30000, 0x3134F),  # CJK blocks, those the tokenizer does not isolate included
    (0xFF00, 0xFFEF),  # full-width and half-width forms
    (0x3000, 0x303F),
    (0x2E80, 0x2FDF),  # CJK punctuation, radicals
    (0x00C0, 0x024F),
    (0x0300, 0x036F),  # accented Latin, combining accents
    (0x1F300, 0x1FAFF),
    (0x2600, 0x27BF),  # emoji, symbols
    (0x0000, 0x001F),
    (0x007F, 0x009F),
    (0x200B, 0x200F),
    (0xFFF0, 0xFFFF),  # control, invisible, specials
    (0x0030, 0x0039),
    (0x0020, 0x007E),
    (0x0660, 0x0669),
]  # digits, ASCII, Arabic-Indic digits
SPECIAL_STRINGS = ["[SEP]", "[MASK]", "[CLS]", "[PAD]", "[UNK]", "[sep]", "[MASK", "SEP]", "##", " "]


def _texts():
    from hypothesis import strategies as st

    char = st.one_of(*[st.integers(lo, hi) for lo, hi in BLOCKS]).filter(lambda c: not 0xD800 <= c <= 0xDFFF).map(chr)
    piece = st.one_of(char, st.sampled_from(SPECIAL_STRINGS), st.sampled_from(ZH_DOCS + EN_DOCS).map(lambda d: d[:12]))
    return st.lists(piece, max_size=40).map("".join)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from domainlm.vocab import train_wordpiece

    out = {}
    for lowercase in (True, False):
        tok = train_wordpiece(
            (ZH_DOCS + EN_DOCS + TRICKY) * 2, tmp_path_factory.mktemp(f"t{lowercase}"), 500, lowercase
        )
        backend = tok.backend_tokenizer
        backend.encode_special_tokens = True
        out[lowercase] = (backend, set(tok.all_special_ids) - {tok.unk_token_id})
    return out


def test_fast_path_equals_the_tokenizer_on_random_text(backends):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.lists(_texts(), min_size=1, max_size=4), st.booleans())
    def check(sentences, lowercase):
        backend, special = backends[lowercase]
        fast = CharTableTokenizer(backend)
        got = [(i.tolist(), o.tolist(), w.tolist()) for i, o, w in fast.encode_batch(sentences)]
        assert got == reference(backend, sentences)
        assert not special & {t for ids, _, _ in got for t in ids}  # no special id from text, in either path

    check()


def test_special_strings_are_text_and_the_store_refuses_special_ids(tmp_path, tokenizer_dir, tokenizer):
    import numpy as np

    from domainlm.data.readers import Document
    from domainlm.data.store import CorpusWriter
    from domainlm.data.tokenize import DocumentEncoder, EncodeOptions, corpus_forbidden_ids
    from domainlm.errors import DomainLMError

    tokenizer.save_pretrained(tmp_path / "tok")
    encoder = DocumentEncoder(EncodeOptions(str(tmp_path / "tok" / "tokenizer.json")))
    assert encoder.fast is not None
    text = "酒店[SEP]服务[MASK]很好。[CLS] and [PAD]"
    enc = encoder.encode(Document(text, "x", 1))
    as_specials = tokenizer(text, add_special_tokens=False)["input_ids"]
    as_text = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.sep_token_id in as_specials and tokenizer.mask_token_id in as_specials
    assert enc.ids.tolist() == as_text  # the literal strings are kept as the text they are
    forbidden = corpus_forbidden_ids(tokenizer)
    assert set(forbidden) == {
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
        tokenizer.mask_token_id,
    }
    assert not set(forbidden) & set(enc.ids.tolist())
    writer = CorpusWriter(tmp_path / "store", len(tokenizer), forbidden_ids=forbidden)
    writer.add(np.array([5, tokenizer.unk_token_id, 7]), np.array([3]), np.ones(3, bool))  # [UNK] is text
    with pytest.raises(DomainLMError, match=rf"special token id {tokenizer.sep_token_id} at position 1 of document 2"):
        writer.add(np.array([5, tokenizer.sep_token_id]), np.array([2]), np.ones(2, bool))
    assert writer.n_documents == 1
