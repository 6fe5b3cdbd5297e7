"""Hooks that expose per-sequence gradient information without computing weight gradients.

The weights stay frozen (``requires_grad=False``); only activations carry gradients, so a
capture pass costs about a plain forward+backward. Two layers of API:

``LinearCapture(root, on_linear)``
    For every ``nn.Linear`` under ``root`` the callback ``on_linear(name, module, a, g)`` is called
    during backward with the layer's input ``a`` [N, T, in] and output gradient ``g`` [N, T, out]
    of the batch (T = all token dimensions flattened). Sequence n's weight gradient is
    G_n = g_nᵀ a_n (out × in), its bias gradient Σ_t g_n. Reuse it for any statistic built from
    (a, g): the diagonal Fisher Σ_n G_n², the alignment subspace Σ_n G_n G_nᵀ and Σ_n G_nᵀ G_n, ...

``SquaredGradCapture(root, buffers)``
    Adds Σ_n (∂ℓ_n/∂θ)² into fp32 ``buffers[param_name]`` for every parameter of ``root``, where
    ℓ_n is sequence n's summed log-likelihood: nn.Linear weights through the fused
    ``fisher_accumulate`` op; biases Σ_n (Σ_t g_n)²; embeddings by scattering g_n into the rows
    of the sequence's token ids; RMSNorm / LayerNorm weights (Σ_t g_n ⊙ x̂_n)² with x̂ recomputed
    from the captured input. A parameter used by several modules (tied embeddings) has its
    per-sample gradient summed over the uses before squaring (``finish_batch``).

Both are context managers; the hooks are removed on exit. Embedding outputs are made to
require grad so that backward reaches the first layer even with every weight frozen.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from alignmerge.errors import CheckpointError
from alignmerge.ops.fisher import fisher_accumulate

LinearCallback = Callable[[str, nn.Linear, torch.Tensor, torch.Tensor], None]


def _flat3(x: torch.Tensor) -> torch.Tensor:
    """[N, ..., D] -> [N, T, D] with all middle dimensions flattened into T."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def embedding_squared_grads(buf: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """buf[v] += Σ_n (Σ_{t: ids[n,t]=v} g[n,t])²: per-sequence embedding-row gradients, squared.

    One scatter over the (sequence, token id) pairs of the batch; ids [N, T], g [N, T, H].
    """
    n_rows = buf.shape[0]
    keys = ids.reshape(ids.shape[0], -1).to(buf.device)
    keys = keys + n_rows * torch.arange(keys.shape[0], device=buf.device).unsqueeze(1)
    rows, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    grad = torch.zeros((rows.numel(), g.shape[-1]), dtype=torch.float32, device=buf.device)
    grad.index_add_(0, inverse, g.reshape(-1, g.shape[-1]).float())
    buf.index_add_(0, rows % n_rows, grad.square_())
    return buf


def shared_squared_grads(buf: torch.Tensor, parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """buf += Σ_n (Σ_uses G_use,n)² for a parameter used by several modules (tied embeddings).

    ``parts``: ("linear", g [N,T,out], a [N,T,in]) contributes g_nᵀ a_n; ("embedding", g [N,T,H],
    ids [N,T]) scatters g_n into the rows of the ids. One dense per-sample buffer is reused.
    """
    n_seq = parts[0][1].shape[0]
    grad = torch.empty(buf.shape, dtype=torch.float32, device=buf.device)
    for n in range(n_seq):
        grad.zero_()
        for kind, g, other in parts:
            if kind == "linear":
                grad.addmm_(g[n].reshape(-1, g.shape[-1]).float().t(), other[n].reshape(-1, other.shape[-1]).float())
            else:
                grad.index_add_(0, other[n].reshape(-1).to(buf.device), g[n].reshape(-1, g.shape[-1]).float())
        buf.addcmul_(grad, grad)
    return buf


class LinearCapture:
    """Call ``on_linear(name, module, a, g)`` for every nn.Linear under ``root`` in backward.

    ``a`` is the input [N, T, in] (detached), ``g`` the gradient of the backward's scalar w.r.t.
    the output, [N, T, out]. ``names`` restricts the hooks to those module names. A module
    that runs more than once per forward raises, because its per-sample gradient would be
    the sum over calls. ``prefix`` is prepended to module names (``"model.layers.3."``).
    """

    def __init__(self, root: nn.Module, on_linear: LinearCallback, *, names: set[str] | None = None,
                 prefix: str = ""):
        self.root = root
        self.on_linear = on_linear
        self.prefix = prefix
        self.modules = {prefix + n: m for n, m in root.named_modules()
                        if isinstance(m, nn.Linear) and (names is None or prefix + n in names)}
        self._handles: list = []
        self._calls: dict[str, int] = defaultdict(int)

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def new_batch(self) -> None:
        """Reset the per-forward call counts (call before each forward)."""
        self._calls.clear()

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            self._calls[name] += 1
            if self._calls[name] > 1:
                raise CheckpointError(f"{name}: module runs more than once per forward; per-sample "
                                      "gradients would mix its calls")
            a = _flat3(inputs[0].detach())

            def on_grad(g):
                self.on_linear(name, module, a, _flat3(g))

            output.register_hook(on_grad)

        return hook


def _rms_norm_hat(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", 1e-6)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if "RMSNorm" in name and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return "rmsnorm"
    return None


class SquaredGradCapture:
    """Accumulate Σ_n (per-sequence gradient)² of every parameter under ``root`` into ``buffers``.

    ``buffers`` maps full parameter names (``prefix`` + name in ``root``) to fp32 tensors of the
    parameter's shape on the compute device; parameters missing from it are ignored.
    Use ``supported_parameters(root)`` before compute to reject models with other layer types.
    After each backward call ``finish_batch()`` (needed only for shared parameters).
    """

    def __init__(self, root: nn.Module, buffers: dict[str, torch.Tensor], *, prefix: str = "",
                 backend: str | None = None):
        self.root = root
        self.buffers = buffers
        self.prefix = prefix
        self.backend = backend
        self._handles: list = []
        self._calls: dict[str, int] = defaultdict(int)
        owners: dict[int, list[str]] = defaultdict(list)
        for mname, module in root.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners[id(p)].append(prefix + (f"{mname}.{pname}" if mname else pname))
        self._param_name = {pid: names[0] for pid, names in owners.items()}
        self._shared = {pid for pid, names in owners.items() if len(names) > 1}
        self._pending: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = defaultdict(list)

    # ---- registration ---------------------------------------------------------------------
    def __enter__(self):
        for mname, module in self.root.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(mname, self._on_linear)))
            elif isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_hook(self._embedding_hook(mname)))
            elif _norm_kind(module) is not None:
                self._handles.append(module.register_forward_hook(self._hook(mname, self._on_norm)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        return False

    def new_batch(self) -> None:
        self._calls.clear()
        self._pending.clear()

    def _count(self, mname: str) -> None:
        self._calls[mname] += 1
        if self._calls[mname] > 1:
            raise CheckpointError(f"{self.prefix}{mname}: module runs more than once per forward; "
                                  "per-sample gradients would mix its calls")

    def _hook(self, mname: str, handler):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            self._count(mname)
            x = inputs[0].detach()
            output.register_hook(lambda g: handler(module, x, g))

        return hook

    def _embedding_hook(self, mname: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                if not torch.is_grad_enabled():
                    return
                output = output.detach().requires_grad_()
            self._count(mname)
            ids = inputs[0].detach()
            output.register_hook(lambda g: self._on_embedding(module, ids, g))
            return output

        return hook

    # ---- per-module per-sample gradients ----------------------------------------------------
    def _target(self, p: torch.Tensor | None) -> tuple[str | None, bool]:
        if p is None:
            return None, False
        name = self._param_name.get(id(p))
        if name is None or name not in self.buffers:
            return None, False
        return name, id(p) in self._shared

    def _on_linear(self, module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> None:
        a, g = _flat3(x), _flat3(g)
        name, shared = self._target(module.weight)
        if name is not None:
            if shared:
                self._pending[name].append(("linear", g, a))
            else:
                fisher_accumulate(self.buffers[name], g, a, backend=self.backend)
        bname, _ = self._target(module.bias)
        if bname is not None:
            self.buffers[bname].add_(g.float().sum(1).square().sum(0))

    def _on_embedding(self, module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> None:
        name, shared = self._target(module.weight)
        if name is None:
            return
        ids = ids.reshape(ids.shape[0], -1)
        g = _flat3(g)
        if shared:
            self._pending[name].append(("embedding", g, ids))
            return
        embedding_squared_grads(self.buffers[name], ids, g)

    def _on_norm(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        kind = _norm_kind(module)
        if kind == "rmsnorm":
            x_hat = _rms_norm_hat(module, x)
        else:
            x_hat = torch.nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
        g3 = _flat3(g).float()
        name, _ = self._target(module.weight)
        if name is not None:
            self.buffers[name].add_((g3 * _flat3(x_hat).float()).sum(1).square().sum(0))
        bname, _ = self._target(getattr(module, "bias", None))
        if bname is not None:
            self.buffers[bname].add_(g3.sum(1).square().sum(0))

    def finish_batch(self) -> None:
        """Square-and-add the per-sample gradients of shared parameters collected in backward."""
        for name, parts in self._pending.items():
            shared_squared_grads(self.buffers[name], parts)
        self._pending.clear()


def supported_parameters(root: nn.Module, *, prefix: str = "") -> tuple[set[str], list[str]]:
    """(names SquaredGradCapture handles, names it cannot) for the parameters under ``root``."""
    handled: set[int] = set()
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            handled.update(id(p) for p in module.parameters(recurse=False))
        elif _norm_kind(module) is not None:
            handled.update(id(p) for _, p in module.named_parameters(recurse=False))
    ok, bad = set(), []
    for name, p in root.named_parameters():
        (ok.add(prefix + name) if id(p) in handled else bad.append(prefix + name))
    return ok, bad
