"""The Fisher pass: diagonal Fisher per sequence, in memory or streamed layer by layer.

F = (1/N) Σ_n (∇_θ log p(y_n | x_n))², log p = Σ over the scored tokens of sequence n
(response tokens for prompt/response records). ``kind="empirical"``: y_n are the data's
tokens; ``kind="true"``: each scored token is sampled from the model's own next-token
distribution given the data prefix, with a generator seeded by (seed, sequence index), so the
labels do not depend on batching. Weights are frozen; per-sequence squared gradients come from
``SquaredGradCapture`` (fused kernel for nn.Linear), so the pass costs about a plain
forward+backward and never stores weight gradients.

Streaming (when the model does not fit ``max_memory``): the forward runs layer by layer with
each layer's weights read from the safetensors files, boundary activations kept on the host
(spilled to a temporary directory when the compute device is the host itself); the backward
reloads each layer, recomputes it from its boundary input and back-propagates the boundary
gradient. Each finished tensor's Fisher is written straight into the output file, so peak
memory is about one layer plus activations, independent of depth.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignmerge.data import (TokenizedSequence, load_records, load_tokenizer, pad_batch, special_token_ids,
                             tokenize_records)
from alignmerge.distributed import all_reduce_sum, barrier, distributed_context, rank_slice
from alignmerge.errors import CheckpointError, ConfigError, DataError
from alignmerge.fisher.capture import (SquaredGradCapture, embedding_squared_grads, shared_squared_grads,
                                      supported_parameters)
from alignmerge.io.safetensors_file import layout_header

KINDS = ("empirical", "true")
SEED_STRIDE = 1_000_003


# ---- labels and loss ---------------------------------------------------------------------
def sample_labels(logits: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """Sample one token per row of ``logits`` [T, V] by inverse CDF with uniforms from a
    generator seeded by (seed, index): the same labels whatever the batch composition."""
    gen = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    u = torch.rand(logits.shape[0], generator=gen, dtype=torch.float64)
    cdf = torch.softmax(logits.detach().double().cpu(), dim=-1).cumsum(-1)
    labels = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return labels.clamp_max(logits.shape[1] - 1).to(logits.device)


def batch_targets(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor, lengths: list[int],
                  indices: list[int], kind: str, seed: int) -> torch.Tensor:
    """Targets [n, T-1] for positions 0..T-2 (predicting token t+1); -100 where unscored."""
    targets = torch.where(scored[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    if kind == "true":
        for r, (length, index) in enumerate(zip(lengths, indices)):
            sampled = sample_labels(logits[r, : length - 1], seed, index)
            targets[r, : length - 1] = torch.where(scored[r, 1:length], sampled, targets[r, : length - 1])
    return targets


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_n Σ_t −log p(target) over scored positions; ``logits`` [n, T, V], targets [n, T-1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def make_batches(seqs: list[TokenizedSequence], batch_size: int, first_index: int = 0):
    """Consecutive batches: (global indices, ids, scored, lengths); ``seqs[0]`` has index ``first_index``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1 (got {batch_size})")
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0:b0 + batch_size]
        ids, scored, _ = pad_batch(chunk)
        start = first_index + b0
        yield list(range(start, start + len(chunk))), ids, scored, [len(s.ids) for s in chunk]


# ---- output file -------------------------------------------------------------------------
class Fp32SafetensorsWriter:
    """Write fp32 tensors into a safetensors file laid out up front, in any order, atomically.

    The header (names, shapes, offsets, metadata) is written first; ``write(name, t)`` puts a
    tensor's bytes at its offset; ``close()`` renames the temporary file into place.
    """

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw, self.offsets, offset = layout_header([(name, torch.float32, tuple(shapes[name])) for name in sorted(shapes)],
                                                  metadata)
        self.data_start = 8 + len(raw)
        self.shapes = dict(shapes)
        self.written: set[str] = set()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.fd = fd
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        os.ftruncate(fd, self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        begin, end = self.offsets[name]
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        if len(data) != end - begin:
            raise ValueError(f"{name}: {len(data)} bytes, expected {end - begin}")
        os.pwrite(self.fd, data, self.data_start + begin)
        self.written.add(name)

    def close(self) -> Path:
        missing = set(self.shapes) - self.written
        if missing:
            self.abort()
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 tensors of a safetensors file as copy-on-write memory maps (paged in on use)."""
    path = Path(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise CheckpointError(f"{path}: tensor {name!r} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = torch.zeros(shape)
            continue
        arr = np.memmap(path, dtype=np.float32, mode="c", offset=8 + n + begin, shape=shape or (1,))
        out[name] = torch.from_numpy(arr).reshape(shape)
    return out


# ---- configuration -----------------------------------------------------------------------
def _parse_memory(max_memory) -> int | None:
    if max_memory is None:
        return None
    from alignmerge.io.writer import parse_size

    try:
        return parse_size(max_memory)
    except ValueError as exc:
        raise ConfigError(f"max_memory: {exc}") from None


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    return AutoConfig.from_pretrained(str(model_dir))


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree on the meta device (shapes and names, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def estimate_bytes(skeleton: nn.Module, config, *, batch_size: int, seq_len: int, dtype: torch.dtype) -> dict:
    """Rough peak bytes: in memory (weights + Fisher + one batch's activations) and streamed."""
    esize = torch.finfo(dtype).bits // 8
    n_params = sum(p.numel() for p in skeleton.parameters())
    hidden = getattr(config, "hidden_size", 0)
    vocab = getattr(config, "vocab_size", 0)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 1)
    tokens = batch_size * seq_len
    per_layer_act = tokens * (8 * hidden + 3 * inter) * esize
    head_act = tokens * vocab * (esize + 8)
    in_memory = n_params * (esize + 4) + layers * per_layer_act + head_act
    big = 0
    model = getattr(skeleton, "model", None)
    if model is not None and hasattr(model, "layers"):
        big = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    head = sum(p.numel() for p in skeleton.lm_head.parameters()) if hasattr(skeleton, "lm_head") else 0
    streamed = max(big, head) * (esize + 4) + per_layer_act + head_act + 2 * tokens * hidden * 4
    return {"in_memory": int(in_memory), "streamed": int(streamed), "params": int(n_params)}


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested but CUDA is not available; use --device cpu")
    return device


def _prepare(model_dir, data, *, kind, samples, max_length, on_long, chat=True):
    model_dir = Path(model_dir)
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    config = _load_config(model_dir)
    records = load_records(data, max_samples=samples) if not isinstance(data, list) else data
    if isinstance(data, list) and samples is not None:
        records = records[:samples]
    if not records:
        raise DataError("no records (empty data)")
    context = getattr(config, "max_position_embeddings", None) or max_length
    limit = min(max_length, context)
    tokenizer = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tokenizer, config)
    seqs = tokenize_records(records, tokenizer, max_length=limit, bos_id=bos, eos_id=eos, on_long=on_long,
                            chat=chat, origin=str(data) if not isinstance(data, list) else "data")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        top = max(int(s.ids.max()) for s in seqs)
        if top >= vocab:
            raise DataError(f"{model_dir}: tokenizer produced id {top} >= the model's vocab_size {vocab}")
    return model_dir, config, seqs


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


# ---- public API --------------------------------------------------------------------------
def compute_fisher(model_dir, data, out=None, *, kind: str = "empirical", samples: int | None = None,
                   max_length: int = 512, batch_size: int = 8, device: str = "cpu", max_memory=None,
                   seed: int = 0, dtype: torch.dtype = torch.float32, on_long: str = "truncate",
                   stream: bool | None = None, backend: str | None = None, chat: bool = True,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model in ``model_dir`` on ``data`` (a source string or records).

    Returns fp32 tensors under the model's parameter names; with ``out`` also writes them
    (atomically) as safetensors with metadata (model, data, kind, N). ``stream=None`` streams
    only when the in-memory estimate exceeds ``max_memory`` (e.g. "8GB"); ``True`` forces it.
    ``chat``: prompt/response records in the chat format (see ``alignmerge.data.chat_format``).
    """
    model_dir, config, seqs = _prepare(model_dir, data, kind=kind, samples=samples, max_length=max_length,
                                       on_long=on_long, chat=chat)
    budget = _parse_memory(max_memory)
    device = _check_device(device)
    skel = _skeleton(config, dtype)
    ok, bad = supported_parameters(skel)
    if bad:
        raise CheckpointError(f"{model_dir}: no per-sample gradient rule for {', '.join(bad[:5])}"
                              + (" ..." if len(bad) > 5 else ""))
    shapes = {name: tuple(p.shape) for name, p in skel.named_parameters()}
    longest = max(len(s.ids) for s in seqs)
    est = estimate_bytes(skel, config, batch_size=batch_size, seq_len=longest, dtype=dtype)
    if stream is None:
        stream = budget is not None and est["in_memory"] > budget
    if stream and budget is not None and est["streamed"] > budget:
        raise ConfigError(f"max_memory: {max_memory} is below even one streamed layer (~{est['streamed'] / 1e9:.2f} GB "
                          "needed); raise --max-memory or lower --batch-size/--max-length")
    metadata = {"format": "pt", "alignmerge": "fisher", "model": str(model_dir),
                "data": str(data) if not isinstance(data, list) else "records", "kind": kind,
                "N": str(len(seqs)), "seed": str(seed), "dtype": str(dtype).replace("torch.", "")}
    rank, world = distributed_context(device)
    if stream and world > 1:
        raise ConfigError("a streamed Fisher pass (--max-memory below the model) cannot be split across torchrun "
                          "ranks; run it in one process or raise --max-memory")
    if stream:
        tied = _tied_names(skel)
        if any(not t.startswith("lm_head.weight = ") for t in tied):
            raise ConfigError(f"{model_dir}: streaming supports only a tied lm_head/embedding pair, not "
                              f"{', '.join(tied)}; run in memory (no --max-memory) instead")
        # without ``out`` the streamed result lives in a temporary file, returned memory-mapped
        target = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="alignmerge-fisher-")) / "f.safetensors"
        writer = Fp32SafetensorsWriter(target, shapes, metadata)
        try:
            _fisher_streamed(model_dir, config, skel, seqs, writer, kind=kind, batch_size=batch_size, device=device,
                             seed=seed, dtype=dtype, backend=backend, progress=progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        mapped = mmap_safetensors(target)
        if out is None:  # the maps keep the data alive; the temporary file and directory go now
            target.unlink()
            target.parent.rmdir()
        return mapped
    fisher = _fisher_in_memory(model_dir, seqs, kind=kind, batch_size=batch_size, device=device, seed=seed,
                               dtype=dtype, backend=backend, progress=progress)
    if out is not None and rank == 0:
        writer = Fp32SafetensorsWriter(out, shapes, metadata)
        try:
            for name, t in fisher.items():
                writer.write(name, t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    barrier(world)
    return fisher


def _tied_names(skel: nn.Module) -> list[str]:
    seen: dict[int, str] = {}
    tied = []
    for mname, module in skel.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:
                tied.append(f"{full} = {seen[id(p)]}")
            else:
                seen[id(p)] = full
    return tied


@contextlib.contextmanager
def hf_progress_hidden():
    """transformers' own progress bars (one per model load or save) off inside the block: our commands show
    their own."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_model(model_dir: Path, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The HF causal LM with frozen weights, sdpa attention, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    with hf_progress_hidden():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def prepare_sequences(model_dir, data, *, samples: int | None = None, max_length: int = 512,
                      on_long: str = "truncate", chat: bool = True) -> list[TokenizedSequence]:
    """Load and tokenise ``data`` (source string or records) for the model in ``model_dir``;
    every data error is raised here, before any compute."""
    return _prepare(model_dir, data, kind="empirical", samples=samples, max_length=max_length, on_long=on_long,
                    chat=chat)[2]


def sequence_backward(model: nn.Module, seqs: list[TokenizedSequence], *, batch_size: int = 8,
                      kind: str = "empirical", seed: int = 0, device="cpu", before_batch=None, after_batch=None,
                      first_index: int = 0):
    """Run forward + backward of Σ_n −log p(y_n|x_n) batch by batch; yields each batch's size.

    The weights may be frozen: the input embeddings' output is made to require grad so that
    backward reaches every layer (and hooks such as ``LinearCapture`` see their gradients).
    ``before_batch()`` / ``after_batch()`` run around each forward+backward (e.g.
    ``capture.new_batch`` and ``capture.finish_batch``).
    """
    device = torch.device(device)

    def make_leaf(module, inputs, output):
        if not output.requires_grad and torch.is_grad_enabled():
            return output.detach().requires_grad_()
        return None

    handle = model.get_input_embeddings().register_forward_hook(make_leaf)
    try:
        for indices, ids, scored, lengths in make_batches(seqs, batch_size, first_index):
            if before_batch is not None:
                before_batch()
            ids, scored = ids.to(device), scored.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            targets = batch_targets(logits, ids, scored, lengths, indices, kind, seed)
            sequence_nll(logits, targets).backward()
            del logits
            if after_batch is not None:
                after_batch()
            yield len(indices)
    finally:
        handle.remove()


def _fisher_in_memory(model_dir: Path, seqs, *, kind, batch_size, device, seed, dtype, backend, progress):
    """F = (1/N) Σ_n g_n²; under torchrun each rank takes a contiguous block of the N sequences
    (keeping their global indices, so "true" labels match a single process) and the sums are all-reduced."""
    rank, world = distributed_context(device)
    lo, hi = rank_slice(len(seqs), rank, world)
    model = load_model(model_dir, dtype=dtype, device=device)
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in model.named_parameters()}
    bar = _progress(hi - lo, "fisher", progress and rank == 0)
    with SquaredGradCapture(model, fisher, backend=backend) as cap:
        for n in sequence_backward(model, seqs[lo:hi], batch_size=batch_size, kind=kind, seed=seed, device=device,
                                   before_batch=cap.new_batch, after_batch=cap.finish_batch, first_index=lo):
            bar.update(n)
    bar.close()
    if world > 1:
        all_reduce_sum(fisher.values())
    for t in fisher.values():
        t.div_(len(seqs))
    return {k: v.cpu() for k, v in fisher.items()}


# ---- streaming ---------------------------------------------------------------------------
class BoundaryStore:
    """Per-batch boundary tensors kept on the host; spilled to files when ``spill`` is True."""

    def __init__(self, spill: bool):
        self.spill = spill
        self._mem: dict[str, torch.Tensor] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="alignmerge-stream-") if spill else None

    def put(self, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if self.spill:
            torch.save(t.cpu().contiguous(), os.path.join(self._dir.name, key + ".pt"))
        else:
            self._mem[key] = t.to("cpu", copy=True)

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        if self.spill:
            return torch.load(os.path.join(self._dir.name, key + ".pt")).to(device)
        return self._mem[key].to(device)

    def drop(self, key: str) -> None:
        if self.spill:
            Path(self._dir.name, key + ".pt").unlink(missing_ok=True)
        else:
            self._mem.pop(key, None)

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            self._dir.cleanup()


class _LayerLoader:
    """Materialise a meta-device submodule from the checkpoint files, and free it again."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype,
                 aliases: dict[str, str] | None = None):
        from alignmerge.io.checkpoint import Checkpoint

        self.ckpt = Checkpoint(model_dir)
        self.device, self.dtype = device, dtype
        self.aliases = aliases or {}  # tied names absent from the files -> the stored name

    def load(self, module: nn.Module, prefix: str) -> nn.Module:
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                full = prefix + name
                if full not in self.ckpt and full in self.aliases:
                    full = self.aliases[full]
                if full not in self.ckpt:
                    raise CheckpointError(f"{self.ckpt.path}: tensor {full!r} is missing")
                src = self.ckpt.read(full)
                if tuple(src.shape) != tuple(t.shape):
                    raise CheckpointError(f"{self.ckpt.path}: tensor {full!r} has shape {tuple(src.shape)}, "
                                          f"expected {tuple(t.shape)}")
                t.copy_(src.to(t.dtype))
        module.requires_grad_(False)
        return module

    @staticmethod
    def free(module: nn.Module) -> None:
        module.to_empty(device="meta")


def _decoder_parts(skel: nn.Module, model_dir: Path):
    inner = getattr(skel, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(skel, "lm_head"):
        raise CheckpointError(f"{model_dir}: streaming supports Llama-style decoders (model.embed_tokens, "
                              "model.layers, model.norm, lm_head); run in memory instead")
    return inner


def streamed_forward(inner, loader: "_LayerLoader", store: BoundaryStore, batches, run_layer, device,
                     on_batch=None) -> None:
    """Forward of a Llama-style decoder one layer at a time: embeddings, then each layer over every batch,
    keeping each batch's boundary activations ``h{b}_{layer}`` in ``store``; layers are loaded and freed."""
    embed = loader.load(inner.embed_tokens, "model.embed_tokens.")
    with torch.no_grad():
        for b, (_, ids, _, _) in enumerate(batches):
            store.put(f"h{b}_0", embed(ids.to(device)))
    _LayerLoader.free(embed)
    for li, layer in enumerate(inner.layers):
        loader.load(layer, f"model.layers.{li}.")
        with torch.no_grad():
            for b in range(len(batches)):
                store.put(f"h{b}_{li + 1}", run_layer(layer, store.get(f"h{b}_{li}", device)))
                if on_batch is not None:
                    on_batch(b)
        _LayerLoader.free(layer)


def _fisher_streamed(model_dir: Path, config, skel, seqs, writer: Fp32SafetensorsWriter, *, kind, batch_size,
                     device, seed, dtype, backend, progress):
    inner = _decoder_parts(skel, model_dir)
    tied = skel.lm_head.weight is inner.embed_tokens.weight
    emb_name = "model.embed_tokens.weight"
    loader = _LayerLoader(model_dir, device, dtype, aliases={"lm_head.weight": emb_name} if tied else None)
    rotary = type(inner.rotary_emb)(config=skel.config).to(device)
    store = BoundaryStore(spill=device.type == "cpu")
    batches = list(make_batches(seqs, batch_size))
    n_layers = len(inner.layers)
    bar = _progress(len(seqs) * (2 * n_layers + 2), "fisher (streamed)", progress)
    inv_n = 1.0 / len(seqs)

    def pos_emb(h):
        positions = torch.arange(h.shape[1], device=device).unsqueeze(0)
        return positions, rotary(h, positions)

    def run_layer(layer, h):
        positions, pe = pos_emb(h)
        out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=pe, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    try:
        streamed_forward(inner, loader, store, batches, run_layer, device,
                         on_batch=lambda b: bar.update(len(batches[b][0])))

        def backward_stage(module: nn.Module, prefix: str, step):
            """Load ``module``, run ``step(b, capture)`` per batch, write its Fisher, free it."""
            loader.load(module, prefix)
            buffers = {prefix + n: torch.zeros(p.shape, dtype=torch.float32, device=device)
                       for n, p in module.named_parameters() if prefix + n in writer.shapes}
            with SquaredGradCapture(module, buffers, prefix=prefix, backend=backend) as cap:
                for b in range(len(batches)):
                    cap.new_batch()
                    step(b)
                    cap.finish_batch()
                    bar.update(len(batches[b][0]))
            for name, buf in buffers.items():
                writer.write(name, buf.mul_(inv_n))
            _LayerLoader.free(module)

        # head: final norm + lm_head, loss, gradient at the last boundary
        head = nn.Module()  # parameters named as in the full model: model.norm.*, lm_head.*
        head.model = nn.Module()
        head.model.norm = inner.norm
        head.lm_head = skel.lm_head

        def head_step(b):
            indices, ids, scored, lengths = batches[b]
            x = store.get(f"h{b}_{n_layers}", device).requires_grad_()
            hidden = head.model.norm(x)
            logits = head.lm_head(hidden)
            if tied:  # the lm_head half of the tied weight's per-sample gradient, finished at the embedding
                store.put(f"ha{b}", hidden)
                logits.register_hook(lambda g, b=b: store.put(f"hg{b}", g))
            targets = batch_targets(logits, ids.to(device), scored.to(device), lengths, indices, kind, seed)
            sequence_nll(logits, targets).backward()
            store.put(f"d{b}", x.grad)
            store.drop(f"h{b}_{n_layers}")

        backward_stage(head, "", head_step)

        # layers, last to first: recompute from the boundary input, back-propagate the gradient
        for li in reversed(range(n_layers)):
            layer = inner.layers[li]

            def layer_step(b, layer=layer, li=li):
                x = store.get(f"h{b}_{li}", device).requires_grad_()
                run_layer(layer, x).backward(store.get(f"d{b}", device))
                store.put(f"d{b}", x.grad)
                store.drop(f"h{b}_{li}")

            backward_stage(layer, f"model.layers.{li}.", layer_step)

        # embeddings: per-sample rows from the gradient at the first boundary (no weights needed)
        emb = torch.zeros(writer.shapes[emb_name], dtype=torch.float32, device=device)
        for b, (indices, ids, _, _) in enumerate(batches):
            if tied:
                shared_squared_grads(emb, [("linear", store.get(f"hg{b}", device), store.get(f"ha{b}", device)),
                                           ("embedding", store.get(f"d{b}", device), ids)])
                store.drop(f"hg{b}")
                store.drop(f"ha{b}")
            else:
                embedding_squared_grads(emb, ids, store.get(f"d{b}", device))
            store.drop(f"d{b}")
            bar.update(len(indices))
        writer.write(emb_name, emb.mul_(inv_n))
    finally:
        store.close()
        bar.close()

