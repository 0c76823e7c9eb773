"""Exponential moving averages, checked by hand."""

import pytest
import torch

from diffalign.ema import EMA


def test_updates_by_hand_and_copy_back():
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([weight], decay=0.5, warmup=False)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update()  # 0.5 * 0 + 0.5 * 1
    with torch.no_grad():
        weight.fill_(3.0)
    ema.update()  # 0.5 * 0.5 + 0.5 * 3
    assert ema.shadow[0].tolist() == [1.75, 1.75]
    ema.copy_to_model()
    assert weight.tolist() == [1.75, 1.75]


def test_warmup_and_state_round_trip():
    weight = torch.nn.Parameter(torch.ones(1))
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    ema = EMA([weight, frozen], decay=0.999)
    assert len(ema.shadow) == 1  # frozen parameters are not averaged
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    ema.update()
    other = EMA([torch.nn.Parameter(torch.zeros(1))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.999 and other.shadow[0].item() == 1.0
    with pytest.raises(ValueError, match="decay"):
        EMA([weight], decay=1.0)


def test_swapped_runs_with_the_averages_and_restores_the_live_weights():
    layer = torch.nn.Linear(2, 1)
    ema = EMA(layer.parameters(), decay=0.5, warmup=False)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    live = layer.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(layer.weight, live - 0.5)
    torch.testing.assert_close(layer.weight, live)
