"""Cross-domain retrieval over item ids: HSTU layers with full / intra-domain masks, TAPE, DDSR and GCA.

Variants (one class, switched by `RecallConfig.variant`):

  hstu    HSTU layers, full causal attention over both domains (plain HSTU)
  sasrec  softmax attention + FFN layers (SASRec-style), full causal attention
  intra   HSTU, intra-domain mask only: an item attends to earlier items of its own domain; no cross-domain path
  tape    intra + transition-aware positions (within-domain day position + previous-day-domains -> domain)
  ddsr    tape + a per-domain state carried along the sequence, read by every later prediction (the TAPE/DDSR
          paper's full model)
  gca     intra + gated cross-attention from each item to the other domain's earlier items (GCA paper setting)

The prediction at position t for a target of domain D is a query vector q_t(D); items are scored by cosine / tau
against the item-id embedding table (tied with the input embeddings). The HSTU layer follows generative-recommenders
`hstu.py` (pointwise SiLU attention divided by the length, U-gating, LayerNorm on the attention output); its
relative attention bias is replaced by learned absolute day positions. TAPE, DDSR and the GCA details are
reconstructions from abstracts (docs/recall.md says which formula is which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.recall.data import N_TRANS, Batch

VARIANTS = ("hstu", "sasrec", "intra", "tape", "ddsr", "gca")
INTRA = ("intra", "tape", "ddsr", "gca")  # variants with the intra-domain mask and a per-domain readout
N_DOMAINS = 2


@dataclass
class RecallConfig:
    n_items: int
    variant: str = "tape"
    d: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    tau: float = 0.05  # temperature of the cosine scores
    gca_layers: tuple[int, ...] = (0,)  # GCA after these blocks (0-based); the readout always has one
    gca_act: str = "sigmoid"  # sigmoid | tanh
    gca_ln: bool = True  # LayerNorm on the cross-attention's query and key/value inputs
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; use one of {', '.join(VARIANTS)}")
        if self.d % self.n_heads:
            raise ValueError(f"d={self.d} must be a multiple of n_heads={self.n_heads}")
        if self.gca_act not in ("sigmoid", "tanh"):
            raise ValueError(f"gca_act {self.gca_act!r}: use sigmoid or tanh")
        bad = [i for i in self.gca_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"gca_layers {bad} out of range: blocks are 0..{self.n_layers - 1}")
        self.gca_layers = tuple(self.gca_layers)


def attention_mask(doms: torch.Tensor, valid: torch.Tensor, intra: bool) -> torch.Tensor:
    """(B, T, T) bool: query i may read key j. Causal (j <= i), valid keys, and same domain when `intra`."""
    T = doms.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doms.device).tril()
    mask = causal[None] & valid[:, None, :]
    if intra:
        mask = mask & (doms[:, :, None] == doms[:, None, :])
    return mask | torch.eye(T, dtype=torch.bool, device=doms.device)[None]  # padded rows read themselves


class HSTUBlock(nn.Module):
    """u, v, q, k = SiLU(W LN(x)); A = SiLU(q k^T) / N (masked); x + W_o(LN(A v) * u)."""

    def __init__(self, d: int, n_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.h, self.n = n_heads, max_len
        self.ln_in, self.ln_attn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, 4 * d)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        u, v, q, k = F.silu(self.uvqk(self.ln_in(x))).chunk(4, dim=-1)  # (B, T, d) each
        q, k, v = (t.view(B, T, self.h, d // self.h).transpose(1, 2) for t in (q, k, v))  # (B, h, T, dh)
        attn = F.silu(q @ k.transpose(-1, -2)) / self.n * mask[:, None]  # (B, h, T, T)
        o = (attn @ v).transpose(1, 2).reshape(B, T, d)
        return x + self.out(self.drop(self.ln_attn(o) * u))


class SoftmaxBlock(nn.Module):
    """SASRec-style pre-LN block: masked softmax multi-head attention, then a GELU FFN."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.h = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.h, d // self.h).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, h, T, dh)
        x = x + self.drop(self.out(o.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class GatedCrossAttention(nn.Module):
    """out = X + g * A, A = MHA(LN(X), LN(Y), LN(Y)), g = act(W_g [X; A] + b) (GCA; reconstruction).

    `mask` (B, Tq, Tk) says which keys each query may read; a query with none gets A = 0. `last_cos` keeps
    mean_t |cos(X_t, A_t)| over queries with at least one key (the orthogonality the GCA paper reports).
    """

    def __init__(self, d: int, n_heads: int, act: str, ln: bool):
        super().__init__()
        self.h, self.act = n_heads, torch.sigmoid if act == "sigmoid" else torch.tanh
        self.ln_q = nn.LayerNorm(d) if ln else nn.Identity()
        self.ln_kv = nn.LayerNorm(d) if ln else nn.Identity()
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, d)
        self.last_cos: float | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, Tq, d = x.shape
        Tk = y.shape[1]
        q = self.q(self.ln_q(x)).view(B, Tq, self.h, d // self.h).transpose(1, 2)  # (B, h, Tq, dh)
        k, v = (t.view(B, Tk, self.h, d // self.h).transpose(1, 2) for t in self.kv(self.ln_kv(y)).chunk(2, -1))
        has_key = mask.any(-1)  # (B, Tq)
        safe = mask | ~has_key[..., None]  # rows without keys read everything, then are zeroed
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None])
        a = self.out(o.transpose(1, 2).reshape(B, Tq, d)) * has_key[..., None]  # (B, Tq, d)
        g = self.act(self.gate(torch.cat([x, a], dim=-1)))
        with torch.no_grad():
            cos = F.cosine_similarity(x, a, dim=-1).abs()[has_key]
            self.last_cos = float(cos.mean()) if cos.numel() else None
        return x + g * a


class DomainState(nn.Module):
    """DDSR (reconstruction): one state per domain, updated only by items of that domain, read by any later query.

    Update: at an item of domain d on day k, s_d <- GRU(s_d as it was at the end of d's previous day, mean of h over
    the day-k items of domain d seen so far). Same-day items therefore update the state as a set (no invented
    order); the state after item t depends only on items <= t. Read: the states of both domains after t.
    """

    def __init__(self, d: int):
        super().__init__()
        self.cell = nn.GRUCell(d, d)
        self.init = nn.Parameter(torch.zeros(N_DOMAINS, d))

    def forward(self, h: torch.Tensor, doms: torch.Tensor, ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h (B, T, d) -> states (B, T, N_DOMAINS, d): every domain's state after position t."""
        B, T, d = h.shape
        cur = self.init[None].expand(B, -1, -1)  # (B, D, d) state after the last update
        base = cur  # (B, D, d) state at the end of each domain's previous day
        total = h.new_zeros(B, N_DOMAINS, d)  # running sum of today's items per domain
        count = h.new_zeros(B, N_DOMAINS, 1)
        out = []
        for t in range(T):
            new_day = (ts[:, t] != ts[:, t - 1]) if t > 0 else torch.ones(B, dtype=torch.bool, device=h.device)
            new_day = new_day[:, None, None]
            base = torch.where(new_day, cur, base)
            total, count = total * ~new_day, count * ~new_day
            onehot = F.one_hot(doms[:, t], N_DOMAINS).to(h.dtype)[..., None] * valid[:, t, None, None]  # (B, D, 1)
            total, count = total + onehot * h[:, t, None], count + onehot
            upd = self.cell((total / count.clamp(min=1)).reshape(-1, d), base.reshape(-1, d)).view(B, N_DOMAINS, d)
            cur = torch.where(onehot.bool(), upd, cur)
            out.append(cur)
        return torch.stack(out, dim=1)


class RecallModel(nn.Module):
    def __init__(self, cfg: RecallConfig):
        super().__init__()
        self.cfg = c = cfg
        self.item = nn.Embedding(c.n_items + 1, c.d, padding_idx=0)
        nn.init.normal_(self.item.weight, std=0.02)
        self.domain = nn.Embedding(N_DOMAINS, c.d)
        self.tape = c.variant in ("tape", "ddsr")
        if self.tape:
            self.dom_pos = nn.Embedding(c.max_len, c.d)  # within-domain day position
            self.trans = nn.Embedding(N_TRANS, c.d)  # (previous day's domains, domain)
            self.query_trans = nn.Embedding(N_TRANS, c.d)  # the transition into the target
        else:
            self.pos = nn.Embedding(c.max_len, c.d)  # day step
        if c.variant == "sasrec":
            self.blocks = nn.ModuleList(SoftmaxBlock(c.d, c.n_heads, c.dropout) for _ in range(c.n_layers))
        else:
            self.blocks = nn.ModuleList(HSTUBlock(c.d, c.n_heads, c.max_len, c.dropout) for _ in range(c.n_layers))
        self.intra = c.variant in INTRA
        if self.intra:
            self.empty = nn.Parameter(torch.zeros(N_DOMAINS, c.d))  # readout when the domain has no item yet
        if c.variant == "ddsr":
            self.state = DomainState(c.d)
            self.read = nn.ModuleList(nn.Linear(N_DOMAINS * c.d, c.d) for _ in range(N_DOMAINS))
        if c.variant == "gca":
            self.gca = nn.ModuleDict({str(i): GatedCrossAttention(c.d, c.n_heads, c.gca_act, c.gca_ln)
                                      for i in c.gca_layers})
            self.gca_out = GatedCrossAttention(c.d, c.n_heads, c.gca_act, c.gca_ln)
        self.ln_out = nn.LayerNorm(c.d)
        self.drop = nn.Dropout(c.dropout)

    def encode(self, b: Batch) -> torch.Tensor:
        """Hidden states (B, T, d) after the blocks."""
        c = self.cfg
        x = self.item(b.items) + self.domain(b.doms)
        if self.tape:
            x = x + self.dom_pos(b.dom_step.clamp(max=c.max_len - 1)) + self.trans(b.trans)
        else:
            x = x + self.pos(b.step.clamp(max=c.max_len - 1))
        x = self.drop(x)
        mask = attention_mask(b.doms, b.valid, self.intra)
        cross = None
        if c.variant == "gca":
            T = b.items.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            cross = causal[None] & b.valid[:, None, :] & (b.doms[:, :, None] != b.doms[:, None, :])
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if cross is not None and str(i) in self.gca:
                x = self.gca[str(i)](x, x, cross)
        return self.ln_out(x)

    def queries(self, b: Batch, target_doms: torch.Tensor | None = None) -> torch.Tensor:
        """q_t(D) (B, T, d) for the target domain D of each position (default: `b.target_doms`)."""
        D = b.target_doms if target_doms is None else target_doms
        h = self.encode(b)
        if not self.intra:
            return h  # full attention: the last position has seen everything
        B, T, d = h.shape
        pos = torch.arange(T, device=h.device).expand(B, T)
        last = torch.full((B, T), -1, dtype=torch.long, device=h.device)
        for dom in range(N_DOMAINS):  # last position <= t holding an item of domain `dom`
            idx = torch.where(b.valid & (b.doms == dom), pos, torch.full_like(pos, -1)).cummax(dim=1).values
            last = torch.where(D == dom, idx, last)
        q = torch.gather(h, 1, last.clamp(min=0)[..., None].expand(B, T, d))
        q = torch.where((last >= 0)[..., None], q, self.empty[D])  # (B, T, d)
        if self.tape:
            q = q + self.query_trans(b.query_trans)
        if self.cfg.variant == "ddsr":
            s = self.state(h, b.doms, b.ts, b.valid).flatten(2)  # (B, T, D*d)
            q = q + sum(torch.where((D == dom)[..., None], self.read[dom](s), 0.0) for dom in range(N_DOMAINS))
        if self.cfg.variant == "gca":
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            cross = causal[None] & b.valid[:, None, :] & (D[:, :, None] != b.doms[:, None, :])
            q = self.gca_out(q, h, cross)
        return q

    def scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """cos(q, E[id]) / tau: q (..., d), ids (n,) -> (..., n)."""
        return F.normalize(q, dim=-1) @ F.normalize(self.item(ids), dim=-1).T / self.cfg.tau

    def gca_cos(self) -> dict[str, float]:
        """mean_t |cos(X_t, A_t)| of each GCA module in the last forward."""
        if self.cfg.variant != "gca":
            return {}
        out = {f"block{k}": m.last_cos for k, m in self.gca.items()} | {"readout": self.gca_out.last_cos}
        return {k: v for k, v in out.items() if v is not None}


def sampled_softmax_loss(model: RecallModel, q: torch.Tensor, targets: torch.Tensor, target_doms: torch.Tensor,
                         negatives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target against K negatives of its own domain (uniform; accidental hits masked).

    q (N, d), targets (N,), target_doms (N,), negatives (N_DOMAINS, K) item ids of each domain.
    """
    K = negatives.shape[1]
    pos = (F.normalize(q, dim=-1) * F.normalize(model.item(targets), dim=-1)).sum(-1, keepdim=True) / model.cfg.tau
    neg = model.scores(q, negatives.reshape(-1)).view(-1, N_DOMAINS, K)  # (N, D, K)
    neg = neg[torch.arange(len(q), device=q.device), target_doms]  # (N, K) the target domain's negatives
    neg = neg.masked_fill(negatives[target_doms] == targets[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
