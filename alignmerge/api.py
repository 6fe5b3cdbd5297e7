"""Python API: ``alignmerge.merge(config, out_dir, **options)`` runs a whole merge.

Flow: config -> plan (preflight) -> staged output laid out -> executor streams tensors ->
config.json, tokenizer files and model card -> atomic rename into ``out_dir``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignmerge import __version__
from alignmerge.config import MergeConfig, load_config
from alignmerge.distributed import all_ranks_ok, barrier, distributed_context
from alignmerge.errors import AlignMergeError
from alignmerge.executor import Executor
from alignmerge.io.output import StagedOutput
from alignmerge.io.safetensors_file import read_header
from alignmerge.io.writer import OutputTensor, ShardedWriter, parse_size
from alignmerge.methods import get_method
from alignmerge.plan import build_plan, check_preflight_disk

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_read: int | None
    bytes_written: int
    shards: list[str]
    report: dict | None = None
    """A whole-run method's report (e.g. alignmerge's AQI rounds and per-layer drift)."""
    peak_device_bytes: int | None = None
    """On CUDA: torch.cuda.max_memory_allocated of the merge's device when it finished (the process's peak)."""
    seconds: float | None = None
    """Wall time of the merge call (statistics passes and AQI rounds included; interpreter start-up not)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, *, device: str = "cpu",
          out_shard_size: str | int = "5GB", seed: int = 0, threads: int | None = None,
          max_memory: str | int = "1GB", allow_nonfinite: bool = False, allow_pickle: bool = False,
          overwrite: bool = False, resume: bool = False, prefetch: bool = True, backend: str | None = None,
          progress: bool = True) -> MergeResult:
    """Merge the models of ``config`` (YAML path, dict or MergeConfig) into the HF directory ``out_dir``.

    ``max_memory`` bounds the tensor buffers and the method's working memory, on the host and, with
    ``device="cuda"``, on the GPU (``MergeResult.peak_device_bytes`` then reports
    torch.cuda.max_memory_allocated): tensors whose inputs exceed a third of it are merged in row chunks
    (two chunks are in flight with ``prefetch``, which also writes results on write-behind threads;
    without it every read, merge and write happens in turn). ``resume`` continues an interrupted run
    from its completed, checksum-verified shards.
    """
    start = time.perf_counter()
    result = _merge(config, out_dir, device=device, out_shard_size=out_shard_size, seed=seed, threads=threads,
                    max_memory=max_memory, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                    overwrite=overwrite, resume=resume, prefetch=prefetch, backend=backend, progress=progress)
    cuda = torch.device(device)
    if cuda.type == "cuda":  # a bare "cuda" is the rank's own GPU under torchrun (see below)
        index = cuda.index if cuda.index is not None else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        result.peak_device_bytes = torch.cuda.max_memory_allocated(index)
    result.seconds = time.perf_counter() - start
    return result


def _merge(config, out_dir, *, device, out_shard_size, seed, threads, max_memory, allow_nonfinite, allow_pickle,
           overwrite, resume, prefetch, backend, progress) -> MergeResult:
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    method_cls = get_method(config.merge_method)
    if getattr(method_cls, "run_merge", None) is not None and not method_cls.prepared(config):
        # Statistics to compute from data and/or an outer loop (alignmerge's AQI rounds): the method
        # runs the whole merge, calling merge() again with every file filled in.
        if resume:
            raise AlignMergeError(f"--resume: {config.merge_method} computes statistics first; give the statistics "
                                  "files in the config to resume, or rerun without --resume")
        StagedOutput(out_dir, inputs=[Path(m.path) for m in config.models], overwrite=overwrite)
        report = method_cls.run_merge(
            config, out_dir, progress=progress, device=device, out_shard_size=out_shard_size, seed=seed,
            threads=threads, max_memory=max_memory, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
            overwrite=overwrite, prefetch=prefetch, backend=backend)
        return _result_from_directory(Path(out_dir), report)
    if getattr(method_cls, "prepare_stats", None) is not None:
        # preflight: every given statistics file must match its model's tensor names and shapes
        out = Path(out_dir)
        method_cls.prepare_stats(config, out.parent / f"{out.name}.alignmerge-cache")
    if threads:
        torch.set_num_threads(threads)
        from alignmerge.ops._backend import cpp_extension

        ext = cpp_extension()
        if ext is not None:
            ext.set_num_threads(threads)
    try:
        shard_bytes = parse_size(out_shard_size)
        budget = parse_size(max_memory)
    except ValueError as exc:
        raise AlignMergeError(str(exc)) from None
    plan = build_plan(config, allow_pickle=allow_pickle, max_chunk_bytes=max(budget // 3, 1 << 12),
                      memory_budget=budget)
    staged = StagedOutput(out_dir, inputs=[ck.path for ck in plan.inputs], overwrite=overwrite, resume=resume)
    outputs = [OutputTensor(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    metadata = {"merged_by": "alignmerge", "merge_method": config.merge_method}
    writer = ShardedWriter(staged.staging, outputs, max_shard_bytes=shard_bytes, metadata=metadata,
                           background=prefetch)
    # the package version too: a resumed run must not mix shards of releases whose numerics differ
    # (0.2.0 changed the DARE random stream)
    layout_key = hashlib.sha256(
        json.dumps([__version__, config.to_yaml(), seed, writer.shard_names,
                    [(t.name, t.shape, str(t.dtype)) for t in outputs]], default=str).encode()).hexdigest()
    check_preflight_disk(plan, staged.final.parent, writer.file_bytes if not staged.resume else 0)

    rank, world = distributed_context(device)
    if world > 1:
        if resume:
            raise AlignMergeError("--resume is not supported in a distributed (torchrun) merge; rerun it whole")
        if str(device).startswith("cuda") and ":" not in str(device):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    mine = {s for i, s in enumerate(writer.shard_names) if i % world == rank}

    with _sigterm_as_interrupt():
        if rank == 0:
            staged.prepare()
        barrier(world)
        progress_state = staged.load_progress()
        done_shards = _verified_shards(writer, progress_state, layout_key)
        tasks = [t for t in plan.tasks if writer.shard_of[t.name] in mine and writer.shard_of[t.name] not in done_shards]
        remaining = {s: set(names) for s, names in writer.shard_tensors.items() if s in mine and s not in done_shards}

        def tensor_done(name: str) -> None:
            shard = writer.shard_of[name]
            remaining[shard].discard(name)
            if not remaining[shard] and world == 1:
                writer.sync_shard(shard)
                done_shards[shard] = writer.shard_checksum(shard)
                staged.save_progress({"layout": layout_key, "shards": done_shards})

        bar = tqdm(total=sum(t.nbytes for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"merge ({config.merge_method})", disable=not progress or rank != 0)
        executor = Executor(plan, writer, device=device, backend=backend, seed=seed,
                            allow_nonfinite=allow_nonfinite, prefetch=prefetch, on_progress=bar.update,
                            on_tensor_done=tensor_done)
        failure: BaseException | None = None
        try:
            writer.open(keep_existing=set(done_shards), only=mine)
            executor.run(tasks)
            writer.close()
        except KeyboardInterrupt:
            writer.abort()
            bar.close()
            raise AlignMergeError(
                f"interrupted; partial output kept in {staged.staging} (completed shards: {len(done_shards)}); "
                "rerun with --resume to continue"
            ) from None
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            writer.abort()
            failure = exc
        bar.close()
        if not all_ranks_ok(failure is None, world):
            if rank == 0:
                staged.discard()
            if failure is not None:
                raise failure
            raise AlignMergeError("merge failed on another rank; see its error")
        if rank == 0:
            writer.write_index()
            _write_metadata(plan, config, staged.staging)
            staged.commit()
        barrier(world)
    return MergeResult(staged.final, len(plan.tasks), executor.bytes_read, executor.bytes_written, writer.shard_names)


def _result_from_directory(out_dir: Path, report: dict | None) -> MergeResult:
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    tensors = sum(len(read_header(out_dir / s)[0]) for s in shards)
    written = sum((out_dir / s).stat().st_size for s in shards)
    return MergeResult(out_dir, tensors, None, written, shards, report if isinstance(report, dict) else None)


def _verified_shards(writer: ShardedWriter, progress: dict, layout_key: str) -> dict[str, str]:
    """Shards recorded as complete by an interrupted run with the same layout whose checksum still matches
    (called before the writer opens its shards, so each checksum is computed from the file)."""
    if progress.get("layout") != layout_key:
        return {}
    done = {}
    for shard, digest in progress.get("shards", {}).items():
        if shard in writer.shard_names and (writer.directory / shard).exists() and writer.shard_checksum(shard) == digest:
            done[shard] = digest
    return done


def _write_metadata(plan, config: MergeConfig, directory: Path) -> None:
    """config.json (dtype updated), generation config, tokenizer files and a model card."""
    ref = plan.reference
    cfg = dict(ref.config)
    float_dtypes = {t.out_dtype for t in plan.tasks if t.out_dtype in DTYPE_NAMES}
    if len(float_dtypes) == 1:
        name = DTYPE_NAMES[float_dtypes.pop()]
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    if cfg:
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (ref.path / "generation_config.json").exists():
        shutil.copy2(ref.path / "generation_config.json", directory)
    source = ref.path
    if config.tokenizer_source not in (None, "base"):
        source = Path(config.tokenizer_source)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, directory / name)
    models = "\n".join(f"- `{m.label}`" for m in config.models)
    base = f"\nBase / anchor: `{config.base_model.label}`\n" if config.base_model else ""
    (directory / "README.md").write_text(
        f"---\ntags: [merge, alignmerge]\n---\n# Merged model\n\nMerged with alignmerge using "
        f"`{config.merge_method}`.\n{base}\nModels:\n{models}\n\n## Configuration\n\n```yaml\n{config.to_yaml()}```\n"
    )
