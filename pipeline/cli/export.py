"""`tst export` and `tst generate`: their arguments only; the work (and torch) loads when the command runs
(pipeline/export.py), so `tst --help` and every other command start without importing torch."""

from __future__ import annotations


def _cmd_export(args) -> int:
    from pipeline.export import _cmd_export as run

    return run(args)


def _cmd_generate(args) -> int:
    from pipeline.export import _cmd_generate as run

    return run(args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder: Llama (dense) or Qwen3-MoE (safetensors, config, tokenizer)",
        description="Gather a (FSDP-sharded) checkpoint and write model.safetensors, config.json "
        "(LlamaForCausalLM for the dense presets, Qwen3MoeForCausalLM for the MoE ones), generation_config.json and "
        "the tokenizer, loadable with from_pretrained.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (with meta.json), or a run folder: its latest checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (e.g. 2GB, 500MB)")
    p.add_argument("--mlflow-run-id", default=None, help="also log the export as artifacts of this MLflow run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--output-dir", default="outputs", help="where mlflow.db lives (default: outputs, as tst train)")
    p.set_defaults(func=_cmd_export)

    g = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint or an export (KV cache, CPU or GPU)",
    )
    g.add_argument("path", help="checkpoint folder, run folder, or export folder")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the weights' dtype)")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--ids", action="store_true", help="print the generated token ids instead of text")
    g.set_defaults(func=_cmd_generate)
