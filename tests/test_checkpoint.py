"""Self-describing checkpoints: round trip, atomic writes, refusal of corrupt files and of other kinds."""
import pytest
import torch

import pair_vit
from pair_vit import checkpoint as ck


def tiny_state():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    return net, net.state_dict()


def save(path, kind="descriptor", **kw):
    net, state = tiny_state()
    values = dict(kind=kind, model_args={"backbone": "x", "embed_dim": 8}, model_state=state,
                  config={"lr": 0.1, "sizes": (1, 2)}, step=7, extra={"note": "hi", "t": torch.ones(2)})
    values.update(kw)
    ck.save_checkpoint(path, **values)
    return state


def test_round_trip_and_provenance(tmp_path):
    path = tmp_path / "c.pt"
    state = save(path)
    got = ck.load_checkpoint(path, kind="descriptor")
    assert got["kind"] == "descriptor" and got["step"] == 7 and got["model_args"]["embed_dim"] == 8
    assert got["config"]["lr"] == 0.1 and got["extra"]["note"] == "hi"
    assert torch.equal(got["extra"]["t"], torch.ones(2))
    assert all(torch.equal(state[k], got["model_state"][k]) for k in state)
    assert isinstance(got["git_sha"], str) and got["git_sha"]
    assert got["pair_vit"] == pair_vit.__version__ and got["torch"] == str(torch.__version__)
    assert got["created"].startswith("20") and got["format"] == ck.CHECKPOINT_FORMAT
    assert ck.load_checkpoint(path)["kind"] == "descriptor"  # kind=None accepts any kind


def test_model_instead_of_state_and_defaults(tmp_path):
    net, _ = tiny_state()
    ck.save_checkpoint(tmp_path / "m.pt", kind="descriptor", model=net, model_args={})
    got = ck.load_checkpoint(tmp_path / "m.pt")
    assert set(got["model_state"]) == set(net.state_dict()) and got["step"] == 0 and got["config"] == {}
    with pytest.raises(TypeError):
        ck.save_checkpoint(tmp_path / "x.pt", kind="d", model_args={})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "c.pt"
    save(path)
    save(path, step=8)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert ck.load_checkpoint(path)["step"] == 8
    with pytest.raises(Exception):  # a lambda cannot be pickled: the save fails half-way
        save(path, step=9, extra={"bad": lambda: 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert ck.load_checkpoint(path)["step"] == 8  # the previous file is untouched


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "nope.pt")

    good = tmp_path / "good.pt"
    save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt.*corrupt"):
        ck.load_checkpoint(truncated)

    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ck.CheckpointError, match="text.pt"):
        ck.load_checkpoint(text)

    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(1)}, plain)  # a torch file, but not one of ours
    with pytest.raises(ValueError, match="plain.pt.*missing"):
        ck.load_checkpoint(plain)

    with pytest.raises(ValueError, match="is not a file"):
        ck.load_checkpoint(tmp_path)


class Arbitrary:  # pickled by reference: weights_only loading must refuse to import it
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"format": 1, "kind": "descriptor", "model_args": {}, "model_state": {}, "x": Arbitrary()}, path)
    with pytest.raises(ValueError, match="code.pt"):
        ck.load_checkpoint(path)


def test_wrong_kind_refused(tmp_path):
    path = tmp_path / "pair.pt"
    save(path, kind="pair_vit")
    with pytest.raises(ValueError, match=r"pair.pt.*'pair_vit'.*expected 'descriptor'"):
        ck.load_checkpoint(path, kind="descriptor")


def test_compare_configs():
    saved = {"backbone": "resnet18", "image_size": 64, "sizes": [1, 2], "lr": 1.0}
    now = {"backbone": "resnet10t", "image_size": 64, "sizes": (1, 2), "lr": 2.0, "new": 1}
    diffs = ck.compare_configs(saved, now, ["backbone", "image_size", "sizes", "new"])
    assert len(diffs) == 2
    assert diffs[0] == "backbone: saved 'resnet18', now 'resnet10t'"
    assert diffs[1].startswith("new: saved (unset)")
    assert ck.compare_configs(saved, now, ["image_size", "sizes"]) == []


def test_state_dict_to_fp16_keeps_integer_buffers():
    _, state = tiny_state()
    half = ck.state_dict_to(state, torch.float16)
    assert half["0.weight"].dtype == torch.float16
    assert half["1.num_batches_tracked"].dtype == torch.int64


def test_git_sha_never_fails(tmp_path):
    assert ck._read_git_sha(tmp_path) == "unknown"  # not a git checkout
    assert isinstance(ck.git_sha(), str)
