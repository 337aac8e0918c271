"""GGUF fixtures written by gguf-py itself (not by our exporter), from a transformers checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np


def hf_state(hf_dir: Path) -> tuple[dict, dict]:
    """float32 numpy weights under HF names, and the config dict, read with transformers."""
    import torch
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return sd, json.loads((hf_dir / "config.json").read_text())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows, for neighbour-pair RoPE
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_with_gguf_py(hf_dir: Path, out: Path, qtype, *, per_expert: bool = False,
                            quantize=None) -> Path:
    """Convert an HF Mixtral to GGUF the way llama.cpp's converter lays it out, with gguf-py's writer.

    quantize(qtype, float32 2-D) -> uint8 blocks; defaults to gguf.quants.quantize (Q8_0, Q4_0, ...)."""
    import gguf
    from gguf.quants import quantize as gguf_quantize
    from mixlocal.tokenizer import Tokenizer

    quantize = quantize or (lambda t, a: gguf_quantize(a, t))
    sd, cfg = hf_state(hf_dir)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("fixture")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    Tokenizer.from_file(hf_dir / "tokenizer.model").write_gguf_metadata(w)

    def mat(name, a):
        if a.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, a.astype(np.float32))
        else:
            flat = a.reshape(-1, a.shape[-1]).astype(np.float32)
            q = np.asarray(quantize(qtype, flat))
            w.add_tensor(name, q.reshape(a.shape[:-1] + (q.shape[-1],)), raw_dtype=qtype)

    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    mat("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, hp = f"blk.{i}.", f"model.layers.{i}."
        mat(p + "attn_norm.weight", sd[hp + "input_layernorm.weight"])
        mat(p + "attn_q.weight", _permute(sd[hp + "self_attn.q_proj.weight"], nh))
        mat(p + "attn_k.weight", _permute(sd[hp + "self_attn.k_proj.weight"], nkv))
        mat(p + "attn_v.weight", sd[hp + "self_attn.v_proj.weight"])
        mat(p + "attn_output.weight", sd[hp + "self_attn.o_proj.weight"])
        mat(p + "ffn_norm.weight", sd[hp + "post_attention_layernorm.weight"])
        mat(p + "ffn_gate_inp.weight", sd[hp + "mlp.gate.weight"])
        gate_up = sd[hp + "mlp.experts.gate_up_proj"]           # (E, 2F, D): gate rows first, then up
        f = gate_up.shape[1] // 2
        stacks = {"gate": gate_up[:, :f], "up": gate_up[:, f:], "down": sd[hp + "mlp.experts.down_proj"]}
        for kind, stack in stacks.items():
            if per_expert:
                for e in range(stack.shape[0]):
                    mat(f"{p}ffn_{kind}.{e}.weight", stack[e])
            else:
                mat(f"{p}ffn_{kind}_exps.weight", stack)
    mat("output_norm.weight", sd["model.norm.weight"])
    mat("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_PROBE = """
import sys, llama_cpp
llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False).eval([1, 415, 2936])
"""


@lru_cache(maxsize=1)
def llama_cpp_status() -> str | None:
    """None if llama-cpp-python imports here and runs a model; otherwise why not. Probed in a subprocess because a
    prebuilt wheel built for a richer CPU dies with an illegal instruction, at import or only once it computes."""
    model = Path(__file__).resolve().parent.parent / "engine" / "data" / "default" / "model.gguf"
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(model)],
                           capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "importing llama_cpp and loading the default model timed out"
    if r.returncode != 0:
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        return f"llama_cpp does not import and run a model here ({how}): {r.stderr.strip()[-300:]}"
    return None


LLAMA_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
path, mode = sys.argv[1], sys.argv[2]
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=256, logits_all=(mode == "logits"),
                      verbose=False, seed=0)
spec = json.loads(sys.stdin.read())
out = []
for ids in spec["prompts"]:
    llm.reset()
    if mode == "logits":
        llm.eval(ids)
        out.append(np.asarray(llm.scores[:len(ids)]).tolist())
    else:
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if t == llm.token_eos() or len(toks) >= spec["n"]:
                break
            toks.append(t)
        out.append(toks)
print(json.dumps(out))
"""


def run_llama_cpp(path: Path, prompts: list[list[int]], mode: str = "greedy", n: int = 16):
    """Greedy tokens or all-position logits from llama.cpp on a GGUF file, in a subprocess."""
    r = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(path), mode],
                       input=json.dumps({"prompts": prompts, "n": n}), capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {path}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_cpp_quantize(src: Path, dst: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) on a GGUF file, in a subprocess."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = int(sys.argv[3]); p.nthread = 2\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst), str(ftype)], capture_output=True,
                       text=True, timeout=600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"llama_model_quantize failed: {r.stderr[-2000:]}")
    return dst
