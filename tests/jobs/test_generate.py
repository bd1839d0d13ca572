"""The generation job end to end on a local Ray: a clean run, a rerun, a driver killed with
SIGKILL and rerun, an actor killed mid-shard, S3 input and output on a moto server, and the
status command. Killed runs must end with exactly the clean run's outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.generate import main
from pipeline.driver import GenerateConfig, run_generation
from tests.jobs.helpers import GENERATOR, hidden_files, snapshot, tar_records

REPO = Path(__file__).resolve().parents[2]
NUM_SHARDS = 6  # 12 list entries (10 images, a corrupt and a missing one), 2 per shard


def _config(inputs, model_files, output, **kw) -> GenerateConfig:
    cfg_json, ckpt = model_files
    base = {
        "input": inputs[0],
        "output": str(output),
        "model": cfg_json,
        "checkpoint": ckpt,
        "generator": dict(GENERATOR),
        "shard_size": 2,
        "progress": False,
        "read_threads": 2,
        "num_actors": 2,
    }
    base.update(kw)
    return GenerateConfig(**base)


def _cli_args(inputs, model_files, output, *extra) -> list[str]:
    cfg_json, ckpt = model_files
    return [
        inputs[0], str(output), "--model", cfg_json, "--checkpoint", ckpt,
        "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--shard-size", "2", "--read-threads", "2", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clean(ray_address, inputs, model_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run_generation(_config(inputs, model_files, out))
    return out, summary


def test_clean_run_every_image_once_failures_recorded(clean, inputs):
    out, summary = clean
    assert summary.ok and summary.state == "complete"
    assert (summary.shards_total, summary.shards_done, summary.shards_failed) == (
        NUM_SHARDS,
        NUM_SHARDS,
        0,
    )
    assert (summary.images_ok, summary.images_failed) == (10, 2)
    entries = inputs[1]
    status = pd.read_parquet(out / "index" / "status").sort_values("image_id")
    # every planned image exactly once, ids 1.. in list order
    assert list(status.image_id) == list(range(1, len(entries) + 1))
    assert [os.path.basename(u) for u in status.uri] == [os.path.basename(e) for e in entries]
    by_name = dict(zip((os.path.basename(u) for u in status.uri), status.status))
    assert by_name["corrupt.jpg"] == "corrupt" and by_name["missing.jpg"] == "missing"
    assert (status.status == "ok").sum() == 10
    ok_ids = set(status.image_id[status.status == "ok"])
    in_tars: list[int] = []
    for k in range(NUM_SHARDS):
        recs = tar_records(out / f"sa_{k:06d}.tar")
        in_tars += list(recs)
        for r in recs.values():  # the trained tiny model: many distinct masks per image
            assert len({a["segmentation"]["counts"] for a in r["annotations"]}) >= 10
    assert sorted(in_tars) == sorted(ok_ids)  # no image missing or duplicated
    anns = pd.read_parquet(str(out) + "/index/annotations")
    assert set(anns.image_id) == ok_ids and anns.id.is_unique
    assert len(anns) == summary.annotations > 0
    assert sorted(pd.read_parquet(out / "index" / "images").image_id) == sorted(ok_ids)
    assert hidden_files(out) == []


def test_actors_are_pinned_to_distinct_gpus(clean):
    _, summary = clean
    gpu_ids = [tuple(w["gpu_ids"]) for w in summary.workers]
    assert len(gpu_ids) == 2 and all(len(g) == 1 for g in gpu_ids)
    assert len(set(gpu_ids)) == 2  # each actor has its own device
    assert {w["cuda_visible_devices"] for w in summary.workers} == {g[0] for g in gpu_ids}
    assert all(w["device"] == "cpu" for w in summary.workers)  # no real GPU here


def test_rerun_skips_committed_shards_and_changes_nothing(clean, inputs, model_files, capsys):
    out, _ = clean
    before = snapshot(out)
    rc = main(_cli_args(inputs, model_files, out, "--num-actors", "2"))
    assert rc == 0
    assert (
        f"{NUM_SHARDS}/{NUM_SHARDS} committed ({NUM_SHARDS} before this run, 0 now"
        in capsys.readouterr().out
    )
    assert snapshot(out) == before


def test_rerun_with_other_settings_is_refused(clean, inputs, model_files, capsys):
    out, _ = clean
    args = _cli_args(inputs, model_files, out)
    args[args.index("--points-per-side") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "different plan, model or settings" in err and "points_per_side: recorded 4, now 3" in err
    )


def test_driver_killed_with_sigkill_then_rerun_equals_clean_run(
    clean, ray_address, inputs, model_files, tmp_path, capsys
):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "jobs.generate",
        *_cli_args(inputs, model_files, out, "--address", ray_address, "--num-actors", "1",
                   "--max-inflight-per-actor", "1"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    commits = out / "_commits"
    deadline = time.monotonic() + 120
    n = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            n = len(list(commits.glob("*.json"))) if commits.exists() else 0
            if n >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list(commits.glob("*.json")))
    assert 1 <= done < NUM_SHARDS, f"killed too late: {done} shards committed"

    # status of the interrupted run, from its markers
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{done}/{NUM_SHARDS} committed" in text and f"pending     {NUM_SHARDS - done}" in text

    summary = run_generation(_config(inputs, model_files, out))
    assert summary.ok and summary.shards_skipped == done
    assert summary.shards_done == NUM_SHARDS - done
    assert snapshot(out) == snapshot(clean[0])
    assert hidden_files(out) == []


def _run_killing_a_worker_mid_shard(cfg: GenerateConfig, join_s: float = 180) -> tuple:
    """Run ``cfg`` on a thread and kill a worker while a shard is being written (its tar's
    temp file exists, no marker yet); returns ``(result, killed, thread)``."""
    import ray

    out = Path(cfg.output)
    result: dict = {}

    def run():
        try:
            result["summary"] = run_generation(cfg)
        except BaseException as e:  # surfaced by the caller
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and t.is_alive() and killed is None:
        for tmp in out.glob(".sa_*.tar.tmp-*") if out.exists() else []:
            name = tmp.name[1:].split(".")[0]
            if not (out / "_commits" / f"{name}.json").exists():
                workers = sorted(
                    n for n in ray.util.list_named_actors() if n.startswith("sa1b-worker-")
                )
                if workers:
                    ray.kill(ray.get_actor(workers[0]), no_restart=True)
                    killed = (workers[0], name)
                break
        time.sleep(0.01)
    t.join(join_s)
    assert killed is not None, "no shard was seen in progress"
    assert "error" not in result, result.get("error")
    return result, killed, t


def test_actor_killed_mid_shard_is_retried_elsewhere(clean, inputs, model_files, tmp_path):
    out = tmp_path / "out"
    result, _, _ = _run_killing_a_worker_mid_shard(_config(inputs, model_files, out))
    summary = result["summary"]
    assert summary.ok and summary.retries >= 1 and summary.actors_replaced >= 1
    assert snapshot(out) == snapshot(clean[0])
    assert hidden_files(out) == []


def test_a_replacement_worker_that_cannot_be_placed_is_dropped_not_waited_for(
    clean, inputs, model_files, tmp_path, monkeypatch
):
    """After a worker dies, its replacement asks for resources the cluster does not have
    (a lost GPU node): the driver drops it after the start timeout and finishes on the
    other worker instead of waiting for ever."""
    from pipeline import driver

    spawn = driver._Pool._spawn

    def unplaceable_replacements(self, i):
        if self.replaced == 0:
            return spawn(self, i)
        return driver.worker_actor_class().options(num_cpus=1, num_gpus=64).remote(self.wcfg)

    monkeypatch.setattr(driver._Pool, "_spawn", unplaceable_replacements)
    out = tmp_path / "out"
    cfg = _config(inputs, model_files, out, actor_start_timeout=20.0)
    result, _, t = _run_killing_a_worker_mid_shard(cfg, join_s=240)
    assert not t.is_alive(), "the driver waited for an actor that can never start"
    summary = result["summary"]
    assert summary.ok and summary.actors_replaced == 1
    assert snapshot(out) == snapshot(clean[0])


def test_s3_input_and_output_through_moto(clean, s3, inputs, model_files):
    bucket, fs = s3
    lst, entries = inputs
    root = os.path.dirname(lst)
    fs.put(lst, f"{bucket}/in/images.txt")
    for e in entries:
        if os.path.exists(os.path.join(root, e)):
            fs.put(os.path.join(root, e), f"{bucket}/in/{e}")
    out = f"s3://{bucket}/out"
    cfg = _config(inputs, model_files, out, input=f"s3://{bucket}/in/images.txt", num_actors=1)
    summary = run_generation(cfg)
    assert summary.ok and (summary.images_ok, summary.images_failed) == (10, 2)

    local = clean[0]
    for k in range(NUM_SHARDS):
        name = f"sa_{k:06d}"
        assert fs.cat(f"{bucket}/out/{name}.tar") == (local / f"{name}.tar").read_bytes()
        assert fs.exists(f"{bucket}/out/_commits/{name}.json")
    anns = pd.read_parquet(
        f"s3://{bucket}/out/index/annotations", storage_options={"endpoint_url": s3_endpoint(fs)}
    )
    assert (
        anns.sort_values("id")
        .reset_index(drop=True)
        .equals(
            pd.read_parquet(local / "index" / "annotations")
            .sort_values("id")
            .reset_index(drop=True)
        )
    )
    status = pq.read_table(fs.open(f"{bucket}/out/index/status/sa_000002.parquet")).to_pylist()
    assert [r["status"] for r in status] == ["ok", "missing"]
    assert status[1]["uri"] == f"s3://{bucket}/in/imgs/missing.jpg"

    again = run_generation(cfg)  # resume: everything committed, nothing redone
    assert again.ok and again.shards_skipped == NUM_SHARDS and again.shards_done == 0


def s3_endpoint(fs) -> str:
    return fs.client_kwargs.get("endpoint_url") or os.environ["FSSPEC_S3_ENDPOINT_URL"]


def test_user_errors_exit_2_with_one_clear_message(tmp_path, model_files, capsys):
    cfg_json, ckpt = model_files
    missing = str(tmp_path / "no-such-folder")
    assert main([missing, str(tmp_path / "o"), "--model", cfg_json, "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sa1b-generate: input {missing}: not found"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert (
        main(
            [
                str(tmp_path / "in"),
                str(tmp_path / "o"),
                "--model",
                cfg_json,
                "--checkpoint",
                str(bad),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert main(["status", str(tmp_path / "o")]) == 2


def test_a_shard_that_keeps_failing_is_reported_and_the_job_exits_1(
    ray_address, inputs, model_files, tmp_path, capsys
):
    out = tmp_path / "out"
    (out / "sa_000001.tar").mkdir(parents=True)  # its tar can never be written
    rc = main(_cli_args(inputs, model_files, out, "--num-actors", "2", "--max-attempts", "2"))
    assert rc == 1
    text = capsys.readouterr().out
    assert "run incomplete" in text and f"{NUM_SHARDS - 1}/{NUM_SHARDS} committed" in text
    assert "FAILED   sa_000001:" in text and "(after 2 attempts)" in text
    assert sorted(p.stem for p in (out / "_commits").glob("*.json")) == [
        f"sa_{k:06d}" for k in range(NUM_SHARDS) if k != 1
    ]
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "pending     1: sa_000001" in status and "failed    sa_000001" in status


def test_a_damaged_input_shard_is_committed_as_far_as_readable_and_reported(
    ray_address, model_files, tmp_path, capsys
):
    """Re-annotating SA-1B shards, one truncated: its readable images are committed and
    its marker records the damage; the summary names it and the job exits 1, on the
    first run and on a rerun (which redoes nothing)."""
    from pipeline.sa1b_writer import ShardWriter
    from tests.jobs.helpers import image_bytes

    src = tmp_path / "in"
    src.mkdir()
    for sid in (0, 1):
        with ShardWriter(str(src / f"sa_00000{sid}.tar")) as w:
            for i in range(1, 4):
                image_id = 100 * sid + i
                w.add(
                    image_id,
                    image_bytes(image_id),
                    {"image": {"image_id": image_id}, "annotations": []},
                )
    data = (src / "sa_000001.tar").read_bytes()
    (src / "sa_000001.tar").write_bytes(data[: len(data) * 2 // 3])
    cfg_json, ckpt = model_files
    out = tmp_path / "out"
    argv = [
        str(src), str(out), "--model", cfg_json, "--checkpoint", ckpt, "--points-per-side", "4",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--no-progress",
        "--num-actors", "1",
    ]  # fmt: skip
    for run in range(2):
        assert main(argv) == 1
        text = capsys.readouterr().out
        assert "2/2 committed" in text
        assert "DAMAGED  sa_000001: input TruncatedShardError" in text, text
        assert "sa_000000" not in text.split("DAMAGED", 1)[1]
        if run == 0:
            first = snapshot(out)
    assert snapshot(out) == first
    assert len(tar_records(out / "sa_000000.tar")) == 3
    assert 0 < len(tar_records(out / "sa_000001.tar")) < 3


def test_the_readme_offline_demo_end_to_end(ray_address, tmp_path, capsys, monkeypatch):
    """The README's main offline path, smaller: demo images, the job with its defaults
    (the bundled tiny model, no checkpoint argument), status, pandas and an overlay."""
    from jobs.demo import main as demo_main
    from pipeline.cli import main as decode_main

    monkeypatch.chdir(tmp_path)
    assert demo_main(["demo_images", "--num-images", "3", "--size", "192x256"]) == 0
    args = ["demo_images", "demo_out", "--shard-size", "2", "--points-per-side", "8",
            "--pred-iou-thresh", "0.3", "--stability-score-thresh", "0.6",
            "--num-actors", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "run complete" in capsys.readouterr().out
    assert main(["status", "demo_out"]) == 0
    anns = pd.read_parquet("demo_out/index/annotations")
    assert anns.groupby("image_id").size().min() >= 5 and anns.image_id.nunique() == 3
    assert decode_main(["show", "demo_out/sa_000000.tar", "--id", "1", "--out", "o.png"]) == 0
    assert (tmp_path / "o.png").stat().st_size > 1000
    capsys.readouterr()
    assert decode_main(["stats", "demo_out", "--picture", "stats.png", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["images"], stats["annotations"]) == (3, len(anns))
    assert (tmp_path / "stats.png").stat().st_size > 1000
