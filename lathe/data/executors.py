"""The data pipeline as five datatrove stages, and the executors that run them: local (processes on this
machine), Slurm (one job array per stage, chained with dependencies) or Ray. The pipelines are the same
objects for all three; only the executor differs.

    prepare   tasks = shards     read, clean, PII, filters, decontamination, shard files, MinHash signatures
    buckets   tasks = LSH bands  MinHash candidate pairs (only with near-dedup)
    clusters  1 task             duplicate clusters, boilerplate lines
    finalize  tasks = shards     drop duplicates and boilerplate, mixture weights, splits sorted by hash
    merge     1 task             data/{train,val,test}.jsonl, manifest.json, card.md, card.json, lengths.png
"""

from __future__ import annotations

import os
import time
from collections import deque
from copy import deepcopy
from dataclasses import dataclass

from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.stats import PipelineStats

from lathe.config import DataConfig
from lathe.console import info
from lathe.data.dedup import decont_config, minhash_config, signature_step
from lathe.data.filters import build_filters, word_tokenizer
from lathe.data.ledger import Ledger
from lathe.data.steps import (Clean, Filter, FindDuplicates, LengthFilter, MergeSplits, ReadShard, ReadSources,
                              RemoveBoilerplate, ScrubPII, WriteShard, WriteSplits)
from lathe.errors import LatheError


class LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor without per-task log files (lathe's ledger keeps the counts; each log
    handler costs 10-30 ms, which dominated small runs), and without a process manager for one worker."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> PipelineStats:
        data = None
        for step in self.pipeline:
            data = step(data, rank, self.world_size)
        if data:
            deque(data, maxlen=0)
        return PipelineStats(self.pipeline)

    def run(self):
        if self.workers > 1:
            return super().run()
        pipeline = self.pipeline
        for rank in range(self.tasks):
            self.pipeline = deepcopy(pipeline)  # fresh steps (and ledger) per task, as datatrove does
            self._run_for_rank(rank)
        self.pipeline = pipeline


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def build_stages(cfg: DataConfig, work: str, run_path: str, shards: int, weights: dict[str, float]) -> list[Stage]:
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    near = cfg.dedup.near
    mh = minhash_config(cfg.dedup)
    ledger = Ledger()  # shared by the steps of one task
    prepare = [ReadSources(work, cfg, ledger), Clean(work, cfg, ledger)]
    if cfg.pii.emails or cfg.pii.phones or cfg.pii.ips:
        prepare.append(ScrubPII(work, cfg, ledger))
    prepare.append(LengthFilter(work, cfg, ledger))
    prepare += [Filter(work, name, f, ledger) for name, f in build_filters(cfg.filters)]
    if cfg.decontaminate.sets:
        from datatrove.pipeline.decont.n_grams import NGramsDecontFilter

        decont = NGramsDecontFilter(f"{work}/decont", decont_config(cfg.decontaminate), language=word_tokenizer())
        prepare.append(Filter(work, "contaminated", decont, ledger, detail_key="contaminated_task"))
    prepare.append(WriteShard(work, cfg, ledger))
    if near:
        prepare.append(signature_step(f"{work}/minhash/sigs", cfg.dedup))

    ledger = Ledger()
    finalize = [ReadShard(work, ledger)]
    if cfg.boilerplate.enabled or cfg.boilerplate.patterns:
        finalize += [RemoveBoilerplate(work, cfg, ledger),
                     LengthFilter(work, cfg, ledger, step="boilerplate", short_reason="too_short_after_boilerplate")]
    finalize.append(WriteSplits(work, cfg, ledger, weights))

    stages = [Stage("prepare", prepare, shards)]
    if near:
        stages.append(Stage("buckets", [MinhashDedupBuckets(f"{work}/minhash/sigs", f"{work}/minhash/dups", config=mh)],
                            mh.num_buckets))
    stages += [Stage("clusters", [FindDuplicates(work, cfg, shards, near)], 1),
               Stage("finalize", finalize, shards),
               Stage("merge", [MergeSplits(work, cfg, run_path, shards)], 1)]
    return stages


def make_executors(stages: list[Stage], cfg: DataConfig, work: str) -> list:
    """One executor per stage, each depending on the one before."""
    shards = stages[0].tasks
    executors = []
    for stage in stages:
        depends = executors[-1] if executors else None
        logs = f"{work}/logs/{stage.name}"
        if cfg.executor == "local":
            # tasks of the bucket stage are one per LSH band; their work grows with the shards, not the bands
            busy = min(stage.tasks, shards) if stage.name == "buckets" else stage.tasks
            workers = min(cfg.workers or os.cpu_count() or 1, busy)
            ex = LocalExecutor(stage.pipeline, tasks=stage.tasks, workers=workers, logging_dir=logs,
                               skip_completed=False, start_method="fork")
        elif cfg.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            s = cfg.slurm
            if not s.partition:
                raise LatheError("data.executor=slurm needs data.slurm.partition")
            ex = SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, time=s.time, partition=s.partition,
                                       cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                                       job_name=f"lathe-data-{stage.name}", venv_path=s.venv_path,
                                       sbatch_args=dict(s.sbatch_args), logging_dir=logs, depends=depends)
        else:
            from datatrove.executor import RayPipelineExecutor

            ex = RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, logging_dir=logs, depends=depends,
                                     cpus_per_task=cfg.ray.cpus_per_task, mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb)
        executors.append(ex)
    return executors


def run_local(stages: list[Stage], executors: list) -> None:
    """Stage after stage on this machine; datatrove's own log lines are muted (lathe reports instead)."""
    from loguru import logger

    logger.disable("datatrove")
    try:
        for stage, ex in zip(stages, executors):
            t0 = time.perf_counter()
            ex.run()
            info(f"data: {stage.name} done ({stage.tasks} task{'s' * (stage.tasks > 1)} on {ex.workers} "
                 f"process{'es' * (ex.workers > 1)}, {time.perf_counter() - t0:.1f}s)")
    finally:
        logger.enable("datatrove")


def run_cluster(executors: list) -> None:
    """Slurm: submits every stage's job array (chained) and returns. Ray: runs them, waiting for each."""
    try:
        executors[-1].run()  # launches its dependencies first
    except FileNotFoundError as e:
        raise LatheError(f"cannot submit to the cluster ({e}); is this a Slurm login node?") from None
    except ImportError as e:
        raise LatheError(f"the Ray executor needs `pip install 'datatrove[ray]'` ({e})") from None
