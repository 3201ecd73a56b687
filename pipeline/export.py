"""`tst export` and `tst generate`: every checkpoint becomes an ordinary Hugging Face Llama.

Why: the paper's promise is that a TST-trained model is, at inference time, identical to a conventionally
pretrained one. `pipeline.model.transformer.Transformer` mirrors `transformers.LlamaForCausalLM` exactly, so export is:
  1. gather the (possibly FSDP-sharded) model state from the checkpoint's torch.distributed.checkpoint (DCP)
     folder in one process, without a process group or a GPU (DCP stores global shapes; loading plain tensors
     reassembles the shards);
  2. rename the parameters (`pipeline.model.transformer.to_hf_state_dict`) and write `model.safetensors` (or
     `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when larger than --max-shard-size);
  3. write `config.json` (LlamaForCausalLM: our model is a plain Llama for every preset, including the
     Qwen3/SmolLM3-sized ones: no QK-norm, RoPE in every layer, untied embeddings), `generation_config.json`,
     and the tokenizer (`tokenizer.json` + `tokenizer_config.json` for `PreTrainedTokenizerFast`), so that
     `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` just work.
MoE models (`model.num_experts > 0`, pipeline/model/moe.py) export as `Qwen3MoeForCausalLM` (model_type qwen3_moe,
norm_topk_prob true, QK-norm, decoder_sparse_step = model.moe_every, no shared expert), with the on-disk key
layout of the published Qwen3-MoE checkpoints: `model.layers.{i}.mlp.gate.weight` (E, D) for the router and one
matrix per expert, `model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`; attention adds
`self_attn.{q,k}_norm.weight` (head_dim,). transformers 4.x reads that layout as it is; 5.x (checked with 5.24.0
in tests/test_moe.py: logits and greedy tokens) merges it on load into `mlp.experts.gate_up_proj` (E, 2I, D) and
`mlp.experts.down_proj` (E, D, I).
A checkpoint from the superposition phase exports too, with a warning: it predicts bags, not next tokens, until
the recovery phase has run (paper: r = 1 gives next-token loss 4.6-6.5).

`tst generate` samples with a KV cache (temperature, top-k, top-p; temperature 0 = greedy) from a checkpoint or
an export, on CPU or GPU. Prompts are encoded as they are (no BOS: training documents are only EOS-separated).

Checkpoints are read with `pipeline.train.checkpoint` (`find_checkpoint`, `load_model_state`): a folder holding the DCP
of `{"model": ..., "optimizer": ...}`, `meta.json` ({"step", "phase", "phase_of_last_step", "config" with resolved
model fields, "tokenizer": "tokenizer.json"}) and the tokenizer file; a run folder means its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from typing import Optional

import torch

# Prefixes that wrappers (torch.compile, activation checkpointing) add to parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>", "<|im_end|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|bos|>")


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints and exports
# ---------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(full model state dict in our names, meta.json, checkpoint folder) of a checkpoint folder, or of the latest
    checkpoint of a run folder. Gathers FSDP shards in this process, no process group (pipeline.train.checkpoint)."""
    from pipeline.train.checkpoint import find_checkpoint, load_model_state
    from pipeline.errors import TSTError

    try:
        ckpt = find_checkpoint(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            sd, meta = load_model_state(ckpt)
    except FileNotFoundError as e:
        raise TSTError(str(e)) from None
    out = {}
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:  # a state dict taken from a compiled / AC-wrapped module
            k = k.replace(p, "")
        out[k] = v
    return out, meta, ckpt


def unrecovered(meta: dict) -> bool:
    """True when the last optimizer step before this checkpoint was a superposition step (the model predicts
    bags, not next tokens). A checkpoint at the switch step says phase=recovery but has not recovered yet."""
    last = meta.get("phase_of_last_step", meta.get("phase"))
    return last == "superposition"


def _model_config_from_meta(meta: dict, sd: dict):
    from pipeline.config import Config
    from pipeline.model.transformer import resolve_model_config

    cfg = Config.from_dict(meta.get("config") or {}).model
    return resolve_model_config(cfg, vocab_size=sd["tok_embeddings.weight"].shape[0])


def _model_config_from_hf(hf: dict):
    from pipeline.config import ModelConfig

    from pipeline.errors import TSTError

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = hf.get("model_type", "llama")
    if kind not in ("llama", "qwen3_moe") or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TSTError(
            f"only plain Llama and Qwen3-MoE exports load here (model_type llama or qwen3_moe, default RoPE); got "
            f"model_type {hf.get('model_type')!r}, rope {rope}"
        )
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    from pipeline.model.transformer import _DENSE

    moe = dict(_DENSE)  # a Llama export: no experts, no QK-norm
    if kind == "qwen3_moe":
        if hf.get("mlp_only_layers") or not hf.get("norm_topk_prob") or hf.get("use_sliding_window"):
            raise TSTError("only Qwen3-MoE exports with norm_topk_prob, no mlp_only_layers and no sliding window "
                           "load here (what tst export writes)")
        moe = dict(num_experts=hf["num_experts"], experts_per_token=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["moe_intermediate_size"], moe_every=hf.get("decoder_sparse_step", 1),
                   router_aux_loss_coef=float(hf.get("tst_router_aux_loss_coef", 0.0)),
                   router_z_loss_coef=float(hf.get("tst_router_z_loss_coef", 0.0)), qk_norm=True)
    return ModelConfig(**moe,
        preset=hf.get("tst_preset", "tiny"),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(theta),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
    )


def _read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(folder, name)))
    return sd


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """A checkpoint (folder with meta.json, or a run folder of them) or an export (config.json + safetensors)
    -> (Transformer in eval mode, tokenizer file path or None, info dict)."""
    from pipeline.model.transformer import Transformer, from_hf_state_dict

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        cfg = _model_config_from_hf(hf)
        sd = from_hf_state_dict(_read_safetensors(path))
        if "lm_head.weight" not in sd and hf.get("tie_word_embeddings"):
            sd["lm_head.weight"] = sd["tok_embeddings.weight"]  # a tied Llama from elsewhere (our exports are untied)
        tok = os.path.join(path, "tokenizer.json")
        info = {"source": "export", "eos_token_id": hf.get("eos_token_id"), "bos_token_id": hf.get("bos_token_id")}
    else:
        sd, meta, ckpt = load_checkpoint(path)
        cfg = _model_config_from_meta(meta, sd)
        tok = os.path.join(ckpt, meta.get("tokenizer") or "tokenizer.json")
        info = {"source": "checkpoint", "step": meta.get("step"), "phase": meta.get("phase"), "checkpoint": ckpt,
                "unrecovered": unrecovered(meta)}
        if os.path.isfile(tok):
            info.update(_special_ids(tok))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), (tok if os.path.isfile(tok) else None), info


# ---------------------------------------------------------------------------------------------------------------
# Writing an export
# ---------------------------------------------------------------------------------------------------------------


def _special_ids(tokenizer_json: str) -> dict:
    """bos/eos tokens of a tokenizers JSON: by well-known name among its special tokens; eos falls back to the
    first special token (byte-level BPE trained here has one, the document separator); bos falls back to eos."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    specials = [(t["content"], t["id"]) for t in tj.get("added_tokens", []) if t.get("special")]
    by_name = dict(specials)
    eos = next(((n, by_name[n]) for n in _EOS_NAMES if n in by_name), specials[0] if specials else (None, None))
    bos = next(((n, by_name[n]) for n in _BOS_NAMES if n in by_name), eos)
    return {"eos_token": eos[0], "eos_token_id": eos[1], "bos_token": bos[0], "bos_token_id": bos[1]}


def hf_config(cfg, special: dict, dtype: torch.dtype) -> dict:
    """config.json of the matching transformers architecture (LlamaForCausalLM, or Qwen3MoeForCausalLM for an
    MoE). Written for transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) alike."""
    if cfg.num_experts:
        return qwen3_moe_config(cfg, special, dtype)
    if cfg.qk_norm:
        from pipeline.errors import TSTError

        raise TSTError("a dense model with model.qk_norm=true has no Llama export (Llama has no QK-norm); "
                       "exports cover the dense Llama presets and the Qwen3-MoE ones")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
        "tst_preset": cfg.preset,
    }


def qwen3_moe_config(cfg, special: dict, dtype: torch.dtype) -> dict:
    """config.json for Qwen3MoeForCausalLM: our MoE is Qwen3-MoE with norm_topk_prob, QK-norm, untied
    embeddings, full attention in every layer (no sliding window) and MoE layers every `moe_every`."""
    out = hf_config(dataclasses.replace(cfg, num_experts=0, qk_norm=False), special, dtype)
    for k in ("mlp_bias", "pretraining_tp"):
        out.pop(k)
    out.update({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "output_router_logits": False,
        # HF's load_balancing_loss_func is k times ours (and pools layers): the same pressure as ours needs coef / k
        "router_aux_loss_coef": cfg.router_aux_loss_coef / cfg.experts_per_token,
        "tst_router_aux_loss_coef": cfg.router_aux_loss_coef,
        "tst_router_z_loss_coef": cfg.router_z_loss_coef,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    })
    return out


def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    s = str(s).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _umask_mode(path: str) -> None:
    """safetensors writes its files 0600 (a private temp file renamed); an export is for others to load: give it
    the mode any new file gets here (0644 under the usual umask 022), like the JSON files beside it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_safetensors(hf_sd: dict[str, torch.Tensor], out_dir: str, max_shard_size="5GB", metadata=None) -> list[str]:
    """model.safetensors, or HF-style shards + model.safetensors.index.json when over max_shard_size bytes. Returns
    the weight files written, in shard order.

    The split, the file names, the index and the removal of a previous export's weight files (so that re-exporting
    into a folder leaves no stale shard or index behind) are huggingface_hub's `save_torch_state_dict`, over the
    split that transformers' `save_pretrained` uses (`split_torch_state_dict_into_shards`). Three things stay ours:
    - every tensor is copied first (detached, on CPU, contiguous, owning its storage). An MoE's per-expert matrices
      are views of one (E, ., .) tensor (`to_hf_state_dict`); given those views, huggingface_hub 2.4.0 groups
      tensors by storage (tiny-moe at 300KB: 13 shards instead of 37, sized by whole storages) and
      `save_torch_state_dict` raises RuntimeError ("found no suitable name to keep for saving"); measured on
      tiny-moe, vocabulary 400. With the copies its split equals the one we wrote by hand (tiny and tiny-moe, 300KB
      and 5GB); it differs only when one tensor is over the limit (it then packs the smaller tensors around it:
      tiny at 100KB, 22 shards instead of 23);
    - `_parse_size` (huggingface_hub's parser needs a two-letter unit; ours also takes "300000" and "B");
    - the file mode (`_umask_mode`).
    `metadata` goes into model.safetensors' header when there is one file, into the index's "metadata" when sharded
    (each shard's header then holds only {"format": "pt"}), as huggingface_hub does for transformers.
    """
    from huggingface_hub import save_torch_state_dict

    sd = {name: t.detach().to("cpu").contiguous().clone() for name, t in hf_sd.items()}
    save_torch_state_dict(sd, out_dir, max_shard_size=_parse_size(max_shard_size), metadata=dict(metadata or {}))
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))  # model-0000i-of-0000n: sorted = shard order
    else:
        files = ["model.safetensors"]
    for name in files:
        _umask_mode(os.path.join(out_dir, name))
    return files


def write_tokenizer(tokenizer_json: str, out_dir: str, model_max_length: int) -> dict:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) for AutoTokenizer."""
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    special = _special_ids(tokenizer_json)
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    stm = {}
    for k in ("bos_token", "eos_token"):
        if special.get(k) is not None:
            tc[k] = stm[k] = special[k]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(stm, f, indent=2)
    return special


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    *,
    dtype: Optional[str] = None,
    max_shard_size="5GB",
    mlflow_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    output_dir: str = "outputs",
) -> dict:
    """Write an HF-loadable folder from a checkpoint. dtype: None (keep the checkpoint's), float32, bfloat16,
    float16. With `mlflow_run_id`, log the folder to that run in the store `tracking_uri` / `output_dir` name (as
    `tst train` resolves them). Returns a summary dict (files, step, phase, parameter count)."""
    from pipeline.model.transformer import to_hf_state_dict

    sd, meta, ckpt = load_checkpoint(checkpoint)
    cfg = _model_config_from_meta(meta, sd)
    phase = meta.get("phase_of_last_step") or meta.get("phase")
    if unrecovered(meta):
        warnings.warn(
            f"checkpoint '{ckpt}' (step {meta.get('step')}) was taken in the superposition phase: the model predicts "
            "bags of tokens and has not recovered next-token prediction yet; exporting it anyway",
            UserWarning,
            stacklevel=2,
        )
    if dtype:
        sd = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()}
    out_dtype = next(iter(sd.values())).dtype
    os.makedirs(out_dir, exist_ok=True)
    hf_sd = to_hf_state_dict(sd)
    files = write_safetensors(hf_sd, out_dir, max_shard_size, metadata={"tst_step": str(meta.get("step"))})
    tok = os.path.join(ckpt, meta.get("tokenizer") or "tokenizer.json")
    special = write_tokenizer(tok, out_dir, cfg.max_position_embeddings) if os.path.isfile(tok) else {}
    if not special:
        warnings.warn(f"no tokenizer found at '{tok}'; the export has no tokenizer files", UserWarning, stacklevel=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, special, out_dtype), f, indent=2)
    gen = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special.get("eos_token_id"),
           "do_sample": False, "max_new_tokens": 128}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    summary = {
        "checkpoint": ckpt,
        "out_dir": out_dir,
        "step": meta.get("step"),
        "phase": phase,
        "files": files,
        "num_params": sum(v.numel() for v in sd.values()),
        "dtype": str(out_dtype).replace("torch.", ""),
    }
    with open(os.path.join(out_dir, "tst_export.json"), "w") as f:
        json.dump({**summary, "config": meta.get("config")}, f, indent=2)
    if mlflow_run_id:
        log_export_to_mlflow(out_dir, mlflow_run_id, tracking_uri, output_dir)
    return summary


def log_export_to_mlflow(out_dir: str, run_id: str, tracking_uri: Optional[str] = None,
                         output_dir: str = "outputs") -> None:
    """Attach the export folder to an MLflow run as the artifact directory `export/` (mlflow imported here). The
    store is the one every command uses (pipeline.report.tracking.resolve_tracking_uri: --tracking-uri, else
    $MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db), not MLflow's own default (./mlflow.db in the current folder,
    where `tst train` never logs)."""
    import mlflow

    from pipeline.report.tracking import resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, output_dir, create_dir=False))
    client.log_artifacts(run_id, out_dir, artifact_path="export")


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def generate_text(
    path: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    stop_at_eos: bool = True,
) -> tuple[str, list[int], list[int]]:
    """(completion text, prompt ids, generated ids) from a checkpoint or an export."""
    from tokenizers import Tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok_path, info = load_model(path, device=device, dtype=getattr(torch, dtype) if dtype else None)
    if info.get("unrecovered"):
        warnings.warn("this checkpoint is from the superposition phase; expect poor next-token text", UserWarning)
    if tok_path is None:
        from pipeline.errors import TSTError

        raise TSTError(f"no tokenizer.json found with '{path}'")
    tok = Tokenizer.from_file(tok_path)
    ids = tok.encode(prompt).ids
    if not ids:
        ids = [info.get("eos_token_id") or 0]  # an empty prompt starts a new document
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model.generate(
        torch.tensor([ids], device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=info.get("eos_token_id") if stop_at_eos else None,
        generator=gen,
    )
    new = out[0, len(ids) :].tolist()
    if stop_at_eos and info.get("eos_token_id") in new:
        new = new[: new.index(info["eos_token_id"])]
    return tok.decode(new, skip_special_tokens=False), ids, new


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cmd_export(args) -> int:
    summary = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        mlflow_run_id=args.mlflow_run_id,
        tracking_uri=args.tracking_uri,
        output_dir=args.output_dir,
    )
    print(
        f"exported step {summary['step']} ({summary['phase']}) of {summary['checkpoint']}: "
        f"{summary['num_params']:,} parameters ({summary['dtype']}) -> {summary['out_dir']} "
        f"[{', '.join(summary['files'])}]"
    )
    return 0


def _cmd_generate(args) -> int:
    text, _, new = generate_text(
        args.path,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        stop_at_eos=not args.no_stop,
    )
    if args.ids:
        print(" ".join(map(str, new)))
    else:
        sys.stdout.write(args.prompt + text + "\n")
    if not args.no_stop and len(new) < args.max_new_tokens:  # the model ended the document (EOS, not printed)
        print(f"[tst] stopped at the end-of-text token after {len(new)} of --max-new-tokens {args.max_new_tokens} "
              f"(--no-stop to keep sampling past it)", file=sys.stderr)
    return 0
