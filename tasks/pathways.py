"""Step 3 as Prefect tasks: one task run per batch of targets (phases A, B and C).

A batch writes only its own rows (whole chunks) of ``jacobians.zarr`` and its own part files,
and last of all its completion marker ``pathways/parts/<batch>.done.json``: a resumed run
skips every batch whose marker exists and reads its parts back.

Out of memory: the task is retried (only for out-of-memory) with the batch processed in
sub-batches half the size on each attempt (``batch_size_for_attempt``); any other error fails
at once. Model work is tagged ``gpu`` so a tag concurrency limit can cap it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from pathflow import interrupt
from pathflow.batching import batch_size_for_attempt, chunks, is_oom
from pathflow.compute_thread import on_compute_thread, run_on_compute_thread
from pathflow.config import Config
from pathflow.context import get_context
from pathflow.envvars import BATCH_DELAY_S
from pathflow.errors import PathflowError
from pathflow.graphs import decision_ids
from pathflow.pathways import Batch, activation_writer, phase_a, phase_b, phase_c
from pathflow.preflight import prompt_positions
from pathflow.replay import validated_sentence
from pathflow.streams import configured as streams_configured
from pathflow.streams import run_on_stream, streams
from pathflow.study import load_prompts, model_layers, sae_width
from storage.arrays import chunk_keys, create_jacobians, open_jacobians, write_activation, write_rows

from .common import open_run

OOM_RETRIES = 6  # 64 -> 1 in six halvings
FAIL_ENV = "PATHFLOW_FAIL_BATCH"  # debugging aid: comma-separated batch names that raise (failure-handling tests)
PLAN = "pathways/plan.json"
JACOBIANS = "jacobians.zarr"
_MODEL_LOCK = threading.Lock()  # one stream: one batch's model work at a time per process
# a sub-batch computed and not yet written holds its Jacobians: one being written while the others are computed
_IN_FLIGHT: threading.BoundedSemaphore | None = None


def _load_streams(cfg: Config) -> None:
    """The context sets the streams as it loads: load it (once) before anything is sized by them."""
    if not streams_configured():
        run_on_compute_thread(get_context, cfg)


def _in_flight(cfg: Config) -> threading.BoundedSemaphore:
    """Sub-batches computed or being written at once: the streams, and one more being written."""
    global _IN_FLIGHT
    _load_streams(cfg)  # not under the lock: with one stream the compute thread may be waiting for it
    with _MODEL_LOCK:
        if _IN_FLIGHT is None:
            _IN_FLIGHT = threading.BoundedSemaphore(streams() + 1)
        return _IN_FLIGHT


def done_marker(batch_name: str) -> str:
    return f"pathways/parts/{batch_name}.done.json"


def done_batches(run) -> set[str]:
    """The batches whose completion marker exists, from one listing of the parts folder."""
    suffix = ".done.json"
    return {n[: -len(suffix)] for n in run.listdir("pathways/parts") if n.endswith(suffix)}


def write_plan(run, batches: list[Batch], shards: list[list[Batch]] | None = None) -> None:
    """``pathways/plan.json``: every batch with its targets (progress displays and shard runs read it),
    and, for a sharded run, which batches each shard owns."""
    plan = {"batches": [b.name for b in batches],
            "targets": {b.name: {"layer": b.layer, "targets": b.targets} for b in batches}}
    if shards is not None:
        plan["shards"] = [[b.name for b in g] for g in shards]
    run.write_json(PLAN, plan)


def shard_of_plan(run, shard: int) -> list[Batch]:
    """The batches of shard ``shard`` (0-based) in a sharded run's plan."""
    try:
        plan = run.read_json(PLAN)
        names = plan["shards"][shard]
    except FileNotFoundError:
        raise PathflowError(f"run {run.run_id} has no {PLAN} at {run.url}: start shards from the parent flow "
                            "(pathflow-sharded), which writes it") from None
    except (KeyError, IndexError):
        raise PathflowError(f"{PLAN} of run {run.run_id} has no shard {shard}") from None
    return [Batch(name=n, layer=plan["targets"][n]["layer"], targets=plan["targets"][n]["targets"]) for n in names]


def part_file(batch_name: str, kind: str) -> str:
    return f"pathways/parts/{batch_name}.{kind}.json"


def damaged_outputs(run, batch_name: str) -> str | None:
    """Why a finished batch's outputs cannot be trusted — its marker unreadable or without hashes (an
    older version), a part file or Zarr chunk missing or not what was written — else None."""
    try:
        marker = run.read_json(done_marker(batch_name))
    except (ValueError, OSError) as e:
        return f"marker is unreadable ({type(e).__name__})"
    outputs = marker.get("outputs") if isinstance(marker, dict) else None
    if not isinstance(outputs, dict) or not outputs:
        return "marker lists no output hashes"
    for rel, digest in outputs.items():
        exists = run.exists(rel)
        if digest is None:
            if exists:
                return f"{rel} exists where none was written"
            continue
        if not exists:
            return f"{rel} is missing"
        try:
            if run.sha256(rel) != digest:
                return f"{rel} is not what was written (sha256 differs)"
        except (OSError, ValueError) as e:
            return f"{rel} cannot be read ({e})"
    return None


def read_batch(run, batch_name: str) -> dict:
    """A finished batch's parts, read back from the run folder."""
    return {"candidates": run.read_json(part_file(batch_name, "candidates")),
            "validated": run.read_json(part_file(batch_name, "validated")),
            "marker": run.read_json(done_marker(batch_name)), "resumed": True}


def retry_on_oom(task, task_run, state) -> bool:
    """Prefect retry condition: only out-of-memory errors are retried."""
    try:
        state.result()
    except Exception as e:
        return is_oom(e)
    return False


def trace_sub_batch(cfg: Config, sub: Batch, max_rows: int | None = None):
    """Phases A (Jacobians), B (top-k) and C (replay) of one sub-batch, on a stream (``pathflow.streams``:
    on a CPU two batches at once, each on one core; else the compute thread): (BatchJacobians, candidates,
    validated). The caller has sized its sub-batches in flight (``_in_flight``), and so set the streams."""
    return run_on_stream(_trace_sub_batch, cfg, sub, max_rows)


def _trace_sub_batch(cfg: Config, sub: Batch, max_rows: int | None = None):
    ctx = get_context(cfg)
    decision = decision_ids(cfg, ctx.tokenizer) if cfg.decision.replay else None
    # with one stream and PATHFLOW_COMPUTE_THREAD=0, batches' threads still take turns
    with _MODEL_LOCK if streams() == 1 else contextlib.nullcontext():
        prefixes = ctx.prefixes()
        bj = phase_a(ctx.model, ctx.saes, prefixes, sub, ctx.device, backoff=False)
        c = phase_b(bj, cfg.topk.k, cfg.topk.score, cfg.topk.min_abs_gradient)
        v = phase_c(ctx.model, ctx.saes, prefixes, sub, c, cfg.replay, backoff=False, max_rows=max_rows,
                    decision=decision)
    return bj, c, v


@task(name="prepare-jacobians", task_run_name="prepare-jacobians", tags=["gpu"], cache_policy=NONE)
@on_compute_thread
def prepare_jacobians(cfg: Config, store_url: str, run_id: str, targets: list[dict]) -> None:
    """Create jacobians.zarr (one row per target) before any batch writes. Its shape comes from the
    model's and SAE's metadata files when they are at hand (a shard parent need not load the model),
    else from the loaded model."""
    run = open_run(store_url, run_id)
    n_layers, d_sae = model_layers(cfg), sae_width(cfg, targets[0]["layer"])
    if n_layers and d_sae:
        prompts = list(load_prompts(cfg.study.prompts))
    else:
        ctx = get_context(cfg)
        n_layers, d_sae, prompts = ctx.n_layers, ctx.saes[targets[0]["layer"]].d_sae, list(ctx.prompt_ids)
    positions = {k: v["position"] for k, v in prompt_positions(cfg).items()}
    create_jacobians(run.zarr_store(JACOBIANS), [t["feature"] for t in targets], prompts, n_layers, d_sae,
                     positions, keepbits=cfg.gradients.keepbits, writer=activation_writer(targets))


@task(name="pathways", task_run_name="pathways-{batch.name}", tags=["gpu"], cache_policy=NONE,
      retries=OOM_RETRIES, retry_condition_fn=retry_on_oom)
def batch_pathways(cfg: Config, store_url: str, run_id: str, batch: Batch) -> dict:
    """Phases A–C for one batch; returns {"candidates": {...}, "validated": {...}, "marker": {...}}.
    The model work runs on the process's compute thread; reading and writing the run folder stays on
    the task's own thread, so one batch's writes overlap the next one's model work."""
    from prefect.runtime import task_run

    run = open_run(store_url, run_id)
    logger = get_run_logger()
    if run.exists(done_marker(batch.name)):  # finished before an interruption: read it back, if intact
        damage = damaged_outputs(run, batch.name)
        if not damage:
            logger.info("%s: done in an earlier attempt, not recomputed", batch.name)
            return read_batch(run, batch.name)
        logger.warning("%s: recomputed: its earlier output %s", batch.name, damage)
    interrupt.check()  # a run being stopped starts no more batches
    if batch.name in os.environ.get(FAIL_ENV, "").split(","):
        raise RuntimeError(f"{batch.name}: failing as {FAIL_ENV} asks")
    attempt = task_run.run_count or 1
    size = batch_size_for_attempt(cfg.gradients.batch_size, attempt)
    if attempt > 1:
        logger.warning("%s: attempt %d after out-of-memory, sub-batches of %d", batch.name, attempt, size)
    t0 = time.perf_counter()
    interrupt.sleep(BATCH_DELAY_S.read())  # debugging aid: slow batches down
    cands, validated, memory, chunks_written = {}, {}, [], []
    for j, part in enumerate(chunks(batch.targets, size)):
        interrupt.check()
        sub = Batch(name=f"{batch.name}.{j}", layer=batch.layer, targets=list(part))
        with _in_flight(cfg):
            bj, c, v = trace_sub_batch(cfg, sub, max_rows=size if attempt > 1 else None)
            group = open_jacobians(run.zarr_store(JACOBIANS))
            rows = [t["index"] for t in sub.targets]
            write_rows(group, rows, bj.grad, valid_layers=batch.layer)
            writes_activation = j == 0 and group.attrs.get("activation_writer") == batch.name
            if writes_activation:  # stored once, by one batch
                write_activation(group, bj.activation)
            chunks_written += [f"{JACOBIANS}/{k}" for k in chunk_keys(group, rows, writes_activation)]
            memory.append(bj.memory)
            del bj
        validated.update(v)
        cands.update(c)
    outputs = {rel: run.sha256(rel) if run.exists(rel) else None for rel in chunks_written}
    outputs[part_file(batch.name, "candidates")] = run.write_json(part_file(batch.name, "candidates"), cands)
    outputs[part_file(batch.name, "validated")] = run.write_json(part_file(batch.name, "validated"), validated)
    marker = {"batch": batch.name, "outputs": outputs, "targets": [t["feature"] for t in batch.targets],
              "attempt": attempt,
              "sub_batch_size": size, "seconds": round(time.perf_counter() - t0, 4),
              "peak_memory_bytes": max(m["bytes"] for m in memory), "memory_kind": memory[0]["kind"],
              "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time()}
    run.write_json(done_marker(batch.name), marker)  # last: the batch counts as done only now
    for feature, per_prompt in validated.items():
        for prompt, r in per_prompt.items():
            f = r["faithfulness"]
            logger.info("%s on %s: %d candidates, sign agreement %.2f", feature, prompt, f["n_candidates"],
                        f["sign_agreement"] or 0)
    return {"candidates": cands, "validated": validated, "marker": marker, "resumed": False}


@task(name="merge-pathways", task_run_name="merge-pathways", cache_policy=NONE)
def merge_pathways(cfg: Config, store_url: str, run_id: str, results: list[dict]) -> dict:
    """Join the batches' parts into pathways/candidates.json and pathways/validated_pathways.json."""
    run = open_run(store_url, run_id)
    cands = {k: v for r in results for k, v in r["candidates"].items()}
    validated = {k: v for r in results for k, v in r["validated"].items()}
    positions = prompt_positions(cfg)  # the token each prompt's targets and candidates sit at
    run.write_json("pathways/candidates.json", {"topk": cfg.topk.model_dump(), "positions": positions,
                                                "targets": cands})
    run.write_json("pathways/validated_pathways.json", {"replay": cfg.replay.model_dump(),
                                                        "validated_means": validated_sentence(cfg.replay),
                                                        "positions": positions, "targets": validated})
    run.write_json("pathways/batches.json", {"batches": [r["marker"] for r in results]})
    return validated
