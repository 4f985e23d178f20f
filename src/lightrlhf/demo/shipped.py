"""Where the shipped demo assets live (kept free of heavy imports: the config resolvers use it)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_DIR = ASSETS_DIR / "tiny"
TINY_ZH_DIR = ASSETS_DIR / "tiny_zh"
TINY_BERT_ZH_DIR = ASSETS_DIR / "tiny_bert_zh"
