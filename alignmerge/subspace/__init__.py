"""The anchor's alignment subspace: per 2-D weight W (out × in), orthonormal U (out × r), V (in × r).

P(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ projects a weight update onto the directions that matter for alignment
(DESIGN.md "Math"). Two estimators:

``gradient`` (default): with G_n = g_nᵀ a_n the gradient of sequence n's alignment loss
    ℓ_n = −log p(aligned response | prompt) (response tokens only) w.r.t. W, where a_n [T × in] are the
    layer's inputs and g_n [T × out] its output gradients, U = top-r eigenvectors of
    S_out = Σ_n G_n G_nᵀ and V = top-r eigenvectors of S_in = Σ_n G_nᵀ G_n (the top-r left and right
    singular directions of the stacked per-sequence gradients). G_n is never formed:
        G_n G_nᵀ = g_nᵀ (a_n a_nᵀ) g_n,    G_nᵀ G_n = a_nᵀ (g_n g_nᵀ) a_n,
    O(T²(out + in)) per sequence instead of O(T·out·in), from the Fisher engine's ``LinearCapture``.
``delta``: U, V = top-r left/right singular vectors of θ_A − θ_0 (anchor minus base).

The pass runs in memory, or layer by layer like the Fisher engine's streamed pass when the model does
not fit ``max_memory`` (or with ``stream=True``): peak memory about one layer plus boundary activations.

A side larger than ``max_side`` (e.g. a 128k-row lm_head) gets no basis on that side: its S matrix would
not fit, and the solver handles a one-sided P (U only or V only) exactly. The file stores ``<name>.U`` and
``<name>.V`` (fp32) with metadata (estimator, rank, data, N).

``alignment_fisher`` is the anchor's diagonal Fisher on the alignment data (``compute_fisher``), the
F_align of AlignMerge's EWC-like term ‖δ‖²_{F_align}.
"""
from __future__ import annotations

from pathlib import Path

import torch

from alignmerge.data import STATS_SAMPLES
from alignmerge.distributed import all_reduce_sum, barrier, distributed_context, rank_slice
from alignmerge.errors import CheckpointError, ConfigError

METHODS = ("gradient", "delta")
DEFAULT_MAX_SIDE = 16384


def _top_eigvecs(s: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal eigenvectors of the symmetric PSD ``s`` for its ``rank`` largest eigenvalues (fp32).

    Directions with zero eigenvalue (rank of S below r) are still orthonormal (eigh returns a full basis),
    so U is always a valid r-column orthonormal basis."""
    evals, evecs = torch.linalg.eigh(s.double())
    order = torch.argsort(evals, descending=True)[:rank]
    return evecs[:, order].float().contiguous()


def _sign_fix(basis: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive (a deterministic sign; P is unaffected)."""
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[idx, torch.arange(basis.shape[1])])
    signs[signs == 0] = 1.0
    return basis * signs


class GradientCovariance:
    """Accumulates S_out = Σ_n G_n G_nᵀ and S_in = Σ_n G_nᵀ G_n per nn.Linear from (a, g) batches.

    ``on_linear(name, module, a [N,T,in], g [N,T,out])`` is a ``LinearCapture`` callback; padded
    positions carry g = 0 (unscored, after every real token), so they add nothing.
    """

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, names: set[str] | None = None):
        self.max_side = max_side
        self.names = names
        self.s_out: dict[str, torch.Tensor] = {}
        self.s_in: dict[str, torch.Tensor] = {}
        self.count = 0

    def on_linear(self, name: str, module, a: torch.Tensor, g: torch.Tensor) -> None:
        wname = f"{name}.weight"
        if self.names is not None and wname not in self.names:
            return
        a = a.double()
        g = g.double()
        out_dim, in_dim = g.shape[-1], a.shape[-1]
        if out_dim <= self.max_side:
            weighted = torch.bmm(torch.bmm(a, a.transpose(1, 2)), g)  # (a_n a_nᵀ) g_n, [N, T, out]
            s = g.reshape(-1, out_dim).T @ weighted.reshape(-1, out_dim)  # Σ_n g_nᵀ (a_n a_nᵀ) g_n
            self.s_out[wname] = self.s_out.get(wname, 0) + s
        if in_dim <= self.max_side:
            weighted = torch.bmm(torch.bmm(g, g.transpose(1, 2)), a)  # (g_n g_nᵀ) a_n, [N, T, in]
            s = a.reshape(-1, in_dim).T @ weighted.reshape(-1, in_dim)  # Σ_n a_nᵀ (g_n g_nᵀ) a_n
            self.s_in[wname] = self.s_in.get(wname, 0) + s

    def bases(self, rank: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        out = {}
        for name in sorted(set(self.s_out) | set(self.s_in)):
            s_out, s_in = self.s_out.get(name), self.s_in.get(name)
            sides = [x.shape[0] for x in (s_out, s_in) if x is not None]
            r = min([rank] + sides)
            u = _sign_fix(_top_eigvecs(s_out, r)) if s_out is not None else None
            v = _sign_fix(_top_eigvecs(s_in, r)) if s_in is not None else None
            out[name] = (u, v)
        return out


def gradient_covariance(anchor_dir, data, *, samples: int | None = STATS_SAMPLES, max_length: int = 256,
                        batch_size: int = 8, device: str = "cpu", max_side: int = DEFAULT_MAX_SIDE,
                        names: set[str] | None = None, max_memory=None,
                        stream: bool | None = None) -> tuple[GradientCovariance, int]:
    """S_out, S_in of every nn.Linear weight stored in the checkpoint (tied lm_head aliases the checkpoint
    does not store are skipped), from the anchor's alignment-loss gradients; returns (covariance, N).

    ``stream=None`` streams layer by layer (the Fisher engine's scheme: boundary activations kept, each
    layer reloaded and recomputed in backward) only when the in-memory estimate exceeds ``max_memory``."""
    from alignmerge.fisher.capture import LinearCapture
    from alignmerge.fisher.compute import (_load_config, _parse_memory, _skeleton, estimate_bytes, load_model,
                                           prepare_sequences, sequence_backward)
    from alignmerge.io.checkpoint import Checkpoint

    stored = set(Checkpoint(anchor_dir).names())
    wanted = stored if names is None else stored & set(names)
    seqs = prepare_sequences(anchor_dir, data, samples=samples, max_length=max_length)
    cov = GradientCovariance(max_side=max_side, names=wanted)
    dev = torch.device(device)
    if stream is None:
        budget = _parse_memory(max_memory)
        config = _load_config(Path(anchor_dir))
        est = estimate_bytes(_skeleton(config, torch.float32), config, batch_size=batch_size,
                             seq_len=max(len(q.ids) for q in seqs), dtype=torch.float32)
        stream = budget is not None and est["in_memory"] > budget
    rank, world = distributed_context(device)
    if world > 1 and (stream or len(seqs) < world):
        raise ConfigError(f"the subspace pass under torchrun needs in-memory mode and at least {world} sequences "
                          f"(got {len(seqs)}{', streamed' if stream else ''})")
    if stream:
        _streamed_covariance(Path(anchor_dir), seqs, cov, batch_size=batch_size, device=dev)
    else:
        # under torchrun each rank takes a contiguous block of the sequences; the sums are all-reduced
        lo, hi = rank_slice(len(seqs), rank, world)
        model = load_model(Path(anchor_dir), dtype=torch.float32, device=dev)
        with LinearCapture(model, cov.on_linear) as cap:
            for _ in sequence_backward(model, seqs[lo:hi], batch_size=batch_size, device=device,
                                       before_batch=cap.new_batch, first_index=lo):
                pass
        if world > 1:
            all_reduce_sum([*cov.s_out.values(), *cov.s_in.values()])
    if not cov.s_out and not cov.s_in:
        raise CheckpointError(f"{anchor_dir}: no nn.Linear weight of the model was found in its checkpoint")
    return cov, len(seqs)


def _streamed_covariance(model_dir: Path, seqs, cov: GradientCovariance, *, batch_size: int,
                         device: torch.device) -> None:
    """The gradient pass layer by layer (Llama-style decoders), as the Fisher engine streams its pass:
    forward once per layer keeping each batch's boundary activations; backward from the head, each layer
    reloaded, recomputed from its boundary input, with ``LinearCapture`` feeding ``cov``; then freed."""
    from torch import nn

    from alignmerge.fisher.capture import LinearCapture
    from alignmerge.fisher.compute import (BoundaryStore, _decoder_parts, _LayerLoader, _load_config, _skeleton,
                                           batch_targets, make_batches, sequence_nll, streamed_forward)

    config = _load_config(model_dir)
    skel = _skeleton(config, torch.float32)
    inner = _decoder_parts(skel, model_dir)
    loader = _LayerLoader(model_dir, device, torch.float32,
                          aliases={"lm_head.weight": "model.embed_tokens.weight"}
                          if getattr(config, "tie_word_embeddings", False) else None)
    rotary = type(inner.rotary_emb)(config=skel.config).to(device)
    store = BoundaryStore(spill=device.type == "cpu")
    batches = list(make_batches(seqs, batch_size))
    n_layers = len(inner.layers)

    def run_layer(layer, h):
        positions = torch.arange(h.shape[1], device=device).unsqueeze(0)
        out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary(h, positions),
                    use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    try:
        streamed_forward(inner, loader, store, batches, run_layer, device)

        head = nn.Module()  # parameters named as in the full model
        head.model = nn.Module()
        head.model.norm = inner.norm
        head.lm_head = skel.lm_head
        loader.load(head, "")
        with LinearCapture(head, cov.on_linear) as cap:
            for b, (indices, ids, scored, lengths) in enumerate(batches):
                cap.new_batch()
                x = store.get(f"h{b}_{n_layers}", device).requires_grad_()
                logits = head.lm_head(head.model.norm(x))
                targets = batch_targets(logits, ids.to(device), scored.to(device), lengths, indices, "empirical", 0)
                sequence_nll(logits, targets).backward()
                store.put(f"d{b}", x.grad)
                store.drop(f"h{b}_{n_layers}")
        _LayerLoader.free(head)
        for li in reversed(range(n_layers)):
            layer = loader.load(inner.layers[li], f"model.layers.{li}.")
            with LinearCapture(layer, cov.on_linear, prefix=f"model.layers.{li}.") as cap:
                for b in range(len(batches)):
                    cap.new_batch()
                    x = store.get(f"h{b}_{li}", device).requires_grad_()
                    run_layer(layer, x).backward(store.get(f"d{b}", device))
                    store.put(f"d{b}", x.grad)
                    store.drop(f"h{b}_{li}")
            _LayerLoader.free(layer)
    finally:
        store.close()


def gradient_subspace(anchor_dir, data, rank: int = 16, **options):
    """{weight name: (U, V)} from the anchor's per-sequence alignment-loss gradients (module doc);
    returns (bases, N). ``options`` as for ``gradient_covariance``."""
    cov, n = gradient_covariance(anchor_dir, data, **options)
    return cov.bases(rank), n


def delta_subspace(anchor_dir, base_dir, rank: int = 16, *, names: set[str] | None = None,
                   max_side: int = DEFAULT_MAX_SIDE):
    """{weight name: (U, V)}: top-r singular vectors of θ_A − θ_0 for every 2-D tensor (module doc)."""
    from alignmerge.io.checkpoint import Checkpoint

    anchor, base = Checkpoint(anchor_dir), Checkpoint(base_dir)
    out = {}
    for name in anchor.names():
        if names is not None and name not in names:
            continue
        if len(anchor.shape(name)) != 2 or not anchor.dtype(name).is_floating_point:
            continue
        if name not in base or tuple(base.shape(name)) != tuple(anchor.shape(name)):
            raise CheckpointError(f"{base_dir}: tensor {name!r} missing or of another shape than in {anchor_dir}")
        delta = anchor.read(name).double() - base.read(name).double()
        rows, cols = delta.shape
        r = min(rank, rows, cols)
        if max(rows, cols) > max_side:
            # the large side gets no basis; the small one from the Gram matrix of the small side
            if rows > max_side and cols > max_side:
                continue
            if rows > max_side:
                out[name] = (None, _sign_fix(_top_eigvecs(delta.T @ delta, r)))
            else:
                out[name] = (_sign_fix(_top_eigvecs(delta @ delta.T, r)), None)
            continue
        u_full, _, vh_full = torch.linalg.svd(delta, full_matrices=False)
        out[name] = (_sign_fix(u_full[:, :r].float().contiguous()), _sign_fix(vh_full[:r].T.float().contiguous()))
    if not out:
        raise CheckpointError(f"{anchor_dir}: no 2-D weight to take a subspace of")
    return out


def save_subspace(bases: dict, out, metadata: dict) -> Path:
    """Write ``<name>.U`` / ``<name>.V`` (fp32) atomically as safetensors with string metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (u, v) in bases.items():
        if u is not None:
            tensors[f"{name}.U"] = u.float().contiguous()
        if v is not None:
            tensors[f"{name}.V"] = v.float().contiguous()
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in {"format": "pt", "alignmerge": "subspace",
                                                                     **metadata}.items()})
    tmp.replace(out)
    return out


def compute_subspace(anchor_dir, data=None, rank: int = 16, out=None, *, method: str = "gradient", base_dir=None,
                     samples: int | None = STATS_SAMPLES, max_length: int = 256, batch_size: int = 8,
                     device: str = "cpu", max_side: int = DEFAULT_MAX_SIDE, names: set[str] | None = None,
                     max_memory=None,
                     stream: bool | None = None) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The anchor's alignment subspace {weight name: (U, V)}; written to ``out`` when given.

    method "gradient" needs ``data`` (JSONL path, ``builtin:<name>`` or records; prompt/response pairs
    whose responses are the aligned ones); "delta" needs ``base_dir``. See the module docstring."""
    if rank < 1:
        raise ConfigError(f"subspace rank must be >= 1 (got {rank})")
    if method == "gradient":
        if data is None:
            raise ConfigError("subspace: the gradient estimator needs alignment data (--data)")
        bases, n = gradient_subspace(anchor_dir, data, rank, samples=samples, max_length=max_length,
                                     batch_size=batch_size, device=device, max_side=max_side, names=names,
                                     max_memory=max_memory, stream=stream)
        meta = {"method": method, "rank": rank, "anchor": str(anchor_dir),
                "data": str(data) if not isinstance(data, list) else "records", "N": n}
    elif method == "delta":
        if base_dir is None:
            raise ConfigError("subspace: the delta estimator needs a base model (--base)")
        bases = delta_subspace(anchor_dir, base_dir, rank, names=names, max_side=max_side)
        meta = {"method": method, "rank": rank, "anchor": str(anchor_dir), "base": str(base_dir)}
    else:
        raise ConfigError(f"subspace method must be one of {', '.join(METHODS)}, not {method!r}")
    if out is not None and distributed_context(device)[0] == 0:
        save_subspace(bases, out, meta)
    barrier(distributed_context(device)[1])
    return bases


class SubspaceFile:
    """Lazy reader of a subspace file: ``get(name)`` -> (U or None, V or None) fp32; (None, None) if absent."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: subspace file not found")
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise CheckpointError(f"{self.path}: not a readable safetensors subspace file ({exc})") from None
        self._keys = set(self._file.keys())
        self.metadata = self._file.metadata() or {}

    def names(self) -> set[str]:
        return {k.rsplit(".", 1)[0] for k in self._keys}

    def get(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        u = self._file.get_tensor(f"{name}.U").float() if f"{name}.U" in self._keys else None
        v = self._file.get_tensor(f"{name}.V").float() if f"{name}.V" in self._keys else None
        return u, v

    def validate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError unless every basis fits its weight's shape and is of one rank."""
        for key in self._keys:
            name, side = key.rsplit(".", 1)
            if name not in shapes or len(shapes[name]) != 2:
                raise CheckpointError(f"{self.path}: {key!r} names no 2-D weight of the model")
            shape = tuple(self._file.get_slice(key).get_shape())
            want = shapes[name][0] if side == "U" else shapes[name][1]
            if len(shape) != 2 or shape[0] != want or shape[1] > want:
                raise CheckpointError(f"{self.path}: {key!r} has shape {shape}; the weight {name!r} is "
                                      f"{tuple(shapes[name])}")


def alignment_fisher(anchor_dir, data, out=None, **options) -> dict[str, torch.Tensor]:
    """The anchor's diagonal Fisher on the alignment data (F_align); ``compute_fisher`` with ``options``."""
    from alignmerge.fisher.compute import compute_fisher

    return compute_fisher(anchor_dir, data, out, **options)


__all__ = ["GradientCovariance", "SubspaceFile", "alignment_fisher", "compute_subspace", "delta_subspace",
           "gradient_covariance", "gradient_subspace", "save_subspace"]
