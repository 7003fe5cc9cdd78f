"""Fixtures of the descriptor tests: a dozen demo photos (clothing look-alikes) and a few decoded images."""
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pair_vit import demo_dir

DEMO = Path(str(demo_dir())) / "clothing_cc0"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(DEMO.glob("*.jpg"))[:12]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def images(photos):
    return [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.jpg"))[:6]]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # In-process training runs use 1 thread (tiny batches; robust on a busy CPU); restore the default after.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
