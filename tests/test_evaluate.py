"""Perplexity: exact values on hand-made logits, window bookkeeping, bad input."""
import math

import pytest
import torch

from palu_fx.evaluate import perplexity, window_nll


def test_uniform_logits_give_vocabulary_size():
    vocab = 37
    windows = torch.randint(0, vocab, (3, 20))
    ppl = perplexity(lambda ids: torch.zeros(1, ids.shape[1], vocab), windows, progress=False)
    assert ppl == pytest.approx(vocab)


def test_perfect_predictor_and_token_count():
    windows = torch.randint(0, 10, (2, 8))

    def oracle(ids):  # puts all mass on the true next token
        logits = torch.full((1, ids.shape[1], 10), -1e4)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 0.0
        return logits

    assert perplexity(oracle, windows, progress=False) == pytest.approx(1.0)
    nll, n = window_nll(torch.zeros(1, 8, 10), windows[:1])
    assert n == 7 and nll == pytest.approx(7 * math.log(10))


def test_ragged_windows_weight_by_tokens():
    # Window A (3 predictions) at NLL log 2 each, window B (1 prediction) at log 8:
    # exp((3 log 2 + log 8) / 4) = 2^1.5.
    def fn(ids):
        vocab = 2 if ids.shape[1] == 4 else 8
        return torch.zeros(1, ids.shape[1], vocab)

    ppl = perplexity(fn, [torch.zeros(4, dtype=torch.long), torch.zeros(2, dtype=torch.long)], progress=False)
    assert ppl == pytest.approx(2 ** 1.5)


def test_bad_windows():
    with pytest.raises(ValueError, match="no token windows"):
        perplexity(lambda ids: ids, torch.zeros(0, 5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(lambda ids: torch.zeros(1, 1, 3), [torch.zeros(1, dtype=torch.long)], progress=False)
