"""Make the tokenizer files transformers 5 writes readable by transformers 4.x too.

transformers 5 saves a tokenizer backed by `tokenizer.json` with `"tokenizer_class": "TokenizersBackend"`, a class
4.x does not have ("Tokenizer class TokenizersBackend does not exist or is not currently imported"), and lists extra
special tokens under `extra_special_tokens`, which 4.x reads as a dict of named tokens and 5.x also accepts under
the older key `additional_special_tokens`. `tokenizer_compat(dir)` rewrites tokenizer_config.json to the names both
generations read alike:

    tokenizer_class      "TokenizersBackend" -> "PreTrainedTokenizerFast" (5.x: an alias of the same class;
                         4.x: the generic tokenizer.json-backed class)
    extra_special_tokens a list -> additional_special_tokens (both generations read that list)

Everything else (tokenizer.json, chat_template.jinja, the named special tokens) already reads the same in both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TOKENIZER_CONFIG = "tokenizer_config.json"
# tokenizer_class values transformers 4.x lacks -> the class both generations resolve to the same tokenizer
CLASS_FOR_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def compat_tokenizer_config(cfg: dict) -> dict:
    """The tokenizer_config.json contents rewritten for transformers 4.x and 5.x alike (a new dict)."""
    cfg = dict(cfg)
    cls = cfg.get("tokenizer_class")
    if cls in CLASS_FOR_4X:
        cfg["tokenizer_class"] = CLASS_FOR_4X[cls]
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg.pop("extra_special_tokens")
        cfg["additional_special_tokens"] = list(dict.fromkeys([*cfg.get("additional_special_tokens", []), *extra]))
    return cfg


def tokenizer_compat(directory: str | os.PathLike) -> None:
    """Rewrite `directory`/tokenizer_config.json in place (see the module docstring); no file, no change."""
    path = Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    new = compat_tokenizer_config(cfg)
    if new != cfg:
        path.write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
