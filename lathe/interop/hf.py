"""Hugging Face interop: load GPT-2 and Llama checkpoints from a local folder, and write lathe models
(Llama- or GPT-2-shaped, i.e. every combination HF has a class for) as a folder `transformers` loads.
No network, and `transformers` itself is not needed here.

    model, tok = import_hf("path/to/hf-folder")     # config.json + *.safetensors (+ tokenizer.json)
    export_hf(model, tok, "out/hf")                 # AutoModelForCausalLM / AutoTokenizer.from_pretrained

Two layouts, both expressed exactly by lathe's GPT:
- Llama (`LlamaForCausalLM`): RMSNorm, RoPE in the "rotate half" layout, SwiGLU, grouped-query
  attention, optional biases and tied embeddings. Same module names as lathe, up to renames.
- GPT-2 (`GPT2LMHeadModel`): LayerNorm with bias, learned positions, tanh-GELU MLP, biases, tied head.
  Its linear layers are `Conv1D`s that store weights as (in, out), the transpose of nn.Linear, and
  q, k and v live in one fused `c_attn` matrix.

Each HF tensor maps to one or more lathe tensors through a `Link`; the same links drive import and
export, so the two directions cannot drift apart.

Tokenizers: lathe's Tokenizer needs its 13 special tokens at ids 0..12, so a lathe-exported folder
imports with its tokenizer while a public GPT-2/Llama tokenizer does not fit; `import_hf` then returns
None for it and the folder's tokenizer stays usable through `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from lathe.chat import ROLE_TOKENS
from lathe.config import ModelConfig
from lathe.console import warn
from lathe.errors import LatheError
from lathe.io import atomic_path
from lathe.model import GPT, mlp_hidden_size
from lathe.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS, EOS, PAD = (SPECIAL_TOKENS.index(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>"))
ASSISTANT_END = SPECIAL_TOKENS.index("<|assistant_end|>")
# Buffers some checkpoints carry that are recomputed, not learned (GPT-2's causal mask, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# --- HF tensor <-> lathe tensors ------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    hf: str
    lathe: tuple[str, ...]
    kind: str = "copy"  # copy | conv1d (stored transposed) | qkv_weight (Conv1D, fused q|k|v) | qkv_bias


def to_lathe(t: torch.Tensor, kind: str) -> list[torch.Tensor]:
    if kind == "conv1d":
        return [t.T]
    if kind == "qkv_weight":
        return list(t.T.chunk(3, dim=0))
    if kind == "qkv_bias":
        return list(t.chunk(3))
    return [t]


def to_hf(ts: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return ts[0].T
    if kind == "qkv_weight":
        return torch.cat(ts, dim=0).T
    if kind == "qkv_bias":
        return torch.cat(ts)
    return ts[0]


def llama_links(cfg: ModelConfig) -> list[Link]:
    params = ["weight", "bias"] if cfg.bias else ["weight"]
    links = [Link("model.embed_tokens.weight", ("embed.weight",)), Link("model.norm.weight", ("final_norm.weight",))]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layer):
        hf, ours = f"model.layers.{i}", f"blocks.{i}"
        links += [Link(f"{hf}.input_layernorm.weight", (f"{ours}.attn_norm.weight",)),
                  Link(f"{hf}.post_attention_layernorm.weight", (f"{ours}.mlp_norm.weight",))]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            links += [Link(f"{hf}.self_attn.{proj}.{p}", (f"{ours}.attn.{proj}.{p}",)) for p in params]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            links += [Link(f"{hf}.mlp.{proj}.{p}", (f"{ours}.mlp.{proj}.{p}",)) for p in params]
    return links


def gpt2_links(cfg: ModelConfig) -> list[Link]:
    """GPT-2 always has biases; exporting a bias-free lathe model writes zeros there (same outputs)."""
    links = [Link("transformer.wte.weight", ("embed.weight",)),
             Link("transformer.wpe.weight", ("pos_embed.weight",)),
             Link("transformer.ln_f.weight", ("final_norm.weight",)),
             Link("transformer.ln_f.bias", ("final_norm.bias",))]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layer):
        hf, ours = f"transformer.h.{i}", f"blocks.{i}"
        qkv = lambda p: tuple(f"{ours}.attn.{x}_proj.{p}" for x in "qkv")  # noqa: E731
        links += [
            Link(f"{hf}.ln_1.weight", (f"{ours}.attn_norm.weight",)),
            Link(f"{hf}.ln_1.bias", (f"{ours}.attn_norm.bias",)),
            Link(f"{hf}.attn.c_attn.weight", qkv("weight"), "qkv_weight"),
            Link(f"{hf}.attn.c_attn.bias", qkv("bias"), "qkv_bias"),
            Link(f"{hf}.attn.c_proj.weight", (f"{ours}.attn.o_proj.weight",), "conv1d"),
            Link(f"{hf}.attn.c_proj.bias", (f"{ours}.attn.o_proj.bias",)),
            Link(f"{hf}.ln_2.weight", (f"{ours}.mlp_norm.weight",)),
            Link(f"{hf}.ln_2.bias", (f"{ours}.mlp_norm.bias",)),
            Link(f"{hf}.mlp.c_fc.weight", (f"{ours}.mlp.up_proj.weight",), "conv1d"),
            Link(f"{hf}.mlp.c_fc.bias", (f"{ours}.mlp.up_proj.bias",)),
            Link(f"{hf}.mlp.c_proj.weight", (f"{ours}.mlp.down_proj.weight",), "conv1d"),
            Link(f"{hf}.mlp.c_proj.bias", (f"{ours}.mlp.down_proj.bias",)),
        ]
    return links


# --- config.json -> ModelConfig -------------------------------------------------------------------
class _Fields:
    """config.json reader whose errors name the file and the field."""

    def __init__(self, raw: dict, source: Path):
        self.raw, self.source = raw, source

    def get(self, key: str, default=...):
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is ...:
            raise LatheError(f"{self.source}: field '{key}' is missing")
        return default

    def require(self, key: str, ok: bool, why: str) -> None:
        if not ok:
            raise LatheError(f"{self.source}: field '{key}' = {json.dumps(self.raw.get(key))}: {why}")


def llama_model_config(f: _Fields) -> ModelConfig:
    n_embd, n_head = f.get("hidden_size"), f.get("num_attention_heads")
    f.require("hidden_act", f.get("hidden_act", "silu") == "silu", "lathe's SwiGLU needs 'silu'")
    f.require("head_dim", f.raw.get("head_dim") is None or f.raw["head_dim"] * n_head == n_embd,
              "lathe needs head_dim = hidden_size / num_attention_heads")
    f.require("attention_bias", f.get("attention_bias", False) == f.get("mlp_bias", False),
              "lathe has one 'bias' switch: attention_bias and mlp_bias must be equal")
    for key in ("sliding_window", "rope_scaling"):
        f.require(key, f.raw.get(key) is None, "not supported by lathe (plain full attention and RoPE only)")
    rope = f.get("rope_parameters", {})  # transformers >= 5; older files have rope_theta at the top level
    f.require("rope_parameters", rope.get("rope_type", "default") == "default", "only plain RoPE is supported")
    return ModelConfig(
        vocab_size=f.get("vocab_size"), n_layer=f.get("num_hidden_layers"), n_head=n_head,
        n_kv_head=f.get("num_key_value_heads", n_head), n_embd=n_embd, block_size=f.get("max_position_embeddings"),
        mlp="swiglu", mlp_hidden=f.get("intermediate_size"), norm="rmsnorm", pos_emb="rope",
        bias=f.get("attention_bias", False), tie_embeddings=f.get("tie_word_embeddings", False),
        rope_theta=rope.get("rope_theta", f.get("rope_theta", 10000.0)), norm_eps=f.get("rms_norm_eps", 1e-6),
    )


def gpt2_model_config(f: _Fields) -> ModelConfig:
    f.require("activation_function", f.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
              "lathe's GELU is the tanh approximation ('gelu_new')")
    f.require("scale_attn_weights", f.get("scale_attn_weights", True), "lathe always scales attention by 1/sqrt(d)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        f.require(key, not f.get(key, False), "not supported by lathe")
    return ModelConfig(
        vocab_size=f.get("vocab_size"), n_layer=f.get("n_layer"), n_head=f.get("n_head"), n_embd=f.get("n_embd"),
        block_size=f.get("n_positions"), mlp="gelu", mlp_hidden=f.get("n_inner", None), norm="layernorm",
        pos_emb="learned", bias=True, tie_embeddings=f.get("tie_word_embeddings", True),
        norm_eps=f.get("layer_norm_epsilon", 1e-5),
    )


ARCHITECTURES = {"llama": (llama_model_config, llama_links), "gpt2": (gpt2_model_config, gpt2_links)}


def read_hf_config(folder: Path) -> tuple[ModelConfig, str]:
    """config.json -> (ModelConfig, 'llama' | 'gpt2')."""
    path = folder / "config.json"
    if not path.is_file():
        raise LatheError(f"{path} does not exist: not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LatheError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    fields = _Fields(raw, path)
    arch = fields.get("model_type")
    fields.require("model_type", arch in ARCHITECTURES, f"lathe imports only {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch][0](fields), arch
    except ValidationError as e:
        err = e.errors()[0]
        raise LatheError(f"{path}: {err['msg']} (lathe field '{'.'.join(map(str, err['loc'])) or 'model'}')") from None
    except TypeError as e:  # a field of the wrong JSON type (a string where a number belongs)
        raise LatheError(f"{path}: {e}") from None


# --- weights ----------------------------------------------------------------------------------------
def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():  # not every *.safetensors beside it (an adapter, say)
        files = ["model.safetensors"]
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise LatheError(f"{folder}: no *.safetensors weights (PyTorch .bin checkpoints are not read: convert them)")
    tensors = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _canonical_names(weights: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Headless checkpoints (GPT2Model, LlamaModel) store names without the 'transformer.'/'model.' prefix."""
    prefix = {"gpt2": "transformer.", "llama": "model."}[arch]
    return {k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k: v for k, v in weights.items()}


def hf_to_lathe_state(weights: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, source: Path) -> dict:
    weights = _canonical_names(weights, arch)
    links = ARCHITECTURES[arch][1](cfg)
    missing = [link.hf for link in links if link.hf not in weights]
    if missing:
        raise LatheError(f"{source}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    known = {link.hf for link in links} | {"lm_head.weight"}  # a tied head may also be stored
    unexpected = [k for k in weights if k not in known and not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise LatheError(f"{source}: unexpected weights {unexpected[:5]} (a layout lathe does not express)")
    state = {}
    for link in links:
        state.update(zip(link.lathe, to_lathe(weights[link.hf], link.kind)))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def lathe_to_hf_state(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for link in ARCHITECTURES[arch][1](model.cfg):
        tensors = [state[name] if name in state else _zero_bias(state, name) for name in link.lathe]
        out[link.hf] = to_hf(tensors, link.kind).contiguous().clone()  # own storage: safetensors refuses shared
    return out


def _zero_bias(state: dict, name: str) -> torch.Tensor:
    """A bias the lathe model does not have: zeros give exactly the same outputs."""
    weight = state[name.removesuffix(".bias") + ".weight"]
    return torch.zeros(weight.shape[0], dtype=weight.dtype)


# --- import -----------------------------------------------------------------------------------------
def import_hf(folder: str | Path) -> tuple[GPT, Tokenizer | None]:
    """A GPT-2 or Llama folder (config.json + safetensors) -> (lathe GPT in float32, eval mode;
    lathe Tokenizer if the folder's tokenizer.json is a lathe tokenizer, else None)."""
    folder = Path(folder)
    cfg, arch = read_hf_config(folder)
    state = hf_to_lathe_state(read_safetensors(folder), cfg, arch, folder)
    model = GPT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        raise LatheError(f"{folder}: weights do not match config.json: {str(e).splitlines()[-1].strip()}") from None
    tokenizer = import_tokenizer(folder)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise LatheError(f"{folder}: tokenizer has {tokenizer.vocab_size} tokens, "
                         f"more than config.json's vocab_size {cfg.vocab_size}")
    return model.eval(), tokenizer


def import_tokenizer(folder: Path) -> Tokenizer | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(path)
    except LatheError as e:
        warn(f"{path} is not a lathe tokenizer ({e}); use transformers.AutoTokenizer.from_pretrained('{folder}')")
        return None


# --- export -----------------------------------------------------------------------------------------
def export_arch(cfg: ModelConfig) -> str:
    """'llama' or 'gpt2'; otherwise a LatheError naming the field that fits neither."""
    if cfg.direction == "backward":
        raise LatheError("cannot export: field 'model.direction' is 'backward'; transformers' causal LMs read forward")
    want = {"llama": {"norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu"},
            "gpt2": {"norm": "layernorm", "pos_emb": "learned", "mlp": "gelu"}}
    arch = "llama" if cfg.norm == "rmsnorm" else "gpt2"
    for field, value in want[arch].items():
        if getattr(cfg, field) != value:
            raise LatheError(f"cannot export: field 'model.{field}' is {getattr(cfg, field)!r}, but a {cfg.norm} model "
                             f"exports as {arch} which needs {field}={value!r} (Llama = rmsnorm+rope+swiglu, "
                             f"GPT-2 = layernorm+learned+gelu)")
    if arch == "gpt2" and (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
        raise LatheError("cannot export: field 'model.n_kv_head' (grouped-query attention) has no GPT-2 equivalent")
    return arch


def hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": BOS,
              "eos_token_id": EOS, "pad_token_id": PAD, "torch_dtype": str(dtype).removeprefix("torch."),
              "use_cache": True}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.block_size,
                "n_inner": mlp_hidden_size(cfg),
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "scale_attn_weights": True, **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
            "intermediate_size": mlp_hidden_size(cfg), "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, **common}


def chat_template() -> str:
    """lathe/chat.py's `render_chat` as a Jinja template (what `apply_chat_template` runs); the
    assistant tokens mask it returns is render_chat's loss mask."""
    starts = {role: pair[0] for role, pair in ROLE_TOKENS.items()}
    ends = {role: pair[1] for role, pair in ROLE_TOKENS.items()}
    return (
        "{%- set starts = " + json.dumps(starts) + " -%}"
        "{%- set ends = " + json.dumps(ends) + " -%}"
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in starts -%}"
        "{{- raise_exception('unknown role ' + message['role']) -}}"
        "{%- endif -%}"
        "{{- starts[message['role']] -}}"
        "{%- set body -%}"
        "{{- message.get('content') or '' -}}"
        "{%- for call in message.get('tool_calls') or [] -%}"
        "{{- '<|tool_call_start|>' + (call | tojson) + '<|tool_call_end|>' -}}"
        "{%- endfor -%}"
        "{{- ends[message['role']] -}}"
        "{%- endset -%}"
        # {% generation %} marks the tokens lathe trains on (return_assistant_tokens_mask=True)
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- body -}}{%- endgeneration -%}"
        "{%- else -%}{{- body -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
    )


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json + the two small files `AutoTokenizer` reads to know bos/eos/pad and the chat template.
    Note: HF recognises special-token strings typed in text, lathe's encode() does not (by design)."""
    tokenizer.hf.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": SPECIAL_TOKENS[BOS], "eos_token": SPECIAL_TOKENS[EOS], "pad_token": SPECIAL_TOKENS[PAD]}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        "chat_template": chat_template(),
    })


def export_hf(model: GPT, tokenizer: Tokenizer | None, folder: str | Path) -> Path:
    """Write `folder` (atomically) for `AutoModelForCausalLM.from_pretrained`, and for
    `AutoTokenizer.from_pretrained` when a tokenizer is given."""
    folder = Path(folder)
    arch = export_arch(model.cfg)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise LatheError(f"tokenizer has {tokenizer.vocab_size} tokens, "
                         f"more than the model's vocab_size {model.cfg.vocab_size}")
    weights = lathe_to_hf_state(model, arch)
    dtype = next(iter(weights.values())).dtype
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(model.cfg, arch, dtype))
        # generation stops where lathe's does: end of text, a new document, or the end of an assistant turn
        _write_json(tmp / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": [EOS, BOS, ASSISTANT_END],
                                                     "pad_token_id": PAD})
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, model.cfg.block_size)
    return folder


def _write_json(path: Path, obj: dict) -> None:
    """Plain write: every file here lands inside a folder that is renamed into place as a whole."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
