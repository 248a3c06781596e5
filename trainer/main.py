"""The distributed training job: bring up (or attach to) the teacher and router services, train on Ray Train,
evaluate, and write the report.

    python -m trainer.main --config configs/demo.yaml [--no-resume] [--eval] [key.path=value ...]

Locally it starts its own Ray (unless RAY_ADDRESS or cluster.address names one). On a cluster, submit it:

    RAY_AUTH_MODE=token ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m trainer.main --config configs/demo.yaml --eval

Re-running the same config continues the run from its latest checkpoint (the run id is kept in
<output_dir>/<run_name>/run.json); --no-resume starts a new run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from danceopd.config import ConfigError, differences
from danceopd.remote import RequestError, last_line
from danceopd.placement import no_model_weights
from trainer.cli import load_or_report, parse_args, resume_config_or_report
from trainer.console import log_warnings
from trainer.evaluation import BEFORE
from trainer.job import JobConfig, check_memory, load_job_config
from trainer.steps import cut_note, training_extent


# A local Ray shares the machine with the training workers. Serve's controller loop (0.1 s) and its replicas' and
# handles' metrics export (0.1 s) cost ~3% of a core on a 2-core machine (measured); once a second is plenty for a
# single machine, and dashboards read 1 s resolution anyway. A local machine is not a preemptible cloud node: no
# preemption watcher. Clusters started with `ray start` keep Ray's defaults.
LOCAL_RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class ServiceError(RuntimeError):
    """A service the job needs is missing or does not match the config."""


def quiet_console(logs: Path, verbose: bool, name: str = "driver.log") -> Path:
    """The console keeps what the command says (progress, results, paths); what Ray, Serve, Ray Train and the model
    libraries say in this process goes to <logs>/<name> (<run_dir>/logs/driver.log for a job; all of it, with
    --verbose on the console too). The workers' and services' own output stays in Ray's session logs (`ray logs`,
    /tmp/ray/session_latest/logs). Returns the log file."""
    import logging

    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for library in ("ray", "ray.serve", "ray.train", "ray.tune", "ray.data", "diffusers", "transformers", "filelock", "urllib3"):
        logger = logging.getLogger(library)
        logger.addHandler(handler)
        if not verbose:
            for h in [h for h in logger.handlers if h is not handler]:
                logger.removeHandler(h)
            logger.propagate = False
    if not verbose:
        relay_ray_messages(logs / name)
        # "Loading weights" / "Writing model shards" bars of the evaluation's student loads
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        except ImportError:
            pass
    return logs / name


def relay_ray_messages(log_file: Path) -> None:
    """Ray prints the messages the cluster sends a driver (e.g. the raylet's "N PYTHON worker processes have been
    started" warning) on the driver's stdout, among the job's progress lines: write them to the log file instead.
    (ray._private.worker looks the printer up at each message; without it, they stay on the console.)"""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    if not hasattr(ray_worker, "print_to_stdstream"):
        return

    def to_log(data, ignore_prefix: bool) -> None:
        with open(log_file, "a") as f:
            ray_worker.print_worker_logs(data, f, ignore_prefix)

    ray_worker.print_to_stdstream = to_log


class ConsoleRelay:
    """Prints the workers' console lines (sent through a Ray queue) on the driver's console, in order, while the
    workers' own output stays in Ray's logs."""

    def __init__(self):
        import threading

        from ray.util.queue import Queue

        from trainer.console import ConsolePrinter

        self.printer = ConsolePrinter()
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set() or not self.queue.empty():
            try:
                self.printer(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue's actor is gone with the cluster
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.printer.end()


def connect(job: JobConfig, verbose: bool = True) -> str:
    """Attach to the configured / job's Ray cluster, or start a local one sized for the job. Without `verbose`, the
    workers' and services' output is not sent to this console (it stays in Ray's logs)."""
    import ray

    if job.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=job.cluster.address, logging_level="WARNING", log_to_driver=verbose)
        return "attached to " + (job.cluster.address or os.environ["RAY_ADDRESS"])
    for key, value in LOCAL_RAY_ENV.items():  # inherited by every process of the local Ray; a user's setting wins
        os.environ.setdefault(key, value)
    c = job.cluster
    teacher_cpus = sum(t.ray_actor_options.num_cpus * (t.num_replicas or 1) for t in job.teachers_config().teachers
                       if t.name in job.routes)
    cpus = c.local_num_cpus or int(c.num_workers * c.cpus_per_worker + teacher_cpus + 2.0 + 0.999)  # + router, gateway, headroom
    # The dashboard also serves Ray's state API, which Ray Train's placement-group cleaner polls.
    ray.init(address="local", num_cpus=cpus, include_dashboard=c.dashboard, logging_level="WARNING", configure_logging=False,
             log_to_driver=verbose, **({"_metrics_export_port": c.metrics_export_port} if c.metrics_export_port else {}))
    return f"started a local Ray ({cpus} logical CPUs)"


def ensure_services(job: JobConfig, log=print) -> None:
    """Deploy the teacher/router applications that are not running (services.deploy: auto), attach to the rest,
    and check that every routed teacher serves images of the student's shape."""
    from ray import serve

    from router.deployment import router_app
    from services.teachers.app import GATEWAY_APP, deploy_teachers, router_args

    tcfg = job.teachers_config()
    s = job.services
    try:
        apps = serve.status().applications
    except Exception:  # Serve not started on this cluster yet
        apps = {}
    running = {name for name, a in apps.items() if str(getattr(a.status, "value", a.status)) == "RUNNING"}
    missing = list(dict.fromkeys(job.teacher_name(r) for r in job.routes if job.teacher_app(r) not in running))  # route order
    router_missing = s.router_app not in running
    if s.deploy == "attach" and (missing or router_missing):
        absent = [f"{s.app_prefix}{t}" for t in missing] + ([s.router_app] if router_missing else [])
        raise ServiceError(f"services.deploy is 'attach' but these Serve applications are not running: {absent}. Deploy them "
                           "(serve deploy deploy/serve-teachers.yaml) or set services.deploy: auto")
    if not apps:
        # One line per request from every replica would drown the training progress.
        serve.start(http_options={"host": s.http_host, "port": s.http_port}, logging_config={"enable_access_log": False})
    if missing or (s.gateway and GATEWAY_APP not in running):
        t0 = time.perf_counter()
        deploy_teachers(tcfg, only=missing, gateway=s.gateway and GATEWAY_APP not in running, listen_host=s.http_host)
        log(f"deployed teachers {missing}{' + REST gateway' if s.gateway else ''} in {time.perf_counter() - t0:.0f} s")
    if router_missing:
        serve.run(router_app(router_args(tcfg, s.http_host)), name=s.router_app, route_prefix=tcfg.router.route_prefix)
        log(f"deployed router (store: {'redis' if tcfg.router.redis_url else tcfg.router.store})")
    attached = list(dict.fromkeys(job.teacher_app(r) for r in job.routes if job.teacher_name(r) not in missing))
    check_attached(job, attached, router=not router_missing)
    if attached:
        log(f"attached to running teachers {attached}")
    shape = expected_sample_shape(job.student)
    buckets = [job.student.model_family.sample_shape_of(job.student.base, b) for b in job.bucket_sizes() or ()]
    for r in job.routes:
        info = job.teacher_client(r).info
        if shape is not None and tuple(info.sample_shape) != shape:
            raise ServiceError(f"routes.{r}: teacher application {job.teacher_app(r)!r} serves {tuple(info.sample_shape)} images, "
                               f"the student makes {shape}: point the route at a matching teacher")
        missing = [b for b in buckets if b is not None and b not in info.shapes]
        if missing:
            raise ServiceError(f"routes.{r}: teacher application {job.teacher_app(r)!r} answers the shapes {list(info.shapes)}, not "
                               f"the run's bucket shapes {missing} (data.buckets): redeploy it with this run's buckets")


def precompute_text_embeddings(job: JobConfig, log=print) -> dict | None:
    """student.text_embeddings: precompute: before training, one Ray task on a device like a worker's (one GPU when the
    workers have GPUs) encodes the run's prompts that the store lacks; workers and the teachers this job deploys read
    the store. Returns what it encoded, per encoder fingerprint (None in the other modes)."""
    import ray

    from trainer.distributed import use_gpu

    text = job.text_embeddings()
    if text.mode != "precompute":
        return None
    gpu = use_gpu(job)
    task = ray.remote(num_cpus=job.cluster.cpus_per_worker, num_gpus=1 if gpu else 0, max_retries=1)(encode_run_prompts)
    t0 = time.perf_counter()
    ref = task.remote(json.loads(job.model_dump_json()), gpu)
    try:
        stats = ray.get(ref, timeout=job.cluster.text_embeddings_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ServiceError(f"encoding the run's prompts took longer than cluster.text_embeddings_timeout_s "
                           f"({job.cluster.text_embeddings_timeout_s:g} s): raise it, or set student.text_embeddings: on_device") from None
    encoded = sum(v["encoded"] for v in stats.values())
    size = sum(v["bytes"] for v in stats.values()) / 2 ** 20
    log(f"text embeddings: {len(job.run_prompts())} prompts x {len(stats)} encoder set(s), {encoded} encoded ({size:.1f} MiB) "
        f"in {time.perf_counter() - t0:.0f} s; store {text.store}")
    return stats


def encode_run_prompts(job_dict: dict, gpu: bool) -> dict:
    """The precompute task (see precompute_text_embeddings): the student's encoders, then each model teacher's."""
    from danceopd.memory_plan import dtype_for
    from danceopd.text_embeddings import precompute

    job = JobConfig.model_validate(job_dict)
    keys = job.text_encoder_keys(dtype_for(job.dtype, gpu), job.teacher_dtypes())
    return precompute(job.text_embeddings().store, keys, job.run_prompts(), device="cuda" if gpu else "cpu")


def check_attached(job: JobConfig, teacher_apps: list[str], router: bool) -> None:
    """Refuse running applications that have the expected names but serve something else than this job configures
    (another field, guidance, dtype or CFG base; another Redis store): a student must not silently train against them."""
    from router.client import RouterClient
    from router.deployment import redis_location

    tcfg, s = job.teachers_config(), job.services
    problems = []
    store = job.text_embeddings().store
    for route in dict.fromkeys(r for r in job.routes if job.teacher_app(r) in teacher_apps).keys():
        described = job.teacher_client(route).describe()
        running = described.get("spec", {})  # {}: an application from before specs existed
        if described.get("text_embeddings") not in (None, store):  # it would not find this run's prompts
            problems.append(f"{job.teacher_app(route)!r} reads prompt embeddings from {described['text_embeddings']}, this job "
                            f"stores them in {store or '(nowhere: text_embeddings ' + job.text_embeddings().mode + ')'}: set "
                            "student.text_embeddings_store to the same folder")
        diff = differences(running, tcfg.teacher_spec(job.teacher_name(route)))
        if diff:
            problems.append(f"{job.teacher_app(route)!r} differs in " + ", ".join(f"{k} (running {a!r}, this job {b!r})"
                                                                               for k, (a, b) in list(diff.items())[:4]))
    if router and tcfg.router.redis_url:  # no redis_url: the job takes whatever store the cluster's router has
        running = RouterClient(s.router_app, timeout_s=job.cluster.timeout_s).send("store").result()
        expected = {"kind": "redis", "url": redis_location(tcfg.router.redis_url)}
        if running != expected:
            problems.append(f"{s.router_app!r} keeps runs in {running}, this job's router.redis_url is {expected['url']}")
    if problems:
        raise ServiceError("running Serve applications are not the ones this job configures: " + "; ".join(problems)
                           + ". Delete them (serve delete <name>) so that the job deploys its own, or give this job's "
                           "applications other names (services.app_prefix, services.router_app)")


def resolve_run_id(job: JobConfig, fresh: bool) -> tuple[str, bool]:
    """The run id kept in run.json (resume), or a new one. Returns (run_id, resuming)."""
    marker = job.run_dir / "run.json"
    if not fresh and marker.exists():
        return json.loads(marker.read_text())["run_id"], True
    run_id = f"{job.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    job.run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run_id": run_id, "storage_path": str(job.storage_path)}, indent=2))
    return run_id, False


def expected_sample_shape(cfg) -> tuple[int, int, int] | None:
    """The student's sample shape from its config alone (pixels, or latents at its resolution); None for a hub id."""
    if cfg.model_family.name == "pixel":
        return (cfg.channels, cfg.sample_size, cfg.sample_size)
    return cfg.model_family.sample_shape_of(cfg.base, cfg.resolution)


def before_after_table(before: dict | None, after: dict, base: bool = False) -> str:
    """Per route: the teacher's judge score (suite), the student's before and after training (`base`: it started from a
    pre-trained base, whose score `before` is), the velocity error against the teacher, and T2I mode coverage."""
    first, last = ("base", "student") if base else ("before", "after")
    lines = [f"{'route':<14}{'teacher':>9}{first:>9}{last:>9}  {'velocity error':<22} extra ({last})"]
    for name, e in after["routes"].items():
        b = (before or {"routes": {}})["routes"].get(name, {})
        verr = f"{b['velocity_error']:.4f} -> " if "velocity_error" in b else ""
        verr += f"{e['velocity_error']:.4f}" if "velocity_error" in e else ""
        if "student" not in e:
            lines.append(f"{name:<14}{'-':>9}{'-':>9}{'-':>9}  {verr:<22}")
            continue
        extra = f"PSNR {e['student']['psnr_db']:.1f} dB" if "psnr_db" in e["student"] else ""
        if "diversity" in e:
            d, t = e["diversity"], e["diversity"]["teacher"]["modes_hit"]
            extra = f"coverage {d['coverage_vs_teacher']:.2f}, modes hit {d['student']['modes_hit']}/{t} of the teacher's"
            if "diversity" in b:
                bd = b["diversity"]
                extra += f" ({first} {bd['coverage_vs_teacher']:.2f}, {bd['student']['modes_hit']}/{t})"
        bs = f"{b['student']['score']:.3f}" if "student" in b else "-"
        lines.append(f"{name:<14}{e['teacher']['score']:>9.3f}{bs:>9}{e['student']['score']:>9.3f}  {verr:<22} {extra}")
    return "\n".join(lines)


def training_failed(job: JobConfig, run_id: str, failure) -> str:
    """What went wrong, one line per failed worker (the last line of its error), and how to go on."""
    failures = getattr(failure, "worker_failures", None) or {}
    causes = [f"rank {rank}: {last_line(e)}" for rank, e in sorted(failures.items())] or [last_line(failure)]
    done = sorted(p for p in (job.storage_path / run_id).glob("checkpoint_*") if p.is_dir())  # not Ray Train's snapshot file
    resume = (f"re-running the same command resumes from {done[-1]}" if done else "no checkpoint was written")
    return "\n".join([f"error: training failed (run {run_id}):", *(f"  {c}" for c in causes),
                      f"  {resume}; the workers' full tracebacks are in Ray's logs (ray logs, or the dashboard)"])


def mark_run(job: JobConfig, run_id: str, status: str) -> None:
    """Tell the router the run ended: its status changes, and its keys expire after services.router_keep_finished_days."""
    from router.client import RouterClient

    try:
        RouterClient(job.services.router_app, timeout_s=job.cluster.timeout_s).send(
            "finish_run", run_id, status, job.services.router_keep_finished_days * 86400).result()
    except Exception as e:  # the run's outcome does not depend on it
        print(f"warning: could not mark run {run_id} {status} on the router: {last_line(e)}", file=sys.stderr)


DESCRIPTION = "Distributed DanceOPD training (Ray Train + Serve teachers + router)."


def main(argv: list[str] | None = None) -> int:
    return run(parse_args("python -m trainer.main", DESCRIPTION, argv))


def run(args) -> int:
    """The command, from parsed arguments (trainer.cli.add_train_arguments; also `danceopd train`). The driver never
    holds a model (it may run on a GPU-less head node): building or loading one here raises ModelInDriverError."""
    with no_model_weights("the job driver"):
        return _run(args)


def _run(args) -> int:
    job = load_or_report(load_job_config, args)
    if job is None:
        return 2
    try:
        check_memory(job, warn=lambda m: print(m, file=sys.stderr))  # before Ray starts or a model loads
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not resume_config_or_report(job, args):  # before Ray starts: a resumed run must train what it trained
        return 2
    t_job = time.perf_counter()
    log_file = quiet_console(job.run_dir / "logs", args.verbose)
    log_start = log_file.stat().st_size  # this command's part of the log
    # Until training ends, stderr is the log file: Ray and Serve set up their console loggers on stderr while they
    # start, and the raylet's warnings reach the driver there. The job's own errors go to the console (`err`).
    err, quiet = sys.stderr, contextlib.ExitStack()
    if not args.verbose:
        quiet.enter_context(contextlib.redirect_stderr(open(log_file, "a")))
    started = connect(job, args.verbose)
    print(started, flush=True)
    if not args.verbose:
        print(f"framework logs: {log_file.resolve()}, and Ray's session logs (ray logs; /tmp/ray/session_latest/logs); "
              "--verbose shows them here", flush=True)
    try:
        precompute_text_embeddings(job, log=lambda m: print(m, flush=True))
        ensure_services(job, log=lambda m: print(m, flush=True))
    except (ServiceError, RequestError) as e:
        quiet.close()
        print(f"error: {e}", file=err)
        return 2
    run_id, resuming = resolve_run_id(job, fresh=args.no_resume)
    print(f"run {run_id} ({'resuming' if resuming else 'new'}): {job.cluster.num_workers} workers x {job.worker_batch_size} samples, "
          f"{job.steps} steps; outputs in {job.run_dir.resolve()}, checkpoints in {job.storage_path / run_id}", flush=True)

    from danceopd.tracking import start_new_run, tensorboard_dir
    from trainer.distributed import run_distributed, stop_marker

    if not resuming:  # W&B / MLflow: a new tracked run (TensorBoard: the curves start over at step 1); no stale reports
        start_new_run(job.run_dir)
        for stale in (BEFORE, "report.json", "grid-before.png", "grid.png"):
            (job.run_dir / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    relay = None if args.verbose else ConsoleRelay()
    try:
        result = run_distributed(job, run_id, console=relay.queue if relay else None, evaluate=args.eval)
        stopped = stop_marker(job, run_id)
        failure = (stopped.read_text() if stopped.exists() else result.error) or (None if result.checkpoint else "no checkpoint was written")
    except Exception as e:  # Ray Train raises once cluster.max_failures restarts are spent
        failure = e
    finally:
        if relay is not None:
            relay.close()
        quiet.close()
    train_s = time.perf_counter() - t0
    mark_run(job, run_id, "failed" if failure is not None else "finished")
    if not args.verbose and (note := log_warnings(log_file, log_start)):
        print(note, flush=True)
    if failure is not None:
        print(training_failed(job, run_id, failure), file=sys.stderr)
        return 1
    final_dir = job.run_dir / "student"  # written by rank 0 at the end of training
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "state.json").read_text())["history"]  # progress windows (kept across resumes)
    m = result.metrics
    weights = "EMA weights" if job.optim.ema_decay > 0 else "final weights"
    merged = " (+ merged transformer/)" if job.student.save_merged and job.student.trains_lora else ""
    print(f"trained to step {m['step']} in {train_s / 60:.1f} min; student ({weights}){merged} saved to {final_dir}", flush=True)
    if job.tracking.tensorboard:
        print(f"tensorboard: {tensorboard_dir(job.run_dir).resolve()} (tensorboard --logdir {job.run_dir})", flush=True)
    cut = cut_note(job, m["step"])
    if cut is not None and not args.eval:
        print(cut, flush=True)
    if args.eval:
        from danceopd.evaluation import write_report

        written = job.run_dir / "report.json"  # the workers evaluated; rank 0 wrote it
        if not written.exists():
            print(f"error: the workers' evaluation is not in {written.resolve()}: output_dir must be storage that the workers "
                  "and this driver share (a volume every node mounts, as cluster.storage_path)", file=sys.stderr)
            return 1
        report = json.loads(written.read_text())
        report["training"] = {"run_id": run_id, **training_extent(job, m["step"]), "train_seconds": train_s, "job_seconds": time.perf_counter() - t_job,
                               "workers": job.cluster.num_workers, "samples_per_s": m.get("samples_per_s"),
                               "time_share": m.get("time_share_total"), "checkpoint": result.checkpoint.path,
                               "history": [{"step": h["step"], "loss": h["loss"], "samples_per_s": h["samples_per_s"]} for h in history]}
        text = job.text_embeddings()  # where prompts were encoded, and what each process held of text encoders
        report["text_embeddings"] = {"mode": text.mode, "store": text.store,
                                     "train_worker_text_encoder_parameters": m.get("text_encoder_parameters"),
                                     "teacher_text_encoder_parameters": {job.teacher_app(r): job.teacher_client(r).describe().get(
                                         "text_encoder_parameters") for r in job.routes}}
        path = write_report(report, job.run_dir / "report.json")
        before = report.get("before")
        print(before_after_table(before, report, base=job.init_from is not None))
        if cut is not None:  # under the table it qualifies
            print(cut, flush=True)
        grids = Path(report["grid"]).resolve()
        if before is not None and before.get("grid"):
            grids = f"{Path(before['grid']).resolve()} (before), {grids} (after)"
        print(f"report: {path.resolve()}\ngrid:   {grids}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
