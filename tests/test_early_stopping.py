"""finetune's early stopping: the best score's weights and dev probabilities kept, patience counted in evaluations."""

import numpy as np
import pytest
import torch

from domainlm.classify.command import EarlyStopping
from domainlm.errors import DomainLMError


def test_keeps_the_best_weights_and_stops_after_patience_evaluations_without_gain():
    model = torch.nn.Linear(2, 1)
    best = EarlyStopping("accuracy", patience=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not best.update({"accuracy": 0.5}, 10, model, np.array([[0.5]]))
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not best.update({"accuracy": 0.7}, 20, model, np.array([[0.7]]))
    with torch.no_grad():
        model.weight.fill_(3.0)  # worse twice: patience 2 is used up
    assert not best.update({"accuracy": 0.7}, 30, model, np.array([[0.1]]))  # a tie is no gain
    assert best.update({"accuracy": 0.6}, 40, model, np.array([[0.2]]))
    assert (best.value, best.step, best.bad) == (0.7, 20, 2) and best.probs.tolist() == [[0.7]]
    assert best.state["weight"].tolist() == [[2.0, 2.0]]  # a copy, not the live weights
    never = EarlyStopping("accuracy", patience=0)
    assert not any(never.update({"accuracy": 0.1}, s, model, np.zeros((1, 1))) for s in range(5))
    with pytest.raises(DomainLMError, match="--metric 'f1' is not computed; choose one of accuracy"):
        EarlyStopping("f1", 1).update({"accuracy": 0.1, "n": 3}, 1, model, np.zeros((1, 1)))
