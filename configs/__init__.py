"""Architecture presets (``ModelConfig.from_name``), shipped as package data."""
