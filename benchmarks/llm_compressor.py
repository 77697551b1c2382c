"""llm-compressor's GPTQ beside ours on the embedded tiny Llama (same calibration and
held-out windows as `benchmarks/llm.py`).

llm-compressor pins another `transformers` and `compressed-tensors` than jaxq's `llm`
extra, so it runs in a virtual environment of its own (same torch pin):

    python3.11 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install "torch==2.13.0" llmcompressor
    python benchmarks/llm_compressor.py --python /tmp/lcvenv/bin/python

This script writes the model and the token windows to a temporary directory, runs
llm-compressor's `oneshot` with `GPTQModifier` there (W4A16 and W3A16, groups of 128,
symmetric, the LM head ignored), and prints its perplexity and time beside jaxq's GPTQ.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, math, sys, time, torch
import numpy as np
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

torch.set_num_threads(2)
work, bits = sys.argv[1], int(sys.argv[2])
calib, held_out = np.load(f"{work}/calib.npy"), torch.from_numpy(np.load(f"{work}/eval.npy"))
model = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()})
from tokenizers import Tokenizer, models  # oneshot wants a processor; the dataset is tokenized already
from transformers import PreTrainedTokenizerFast
vocab = {f"<{i}>": i for i in range(256)}
words = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
processor = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<0>")
scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": 128}}}
t0 = time.perf_counter()
oneshot(model=model, dataset=ds, processor=processor, recipe=GPTQModifier(config_groups=scheme, ignore=["lm_head"]),
        max_seq_length=calib.shape[1], num_calibration_samples=len(calib))
seconds = time.perf_counter() - t0
total, count = 0.0, 0
with torch.no_grad():
    for i in range(0, len(held_out), 16):
        x = held_out[i : i + 16]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += x[:, 1:].numel()
print(json.dumps({"perplexity": math.exp(total / count), "seconds": seconds}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="interpreter of the environment with llmcompressor")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128)
    args = ap.parse_args(argv)
    import torch

    from bridge.llm import quantize_decoder
    from bridge.models import tiny_llama
    from jaxq.llm import LlmConfig

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="jaxq-llmc-"))
    model = tiny_llama.load_tiny_llama()
    calib, held_out = tiny_llama.calibration_windows(args.calib), tiny_llama.eval_windows(args.eval)
    model.save_pretrained(work / "model")
    np.save(work / "calib.npy", calib.numpy())
    np.save(work / "eval.npy", held_out.numpy())
    (work / "child.py").write_text(CHILD)
    fp = tiny_llama.perplexity(model, held_out)
    print(f"FP32 held-out perplexity {fp:.4f}")
    print(f"{'config':<14}{'tool':<16}{'perplexity':>11}{'seconds':>9}")
    for bits in (4, 3):
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_decoder(q, calib, LlmConfig(method="gptq", w_bit=bits, group_size=128), progress=False)
        ours = (tiny_llama.perplexity(q, held_out), time.perf_counter() - t0)
        done = subprocess.run(
            [args.python, str(work / "child.py"), str(work), str(bits)], capture_output=True, text=True, check=False
        )
        if done.returncode:
            raise SystemExit(f"llm-compressor failed:\n{done.stderr[-3000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"W{bits}A16 g128  {'jaxq gptq':<16}{ours[0]:>11.4f}{ours[1]:>9.1f}")
        print(
            f"W{bits}A16 g128  {'llm-compressor':<16}{theirs['perplexity']:>11.4f}{theirs['seconds']:>9.1f}", flush=True
        )


if __name__ == "__main__":
    main()
