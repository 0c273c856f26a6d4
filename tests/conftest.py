"""Shared fixtures: a WordPiece tokenizer trained here from a few KB of text, and small documents."""

from __future__ import annotations

import pytest

ZH_DOCS = [
    "酒店的服务非常好，房间干净整洁。早餐的品种很丰富！下次还会再来入住。",
    "这本书写得很好，内容丰富，值得一读。作者的观点很有启发性；我推荐给朋友们。",
    "电脑的性能不错，屏幕清晰，电池也耐用。只是键盘的手感一般。",
    "工程的进度计划需要按时完成。质量验收标准必须严格执行。成本数据每月统计一次。",
    "我们在北京大学学习自然语言处理。老师说：“机器学习很重要。”大家都同意。",
    "价格有点贵，但是服务很周到。交通方便，离地铁站很近。总体来说很满意！",
]
EN_DOCS = [
    "Dr. Smith reviewed the quality acceptance report. The schedule slipped by 3.5 days. Costs stayed flat.",
    "The hotel was clean and quiet. Breakfast was good! Would we stay again? Yes, we would.",
]


def pytest_configure(config):
    """Under pytest-xdist (-n auto: one worker per core), each worker's PyTorch gets its share of the cores, so that
    workers do not oversubscribe the CPU."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def err(capsys):
    """Run the CLI; assert it exits with `code`; return its stderr."""
    from domainlm.cli import main

    def run(*args, code=2):
        capsys.readouterr()
        assert main([str(a) for a in args]) == code
        return capsys.readouterr().err

    return run


def one_line(message: str) -> str:
    """An error message: one line, no traceback."""
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message, message
    return message


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from domainlm.vocab import train_wordpiece

    out = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece((ZH_DOCS + EN_DOCS) * 3, out, vocab_size=600)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def zh_txt(tmp_path):
    """A txt file: documents separated by blank lines, one sentence or free text per line."""
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(ZH_DOCS) + "\n", encoding="utf-8")
    return path


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 3-8 sentences drawn from the sample texts, so that SOP has sentences to order."""
    import random

    rng = random.Random(seed)
    sentences = [s + "。" for d in ZH_DOCS for s in d.replace("！", "。").replace("；", "。").split("。") if s]
    return ["\n".join(rng.sample(sentences, rng.randint(3, 8))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, tokenizer_dir):
    from domainlm.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("corpus")
    src = root / "docs.txt"
    src.write_text("\n\n".join(make_documents(80)), encoding="utf-8")
    cfg = PrepareConfig(
        input=[str(src)],
        out=str(root / "store"),
        tokenizer=tokenizer_dir,
        workers=0,
        segment=True,
        near_dup_threshold=0,
    )
    prepare(cfg, progress=False)
    return str(root / "store")


def save_tiny_model(out, tokenizer, kind: str = "bert", heads: bool = True, dropout: float | None = None):
    """A 2-layer, 32-wide encoder saved with its tokenizer (the shape of a released checkpoint); `dropout` 0 for
    runs compared step by step (dropout masks are drawn per position, so they differ by batch layout)."""
    import torch
    from transformers import BertConfig, BertForPreTraining, BertModel, ErnieConfig, ErnieForPreTraining

    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if dropout is not None:
        shape.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if kind == "ernie":  # ERNIE 3.0 specifics: task type embeddings, 4 token types
        model = ErnieForPreTraining(ErnieConfig(**shape, type_vocab_size=4, use_task_id=True, task_type_vocab_size=3))
    else:
        model = (BertForPreTraining if heads else BertModel)(BertConfig(**shape))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


@pytest.fixture(autouse=True)
def _sigint_left_as_found(request):
    """No test leaves Ctrl-C handled differently: a worker that ignored SIGINT would pass that on to every command
    a later test starts (an ignored signal stays ignored in a child), and those could not be interrupted."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    assert after is before or after == before, f"{request.node.nodeid} left SIGINT as {after!r} (was {before!r})"
