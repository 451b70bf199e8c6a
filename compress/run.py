"""`compress(model, CompressConfig)`: score layers, remove a block, fit its replacement, report.

`CompressResult.save(out)` writes the output-directory contract every later stage reads:
a plain Hugging Face model directory (config.json readable by transformers 4.x and 5.x, safetensors,
tokenizer), `slimlm.json` (the config, the report, library versions) and PNG plots, all written to a
temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimlm.compress.config import CompressConfig
from slimlm.compress.plots import plot_loss, plot_scores
from slimlm.compress.recover import recover
from slimlm.compress.replace import (
    fold_linear,
    new_ffn_slot,
    new_layer,
    solve_linear,
    train_kd,
    train_lm,
    train_mse,
)
from slimlm.compress.select import (
    block_influence,
    choose_block,
    choose_by_loss,
    choose_shortgpt,
    collect_block_io,
    removal_losses,
    score_layers,
    streamline_scores,
)
from slimlm.data import calibration_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate import next_token_logprobs
from slimlm.models import (
    check_seq_len,
    count_params,
    decoder_layers,
    ffn_paths,
    load_model,
    replace_layers,
    save_model,
)

# Bytes per cached hidden-state element (block input and output are cached in bfloat16).
CACHE_BYTES = 2


def versions() -> dict:
    """The libraries and the machine a compress run records (read by slimlm.env, the one place that reads them)."""
    from slimlm import __version__
    from slimlm.env import library_versions, machine

    return {**library_versions("torch", "transformers"), "slimlm": __version__, **machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass
class CompressResult:
    model: torch.nn.Module
    tokenizer: object
    report: dict

    def save(self, out, overwrite: bool = False) -> Path:
        def scores_png(p):
            plot_scores(self.report, p)

        extra = {"layer_scores.png": scores_png} if self.report["selection"]["removed_layers"] else {}
        if any((self.report.get("training") or {}).get(k) for k in ("mse", "kd", "lm", "recover")):
            extra["loss_curve.png"] = lambda p: plot_loss(self.report, p)
        return save_model(self.model, self.tokenizer, out, self.report, overwrite=overwrite, extra_files=extra)


def compress(model, config: CompressConfig, tokenizer=None, windows: torch.Tensor | None = None) -> CompressResult:
    """Compress `model` (a loaded model, or a spec for `load_model`) in place and report what was done.

    windows: precomputed (n, seq_len) calibration token ids, used instead of `config.calib` (the last
    `config.heldout` of them are held out to measure the quality kept).
    """
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(str(model))
    if tokenizer is None:
        raise SlimlmError("compress needs the model's tokenizer")
    t_start = time.perf_counter()
    timings = {}
    layers = decoder_layers(model)
    n_layers = len(layers)
    n_remove = 0 if config.method == "width" else config.n_remove(n_layers)
    if config.method == "width":  # a width the model cannot reach is refused before calibration
        from slimlm.compress.width import check_width

        check_width(model, config.width_ratio, attention=config.width_heads)
    check_seq_len(model, config.seq_len if windows is None else windows.shape[1])
    params_before = count_params(model)
    torch.manual_seed(config.seed)

    t = time.perf_counter()
    calib_stats: dict = {}
    if windows is None:
        windows = calibration_windows(model, tokenizer, config.calib, config.calib_samples + config.heldout,
                                      config.seq_len, config.seed, progress=config.progress, stats=calib_stats)
    timings["calibration_s"] = time.perf_counter() - t
    n_held = min(config.heldout, len(windows) // 4)
    windows, heldout = (windows[:-n_held], windows[-n_held:]) if n_held else (windows, windows[:0])
    dense_nll, dense_top1 = heldout_stats(model, heldout)

    t = time.perf_counter()
    distil = config.train_loss == "kd" and config.kd_epochs > 0 and config.replacement in ("ffn", "layer")
    recovering = config.recovers and len(windows) > 0
    sim, teacher = score_layers(model, windows, progress=config.progress,
                                topk=config.kd_topk if distil or recovering else 0)
    timings["scoring_s"] = time.perf_counter() - t
    selection = {
        "similarity": [[round(v, 5) for v in row] for row in sim.tolist()],
        "block_scores": streamline_scores(sim, n_remove),
        "block_influence": block_influence(sim),
    }
    if config.method == "width":  # width pruning only (below): no layer removed
        removed = []
    elif config.method == "shortgpt":
        removed = choose_shortgpt(sim, n_remove)
    else:
        selection["block_choice"] = config.block_choice
        selection["cosine_choice"] = start = choose_block(sim, n_remove)
        if config.block_choice == "loss":
            t = time.perf_counter()
            losses = removal_losses(model, windows, n_remove, progress=config.progress)
            timings["block_choice_s"] = time.perf_counter() - t
            selection["block_kl"] = [None if v is None else round(v, 5) for v in losses]
            start = choose_by_loss(losses)
        removed = list(range(start, start + n_remove))
    selection["removed_layers"] = removed

    original = copy.deepcopy(model) if recovering else None  # the teacher of whole-model recovery
    training: dict = {}
    replacement_info: dict = {"kind": config.replacement}
    t = time.perf_counter()
    if config.replacement == "none":
        if removed:
            replace_layers(model, removed)
    elif config.replacement == "linear":
        start, end = removed[0], removed[-1] + 1
        # float32 (Y - X loses its low bits in bfloat16) and three tensors (X, Y, M): a third of the tokens
        io = collect_block_io(model, windows, start, end, max_tokens=_max_tokens(config, model) // 3,
                              keep_mlp_before=True, progress=config.progress, dtype=torch.float32)
        tmat, info = solve_linear(io["mlp"], io["x"], io["y"])
        fold_linear(model, start - 1, tmat)
        replace_layers(model, removed)
        replacement_info.update(info, folded_into_layer=start - 1)
    else:
        start, end = removed[0], removed[-1] + 1
        io = collect_block_io(model, windows, start, end, max_tokens=_max_tokens(config, model),
                              progress=config.progress)
        module = new_ffn_slot(model, start) if config.replacement == "ffn" else new_layer(model, start)
        if config.epochs > 0:
            training["mse"] = train_mse(model, module, io["x"], io["y"], config, config.replacement)
        replace_layers(model, removed, replacement=module)
        if distil:
            n_cached = io["x"].shape[0]
            training["kd"] = train_kd(model, module, start, io["x"],
                                      {k: v[:n_cached] for k, v in teacher.items()}, config)
        del io
        if config.train_loss == "lm" and config.lm_epochs > 0:
            training["lm"] = train_lm(model, module, windows, config)
        replacement_info["layer_index"] = start
        replacement_info["params"] = sum(p.numel() for p in module.parameters())
        if config.replacement == "ffn":
            replacement_info["inference_path"] = ffn_paths(model)[0]  # "triton" on CUDA, else "reference"
    timings["replacement_s"] = time.perf_counter() - t
    if config.width_ratio is not None:  # width pruning, after any layer removal (compress/width.py)
        from slimlm.compress.width import prune_width

        t = time.perf_counter()
        ranked = windows[torch.linspace(0, len(windows) - 1, min(len(windows), config.width_windows)).long()]
        selection["width"] = prune_width(model, ranked, config.width_ratio, attention=config.width_heads,
                                         progress=config.progress)
        timings["width_s"] = time.perf_counter() - t
    if recovering:
        t = time.perf_counter()
        training["recover"] = recover(model, original, tokenizer, windows, teacher, heldout, config, log=_log)
        timings["recovery_s"] = time.perf_counter() - t
    del original, teacher
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    quality = {"heldout_windows": len(heldout), "heldout_tokens": int(heldout[:, 1:].numel())}
    if len(heldout):
        nll, top1 = heldout_stats(model, heldout)
        quality.update(ppl_dense=math.exp(dense_nll), ppl_compressed=math.exp(nll),
                       top1_agreement=float((top1 == dense_top1).float().mean()))
    timings["total_s"] = time.perf_counter() - t_start

    report = {
        "config": config.to_dict(),
        "selection": selection,
        "replacement": replacement_info,
        "training": training,
        "layers_before": n_layers,
        "layers_after": len(decoder_layers(model)),
        "params_before": params_before,
        "params_after": count_params(model),
        "calibration_tokens": int(windows.numel()),
        "self_calibration": calib_stats or None,
        "quality": quality,
        "timings": timings,
        "versions": versions(),
        "source_model": getattr(model.config, "_name_or_path", None),
    }
    return CompressResult(model, tokenizer, report)


@torch.no_grad()
def heldout_stats(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL and the argmax prediction of every position, on held-out windows."""
    if len(windows) == 0:
        return float("nan"), torch.empty(0, dtype=torch.long)
    device = next(model.parameters()).device
    nll, count, top1 = 0.0, 0, []
    for s in range(0, len(windows), batch_size):
        ids = windows[s:s + batch_size].to(device)
        logp, pred = next_token_logprobs(model, ids, argmax=True)
        nll -= float(logp.sum())
        count += logp.numel()
        top1.append(pred)
    return nll / count, torch.cat(top1)


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _max_tokens(config: CompressConfig, model) -> int:
    """Tokens of block input+output hidden states that fit in max_cache_gb."""
    per_token = 2 * model.config.hidden_size * CACHE_BYTES
    return max(config.seq_len, int(config.max_cache_gb * 2**30 / per_token))
