"""skipkv: offline batch reasoning with SkipKV KV-cache compression."""

__version__ = "0.1.0"
