"""Entry point 1: ``compress_exported(ep, cfg) -> ExportedProgram``.

Works on a copy of the program's graph (the input program is never mutated), rewrites every
attention site the finder explains, removes the replaced caches and weights, and rebuilds
the graph signature so the result passes the export verifier and survives save/load.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from palu_fx.config import PaluConfig
from palu_fx.passes.find import find_sites
from palu_fx.passes.fx_utils import fake_mode_of, is_call
from palu_fx.passes.rewrite import cleanup, live_snapshot, old_writes, rewrite_site
from palu_fx.passes.rotary import RotaryCaches
from palu_fx.plan import CompressionPlan, make_plan
from palu_fx.report import CompressionReport, SkipRecord

__all__ = ["compress_exported", "ProgramEditor", "analyze_exported"]


def _get_attr(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class ProgramEditor:
    """Placeholders and their tensors for an ExportedProgram's graph."""

    def __init__(self, ep: ExportedProgram, graph: fx.Graph):
        self.ep, self.graph = ep, graph
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs if isinstance(s.arg, TensorArgument)}
        self.new: dict[str, tuple[InputSpec, torch.Tensor]] = {}
        self.fake_mode = fake_mode_of(graph)

    def tensor(self, node: fx.Node) -> torch.Tensor:
        if node.name in self.new:
            return self.new[node.name][1]
        if node.op == "get_attr" and node.graph.owning_module is not None:
            # e.g. the body of a higher-order op (torch 2.11 exports transformers 5.17's
            # rotary embedding inside wrap_with_autocast / wrap_with_set_grad_enabled)
            return _get_attr(node.graph.owning_module, node.target)
        spec = self.specs.get(node.name)
        if spec is None or spec.target is None:
            raise ValueError(f"{node.name} is not a parameter, buffer or constant of the program")
        if spec.target in self.ep.state_dict:
            return self.ep.state_dict[spec.target]
        return self.ep.constants[spec.target]

    def is_param(self, node: fx.Node) -> bool:
        spec = self.specs.get(node.name) if node.op == "placeholder" else None
        new = self.new.get(node.name)
        return (spec is not None and spec.kind == InputKind.PARAMETER) or (new is not None and new[0].kind == InputKind.PARAMETER)

    def _placeholders(self, kind: InputKind) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder" and self._kind(n) == kind]

    def _kind(self, n: fx.Node):
        if n.name in self.new:
            return self.new[n.name][0].kind
        spec = self.specs.get(n.name)
        return spec.kind if spec is not None else InputKind.USER_INPUT

    def _add(self, name: str, tensor: torch.Tensor, kind: InputKind) -> fx.Node:
        order = [InputKind.PARAMETER, InputKind.BUFFER]
        anchors = [n for k in order[: order.index(kind) + 1] for n in self._placeholders(k)]
        first = next(n for n in self.graph.nodes if n.op == "placeholder")
        ctx = self.graph.inserting_after(anchors[-1]) if anchors else self.graph.inserting_before(first)
        with ctx:
            node = self.graph.placeholder(name)
        node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        target = node.name
        spec = InputSpec(kind, TensorArgument(node.name), target, persistent=False if kind == InputKind.BUFFER else None)
        self.new[node.name] = (spec, tensor)
        return node

    def add_param(self, name: str, tensor: torch.Tensor) -> fx.Node:
        return self._add(name, torch.nn.Parameter(tensor.detach().contiguous(), requires_grad=False), InputKind.PARAMETER)

    def add_buffer(self, name: str, tensor: torch.Tensor) -> fx.Node:
        return self._add(name, tensor, InputKind.BUFFER)

    def build(self, gm: fx.GraphModule) -> ExportedProgram:
        """Drop unused placeholders and assemble the new program."""
        for n in list(self.graph.nodes):
            if n.op == "placeholder" and not n.users and self._kind(n) != InputKind.USER_INPUT:
                self.graph.erase_node(n)
        specs, state, consts = [], {}, {}
        old_state, old_consts = self.ep.state_dict, self.ep.constants
        for n in self.graph.nodes:
            if n.op != "placeholder":
                continue
            if n.name in self.new:
                spec, t = self.new[n.name]
                (state if spec.kind == InputKind.PARAMETER else consts)[spec.target] = t
            else:
                spec = self.specs[n.name]
                if spec.target in old_state:
                    state[spec.target] = old_state[spec.target]
                elif spec.target in old_consts:
                    consts[spec.target] = old_consts[spec.target]
            specs.append(spec)
        for k, v in old_consts.items():  # script objects and the like are kept as they are
            if not isinstance(v, torch.Tensor):
                consts.setdefault(k, v)
        self.graph.lint()
        gm.recompile()
        sig = ExportGraphSignature(input_specs=specs, output_specs=list(self.ep.graph_signature.output_specs))
        return ExportedProgram(
            root=gm, graph=gm.graph, graph_signature=sig, state_dict=state,
            range_constraints=copy.copy(self.ep.range_constraints),
            module_call_graph=copy.deepcopy(self.ep.module_call_graph),
            example_inputs=self.ep.example_inputs, constants=consts, verifiers=[self.ep.verifier],
        )


def _copy_graph_module(ep: ExportedProgram) -> fx.GraphModule:
    graph = fx.Graph()
    value, old_output = graph.graph_copy(ep.graph_module.graph, {}, return_output_node=True)
    graph.output(value).meta = copy.copy(old_output.meta)
    return fx.GraphModule(ep.graph_module, graph)


def _check_args(ep, cfg):
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"compress_exported expects a torch.export.ExportedProgram, got {type(ep).__name__}; "
                        "export the model first (palu_fx.export_decoder or torch.export.export)")
    if cfg is not None and not isinstance(cfg, (PaluConfig, CompressionPlan)):
        raise TypeError(f"cfg must be a PaluConfig or CompressionPlan, got {type(cfg).__name__}")
    if any(is_call(n, torch.ops.palu.latent_attention.default) for n in ep.graph.nodes):
        raise ValueError("this program is already compressed by palu-fx (it contains palu::latent_attention); "
                         "compress the original program instead")
    if any(s.kind.name == "BUFFER_MUTATION" for s in ep.graph_signature.output_specs):
        raise ValueError("this program is functionalized (run_decompositions() was called); "
                         "compress the program returned by torch.export.export, then decompose")


def analyze_exported(ep: ExportedProgram):
    """(sites, skipped, editor, graph module) of a copy of ``ep``; nothing is changed."""
    gm = _copy_graph_module(ep)
    editor = ProgramEditor(ep, gm.graph)
    sites, skipped = find_sites(gm.graph, editor.tensor, editor.is_param)
    return sites, skipped, editor, gm


def compress_exported(ep: ExportedProgram, cfg: Union[PaluConfig, CompressionPlan, None] = None, *,
                      grams: Optional[dict] = None) -> ExportedProgram:
    """Compress the KV cache of an exported decoder with Palu; returns a new program.

    Example::

        ep = palu_fx.export_decoder(model, max_cache_len=256)
        ep2 = palu_fx.compress_exported(ep, palu_fx.PaluConfig(rank_ratio=0.5, group_size=1))
        print(palu_fx.report(ep2))
    """
    _check_args(ep, cfg)
    sites, skipped, editor, gm = analyze_exported(ep)
    if isinstance(cfg, CompressionPlan):
        plan = cfg
        plan.check(sites)
    else:
        plan = make_plan(sites, editor.tensor, cfg or PaluConfig(), grams=grams)
    before = live_snapshot(gm.graph)
    rotary = RotaryCaches(editor)
    c = plan.config
    results = [rewrite_site(gm.graph, s, sp, editor, rotary, c.fold_values, c.bits, c.quant_group_size)
               for s, sp in zip(sites, plan.sites)]
    cleanup(gm.graph, old_writes(sites), before)
    new_ep = editor.build(gm)
    report = CompressionReport(plan.config, results, [SkipRecord(u.node.name, u.reason) for u in skipped],
                               cache_found=any(r.cached for r in results))
    new_ep.graph_module.meta["palu_report"] = report
    return new_ep
