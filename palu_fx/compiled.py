"""Entry point 2: ``torch.compile(model.forward, backend=palu_fx.palu_backend)``.

The Dynamo graph is lowered to aten with ``make_fx`` (in-place cache writes kept), the same
finder and rewrite as the export path run on it, and the result goes to Inductor (or runs
eagerly with ``backend(cfg, eager=True)``). The KV cache is the caller's: pass a
``palu_fx.LatentCache`` built with the same config or plan, and only latents are allocated.

Graphs the pass cannot use (no attention, attention it cannot explain) are compiled
unchanged, with one warning naming the reason; the backend never breaks a model that runs
without it.
"""
from __future__ import annotations

import hashlib
import warnings
import weakref
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from palu_fx.config import PaluConfig
from palu_fx.passes.find import CACHE_UPDATE_OPS, find_sites
from palu_fx.passes.fx_utils import is_call
from palu_fx.passes.rewrite import cleanup, live_snapshot, rewrite_site
from palu_fx.passes.rotary import RotaryCaches
from palu_fx.plan import CompressionPlan, make_plan
from palu_fx.report import CompressionReport, SkipRecord

__all__ = ["backend", "palu_backend", "last_report"]

_REPORTS: list[CompressionReport] = []


def last_report() -> Optional[CompressionReport]:
    """The report of the most recent graph the backend compiled (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


class ModuleEditor:
    """Constants of a traced GraphModule: placeholders resolve to the real example inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, fake_mode):
        self.gm, self.fake_mode = gm, fake_mode
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.values = {n: v for n, v in zip(phs, example_inputs)}
        self.count = 0

    def tensor(self, node: fx.Node) -> torch.Tensor:
        if node.op == "get_attr":
            return getattr(self.gm, node.target)
        v = self.values.get(node)
        if not isinstance(v, torch.Tensor) or _is_fake(v):
            raise ValueError(f"no concrete value for {node.name}")
        return v

    def is_param(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            return isinstance(getattr(self.gm, node.target, None), torch.nn.Parameter) or \
                node.target.startswith("palu_")
        return isinstance(self.values.get(node), torch.nn.Parameter)

    def add_param(self, name: str, tensor: torch.Tensor) -> fx.Node:
        self.count += 1
        attr = f"{name}_{self.count}"
        self.gm.register_buffer(attr, tensor.detach().contiguous())
        node = self.gm.graph.get_attr(attr)
        node.meta["val"] = self.fake_mode.from_tensor(getattr(self.gm, attr), static_shapes=True)
        return node

    add_buffer = add_param


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _to_aten(gm: fx.GraphModule, example_inputs: list):
    """Dynamo graph -> aten graph with fake values on every node, mutations kept."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
    with fake_mode:
        fake = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not _is_fake(x) else x
                for x in example_inputs]
        aten_gm = make_fx(gm, tracing_mode="real")(*fake)
    return aten_gm, fake_mode


def _keep_dynamo_input_meta(aten_gm: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Carry Dynamo's per-input metadata over to the rewritten aten graph.

    AOTAutograd finds the inputs whose address never changes (parameters, and tensors
    marked with ``mark_static_address`` such as a ``LatentCache``'s buffers) from that
    metadata; CUDA graphs (``mode="reduce-overhead"``) need it, and without it skip every
    graph that writes the cache ("mutated inputs"). ``make_fx`` keeps the inputs in order,
    one placeholder per Dynamo placeholder. The factors the rewrite registered are buffers
    of the new graph module with no Dynamo source: they get constant sources of their own.
    """
    from torch._dynamo.source import ConstantSource

    old = gm.graph.find_nodes(op="placeholder")
    new = aten_gm.graph.find_nodes(op="placeholder")
    if "dynamo_compile_id" not in gm.meta or not hasattr(gm, "_param_name_to_source") or len(old) != len(new):
        return
    for o, n in zip(old, new):
        n._dynamo_source = getattr(o, "_dynamo_source", None)
        if "tensor_dict" in o.meta:
            n.meta["tensor_dict"] = o.meta["tensor_dict"]
    known = dict(gm._param_name_to_source)
    names = [name for name, _ in aten_gm.named_parameters()] + [name for name, _ in aten_gm.named_buffers()]
    aten_gm._param_name_to_source = {name: known.get(name) or ConstantSource(f"palu_fx.{name}") for name in names}
    aten_gm.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]


def _inner(gm: fx.GraphModule, example_inputs: list, eager: bool, inductor_options: Optional[dict] = None):
    if eager:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=dict(inductor_options or {}))


def _op_contract_files() -> tuple:
    """The sources of what Inductor's generated code assumes of the ``palu::`` ops: their
    registrations and fake implementations (shapes, dtypes, strides) and the output layout they
    declare."""
    from palu_fx import ops
    from palu_fx.kernels.latent_attention import naive
    return (ops.__file__, naive.__file__)


def _op_contract_key():
    """A no-op post-grad pass whose ``uuid`` keys Inductor's FX graph cache by the ``palu::``
    ops' contracts (a hash of ``_op_contract_files``).

    Why: the cache keys a graph by its code, not by the fake implementations of the custom ops
    it calls. After an upgrade that changed an op's declared strides, a compiled model ran
    stale code from the cache and failed ``assert_size_stride`` (2026-11-29, the op's output
    moved to [B, S, H, D] memory). Inductor puts a custom pass's ``uuid`` in the cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OpContractKey(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            return None

        def uuid(self) -> str:  # (read each time: torch's get_hash_for_files caches by path)
            h = hashlib.sha256(b"palu-fx op contracts")
            for path in _op_contract_files():
                with open(path, "rb") as f:
                    h.update(f.read())
            return h.hexdigest()

    return OpContractKey()


def _inductor_options(mode: Optional[str], options: Optional[dict]) -> dict:
    """Inductor config patches for a ``torch.compile``-style ``mode`` plus explicit ``options``
    (``options`` win), checked here so a bad value fails when the backend is built; the graph
    cache keyed by the palu ops' contracts (``_op_contract_key``) unless ``options`` set that
    hook themselves."""
    from torch._inductor import config as inductor_config, list_mode_options

    try:
        patches = dict(list_mode_options(mode)) if mode is not None else {}
    except RuntimeError as e:
        raise ValueError(f"backend(mode={mode!r}): {e}") from None
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"backend(options=...) takes a dict of Inductor settings, got {type(options).__name__}")
    for key in options or {}:
        # dotted keys name nested settings (``triton.cudagraphs``); check that each one exists
        obj = inductor_config
        for part in key.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"backend(options=...): {key!r} is not an Inductor setting")
            obj = getattr(obj, part)
    patches.update(options or {})
    if patches.get("post_grad_custom_pre_pass") is None:
        patches["post_grad_custom_pre_pass"] = _op_contract_key()
    return patches


def _warn(reason: str) -> None:
    warnings.warn(f"palu-fx: compiling this graph without Palu: {reason}", stacklevel=3)


def _has_latent_cache(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and (n.target in CACHE_UPDATE_OPS or n.target is torch.ops.palu.cache_update)
               for n in gm.graph.nodes)


class _PlanMemo:
    """Plans already made by one backend, for the K/V weights they factor.

    A plan is reused only for the very same weight tensors (held weakly, so a freed model's
    plan goes with it) at the same version counters (an in-place update bumps them).
    """

    def __init__(self):
        self._entries: list[tuple[list, list[int], CompressionPlan]] = []

    @staticmethod
    def _weights(sites, tensor) -> list[torch.Tensor]:
        return [tensor(chain.proj.weight) for s in sites for chain in (s.key, s.value)]

    def get(self, sites, tensor) -> Optional[CompressionPlan]:
        weights = self._weights(sites, tensor)
        for refs, versions, plan in self._entries:
            if (len(refs) == len(weights) and all(r() is w for r, w in zip(refs, weights))
                    and versions == [w._version for w in weights]):
                return plan
        return None

    def put(self, sites, tensor, plan: CompressionPlan) -> None:
        weights = self._weights(sites, tensor)
        self._entries = [e for e in self._entries if all(r() is not None for r in e[0])]
        self._entries.append(([weakref.ref(w) for w in weights], [w._version for w in weights], plan))


def compile_with_palu(gm: fx.GraphModule, example_inputs: list,
                      compression: Union[PaluConfig, CompressionPlan], eager: bool = False,
                      plans: Optional[_PlanMemo] = None, options: Optional[dict] = None) -> Callable:
    """``plans`` memoizes the factorization across the graphs one backend compiles (the
    prefill and decode graphs, recompiles): it depends only on the weights and the config."""
    latent = _has_latent_cache(gm)
    try:
        aten_gm, fake_mode = _to_aten(gm, example_inputs)
    except Exception as e:  # never break a model over our own lowering
        if latent:
            raise
        _warn(f"the graph could not be lowered to aten ({type(e).__name__}: {e})")
        return _inner(gm, example_inputs, eager, options)
    editor = ModuleEditor(aten_gm, example_inputs, fake_mode)
    found, skipped = find_sites(aten_gm.graph, editor.tensor, editor.is_param)
    # Only a LatentCache saves memory under compile: a caller-owned full cache stays allocated.
    sites = [s for s in found if s.key_cache is not None and s.key_cache.latent]
    if not sites:
        if skipped:
            reason = "; ".join(f"{u.node.name}: {u.reason}" for u in skipped)
        elif found:
            reason = ("the attention reads a full-size KV cache owned by the caller; pass "
                      "past_key_values=palu_fx.LatentCache(model.config, max_cache_len, compression) to generate()")
        else:
            reason = "no attention op found"
        if latent:
            raise RuntimeError(f"palu-fx cannot rewrite the attention that reads the LatentCache: {reason}")
        _warn(reason)
        return _inner(gm, example_inputs, eager, options)
    if isinstance(compression, CompressionPlan):
        plan = compression
        plan.check(sites)
    else:
        plan = plans.get(sites, editor.tensor) if plans is not None else None
        if plan is None:
            plan = make_plan(sites, editor.tensor, compression)
            if plans is not None:
                plans.put(sites, editor.tensor, plan)
    before = live_snapshot(aten_gm.graph)
    rotary = RotaryCaches(editor)
    results = [rewrite_site(aten_gm.graph, s, sp, editor, rotary, plan.config.fold_values, plan.config.bits,
                            plan.config.quant_group_size)
               for s, sp in zip(sites, plan.sites)]
    cleanup(aten_gm.graph, [], before)
    leftover = [n for n in aten_gm.graph.nodes if is_call(n, CACHE_UPDATE_OPS)]
    if leftover:
        reasons = "; ".join(f"{u.node.name}: {u.reason}" for u in skipped)
        raise RuntimeError(f"palu-fx could not rewrite every attention that reads the LatentCache ({reasons}); "
                           "use transformers' StaticCache for this model")
    aten_gm.graph.lint()
    aten_gm.recompile()
    _keep_dynamo_input_meta(aten_gm, gm)
    _REPORTS.append(CompressionReport(plan.config, results, [SkipRecord(u.node.name, u.reason) for u in skipped],
                                      cache_found=any(r.cached for r in results)))
    return _inner(aten_gm, example_inputs, eager, options)


def backend(compression: Union[PaluConfig, CompressionPlan, None] = None, *, eager: bool = False,
            mode: Optional[str] = None, options: Optional[dict] = None) -> Callable:
    """A ``torch.compile`` backend applying Palu with ``compression`` (a config or a plan).

    ``mode`` and ``options`` mean what they mean to ``torch.compile`` with Inductor (which
    takes neither alongside a custom backend): ``mode="reduce-overhead"`` replays each
    decode step as a CUDA graph, which removes the per-layer launch overhead of the
    latent-attention op (a ``LatentCache``'s buffers are static addresses, as CUDA graphs
    need). ``eager=True`` runs the rewritten aten graph without Inductor (for debugging).
    """
    compression = compression if compression is not None else PaluConfig()
    if not isinstance(compression, (PaluConfig, CompressionPlan)):
        raise TypeError(f"backend() takes a PaluConfig or CompressionPlan, got {type(compression).__name__}")

    patches = _inductor_options(mode, options)
    plans = _PlanMemo()

    def palu(gm: fx.GraphModule, example_inputs: list):
        return compile_with_palu(gm, example_inputs, compression, eager, plans, patches)

    return palu


palu_backend = backend()


def _register() -> None:
    try:
        from torch._dynamo import register_backend

        register_backend(palu_backend, name="palu")
    except Exception:  # already registered (module reloaded)
        pass


_register()
