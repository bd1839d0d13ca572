"""What the driver hands to its Ray workers."""

from __future__ import annotations

import json
import os

import fsspec.config
import pytest

from pipeline.driver import GenerateConfig, worker_env


def test_worker_env_forwards_store_settings_but_no_secret(monkeypatch):
    """The workers' environment is shown by the Ray dashboard: endpoints and regions go
    there, credentials never do, also not inside fsspec's JSON options."""
    for k in list(os.environ):
        if k.startswith(("FSSPEC_", "AWS_")):
            monkeypatch.delenv(k)
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_SECRET_ACCESS_KEY": "s-1",
        "AWS_ACCESS_KEY_ID": "s-2",
        "AWS_SESSION_TOKEN": "s-3",
        "FSSPEC_S3_KEY": "s-4",
        "FSSPEC_S3": json.dumps(
            {
                "key": "s-5",
                "secret": "s-6",
                "anon": False,
                "client_kwargs": {
                    "endpoint_url": "http://minio:9000",
                    "aws_secret_access_key": "s-7",
                },
            }
        ),
        "FSSPEC_S3_CLIENT_KWARGS": json.dumps({"region_name": "eu", "aws_session_token": "s-8"}),
        "FSSPEC_HTTP_BLOCK_SIZE": "1048576",
        "FSSPEC_HTTP": json.dumps(
            {"client_kwargs": {"headers": {"Authorization": "Bearer s-9", "X-Trace": "on"}}}
        ),
        "FSSPEC_S3_ENDPOINT_URL": "http://user:s-10@minio:9000",
        "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "FSSPEC_S3_CONFIG_KWARGS": json.dumps({"signature_version": "s3v4"}),  # a setting
        "HOME": "/home/someone",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = worker_env(GenerateConfig(input="in", output="out"))
    assert "s-" not in json.dumps(out)
    assert out["AWS_ENDPOINT_URL"] == "http://minio:9000" and out["AWS_REGION"] == "eu-west-1"
    assert out["FSSPEC_HTTP_BLOCK_SIZE"] == "1048576" and "HOME" not in out
    assert out["FSSPEC_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert out["AWS_CA_BUNDLE"] == "/etc/ssl/ca.pem"
    assert json.loads(out["FSSPEC_S3_CONFIG_KWARGS"]) == {"signature_version": "s3v4"}
    assert json.loads(out["FSSPEC_HTTP"]) == {"client_kwargs": {"headers": {"X-Trace": "on"}}}
    # what fsspec makes of the forwarded variables: the same options, less the secrets
    conf: dict = {}
    fsspec.config.set_conf_env(conf, out)
    assert conf["s3"] == {
        "anon": False,
        "client_kwargs": {"region_name": "eu"},  # the option variable applies last
        "endpoint_url": "http://minio:9000",  # without its user:password@
        "config_kwargs": {"signature_version": "s3v4"},
    }
    conf = {}
    fsspec.config.set_conf_env(conf, {"FSSPEC_S3": out["FSSPEC_S3"]})
    assert conf["s3"]["client_kwargs"] == {"endpoint_url": "http://minio:9000"}


def _actors(monkeypatch, caplog, resources, **cfg):
    import ray

    from pipeline import driver

    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.driver"):
        got = driver._default_actors(GenerateConfig("in", "out", **cfg))
    return got, [r.getMessage() for r in caplog.records]


def test_actor_count_follows_the_cluster_and_warns_when_a_big_model_gets_no_gpu(
    monkeypatch, caplog
):
    # one actor per GPU when there are GPUs
    assert _actors(monkeypatch, caplog, {"CPU": 32, "GPU": 4}, model="vit_h") == ((4, 1.0), [])
    assert _actors(monkeypatch, caplog, {"CPU": 32, "GPU": 4}, gpus_per_actor=0.5)[0] == (8, 0.5)
    # no GPU: one actor per cpus_per_actor CPUs; the tiny model is meant for that ...
    assert _actors(monkeypatch, caplog, {"CPU": 6}, cpus_per_actor=2.0) == ((3, 0.0), [])
    # ... a ViT model is not: the user hears how to get GPU actors from an autoscaler
    (n, gpus), warnings = _actors(monkeypatch, caplog, {"CPU": 2}, model="vit_h")
    assert (n, gpus) == (2, 0.0)
    assert len(warnings) == 1 and "--gpus-per-actor 1 --num-actors N" in warnings[0]
    # asked for explicitly: GPU actors even while the cluster has none yet (autoscaling)
    got = _actors(monkeypatch, caplog, {"CPU": 2}, model="vit_h", gpus_per_actor=1.0, num_actors=8)
    assert got == ((8, 1.0), [])


def _run_config(tmp_path, **generator):
    from tests.jobs.helpers import GENERATOR, write_inputs, write_model

    cfg_json, ckpt = write_model(tmp_path / "model")
    listing, _ = write_inputs(tmp_path / "in", n_good=3)
    return GenerateConfig(
        input=listing, output=str(tmp_path / "out"), model=cfg_json, checkpoint=ckpt,
        generator={**GENERATOR, **generator}, shard_size=2, progress=False,
    )  # fmt: skip


def test_bad_generator_settings_are_refused_before_anything_is_recorded(tmp_path):
    from pipeline.driver import ConfigError, prepare_run

    cfg = _run_config(tmp_path, crop_overlap_ratio=1.5)
    with pytest.raises(ConfigError, match=r"generator settings: crop_overlap_ratio must be in"):
        prepare_run(cfg)
    assert not (tmp_path / "out").exists()


def test_options_added_later_keep_earlier_runs_resumable():
    """A generator option added after runs were recorded (resize) is recorded only when it
    differs from the behaviour those runs had: a rerun of an earlier command still
    matches its manifest, and a run that asks for the new behaviour is told apart."""
    from pipeline.driver import ConfigError, resolve_generator_settings
    from pipeline.manifest import RunConflictError, check_compatible

    before = resolve_generator_settings("default", {})
    assert "resize" not in before
    assert resolve_generator_settings("default", {"resize": "pil"}) == before
    torch_resize = resolve_generator_settings("default", {"resize": "torch"})
    assert torch_resize == {**before, "resize": "torch"}
    with pytest.raises(ConfigError, match="resize must be one of pil, torch"):
        resolve_generator_settings("default", {"resize": "lanczos"})

    def manifest(settings):
        return {"version": 1, "generator": {"preset": "default", "settings": settings}}

    check_compatible(manifest(before), manifest(resolve_generator_settings("default", {})), "o")
    with pytest.raises(RunConflictError, match="resize: recorded None, now 'torch'"):
        check_compatible(manifest(before), manifest(torch_resize), "o")


def test_a_run_whose_workers_cannot_start_records_nothing(tmp_path, monkeypatch):
    """Workers that cannot start (a wrong remote checkpoint, a cluster without the
    resources) leave no run behind, so the corrected command is not refused as a
    different run; a recorded run that did start stays protected."""
    from pipeline import driver
    from pipeline.manifest import RunConflictError, load_manifest, write_marker

    class NoWorkers:
        def __init__(self, *a):
            pass

        def wait_ready(self):
            raise driver.WorkerStartError("a worker could not start: bad checkpoint")

        def shutdown(self):
            pass

    monkeypatch.setattr(driver, "_connect", lambda cfg: False)
    monkeypatch.setattr(driver, "_default_actors", lambda cfg: (1, 0))
    monkeypatch.setattr(driver, "_Pool", NoWorkers)
    out = str(tmp_path / "out")
    with pytest.raises(driver.WorkerStartError):
        driver.run_generation(_run_config(tmp_path, points_per_side=3))
    assert load_manifest(out) is None
    first, _, _ = driver.prepare_run(_run_config(tmp_path, points_per_side=5))  # accepted
    write_marker(out, "sa_000000", {"shard": "sa_000000", "run_id": first["run_id"]})
    with pytest.raises(driver.WorkerStartError):  # a resumed run that cannot start ...
        driver.run_generation(_run_config(tmp_path, points_per_side=5))
    assert load_manifest(out)["run_id"] == first["run_id"]  # ... keeps its record
    with pytest.raises(RunConflictError, match="points_per_side: recorded 5, now 3"):
        driver.prepare_run(_run_config(tmp_path, points_per_side=3))


def test_summary_fails_when_the_generator_failed_on_images_in_every_attempt():
    from pipeline.driver import RunSummary

    base = dict(
        output="out", run_id="r", state="complete", shards_total=2, shards_skipped=0,
        shards_done=2, shards_failed=0, failed_shards={}, retries=2, actors_replaced=0,
        images_ok=7, images_failed=1, annotations=30, run_images=8, run_annotations=30,
        seconds=1.0, processing_seconds=1.0,
    )  # fmt: skip
    assert RunSummary(**base).ok
    bad = RunSummary(**base, generator_errors={"sa_000001": 1})
    assert not bad.ok
    assert "ERRORS   sa_000001: the generator failed on 1 image(s)" in bad.format()
    assert "sa1b-decode stats out --picture" in bad.format()  # where to look next
    assert "sa1b-decode stats" not in RunSummary(**{**base, "images_ok": 0}).format()


@pytest.mark.parametrize(
    "inp,out",
    [("imgs", "./imgs"), ("imgs", "imgs/out"), ("s3://b/imgs/", "s3://b/imgs/out"),
     ("s3://b/imgs", "s3://b/imgs")],
)  # fmt: skip
def test_output_inside_the_input_is_refused(tmp_path, monkeypatch, inp, out):
    from pipeline.driver import ConfigError, _validate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="must not be INPUT or inside it"):
        _validate(GenerateConfig(input=inp, output=out))
    _validate(GenerateConfig(input=inp, output=out.replace("imgs", "imgs2") + "x"))


def test_image_progress_takes_back_failed_attempts_and_ends_at_the_total():
    """A shard's attempt that dies after showing images must not leave them on the bar
    (it used to pass its total on retries); a committed attempt shows its marker's counts
    and late notes of a finished attempt change nothing."""
    import io

    from tqdm import tqdm

    from pipeline.actors import ProgressCounter
    from pipeline.driver import _AttemptProgress

    bar = tqdm(total=10, file=io.StringIO())
    shown = _AttemptProgress(bar)
    counter = ProgressCounter()  # the worker side, without Ray
    counter.add("sa_000000", 1, 4, 40)
    counter.add("sa_000001", 1, 3, 30)
    counter.add("sa_000000", 1, 2, 20)
    counts, _ = counter.take()
    assert counts == {("sa_000000", 1): [6, 60], ("sa_000001", 1): [3, 30]}
    assert counter.take()[0] == {}
    for key, (di, dm) in counts.items():
        shown.add(key, di, dm)
    assert (bar.n, shown.masks) == (9, 90)
    shown.failed(("sa_000000", 1))  # its worker died: 6 images, 60 masks taken back
    assert (bar.n, shown.masks) == (3, 30)
    shown.add(("sa_000000", 1), 1, 5)  # a late note of the dead attempt
    assert (bar.n, shown.masks) == (3, 30)
    shown.add(("sa_000000", 2), 5, 50)
    shown.committed(("sa_000000", 2), 6, 61)  # the marker is the truth
    shown.committed(("sa_000001", 1), 4, 33)  # an unflushed last note
    assert (bar.n, shown.masks) == (10, 94) and bar.n == bar.total
    # a shard queued behind a dying one never started: resubmitted under the same number,
    # its notes count again
    shown.failed(("sa_000002", 1))
    shown.start(("sa_000002", 1))
    shown.add(("sa_000002", 1), 2, 9)
    assert (bar.n, shown.masks) == (12, 103)


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from jobs.generate import main
    from pipeline import driver
    from pipeline.manifest import RunConflictError

    def no_ray(cfg):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(driver, "_connect", no_ray)
    cfg = _run_config(tmp_path)
    d = driver.dry_run(cfg)
    listing_shards = d["plan"]["num_shards"]
    assert (d["run"], d["shards_committed"], d["shards_to_do"]) == ("new", 0, listing_shards)
    assert d["plan"]["num_images"] == sum(1 for _ in open(cfg.input)) and listing_shards >= 2
    assert not (tmp_path / "out").exists()  # nothing written
    # a recorded run with one committed shard: resumes, and says what is left
    manifest, _, _ = driver.prepare_run(_run_config(tmp_path))
    (tmp_path / "out" / "_commits").mkdir()
    marker = json.dumps({"shard": "sa_000000", "run_id": manifest["run_id"]})
    (tmp_path / "out" / "_commits" / "sa_000000.json").write_text(marker)
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    d = driver.dry_run(_run_config(tmp_path))
    assert (d["run"], d["shards_committed"], d["shards_to_do"]) == ("resume", 1, listing_shards - 1)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    with pytest.raises(RunConflictError, match="points_per_side"):
        driver.dry_run(_run_config(tmp_path, points_per_side=3))
    # the command line
    c = _run_config(tmp_path)
    args = [c.input, c.output, "--model", c.model, "--checkpoint", c.checkpoint, "--dry-run"]
    args += ["--shard-size", "2"] + [f"--{k.replace('_', '-')}={v}" for k, v in c.generator.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing started, nothing written" in out and "1 shards committed" in out
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_to_do"] == listing_shards - 1


def test_shards_lost_with_a_dead_worker_that_had_committed_are_not_redone(tmp_path):
    """A worker that died between its marker and its reply: the driver finds the marker
    of this run and counts the shard done; another run's marker or none means a redo."""
    from pipeline import driver
    from pipeline.manifest import write_marker

    out = str(tmp_path / "out")
    write_marker(out, "sa_000000", {"shard": "sa_000000", "run_id": "r", "images_ok": 3})
    write_marker(out, "sa_000001", {"shard": "sa_000001", "run_id": "old"})
    got = driver._committed_by(out, "r", ["sa_000000", "sa_000001", "sa_000002"])
    assert list(got) == ["sa_000000"] and got["sa_000000"]["images_ok"] == 3
    assert driver._committed_by(str(tmp_path / "nowhere"), "r", ["sa_000000"]) == {}


def test_workers_get_absolute_local_inputs_and_the_folder_to_check(tmp_path, monkeypatch):
    """Ray workers do not run in the driver's working folder: a relative local input (a
    single image too) reaches them absolute, with its folder to check they can see it;
    an input in a store has no folder to check."""
    import numpy as np
    from PIL import Image

    from pipeline.driver import _local_input_folder, prepare_run
    from pipeline.plan import ShardPlan, ShardSpec, build_plan

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    _, plan, wcfg = prepare_run(GenerateConfig(input="imgs/a.jpg", output="out"))
    assert plan.shards[0].items[0].uri == str(tmp_path / "imgs" / "a.jpg")
    assert wcfg.input_folder == str(tmp_path / "imgs")
    assert _local_input_folder(build_plan("imgs")) == str(tmp_path / "imgs")
    remote = ShardPlan("sa1b", [ShardSpec(0, source="s3://b/sa_000000.tar")])
    assert _local_input_folder(remote) is None
