"""DDP with 2 CPU processes gives the same rows, scores and candidates as one process."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from labelwatch import LabelWatch
from labelwatch.sinks.wandb import ARTIFACT_TYPE
from tests.helpers import (
    BlobDataset,
    TinyClassifier,
    offline_run_dir,
    trainer_kwargs,
    wandb_records,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_VAL = 45  # odd: DistributedSampler pads one repeated sample onto rank 1


def _fit(
    out: Path,
    string_ids: bool,
    callback_args: dict | None = None,
    wandb: bool = False,
    **trainer_overrides,
) -> None:
    if wandb:  # offline, its run folder under `out`
        trainer_overrides["logger"] = WandbLogger(
            project="labelwatch-tests", save_dir=str(out), offline=True
        )
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.0)  # weights stay put: every run scores the same model
    train = DataLoader(BlobDataset(32, seed=1), batch_size=16)
    val = DataLoader(BlobDataset(NUM_VAL, seed=2, flip=6, string_ids=string_ids), batch_size=8)
    callback = LabelWatch(
        dirpath=out, projection="none", metadata_keys=["path"], **(callback_args or {})
    )
    kwargs = trainer_kwargs(out, callbacks=[callback], max_epochs=1, **trainer_overrides)
    Trainer(**kwargs).fit(model, train, val)


def _assert_same_results(single: Path, distributed: Path) -> None:
    a = pd.read_parquet(single / "epoch=0/samples.parquet").sort_values("sample_id")
    b = pd.read_parquet(distributed / "epoch=0/samples.parquet").sort_values("sample_id")
    assert len(b) == NUM_VAL and b["sample_id"].is_unique
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    exact = ["sample_id", "given_label", "predicted_label", "is_confident_mismatch", "path"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for column in ("confidence", "self_confidence", "margin", "entropy", "label_quality"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, atol=1e-6)
    if "watch_1" in a:  # rank zero scores the gathered embeddings as one process would
        for column in ("watch_1", "first_watch_1"):
            np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-4)
        pd.testing.assert_series_equal(a["is_watch_candidate"], b["is_watch_candidate"])
    ca = pd.read_parquet(single / "epoch=0/candidates.parquet")
    cb = pd.read_parquet(distributed / "epoch=0/candidates.parquet")
    assert len(ca) > 0
    assert sorted(ca["sample_id"]) == sorted(cb["sample_id"])


def _script_env() -> dict[str, str]:
    """The environment for a test's own Python script: the repository root first on the
    path, then the caller's PYTHONPATH (which may pick the labelwatch under test, a
    checkout other than the installed one)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def report_group_at_exit() -> None:
    """Say on stderr whether this process still has a process group and gloo worker
    threads (torch names them on Linux). Registered first, so it runs after every other
    exit handler (last in, first out), LabelWatch's included."""
    names = []
    for task in glob.glob("/proc/self/task/*/comm"):
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            names.append(Path(task).read_text().strip())
    group, threads = dist.is_initialized(), names.count("pt_gloo_runloop")
    print(f"at exit: group {group}, gloo threads {threads}", file=sys.stderr)


def _assert_destroyed_at_exit(stderr: str, processes: int) -> None:
    reports = [line for line in stderr.splitlines() if line.startswith("at exit:")]
    assert reports == ["at exit: group False, gloo threads 0"] * processes, reports


SCRIPT = """
import atexit
import json
import sys
from pathlib import Path
from tests.test_distributed import _fit, report_group_at_exit

atexit.register(report_group_at_exit)  # in ddp_spawn's workers too: they import this file

if __name__ == "__main__":  # ddp_spawn's workers import this script again
    out, string_ids, callback_args, strategy, wandb = sys.argv[1:]
    _fit(Path(out), string_ids=string_ids == "1", callback_args=json.loads(callback_args),
         wandb=wandb == "1", strategy=strategy, devices=2)
"""


def _fit_in_a_script(
    tmp_path: Path,
    out: Path,
    strategy: str,
    string_ids: bool,
    callback_args: dict,
    wandb: bool = False,
) -> subprocess.CompletedProcess:
    """Run `_fit` with 2 processes from a fresh Python script, as users launch DDP. Each
    rank destroys its gloo group before Python finalizes (see the exit test below)."""
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(out), "1" if string_ids else "0"]
        + [json.dumps(callback_args), strategy, "1" if wandb else "0"],
        cwd=tmp_path,
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # ddp_spawn's launcher never joins the group: it reports too
    _assert_destroyed_at_exit(result.stderr, 3 if strategy == "ddp_spawn" else 2)
    return result


@pytest.mark.parametrize(
    "callback_args",
    [{}, {"logits_dtype": "float16", "embeddings_dtype": "float16", "watch_classes": ["1"]}],
)
def test_ddp_spawn_equals_a_single_process(tmp_path: Path, callback_args: dict):
    """ddp_spawn on 2 CPU processes: same samples (padding dropped), scores and candidates;
    float16 logits and embeddings are gathered as float16, and a watched class's scores
    are those of one process."""
    _fit(tmp_path / "single", string_ids=False, callback_args=callback_args)
    _fit_in_a_script(tmp_path, tmp_path / "ddp", "ddp_spawn", False, callback_args)
    _assert_same_results(tmp_path / "single", tmp_path / "ddp")


def test_ddp_launched_from_a_script_equals_a_single_process(tmp_path: Path):
    """strategy='ddp' from a script (Lightning re-launches it): string ids, same results."""
    _fit_in_a_script(tmp_path, tmp_path / "ddp", "ddp", True, {})
    _fit(tmp_path / "single", string_ids=True)
    _assert_same_results(tmp_path / "single", tmp_path / "ddp")


def test_ddp_spawn_logs_one_wandb_run_and_says_where_its_tables_went(tmp_path: Path):
    """ddp_spawn with a WandbLogger: one W&B run (rank zero's) with one candidates artifact.
    W&B writes the re-attached run's media under ./wandb, away from the run's folder in
    save_dir, and LabelWatch's warning names the folder where the tables really are."""
    out = tmp_path / "ddp"
    result = _fit_in_a_script(tmp_path, out, "ddp_spawn", False, {}, wandb=True)
    run_dir = offline_run_dir(out)  # exactly one run under save_dir, not one per rank
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    artifacts = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == ARTIFACT_TYPE
    ]
    assert [sorted(a.aliases) for a in artifacts] == [["epoch-0", "latest"]]
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/labelwatch/samples_*.json")
    assert len(json.loads(table.read_text())["data"]) == NUM_VAL
    media_dir = table.parents[3].resolve()  # files/media/table/labelwatch/<table>
    assert f"W&B writes this run's media, the LabelWatch tables included, to {media_dir}," in (
        result.stderr
    )


class NoIds(BlobDataset):
    """Blobs without a sample_id (module level, so ddp_spawn can pickle it)."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        del item["sample_id"]
        return item


def test_ddp_without_sample_ids_is_a_clear_error(tmp_path: Path):
    """Under DDP the running position is meaningless: missing ids stop the run."""

    torch.manual_seed(0)
    val = DataLoader(NoIds(20), batch_size=8)
    train = DataLoader(BlobDataset(16), batch_size=8)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[LabelWatch(projection="none")],
            max_epochs=1,
            strategy="ddp_spawn",
            devices=2,
        )
    )
    with pytest.raises(Exception, match="needs sample ids under DDP"):
        trainer.fit(TinyClassifier(), train, val)


GATHER_SCRIPT = """
import pickle
import sys
import torch
import torch.distributed as dist
from labelwatch.capture import CapturedEpoch, merge_ranks

rank, port, out, case = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
same_ids = case == "same"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
received = []  # bytes this rank receives from collectives that give every rank the result
all_gather, all_gather_object = dist.all_gather, dist.all_gather_object


def counted_all_gather(outputs, tensor, *args, **kwargs):
    received.append(sum(t.numel() * t.element_size() for t in outputs))
    return all_gather(outputs, tensor, *args, **kwargs)


def counted_all_gather_object(outputs, obj, *args, **kwargs):
    all_gather_object(outputs, obj, *args, **kwargs)
    received.append(sum(len(pickle.dumps(o)) for o in outputs))


dist.all_gather, dist.all_gather_object = counted_all_gather, counted_all_gather_object
rows = 4 if same_ids else 3 + rank  # uneven
embeddings = torch.tensor([[1e5, 1e-6], [-3e38, 0.5], [7.0, -2e4], [1e30, 1e-30]][:rows])
ids = torch.arange(rows) if same_ids else torch.arange(rows) * 2 + rank
if rank == 1 and case == "narrower":  # a collate that pads to each batch's longest item
    embeddings = embeddings[:, :1]
if rank == 1 and case == "listed":  # integer ids as a list here, a tensor on rank 0
    ids = ids.tolist()
if rank == 1 and case == "strings":  # string ids here, integers on rank 0
    ids = [str(i) for i in ids.tolist()]
local = CapturedEpoch(
    logits=torch.zeros(rows, 2),
    targets=torch.zeros(rows, dtype=torch.long),
    sample_ids=ids,
    embeddings=embeddings.bfloat16(),
)
try:
    merged = merge_ranks(local)
except ValueError as err:
    merged = str(err)
if rank == 0 and not isinstance(merged, str):
    merged = {"ids": list(merged.sample_ids), "embeddings": merged.embeddings}
if rank == 0:
    torch.save(merged, out)
else:
    torch.save(sum(received), out + ".received")
dist.destroy_process_group()
"""


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _gather_in_two_processes(tmp_path: Path, case: str = "uneven") -> object:
    """Run GATHER_SCRIPT's merge_ranks on 2 gloo processes; what rank 0 got (its error
    message when it raised). ``case``: "uneven" ids, the "same" ids on both ranks,
    embeddings "narrower" on rank 1, integer ids "listed" on rank 1, or "strings" there."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    port = _free_port()
    out = tmp_path / "merged.pt"
    arguments = [port, str(out), case]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), *arguments],
            env=_script_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for rank in ranks:
        _, err = rank.communicate(timeout=120)
        assert rank.returncode == 0, err[-3000:]
    # Rank 1 gets only the ranks' shapes (6 int64 each), never the epoch: the rows go to
    # rank zero alone, which scores them.
    assert torch.load(str(out) + ".received") == 2 * 6 * 8
    return torch.load(out)


def test_bfloat16_embeddings_are_gathered_exactly(tmp_path: Path):
    """bfloat16 embeddings travel as bfloat16: values beyond float16's range (and below its
    precision) arrive as they left each rank. Two real gloo processes, no Trainer."""
    merged = _gather_in_two_processes(tmp_path)
    sent = torch.tensor([[1e5, 1e-6], [-3e38, 0.5], [7.0, -2e4], [1e30, 1e-30]]).bfloat16()
    expected = torch.cat([sent[:3], sent[:4]])[[0, 3, 1, 4, 2, 5, 6]]  # sorted by id
    assert list(merged["ids"]) == [0, 1, 2, 3, 4, 5, 7]
    assert merged["embeddings"].dtype == torch.bfloat16
    assert torch.equal(merged["embeddings"], expected)


def test_every_rank_sending_every_id_names_the_unsplit_dataloader(tmp_path: Path):
    """Ranks that each validated the whole set (no DistributedSampler) send every id
    twice: the error says the dataloader is not split, not only that ids repeat."""
    message = _gather_in_two_processes(tmp_path, "same")
    assert "4 validation samples share a sample id" in message
    assert "use_distributed_sampler=False" in message


def test_ranks_whose_embeddings_differ_in_width_all_raise_a_clear_error(tmp_path: Path):
    """Each rank's own batches agree, but rank 1's embeddings are narrower: the padded
    gather read its bytes at the wrong offsets (ids like 4611686019501129728 and a
    misleading duplicate-id error). Now both ranks raise, naming the widths."""
    message = _gather_in_two_processes(tmp_path, "narrower")
    assert "embeddings of different widths per sample (rank 0: 2, rank 1: 1)" in message


def test_integer_ids_listed_on_one_rank_and_a_tensor_on_another_are_merged(tmp_path: Path):
    """Rank 0's tensor of ids travelled as 0-d tensors beside rank 1's ints: the ids were of
    two kinds, and the fit died at the end of its first epoch."""
    merged = _gather_in_two_processes(tmp_path, "listed")
    assert merged["ids"] == [0, 1, 2, 3, 4, 5, 7]
    assert all(type(i) is int for i in merged["ids"])


def test_ranks_with_ids_of_different_kinds_get_the_one_kind_error(tmp_path: Path):
    """Integer ids on rank 0 and strings on rank 1 failed in the sort that drops the
    sampler's repeats, with a raw TypeError; now with the error one process gives."""
    message = _gather_in_two_processes(tmp_path, "strings")
    assert "must be of one kind, all integers or all strings" in message


EXIT_SCRIPT = """
import atexit
import sys
import torch.distributed as dist
from labelwatch.capture import destroy_gloo_group_at_exit
from tests.test_distributed import report_group_at_exit

atexit.register(report_group_at_exit)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
if sys.argv[2] == "1":
    destroy_gloo_group_at_exit()
"""


@pytest.mark.parametrize("registered", [True, False])
def test_the_gloo_group_is_destroyed_before_python_finalizes(tmp_path: Path, registered: bool):
    """A gloo group left to interpreter finalization can abort a rank as it exits
    (pytorch/pytorch#190489); after a fit LabelWatch has it destroyed at exit instead."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), _free_port(), "1" if registered else "0"],
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if registered:
        _assert_destroyed_at_exit(result.stderr, 1)
    else:  # what Python would finalize with, and the check can tell
        assert "at exit: group True" in result.stderr, result.stderr[-3000:]
