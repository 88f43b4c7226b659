"""Series of unequal length: the 'last' head reads each series' own last step, never padding."""
import pytest
import torch

from lem import RNNModel
from lem.data.series import pad_series


@pytest.mark.parametrize("kind", ["lem", "lstm", "gru"])
def test_padded_batch_predicts_as_each_series_alone(kind):
    torch.manual_seed(0)
    model = RNNModel(kind, 3, 8, 4, dt=0.5).eval()
    series = [torch.randn(t, 3) for t in (7, 2, 11, 5)]
    x, lengths = pad_series(series)
    assert x.shape == (11, 4, 3) and lengths.tolist() == [7, 2, 11, 5]
    batch = model(x, lengths)
    alone = torch.cat([model(s.unsqueeze(1)) for s in series])
    torch.testing.assert_close(batch, alone)
    assert not torch.allclose(model(x), alone)  # reading the padded end would differ


def test_lengths_are_checked():
    model = RNNModel("lem", 3, 8, 4)
    x = torch.randn(5, 2, 3)
    for bad in ([0, 3], [3, 6], [3]):
        with pytest.raises(ValueError, match="lengths"):
            model(x, torch.tensor(bad))


def test_pad_series_drops_trailing_nan_and_rejects_inner_nan():
    nan = float("nan")
    x, lengths = pad_series([[[1.0], [2.0], [nan]], [[3.0], [4.0], [5.0]]])
    assert lengths.tolist() == [2, 3] and x[:, 0, 0].tolist() == [1.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="missing values"):
        pad_series([[[1.0], [nan], [2.0]]])
