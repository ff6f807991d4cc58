"""The MoMa model: config and presets, transformer, FFN variants, routers, accounting."""
