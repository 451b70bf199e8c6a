"""`slimlm quantize` and `slimlm export onnx`: thin shells over `quantize` and `export_onnx`.

Nothing heavy is imported at module level so that `slimlm --help` stays fast; the flags are the
fields of `QuantConfig` and `OnnxConfig`.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize weights with bitsandbytes (int8, nf4, fp4)",
                       description="Quantize MODEL with bitsandbytes and write a Hugging Face directory to OUT "
                                   "that slimlm.load_model loads.")
    p.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file or 'smollm2-135m'")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--method", default="int8", help="int8 | nf4 | fp4")
    p.add_argument("--compute-dtype", default="float32", help="float32 | bfloat16 | float16 (4-bit methods)")
    p.add_argument("--double-quant", action="store_true", help="also quantize the 4-bit block scales")
    p.add_argument("--ppl", metavar="FILE", help="measure perplexity before and after on this text file")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows (with --ppl)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window length (with --ppl)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=cmd_quantize)

    e = sub.add_parser("export", help="export a model for another runtime: onnx, gguf",
                       description="Export MODEL for another runtime.")
    esub = e.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    o = esub.add_parser("onnx", help="ONNX decoder with KV cache for ONNX Runtime",
                        description="Export MODEL to OUT/model.onnx (a decoder with KV cache), quantize its weights "
                                    "with onnxruntime's tools if asked, and validate it against PyTorch.")
    o.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file or 'smollm2-135m'")
    o.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (written atomically)")
    o.add_argument("--weights", default="fp32", help="fp32 | fp16 | int8 | int4")
    o.add_argument("--block-size", type=int, default=None,
                   help="int8/int4 quantization block (16, 32, 64, 128, 256; default 64 for int8, 32 for int4)")
    o.add_argument("--head-block-size", type=int, default=None,
                   help="int8: the output head's block (default 32: the head is where int8's rounding shows)")
    o.add_argument("--int4-method", default=None,
                   help="kquant (default: fitted scales, fast kernel) | rtn (round-to-nearest, fast kernel; the "
                        "only one with --qat-minutes) | "
                        "hqq (float zero points: slow kernel in onnxruntime 1.31)")
    o.add_argument("--int4-keep8", default=None, metavar="NAMES",
                   help="comma-separated weights kept at 8 bits in an int4 export, matched against the end of the "
                        "parameter name ('head' = output head); default head,down_proj,q_proj,k_proj,v_proj (with "
                        "--qat-minutes: head); 'none' for all 4-bit")
    o.add_argument("--int4-keep8-layers", default=None, metavar="WHICH",
                   help="all (default: --int4-keep8 in every layer) | mixed (only in the first and last eighth of "
                        "the layers and every third between, as llama.cpp's Q4_K_M)")
    o.add_argument("--qat-minutes", type=float, default=0.0, metavar="M",
                   help="int4: first train the model on its 4-bit grid for M minutes, distilled from itself on text "
                        "it writes (quantization-aware; calibration comes on top); 0 (default) = off")
    o.add_argument("--qat-steps", type=int, default=None, metavar="N",
                   help="that training for exactly N steps instead of a time budget")
    o.add_argument("--attention", default="auto",
                   help="fused (onnxruntime's GroupQueryAttention + RotaryEmbedding ops) | plain (as transformers "
                        "writes it) | auto (default: fused, except for fp16 and models it cannot take)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    o.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    o.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    o.set_defaults(func=cmd_export_onnx)

    from slimlm.export.ollama import __doc__ as ollama_doc  # light: no heavy import at module level

    g = esub.add_parser("gguf", help="one GGUF file for llama.cpp and Ollama",
                        description="Export MODEL to OUT.gguf (llama.cpp's format: weights, tokenizer, chat template) "
                                    "with an Ollama Modelfile and OUT.gguf.json beside it; when llama-cpp-python "
                                    "is installed, load it with llama.cpp and compare with PyTorch. An FFN "
                                    "replacement becomes a llama layer with zero attention output (exact, but its "
                                    "attention and KV cache still run in llama.cpp). Modelfile TEMPLATE: "
                                    + ollama_doc.split("\n\n")[1].replace("\n", " "))
    g.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file or 'smollm2-135m'")
    g.add_argument("-o", "--out", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    g.add_argument("--type", default="f16",
                   help="f32 | f16 (default) | bf16 | q8_0, written by the gguf package; q4_k_m | q5_k_m | q6_k | "
                        "q4_k_s | q5_k_s | q3_k_s | q3_k_m | q3_k_l | q2_k | q4_0 | q4_1 | q5_0 | q5_1 need "
                        "llama.cpp's quantizer (pip install llama-cpp-python)")
    g.add_argument("--threads", type=int, default=0, help="threads for llama.cpp's quantizer and check (0 = all)")
    g.add_argument("--no-validate", action="store_true", help="skip the llama.cpp check")
    g.add_argument("--no-modelfile", action="store_true", help="write no Ollama Modelfile")
    g.add_argument("--force", action="store_true", help="overwrite OUT.gguf (and the Modelfile) if they exist")
    g.set_defaults(func=cmd_export_gguf)


def cmd_quantize(args) -> int:
    from slimlm.export.bnb import QuantConfig, quantize
    from slimlm.models import check_out, resolve

    cfg = QuantConfig(method=args.method, compute_dtype=args.compute_dtype, double_quant=args.double_quant,
                      ppl_text=args.ppl, ppl_windows=args.windows, ppl_seq_len=args.seq_len)
    resolve(args.model)
    out = check_out(args.out, args.force, args.model)
    report = quantize(args.model, out, cfg, overwrite=args.force)["quantization"]
    b, a = report["before"], report["after"]
    print(f"{cfg.method}: memory {b['memory_bytes'] / 1e6:.1f} MB -> {a['memory_bytes'] / 1e6:.1f} MB, "
          f"disk {(b['disk_bytes'] or 0) / 1e6:.1f} MB -> {a['disk_bytes'] / 1e6:.1f} MB")
    if "perplexity" in report:
        p = report["perplexity"]
        print(f"perplexity on {p['windows']} windows of {p['seq_len']} tokens: {p['before']:.3f} -> {p['after']:.3f} "
              f"({100 * p['change']:+.2f}%)")
    print(f"wrote {out}")
    return 0


def cmd_export_onnx(args) -> int:
    from slimlm.export.onnx import OnnxConfig, export_onnx
    from slimlm.models import check_out, resolve

    extra = {}
    if args.int4_method is not None:
        extra["int4_method"] = args.int4_method
    if args.int4_keep8 is not None:
        names = [n.strip() for n in args.int4_keep8.split(",") if n.strip()]
        extra["int4_keep8"] = () if names in ([], ["none"]) else tuple(names)
    if args.int4_keep8_layers is not None:
        extra["int4_keep8_layers"] = args.int4_keep8_layers
    cfg = OnnxConfig(weights=args.weights, opset=args.opset, block_size=args.block_size,
                     head_block_size=args.head_block_size, validate=not args.no_validate,
                     attention=args.attention, qat_minutes=args.qat_minutes, qat_steps=args.qat_steps, **extra)
    resolve(args.model)
    out = check_out(args.out, args.force, args.model)
    report = export_onnx(args.model, out, cfg, overwrite=args.force)["onnx"]
    print(f"exported {report['layers']['attention']} attention + {report['layers']['ffn']} FFN layers, "
          f"weights {cfg.weights}, {report['attention']} attention: {report['disk_bytes'] / 1e6:.1f} MB")
    for row in (report.get("validation") or {}).get("checks", []):
        print(f"  past {row['past_len']:>3}: max |diff| {row['max_abs_diff']:.2e}, cosine {row['cosine']:.6f}, "
              f"top-1 agreement {100 * row['top1_agreement']:.1f}%")
    q = report.get("qat")
    if q:
        print(f"  quantization-aware training: {q['steps']} steps, held-out KL to the unquantized model "
              f"{q['heldout_kl_before']:.4f} -> {q['heldout_kl_after']:.4f} ({q['seconds']:.0f} s)")
    v = report.get("validation")
    if v and "greedy_match" in v:
        print(f"  greedy tokens identical to PyTorch: {v['greedy_match']}")
    print(f"wrote {out}")
    return 0


def cmd_export_gguf(args) -> int:
    from slimlm.export.gguf import GgufConfig, export_gguf
    from slimlm.models import resolve

    cfg = GgufConfig(type=args.type, validate=not args.no_validate, modelfile=not args.no_modelfile,
                     threads=args.threads)
    resolve(args.model)
    report = export_gguf(args.model, args.out, cfg, overwrite=args.force)["gguf"]
    ffn = report["ffn_layers_as_zero_attention"]
    print(f"exported {report['layers']} layers ({len(ffn)} FFN as zero-attention llama layers), type {cfg.type}: "
          f"{report['disk_bytes'] / 1e6:.1f} MB")
    v = report.get("validation") or {}
    if "skipped" in v:
        print(f"  not checked with llama.cpp: {v['skipped']}")
    elif v:
        print(f"  llama.cpp: tokenizer identical {v['tokenizer_match']}, greedy tokens identical {v['greedy_match']}, "
              f"perplexity {v['ppl']:.3f} vs torch {v['ppl_torch']:.3f} (x{v['ppl_ratio']:.4f})")
    m = report.get("modelfile")
    if m is not None:
        print(f"  Modelfile: template {m['template'] or 'not translated (not ChatML)'}, stop {m['stop']}")
    print(f"wrote {args.out}")
    return 0
