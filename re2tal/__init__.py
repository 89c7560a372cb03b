"""re2tal: end-to-end temporal action localization with reversible video backbones."""

__version__ = "0.1.0"
