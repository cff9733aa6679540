"""Whole-prompt attribution graphs: every position, token embeddings, SAE errors and the decision.

The residual stream at layer l, position q is written exactly as its SAE reads it::

    h_l[q] = Σ_i f_{l,i}[q] · W_D[:, i] / s_l  +  b_D / s_l  +  e_l[q]        e_l = h_l − x̂_l (held fixed)

For an output y — a target's pre-activation at its position p, or the decision
logit(Bet) − logit(Stop) at the last position — one backward gives g_l[q] = ∂y/∂h_l[q] at every
layer and position at once, and with it the attribution of every node:

    feature (l, q, i):   f_{l,i}[q] · (W_D[:, i]/s_l · g_l[q])      activation × gradient
    error (l, q):        e_l[q] · g_l[q]
    embedding q:         x_emb[q] · ∂y/∂x_emb[q]

— circuit-tracer's link weight (positive raises y); pathflow's ``attribution`` (the first-order
effect of ablating the node) is its negative. A graph's weight on its outputs is more than that
(``output_weights``): the best estimate of −(y's change when the node is ablated). With
attribution.method "norm", every RMSNorm N at the node's position q in a layer above l responds
exactly to the ablation δ = −f·W_D[:, i]/s (``norm_correction``):

    Δy ≈ g_l[q]·δ + Σ_N ĝ_N·(N(x_N + δ) − N(x_N) − J_N δ)        ĝ_N = ∂y/∂N's output, same backward

and the ``replay_top`` strongest features of each output are then replayed (``replay_nodes``), their
weight the measured −Δy. Edges between two kept features stay first order. These are *total* effects through the model
(attention and MLPs included), so the weight of u → y already counts the paths through other
nodes. k outputs are k rows of one batch, each row a copy of the prompt: one backward serves k
outputs. At position p the rows equal the cached-prefix Jacobians of step 3 (tested).

A graph keeps the nodes whose influence on its outputs (the target and the decision, half each)
makes up ``node_threshold`` of the total (circuit-tracer's cumulative rule; embeddings and outputs
always stay); its edges are the attributions among the kept nodes — each kept feature is the
output of one more batched backward — pruned to ``edge_threshold`` of the edge influence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .jacobian import target_pre
from .model import capture_norm_inputs, decoder_layers, logit_difference, norm_reads, resid_hooks, rms_eps, run
from .sae import SAE

# -- one prompt's forward: what every graph on it shares ------------------------------------


@dataclass
class PromptState:
    """The SAE view of one prompt.

    ids:        [n]               token ids
    emb:        [n, d_model]      token embeddings (the model's input)
    acts:       {l: (pos [m], feature [m], value [m])}   the active SAE features of layer l
    err:        {l: [n, d_model]} e_l = h_l − x̂_l
    reads:      [R, n, d_model]   the input of every RMSNorm that reads the residual stream (``norm_reads``),
                                  for attribution.method "norm"; None for "gradient"
    read_layer: [R]               the decoder layer of each read (an edit of layer l reaches reads > l)
    read_gamma: [R, d_model], read_eps: [R]   each read's scale and ε
    first:      positions before it are not nodes (features or errors): circuit-tracer's zero_bos
    """

    ids: list[int]
    emb: torch.Tensor
    acts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    err: dict[int, torch.Tensor]
    reads: torch.Tensor | None = None
    read_layer: torch.Tensor | None = None
    read_gamma: torch.Tensor | None = None
    read_eps: torch.Tensor | None = None
    first: int = 0

    _by_position: dict = field(default_factory=dict, repr=False)

    def by_position(self, l: int, sae: SAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer l's active entries in blocks of one position each, for one matmul per block (cached).

        A position holds up to thousands of entries (BOS) where most hold about the mean, so a position
        takes as many blocks of c = the mean count as it needs; the blocks are ordered by their rank within
        their position, then by position. Returns (block_pos [b] — each block's
        position; dec [b, d_model, c] — column j of a block is its entry j's f·W_D[:, i]/s, zero past the
        last; slot [m] — entry e's index in the flattened [b, c])."""
        if l not in self._by_position:
            pos, feat, val = self.acts[l]
            n = len(self.ids)
            counts = torch.bincount(pos, minlength=n)
            c = max(1, -(-len(pos) // n))
            blocks = -(-counts // c)  # per position
            # blocks in order of their rank within their position, then position: each rank's blocks sit
            # at increasing positions, so a run of them reads a slice of a per-position tensor, not a gather
            has = blocks[None, :] > torch.arange(int(blocks.max()) if len(pos) else 0, device=pos.device)[:, None]
            before = torch.cumsum(has.sum(1), 0) - has.sum(1)  # [ranks] the first block of each rank
            nth = torch.cumsum(has, 1) - 1  # [ranks, n] a position's index among that rank's
            block_pos = torch.nonzero(has)[:, 1]  # row-major: rank, then position
            rank = torch.arange(len(pos), device=pos.device) - (torch.cumsum(counts, 0) - counts)[pos]  # sorted
            slot = (before[rank // c] + nth[rank // c, pos]) * c + rank % c
            dec = torch.zeros(len(block_pos) * c, sae.d_model, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            dec[slot] = (sae.W_dec[:, feat] * (val / sae.scale)).T
            self._by_position[l] = (block_pos, dec.view(len(block_pos), c, -1).transpose(1, 2), slot)
        return self._by_position[l]

    @functools.cached_property
    def reads_by_position(self) -> torch.Tensor:
        """``reads`` as [n, R, d_model] (contiguous): one position's reads are one slice."""
        return self.reads.permute(1, 0, 2).contiguous()

    @functools.cached_property
    def activations(self) -> dict[tuple, float]:
        """{("f", layer, position, feature): activation} of every active entry."""
        out = {}
        for l, (pos, feat, val) in self.acts.items():
            out.update({("f", l, q, i): v for q, i, v in zip(pos.tolist(), feat.tolist(), val.tolist())})
        return out


@torch.no_grad()
def prompt_state(model, saes: dict[int, SAE], input_ids: torch.Tensor, norms: bool = False,
                 first: int = 0) -> PromptState:
    """Run ``input_ids`` [1, n] once; encode every layer in ``saes`` at every position. With ``norms``,
    also keep every RMSNorm read's input (the whole forward runs, for the final norm). Positions before
    ``first`` hold no feature nodes (``bos_positions``); their errors are kept as computed, for splices."""
    layers = sorted(saes)
    emb = model.get_input_embeddings()(input_ids)[0]
    reads = norm_reads(model) if norms else []
    with resid_hooks(model, capture=set(layers), stop_after=None if norms else max(layers)) as hs, \
            capture_norm_inputs(model, reads) as xs:
        run(model, input_ids)
    acts, err = {}, {}
    for l in layers:
        h = hs[l][0].to(saes[l].W_enc.dtype)  # [n, d_model]
        f = saes[l].encode(h)  # [n, d_sae]
        err[l] = h - saes[l].decode(f)
        f[:first] = 0
        pos, feat = f.nonzero(as_tuple=True)
        acts[l] = (pos, feat, f[pos, feat])
    state = PromptState(ids=input_ids[0].tolist(), emb=emb, acts=acts, err=err, first=first)
    if norms:
        state.reads = torch.stack([x[0].float() for x in xs])
        state.read_layer = torch.tensor([k for _, k in reads], device=emb.device)
        state.read_gamma = torch.stack([m.weight.detach().float() for m, _ in reads])
        state.read_eps = torch.tensor([rms_eps(m) for m, _ in reads], device=emb.device)
    return state


# -- outputs and their gradients -------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """What a row of the batched backward differentiates: a feature's pre-activation at a
    position (``feature`` ≥ 0) or, with ``bet``/``stop`` token ids, the decision logit difference at
    the last position."""

    layer: int  # the feature's layer; for the decision, the model's layer count
    feature: int = -1
    pos: int = -1
    bet: int = -1
    stop: int = -1

    @property
    def is_decision(self) -> bool:
        return self.feature < 0


def decision_output(model, bet: int, stop: int, n_tokens: int) -> Output:
    return Output(layer=len(decoder_layers(model)), pos=n_tokens - 1, bet=bet, stop=stop)


@dataclass
class Gradients:
    """∂y_r/∂(everything) for k outputs, as rows.

    value: [k]                 each output's value
    resid: {l: [k, n, d_model]} ∂y_r/∂h_l for the layers below the outputs
    emb:   [k, n, d_model]      ∂y_r/∂x_emb
    reads: [k, R, n, d_model]   ∂y_r/∂(the output of each RMSNorm read), for attribution.method "norm"; else None
    """

    outputs: list[Output]
    value: torch.Tensor
    resid: dict[int, torch.Tensor]
    emb: torch.Tensor
    reads: torch.Tensor | None = None


def output_gradients(model, saes: dict[int, SAE], input_ids: torch.Tensor, outputs: list[Output],
                     vmap: bool = True, norms: bool = False) -> Gradients:
    """∂y_r/∂(everything) for k = len(outputs) outputs of ``input_ids`` [1, n].

    With ``vmap``, one forward of the prompt and k backwards batched by autograd's vmap
    (``is_grads_batched``): the forward is not repeated per output. Without, the forward runs on k
    copies of the prompt and one backward serves them all (row r differentiates ``outputs[r]``).
    Either way the backward's memory grows with k · n (the batch to halve on OOM). With ``norms``, also
    the gradient at every RMSNorm read's output (``Gradients.reads``; zero for a read that did not run)."""
    fwd = Forward(model, input_ids, outputs, copies=1 if vmap else len(outputs), norms=norms)
    return fwd.gradients(saes, outputs)


class Forward:
    """One forward of a prompt [1, n] kept with its autograd graph, for backwards of any outputs it covers
    (layers ≤ the ``outputs``' highest, positions ≤ their last): ``gradients`` with ``retain`` may run many
    times on it, each row's backward as long as without the others (autograd walks only what reaches the
    outputs asked for). ``copies`` > 1: the prompt as that many rows, row r for ``outputs[r]`` (no vmap)."""

    def __init__(self, model, input_ids: torch.Tensor, outputs: list[Output], copies: int = 1,
                 norms: bool = False) -> None:
        self.model, self.copies, self.n = model, copies, input_ids.shape[1]
        self.n_layers = len(decoder_layers(model))
        top = max(o.layer for o in outputs)  # the highest layer any row needs
        capture = set(range(min(top, self.n_layers))) | {o.layer for o in outputs if not o.is_decision}
        stop_after = None if any(o.is_decision for o in outputs) else top
        # no output depends on a later position (causal mask): run only up to the last output's
        self.upto = max(o.pos % self.n for o in outputs) + 1
        self.reads = norm_reads(model) if norms else []
        with torch.enable_grad(), resid_hooks(model, capture=capture | ({self.n_layers - 1} if stop_after is None
                                                                         else set()),
                                              stop_after=stop_after, grad_from_embeddings=True) as hs, \
                capture_norm_inputs(model, self.reads, outputs=True) as outs:
            run(model, input_ids[:, :self.upto].expand(copies, -1))
        self.hs, self.outs = hs, outs

    def gradients(self, saes: dict[int, SAE], outputs: list[Output], retain: bool = False) -> Gradients:
        """The ``Gradients`` of ``outputs`` (row r seeded with output r alone); ``retain`` keeps the graph."""
        hs, outs, n, n_layers = self.hs, self.outs, self.n, self.n_layers
        k, vmap = len(outputs), self.copies == 1
        up = list(range(min(max(o.layer for o in outputs), n_layers)))
        with torch.enable_grad():
            values = []
            for r, o in enumerate(outputs):
                row = 0 if vmap else r
                if o.is_decision and self.reads and outs[-1] is not None:  # through the final norm's captured output
                    w = self.model.get_output_embeddings().weight
                    values.append(outs[-1][row, o.pos] @ (w[o.bet] - w[o.stop]).to(outs[-1].dtype))
                elif o.is_decision:
                    values.append(logit_difference(self.model, hs[n_layers - 1][row, o.pos], o.bet, o.stop))
                else:
                    sae = saes[o.layer]
                    values.append(target_pre(sae, hs[o.layer][row, o.pos][None].to(sae.W_enc.dtype), [o.feature])[0])
            value = torch.stack(values)
            ran = [j for j, o in enumerate(outs) if o is not None]
            wrt = [hs["emb"], *(hs[l] for l in up), *(outs[j] for j in ran)]
            if vmap:  # row r of the batched backward is seeded with output r alone: [k, 1, upto, d_model] each
                seeds = torch.eye(k, dtype=value.dtype, device=value.device)
                grads = [None if g is None else g[:, 0] for g in
                         torch.autograd.grad(value, wrt, grad_outputs=seeds, is_grads_batched=True,
                                             allow_unused=True, retain_graph=retain)]
            else:  # rows are independent copies: d(Σ y)/d(row r's tensors) is y_r's own gradient
                grads = list(torch.autograd.grad(value.sum(), wrt, allow_unused=True, retain_graph=retain))
        pad = (0, 0, 0, n - self.upto)  # the positions after ``upto`` get a zero gradient: [k, n, d_model] throughout
        shape = (k, self.upto, hs["emb"].shape[-1])
        emb_g, *rest = [torch.nn.functional.pad(g if g is not None else hs["emb"].new_zeros(shape), pad).detach()
                        for g in grads]
        resid_g, read_g = rest[:len(up)], rest[len(up):]
        read_t = None
        if self.reads:  # [k, R, n, d_model], zeros for the reads above the highest output
            read_t = hs["emb"].new_zeros((k, len(self.reads), n, shape[-1]), dtype=torch.float32)
            for j, g in zip(ran, read_g):
                read_t[:, j] = g.float()
        return Gradients(outputs=list(outputs), value=value.detach().float(), resid=dict(zip(up, resid_g)),
                         emb=emb_g, reads=read_t)


# -- node attributions -----------------------------------------------------------------------


@dataclass
class NodeWeights:
    """Activation × gradient of every node for each row of a ``Gradients``.

    feature:  {l: [k, m_l]}   aligned with ``PromptState.acts[l]`` (with ``Gradients.reads``: the norm method's)
    error:    {l: [k, n]}
    emb:      [k, n]
    gradient: {l: [k, m_l]}   activation × gradient, first order (the same as ``feature`` without reads)
    Entries a row's output cannot depend on (a layer at or above it, a later position) are 0.
    """

    feature: dict[int, torch.Tensor]
    error: dict[int, torch.Tensor]
    emb: torch.Tensor
    gradient: dict[int, torch.Tensor] = field(default_factory=dict)


def node_weights(state: PromptState, saes: dict[int, SAE], grads: Gradients) -> NodeWeights:
    feature, error, first = {}, {}, {}
    device = grads.emb.device
    layer_of = torch.tensor([o.layer for o in grads.outputs], device=device)
    pos_of = torch.tensor([o.pos for o in grads.outputs], device=device)
    n = len(state.ids)
    rg = read_gradients(state, grads.reads) if grads.reads is not None and state.reads is not None else None
    for l, g in grads.resid.items():
        if l not in state.acts:
            continue  # a layer no graph on this prompt reaches
        sae = saes[l]
        g = g.to(sae.W_dec.dtype)
        pos = state.acts[l][0]
        # (g_l[q] · W_D[:, i] / s) f for the active (q, i) only, a matmul per block of a position: [b, k, c] -> [k, m]
        block_pos, dec, slot = state.by_position(l, sae)
        w = torch.bmm(g[:, block_pos].transpose(0, 1), dec).transpose(0, 1).reshape(g.shape[0], -1)[:, slot]
        live = (layer_of[:, None] > l) & (pos[None, :] <= pos_of[:, None])
        first[l] = torch.where(live, w, torch.zeros_like(w)).float()
        if rg is not None:  # attribution.method "norm"
            w = w - norm_correction(state, rg, l, block_pos, dec).transpose(0, 1).reshape(
                g.shape[0], -1)[:, slot].to(w.dtype)
            feature[l] = torch.where(live, w, torch.zeros_like(w)).float()
        else:
            feature[l] = first[l]
        e = (g * state.err[l][None]).sum(-1)  # [k, n]
        q = torch.arange(n, device=device)[None]
        error[l] = torch.where((layer_of[:, None] > l) & (q <= pos_of[:, None]) & (q >= state.first), e,
                               torch.zeros_like(e)).float()
    emb = (grads.emb * state.emb[None].to(grads.emb.dtype)).sum(-1).float()
    return NodeWeights(feature=feature, error=error, emb=emb, gradient=first)


@dataclass
class ReadGradients:
    """One batch's gradients at the RMSNorm reads, laid out by position for ``norm_correction``.

    hg: [n, R, k, D]  ĝ ⊙ γ (ĝ = ∂y/∂ the read's output) at every position, read and row
    u:  [n, R, k]     ⟨ĝ ⊙ γ, x⟩ (x the read's input)
    """

    hg: torch.Tensor
    u: torch.Tensor


def read_gradients(state: PromptState, greads: torch.Tensor) -> ReadGradients:
    """``Gradients.reads`` [k, R, n, D] arranged once per batch, so that each layer's correction only slices it."""
    hg = (greads * state.read_gamma[None, :, None, :].to(greads.dtype)).permute(2, 1, 0, 3).contiguous()
    return ReadGradients(hg=hg, u=torch.einsum("nrkd,nrd->nrk", hg, state.reads_by_position.to(hg.dtype)))


def norm_correction(state: PromptState, rg: ReadGradients, l: int, block_pos: torch.Tensor,
                    dec: torch.Tensor) -> torch.Tensor:
    """What the RMSNorms at a node's own position add to the gradient's estimate of its ablation.

    Ablating entry (l, q, i) adds δ = −f·W_D[:, i]/s to h_l[q]; every RMSNorm N(x) = γ ⊙ x / rms(x)
    at position q in a layer above l reads x + δ. The gradient takes each read as linear,
    ⟨ĝ, J δ⟩ (ĝ = ∂y/∂N's output); here each read's response is exact, ⟨ĝ, N(x + δ) − N(x)⟩, and
    everything beyond the reads stays linear. Returns Σ_reads (exact − linear), which is added to the
    gradient's predicted change: [b, k, c] for ``PromptState.by_position``'s blocks (``dec`` [b, d, c]
    holds f·W_D/s = −δ). A small δ changes little (second order); a feature that dominates its
    position's norm — where the gradient along it cancels — gets its real first effect.

    With u = ⟨ĝ⊙γ, x⟩, a = ⟨ĝ⊙γ, δ⟩, r² = mean(x²) + ε, r'² = r² + Δ, Δ = (2⟨x, δ⟩ + |δ|²)/D:
    exact − linear = a·(1/r' − 1/r) + u·(Δ²(r' + 2r) / (2r³r'(r + r')²) − |δ|²/(2Dr³)), written without
    the cancellation of two first-order terms."""
    j0 = int(torch.searchsorted(state.read_layer, l, right=True))  # reads are in forward order: > l is a tail
    n, R, k, D = rg.hg.shape
    Rl, b = R - j0, len(block_pos)
    dec = dec.to(rg.hg.dtype)
    X = state.reads_by_position[block_pos, j0:].to(dec.dtype)  # [b, R', D]
    xd = torch.bmm(X, dec)  # [b, R', c]  ⟨x, −δ⟩
    hd = dec.new_empty(b, Rl * k, dec.shape[-1])  # ⟨ĝγ, −δ⟩ for each read (above l) and row
    for g0, g1 in _runs(block_pos):  # a run of blocks at increasing positions: a slice where they are consecutive
        at = block_pos[g0:g1]
        lo, hi = int(at[0]), int(at[-1]) + 1
        H = rg.hg[lo:hi, j0:] if hi - lo == g1 - g0 else rg.hg[at, j0:]
        torch.bmm(H.reshape(g1 - g0, Rl * k, D), dec[g0:g1], out=hd[g0:g1])
    hd = hd.view(b, Rl, k, -1)
    dd = dec.pow(2).sum(1)[:, None]  # [b, 1, c]  |δ|²
    r2b = (X.pow(2).mean(-1) + state.read_eps[j0:].to(dec.dtype))[..., None]  # [b, R', 1]
    delta = (dd - 2 * xd) / D  # [b, R', c]
    r, rn = r2b.sqrt(), (r2b + delta).clamp(min=1e-30).sqrt()
    t = -delta / (r * rn * (r + rn))  # 1/r' − 1/r
    B = delta.pow(2) * (rn + 2 * r) / (2 * r.pow(3) * rn * (r + rn).pow(2)) - dd / (2 * D * r.pow(3))
    # Σ_reads −⟨ĝγ, −δ⟩·t + u·B: the first elementwise (t varies with the entry), the second a matmul
    return torch.bmm(rg.u[block_pos, j0:].transpose(1, 2), B) - (hd * t[:, :, None]).sum(1)  # [b, k, c]


def _runs(block_pos: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of ``block_pos`` [b] at increasing positions (``PromptState.by_position``'s order)."""
    if not len(block_pos):
        return []
    cut = (torch.nonzero(block_pos[1:] <= block_pos[:-1]).flatten() + 1).tolist()
    return list(zip([0, *cut], [*cut, len(block_pos)]))


def dense_jacobian(grads: Gradients, saes: dict[int, SAE], row: int, layer: int, pos: int) -> torch.Tensor:
    """∂y_row/∂f_layer[pos] for every feature of that SAE [d_sae] (step 3's ``grad`` at one position)."""
    sae = saes[layer]
    return (grads.resid[layer][row, pos].to(sae.W_dec.dtype) @ sae.W_dec) / sae.scale


# -- pruning, as circuit-tracer prunes --------------------------------------------------------


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the largest scores make up ``threshold`` of their sum (circuit-tracer's
    ``find_threshold``)."""
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)).item()), len(s) - 1)
    return s[i]


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Each node's place in the cumulative influence: the sum of the influence of every node at
    least as influential, over the total (the most influential node has the smallest value; a
    page that keeps ``influence <= t`` keeps the nodes making up a fraction t)."""
    s, order = torch.sort(influence, descending=True)
    out = torch.zeros_like(influence)
    out[order] = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    return out


def prune(influence: torch.Tensor, always: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask of the nodes making up ``threshold`` of the total influence, plus ``always``."""
    if len(influence) == 0:
        return always.clone()
    return (influence >= find_threshold(influence, threshold)) | always


# -- one target's graph on one prompt ---------------------------------------------------------

Key = tuple  # ("f", layer, pos, feature) | ("e", layer, pos) | ("E", pos) | ("t",) | ("D",)


@dataclass
class Target:
    """A graph's target: SAE feature ``feature`` of ``layer`` at position ``pos``; ``name`` L{layer}-{id}."""

    name: str
    layer: int
    feature: int
    pos: int

    def output(self) -> Output:
        return Output(layer=self.layer, feature=self.feature, pos=self.pos)


def select_candidates(t: torch.Tensor, d: torch.Tensor, always: torch.Tensor, node_threshold: float,
                      max_nodes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Node selection over c candidates as tensors: ``t``, ``d`` [c] their weights on the target and the
    decision, ``always`` [c] the candidates kept whatever their influence (embeddings). Returns
    (keep [c] bool, cumulative influence [c], influence [c]), float64.

    A node's influence is its share of the target's total |weight| plus its share of the
    decision's, half each (the two outputs, as circuit-tracer weighs its logits)."""
    t, d = t.double().abs(), d.double().abs()
    infl = 0.5 * t / t.sum().clamp(min=1e-30) + 0.5 * d / d.sum().clamp(min=1e-30)
    keep = prune(infl, always, node_threshold)
    if max_nodes is not None and int((keep & ~always).sum()) > max_nodes:  # the most influential only
        cut = torch.sort(infl[keep & ~always], descending=True).values[max_nodes - 1]
        keep &= (infl >= cut) | always
    return keep, cumulative_influence(infl), infl


def select_nodes(to_target: dict[Key, float], to_decision: dict[Key, float], node_threshold: float,
                 max_nodes: int | None = None) -> tuple[list[Key], dict[Key, float], dict[Key, float]]:
    """``select_candidates`` over nodes named by keys: (the kept nodes, every candidate's cumulative
    influence, its influence)."""
    keys = sorted(set(to_target) | set(to_decision))
    if not keys:
        return [], {}, {}
    t = torch.tensor([to_target.get(k, 0.0) for k in keys], dtype=torch.float64)
    d = torch.tensor([to_decision.get(k, 0.0) for k in keys], dtype=torch.float64)
    keep, cum, infl = select_candidates(t, d, torch.tensor([k[0] == "E" for k in keys]), node_threshold, max_nodes)
    return ([k for k, m in zip(keys, keep.tolist()) if m], {k: float(c) for k, c in zip(keys, cum.tolist())},
            {k: float(v) for k, v in zip(keys, infl.tolist())})


def prune_edges(edges: dict[tuple[Key, Key], float], node_influence: dict[Key, float],
                edge_threshold: float) -> dict[tuple[Key, Key], float]:
    """circuit-tracer's edge rule: an edge's score is its share of its target's incoming |weight|
    times that target's influence; keep the edges making up ``edge_threshold`` of the score."""
    if not edges:
        return {}
    incoming: dict[Key, float] = {}
    for (_, dst), w in edges.items():
        incoming[dst] = incoming.get(dst, 0.0) + abs(w)
    items = list(edges.items())
    score = torch.tensor([abs(w) / max(incoming[dst], 1e-30) * node_influence.get(dst, 0.0)
                          for (_, dst), w in items], dtype=torch.float64)
    keep = score >= find_threshold(score, edge_threshold)
    return {e: w for (e, w), m in zip(items, keep.tolist()) if m}


def drop_dangling(nodes: set[Key], edges: dict[tuple[Key, Key], float]) -> tuple[set[Key], dict]:
    """Drop feature and error nodes without an outgoing edge (they reach no output), and their
    edges, until none is left (circuit-tracer's final pass)."""
    while True:
        sources = {s for s, _ in edges}
        dead = {k for k in nodes if k[0] in ("f", "e") and k not in sources}
        if not dead:
            return nodes, edges
        nodes = nodes - dead
        edges = {(s, d): w for (s, d), w in edges.items() if s in nodes and d in nodes}


@dataclass
class Graph:
    """One target's pruned graph on one prompt; weights are activation × gradient."""

    target: Target
    nodes: set[Key]
    edges: dict[tuple[Key, Key], float]
    influence: dict[Key, float]  # cumulative influence of the candidates
    activation: dict[Key, float]
    target_pre: float
    decision: float
    decision_gradient: float  # ∂decision/∂f_target at the target's position
    replay: dict | None = None  # {feature node: {"predicted", "actual", "decision"}}: each kept feature ablated
    scores: dict | None = None  # how much it explains (``scores``): completeness, circuit-tracer's, faithfulness
    decision_change: float | None = None  # Δdecision, measured, when the target is ablated at its token


class FlatNodes:
    """Every node of one prompt as one index space, in ``_flat``'s order: the active SAE entries
    (layers in order), then the SAE errors [layer, position], then the embeddings [position].

    layer, pos: [N]  each node's layer (−1 for embeddings) and position;  kind: "f" | "e" | "E" by range.
    f_feat, f_index: [m]  each feature node's SAE feature and its index in its layer's ``PromptState.acts``.
    A row of node weights over this space is a tensor [N]: selection and edges are gathers on it, so
    nothing is kept per (node × active entry) as Python objects."""

    def __init__(self, state: PromptState) -> None:
        layers = sorted(state.acts)
        n = len(state.ids)
        self.layers, self.n = layers, n
        f_layer = torch.cat([torch.full((len(state.acts[l][0]),), l) for l in layers]) if layers else torch.zeros(0)
        f_pos = torch.cat([state.acts[l][0].cpu() for l in layers]) if layers else torch.zeros(0)
        self.f_feat = torch.cat([state.acts[l][1].cpu() for l in layers]).long() if layers else torch.zeros(0).long()
        # each feature node's index in its layer's ``PromptState.acts`` entries
        self.f_index = torch.cat([torch.arange(len(state.acts[l][0])) for l in layers]) if layers else \
            torch.zeros(0).long()
        self.m = len(f_layer)
        e_layer = torch.tensor(layers).repeat_interleave(n)
        e_pos = torch.arange(n).repeat(len(layers))
        self.layer = torch.cat([f_layer.long(), e_layer.long(), torch.full((n,), -1)])
        self.pos = torch.cat([f_pos.long(), e_pos.long(), torch.arange(n)])
        self.size = len(self.layer)
        self.is_feature = torch.arange(self.size) < self.m

    def key(self, i: int) -> Key:
        if i < self.m:
            return ("f", int(self.layer[i]), int(self.pos[i]), int(self.f_feat[i]))
        if i < self.m + len(self.layers) * self.n:
            return ("e", int(self.layer[i]), int(self.pos[i]))
        return ("E", int(self.pos[i]))

    def allowed(self, below: int, upto: int) -> torch.Tensor:
        """[N] the nodes an output of layer ``below`` at position ``upto`` can depend on."""
        return (self.layer < below) & (self.pos <= upto)

    def is_embedding(self) -> torch.Tensor:
        return self.layer < 0


def _vec(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """A row from ``_flat`` as one vector over ``FlatNodes`` [N]."""
    return torch.cat([f["weight"], f["error"].flatten(), f["embedding"]])


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def prompt_graphs(model, saes: dict[int, SAE], input_ids: torch.Tensor, targets: list[Target], bet: int, stop: int,
                  node_threshold: float = 0.8, edge_threshold: float = 0.98, max_nodes: int | None = None,
                  batch_size: int = 8, method: str = "gradient",
                  replay_top: int = 0, first: int = 0) -> tuple[PromptState, list[Graph], dict]:
    """Every target's graph on one prompt ``input_ids`` [1, n]. ``saes``: every layer up to the
    highest target's. The outputs' weights over every node (``output_weights``: ``method``, then the
    ``replay_top`` strongest features of each output replayed and ranked by their measured change),
    a graph per target pruned on them, the edges between its kept nodes (a batched backward per kept
    feature, each once however many graphs share it) and the kept nodes' replays. Also returns every
    target's (and the decision's) weights over all active entries, unpruned, on the CPU
    (``sparse_arrays``). Positions before ``first`` hold no nodes but the embedding (``bos_positions``)."""
    state, flat, dec, dense, values, replayed = output_weights(model, saes, input_ids, targets, bet, stop, method,
                                                               replay_top, batch_size, first)
    acts = state.activations
    embedding = flat.is_embedding()
    dec_vec = _vec(dense["decision"])
    pending = []  # per target: what its graph needs of its candidates, for its kept nodes only
    for t, pre, row in zip(targets, values, dense["targets"]):
        vec = _vec(row)
        allowed = flat.allowed(t.layer, t.pos)
        # the candidates: active features with a weight on either output, every error and embedding
        cand = torch.nonzero(allowed & (~flat.is_feature | (vec != 0) | (dec_vec != 0))).flatten()
        keep, cum, infl = select_candidates(vec[cand], dec_vec[cand], embedding[cand], node_threshold, max_nodes)
        kept_idx = cand[keep]
        kept = [flat.key(int(i)) for i in kept_idx]
        named = cand[keep | embedding[cand]]  # the kept nodes and every embedding carry an influence
        pending.append((t, pre, kept, kept_idx,
                        {flat.key(int(i)): float(c) for i, c in zip(named, cum[keep | embedding[cand]])},
                        {k: float(v) for k, v in zip(kept, infl[keep])},
                        vec[kept_idx].tolist(), dec_vec[kept_idx].tolist()))
    # the incoming weights of every kept feature, each computed once, from the kept nodes only
    # by position, then layer: a batch's backward runs only up to its last position and layer
    inner = sorted({k for p in pending for k in p[2] if k[0] == "f"}, key=lambda k: (k[2], k[1], k[3]))
    pool = torch.tensor(sorted({int(i) for p in pending for i in p[3]}), dtype=torch.long)
    pool_keys = [flat.key(int(i)) for i in pool]
    incoming: dict[Key, dict[Key, float]] = {}
    for chunk, w in _pool_weights(model, saes, input_ids, state, flat, pool, inner, batch_size):
        for k, into in zip(chunk, w.tolist()):
            incoming[k] = {u: v for u, v in zip(pool_keys, into) if v}
    # every kept feature is judged by replay: those the ranking did not measure yet
    # and each target itself, for its own measured effect on the decision (one row per target)
    own = {t.name: ("f", t.layer, t.pos, t.feature) for t in targets
           if acts.get(("f", t.layer, t.pos, t.feature), 0.0)}
    replayed.update(replay_nodes(model, saes, input_ids, state,
                                 list(dict.fromkeys(k for k in [*inner, *own.values()] if k not in replayed)), targets,
                                 (bet, stop), batch_size))
    graphs = []
    decision = float(dec.value[0])
    for t, pre, kept, _, cum, infl, w_t, w_d in pending:
        T, D = ("t",), ("D",)
        nodes = set(kept)
        to_t = dict(zip(kept, w_t))
        edges: dict[tuple[Key, Key], float] = {}
        for k, wt, wd in zip(kept, w_t, w_d):
            if wt:
                edges[(k, T)] = wt
            if wd:
                edges[(k, D)] = wd
            for u, w in incoming.get(k, {}).items():
                if u in nodes and w:
                    edges[(u, k)] = w
        a_t = acts.get(("f", t.layer, t.pos, t.feature), 0.0)
        sae = saes[t.layer]  # ∂decision/∂f_target: one column of W_D, not the whole row of dense_jacobian
        d_grad = float(dec.resid[t.layer][0, t.pos].to(sae.W_dec.dtype) @ sae.W_dec[:, t.feature]) / sae.scale
        own_change = replayed[own[t.name]]["decision"] if t.name in own else None
        if own_change:  # −Δdecision measured when the target is ablated; a first-order estimate only if not
            edges[(T, D)] = -own_change
        elif own_change is None and a_t * d_grad:
            edges[(T, D)] = a_t * d_grad
        # the two outputs weigh half each; a kept node weighs its influence on them
        weight_of = {T: 0.5, D: 0.5, **infl}
        edges = prune_edges(edges, weight_of, edge_threshold)
        nodes, edges = drop_dangling(nodes | {T, D}, edges)
        # the estimate's predicted change (−weight before any replay) against the measured one
        judged = {k: {"predicted": replayed[k].get("predicted", {}).get(t.name, -to_t.get(k, 0.0)),
                      "actual": replayed[k]["target"].get(t.name, 0.0),
                      "decision": replayed[k]["decision"]} for k in nodes if k in replayed}
        graphs.append(Graph(target=t, nodes=nodes, edges=edges, influence=cum, activation=acts, target_pre=pre,
                            decision=decision, decision_gradient=d_grad, replay=judged, decision_change=own_change))
    _score(model, saes, input_ids, state, flat, graphs, dense, (bet, stop))
    return state, graphs, dense


def _score(model, saes, input_ids, state: PromptState, flat: FlatNodes, graphs: list[Graph], dense: dict,
           decision: tuple[int, int]) -> None:
    """Each graph's ``scores``: completeness of its target's and the decision's attribution (unpruned),
    circuit-tracer's replacement and completeness of the pruned graph, and its faithfulness."""
    from . import scores

    layers = sorted(state.acts)
    layer_of = flat.layer[:flat.m]
    faith = scores.faithfulness(model, saes, input_ids, state.err, graphs, decision, state.first) if graphs else []
    dec_c = scores.completeness(dense["decision"], layer_of, layers)
    for g, row, f in zip(graphs, dense["targets"], faith):
        g.scores = {"completeness": {"target": scores.completeness(row, layer_of, layers), "decision": dec_c},
                    "circuit_tracer": scores.graph_scores(g.edges), "faithfulness": f}


def output_weights(model, saes: dict[int, SAE], input_ids: torch.Tensor, targets: list[Target], bet: int, stop: int,
                   method: str = "gradient", replay_top: int = 0, batch_size: int = 8, first: int = 0):
    """Every target's and the decision's weight on every node of one prompt, the best estimate of
    each node's real effect: ``method`` ("gradient": activation × gradient; "norm": the same with the
    RMSNorms at the node's own position exact, ``norm_correction``), then the ``replay_top``
    strongest features of each output (by |weight|) ablated in replay (``replay_nodes``), their
    weight set to minus the measured change. A weight is thus −(the change of the output when the
    node is ablated): measured where ``dense["replayed"]`` says so, estimated elsewhere.

    Returns (state, FlatNodes, the decision's Gradients, dense — {"targets": [row], "decision": row,
    "replayed": [m] bool, "value": [k] the targets' values, "decision_value"}, the targets' values [k], the
    replays {node: {"target", "decision"}})."""
    if method not in ("gradient", "norm"):
        raise ValueError(f"attribution method {method!r}: use 'gradient' or 'norm'")
    norms = method == "norm"
    state = prompt_state(model, saes, input_ids, norms=norms, first=first)
    n = len(state.ids)
    flat = FlatNodes(state)
    dec = output_gradients(model, saes, input_ids, [decision_output(model, bet, stop, n)], norms=norms)
    dense: dict = {"targets": [], "decision": _flat_rows(node_weights(state, saes, dec), state)[0]}
    values: list[float] = []
    for _, (value, rows) in _weights(model, saes, input_ids, state, targets, lambda t: t.output(), batch_size, norms):
        dense["targets"].extend(rows)
        values.extend(value.tolist())
    replayed: dict[Key, dict] = {}
    measured = torch.zeros(flat.m, dtype=torch.bool)
    if replay_top > 0 and flat.m:
        picks: set[int] = set()
        for t, row in [*zip(targets, dense["targets"]), (None, dense["decision"])]:
            score = row["weight"].abs()
            if t is not None:  # only what the target can depend on
                score = torch.where(flat.allowed(t.layer, t.pos)[:flat.m], score, torch.zeros_like(score))
            top = torch.topk(score, min(replay_top, flat.m))
            picks.update(int(i) for i, v in zip(top.indices, top.values) if v > 0)
        idx = torch.tensor(sorted(picks), dtype=torch.long)
        keys = [flat.key(int(i)) for i in idx]
        replayed = replay_nodes(model, saes, input_ids, state, sorted(keys, key=lambda k: (k[2], k[1], k[3])),
                                targets, (bet, stop), batch_size)
        for row in [*dense["targets"], dense["decision"]]:  # "gradient" keeps the first-order weights
            row["weight"] = row["weight"].clone()
        for t, row in zip(targets, dense["targets"]):
            for k, est in zip(keys, (-row["weight"][idx]).tolist()):  # the estimate replay is judged against
                replayed[k].setdefault("predicted", {})[t.name] = est
            row["weight"][idx] = -torch.tensor([replayed[k]["target"].get(t.name, 0.0) for k in keys])
        dense["decision"]["weight"][idx] = -torch.tensor([replayed[k]["decision"] for k in keys])
        measured[idx] = True
    dense["replayed"] = measured
    dense["value"] = torch.tensor(values, dtype=torch.float32)
    dense["decision_value"] = float(dec.value[0])
    return state, flat, dec, dense, values, replayed


def _weights(model, saes, input_ids, state: PromptState, items: list, output, batch_size: int, norms: bool = False):
    """(sub-batch, (values [rows], ``_flat_rows``)) of ``items`` as outputs (``output(item)``), ``batch_size``
    rows a backward (on the streams, ``pathflow.streams``); a batch that runs out of memory is split in
    halves, down to one row. A batch keeps its flat rows only, not its gradients."""
    from .batching import run_with_backoff
    from .streams import stream_map

    def fn(sub):
        g = output_gradients(model, saes, input_ids, [output(x) for x in sub], norms=norms)
        return g.value, _flat_rows(node_weights(state, saes, g), state)

    for done in stream_map(lambda chunk: run_with_backoff(fn, chunk), list(_batches(items, batch_size))):
        yield from done


def _pool_weights(model, saes, input_ids, state: PromptState, flat: FlatNodes, pool: torch.Tensor, features: list,
                  batch_size: int):
    """(sub-batch, [rows, P]) of ``features`` as outputs: their first-order weights on the nodes ``pool``
    (``pool_weights``), ``batch_size`` rows a backward, halved on out-of-memory."""
    from .batching import run_with_backoff
    from .streams import stream_map

    def fn(sub, shared=None):
        outs = [Output(layer=k[1], feature=k[3], pos=k[2]) for k in sub]
        g = shared.gradients(saes, outs, retain=True) if shared else output_gradients(model, saes, input_ids, outs)
        return pool_weights(state, saes, g, flat, pool)

    # the features at the last position share one forward (most of them: the targets' own position); an
    # earlier one's forward runs only up to its position
    last = input_ids.shape[1] - 1
    at_last = [k for k in features if k[2] == last]
    shared = Forward(model, input_ids, [Output(layer=max(k[1] for k in at_last), feature=0, pos=last)]) \
        if at_last else None
    jobs = [(chunk, None) for chunk in _batches([k for k in features if k[2] != last], batch_size)] + \
        [(chunk, shared) for chunk in _batches(at_last, batch_size)]
    # backwards of one shared forward may run at once (its graph is retained, and each only reads it)
    for done in stream_map(lambda job: run_with_backoff(functools.partial(fn, shared=job[1]), job[0]), jobs):
        yield from done


def pool_weights(state: PromptState, saes: dict[int, SAE], grads: Gradients, flat: FlatNodes,
                 pool: torch.Tensor) -> torch.Tensor:
    """Activation × gradient of the nodes ``pool`` [P] (indices into ``flat``) for each row of ``grads``:
    [k, P], on the CPU — ``node_weights``' first-order weights gathered, computed for those nodes only
    (an edge needs its source among the kept nodes, not every active entry)."""
    device = grads.emb.device
    k = grads.emb.shape[0]
    layer_of = torch.tensor([o.layer for o in grads.outputs])
    pos_of = torch.tensor([o.pos for o in grads.outputs])
    L, Q = flat.layer[pool], flat.pos[pool]
    out = torch.zeros(k, len(pool))
    is_feat = pool < flat.m
    for l in sorted(set(L[L >= 0].tolist()) & set(grads.resid)):
        g = grads.resid[l]
        at = torch.nonzero(is_feat & (L == l)).flatten()
        if len(at):  # g_l[q] · f W_D[:, i] / s
            sae = saes[l]
            j = flat.f_index[pool[at]].to(device)
            _, feat, val = state.acts[l]
            dirs = (sae.W_dec[:, feat[j]] * (val[j] / sae.scale)).T  # [P_l, d_model]
            out[:, at] = (g[:, Q[at].to(device)].to(dirs.dtype) * dirs[None]).sum(-1).float().cpu()
        at = torch.nonzero(~is_feat & (L == l)).flatten()
        if len(at):  # g_l[q] · e_l[q], none before ``state.first``
            q = Q[at].to(device)
            e = (g[:, q] * state.err[l][q][None].to(g.dtype)).sum(-1).float().cpu()
            out[:, at] = torch.where(Q[at][None] >= state.first, e, torch.zeros_like(e))
    at = torch.nonzero(L < 0).flatten()
    if len(at):  # x_emb[q] · ∂y/∂x_emb[q]
        q = Q[at].to(device)
        out[:, at] = (grads.emb[:, q] * state.emb[q][None].to(grads.emb.dtype)).sum(-1).float().cpu()
    live = (L[None] < layer_of[:, None]) & (Q[None] <= pos_of[:, None])
    return torch.where(live, out, torch.zeros_like(out))


def _flat_rows(nw: NodeWeights, state: PromptState) -> list[dict[str, torch.Tensor]]:
    """Each row over every active entry (layers in order), every error term and embedding, on the CPU
    (a layer no row reaches is zeros)."""
    layers = sorted(state.acts)
    k, n = nw.emb.shape
    weight = torch.cat([nw.feature[l].cpu() if l in nw.feature else torch.zeros(k, len(state.acts[l][0]))
                        for l in layers], 1)
    # the first-order weights apart only where the method changed them
    grad = weight if all(nw.gradient.get(l) is nw.feature[l] for l in nw.feature) else \
        torch.cat([nw.gradient[l].cpu() if l in nw.gradient else torch.zeros(k, len(state.acts[l][0]))
                   for l in layers], 1)
    error = torch.stack([nw.error[l].cpu() if l in nw.error else torch.zeros(k, n) for l in layers], 1)
    emb = nw.emb.cpu()
    return [{"weight": weight[r], "gradient": grad[r], "error": error[r], "embedding": emb[r]} for r in range(k)]


def sparse_arrays(state: PromptState, dense: dict) -> dict:
    """The arrays of one prompt's ``graphs.zarr`` group (``storage.arrays.GRAPH_DIMS``)."""
    layers = sorted(state.acts)
    rows = dense["targets"]
    return {
        "node_layer": torch.cat([torch.full((len(state.acts[l][0]),), l) for l in layers]).int().numpy(),
        "node_position": torch.cat([state.acts[l][0] for l in layers]).int().cpu().numpy(),
        "node_feature": torch.cat([state.acts[l][1] for l in layers]).int().cpu().numpy(),
        "activation": torch.cat([state.acts[l][2] for l in layers]).float().cpu().numpy(),
        "weight": torch.stack([r["weight"] for r in rows]).numpy(),
        "gradient": torch.stack([r["gradient"] for r in rows]).numpy(),
        "error": torch.stack([r["error"] for r in rows]).numpy(),
        "embedding": torch.stack([r["embedding"] for r in rows]).numpy(),
        "decision_weight": dense["decision"]["weight"].numpy(),
        "decision_error": dense["decision"]["error"].numpy(),
        "decision_embedding": dense["decision"]["embedding"].numpy(),
        "replayed": dense["replayed"].numpy(),
        "value": dense["value"].numpy(),
    }


# -- replay: the judge, at every position -----------------------------------------------------


# a replay keeps no graph for a backward: twice the rows of a backward batch per forward (32 by default; on
# the real shapes' CPU run 64 were slower again, the activations no longer fitting the caches)
REPLAY_ROWS_PER_OUTPUT = 2


@torch.no_grad()
def replay_nodes(model, saes: dict[int, SAE], input_ids: torch.Tensor, state: PromptState, nodes: list[Key],
                 targets: list[Target], decision: tuple[int, int], batch_size: int = 8) -> dict[Key, dict]:
    """Ablate each feature node (l, q, i) — remove f·W_D[:, i]/s from h_l[q] — and recompute the
    positions from q onward against the prompt's cached keys/values before q; measure every
    target's pre-activation at its position and the decision at the last token.

    Returns {node: {"target": {name: Δpre}, "decision": Δdecision}}; a target before q or at or
    below l cannot change (0). Nodes at one position are replayed ``REPLAY_ROWS_PER_OUTPUT × batch_size``
    at a time; a batch that runs out of memory is split in halves."""
    from .batching import run_with_backoff
    from .model import prefix_cache
    from .streams import stream_map

    acts = state.activations
    top = len(decoder_layers(model)) - 1
    out: dict[Key, dict] = {}
    jobs = []  # (q, the prompt's keys/values before q, nodes): batches of nodes at one position
    for q in sorted({k[2] for k in nodes}):
        at_q = [k for k in nodes if k[2] == q]
        prefix = prefix_cache(model, input_ids, q) if q > 0 else None
        jobs.extend((q, prefix, part) for part in _batches(at_q, REPLAY_ROWS_PER_OUTPUT * batch_size))

    def one(job) -> None:  # each batch writes its own nodes' records
        q, prefix, part = job
        run_with_backoff(lambda chunk: _replay_chunk(model, saes, input_ids, acts, chunk, q, prefix, targets,
                                                     decision, top, out), part)

    stream_map(one, jobs)
    return out


def _replay_chunk(model, saes, input_ids, acts, chunk, q, prefix, targets, decision, top, out) -> None:
    """``replay_nodes`` for the nodes ``chunk`` at position q, as one batch (row 0 the baseline), into ``out``."""
    from .model import joining_rows, run_from
    from .replay import edit_deltas

    chunk = sorted(chunk, key=lambda k: k[1])  # row 0 the unedited baseline; a row joins at its node's layer
    ablated = [{"layer": k[1], "feature_id": k[3], "activation": acts[k]} for k in chunk]
    edits = joining_rows(edit_deltas(saes, ablated, [0.0] * len(chunk)))
    with resid_hooks(model, capture={t.layer for t in targets} | {top}, edits=edits) as hs:
        if prefix is None:
            run(model, input_ids)
        else:
            run_from(model, prefix, input_ids, 1)
    dec = logit_difference(model, hs[top][:, -1], *decision).float()
    for r, k in enumerate(chunk, start=1):
        out[k] = {"decision": float(dec[r] - dec[0]), "target": {}}
    for t in targets:
        if t.pos < q:  # the edit comes after the target's token
            for k in chunk:
                out[k]["target"][t.name] = 0.0
            continue
        sae = saes[t.layer]
        h = hs[t.layer][:, t.pos - q].to(sae.W_enc.dtype)
        pre = target_pre(sae, h, [t.feature] * len(h)).float()  # one column of W_enc, not all
        for r, k in enumerate(chunk, start=1):
            out[k]["target"][t.name] = float(pre[r] - pre[0]) if k[1] < t.layer else 0.0


# -- circuit-tracer's JSON -------------------------------------------------------------------


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's ``node.feature`` for SAE feature ``feature`` of ``layer``: the Cantor pairing."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def graph_json(g: Graph, state: PromptState, tokens: list[str], prompt_text: str, slug: str, scan: str,
               n_layers: int, vocab_size: int, decision_label: str, node_threshold: float,
               info: dict | None = None, rc=None) -> dict:
    """``g`` in the JSON circuit-tracer 0.5.0 writes (``frontend/graph_models.Model``): its node ids,
    Cantor-paired ``feature``, cumulative ``influence``, link weight (−the output's change when the
    source is ablated: replayed where measured, else the attribution estimate; pathflow's
    ``attribution``, its negative, kept beside it), embedding/error/logit nodes, the prompt as given.
    ``rc``: the replay config whose checks (``replay.judge``) each replayed node reports."""
    from .config import ReplayConfig
    from .replay import judge, validated_sentence

    rc = rc or ReplayConfig()
    t = g.target
    last = len(state.ids) - 1
    logit_id = f"{n_layers + 1}_{vocab_size}_{last}"
    p_bet = float(torch.sigmoid(torch.tensor(g.decision)))

    def node(k: Key) -> dict:
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
                "influence": g.influence.get(k), "activation": None}
        if k[0] == "f" or k[0] == "t":
            layer, pos, fid = (k[1], k[2], k[3]) if k[0] == "f" else (t.layer, t.pos, t.feature)
            name = f"L{layer}-{fid}"
            judged = (g.replay or {}).get(k)
            clerp = f"{name} (target: pre-activation {g.target_pre:+.3g})" if k[0] == "t" else name
            extra = {}
            if judged:
                checks = judge(judged["predicted"], judged["actual"], g.target_pre, rc)
                clerp += f" · replayed Δ{judged['actual']:+.3g} {'✓' if checks['validated'] else '✗'}"
                extra = {"predicted_change": judged["predicted"], "replayed_change": judged["actual"],
                         "replayed_decision_change": judged["decision"], **checks}
            return {**base, "node_id": f"{layer}_{fid}_{pos}", "feature": cantor(layer, fid), "layer": str(layer),
                    "ctx_idx": pos, "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{fid}-0",
                    "clerp": clerp, "influence": 0.0 if k[0] == "t" else base["influence"],
                    "activation": g.activation.get(("f", layer, pos, fid), 0.0), "pathflow_feature": name, **extra}
        if k[0] == "e":
            return {**base, "node_id": f"0_{k[1]}_{k[2]}", "feature": -1, "layer": str(k[1]), "ctx_idx": k[2],
                    "feature_type": "mlp reconstruction error", "jsNodeId": f"{k[1]}_{k[2]}-0",
                    "clerp": f"Err: L{k[1]} SAE error at “{tokens[k[2]]}”"}
        if k[0] == "E":
            vocab = state.ids[k[1]]
            return {**base, "node_id": f"E_{vocab}_{k[1]}", "feature": k[1], "layer": "E", "ctx_idx": k[1],
                    "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{k[1]}"}
        return {**base, "node_id": logit_id, "feature": vocab_size, "layer": str(n_layers + 1), "ctx_idx": last,
                "feature_type": "logit", "token_prob": p_bet, "is_target_logit": True,
                "jsNodeId": f"L_{vocab_size}-{last}", "influence": 0.0,
                "clerp": f"Output {decision_label} = {g.decision:+.3f} (p={p_bet:.3f})"}

    keys = sorted(g.nodes | {("E", q) for q in range(len(state.ids))}, key=_order)
    nodes = {k: node(k) for k in keys}
    links = [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": w, "attribution": -w}
             for (s, d), w in sorted(g.edges.items(), key=lambda e: -abs(e[1]))]
    target_id = nodes[("t",)]["node_id"]
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens, "prompt": prompt_text,
                     "node_threshold": node_threshold, "schema_version": 1,
                     # the page's graph list shows "{title_prefix} {scan} — {prompt}": say whose graph it is
                     "title_prefix": f"{t.name} on {(info or {}).get('prompt_name', '')}:".replace(" on :", ":"),
                     "info": {"generator": "pathflow", "target": t.name, "position": t.pos,
                              "replay": _replay_summary(g, rc), "validated_means": validated_sentence(rc),
                              "scores": g.scores,
                              "decision": decision_label, "decision_value": g.decision,
                              "decision_gradient": g.decision_gradient,
                              # the target's own effect: Δdecision measured when it is ablated at its token
                              "target_decision_change": g.decision_change, **(info or {})}},
        "qParams": {"pinnedIds": [target_id, logit_id], "supernodes": [], "linkType": "both", "clickedId": target_id,
                    "sg_pos": ""},
        "nodes": list(nodes.values()),
        "links": links,
    }


def _replay_summary(g: Graph, rc) -> dict:
    """How replay judged the graph's kept features: how many, the share whose sign agrees, and how many
    pass each of ``replay.judge``'s checks."""
    from .replay import judge

    judged = [j for j in (g.replay or {}).values() if j["predicted"]]
    checks = [judge(j["predicted"], j["actual"], g.target_pre, rc) for j in judged]
    agree = [c["sign_agrees"] for c in checks]
    return {"n_replayed": len(judged), "sign_agreement": sum(agree) / len(agree) if agree else None,
            **{f"n_{k}": sum(c[k] for c in checks) for k in ("sign_agrees", "above_noise", "magnitude_agrees",
                                                              "validated")}}


def _order(k: Key) -> tuple:
    """Embeddings, then features and errors by layer and position, then the target and the decision."""
    if k[0] == "E":
        return (0, 0, k[1], 0, "E")
    if k[0] in ("f", "e"):
        return (1, k[1], k[2], k[3] if k[0] == "f" else -1, k[0])
    return (2 if k[0] == "t" else 3, 0, 0, 0, k[0])


# -- which graphs, and their names -----------------------------------------------------------


def graph_targets(selected: list[dict], max_targets: int | None) -> list[dict]:
    """The first ``max_targets`` of the selection, strongest first, the directions taking turns."""
    by_dir: dict[str, list[dict]] = {}
    for s in sorted(selected, key=lambda s: (s.get("rank", 0), s["feature"])):
        by_dir.setdefault(s["direction"], []).append(s)
    out, queues = [], list(by_dir.values())
    while queues and (max_targets is None or len(out) < max_targets):
        for q in list(queues):
            if q and (max_targets is None or len(out) < max_targets):
                out.append(q.pop(0))
            if not q:
                queues.remove(q)
    return out


GRAPHS_DIR = "integrated/graphs"  # {slug}.json and graph-metadata.json: the folder circuit-tracer's page serves


def graph_path(slug: str) -> str:
    """Where a graph is in a run folder."""
    return f"{GRAPHS_DIR}/{slug}.json"


def slug(prompt: str, feature: str) -> str:
    """A graph's file name and URL slug: ``{prompt}-{feature}``, lower case (``risky-l3-56``)."""
    return f"{prompt}-{feature}".lower()


def scan_name(sae_root: str, pattern: str) -> str:
    """The SAE release as circuit-tracer's ``scan``: the root's last part and the pattern with X for
    the layer (``Llama-Scope/Llama3_1-8B-Base-LXR-8x``)."""
    root = sae_root.rstrip("/").rsplit("/", 1)[-1]
    return f"{root}/{pattern.replace('{layer}', 'X')}"


def configured_graphs(cfg, model, tokenizer, saes: dict[int, SAE], input_ids: torch.Tensor, targets: list[Target],
                      bet: int, stop: int) -> tuple[PromptState, list[Graph], dict]:
    """``prompt_graphs`` with ``cfg.graphs`` and ``cfg.attribution``'s settings."""
    gc = cfg.graphs
    return prompt_graphs(model, saes, input_ids, targets, bet, stop, gc.node_threshold, gc.edge_threshold,
                         gc.max_nodes, gc.batch_size, cfg.attribution.method, cfg.attribution.replay_top,
                         bos_positions(tokenizer, input_ids, gc.zero_bos))


def bos_positions(tokenizer, input_ids: torch.Tensor, zero_bos: bool) -> int:
    """How many leading positions of ``input_ids`` [1, n] hold no nodes: 1 where ``zero_bos`` and the
    prompt opens with a special token (circuit-tracer's ``setup_attribution``), else 0."""
    return int(bool(zero_bos) and input_ids.shape[1] > 0 and int(input_ids[0, 0]) in set(tokenizer.all_special_ids))


def decision_ids(cfg, tokenizer) -> tuple[int, int]:
    """(bet, stop) token ids of ``cfg.decision``."""
    return answer_id(tokenizer, cfg.decision.bet, "bet"), answer_id(tokenizer, cfg.decision.stop, "stop")


def answer_id(tokenizer, text: str, what: str) -> int:
    """The one token id of an answer; an answer that is not exactly one token is an error."""
    from .errors import PathflowError

    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise PathflowError(f"decision.{what} {text!r} is {len(ids)} tokens for this tokenizer ({ids}): the decision "
                            "compares the logits of two single tokens")
    return ids[0]
