"""The embedded language model: a small Llama-architecture decoder trained on Python's
own standard library.

Architecture: `transformers.LlamaForCausalLM` (RMSNorm, SwiGLU MLP, rotary embeddings),
4 layers, hidden size 256, MLP 768, 4 heads, byte-level vocabulary (a token is one byte
of UTF-8, no tokenizer needed). Every Linear layer's input width is a multiple of 128,
so groups of 128 tile it.

Data: the `.py` sources of the standard library of the Python that runs this (its `test`
packages, `idlelib` and `site-packages` excluded) and the help text of
`pydoc_data.topics`. A file belongs to the held-out split when `crc32(relative path) %
10 == 0`; training never sees it. `python -m bridge.models.tiny_llama` reproduces the
shipped weights (`tiny_llama.safetensors`, float16, fixed seed) and prints the held-out
perplexity; the numbers it reaches are in `benchmarks/README.md`.
"""

from __future__ import annotations

import math
import sysconfig
import time
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch

WEIGHTS = "tiny_llama.safetensors"
SEQ_LEN = 256
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def llama_config():
    """The `transformers.LlamaConfig` of the shipped model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _source_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not _SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append((rel.as_posix(), path))
    return files


def is_held_out(relative_path: str) -> bool:
    """The split rule: one file in ten, chosen by a hash of its path."""
    return zlib.crc32(relative_path.encode()) % 10 == 0


def corpus(split: str) -> bytes:
    """The training (`"train"`) or held-out (`"eval"`) text as UTF-8 bytes, files joined
    by a blank line in path order. `pydoc_data.topics` belongs to the training split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: 'train' or 'eval'")
    parts = [p.read_bytes() for rel, p in _source_files() if is_held_out(rel) == (split == "eval")]
    if split == "train":
        from pydoc_data.topics import topics

        parts += [topics[k].encode() for k in sorted(topics)]
    return b"\n\n".join(parts)


def windows(text: bytes, count: int, seq_len: int = SEQ_LEN, seed: int | None = None) -> torch.Tensor:
    """`count` token windows `[count, seq_len]` (int64) of `text`: consecutive from the
    start when `seed` is None, else at random offsets drawn with `seed`."""
    data = np.frombuffer(text, dtype=np.uint8)
    if len(data) < seq_len * count and seed is None:
        raise ValueError(f"{count} windows of {seq_len} need {seq_len * count} bytes; the text has {len(data)}")
    if seed is None:
        starts = np.arange(count) * seq_len
    else:
        starts = np.random.default_rng(seed).integers(0, len(data) - seq_len, count)
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]).astype(np.int64))


def calibration_windows(count: int = 128, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """Random windows of the training text (what quantization calibrates on)."""
    return windows(corpus("train"), count, seq_len, seed=seed)


def eval_windows(count: int = 64, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The first `count` consecutive windows of the held-out text (what perplexity is measured on)."""
    return windows(corpus("eval"), count, seq_len)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, batch_size: int = 16) -> float:
    """`exp(mean next-token cross-entropy)` of `model` over the windows `tokens [n, t]`."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = tokens[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        targets = x[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
        total, count = total + float(loss), count + x[:, 1:].numel()
    return math.exp(total / count)


def load_tiny_llama():
    """The pretrained model (float32, eval mode)."""
    from safetensors.torch import load
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    state = {k: v.float() for k, v in load(resources.files(__package__).joinpath(WEIGHTS).read_bytes()).items()}
    model.load_state_dict(state)
    return model.eval()


def train(steps: int = 1000, batch: int = 32, lr: float = 3e-3, seed: int = 0, log_every: int = 50):
    """Train from scratch (the recipe of the shipped weights); returns the model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    data = np.frombuffer(corpus("train"), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    other = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    start = time.time()
    for step in range(steps):
        offsets = rng.integers(0, len(data) - SEQ_LEN - 1, batch)
        x = torch.from_numpy(np.stack([data[o : o + SEQ_LEN] for o in offsets]).astype(np.int64))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f} s", flush=True)
    return model.eval()


def main(argv=None):
    import argparse

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description="Train the embedded tiny Llama and write its weights.")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).with_name(WEIGHTS)))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = train(steps=args.steps)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out}; held-out perplexity {perplexity(load_tiny_llama(), eval_windows()):.3f}")


if __name__ == "__main__":
    main()
