"""The per-class grid picture of condensed images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kdflow.condense.grid import display_images, plot_class_grid
from kdflow.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (1, 28, 28)])
def test_grid_writes_a_valid_png_with_one_row_per_class(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # class 3 has no images: an empty row
    path = plot_class_grid(tmp_path / "figs" / "samples.png", torch.randn(6, *shape, generator=g), labels, 4)
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert h > w  # 4 rows of at most 3 images each


def test_grid_bytes_are_reproducible(tmp_path: Path) -> None:
    x, y = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
    a = plot_class_grid(tmp_path / "a.png", x, y, 2).read_bytes()
    assert plot_class_grid(tmp_path / "b.png", x, y, 2).read_bytes() == a


def test_display_scales_each_image_to_unit_range() -> None:
    x = torch.stack([torch.full((1, 2, 2), 5.0), torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])])
    shown = display_images(x)
    assert shown.shape == (2, 2, 2)
    assert torch.equal(shown[0], torch.zeros(2, 2))  # a flat image stays flat
    assert torch.allclose(shown[1], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert display_images(torch.rand(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_grid_rejects_non_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="class grid"):
        plot_class_grid(tmp_path / "x.png", torch.rand(4, 64), torch.zeros(4, dtype=torch.long), 1)
