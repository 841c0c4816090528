"""Training checkpoints: the on-disk format is the one written before the
trainer was split (a state file written here by hand in that format resumes
exactly), and a failing write (disk full, read-only directory) leaves the
previous checkpoint and adapter as they were."""

import errno
import json
import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_mtp.training import checkpoint as ckpt
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.callbacks import TrainingCallback
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.trainer import Trainer

from tiny import tiny_mtp

K = 2
SEQS = [([5, 9, 17, 3, 44, 2, 8, 8, 21, 7], 3), ([1, 2, 3, 4, 5, 6, 7], 1), ([90, 80, 70, 60, 50, 40, 30, 20], 2),
        ([11, 12, 13, 14, 15, 16], 2)]  # fmt: skip
V1_METADATA = {"format", "version", "step", "mtp_config", "train_args"}


def _trainer(path, iters=4):
    examples = [build_example(x, p, K) for x, p in SEQS]
    args = TrainArgs(iters=iters, batch_size=2, learning_rate=1e-2, warmup=1, steps_per_eval=0, save_every=0,
                     mask_chunk=8, adapter_path=str(path), progress=False, seed=2)  # fmt: skip
    return Trainer(tiny_mtp("llama", num_masks=K), Dataset(examples), None, args)


def write_v1_state(path, trainer, before_shapes=False):
    """The training state as the trainer wrote it before the split: adapter
    weights as ``adapter.<name>``, the optimizer state as ``optimizer.<path>``,
    the step and both configs in the metadata (``before_shapes``: as written
    before the sampler head's shape and ``mask_positions`` were options)."""
    mtp_config, train_args = trainer.mtp.config.to_dict(), trainer.args.to_dict()
    if before_shapes:
        mtp_config["sampler"].pop("hidden_dims", None), mtp_config["sampler"].pop("num_layers", None)
        del train_args["mask_positions"]
    arrays = {f"adapter.{k}": v for k, v in trainer.mtp.adapter_parameters().items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(trainer.optimizer.state)})
    metadata = {
        "format": "mlx-mtp-training-state",
        "version": "1",
        "step": str(trainer.step),
        "mtp_config": json.dumps(mtp_config),
        "train_args": json.dumps(train_args),
    }
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "training_state.safetensors"), arrays, metadata=metadata)


class Quiet(TrainingCallback):
    pass


def _same(a, b):
    assert set(a) == set(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_state_written_in_the_v1_format_resumes_exactly(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train(Quiet())

    half = _trainer(tmp_path / "half", iters=4)
    half.args.iters = 2
    half.train(Quiet())
    write_v1_state(tmp_path / "v1", half)
    # the trainer's own state file is that format, tensor for tensor
    mine, meta = mx.load(str(tmp_path / "half" / ckpt.STATE_FILE), return_metadata=True)
    theirs, meta1 = mx.load(str(tmp_path / "v1" / ckpt.STATE_FILE), return_metadata=True)
    _same(mine, theirs)
    assert set(meta) == V1_METADATA and meta == meta1

    resumed = _trainer(tmp_path / "resumed")
    assert resumed.resume(tmp_path / "v1") == 2
    _same(resumed.mtp.adapter_parameters(), half.mtp.adapter_parameters())
    resumed.train(Quiet())
    assert resumed.step == 4
    _same(resumed.mtp.adapter_parameters(), full.mtp.adapter_parameters())
    _same(dict(tree_flatten(resumed.optimizer.state)), dict(tree_flatten(full.optimizer.state)))


def test_state_written_before_the_sampler_shape_options_resumes_exactly(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train(Quiet())
    half = _trainer(tmp_path / "half", iters=4)
    half.args.iters = 2
    half.train(Quiet())
    write_v1_state(tmp_path / "old", half, before_shapes=True)
    resumed = _trainer(tmp_path / "resumed")
    assert resumed.resume(tmp_path / "old") == 2
    resumed.train(Quiet())
    _same(resumed.mtp.adapter_parameters(), full.mtp.adapter_parameters())
    _same(dict(tree_flatten(resumed.optimizer.state)), dict(tree_flatten(full.optimizer.state)))


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("fail_at", ["state", "adapter"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    t = _trainer(tmp_path / "ad", iters=1)
    t.train(Quiet())
    before = _snapshot(tmp_path / "ad")
    assert set(before) == {"adapter_config.json", "adapters.safetensors", ckpt.STATE_FILE}

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail_at == "state":
        monkeypatch.setattr(ckpt.mx, "save_safetensors", full)
    else:
        monkeypatch.setattr(ckpt, "save_adapter", full)
    t.args.iters = 2
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        t.train(Quiet())
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "previous checkpoint is unchanged" in msg
    assert "step 2" in msg and str(tmp_path / "ad") in msg
    assert _snapshot(tmp_path / "ad") == before  # no staging directory left either
    monkeypatch.undo()
    assert _trainer(tmp_path / "other").resume(tmp_path / "ad") == 1


def _permissions_enforced(directory) -> bool:
    """Whether the system refuses a write into ``directory`` (not as root)."""
    try:
        (directory / ".probe").touch()
    except PermissionError:
        return True
    (directory / ".probe").unlink()
    return False


def test_read_only_directory_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A read-only adapter directory: the save fails in one line and the
    previous checkpoint is kept. Where the system does not enforce the mode
    (root, as in CI containers), creating the staging directory fails with
    EROFS instead, as a read-only file system would."""
    t = _trainer(tmp_path / "ad", iters=1)
    t.train(Quiet())
    before = _snapshot(tmp_path / "ad")
    os.chmod(tmp_path / "ad", 0o555)
    try:
        if not _permissions_enforced(tmp_path / "ad"):

            def read_only(*a, **kw):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(ckpt.tempfile, "mkdtemp", read_only)
        t.args.iters = 2
        with pytest.raises(ckpt.CheckpointWriteError, match="previous checkpoint is unchanged") as e:
            t.train(Quiet())
        assert "\n" not in str(e.value) and str(tmp_path / "ad") in str(e.value)
    finally:
        os.chmod(tmp_path / "ad", 0o755)
    assert _snapshot(tmp_path / "ad") == before


def test_a_kill_during_a_save_leaves_whole_files_and_the_next_save_cleans_up(tmp_path):
    t = _trainer(tmp_path / "ad", iters=1)
    t.train(Quiet())
    stale = tmp_path / "ad" / (ckpt.STAGING_PREFIX + "x.tmp")
    stale.mkdir()
    (stale / ckpt.STATE_FILE).write_bytes(b"half")
    assert _trainer(tmp_path / "o").resume(tmp_path / "ad") == 1  # the stale directory is not read
    t.args.iters = 2
    t.train(Quiet())
    assert not stale.exists()
    assert _trainer(tmp_path / "o").resume(tmp_path / "ad") == 2


def _adapter_weights(directory):
    return mx.load(str(directory / "adapters.safetensors"))


def test_keep_every_keeps_the_adapter_of_those_steps_and_resume_writes_the_same(tmp_path):
    from mlx_mtp.training.trainer import TrainingInterrupted

    from conftest import StopAt

    a = _trainer(tmp_path / "a", iters=5)
    a.args.keep_every = 2
    a.train(Quiet())
    kept = ckpt.list_snapshots(tmp_path / "a")
    assert [s for s, _ in kept] == [2, 4, 5]  # every 2nd step and the last
    assert kept[0][1] == tmp_path / "a" / "snapshots" / "step_0000002"
    # the snapshot of step 2 is the adapter of a run stopped there (flat rate after warm-up)
    two = _trainer(tmp_path / "two", iters=5)
    two.args.iters = 2
    two.train(Quiet())
    _same(_adapter_weights(kept[0][1]), _adapter_weights(tmp_path / "two"))
    _same(_adapter_weights(kept[2][1]), _adapter_weights(tmp_path / "a"))
    assert json.loads((kept[0][1] / "adapter_config.json").read_text())["num_masks"] == K
    assert not list((tmp_path / "a").glob(ckpt.STAGING_PREFIX + "*"))

    # stopped at step 3 and resumed: the same snapshots, tensor for tensor
    b = _trainer(tmp_path / "b", iters=5)
    b.args.keep_every = 2
    with pytest.raises(TrainingInterrupted):
        b.train(StopAt(3))
    assert [s for s, _ in ckpt.list_snapshots(tmp_path / "b")] == [2]
    c = _trainer(tmp_path / "b", iters=5)
    c.args.keep_every = 2
    assert c.resume(tmp_path / "b") == 3
    c.train(Quiet())
    again = ckpt.list_snapshots(tmp_path / "b")
    assert [s for s, _ in again] == [2, 4, 5]
    for (_, x), (_, y) in zip(kept, again):
        _same(_adapter_weights(x), _adapter_weights(y))
    # none by default
    assert TrainArgs().keep_every == 0 and ckpt.list_snapshots(tmp_path / "two") == []
