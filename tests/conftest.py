"""Shared test fixtures."""
import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps a process-wide singleton state: a test that ran a script in-process must not leave it
    configured (e.g. without bf16) for the next test's Accelerator."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def drop_chunk():
    """drop_chunk(folder, query_id): delete the cached chunk file holding `query_id`'s pairs, as if the run was
    killed while computing it (chunk files are named by their content, `pair_vit.cache`)."""
    import pandas as pd

    def drop(folder: Path, query_id: str) -> None:
        held = [f for f in Path(folder).glob("chunk_*.csv")
                if query_id in set(pd.read_csv(f, dtype={"query_id": str}).query_id)]
        assert len(held) == 1, f"{len(held)} chunk files hold {query_id}"
        held[0].unlink()

    return drop


@pytest.fixture(scope="module")
def train_photos(tmp_path_factory) -> Path:
    """A dozen demo photos (train side of the split) copied into a temporary folder, one folder per test module."""
    from pair_vit import data, demo_dir

    out = tmp_path_factory.mktemp("photos")
    images = data.split_images(data.list_images(Path(str(demo_dir()))), "train")
    for path in list(images.values())[:12]:
        shutil.copyfile(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def demo_benchmark(tmp_path_factory) -> Path:
    """A small benchmark (12 references, 10 queries) made from the demo photos, one per test module."""
    from pair_vit import demo_dir
    from pair_vit.bench import make

    out = tmp_path_factory.mktemp("bench") / "bench"
    make.run(make.BenchmarkConfig(images=str(demo_dir()), out=str(out), split="all", n_references=12, n_queries=10,
                                  workers=1))
    return out
