"""Model-level metrics for judging a quantized model against its float reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Model outputs over `x` in batches. Batches of 8 run EfficientNet-Lite0 on 2 CPU
    cores about twice as fast per image as 32 (cache-bound); fake-quantized weights are
    computed once (`parametrize.cached`), not per batch."""
    with parametrize.cached():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def agreement_and_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean `KL(p_fp ‖ p_q)` over samples."""
    agree = (fp_logits.argmax(1) == q_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(q_logits, 1), F.log_softmax(fp_logits, 1), log_target=True, reduction="batchmean")
    return agree, kl.item()


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean of `last_hidden_state` over the attention mask, L2-normalised."""
    out = []
    with parametrize.cached():
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and minimum row-wise cosine similarity."""
    cos = F.cosine_similarity(a, b, dim=-1)
    return cos.mean().item(), cos.min().item()
