import json

from core.checkpoint import LATEST, TRAINER_STATE, atomic_write_text, latest_checkpoint


def make_ckpt(root, name, complete=True):
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "shard.pt").write_text("x")
    if complete:
        (d / TRAINER_STATE).write_text(json.dumps({"step": 1}))
    return d


def test_latest_ignores_half_written_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    good = make_ckpt(tmp_path, "step-00000010")
    make_ckpt(tmp_path, ".tmp-step-00000020", complete=False)  # a crash mid-save
    atomic_write_text(tmp_path / "checkpoints" / LATEST, "step-00000010\n")
    assert latest_checkpoint(tmp_path) == good
    # a pointer to something incomplete falls back to the newest complete checkpoint
    make_ckpt(tmp_path, "step-00000030", complete=False)
    atomic_write_text(tmp_path / "checkpoints" / LATEST, "step-00000030\n")
    assert latest_checkpoint(tmp_path) == good


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "f", "one")
    atomic_write_text(tmp_path / "f", "two")
    assert (tmp_path / "f").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
