"""The naive-loop oracle (SPEC §6) and `verify`, which checks the fast path against it.

The oracle trusts nothing but `transformers` itself: for each neuron it zeroes the neuron's
parameters in a copy of the sub-layer, re-runs that sub-layer on the very inputs (hidden states,
rotary embeddings, masks) it received during a normal forward pass, and measures the Frobenius
norm of the change where SPEC §2 says: the input of `o_proj` for q/k/v, the output of `o_proj`
for o, the output of the FFN for ffn; for the `probs` metric, ‖A − A'‖²_F of the attention
probabilities of the heads the neuron reaches.
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from neurolang.adapters import GROUPS, Layer, ModelAdapter
from neurolang.corpus import first_tokens, tokenize
from neurolang.errors import NeurolangError
from neurolang.impact import compute_impacts

# float64 is not 1e-9: `transformers` computes eager softmax in float32 whatever the dtype.
DEFAULT_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# What the oracle itself can resolve, as a fraction of the largest impact of a group: it measures
# ‖Y − Y'‖ by subtracting two outputs, so in float32 a neuron whose impact is 1e-5 of its group's
# largest is measured with ~1e-3 relative error by the oracle alone (float64 shows the fast path
# exact there). Below this floor errors are compared at the floor's scale.
RESOLUTION = {torch.float64: 1e-7, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# The same limit against the norm of the sub-layer's output ‖Y‖ (per sentence and layer): the
# subtraction leaves the oracle an absolute error of ~1e-6 ‖Y‖ in float32, and in float64 too for
# q/k (eager softmax runs in float32). Measured on Gemma-3-270M, layer 17: oracle − fast path up
# to 7e-7 ‖Y‖ with the fast path equal to a float64-softmax reference to 4e-13. Impacts below
# SCALE · ‖Y‖ are compared at that scale (an absolute error of tolerance · SCALE · ‖Y‖).
SCALE = {torch.float64: 2e-2, torch.float32: 2e-2, torch.bfloat16: 2e-1, torch.float16: 2e-1}


class _Stop(Exception):
    pass


@contextmanager
def _eager_attention(model):
    """Run with eager attention, whose modules return their probabilities (for `probs`)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _owned_parameters(module_copy, group: str, c: int):
    """The (tensor, index) pairs that neuron c of `group` owns in a copied sub-layer (SPEC §1)."""
    if group == "ffn":
        pairs = [(module_copy.gate_proj.weight, (c,)), (module_copy.up_proj.weight, (c,))]
        for lin in (module_copy.gate_proj, module_copy.up_proj):
            if lin.bias is not None:
                pairs.append((lin.bias, (c,)))
        return pairs
    if group == "o":
        return [(module_copy.o_proj.weight, (slice(None), c))]
    proj = getattr(module_copy, f"{group}_proj")
    pairs = [(proj.weight, (c,))]
    if proj.bias is not None:
        pairs.append((proj.bias, (c,)))
    return pairs


@contextmanager
def _zeroed(pairs):
    saved = [t[i].clone() for t, i in pairs]
    for t, i in pairs:
        t[i] = 0
    try:
        yield
    finally:
        for (t, i), s in zip(pairs, saved):
            t[i] = s


def _run_attention(attn, args, kwargs):
    """(input of o_proj, output of o_proj, attention probabilities) of one attention call."""
    seen = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0]))
    try:
        out, probs = attn(*args, **kwargs)
    finally:
        handle.remove()
    return seen["y"], out, probs


def oracle_impacts(adapter: ModelAdapter, input_ids: torch.Tensor, layers, neurons=None, metric: str = "output",
                   with_scale: bool = False):
    """Impacts of the given neurons by literally zeroing each one; one sentence, no padding.

    input_ids: [1, T]; neurons: {group: indices} (default: every neuron). Returns
    {layer: {group: float64 tensor [len(indices)]}}; the sub-layers run in the model's dtype.
    With `with_scale`, also {layer: {group: ‖Y‖}}, the norm of the output each group's change is
    measured on (the oracle's own precision is relative to it).
    """
    if input_ids.shape[0] != 1:
        raise ValueError("the oracle takes one sentence at a time, without padding")
    widths = adapter.widths()
    neurons = neurons or {g: range(widths[g]) for g in GROUPS}
    layers = sorted(set(layers))
    inputs: dict[int, dict] = {}

    def attn_pre(index):
        def hook(module, args, kwargs):
            inputs.setdefault(index, {})["attn"] = (args, kwargs)
        return hook

    def mlp_pre(index):
        def hook(module, args):
            inputs.setdefault(index, {})["mlp"] = args
            if index == layers[-1]:
                raise _Stop
        return hook

    handles = []
    for index in layers:
        layer = adapter.layers[index]
        handles.append(layer.attn.register_forward_pre_hook(attn_pre(index), with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(mlp_pre(index)))
    with torch.no_grad(), _eager_attention(adapter.model):
        try:
            adapter.decoder(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        per_layer = {i: _layer_oracle(adapter.layers[i], inputs[i], neurons, metric) for i in layers}
    impacts = {i: result for i, (result, _) in per_layer.items()}
    return (impacts, {i: scale for i, (_, scale) in per_layer.items()}) if with_scale else impacts


def _layer_oracle(layer: Layer, inputs, neurons, metric):
    attn = copy.deepcopy(layer.attn)
    mlp = copy.deepcopy(layer.mlp)
    args, kwargs = inputs["attn"]
    base_y, base_out, base_probs = _run_attention(attn, args, kwargs)
    base_ffn = mlp(*inputs["mlp"])
    norm = lambda x: float(torch.linalg.vector_norm(x.double()))  # noqa: E731
    scale = {"ffn": norm(base_ffn), "o": norm(base_out), "q": norm(base_y), "k": norm(base_y), "v": norm(base_y)}
    if metric == "probs":  # a squared norm of probabilities: only the largest-impact floor applies
        scale["q"] = scale["k"] = 0.0
    result = {}
    for group, indices in neurons.items():
        values = []
        for c in indices:
            owner = mlp if group == "ffn" else attn
            with _zeroed(_owned_parameters(owner, group, int(c))):
                if group == "ffn":
                    change = mlp(*inputs["mlp"]) - base_ffn
                else:
                    y, out, probs = _run_attention(attn, args, kwargs)
                    if group == "o":
                        change = out - base_out
                    elif group in ("q", "k") and metric == "probs":
                        values.append((probs.double() - base_probs.double()).square().sum())
                        continue
                    else:
                        change = y - base_y
            values.append(torch.linalg.vector_norm(change.double()))
        result[group] = torch.stack(values)
    return result, scale


@dataclass
class GroupCheck:
    group: str
    checked: int = 0
    worst_error: float = 0.0
    worst_at: tuple = ()  # (sentence, layer, neuron)


@dataclass
class VerifyReport:
    tolerance: float
    layers: list
    sentences: int
    groups: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.worst_error <= self.tolerance for g in self.groups.values())

    def table(self) -> str:
        lines = [f"{'group':<6}{'checks':>9}{'worst rel. error':>19}  at (sentence, layer, neuron)  verdict"]
        for g in self.groups.values():
            verdict = "ok" if g.worst_error <= self.tolerance else "FAIL"
            lines.append(f"{g.group:<6}{g.checked:>9}{g.worst_error:>19.2e}  {str(g.worst_at):<29} {verdict}")
        return "\n".join(lines)


def relative_errors(fast: torch.Tensor, oracle: torch.Tensor, floor: float) -> torch.Tensor:
    """|fast − oracle| / max(|oracle|, floor): relative, except for values tinier than `floor`."""
    return (fast.double() - oracle.double()).abs() / oracle.double().abs().clamp_min(floor)


def default_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


def verify(adapter: ModelAdapter, tokenizer, sentences, layers=None, neurons_per_group: int | None = 16,
           metric: str = "output", backend: str = "auto", tolerance: float | None = None,
           seed: int = 0, max_length: int = 256) -> VerifyReport:
    """Compare the fast path on a padded batch with the oracle on each sentence alone.

    Samples `neurons_per_group` neurons per group (None: all) with `seed`. The relative error
    of a neuron is taken against the oracle's value, or where larger against the scale the oracle
    can resolve: RESOLUTION[dtype] times the largest oracle value of its group, or SCALE[dtype]
    times the norm of the sub-layer output it is measured on (a neuron with next to no impact
    is compared at that scale rather than divided by almost zero).
    """
    dtype = next(adapter.model.parameters()).dtype
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if not tolerance >= 0:
        raise NeurolangError(f"--tolerance must be at least 0, got {tolerance}")
    layers = default_layers(adapter.n_layers) if layers is None else sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < adapter.n_layers]
    if bad:
        raise NeurolangError(f"layer {bad[0]} does not exist: the model has layers 0..{adapter.n_layers - 1}")
    gen = torch.Generator().manual_seed(seed)
    neurons = {}
    for group, width in adapter.widths().items():
        if neurons_per_group is None or neurons_per_group >= width:
            neurons[group] = torch.arange(width)
        else:
            neurons[group] = torch.randperm(width, generator=gen)[:neurons_per_group].sort().values
    device = next(adapter.model.parameters()).device
    ids, mask = tokenize(tokenizer, sentences, max_length, device)
    with _eager_attention(adapter.model):  # the oracle's implementation: same hidden states in both
        fast = compute_impacts(adapter, ids, mask, layers, metric=metric, backend=backend)
    report = VerifyReport(tolerance=tolerance, layers=layers, sentences=len(sentences),
                          groups={g: GroupCheck(g) for g in GROUPS})
    pairs = []
    for s in range(len(sentences)):
        oracle, scales = oracle_impacts(adapter, first_tokens(ids, mask, s), layers, neurons, metric, with_scale=True)
        for layer in layers:
            for group in GROUPS:
                pairs.append((s, layer, group, fast[layer][group][s, neurons[group]].cpu(), oracle[layer][group].cpu(),
                              scales[layer][group]))
    for group in GROUPS:
        rows = [p for p in pairs if p[2] == group]
        largest = max(float(p[4].abs().max()) for p in rows) * RESOLUTION[dtype]
        check = report.groups[group]
        for s, layer, _, f, o, output_norm in rows:
            err = relative_errors(f, o, max(largest, SCALE[dtype] * output_norm) or 1e-30)
            check.checked += len(err)
            worst = int(err.argmax())
            if float(err[worst]) > check.worst_error or not check.worst_at:
                check.worst_error = float(err[worst])
                check.worst_at = (s, layer, int(neurons[group][worst]))
    return report
