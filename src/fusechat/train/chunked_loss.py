"""The FuseChat loss from hidden states, over chunks of positions: no (B, T, V) tensor is ever held.

``fusion_loss`` takes the full logits, so the model must first build (B, T, V) logits,
then the loss a (B, T − 1, V) fp32 log-softmax, and backward a gradient of each: with a
262,144-token vocabulary that is 1 GiB per 1,024 positions and tensor. Here the lm-head
is applied to a chunk of positions at a time; each chunk's logits give its share of
the loss and, right away, its share of the gradients with respect to the hidden states
and the head (the softmax minus the targets, times the head or the hidden states).
Only those gradients are kept until backward, which scales them by the incoming
gradient. Peak memory for the head and loss is a few (chunk, V) fp32 tensors.

Positions that are in neither term (prompt tokens, padding) are skipped: their
logits are never computed.
"""

from __future__ import annotations

import torch

from fusechat.train.loss import IGNORE_INDEX, LossParts, teacher_with_temperature

# Logit elements per chunk (fp32: 128 MiB); the chunk size in positions is this over the vocabulary size.
CHUNK_ELEMENTS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk: about ``CHUNK_ELEMENTS`` logits, at least 16 positions."""
    return max(16, CHUNK_ELEMENTS // max(vocab_size, 1))


def chunked_fusion_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        fused_ids: torch.Tensor | None, fused_probs: torch.Tensor | None,
                        fusion_mask: torch.Tensor | None, lambda_: float, kind: str = "ce", temperature: float = 1.0,
                        chunk_size: int | None = None, softcap: float | None = None) -> LossParts:
    """``fusion_loss(hidden @ weight.T + bias, ...)`` without the full logits; the same ``LossParts``.

    hidden: (B, T, H), the last hidden states (after the final norm); weight: (V, H), the
    lm-head (the embedding matrix when tied); bias: (V,) or None; labels: (B, T), −100 where
    no loss; fused_ids, fused_probs: (B, T, k); fusion_mask: (B, T). Position t is scored on
    token t + 1, as in ``fusion_loss``. ``softcap``: logits become softcap · tanh(logits /
    softcap) (Gemma-2's and Gemma-3's ``final_logit_softcapping``).
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, _ = hidden.shape
    n = B * (T - 1)
    targets = labels[:, 1:].reshape(n)
    gold_mask = targets != IGNORE_INDEX
    n_gold = int(gold_mask.sum())
    use_fusion = lambda_ < 1.0 and fused_ids is not None
    # As fusion_loss: without fused targets the loss is the gold term alone, whatever λ; with them, each
    # position's λ·gold + (1 − λ)·fusion (gold alone outside the fusion term), averaged over the positions.
    gold_coef = gold_mask.float() / max(n_gold, 1)  # (n,)
    active = gold_mask
    ids = q = fusion_coef = None
    n_fusion = 0
    kl_const = kl_mean = hidden.new_zeros((), dtype=torch.float32)
    if use_fusion:
        k = fused_ids.shape[-1]
        ids = fused_ids[:, :-1].reshape(n, k).long()
        q = teacher_with_temperature(fused_probs[:, :-1].float(), temperature).reshape(n, k)
        fmask = fusion_mask[:, :-1].reshape(n).bool()
        n_fusion = int(fmask.sum())
        active = active | fmask
        n_active = max(int(active.sum()), 1)
        gold_coef = gold_mask.float() * torch.where(fmask, lambda_, 1.0) / n_active
        fusion_coef = fmask.float() * ((1.0 - lambda_) / n_active)
        if kind == "kl":  # the teacher's negative entropy: a constant, no gradient
            neg_entropy = torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum(-1)
            kl_const = (1.0 - lambda_) * (neg_entropy * fmask).sum() / n_active
            kl_mean = (neg_entropy * fmask).sum() / max(n_fusion, 1)
    rows = active.nonzero().squeeze(-1)  # (n_active,)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    selected = {
        "targets": targets[rows], "gold_coef": gold_coef[rows], "gold_mask": gold_mask[rows],
        "ids": None if ids is None else ids[rows], "q": None if q is None else q[rows],
        "fusion_coef": None if fusion_coef is None else fusion_coef[rows],
        "fusion_mask": None if fusion_coef is None else fmask[rows],
    }
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    loss, gold_sum, fusion_sum = _ChunkedHeadLoss.apply(hidden, weight, bias, rows, selected, chunk_size, softcap,
                                                        needs)
    gold = gold_sum / max(n_gold, 1)
    if not use_fusion:
        return LossParts(loss, gold, loss.new_zeros(()), n_gold, 0)
    fusion = fusion_sum / max(n_fusion, 1) + kl_mean
    return LossParts(loss + kl_const, gold, fusion, n_gold, n_fusion)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward: the weighted loss and both raw sums; the gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, sel, chunk_size, softcap, needs):
        need_h, need_w, need_b = needs
        H = hidden.shape[-1]
        device_type = hidden.device.type
        # Under autocast the head runs in the autocast dtype, as nn.Linear would; the loss math is fp32.
        mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        flat = hidden[:, :-1].reshape(-1, H)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.float()
        grad_rows = torch.zeros(len(rows), H, dtype=acc_dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        loss, gold_sum, fusion_sum = (torch.zeros((), device=hidden.device) for _ in range(3))
        fused = sel["ids"] is not None
        # One (chunk, V) fp32 buffer, reused by every chunk: logits, then in place the softmax and the gradient.
        buf = torch.empty(min(chunk_size, len(rows)), weight.shape[0], device=hidden.device)
        capped_buf = torch.empty_like(buf) if softcap is not None else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, len(rows), chunk_size):
                part = slice(start, start + chunk_size)
                h = flat[rows[part]].to(mm_dtype)  # (c, H)
                z = buf[: len(h)]  # (c, V)
                if mm_dtype == torch.float32:
                    torch.mm(h, w.t(), out=z)
                else:
                    z.copy_(torch.mm(h, w.t()))
                if b is not None:
                    z += b
                capped = None
                if softcap is not None:
                    capped = torch.div(z, softcap, out=capped_buf[: len(h)]).tanh_()
                    torch.mul(capped, softcap, out=z)
                target = sel["targets"][part].clamp_min(0)
                z_target = z.gather(1, target.unsqueeze(1)).squeeze(1)
                if fused:
                    ids, q, c = sel["ids"][part], sel["q"][part], sel["fusion_coef"][part]
                    z_fused = z.gather(1, ids)  # (c, k)
                peak = z.amax(dim=-1)
                z.sub_(peak.unsqueeze(1)).exp_()  # z now holds exp(logits − max)
                total = z.sum(dim=-1)
                lse = peak + total.log()  # (c,)
                gold_nll = (lse - z_target) * sel["gold_mask"][part]
                gold_sum += gold_nll.sum()
                a = sel["gold_coef"][part]
                row_loss = a * gold_nll
                scale = a
                if fused:
                    q_mass = q.sum(-1)
                    cross = (q_mass * lse - (q * z_fused).sum(-1)) * sel["fusion_mask"][part]
                    fusion_sum += cross.sum()
                    row_loss = row_loss + c * cross
                    scale = a + c * q_mass
                loss += row_loss.sum()
                if not (need_h or need_w or need_b):
                    continue
                # d loss / d logits = (a + c·Σq)·softmax − a·onehot(target) − c·q at the fused ids
                dz = z.mul_((scale / total).unsqueeze(1))
                dz.scatter_add_(1, target.unsqueeze(1), -a.unsqueeze(1))
                if fused:
                    dz.scatter_add_(1, ids, -(c.unsqueeze(1) * q))
                if capped is not None:
                    dz.mul_(capped.mul_(capped).neg_().add_(1.0))  # d(cap·tanh(x / cap)) / dx = 1 − tanh²
                if need_b:
                    grad_b += dz.sum(0)
                dz_mm = dz.to(mm_dtype)
                if need_h:
                    grad_rows[part] = torch.mm(dz_mm, w)
                if need_w:
                    if mm_dtype == acc_dtype:
                        grad_w.addmm_(dz_mm.t(), h)
                    else:
                        grad_w += torch.mm(dz_mm.t(), h)
        ctx.shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.rows, ctx.grads = rows, (grad_rows, grad_w, grad_b)
        ctx.mark_non_differentiable(gold_sum, fusion_sum)
        return loss, gold_sum, fusion_sum

    @staticmethod
    def backward(ctx, grad_loss, _gold, _fusion):
        grad_rows, grad_w, grad_b = ctx.grads
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = None if torch.equal(grad_loss, torch.ones_like(grad_loss)) else grad_loss
        grad_hidden = None
        if grad_rows is not None:
            B, T, H = ctx.shape
            grad_hidden = torch.zeros(B, T, H, dtype=h_dtype, device=grad_rows.device)
            inner = torch.zeros(B * (T - 1), H, dtype=h_dtype, device=grad_rows.device)
            inner[ctx.rows] = (grad_rows if scale is None else grad_rows * scale).to(h_dtype)
            grad_hidden[:, :-1] = inner.view(B, T - 1, H)
        if grad_w is not None:
            grad_w = (grad_w if scale is None else grad_w * scale).to(w_dtype)
        if grad_b is not None:
            grad_b = (grad_b if scale is None else grad_b * scale).to(b_dtype)
        return grad_hidden, grad_w, grad_b, None, None, None, None, None
