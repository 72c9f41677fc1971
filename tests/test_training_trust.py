"""What the train stage trusts and what it checks first: a resume state that does not fit (discarded, never
a traceback on every rerun) or cannot be saved (a warning), params this machine cannot run (processes,
memory, stray torch.distributed variables), URLs where paths belong, NaN starting weights, and
normalization statistics that describe no images."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch
from conftest import real_params
from test_models_training import arguments, separable_data
from test_prepared import damage_meta, write_good
from test_transfer import project

from imgcls import runtime
from imgcls.errors import CheckpointError, DataError, ParamsError, RuntimeChoiceError, UserError
from imgcls.model.checkpoint import load_checkpoint, save_checkpoint
from imgcls.model.registry import build_model
from imgcls.paths import ProjectPaths
from imgcls.prepared import load_prepared
from imgcls.train import stage
from imgcls.train.distributed import PROCESS_BYTES, SINGLE, LaunchError, World, check_processes, world_from_env
from imgcls.train.loop import FitHooks, FitSetup, estimate_step_memory, fit
from imgcls.train.resume import ResumeStateWriter, load_resume_state, run_digest, save_resume_state
from imgcls.train.stage import train
from imgcls.train.transfer import StartingWeights, TransferError, load_init_checkpoint, load_pretrained

CPU = torch.device("cpu")
# The project's recipe shrunk to seconds: 30 images of 12x12, two epochs of three steps.
TINY = {
    "model": "convnet",
    "optimizer": "sgd",  # the damaged states below are SGD's (momentum buffers)
    "width": 8,
    "epochs": 2,
    "min_steps": 0,
    "batch_size": 10,
    "log_images": 0,
    "precision": "fp32",
}


# ------------------------------------------------------------------------------------------ resume state


def fit_tiny(resume_from=None, verdicts=None, save_state=None, optimizer="sgd"):
    """Two epochs of the fast model (lookahead on, whitening, a bias schedule) on 256 tiny images."""
    images, labels = separable_data()
    config = real_params(
        train={
            "model": "fast",
            "width": 8,
            "epochs": 2,
            "min_steps": 0,
            "batch_size": 32,
            "precision": "fp32",
            "whiten_bias_epochs": 1.0,
            "optimizer": optimizer,
        }
    ).train
    generator = runtime.seed_everything(0)
    model = build_model("fast", **arguments(1, 12, classes=4, width=8), whiten_bias_epochs=1.0)
    records = fit(
        model,
        (images, labels),
        (images[:64], labels[:64]),
        FitSetup(config, CPU, "fp32"),
        generator,
        resume_from=resume_from,
        hooks=FitHooks(save_state=save_state, on_resume=(verdicts if verdicts is not None else []).append),
    )
    return model, records


def _straight_run(optimizer):
    states = []
    model, records = fit_tiny(save_state=lambda state: states.append(copy.deepcopy(state)), optimizer=optimizer)
    assert [s["epoch"] for s in states] == [1]
    return model.state_dict(), records, states[0]


@pytest.fixture(scope="module")
def straight_run():
    """An uninterrupted run's weights and records, and the state it saved after epoch 1 (as loaded from disk)."""
    return _straight_run("sgd")


@pytest.fixture(scope="module")
def straight_adamw_run():
    return _straight_run("adamw")


def _first_weight(tensors: dict) -> str:
    return next(name for name, value in tensors.items() if name.endswith("weight") and value.dim() > 1)


def _wrong_shape(state):
    name = _first_weight(state["model"])
    state["model"][name] = torch.zeros(*state["model"][name].shape[:-1], state["model"][name].shape[-1] + 1)


def _momentum_of_another_shape(state):
    # The largest weight's: the whitening bias (the first entry) is frozen in epoch 2, so nothing would use it.
    entry = max(state["optimizer"]["state"].values(), key=lambda e: e["momentum_buffer"].numel())
    entry["momentum_buffer"] = torch.zeros(3, 3)


def _largest_entry(state):
    # The largest weight's: the whitening bias (the first entry) is frozen in epoch 2, so nothing would use it.
    return max(
        state["optimizer"]["state"].values(),
        key=lambda e: e["exp_avg" if "exp_avg" in e else "momentum_buffer"].numel(),
    )


def _scalar_momentum(state):
    # 0-dim broadcasts in a shape check that skips scalars; SGD then fails mid-step on every rerun.
    _largest_entry(state)["momentum_buffer"] = torch.tensor(0.5)


def _float64_momentum(state):
    entry = _largest_entry(state)
    entry["momentum_buffer"] = entry["momentum_buffer"].double()


def _sparse_momentum(state):
    entry = _largest_entry(state)
    entry["momentum_buffer"] = entry["momentum_buffer"].to_sparse()


def _group_setting(key, value):
    def damage(state):
        state["optimizer"]["param_groups"][0][key] = value

    return damage


def _model_tensor_as(convert):
    def damage(state):
        name = _first_weight(state["model"])
        state["model"][name] = convert(state["model"][name])

    return damage


def _sparse_lookahead(state):
    name = next(name for name, value in state["lookahead"].items() if value.dim() == 2)  # CSR is 2-D only
    state["lookahead"][name] = state["lookahead"][name].to_sparse_csr()


def _garbage_torch_rng(state):
    state["random"]["torch"] = torch.zeros(16, dtype=torch.uint8)


def _garbage_python_rng(state):
    state["random"]["python"] = (3, (1, 2, 3), None)


def _garbage_numpy_rng(state):
    state["random"]["numpy"][1] = torch.zeros(5, dtype=torch.int64)


def _nan_lookahead(state):
    name = _first_weight(state["lookahead"])
    state["lookahead"][name] = torch.full_like(state["lookahead"][name], float("nan"))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (_wrong_shape, "this model's is torch.float32"),
        (lambda s: s["model"].pop(next(iter(s["model"]))), "does not fit this model (missing"),
        (lambda s: s.pop("optimizer"), "it lacks optimizer"),
        (_momentum_of_another_shape, "momentum_buffer of parameter"),
        (lambda s: s["optimizer"]["param_groups"].pop(), "parameter groups"),
        (_garbage_torch_rng, "random generator states cannot be restored"),
        (_garbage_python_rng, "random generator states cannot be restored"),
        (_garbage_numpy_rng, "random generator states cannot be restored"),
        (lambda s: s["random"].update(batches="not a tensor"), "random generator states cannot be restored"),
        (lambda s: s.update(step=s["step"] + 1), "does not match epoch 1"),
        (lambda s: s.update(epoch=7), "not one of this run's 0..1 finished epochs"),
        (lambda s: s.update(records=[]), "records are not the 1 finished epochs' metrics"),
        (_nan_lookahead, "holds NaN or infinite values"),
        (lambda s: s.update(epoch_progress={"batches_done": 99}), "epoch_progress"),
        (_scalar_momentum, "is torch.float32 [], the parameter is torch.float32 ["),
        (_float64_momentum, "is torch.float64"),
        (_sparse_momentum, "momentum_buffer of parameter"),
        (_sparse_momentum, "is a sparse_coo tensor, not a plain dense one"),
        (_group_setting("momentum", float("nan")), "group 0 setting momentum is nan, this run's is 0."),
        (_group_setting("weight_decay", 0.5), "setting weight_decay is 0.5"),
        (_group_setting("base_lr", float("inf")), "setting base_lr is inf"),
        (_group_setting("nesterov", False), "setting nesterov is False"),
        (_group_setting("lr", 1e30), "lr is 1e+30, not a rate in 0.."),
        (_group_setting("lr", -0.1), "lr is -0.1"),
        (_model_tensor_as(lambda t: t.to_sparse()), "is a sparse_coo tensor"),
        (_model_tensor_as(lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)), "is a quantized tensor"),
        (_model_tensor_as(lambda t: torch.empty_like(t, device="meta")), "is a meta tensor"),
        (_sparse_lookahead, "is a sparse_csr tensor"),
    ],
)
def test_a_digest_matching_state_that_does_not_fit_is_discarded_and_training_starts_over(
    straight_run, damage, fragment
):
    weights, records, saved = straight_run
    state = copy.deepcopy(saved)
    damage(state)
    verdicts = []
    model, resumed_records = fit_tiny(resume_from=state, verdicts=verdicts)
    assert len(verdicts) == 1 and fragment in verdicts[0], verdicts
    # Nothing of the state was applied: the run is the uninterrupted one, bit for bit (generators included).
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert [r["train_loss"] for r in resumed_records] == [r["train_loss"] for r in records]


def test_a_state_that_fits_is_used(straight_run):
    weights, records, saved = straight_run
    verdicts = []
    model, resumed_records = fit_tiny(resume_from=copy.deepcopy(saved), verdicts=verdicts)
    assert verdicts == [None]
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert resumed_records[0] == records[0]  # replayed from the state, timings and all: not trained again


def _adamw_moment_scalar(state):
    _largest_entry(state)["exp_avg"] = torch.tensor(0.0)


def _adamw_step(value):
    def damage(state):
        _largest_entry(state)["step"] = torch.tensor(value)

    return damage


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (_adamw_moment_scalar, "exp_avg of parameter"),
        (_adamw_step(float("nan")), "is nan, not a step count in 0.."),
        (_adamw_step(-1.0), "not a step count in 0.."),
        (_adamw_step(1e9), "not a step count in 0.."),
        (_adamw_step(1.5), "not a step count"),
        (lambda s: _largest_entry(s).pop("exp_avg_sq"), "this optimizer keeps ['exp_avg', 'exp_avg_sq', 'step']"),
        (lambda s: _largest_entry(s).update(step=torch.ones(3)), "not a step count"),
        (_group_setting("betas", (0.9, float("nan"))), "setting betas is (0.9, nan)"),
        (_group_setting("eps", float("inf")), "setting eps is inf"),
    ],
)
def test_an_adamw_state_that_does_not_fit_is_discarded(straight_adamw_run, damage, fragment):
    weights, records, saved = straight_adamw_run
    state = copy.deepcopy(saved)
    damage(state)
    verdicts = []
    model, resumed_records = fit_tiny(resume_from=state, verdicts=verdicts, optimizer="adamw")
    assert len(verdicts) == 1 and fragment in verdicts[0], verdicts
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())


def test_an_adamw_state_that_fits_is_used(straight_adamw_run):
    # Its step counters are the 0-dim tensors torch keeps: the checks above must let them through.
    weights, records, saved = straight_adamw_run
    assert all(e["step"].dim() == 0 for e in saved["optimizer"]["state"].values())
    verdicts = []
    model, resumed_records = fit_tiny(resume_from=copy.deepcopy(saved), verdicts=verdicts, optimizer="adamw")
    assert verdicts == [None]
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert resumed_records[0] == records[0]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (_wrong_shape, "this model's is torch.float32"),
        (_scalar_momentum, "momentum_buffer of parameter"),
        (_group_setting("momentum", float("nan")), "setting momentum is nan"),
        (_model_tensor_as(lambda t: t.to_sparse()), "is a sparse_coo tensor"),
    ],
)
def test_the_train_stage_discards_a_damaged_state_with_one_line_and_finishes(
    tmp_path, monkeypatch, capsys, damage, fragment
):
    params = real_params(train=TINY)
    reference, damaged = ProjectPaths(tmp_path / "reference"), ProjectPaths(tmp_path / "damaged")
    for paths in (reference, damaged):
        write_good(paths.prepared_dir)
    train(params, reference)

    # A real state on disk: the run stops after epoch 1's state is saved (as a kill would stop it).
    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(stage, "save_checkpoint", killed)
        with pytest.raises(Killed):
            train(params, damaged)
    state = torch.load(damaged.resume_state, weights_only=True)
    assert state["epoch"] == 1 and state["digest"] == run_digest(params, damaged.prepared_dir)
    damage(state)  # still this run's digest: only the contents are wrong
    torch.save(state, damaged.resume_state)
    capsys.readouterr()

    train(params, damaged)
    out = capsys.readouterr().out
    discarded = [line for line in out.splitlines() if "discarding resume state" in line]
    assert len(discarded) == 1 and str(damaged.resume_state) in discarded[0] and fragment in discarded[0], out
    assert "training from the start" in out and "resuming at step" not in out
    assert not damaged.resume_state.parent.exists()
    a = torch.load(reference.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(damaged.checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # the same as a run that never had a state


@pytest.mark.parametrize("blocker", ["file-in-the-way", "read-only-folder"])
def test_a_resume_state_that_cannot_be_saved_is_a_warning_and_the_run_finishes(tmp_path, capsys, blocker):
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    folder = paths.resume_state.parent
    if blocker == "file-in-the-way":
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the file-in-the-way case covers this")
        folder.mkdir(parents=True)
        folder.chmod(0o555)
    try:
        train(real_params(train={**TINY, "epochs": 3}), paths)  # two saves, after epochs 1 and 2
    finally:
        if folder.is_dir():
            folder.chmod(0o755)
    out = capsys.readouterr().out
    assert out.count("warning: cannot save the resume state") == 1, out  # once, not once an epoch
    assert "training goes on" in out
    assert paths.checkpoint.is_file() and (paths.metrics_dir / "train" / "metrics.json").is_file()


def test_a_full_disk_while_saving_the_state_is_a_warning_not_the_end(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
            "data/3: file write failed"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    lines = []
    writer = ResumeStateWriter(tmp_path / "resume" / "state.pt", "digest", lines.append)
    writer({"epoch": 1})
    writer({"epoch": 2})
    assert not writer.saved and len(lines) == 1 and "PytorchStreamWriter failed writing file" in lines[0]
    assert not (tmp_path / "resume" / "state.pt").exists() and list((tmp_path / "resume").iterdir()) == []


def _single_rank(lines: list) -> stage.Rank:
    return stage.Rank(SINGLE, CPU, "fp32", torch.Generator(), lines.append)


def test_the_resume_point_is_a_state_of_this_run_only(tmp_path):
    # The digest covers the starting weights and the number of processes: a state saved by a one-process run
    # (or from other weights) must not continue a two-process run, whose batches are cut differently.
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    params = real_params(train=TINY)
    single = stage.resume_digest(params, paths, None, World())
    two = stage.resume_digest(params, paths, None, World(size=2, local_size=2))
    start = StartingWeights({}, [0.5], [0.25], head_replaced=False, provenance={"sha256": "ab" * 32})
    assert len({single, two, stage.resume_digest(params, paths, start, World())}) == 3
    save_resume_state(paths.resume_state, single, {"epoch": 1})
    lines = []
    agreed = stage.agree_resume_point(params, paths, _single_rank(lines), None)
    assert agreed.digest == single and agreed.state["epoch"] == 1 and lines == []
    # The same state met with other starting weights: discarded with one line, and the next run starts afresh.
    agreed = stage.agree_resume_point(params, paths, _single_rank(lines), start)
    assert agreed.state is None and not paths.resume_state.exists()
    assert len(lines) == 1 and "saved with other params, data or code" in lines[0]


def test_the_world_is_set_up_from_base_params_and_sync_batchnorm_on_cpus_is_refused_before_any_peer(monkeypatch):
    threads = torch.get_num_threads()
    try:
        lines = []
        monkeypatch.setattr(stage, "log", lambda name: lines.append)
        params = real_params(base={"device": "cpu", "seed": 7, "threads": 1}, train={"precision": "fp32"})
        rank = stage.set_up_world(params, World())
        assert (rank.device, rank.precision, torch.get_num_threads()) == (CPU, "fp32", 1)
        # The batch order's generator is seeded from base.seed, as every run of the same params must be.
        assert torch.equal(
            torch.rand(4, generator=rank.generator), torch.rand(4, generator=torch.Generator().manual_seed(7))
        )
        assert len(lines) == 1 and lines[0].startswith("device cpu") and "precision fp32" in lines[0]
        two = World(rank=1, size=2, local_rank=1, local_size=2)
        sync = real_params(base={"device": "cpu", "threads": 1}, train={"sync_batchnorm": True})
        with pytest.raises(RuntimeChoiceError, match="train.sync_batchnorm: true needs CUDA"):
            stage.set_up_world(sync, two)  # without a process group: it would wait for peers that never come
        assert not torch.distributed.is_initialized()
    finally:
        torch.set_num_threads(threads)


def test_a_foreign_state_in_a_folder_that_refuses_deletion_is_only_skipped(tmp_path, monkeypatch):
    path = tmp_path / "resume" / "state.pt"
    path.parent.mkdir()
    path.write_bytes(b"garbage")

    def read_only(self, missing_ok=False):  # what unlink raises in a read-only folder (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "unlink", read_only)
    lines = []
    assert load_resume_state(path, "digest", lines.append) is None and "unreadable" in lines[-1]
    assert path.exists()  # left behind: the next run skips it again


# ------------------------------------------------------------------------------- processes and memory


@pytest.mark.parametrize(
    "variables",
    [
        {"RANK": "0", "WORLD_SIZE": "2"},  # left over from another job: init_process_group waits 30 minutes
        {"WORLD_SIZE": "1"},
        # No MASTER_ADDR: without the check this fails at once instead of hanging the test suite for 30 minutes.
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
    ],
)
def test_stray_torch_distributed_variables_are_refused_with_one_line(tmp_path, monkeypatch, variables):
    for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    with pytest.raises(LaunchError) as caught:
        train(real_params(train=TINY), paths)
    message = str(caught.value)
    assert "not started by torchrun" in message and "\n" not in message
    assert "unset " + " ".join(n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if n in variables) in message
    assert not paths.checkpoint.exists()


@pytest.mark.parametrize(
    "variables, fragment",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "is not a place in a torchrun job"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "is not a place in a torchrun job"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "is not a place in a torchrun job"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "is not a place"),
        ({"RANK": "0"}, "is not a place in a torchrun job"),
    ],
)
def test_malformed_torchrun_places_are_refused(monkeypatch, variables, fragment):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=fragment):
        world_from_env()


def test_torchrun_places_are_read_and_plain_runs_have_none(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() is None
    for name, value in {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "TORCHELASTIC_RUN_ID": "job",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)
    assert world_from_env() == World(rank=3, size=4, local_rank=1, local_size=2)


def _torchrun_place(monkeypatch, **variables):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"TORCHELASTIC_RUN_ID": "x", **variables}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "rendezvous",
    [
        {"MASTER_ADDR": "127.0.0.1"},
        {"MASTER_PORT": "29500"},
        {"MASTER_ADDR": "", "MASTER_PORT": "29500"},
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
        # Port 0 would make rank 0 listen on a free port and wait 30 minutes for a peer that cannot find it.
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"},
    ],
)
def test_a_torchrun_place_without_a_usable_rendezvous_is_refused(monkeypatch, rendezvous):
    _torchrun_place(monkeypatch, RANK="0", WORLD_SIZE="2", **rendezvous)
    with pytest.raises(LaunchError) as caught:
        world_from_env()
    message = str(caught.value)
    assert "MASTER_ADDR:MASTER_PORT" in message and "unset RANK WORLD_SIZE" in message and "\n" not in message
    assert f"MASTER_PORT={rendezvous.get('MASTER_PORT') or '(unset)'}" in message


def test_the_train_stage_refuses_a_torchrun_place_without_master_addr_with_one_line(tmp_path, monkeypatch):
    # torchrun's mark and places but no MASTER_*: once init_process_group's "MASTER_ADDR expected" traceback.
    _torchrun_place(monkeypatch, RANK="0", WORLD_SIZE="2")
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    with pytest.raises(LaunchError, match=r"MASTER_ADDR=\(unset\) MASTER_PORT=\(unset\)"):
        train(real_params(train=TINY), paths)
    assert not paths.checkpoint.exists()


def test_a_single_process_torchrun_place_needs_no_rendezvous(monkeypatch):
    # One process starts no process group, so nothing reads MASTER_ADDR: refusing it would only be in the way.
    _torchrun_place(monkeypatch, RANK="0", WORLD_SIZE="1")
    assert world_from_env() == World(rank=0, size=1, local_rank=0, local_size=1)


def test_more_processes_than_cores_is_a_warning_and_more_than_memory_a_refusal():
    lines = []
    check_processes(4, cores=2, available_bytes=64 << 30, data_bytes=0, gpus=None, emit=lines.append)
    assert len(lines) == 1 and "train.processes = 4 on 2 core(s)" in lines[0] and "at most 2" in lines[0]
    lines.clear()
    check_processes(2, cores=2, available_bytes=64 << 30, data_bytes=0, gpus=None, emit=lines.append)
    assert lines == []
    # 8 processes each keeping 1 GiB of images: 8 x (1 GiB + PROCESS_BYTES) cannot fit in 8 GiB.
    with pytest.raises(LaunchError) as caught:
        check_processes(8, cores=16, available_bytes=8 << 30, data_bytes=1 << 30, gpus=None, emit=lines.append)
    message = str(caught.value)
    expected = (8 * ((1 << 30) + PROCESS_BYTES) + (300 << 20)) / 2**30
    assert f"train.processes = 8 needs about {expected:.1f} GiB" in message and "8.0 GiB are available" in message
    assert "at most 5" in message and "train.in_memory: never" in message  # (8 GiB - 300 MiB) // 1.47 GiB
    with pytest.raises(LaunchError, match="train.processes = 2 but 1 GPU"):
        check_processes(2, cores=16, available_bytes=64 << 30, data_bytes=0, gpus=1, emit=lines.append)


def test_the_stage_refuses_processes_the_memory_cannot_hold_before_starting_torchrun(tmp_path, monkeypatch):
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    monkeypatch.setattr(stage, "available_memory", lambda device: 2 << 30)
    monkeypatch.setattr(stage, "launch", lambda *args: pytest.fail("torchrun was started"))
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError, match=r"train.processes = 8 needs about 4\.0 GiB"):
        train(real_params(train={**TINY, "processes": 8}), paths)


def test_the_step_estimate_leaves_the_model_and_every_generator_as_they_were():
    config = real_params(train={"model": "mobilenet_v3_small"}).train  # BatchNorm statistics and dropout draws
    model = build_model(
        "mobilenet_v3_small", in_channels=3, num_classes=4, image_size=32, mean=[0.5] * 3, std=[0.25] * 3
    )
    before = copy.deepcopy(model.state_dict())
    runtime.seed_everything(5)
    estimate_step_memory(model, (3, 32, 32), config=config, device=CPU, precision="fp32")
    drawn = (torch.rand(3), np.random.rand(), random.random())
    runtime.seed_everything(5)
    assert torch.equal(drawn[0], torch.rand(3)) and drawn[1:] == (np.random.rand(), random.random())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_step_estimate_grows_with_the_pixels_and_counts_the_optimizer():
    def estimate(size, **train):
        config = real_params(train={"model": "convnet", "width": 16, **train}).train
        model = build_model(
            "convnet", in_channels=3, num_classes=4, image_size=size, mean=[0.5] * 3, std=[0.25] * 3, width=16
        )
        return estimate_step_memory(model, (3, size, size), config=config, device=CPU, precision="fp32"), model

    small, model = estimate(32, optimizer="sgd", momentum=0.9, ema=0.0)
    large, _ = estimate(64, optimizer="sgd", momentum=0.9, ema=0.0)
    # Every activation has 4x the pixels: the saved tensors per image grow 4x (the head's few bytes aside).
    assert 3.8 < large.activation_bytes_per_image / small.activation_bytes_per_image < 4.1
    # The first conv alone saves its float input: 3 x 32 x 32 x 4 bytes; a convnet saves many such tensors.
    assert small.activation_bytes_per_image > 10 * 3 * 32 * 32 * 4
    weights = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert small.state_bytes == 2 * weights  # a gradient and a momentum buffer per weight
    adamw, _ = estimate(32, optimizer="adamw", ema=0.0)
    assert adamw.state_bytes == 3 * weights
    assert small.total(100) == 100 * small.activation_bytes_per_image + small.state_bytes


def test_a_batch_too_large_for_the_memory_is_refused_naming_batch_size_and_image_size(tmp_path, monkeypatch):
    paths = project(tmp_path, "imagefolder", ["a", "b"], n_train=48, size=32, channels=3)
    params = real_params(
        train={**TINY, "batch_size": 48, "min_batches_per_epoch": 1},
        data={"dataset": "imagefolder", "source": "images.tar.gz", "image_size": 32},
    )
    monkeypatch.setattr(stage, "available_memory", lambda device: 4 << 20)  # 4 MiB: no 48-image step fits
    with pytest.raises(RuntimeChoiceError) as caught:
        train(params, paths)
    message = str(caught.value)
    assert "train.batch_size = 48" in message and "a batch of 48 3x32x32 images" in message
    assert "data.image_size (32)" in message and "cpu has 4 MiB available" in message
    assert not paths.checkpoint.exists()
    # The same run with the memory it needs trains: the check refuses only what cannot fit.
    monkeypatch.setattr(stage, "available_memory", lambda device: 16 << 30)
    train(params, paths)
    assert paths.checkpoint.is_file()


def test_available_memory_respects_a_container_limit(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("3221225472\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 536870912\nactive_file 2\n")
    assert runtime.cgroup_available_memory(v2) == (1 << 30) + (512 << 20)  # the cache is reclaimed first
    (v2 / "memory.max").write_text("max\n")
    assert runtime.cgroup_available_memory(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1073741824\n")
    assert runtime.cgroup_available_memory(v1) == 1 << 30
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert runtime.cgroup_available_memory(v1) is None
    assert runtime.cgroup_available_memory(tmp_path / "none") is None


# ---------------------------------------------------------------------------- starting weights, params


@pytest.mark.parametrize("key", ["pretrained", "init_from"])
@pytest.mark.parametrize(
    "url",
    ["https://download.pytorch.org/models/resnet18-f37072fd.pth", "file:///tmp/x.pt", "s3://bucket/checkpoint.pt"],
)
def test_urls_where_a_weights_path_belongs_are_refused(key, url):
    model = {"model": "resnet18"} if key == "pretrained" else {}
    with pytest.raises(ParamsError) as caught:
        real_params(train={**model, key: url})
    message = str(caught.value)
    assert f"train.{key} = '{url}' is a URL" in message and "download the file" in message


def test_paths_that_merely_contain_a_colon_are_still_paths():
    assert real_params(
        train={"init_from": "runs/2024-01-01T10:00/checkpoint.pt", "trust_weights_file": True}
    ).train.init_from.endswith(".pt")


def test_nan_pretrained_weights_are_refused_naming_the_file_not_the_rate(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "resnet18-damaged.pth"
    torch.save(state, weights)
    paths = project(tmp_path, "imagefolder", ["a", "b"], size=16)
    params = real_params(
        train={**TINY, "model": "resnet18", "pretrained": str(weights), "trust_weights_file": True},
        data={"dataset": "imagefolder", "source": "images.tar.gz", "image_size": 16},
    )
    with pytest.raises(TransferError) as caught:
        train(params, paths)
    message = str(caught.value)
    assert str(weights) in message and "NaN or infinite weights (layer1.0.conv1.weight)" in message
    assert "train.lr" not in message and not paths.checkpoint.exists()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = 0.0
    torch.save(state, weights)
    assert load_pretrained("resnet18", str(weights), lambda line: None, trust=True).state  # the repaired file loads


def test_nan_init_from_weights_are_refused_naming_the_file(tmp_path):
    model = build_model("convnet", **arguments(1, 12, classes=3, width=8))
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    path = tmp_path / "start.pt"
    save_checkpoint(
        path,
        model,
        architecture="convnet",
        arguments=arguments(1, 12, classes=3, width=8),
        class_names=["a", "b", "c"],
        mean=[0.5],
        std=[0.25],
        params={},
    )
    with pytest.raises(TransferError, match=r"train.init_from: .*start.pt: weights \['head.weight'\] hold NaN"):
        load_init_checkpoint(str(path), architecture="convnet", in_channels=1, width=8, class_names=["a", "b", "c"])


UNUSUAL_TENSORS = {  # what weights_only loading admits besides plain tensors; isfinite raises on most of them
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.flatten(1).to_sparse_csr(),
    "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
    "meta": lambda t: torch.empty_like(t, device="meta"),
}


def _checkpoint_with(tmp_path, kind):
    model = build_model("convnet", **arguments(1, 12, classes=3, width=8))
    path = tmp_path / "start.pt"
    save_checkpoint(
        path,
        model,
        architecture="convnet",
        arguments=arguments(1, 12, classes=3, width=8),
        class_names=["a", "b", "c"],
        mean=[0.5],
        std=[0.25],
        params={},
    )
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["head.weight"] = UNUSUAL_TENSORS[kind](checkpoint["state_dict"]["head.weight"])
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("kind", UNUSUAL_TENSORS)
def test_a_checkpoint_holding_a_sparse_quantized_or_meta_tensor_is_refused_naming_it(tmp_path, kind):
    path = _checkpoint_with(tmp_path, kind)
    with pytest.raises(CheckpointError) as caught:  # predict --trust-model, evaluate and export load this way
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and f"head.weight is a {kind}" in message and "\n" not in message
    with pytest.raises(TransferError) as caught:
        load_init_checkpoint(str(path), architecture="convnet", in_channels=1, width=8, class_names=["a", "b", "c"])
    message = str(caught.value)
    assert message.startswith("train.init_from: ") and str(path) in message and f"head.weight is a {kind}" in message


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta"])
def test_trusted_pretrained_weights_holding_a_sparse_or_meta_tensor_are_refused_naming_it(tmp_path, kind):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = UNUSUAL_TENSORS[kind](state["conv1.weight"])
    weights = tmp_path / "resnet18-odd.pth"
    torch.save(state, weights)
    with pytest.raises(TransferError) as caught:
        load_pretrained("resnet18", str(weights), lambda line: None, trust=True)
    message = str(caught.value)
    assert str(weights) in message and f"conv1.weight is a {kind}" in message and "\n" not in message


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"std": [1e-30]}, "std [1e-30]"),  # once a LinAlgError traceback from the fast model's whitening
        ({"std": [0.9]}, "std [0.9]"),
        ({"mean": [1e30]}, "mean [1e+30]"),
        ({"mean": [-0.2]}, "mean [-0.2]"),
    ],
)
def test_normalization_statistics_no_images_can_have_are_refused(tmp_path, changes, fragment):
    write_good(tmp_path / "prepared")
    damage_meta(tmp_path / "prepared", **changes)
    with pytest.raises(DataError) as caught:
        load_prepared(tmp_path / "prepared", ("train",))
    message = str(caught.value)
    assert "mean must lie in 0..1" in message and fragment in message
    assert "dvc repro -f preprocess" in message and "\n" not in message


def test_the_train_stage_refuses_a_vanishing_std_with_one_line_not_a_linalg_traceback(tmp_path):
    paths = ProjectPaths(tmp_path)
    write_good(paths.prepared_dir)
    damage_meta(paths.prepared_dir, std=[1e-30])
    with pytest.raises(UserError, match="meta.json: mean must lie in 0..1"):
        train(real_params(train={**TINY, "model": "fast"}), paths)


def test_the_smallest_std_real_images_can_have_passes(tmp_path):
    # One pixel in a million a grey level brighter than the rest: std = sqrt(n - 1) / n / 255, about 3.9e-6.
    write_good(tmp_path / "prepared")
    n = 10**6
    damage_meta(tmp_path / "prepared", std=[float(np.sqrt(n - 1) / n / 255)])
    assert load_prepared(tmp_path / "prepared", ("train",)).meta["std"][0] > 0
