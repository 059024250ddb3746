"""Whole-image, sliding-window, flip and multi-scale inference, each against what it is defined to compute."""
import torch
import torch.nn.functional as F

from heads.segmentation.inference import predict, sliding_window


class Position(torch.nn.Module):
    """A 'model' whose logits depend on where a pixel is in its input: any mistake in placing, flipping or
    scaling windows changes the output."""

    def forward(self, x):
        height, width = x.shape[-2:]
        rows = torch.linspace(0, 1, height).view(1, 1, -1, 1).expand(x.shape[0], 1, height, width)
        cols = torch.linspace(0, 1, width).view(1, 1, 1, -1).expand(x.shape[0], 1, height, width)
        return torch.cat([x[:, :1] + rows, x[:, 1:2] * cols, rows * cols], 1)


def test_sliding_window_averages_the_windows_where_they_overlap():
    model, x = Position(), torch.rand(1, 3, 10, 14)
    got = sliding_window(model, x, crop=(6, 8), stride=(4, 6))
    total, count = torch.zeros(1, 3, 10, 14), torch.zeros(1, 1, 10, 14)
    for top in (0, 4):  # and the last window flush with the edge
        for left in (0, 6):
            total[..., top:top + 6, left:left + 8] += model(x[..., top:top + 6, left:left + 8])
            count[..., top:top + 6, left:left + 8] += 1
    torch.testing.assert_close(got, total / count)
    torch.testing.assert_close(sliding_window(model, x, crop=(10, 14), stride=(5, 7)), model(x))


def test_flip_and_scales_average_the_probabilities_by_definition():
    model, x = Position(), torch.rand(2, 3, 12, 16)
    expected = 0
    for scale in (0.5, 1.0):
        scaled = x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        for logits in (model(scaled), model(scaled.flip(-1)).flip(-1)):
            logits = F.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False)
            expected = expected + logits.softmax(1)
    torch.testing.assert_close(predict(model, x, flip=True, scales=(0.5, 1.0)), expected / 4)
    torch.testing.assert_close(predict(model, x), model(x).softmax(1))
